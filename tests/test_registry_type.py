"""The one registry type: duplicates refused unless asked, unknown names listed, entry points loaded."""

from __future__ import annotations

import sys
import textwrap

import pytest

from regate_plugin.registry import Registry, UnknownEntryError


def test_a_taken_name_is_refused_unless_overwrite_is_asked():
    registry: Registry[int] = Registry("thing")
    registry.register("a", 1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        registry.register("a", 2)
    registry.register("a", 2, overwrite=True)
    assert registry.get("a") == 2


def test_registering_the_same_entry_again_is_harmless():
    registry: Registry[object] = Registry("thing")
    entry = object()
    registry.register("a", entry)
    registry.register("a", entry)
    assert registry.names() == ["a"]


def test_an_unknown_name_lists_the_known_ones():
    registry: Registry[int] = Registry("thing")
    registry.register("b", 2)
    registry.register("a", 1)
    with pytest.raises(UnknownEntryError, match="unknown thing 'c'; known: a, b"):
        registry.get("c")
    assert list(registry.items()) == [("a", 1), ("b", 2)]


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="letters, digits"):
        Registry("thing").register("a b", 1)


def test_builtins_are_imported_once_on_first_read():
    calls = []
    registry: Registry[int] = Registry("thing", builtins=lambda: calls.append(registry.register("x", 1)))
    assert calls == []
    assert "x" in registry and registry.names() == ["x"]
    assert len(calls) == 1


def test_entry_points_of_installed_packages_are_registered(tmp_path, monkeypatch):
    package = tmp_path / "third_party_thing.py"
    package.write_text("ENTRY = 42\n")
    info = tmp_path / "third_party_thing-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-thing\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [regate_plugin.test_things]
            answer = third_party_thing:ENTRY
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry: Registry[int] = Registry("thing", group="regate_plugin.test_things")
    assert registry.get("answer") == 42
    sys.modules.pop("third_party_thing", None)
