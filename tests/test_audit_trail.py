"""The audit trail end to end against a real rsyslogd (Debian rsyslog + rsyslog-gnutls) acting as
Audit Record Repository: syslog over mutual TLS (RFC 5425) and UDP (RFC 5426), outages, a
SIGKILLed gateway, refused client certificates, Security Alerts from refused handshakes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.conftest import wait_for
from tests.test_audit_messages import MESSAGES
from tests.test_server import ADHOC_QUERY, consumer, post, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.audit import AuditConfig, extract, parse_audit_config
from xca_gateway.audit import messages as m
from xca_gateway.audit.rsyslog import RsyslogRepository, gtls_available, rsyslogd_path
from xca_gateway.audit.syslog import parse_message
from xca_gateway.audit.trail import AuditTrail, soap_requester
from xca_gateway.audit.validate import schema_errors
from xca_gateway.metrics import GatewayMetrics
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.soap_service import Operation, SoapRequest, SoapResponse
from xca_gateway.protocol.tls import certificate_info, client_context
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.settings import ConfigError, TlsConfig
from xca_gateway.transactions import TRANSACTIONS, iti38, unavailable_handler

BASE = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)


@pytest.fixture
def rsyslog(pki: DevPki, tmp_path: Path) -> Iterator[RsyslogRepository]:
    if rsyslogd_path() is None:
        pytest.skip("rsyslogd is not installed (Debian package rsyslog)")
    if not gtls_available():
        pytest.skip("rsyslog's TLS driver is not installed (Debian package rsyslog-gnutls)")
    workdir = tmp_path / "arr"
    workdir.mkdir()
    repo = RsyslogRepository(
        workdir, pki.ca, pki.communities["gamma"].cert, pki.communities["gamma"].key
    )
    repo.check_config()
    repo.start()
    yield repo
    repo.stop()


def _tls(pki: DevPki, name: str = "alpha") -> TlsConfig:
    pair = pki.communities[name]
    return TlsConfig(certificate=pair.cert, private_key=pair.key, trust_store=pki.ca)


def _config(
    pki: DevPki,
    tmp_path: Path,
    repo: RsyslogRepository,
    *,
    udp: bool = False,
    spool: str = "spool",
    **audit: Any,
) -> AuditConfig:
    destinations: list[dict[str, Any]] = [
        {"name": "arr", "transport": "tls", "host": "127.0.0.1", "port": repo.tls_port}
    ]
    if udp:
        destinations.append(
            {"name": "arr-udp", "transport": "udp", "host": "127.0.0.1", "port": repo.udp_port}
        )
    table = {
        "audit_source_id": "alpha-gateway",
        "enterprise_site_id": "1.3.6.1.4.1.21367.13.70.1",
        "spool_dir": spool,
        "reconnect_min": 0.05,
        "reconnect_max": 0.3,
        "ack_delay": 0.2,
        "destinations": destinations,
        **audit,
    }
    return parse_audit_config(table, tmp_path, tmp_path / "data", _tls(pki))


def _query(ctx: m.AuditContext, n: int) -> m.AuditMessage:
    """A distinct, recognisable audit message per number."""
    return iti38.query_audit(
        ctx,
        m.Parties(
            requester=m.remote_node("127.0.0.1", certificate_subject="CN=beta"),
            responder=ctx.local_node("https://alpha.example/xca/iti38"),
            when=BASE + timedelta(milliseconds=n),
        ),
        side="responding",
        query_id=f"urn:uuid:00000000-0000-0000-0000-{n:012d}",
        query=b"<AdhocQueryRequest/>" * 20,
        patient_ids=[f"P{n}^^^&1.2.3&ISO"],
    )


def _code(root: etree._Element, path: str) -> str | None:
    found = root.find(path)
    return None if found is None else found.get("csd-code")


async def _received(
    repo: RsyslogRepository, count: int, transport: str = "tls", timeout: float = 60.0
) -> list[bytes]:
    return await asyncio.to_thread(repo.wait_for, count, timeout, transport)


async def test_every_transaction_both_sides_reaches_rsyslog_over_tls_and_udp(
    pki: DevPki, tmp_path: Path, rsyslog: RsyslogRepository
) -> None:
    trail = AuditTrail(_config(pki, tmp_path, rsyslog, udp=True))
    await trail.start(application_activity_events=False)
    start = trail.application_activity("start")
    messages = [start, *MESSAGES.values()]
    for message in messages:
        trail.record(message)
    await trail.wait_delivered(60)
    await trail.stop(application_activity_events=False)
    expected = [trail._format(msg) for msg in messages]

    tls = await _received(rsyslog, len(expected), "tls")
    # Every record exactly once, in order, byte for byte.
    assert tls == expected
    udp = await _received(rsyslog, len(expected), "udp")
    assert sorted(udp) == sorted(expected)

    for raw, message in zip(tls, messages, strict=True):
        parsed = parse_message(raw)
        assert parsed.msgid == "IHE+RFC-3881"
        assert parsed.app_name == "xca-gateway"
        assert parsed.priority == 80 + {0: 5, 4: 4, 8: 3, 12: 2}[int(message.outcome)]
        assert schema_errors(parsed.xml) == [], parsed.xml[:200]
        root = etree.fromstring(parse_message(raw).xml)
        assert _code(root, "EventIdentification/EventID") == message.event.event_id.code


async def test_application_start_and_stop_are_audited(
    pki: DevPki, tmp_path: Path, rsyslog: RsyslogRepository
) -> None:
    trail = AuditTrail(_config(pki, tmp_path, rsyslog))
    trail.application_id = "https://alpha.example"
    await trail.start()
    await trail.stop()
    received = await _received(rsyslog, 2)
    types = []
    for raw in received:
        root = etree.fromstring(parse_message(raw).xml)
        assert root.findtext("EventIdentification/EventID") == ""
        assert _code(root, "EventIdentification/EventID") == "110100"
        types.append(_code(root, "EventIdentification/EventTypeCode"))
        assert root.find("ActiveParticipant").get("UserID") == "https://alpha.example"  # type: ignore[union-attr]
        assert _code(root, "ActiveParticipant/RoleIDCode") == "110150"
    assert types == ["110120", "110121"]


async def test_outage_records_arrive_exactly_once_in_order(
    pki: DevPki, tmp_path: Path, rsyslog: RsyslogRepository
) -> None:
    trail = AuditTrail(_config(pki, tmp_path, rsyslog))
    await trail.start(application_activity_events=False)
    ctx = trail.context
    before = [_query(ctx, n) for n in range(5)]
    trail.record(before)
    await trail.wait_delivered(30)

    await asyncio.to_thread(rsyslog.stop)
    sender = trail._senders[0]
    during = [_query(ctx, n) for n in range(5, 305)]
    for message in during:
        trail.record(message)
    await trail.flush()
    # The repository is down: the sender notices, records wait in the spool.
    async with asyncio.timeout(30):
        while sender.up or sender.last_problem is None:
            await asyncio.sleep(0.05)
    assert trail.spool.pending("arr") == len(during)
    await asyncio.sleep(1.0)  # a few failed reconnects
    assert trail.spool.pending("arr") == len(during)

    await asyncio.to_thread(rsyslog.start)
    await trail.wait_delivered(60)
    after = [_query(ctx, 305)]
    trail.record(after)
    await trail.stop(application_activity_events=False)

    expected = [trail._format(msg) for msg in before + during + after]
    received = await _received(rsyslog, len(expected))
    assert len(received) == len(expected)
    assert received == expected
    assert sender.connections >= 2


_SIGKILL_CHILD = r"""
import asyncio, json, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from xca_gateway.audit import AuditTrail, parse_audit_config
from xca_gateway.audit import messages as m
from xca_gateway.settings import TlsConfig
from xca_gateway.transactions import iti38

args = json.loads(sys.argv[1])
tls = TlsConfig(Path(args["cert"]), Path(args["key"]), Path(args["ca"]))
config = parse_audit_config(args["audit"], Path(args["base"]), Path(args["base"]), tls)
base = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)

def query(ctx, n):
    return iti38.query_audit(
        ctx,
        m.Parties(
            requester=m.remote_node("127.0.0.1", certificate_subject="CN=beta"),
            responder=ctx.local_node("https://alpha.example/xca/iti38"),
            when=base + timedelta(milliseconds=n),
        ),
        side="responding",
        query_id=f"urn:uuid:00000000-0000-0000-0000-{n:012d}",
        query=b"<AdhocQueryRequest/>" * 20,
        patient_ids=[f"P{n}^^^&1.2.3&ISO"],
    )

async def main():
    trail = AuditTrail(config)
    await trail.start(application_activity_events=False)
    n = 0
    while True:
        for _ in range(50):
            trail.record(query(trail.context, n))
            n += 1
        await trail.flush()
        print(n, flush=True)

asyncio.run(main())
"""


async def test_sigkilled_gateway_loses_nothing_after_restart(
    pki: DevPki, tmp_path: Path, rsyslog: RsyslogRepository
) -> None:
    await asyncio.to_thread(rsyslog.stop)
    config = _config(pki, tmp_path, rsyslog)
    alpha = pki.communities["alpha"]
    args = {
        "cert": str(alpha.cert),
        "key": str(alpha.key),
        "ca": str(pki.ca),
        "base": str(tmp_path),
        "audit": {
            "spool_dir": str(config.spool_dir),
            "audit_source_id": config.audit_source_id,
            "enterprise_site_id": config.enterprise_site_id,
            "hostname": config.hostname,
            "destinations": [
                {"name": "arr", "transport": "tls", "host": "127.0.0.1", "port": rsyslog.tls_port}
            ],
        },
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _SIGKILL_CHILD, json.dumps(args)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert child.stdout is not None

    def committed_then_kill() -> int:
        assert child.stdout is not None
        done = 0
        try:
            for line in child.stdout:
                done = int(line)
                if done >= 500:
                    break
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            child.stdout.close()
        return done

    committed = await asyncio.to_thread(committed_then_kill)
    assert committed >= 500
    assert child.returncode == -signal.SIGKILL

    await asyncio.to_thread(rsyslog.start)
    trail = AuditTrail(config)
    await trail.start(application_activity_events=False)
    spooled = trail.spool.last_seq
    assert spooled >= committed
    await trail.wait_delivered(60)
    await trail.stop(application_activity_events=False)

    received = await _received(rsyslog, spooled)
    assert len(received) == spooled
    ctx = trail.context
    # The child's process id is in its records; compare the rest of each record.
    for n, raw in enumerate(received):
        xml = parse_message(raw).xml
        assert f"-{n:012d}".encode() in xml
        assert schema_errors(xml) == []
    assert ctx.process_id != str(child.pid)


async def test_repository_refusing_our_certificate_gets_nothing_and_loses_nothing(
    pki: DevPki, tmp_path: Path, rsyslog: RsyslogRepository
) -> None:
    untrusted = {
        "certificate": str(pki.untrusted_client.cert),
        "private_key": str(pki.untrusted_client.key),
        "trust_store": str(pki.ca),
    }
    bad = _config(pki, tmp_path, rsyslog)
    bad = parse_audit_config(
        {
            "spool_dir": "spool",
            "reconnect_min": 0.05,
            "reconnect_max": 0.2,
            "ack_delay": 0.2,
            "destinations": [
                {
                    "name": "arr",
                    "transport": "tls",
                    "host": "127.0.0.1",
                    "port": rsyslog.tls_port,
                    **untrusted,
                }
            ],
        },
        tmp_path,
        tmp_path,
        _tls(pki),
    )
    trail = AuditTrail(bad)
    await trail.start(application_activity_events=False)
    messages = [_query(trail.context, n) for n in range(20)]
    trail.record(messages)
    await trail.flush()
    sender = trail._senders[0]
    async with asyncio.timeout(30):
        while sender.connections < 3:
            await asyncio.sleep(0.05)
    assert trail.spool.pending("arr") == 20
    await trail.stop(application_activity_events=False, drain_timeout=0.5)
    assert rsyslog.messages() == []

    # With the right certificate, the same spool is delivered in full.
    good = AuditTrail(_config(pki, tmp_path, rsyslog))
    await good.start(application_activity_events=False)
    await good.wait_delivered(60)
    await good.stop(application_activity_events=False)
    assert await _received(rsyslog, 20) == [good._format(msg) for msg in messages]


async def test_refused_handshake_at_the_gateway_becomes_a_security_alert(
    pki: DevPki,
    tmp_path: Path,
    rsyslog: RsyslogRepository,
    gateway_factory: Callable[..., Gateway],
) -> None:
    gateway = gateway_factory("alpha")
    trail = AuditTrail(_config(pki, tmp_path, rsyslog))
    trail.application_id = gateway.base_url
    await trail.start(application_activity_events=False)
    gateway.add_handshake_listener(trail.on_handshake_failure)

    def refused_client() -> None:
        ctx = client_context(pki.ca, pki.expired_client.cert, pki.expired_client.key)
        raw = socket.create_connection(("127.0.0.1", gateway.https.port), timeout=5)
        with (
            raw,
            pytest.raises((ssl.SSLError, ConnectionError, OSError)),
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            if not tls.recv(1024):
                raise ConnectionError("closed by the server")

    await asyncio.to_thread(refused_client)
    assert await asyncio.to_thread(wait_for, lambda: len(gateway.handshake_failures) == 1)
    await trail.flush()
    await trail.wait_delivered(30)
    await trail.stop(application_activity_events=False)
    (raw,) = await _received(rsyslog, 1)
    xml = parse_message(raw).xml
    assert schema_errors(xml) == []
    root = etree.fromstring(xml)
    assert _code(root, "EventIdentification/EventID") == "110113"
    assert _code(root, "EventIdentification/EventTypeCode") == "110126"
    reporter, remote = root.findall("ActiveParticipant")
    assert reporter.get("UserID") == gateway.base_url
    assert remote.get("NetworkAccessPointID") == "127.0.0.1"
    # Named by its address (all that was verified); the expired certificate's subject is a
    # detail marked unverified.
    assert re.fullmatch(r"127\.0\.0\.1:\d+", remote.get("UserID") or "")
    assert remote.get("UserName") is None
    detail = root.find("ParticipantObjectIdentification/ParticipantObjectDetail[2]")
    assert detail is not None and detail.get("type") == "Certificate Subject (unverified)"
    assert b"expired" in base64.b64decode(detail.get("value") or "")
    assert "expired" in (root.findtext("EventIdentification/EventOutcomeDescription") or "")


async def test_metrics_in_the_gateway_registry(
    pki: DevPki, tmp_path: Path, rsyslog: RsyslogRepository
) -> None:
    metrics = GatewayMetrics()
    trail = AuditTrail(_config(pki, tmp_path, rsyslog), metrics)
    await trail.start(application_activity_events=False)
    trail.record([_query(trail.context, n) for n in range(3)])
    await trail.flush()
    await trail.wait_delivered(30)
    text = metrics.render().decode()
    assert "xca_gateway_audit_records_spooled_total 3.0" in text
    assert 'xca_gateway_audit_records_sent_total{destination="arr"} 3.0' in text
    assert 'xca_gateway_audit_records_pending{destination="arr"} 0.0' in text
    assert 'xca_gateway_audit_destination_up{destination="arr"} 1.0' in text
    assert "xca_gateway_audit_spool_alarm 0.0" in text
    await trail.stop(application_activity_events=False)


async def test_full_queue_blocks_briefly_then_counts_the_drop(tmp_path: Path, pki: DevPki) -> None:
    config = parse_audit_config(
        {
            "queue_size": 2,
            "queue_block_seconds": 0.01,
            "destinations": [{"name": "arr", "host": "127.0.0.1", "port": 9}],
        },
        tmp_path,
        tmp_path,
        _tls(pki),
    )
    trail = AuditTrail(config, GatewayMetrics())
    ctx = trail.context
    # Not started: nothing drains the queue.
    for n in range(5):
        trail.record(_query(ctx, n))
    assert trail.dropped == {"queue_full": 3}
    disabled = AuditTrail(parse_audit_config({}, tmp_path, tmp_path, _tls(pki)))
    disabled.record(_query(ctx, 0))
    await disabled.start()
    await disabled.stop()
    assert disabled.dropped == {}


async def test_spool_limit_drops_loudly(
    pki: DevPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_audit_config(
        {
            "max_spool_bytes": 64 * 1024 * 4,
            "warn_spool_bytes": 64 * 1024,
            "destinations": [{"name": "arr", "host": "127.0.0.1", "port": 9}],
            "reconnect_min": 5.0,
        },
        tmp_path,
        tmp_path,
        _tls(pki),
    )
    metrics = GatewayMetrics()
    trail = AuditTrail(config, metrics)
    await trail.start(application_activity_events=False)
    for n in range(300):
        trail.record(_query(trail.context, n))
    await trail.flush()
    assert trail.spool.alarm
    assert trail.dropped["spool_full"] > 0
    assert trail.spooled + trail.dropped["spool_full"] == 300
    text = metrics.render().decode()
    assert "xca_gateway_audit_spool_alarm 1.0" in text
    assert 'xca_gateway_audit_records_dropped_total{reason="spool_full"}' in text
    assert "AUDIT RECORDS LOST" in caplog.text
    assert "above the warning threshold" in caplog.text
    await trail.stop(application_activity_events=False, drain_timeout=0)


def test_parse_audit_config(tmp_path: Path, pki: DevPki) -> None:
    tls = _tls(pki)
    config = parse_audit_config(
        {
            "destinations": [
                {"name": "main", "host": "arr.example.org"},
                {"name": "copy", "transport": "udp", "host": "10.0.0.5"},
                {"name": "other", "host": "arr2", "port": 7000, "trust_store": "ca/other.pem"},
            ]
        },
        tmp_path,
        tmp_path / "data",
        tls,
    )
    assert config.enabled
    assert config.spool_dir == tmp_path / "data" / "audit-spool"
    main, copy, other = config.destinations
    assert (main.transport, main.port, main.certificate, main.trust_store) == (
        "tls",
        6514,
        tls.certificate,
        tls.trust_store,
    )
    assert (copy.transport, copy.port, copy.certificate) == ("udp", 514, None)
    assert other.trust_store == tmp_path / "ca" / "other.pem"
    assert not parse_audit_config({}, tmp_path, tmp_path, tls).enabled
    bad: list[dict[str, Any]] = [
        {"enabled": True},
        {"destinations": [{"host": "a", "transport": "tcp"}]},
        {"destinations": [{"name": "x", "host": "a"}, {"name": "x", "host": "b"}]},
        {"destinations": [{"name": "../x", "host": "a"}]},
        {"destinations": [{"host": "a", "port": 0}]},
        {"destinations": [{"host": "a", "colour": "red"}]},
        {"destinations": [{"host": "a"}], "max_spool_bytes": 1000, "warn_spool_bytes": 2000},
        {"destinations": [{"host": "a"}], "ack_delay": -1},
        {"destinations": [{"host": "a"}], "nonsense": 1},
        {"destinations": {"host": "a"}},
    ]
    for table in bad:
        with pytest.raises(ConfigError):
            parse_audit_config(table, tmp_path, tmp_path, tls)


async def test_a_handler_audits_a_real_iti38_request(
    pki: DevPki,
    tmp_path: Path,
    rsyslog: RsyslogRepository,
    gateway_factory: Callable[..., Gateway],
) -> None:
    """The wiring pattern: a responding-side handler audits what it answered, with the
    requester's certificate subject and address, the query and the patient."""

    gateway = gateway_factory("alpha")
    trail = AuditTrail(_config(pki, tmp_path, rsyslog))
    await trail.start(application_activity_events=False)
    spec = next(s for s in TRANSACTIONS if s.key == "iti38")
    inner = unavailable_handler(spec, "urn:oid:1.3.6.1.4.1.21367.13.70.1", "test")
    endpoint_url = gateway.endpoint_urls()["iti38"]

    async def audited(request: SoapRequest) -> SoapResponse:
        response = await inner(request)
        query = extract.stored_query(request.payload)
        trail.record(
            iti38.query_audit(
                trail.context,
                m.Parties(
                    requester=soap_requester(request), responder=trail.local_node(endpoint_url)
                ),
                side="responding",
                query_id=query.query_id,
                query=query.query,
                home_community_id=query.home_community_id,
                patient_ids=query.patient_ids,
                outcome=m.EventOutcome.SUCCESS
                if response.outcome == "success"
                else m.EventOutcome.SERIOUS_FAILURE,
            )
        )
        return response

    gateway.endpoints["iti38"].add(Operation(spec.action, spec.name, audited))

    def call() -> int:
        with consumer(pki) as client:
            return post(client, endpoint_url, soap12(Action.ITI38, ADHOC_QUERY)).status_code

    assert await asyncio.to_thread(call) == 200
    await trail.wait_delivered(30)
    await trail.stop(application_activity_events=False)
    (raw,) = await _received(rsyslog, 1)
    xml = parse_message(raw).xml
    assert schema_errors(xml) == []
    root = etree.fromstring(xml)
    assert root.find("EventIdentification").get("EventOutcomeIndicator") == "8"  # type: ignore[union-attr]
    source, destination = root.findall("ActiveParticipant")
    consumer_subject = certificate_info(pki.client.cert.read_bytes()).subject
    assert source.get("UserID") == consumer_subject
    assert source.get("NetworkAccessPointID") == "127.0.0.1"
    assert destination.get("UserID") == endpoint_url
    assert destination.get("AlternativeUserID") == trail.context.process_id
    patient, query = root.findall("ParticipantObjectIdentification")
    assert patient.get("ParticipantObjectID") == "C01-1001^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
    assert query.get("ParticipantObjectID") == "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"


async def test_udp_repository_down_is_noticed_and_records_are_sent_again(
    pki: DevPki, tmp_path: Path, rsyslog: RsyslogRepository
) -> None:
    """On a connected UDP socket the ICMP "port unreachable" of a stopped repository marks it
    down, so the datagrams it never got are not acknowledged and go again."""
    udp_only = parse_audit_config(
        {
            "spool_dir": "spool-udp",
            "reconnect_min": 0.05,
            "reconnect_max": 0.3,
            "ack_delay": 0.3,
            "destinations": [
                {"name": "udp", "transport": "udp", "host": "127.0.0.1", "port": rsyslog.udp_port}
            ],
        },
        tmp_path,
        tmp_path,
        _tls(pki),
    )
    await asyncio.to_thread(rsyslog.stop)
    trail = AuditTrail(udp_only)
    await trail.start(application_activity_events=False)
    messages = [_query(trail.context, n) for n in range(30)]
    trail.record(messages)
    await trail.flush()
    sender = trail._senders[0]
    async with asyncio.timeout(30):
        while sender.last_problem is None:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert trail.spool.pending("udp") == 30
    await asyncio.to_thread(rsyslog.start)
    await trail.wait_delivered(60)
    await trail.stop(application_activity_events=False)
    received = await _received(rsyslog, 30, "udp")
    assert sorted(received) == sorted(trail._format(msg) for msg in messages)
