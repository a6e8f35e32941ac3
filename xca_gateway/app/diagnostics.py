"""A diagnostic echo operation, for MTOM throughput and memory benchmarks.

It returns every attachment of the request as an MTOM attachment of the response, streamed
from the spool files. Enabled only by ``[diagnostics] echo = true``; never on a live node.
"""

from __future__ import annotations

from lxml import etree

from xca_gateway.protocol import mtom
from xca_gateway.protocol.namespaces import XOP
from xca_gateway.protocol.soap import element_content
from xca_gateway.protocol.soap_service import Operation, SoapEndpoint, SoapRequest, SoapResponse

NS = "urn:xca-gateway:diagnostics"
ECHO_ACTION = "urn:xca-gateway:diagnostics:Echo"
ECHO_RESPONSE_ACTION = "urn:xca-gateway:diagnostics:EchoResponse"
PATH = "/diagnostics/echo"


async def echo(request: SoapRequest) -> SoapResponse:
    response = etree.Element(f"{{{NS}}}EchoResponse", nsmap={"diag": NS, "xop": XOP})
    parts: list[mtom.OutgoingPart] = []
    for document in request.payload.iter(f"{{{NS}}}Document"):
        content = element_content(document, request.attachments)
        cid = mtom.make_content_id()
        if isinstance(content, bytes):
            parts.append(mtom.OutgoingPart(cid, "application/octet-stream", content))
        else:
            attachment = request.attachments[content.content_id]
            # Streamed from the spool file: the attachment is never read whole into memory.
            parts.append(mtom.OutgoingPart(cid, attachment.content_type, attachment.iter_chunks()))
        out = etree.SubElement(response, f"{{{NS}}}Document")
        etree.SubElement(out, f"{{{XOP}}}Include").set("href", f"cid:{cid}")
    return SoapResponse(response, ECHO_RESPONSE_ACTION, parts=parts, mtom=True)


def echo_endpoint() -> SoapEndpoint:
    endpoint = SoapEndpoint(path=PATH, name="echo", operations={})
    endpoint.add(Operation(ECHO_ACTION, "diagnostics-echo", echo))
    return endpoint
