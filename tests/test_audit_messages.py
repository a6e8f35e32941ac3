"""DICOM audit messages (ITI-20): every builder's output against the DICOM audit schema, and the
IHE field values per transaction and side."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from lxml import etree

from xca_gateway.audit import extract
from xca_gateway.audit import messages as m
from xca_gateway.audit.validate import AuditSchemaError, schema_errors, validate
from xca_gateway.protocol.namespaces import QUERY as QUERY_NS
from xca_gateway.protocol.namespaces import RIM, XDSB, XDSI, ResponseStatus
from xca_gateway.transactions import iti18, iti38, iti39, iti42, iti43, iti45, iti55, rad69, rad75

WHEN = datetime(2026, 1, 15, 10, 22, 33, 123456, tzinfo=UTC)
CTX = m.AuditContext(
    m.AuditSource("alpha-gateway", "1.3.6.1.4.1.21367.13.70.1"), host="gw1", process_id="4711"
)
IG = CTX.local_node("https://alpha.example/ig")
RG = m.remote_node(
    "192.0.2.7", user_id="https://beta.example/xca/iti38", certificate_subject="CN=beta,O=x"
)
USER = m.xua_requestor(
    "dr.smith", "https://idp.example", roles=[m.CodedValue("46255001", "SNOMED-CT", "Pharmacist")]
)
PURPOSE = m.CodedValue("TREATMENT", "2.16.840.1.113883.3.18.7.1", "Treatment")
PATIENT = "P123^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
QUERY = (
    b'<query:AdhocQueryRequest xmlns:query="urn:x"><AdhocQuery id="urn:uuid:14d4"/>'
    b"</query:AdhocQueryRequest>"
)
HCID = "urn:oid:1.3.6.1.4.1.21367.13.70.2"
DOC = m.DocumentReference("1.2.3.4.100", "1.3.6.1.4.1.21367.13.80.2", HCID)
DOC2 = m.DocumentReference("1.2.3.4.101", "1.3.6.1.4.1.21367.13.80.2", HCID)
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
INSTANCES = (
    m.ImagingInstanceReference("1.2.3.9", "1.2.3.9.1", "1.2.3.9.1.1", CT, "1.3.6.1.4.1.1", HCID),
    m.ImagingInstanceReference("1.2.3.9", "1.2.3.9.1", "1.2.3.9.1.2", CT, "1.3.6.1.4.1.1", HCID),
    m.ImagingInstanceReference("1.2.3.9", "1.2.3.9.2", "1.2.3.9.2.1", MR, "1.3.6.1.4.1.1", HCID),
    m.ImagingInstanceReference("1.2.3.8", "1.2.3.8.1", "1.2.3.8.1.1", CT, "1.3.6.1.4.1.1", HCID),
)


def _all_messages() -> dict[str, m.AuditMessage]:
    """One message (or more) from every builder, each side, with every optional part."""
    asked = m.Parties(IG, RG, human_requestors=[USER], purposes_of_use=[PURPOSE], when=WHEN)
    common_query: dict[str, Any] = dict(
        query_id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d",
        query=QUERY,
        patient_ids=[PATIENT],
    )
    out: dict[str, m.AuditMessage] = {}
    for side in ("initiating", "responding"):
        out[f"iti38-{side}"] = iti38.query_audit(
            CTX, asked, side=side, home_community_id=HCID, **common_query
        )
        out[f"iti55-{side}"] = iti55.query_audit(
            CTX, asked, side=side, home_community_id=HCID, **common_query
        )
        for i, msg in enumerate(
            iti39.retrieve_audit(
                CTX,
                m.Parties(requester=IG, responder=RG, human_requestors=[USER], when=WHEN),
                side=side,
                documents=[DOC],
                failed=[DOC2],
                patient_id=PATIENT,
            )
        ):
            out[f"iti39-{side}-{i}"] = msg
        for i, msg in enumerate(
            rad75.retrieve_audit(
                CTX,
                m.Parties(requester=IG, responder=RG, when=WHEN),
                side=side,
                instances=INSTANCES[:3],
                failed=INSTANCES[3:],
                patient_id=PATIENT,
            )
        ):
            out[f"rad75-{side}-{i}"] = msg
    for side in ("consumer", "registry"):
        out[f"iti18-{side}"] = iti18.query_audit(CTX, asked, side=side, **common_query)
    for side in ("consumer", "manager"):
        out[f"iti45-{side}"] = iti45.query_audit(CTX, asked, side=side, **common_query)
    for side in ("consumer", "repository"):
        out[f"iti43-{side}"] = iti43.retrieve_audit(
            CTX, m.Parties(requester=IG, responder=RG, when=WHEN), side=side, documents=[DOC, DOC2]
        )[0]
    for side in ("consumer", "imaging_document_source"):
        out[f"rad69-{side}"] = rad69.retrieve_audit(
            CTX, m.Parties(requester=IG, responder=RG, when=WHEN), side=side, instances=INSTANCES
        )[0]
    for side in ("repository", "registry"):
        out[f"iti42-{side}"] = iti42.register_audit(
            CTX,
            m.Parties(requester=IG, responder=RG, when=WHEN),
            side=side,
            submission_set_unique_id="1.2.3.4.5.6",
            patient_id=PATIENT,
        )
    out["app-start"] = m.application_activity(
        CTX, event="start", application_id="https://alpha.example", launcher="root", when=WHEN
    )
    out["app-stop"] = m.application_activity(
        CTX, event="stop", application_id="https://alpha.example", when=WHEN
    )
    out["security-alert"] = m.security_alert_node_authentication(
        CTX,
        address="192.0.2.99",
        port=50123,
        reason="certificate verification failed: certificate has expired",
        certificate_subject="CN=expired,O=x",
        when=WHEN,
    )
    out["security-alert-nocert"] = m.security_alert_node_authentication(
        CTX, address="::1", reason="client presented no certificate", when=WHEN
    )
    out["login-failed"] = m.user_authentication(
        CTX,
        event="login",
        user=USER,
        authenticator=CTX.local_node("https://alpha.example/xca"),
        user_node=RG,
        outcome=m.EventOutcome.MINOR_FAILURE,
        outcome_description="assertion expired",
        when=WHEN,
    )
    out["logout"] = m.user_authentication(
        CTX, event="logout", user=USER, authenticator=IG, when=WHEN
    )
    return out


MESSAGES = _all_messages()


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_every_builder_output_is_schema_valid(name: str) -> None:
    message = MESSAGES[name]
    assert schema_errors(message) == []
    xml = message.to_xml()
    assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?><AuditMessage>')
    assert b"\n" not in xml
    # The fast serialiser writes what lxml would write for the same tree.
    assert etree.tostring(etree.fromstring(xml), encoding="UTF-8") == xml[len(m.XML_DECLARATION) :]


def test_schema_rejects_broken_messages() -> None:
    good = MESSAGES["iti38-initiating"].to_element()
    outcome = etree.fromstring(etree.tostring(good))
    outcome.find("EventIdentification").set("EventOutcomeIndicator", "3")  # type: ignore[union-attr]
    assert schema_errors(outcome)
    missing = etree.fromstring(etree.tostring(good))
    for participant in missing.findall("ActiveParticipant"):
        missing.remove(participant)
    assert schema_errors(missing)
    with pytest.raises(AuditSchemaError):
        validate(etree.tostring(outcome))


def _event(msg: m.AuditMessage) -> tuple[str, str | None, int, list[str]]:
    ev = msg.event
    return ev.event_id.code, ev.action, int(ev.outcome), [c.code for c in ev.type_codes]


def _roles(msg: m.AuditMessage) -> list[tuple[str, str]]:
    return [
        (p.role_id_codes[0].code if p.role_id_codes else "", p.user_id) for p in msg.participants
    ]


@pytest.mark.parametrize(
    ("name", "event"),
    [
        ("iti38-initiating", ("110112", "E", 0, ["ITI-38"])),
        ("iti38-responding", ("110112", "E", 0, ["ITI-38"])),
        ("iti18-consumer", ("110112", "E", 0, ["ITI-18"])),
        ("iti18-registry", ("110112", "E", 0, ["ITI-18"])),
        ("iti55-initiating", ("110112", "E", 0, ["ITI-55"])),
        ("iti45-manager", ("110112", "E", 0, ["ITI-45"])),
        ("iti39-initiating-0", ("110107", "C", 0, ["ITI-39"])),
        ("iti39-initiating-1", ("110107", "C", 8, ["ITI-39"])),
        ("iti39-responding-0", ("110106", "R", 0, ["ITI-39"])),
        ("iti39-responding-1", ("110106", "R", 8, ["ITI-39"])),
        ("iti43-consumer", ("110107", "C", 0, ["ITI-43"])),
        ("iti43-repository", ("110106", "R", 0, ["ITI-43"])),
        ("rad69-consumer", ("110104", "C", 0, ["RAD-69"])),
        ("rad69-imaging_document_source", ("110104", "R", 0, ["RAD-69"])),
        ("rad75-initiating-0", ("110104", "C", 0, ["RAD-75"])),
        ("rad75-responding-0", ("110104", "R", 0, ["RAD-75"])),
        ("rad75-responding-1", ("110104", "R", 8, ["RAD-75"])),
        ("iti42-repository", ("110106", "R", 0, ["ITI-42"])),
        ("iti42-registry", ("110107", "C", 0, ["ITI-42"])),
        ("app-start", ("110100", "E", 0, ["110120"])),
        ("app-stop", ("110100", "E", 0, ["110121"])),
        ("security-alert", ("110113", "E", 4, ["110126"])),
        ("login-failed", ("110114", "E", 4, ["110122"])),
        ("logout", ("110114", "E", 0, ["110123"])),
    ],
)
def test_event_identification_per_transaction_and_side(
    name: str, event: tuple[str, str, int, list[str]]
) -> None:
    assert _event(MESSAGES[name]) == event


def test_query_participants_and_objects() -> None:
    msg = MESSAGES["iti38-responding"]
    # Requester is Source, then the human requestor, then the responder as Destination.
    assert _roles(msg) == [
        ("110153", IG.user_id),
        ("46255001", "<dr.smith@https://idp.example>"),
        ("110152", RG.user_id),
    ]
    source, human, destination = msg.participants
    assert source.alternative_user_id == "4711" and source.network_access_point_id == "gw1"
    assert destination.user_name == "CN=beta,O=x"
    assert destination.network_access_point_id == "192.0.2.7"
    # With a human requestor the machines are not "the requestor" (ITI TF-2 3.40.4.2).
    assert (source.user_is_requestor, human.user_is_requestor) == (False, True)
    assert human.user_name == "<dr.smith@https://idp.example>"
    assert msg.event.purposes_of_use == (PURPOSE,)
    patient, query = msg.objects
    assert (patient.object_id, patient.type_code, patient.type_code_role) == (PATIENT, 1, 1)
    assert patient.id_type_code.code == "2"
    assert (query.type_code, query.type_code_role, query.id_type_code.code) == (2, 24, "ITI-38")
    assert query.object_id == "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
    el = msg.to_element()
    q = el.find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert q is not None and base64.b64decode(q.text or "") == QUERY
    details = {
        d.get("type"): base64.b64decode(d.get("value") or "")
        for d in el.iterfind("ParticipantObjectIdentification/ParticipantObjectDetail")
    }
    assert details == {"QueryEncoding": b"UTF-8", m.DETAIL_XCA_HOME_COMMUNITY_ID: HCID.encode()}
    nap = el.find("ActiveParticipant")
    assert nap is not None and nap.get("NetworkAccessPointTypeCode") == "1"
    assert el.findall("ActiveParticipant")[2].get("NetworkAccessPointTypeCode") == "2"


def test_machine_requestor_without_human() -> None:
    msg = iti38.query_audit(
        CTX, m.Parties(requester=IG, responder=RG), side="initiating", query_id="q", query=b""
    )
    assert [p.user_is_requestor for p in msg.participants] == [True, False]
    # No patient in the query: only the query object.
    assert [o.type_code_role for o in msg.objects] == [m.ObjectRole.QUERY]


def test_retrieve_splits_successes_and_failures() -> None:
    ok, failed = iti39.retrieve_audit(
        CTX,
        m.Parties(requester=IG, responder=RG, outcome_description="XDSDocumentUniqueIdError"),
        side="initiating",
        documents=[DOC],
        failed=[DOC2],
    )
    # No patient given: each record says so with a Patient participant without id.
    assert [o.object_id for o in ok.objects] == [None, DOC.document_unique_id]
    assert [o.object_id for o in failed.objects] == [None, DOC2.document_unique_id]
    unknown = ok.objects[0]
    assert (unknown.type_code, unknown.type_code_role) == (1, 1)
    assert dict(unknown.details) == {m.DETAIL_PATIENT_NOT_KNOWN: m.PATIENT_NOT_KNOWN.encode()}
    assert (ok.outcome, failed.outcome) == (0, 8)
    assert ok.event.outcome_description is None
    assert failed.event.outcome_description == "XDSDocumentUniqueIdError"
    # Retrieves: the document holder is Source, the requester Destination.
    assert _roles(ok) == [("110153", RG.user_id), ("110152", IG.user_id)]
    assert [p.user_is_requestor for p in ok.participants] == [False, True]
    doc = ok.objects[1]
    assert (doc.type_code, doc.type_code_role, doc.id_type_code.code) == (2, 3, "9")
    assert dict(doc.details) == {
        "Repository Unique Id": DOC.repository_unique_id.encode(),  # type: ignore[union-attr]
        "ihe:homeCommunityID": HCID.encode(),
    }
    # Nothing delivered at all: one failure message.
    (only,) = iti43.retrieve_audit(
        CTX,
        m.Parties(requester=IG, responder=RG),
        side="repository",
        documents=[],
        failed=[DOC],
        failure_outcome=m.EventOutcome.MAJOR_FAILURE,
    )
    assert only.outcome == 12


def test_imaging_retrieve_study_objects() -> None:
    msg = MESSAGES["rad69-imaging_document_source"]
    studies = {o.object_id: o for o in msg.objects if o.type_code_role != m.ObjectRole.PATIENT}
    assert list(studies) == ["1.2.3.9", "1.2.3.8"]
    study = studies["1.2.3.9"]
    assert (study.type_code, study.type_code_role, study.id_type_code.code) == (2, 3, "110180")
    assert study.description is not None
    assert study.description.study_uids == ("1.2.3.9",)
    assert [
        (c.uid, c.number_of_instances, c.instance_uids) for c in study.description.sop_classes
    ] == [
        (CT, 2, ("1.2.3.9.1.1", "1.2.3.9.1.2")),
        (MR, 1, ("1.2.3.9.2.1",)),
    ]
    assert [k for k, _ in study.details] == [
        "Series Instance Unique Id",
        "Series Instance Unique Id",
        "Repository Unique Id",
        "ihe:homeCommunityID",
    ]
    # RAD-75 uses the XCA home community detail name.
    cross_gateway = MESSAGES["rad75-responding-0"].objects[1]
    assert m.DETAIL_XCA_HOME_COMMUNITY_ID in dict(cross_gateway.details)
    el = MESSAGES["rad75-responding-0"].to_element()
    assert el.find(".//ParticipantObjectContainsStudy/StudyIDs").get("UID") == "1.2.3.9"  # type: ignore[union-attr]


def test_large_study_lists_counts_not_every_instance() -> None:
    many = [m.ImagingInstanceReference("1.2.3", "1.2.3.1", f"1.2.3.1.{i}", CT) for i in range(2000)]
    (msg,) = rad69.retrieve_audit(
        CTX, m.Parties(requester=IG, responder=RG), side="imaging_document_source", instances=many
    )
    assert schema_errors(msg) == []
    (sop_class,) = msg.objects[1].description.sop_classes  # type: ignore[union-attr]
    assert (sop_class.number_of_instances, sop_class.instance_uids) == (2000, ())
    assert len(msg.to_xml()) < 4096


def test_security_alert_names_the_remote_node_and_reason() -> None:
    msg = MESSAGES["security-alert"]
    reporter, remote = msg.participants
    assert (reporter.user_id, reporter.user_is_requestor) == ("alpha-gateway", False)
    # The handshake failed: only the node's address is verified, so it names the node; the
    # subject it presented is a detail marked unverified, never the participant's identity.
    assert remote.user_id == "192.0.2.99:50123" and remote.user_is_requestor
    assert remote.user_name is None
    assert remote.network_access_point_id == "192.0.2.99"
    (subject,) = msg.objects
    assert subject.object_id == "192.0.2.99:50123"
    assert subject.id_type_code.code == "110182"
    details = dict(subject.details)
    assert details["Alert Description"].startswith(b"certificate verification")
    assert details["Certificate Subject (unverified)"] == b"CN=expired,O=x"
    assert "Certificate Subject" not in details
    assert b"CN=expired" not in b"".join(
        (p.user_id + (p.user_name or "")).encode() for p in msg.participants
    )
    nocert = MESSAGES["security-alert-nocert"]
    assert nocert.participants[1].user_id == "::1"
    assert (
        nocert.to_element().findall("ActiveParticipant")[1].get("NetworkAccessPointTypeCode") == "2"
    )


def test_xua_user_name_format() -> None:
    assert m.xua_user_name("dr.smith", "https://idp") == "<dr.smith@https://idp>"
    assert m.xua_user_name("dr.smith", "https://idp", "js") == "js<dr.smith@https://idp>"


def test_hostile_strings_still_make_valid_xml() -> None:
    evil = 'CN=a"b<c>&d\x00\x1b\ud800\n\r\t\ufffe end'
    msg = m.security_alert_node_authentication(
        CTX, address="203.0.113.1", reason=evil, certificate_subject=evil, when=WHEN
    )
    assert schema_errors(msg) == []
    el = msg.to_element()
    remote = el.findall("ActiveParticipant")[1]
    assert remote.get("UserID") == "203.0.113.1"
    detail = el.find("ParticipantObjectIdentification/ParticipantObjectDetail[2]")
    assert detail is not None and detail.get("type") == "Certificate Subject (unverified)"
    # Markup characters and whitespace survive; XML-incompatible ones become U+FFFD.
    assert base64.b64decode(detail.get("value") or "").decode() == (
        'CN=a"b<c>&d\ufffd\ufffd\ufffd\n\r\t\ufffd end'
    )
    description = el.findtext("EventIdentification/EventOutcomeDescription")
    assert description == 'CN=a"b<c>&d\ufffd\ufffd\ufffd\n\r\t\ufffd end'


def test_outcome_for_registry_status() -> None:
    assert m.outcome_for_registry_status(ResponseStatus.SUCCESS) == 0
    assert m.outcome_for_registry_status(ResponseStatus.PARTIAL_SUCCESS) == 4
    assert m.outcome_for_registry_status(ResponseStatus.FAILURE) == 8
    assert m.outcome_for_registry_status(None) == 8


@pytest.mark.parametrize(
    "call",
    [
        lambda: iti38.query_audit(
            CTX, m.Parties(requester=IG, responder=RG), side="consumer", query_id="q", query=b""
        ),  # type: ignore[arg-type]
        lambda: m.application_activity(CTX, event="restart", application_id="x"),  # type: ignore[arg-type]
    ],
)
def test_wrong_side_is_refused(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


def test_event_time_is_utc_milliseconds() -> None:
    assert m.format_datetime(WHEN) == "2026-01-15T10:22:33.123Z"
    assert m.format_datetime(datetime(2026, 1, 15, 10, 0)) == "2026-01-15T10:00:00.000Z"


# ------------------------------------------------------------------------ helpers for handlers


def test_requester_and_endpoint_nodes() -> None:
    anonymous = m.requester_node(
        "192.0.2.5", "http://www.w3.org/2005/08/addressing/anonymous", "CN=beta"
    )
    assert (anonymous.user_id, anonymous.user_name) == ("CN=beta", "CN=beta")
    assert anonymous.network_access_point == "192.0.2.5"
    explicit = m.requester_node("192.0.2.5", "https://beta.example/replies", "CN=beta")
    assert explicit.user_id == "https://beta.example/replies"
    assert m.requester_node("192.0.2.5", None, None).user_id == "192.0.2.5"
    endpoint = m.endpoint_node("https://rg.beta.example:8443/xca/iti38", "CN=rg")
    assert (endpoint.user_id, endpoint.network_access_point, endpoint.user_name) == (
        "https://rg.beta.example:8443/xca/iti38",
        "rg.beta.example",
        "CN=rg",
    )


def test_extract_stored_query() -> None:
    request = etree.fromstring(
        f"""<q:AdhocQueryRequest xmlns:q="{QUERY_NS}" xmlns:rim="{RIM}">
      <rim:AdhocQuery id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d" home="{HCID}">
        <rim:Slot name="$XDSDocumentEntryPatientId">
          <rim:ValueList><rim:Value>'{PATIENT.replace("&", "&amp;")}'</rim:Value></rim:ValueList>
        </rim:Slot>
        <rim:Slot name="$XDSDocumentEntryStatus">
          <rim:ValueList><rim:Value>('urn:x:Approved')</rim:Value></rim:ValueList>
        </rim:Slot>
      </rim:AdhocQuery>
    </q:AdhocQueryRequest>""".encode()
    )
    found = extract.stored_query(request)
    assert found.query_id == "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
    assert found.home_community_id == HCID
    assert found.patient_ids == (PATIENT,)
    assert etree.fromstring(found.query).tag == f"{{{QUERY_NS}}}AdhocQueryRequest"


def test_extract_retrieve_documents_and_split() -> None:
    def doc_request(tag: str, uid: str) -> str:
        return (
            f"<{tag}><b:HomeCommunityId>{HCID}</b:HomeCommunityId>"
            f"<b:RepositoryUniqueId>1.2.3</b:RepositoryUniqueId>"
            f"<b:DocumentUniqueId>{uid}</b:DocumentUniqueId></{tag}>"
        )

    request = etree.fromstring(
        f'<b:RetrieveDocumentSetRequest xmlns:b="{XDSB}">'
        + doc_request("b:DocumentRequest", "1.1")
        + doc_request("b:DocumentRequest", "1.2")
        + "</b:RetrieveDocumentSetRequest>"
    )
    response = etree.fromstring(
        f'<b:RetrieveDocumentSetResponse xmlns:b="{XDSB}">'
        + doc_request("b:DocumentResponse", "1.2")
        + "</b:RetrieveDocumentSetResponse>"
    )
    requested = extract.requested_documents(request)
    assert requested == [
        m.DocumentReference("1.1", "1.2.3", HCID),
        m.DocumentReference("1.2", "1.2.3", HCID),
    ]
    delivered, failed = extract.split_documents(requested, extract.returned_documents(response))
    assert ([d.document_unique_id for d in delivered], [d.document_unique_id for d in failed]) == (
        ["1.2"],
        ["1.1"],
    )
    imaging = etree.fromstring(
        f'<i:RetrieveImagingDocumentSetRequest xmlns:i="{XDSI}" xmlns:b="{XDSB}">'
        '<i:StudyRequest studyInstanceUID="9"><i:SeriesRequest seriesInstanceUID="9.1">'
        + doc_request("i:DocumentRequest", "9.1.1")
        + doc_request("b:DocumentRequest", "9.1.2")
        + "</i:SeriesRequest></i:StudyRequest></i:RetrieveImagingDocumentSetRequest>"
    )
    instances = extract.requested_instances(imaging)
    assert [
        (i.study_instance_uid, i.series_instance_uid, i.sop_instance_uid) for i in instances
    ] == [
        ("9", "9.1", "9.1.1"),
        ("9", "9.1", "9.1.2"),
    ]
    ok, bad = extract.split_instances(instances, [m.DocumentReference("9.1.2")])
    assert ([i.sop_instance_uid for i in ok], [i.sop_instance_uid for i in bad]) == (
        ["9.1.2"],
        ["9.1.1"],
    )


def test_malformed_document_requests_are_still_named_in_the_retrieve_audit() -> None:
    request = etree.fromstring(
        f'<b:RetrieveDocumentSetRequest xmlns:b="{XDSB}">'
        f"<b:DocumentRequest><b:HomeCommunityId>{HCID}</b:HomeCommunityId>"
        "<b:RepositoryUniqueId>1.2.3</b:RepositoryUniqueId></b:DocumentRequest>"
        "<b:DocumentRequest><b:RepositoryUniqueId>1.2.3</b:RepositoryUniqueId>"
        "<b:DocumentUniqueId> </b:DocumentUniqueId></b:DocumentRequest>"
        "</b:RetrieveDocumentSetRequest>"
    )
    requested = extract.requested_documents(request)
    assert requested == [
        m.DocumentReference("", "1.2.3", HCID, "DocumentRequest without DocumentUniqueId"),
        m.DocumentReference("", "1.2.3", None, "DocumentRequest with an empty DocumentUniqueId"),
    ]
    delivered, failed = extract.split_documents(requested, [])
    assert (delivered, failed) == ([], requested)
    (message,) = iti39.retrieve_audit(
        CTX, m.Parties(requester=IG, responder=RG), side="responding", documents=[], failed=failed
    )
    assert schema_errors(message) == []
    objects = message.to_element().findall("ParticipantObjectIdentification")
    assert [
        (o.get("ParticipantObjectID"), o.findtext("ParticipantObjectName")) for o in objects
    ] == [
        (None, None),  # the patient, not known
        ("", "DocumentRequest without DocumentUniqueId"),
        ("", "DocumentRequest with an empty DocumentUniqueId"),
    ]

    imaging = etree.fromstring(
        f'<i:RetrieveImagingDocumentSetRequest xmlns:i="{XDSI}" xmlns:b="{XDSB}">'
        '<i:StudyRequest studyInstanceUID=""><i:SeriesRequest seriesInstanceUID="9.1">'
        "<i:DocumentRequest><b:RepositoryUniqueId>1.2.3</b:RepositoryUniqueId>"
        "</i:DocumentRequest></i:SeriesRequest></i:StudyRequest>"
        "</i:RetrieveImagingDocumentSetRequest>"
    )
    (instance,) = extract.requested_instances(imaging)
    assert instance.sop_instance_uid == "" and instance.study_instance_uid == ""
    assert instance.problem == "empty studyInstanceUID; DocumentRequest without DocumentUniqueId"
    (message,) = rad75.retrieve_audit(
        CTX,
        m.Parties(requester=IG, responder=RG),
        side="responding",
        instances=[],
        failed=[instance],
    )
    assert schema_errors(message) == []
    _patient, study = message.to_element().findall("ParticipantObjectIdentification")
    assert study.get("ParticipantObjectID") == ""
    assert study.findtext("ParticipantObjectName") == instance.problem


def test_every_retrieve_record_names_its_patient() -> None:
    """One record per patient and outcome; each with the Patient participant (type 1, role
    1, IDTypeCode 2) and its name; the default patient for what the mapping does not name."""
    alice = m.PatientRef("A1^^^&1.2.3&ISO", "Doe^Alice")
    bob = m.PatientRef("B1^^^&1.2.3&ISO")
    records = rad75.retrieve_audit(
        CTX,
        m.Parties(requester=IG, responder=RG),
        side="initiating",
        instances=INSTANCES[:3],
        failed=INSTANCES[3:],
        patients={"1.2.3.9.1.1": alice, "1.2.3.9.1.2": alice, "1.2.3.8.1.1": bob},
        patient_id=PATIENT,
    )
    summary = []
    for record in records:
        assert schema_errors(record) == []
        el = record.to_element()
        patients = [
            p
            for p in el.iter("ParticipantObjectIdentification")
            if p.get("ParticipantObjectTypeCodeRole") == "1"
        ]
        assert len(patients) == 1
        (patient,) = patients
        assert patient.get("ParticipantObjectTypeCode") == "1"
        assert patient.find("ParticipantObjectIDTypeCode").get("csd-code") == "2"  # type: ignore[union-attr]
        instances = sum(int(c.get("NumberOfInstances", "0")) for c in el.iter("SOPClass"))
        summary.append(
            (
                record.outcome,
                patient.get("ParticipantObjectID"),
                patient.findtext("ParticipantObjectName"),
                instances,
            )
        )
    assert summary == [
        (0, alice.patient_id, "Doe^Alice", 2),
        (0, PATIENT, None, 1),  # the MR instance: not in the mapping, the default patient
        (8, bob.patient_id, None, 1),
    ]


def test_transfer_without_a_known_patient_says_so() -> None:
    msg = m.instances_transferred(
        CTX, source=RG, destination=IG, study_uid="1.2.3.9", instances=INSTANCES[:1]
    )
    assert schema_errors(msg) == []
    patient = msg.objects[0]
    assert (patient.object_id, patient.type_code, patient.type_code_role) == (None, 1, 1)
    assert dict(patient.details)[m.DETAIL_PATIENT_NOT_KNOWN] == m.PATIENT_NOT_KNOWN.encode()
    named = m.instances_transferred(
        CTX,
        source=RG,
        destination=IG,
        study_uid="1.2.3.9",
        instances=INSTANCES[:1],
        patient_ids=[m.PatientRef(PATIENT, "Doe^Alice"), PATIENT],
    )
    assert [(o.object_id, o.name) for o in named.objects[:1]] == [(PATIENT, "Doe^Alice")]
    assert named.objects[1].type_code_role == m.ObjectRole.REPORT
