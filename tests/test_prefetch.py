"""HL7 v2 auto-prefetch: orders over real MLLP/TCP to a real gateway, priors into a real Orthanc.

The federation of tests/test_import_priors.py (alpha local, beta foreign, Orthanc as alpha's
PACS), with ``[prefetch]`` on alpha. The sans-IO HL7 parts are tested on their own first.
"""

from __future__ import annotations

import io
import socket
import ssl
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import pydicom
import pytest

from tests.audit_inbox import AuditInbox
from tests.conftest import policy_for_tests, wait_for
from tests.test_import_priors import (
    ALICE,
    ALPHA_OID,
    BETA_HOME,
    BOB,
    CAROL,
    DAVE,
    Federation,
    federation,
    sop_uid,
    stored_instance,
)
from xca_gateway.app.gateway import Gateway
from xca_gateway.audit.validate import schema_errors
from xca_gateway.doors.hl7_prefetch import JobResult, Prefetcher, parse_prefetch_config
from xca_gateway.doors.hl7v2 import AckError, Header, build_ack, parse_order
from xca_gateway.doors.hl7v2 import local_patient_id as order_patient
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.callers import current_caller
from xca_gateway.security.dev_pki import DevPki, issue_client_certificate
from xca_gateway.settings import ConfigError
from xca_gateway.tools.dicom_samples import local_patient_id

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"


def order(
    patient_id: str,
    *,
    control_id: str | None = None,
    message_type: str = "ORM^O01",
    version: str = "2.5.1",
    name: str = "Lindqvist^Alice",
    order_control: str = "NW",
    extra: str = "",
) -> tuple[str, str]:
    """(message, control id) for an order of ``patient_id`` (the PID-3 value as sent)."""
    cid = control_id or uuid.uuid4().hex[:12]
    segments = [
        f"MSH|^~\\&|RIS|ALPHA-HOSP|XCA|ALPHA|20240601120000||{message_type}|{cid}|P|{version}",
        f"PID|1||{patient_id}||{name}||19620314|F",
        "PV1|1|O",
        f"ORC|{order_control}|PLACER-{cid}|FILLER-{cid}||SC",
        f"OBR|1|PLACER-{cid}|FILLER-{cid}|CTCHEST^CT Chest^L|||20240601",
    ]
    if extra:
        segments.append(extra)
    return "\r".join(segments) + "\r", cid


def local_cx(patient: int) -> str:
    return f"{local_patient_id(0, patient)}^^^&{ALPHA_OID}&ISO"


# ----------------------------------------------------------------------------- sans-IO


def test_order_is_parsed() -> None:
    text, cid = order(
        local_cx(ALICE) + "~X9^^^HOSP", name="Lindqvist^Alice^Maria^Jr^Dr", extra="IPC|1|2|3|4|CT"
    )
    parsed = parse_order(text)
    assert parsed.header.control_id == cid
    assert (parsed.message_type, parsed.trigger_event) == ("ORM", "O01")
    assert [p.id for p in parsed.patient_ids] == [local_patient_id(0, ALICE), "X9"]
    assert parsed.patient_name == "Lindqvist^Alice^Maria^Dr^Jr"  # XPN prefix/suffix swapped
    assert (parsed.birth_date, parsed.sex, parsed.order_control) == ("19620314", "F", "NW")
    assert parsed.modalities == ("CT",)
    assert order_patient(parsed, ALPHA_OID) == local_cx(ALICE)


def test_local_patient_id_selection() -> None:
    foreign = parse_order(order("X9^^^&1.2.3.4&ISO")[0])
    assert order_patient(foreign, ALPHA_OID) is None
    by_namespace = parse_order(order("C01-1002^^^ALPHA~X9^^^&1.2.3.4&ISO")[0])
    assert order_patient(by_namespace, ALPHA_OID) is None
    assert order_patient(by_namespace, ALPHA_OID, local_namespaces=["ALPHA"]) == local_cx(BOB)
    unqualified = parse_order(order("C01-1003")[0])
    assert order_patient(unqualified, ALPHA_OID) == local_cx(CAROL)
    assert order_patient(unqualified, ALPHA_OID, accept_unqualified=False) is None
    # The universal id wins over a namespace match.
    both = parse_order(order(f"A1^^^ALPHA~{local_cx(DAVE)}")[0])
    assert order_patient(both, ALPHA_OID, local_namespaces=["ALPHA"]) == local_cx(DAVE)


@pytest.mark.parametrize(
    ("text", "ack", "code"),
    [
        ("hello", "AR", "100"),
        (order(local_cx(ALICE), message_type="ADT^A01")[0], "AR", "200"),
        (order(local_cx(ALICE), message_type="ORM^O02")[0], "AR", "201"),
        (order(local_cx(ALICE), version="3.0")[0], "AR", "203"),
        (order(local_cx(ALICE), control_id="C1")[0].replace("|C1|P|", "||P|", 1), "AR", "101"),
        (order("")[0], "AE", "101"),
        (order(local_cx(ALICE))[0].replace("\rORC|", "\rZZZ|"), "AE", "100"),
    ],
)
def test_refusals(text: str, ack: str, code: str) -> None:
    with pytest.raises(AckError) as raised:
        parse_order(text)
    assert raised.value.ack_code == ack
    assert raised.value.condition[0] == code


def test_ack_shapes() -> None:
    now = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
    text, cid = order(local_cx(ALICE))
    header = parse_order(text).header
    accepted = hl7.parse(
        build_ack(header, "AA", now=now, control_id="A1", application="XCA", facility="alpha")
    )
    assert str(accepted.segment("MSH")[9]) == "ACK^O01^ACK"
    assert str(accepted.segment("MSH")[5]) == "RIS"  # back to the sender
    assert str(accepted.segment("MSH")[12]) == "2.5.1"
    assert [str(f) for f in accepted.segment("MSA")[1:3]] == ["AA", cid]
    error = AckError("AE", ("101", "Required field missing"), "PID-3 | empty", "PID^1^3")
    refused = hl7.parse(
        build_ack(
            header, "AE", now=now, control_id="A2", application="X", facility="a", error=error
        )
    )
    err = refused.segment("ERR")
    assert str(err[2]) == "PID^1^3"
    assert str(err[3]) == "101^Required field missing^HL70357"
    assert str(err[4]) == "E"
    assert refused.unescape(str(err[8])) == "PID-3 | empty"
    # Before 2.5: ERR-1 (ELD) and MSA-3.
    old_header = parse_order(order(local_cx(ALICE), version="2.3")[0]).header
    old = hl7.parse(
        build_ack(
            old_header, "AE", now=now, control_id="A3", application="X", facility="a", error=error
        )
    )
    assert str(old.segment("ERR")[1]) == "PID^1^3^101&Required field missing&HL70357"
    assert old.unescape(str(old.segment("MSA")[3])) == "PID-3 | empty"
    # No header at all: MSA-2 empty, still a valid ACK.
    bare = hl7.parse(build_ack(None, "AR", now=now, control_id="A4", application="X", facility="a"))
    assert [str(f) for f in bare.segment("MSA")[1:3]] == ["AR", ""]
    assert isinstance(header, Header)


def test_configuration() -> None:
    config = parse_prefetch_config(
        {
            "pacs_port": 4242,
            "pacs_ae_title": "ORTHANC",
            "port": 0,
            "accession_prefixes": {BETA_HOME: "B-"},
            "lookback_days": 365,
            "local_namespaces": ["ALPHA"],
        },
        Path("."),
    )
    assert config.pacs_host == "127.0.0.1" and config.port == 0
    assert config.tls  # mutual TLS unless turned off (on loopback only)
    plain = parse_prefetch_config(
        {"pacs_port": 4242, "pacs_ae_title": "X", "host": "localhost", "tls": False}, Path(".")
    )
    assert not plain.tls
    assert config.accession_prefixes == {BETA_HOME: "B-"}
    for bad in (
        {"pacs_ae_title": "ORTHANC"},
        {"pacs_port": 4242, "pacs_ae_title": "ORTHANC", "bogus": 1},
        {"pacs_port": 0, "pacs_ae_title": "ORTHANC"},
        {"pacs_port": 4242, "pacs_ae_title": "A" * 17},
        {"pacs_port": 4242, "pacs_ae_title": "X", "workers": 0},
        {"pacs_port": 4242, "pacs_ae_title": "X", "accession_prefixes": {"x": "Y" * 16}},
        {"pacs_port": 4242, "pacs_ae_title": "X", "lookback_days": "ten"},
        # Plain MLLP carries patient identity in the clear: loopback only.
        {"pacs_port": 4242, "pacs_ae_title": "X", "host": "0.0.0.0", "tls": False},
        {"pacs_port": 4242, "pacs_ae_title": "X", "tls": "yes"},
    ):
        with pytest.raises(ConfigError):
            parse_prefetch_config(bad, Path("."))


# ----------------------------------------------------------------------------- over MLLP

PREFETCH = """
[prefetch]
host = "127.0.0.1"
port = 0
pacs_port = {orthanc_port}
pacs_ae_title = "ORTHANC"
local_namespaces = ["ALPHA"]
dedupe_seconds = 600
"""


@dataclass
class Setup:
    fed: Federation
    prefetch: Prefetcher
    port: int
    tls: ssl.SSLContext  # the HIS/RIS side of MLLP over mutual TLS


@pytest.fixture(scope="module")
def setup(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with federation(tmp_path_factory.mktemp("prefetch"), pki, alpha_extra=PREFETCH) as fed:
        prefetch = fed.alpha.prefetch
        assert prefetch is not None
        port = fed.alpha.listening()["mllp"]
        assert port == prefetch.port and port != 0
        yield Setup(fed, prefetch, port, his_tls(pki))


def his_tls(pki: DevPki) -> ssl.SSLContext:
    return client_context(pki.ca, pki.client.cert, pki.client.key)


class MllpClient:
    def __init__(self, port: int, tls: ssl.SSLContext | None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        self.buffer = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: str) -> None:
        self.send_raw(VT + message.encode() + FS + CR)

    def receive(self) -> hl7.Message:
        while FS + CR not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed before the ACK"
            self.buffer += chunk
        block, _, self.buffer = self.buffer.partition(FS + CR)
        assert block.startswith(VT)
        return hl7.parse(block[1:].decode())

    def close(self) -> None:
        self.sock.close()


def exchange(port: int, message: str, tls: ssl.SSLContext | None) -> hl7.Message:
    client = MllpClient(port, tls)
    try:
        client.send(message)
        return client.receive()
    finally:
        client.close()


def msa(ack: hl7.Message) -> tuple[str, str]:
    segment = ack.segment("MSA")
    return str(segment[1]), str(segment[2])


def result_for(prefetch: Prefetcher, control_id: str) -> JobResult | None:
    return next((r for r in list(prefetch.recent) if r.job.control_id == control_id), None)


def jobs(setup: Setup, outcome: str) -> float:
    value = setup.fed.alpha.metrics.registry.get_sample_value(
        "xca_gateway_prefetch_jobs_total", {"outcome": outcome}
    )
    return value or 0.0


def test_order_prefetches_the_priors_into_orthanc(setup: Setup) -> None:
    text, cid = order(local_cx(ALICE), name="Lindqvist^Alice^Maria")
    ack = exchange(setup.port, text, setup.tls)
    assert msa(ack) == ("AA", cid)
    assert str(ack.segment("MSH")[9]) == "ACK^O01^ACK"
    assert wait_for(lambda: result_for(setup.prefetch, cid) is not None, timeout=120)
    result = result_for(setup.prefetch, cid)
    assert result is not None and result.ok, result
    priors = setup.fed.beta_of(ALICE)
    for study in priors:
        for path in study.files:
            data = stored_instance(setup.fed.orthanc, sop_uid(path))
            assert data is not None
            ds = pydicom.dcmread(io.BytesIO(data))
            original = pydicom.dcmread(path)
            assert ds.PatientID == local_patient_id(0, ALICE)
            assert ds.IssuerOfPatientID == ALPHA_OID
            assert ds.PatientName == "Lindqvist^Alice^Maria"  # PID-5: the local record wins
            assert ds.AccessionNumber == "BETA-" + original.AccessionNumber  # the peer's name
            assert ds.OtherPatientIDsSequence[0].PatientID == local_patient_id(1, ALICE)
            assert ds.PixelData == original.PixelData
    for study in setup.fed.alpha_of(ALICE):  # local: not imported
        assert stored_instance(setup.fed.orthanc, sop_uid(study.files[0])) is None

    # The same patient again within the window: AA, but no second job.
    duplicates = jobs(setup, "duplicate")
    again, cid2 = order(local_cx(ALICE))
    assert msa(exchange(setup.port, again, setup.tls)) == ("AA", cid2)
    assert jobs(setup, "duplicate") == duplicates + 1
    assert result_for(setup.prefetch, cid2) is None


def test_omi_with_a_namespace_identifier(setup: Setup) -> None:
    text, cid = order(
        f"{local_patient_id(0, BOB)}^^^ALPHA^MR", message_type="OMI^O23^OMI_O23", name="Haugen^Bob"
    )
    ack = exchange(setup.port, text, setup.tls)
    assert msa(ack) == ("AA", cid)
    assert str(ack.segment("MSH")[9]) == "ACK^O23^ACK"
    assert wait_for(lambda: result_for(setup.prefetch, cid) is not None, timeout=120)
    [study] = setup.fed.beta_of(BOB)
    data = stored_instance(setup.fed.orthanc, sop_uid(study.files[0]))
    assert data is not None
    assert pydicom.dcmread(io.BytesIO(data)).PatientID == local_patient_id(0, BOB)


def test_unknown_patient_is_accepted_with_nothing_to_import(setup: Setup) -> None:
    text, cid = order(local_cx(CAROL), name="Berg^Carol")  # no cross-reference to beta
    assert msa(exchange(setup.port, text, setup.tls)) == ("AA", cid)
    assert wait_for(lambda: result_for(setup.prefetch, cid) is not None, timeout=60)
    result = result_for(setup.prefetch, cid)
    assert result is not None
    assert result.nothing_to_import and result.report is not None
    assert result.report.local_studies_skipped == len(setup.fed.alpha_of(CAROL))


def test_malformed_messages_get_ae_or_ar(setup: Setup) -> None:
    client = MllpClient(setup.port, setup.tls)
    try:
        # Not HL7 at all: AR, no control id to echo.
        client.send("hello")
        ack = client.receive()
        assert msa(ack) == ("AR", "")
        assert str(ack.segment("ERR")[3]).startswith("100^")
        # An ADT: not an order, AR 200, MSA-2 echoes MSH-10.
        text, cid = order(local_cx(ALICE), message_type="ADT^A01")
        client.send(text)
        ack = client.receive()
        assert msa(ack) == ("AR", cid)
        assert str(ack.segment("ERR")[3]).startswith("200^")
        # No PID: AE 100.
        text, cid = order(local_cx(ALICE))
        client.send(text.replace("\rPID|", "\rZPI|"))
        ack = client.receive()
        assert msa(ack) == ("AE", cid)
        assert str(ack.segment("ERR")[3]).startswith("100^")
        assert str(ack.segment("ERR")[2]) == "PID"
        # A patient of another domain only: AE 204.
        text, cid = order("X9^^^&1.2.3.4&ISO")
        client.send(text)
        ack = client.receive()
        assert msa(ack) == ("AE", cid)
        assert str(ack.segment("ERR")[3]).startswith("204^")
        # Bytes outside a start block: AR; the connection stays usable.
        client.send_raw(b"junk" + FS + CR)
        assert msa(client.receive())[0] == "AR"
        text, cid = order(local_cx(DAVE), order_control="CA")  # a cancel: AA, no prefetch
        client.send(text)
        assert msa(client.receive()) == ("AA", cid)
    finally:
        client.close()
    assert result_for(setup.prefetch, cid) is None
    registry = setup.fed.alpha.metrics.registry
    assert (
        registry.get_sample_value("xca_gateway_prefetch_messages_total", {"ack": "AR"}) or 0
    ) >= 3


def test_mllp_needs_a_trusted_client_certificate(setup: Setup, pki: DevPki) -> None:
    """Plain MLLP, or TLS without a certificate, never reaches the HL7 layer; the refusal is
    reported to the gateway (for its Security Alert audit) like any refused handshake."""
    before = len(setup.fed.alpha.handshake_failures)
    text, _cid = order(local_cx(ALICE))
    plain = socket.create_connection(("127.0.0.1", setup.port), timeout=30)
    try:
        plain.sendall(VT + text.encode() + FS + CR)
        assert plain.recv(65536) == b""  # closed, no ACK
    finally:
        plain.close()
    anonymous = ssl.create_default_context(cafile=str(pki.ca))
    answer = b""
    try:
        with (
            socket.create_connection(("127.0.0.1", setup.port), timeout=30) as raw,
            anonymous.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(VT + text.encode() + FS + CR)
            # TLS 1.3: the refusal of the missing certificate shows here, as an alert or EOF.
            answer = tls.recv(65536)
    except (ssl.SSLError, ConnectionError):
        pass
    assert answer == b""  # no ACK: the order never reached the HL7 layer
    assert wait_for(lambda: len(setup.fed.alpha.handshake_failures) >= before + 2, timeout=10)
    reasons = [f.reason for f in list(setup.fed.alpha.handshake_failures)[before:]]
    assert any("certificate" in r for r in reasons), reasons


def test_the_job_runs_as_the_interface_engine_that_sent_the_order(setup: Setup) -> None:
    """The import acts for the admitted sender (the current caller of the worker's task), so
    the initiating side and its audit records name it, not the gateway itself."""

    seen: list[str | None] = []
    initiating = setup.fed.alpha.initiating
    original = initiating.query

    async def spy(element: Any) -> Any:
        principal = current_caller()
        seen.append(principal.name if principal is not None else None)
        return await original(element)

    initiating.query = spy  # type: ignore[method-assign]
    try:
        text, cid = order(local_cx(DAVE), name="Johansen^Dave")
        assert msa(exchange(setup.port, text, setup.tls)) == ("AA", cid)
        assert wait_for(lambda: result_for(setup.prefetch, cid) is not None, timeout=120)
    finally:
        initiating.query = original  # type: ignore[method-assign]
    assert seen and set(seen) == {"test-client"}


# ----------------------------------------------------------------------------- who may send


def mllp_gateway(
    gateway_factory: Callable[..., Gateway],
    name: str,
    inbox: AuditInbox,
    pacs_port: int,
    *,
    tls: bool = True,
    callers: Sequence[dict[str, Any]] = (),
) -> tuple[Gateway, int]:
    """A gateway with the prefetch door, auditing to ``inbox``; ``callers`` are added to the
    test policy."""
    policy = policy_for_tests()
    policy["callers"] = [*policy["callers"], *callers]
    gateway = gateway_factory(
        name,
        prefetch={
            "host": "127.0.0.1",
            "port": 0,
            "tls": tls,
            "pacs_port": pacs_port,
            "pacs_ae_title": "NOWHERE",
        },
        policy=policy,
        audit={
            "audit_source_id": f"{name}-mllp",
            # A record per Security Alert: these tests count refusals one by one (repeated
            # alerts of one caller are aggregated by default, see tests/test_isolation.py).
            "alert_window": 0,
            "destinations": [
                {"name": "inbox", "transport": "udp", "host": "127.0.0.1", "port": inbox.port}
            ],
        },
    )
    assert gateway.prefetch is not None
    return gateway, gateway.prefetch.port


def mllp_alerts(inbox: AuditInbox, who: str) -> list[Any]:
    """Security Alerts whose requestor's UserID contains ``who``."""
    return [
        r
        for r in inbox.with_event("110113")
        if any(
            who in str(p.get("UserID")) and p.get("UserIsRequestor") == "true"
            for p in r.iter("ActiveParticipant")
        )
    ]


def test_only_interface_engines_may_send_orders(
    gateway_factory: Callable[..., Gateway], pki: DevPki, silent_port: int
) -> None:
    """Over TLS: an unknown (trusted) certificate is closed before a byte is read; a known
    system without the interface-engine role gets one AR naming the refusal; each refused
    connection is audited once; nothing is queued for either."""
    inbox = AuditInbox()
    try:
        alpha, port = mllp_gateway(
            gateway_factory,
            "alpha",
            inbox,
            silent_port,
            callers=[
                {
                    "name": "ward-viewer",
                    "roles": ["local-consumer"],
                    "certificate_uris": ["urn:xca-gateway:client:ward-viewer"],
                }
            ],
        )
        assert alpha.prefetch is not None
        stranger = issue_client_certificate(pki, "mllp-stranger")
        viewer = issue_client_certificate(pki, "ward-viewer")
        text, cid = order(local_cx(ALICE))

        # Unknown: the TLS handshake succeeds (the CA is trusted), then the door closes.
        unknown = MllpClient(port, client_context(pki.ca, stranger.cert, stranger.key))
        try:
            unknown.send(text)
            assert unknown.sock.recv(65536) == b""  # no ACK: the HL7 layer never saw it
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            unknown.close()

        # Known, wrong role: AR echoing the order's control id, then closed.
        known = MllpClient(port, client_context(pki.ca, viewer.cert, viewer.key))
        try:
            known.send(text)
            ack = known.receive()
            assert msa(ack) == ("AR", cid)
            err = ack.segment("ERR")
            assert str(err[3]).startswith("207^")
            assert "not authorized" in str(err)
            assert known.sock.recv(65536) == b""  # and the connection is closed
        finally:
            known.close()

        # The interface engine (the test client) is served on the same door.
        engine, engine_cid = order(local_cx(BOB), name="Haugen^Bob")
        assert msa(exchange(port, engine, his_tls(pki))) == ("AA", engine_cid)
        assert alpha.guard.refused == 2
        for who in ("CN=mllp-stranger,", "CN=ward-viewer,"):
            assert wait_for(lambda who=who: len(mllp_alerts(inbox, who)) >= 1, timeout=15)
        # Both refusals are in; a third connection by the viewer is the marker that nothing
        # more is on its way for the first two.
        again = MllpClient(port, client_context(pki.ca, viewer.cert, viewer.key))
        try:
            again.send(text)
            assert msa(again.receive())[0] == "AR"
        finally:
            again.close()
        assert wait_for(lambda: len(mllp_alerts(inbox, "CN=ward-viewer,")) >= 2, timeout=15)
        assert len(mllp_alerts(inbox, "CN=mllp-stranger,")) == 1
        assert len(mllp_alerts(inbox, "CN=ward-viewer,")) == 2  # one per connection
        alert = mllp_alerts(inbox, "CN=ward-viewer,")[0]
        assert schema_errors(alert) == []
        resource = alert.find("ParticipantObjectIdentification")
        assert resource is not None
        assert resource.get("ParticipantObjectID") == f"mllp://127.0.0.1:{port}"
        # Only the interface engine's order was queued.
        queued = alpha.metrics.registry.get_sample_value(
            "xca_gateway_prefetch_jobs_total", {"outcome": "queued"}
        )
        assert queued == 1
    finally:
        inbox.close()


def test_plain_loopback_mllp_admits_by_address(
    gateway_factory: Callable[..., Gateway], silent_port: int
) -> None:
    """Plain MLLP (loopback only) has no certificate: the interface engine is the caller entry
    that lists its address; without one, the connection is closed before anything is read."""
    inbox = AuditInbox()
    try:
        _, listed = mllp_gateway(
            gateway_factory,
            "alpha",
            inbox,
            silent_port,
            tls=False,
            callers=[
                {
                    "name": "loopback-engine",
                    "roles": ["interface-engine"],
                    "addresses": ["127.0.0.1"],
                }
            ],
        )
        beta, unlisted = mllp_gateway(gateway_factory, "beta", inbox, silent_port, tls=False)
        text, cid = order(local_cx(ALICE))
        assert msa(exchange(listed, text, None)) == ("AA", cid)
        closed = MllpClient(unlisted, None)
        try:
            closed.send(text)
            assert closed.sock.recv(65536) == b""
        except ConnectionError:
            pass
        finally:
            closed.close()
        assert beta.guard.refused == 1
        assert wait_for(lambda: len(mllp_alerts(inbox, "127.0.0.1")) >= 1, timeout=15)
        [alert] = mllp_alerts(inbox, "127.0.0.1")
        description = alert.find("EventIdentification/EventOutcomeDescription")
        assert description is not None and "no certificate" in str(description.text)
    finally:
        inbox.close()


def test_full_queue_is_refused_with_ar(pki: DevPki, tmp_path: Path, silent_port: int) -> None:
    """One worker stuck on a PACS that never answers, a queue of one: the third order is AR."""
    stuck = (
        PREFETCH.replace("{orthanc_port}", str(silent_port))
        + "max_queue = 1\npacs_timeout = 3600\n"
    )
    with federation(tmp_path, pki, alpha_extra=stuck) as fed:
        prefetch = fed.alpha.prefetch
        assert prefetch is not None
        port = prefetch.port
        first, cid = order(local_cx(ALICE))
        assert msa(exchange(port, first, his_tls(pki))) == ("AA", cid)
        # The worker took it (and now waits on the silent PACS): the queue is empty again.
        assert wait_for(lambda: prefetch._queue.qsize() == 0, timeout=30)
        second, cid = order(local_cx(BOB), name="Haugen^Bob")
        assert msa(exchange(port, second, his_tls(pki))) == ("AA", cid)
        third, cid = order(local_cx(DAVE), name="Johansen^Dave")
        ack = exchange(port, third, his_tls(pki))
        assert msa(ack) == ("AR", cid)
        assert str(ack.segment("ERR")[3]).startswith("207^")
        registry = fed.alpha.metrics.registry
        full = registry.get_sample_value(
            "xca_gateway_prefetch_jobs_total", {"outcome": "queue_full"}
        )
        assert full == 1
