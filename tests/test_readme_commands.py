"""Every shell block of the README, run as written against a running demo (curl included).

The only changes made to a block: the demo's workdir ``/tmp/xca`` (and ``/tmp/alice``) become
this test's temporary directories, and the PACS of the import-priors example
(``127.0.0.1:4242``, AE ``ORTHANC``) is a real Orthanc started for the test. ``xca-gateway``
is this checkout's command. Blocks run in order in one bash session (``set -euo pipefail``), as
a reader pastes them one after the other; each one's output is checked.

A block that cannot run here is listed in SKIPPED with the reason; a README block that is
neither run nor listed fails the test, so a new example gets a check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_imaging_support import OrthancProcess, orthanc

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent> *)```sh\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)

# Blocks identified by a piece of their text, with why they are not run here.
SKIPPED = {
    "pip install .": "installs the package; the test suite runs from the installed checkout "
    "(and starts the demo the block ends with itself)",
    ".ci/run": "is CI itself",
    "./scripts/test -k tls": "runs the test suite",
    "python -m reliability": "its quick profile is tests/test_reliability_runner.py",
}


def readme_blocks() -> list[str]:
    return [
        "\n".join(line[len(m["indent"]) :] for line in m["body"].splitlines())
        for m in FENCE.finditer((REPO / "README.md").read_text())
    ]


def _checks(workdir: Path, alice: Path) -> dict[str, Callable[[str], None]]:
    """Per block (a piece of its text): what its output must show."""

    def query(out: str) -> None:
        lines = out.splitlines()
        assert lines[0].split() == ["COMMUNITY", "TITLE", "TYPE", "DATE", "SIZE", "STUDY"], out
        communities = {line.split()[0] for line in lines[1:-1]}
        assert communities == {"north", "south", "east"}, out
        assert lines[-1].endswith("status Success"), out

    def curl_iti18(out: str) -> None:
        assert "AdhocQueryResponse" in out, out[:500]
        assert 'status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"' in out

    def dicomweb(out: str) -> None:
        studies = json.loads(out)
        assert studies and all("0020000D" in s for s in studies), out[:500]

    def consent(out: str) -> None:
        assert '"mode": "opt-out"' in out or '"mode":"opt-out"' in out, out

    def retrieve_study(out: str) -> None:
        assert re.search(r"study [\d.]+: \d+ instance\(s\)", out), out
        assert list(alice.rglob("*.dcm")), "no instance written"

    def import_priors(out: str) -> None:
        assert re.search(r"stored [1-9]\d* instance\(s\), failed 0", out), out

    def iti81(out: str) -> None:
        bundle = json.loads(out)
        assert bundle["resourceType"] == "Bundle" and bundle["total"] > 0, out[:500]

    return {
        "xca-gateway query --endpoints": query,
        "examples/iti18-find-documents.xml": curl_iti18,
        "/studies?PatientID=": dicomweb,
        "consent revoke": consent,
        "retrieve-study": retrieve_study,
        "import-priors": import_priors,
        "_summary=count": iti81,
    }


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    with orthanc(tmp_path_factory.mktemp("readme-orthanc")) as process:
        yield process


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    workdir = tmp_path_factory.mktemp("xca")
    process = subprocess.Popen(
        [sys.executable, "-m", "xca_gateway", "demo", "--workdir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoints = workdir / "endpoints.json"
    deadline = time.monotonic() + 90
    while not endpoints.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    try:
        assert endpoints.exists(), "the demo did not become ready"
        yield workdir
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_every_readme_command_block_runs_as_written(
    demo: Path, pacs: OrthancProcess, tmp_path: Path
) -> None:
    alice = tmp_path / "alice"
    checks = _checks(demo, alice)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    command = bin_dir / "xca-gateway"
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m xca_gateway "$@"\n')
    command.chmod(0o755)

    blocks = readme_blocks()
    assert blocks, "no ```sh block found in the README"
    script = ["set -euo pipefail"]
    run: list[tuple[int, str]] = []
    for number, block in enumerate(blocks):
        if any(marker in block for marker in SKIPPED):
            continue
        key = next((k for k in checks if k in block), None)
        assert key is not None, f"README block {number} has no check:\n{block}"
        text = (
            block.replace("/tmp/xca", str(demo))
            .replace("/tmp/alice", str(alice))
            .replace("127.0.0.1:4242", f"127.0.0.1:{pacs.dicom_port}")
            .replace("--pacs-ae ORTHANC", f"--pacs-ae {pacs.ae_title}")
        )
        script += [f"echo '@@block {number}@@'", text, "echo"]
        run.append((number, key))
    used = {key for _, key in run}
    assert used == set(checks), f"checks without a README block: {set(checks) - used}"

    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    assert shutil.which("curl"), "curl is needed by the README's examples"
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    outputs = dict(
        (int(m[1]), m[2])
        for m in re.finditer(r"@@block (\d+)@@\n(.*?)(?=@@block |\Z)", result.stdout, re.S)
    )
    last = max(outputs) if outputs else None
    assert result.returncode == 0, (
        f"README block {last} failed (exit {result.returncode}):\n{blocks[last or 0]}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    for number, key in run:
        checks[key](outputs[number].strip())
