"""Shared helpers for the imaging tests: studies on disk, RAD-69/RAD-75 clients, PACS processes.

Holds no tests itself; the imaging test modules import from here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import httpx
import pytest
from lxml import etree
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from tests.dcmtk import dcmtk
from tests.test_server import consumer, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.imaging.request import (
    DocumentRequest,
    RetrieveImagingDocumentSetRequest,
    build_retrieve_imaging_request,
)
from xca_gateway.imaging.response import RetrieveResponse, parse_retrieve_response
from xca_gateway.protocol import mtom
from xca_gateway.protocol.namespaces import SOAP12
from xca_gateway.protocol.soap_service import Handler, Operation
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.tools.dicom_samples import DEFAULT_PATIENTS, SampleStudy, generate_study

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"


def make_study(
    root: Path,
    *,
    series: int = 1,
    instances: int = 3,
    rows: int = 64,
    columns: int = 64,
    seed: int = 1,
    uid_root: str = "1.2.826.0.1.3680043.10.1234",
) -> SampleStudy:
    """A synthetic study in the demo layout ``<root>/<study>/<series>/<sop>.dcm``."""
    return generate_study(
        root,
        patient=DEFAULT_PATIENTS[seed % len(DEFAULT_PATIENTS)],
        patient_id=f"P{seed}",
        issuer_oid="1.2.826.0.1.3680043.10.1234.1",
        modality="CT",
        body_part="CHEST",
        study_date=date(2021, 3, 4),
        institution="Test Hospital",
        accession_number=f"ACC{seed}",
        uid_root=uid_root,
        series_count=series,
        instances_per_series=instances,
        rows=rows,
        columns=columns,
        seed=seed,
    )


def make_big_study(root: Path, *, instances: int, instance_bytes: int) -> list[Path]:
    """Instances with random pixel data (fast to generate, incompressible), demo layout."""
    study_uid = str(generate_uid())
    series_uid = str(generate_uid())
    side = max(1, int((instance_bytes // 2) ** 0.5))
    folder = root / study_uid / series_uid
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(instances):
        sop_uid = str(generate_uid())
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = "BIG"
        ds.PatientName = "Big^Study"
        ds.Modality = "OT"
        ds.InstanceNumber = i + 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = side
        ds.Columns = side
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = os.urandom(side * side * 2)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(ds.SOPClassUID)
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"{sop_uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def documents_for(
    study: SampleStudy | Sequence[Path],
    repository_unique_id: str,
    home_community_id: str | None = None,
) -> list[DocumentRequest]:
    files = study.files if isinstance(study, SampleStudy) else study
    return [
        DocumentRequest(
            study_instance_uid=path.parent.parent.name,
            series_instance_uid=path.parent.name,
            repository_unique_id=repository_unique_id,
            document_unique_id=path.stem,
            home_community_id=home_community_id,
        )
        for path in files
    ]


def retrieve_body(documents: Sequence[DocumentRequest], syntaxes: Sequence[str]) -> str:
    request = RetrieveImagingDocumentSetRequest(tuple(documents), tuple(syntaxes))
    return etree.tostring(build_retrieve_imaging_request(request), encoding="unicode")


@dataclass
class Retrieved:
    status_code: int
    response: RetrieveResponse
    documents: dict[str, bytes]  # SOP Instance UID -> Part 10 bytes
    content_types: dict[str, str]
    payload: etree._Element | None = None  # the xdsb:RetrieveDocumentSetResponse


def read_retrieve_reply(status_code: int, content_type: str, body: bytes) -> Retrieved:
    reader = mtom.MtomRequestReader(
        content_type,
        max_root_bytes=64 << 20,
        max_part_bytes=4 << 30,
        max_total_bytes=8 << 30,
        max_parts=100_000,
    )
    reader.feed(body)
    with reader.close() as message:
        envelope = etree.fromstring(message.root)
        payload = envelope.find(f"{{{SOAP12}}}Body")[0]  # type: ignore[index]
        parsed = parse_retrieve_response(payload)
        docs: dict[str, bytes] = {}
        types: dict[str, str] = {}
        for doc in parsed.documents:
            assert doc.content_id is not None, "imaging documents must be MTOM parts"
            part = message.attachments[doc.content_id]
            docs[doc.document_unique_id] = part.read_all()
            types[doc.document_unique_id] = part.content_type
    return Retrieved(status_code, parsed, docs, types, payload)


def post_retrieve(
    pki: DevPki,
    url: str,
    action: str,
    documents: Sequence[DocumentRequest],
    syntaxes: Sequence[str] = (EXPLICIT,),
    *,
    timeout: float = 60.0,
) -> Retrieved:
    """A RAD-69/RAD-75 request over MTOM with the consumer certificate; the answer parsed."""
    writer = mtom.MtomWriter(soap12(action, retrieve_body(documents, syntaxes)), action=action)
    with consumer(pki) as client:
        response = client.post(
            url,
            content=b"".join(writer.iter_bytes()),
            headers={"content-type": writer.content_type},
            timeout=timeout,
        )
    assert response.status_code == 200, response.text[:2000]
    return read_retrieve_reply(
        response.status_code, response.headers["content-type"], response.content
    )


def install(gateway: Gateway, key: str, action: str, name: str, handler: Handler) -> None:
    gateway.endpoints[key].add(Operation(action, name, handler))


def error_codes(retrieved: Retrieved) -> list[str]:
    return [e.error_code for e in retrieved.response.errors]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.1)
    return False


def require_binary(path: str) -> str:
    found = shutil.which(path) or (path if os.path.exists(path) else None)
    if found is None:
        pytest.skip(f"{path} is not installed (CI installs it)")
    return found


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


# ---------------------------------------------------------------------------- Orthanc


ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass
class OrthancProcess:
    process: subprocess.Popen[bytes]
    http_port: int
    dicom_port: int
    ae_title: str
    move_scp_port: int  # where Orthanc sends C-MOVE results for AE XCAGWMOVE
    workdir: Path

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def upload(self, files: Sequence[Path]) -> None:
        with httpx.Client(timeout=60) as client:
            for path in files:
                response = client.post(
                    f"http://127.0.0.1:{self.http_port}/instances", content=path.read_bytes()
                )
                response.raise_for_status()


def start_orthanc(workdir: Path) -> OrthancProcess:
    require_binary(ORTHANC)
    if not os.path.exists(DICOMWEB_PLUGIN):
        pytest.skip("orthanc-dicomweb is not installed (CI installs it)")
    http_port, dicom_port, move_port = free_port(), free_port(), free_port()
    storage = workdir / "orthanc-db"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "xca-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "HttpCompressionEnabled": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {"xcagw": ["XCAGWMOVE", "127.0.0.1", move_port]},
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowStore": True,
    }
    import json

    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("wb")
    process = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    if not (wait_port(http_port) and wait_port(dicom_port)):
        stop_process(process)
        raise RuntimeError(f"Orthanc did not start: {(workdir / 'orthanc.log').read_text()}")
    return OrthancProcess(process, http_port, dicom_port, "ORTHANC", move_port, workdir)


@contextlib.contextmanager
def orthanc(workdir: Path) -> Iterator[OrthancProcess]:
    process = start_orthanc(workdir)
    try:
        yield process
    finally:
        stop_process(process.process)


# ---------------------------------------------------------------------------- dcmqrscp


@dataclass
class DcmqrscpProcess:
    process: subprocess.Popen[bytes]
    port: int
    ae_title: str
    move_scp_port: int


@contextlib.contextmanager
def dcmqrscp(workdir: Path) -> Iterator[DcmqrscpProcess]:
    binary = dcmtk("dcmqrscp")
    port, move_port = free_port(), free_port()
    storage = workdir / "dcmqrscp-db"
    storage.mkdir(parents=True, exist_ok=True)
    config = workdir / "dcmqrscp.cfg"
    config.write_text(
        f"""NetworkTCPPort  = {port}
MaxPDUSize      = 65536
MaxAssociations = 16

HostTable BEGIN
xcagw = (XCAGWMOVE, 127.0.0.1, {move_port})
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
DCMQR   {storage}   RW   (500, 1024mb)   ANY
AETable END
"""
    )
    log = (workdir / "dcmqrscp.log").open("wb")
    process = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        if not wait_port(port):
            raise RuntimeError(f"dcmqrscp did not start: {(workdir / 'dcmqrscp.log').read_text()}")
        yield DcmqrscpProcess(process, port, "DCMQR", move_port)
    finally:
        stop_process(process)


def c_store(host: str, port: int, ae_title: str, files: Sequence[Path]) -> None:
    """Load instances into a PACS with C-STORE (as they are: same transfer syntax)."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(path) for path in files]
    ae = AE(ae_title="LOADER")
    pairs = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    for sop_class, syntax in sorted(pairs):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(host, port, ae_title=ae_title)
    assert assoc.is_established, "PACS refused the loader association"
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0, f"C-STORE failed: {status}"
    finally:
        assoc.release()


def pixel_data(data: bytes) -> bytes:
    """Native pixel bytes of a Part 10 instance, whatever its (supported) transfer syntax."""
    import io

    import pydicom
    from pydicom.pixels.decoders.base import get_decoder

    ds = pydicom.dcmread(io.BytesIO(data))
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if syntax == RLE:
        return bytes(get_decoder(UID(RLE)).as_buffer(ds)[0])
    return bytes(ds.PixelData)


__all__ = [
    "EXPLICIT",
    "IMPLICIT",
    "JPEG_BASELINE",
    "JPEG_LOSSLESS",
    "RLE",
    "DcmqrscpProcess",
    "OrthancProcess",
    "Retrieved",
    "c_store",
    "dcmqrscp",
    "documents_for",
    "error_codes",
    "free_port",
    "install",
    "make_big_study",
    "make_study",
    "orthanc",
    "pixel_data",
    "post_retrieve",
    "read_retrieve_reply",
    "retrieve_body",
    "stop_process",
]


def release_peer_pool(gateway: Gateway) -> None:
    """Close a gateway's idle outbound keep-alive connections (its peers then stop at once
    instead of waiting out their close grace period for them)."""
    import asyncio

    loop = gateway.https._server.get_loop() if gateway.https._server else None
    if loop is not None and loop.is_running():
        asyncio.run_coroutine_threadsafe(gateway.peer_client.aclose(), loop).result(10)


def releasing_peer_pools(
    gateway_factory: Callable[..., Gateway],
) -> Iterator[Callable[..., Gateway]]:
    """Body of an ``imaging_gateways`` fixture: ``gateway_factory`` whose gateways drop their
    peer connections before stopping (a module defines the fixture with ``yield from``)."""
    started: list[Gateway] = []

    def start(name: str = "alpha", **sections: object) -> Gateway:
        gateway = gateway_factory(name, **sections)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        release_peer_pool(gateway)
