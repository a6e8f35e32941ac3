"""Where the Debian dcmtk tools are: tests run them by absolute path, never by bare name.

pynetdicom installs console scripts named like dcmtk's tools (``echoscu``, ``findscu``,
``getscu``, ``movescu``, ``storescp``, ``storescu``) into the venv's ``bin``, which comes
first on ``PATH`` once the venv is activated: a bare ``storescp`` would then start
pynetdicom's, whose options and behaviour differ. dcmtk's tools are native executables, so a
candidate counts only when it is an ELF binary.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Where Debian's dcmtk package puts its tools; searched before PATH.
DEBIAN_BIN = Path("/usr/bin")


def _native(path: Path) -> bool:
    try:
        with path.open("rb") as binary:
            return binary.read(4) == b"\x7fELF" and os.access(path, os.X_OK)
    except OSError:
        return False


def find_dcmtk(tool: str) -> str | None:
    """The dcmtk executable ``tool``: /usr/bin first, then the native one on PATH, if any."""
    candidates = [DEBIAN_BIN / tool]
    candidates += [Path(d) / tool for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    return next((str(c) for c in candidates if _native(c)), None)


def dcmtk(tool: str) -> str:
    """The absolute path of dcmtk's ``tool``. Missing: the test fails under CI (which installs
    the Debian package), else it is skipped."""
    found = find_dcmtk(tool)
    if found is None:
        message = f"dcmtk {tool} is not installed (Debian package dcmtk; a venv script is not it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return found
