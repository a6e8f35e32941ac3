"""Audit Record Repository benchmark: syslog-TLS ingest rate and patient-report search latency.

Ingest: the repository runs as its own process (``python -m xca_gateway.arr serve``); this
process pre-builds N realistic audit messages (ITI-38 / ITI-39 / RAD-75 shapes from
``xca_gateway.audit.messages``), then C mutual-TLS connections send them as RFC 5425 frames as
fast as the repository takes them. The rate is N / (time from the first byte to the moment the
repository reports all N stored). No loss means: stored == sent, and nothing refused or dropped.
The repository is deny-by-default (bench_policy): alpha's certificate is the one audit source,
bound to the records' AuditSourceID, and the consumer certificate the one audit consumer.

Search: a store of M events (default 1 million; ``--search-events 10000000`` for the big run)
is built directly through the store API (same rows and indexes as ingest, without the network),
spread over a year across P patients; then the patient access report (all events of one
patient over 90 days, plus its timeline histogram, as the UI computes it) is timed for random
patients: p50 / p95. Also timed over HTTPS through the UI (``/report``) and ITI-81.

    python benchmarks/arr_bench.py                      # 50k ingest, 1M search
    python benchmarks/arr_bench.py --events 200000 --search-events 10000000 --keep DIR

Targets (issue 8): ingest >= 5,000 events/s with no loss; report p50 <= 200 ms on SQLite at 10M.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from bench_policy import audit_consumer, audit_source

from xca_gateway.arr.app import arr_config_toml, create_officer, load_arr_config
from xca_gateway.arr.parse import (
    AuditRecord,
    parse_record,
)
from xca_gateway.arr.store import EventFilter, SqliteAuditStore
from xca_gateway.audit import messages as am
from xca_gateway.audit.syslog import format_message, frame
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import DevPki, init_dev_pki
from xca_gateway.transactions import iti38, iti39, rad75

PASSWORD = "benchmark-officer-pw"
# alpha's certificate sends the records, which report as AuditSourceID bench-gw.
SOURCE = "alpha"
COMMUNITIES = [SOURCE, "arr"]
AUDIT_SOURCE_ID = "bench-gw"


def repository_config_toml(workdir: Path, pki: DevPki) -> str:
    """The repository's configuration: deny by default, alpha may send records as bench-gw,
    the consumer (dev PKI ``client``) may search them (ITI-81)."""
    return arr_config_toml(
        certificate=str(pki.communities["arr"].cert),
        private_key=str(pki.communities["arr"].key),
        trust_store=str(pki.ca),
        database=str(workdir / "arr.sqlite3"),
        callers=[audit_source(SOURCE, [AUDIT_SOURCE_ID]), audit_consumer()],
    )


# --------------------------------------------------------------------------- messages


def build_messages(count: int, patients: int, seed: int = 1) -> list[bytes]:
    """Syslog messages of realistic gateway audit events (a few shapes, varied values)."""
    rng = random.Random(seed)
    ctx = am.AuditContext(am.AuditSource(AUDIT_SOURCE_ID, "1.3.6.1.4.1.21367.13.70.1"), host="gw1")
    out = []
    now = datetime.now(UTC)
    for i in range(count):
        pid = f"P{rng.randrange(patients):07d}^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
        peer = am.remote_node(f"10.0.{i % 7}.{i % 250}", certificate_subject=f"CN=peer{i % 7}")
        local = ctx.local_node("https://gw1.example.org/xca/iti38")
        user = [am.xua_requestor(f"user{rng.randrange(200)}", "idp.example.org")]
        kind = i % 3
        if kind == 0:
            msgs: tuple[am.AuditMessage, ...] = (
                iti38.query_audit(
                    ctx,
                    am.Parties(requester=peer, responder=local, human_requestors=user, when=now),
                    side="responding",
                    query_id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d",
                    query=b"<query:AdhocQueryRequest>...</query:AdhocQueryRequest>" * 4,
                    home_community_id="urn:oid:1.3.6.1.4.1.21367.13.70.2",
                    patient_ids=[pid],
                ),
            )
        elif kind == 1:
            msgs = iti39.retrieve_audit(
                ctx,
                am.Parties(requester=peer, responder=local, human_requestors=user, when=now),
                side="responding",
                documents=[
                    am.DocumentReference(f"1.2.3.{i}.{n}", "1.2.3.80.1", "urn:oid:1.2.3.70.1")
                    for n in range(2)
                ],
                patient_id=pid,
            )
        else:
            msgs = rad75.retrieve_audit(
                ctx,
                am.Parties(requester=peer, responder=local, human_requestors=user, when=now),
                side="responding",
                instances=[
                    am.ImagingInstanceReference(
                        f"1.2.3.9.{i}",
                        f"1.2.3.9.{i}.1",
                        f"1.2.3.9.{i}.1.{n}",
                        "1.2.840.10008.5.1.4.1.1.2",
                    )
                    for n in range(5)
                ],
                patient_id=pid,
            )
        message = msgs[0]
        out.append(
            format_message(
                message.to_xml(),
                outcome=message.outcome,
                timestamp=now,
                hostname="gw1",
                app_name="xca-gateway",
                procid="1",
            )
        )
    return out


# --------------------------------------------------------------------------- ingest


def _bind(kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def start_repository(workdir: Path, pki: DevPki) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    config_path = workdir / "arr.toml"
    config_path.write_text(repository_config_toml(workdir, pki), encoding="utf-8")
    create_officer(load_arr_config(config_path), "bench", PASSWORD)
    https, tls, udp = _bind(), _bind(), _bind(socket.SOCK_DGRAM)
    env = dict(os.environ)
    env["XCA_GATEWAY_LISTEN_FDS"] = (
        f"https={https.fileno()},syslog-tls={tls.fileno()},syslog-udp={udp.fileno()}"
    )
    env["XCA_GATEWAY_LOG_LEVEL"] = "warning"
    process = subprocess.Popen(
        [sys.executable, "-m", "xca_gateway.arr", "serve", "--config", str(config_path)],
        env=env,
        pass_fds=(https.fileno(), tls.fileno(), udp.fileno()),
        stdout=subprocess.PIPE,
    )
    endpoints = {
        "https": f"https://127.0.0.1:{https.getsockname()[1]}",
        "tls_port": tls.getsockname()[1],
    }
    for s in (https, tls, udp):
        s.close()
    assert process.stdout is not None
    line = process.stdout.readline()  # the repository prints its endpoints when listening
    if not line:
        raise RuntimeError("repository did not start")
    return process, endpoints


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (the parse workers)."""
    import psutil  # type: ignore[import-untyped]

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def _health(client: httpx.Client, base: str) -> dict[str, Any]:
    result: dict[str, Any] = client.get(base + "/healthz").json()
    return result


def run_ingest(
    workdir: Path, pki: DevPki, events: int, connections: int, patients: int
) -> dict[str, Any]:
    print(f"building {events} audit messages ...", flush=True)
    messages = build_messages(events, patients)
    frames = [frame(m) for m in messages]
    size = sum(len(f) for f in frames)
    process, endpoints = start_repository(workdir, pki)
    ctx = client_context(pki.ca, pki.communities[SOURCE].cert, pki.communities[SOURCE].key)
    http = httpx.Client(verify=ctx, timeout=30)
    try:
        base = endpoints["https"]
        before = _health(http, base)["total"]
        cpu_before = _cpu_seconds(process.pid)
        shares = [frames[i::connections] for i in range(connections)]
        errors: list[BaseException] = []

        def send(share: list[bytes]) -> None:
            try:
                with (
                    socket.create_connection(("127.0.0.1", endpoints["tls_port"])) as raw,
                    ctx.wrap_socket(raw, server_hostname="localhost") as tls,
                ):
                    batch: list[bytes] = []
                    for f in share:
                        batch.append(f)
                        if len(batch) >= 64:
                            tls.sendall(b"".join(batch))
                            batch.clear()
                    if batch:
                        tls.sendall(b"".join(batch))
                    # A clean TLS close: the repository reads everything before EOF.
                    tls.unwrap()
            except (OSError, ssl.SSLError) as exc:
                errors.append(exc)

        print(f"sending {events} events ({size / 1e6:.1f} MB) over {connections} TLS connections")
        start = time.perf_counter()
        threads = [threading.Thread(target=send, args=(s,)) for s in shares]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sent_done = time.perf_counter()
        deadline = time.monotonic() + 600
        health = _health(http, base)
        while health["total"] - before < events and time.monotonic() < deadline:
            time.sleep(0.05)
            health = _health(http, base)
        stored_done = time.perf_counter()
        cpu_used = _cpu_seconds(process.pid) - cpu_before
        stored = health["total"] - before
        counters = health["counters"]
        lost = {
            k: v for k, v in counters.items() if k.startswith(("refused", "dropped", "frames_inv"))
        }
        elapsed = stored_done - start
        result = {
            "events": events,
            "connections": connections,
            "bytes": size,
            "send_seconds": round(sent_done - start, 3),
            "stored_seconds": round(elapsed, 3),
            "events_per_second": round(stored / elapsed, 1),
            # CPU the repository (and its parse workers) spent: on a shared machine the wall
            # rate depends on what else runs; this says what the ingest itself costs.
            "repository_cpu_seconds": round(cpu_used, 2),
            "repository_cpu_us_per_event": round(cpu_used / max(1, stored) * 1e6, 1),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "stored": stored,
            "lost": events - stored,
            "refused_or_dropped": lost,
            "sender_errors": [repr(e) for e in errors],
            "counters": counters,
        }
        print(json.dumps(result, indent=2))
        return result
    finally:
        http.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# --------------------------------------------------------------------------- search


def _template_record(patients: int) -> list[AuditRecord]:
    """A handful of parsed records whose shapes the bulk loader varies."""
    raws = build_messages(3, patients, seed=7)
    return [parse_record(r, sender="10.0.0.1", transport="tls") for r in raws]


def build_store(path: Path, count: int, patients: int, days: int = 365) -> None:
    """``count`` events spread over ``days`` up to now, ``patients`` patients, 200 users."""
    templates = _template_record(patients)
    rng = random.Random(42)
    store = SqliteAuditStore(path, cache_mib=1024)
    existing = store.total()
    if existing >= count:
        print(f"store already has {existing} events")
        store.close()
        return
    # Bulk load: the loader is the only writer and can redo from scratch if it crashes.
    store._writer.execute("PRAGMA synchronous=OFF")
    now = datetime.now(UTC)
    start = now - timedelta(days=days)
    step = (now - start) / count
    batch_size = 20000
    t0 = time.perf_counter()
    done = existing
    raw_cache = {id(t): t.raw for t in templates}
    while done < count:
        records = []
        for i in range(done, min(count, done + batch_size)):
            t = templates[i % len(templates)]
            pid = f"P{rng.randrange(patients):07d}^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
            user = f"<user{rng.randrange(200)}@idp.example.org>"
            peer = f"10.0.{i % 7}.{i % 250}"
            entities = tuple(
                e._replace(object_id=pid if e.is_patient else f"{e.object_id}.{i}")
                for e in t.entities
            )
            participants = tuple(
                p._replace(user_id=user, user_name=user)
                if p.is_human
                else (
                    p._replace(network_access_point_id=peer)
                    if (p.network_access_point_id or "").startswith("10.")
                    else p
                )
                for p in t.participants
            )
            outcome = 0 if rng.random() > 0.02 else 8
            records.append(
                replace(
                    t,
                    event_time=start + step * i,
                    received_at=start + step * i,
                    outcome=outcome,
                    participants=participants,
                    entities=entities,
                    raw=raw_cache[id(t)],
                )
            )
        store.add(records)
        done += len(records)
        if done % 500000 < batch_size:
            rate = (done - existing) / (time.perf_counter() - t0)
            print(f"  {done} events stored ({rate:.0f}/s)", flush=True)
    store._writer.execute("PRAGMA synchronous=NORMAL")
    store.checkpoint()
    store.close()


def _percentiles(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "p50_ms": round(statistics.median(samples) * 1000, 2),
        "p95_ms": round(samples[int(len(samples) * 0.95) - 1] * 1000, 2),
        "max_ms": round(samples[-1] * 1000, 2),
        "n": len(samples),
    }


def run_search(
    workdir: Path, pki: DevPki, count: int, patients: int, queries: int
) -> dict[str, Any]:
    db = workdir / "arr.sqlite3"
    print(f"building a store of {count} events over {patients} patients ...", flush=True)
    t0 = time.perf_counter()
    build_store(db, count, patients)
    build_seconds = time.perf_counter() - t0
    rng = random.Random(3)
    store = SqliteAuditStore(db)
    now = datetime.now(UTC)
    report_times: list[float] = []
    sizes: list[int] = []
    # Cold first query included: these are the numbers an officer sees.
    for _ in range(queries):
        pid = f"P{rng.randrange(patients):07d}|1.3.6.1.4.1.21367.13.20.1000"
        flt = EventFilter(since=now - timedelta(days=90), until=now, patients=((pid,),))
        t = time.perf_counter()
        rows = store.search(flt, limit=5000)
        store.histogram(flt, 86400, "outcome")
        report_times.append(time.perf_counter() - t)
        sizes.append(len(rows))
    store.close()
    result: dict[str, Any] = {
        "stored_events": count,
        "patients": patients,
        "build_seconds": round(build_seconds, 1),
        "db_bytes": db.stat().st_size,
        "report_store": _percentiles(report_times),
        "events_per_report_avg": round(sum(sizes) / len(sizes), 1),
    }
    # The same over HTTPS: the UI page (with session) and ITI-81.
    process, endpoints = start_repository(workdir, pki)
    base = endpoints["https"]
    try:
        ui_ctx = ssl.create_default_context(cafile=str(pki.ca))
        with httpx.Client(verify=ui_ctx, timeout=60, follow_redirects=True) as ui:
            page = ui.get(base + "/login")
            token = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert token is not None
            ui.post(
                base + "/login",
                data={"csrf": token.group(1), "username": "bench", "password": PASSWORD},
            )
            times = []
            for _ in range(queries):
                pid = f"P{rng.randrange(patients):07d}"
                t = time.perf_counter()
                response = ui.get(base + "/report", params={"patient": pid})
                times.append(time.perf_counter() - t)
                assert response.status_code == 200, response.status_code
            result["report_ui_https"] = _percentiles(times)
        ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
        with httpx.Client(verify=ctx, timeout=60) as fhir:
            times = []
            since = (now - timedelta(days=90)).strftime("%Y-%m-%d")
            for _ in range(queries):
                pid = f"P{rng.randrange(patients):07d}"
                t = time.perf_counter()
                response = fhir.get(
                    base + "/fhir/AuditEvent",
                    params={
                        "date": f"ge{since}",
                        "patient.identifier": f"urn:oid:1.3.6.1.4.1.21367.13.20.1000|{pid}",
                    },
                )
                times.append(time.perf_counter() - t)
                assert response.status_code == 200
            result["iti81_https"] = _percentiles(times)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    print(json.dumps(result, indent=2))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50000, help="events to ingest (0: skip)")
    parser.add_argument("--connections", type=int, default=4, help="sending TLS connections")
    parser.add_argument(
        "--search-events", type=int, default=1_000_000, help="events in the search store (0: skip)"
    )
    parser.add_argument(
        "--patients", type=int, default=0, help="patients (default: one per 100 stored events)"
    )
    parser.add_argument("--queries", type=int, default=200, help="timed report queries")
    parser.add_argument("--keep", metavar="DIR", help="work directory to keep (and reuse)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args()
    scratch = None if args.keep else tempfile.TemporaryDirectory(prefix="arr-bench-")
    workdir = Path(args.keep) if args.keep else Path(scratch.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, workdir)
    finally:
        if scratch is not None:
            scratch.cleanup()


def _run(args: argparse.Namespace, workdir: Path) -> int:
    pki = init_dev_pki(workdir / "pki", COMMUNITIES)
    results: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    if args.events:
        ingest_dir = workdir / "ingest"
        ingest_dir.mkdir(exist_ok=True)
        (ingest_dir / "arr.sqlite3").unlink(missing_ok=True)
        results["ingest"] = run_ingest(
            ingest_dir, pki, args.events, args.connections, max(1, args.events // 100)
        )
    if args.search_events:
        search_dir = workdir / "search"
        search_dir.mkdir(exist_ok=True)
        patients = args.patients or max(1, args.search_events // 100)
        results["search"] = run_search(search_dir, pki, args.search_events, patients, args.queries)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    ok = True
    if "ingest" in results:
        ok &= results["ingest"]["lost"] == 0
        rate = results["ingest"]["events_per_second"]
        print(f"ingest: {rate} events/s (target >= 5000 with no loss)")
    if "search" in results:
        p50 = results["search"]["report_store"]["p50_ms"]
        print(f"patient report p50: {p50} ms (target <= 200 ms at 10 million events)")
    print("OK" if ok else "LOSS DETECTED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
