"""Audit record repository, pure logic: parsing both dialects, framing, indexing, FHIR mapping,
search parameters, passwords, exports (no network)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from xca_gateway.arr import render
from xca_gateway.arr import store as st
from xca_gateway.arr.app import parse_arr_config
from xca_gateway.arr.fhir import FhirError, audit_event, parse_search, search_bundle
from xca_gateway.arr.parse import (
    FLAG_NO_XML,
    FLAG_RFC3164,
    FLAG_SOURCE_UNBOUND,
    FLAG_SYSLOG_HEADER,
    FLAG_XML_INVALID,
    parse_datetime,
    parse_record,
    patient_key,
)
from xca_gateway.arr.receiver import FrameReader, TokenBucket
from xca_gateway.arr.store import EventFilter, SqliteAuditStore
from xca_gateway.arr.web import PatientXref, ReviewUI, UiSettings, hash_password, verify_password
from xca_gateway.audit import messages as am
from xca_gateway.audit.syslog import format_message, frame
from xca_gateway.settings import ConfigError
from xca_gateway.transactions import iti38

PATIENT = "C01-1001^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
CTX = am.AuditContext(am.AuditSource("north-gw", "1.3.6.1.4.1.21367.13.70.1"), host="gw1")

RFC3881_MESSAGE = b"""<?xml version="1.0" encoding="UTF-8"?>
<AuditMessage xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <EventIdentification EventActionCode="R" EventDateTime="2009-05-28T14:02:17.123-05:00"
      EventOutcomeIndicator="0">
    <EventID code="110106" codeSystemName="DCM" displayName="Export"/>
    <EventTypeCode code="ITI-43" codeSystemName="IHE Transactions"
        displayName="Retrieve Document Set"/>
  </EventIdentification>
  <ActiveParticipant UserID="http://repo.example.org/xdsrepositoryb" AlternativeUserID="1234"
      UserIsRequestor="false" NetworkAccessPointID="10.1.1.1" NetworkAccessPointTypeCode="2">
    <RoleIDCode code="110153" codeSystemName="DCM" displayName="Source"/>
  </ActiveParticipant>
  <ActiveParticipant UserID="http://www.w3.org/2005/08/addressing/anonymous"
      UserIsRequestor="true" NetworkAccessPointID="10.1.1.2" NetworkAccessPointTypeCode="2">
    <RoleIDCode code="110152" codeSystemName="DCM" displayName="Destination"/>
  </ActiveParticipant>
  <AuditSourceIdentification AuditSourceID="REPO1" AuditEnterpriseSiteID="HOSP">
    <AuditSourceTypeCode code="4"/>
  </AuditSourceIdentification>
  <ParticipantObjectIdentification ParticipantObjectID="pat1^^^&amp;1.2.3&amp;ISO"
      ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1">
    <ParticipantObjectIDTypeCode code="2" codeSystemName="RFC-3881" displayName="Patient Number"/>
  </ParticipantObjectIdentification>
  <ParticipantObjectIdentification ParticipantObjectID="1.2.3.4.5"
      ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="3">
    <ParticipantObjectIDTypeCode code="9" codeSystemName="RFC-3881" displayName="Report Number"/>
    <ParticipantObjectDetail type="Repository Unique Id" value="MS4yLjM="/>
  </ParticipantObjectIdentification>
</AuditMessage>
"""


def dicom_query(outcome: am.EventOutcome = am.EventOutcome.SUCCESS) -> am.AuditMessage:
    return iti38.query_audit(
        CTX,
        am.Parties(
            requester=am.remote_node("10.0.0.5", certificate_subject="CN=south"),
            responder=CTX.local_node("https://north.example.org/xca/iti38"),
            human_requestors=[am.xua_requestor("dr.who", "idp.example.org", "drwho")],
            when=datetime(2026, 1, 15, 10, 22, 33, 123000, tzinfo=UTC),
        ),
        side="responding",
        query_id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d",
        query=b"<AdhocQueryRequest/>",
        home_community_id="urn:oid:1.3.6.1.4.1.21367.13.70.2",
        patient_ids=[PATIENT],
        outcome=outcome,
    )


def syslog(message: am.AuditMessage) -> bytes:
    return format_message(
        message.to_xml(),
        outcome=message.outcome,
        timestamp=message.event.date_time,
        hostname="gw1",
        app_name="xca-gateway",
        procid="42",
    )


# --------------------------------------------------------------------------- parsing


def test_dicom_message_from_our_gateway_is_fully_indexed() -> None:
    raw = syslog(dicom_query())
    record = parse_record(raw, sender="127.0.0.1", transport="tls")
    assert record.flags == ()
    assert record.raw == raw
    assert record.dialect == "dicom"
    assert record.event_id is not None and record.event_id.code == "110112"
    assert record.transaction is not None and record.transaction.code == "ITI-38"
    assert record.action == "E" and record.outcome == 0
    assert record.event_time == datetime(2026, 1, 15, 10, 22, 33, 123000, tzinfo=UTC)
    assert record.patient_ids == [PATIENT]
    assert record.community_ids == ["urn:oid:1.3.6.1.4.1.21367.13.70.2"]
    assert "10.0.0.5" in record.addresses
    # The XUA user is indexed whole and by user@issuer.
    assert "drwho<dr.who@idp.example.org>" in record.user_keys
    assert "dr.who@idp.example.org" in record.user_keys
    requestor = record.requestor
    assert requestor is not None and requestor.user_id == "drwho<dr.who@idp.example.org>"
    system = record.requesting_system
    assert system is not None and system.network_access_point_id == "10.0.0.5"
    assert record.syslog is not None and record.syslog.msgid == "IHE+RFC-3881"
    assert record.audit_source_id == "north-gw"


def test_rfc3881_message_with_bsd_syslog_header_is_understood() -> None:
    raw = b"<85>May 28 14:02:17 repo1 ATNA[99]: " + RFC3881_MESSAGE
    record = parse_record(raw, sender="10.1.1.1", transport="udp")
    assert record.dialect == "rfc3881"
    assert FLAG_RFC3164 in record.flags
    assert record.event_id is not None and record.event_id.code == "110106"
    assert record.event_id.display == "Export"
    assert record.transaction is not None and record.transaction.code == "ITI-43"
    assert record.event_time == datetime(2009, 5, 28, 19, 2, 17, 123000, tzinfo=UTC)
    assert record.patient_ids == ["pat1^^^&1.2.3&ISO"]
    assert record.other_entity_ids == ["1.2.3.4.5"]
    details = record.entities[1].details
    assert details[0].type == "Repository Unique Id" and details[0].text == "1.2.3"
    assert record.audit_sources[0].types[0].code == "4"
    assert record.syslog is not None and record.syslog.hostname == "repo1"


def test_namespaced_message_is_read_like_a_plain_one() -> None:
    xml = (
        dicom_query()
        .to_xml()
        .replace(b"<AuditMessage>", b'<AuditMessage xmlns="http://www.dcm4che.org/audit">')
    )
    record = parse_record(b"<85>1 - - - - - - " + xml, sender="x", transport="tls")
    assert record.flags == ()
    assert record.patient_ids == [PATIENT]


@pytest.mark.parametrize(
    ("raw", "flag"),
    [
        (b"garbage without any structure", FLAG_SYSLOG_HEADER),
        (b"<85>1 2026-01-01T00:00:00Z h a p m - just text, no XML", FLAG_NO_XML),
        (
            b"<85>1 2026-01-01T00:00:00Z h a p m - <AuditMessage><EventIdentification",
            FLAG_XML_INVALID,
        ),
        (
            b'<85>1 - h a p m - <?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><AuditMessage/>',
            FLAG_XML_INVALID,
        ),
        (b"<85>1 - h a p m - <Other/>", "not-audit-message"),
        (b"<85>1 - h a p m - <AuditMessage/>", "event-id-missing"),
    ],
)
def test_broken_messages_are_kept_flagged(raw: bytes, flag: str) -> None:
    record = parse_record(raw, sender="10.9.9.9", transport="udp")
    assert flag in record.flags
    assert record.raw == raw
    assert record.problem
    assert record.event_time is not None


def test_an_audit_source_id_not_bound_to_the_sender_is_flagged() -> None:
    raw = syslog(dicom_query())
    source = CTX.audit_source.audit_source_id
    for bound, flagged in (
        (None, False),
        (frozenset({source}), False),
        (frozenset({"someone-else"}), True),
        (frozenset(), True),
    ):
        record = parse_record(
            raw, sender="10.0.0.1", transport="tls", sender_identity="CN=s", bound_source_ids=bound
        )
        assert (FLAG_SOURCE_UNBOUND in record.flags) is flagged
        assert record.sender_identity == "CN=s"
        if flagged:
            assert record.problem is not None and source in record.problem
            assert "CN=s" in record.problem
    # Nothing to check against (not an audit message): flagged too, the bytes kept.
    junk = parse_record(b"junk", sender="x", transport="udp", bound_source_ids=frozenset({"a"}))
    assert FLAG_SOURCE_UNBOUND in junk.flags and junk.raw == b"junk"


def test_parser_never_raises_on_random_bytes() -> None:
    rng = random.Random(5)
    base = syslog(dicom_query())
    for _ in range(300):
        data = bytearray(base)
        for _ in range(rng.randrange(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = bytes(data[: rng.randrange(1, len(data))])
        record = parse_record(cut, sender="x", transport="udp")
        assert record.raw == cut


def test_datetime_variants() -> None:
    assert parse_datetime("2026-01-15T10:22:33Z") == datetime(2026, 1, 15, 10, 22, 33, tzinfo=UTC)
    assert parse_datetime("2026-01-15T10:22:33.123456789+01:00") == datetime(
        2026, 1, 15, 9, 22, 33, 123456, tzinfo=UTC
    )
    assert parse_datetime("2026-01-15T10:22:33") == datetime(2026, 1, 15, 10, 22, 33, tzinfo=UTC)
    assert parse_datetime("yesterday") is None


def test_patient_keys() -> None:
    assert patient_key("C1^^^&1.2.3&ISO") == "C1|1.2.3"
    assert patient_key("'C1^^^&1.2.3&ISO'") == "C1|1.2.3"
    assert patient_key("urn:oid:1.2.3|C1") == "C1|1.2.3"
    assert patient_key("C1") == "C1|"


# --------------------------------------------------------------------------- framing


def test_frame_reader_splits_octet_counted_frames_across_reads() -> None:
    messages = [syslog(dicom_query()), b"<85>1 - - - - - - second"]
    stream = b"".join(frame(m) for m in messages)
    reader = FrameReader(max_message=1 << 20)
    out = []
    for i in range(0, len(stream), 7):
        out.extend(reader.feed(stream[i : i + 7]))
    assert [f.payload for f in out] == messages
    assert all(f.problem is None for f in out)


def test_frame_reader_skips_oversize_frames_and_goes_on() -> None:
    reader = FrameReader(max_message=100)
    big = b"x" * 500
    frames = reader.feed(frame(big) + frame(b"small one"))
    assert frames[0].oversize == 500 and not frames[0].fatal
    assert frames[1].payload == b"small one"


def test_frame_reader_accepts_lf_framing_and_refuses_garbage() -> None:
    reader = FrameReader(max_message=1000)
    frames = reader.feed(b"<85>1 - - - - - - a\n<85>1 - - - - - - b\r\n")
    assert [f.payload for f in frames] == [b"<85>1 - - - - - - a", b"<85>1 - - - - - - b"]
    bad = FrameReader(max_message=1000).feed(b"GET / HTTP/1.1\r\n\r\n")
    assert bad[0].fatal and bad[0].problem and bad[0].payload.startswith(b"GET /")
    assert FrameReader(max_message=1000).feed(b"12x34 hello")[0].fatal


def test_token_bucket_limits_a_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=5)
    assert sum(bucket.take() for _ in range(20)) == 5
    assert bucket.consume(10) > 0


# --------------------------------------------------------------------------- store


@pytest.fixture
def store(tmp_path: Path) -> SqliteAuditStore:
    s = SqliteAuditStore(tmp_path / "arr.sqlite3")
    yield s  # type: ignore[misc]
    s.close()


def _records(n: int) -> list[bytes]:
    out = []
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(n):
        message = iti38.query_audit(
            CTX,
            am.Parties(
                requester=am.remote_node(f"10.0.0.{i % 3}"),
                responder=CTX.local_node("https://north/xca/iti38"),
                human_requestors=[am.xua_requestor(f"user{i % 2}", "idp")],
                when=base + timedelta(hours=i),
            ),
            side="responding",
            query_id="q",
            query=b"<q/>",
            patient_ids=[f"P{i % 4}^^^&1.2.3&ISO"],
            outcome=am.EventOutcome.SUCCESS if i % 5 else am.EventOutcome.SERIOUS_FAILURE,
        )
        out.append(syslog(message))
    return out


def test_store_filters_patient_time_user_outcome(store: SqliteAuditStore) -> None:
    raws = _records(40)
    ids = store.add([parse_record(r, sender="127.0.0.1", transport="tls") for r in raws])
    assert ids == list(range(1, 41))
    p1 = store.search(EventFilter(patients=(("P1|",),)), limit=100)
    assert len(p1) == 10 and all(r.patient == "P1^^^&1.2.3&ISO" for r in p1)
    assert [r.id for r in p1] == sorted((r.id for r in p1), reverse=True)  # newest first
    since = datetime(2026, 1, 1, 10, tzinfo=UTC)
    window = store.search(
        EventFilter(since=since, until=since + timedelta(hours=9), patients=(("P2|1.2.3",),))
    )
    assert {r.event_time.hour for r in window} == {10, 14, 18}
    failed = store.search(EventFilter(outcomes=((8,),)), limit=100)
    assert len(failed) == 8 and all(r.outcome == 8 for r in failed)
    user0 = store.search(EventFilter(users=(("user0@idp",),)), limit=100)
    assert len(user0) == 20
    both = store.search(EventFilter(users=(("user0@idp",),), patients=(("P1|",),)), limit=100)
    assert both == []  # i % 2 == 0 never has i % 4 == 1
    assert store.count(EventFilter(addresses=(("10.0.0.1",),))) == 13
    hist = store.histogram(EventFilter(patients=(("P0|",),)), 86400, "outcome")
    assert sum(n for _b, _g, n in hist) == 10
    raw = store.get(ids[0])
    assert raw is not None and raw.raw == raws[0]
    assert raw.record().patient_ids == ["P0^^^&1.2.3&ISO"]


def test_store_refuses_updates_and_deletes(store: SqliteAuditStore) -> None:
    import sqlite3

    store.add([parse_record(r, sender="x", transport="tls") for r in _records(2)])
    conn = sqlite3.connect(store.path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="read-only"):
            conn.execute("UPDATE events SET outcome = 0")
        with pytest.raises(sqlite3.DatabaseError, match="read-only"):
            conn.execute("DELETE FROM tokens")
    finally:
        conn.close()
    assert store.total() == 2


# --------------------------------------------------------------------------- FHIR


def test_audit_event_mapping_validates_as_fhir_r4() -> None:
    record = parse_record(syslog(dicom_query()), sender="127.0.0.1", transport="tls")
    object.__setattr__(record, "record_id", 7)
    resource = audit_event(record, "https://arr.example.org/fhir")
    event = AuditEvent.model_validate(resource)
    assert event.type.code == "110112"
    assert event.type.system == "http://dicom.nema.org/resources/ontology/DCM"
    assert (
        event.subtype[0].system == "urn:ihe:event-type-code" and event.subtype[0].code == "ITI-38"
    )
    assert event.outcome == "0" and event.action == "E"
    patient = next(e for e in event.entity if e.role and e.role.code == "1")
    assert patient.what.identifier.system == "urn:oid:1.3.6.1.4.1.21367.13.20.1000"
    assert patient.what.identifier.value == "C01-1001"
    query = next(e for e in event.entity if e.role and e.role.code == "24")
    assert query.query == b"<AdhocQueryRequest/>"  # fhir.resources decodes base64Binary
    assert any(a.network and a.network.address == "10.0.0.5" for a in event.agent)
    assert event.source.observer.display == "north-gw"


def test_unparsed_record_is_still_a_valid_audit_event() -> None:
    record = parse_record(b"nonsense", sender="10.9.9.9", transport="udp")
    object.__setattr__(record, "record_id", 3)
    event = AuditEvent.model_validate(audit_event(record, "https://x/fhir"))
    assert event.type.code == "unparsed"
    assert event.agent[0].network.address == "10.9.9.9"


def test_search_parameters() -> None:
    request = parse_search(
        "date=ge2026-01-01&date=lt2026-02-01&patient.identifier=urn:oid:1.2.3|P1,P2"
        "&outcome=4,8&subtype=urn:ihe:event-type-code|ITI-38&entity-role=1&_count=5&_offset=10"
    )
    flt = request.filter
    assert flt.since == datetime(2026, 1, 1, tzinfo=UTC)
    assert flt.until == datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert flt.patients == (("P1|1.2.3", "P2|"),)
    assert flt.outcomes == ((4, 8),)
    assert flt.subtypes == (("ITI-38",),)
    assert flt.entity_roles == (("1",),)
    assert (request.count, request.offset) == (5, 10)
    with pytest.raises(FhirError) as missing:
        parse_search("patient.identifier=x")
    assert missing.value.status == 400
    with pytest.raises(FhirError):
        parse_search("date=ge2026-13-45")
    with pytest.raises(FhirError):
        parse_search("date=ge2026&outcome=3")


def test_bundle_has_paging_links_and_validates() -> None:
    record = parse_record(syslog(dicom_query()), sender="127.0.0.1", transport="tls")
    object.__setattr__(record, "record_id", 1)
    request = parse_search("date=ge2026&_count=1&_offset=1")
    bundle = search_bundle(request, [record], base_url="https://a/fhir", total=3, has_more=True)
    parsed = Bundle.model_validate(bundle)
    links = {link.relation: link.url for link in parsed.link}
    assert "_offset=2" in links["next"] and "_offset=0" in links["previous"]
    assert parsed.total == 3 and parsed.entry[0].resource.id == "1"


# --------------------------------------------------------------------------- UI helpers


def test_password_hashes_verify_and_are_salted() -> None:
    first, second = hash_password("a long password"), hash_password("a long password")
    assert first != second and first.startswith("scrypt$")
    assert verify_password(first, "a long password")
    assert not verify_password(first, "a long passwore")
    assert not verify_password("garbage", "x") and not verify_password(None, "x")


def test_csv_export_neutralises_formulas() -> None:
    data = render.to_csv(["a", "b"], [['=HYPERLINK("x")', "plain"]]).decode("utf-8-sig")
    assert "'=HYPERLINK" in data and "plain" in data


def test_xref_expands_a_patient_to_every_community(tmp_path: Path) -> None:
    path = tmp_path / "xref.csv"
    path.write_text("# alice\nA1^^^&1.1&ISO,B7^^^&2.2&ISO\nC3^^^&1.1&ISO\n", encoding="utf-8")
    xref = PatientXref.load(path)
    assert set(xref.expand("A1|1.1")) == {"A1|1.1", "B7|2.2"}
    assert set(xref.expand("B7|")) == {"A1|1.1", "B7|2.2"}
    assert xref.expand("Z|") == ["Z|"]


def test_bar_chart_is_plain_svg() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    chart = render.bar_chart(
        [render.Series("ok <b>", "#009E73", [(since, 3)])],
        since=since,
        until=since + timedelta(hours=5),
        bucket=3600,
        title="t",
    )
    assert chart.total == 3 and len(chart.bars) == 1

    ui = ReviewUI(None, UiSettings(), None)  # type: ignore[arg-type]
    svg = ui.chart_svg(chart)
    assert svg.startswith("<svg") and 'class="bar"' in svg and "<script" not in svg
    # Labels go through the template's autoescaping.
    assert "ok &lt;b&gt;" in svg and "<b>" not in svg


# --------------------------------------------------------------------------- configuration


def test_arr_configuration(tmp_path: Path) -> None:
    tls = {"certificate": "c.pem", "private_key": "k.pem", "trust_store": "ca.pem"}
    config = parse_arr_config(
        {
            "tls": tls,
            "syslog": {"udp_enabled": False, "tls_port": 7514, "sender_rate": 10},
            "https": {"port": 9443},
            "communities": {"urn:oid:1.2.3": "north"},
            "ui": {"page_size": 25},
        },
        tmp_path,
    )
    assert config.tls.certificate == tmp_path / "c.pem"
    assert config.database == tmp_path / "data" / "arr.sqlite3"
    assert config.syslog_udp is None and config.syslog_tls is not None
    assert config.syslog_tls.port == 7514 and config.https.port == 9443
    assert config.limits.sender_rate == 10 and config.ui.page_size == 25
    assert config.ui.community_names == {"urn:oid:1.2.3": "north"}
    postgres = parse_arr_config({"tls": tls, "postgresql": "postgresql://x/y"}, tmp_path)
    assert postgres.database is None and postgres.postgresql == "postgresql://x/y"
    for bad in (
        {},
        {"tls": tls, "surprise": 1},
        {"tls": tls, "syslog": {"max_message_bytes": 1024}},
        {"tls": tls, "syslog": {"tls_port": 70000}},
        {"tls": tls, "syslog": {"sender_rate": -1}},
        {"tls": tls, "ui": {"colour": "red"}},
        {"tls": {**tls, "minimum_version": "1.0"}},
    ):
        with pytest.raises(ConfigError):
            parse_arr_config(bad, tmp_path)


def legacy_schema(schema: str) -> str:
    """The store's schema as it was before records kept their authenticated sender."""
    old = schema.replace(",\n    sender_identity TEXT\n);", "\n);", 1)
    old = "\n".join(line for line in old.splitlines() if "sender_identity" not in line)
    assert "sender_identity" not in old and old != schema
    return old


def legacy_insert(record_raw: bytes, placeholder: str = "?") -> tuple[str, tuple[object, ...]]:
    """An INSERT of one record as the earlier version wrote it (no sender_identity)."""

    values = st.event_values(parse_record(record_raw, sender="10.0.0.1", transport="tls"), 1)
    columns = st._INSERT_EVENT_COLUMNS.replace(", sender_identity", "")
    assert columns.count(",") + 1 == len(values) - 1
    marks = ", ".join(placeholder for _ in range(len(values) - 1))
    return f"INSERT INTO events ({columns}) VALUES ({marks})", values[:-1]


def test_a_database_from_before_the_sender_column_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    old, new = _records(2)
    conn = sqlite3.connect(path)
    conn.executescript(legacy_schema(st._SQLITE_SCHEMA))
    conn.execute(*legacy_insert(old))
    conn.commit()
    conn.close()
    store = SqliteAuditStore(path)
    try:
        kept = store.get(1)
        assert kept is not None and kept.raw == old and kept.row.sender_identity is None
        assert kept.record().patient_ids
        store.add([parse_record(new, sender="10.0.0.2", transport="tls", sender_identity="CN=n")])
        added = store.get(2)
        assert added is not None and added.row.sender_identity == "CN=n"
        assert added.record().sender_identity == "CN=n"
        assert store.count(EventFilter(sender_identities=(("CN=n",),))) == 1
        top = store.top(EventFilter(), "sender_identity")
        assert sorted(top, key=str) == sorted([(None, 1), ("CN=n", 1)], key=str)
    finally:
        store.close()
    # Opening it again is a no-op, and the records stay read-only.
    again = SqliteAuditStore(path)
    again.close()
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="read-only"):
            conn.execute("UPDATE events SET sender_identity = 'CN=forged'")
    finally:
        conn.close()
