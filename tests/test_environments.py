"""The upstream environments install as the README says: its install commands are the setup scripts' commands,
both pin through the same constraints file, every package they name is pinned there, and the environments the
tests run in hold exactly the pinned versions (read inside each environment's own python)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from .test_templates import LLAVA_PYTHON, REPO, VIDEOLLAMA2_PYTHON

# environment -> (its setup script, its python)
ENVIRONMENTS = {
    "llava": ("scripts/setup_llava_env.sh", LLAVA_PYTHON),
    "videollama2": ("scripts/setup_videollama2_env.sh", VIDEOLLAMA2_PYTHON),
}
SCRIPT_PIP = '"${pip[@]}" install '


def constraints_file(environment: str) -> Path:
    return REPO / "constraints" / f"{environment}.txt"


def normalised(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_of(environment: str) -> dict[str, str]:
    """The `name==version` lines of constraints/<environment>.txt."""
    pinned = {}
    for line in constraints_file(environment).read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            name, version = requirement.split("==")
            pinned[normalised(name)] = version
    return pinned


def readme_commands(environment: str) -> list[str]:
    """The `pip install` lines of the README's code blocks that name constraints/<environment>.txt."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("pip install") and f"constraints/{environment}.txt" in line]


def script_commands(environment: str) -> list[str]:
    """The setup script's pip install lines, as a user would type them (`pip install ...`)."""
    script = (REPO / ENVIRONMENTS[environment][0]).read_text()
    return [
        "pip install " + line[len(SCRIPT_PIP) :].strip() for line in script.splitlines() if line.startswith(SCRIPT_PIP)
    ]


@pytest.mark.parametrize("environment", sorted(ENVIRONMENTS))
def test_the_readme_installs_with_the_setup_scripts_commands_and_constraints(environment):
    commands = script_commands(environment)
    assert commands, f"{ENVIRONMENTS[environment][0]} installs nothing with pip"
    assert readme_commands(environment) == commands
    for command in commands:
        assert f" -c constraints/{environment}.txt " in f"{command} ", command
        named = [
            w for w in command.split()[2:] if not w.startswith("-") and w not in (f"constraints/{environment}.txt", ".")
        ]
        unpinned = [name for name in named if normalised(name) not in pins_of(environment)]
        assert not unpinned, f"{command}: {unpinned} not pinned in {constraints_file(environment)}"


@pytest.mark.parametrize("environment", sorted(ENVIRONMENTS))
def test_the_environment_holds_the_pinned_versions(environment):
    python = ENVIRONMENTS[environment][1]
    assert python.exists(), f"{python} is missing: run `make setup` ({ENVIRONMENTS[environment][0]})"
    pinned = pins_of(environment)
    probe = (
        "import importlib.metadata as m, json, sys\n"
        "def version(name):\n"
        "    try:\n"
        "        return m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        "print(json.dumps({name: version(name) for name in sys.argv[1:]}))"
    )
    done = subprocess.run([str(python), "-c", probe, *pinned], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == pinned, f"{python} differs from {constraints_file(environment)}: run `make setup`"
