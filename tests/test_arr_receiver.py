"""The repository's syslog receivers over real sockets: RFC 5425 mutual TLS and RFC 5426 UDP,
fed by our own audit trail, by util-linux ``logger``, by rsyslogd as a forwarding relay, and by
hand-made hostile input (malformed frames, oversize messages, invalid XML, floods)."""

from __future__ import annotations

import asyncio
import csv
import io
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from xca_gateway.arr.app import AuditRecordRepository, create_officer, parse_arr_config
from xca_gateway.arr.fhir import EXT_AUTHENTICATED_SENDER, EXT_FLAGS, audit_event
from xca_gateway.arr.harness import RepositoryThread, dev_config
from xca_gateway.arr.store import EventFilter
from xca_gateway.audit import messages as am
from xca_gateway.audit.config import AuditConfig, AuditDestination
from xca_gateway.audit.rsyslog import free_port, gtls_available, rsyslogd_path
from xca_gateway.audit.syslog import format_message, frame
from xca_gateway.audit.trail import AuditTrail
from xca_gateway.protocol.tls import certificate_info, client_context
from xca_gateway.security.dev_pki import DevPki, init_dev_pki
from xca_gateway.settings import ConfigError
from xca_gateway.transactions import iti38

CTX = am.AuditContext(am.AuditSource("alpha-gw", "1.3.6.1.4.1.21367.13.70.1"), host="alpha")


@pytest.fixture(scope="module")
def arr_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(tmp_path_factory.mktemp("arr-pki"), ["alpha", "arr", "north"])


def bound_access(alpha_ids: list[str]) -> dict[str, Any]:
    """alpha and north are audit sources bound to their own AuditSourceIDs; the PKI's client
    is an audit consumer, not a source."""
    return {
        "callers": [
            {
                "name": "alpha gateway",
                "roles": ["audit-source"],
                "certificate_dns_names": ["alpha.xca-gateway.test"],
                "audit_source_ids": alpha_ids,
            },
            {
                "name": "north gateway",
                "roles": ["audit-source"],
                "certificate_dns_names": ["north.xca-gateway.test"],
                "audit_source_ids": ["north-gateway"],
            },
            {
                "name": "auditor",
                "roles": ["audit-consumer"],
                "certificate_uris": ["urn:xca-gateway:client:consumer"],
            },
        ]
    }


Factory = Callable[..., tuple[AuditRecordRepository, RepositoryThread]]


@pytest.fixture
def arr_factory(arr_pki: DevPki, tmp_path: Path) -> Iterator[Factory]:
    running: list[RepositoryThread] = []

    def start(**sections: Any) -> tuple[AuditRecordRepository, RepositoryThread]:
        thread = RepositoryThread(dev_config(arr_pki, tmp_path / f"arr{len(running)}", **sections))
        running.append(thread)
        return thread.__enter__(), thread

    yield start
    for thread in reversed(running):
        thread.__exit__(None, None, None)


def query_message(patient: str, n: int = 0, *, source: str | None = None) -> bytes:
    ctx = CTX if source is None else am.AuditContext(am.AuditSource(source), host="forger")
    message = iti38.query_audit(
        ctx,
        am.Parties(
            requester=am.remote_node("10.0.0.7", certificate_subject="CN=beta"),
            responder=ctx.local_node("https://alpha.example.org/xca/iti38"),
        ),
        side="responding",
        query_id=f"urn:uuid:q{n}",
        query=b"<AdhocQueryRequest/>",
        patient_ids=[patient],
    )
    return format_message(
        message.to_xml(),
        outcome=message.outcome,
        timestamp=datetime.now(UTC),
        hostname="alpha",
        app_name="xca-gateway",
        procid="1",
    )


def tls_socket(pki: DevPki, port: int, *, cert: str = "alpha") -> ssl.SSLSocket:
    if cert == "untrusted":
        pair = pki.untrusted_client
    elif cert == "expired":
        pair = pki.expired_client
    elif cert == "client":
        pair = pki.client
    else:
        pair = pki.communities[cert]
    ctx = client_context(pki.ca, pair.cert, pair.key)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def refused(pki: DevPki, port: int, cert: str, message: bytes) -> bool:
    """True if the repository would not take ``message`` over this connection: the handshake
    fails, or (TLS 1.3: the client finishes first) the server hangs up."""
    try:
        with tls_socket(pki, port, cert=cert) as tls:
            tls.sendall(frame(message))
            tls.settimeout(10)
            return tls.recv(10) == b""
    except (ssl.SSLError, OSError):
        return True


def stored(thread: RepositoryThread, repo: AuditRecordRepository, flt: EventFilter) -> int:
    thread.flush()
    return repo.store.count(flt)


def eventually_stored(
    thread: RepositoryThread, repo: AuditRecordRepository, flt: EventFilter, count: int
) -> bool:
    return wait_for(lambda: stored(thread, repo, flt) >= count, timeout=20)


# --------------------------------------------------------------------------- real senders


def test_our_audit_trail_delivers_over_tls_and_udp(
    arr_factory: Factory, arr_pki: DevPki, tmp_path: Path
) -> None:
    repo, thread = arr_factory()
    assert repo.syslog_tls is not None and repo.syslog_udp is not None
    alpha = arr_pki.communities["alpha"]
    config = AuditConfig(
        enabled=True,
        spool_dir=tmp_path / "spool",
        destinations=(
            AuditDestination(
                "arr-tls",
                "tls",
                "127.0.0.1",
                repo.syslog_tls.port,
                alpha.cert,
                alpha.key,
                arr_pki.ca,
                server_name="localhost",
            ),
            AuditDestination("arr-udp", "udp", "127.0.0.1", repo.syslog_udp.port),
        ),
        audit_source_id="alpha-gw",
        hostname="alpha",
    )

    async def send() -> None:
        trail = AuditTrail(config)
        await trail.start()
        for i in range(30):
            trail.record(
                iti38.query_audit(
                    trail.context,
                    am.Parties(
                        requester=am.remote_node("10.0.0.9", certificate_subject="CN=beta"),
                        responder=trail.context.local_node("https://alpha/xca/iti38"),
                    ),
                    side="responding",
                    query_id="q",
                    query=b"<q/>",
                    patient_ids=[f"T{i % 3}^^^&1.2.3&ISO"],
                )
            )
        await trail.flush()
        await trail.wait_delivered(30)
        await trail.stop()

    asyncio.run(send())
    # 30 queries + Application Start/Stop, over each transport.
    assert eventually_stored(thread, repo, EventFilter(), 64)
    tls_rows = repo.store.search(EventFilter(patients=(("T1|1.2.3",),)), limit=100)
    assert {r.transport for r in tls_rows} == {"tls", "udp"}
    assert len(tls_rows) == 20
    assert all(r.flags == () and r.source_id == "alpha-gw" for r in tls_rows)
    # Each record keeps who sent it: the certificate's subject, or only an address over UDP.
    alpha_subject = certificate_info(alpha.cert.read_bytes()).subject
    assert {r.sender_identity for r in tls_rows} == {alpha_subject, "udp:127.0.0.1"}
    starts = repo.store.search(EventFilter(subtypes=(("110120",),)))
    assert len(starts) == 2
    assert repo.counters.get("connections", "tls") >= 1


def test_logger_sends_rfc5424_over_udp(arr_factory: Factory) -> None:
    logger = shutil.which("logger")
    if logger is None:
        pytest.skip("util-linux logger is not installed")
    repo, thread = arr_factory()
    assert repo.syslog_udp is not None
    xml = am.application_activity(CTX, event="start", application_id="modality-7").to_xml()
    subprocess.run(
        [
            logger,
            "--rfc5424",
            "-d",
            "-n",
            "127.0.0.1",
            "-P",
            str(repo.syslog_udp.port),
            "-t",
            "modality",
            "--msgid",
            "IHE+RFC-3881",
            xml.decode("utf-8"),
        ],
        check=True,
        timeout=30,
    )
    assert eventually_stored(thread, repo, EventFilter(subtypes=(("110120",),)), 1)
    row = repo.store.search(EventFilter(subtypes=(("110120",),)))[0]
    assert row.transport == "udp" and row.flags == ()
    stored_event = repo.store.get(row.id)
    assert stored_event is not None and stored_event.record().syslog is not None
    assert stored_event.record().syslog.app_name == "modality"  # type: ignore[union-attr]


RSYSLOG_RELAY = """
global(workDirectory="{work}" maxMessageSize="256k"
  defaultNetstreamDriverCAFile="{ca}" defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{udp_port}" ruleset="relay")
ruleset(name="relay") {{
  action(type="omfwd" target="127.0.0.1" port="{arr_port}" protocol="tcp"
         StreamDriver="gtls" StreamDriverMode="1" StreamDriverAuthMode="x509/certvalid"
         TCP_Framing="octet-counted" template="RSYSLOG_SyslogProtocol23Format"
         action.resumeRetryCount="-1" queue.type="LinkedList")
}}
"""


def test_rsyslog_relays_to_the_repository_over_mutual_tls(
    arr_factory: Factory, arr_pki: DevPki, tmp_path: Path
) -> None:
    """rsyslogd (gnutls) as a third-party IHE actor's syslog client: octet-counted TLS."""

    binary = rsyslogd_path()
    if binary is None or not gtls_available():
        pytest.skip("rsyslogd with rsyslog-gnutls is not installed")
    # The relay's certificate (alpha) may report as alpha-gw only.
    repo, thread = arr_factory(access=bound_access(["alpha-gw"]))
    assert repo.syslog_tls is not None
    work = tmp_path / "rsyslog"
    work.mkdir()
    udp_port = free_port(socket.SOCK_DGRAM)
    alpha = arr_pki.communities["alpha"]
    conf = work / "rsyslog.conf"
    conf.write_text(
        RSYSLOG_RELAY.format(
            work=work,
            ca=arr_pki.ca,
            cert=alpha.cert,
            key=alpha.key,
            udp_port=udp_port,
            arr_port=repo.syslog_tls.port,
        )
    )
    log = (work / "rsyslogd.log").open("wb")
    process = subprocess.Popen(
        [binary, "-n", "-f", str(conf), "-i", str(work / "pid")],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            deadline = time.monotonic() + 20
            # rsyslog needs a moment to open its UDP input; resend until something arrives.
            while time.monotonic() < deadline and not stored(
                thread, repo, EventFilter(patients=(("RELAY|",),))
            ):
                udp.sendto(query_message("RELAY^^^&1.2.3&ISO"), ("127.0.0.1", udp_port))
                time.sleep(0.5)
            # Through the same relay, a record claiming to be north's.
            forged = query_message("FORGED^^^&1.2.3&ISO", source="north-gateway")
            udp.sendto(forged, ("127.0.0.1", udp_port))
        rows = repo.store.search(EventFilter(patients=(("RELAY|",),)))
        assert rows, (work / "rsyslogd.log").read_text(errors="replace")
        assert rows[0].transport == "tls" and rows[0].flags == ()
        alpha_subject = certificate_info(alpha.cert.read_bytes()).subject
        assert rows[0].sender_identity == alpha_subject
        assert eventually_stored(thread, repo, EventFilter(patients=(("FORGED|",),)), 1)
        (row,) = repo.store.search(EventFilter(patients=(("FORGED|",),)))
        assert row.source_id == "north-gateway" and row.sender_identity == alpha_subject
        assert row.flags == ("audit-source-unbound",) and row.source_unbound
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


# --------------------------------------------------------------------------- verbatim, bad input


def test_raw_bytes_are_kept_verbatim_and_bad_frames_flagged(
    arr_factory: Factory, arr_pki: DevPki
) -> None:
    repo, thread = arr_factory(syslog={"max_message_bytes": 40000})
    assert repo.syslog_tls is not None
    good = query_message("VERB^^^&1.2.3&ISO")
    invalid_xml = b"<85>1 2026-01-01T00:00:00Z h app 1 IHE+RFC-3881 - <AuditMessage><Event"
    no_header = b"just some text from a confused sender"
    oversize = b"<85>1 - - - - - - " + b"x" * 50000
    tail = query_message("TAIL^^^&1.2.3&ISO")
    with tls_socket(arr_pki, repo.syslog_tls.port) as tls:
        tls.sendall(frame(good) + frame(invalid_xml) + frame(no_header) + frame(oversize))
        tls.sendall(frame(tail))
        assert eventually_stored(thread, repo, EventFilter(patients=(("TAIL|",),)), 1)
        # Garbage that is not a frame at all: stored flagged, then the connection is closed.
        tls.sendall(b"HELLO THERE\r\n")
        tls.settimeout(10)
        assert tls.recv(100) == b""
    thread.flush()
    rows = repo.store.search(EventFilter(), limit=50, newest_first=False)
    raws = [repo.store.get(r.id).raw for r in rows]  # type: ignore[union-attr]
    assert good in raws and tail in raws  # byte for byte
    assert invalid_xml in raws and no_header in raws
    by_raw = {repo.store.get(r.id).raw: r for r in rows}  # type: ignore[union-attr]
    assert by_raw[good].flags == ()
    assert "xml-invalid" in by_raw[invalid_xml].flags
    assert "syslog-header-invalid" in by_raw[no_header].flags
    framing = [r for r in rows if "framing-invalid" in r.flags]
    assert len(framing) == 1
    assert repo.store.get(framing[0].id).raw.startswith(b"HELLO THERE")  # type: ignore[union-attr]
    assert not any(len(raw) > 40000 for raw in raws)
    assert repo.counters.get("refused", "oversize") == 1
    assert repo.counters.get("frames_invalid", "framing") == 1
    # The receiver keeps running for everyone else.
    with tls_socket(arr_pki, repo.syslog_tls.port) as tls:
        tls.sendall(frame(query_message("AFTER^^^&1.2.3&ISO")))
    assert eventually_stored(thread, repo, EventFilter(patients=(("AFTER|",),)), 1)


def test_legacy_lf_framing_and_truncated_frames(arr_factory: Factory, arr_pki: DevPki) -> None:
    repo, thread = arr_factory()
    assert repo.syslog_tls is not None
    with tls_socket(arr_pki, repo.syslog_tls.port) as tls:
        tls.sendall(
            query_message("LF1^^^&1.2.3&ISO") + b"\n" + query_message("LF2^^^&1.2.3&ISO") + b"\n"
        )
    assert eventually_stored(thread, repo, EventFilter(patients=(("LF1|", "LF2|"),)), 2)
    partial = query_message("CUT^^^&1.2.3&ISO")
    with tls_socket(arr_pki, repo.syslog_tls.port) as tls:
        tls.sendall(b"%d " % (len(partial) + 100) + partial)
    assert eventually_stored(thread, repo, EventFilter(flagged=True), 1)
    row = repo.store.search(EventFilter(flagged=True))[0]
    assert "truncated" in row.flags
    assert repo.store.get(row.id).raw == partial  # type: ignore[union-attr]


def test_refused_tls_clients_are_audited_as_security_alerts(
    arr_factory: Factory, arr_pki: DevPki
) -> None:
    repo, thread = arr_factory()
    assert repo.syslog_tls is not None
    for cert in ("untrusted", "expired"):
        assert refused(arr_pki, repo.syslog_tls.port, cert, query_message("NOPE^^^&1.2.3&ISO"))
    alerts = EventFilter(event_codes=(("110113",),), subtypes=(("110126",),))
    assert eventually_stored(thread, repo, alerts, 2)
    assert repo.counters.get("handshake_failures") == 2
    assert repo.store.count(EventFilter(patients=(("NOPE|",),))) == 0
    record = repo.store.get(repo.store.search(alerts)[0].id).record()  # type: ignore[union-attr]
    descriptions = record.outcome_description or ""
    assert "certificate" in descriptions
    # The refused node is named by its address; what its certificate claimed is a detail
    # marked unverified, not a participant.
    remote = next(p for p in record.participants if p.user_is_requestor)
    assert remote.user_id.startswith("127.0.0.1:") and remote.user_name is None
    assert not any("client" in (p.user_id or "") for p in record.participants)
    (node,) = record.entities
    claimed = node.detail_values(["Certificate Subject (unverified)"])
    assert claimed and "client" in claimed[0]


def test_udp_flood_from_one_sender_is_refused_with_a_counter(arr_factory: Factory) -> None:
    repo, thread = arr_factory(syslog={"sender_rate": 20, "sender_burst": 50})
    assert repo.syslog_udp is not None
    port = repo.syslog_udp.port
    message = query_message("FLOOD^^^&1.2.3&ISO")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
        for _ in range(600):
            flood.sendto(message, ("127.0.0.1", port))
    assert wait_for(lambda: repo.counters.get("received", "udp") >= 300, timeout=10)
    # Another sender (another loopback address) is not affected.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.2", 0))
        other.sendto(query_message("CALM^^^&1.2.3&ISO"), ("127.0.0.1", port))
    assert eventually_stored(thread, repo, EventFilter(patients=(("CALM|",),)), 1)
    flood_stored = stored(thread, repo, EventFilter(patients=(("FLOOD|",),)))
    refused = repo.counters.get("refused", "rate")
    assert refused > 0
    assert 50 <= flood_stored < 600
    assert (
        flood_stored + refused + repo.counters.get("dropped", "queue_full")
        == repo.counters.get("received", "udp") - 1
    )


def test_oversize_datagram_is_refused(arr_factory: Factory) -> None:
    repo, thread = arr_factory(syslog={"max_message_bytes": 32768})
    assert repo.syslog_udp is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(b"<85>1 - - - - - - " + b"y" * 40000, ("127.0.0.1", repo.syslog_udp.port))
        udp.sendto(query_message("SMALL^^^&1.2.3&ISO"), ("127.0.0.1", repo.syslog_udp.port))
    assert eventually_stored(thread, repo, EventFilter(patients=(("SMALL|",),)), 1)
    assert repo.counters.get("refused", "oversize") == 1
    assert repo.store.count(EventFilter()) == 1


def test_connection_flood_from_one_sender_is_refused(arr_factory: Factory, arr_pki: DevPki) -> None:
    repo, thread = arr_factory(syslog={"max_connections_per_sender": 2})
    assert repo.syslog_tls is not None
    held = [tls_socket(arr_pki, repo.syslog_tls.port) for _ in range(2)]
    try:
        for _ in range(3):
            assert refused(arr_pki, repo.syslog_tls.port, "alpha", b"x")
        assert repo.counters.get("connections_refused", "per_sender_limit") == 3
        held[0].sendall(frame(query_message("HELD^^^&1.2.3&ISO")))
        assert eventually_stored(thread, repo, EventFilter(patients=(("HELD|",),)), 1)
    finally:
        for s in held:
            s.close()


def test_tls_sender_over_its_rate_is_slowed_not_dropped(
    arr_factory: Factory, arr_pki: DevPki
) -> None:
    repo, thread = arr_factory(syslog={"sender_rate": 400, "sender_burst": 100})
    assert repo.syslog_tls is not None
    message = frame(query_message("RATE^^^&1.2.3&ISO"))
    with tls_socket(arr_pki, repo.syslog_tls.port) as tls:
        tls.sendall(message * 500)
    assert eventually_stored(thread, repo, EventFilter(patients=(("RATE|",),)), 500)
    assert repo.counters.get("throttled", "rate") > 0
    assert repo.counters.get("refused", "rate") == 0


def test_parse_workers_store_through_their_own_connection(
    arr_factory: Factory, arr_pki: DevPki
) -> None:
    repo, thread = arr_factory(syslog={"parse_workers": 2})
    assert repo.syslog_tls is not None
    with tls_socket(arr_pki, repo.syslog_tls.port) as tls:
        tls.sendall(b"".join(frame(query_message(f"W{i}^^^&1.2.3&ISO", i)) for i in range(200)))
        tls.sendall(frame(b"not syslog"))
    assert eventually_stored(thread, repo, EventFilter(), 201)
    assert repo.store.count(EventFilter(patients=(("W7|1.2.3",),))) == 1
    assert repo.counters.get("stored_flagged") == 1
    # Two writer processes took turns: every id once, no gaps.
    ids = sorted(r.id for r in repo.store.search(EventFilter(), limit=1000))
    assert ids == list(range(1, 202))


# --------------------------------------------------------------------------- who may send


def test_a_certificate_that_is_not_an_audit_source_is_refused_at_the_syslog_door(
    arr_factory: Factory, arr_pki: DevPki
) -> None:
    """The CA trusts the consumer certificate, but it is no audit source: its records, even
    one claiming to be north's gateway, never reach the store; the refusal is one Security
    Alert naming the verified subject."""
    repo, thread = arr_factory(access=bound_access(["alpha-gw"]))
    assert repo.syslog_tls is not None
    forged = query_message("FORGED^^^&1.2.3&ISO", source="north-gateway")
    assert refused(arr_pki, repo.syslog_tls.port, "client", forged)
    alerts = EventFilter(event_codes=(("110113",),), subtypes=(("110132",),))
    assert eventually_stored(thread, repo, alerts, 1)
    thread.flush()
    assert repo.store.count(alerts) == 1
    assert repo.store.count(EventFilter(patients=(("FORGED|",),))) == 0
    assert repo.store.count(EventFilter(sources=(("north-gateway",),))) == 0
    assert repo.counters.get("connections_refused", "not_an_audit_source") == 1
    stored_alert = repo.store.get(repo.store.search(alerts)[0].id)
    assert stored_alert is not None
    record = stored_alert.record()
    requestor = next(p for p in record.participants if p.user_is_requestor)
    assert requestor.user_id == certificate_info(arr_pki.client.cert.read_bytes()).subject
    assert [e.object_id for e in record.entities] == ["syslog-tls"]
    assert record.sender_identity == "local"
    # An audit source on the same port is unaffected.
    with tls_socket(arr_pki, repo.syslog_tls.port) as tls:
        tls.sendall(frame(query_message("OWN^^^&1.2.3&ISO")))
    assert eventually_stored(thread, repo, EventFilter(patients=(("OWN|",),)), 1)


def test_an_audit_source_reporting_as_another_is_stored_flagged_and_shown(
    arr_factory: Factory, arr_pki: DevPki
) -> None:
    """alpha is an audit source, bound to alpha-gw: what it sends as north-gateway is kept
    (an audit record is never dropped) but flagged, with alpha's subject as its sender, and
    the events list, the event page, the patient access report and its CSV say so."""
    import re

    import httpx

    repo, thread = arr_factory(access=bound_access(["alpha-gw"]))
    assert repo.syslog_tls is not None
    create_officer(repo.config, "olga", "a long enough password")
    patient = "SHOWN^^^&1.2.3&ISO"
    with tls_socket(arr_pki, repo.syslog_tls.port, cert="alpha") as tls:
        tls.sendall(
            frame(query_message(patient, 1))
            + frame(query_message(patient, 2, source="north-gateway"))
        )
    with tls_socket(arr_pki, repo.syslog_tls.port, cert="north") as tls:
        tls.sendall(frame(query_message(patient, 3, source="north-gateway")))
    assert eventually_stored(thread, repo, EventFilter(patients=(("SHOWN|",),)), 3)
    rows = repo.store.search(EventFilter(patients=(("SHOWN|",),)), newest_first=False)
    subject = {
        n: certificate_info(arr_pki.communities[n].cert.read_bytes()).subject
        for n in ("alpha", "north")
    }
    by_sender = {(r.sender_identity, r.source_id): r for r in rows}
    assert set(by_sender) == {
        (subject["alpha"], "alpha-gw"),
        (subject["alpha"], "north-gateway"),
        (subject["north"], "north-gateway"),
    }
    forged = by_sender[(subject["alpha"], "north-gateway")]
    assert forged.flags == ("audit-source-unbound",)
    assert not by_sender[(subject["alpha"], "alpha-gw")].flags
    assert not by_sender[(subject["north"], "north-gateway")].flags
    assert repo.store.count(EventFilter(flagged=True, patients=(("SHOWN|",),))) == 1
    stored_forged = repo.store.get(forged.id)
    assert stored_forged is not None
    assert "north-gateway" in (stored_forged.record().problem or "")
    assert "audit-source-unbound" in stored_forged.record().flags

    extensions = {
        x["url"]: x["valueString"]
        for x in audit_event(stored_forged.record(), repo.fhir_base)["extension"]
        if "valueString" in x
    }
    assert extensions[EXT_AUTHENTICATED_SENDER] == subject["alpha"]
    assert extensions[EXT_FLAGS] == "audit-source-unbound"

    anonymous = ssl.create_default_context(cafile=str(arr_pki.ca))
    with httpx.Client(verify=anonymous, timeout=30, base_url=repo.base_url) as ui:
        page = ui.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        ui.post(
            "/login",
            data={"csrf": token.group(1), "username": "olga", "password": "a long enough password"},
        )
        events = ui.get("/events", params={"patient": patient}).text
        rows_html = re.findall(r'<tr class="[^"]*" data-id="(\d+)">(.*?)</tr>', events, re.S)
        flagged_rows = {int(i) for i, row in rows_html if "not bound to its sender" in row}
        assert flagged_rows == {forged.id}
        assert subject["alpha"] in events and subject["north"] in events
        detail = ui.get(f"/events/{forged.id}").text
        assert "north-gateway: NOT bound to this sender" in detail
        assert subject["alpha"] in detail
        report = ui.get("/report", params={"patient": patient}).text
        assert re.search(r'id="r-unbound">1<', report)
        assert report.count("not bound to its sender") == 1
        table = ui.get("/report.csv", params={"patient": patient}).text
        lines = list(csv.DictReader(io.StringIO(table.lstrip("\ufeff"))))
        assert {(r["audit_source"], r["sender"], r["audit_source_bound"]) for r in lines} == {
            ("alpha-gw", subject["alpha"], "yes"),
            ("north-gateway", subject["alpha"], "no"),
            ("north-gateway", subject["north"], "yes"),
        }


def test_udp_syslog_is_off_unless_enabled(arr_factory: Factory, tmp_path: Path) -> None:
    tls = {"certificate": "a.pem", "private_key": "a.key", "trust_store": "ca.pem"}
    assert parse_arr_config({"tls": tls}, tmp_path).syslog_udp is None
    with pytest.raises(ConfigError, match="udp_enabled"):
        parse_arr_config({"tls": tls, "syslog": {"udp_port": 514}}, tmp_path)
    on = parse_arr_config({"tls": tls, "syslog": {"udp_enabled": True}}, tmp_path)
    assert on.syslog_udp is not None and on.syslog_udp.port == 514
    repo, _thread = arr_factory(syslog={"udp_enabled": False})
    assert repo.syslog_udp is None and "syslogUdp" not in repo.endpoints()


def test_a_frame_trickled_slower_than_frame_timeout_ends_the_connection(
    arr_factory: Factory, arr_pki: DevPki
) -> None:
    """Issue #16: once a frame has begun it must be complete within frame_timeout, however
    long the connection may idle between frames."""
    repo, _thread = arr_factory(syslog={"frame_timeout": 0.5})
    assert repo.syslog_tls is not None
    with tls_socket(arr_pki, repo.syslog_tls.port) as tls:
        message = frame(query_message("SLOW^^^&1.2.3&ISO"))
        tls.sendall(message[:20])  # the length and the first bytes, then nothing more
        tls.settimeout(10)
        assert tls.recv(10) == b""  # closed by the repository
    assert repo.counters.get("frames_invalid", "truncated") == 1
