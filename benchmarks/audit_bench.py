"""ATNA audit trail: sustained events/s to rsyslog over mutual TLS, and loss across an outage.

A private rsyslogd (Debian rsyslog + rsyslog-gnutls) is the Audit Record Repository, receiving
RFC 5425 syslog over mutual TLS on loopback and writing every raw message to a file. The audit
trail is the gateway's own (:class:`xca_gateway.audit.trail.AuditTrail`: writer thread, fsync'd
spool,
TLS sender). Two measurements:

* throughput: ``--events`` ITI-38 audit messages recorded as fast as the loop can build them;
  events/s = events / time until rsyslog has written the last one (target >= 20,000/s, issue 22);
* outage: events recorded at ``--rate``/s; after ``--lead`` seconds rsyslog is stopped for
  ``--outage`` seconds (default 30) and started again; then every event id is looked up in what
  rsyslog wrote: loss (target 0) and duplicates are counted.

    python benchmarks/audit_bench.py [--events 50000] [--outage 30] [--rate 1000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from xca_gateway.audit import messages as m
from xca_gateway.audit import parse_audit_config
from xca_gateway.audit.rsyslog import RsyslogRepository, gtls_available, rsyslogd_path
from xca_gateway.audit.trail import AuditTrail
from xca_gateway.security.dev_pki import init_dev_pki
from xca_gateway.settings import TlsConfig
from xca_gateway.transactions import iti38

BASE = datetime(2026, 1, 1, tzinfo=UTC)
_ID = re.compile(rb'ParticipantObjectID="urn:uuid:bench-(\d+)-(\d{12})"')


def _event(ctx: m.AuditContext, run: int, n: int) -> m.AuditMessage:
    return iti38.query_audit(
        ctx,
        m.Parties(
            requester=m.remote_node("127.0.0.1", certificate_subject="CN=beta.xca-gateway.test"),
            responder=ctx.local_node("https://alpha.xca-gateway.test:8443/xca/iti38"),
            when=BASE + timedelta(microseconds=n),
        ),
        side="responding",
        query_id=f"urn:uuid:bench-{run}-{n:012d}",
        query=b'<query:AdhocQueryRequest xmlns:query="urn:oasis:names:tc:ebxml-regrep:xsd:'
        b'query:3.0"><rim:AdhocQuery id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"/>'
        b"</query:AdhocQueryRequest>" * 4,
        home_community_id="urn:oid:1.3.6.1.4.1.21367.13.70.2",
        patient_ids=[f"P{n}^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"],
    )


def _ids(repo: RsyslogRepository, run: int) -> list[int]:
    found = []
    for raw in repo.messages("tls"):
        match = _ID.search(raw)
        if match and int(match.group(1)) == run:
            found.append(int(match.group(2)))
    return found


class LineCounter:
    """Counts the lines rsyslog has written, reading only what was added since the last look
    (re-reading a 150 MB output file every poll cost the benchmark's own process more CPU than
    the audit trail it measures)."""

    def __init__(self, repo: RsyslogRepository) -> None:
        self.path = repo.output
        self.offset = 0
        self.lines = 0

    def count(self) -> int:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                while chunk := fh.read(1 << 20):
                    self.lines += chunk.count(b"\n")
                    self.offset += len(chunk)
        except FileNotFoundError:
            pass
        return self.lines


async def _wait_lines(counter: LineCounter, lines: int, timeout: float) -> float:
    """Poll (bounded) until rsyslog wrote ``lines`` messages in all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(counter.count) >= lines:
            return time.perf_counter()
        await asyncio.sleep(0.05)
    raise TimeoutError(f"rsyslog did not write {lines} messages within {timeout} s")


def _cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (or of ``pid``, from /proc)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def throughput(trail: AuditTrail, repo: RsyslogRepository, events: int) -> dict[str, Any]:
    ctx = trail.context
    counter = LineCounter(repo)
    already = counter.count()
    rsyslog_pid = repo.pid
    assert rsyslog_pid is not None
    cpu_before, rsyslog_before = _cpu_seconds(), _cpu_seconds(rsyslog_pid)
    # The events are built here, in the trail's process, as a gateway's handlers build them:
    # building them is part of the cost measured (a few microseconds of it; printed apart).
    build_started = time.process_time()
    for n in range(min(events, 2000)):
        _event(ctx, 0, n)
    build_us = (time.process_time() - build_started) / min(events, 2000) * 1e6
    start = time.perf_counter()
    for n in range(events):
        trail.record(_event(ctx, 1, n))
        if n % 200 == 199:
            await asyncio.sleep(0)  # a gateway's loop serves requests between records
    recorded = time.perf_counter()
    done = await _wait_lines(counter, already + events, timeout=max(60.0, events / 500))
    cpu = _cpu_seconds() - cpu_before
    rsyslog_cpu = _cpu_seconds(rsyslog_pid) - rsyslog_before
    ids = await asyncio.to_thread(_ids, repo, 1)
    return {
        "events": events,
        "record_seconds": round(recorded - start, 3),
        "delivered_seconds": round(done - start, 3),
        "events_per_second": round(events / (done - start)),
        "received": len(ids),
        "in_order": ids == sorted(ids),
        # CPU per event of the process holding the trail (building the events included) and
        # of rsyslog: what the ceiling is on a core of its own, whatever else runs meanwhile.
        "trail_cpu_us_per_event": round(cpu / events * 1e6, 1),
        "building_cpu_us_per_event": round(build_us, 1),
        "rsyslog_cpu_us_per_event": round(rsyslog_cpu / events * 1e6, 1),
        "ceiling_events_per_second": round(events / cpu),
        "load_average": round(os.getloadavg()[0], 1),
        "target_events_per_second": 20000,
    }


async def outage(
    trail: AuditTrail, repo: RsyslogRepository, *, rate: float, lead: float, down: float
) -> dict[str, Any]:
    ctx = trail.context
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = int(rate * (lead + down + lead))
    stop_at, start_at = start + lead, start + lead + down
    stopped = restarted = False
    sent = 0
    while sent < total:
        now = loop.time()
        if not stopped and now >= stop_at:
            await asyncio.to_thread(repo.stop)
            stopped = True
        if stopped and not restarted and now >= start_at:
            await asyncio.to_thread(repo.start)
            restarted = True
        due = min(total, int((now - start) * rate) + 1)
        while sent < due:
            trail.record(_event(ctx, 2, sent))
            sent += 1
        await asyncio.sleep(0.01)
    await trail.wait_delivered(max(120.0, down * 4))
    await asyncio.sleep(1.0)  # let rsyslog write the last ones
    ids = await asyncio.to_thread(_ids, repo, 2)
    counts = Counter(ids)
    return {
        "events": total,
        "rate": rate,
        "outage_seconds": down,
        "lost": sum(1 for n in range(total) if n not in counts),
        "duplicates": sum(c - 1 for c in counts.values() if c > 1),
        "first_delivery_in_order": list(dict.fromkeys(ids)) == sorted(counts),
        "reconnections": trail.stats()["destinations"]["arr"]["connections"],
        "target_lost": 0,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        root = Path(tmp)
        pki = init_dev_pki(root / "pki", ["alpha", "arr"])
        (root / "arr").mkdir()
        repo = RsyslogRepository(
            root / "arr", pki.ca, pki.communities["arr"].cert, pki.communities["arr"].key
        )
        repo.check_config()
        repo.start()
        alpha = pki.communities["alpha"]
        config = parse_audit_config(
            {
                "spool_dir": str(root / "spool"),
                "audit_source_id": "alpha-gateway",
                "reconnect_max": 1.0,
                "destinations": [
                    {"name": "arr", "transport": "tls", "host": "127.0.0.1", "port": repo.tls_port}
                ],
            },
            root,
            root,
            TlsConfig(alpha.cert, alpha.key, pki.ca),
        )
        trail = AuditTrail(config)
        await trail.start(application_activity_events=False)
        try:
            results = {"throughput": await throughput(trail, repo, args.events)}
            if args.outage > 0:
                results["outage"] = await outage(
                    trail, repo, rate=args.rate, lead=args.lead, down=args.outage
                )
        finally:
            await trail.stop(application_activity_events=False)
            repo.stop()
        results["dropped"] = trail.dropped
        return results


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50000, help="events for the throughput run")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds rsyslog is down")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s during the outage run")
    parser.add_argument("--lead", type=float, default=5.0, help="seconds before/after the outage")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    if rsyslogd_path() is None or not gtls_available():
        sys.exit("needs rsyslogd with its TLS driver (Debian: rsyslog rsyslog-gnutls)")
    results = asyncio.run(main(args))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    t = results["throughput"]
    print(
        f"throughput: {t['events']} events in {t['delivered_seconds']} s = "
        f"{t['events_per_second']} events/s delivered to rsyslog over TLS "
        f"(target >= {t['target_events_per_second']}); received {t['received']}, "
        f"in order: {t['in_order']}"
    )
    if "outage" in results:
        o = results["outage"]
        print(
            f"outage: {o['events']} events at {o['rate']}/s, repository down "
            f"{o['outage_seconds']} s: lost {o['lost']} (target 0), duplicates "
            f"{o['duplicates']}, in order: {o['first_delivery_in_order']}, "
            f"connections: {o['reconnections']}"
        )
    if results["dropped"]:
        print(f"dropped by the trail: {results['dropped']}")


if __name__ == "__main__":
    run()
