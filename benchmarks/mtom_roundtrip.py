"""MTOM round trip through the gateway with bounded memory.

Starts ``xca-gateway serve`` (diagnostic echo enabled) as its own process, streams an MTOM
request carrying one large attachment over mutual TLS, streams the echoed MTOM response back,
checks it byte for byte (SHA-256), and samples the server's RSS throughout. Several sizes run
side by side so the ratio of peak RSS between the largest and smallest size shows whether
memory stays flat while the payload grows. The gateway's deny-by-default policy names the
consumer (dev PKI ``client``) as a local consumer, admitted at the diagnostics door.

    python benchmarks/mtom_roundtrip.py               # 20 MB and 200 MB
    python benchmarks/mtom_roundtrip.py --sizes 200,1000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
from bench_policy import consumer, policy, policy_toml
from lxml import etree

from xca_gateway.app import diagnostics
from xca_gateway.protocol import mtom
from xca_gateway.protocol.namespaces import XOP
from xca_gateway.protocol.soap import build_envelope, serialize
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import init_dev_pki
from xca_gateway.tools.demo import DemoCommunity, community_config_toml

CHUNK = 1024 * 1024
COMMUNITIES = ["bench"]
COMMUNITY = DemoCommunity(0, "bench")


def gateway_policy() -> dict[str, Any]:
    """The gateway's only caller: the consumer (local systems may use /diagnostics/echo)."""
    return policy(callers=[consumer()])


def gateway_config_toml(work: Path, https_port: int, admin_port: int, max_size: int) -> str:
    text = community_config_toml(
        COMMUNITY,
        certs_dir=str(work / "certs"),
        data_dir=str(work / "data"),
        https_port=https_port,
        admin_port=admin_port,
        peers=[],
        diagnostics_echo=True,
        policy=policy_toml(gateway_policy()),
    )
    # Allow bodies beyond the largest size; attachments spool to disk past 1 MiB.
    return text + f"\n[limits]\nmax_request_bytes = {max_size * 2}\n"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _payload(size: int, seed: bytes) -> Iterator[bytes]:
    block = hashlib.sha256(seed).digest() * (CHUNK // 32)
    sent = 0
    while sent < size:
        n = min(CHUNK, size - sent)
        yield block[:n]
        sent += n


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def stop(self) -> int:
        self._halt.set()
        self.join(5)
        return self.peak


def round_trip(url: str, client: httpx.Client, size: int) -> tuple[float, bool]:
    payload = etree.Element(f"{{{diagnostics.NS}}}Echo", nsmap={"diag": diagnostics.NS})
    doc = etree.SubElement(payload, f"{{{diagnostics.NS}}}Document")
    etree.SubElement(doc, f"{{{XOP}}}Include").set("href", "cid:big@bench")
    writer = mtom.MtomWriter(serialize(build_envelope(payload, action=diagnostics.ECHO_ACTION)))
    writer.add_part(mtom.OutgoingPart("big@bench", "application/dicom", _payload(size, b"x")))
    expected = hashlib.sha256()
    for chunk in _payload(size, b"x"):
        expected.update(chunk)

    started = time.perf_counter()
    with client.stream(
        "POST", url, content=writer.iter_bytes(), headers={"content-type": writer.content_type}
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:500]!r}")
        parser = mtom.MultipartParser(
            mtom.parse_content_type(response.headers["content-type"])[1]["boundary"]
        )
        got = hashlib.sha256()
        part = -1
        received = 0
        for data in response.iter_raw(CHUNK):
            for event in parser.feed(data):
                if isinstance(event, mtom.PartStart):
                    part += 1
                elif isinstance(event, mtom.PartData) and part == 1:
                    got.update(event.data)
                    received += len(event.data)
        parser.close()
    elapsed = time.perf_counter() - started
    return elapsed, received == size and got.digest() == expected.digest()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sizes", default="20,200", help="attachment sizes in MB (default 20,200)")
    args = parser.parse_args()
    sizes = [int(s) * 1000 * 1000 for s in args.sizes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = init_dev_pki(work / "certs", COMMUNITIES)
        https_port, admin_port = _free_port(), _free_port()
        config = work / "gateway.toml"
        config.write_text(gateway_config_toml(work, https_port, admin_port, max(sizes)))
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xca_gateway",
                "--log-level",
                "warning",
                "serve",
                "--config",
                str(config),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{admin_port}/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
            url = f"https://127.0.0.1:{https_port}{diagnostics.PATH}"
            baseline = psutil.Process(server.pid).memory_info().rss
            rows = []
            with httpx.Client(verify=ctx, timeout=600) as client:
                round_trip(url, client, 1_000_000)  # warm-up: imports, TLS session
                for size in sizes:
                    sampler = RssSampler(server.pid)
                    cpu_before = sum(sampler.process.cpu_times()[:2])
                    sampler.start()
                    elapsed, ok = round_trip(url, client, size)
                    peak = sampler.stop()
                    # Server CPU (user + system) per GB: what the echo costs, whatever else
                    # shares the machine (wall-clock MB/s depends on that).
                    cpu = sum(sampler.process.cpu_times()[:2]) - cpu_before
                    rows.append((size, elapsed, ok, peak, cpu / (size / 1e9)))
        finally:
            server.terminate()
            server.wait(10)

    print(f"server RSS before the first request: {baseline / 1e6:.1f} MB")
    print(
        f"{'attachment':>12} {'round trip':>11} {'MB/s (each way)':>16} "
        f"{'peak RSS':>10} {'server CPU s/GB':>16} {'intact':>7}"
    )
    for size, elapsed, ok, peak, cpu_per_gb in rows:
        print(
            f"{size / 1e6:>10.0f}MB {elapsed:>10.2f}s {size / 1e6 / elapsed:>16.1f} "
            f"{peak / 1e6:>8.1f}MB {cpu_per_gb:>16.2f} {'yes' if ok else 'NO':>7}"
        )
    small, large = rows[0], rows[-1]
    print(
        f"payload ratio {large[0] / small[0]:.1f}x -> peak RSS ratio {large[3] / small[3]:.2f}x "
        "(flat memory: close to 1.0)"
    )
    return 0 if all(r[2] for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
