"""The reliability runner's quick profile against a real demo (``python -m reliability``).

One demo, every hostile-input and TLS case with its expected outcome, a short concurrent
load, and the audit records it must produce counted in the demo's Audit Record Repository.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reliability.runner import QUICK, Outcome, render, run


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    workdir = tmp_path_factory.mktemp("reliability")
    return run(QUICK, workdir, report=workdir / "REPORT.md")


def test_every_case_has_its_expected_outcome(outcome: Outcome) -> None:
    failed = {r.case.name: (r.case.expected, r.observed) for r in outcome.cases if not r.passed}
    assert not failed
    categories = {r.case.category for r in outcome.cases}
    assert categories == {"hostile XML/SOAP", "hostile MTOM", "TLS", "isolation"}
    names = {r.case.name for r in outcome.cases}
    for required in ("billion laughs", "10,000 parts", "TLS 1.0", "slowloris handshake"):
        assert required in names
    # The attacks of issue #16, each a case of its own.
    isolation = {r.case.name for r in outcome.cases if r.case.category == "isolation"}
    for attack in ("attribute bomb", "element flood", "idle pre-handshake", "header slowloris"):
        assert any(attack in name for name in isolation), attack
    assert any("body slowloris" in name for name in isolation)


def test_load_completes_without_errors_and_leaks(outcome: Outcome) -> None:
    assert [t.kind for t in outcome.tallies] == ["ITI-18 query", "RAD-69 study retrieval"]
    for tally in outcome.tallies:
        assert tally.ok > 0 and not tally.errors, tally.errors[:5]
    assert outcome.temp_after == outcome.temp_before
    assert {p.name for p in outcome.processes} >= {"north gateway", "audit record repository"}
    assert outcome.passed, outcome.failures()


def test_audit_records_expected_equal_found(outcome: Outcome) -> None:
    assert outcome.audit
    for count in outcome.audit:
        assert count.found == count.expected, count
    # The load's queries alone must have been audited at the first community.
    iti18 = next(c for c in outcome.audit if c.subtype == "ITI-18")
    assert iti18.found >= outcome.tallies[0].ok


def test_report_shows_every_table(outcome: Outcome) -> None:
    text = render(outcome)
    for heading in ("## Cases", "## Load", "## Memory and file descriptors", "## Audit records"):
        assert heading in text
    assert "**Result: PASS**" in text
    assert text.count("| pass |") == len(outcome.cases)
    assert "| **FAIL** |" not in text


def test_command_line_refuses_bad_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reliability", "--soak", "-5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert "positive" in result.stderr
    assert "Traceback" not in result.stderr
