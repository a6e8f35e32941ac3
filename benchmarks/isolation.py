"""No request stalls another: a legitimate client's ITI-38 latency, quiet and under attack.

One ``xca-gateway serve`` process (community alpha; its registry holds 20 documents of the
queried patient; it audits to a UDP syslog collector run here). A legitimate peer gateway
(beta's certificate, from 127.0.0.1) sends ITI-38 Cross Gateway Queries one after another, each
on a new TLS connection. Its latency is measured in pairs of phases: quiet, then while an
attacker process (from loopback addresses of its own, with the trusted client certificate where
the attack needs one) runs one worst case of issue #16:

* attribute bomb: 4 senders, 60,000 attributes on one element (650 KB, to the ITI-18 query
  endpoint) and 200,000 (2.3 MB, to the ITI-43 retrieve endpoint, whose body limit is large);
* element flood: 4 senders of 15.6 MB of empty elements (to ITI-43);
* 1,000 idle connections that never send a ClientHello, from one address, then from 10;
* header slowloris: 200 connections trickling one header line per second;
* body slowloris: 200 connections announcing 1 MB and sending one byte per second;
* all of the above at once;

and, as a control, a process that only burns one core: on a small shared machine the attackers'
own CPU use slows everything down, and the control shows how much of a ratio that alone gives.

Printed per attack: requests, failures, p50/p99, p99 under attack / p99 of the quiet phase just
before (target <= 2.0), the gateway's peak RSS, Security Alerts raised (metric) and the audit
records they became (aggregated per source and kind). Everything is bounded: each phase lasts
``--seconds``, the client sends at most one request per ``--interval``, attackers stop by
themselves after their phase.

    python benchmarks/isolation.py [--seconds 15] [--interval 0.05] [--attacks bomb,flood,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_policy import consumer, peer, policy, policy_toml
from registry_bench import AUTHORITY, patient_id, submission_bytes

HERE = Path(__file__).resolve()
COMMUNITIES = ["alpha", "beta"]
ALPHA_HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.1"
BETA_HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.2"
ATTACKS = ("cpu", "bomb", "flood", "idle", "idle10", "headers", "body", "all")
LABELS = {
    "cpu": "control: a process burning one core, no traffic",
    "bomb": "attribute bomb (60k / 200k attributes)",
    "flood": "element flood (15.6 MB)",
    "idle": "1,000 idle pre-handshake (1 source)",
    "idle10": "1,000 idle pre-handshake (10 sources)",
    "headers": "header slowloris (200)",
    "body": "body slowloris (200)",
    "all": "all of the above at once",
}
# Each attack comes from addresses of its own: the per-source caps are what is being tested,
# and the legitimate client (127.0.0.1) is another source.
SOURCES = {
    "bomb": ["127.0.0.2"],
    "flood": ["127.0.0.3"],
    "idle": ["127.0.0.4"],
    "idle10": [f"127.0.1.{i}" for i in range(1, 11)],
    "headers": ["127.0.0.5"],
    "body": ["127.0.0.6"],
}
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://www.w3.org/2005/08/addressing"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def envelope(action: str, body: str, header_attributes: str = "") -> bytes:
    return (
        f'<s:Envelope xmlns:s="{SOAP12}" xmlns:a="{WSA}"{header_attributes}><s:Header>'
        f'<a:Action s:mustUnderstand="1">{action}</a:Action>'
        "<a:MessageID>urn:uuid:5b1e6a52-2b8f-4c43-9d7c-2f1a3c0e8d11</a:MessageID>"
        f"</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def query(patient: str) -> bytes:
    from xca_gateway.protocol.namespaces import QUERY, RIM, Action

    return envelope(
        Action.ITI38,
        f'<query:AdhocQueryRequest xmlns:query="{QUERY}" xmlns:rim="{RIM}">'
        '<query:ResponseOption returnType="LeafClass" returnComposedObjects="true"/>'
        '<rim:AdhocQuery id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d">'
        '<rim:Slot name="$XDSDocumentEntryPatientId"><rim:ValueList>'
        f"<rim:Value>'{patient.replace('&', '&amp;')}'</rim:Value></rim:ValueList></rim:Slot>"
        '<rim:Slot name="$XDSDocumentEntryStatus"><rim:ValueList><rim:Value>'
        "('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')</rim:Value></rim:ValueList>"
        "</rim:Slot></rim:AdhocQuery></query:AdhocQueryRequest>",
    )


# ------------------------------------------------------------------------------ attackers


def attribute_bomb(attributes: int, action: str) -> bytes:
    attrs = "".join(f' a{i}="x"' for i in range(attributes))
    return envelope(action, "", header_attributes=attrs)


def element_flood(size: int, action: str) -> bytes:
    return envelope(action, "<a/>" * (size // 4))


async def _post_loop(
    url: str,
    bodies: list[bytes],
    ctx: ssl.SSLContext,
    source: str,
    deadline: float,
    tally: dict[str, int],
) -> None:
    import httpx

    transport = httpx.AsyncHTTPTransport(verify=ctx, local_address=source)
    async with httpx.AsyncClient(transport=transport, timeout=60) as client:
        index = 0
        while time.monotonic() < deadline:
            body = bodies[index % len(bodies)]
            index += 1
            try:
                response = await client.post(
                    url, content=body, headers={"content-type": "application/soap+xml"}
                )
                key = str(response.status_code)
            except (httpx.HTTPError, OSError) as exc:
                key = type(exc).__name__
            tally[key] = tally.get(key, 0) + 1


async def _idle_loop(port: int, source: str, deadline: float, tally: dict[str, int]) -> None:
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
        except OSError:
            tally["connect failed"] = tally.get("connect failed", 0) + 1
            await asyncio.sleep(1)
            continue
        tally["opened"] = tally.get("opened", 0) + 1
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await reader.read(1)  # never send anything; wait for the server to hang up
        writer.transport.abort()
        await asyncio.sleep(1)


async def _slow_loop(
    port: int,
    source: str,
    ctx: ssl.SSLContext,
    head: bytes,
    drip: bytes,
    deadline: float,
    tally: dict[str, int],
) -> None:
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0), ssl=ctx, server_hostname="localhost"
            )
        except (OSError, ssl.SSLError):
            tally["connect failed"] = tally.get("connect failed", 0) + 1
            await asyncio.sleep(1)
            continue
        tally["opened"] = tally.get("opened", 0) + 1
        started = time.monotonic()
        try:
            writer.write(head)
            while time.monotonic() < deadline:
                writer.write(drip)
                await writer.drain()
                try:
                    async with asyncio.timeout(1.0):
                        data = await reader.read(65536)
                except TimeoutError:
                    continue
                if not data or data.startswith(b"HTTP/1.1 "):
                    break
            tally["cut after s"] = tally.get("cut after s", 0) + int(time.monotonic() - started)
            tally["cut"] = tally.get("cut", 0) + 1
        except (OSError, ssl.SSLError):
            tally["cut"] = tally.get("cut", 0) + 1
        finally:
            writer.transport.abort()
        await asyncio.sleep(1)


async def attack(name: str, port: int, certs: Path, seconds: float) -> dict[str, int]:
    from xca_gateway.protocol.namespaces import Action
    from xca_gateway.protocol.tls import client_context

    ctx = client_context(certs / "ca.pem", certs / "client.pem", certs / "client.key")
    deadline = time.monotonic() + seconds
    base = f"https://127.0.0.1:{port}"
    tally: dict[str, int] = {}
    tasks: list[Any] = []
    if name == "cpu":
        while time.monotonic() < deadline:
            sum(range(100_000))
        return {"burned s": int(seconds)}
    if name == "bomb":
        bodies = [attribute_bomb(60_000, Action.ITI18), attribute_bomb(200_000, Action.ITI43)]
        for i in range(4):
            url = f"{base}/ig/iti18" if i % 2 == 0 else f"{base}/ig/iti43"
            body = bodies[0] if i % 2 == 0 else bodies[1]
            tasks.append(_post_loop(url, [body], ctx, SOURCES[name][0], deadline, tally))
    elif name == "flood":
        body = element_flood(15_600_000, Action.ITI43)
        for _ in range(4):
            tasks.append(
                _post_loop(f"{base}/ig/iti43", [body], ctx, SOURCES[name][0], deadline, tally)
            )
    elif name in ("idle", "idle10"):
        sources = SOURCES[name]
        for i in range(1000):
            tasks.append(_idle_loop(port, sources[i % len(sources)], deadline, tally))
    elif name == "headers":
        head = b"POST /ig/iti18 HTTP/1.1\r\nHost: localhost\r\n"
        for _ in range(200):
            tasks.append(
                _slow_loop(port, SOURCES[name][0], ctx, head, b"X-Slow: 1\r\n", deadline, tally)
            )
    elif name == "body":
        head = (
            b"POST /ig/iti18 HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/soap+xml\r\nContent-Length: 1000000\r\n\r\n<"
        )
        for _ in range(200):
            tasks.append(_slow_loop(port, SOURCES[name][0], ctx, head, b" ", deadline, tally))
    await asyncio.gather(*tasks)
    return tally


def attacker_main(args: argparse.Namespace) -> int:
    # One event loop per attacker process; the parent may also stop it with SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    tally = asyncio.run(attack(args.attack, args.port, Path(args.certs), args.seconds))
    print(json.dumps(tally), flush=True)
    return 0


# ------------------------------------------------------------------------------- the gateway


def gateway_config_toml(certs: Path, data: Path, https: int, admin: int, syslog: int) -> str:
    """Community alpha; beta's gateway is its peer (/xca/*), the consumer (the attacker's
    certificate) a local consumer (/ig/*); audit records go to the collector over UDP."""
    access = policy(callers=[consumer()], peers=[peer("beta", BETA_HOME)])
    return f"""
[community]
name = "alpha"
home_community_id = "{ALPHA_HOME}"
patient_id_assigning_authority = "{AUTHORITY}"

[server]
host = "127.0.0.1"
port = {https}

[admin]
host = "127.0.0.1"
port = {admin}

[tls]
certificate = "{certs / "alpha.pem"}"
private_key = "{certs / "alpha.key"}"
trust_store = "{certs / "ca.pem"}"

[storage]
data_dir = "{data}"

[audit]
audit_source_id = "alpha-gateway"
[[audit.destinations]]
name = "collector"
transport = "udp"
host = "127.0.0.1"
port = {syslog}

{policy_toml(access)}"""


async def preload_registry(work: Path, documents: int) -> str:
    """The patient's documents, registered before the gateway starts (same SQLite file)."""
    from xca_gateway.protocol.xmlsafe import parse_xml
    from xca_gateway.registry import LocalRegistry, open_registry, parse_registry_config

    registry = await open_registry(parse_registry_config({}, work, work / "data"))
    assert isinstance(registry, LocalRegistry)
    errors = await registry.submit(parse_xml(submission_bytes(0, 1, documents)))
    assert errors == [], errors
    await registry.close()
    return str(patient_id(0))


class Collector:
    """A UDP syslog collector counting the gateway's audit records, Security Alerts apart."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.records = 0
        self.alerts = 0
        self.repeats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.records += 1
            if b'csd-code="110113"' in data:
                self.alerts += 1
                if b'type="Repeat Count"' in data:
                    self.repeats += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def metric(admin: int, name: str) -> float:
    import httpx

    total = 0.0
    for line in httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class RssSampler:
    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.2)

    def reset(self) -> None:
        self.peak = 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


# ------------------------------------------------------------------------------ legit client


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    rss_peak: int = 0
    alerts_raised: float = 0
    tally: dict[str, int] = field(default_factory=dict)

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(
    phase: Phase, url: str, body: bytes, ctx: ssl.SSLContext, seconds: float, interval: float
) -> None:
    """ITI-38, one after another, each on a new connection (accept and handshake included)."""
    import httpx

    headers = {"content-type": "application/soap+xml"}
    deadline = time.monotonic() + seconds
    with httpx.Client(
        verify=ctx, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
    ) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                response = client.post(url, content=body, headers=headers)
                ok = (
                    response.status_code == 200
                    and b"ResponseStatusType:Success" in response.content
                )
                reason = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                ok, reason = False, type(exc).__name__
            elapsed = time.perf_counter() - started
            if ok:
                phase.latencies.append(elapsed)
            else:
                phase.failures += 1
                phase.errors[reason] = phase.errors.get(reason, 0) + 1
            time.sleep(max(0.0, interval - elapsed))


def start_attackers(
    name: str, port: int, certs: Path, seconds: float
) -> list[subprocess.Popen[bytes]]:
    names = [a for a in ATTACKS if a not in ("all", "idle10", "cpu")] if name == "all" else [name]
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE),
                "--attack",
                n,
                "--port",
                str(port),
                "--certs",
                str(certs),
                "--attack-seconds",
                str(seconds),
            ],
            stdout=subprocess.PIPE,
        )
        for n in names
    ]


def stop_attackers(processes: list[subprocess.Popen[bytes]]) -> dict[str, int]:
    tally: dict[str, int] = {}
    for process in processes:
        try:
            out, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        with contextlib.suppress(ValueError, IndexError):
            for key, value in json.loads(out.decode().strip().splitlines()[-1]).items():
                tally[key] = tally.get(key, 0) + value
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="length of every phase")
    parser.add_argument("--interval", type=float, default=0.05, help="pause between requests")
    parser.add_argument("--warmup", type=float, default=3.0, help="attack running before measuring")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--documents", type=int, default=20)
    # Internal: run one attacker.
    parser.add_argument("--attack", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--certs", help=argparse.SUPPRESS)
    parser.add_argument(
        "--attack-seconds", dest="seconds_attack", type=float, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.attack:
        args.seconds = args.seconds_attack
        return attacker_main(args)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attack(s): {', '.join(sorted(unknown))}")
    import httpx

    from xca_gateway.protocol.tls import client_context
    from xca_gateway.security.dev_pki import init_dev_pki

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = init_dev_pki(work / "certs", COMMUNITIES)
        patient = asyncio.run(preload_registry(work, args.documents))
        collector = Collector()
        https, admin = _free_port(), _free_port()
        config = work / "alpha.toml"
        config.write_text(
            gateway_config_toml(work / "certs", work / "data", https, admin, collector.port)
        )
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xca_gateway",
                "--log-level",
                "error",
                "serve",
                "--config",
                str(config),
            ]
        )
        rss: RssSampler | None = None
        phases: list[tuple[Phase, Phase]] = []
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200:
                        break
                time.sleep(0.2)
            rss = RssSampler(gateway.pid)
            beta = pki.communities["beta"]
            ctx = client_context(pki.ca, beta.cert, beta.key)
            url = f"https://127.0.0.1:{https}/xca/iti38"
            body = query(patient)
            measure(Phase("warm-up"), url, body, ctx, 2.0, args.interval)
            for name in attacks:
                quiet = Phase("quiet")
                rss.reset()
                measure(quiet, url, body, ctx, args.seconds, args.interval)
                quiet.rss_peak = rss.peak
                under = Phase(name)
                raised = metric(admin, "xca_gateway_audit_security_alerts_total")
                attackers = start_attackers(name, https, work / "certs", args.warmup + args.seconds)
                time.sleep(args.warmup)
                rss.reset()
                measure(under, url, body, ctx, args.seconds, args.interval)
                under.rss_peak = rss.peak
                under.tally = stop_attackers(attackers)
                under.alerts_raised = (
                    metric(admin, "xca_gateway_audit_security_alerts_total") - raised
                )
                phases.append((quiet, under))
                print(
                    f"  {LABELS[name]}: p99 {under.p(99) * 1000:.1f} ms, "
                    f"quiet {quiet.p(99) * 1000:.1f} ms, "
                    f"{under.failures} failures, attack {under.tally}",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(2.0)
            raised_total = metric(admin, "xca_gateway_audit_security_alerts_total")
            aggregated = metric(admin, "xca_gateway_audit_security_alerts_aggregated_total")
        finally:
            if rss is not None:
                rss.close()
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(timeout=30)
            except subprocess.TimeoutExpired:
                gateway.kill()
            time.sleep(0.5)  # the last datagrams (repeat records written on stop)
            collector.close()
    report(phases, raised_total, aggregated, collector)
    return 0


def report(
    phases: list[tuple[Phase, Phase]], raised: float, aggregated: float, collector: Collector
) -> None:
    print()
    print(
        "| attack | requests | failures | p50 quiet / attack (ms) | p99 quiet / attack (ms) "
        "| p99 ratio | gateway RSS peak (MB) | Security Alerts raised |"
    )
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    failures = 0
    for quiet, under in phases:
        ratio = under.p(99) / quiet.p(99)
        worst = max(worst, ratio)
        failures += under.failures + quiet.failures
        print(
            f"| {LABELS[under.name]} | {len(under.latencies) + under.failures} "
            f"| {under.failures}{' ' + str(under.errors) if under.errors else ''} "
            f"| {quiet.p(50) * 1000:.1f} / {under.p(50) * 1000:.1f} "
            f"| {quiet.p(99) * 1000:.1f} / {under.p(99) * 1000:.1f} | {ratio:.2f} "
            f"| {quiet.rss_peak / 2**20:.0f} / {under.rss_peak / 2**20:.0f} "
            f"| {under.alerts_raised:.0f} |"
        )
    print()
    print(
        f"worst p99 ratio {worst:.2f} (target <= 2.0), legitimate failures {failures} (target 0); "
        f"Security Alerts: {raised:.0f} raised, {collector.alerts} audit records "
        f"({collector.repeats} of them repeat records with a count, {aggregated:.0f} alerts "
        f"folded into counts); {collector.records} audit records in all"
    )


if __name__ == "__main__":
    sys.exit(main())
