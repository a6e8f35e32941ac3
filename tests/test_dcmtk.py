"""Tests run dcmtk's own tools, not the venv's console scripts of the same names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dcmtk import dcmtk

# The dcmtk tools the tests start; pynetdicom ships scripts named like the first six.
TOOLS = ["echoscu", "findscu", "getscu", "movescu", "storescp", "storescu", "dcmqrscp"]


@pytest.mark.parametrize("tool", TOOLS)
def test_a_script_first_on_path_does_not_shadow_dcmtk(
    tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shadow = tmp_path / tool
    shadow.write_text(f"#!{sys.executable}\nraise SystemExit('not dcmtk')\n")
    shadow.chmod(0o755)
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join([str(tmp_path), str(venv_bin), os.environ.get("PATH", "")])
    monkeypatch.setenv("PATH", path)
    binary = dcmtk(tool)
    assert Path(binary).parent not in (tmp_path, venv_bin)
    # dcmtk's own: every tool answers --version with the toolkit's name.
    result = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert "dcmtk" in (result.stdout + result.stderr).lower(), result
