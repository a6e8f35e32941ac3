"""Initiating-gateway fan-out: total time vs. the slowest peer, deadlines, throughput.

A "peer farm" process runs N responding endpoints over mutual TLS, each answering ITI-38 after
its own latency (spread evenly over ``--spread``, 10 ms to 200 ms). An ``xca-gateway serve``
process is the initiating gateway, peered with all of them. Both run deny-by-default
(bench_policy): the gateway admits the consumer (dev PKI ``client``) as a local consumer on
/ig/iti18, the farm admits the gateway's certificate as a peer gateway on /xca/iti38, and the
direct calls to the farm are made with that peer certificate. The farm is one process playing
every peer, so it is made cheap per request (answers rendered once, requests framed by their
Content-Length, the caller admitted once per connection): its own work would otherwise delay
the slowest peer's answer, through the gateway more than direct, and count as the gateway's.
Everything is measured side by side in one run:

* for N = 1, 5, 10, 20, 50, 100: median time of one ITI-18 through the gateway / median time
  of one direct ITI-38 to the slowest peer (target ≤ 1.02: bounded by the slowest, never the
  sum), direct and via calls alternated, with the spread of the ratios over the repeats, and
  how late the farm wrote the slowest peer's answer (past the latency it simulates: time the
  farm, not the gateway, added), direct and via;
* memory per query in flight: ``--inflight`` concurrent ITI-18 through a gateway with
  ``--inflight-peers`` peers (each answering after 1 s): the gateway's peak RSS minus its RSS
  before, per query and per peer request;
* with one black-holed peer and a 2 s deadline: answer time − deadline (target ≤ 100 ms);
* queries/s of concurrent consumers through the gateway vs. straight to one peer, with the CPU
  milliseconds per query of the gateway and of the peer (wall-clock q/s on a shared machine
  depends on what else runs; CPU per query says what each hop costs).

    python benchmarks/fanout.py [--repeat 9] [--sizes 1,5,10,20,50,100] [--spread 10,200]
                                [--inflight 50] [--concurrency 20] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from xml.sax.saxutils import escape

import httpx
from bench_policy import consumer, peer, policy, policy_toml
from lxml import etree

from xca_gateway.protocol.http_server import PeerInfo, peer_certificate
from xca_gateway.protocol.namespaces import QUERY, RIM, SOAP12, WSA, Action, ResponseStatus
from xca_gateway.protocol.soap import build_envelope, serialize
from xca_gateway.protocol.tls import client_context, server_context
from xca_gateway.security.callers import Door
from xca_gateway.security.dev_pki import DevPki, init_dev_pki
from xca_gateway.security.guard import DoorGuard, identity_from_peer
from xca_gateway.security.policy import parse_access_policy
from xca_gateway.settings import TlsConfig
from xca_gateway.xds.ebrs import adhoc_query_response

HERE = Path(__file__).resolve()
ARC = "1.3.6.1.4.1.21367.13"
PATIENT = f"P1^^^&{ARC}.20.1000&ISO"
# Dev PKI communities: the initiating gateway, and the certificate every farm endpoint serves.
COMMUNITIES = ["ig", "peer"]
IG_HOME = f"urn:oid:{ARC}.70.1"


def gateway_policy() -> dict[str, Any]:
    """The initiating gateway's callers: the consumer on /ig/*, nobody on /xca/*."""
    return policy(callers=[consumer()])


def farm_policy() -> dict[str, Any]:
    """The farm's callers: the initiating gateway as a peer gateway of its community."""
    return policy(peers=[peer("ig", IG_HOME)])


def gateway_config_toml(
    pki: DevPki,
    work: Path,
    port: int,
    admin: int,
    peers: list[dict[str, Any]],
    deadline: float,
    max_connections: int = 100,
) -> str:
    """The initiating gateway's configuration, peered with ``peers`` (home, url)."""
    lines = [
        "[community]",
        'name = "ig"',
        f'home_community_id = "{IG_HOME}"',
        f'patient_id_assigning_authority = "{ARC}.20.1000"',
        f"[server]\nport = {port}",
        f"[admin]\nport = {admin}",
        "[tls]",
        f'certificate = "{pki.communities["ig"].cert}"',
        f'private_key = "{pki.communities["ig"].key}"',
        f'trust_store = "{pki.ca}"',
        f'[storage]\ndata_dir = "{work / f"ig{port}"}"',
        f"[initiating]\npeer_deadline = {deadline}\noverall_deadline = {deadline}",
        f"[outbound]\nmax_keepalive_connections = 100\nrequest_timeout = {deadline}\n"
        f"max_connections = {max_connections}",
        policy_toml(gateway_policy()),
    ]
    for i, entry in enumerate(peers):
        lines += [
            "[[peers]]",
            f'name = "p{i}"',
            f'home_community_id = "{entry["home"]}"',
            f'iti38 = "{entry["url"]}"',
        ]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------- peer farm


class _FarmPeer:
    """One simulated responding gateway: its latency and its answer, rendered once.

    The farm plays every peer in one process, so whatever it spends per request delays the
    peers that answer next, the slowest one included, and that delay would count as the
    gateway's. So a farm peer does as little as a server can: requests are framed by their
    Content-Length, the caller is admitted once per connection (what mutual TLS proved about
    it does not change on a kept-alive connection), and the answer, a Success
    AdhocQueryResponse with one DocumentEntry of the peer's community, is the same bytes every
    time. ``late`` collects, per answer, how long past ``latency`` after the request's last
    byte it was written: the farm's own lateness, reported next to every figure.
    """

    def __init__(self, index: int, latency: float) -> None:
        self.latency = latency
        self.home = f"urn:oid:{ARC}.70.{100 + index}"
        self.answer = _farm_answer(self.home, index)
        self.late: list[float] = []


def _farm_answer(home: str, index: int) -> bytes:
    """The HTTP response a farm peer sends to every ITI-38: one DocumentEntry of ``home``."""
    entry = etree.Element(
        f"{{{RIM}}}ExtrinsicObject", id=f"urn:uuid:00000000-0000-4000-8000-{index:012d}"
    )
    entry.set("home", home)
    payload = adhoc_query_response(ResponseStatus.SUCCESS, [], [entry])
    body = serialize(build_envelope(payload, action=Action.ITI38_RESPONSE))
    content_type = f'application/soap+xml; charset=UTF-8; action="{Action.ITI38_RESPONSE}"'
    return _http(200, body, content_type)


def _http(status: int, body: bytes, content_type: str = "text/plain", close: bool = False) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed"}
    head = [
        f"HTTP/1.1 {status} {reason.get(status, '')}",
        f"content-type: {content_type}",
        f"content-length: {len(body)}",
        *(["connection: close"] if close else []),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _FarmConnection(asyncio.Protocol):
    """A kept-alive connection to a farm peer: answers each ITI-38 after the peer's latency."""

    def __init__(self, peer: _FarmPeer, admit: Callable[[PeerInfo], bool]) -> None:
        self.peer = peer
        self.admit = admit
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.allowed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        host, port = transport.get_extra_info("peername")[:2]
        certificate = peer_certificate(transport.get_extra_info("ssl_object"))
        self.allowed = self.admit(PeerInfo(host, port, certificate))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            lines = bytes(self.buffer[:end]).lower().split(b"\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            self._request(lines[0], body)

    def _request(self, request_line: bytes, body: bytes) -> None:
        assert self.transport is not None
        if not self.allowed:
            self.transport.write(_http(403, b"not a peer gateway\n", close=True))
            self.transport.close()
        elif not request_line.startswith(b"post /xca/iti38 "):
            self.transport.write(_http(405, b"POST /xca/iti38 only\n"))
        elif Action.ITI38.encode() not in body:
            self.transport.write(_http(400, b"not a Cross Gateway Query\n"))
        else:
            loop = asyncio.get_running_loop()
            due = loop.time() + self.peer.latency
            loop.call_at(due, self._answer, due)

    def _answer(self, due: float) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(self.peer.answer)
        self.peer.late.append(asyncio.get_running_loop().time() - due)


async def _farm(certs: Path, latencies: list[float]) -> None:
    """Serve one farm peer per latency; print their ports, then answer ``late PORT`` lines
    on stdin with the lateness (ms) of that peer's answers since the last ask."""
    tls = TlsConfig(certs / "peer.pem", certs / "peer.key", certs / "ca.pem")
    context = server_context(tls)
    # A responding gateway's door check: peer gateways only, as the gateway's own admission.
    directory = parse_access_policy(farm_policy()).caller_directory()
    guard = DoorGuard(lambda: directory)

    def admit(peer: PeerInfo) -> bool:
        return guard.admit(identity_from_peer(peer), Door.XCA, resource="/xca/iti38").allowed

    loop = asyncio.get_running_loop()
    by_port: dict[int, _FarmPeer] = {}
    servers = []
    for index, latency in enumerate(latencies):
        farm_peer = _FarmPeer(index, latency)

        def protocol(farm_peer: _FarmPeer = farm_peer) -> _FarmConnection:
            return _FarmConnection(farm_peer, admit)

        server = await loop.create_server(protocol, "127.0.0.1", 0, ssl=context, backlog=1024)
        port = int(server.sockets[0].getsockname()[1])
        by_port[port] = farm_peer
        servers.append({"home": farm_peer.home, "port": port, "latency": latency})
    print(json.dumps(servers), flush=True)
    finished = asyncio.Event()

    def command() -> None:
        line = sys.stdin.readline()
        if not line:
            finished.set()  # the driver is gone
            return
        words = line.split()
        farm_peer = by_port.get(int(words[1])) if len(words) == 2 else None
        late = farm_peer.late if farm_peer is not None else []
        print(json.dumps([round(x * 1e3, 3) for x in late]), flush=True)
        late.clear()

    loop.add_reader(sys.stdin.fileno(), command)
    await finished.wait()


# ------------------------------------------------------------------------------- driver


def _query(action_query: str = "iti18", home: str | None = None) -> bytes:
    action = Action.ITI18 if action_query == "iti18" else Action.ITI38
    home_attr = f' home="{home}"' if home else ""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<s:Envelope xmlns:s="{SOAP12}" xmlns:a="{WSA}"><s:Header>
<a:Action s:mustUnderstand="1">{action}</a:Action><a:MessageID>urn:uuid:1</a:MessageID>
</s:Header><s:Body><query:AdhocQueryRequest xmlns:query="{QUERY}" xmlns:rim="{RIM}">
<query:ResponseOption returnType="LeafClass" returnComposedObjects="true"/>
<rim:AdhocQuery id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"{home_attr}>
<rim:Slot name="$XDSDocumentEntryPatientId"><rim:ValueList>
<rim:Value>'{escape(PATIENT)}'</rim:Value></rim:ValueList></rim:Slot>
<rim:Slot name="$XDSDocumentEntryStatus"><rim:ValueList>
<rim:Value>('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')</rim:Value></rim:ValueList></rim:Slot>
</rim:AdhocQuery></query:AdhocQueryRequest></s:Body></s:Envelope>""".encode()


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.pki = init_dev_pki(work / "certs", COMMUNITIES)
        # The consumer calls the gateway; direct calls to the farm are a peer gateway's (ig's).
        self.ctx = client_context(self.pki.ca, self.pki.client.cert, self.pki.client.key)
        ig = self.pki.communities["ig"]
        self.peer_ctx = client_context(self.pki.ca, ig.cert, ig.key)
        self.procs: list[subprocess.Popen[bytes]] = []

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    def farm(self, latencies: list[float]) -> list[dict[str, Any]]:
        proc = subprocess.Popen(
            [sys.executable, str(HERE), "--farm", str(self.work / "certs"), json.dumps(latencies)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        peers: list[dict[str, Any]] = json.loads(line)
        return peers

    @staticmethod
    def farm_late(farm: subprocess.Popen[bytes], port: int) -> list[float]:
        """How late (ms) the farm peer at ``port`` wrote its answers since the last ask."""
        assert farm.stdin is not None and farm.stdout is not None
        farm.stdin.write(f"late {port}\n".encode())
        farm.stdin.flush()
        late: list[float] = json.loads(farm.stdout.readline())
        return late

    def gateway(
        self, peers: list[dict[str, Any]], deadline: float, max_connections: int = 100
    ) -> str:
        port, admin = _free_port(), _free_port()
        config = self.work / f"ig{port}.toml"
        config.write_text(
            gateway_config_toml(self.pki, self.work, port, admin, peers, deadline, max_connections)
        )
        proc = subprocess.Popen(
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
        self.procs.append(proc)
        deadline_at = time.monotonic() + 30
        while time.monotonic() < deadline_at:
            try:
                if httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        return f"https://127.0.0.1:{port}/ig/iti18"

    def timed(self, client: httpx.Client, url: str, body: bytes, repeat: int) -> float:
        return statistics.median(self.times(client, url, body, repeat))

    def times(self, client: httpx.Client, url: str, body: bytes, repeat: int) -> list[float]:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            response = client.post(
                url, content=body, headers={"content-type": "application/soap+xml"}
            )
            times.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text[:300]
        return times


def _rss(proc: subprocess.Popen[bytes]) -> int:
    """Resident set size of a child, in bytes (VmRSS)."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _inflight(
    ctx: Any, url: str, body: bytes, count: int, proc: subprocess.Popen[bytes]
) -> tuple[int, float]:
    """Peak RSS of ``proc`` while ``count`` queries are in flight at once, and their time."""
    peak = 0
    async with httpx.AsyncClient(
        verify=ctx, timeout=60, limits=httpx.Limits(max_connections=count)
    ) as client:

        async def one() -> None:
            r = await client.post(
                url, content=body, headers={"content-type": "application/soap+xml"}
            )
            assert r.status_code == 200 and ResponseStatus.SUCCESS in r.text, r.text[-1500:]

        started = time.perf_counter()
        queries = asyncio.gather(*(one() for _ in range(count)))
        while not queries.done():
            peak = max(peak, _rss(proc))
            await asyncio.sleep(0.01)
        await queries
    return peak, time.perf_counter() - started


def _cpu_seconds(proc: subprocess.Popen[bytes]) -> float:
    """User + system CPU time of a child so far (from /proc, in clock ticks)."""
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measured(
    procs: list[subprocess.Popen[bytes]],
    ctx: Any,
    url: str,
    body: bytes,
    concurrency: int,
    seconds: float,
) -> tuple[float, list[float]]:
    """Queries/s, and the CPU milliseconds per query each of ``procs`` spent meanwhile."""
    before = [_cpu_seconds(p) for p in procs]
    qps = asyncio.run(_throughput(ctx, url, body, concurrency, seconds))
    cpu = [_cpu_seconds(p) - b for p, b in zip(procs, before, strict=True)]
    return qps, [c * 1e3 / (qps * seconds) for c in cpu]


async def _throughput(ctx: Any, url: str, body: bytes, concurrency: int, seconds: float) -> float:
    done = 0
    stop_at = time.monotonic() + seconds
    async with httpx.AsyncClient(
        verify=ctx, timeout=30, limits=httpx.Limits(max_connections=concurrency)
    ) as client:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                r = await client.post(
                    url, content=body, headers={"content-type": "application/soap+xml"}
                )
                assert r.status_code == 200
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / seconds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--sizes", default="1,5,10,20,50,100")
    parser.add_argument("--spread", default="10,200", help="peer latencies, ms: lowest,highest")
    parser.add_argument(
        "--inflight", type=int, default=10, help="concurrent queries of the memory phase (0: none)"
    )
    parser.add_argument("--inflight-peers", type=int, default=20, help="peers of the memory phase")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--farm", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.farm:
        asyncio.run(_farm(Path(args.farm[0]), json.loads(args.farm[1])))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        try:
            print(
                "fan-out: total time through the initiating gateway / "
                "direct time to the slowest peer"
            )
            print(
                f"{'peers':>6} {'slowest direct':>15} {'via gateway':>12} {'ratio':>7} "
                f"{'ratio min-max':>14} {'farm late':>15} {'gateway CPU':>11} {'farm CPU':>10}"
                f"   (medians; farm late: the slowest peer's answer past its latency, direct / "
                f"via; CPU per query; load average {os.getloadavg()[0]:.1f})"
            )
            low, high = (float(x) / 1000 for x in args.spread.split(","))
            with (
                httpx.Client(verify=bench.ctx, timeout=30) as client,
                httpx.Client(verify=bench.peer_ctx, timeout=30) as direct_client,
            ):
                for n in [int(x) for x in args.sizes.split(",")]:
                    latencies = (
                        [low + (high - low) * i / (n - 1) for i in range(n)] if n > 1 else [high]
                    )
                    peers = bench.farm(latencies)
                    for p in peers:
                        p["url"] = f"https://127.0.0.1:{p['port']}/xca/iti38"
                    url = bench.gateway(peers, deadline=5.0)
                    farm_proc, gateway_proc = bench.procs[-2], bench.procs[-1]
                    slowest = max(peers, key=lambda p: p["latency"])
                    # Warm-up (connections to every peer); every peer admitted the gateway.
                    for _ in range(2):
                        warm = client.post(
                            url, content=_query(), headers={"content-type": "application/soap+xml"}
                        )
                        assert ResponseStatus.SUCCESS in warm.text, warm.text[:1000]
                    bench.timed(direct_client, slowest["url"], _query("iti38"), 1)
                    # Alternating, so that both sides of each ratio see the same load.
                    bench.farm_late(farm_proc, slowest["port"])
                    directs, vias = [], []
                    late_direct, late_via = [], []
                    gateway_cpu = farm_cpu = 0.0
                    for _ in range(args.repeat):
                        directs += bench.times(direct_client, slowest["url"], _query("iti38"), 1)
                        late_direct += bench.farm_late(farm_proc, slowest["port"])
                        cpu = _cpu_seconds(gateway_proc), _cpu_seconds(farm_proc)
                        vias += bench.times(client, url, _query(), 1)
                        gateway_cpu += _cpu_seconds(gateway_proc) - cpu[0]
                        farm_cpu += _cpu_seconds(farm_proc) - cpu[1]
                        late_via += bench.farm_late(farm_proc, slowest["port"])
                    ratios = sorted(v / d for v, d in zip(vias, directs, strict=True))
                    direct, via = statistics.median(directs), statistics.median(vias)
                    late = f"{statistics.median(late_direct):.2f}/{statistics.median(late_via):.2f}"
                    print(
                        f"{n:>6} {direct * 1e3:>13.1f}ms {via * 1e3:>10.1f}ms "
                        f"{statistics.median(ratios):>7.3f} {ratios[0]:>6.3f}-{ratios[-1]:.3f} "
                        f"{late:>13}ms {gateway_cpu / args.repeat * 1e3:>9.1f}ms "
                        f"{farm_cpu / args.repeat * 1e3:>8.1f}ms"
                    )
                    bench.close()
                    bench.procs.clear()

                if args.inflight:
                    fan = args.inflight_peers
                    peers = bench.farm([1.0] * fan)
                    for p in peers:
                        p["url"] = f"https://127.0.0.1:{p['port']}/xca/iti38"
                    url = bench.gateway(peers, deadline=30.0, max_connections=fan * args.inflight)
                    gateway = bench.procs[-1]
                    # Twice, so that the connections to every peer exist; the second is measured.
                    asyncio.run(_inflight(bench.ctx, url, _query(), args.inflight, gateway))
                    before = _rss(gateway)
                    peak, took = asyncio.run(
                        _inflight(bench.ctx, url, _query(), args.inflight, gateway)
                    )
                    delta = peak - before
                    print(
                        f"\nmemory in flight: {args.inflight} concurrent ITI-18 x {fan} peers "
                        f"(1 s each; {fan * args.inflight} TLS connections to the peers), "
                        f"answered in {took:.2f} s: gateway RSS {before / 2**20:.0f} -> "
                        f"{peak / 2**20:.0f} MB, {delta / args.inflight / 1024:.0f} KB per query "
                        f"in flight, {delta / args.inflight / fan / 1024:.1f} KB per peer request"
                    )
                    bench.close()
                    bench.procs.clear()

                peers = bench.farm([0.010 + 0.1 * i for i in range(4)])
                for p in peers:
                    p["url"] = f"https://127.0.0.1:{p['port']}/xca/iti38"
                hole = {
                    "home": f"urn:oid:{ARC}.70.999",
                    "url": f"https://127.0.0.1:{_black_hole()}/xca/iti38",
                }
                url = bench.gateway([*peers, hole], deadline=2.0)
                # Only while the peer's circuit breaker is closed (3 failures open it; then the
                # gateway answers at once without asking the black hole).
                elapsed = bench.timed(client, url, _query(), min(args.repeat, 3))
                print(
                    f"\nblack-holed peer, 2 s deadline: answer after {elapsed:.3f} s, "
                    f"{(elapsed - 2.0) * 1000:.0f} ms past the deadline"
                )

                peers = bench.farm([0.010])
                farm = bench.procs[-1]
                peers[0]["url"] = f"https://127.0.0.1:{peers[0]['port']}/xca/iti38"
                url = bench.gateway(peers, deadline=5.0)
                gateway = bench.procs[-1]
            via_qps, (via_gateway_ms, via_peer_ms) = _measured(
                [gateway, farm], bench.ctx, url, _query(), args.concurrency, args.seconds
            )
            direct_qps, (direct_peer_ms,) = _measured(
                [farm],
                bench.peer_ctx,
                peers[0]["url"],
                _query("iti38"),
                args.concurrency,
                args.seconds,
            )
            print(
                f"\nthroughput, {args.concurrency} concurrent consumers, one 10 ms peer: "
                f"{via_qps:.0f} q/s via gateway, {direct_qps:.0f} q/s direct, "
                f"ratio {via_qps / direct_qps:.2f}"
            )
            print(
                f"CPU per query: via gateway {via_gateway_ms:.2f} ms in the gateway + "
                f"{via_peer_ms:.2f} ms in the peer; direct {direct_peer_ms:.2f} ms in the peer "
                f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
            )
        finally:
            bench.close()
    return 0


_HOLES: list[socket.socket] = []


def _black_hole() -> int:
    """A port that accepts TCP connections and never answers (kept open until exit)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    _HOLES.append(sock)
    return int(sock.getsockname()[1])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
