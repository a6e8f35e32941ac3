"""Imaging retrieval through two gateways vs. straight from the source, with peak memory.

Three gateway processes on loopback mTLS (development PKI):

* ``gamma`` plays the community's XDS-I.b Imaging Document Source: RAD-69 served from a
  synthetic study on disk (filesystem source);
* ``beta`` is the Responding Imaging Gateway: RAD-75 in, RAD-69 out to gamma;
* ``alpha`` is the Initiating Imaging Gateway: RAD-69 in from the consumer, RAD-75 out to beta.

For each study size the consumer (this process) retrieves the whole study once directly from
the source (RAD-69 to gamma) and once through both gateways (RAD-69 to alpha, HomeCommunityId =
beta), streaming and checking every instance (count and byte total of the MIME parts). It
prints both throughputs, their ratio (target >= 0.9) and each gateway's peak RSS (VmHWM, target
flat across sizes and <= 200 MB). Every size runs with fresh gateway processes.

Each gateway is deny-by-default and names exactly its callers (bench_policy): alpha and gamma
admit the consumer (dev PKI ``client``) as a local consumer on /ig/rad69, beta admits alpha as
the peer gateway of its community on /xca/rad75, and gamma admits beta's certificate as a local
consumer (the responding gateway retrieving from its community's imaging source).

Unpaced, every process is CPU-bound: with fewer cores than the 4 busy processes of the
through path the ratio measures CPU sharing, so the CPU seconds per GB of every process and the
ratio projected for a core per process are printed too. A second run per size paces the source
(``--source-rate``, default 100 MiB/s, as a PACS/VNA behind its disks and network delivers):
the ratio then shows what two gateway hops add when the source, not the CPU, sets the pace.

    python benchmarks/imaging_bench.py                      # 100 MB and 2 GB studies
    python benchmarks/imaging_bench.py --sizes 50M,500M --instance-size 256K
    python benchmarks/imaging_bench.py --source-rate 0      # unpaced runs only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from bench_policy import consumer, local_consumer_gateway, peer, policy
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from xca_gateway.imaging.request import (
    DocumentRequest,
    RetrieveImagingDocumentSetRequest,
    build_retrieve_imaging_request,
)
from xca_gateway.protocol import mtom
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.soap import build_envelope, serialize
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import DevPki, init_dev_pki

REPOSITORY = "1.3.6.1.4.1.21367.13.71.2.1"
HOMES = {
    "alpha": "urn:oid:1.3.6.1.4.1.21367.13.70.1",
    "beta": "urn:oid:1.3.6.1.4.1.21367.13.70.2",
    "gamma": "urn:oid:1.3.6.1.4.1.21367.13.70.3",
}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    factor = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * factor)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ the study


def generate_study(root: Path, total: int, instance_size: int) -> list[DocumentRequest]:
    """Secondary Capture instances with random 16-bit pixels, demo layout, ~``total`` bytes."""
    study, series = str(generate_uid()), str(generate_uid())
    folder = root / study / series
    folder.mkdir(parents=True, exist_ok=True)
    side = max(8, int((instance_size // 2) ** 0.5))
    count = max(1, total // (side * side * 2))
    docs = []
    for number in range(count):
        sop = str(generate_uid())
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.PatientID = "BENCH"
        ds.PatientName = "Bench^Mark"
        ds.Modality = "OT"
        ds.InstanceNumber = number + 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = side
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = os.urandom(side * side * 2)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(ds.SOPClassUID)
        meta.MediaStorageSOPInstanceUID = UID(sop)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(folder / f"{sop}.dcm", enforce_file_format=True)
        docs.append(DocumentRequest(study, series, REPOSITORY, sop, HOMES["beta"]))
    return docs


# ------------------------------------------------------------------------ gateway processes


# Who calls each gateway: alpha (initiating) and gamma (the source) are called by the consumer,
# beta (responding) by alpha over /xca/rad75, gamma also by beta retrieving for the federation.
POLICIES: dict[str, dict[str, Any]] = {
    "alpha": policy(callers=[consumer()]),
    "beta": policy(peers=[peer("alpha", HOMES["alpha"])]),
    "gamma": policy(callers=[consumer(), local_consumer_gateway("beta")]),
}


def gateway_config(pki: DevPki, name: str, port: int, data_dir: Path) -> dict[str, Any]:
    return {
        "community": {
            "name": name,
            "home_community_id": HOMES[name],
            "patient_id_assigning_authority": f"1.3.6.1.4.1.21367.13.20.{len(name)}000",
        },
        "server": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": 0},
        "tls": {
            "certificate": str(pki.communities[name].cert),
            "private_key": str(pki.communities[name].key),
            "trust_store": str(pki.ca),
        },
        "storage": {"data_dir": str(data_dir)},
        "outbound": {"request_timeout": 120.0},
        "policy": POLICIES[name],
    }


async def serve(spec: dict[str, Any]) -> None:
    """Child process: one gateway in the role given by ``spec``, until SIGTERM."""
    import logging

    from xca_gateway.app.config import parse_config
    from xca_gateway.app.gateway import Gateway
    from xca_gateway.imaging.filesystem import FilesystemSource
    from xca_gateway.imaging.rad69_source import Rad69Source
    from xca_gateway.initiating.imaging import rad69_handler
    from xca_gateway.protocol.soap_service import Operation
    from xca_gateway.transactions.rad69 import imaging_document_source_handler
    from xca_gateway.transactions.rad75 import rad75_handler

    logging.basicConfig(level=logging.WARNING)
    gateway = Gateway(parse_config(spec["config"], Path(spec["base"])))
    role = spec["role"]
    if role == "source":
        source: Any = FilesystemSource(REPOSITORY, Path(spec["images"]))
        if spec.get("rate"):
            source = _Paced(source, float(spec["rate"]))
        handler = imaging_document_source_handler(
            {REPOSITORY: source}, home_community_id=HOMES["beta"]
        )
        gateway.endpoints["rad69"].add(Operation(Action.RAD69, "RAD-69", handler))
    elif role == "responding":
        source = Rad69Source(
            REPOSITORY,
            spec["source_url"],
            peer_client=gateway.peer_client,
            home_community_id=HOMES["beta"],
        )
        handler = rad75_handler({REPOSITORY: source}, home_community_id=HOMES["beta"])
        gateway.endpoints["rad75"].add(Operation(Action.RAD75, "RAD-75", handler))
    else:
        handler = rad69_handler(
            {},
            home_community_id=HOMES["alpha"],
            peers={HOMES["beta"]: spec["peer_url"]},
            peer_client=gateway.peer_client,
        )
        gateway.endpoints["rad69"].add(Operation(Action.RAD69, "RAD-69", handler))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await gateway.start()
    Path(spec["ready"]).write_text(str(os.getpid()))
    await stop.wait()
    await gateway.stop()


class _Paced:
    """An imaging source that delivers at most ``rate`` bytes/s (a PACS/VNA behind its disks
    and network), wrapped around the filesystem source."""

    def __init__(self, inner: Any, rate: float) -> None:
        self.inner, self.rate = inner, rate
        self.repository_unique_id = inner.repository_unique_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def open(self, request: Any) -> Any:
        retrieval = await self.inner.open(request)
        rate = self.rate
        started = time.monotonic()
        sent = 0
        original = retrieval.stream

        async def paced(instance: Any) -> Any:
            nonlocal sent
            async for chunk in original(instance):
                sent += len(chunk)
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
                yield chunk

        retrieval.stream = paced
        return retrieval


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    url: str

    def cpu_seconds(self) -> float:
        """User + system CPU time so far (from /proc, in clock ticks)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0


def start_child(
    workdir: Path, pki: DevPki, name: str, role: str, endpoint: str, **extra: str
) -> Child:
    port = free_port()
    spec = {
        "config": gateway_config(pki, name, port, workdir / name),
        "base": str(workdir),
        "role": role,
        "ready": str(workdir / f"{name}.ready"),
        **extra,
    }
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    log = (workdir / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(spec_path)], stdout=log, stderr=log
    )
    log.close()
    deadline = time.monotonic() + 60
    while not Path(spec["ready"]).exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start: {(workdir / f'{name}.log').read_text()}")
        time.sleep(0.05)
    return Child(name, process, f"https://127.0.0.1:{port}{endpoint}")


def stop_child(child: Child) -> None:
    if child.process.poll() is None:
        child.process.terminate()
        try:
            child.process.wait(20)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait(5)


# ------------------------------------------------------------------------------ consumer


def retrieve(
    client: httpx.Client, url: str, docs: list[DocumentRequest], action: str = Action.RAD69
) -> tuple[int, int, float, float]:
    """(instances, payload bytes, seconds, consumer CPU seconds) of one streamed RAD-69."""
    request = RetrieveImagingDocumentSetRequest(tuple(docs), ("1.2.840.10008.1.2.1",))
    envelope = build_envelope(build_retrieve_imaging_request(request), action=action, to=url)
    writer = mtom.MtomWriter(serialize(envelope), action=action)
    started = time.perf_counter()
    cpu_started = time.process_time()
    parts = payload = 0
    with client.stream(
        "POST",
        url,
        content=b"".join(writer.iter_bytes()),
        headers={"content-type": writer.content_type},
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:500]!r}")
        boundary = mtom.parse_content_type(response.headers["content-type"])[1]["boundary"]
        parser = mtom.MultipartParser(boundary, max_parts=len(docs) + 2)
        finished = False
        for chunk in response.iter_raw(1 << 20):
            for event in parser.feed(chunk):
                if isinstance(event, mtom.PartStart):
                    parts += 1
                elif isinstance(event, mtom.PartData) and parts > 1:
                    payload += len(event.data)
                elif isinstance(event, mtom.Finished):
                    finished = True
        if not finished:
            raise RuntimeError("response ended without its close delimiter")
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    if parts - 1 != len(docs):
        raise RuntimeError(f"expected {len(docs)} instances, got {parts - 1}")
    return parts - 1, payload, seconds, cpu


def run_size(
    workdir: Path, pki: DevPki, total: int, instance_size: int, rate: float | None = None
) -> dict[str, Any]:
    images = workdir / "images"
    t0 = time.perf_counter()
    docs = generate_study(images, total, instance_size)
    on_disk = sum(p.stat().st_size for p in images.rglob("*.dcm"))
    print(
        f"  study: {len(docs)} instances, {on_disk / 1e6:.1f} MB "
        f"(generated in {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    children: list[Child] = []
    try:
        pace = {"rate": str(rate)} if rate else {}
        source = start_child(
            workdir, pki, "gamma", "source", "/ig/rad69", images=str(images), **pace
        )
        children.append(source)
        responding = start_child(
            workdir, pki, "beta", "responding", "/xca/rad75", source_url=source.url
        )
        children.append(responding)
        initiating = start_child(
            workdir, pki, "alpha", "initiating", "/ig/rad69", peer_url=responding.url
        )
        children.append(initiating)
        context = client_context(pki.ca, pki.client.cert, pki.client.key)
        with httpx.Client(verify=context, timeout=httpx.Timeout(300.0)) as client:
            retrieve(client, source.url, docs[: min(len(docs), 20)])  # warm-up
            cpu0 = [c.cpu_seconds() for c in children]
            count, direct_bytes, direct_s, consumer_direct = retrieve(client, source.url, docs)
            cpu1 = [c.cpu_seconds() for c in children]
            _, through_bytes, through_s, consumer_through = retrieve(client, initiating.url, docs)
            cpu2 = [c.cpu_seconds() for c in children]
        if direct_bytes != on_disk or through_bytes != on_disk:
            raise RuntimeError(f"byte totals differ: {on_disk} {direct_bytes} {through_bytes}")
        gb = on_disk / 1e9
        through_cpu = {c.name: (cpu2[i] - cpu1[i]) / gb for i, c in enumerate(children)}
        through_cpu["consumer"] = consumer_through / gb
        direct_cpu = {"gamma": (cpu1[0] - cpu0[0]) / gb, "consumer": consumer_direct / gb}
        return {
            "instances": count,
            "bytes": on_disk,
            "direct_mb_s": direct_bytes / direct_s / 1e6,
            "through_mb_s": through_bytes / through_s / 1e6,
            "ratio": (through_bytes / through_s) / (direct_bytes / direct_s),
            "rss": {child.name: child.peak_rss() for child in children},
            # CPU seconds per GB, per process, in each retrieve: where the time goes. On a
            # machine with fewer cores than processes (4 in the through path) the measured
            # ratio is a CPU-sharing ratio; with a core per process (gateways on their own
            # hosts, as deployed) a pipeline runs at the pace of its costliest stage, which
            # gives the projected ratio.
            "cpu_s_per_gb": through_cpu,
            "direct_cpu_s_per_gb": direct_cpu,
            "projected_ratio": max(direct_cpu.values()) / max(through_cpu.values()),
            "cores": os.cpu_count() or 1,
        }
    finally:
        for child in reversed(children):
            stop_child(child)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100M,2G", help="study sizes, e.g. 100M,2G")
    parser.add_argument("--instance-size", default="512K", help="bytes per instance")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    parser.add_argument(
        "--source-rate",
        default="100M",
        help="also run each size with the source paced at this many bytes/s, as a PACS/VNA "
        "behind its disks and network would be (0: skip)",
    )
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        profile = os.environ.get("IMAGING_BENCH_PROFILE")
        if profile:  # developer aid: cProfile a gateway process
            import cProfile

            cProfile.runctx(
                "asyncio.run(serve(json.loads(args.serve.read_text())))",
                globals(),
                {"args": args, "asyncio": asyncio, "serve": serve, "json": json},
                f"{profile}.{args.serve.stem}",
            )
            return
        asyncio.run(serve(json.loads(args.serve.read_text())))
        return
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    source_rate = parse_size(args.source_rate)
    instance_size = parse_size(args.instance_size)
    with tempfile.TemporaryDirectory(prefix="imaging-bench-", dir=args.workdir) as tmp:
        base = Path(tmp)
        pki = init_dev_pki(base / "pki", list(HOMES))
        results = []
        for size in sizes:
            print(f"size {size / 1e6:.0f} MB", flush=True)
            workdir = base / f"run-{size}"
            workdir.mkdir()
            result = run_size(workdir, pki, size, instance_size)
            results.append(result)
            print(
                f"  direct RAD-69 {result['direct_mb_s']:.1f} MB/s, through two gateways "
                f"{result['through_mb_s']:.1f} MB/s, ratio {result['ratio']:.2f}",
                flush=True,
            )
            for name, rss in result["rss"].items():
                print(f"  peak RSS {name:5s} {rss / 1e6:.1f} MB", flush=True)
            cpu = ", ".join(f"{n} {v:.2f}" for n, v in result["cpu_s_per_gb"].items())
            direct = ", ".join(f"{n} {v:.2f}" for n, v in result["direct_cpu_s_per_gb"].items())
            print(f"  CPU s/GB through the gateways: {cpu}", flush=True)
            print(f"  CPU s/GB direct:               {direct}", flush=True)
            print(
                f"  {result['cores']} cores for 4 busy processes; with a core per process the "
                f"costliest stage sets the pace: projected ratio "
                f"{result['projected_ratio']:.2f}",
                flush=True,
            )
            # free the disk before the next size
            import shutil

            shutil.rmtree(workdir / "images", ignore_errors=True)
            if source_rate:
                paced_dir = base / f"paced-{size}"
                paced_dir.mkdir()
                paced = run_size(paced_dir, pki, size, instance_size, source_rate)
                result["paced"] = paced
                print(
                    f"  source paced at {source_rate / 1e6:.0f} MB/s: direct "
                    f"{paced['direct_mb_s']:.1f} MB/s, through two gateways "
                    f"{paced['through_mb_s']:.1f} MB/s, ratio {paced['ratio']:.2f}",
                    flush=True,
                )
                shutil.rmtree(paced_dir / "images", ignore_errors=True)
        print()
        print(
            "size_MB  instances  direct_MB/s  through_MB/s  ratio  projected  paced_ratio  "
            "rss_alpha_MB  rss_beta_MB"
        )
        for r in results:
            paced_ratio = f"{r['paced']['ratio']:11.2f}" if "paced" in r else f"{'-':>11}"
            print(
                f"{r['bytes'] / 1e6:7.0f}  {r['instances']:9d}  {r['direct_mb_s']:11.1f}  "
                f"{r['through_mb_s']:12.1f}  {r['ratio']:5.2f}  {r['projected_ratio']:9.2f}  "
                f"{paced_ratio}  {r['rss']['alpha'] / 1e6:12.1f}  {r['rss']['beta'] / 1e6:11.1f}"
            )
        ok_ratio = all(r["ratio"] >= 0.9 for r in results)
        paced = [r["paced"]["ratio"] for r in results if "paced" in r]
        ok_rss = all(max(r["rss"]["alpha"], r["rss"]["beta"]) <= 200e6 for r in results)
        print(
            f"targets: ratio >= 0.9: {'met' if ok_ratio else 'NOT met'}"
            + (
                f" (paced source: {'met' if all(p >= 0.9 for p in paced) else 'NOT met'})"
                if paced
                else ""
            )
            + "; "
            f"gateway peak RSS <= 200 MB: {'met' if ok_rss else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
