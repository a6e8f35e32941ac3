"""Time to first image in the viewer: a study in another community vs. its source directly.

A 200-instance CT study (512 x 512, 16-bit) is stored in Orthanc (with its DICOMweb plugin), the
Imaging Document Source of community ``beta``; beta's gateway registers its KOS manifest and
serves it over XCA-I (ITI-38/39, RAD-75 from Orthanc's DICOMweb). Community ``alpha``'s gateway
has the DICOMweb door the viewer uses. Both gateways run as ``xca-gateway serve`` processes on
loopback mTLS, deny-by-default (the consumer is alpha's local consumer; alpha is beta's peer).

The viewer's own sequence to first image is timed against each DICOMweb root, in the same run,
alternating, each round on a new connection:

1. QIDO-RS ``/studies?PatientID=...`` (through alpha: ITI-38 to beta and the local registry, the
   manifest by ITI-43/39),
2. ``/studies/{study}/series``, 3. ``/series/{series}/instances``,
4. the first instance's ``/metadata`` (its window), 5. its ``/rendered`` as ``image/png``.

Then the rest of the series is scrolled through (every ``/rendered``, one after the other) for
the time to the last image. Through alpha every rendering is a RAD-75 to beta, which fetches the
instance from Orthanc (WADO-RS) and streams it back; alpha decodes and renders it.

    python benchmarks/viewer_bench.py                  # 200 instances, 5 rounds
    python benchmarks/viewer_bench.py --instances 50 --rounds 3
    python benchmarks/viewer_bench.py --instances 6 --rounds 1 --rle   # smoke (tests run it)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import httpx
from bench_policy import consumer, peer, policy, policy_toml

from xca_gateway.security.dev_pki import DevPki, init_dev_pki
from xca_gateway.tools.dicom_samples import SamplePatient, generate_study
from xca_gateway.tools.import_manifests import import_with_config, registry_from_config

COMMUNITIES = ("alpha", "beta")
_ARC = "1.3.6.1.4.1.21367.13"
HOMES = {"alpha": f"urn:oid:{_ARC}.70.951", "beta": f"urn:oid:{_ARC}.70.952"}
# One affinity domain: both communities know the patient by the same id (a shared MPI).
AUTHORITY = f"{_ARC}.20.950"
REPOSITORY = f"{_ARC}.80.952"
SOURCE = f"{_ARC}.81.952"
PATIENT_ID = "VIEWER-BENCH-1"
ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


def gateway_config_toml(
    pki: DevPki,
    name: str,
    data_dir: Path,
    ports: dict[str, int],
    *,
    orthanc_url: str = "http://127.0.0.1:1/dicom-web",
) -> str:
    """The configuration of ``alpha`` (DICOMweb door, beta as its peer) or ``beta`` (registry,
    repository and Orthanc as its imaging source)."""
    pair = pki.communities[name]
    lines = [
        "[community]",
        f'name = "{name}"',
        f'home_community_id = "{HOMES[name]}"',
        f'patient_id_assigning_authority = "{AUTHORITY}"',
        "[server]",
        'host = "127.0.0.1"',
        f"port = {ports[name]}",
        "[admin]",
        'host = "127.0.0.1"',
        "port = 0",
        "[tls]",
        f'certificate = "{pair.cert}"',
        f'private_key = "{pair.key}"',
        f'trust_store = "{pki.ca}"',
        "[storage]",
        f'data_dir = "{data_dir}"',
        "[outbound]",
        "request_timeout = 120.0",
    ]
    if name == "alpha":
        beta = f"https://127.0.0.1:{ports['beta']}/xca"
        lines += [
            "[[peers]]",
            'name = "beta"',
            f'home_community_id = "{HOMES["beta"]}"',
            f'iti38 = "{beta}/iti38"',
            f'iti39 = "{beta}/iti39"',
            f'rad75 = "{beta}/rad75"',
            "[dicomweb]",
            'host = "127.0.0.1"',
            f"port = {ports['dicomweb']}",
        ]
        table = policy(callers=[consumer()])
    else:
        lines += [
            "[repository]",
            f'repository_unique_id = "{REPOSITORY}"',
            "[repository.manifest]",
            f'imaging_source_id = "{SOURCE}"',
            "[[imaging.sources]]",
            f'repository_unique_id = "{SOURCE}"',
            'kind = "dicomweb"',
            f'base_url = "{orthanc_url}"',
        ]
        table = policy(peers=[peer("alpha", HOMES["alpha"])])
    return "\n".join(lines) + "\n" + policy_toml(table)


# ----------------------------------------------------------------------------- processes


def start_orthanc(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Orthanc on free ports; tried again on new ports if another process took one meanwhile."""
    if not (os.path.exists(ORTHANC) and os.path.exists(DICOMWEB_PLUGIN)):
        sys.exit("needs Orthanc and its DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)")
    import json

    storage = workdir / "orthanc-db"
    storage.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):
        http_port = free_port()
        config = {
            "Name": "viewer-bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": http_port,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpCompressionEnabled": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (workdir / "orthanc.json").write_text(json.dumps(config))
        log = (workdir / "orthanc.log").open("wb")
        process = subprocess.Popen(
            [ORTHANC, str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        if wait_port(http_port) and process.poll() is None:
            return process, http_port
        stop(process)
    sys.exit(f"Orthanc did not start: {(workdir / 'orthanc.log').read_text()[-2000:]}")


def start_gateway(workdir: Path, name: str, config: Path, port: int) -> subprocess.Popen[bytes]:
    log = (workdir / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "xca_gateway", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    if not wait_port(port):
        process.kill()
        sys.exit(f"{name} did not start: {(workdir / f'{name}.log').read_text()[-2000:]}")
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


# ----------------------------------------------------------------------------- the viewer


def first(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


def viewer_session(client: httpx.Client, root: str, study_uid: str) -> tuple[float, float, int]:
    """(seconds to the first image, seconds to the last, images) of the viewer's sequence."""
    started = time.perf_counter()
    json_accept = {"accept": "application/dicom+json"}
    studies = client.get(f"{root}/studies", params={"PatientID": PATIENT_ID}, headers=json_accept)
    studies.raise_for_status()
    assert study_uid in {first(s, "0020000D") for s in studies.json()}, studies.text[:300]
    series = client.get(f"{root}/studies/{study_uid}/series", headers=json_accept)
    series.raise_for_status()
    series_uid = first(series.json()[0], "0020000E")
    base = f"{root}/studies/{study_uid}/series/{series_uid}"
    instances = client.get(f"{base}/instances", headers=json_accept)
    instances.raise_for_status()
    sops = [first(i, "00080018") for i in instances.json()]
    client.get(f"{base}/instances/{sops[0]}/metadata", headers=json_accept).raise_for_status()
    png = {"accept": "image/png"}
    image = client.get(f"{base}/instances/{sops[0]}/rendered", headers=png)
    image.raise_for_status()
    assert image.content.startswith(b"\x89PNG"), image.headers
    to_first = time.perf_counter() - started
    for sop in sops[1:]:
        response = client.get(f"{base}/instances/{sop}/rendered", headers=png)
        response.raise_for_status()
    return to_first, time.perf_counter() - started, len(sops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--rle", action="store_true", help="store the study RLE Lossless compressed at Orthanc"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="viewer-bench-"))
    pki = init_dev_pki(workdir / "certs", COMMUNITIES)
    print(f"generating a {args.instances}-instance CT study (512x512) ...", flush=True)
    study = generate_study(
        workdir / "beta" / "images",
        patient=SamplePatient("bench", "Viewer", "Bench", "19600101", "O"),
        patient_id=PATIENT_ID,
        issuer_oid=AUTHORITY,
        modality="CT",
        body_part="CHEST",
        study_date=date(2025, 1, 2),
        institution="Beta",
        accession_number="VB0001",
        uid_root=f"{_ARC}.90.952",
        series_count=1,
        instances_per_series=args.instances,
        rows=512,
        columns=512,
        seed=11,
        transfer_syntax_uid="1.2.840.10008.1.2.5" if args.rle else "1.2.840.10008.1.2.1",
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        orthanc, orthanc_port = start_orthanc(workdir)
        processes.append(orthanc)
        orthanc_root = f"http://127.0.0.1:{orthanc_port}/dicom-web"
        with httpx.Client(timeout=60) as client:
            for path in study.files:
                client.post(
                    f"http://127.0.0.1:{orthanc_port}/instances", content=path.read_bytes()
                ).raise_for_status()
        ports = {"alpha": free_port(), "beta": free_port(), "dicomweb": free_port()}
        configs = {}
        for name in COMMUNITIES:
            configs[name] = workdir / f"{name}.toml"
            configs[name].write_text(
                gateway_config_toml(pki, name, workdir / name, ports, orthanc_url=orthanc_root)
            )
        report = asyncio.run(
            import_with_config(
                configs["beta"],
                [workdir / "beta" / "images"],
                registry_from_config,
                progress=False,
            )
        )
        assert not report.failed, report.summary()
        for name in ("beta", "alpha"):
            processes.append(start_gateway(workdir, name, configs[name], ports[name]))
        assert wait_port(ports["dicomweb"])
        gateway_root = f"https://127.0.0.1:{ports['dicomweb']}/dicomweb"
        tls = ssl.create_default_context(cafile=str(pki.ca))
        tls.load_cert_chain(str(pki.client.cert), str(pki.client.key))
        results: dict[str, list[tuple[float, float, int]]] = {"gateway": [], "orthanc": []}
        print(f"{args.rounds} rounds, alternating; each on a new connection", flush=True)
        for _ in range(args.rounds):
            for kind, root in (("gateway", gateway_root), ("orthanc", orthanc_root)):
                with httpx.Client(timeout=120, verify=tls, trust_env=False) as client:
                    results[kind].append(viewer_session(client, root, study.study_instance_uid))
        print()
        print(f"study: {args.instances} instances of 512x512x16 bit in community beta (Orthanc)")
        print(f"{'path':<34} {'first image (median)':>21} {'last image (median)':>20}")
        medians = {}
        for kind, label in (
            ("gateway", "viewer -> alpha -> beta -> Orthanc"),
            ("orthanc", "viewer -> Orthanc DICOMweb"),
        ):
            firsts = [r[0] for r in results[kind]]
            lasts = [r[1] for r in results[kind]]
            medians[kind] = (statistics.median(firsts), statistics.median(lasts))
            print(f"{label:<34} {medians[kind][0] * 1000:>18.0f} ms {medians[kind][1]:>18.2f} s")
        print(
            f"ratio gateway/direct: first image {medians['gateway'][0] / medians['orthanc'][0]:.2f}"
            f", last image {medians['gateway'][1] / medians['orthanc'][1]:.2f}"
        )
    finally:
        for process in reversed(processes):
            stop(process)
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work directory kept: {workdir}")


if __name__ == "__main__":
    main()
