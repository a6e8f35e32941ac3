"""ITI-38 queries per second with one and with two gateway replicas behind HAProxy, and the
balancer's own CPU per request, measured in one run.

One community (``north``) served by two ``xca-gateway serve`` replicas sharing a private
PostgreSQL (registry and shared state), behind one HAProxy in TCP mode (``send-proxy-v2``,
mutual TLS end to end). HAProxy has two frontends: one reaching replica 1 only, one balancing
over both. A peer gateway (the dev PKI's ``south`` certificate, the only caller the replicas'
deny-by-default policy names) sends ITI-38s over ``--connections`` kept-alive connections for
``--seconds`` per phase, the phases alternating (1, 2, 1, 2, ... ``--repeat`` times) so that a
change of machine load hits both alike. Printed: queries/s per phase and their medians, the
ratio 2/1, HAProxy's CPU microseconds per request, and the replicas' CPU milliseconds per
request.

On a 2-core machine the load generator (this process), HAProxy, PostgreSQL and the replicas
share the same two cores: a second replica cannot double the throughput here; it shows what
the balancer costs and that nothing serializes the replicas.

    python benchmarks/replicas_bench.py [--seconds 10] [--repeat 2] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from bench_policy import peer, policy, policy_toml

from xca_gateway.app.serve import LISTEN_FDS_ENV
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import init_dev_pki
from xca_gateway.tools.demo import DemoCommunity, community_config_toml
from xca_gateway.tools.replicas import (
    Backend,
    Haproxy,
    PrivatePostgres,
    free_port,
    haproxy_config,
    replica_config_toml,
)

COMMUNITIES = ["north", "south"]
RESPONDER = DemoCommunity(0, "north")
REQUESTER = DemoCommunity(1, "south")

QUERY = """<?xml version="1.0" encoding="UTF-8"?>
<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"
 xmlns:a="http://www.w3.org/2005/08/addressing"><s:Header>
<a:Action s:mustUnderstand="1">urn:ihe:iti:2007:CrossGatewayQuery</a:Action>
<a:MessageID>urn:uuid:1</a:MessageID></s:Header><s:Body>
<query:AdhocQueryRequest xmlns:query="urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
 xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0">
<query:ResponseOption returnType="LeafClass" returnComposedObjects="true"/>
<rim:AdhocQuery id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d">
<rim:Slot name="$XDSDocumentEntryPatientId"><rim:ValueList>
<rim:Value>'P1^^^&amp;1.3.6.1.4.1.21367.13.20.1000&amp;ISO'</rim:Value></rim:ValueList></rim:Slot>
<rim:Slot name="$XDSDocumentEntryStatus"><rim:ValueList>
<rim:Value>('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')</rim:Value>
</rim:ValueList></rim:Slot></rim:AdhocQuery></query:AdhocQueryRequest></s:Body></s:Envelope>"""


def gateway_policy() -> dict[str, Any]:
    """north's callers: south as a peer gateway on /xca/*; nobody else."""
    return policy(peers=[peer(REQUESTER.name, REQUESTER.home_community_id)])


def gateway_config_toml(
    work: Path, name: str, https: int, admin: int, database_url: str, public_port: int
) -> str:
    """One replica of north: PROXY v2 from the balancer, the shared PostgreSQL."""
    base = community_config_toml(
        RESPONDER,
        certs_dir=str(work / "certs"),
        data_dir=str(work / name),
        https_port=https,
        admin_port=admin,
        peers=[],
        policy=policy_toml(gateway_policy()),
    )
    return replica_config_toml(
        base,
        https_port=https,
        admin_port=admin,
        data_dir=work / name,
        database_url=database_url,
        public_base_url=f"https://127.0.0.1:{public_port}",
    )


def _listening() -> socket.socket:
    """A listening socket on a free loopback port, handed to the replica (no bind race)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _replica(work: Path, name: str, database_url: str, public_port: int) -> tuple[Any, Backend]:
    https_sock, admin_sock = _listening(), _listening()
    https, admin = https_sock.getsockname()[1], admin_sock.getsockname()[1]
    config = work / f"{name}.toml"
    config.write_text(gateway_config_toml(work, name, https, admin, database_url, public_port))
    env = {**os.environ, LISTEN_FDS_ENV: f"https={https_sock.fileno()},admin={admin_sock.fileno()}"}
    command = [sys.executable, "-m", "xca_gateway", "--log-level", "error", "serve"]
    process = subprocess.Popen(
        [*command, "--config", str(config)],
        env=env,
        pass_fds=(https_sock.fileno(), admin_sock.fileno()),
    )
    https_sock.close()
    admin_sock.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200:
                return process, Backend(name, https, admin)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"replica {name} did not become ready")


async def _phase(url: str, ctx: Any, connections: int, seconds: float) -> tuple[int, int]:
    """Queries answered 200 and failed within ``seconds``, over ``connections`` kept-alive
    connections (one client each, so the balancer spreads connections, not requests)."""
    headers = {"content-type": f'application/soap+xml; action="{Action.ITI38}"'}
    body = QUERY.encode()
    ok = failed = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal ok, failed
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(verify=ctx, timeout=30, limits=limits) as client:
            for _ in range(1_000_000):  # bounded; the deadline ends it
                if time.monotonic() >= deadline:
                    return
                try:
                    response = await client.post(url, content=body, headers=headers)
                    if response.status_code == 200:
                        ok += 1
                    else:
                        failed += 1
                except httpx.HTTPError:
                    failed += 1

    await asyncio.gather(*(worker() for _ in range(connections)))
    return ok, failed


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = init_dev_pki(work / "certs", COMMUNITIES)
        database = PrivatePostgres(work / "postgres")
        database.start()
        processes: list[Any] = []
        balancer: Haproxy | None = None
        try:
            public, one = free_port(), free_port()
            backends = []
            for name in ("r1", "r2"):
                process, backend = _replica(work, name, database.url, public)
                processes.append(process)
                backends.append(backend)
            config = work / "haproxy.cfg"
            config.write_text(haproxy_config(public, backends, direct_ports={"r1": one}))
            balancer = Haproxy(config, public)
            balancer.start()
            assert balancer.process is not None
            haproxy = psutil.Process(balancer.process.pid)
            replicas = [psutil.Process(p.pid) for p in processes]
            south = pki.communities[REQUESTER.name]
            ctx = client_context(pki.ca, south.cert, south.key)
            urls = {
                1: f"https://127.0.0.1:{one}/xca/iti38",
                2: f"https://127.0.0.1:{public}/xca/iti38",
            }
            for url in urls.values():  # warm-up: connections, caches, the registry's plans
                asyncio.run(_phase(url, ctx, args.connections, 1.0))
            rates: dict[int, list[float]] = {1: [], 2: []}
            lb_us: dict[int, list[float]] = {1: [], 2: []}
            gw_ms: dict[int, list[float]] = {1: [], 2: []}
            for round_ in range(args.repeat):
                for count in (1, 2):
                    lb0, gw0 = _cpu(haproxy), sum(_cpu(p) for p in replicas)
                    start = time.monotonic()
                    ok, failed = asyncio.run(
                        _phase(urls[count], ctx, args.connections, args.seconds)
                    )
                    elapsed = time.monotonic() - start
                    lb, gw = _cpu(haproxy) - lb0, sum(_cpu(p) for p in replicas) - gw0
                    rate = ok / elapsed
                    rates[count].append(rate)
                    lb_us[count].append(lb / max(ok, 1) * 1e6)
                    gw_ms[count].append(gw / max(ok, 1) * 1e3)
                    print(
                        f"round {round_ + 1}, {count} replica(s): {rate:7.1f} queries/s "
                        f"({ok} ok, {failed} failed), HAProxy {lb_us[count][-1]:.0f} "
                        f"CPU-µs/request, replicas {gw_ms[count][-1]:.2f} CPU-ms/request"
                    )
            one_rate, two_rate = statistics.median(rates[1]), statistics.median(rates[2])
            print(
                f"median: 1 replica {one_rate:.1f} q/s, 2 replicas {two_rate:.1f} q/s, "
                f"ratio {two_rate / one_rate:.2f}; HAProxy {statistics.median(lb_us[2]):.0f} "
                f"CPU-µs/request (1: {statistics.median(lb_us[1]):.0f}); replicas "
                f"{statistics.median(gw_ms[2]):.2f} CPU-ms/request; load average "
                f"{psutil.getloadavg()[0]:.1f} on {psutil.cpu_count()} cores"
            )
        finally:
            if balancer is not None:
                balancer.stop()
            for process in processes:
                process.terminate()
                process.wait(30)
            database.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
