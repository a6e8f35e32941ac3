"""Added latency of auditing on an ITI-38, measured side by side.

Two `xca-gateway serve` processes with the same data, one auditing every transaction to a real
rsyslog over mutual TLS, one not; the same ITI-38 is sent to each in turn, and the medians and
p95 are compared. Recording goes to the durable spool on a writer thread, so the difference
should be small. The ITI-38s come from a peer gateway (the dev PKI's ``south`` certificate),
the only caller the gateways' deny-by-default policy names (bench_policy).

    python benchmarks/audit_latency.py [--requests 300]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from bench_policy import peer, policy, policy_toml

from xca_gateway.audit.rsyslog import RsyslogRepository
from xca_gateway.protocol.namespaces import Action, ResponseStatus
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import init_dev_pki
from xca_gateway.tools.demo import DemoCommunity, community_config_toml

# Dev PKI communities: the responding gateway, the peer that queries it, the audit repository.
COMMUNITIES = ["north", "south", "arr"]
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_policy() -> dict[str, Any]:
    """north's callers: south as a peer gateway on /xca/*; nobody else."""
    return policy(peers=[peer(REQUESTER.name, REQUESTER.home_community_id)])


def gateway_config_toml(
    work: Path, name: str, https: int, admin: int, audit_port: int | None
) -> str:
    text = community_config_toml(
        RESPONDER,
        certs_dir=str(work / "certs"),
        data_dir=str(work / name),
        https_port=https,
        admin_port=admin,
        peers=[],
        policy=policy_toml(gateway_policy()),
    )
    if audit_port is not None:
        text += (
            '\n[audit]\naudit_source_id = "bench"\n[[audit.destinations]]\nname = "arr"\n'
            f'transport = "tls"\nhost = "127.0.0.1"\nport = {audit_port}\n'
        )
    return text


def _gateway(work: Path, name: str, audit_port: int | None) -> tuple[subprocess.Popen[bytes], str]:
    https, admin = _free_port(), _free_port()
    config = work / f"{name}.toml"
    config.write_text(gateway_config_toml(work, name, https, admin, audit_port))
    process = subprocess.Popen(
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
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return process, f"https://127.0.0.1:{https}/xca/iti38"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = init_dev_pki(work / "certs", COMMUNITIES)
        (work / "rsyslog").mkdir()
        arr = pki.communities["arr"]
        rsyslog = RsyslogRepository(work / "rsyslog", pki.ca, arr.cert, arr.key)
        rsyslog.start()
        plain, plain_url = _gateway(work, "plain", None)
        audited, audited_url = _gateway(work, "audited", rsyslog.tls_port)
        try:
            south = pki.communities[REQUESTER.name]
            ctx = client_context(pki.ca, south.cert, south.key)
            headers = {"content-type": f'application/soap+xml; action="{Action.ITI38}"'}
            times: dict[str, list[float]] = {"off": [], "on": []}
            with httpx.Client(verify=ctx, timeout=30) as client:
                for url in (plain_url, audited_url):  # warm-up; the peer is admitted
                    warm = client.post(url, content=QUERY, headers=headers)
                    assert ResponseStatus.SUCCESS in warm.text, warm.text[:1000]
                for _ in range(args.requests):
                    for key, url in (("off", plain_url), ("on", audited_url)):
                        started = time.perf_counter()
                        response = client.post(url, content=QUERY, headers=headers)
                        times[key].append(time.perf_counter() - started)
                        assert response.status_code == 200
            received = len(rsyslog.wait_for(args.requests + 2, timeout=30))
        finally:
            for process in (plain, audited):
                process.terminate()
                process.wait(10)
            rsyslog.stop()
    off, on = sorted(times["off"]), sorted(times["on"])
    p95 = int(0.95 * len(off))
    print(f"ITI-38, {args.requests} requests each, alternating:")
    print(
        f"  auditing off: median {statistics.median(off) * 1e3:.2f} ms, p95 {off[p95] * 1e3:.2f} ms"
    )
    print(
        f"  auditing on:  median {statistics.median(on) * 1e3:.2f} ms, p95 {on[p95] * 1e3:.2f} ms"
    )
    print(
        f"  added latency: median {(statistics.median(on) - statistics.median(off)) * 1e3:+.2f} ms"
        f" (ratio {statistics.median(on) / statistics.median(off):.3f});"
        f" audit records received by rsyslog: {received} (expected {args.requests + 2})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
