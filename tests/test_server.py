"""The gateway's SOAP server over real mutual-TLS sockets on loopback."""

from __future__ import annotations

import socket
import ssl
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from lxml import etree

from tests.conftest import wait_for
from xca_gateway.app.gateway import Gateway
from xca_gateway.protocol.namespaces import (
    QUERY,
    RIM,
    RS,
    SOAP11,
    SOAP12,
    WSA,
    Action,
    ResponseStatus,
)
from xca_gateway.protocol.tls import client_context
from xca_gateway.protocol.wsdl import zeep_service
from xca_gateway.security.dev_pki import DevPki

FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"


def soap12(action: str, body: str, message_id: str | None = None) -> bytes:
    message_id = message_id or f"urn:uuid:{uuid.uuid4()}"
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<s:Envelope xmlns:s="{SOAP12}" xmlns:a="{WSA}">
  <s:Header>
    <a:Action s:mustUnderstand="1">{action}</a:Action>
    <a:MessageID>{message_id}</a:MessageID>
    <a:ReplyTo><a:Address>http://www.w3.org/2005/08/addressing/anonymous</a:Address></a:ReplyTo>
  </s:Header>
  <s:Body>{body}</s:Body>
</s:Envelope>""".encode()


ADHOC_QUERY = f"""<query:AdhocQueryRequest xmlns:query="{QUERY}" xmlns:rim="{RIM}">
  <query:ResponseOption returnType="LeafClass" returnComposedObjects="true"/>
  <rim:AdhocQuery id="{FIND_DOCUMENTS}">
    <rim:Slot name="$XDSDocumentEntryPatientId">
      <rim:ValueList><rim:Value>'C01-1001^^^&amp;1.3.6.1.4.1.21367.13.20.1000&amp;ISO'</rim:Value></rim:ValueList>
    </rim:Slot>
    <rim:Slot name="$XDSDocumentEntryStatus">
      <rim:ValueList><rim:Value>('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')</rim:Value></rim:ValueList>
    </rim:Slot>
  </rim:AdhocQuery>
</query:AdhocQueryRequest>"""


def consumer(pki: DevPki, **kw: object) -> httpx.Client:
    ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
    return httpx.Client(verify=ctx, timeout=10.0, **kw)  # type: ignore[arg-type]


def post(client: httpx.Client, url: str, body: bytes, action: str | None = None) -> httpx.Response:
    ct = "application/soap+xml; charset=UTF-8"
    if action:
        ct += f'; action="{action}"'
    return client.post(url, content=body, headers={"content-type": ct})


def fault_of(response: httpx.Response) -> tuple[str, list[str], str]:
    root = etree.fromstring(response.content)
    fault = root.find(f"{{{SOAP12}}}Body/{{{SOAP12}}}Fault")
    assert fault is not None, response.text
    code = fault.findtext(f"{{{SOAP12}}}Code/{{{SOAP12}}}Value") or ""
    subs = [v.text or "" for v in fault.iterfind(f".//{{{SOAP12}}}Subcode/{{{SOAP12}}}Value")]
    reason = fault.findtext(f"{{{SOAP12}}}Reason/{{{SOAP12}}}Text") or ""
    return code, subs, reason


# ------------------------------------------------------------------------ answered requests


def test_consumer_certificate_is_answered_with_ws_addressing(gateway: Gateway, pki: DevPki) -> None:
    url = gateway.endpoint_urls()["iti38"]
    message_id = f"urn:uuid:{uuid.uuid4()}"
    with consumer(pki) as client:
        response = post(client, url, soap12(Action.ITI38, ADHOC_QUERY, message_id), Action.ITI38)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/soap+xml")
    root = etree.fromstring(response.content)
    header = root.find(f"{{{SOAP12}}}Header")
    assert header is not None
    assert header.findtext(f"{{{WSA}}}Action") == Action.ITI38_RESPONSE
    assert header.findtext(f"{{{WSA}}}RelatesTo") == message_id
    assert (header.findtext(f"{{{WSA}}}MessageID") or "").startswith("urn:uuid:")
    payload = root.find(f"{{{SOAP12}}}Body/{{{QUERY}}}AdhocQueryResponse")
    assert payload is not None
    # Answered by the (empty) embedded registry: Success, no objects.
    assert payload.get("status") == ResponseStatus.SUCCESS
    assert payload.find(f"{{{RS}}}RegistryErrorList") is None
    # A query for another community is a standards-shaped Failure located at us.
    other = ADHOC_QUERY.replace("<rim:AdhocQuery ", '<rim:AdhocQuery home="urn:oid:1.2.3.999" ')
    with consumer(pki) as client:
        response = post(client, url, soap12(Action.ITI38, other), Action.ITI38)
    payload = etree.fromstring(response.content).find(
        f"{{{SOAP12}}}Body/{{{QUERY}}}AdhocQueryResponse"
    )
    assert payload is not None and payload.get("status") == ResponseStatus.FAILURE
    error = payload.find(f"{{{RS}}}RegistryErrorList/{{{RS}}}RegistryError")
    assert error is not None
    assert error.get("errorCode") == "XDSUnknownCommunity"
    assert error.get("location") == gateway.config.community.home_community_id


def test_the_handler_sees_the_verified_peer_certificate(gateway: Gateway, pki: DevPki) -> None:
    seen = []
    endpoint = gateway.endpoints["iti38"]
    original = endpoint.operations[Action.ITI38]

    async def spy(request):  # type: ignore[no-untyped-def]
        seen.append(request.peer)
        return await original.handler(request)

    endpoint.operations[Action.ITI38] = type(original)(original.action, original.transaction, spy)
    with consumer(pki) as client:
        post(client, gateway.endpoint_urls()["iti38"], soap12(Action.ITI38, ADHOC_QUERY))
    assert len(seen) == 1
    peer = seen[0]
    assert peer.address == "127.0.0.1"
    assert peer.certificate is not None
    assert "urn:xca-gateway:client:consumer" in peer.certificate.san_uri
    assert peer.tls_version in ("TLSv1.2", "TLSv1.3")

    expected = x509.load_pem_x509_certificate(pki.client.cert.read_bytes())
    assert peer.certificate.fingerprint_sha256 == expected.fingerprint(hashes.SHA256()).hex()


def test_zeep_client_from_the_ihe_wsdl_is_answered(gateway: Gateway, pki: DevPki) -> None:
    from zeep.transports import Transport

    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would replace our CA
    session.cert = (str(pki.client.cert), str(pki.client.key))
    session.verify = str(pki.ca)
    for key in ("iti38", "iti18"):
        service = zeep_service(
            key, gateway.endpoint_urls()[key], transport=Transport(session=session)
        )
        operation = (
            "RespondingGateway_CrossGatewayQuery"
            if key == "iti38"
            else ("DocumentRegistry_RegistryStoredQuery")
        )
        result = getattr(service, operation)(
            ResponseOption={"returnType": "LeafClass", "returnComposedObjects": True},
            AdhocQuery={
                "id": FIND_DOCUMENTS,
                "Slot": [
                    {
                        "name": "$XDSDocumentEntryPatientId",
                        "ValueList": {
                            "_value_1": [
                                {"Value": "'C01-1001^^^&1.3.6.1.4.1.21367.13.20.1000&ISO'"}
                            ]
                        },
                    }
                ],
            },
        )
        # FindDocuments needs $XDSDocumentEntryStatus too: the registry says so, through
        # the responding side (ITI-38) and through the initiating side's local query (ITI-18).
        assert result.status == ResponseStatus.FAILURE
        codes = [e.errorCode for e in result.RegistryErrorList.RegistryError]
        assert codes == ["XDSStoredQueryMissingParam"]


def test_keep_alive_serves_several_requests_on_one_connection(
    gateway: Gateway, pki: DevPki
) -> None:
    url = gateway.endpoint_urls()["iti38"]
    with consumer(pki) as client:
        for _ in range(3):
            assert post(client, url, soap12(Action.ITI38, ADHOC_QUERY)).status_code == 200
    assert gateway.https.active_connections <= 1


# ------------------------------------------------------------------------ refused handshakes


def _handshake(port: int, ctx: ssl.SSLContext) -> None:
    """Handshake, then read: with TLS 1.3 a refused client certificate surfaces on the read."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        if not tls.recv(1024):
            raise ConnectionError("closed by the server")


@pytest.mark.parametrize(
    ("who", "reason_part"),
    [
        ("none", "no certificate"),
        ("untrusted", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
        ("tls11", "protocol version"),
    ],
)
def test_refused_handshakes_are_reported_to_the_application(
    gateway: Gateway, pki: DevPki, who: str, reason_part: str
) -> None:
    if who == "none":
        ctx = client_context(pki.ca)
    elif who == "untrusted":
        ctx = client_context(pki.ca, pki.untrusted_client.cert, pki.untrusted_client.key)
    elif who == "expired":
        ctx = client_context(pki.ca, pki.expired_client.cert, pki.expired_client.key)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(pki.ca))
        ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _handshake(gateway.https.port, ctx)
    assert wait_for(lambda: len(gateway.handshake_failures) == 1)
    failure = gateway.handshake_failures[0]
    assert failure.address == "127.0.0.1"
    assert reason_part in failure.reason
    # Who tried: the refused certificate itself is reported when the peer sent one.
    expected = {"untrusted": pki.untrusted_client, "expired": pki.expired_client}.get(who)
    if expected is None:
        assert failure.certificate_der is None
    else:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(expected.cert.read_bytes())
        assert failure.certificate_der == cert.public_bytes(Encoding.DER)
        assert failure.certificate_subject == cert.subject.rfc4514_string()
    metrics = httpx.get(gateway.admin_url + "/metrics").text
    assert "xca_gateway_tls_handshake_failures_total{" in metrics


def test_slow_handshake_times_out_and_is_reported(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory("alpha", tls={"handshake_timeout": 0.5})
    with socket.create_connection(("127.0.0.1", gateway.https.port), timeout=5) as raw:
        raw.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        assert wait_for(lambda: len(gateway.handshake_failures) == 1)
        assert raw.recv(10) == b""  # the server closed the connection
    assert "timed out" in gateway.handshake_failures[0].reason


# ------------------------------------------------------------------------ faults


def test_soap11_envelope_gets_a_soap11_version_mismatch(gateway: Gateway, pki: DevPki) -> None:
    body = f"""<SOAP-ENV:Envelope xmlns:SOAP-ENV="{SOAP11}"><SOAP-ENV:Body>{ADHOC_QUERY}
    </SOAP-ENV:Body></SOAP-ENV:Envelope>""".encode()
    with consumer(pki) as client:
        response = client.post(
            gateway.endpoint_urls()["iti38"],
            content=body,
            headers={"content-type": "text/xml; charset=utf-8", "SOAPAction": Action.ITI38},
        )
    assert response.status_code == 500
    root = etree.fromstring(response.content)
    assert root.tag == f"{{{SOAP11}}}Envelope"
    assert root.findtext(f".//{{{SOAP11}}}Fault/faultcode") == "SOAP-ENV:VersionMismatch"
    upgrade = root.find(f"{{{SOAP11}}}Header/{{{SOAP12}}}Upgrade/{{{SOAP12}}}SupportedEnvelope")
    assert upgrade is not None and upgrade.get("qname", "").endswith(":Envelope")


def test_unknown_action_gets_action_not_supported(gateway: Gateway, pki: DevPki) -> None:
    with consumer(pki) as client:
        response = post(
            client, gateway.endpoint_urls()["iti38"], soap12("urn:example:Nope", ADHOC_QUERY)
        )
    assert response.status_code == 400
    code, subcodes, _ = fault_of(response)
    assert code.endswith(":Sender")
    assert subcodes and subcodes[0].endswith(":ActionNotSupported")
    root = etree.fromstring(response.content)
    assert root.findtext(f".//{{{WSA}}}ProblemAction/{{{WSA}}}Action") == "urn:example:Nope"
    assert root.findtext(f"{{{SOAP12}}}Header/{{{WSA}}}Action") == (
        "http://www.w3.org/2005/08/addressing/fault"
    )


def test_action_of_another_transaction_is_not_supported_at_an_endpoint(
    gateway: Gateway, pki: DevPki
) -> None:
    with consumer(pki) as client:
        response = post(client, gateway.endpoint_urls()["iti39"], soap12(Action.ITI38, ADHOC_QUERY))
    assert response.status_code == 400
    assert fault_of(response)[1][0].endswith(":ActionNotSupported")


def test_missing_action_and_mismatched_action(gateway: Gateway, pki: DevPki) -> None:
    no_header = f'<s:Envelope xmlns:s="{SOAP12}"><s:Body>{ADHOC_QUERY}</s:Body></s:Envelope>'
    with consumer(pki) as client:
        url = gateway.endpoint_urls()["iti38"]
        r1 = post(client, url, no_header.encode())
        r2 = post(client, url, soap12(Action.ITI38, ADHOC_QUERY), action=Action.ITI18)
    assert fault_of(r1)[1][0].endswith(":MessageAddressingHeaderRequired")
    assert fault_of(r2)[1][0].endswith(":ActionMismatch")


def test_unknown_must_understand_header_gets_must_understand_fault(
    gateway: Gateway, pki: DevPki
) -> None:
    body = soap12(Action.ITI38, ADHOC_QUERY).replace(
        b"</s:Header>", b'<x:Secret xmlns:x="urn:example" s:mustUnderstand="true"/></s:Header>'
    )
    with consumer(pki) as client:
        response = post(client, gateway.endpoint_urls()["iti38"], body)
    assert response.status_code == 500
    assert fault_of(response)[0].endswith(":MustUnderstand")


@pytest.mark.parametrize(
    "body",
    [
        # XXE: external entity reading a local file
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>&x;</s:Body></s:Envelope>',
        # billion laughs
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + b"".join(
            f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'.encode()
            for i in range(1, 10)
        )
        + b"]><lolz>&lol9;</lolz>",
        # a DTD hidden after a comment
        b"<!-- hello --><!DOCTYPE s [<!ENTITY e 'x'>]><s>&e;</s>",
    ],
    ids=["xxe", "billion-laughs", "dtd-after-comment"],
)
def test_dtd_and_entities_are_refused_cheaply(gateway: Gateway, pki: DevPki, body: bytes) -> None:
    with consumer(pki) as client:
        response = post(client, gateway.endpoint_urls()["iti38"], body)
    assert response.status_code == 400
    code, _, reason = fault_of(response)
    assert code.endswith(":Sender")
    assert "DTD" in reason
    assert b"root:" not in response.content  # nothing of /etc/passwd came back


def test_undeclared_entity_malformed_xml_and_deep_nesting_are_sender_faults(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", limits={"max_xml_depth": 30})
    url = gateway.endpoint_urls()["iti38"]
    deep = "<a>" * 50 + "</a>" * 50
    with consumer(pki) as client:
        bad_entity = post(client, url, soap12(Action.ITI38, "<x>&undefined;</x>"))
        malformed = post(client, url, b"<s:Envelope xmlns:s='x'><unclosed>")
        nested = post(client, url, soap12(Action.ITI38, deep))
        not_utf8 = post(
            client, url, soap12(Action.ITI38, "<x>caf\xe9</x>").replace(b"\xc3\xa9", b"\xe9")
        )
    for response in (bad_entity, malformed, nested, not_utf8):
        assert response.status_code == 400, response.text
        assert fault_of(response)[0].endswith(":Sender")
    assert "deeper than 30" in fault_of(nested)[2]


def test_non_soap_xml_gets_version_mismatch(gateway: Gateway, pki: DevPki) -> None:
    with consumer(pki) as client:
        response = post(client, gateway.endpoint_urls()["iti38"], b"<hello/>")
    assert response.status_code == 500
    assert fault_of(response)[0].endswith(":VersionMismatch")


def test_oversize_body_is_refused_before_it_is_read(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", limits={"max_request_bytes": 10 * 1024 * 1024})
    ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
    one_gb = 1024 * 1024 * 1024
    # Only 64 KiB of the announced 1 GiB are ever sent: an answer proves the server decided
    # from the headers instead of waiting for the body (the socket timeout bounds the wait).
    raw = socket.create_connection(("127.0.0.1", gateway.https.port), timeout=10)
    with raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(
            (
                "POST /xca/iti38 HTTP/1.1\r\nHost: localhost\r\n"
                "Content-Type: application/soap+xml; charset=UTF-8\r\n"
                f"Content-Length: {one_gb}\r\n\r\n"
            ).encode()
            + b"<" * 65536
        )
        response = b""
        while not response.rstrip().endswith(b"Envelope>"):
            chunk = tls.recv(65536)
            if not chunk:
                break
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"exceeds the limit" in body
    assert b"Sender" in body


def test_oversize_xml_without_length_is_refused(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", limits={"max_xml_bytes": 100_000})

    def chunks():  # type: ignore[no-untyped-def]
        yield soap12(Action.ITI38, "<x>")[:-20]
        for _ in range(100):
            yield b"x" * 10_000

    with consumer(pki) as client:
        response = client.post(
            gateway.endpoint_urls()["iti38"],
            content=chunks(),
            headers={"content-type": "application/soap+xml"},
        )
    assert response.status_code == 413
    assert fault_of(response)[0].endswith(":Sender")


def test_wrong_media_type_and_method_and_path(gateway: Gateway, pki: DevPki) -> None:
    url = gateway.endpoint_urls()["iti38"]
    with consumer(pki) as client:
        json_post = client.post(url, content=b"{}", headers={"content-type": "application/json"})
        get = client.get(url)
        missing = client.post(url.replace("/xca/iti38", "/nope"), content=b"")
    assert json_post.status_code == 415
    assert fault_of(json_post)[0].endswith(":Sender")
    assert get.status_code == 405
    assert missing.status_code == 404


# ------------------------------------------------------------------------ admin port


def test_admin_health_readiness_and_metrics(gateway: Gateway, pki: DevPki) -> None:
    with consumer(pki) as client:
        post(client, gateway.endpoint_urls()["iti38"], soap12(Action.ITI38, ADHOC_QUERY))
        post(client, gateway.endpoint_urls()["iti38"], soap12("urn:nope", ADHOC_QUERY))
    assert gateway.admin_url.startswith("http://127.0.0.1:")
    assert httpx.get(gateway.admin_url + "/healthz").status_code == 200
    ready = httpx.get(gateway.admin_url + "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    metrics = httpx.get(gateway.admin_url + "/metrics").text
    assert 'xca_gateway_requests_total{outcome="success",transaction="ITI-38"} 1.0' in metrics
    assert 'xca_gateway_requests_total{outcome="fault",transaction="unknown"} 1.0' in metrics
    assert 'xca_gateway_request_duration_seconds_count{transaction="ITI-38"}' in metrics


def _crl(pki: DevPki, revoked: list[Path], path: Path) -> Path:
    import datetime as dt

    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    ca_key = load_pem_private_key((pki.dir / "ca.key").read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=1))
    )
    for cert_path in revoked:
        serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    path.write_bytes(crl.public_bytes(Encoding.PEM))
    return path


def test_revoked_certificates_are_refused_with_a_crl(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path
) -> None:
    crl = _crl(pki, [pki.client.cert], tmp_path / "revoked.pem")
    gateway = gateway_factory("alpha", tls={"crl_file": str(crl)})
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _handshake(gateway.https.port, client_context(pki.ca, pki.client.cert, pki.client.key))
    assert wait_for(lambda: len(gateway.handshake_failures) == 1)
    assert "revoked" in gateway.handshake_failures[0].reason
    # A certificate the CRL does not list still gets in.
    beta = pki.communities["beta"]
    with httpx.Client(verify=client_context(pki.ca, beta.cert, beta.key), timeout=10) as client:
        response = post(client, gateway.endpoint_urls()["iti38"], soap12(Action.ITI38, ADHOC_QUERY))
    assert response.status_code == 200


def test_slow_request_body_is_cut_off_with_408(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", server={"body_grace": 0.5, "min_body_rate": 1000.0})
    ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
    raw = socket.create_connection(("127.0.0.1", gateway.https.port), timeout=10)
    response = b""
    with raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(
            b"POST /xca/iti38 HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/soap+xml\r\nContent-Length: 100000\r\n\r\n"
        )
        tls.settimeout(0.2)
        for _ in range(50):  # a byte every 0.2 s, far below 1000 bytes/s (bounded: 10 s)
            try:
                tls.sendall(b"<")
                chunk = tls.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            response += chunk
            if response.rstrip().endswith(b"Envelope>"):
                break
    assert response.startswith(b"HTTP/1.1 408"), response[:200]
    assert b"too slow" in response
