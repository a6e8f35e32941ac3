"""CPU cost of the XML a relaying gateway parses and writes per instance (issue 22), no sockets.

An initiating imaging gateway relaying a retrieve of N instances handles four XML messages
whose size grows with N; each is measured here on its own, in microseconds per instance:

* ``request``: the consumer's RAD-69 request read element by element
  (``SoapService._parse_pruned`` with the gateway's ``RetrieveImagingRequestReader``, then the
  reader's ``finish``), as the RAD-69 endpoint reads it;
* ``forward``: the RAD-75 request to the peer written straight to bytes
  (``write_retrieve_imaging_request``);
* ``root``: the peer's reply root part (RetrieveDocumentSetResponse) parsed as it arrives and
  each DocumentResponse planned (``_RootReader`` fed in the pieces the MIME parser hands on,
  then closed and finished as ``_read_root`` does);
* ``response``: the gateway's own DocumentResponses written to bytes
  (``write_document_responses``).

Each figure is the median of ``--repeat`` runs (CPU time of this process).

    python benchmarks/xml_per_instance.py --instances 5000 --repeat 7
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

from pydicom.uid import generate_uid

from xca_gateway.imaging.remote import _RootReader
from xca_gateway.imaging.request import (
    IMAGING_REQUEST,
    DocumentRequest,
    RetrieveImagingDocumentSetRequest,
    RetrieveImagingRequestReader,
    retrieve_imaging_request_shell,
    write_retrieve_imaging_request,
)
from xca_gateway.imaging.response import (
    DocumentResponse,
    retrieve_response_shell,
    write_document_responses,
)
from xca_gateway.metrics import GatewayMetrics
from xca_gateway.protocol.namespaces import ResponseStatus
from xca_gateway.protocol.soap import build_envelope, serialize_around
from xca_gateway.protocol.soap_service import SoapService
from xca_gateway.protocol.xmlsafe import XmlLimits
from xca_gateway.settings import LimitsConfig

HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.201"
REPOSITORY = "1.3.6.1.4.1.21367.13.80.110"
SYNTAX = "1.2.840.10008.1.2.1"
T = TypeVar("T")
# What the MIME parser hands on of a root part at a time (a relay client's read).
PIECE = 256 * 1024


def study(count: int) -> list[DocumentRequest]:
    """``count`` instances of one study and series, UIDs as the imaging benchmark makes them."""
    study_uid, series_uid = str(generate_uid()), str(generate_uid())
    return [
        DocumentRequest(study_uid, series_uid, REPOSITORY, str(generate_uid()), HOME)
        for _ in range(count)
    ]


def request_envelope(docs: list[DocumentRequest]) -> bytes:
    """The consumer's RAD-69 request (SOAP 1.2 envelope) for ``docs``."""
    shell = retrieve_imaging_request_shell()
    envelope = build_envelope(shell, action="urn:ihe:rad:2009:RetrieveImagingDocumentSet", to="x")
    head, tail = serialize_around(envelope, shell)
    request = RetrieveImagingDocumentSetRequest(tuple(docs), (SYNTAX,))
    return b"".join(itertools.chain((head,), write_retrieve_imaging_request(request), (tail,)))


def responses(docs: list[DocumentRequest]) -> list[DocumentResponse]:
    return [
        DocumentResponse(
            HOME, d.repository_unique_id, d.document_unique_id, "application/dicom", f"{i}@peer"
        )
        for i, d in enumerate(docs)
    ]


def reply_root(docs: list[DocumentRequest]) -> bytes:
    """The peer's RAD-75 reply root part: a RetrieveDocumentSetResponse answering ``docs``."""
    shell = retrieve_response_shell(ResponseStatus.SUCCESS, [])
    envelope = build_envelope(shell, action="urn:ihe:rad:2009:RetrieveImagingDocumentSetResponse")
    head, tail = serialize_around(envelope, shell)
    return b"".join([head, *write_document_responses(responses(docs)), tail])


def parse_request(service: SoapService, data: bytes) -> int:
    reader = RetrieveImagingRequestReader()
    envelope = asyncio.run(service._parse_pruned(data, IMAGING_REQUEST, reader))
    payload = envelope[-1][0]
    request = reader.finish(payload)
    assert isinstance(request, RetrieveImagingDocumentSetRequest)
    return len(request.documents)


def forward_request(docs: list[DocumentRequest]) -> list[bytes]:
    request = RetrieveImagingDocumentSetRequest(tuple(docs), (SYNTAX,))
    return list(write_retrieve_imaging_request(request))


async def _read_root(data: bytes, docs: list[DocumentRequest]) -> int:
    root = _RootReader(XmlLimits(), docs)
    view = memoryview(data)
    for start in range(0, len(data), PIECE):
        await root.feed(view[start : start + PIECE])  # type: ignore[arg-type]
    envelope = root.parser.close()
    root.reader.finish(envelope[-1][0])
    return len(root.planner.planned)


def read_root(data: bytes, docs: list[DocumentRequest]) -> int:
    return asyncio.run(_read_root(data, docs))


def write_responses(docs: list[DocumentResponse]) -> list[bytes]:
    return list(write_document_responses(docs))


def per_instance(
    run: Callable[[], T], count: int, repeat: int, handled: Callable[[T], int]
) -> float:
    """Median CPU microseconds per instance of ``run``, which must handle ``count`` instances
    (``handled`` says how many it did, outside the measurement)."""
    costs = []
    for _ in range(repeat):
        cpu = time.process_time()
        result = run()
        costs.append((time.process_time() - cpu) / count * 1e6)
        assert handled(result) == count, (handled(result), count)
    return statistics.median(costs)


def _written(tag: bytes) -> Callable[[list[bytes]], int]:
    return lambda chunks: sum(chunk.count(tag) for chunk in chunks)


def measure(count: int, repeat: int) -> dict[str, float]:
    """Microseconds per instance of each XML step, for a retrieve of ``count`` instances."""
    docs = study(count)
    request = request_envelope(docs)
    root = reply_root(docs)
    answers = responses(docs)
    service = SoapService([], LimitsConfig(), GatewayMetrics())
    gc.collect()
    gc.freeze()  # as xca-gateway serve does: collections do not walk what was set up
    same = int
    return {
        "request": per_instance(lambda: parse_request(service, request), count, repeat, same),
        "forward": per_instance(
            lambda: forward_request(docs), count, repeat, _written(b"<iherad:DocumentRequest>")
        ),
        "root": per_instance(lambda: read_root(root, docs), count, repeat, same),
        "response": per_instance(
            lambda: write_responses(answers), count, repeat, _written(b"<xdsb:DocumentResponse>")
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    costs = measure(args.instances, args.repeat)
    figures = ", ".join(f"{name} {us:.2f}" for name, us in costs.items())
    print(
        f"XML per instance ({args.instances} instances, median of {args.repeat}): {figures}; "
        f"total {sum(costs.values()):.2f} us"
    )


if __name__ == "__main__":
    main()
