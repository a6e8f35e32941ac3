"""``python -m reliability [--quick | --soak SECONDS]``: the suite against a real demo.

Starts ``xca-gateway demo`` in a private work directory (its own TMPDIR, so leaked temp files
are the gateways' own), runs every case, then a bounded load phase, measures the processes
before and after, counts the audit records the load must have produced in the demo's Audit
Record Repository (ITI-81), and writes ``reliability/REPORT.md``. Exit status 0 only when every
check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil

from reliability.cases import (
    SLOW_BODY_BOUND,
    CaseResult,
    Target,
    hostile_mtom_cases,
    hostile_xml_cases,
    isolation_cases,
    run_case,
    run_cases_concurrently,
    slow_cases,
    slow_isolation_cases,
    tls_cases,
)
from reliability.load import Study, Tally, prepare_study, run_load

REPORT = Path(__file__).resolve().parent / "REPORT.md"
DEMO_START_TIMEOUT = 120.0
WARM_UP_SECONDS = 2.0
AUDIT_SETTLE_TIMEOUT = 60.0
# Descriptors a gateway may legitimately keep after the load: its outbound keep-alive pool
# (outbound.max_keepalive_connections, 20) and the server side of the peers' pools to it
# (kept for server.keepalive_timeout), plus a little. Open regular files may grow by the
# registry's lazily opened per-thread SQLite connections (4 workers x database + WAL file).
# A leak per request (hundreds in the load) exceeds either by far.
FD_SLACK = 2 * 20 + 8
FILE_SLACK = 4 * 2

# Cases that need a process to fail in a way the demo cannot survive, with the automated
# test that covers each (and its expected outcome).
COVERED_BY_TESTS: list[tuple[str, str, str]] = [
    (
        "peer hangs",
        "tests/test_client.py::test_refused_connection_hung_peer_and_tls_refusal",
        "PeerError timeout at the deadline",
    ),
    (
        "peer resets the connection mid-answer",
        "tests/test_initiating.py::test_fan_out_merges_good_peers_and_reports_every_failed_one",
        "PartialSuccess, XDSUnavailableCommunity for that peer",
    ),
    (
        "peer answers garbage (binary, HTML, not HTTP)",
        "tests/test_reliability_faults.py::test_a_peer_answering_garbage_is_a_peer_error",
        "PeerError malformed / http / connect",
    ),
    (
        "peer answers byte by byte, within / over the deadline",
        "tests/test_reliability_faults.py::test_a_peer_answering_byte_by_byte",
        "answer used / PeerError timeout at the deadline",
    ),
    (
        "imaging source dies mid-study",
        "tests/test_rad69.py::test_source_failing_mid_study_aborts_the_response_and_gateways_"
        "keep_serving",
        "response aborted, gateways keep serving",
    ),
    (
        "audit repository down",
        "tests/test_audit_trail.py::test_outage_records_arrive_exactly_once_in_order",
        "every record delivered once, in order, after recovery",
    ),
    (
        "SIGKILL of the gateway",
        "tests/test_audit_trail.py::test_sigkilled_gateway_loses_nothing_after_restart",
        "no committed audit record lost after restart",
    ),
    (
        "SIGKILL of the gateway during a retrieve",
        "tests/test_reliability_sigkill.py::test_sigkill_during_a_retrieve",
        "the consumer's stream breaks (never looks complete); the restarted gateway serves it",
    ),
    (
        "disk full under the audit spool",
        "tests/test_reliability_faults.py::test_a_full_disk_fails_the_spool_append_without_corrupting_committed_records",
        "append fails (OSError); committed records intact; spool usable again",
    ),
    (
        "registry database locked",
        "tests/test_reliability_faults.py::test_a_locked_registry_database_answers_registry_busy",
        "XDSRegistryBusy",
    ),
    (
        "registry database destroyed",
        "tests/test_reliability_faults.py::test_a_destroyed_registry_database_answers_registry_error",
        "Failure with XDSRegistryError",
    ),
    (
        "duplicated wsse:Security headers (XUA on)",
        "tests/test_reliability_faults.py::test_duplicated_ws_security_headers_are_refused",
        "400 Sender wsse:InvalidSecurity",
    ),
    (
        "signature wrapping of a signed SAML assertion",
        "tests/test_xua.py (test_*wrapping*, test_*forged*, test_*moved*)",
        "assertion refused, wsse Sender fault",
    ),
    (
        "slow request body (body_timeout 1 s)",
        "tests/test_reliability_faults.py::test_a_slow_request_body_is_cut_off_by_the_body_timeout",
        "the server ends the request and closes the connection",
    ),
    (
        "parsers fuzzed: XML, SOAP, RAD-69, MTOM, syslog framing, ARR records",
        "tests/test_reliability_fuzz.py",
        "a model or the parser's own rejection, never another exception",
    ),
]


@dataclass(frozen=True)
class Profile:
    name: str
    load_seconds: float
    queries: int
    retrievals: int
    slow: bool  # run the minutes-long timeout cases too


QUICK = Profile("quick", load_seconds=8, queries=20, retrievals=2, slow=False)


def soak(seconds: float) -> Profile:
    return Profile("soak", load_seconds=seconds, queries=200, retrievals=20, slow=True)


@dataclass
class ProcessFigures:
    name: str
    rss_before: int
    fds_before: int
    files_before: int
    rss_after: int = 0
    fds_after: int = 0
    files_after: int = 0


@dataclass
class AuditCount:
    source: str
    subtype: str
    expected: int
    found: int = -1
    # False when the count cannot be derived (answers with unavailable communities: which
    # peers were called is not visible to the consumer); shown, not compared.
    checked: bool = True


@dataclass
class Outcome:
    profile: Profile
    started: datetime
    cases: list[CaseResult] = field(default_factory=list)
    tallies: list[Tally] = field(default_factory=list)
    processes: list[ProcessFigures] = field(default_factory=list)
    temp_before: int = 0
    temp_after: int = 0
    audit: list[AuditCount] = field(default_factory=list)
    study: str = ""
    problems: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures()

    def failures(self) -> list[str]:
        failed = [f"case {r.case.name}: {r.observed}" for r in self.cases if not r.passed]
        failed += [f"{t.kind}: {len(t.errors)} errors" for t in self.tallies if t.errors]
        failed += [f"{t.kind}: nothing completed" for t in self.tallies if not t.ok]
        failed += [
            f"{p.name}: {p.fds_after - p.fds_before} more file descriptors"
            for p in self.processes
            if p.fds_after - p.fds_before > FD_SLACK
        ]
        failed += [
            f"{p.name}: {p.files_after - p.files_before} more open files"
            for p in self.processes
            if p.files_after - p.files_before > FILE_SLACK
        ]
        if self.temp_after != self.temp_before:
            failed.append(f"temp files {self.temp_before} → {self.temp_after}")
        failed += [
            f"audit {a.source} {a.subtype}: expected {a.expected}, found {a.found}"
            for a in self.audit
            if a.checked and a.found != a.expected
        ]
        return failed + self.problems


# ----------------------------------------------------------------------------- the demo


@contextlib.contextmanager
def running_demo(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    tmp = workdir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    log = (workdir / "demo.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "xca_gateway", "demo", "--workdir", str(workdir / "demo")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    log.close()
    try:
        endpoints = workdir / "demo" / "endpoints.json"
        deadline = time.monotonic() + DEMO_START_TIMEOUT
        while not endpoints.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if not endpoints.exists():
            raise RuntimeError(
                "the demo did not start: " + (workdir / "demo.log").read_text(errors="replace")
            )
        yield process, json.loads(endpoints.read_text())
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def demo_children(process: subprocess.Popen[bytes]) -> dict[str, psutil.Process]:
    """The demo's direct children by name: one gateway per community, the repository and
    the authorization server."""
    found: dict[str, psutil.Process] = {}
    for child in psutil.Process(process.pid).children():
        cmdline = child.cmdline()
        if "xca_gateway.tools.auth_server" in cmdline:
            found["authorization server"] = child
        elif "serve" in cmdline and "--config" in cmdline:
            name = Path(cmdline[cmdline.index("--config") + 1]).parent.name
            found["audit record repository" if name == "arr" else f"{name} gateway"] = child
        else:
            found["audit record repository"] = child
    return found


def figures(process: psutil.Process) -> tuple[int, int, int]:
    """RSS, open descriptors and open regular files, the repository's workers included."""
    family = [process, *process.children(recursive=True)]
    rss = sum(p.memory_info().rss for p in family)
    fds = sum(p.num_fds() for p in family)
    files = sum(len(p.open_files()) for p in family)
    return rss, fds, files


def count_temp_files(directory: Path) -> int:
    return sum(1 for p in directory.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- audit (ITI-81)


def expected_audit(target: Target, study: Study, queries: int, retrievals: int) -> list[AuditCount]:
    """Records the load must have produced: a consumer's ITI-18 at the first community is
    audited there (ITI-18) and fans out as ITI-38 to every other community (audited on both
    sides); a RAD-69 there is audited as RAD-69 and crosses to the holder as RAD-75 (both
    sides)."""
    names = [c["name"] for c in target.endpoints["communities"]]
    first, others = names[0], names[1:]
    counts = [
        AuditCount(f"{first}-gateway", "ITI-18", queries),
        AuditCount(f"{first}-gateway", "ITI-38", queries * len(others)),
        *(AuditCount(f"{o}-gateway", "ITI-38", queries) for o in others),
        AuditCount(f"{first}-gateway", "RAD-69", retrievals),
    ]
    if study.holder != first:
        counts.append(AuditCount(f"{first}-gateway", "RAD-75", retrievals))
        counts.append(AuditCount(f"{study.holder}-gateway", "RAD-75", retrievals))
    return counts


def audit_total(target: Target, since: datetime, source: str, subtype: str) -> int:
    fhir = target.endpoints["auditRepository"]["fhir"]
    with httpx.Client(verify=target.audit_consumer_context(), timeout=60) as http:
        response = http.get(
            fhir + "/AuditEvent",
            params={
                "date": "ge" + since.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "source": source,
                "subtype": subtype,
                # An exact count: ordinary searches stop counting at an estimate cap.
                "_summary": "count",
            },
        )
    response.raise_for_status()
    total = response.json().get("total")
    if not isinstance(total, int):
        raise RuntimeError(f"the audit repository gave no count: {response.text[:200]}")
    return total


def settle_audit(target: Target, since: datetime, wanted: list[AuditCount]) -> None:
    """Records travel by syslog-TLS, so poll (bounded) until every count matches."""
    deadline = time.monotonic() + AUDIT_SETTLE_TIMEOUT
    while True:
        for count in wanted:
            count.found = audit_total(target, since, count.source, count.subtype)
        if all(c.found == c.expected for c in wanted) or time.monotonic() > deadline:
            return
        time.sleep(1)


def audit_baseline(target: Target, since: datetime, wanted: list[AuditCount]) -> None:
    """Records from before the load (setup, hostile cases) are counted and expected too."""
    previous: list[int] = []
    for _ in range(30):  # until the repository has everything sent so far (bounded)
        current = [audit_total(target, since, c.source, c.subtype) for c in wanted]
        if current == previous:
            break
        previous = current
        time.sleep(1)
    for count, base in zip(wanted, previous, strict=True):
        count.expected += base


# ----------------------------------------------------------------------------- the run


def run(profile: Profile, workdir: Path, report: Path | None = REPORT) -> Outcome:
    outcome = Outcome(profile, datetime.now(UTC))
    since = outcome.started - timedelta(seconds=5)
    clock = time.monotonic()

    def phase(name: str) -> None:
        nonlocal clock
        outcome.phases[name] = time.monotonic() - clock
        clock = time.monotonic()

    with running_demo(workdir) as (process, endpoints):
        phase("demo start")
        target = Target(endpoints, workdir / "demo")
        children = demo_children(process)
        tmp = workdir / "tmp"
        # The slowloris cases wait for server timeouts: in threads, alongside the rest.
        slow = [c for c in tls_cases(target.workdir) if c.name == "slowloris handshake"]
        slow += slow_isolation_cases()
        if profile.slow:
            slow += slow_cases()
        fast = [
            *hostile_xml_cases(),
            *hostile_mtom_cases(),
            *(c for c in tls_cases(target.workdir) if c.name != "slowloris handshake"),
            *isolation_cases(),
        ]
        slow_results: list[CaseResult] = []
        slow_thread = threading.Thread(
            target=lambda: slow_results.extend(run_cases_concurrently(slow, target)), daemon=True
        )
        slow_thread.start()
        outcome.cases = [run_case(c, target) for c in fast]
        study = asyncio.run(prepare_study(target))
        outcome.study = f"{study.holder}: {len(study.request.documents)} instances"
        # A short warm-up first, so connection and database pools are at their steady size
        # when the "before" figures are taken (its audit records are in the baseline).
        asyncio.run(
            run_load(
                target,
                study,
                seconds=WARM_UP_SECONDS,
                queries=profile.queries,
                retrievals=profile.retrievals,
                scratch=workdir / "retrieved",
            )
        )
        wanted = expected_audit(target, study, 0, 0)
        audit_baseline(target, since, wanted)
        slow_thread.join(timeout=SLOW_BODY_BOUND + 120)
        outcome.cases += slow_results
        phase("cases and audit baseline")
        outcome.temp_before = count_temp_files(tmp)
        for name, child in children.items():
            outcome.processes.append(ProcessFigures(name, *figures(child)))
        query, retrieve = asyncio.run(
            run_load(
                target,
                study,
                seconds=profile.load_seconds,
                queries=profile.queries,
                retrievals=profile.retrievals,
                scratch=workdir / "retrieved",
            )
        )
        outcome.tallies = [query, retrieve]
        phase("load")
        # Every answered query is audited where it was served, partial answers included; the
        # ITI-38 fan-out is exact only when every peer answered.
        answered = query.ok + query.answered_with_errors
        for count, extra in zip(
            wanted, expected_audit(target, study, answered, retrieve.ok), strict=True
        ):
            count.expected += extra.expected
            if query.answered_with_errors and count.subtype == "ITI-38":
                count.checked = False
        settle_audit(target, since, wanted)
        outcome.audit = wanted
        time.sleep(2)  # closed client connections reach the servers
        for figures_row, child in zip(outcome.processes, children.values(), strict=True):
            figures_row.rss_after, figures_row.fds_after, figures_row.files_after = figures(child)
        outcome.temp_after = count_temp_files(tmp)
        phase("audit settle and measurements")
    phase("demo stop")
    if report is not None:
        report.write_text(render(outcome), encoding="utf-8")
    return outcome


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(outcome: Outcome) -> str:
    p = outcome.profile
    lines = [
        "# Reliability report",
        "",
        "Regenerated by `python -m reliability` (profile "
        f"`{p.name}`: {p.queries} concurrent ITI-18 consumers and {p.retrievals} concurrent "
        f"RAD-69 study retrievals for {p.load_seconds:g} s) against a fresh "
        f"`xca-gateway demo`, {outcome.started:%Y-%m-%d %H:%M} UTC.",
        "",
        f"**Result: {'PASS' if outcome.passed else 'FAIL'}**",
        "",
        "Phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in outcome.phases.items()) + ".",
        "",
    ]
    failures = outcome.failures()
    if failures:
        lines += ["Failures:", "", *(f"- {_cell(f)}" for f in failures), ""]
    lines += [
        "## Cases",
        "",
        "| Category | Case | Expected | Observed | Result | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in outcome.cases:
        lines.append(
            f"| {r.case.category} | {_cell(r.case.name)} | {_cell(r.case.expected)} | "
            f"{_cell(r.observed)} | {'pass' if r.passed else '**FAIL**'} | {r.seconds:.1f} |"
        )
    lines += [
        "",
        "## Load",
        "",
        f"Study retrieved: {outcome.study}.",
        "",
        "| Operation | Completed | Errors | p50 s | p95 s | p99 s | max s |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in outcome.tallies:
        top = max(t.latencies, default=0.0)
        lines.append(
            f"| {t.kind} | {t.ok} | {len(t.errors)} | {t.percentile(50):.3f} | "
            f"{t.percentile(95):.3f} | {t.percentile(99):.3f} | {top:.3f} |"
        )
    for t in outcome.tallies:
        for error in sorted(set(t.errors))[:5]:
            lines.append(f"\n- {t.kind} error: {_cell(error)}")
    lines += [
        "",
        "## Memory and file descriptors (before → after the load)",
        "",
        "| Process | RSS MiB before | RSS MiB after | fds before | fds after "
        "| open files before | open files after |",
        "|---|---|---|---|---|---|---|",
    ]
    for pf in outcome.processes:
        lines.append(
            f"| {pf.name} | {_mib(pf.rss_before)} | {_mib(pf.rss_after)} | "
            f"{pf.fds_before} | {pf.fds_after} | {pf.files_before} | {pf.files_after} |"
        )
    lines += [
        "",
        f"Temporary files (the demo's private TMPDIR): {outcome.temp_before} before, "
        f"{outcome.temp_after} after.",
        "",
        "## Audit records (ITI-81 search of the demo's Audit Record Repository)",
        "",
        "| Audit source | Transaction | Expected | Found |",
        "|---|---|---|---|",
    ]
    for a in outcome.audit:
        expected = str(a.expected) if a.checked else f"≥ {a.expected} (not derivable)"
        lines.append(f"| {a.source} | {a.subtype} | {expected} | {a.found} |")
    total_expected = sum(a.expected for a in outcome.audit if a.checked)
    total_found = sum(a.found for a in outcome.audit if a.checked)
    lines += [
        f"| **total (compared rows)** | | **{total_expected}** | **{total_found}** |",
        "",
        "## Covered by the test suite",
        "",
        "Faults that need a process to break in ways a running demo cannot survive are "
        "automated as tests (`pytest`):",
        "",
        "| Case | Test | Expected outcome |",
        "|---|---|---|",
        *(f"| {c} | {t} | {e} |" for c, t, e in COVERED_BY_TESTS),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reliability",
        description="Run the reliability suite against a fresh demo and write "
        "reliability/REPORT.md.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the < 60 s profile (default)")
    mode.add_argument(
        "--soak", type=float, metavar="SECONDS", help="200 + 20 concurrent consumers this long"
    )
    parser.add_argument("--report", type=Path, default=REPORT, help="where to write the report")
    parser.add_argument("--workdir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.soak is not None and args.soak <= 0:
        parser.error("--soak needs a positive number of seconds")
    profile = soak(args.soak) if args.soak is not None else QUICK
    with tempfile.TemporaryDirectory(prefix="xca-reliability-") as scratch:
        workdir = args.workdir or Path(scratch)
        try:
            outcome = run(profile, workdir, args.report)
        except (RuntimeError, OSError, httpx.HTTPError) as exc:
            print(f"reliability: the run could not complete: {exc}", file=sys.stderr)
            return 2
    print(f"reliability: {'PASS' if outcome.passed else 'FAIL'}; report in {args.report}")
    for failure in outcome.failures():
        print(f"  {failure}", file=sys.stderr)
    return 0 if outcome.passed else 1
