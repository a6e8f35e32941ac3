"""No request stalls another: the attacks of issue #16 at small sizes, against real gateways.

The benchmark (``benchmarks/isolation.py``) measures the same attacks at full size against a
legitimate client's latency; here each is a regression test of the defence's behaviour.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree

import xca_gateway.protocol.xmlsafe as xmlsafe
from tests.conftest import make_config, wait_for
from tests.test_gateway_audit import event, records
from tests.test_gateway_audit import rsyslog as rsyslog_repository
from tests.test_prefetch import ALICE, MllpClient, his_tls, local_cx, msa, order
from tests.test_server import ADHOC_QUERY, consumer, fault_of, post, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.app.heap import keep_heap_trimmed, resident_bytes
from xca_gateway.arr.web import SelfAudit
from xca_gateway.audit.alerts import REPEAT_COUNT, AlertAggregator, alert_source
from xca_gateway.audit.messages import (
    ActiveParticipant,
    AuditContext,
    AuditMessage,
    AuditSource,
    security_alert_node_authentication,
)
from xca_gateway.audit.rsyslog import RsyslogRepository
from xca_gateway.protocol.handshake_schedule import HandshakeLimits, HandshakeSchedule
from xca_gateway.protocol.http_server import (
    ConnectionGate,
    ConnectionLimits,
    HttpServer,
    Request,
    Response,
    _has_spoken,
)
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.tls import HandshakeFailure, client_context, server_context
from xca_gateway.protocol.xmlsafe import (
    INLINE_PARSE_BYTES,
    MarkupCounter,
    XmlLimits,
    XmlRejected,
    check_markup,
    count_markup,
    parse_xml,
    parse_xml_async,
)
from xca_gateway.security.dev_pki import DevPki

# ------------------------------------------------------------------------ XML, linear time


def attribute_bomb(attributes: int) -> bytes:
    """The first element of the envelope carries ``attributes`` attributes."""
    attrs = " ".join(f'a{i}="x"' for i in range(attributes))
    return soap12(Action.ITI18, ADHOC_QUERY).replace(
        b"<s:Envelope ", f"<s:Envelope {attrs} ".encode()
    )


def element_flood(elements: int) -> bytes:
    return soap12(Action.ITI18, "<a/>" * elements)


def test_attributes_per_element_are_bounded() -> None:
    limits = XmlLimits(max_attributes=10)
    assert (
        parse_xml(b"<r " + b" ".join(b'a%d="x"' % i for i in range(10)) + b"/>", limits) is not None
    )
    with pytest.raises(XmlRejected, match="more than 10 attributes"):
        parse_xml(b"<r><e " + b" ".join(b'a%d="x"' % i for i in range(11)) + b"/></r>", limits)


def test_an_attribute_bomb_of_60000_attributes_is_refused() -> None:
    # lxml's attrib.values() took seconds on this (quadratic); the XPath count is linear.
    with pytest.raises(XmlRejected, match="more than 256 attributes"):
        parse_xml(attribute_bomb(60_000))


def test_an_element_flood_is_refused_from_its_markup_count() -> None:
    limits = XmlLimits(max_elements=1000)
    assert parse_xml(element_flood(990), limits) is not None
    with pytest.raises(XmlRejected, match="more than 1000 elements"):
        parse_xml(element_flood(1001), limits)


def test_markup_count_bounds_elements_attributes_and_declarations() -> None:
    count = count_markup(b'<a xmlns="urn:x" b="1"><c/><!-- n --></a>')
    assert count.elements == 3  # a, c and the comment: an upper bound of the elements
    assert count.equals == 2
    assert count.xmlns == 1


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_markup_counted_in_chunks_equals_the_count_of_the_whole(size: int) -> None:
    data = b'<r xmlns="urn:a"><p:e xmlns:p="urn:p" a="1"/></r><!-- </x --><xmlns/>' * 5
    counter = MarkupCounter()
    for start in range(0, len(data), size):
        counter.feed(data[start : start + size])
    assert counter.count == count_markup(data)


def test_many_distinct_namespace_declarations_are_refused() -> None:
    limits = XmlLimits(max_namespaces=100)
    declarations = " ".join(f'xmlns:p{i}="urn:x:{i}"' for i in range(101))
    with pytest.raises(XmlRejected, match="more than 100 namespaces"):
        parse_xml(f"<r {declarations}/>".encode(), limits)
    # The same declaration repeated on many elements (as some SOAP stacks write) is fine.
    repeated = "".join('<p:e xmlns:p="urn:x"/>' for _ in range(500))
    assert len(parse_xml(f"<r>{repeated}</r>".encode(), limits)) == 500


def test_text_depth_and_attribute_size_limits_hold_on_every_node() -> None:
    limits = XmlLimits(max_text_bytes=100, max_depth=5, max_attribute_bytes=50)
    with pytest.raises(XmlRejected, match="text node too large"):
        parse_xml(b"<r><a/>" + b"x" * 101 + b"</r>", limits)  # a tail, not an element's text
    with pytest.raises(XmlRejected, match="deeper than 5"):
        parse_xml(b"<a>" * 6 + b"</a>" * 6, limits)
    assert parse_xml(b"<a>" * 5 + b"</a>" * 5, limits) is not None
    with pytest.raises(XmlRejected, match="attribute value too large"):
        parse_xml(b'<r><e v="' + b"x" * 51 + b'"/></r>', limits)


def test_large_documents_are_parsed_off_the_loop_with_the_same_result() -> None:
    data = element_flood(INLINE_PARSE_BYTES // 4 + 10)
    assert len(data) > INLINE_PARSE_BYTES
    root = asyncio.run(parse_xml_async(data))
    assert etree.tostring(root) == etree.tostring(parse_xml(data))
    with pytest.raises(XmlRejected, match="more than 256 attributes"):
        asyncio.run(parse_xml_async(attribute_bomb(20_000)))
    with pytest.raises(XmlRejected, match="more than 100 elements"):
        asyncio.run(parse_xml_async(data, XmlLimits(max_elements=100)))


def test_attribute_bomb_gets_a_sender_fault_and_others_are_served(
    gateway: Gateway, pki: DevPki
) -> None:
    urls = gateway.endpoint_urls()
    with consumer(pki) as client:
        response = post(client, urls["iti18"], attribute_bomb(20_000))
        assert response.status_code == 400
        code, _, reason = fault_of(response)
        assert code.endswith(":Sender")
        assert "more than 256 attributes" in reason
        assert post(client, urls["iti18"], soap12(Action.ITI18, ADHOC_QUERY)).status_code == 200


def test_element_flood_gets_a_sender_fault(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", limits={"max_xml_elements": 500})
    with consumer(pki) as client:
        response = post(client, gateway.endpoint_urls()["iti18"], element_flood(1000))
    assert response.status_code == 400
    assert "more than 500 elements" in fault_of(response)[2]


def test_query_endpoints_take_small_bodies_and_retrieves_large_ones(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", limits={"max_query_bytes": 20_000})
    urls = gateway.endpoint_urls()
    big = soap12(Action.ITI18, ADHOC_QUERY + " " * 30_000)
    with consumer(pki) as client:
        for key in ("iti18", "iti38"):
            response = post(client, urls[key], big.replace(Action.ITI18.encode(), b"x"))
            assert response.status_code == 413, key
            assert "exceeds the limit of 20000" in fault_of(response)[2]
        # A retrieve endpoint reads the same body (and answers it: here, a wrong action).
        response = post(client, urls["iti43"], big)
    assert response.status_code == 400
    assert "ActionNotSupported" in " ".join(fault_of(response)[1])


def test_a_body_refused_part_way_costs_its_source_handshakes(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    """The refused body's connection closes; the caller pays for the next one, so a bomb
    resent over and over gets a few new connections a second, not all the loop can make."""
    gateway = gateway_factory(
        "alpha",
        limits={"max_query_bytes": 20_000},
        server={"handshake_burst_per_source": 100, "refused_body_penalty": 30},
    )
    urls = gateway.endpoint_urls()
    with consumer(pki) as client:
        assert post(client, urls["iti18"], soap12(Action.ITI18, ADHOC_QUERY)).status_code == 200
        schedule = gateway.https.gate._schedule
        assert schedule is not None
        before = schedule.tokens("127.0.0.1", now=0.0)
        assert post(client, urls["iti18"], attribute_bomb(20_000)).status_code == 413
    # 30 taken, at most a few regained since (200/s, the clock of the schedule's loop).
    assert schedule.tokens("127.0.0.1", now=0.0) <= before - 30 + 1
    assert _ask(gateway, pki) == 200  # paid in waiting, not refused


# ------------------------------------------------------------------------ connections


def _raw(port: int, source: str = "127.0.0.2") -> socket.socket:
    """A TCP connection from another loopback address (the per-source unit)."""
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(10) == b""
    except ConnectionError:
        return True


def _ask(gateway: Gateway, pki: DevPki) -> int:
    with consumer(pki) as client:
        return post(
            client, gateway.endpoint_urls()["iti18"], soap12(Action.ITI18, ADHOC_QUERY)
        ).status_code


def _refused(gateway: Gateway, reason: str) -> float:
    metrics = httpx.get(gateway.admin_url + "/metrics").text
    for line in metrics.splitlines():
        if (
            line.startswith("xca_gateway_connections_refused_total{")
            and f'reason="{reason}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_connections_per_source_are_capped_before_the_handshake(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", server={"max_connections_per_source": 3})
    port = gateway.https.port
    held = [_raw(port) for _ in range(3)]
    try:
        assert wait_for(lambda: gateway.https.active_connections == 3)
        try:  # reset at the accept, maybe before the client saw its connect through
            fourth = _raw(port)
        except ConnectionError:
            pass
        else:
            with fourth:
                assert _closed_by_server(fourth)  # refused at accept: nothing read, no handshake
        assert _refused(gateway, "max_connections_per_source") == 1
        assert _ask(gateway, pki) == 200  # another source is served meanwhile
    finally:
        for sock in held:
            sock.close()


def test_a_connection_that_never_says_hello_is_dropped_and_reported(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", server={"hello_timeout": 0.3})
    with _raw(gateway.https.port) as idle:
        assert _closed_by_server(idle)
    assert wait_for(lambda: len(gateway.handshake_failures) == 1)
    failure = gateway.handshake_failures[0]
    assert failure.address == "127.0.0.2"
    assert "no TLS ClientHello within 0.3 s" in failure.reason
    assert wait_for(lambda: gateway.https.active_connections == 0)


def test_a_full_pending_pool_drops_the_oldest_idle_socket_for_a_newcomer(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", server={"max_pending_handshakes": 4})
    port = gateway.https.port
    idle = [_raw(port, f"127.0.0.{2 + i}") for i in range(4)]
    try:
        assert wait_for(lambda: gateway.https.gate.pending_handshakes == 4)
        # Every pending slot is taken by a socket that never speaks; a client still gets in.
        assert _ask(gateway, pki) == 200
        assert _closed_by_server(idle[0])  # the oldest made room
        assert _refused(gateway, "max_pending_handshakes") >= 1
        reasons = [f.reason for f in gateway.handshake_failures]
        assert any("too many pending handshakes" in r for r in reasons)
    finally:
        for sock in idle:
            sock.close()


def test_a_request_head_has_one_deadline_not_one_per_read(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", server={"header_timeout": 1.0})
    ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
    raw = socket.create_connection(("127.0.0.1", gateway.https.port), timeout=10)
    sent = 0
    with raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"POST /ig/iti18 HTTP/1.1\r\nHost: localhost\r\n")
        tls.settimeout(0.25)
        closed = False
        for index in range(40):  # a header line every 0.25 s, each read well within 1 s
            try:
                tls.sendall(f"X-Slow-{index}: 1\r\n".encode())
                sent += 1
                closed = tls.recv(10) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
            if closed:
                break
    assert closed, "the server kept a trickled head open"
    assert sent < 40


def test_slow_bodies_are_cut_off_while_others_are_served(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", server={"body_grace": 0.5, "min_body_rate": 1000.0})
    ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
    slow = []
    for _ in range(5):
        raw = socket.create_connection(("127.0.0.1", gateway.https.port), timeout=10)
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(
            b"POST /ig/iti18 HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/soap+xml\r\nContent-Length: 100000\r\n\r\n<"
        )
        slow.append(tls)
    try:
        assert _ask(gateway, pki) == 200
        answers = []
        for tls in slow:
            tls.settimeout(0.2)
            response = b""
            for _ in range(50):  # a byte every 0.2 s, far below 1000 bytes/s (bounded)
                try:
                    tls.sendall(b" ")
                    response += tls.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if response.startswith(b"HTTP/1.1"):
                    break
            answers.append(response[:12])
        assert answers == [b"HTTP/1.1 408"] * 5
    finally:
        for tls in slow:
            tls.close()


# ------------------------------------------------------------------------ audit floods

CTX = AuditContext(AuditSource("gw-test"), host="gw.test", process_id="1")


def _alert(address: str, reason: str = "handshake timed out", port: int = 1000) -> AuditMessage:
    return security_alert_node_authentication(CTX, address=address, port=port, reason=reason)


def _repeat_count(message: AuditMessage) -> int | None:
    for key, value in message.objects[0].details:
        if key == REPEAT_COUNT:
            return int(value)
    return None


def test_repeated_alerts_of_one_source_become_one_record_and_a_count() -> None:
    aggregator = AlertAggregator(window=60.0)
    first = _alert("192.0.2.1", port=1)
    assert aggregator.offer(first, now=0.0) == [first]  # recorded at once, not delayed
    for i in range(99):
        assert aggregator.offer(_alert("192.0.2.1", port=2 + i), now=1.0 + i / 10) == []
    other = _alert("192.0.2.2")
    assert aggregator.offer(other, now=20.0) == [other]  # another source: its own record
    different = _alert("192.0.2.1", reason="client presented no certificate")
    assert aggregator.offer(different, now=21.0) == [different]  # another kind of refusal
    assert aggregator.expire(59.9) == []
    (summary,) = aggregator.expire(60.0)
    assert _repeat_count(summary) == 99
    assert summary.event.outcome_description is not None
    assert "repeated 99 more time(s)" in summary.event.outcome_description
    assert summary.objects[0].object_id == "192.0.2.1:100"  # the latest of the repeats
    assert aggregator.aggregated == 99
    # The window closed: the next alert of that source opens a new one.
    again = _alert("192.0.2.1")
    assert aggregator.offer(again, now=61.0) == [again]
    assert aggregator.flush() == []  # the bursts left have no repeats


def test_alerts_from_too_many_sources_share_one_burst() -> None:
    aggregator = AlertAggregator(window=60.0, max_bursts=3)
    written = [m for i in range(10) for m in aggregator.offer(_alert(f"192.0.2.{i}"), now=0.0)]
    assert len(written) == 4  # three sources, then one burst for all the others
    (summary,) = aggregator.flush()
    assert _repeat_count(summary) == 6


# A real rsyslog over mutual TLS as the audit record repository (test_gateway_audit's fixture).
arr = rsyslog_repository


def test_a_connection_flood_is_audited_as_one_alert_with_a_count(
    gateway_factory: Callable[..., Gateway], arr: RsyslogRepository
) -> None:
    gateway = gateway_factory(
        "alpha",
        server={"hello_timeout": 0.2},
        audit={
            "audit_source_id": "gw-alpha",
            "alert_window": 5.0,
            "destinations": [
                {"name": "arr", "transport": "tls", "host": "127.0.0.1", "port": arr.tls_port}
            ],
        },
    )
    idle = [_raw(gateway.https.port) for _ in range(10)]
    try:
        assert wait_for(lambda: len(gateway.handshake_failures) == 10, timeout=10)
    finally:
        for sock in idle:
            sock.close()
    # Application Start, the first alert at once, one more for the nine others.
    roots = records(arr, 3)
    alerts = [r for r in roots if event(r)[0] == "110113"]
    counts = [_detail(r, REPEAT_COUNT) for r in alerts]
    assert len(alerts) == 2, counts
    assert counts == [None, "9"]
    assert sum(int(c) if c else 1 for c in counts) == 10
    metrics = httpx.get(gateway.admin_url + "/metrics").text
    assert 'xca_gateway_audit_security_alerts_total{type="110126"} 10.0' in metrics
    assert (
        'xca_gateway_tls_handshake_failures_total{reason="no TLS ClientHello within 0.2 s"} 10.0'
        in metrics
    )


def _detail(root: etree._Element, name: str) -> str | None:
    for detail in root.iter("ParticipantObjectDetail"):
        if detail.get("type") == name:
            return base64.b64decode(detail.get("value", "")).decode()
    return None


def test_callers_behind_one_address_are_separate_sources() -> None:
    assert alert_source(_alert("192.0.2.1", port=1)) == alert_source(_alert("192.0.2.1", port=2))
    assert alert_source(_alert("192.0.2.1")) == "192.0.2.1"
    # A verified caller (e.g. refused at a door after its handshake) is its own source.
    verified = dataclasses.replace(
        _alert("192.0.2.1"),
        participants=(
            ActiveParticipant("CN=a", user_is_requestor=True, network_access_point_id="192.0.2.1"),
        ),
    )
    assert alert_source(verified) == "CN=a at 192.0.2.1"


def test_large_parses_of_one_source_run_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    running: dict[str, int] = {}
    peak: dict[str, int] = {}
    real = xmlsafe.parse_xml_async

    async def counted(data: bytes, limits: XmlLimits | None = None, **kw: object) -> etree._Element:
        source = data[-5:-3].decode()  # the comment after the root element names it
        running[source] = running.get(source, 0) + 1
        peak[source] = max(peak.get(source, 0), running[source])
        try:
            await asyncio.sleep(0.01)
            return await real(data, limits, **kw)  # type: ignore[arg-type]
        finally:
            running[source] -= 1

    monkeypatch.setattr(xmlsafe, "parse_xml_async", counted)
    parser = xmlsafe.FairParser()
    big = element_flood(INLINE_PARSE_BYTES // 4)

    async def main() -> None:
        jobs = [parser.parse(big + f"<!--{s}-->".encode(), source=s) for s in ("s1", "s2") * 4]
        assert all(len(root[1]) > 0 for root in await asyncio.gather(*jobs))

    asyncio.run(main())
    assert peak == {"s1": 1, "s2": 1}
    assert parser.sources == 0


def test_large_bodies_of_one_source_are_read_one_at_a_time(gateway: Gateway, pki: DevPki) -> None:
    """While one large body of a source is being read, its next one waits unread (it would
    otherwise get its own turn of the event loop at every round)."""
    ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
    gate = gateway.https.gate
    body = soap12(Action.ITI18, ADHOC_QUERY + " " * 200_000)
    head = (
        "POST /ig/iti18 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/soap+xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    connections = []
    try:
        for _ in range(2):
            raw = socket.create_connection(("127.0.0.1", gateway.https.port), timeout=10)
            connections.append(ctx.wrap_socket(raw, server_hostname="localhost"))
        first, second = connections
        first.sendall(head + body[:100_000])  # past the first 64 KiB: it holds the turn
        assert wait_for(lambda: gate.large_bodies("127.0.0.1") == 1)
        second.sendall(head + body[:100_000])
        assert wait_for(lambda: gate.large_bodies("127.0.0.1") == 2)  # waiting, unread
        first.sendall(body[100_000:])
        second.sendall(body[100_000:])
        for tls in (first, second):
            assert tls.recv(12) == b"HTTP/1.1 200"
        assert wait_for(lambda: gate.large_bodies("127.0.0.1") == 0)
    finally:
        for tls in connections:
            tls.close()


def test_a_source_has_a_few_handshakes_at_once_and_others_are_served(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    """Ten stalled handshakes from one address: eight hold its turns, two wait unread, and
    another source's client is served meanwhile."""
    gateway = gateway_factory("alpha", server={"max_handshakes_per_source": 8})
    gate = gateway.https.gate
    stalled = [_raw(gateway.https.port) for _ in range(10)]
    try:
        for sock in stalled:
            sock.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        assert wait_for(lambda: gate.waiting_or_holding("handshake", "127.0.0.2") == 10)
        schedule = gate._schedule
        assert schedule is not None and schedule.in_progress("127.0.0.2") == 8
        assert _ask(gateway, pki) == 200
    finally:
        for sock in stalled:
            sock.close()
    assert wait_for(lambda: gate.waiting_or_holding("handshake", "127.0.0.2") == 0)


# ------------------------------------------------------------------------ other listeners


def test_mllp_connections_per_source_and_the_first_message_deadline(
    gateway_factory: Callable[..., Gateway], pki: DevPki, silent_port: int
) -> None:
    gateway = gateway_factory(
        "alpha",
        prefetch={
            "host": "127.0.0.1",
            "port": 0,
            "pacs_port": silent_port,
            "pacs_ae_title": "NOWHERE",
            "max_connections_per_source": 2,
            "first_message_timeout": 0.5,
        },
    )
    assert gateway.prefetch is not None
    port = gateway.prefetch.port
    held = [_raw(port) for _ in range(2)]
    try:
        assert wait_for(lambda: gateway.prefetch is not None and gateway.prefetch.gate.active == 2)
        with _raw(port) as third:
            assert _closed_by_server(third)  # refused at accept
        assert _refused(gateway, "max_connections_per_source") == 1
        # The interface engine (another address) is served meanwhile.
        text, control_id = order(local_cx(ALICE))
        engine = MllpClient(port, his_tls(pki))
        try:
            engine.send(text)
            assert msa(engine.receive()) == ("AA", control_id)
        finally:
            engine.close()
    finally:
        for sock in held:
            sock.close()
    # An admitted connection that never frames a message is closed after first_message_timeout.
    silent = MllpClient(port, his_tls(pki))
    try:
        assert silent.sock.recv(10) == b""
    finally:
        silent.close()


def test_the_audit_record_repository_aggregates_its_own_alerts() -> None:
    """The ARR's own trail (refused handshakes and callers at its doors): one record per burst
    at once, one more with the count when the window closes (here: on stop)."""

    stored: list[bytes] = []
    trail = SelfAudit(
        stored.append,
        audit_source_id="arr",
        enterprise_site_id=None,
        hostname="arr.test",
        application_id="xca-gateway-arr",
    )
    for port in range(10):
        trail.record(_alert("192.0.2.7", port=port))
    assert len(stored) == 1
    trail.close_alert_windows()  # the window is still open: nothing yet
    assert len(stored) == 1
    trail.close_alert_windows(all_of_them=True)
    assert len(stored) == 2
    assert b'type="Repeat Count"' in stored[1]
    assert base64.b64encode(b"9") in stored[1]


def test_a_full_pool_displaces_silent_connections_before_handshaking_ones() -> None:
    gate = ConnectionGate(ConnectionLimits(max_pending_handshakes=3))
    dropped: list[str] = []

    def enter(name: str) -> None:
        gate.pending(name, lambda: dropped.append(name))

    enter("client")
    gate.speaking("client")  # its ClientHello arrived: it is handshaking (slowly)
    enter("idle-1")
    enter("idle-2")
    enter("idle-3")
    assert dropped == ["idle-1"]  # not the older client
    gate.speaking("idle-2")
    gate.speaking("idle-3")
    enter("idle-4")
    assert dropped == ["idle-1", "client"]  # no silent one left: the oldest of all
    assert gate.pending_handshakes == 3
    for name in ("idle-2", "idle-3", "idle-4"):
        gate.settled(name)
    assert gate.pending_handshakes == 0


def test_an_attribute_bomb_is_refused_from_its_markup_before_a_tree_is_built() -> None:
    with pytest.raises(XmlRejected, match="more than 256 attributes per element"):
        check_markup(count_markup(attribute_bomb(60_000)), XmlLimits())
    # A real message: a few attributes per element.
    check_markup(count_markup(soap12(Action.ITI18, ADHOC_QUERY)), XmlLimits())


# ------------------------------------------------------------ handshakes: rate and fairness


def _schedule(**limits: Any) -> HandshakeSchedule:
    return HandshakeSchedule(HandshakeLimits(**limits), now=0.0)


def test_a_source_starts_its_burst_then_handshakes_at_its_rate() -> None:
    schedule = _schedule(per_source_rate=2.0, per_source_burst=3.0, per_source_concurrency=100)
    for i in range(6):
        schedule.enqueue(f"a{i}", "10.0.0.1", now=0.0)
    assert schedule.grants(0.0) == ["a0", "a1", "a2"]  # the burst
    assert schedule.waiting("10.0.0.1") == 3
    assert schedule.next_grant_at(0.0) == 0.5  # one token every 1/rate s
    assert schedule.grants(0.4) == []
    assert schedule.grants(0.5) == ["a3"]
    assert schedule.grants(1.5) == ["a4", "a5"]
    # Another source has a bucket of its own.
    schedule.enqueue("b0", "10.0.0.2", now=1.5)
    assert schedule.grants(1.5) == ["b0"]


def test_a_penalized_source_waits_until_its_bucket_has_paid_the_penalty() -> None:
    schedule = _schedule(per_source_rate=10.0, per_source_burst=10.0)
    schedule.penalize("10.0.0.1", 25, now=0.0)
    assert schedule.tokens("10.0.0.1", now=0.0) == -10.0  # no lower than minus its burst
    schedule.enqueue("a0", "10.0.0.1", now=0.0)
    schedule.enqueue("b0", "10.0.0.2", now=0.0)
    assert schedule.grants(0.0) == ["b0"]  # another source is not concerned
    assert schedule.next_grant_at(0.0) == pytest.approx(1.1)  # 11 tokens at 10/s
    assert schedule.grants(1.0) == []
    assert schedule.grants(1.1) == ["a0"]


def test_waiting_sources_are_served_in_turn_not_first_come() -> None:
    schedule = _schedule(rate=1.0, burst=1.0, per_source_burst=100.0, per_source_concurrency=100)
    for i in range(100):
        schedule.enqueue(f"flood{i}", "10.0.0.1", now=0.0)
    assert schedule.grants(0.0) == ["flood0"]  # all sources' bucket is empty now
    schedule.enqueue("peer", "10.0.0.9", now=0.0)
    assert schedule.grants(1.0) == ["flood1"]
    assert schedule.grants(2.0) == ["peer"]  # the next turn, not after 98 more
    assert schedule.grants(3.0) == ["flood2"]


def test_a_source_at_its_concurrency_waits_for_a_handshake_to_end() -> None:
    schedule = _schedule(per_source_concurrency=2)
    for i in range(3):
        schedule.enqueue(f"a{i}", "10.0.0.1", now=0.0)
    assert schedule.grants(0.0) == ["a0", "a1"]
    assert schedule.next_grant_at(0.0) is None  # tokens are not what it lacks
    schedule.finished("10.0.0.1", now=0.1)
    assert schedule.grants(0.1) == ["a2"]


def test_a_connection_giving_up_leaves_the_queue_and_idle_sources_are_forgotten() -> None:
    schedule = _schedule(per_source_rate=1.0, per_source_burst=1.0)
    schedule.enqueue("a0", "10.0.0.1", now=0.0)
    schedule.enqueue("a1", "10.0.0.1", now=0.0)
    assert schedule.grants(0.0) == ["a0"]
    schedule.cancel("a1", "10.0.0.1", now=0.2)
    assert schedule.waiting("10.0.0.1") == 0 and schedule.next_grant_at(0.2) is None
    schedule.finished("10.0.0.1", now=0.3)
    assert schedule.sources == 1  # its bucket is not full again: a reconnect gets no new burst
    schedule.sweep(now=5.0)
    assert schedule.sources == 0


def test_a_source_over_its_handshake_rate_waits_unread_and_is_cut_at_the_deadline(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory(
        "alpha",
        server={"handshake_rate_per_source": 0.001, "handshake_burst_per_source": 2},
        tls={"handshake_timeout": 1.0},
    )
    gate = gateway.https.gate
    ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
    for _ in range(2):  # the burst: two full handshakes
        with _raw(gateway.https.port) as raw, ctx.wrap_socket(raw, server_hostname="localhost"):
            pass
    with _raw(gateway.https.port) as third:
        third.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello
        assert wait_for(lambda: gate.waiting_or_holding("handshake", "127.0.0.2") == 1)
        assert _ask(gateway, pki) == 200  # 127.0.0.1 has a bucket of its own
        assert _closed_by_server(third)  # never handshaked, cut at tls.handshake_timeout
    assert wait_for(
        lambda: any("too many TLS handshakes" in f.reason for f in gateway.handshake_failures)
    )
    assert gate.waiting_or_holding("handshake", "127.0.0.2") == 0


def test_a_peer_handshakes_in_its_turn_not_behind_a_flood_of_one_source(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    """All sources together start 4 handshakes a second; 30 stalled ones from 127.0.0.2 take
    the first 4 and queue. Another source's client is granted the next turn but one, while the
    flood still queues (first come, first served it would wait for all 26)."""
    gateway = gateway_factory(
        "alpha", server={"handshake_rate": 4.0, "max_handshakes_per_source": 100}
    )
    gate = gateway.https.gate
    flood = [_raw(gateway.https.port) for _ in range(30)]
    try:
        for sock in flood:
            sock.sendall(b"\x16\x03\x01")
        assert wait_for(lambda: gate.waiting_or_holding("handshake", "127.0.0.2") == 30)
        assert _ask(gateway, pki) == 200
        schedule = gate._schedule
        assert schedule is not None and schedule.waiting("127.0.0.2") > 0
    finally:
        for sock in flood:
            sock.close()


def test_a_client_whose_hello_is_there_is_not_displaced_as_silent() -> None:
    """A burst of accepts fills the pool before any connection's task has run: the socket
    itself says who has spoken."""

    gate = ConnectionGate(ConnectionLimits(max_pending_handshakes=2))
    dropped: list[str] = []
    gate.pending("client", lambda: dropped.append("client"), lambda: True)
    gate.pending("idle-1", lambda: dropped.append("idle-1"), lambda: False)
    gate.pending("idle-2", lambda: dropped.append("idle-2"), lambda: False)
    assert dropped == ["idle-1"]  # the older client's ClientHello was waiting in its socket
    gate.pending("idle-3", lambda: dropped.append("idle-3"), lambda: False)
    assert dropped == ["idle-1", "idle-2"]


def test_has_spoken_sees_unread_bytes_on_a_paused_socket() -> None:
    async def scenario() -> list[bool]:
        accepted: asyncio.Queue[asyncio.Transport] = asyncio.Queue()

        class Paused(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                transport.pause_reading()
                accepted.put_nowait(transport)

        server = await asyncio.get_running_loop().create_server(Paused, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        transport = await accepted.get()
        seen = [_has_spoken(transport)]
        writer.write(b"\x16\x03\x01")
        await writer.drain()
        for _ in range(500):  # bounded: until the bytes are in the server's socket
            if _has_spoken(transport):
                break
            await asyncio.sleep(0.01)
        seen.append(_has_spoken(transport))
        writer.close()
        transport.abort()
        server.close()
        await server.wait_closed()
        return seen

    assert asyncio.run(scenario()) == [False, True]


def _query_on_tls(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[str, ssl.SSLSession | None, bool]:
    """One ITI-18 on a new TLS connection offering ``session``: the status line, the session
    to offer next time (its ticket arrives with the answer) and whether it was resumed."""
    body = soap12(Action.ITI18, ADHOC_QUERY)
    head = (
        f"POST /ig/iti18 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        f"Content-Type: application/soap+xml\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(head + body)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        return answer.split(b"\r\n", 1)[0].decode().strip(), tls.session, tls.session_reused


def test_a_returning_client_resumes_its_session_and_is_still_itself(
    gateway: Gateway, pki: DevPki
) -> None:
    """The resumed handshake skips the signature and the chain verification; the caller is
    still identified by the certificate of the session (the /ig door admits it by its URI)."""
    ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
    status, session, resumed = _query_on_tls(gateway.https.port, ctx, None)
    assert (status, resumed) == ("HTTP/1.1 200", False)
    for _ in range(2):  # one ticket per connection is enough to resume again and again
        status, session, resumed = _query_on_tls(gateway.https.port, ctx, session)
        assert (status, resumed) == ("HTTP/1.1 200", True)


def test_no_session_tickets_means_a_full_handshake_every_time(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", tls={"session_tickets": 0})
    ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
    status, session, _ = _query_on_tls(gateway.https.port, ctx, None)
    status, _, resumed = _query_on_tls(gateway.https.port, ctx, session)
    assert (status, resumed) == ("HTTP/1.1 200", False)


def test_connections_over_the_caps_are_reset_at_the_accept_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused before the event loop makes a transport or a task of them: a flood over the
    per-source cap costs a syscall each, and the connection within the cap is served."""

    made: list[str] = []
    connect = HttpServer._connect

    def counting(self: HttpServer, sock: socket.socket, address: str, pending: Any) -> None:
        made.append(address)
        connect(self, sock, address, pending)

    monkeypatch.setattr(HttpServer, "_connect", counting)

    async def app(request: Request) -> Response:
        return Response(200, body=b"ok")

    async def scenario() -> tuple[list[bool], bytes]:
        server = HttpServer(
            app, ssl_context=None, limits=ConnectionLimits(max_connections_per_source=1)
        )
        await server.start("127.0.0.1", 0)
        try:
            held = await asyncio.open_connection(
                "127.0.0.1", server.port, local_addr=("127.0.0.2", 0)
            )
            for _ in range(500):  # bounded: until the held one is admitted
                if server.active_connections == 1:
                    break
                await asyncio.sleep(0.01)
            refused = []
            for _ in range(5):
                try:  # reset at once, maybe before the client saw its connect through
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", server.port, local_addr=("127.0.0.2", 0)
                    )
                except ConnectionError:
                    refused.append(True)
                    continue
                try:
                    refused.append(await reader.read(10) == b"")
                except ConnectionError:
                    refused.append(True)
                writer.transport.abort()
            held[1].write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await held[0].read()
            held[1].close()
            assert server.gate.refused == {"max_connections_per_source": 5}
            return refused, answer
        finally:
            await server.close()

    refused, answer = asyncio.run(scenario())
    assert refused == [True] * 5
    assert answer.startswith(b"HTTP/1.1 200")
    assert made == ["127.0.0.2"]  # the five never became transports


def test_silent_connections_wait_as_bare_sockets_and_are_displaced_without_a_task(
    monkeypatch: pytest.MonkeyPatch, pki: DevPki, tmp_path: Path
) -> None:
    """A flood of sockets that never speak (from many sources, each within its cap) churns
    the pool of pending handshakes: those displaced and those timed out never became a
    transport or a task, were reported as refusals, and a real client still gets in."""

    made: list[str] = []
    connect = HttpServer._connect

    def counting(self: HttpServer, sock: socket.socket, address: str, pending: Any) -> None:
        made.append(address)
        connect(self, sock, address, pending)

    monkeypatch.setattr(HttpServer, "_connect", counting)
    failures: list[HandshakeFailure] = []

    async def app(request: Request) -> Response:
        return Response(200, body=b"ok")

    async def scenario() -> tuple[str, int]:
        server = HttpServer(
            app,
            ssl_context=server_context(make_config(pki, tmp_path).tls),
            on_handshake_failure=failures.append,
            limits=ConnectionLimits(max_pending_handshakes=4, hello_timeout=0.5),
        )
        await server.start("127.0.0.1", 0)
        idle = []
        try:
            for i in range(20):
                idle.append(
                    await asyncio.open_connection(
                        "127.0.0.1", server.port, local_addr=(f"127.0.2.{1 + i % 5}", 0)
                    )
                )
            for _ in range(500):  # bounded: until the 16 displaced are counted
                if server.gate.refused.get("max_pending_handshakes") == 16:
                    break
                await asyncio.sleep(0.01)
            assert server.gate.pending_handshakes == 4
            assert made == [] and not server._connections
            ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.port, ssl=ctx, server_hostname="localhost"
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = (await reader.read()).split(b"\r\n", 1)[0].decode()
            writer.close()
            for _ in range(500):  # bounded: until the last idle sockets time out
                if server.gate.pending_handshakes == 0 and server.active_connections == 0:
                    break
                await asyncio.sleep(0.01)
            return answer, server.active_connections
        finally:
            for _, w in idle:
                w.transport.abort()
            await server.close()

    answer, active = asyncio.run(scenario())
    assert (answer.split()[:2], active) == (["HTTP/1.1", "200"], 0)
    assert made == ["127.0.0.1"]  # only the client that spoke
    reasons = [f.reason for f in failures]
    # 16 displaced by the flood, one more by the client; the last three timed out.
    assert reasons.count("dropped before its handshake ended: too many pending handshakes") == 17
    assert reasons.count("no TLS ClientHello within 0.5 s") == 3


def test_the_heap_is_trimmed_once_rss_has_grown_past_where_it_settled() -> None:
    """After a flood, glibc keeps the freed pages; the trimmer gives them back once RSS has
    grown by ``growth`` since it last settled, and not again until it grows once more."""

    assert resident_bytes() > 0
    trims: list[int] = []

    async def scenario() -> None:
        task = asyncio.create_task(
            keep_heap_trimmed(interval=0.01, growth=8 * 2**20, trim=lambda: trims.append(1))
        )
        await asyncio.sleep(0.05)
        assert trims == []  # nothing grew
        ballast = bytearray(os.urandom(1024)) * (16 * 1024)  # 16 MiB, touched
        for _ in range(200):  # bounded: until the trimmer saw it
            if trims:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert trims == [1]  # once: RSS settled where it is now
        del ballast
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_the_allocator_keeps_relay_buffers_instead_of_mapping_them_anew() -> None:
    """With the thresholds ``serve`` sets, a relay's buffers (256 KiB to a few MiB, freed and
    allocated again by the thousand) are reused from the heap: no new pages, no page faults.
    At glibc's defaults the heap's top is handed back once the buffers are freed and taken
    again for the next ones, faulting its pages in anew each time."""

    def per_round(mode: str) -> tuple[str, float]:
        out = subprocess.run(
            [sys.executable, "-m", "tests.heap_probe", mode],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        tuned, faults = out.stdout.split()
        return tuned, float(faults)

    tuned, faults = per_round("tuned")
    assert tuned == "True"  # glibc: both thresholds accepted
    assert faults < 4  # 4 MiB reused: not its 1,024 pages again
    untuned, default_faults = per_round("default")
    assert untuned == "False"
    assert default_faults > 64  # what the thresholds save, per round
