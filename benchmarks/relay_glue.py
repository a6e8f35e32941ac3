"""CPU cost of a relaying gateway's Python glue, without sockets or TLS.

A peer's RAD-75 reply (multipart/related: root part, then ``--instances`` DICOM parts) is held
in memory and handed to :class:`RemoteRetrieval` in 256 KiB reads, as the relay client hands
on what the socket delivered; the gateway's own streamed RAD-69 response (``respond`` ->
``SoapService`` -> ``MtomWriter``) is then pulled to its end like ``HttpServer._stream_body``
does, and thrown away. What this measures is everything between "bytes arrived from the
peer" and "bytes handed to the HTTP server's transport": the MIME parse of the reply, the
per-instance bookkeeping (idle timeout, audit sniffer, part heads, generators) and the
per-piece layers. ``--parse-only`` runs the MIME parse alone, for the difference.

    python benchmarks/relay_glue.py --instances 1000 --size 512K --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
import uuid
from collections.abc import AsyncIterator

from imaging_bench import bench_instance, pixel_side
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from xca_gateway.imaging.remote import RemoteRetrieval
from xca_gateway.imaging.request import DocumentRequest, RetrieveImagingDocumentSetRequest
from xca_gateway.imaging.retrieve import Route, respond
from xca_gateway.imaging.sources import PlannedInstance
from xca_gateway.metrics import GatewayMetrics
from xca_gateway.protocol.http_client import ReadPieces
from xca_gateway.protocol.multipart import MultipartStream
from xca_gateway.protocol.soap_service import SoapService
from xca_gateway.settings import LimitsConfig
from xca_gateway.xds.ebrs import RegistryError

READ = 256 * 1024
ACTION = "urn:ihe:rad:2009:RetrieveImagingDocumentSetResponse"


def instance_bytes(study: str, series: str, sop: str, size: int) -> bytes:
    """The imaging benchmark's instance (about ``size`` bytes of pixels), as Part 10 bytes."""
    out = DicomBytesIO()
    dcmwrite(out, bench_instance(study, series, sop, 1, pixel_side(size)), enforce_file_format=True)
    return out.getvalue()


def reply(count: int, size: int) -> tuple[bytes, str, list[DocumentRequest]]:
    """A peer's multipart reply (root part first) and the DocumentRequests it answers."""
    study, series = str(generate_uid()), str(generate_uid())
    boundary = "MIMEBoundary_" + uuid.uuid4().hex
    docs, pieces = [], [f"--{boundary}\r\nContent-ID: <root>\r\n\r\n<root/>".encode()]
    body = instance_bytes(study, series, "1.2.3", size)
    for index in range(count):
        sop = f"1.2.826.0.1.{index + 1}"
        docs.append(DocumentRequest(study, series, "1.3.6.1.4.1.21367.13.80.110", sop, None))
        head = f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n"
        head += f"Content-ID: <{index}@peer>\r\n\r\n"
        pieces += [head.encode(), body]
    pieces.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(pieces), boundary, docs


async def reads(data: bytes) -> AsyncIterator[ReadPieces]:
    """``data`` as the relay client hands a body on: a read per READ bytes, as spans."""
    for start in range(0, len(data), READ):
        yield ReadPieces([(data, start, min(start + READ, len(data)))])


class Reply:
    async def aclose(self) -> None:
        pass


async def relay_once(data: bytes, boundary: str, docs: list[DocumentRequest]) -> int:
    parts = MultipartStream(reads(data), boundary, max_parts=len(docs) + 8)
    await parts.next_part()
    await parts.read_part(1 << 20)
    planned = [PlannedInstance(d, handle=f"{i}@peer") for i, d in enumerate(docs)]
    retrieval = RemoteRetrieval(
        planned,
        [],
        response=Reply(),  # type: ignore[arg-type]
        parts=parts,
        what="peer",
        max_part_bytes=1 << 32,
        max_reorder_bytes=1 << 26,
    )

    async def open_(_request: RetrieveImagingDocumentSetRequest) -> RemoteRetrieval:
        return retrieval

    def unavailable(reason: str, count: int) -> RegistryError:
        return RegistryError("XDSRepositoryError", reason)

    request = RetrieveImagingDocumentSetRequest(tuple(docs), (str(ExplicitVRLittleEndian),))
    route = Route("peer", open_, unavailable)
    result = await respond(request, [(route, docs)], [], response_action=ACTION, context={})
    service = SoapService([], LimitsConfig(), GatewayMetrics())
    # No observers: the SoapRequest is not looked at.
    response = service._respond(result, None, "RAD-69", time.monotonic(), {}, None)  # type: ignore[arg-type]
    sent = 0
    body = response.body
    assert not isinstance(body, bytes)
    async for chunk in body:
        sent += len(chunk)
    return sent


async def parse_once(data: bytes, boundary: str, docs: list[DocumentRequest]) -> int:
    parts = MultipartStream(reads(data), boundary, max_parts=len(docs) + 8)
    seen = 0
    while not parts.finished:
        event = await parts.next_event()
        seen += len(getattr(event, "data", b""))
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--size", default="512K", help="pixel data bytes per instance (K/M)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--parse-only", action="store_true")
    args = parser.parse_args()
    size = int(args.size.rstrip("KM")) * {"K": 1024, "M": 1 << 20}.get(args.size[-1], 1)
    data, boundary, docs = reply(args.instances, size)
    run = parse_once if args.parse_only else relay_once
    gc.freeze()
    costs = []
    for _ in range(args.repeat):
        cpu = time.process_time()
        sent = asyncio.run(run(data, boundary, docs))
        costs.append((time.process_time() - cpu) / (len(data) / 1e9))
    what = "MIME parse only" if args.parse_only else "relay glue"
    print(
        f"{what}: {args.instances} x {args.size}, {len(data) / 1e6:.0f} MB, {sent / 1e6:.0f} MB "
        f"out: CPU s/GB median {statistics.median(costs):.3f} "
        f"(min {min(costs):.3f}, max {max(costs):.3f})"
    )


if __name__ == "__main__":
    main()
