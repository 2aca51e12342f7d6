"""`regate patch apply <codebase> --repo PATH`: apply a shipped diff to an upstream checkout at its pinned commit.

The diffs (`patches/*.diff`; docs/ARCHITECTURE.md) only add lines. A target file that is not byte-identical to the
pinned commit's is refused, so a diff never lands in code it was not written against.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .core.errors import UserError


class PatchError(UserError, RuntimeError):
    """The target file is missing or does not match the commit the diff was written against."""


@dataclass(frozen=True)
class UpstreamPatch:
    codebase: str
    repo: str
    commit: str
    target: str  # path of the patched file inside the checkout
    original_sha256: str
    patched_sha256: str

    @property
    def diff_name(self) -> str:
        return f"{self.codebase}-{self.commit}.diff"

    def diff_text(self) -> str:
        return (resources.files("regate_plugin.patches") / self.diff_name).read_text()


PATCHES = {
    patch.codebase: patch
    for patch in (
        UpstreamPatch(
            codebase="llava",
            repo="haotian-liu/LLaVA",
            commit="c121f04",
            target="llava/train/train.py",
            original_sha256="f87eca266b79905df845efd6bc5e28a57fe10dd8eeaa8d08ea4de97d27ad7b06",
            patched_sha256="1e89c490b6b77dbeb17913b9b5f2a9de68bbd876f850a186c5a57fc4f5367698",
        ),
        UpstreamPatch(
            codebase="videollama2",
            repo="DAMO-NLP-SG/VideoLLaMA2",
            commit="c0bb03a",
            target="videollama2/train.py",
            original_sha256="bda9c20feaee2b90f37348b4970fc9897acebeb6f61aacbe25961c39da14d51f",
            patched_sha256="6af2d7d6cb91dd733dccd6fb71f5bdff29a1848785ea22d55a8a2fa68c77100b",
        ),
    )
}

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def apply_unified_diff(original: str, diff: str, name: str = "file") -> str:
    """Apply a one-file unified diff whose hunks only add lines; every context line must match."""
    source = original.split("\n")
    out: list[str] = []
    cursor = 0  # next unread line of `source`
    lines = diff.split("\n")
    i = 0
    while i < len(lines):
        match = _HUNK.match(lines[i])
        i += 1
        if not match:
            continue
        start = int(match.group(1)) - 1
        out += source[cursor:start]
        cursor = start
        while i < len(lines) and not lines[i].startswith("@@") and lines[i][:1] in (" ", "+", "-", ""):
            line = lines[i]
            i += 1
            if line.startswith("+"):
                out.append(line[1:])
            elif line.startswith("-"):
                raise PatchError(f"{name}: the diff removes a line, but regate patches only add lines")
            elif line.startswith(" "):
                if cursor >= len(source) or source[cursor] != line[1:]:
                    raise PatchError(f"{name}: context line {cursor + 1} does not match the diff")
                out.append(source[cursor])
                cursor += 1
    out += source[cursor:]
    return "\n".join(out)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def apply_patch(codebase: str, repo: str | Path) -> str:
    """Patch the checkout at `repo`; returns what was done. Raises PatchError with the reason otherwise."""
    if codebase not in PATCHES:
        raise PatchError(f"no patch for {codebase!r}; available: {', '.join(sorted(PATCHES))}")
    patch = PATCHES[codebase]
    path = Path(repo) / patch.target
    if not path.is_file():
        raise PatchError(f"{path} not found: --repo must be the root of a {patch.repo} checkout")
    text = path.read_text()
    digest = _sha256(text)
    if digest == patch.patched_sha256:
        return f"{path} already has the regate-plugin patch ({patch.diff_name}); nothing to do"
    if digest != patch.original_sha256:
        raise PatchError(
            f"{path} does not match {patch.repo}@{patch.commit} (sha256 {digest[:12]}…, expected "
            f"{patch.original_sha256[:12]}…), so {patch.diff_name} was not applied. Check out that commit, or use the "
            f"zero-edit launcher instead: python -m regate_plugin.launch {codebase} <train args> --token_elision regate"
        )
    patched = apply_unified_diff(text, patch.diff_text(), str(path))
    if _sha256(patched) != patch.patched_sha256:
        raise PatchError(f"applying {patch.diff_name} to {path} gave an unexpected result; the file was left unchanged")
    path.write_text(patched)
    return f"patched {path} with {patch.diff_name} ({patch.repo}@{patch.commit}): --token_elision and --regate_* added"
