"""The shared outbound client against real gateways and real failure modes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
from lxml import etree

from tests.test_initiating import ask, errors, find_documents
from tests.test_server import ADHOC_QUERY
from xca_gateway.app.gateway import Gateway
from xca_gateway.metrics import GatewayMetrics
from xca_gateway.protocol.namespaces import QUERY, Action, ResponseStatus
from xca_gateway.protocol.peer_client import PeerClient, PeerError, SharedRequest
from xca_gateway.protocol.soap import SoapFault
from xca_gateway.protocol.soap_service import Operation, SoapRequest
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.settings import OutboundConfig


def _client(pki: DevPki, metrics: GatewayMetrics | None = None) -> PeerClient:
    ctx = client_context(pki.ca, pki.communities["alpha"].cert, pki.communities["alpha"].key)
    return PeerClient(ctx, OutboundConfig(connect_timeout=2, request_timeout=5), metrics)


async def test_call_a_peer_gateway(gateway_factory: Callable[..., Gateway], pki: DevPki) -> None:
    beta = gateway_factory("beta")
    metrics = GatewayMetrics()
    client = _client(pki, metrics)
    try:
        reply = await client.call(
            beta.endpoint_urls()["iti38"],
            etree.fromstring(ADHOC_QUERY),
            Action.ITI38,
            peer="beta",
            transaction="ITI-38",
        )
    finally:
        await client.aclose()
    assert reply.payload.tag == f"{{{QUERY}}}AdhocQueryResponse"
    assert reply.payload.get("status") == ResponseStatus.SUCCESS  # beta's registry is empty
    rendered = metrics.render().decode()
    assert 'xca_gateway_peer_up{peer="beta"} 1.0' in rendered
    assert 'outcome="success",peer="beta",transaction="ITI-38"' in rendered


async def test_peer_fault_is_reported_as_fault(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    beta = gateway_factory("beta")
    client = _client(pki)
    try:
        with pytest.raises(PeerError) as info:
            await client.call(beta.endpoint_urls()["iti38"], etree.fromstring(ADHOC_QUERY), "urn:x")
    finally:
        await client.aclose()
    assert info.value.kind == "fault"
    assert info.value.fault is not None and info.value.fault.subcodes[0].endswith(
        "ActionNotSupported"
    )


async def test_refused_connection_hung_peer_and_tls_refusal(
    gateway_factory: Callable[..., Gateway], pki: DevPki, silent_port: int
) -> None:
    # A peer that does not trust our CA refuses our certificate during the handshake.
    distrustful = gateway_factory("gamma", tls={"trust_store": str(pki.untrusted_ca)})
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    metrics = GatewayMetrics()
    client = _client(pki, metrics)
    payload = etree.fromstring(ADHOC_QUERY)
    try:
        kinds = {}
        for name, url, deadline in (
            ("closed", f"https://127.0.0.1:{closed_port}/xca/iti38", 5.0),
            ("hung", f"https://127.0.0.1:{silent_port}/xca/iti38", 0.5),
            ("tls", distrustful.endpoint_urls()["iti38"], 5.0),
        ):
            with pytest.raises(PeerError) as info:
                await client.call(url, payload, Action.ITI38, peer=name, deadline=deadline)
            kinds[name] = info.value.kind
    finally:
        await client.aclose()
    assert kinds["closed"] == "connect"
    assert kinds["hung"] == "timeout"
    # TLS 1.3: the server verifies our certificate after our side of the handshake is done and
    # drops the connection, so the client may only see a reset on its first read.
    assert kinds["tls"] in ("tls", "connect")
    rendered = metrics.render().decode()
    for name in ("closed", "hung", "tls"):
        assert f'xca_gateway_peer_up{{peer="{name}"}} 0.0' in rendered
    await asyncio.sleep(0)


async def test_header_provider_and_authorizer_see_the_same_header(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    """Outbound header blocks (e.g. WS-Security/XUA) reach the peer's authorizer."""

    beta = gateway_factory("beta")
    seen: list[str] = []

    async def authorize(request: SoapRequest, operation: Operation) -> None:
        token = request.envelope.header_blocks("urn:test", "Token")
        if not token:
            raise SoapFault.sender("token required")
        seen.append(token[0].text or "")
        request.context["user"] = token[0].text

    beta.soap.authorizer = authorize
    client = _client(pki)
    payload = etree.fromstring(ADHOC_QUERY)
    try:
        with pytest.raises(PeerError) as refused:
            await client.call(beta.endpoint_urls()["iti38"], payload, Action.ITI38)
        token = etree.Element("{urn:test}Token")
        token.text = "dr.smith"
        client.set_header_provider(lambda url, action, body: [token])
        reply = await client.call(beta.endpoint_urls()["iti38"], payload, Action.ITI38)
    finally:
        await client.aclose()
    assert refused.value.kind == "fault" and "token required" in refused.value.message
    assert reply.payload.tag == f"{{{QUERY}}}AdhocQueryResponse"
    assert seen == ["dr.smith"]


def test_pinned_peer_certificates(gateway_factory: Callable[..., Gateway], pki: DevPki) -> None:
    """A peer pinned to its certificate is refused when another (trusted) one shows up."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    beta = gateway_factory("beta")
    beta_der = x509.load_pem_x509_certificate(
        pki.communities["beta"].cert.read_bytes()
    ).public_bytes(Encoding.DER)
    right = hashlib.sha256(beta_der).hexdigest()
    home = beta.config.community.home_community_id
    peer = {"name": "beta", "home_community_id": home, "iti38": beta.endpoint_urls()["iti38"]}
    pinned_right = gateway_factory("alpha", peers=[{**peer, "certificate_sha256": right}])
    patient = f"P1^^^&{pinned_right.config.community.patient_id_assigning_authority}&ISO"
    payload = ask(pki, pinned_right, find_documents(patient))
    assert not [e for e in errors(payload) if e.get("location") == home]
    pinned_wrong = gateway_factory("gamma", peers=[{**peer, "certificate_sha256": "00" * 32}])
    patient = f"P1^^^&{pinned_wrong.config.community.patient_id_assigning_authority}&ISO"
    payload = ask(pki, pinned_wrong, find_documents(patient))
    refused = [e for e in errors(payload) if e.get("location") == home]
    assert [e["errorCode"] for e in refused] == ["XDSUnavailableCommunity"]
    assert "pinned" in refused[0]["codeContext"]


async def test_a_shared_request_is_serialised_once_and_addressed_per_call(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    """A fan-out's request: the same payload to every peer, each call with its own wsa:To and
    wsa:MessageID; a call with header blocks of its own (XUA) still gets them."""

    beta, gamma = gateway_factory("beta"), gateway_factory("gamma")
    seen: list[tuple[str | None, str | None, bytes, list[str]]] = []

    async def record(request: SoapRequest, operation: Operation) -> None:
        tokens = [t.text or "" for t in request.envelope.header_blocks("urn:test", "Token")]
        addressing = request.envelope.addressing
        c14n = etree.tostring(request.payload, method="c14n", exclusive=True)
        seen.append((addressing.to, addressing.message_id, c14n, tokens))

    beta.soap.authorizer = gamma.soap.authorizer = record
    original = etree.fromstring(ADHOC_QUERY)
    expected = etree.tostring(original, method="c14n", exclusive=True)
    shared = SharedRequest(original, Action.ITI38)
    urls = [beta.endpoint_urls()["iti38"], gamma.endpoint_urls()["iti38"]]
    client = _client(pki)
    try:
        for url in urls:
            reply = await client.call(url, shared, Action.ITI38)
            assert reply.payload.tag == f"{{{QUERY}}}AdhocQueryResponse"
        token = etree.Element("{urn:test}Token")
        token.text = "dr.smith"
        client.set_header_provider(lambda url, action, body: [token])
        await client.call(urls[0], shared, Action.ITI38)
    finally:
        await client.aclose()
    assert [s[0] for s in seen] == [*urls, urls[0]]
    assert len({s[1] for s in seen}) == 3  # a MessageID of its own per call
    assert all(s[2] == expected for s in seen)
    assert [s[3] for s in seen] == [[], [], ["dr.smith"]]
    # The payload the observers (audit) see is the request sent, whole.
    assert etree.tostring(shared.payload, method="c14n", exclusive=True) == expected
