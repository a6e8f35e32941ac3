"""MTOM/XOP through the real server: requests in, responses out, and hostile multipart."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from lxml import etree

from tests.conftest import make_config
from tests.test_server import consumer, fault_of, soap12
from xca_gateway.app import diagnostics
from xca_gateway.app.gateway import Gateway
from xca_gateway.protocol import mtom
from xca_gateway.protocol.namespaces import RS, SOAP12, XDSB, XOP, Action, ResponseStatus
from xca_gateway.protocol.soap import build_envelope, serialize
from xca_gateway.protocol.soap_service import Operation, SoapEndpoint, SoapRequest, SoapResponse
from xca_gateway.security.dev_pki import DevPki


def echo_request(documents: int) -> bytes:
    payload = etree.Element(f"{{{diagnostics.NS}}}Echo", nsmap={"diag": diagnostics.NS, "xop": XOP})
    for i in range(documents):
        doc = etree.SubElement(payload, f"{{{diagnostics.NS}}}Document")
        etree.SubElement(doc, f"{{{XOP}}}Include").set("href", f"cid:doc{i}@test")
    return serialize(build_envelope(payload, action=diagnostics.ECHO_ACTION))


def read_mtom(response: httpx.Response) -> mtom.MtomMessage:
    reader = mtom.MtomRequestReader(
        response.headers["content-type"],
        max_root_bytes=1 << 20,
        max_part_bytes=1 << 30,
        max_total_bytes=1 << 30,
        max_parts=100,
    )
    reader.feed(response.content)
    return reader.close()


def test_mtom_echo_round_trip(gateway_factory: Callable[..., Gateway], pki: DevPki) -> None:
    gateway = gateway_factory("alpha", diagnostics={"echo": True})
    blobs = [os.urandom(5 * 1024 * 1024), b"--MIMEBoundary_x\r\n\r\n" * 100, b""]
    writer = mtom.MtomWriter(echo_request(len(blobs)), action=diagnostics.ECHO_ACTION)
    for i, blob in enumerate(blobs):
        writer.add_part(mtom.OutgoingPart(f"doc{i}@test", "application/dicom", blob))
    with consumer(pki) as client:
        response = client.post(
            gateway.endpoint_urls()["echo"],
            content=writer.iter_bytes(),
            headers={"content-type": writer.content_type},
        )
    assert response.status_code == 200, response.text[:500]
    assert mtom.is_mtom(response.headers["content-type"])
    with read_mtom(response) as message:
        root = etree.fromstring(message.root)
        hrefs = [i.get("href") or "" for i in root.iter(f"{{{XOP}}}Include")]
        assert len(hrefs) == len(blobs)
        echoed = [message.attachments[mtom.cid_from_href(h)].read_all() for h in hrefs]
        assert echoed == blobs
        types = {message.attachments[mtom.cid_from_href(h)].content_type for h in hrefs}
        assert types == {"application/dicom"}


def test_retrieve_answers_are_mtom_even_without_documents(gateway: Gateway, pki: DevPki) -> None:
    request = f"""<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{XDSB}"><xdsb:DocumentRequest>
      <xdsb:HomeCommunityId>{gateway.config.community.home_community_id}</xdsb:HomeCommunityId>
      <xdsb:RepositoryUniqueId>1.2.3</xdsb:RepositoryUniqueId>
      <xdsb:DocumentUniqueId>1.2.3.4</xdsb:DocumentUniqueId>
    </xdsb:DocumentRequest></xdsb:RetrieveDocumentSetRequest>"""
    # The request itself arrives as MTOM, as IHE retrieve clients send it.
    writer = mtom.MtomWriter(soap12(Action.ITI39, request), action=Action.ITI39)
    with consumer(pki) as client:
        response = client.post(
            gateway.endpoint_urls()["iti39"],
            content=b"".join(writer.iter_bytes()),
            headers={"content-type": writer.content_type},
        )
    assert response.status_code == 200
    _, params = mtom.parse_content_type(response.headers["content-type"])
    assert params["type"] == "application/xop+xml"
    assert Action.ITI39_RESPONSE in params["start-info"]
    with read_mtom(response) as message:
        root = etree.fromstring(message.root)
    status = root.find(
        f"{{{SOAP12}}}Body/{{{XDSB}}}RetrieveDocumentSetResponse/{{{RS}}}RegistryResponse"
    )
    assert status is not None and status.get("status") == ResponseStatus.FAILURE
    error = status.find(f"{{{RS}}}RegistryErrorList/{{{RS}}}RegistryError")
    assert error is not None and error.get("errorCode") == "XDSRepositoryError"


def _post_raw(gateway: Gateway, pki: DevPki, body: bytes, content_type: str) -> httpx.Response:
    with consumer(pki) as client:
        return client.post(
            gateway.endpoint_urls()["echo"], content=body, headers={"content-type": content_type}
        )


def test_xop_include_to_a_missing_part(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", diagnostics={"echo": True})
    writer = mtom.MtomWriter(echo_request(2), action=diagnostics.ECHO_ACTION)
    writer.add_part(mtom.OutgoingPart("doc0@test", "application/dicom", b"x"))
    response = _post_raw(gateway, pki, b"".join(writer.iter_bytes()), writer.content_type)
    assert response.status_code == 400
    code, _, reason = fault_of(response)
    assert code.endswith(":Sender") and "missing MIME part" in reason


def test_hostile_multipart(gateway_factory: Callable[..., Gateway], pki: DevPki) -> None:
    gateway = gateway_factory("alpha", diagnostics={"echo": True}, limits={"max_mime_parts": 100})
    writer = mtom.MtomWriter(echo_request(1), action=diagnostics.ECHO_ACTION)
    writer.add_part(mtom.OutgoingPart("doc0@test", "application/dicom", b"x" * 1000))
    good = b"".join(writer.iter_bytes())
    ct = writer.content_type
    boundary = mtom.parse_content_type(ct)[1]["boundary"].encode()

    unterminated = good[: good.rfind(b"--" + boundary)]
    missing_boundary = "; ".join(p for p in ct.split("; ") if not p.startswith("boundary="))
    many = bytearray(good[: good.rfind(b"--" + boundary)])
    for i in range(10_000):
        many += b"--" + boundary + f"\r\nContent-ID: <p{i}@x>\r\n\r\nx\r\n".encode()
    many += b"--" + boundary + b"--\r\n"
    wrong_start = ct.replace("start=", 'start="<nope@x>"; x-old-start=')

    cases = {
        "unterminated": (unterminated, ct),
        "missing boundary": (good, missing_boundary),
        "10,000 parts": (bytes(many), ct),
        "wrong start": (good, wrong_start),
    }
    for name, (body, content_type) in cases.items():
        response = _post_raw(gateway, pki, body, content_type)
        assert response.status_code in (400, 413), name
        code, _, reason = fault_of(response)
        assert code.endswith(":Sender"), name
        assert "MTOM" in reason, (name, reason)


def test_config_limits_reach_the_mtom_reader(pki: DevPki, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = make_config(pki, tmp_path, limits={"max_mime_parts": 7, "spool_threshold": 1234})
    assert config.limits.max_mime_parts == 7
    assert config.limits.spool_threshold == 1234


def test_a_producer_failing_mid_stream_aborts_the_response(gateway: Gateway, pki: DevPki) -> None:
    """A truncated MTOM response must never look complete (e.g. a source dying mid-study)."""

    async def dying_source() -> AsyncIterator[bytes]:
        yield b"x" * 100_000
        raise RuntimeError("imaging source died")

    async def handler(request: SoapRequest) -> SoapResponse:
        payload = etree.Element("{urn:test}R")
        return SoapResponse(
            payload,
            "urn:test:R",
            parts=[mtom.OutgoingPart("a@t", "application/dicom", dying_source())],
        )

    endpoint = SoapEndpoint("/test/dying", "dying", {}, door="diagnostics")
    endpoint.add(Operation("urn:test:Q", "TEST", handler))
    gateway.soap.endpoints[endpoint.path] = endpoint
    url = gateway.base_url + endpoint.path
    with consumer(pki) as client:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.post(
                url,
                content=soap12("urn:test:Q", "<q/>"),
                headers={"content-type": "application/soap+xml"},
            )
        # The gateway keeps serving.
        ok = client.post(
            gateway.endpoint_urls()["iti38"],
            content=soap12(Action.ITI38, "<x/>"),
            headers={"content-type": "application/soap+xml"},
        )
        assert ok.status_code == 200
