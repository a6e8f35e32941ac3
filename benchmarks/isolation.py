"""No request stalls another: a legitimate client's ITI-38 latency, quiet and under attack.

One ``xca-gateway serve`` process (community alpha; its registry holds 20 documents of the
queried patient; it audits to a UDP syslog collector run here). A legitimate peer gateway
(beta's certificate, from 127.0.0.1) sends ITI-38 Cross Gateway Queries one after another, in
two client processes at once: one opens a new TLS connection per request (accept and handshake
included), the other keeps its connection alive (what a peer gateway's pool does). An attacker
process (from loopback addresses of its own, with the trusted client certificate where the
attack needs one) runs one worst case of issue #16:

* attribute bomb: 4 senders, 60,000 attributes on one element (650 KB, to the ITI-18 query
  endpoint) and 200,000 (2.3 MB, to the ITI-43 retrieve endpoint, whose body limit is large);
* element flood: 4 senders of 15.6 MB of empty elements (to ITI-43);
* 1,000 idle connections that never send a ClientHello, from one address, then from 10;
* header slowloris: 200 connections trickling one header line per second;
* body slowloris: 200 connections announcing 1 MB and sending one byte per second;
* all of the above at once;

and, as a control, a process that only burns a core.

Method, robust to the background load of a small shared machine: per attack, ``--rounds``
pairs of quiet and attacked windows of ``--window`` seconds alternate in ABBA order (quiet,
attack, attack, quiet, ...), so both kinds of window see the same background. The attacker is
started and stopped through a pipe; stopping closes every connection it holds, so a quiet
window is quiet. The gateway is pinned to CPU 0, the clients and the attackers (at nice 19) to
CPU 1 (``--no-pin`` to not): the attackers' own work must not count as the gateway's, and what
they make the gateway do still runs on the gateway's core. The control shows what is left of
that effect.

Printed per attack and client: samples, failures, p50/p99 quiet and attacked, p99 under
attack / p99 quiet (target <= 2.0) with the control's ratio beside it, the gateway's peak RSS
and its RSS before the attack and after it (what a flood leaves behind),
Security Alerts raised (metric) and the audit records they became (aggregated per source and
kind). Everything is bounded: windows, rounds, one request per ``--interval`` per client.

    python benchmarks/isolation.py [--window 3] [--rounds 8] [--attacks bomb,flood,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_policy import consumer, peer, policy, policy_toml
from registry_bench import AUTHORITY, patient_id, submission_bytes

from xca_gateway.protocol.namespaces import QUERY, RIM, Action
from xca_gateway.protocol.tls import client_context
from xca_gateway.protocol.xmlsafe import parse_xml
from xca_gateway.registry import LocalRegistry, open_registry, parse_registry_config
from xca_gateway.security.dev_pki import init_dev_pki

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
    url: str, body: bytes, ctx: ssl.SSLContext, source: str, tally: dict[str, int]
) -> None:
    import httpx

    transport = httpx.AsyncHTTPTransport(verify=ctx, local_address=source)
    async with httpx.AsyncClient(transport=transport, timeout=60) as client:
        while True:
            try:
                response = await client.post(
                    url, content=body, headers={"content-type": "application/soap+xml"}
                )
                key = str(response.status_code)
            except (httpx.HTTPError, OSError) as exc:
                key = type(exc).__name__
            tally[key] = tally.get(key, 0) + 1


async def _idle_loop(port: int, source: str, tally: dict[str, int]) -> None:
    while True:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
        except OSError:
            tally["connect failed"] = tally.get("connect failed", 0) + 1
            await asyncio.sleep(1)
            continue
        tally["opened"] = tally.get("opened", 0) + 1
        try:
            with contextlib.suppress(OSError):
                await reader.read(1)  # never send anything; wait for the server to hang up
        finally:
            writer.transport.abort()
        await asyncio.sleep(1)


async def _slow_loop(
    port: int,
    source: str,
    ctx: ssl.SSLContext,
    head: bytes,
    drip: bytes,
    tally: dict[str, int],
) -> None:
    while True:
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
            while True:
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


async def _burn() -> None:
    while True:
        sum(range(100_000))  # a few milliseconds, then let the loop read its commands
        await asyncio.sleep(0)


def attack_loops(name: str, port: int, certs: Path, tally: dict[str, int]) -> list[Any]:
    """The coroutines of one attack; they run until cancelled."""

    ctx = client_context(certs / "ca.pem", certs / "client.pem", certs / "client.key")
    base = f"https://127.0.0.1:{port}"
    if name == "cpu":
        return [_burn()]
    if name == "bomb":
        bodies = [attribute_bomb(60_000, Action.ITI18), attribute_bomb(200_000, Action.ITI43)]
        return [
            _post_loop(
                f"{base}/ig/iti18" if i % 2 == 0 else f"{base}/ig/iti43",
                bodies[i % 2],
                ctx,
                SOURCES[name][0],
                tally,
            )
            for i in range(4)
        ]
    if name == "flood":
        body = element_flood(15_600_000, Action.ITI43)
        return [
            _post_loop(f"{base}/ig/iti43", body, ctx, SOURCES[name][0], tally) for _ in range(4)
        ]
    if name in ("idle", "idle10"):
        sources = SOURCES[name]
        return [_idle_loop(port, sources[i % len(sources)], tally) for i in range(1000)]
    if name == "headers":
        head = b"POST /ig/iti18 HTTP/1.1\r\nHost: localhost\r\n"
        return [
            _slow_loop(port, SOURCES[name][0], ctx, head, b"X-Slow: 1\r\n", tally)
            for _ in range(200)
        ]
    if name == "body":
        head = (
            b"POST /ig/iti18 HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/soap+xml\r\nContent-Length: 1000000\r\n\r\n<"
        )
        return [_slow_loop(port, SOURCES[name][0], ctx, head, b" ", tally) for _ in range(200)]
    if name == "all":
        return [
            loop
            for each in ATTACKS
            if each not in ("all", "idle10", "cpu")
            for loop in attack_loops(each, port, certs, tally)
        ]
    raise ValueError(name)


async def _commands() -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        yield line.strip()


async def attacker(name: str, port: int, certs: Path) -> None:
    """One attacker, driven from stdin: ``start`` opens its connections, ``stop`` closes every
    one of them (a quiet window is quiet) and answers the window's tally as JSON."""
    tasks: list[asyncio.Task[None]] = []
    tally: dict[str, int] = {}
    async for command in _commands():
        if command == "start" and not tasks:
            tally = {}
            tasks = [asyncio.ensure_future(c) for c in attack_loops(name, port, certs, tally)]
            print("started", flush=True)
        elif command == "stop":
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            tasks = []
            print(json.dumps(tally), flush=True)
        elif command == "quit":
            break


async def legitimate_client(url: str, body: bytes, certs: Path, keepalive: bool) -> None:
    """The legitimate peer gateway (beta), driven from stdin: ``measure <seconds>
    <interval>`` sends ITI-38s one after another and answers their latencies as JSON."""
    import httpx

    ctx = client_context(certs / "ca.pem", certs / "beta.pem", certs / "beta.key")
    limits = httpx.Limits(max_keepalive_connections=1 if keepalive else 0)
    headers = {"content-type": "application/soap+xml"}
    async with httpx.AsyncClient(verify=ctx, timeout=30, limits=limits) as client:
        async for command in _commands():
            if not command.startswith("measure"):
                break
            _, seconds, interval = command.split()
            latencies: list[float] = []
            errors: dict[str, int] = {}
            deadline = time.monotonic() + float(seconds)
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    response = await client.post(url, content=body, headers=headers)
                    ok = (
                        response.status_code == 200
                        and b"ResponseStatusType:Success" in response.content
                    )
                    reason = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    ok, reason = False, type(exc).__name__
                elapsed = time.perf_counter() - started
                if ok:
                    latencies.append(elapsed)
                else:
                    errors[reason] = errors.get(reason, 0) + 1
                await asyncio.sleep(max(0.0, float(interval) - elapsed))
            print(json.dumps({"latencies": latencies, "errors": errors}), flush=True)


# ------------------------------------------------------------------------------- the gateway


def gateway_config_toml(
    certs: Path, data: Path, https: int, admin: int, syslog: int, server: list[str] | None = None
) -> str:
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
{chr(10).join(server or [])}

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

    def now(self) -> int:
        try:
            return int(self.process.memory_info().rss)
        except Exception:
            return 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


# ---------------------------------------------------------------------------- orchestration

MODES = {"new": "new TLS connection per request", "keepalive": "kept-alive connection"}


@dataclass
class Samples:
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return sum(self.errors.values())

    def add(self, answer: dict[str, Any]) -> None:
        self.latencies += answer["latencies"]
        for key, value in answer["errors"].items():
            self.errors[key] = self.errors.get(key, 0) + value

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class Result:
    name: str
    quiet: dict[str, Samples] = field(default_factory=lambda: {m: Samples() for m in MODES})
    under: dict[str, Samples] = field(default_factory=lambda: {m: Samples() for m in MODES})
    rss_quiet: int = 0
    rss_under: int = 0
    # The gateway's RSS before the attack's first window and after its last (settled): what a
    # flood leaves behind.
    rss_before: int = 0
    rss_after: int = 0
    alerts_raised: float = 0
    tally: dict[str, int] = field(default_factory=dict)

    def ratio(self, mode: str) -> float:
        return self.under[mode].p(99) / self.quiet[mode].p(99)


class Child:
    """A helper process of this script driven by lines on its stdin, answering one line each."""

    def __init__(self, args: list[str], cpus: set[int] | None, nice: int = 0) -> None:
        def setup() -> None:  # in the child, before exec: what its threads inherit
            if cpus is not None:
                os.sched_setaffinity(0, cpus)
            if nice:
                os.nice(nice)

        self.process = subprocess.Popen(
            [sys.executable, str(HERE), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=setup,
        )

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def answer(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send("quit")
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _measure(clients: dict[str, Child], seconds: float, interval: float) -> dict[str, Any]:
    for client in clients.values():
        client.send(f"measure {seconds} {interval}")
    return {mode: json.loads(client.answer()) for mode, client in clients.items()}


def run_attack(
    name: str,
    args: argparse.Namespace,
    clients: dict[str, Child],
    https: int,
    certs: Path,
    rss: RssSampler,
    admin: int,
    attacker_cpus: set[int] | None,
) -> Result:
    """Quiet and attacked windows alternating (quiet, attack, attack, quiet, ...) for
    ``--rounds`` rounds: both see the same background load of the machine."""
    result = Result(name)
    attacker = Child(
        ["--attack", name, "--port", str(https), "--certs", str(certs)], attacker_cpus, nice=19
    )
    raised = metric(admin, "xca_gateway_audit_security_alerts_total")
    result.rss_before = rss.now()
    try:
        for window in range(2 * args.rounds):
            attacked = window % 4 in (1, 2)
            if attacked:
                attacker.send("start")
                attacker.answer()
                time.sleep(args.warmup)
            rss.reset()
            answers = _measure(clients, args.window, args.interval)
            for mode, answer in answers.items():
                (result.under if attacked else result.quiet)[mode].add(answer)
            if attacked:
                result.rss_under = max(result.rss_under, rss.peak)
                attacker.send("stop")
                for key, value in json.loads(attacker.answer()).items():
                    result.tally[key] = result.tally.get(key, 0) + value
                time.sleep(args.settle)  # the gateway ends what the attacker left behind
            else:
                result.rss_quiet = max(result.rss_quiet, rss.peak)
    finally:
        attacker.close()
    time.sleep(args.settle)
    result.rss_after = rss.now()
    result.alerts_raised = metric(admin, "xca_gateway_audit_security_alerts_total") - raised
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--window", type=float, default=3.0, help="seconds of every window")
    parser.add_argument("--rounds", type=int, default=8, help="quiet/attack pairs per attack")
    parser.add_argument("--interval", type=float, default=0.05, help="pause between requests")
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="attack running before its window is measured"
    )
    parser.add_argument(
        "--settle", type=float, default=1.0, help="pause after an attack stops, before measuring"
    )
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [server] setting of the gateway (TOML), e.g. max_handshakes_per_source=16",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the gateway to CPU 0 and the clients and attackers to CPU 1",
    )
    # Internal: run one attacker or one legitimate client.
    parser.add_argument("--attack", help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--patient", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--certs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attack:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        asyncio.run(attacker(args.attack, args.port, Path(args.certs)))
        return 0
    if args.client:
        asyncio.run(
            legitimate_client(
                args.url, query(args.patient), Path(args.certs), args.client == "keepalive"
            )
        )
        return 0
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attack(s): {', '.join(sorted(unknown))}")
    if "cpu" in attacks:  # the control first: its ratio is printed beside every other
        attacks.remove("cpu")
        attacks.insert(0, "cpu")
    import httpx

    # The gateway gets CPU 0 to itself (its worker threads inherit it), the legitimate
    # clients and the attackers share CPU 1, the attackers at the lowest priority: an attacker
    # on another machine does not take CPU from the gateway nor from its legitimate callers,
    # and here its own work (thousands of sockets, TLS handshakes) would otherwise weigh on
    # both. What the attack makes the gateway do still runs on the gateway's core.
    pin = args.pin and len(os.sched_getaffinity(0)) >= 2
    gateway_cpus = {0} if pin else None
    others = {1} if pin else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        certs = work / "certs"
        init_dev_pki(certs, COMMUNITIES)
        patient = asyncio.run(preload_registry(work, args.documents))
        collector = Collector()
        https, admin = _free_port(), _free_port()
        config = work / "alpha.toml"
        config.write_text(
            gateway_config_toml(
                certs, work / "data", https, admin, collector.port, server=args.server
            )
        )

        def pin_gateway() -> None:
            if gateway_cpus is not None:
                os.sched_setaffinity(0, gateway_cpus)

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
            ],
            preexec_fn=pin_gateway,
        )
        rss: RssSampler | None = None
        clients: dict[str, Child] = {}
        results: list[Result] = []
        started = time.monotonic()
        load = os.getloadavg()[0]
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200:
                        break
                time.sleep(0.2)
            rss = RssSampler(gateway.pid)
            url = f"https://127.0.0.1:{https}/xca/iti38"
            for mode in MODES:
                clients[mode] = Child(
                    ["--client", mode, "--url", url, "--patient", patient, "--certs", str(certs)],
                    others,
                )
            _measure(clients, 2.0, args.interval)  # warm-up
            for name in attacks:
                result = run_attack(name, args, clients, https, certs, rss, admin, others)
                results.append(result)
                print(
                    f"  {LABELS[name]}: "
                    + ", ".join(
                        f"{mode} p99 {result.quiet[mode].p(99) * 1000:.1f} -> "
                        f"{result.under[mode].p(99) * 1000:.1f} ms ({result.ratio(mode):.2f})"
                        for mode in MODES
                    )
                    + f"; RSS {result.rss_before / 2**20:.0f} -> {result.rss_after / 2**20:.0f} MB"
                    + f"; attack {result.tally}",
                    file=sys.stderr,
                    flush=True,
                )
            raised_total = metric(admin, "xca_gateway_audit_security_alerts_total")
            aggregated = metric(admin, "xca_gateway_audit_security_alerts_aggregated_total")
        finally:
            for client in clients.values():
                client.close()
            if rss is not None:
                rss.close()
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(timeout=30)
            except subprocess.TimeoutExpired:
                gateway.kill()
            time.sleep(0.5)  # the last datagrams (repeat records written on stop)
            collector.close()
    load = max(load, os.getloadavg()[0])
    report(
        results, raised_total, aggregated, collector, args, pin, time.monotonic() - started, load
    )
    return 0


def report(
    results: list[Result],
    raised: float,
    aggregated: float,
    collector: Collector,
    args: argparse.Namespace,
    pinned: bool,
    seconds: float,
    load: float,
) -> None:
    control = next((r for r in results if r.name == "cpu"), None)
    print()
    print(
        f"{args.rounds} rounds of quiet and attacked windows of {args.window:g} s per attack "
        f"(ABBA order), a request at most every {args.interval * 1000:g} ms per client; "
        + ("gateway on CPU 0, clients and attackers (nice 19) on CPU 1; " if pinned else "")
        + f"{seconds:.0f} s, load average up to {load:.1f}"
    )
    print()
    print(
        "| attack | legitimate client | samples quiet / attack | failures "
        "| p50 quiet / attack (ms) | p99 quiet / attack (ms) | p99 ratio | control's ratio "
        "| gateway RSS peak quiet / attack (MB) | RSS before -> after (MB) "
        "| Security Alerts raised |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    failures = 0
    for result in results:
        for mode, label in MODES.items():
            quiet, under = result.quiet[mode], result.under[mode]
            ratio = result.ratio(mode)
            if result.name != "cpu":
                worst = max(worst, ratio)
            failures += quiet.failures + under.failures
            errors = {**quiet.errors, **under.errors}
            print(
                f"| {LABELS[result.name]} | {label} "
                f"| {len(quiet.latencies)} / {len(under.latencies)} "
                f"| {quiet.failures + under.failures}{' ' + str(errors) if errors else ''} "
                f"| {quiet.p(50) * 1000:.1f} / {under.p(50) * 1000:.1f} "
                f"| {quiet.p(99) * 1000:.1f} / {under.p(99) * 1000:.1f} | {ratio:.2f} "
                f"| {control.ratio(mode) if control else float('nan'):.2f} "
                f"| {result.rss_quiet / 2**20:.0f} / {result.rss_under / 2**20:.0f} "
                f"| {result.rss_before / 2**20:.0f} -> {result.rss_after / 2**20:.0f} "
                f"| {result.alerts_raised:.0f} |"
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
