"""The committed lock: exact releases for every dependency, none for the torch family, and the setup uses it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"requirements.lock: not an exact pin: {line!r}"
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_the_lock_pins_every_dependency_exactly_and_no_torch_build():
    text = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    assert "FAILED" not in text, "the lock was written by a run whose suite failed"
    pins = _locked()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    missing = sorted(_name(r) for r in wanted if _name(r) not in ("torch", "aigc") and _name(r) not in pins)
    assert missing == [], f"dependencies without a pin in requirements.lock: {missing}"
    torch_family = sorted(n for n in pins if n in ("torch", "triton") or n.startswith("nvidia-"))
    assert torch_family == [], f"AIGC_TORCH chooses the torch build; the lock must not pin {torch_family}"
    assert "aigc" not in pins


def test_the_setup_installs_with_the_lock():
    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    installs = [line for line in setup.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs and all("-c requirements.lock" in line for line in installs)
