"""Audit records grouped into accesses for the patient access report (sans-IO)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from xca_gateway.arr.accesses import AccessRecord, group_accesses
from xca_gateway.arr.parse import parse_record, patient_key
from xca_gateway.arr.web import what_text
from xca_gateway.audit import messages as am
from xca_gateway.doors.web.audit import IID_LAUNCH, instances_accessed_message
from xca_gateway.transactions import iti18, iti38, iti39, rad69, rad75

ARC = "1.3.6.1.4.1.21367.13"
NORTH, SOUTH, EAST = (f"urn:oid:{ARC}.70.{i}" for i in (1, 2, 3))
ALICE_N = f"C01-1001^^^&{ARC}.20.1000&ISO"
ALICE_S = f"C02-2001^^^&{ARC}.20.2000&ISO"
ALICE_E = f"C03-3001^^^&{ARC}.20.3000&ISO"
BOB_N = f"C01-1002^^^&{ARC}.20.1000&ISO"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"


def ctx(name: str) -> am.AuditContext:
    return am.AuditContext(am.AuditSource(f"{name}-gateway"), host=name, process_id="1")


VIEWER = am.remote_node("127.0.0.9", certificate_subject="CN=north viewer")
NORTH_IG = ctx("north").local_node("https://north/ig")
NORTH_AS_PEER = am.remote_node("127.0.0.1", certificate_subject="CN=north.xca-gateway.test")
ON_BEHALF = [am.HumanRequestor("CN=north viewer", "north viewer")]


def instances(study: str, home: str, count: int) -> list[am.ImagingInstanceReference]:
    return [
        am.ImagingInstanceReference(study, f"{study}.1", f"{study}.1.{i}", CT, "1.2.3", home)
        for i in range(count)
    ]


def seconds(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def query_flow(at: float, patient: str = ALICE_N) -> list[am.AuditMessage]:
    """A consumer's ITI-18 at north, fanned out to south and east."""
    q = {"query_id": "urn:uuid:q", "query": b"<q/>"}
    out = [
        iti38.query_audit(
            ctx(name),
            am.Parties(
                requester=NORTH_AS_PEER,
                responder=ctx(name).local_node(f"https://{name}/xca/iti38"),
                when=seconds(at),
            ),
            side="responding",
            patient_ids=[pid],
            home_community_id=home,
            **q,
        )
        for name, pid, home in (("south", ALICE_S, SOUTH), ("east", ALICE_E, EAST))
    ]
    out += [
        iti38.query_audit(
            ctx("north"),
            am.Parties(
                requester=NORTH_IG,
                responder=am.endpoint_node(f"https://{name}/xca/iti38"),
                human_requestors=ON_BEHALF,
                when=seconds(at + 0.1),
            ),
            side="initiating",
            patient_ids=[pid],
            home_community_id=home,
            **q,
        )
        for name, pid, home in (("south", ALICE_S, SOUTH), ("east", ALICE_E, EAST))
    ]
    out.append(
        iti18.query_audit(
            ctx("north"),
            am.Parties(requester=VIEWER, responder=NORTH_IG, when=seconds(at + 0.2)),
            side="registry",
            patient_ids=[patient],
            **q,
        )
    )
    return out


def study_flow(at: float) -> list[am.AuditMessage]:
    """A consumer's RAD-69 at north for a study in south (4 instances, one lost)."""
    study = instances(f"{ARC}.90.2.1", SOUTH, 4)
    out = list(
        rad75.retrieve_audit(
            ctx("south"),
            am.Parties(
                requester=NORTH_AS_PEER,
                responder=ctx("south").local_node("https://south/xca/rad75"),
                when=seconds(at),
            ),
            side="responding",
            instances=study[:3],
            failed=study[3:],
            patient_id=ALICE_S,
        )
    )
    out += rad75.retrieve_audit(
        ctx("north"),
        am.Parties(
            requester=NORTH_IG,
            responder=am.endpoint_node("https://south/xca/rad75"),
            human_requestors=ON_BEHALF,
            when=seconds(at + 0.1),
        ),
        side="initiating",
        instances=study[:3],
        failed=study[3:],
        patient_id=ALICE_S,
    )
    out += rad69.retrieve_audit(
        ctx("north"),
        am.Parties(requester=VIEWER, responder=NORTH_IG, when=seconds(at + 0.2)),
        side="imaging_document_source",
        instances=study[:3],
        failed=study[3:],
        patients={i.sop_instance_uid: am.PatientRef(ALICE_S, "Lindqvist^Alice") for i in study},
    )
    return out


def c_get_flow(at: float) -> list[am.AuditMessage]:
    """A C-GET at north's DIMSE door of Alice's study in east: the door's own query and
    manifest fetch first, then RAD-75 to east."""
    out = query_flow(at)[:4]  # the ITI-38 legs, no ITI-18 (in-process)
    study = instances(f"{ARC}.90.3.1", EAST, 2)
    out += iti39.retrieve_audit(
        ctx("north"),
        am.Parties(
            requester=NORTH_IG,
            responder=am.endpoint_node("https://east/xca/iti39"),
            when=seconds(at + 1),
        ),
        side="initiating",
        documents=[am.DocumentReference("1.2.3.kos", "1.2.3", EAST)],
        patient_id=ALICE_E,
    )
    out += rad75.retrieve_audit(
        ctx("north"),
        am.Parties(
            requester=NORTH_IG,
            responder=am.endpoint_node("https://east/xca/rad75"),
            when=seconds(at + 2),
        ),
        side="initiating",
        instances=study,
        patient_id=ALICE_E,
    )
    out.append(
        am.instances_transferred(
            ctx("north"),
            source=ctx("north").local_node("XCA-FRONT"),
            destination=am.Node("WORKSTATION", "127.0.0.9"),
            study_uid=study[0].study_instance_uid,
            instances=study,
            patient_ids=[am.PatientRef(ALICE_N, "Lindqvist^Alice")],
            when=seconds(at + 3),
        )
    )
    return out


def records(messages: list[am.AuditMessage]) -> list[AccessRecord]:
    return [
        AccessRecord(i, parse_record(msg.to_xml(), sender="127.0.0.1", transport="tls"))
        for i, msg in enumerate(messages, 1)
    ]


def alice(key: str) -> str:
    """The cross-reference table: Alice's three ids are one person."""
    return "alice" if key in {patient_key(p) for p in (ALICE_N, ALICE_S, ALICE_E)} else key


def test_one_row_per_access_with_its_communities_and_counts() -> None:
    messages = [*query_flow(0), *study_flow(10), *c_get_flow(20)]
    # Bob's query a moment before is another person's access, never taking Alice's legs.
    messages += [query_flow(-0.5, BOB_N)[-1]]
    accesses = group_accesses(records(messages), person_of=alice)
    rows = [(a.label, sorted(a.persons), a.outcome) for a in accesses]
    assert rows == [
        ("C-GET", ["alice"], 0),
        ("RAD-69 Retrieve Imaging Document Set", ["alice"], 4),
        ("ITI-18 Registry Stored Query", ["alice"], 0),
        ("ITI-18 Registry Stored Query", [patient_key(BOB_N)], 0),
    ]
    c_get, rad69, query, _bob = accesses
    # Every record of an access is in it, once.
    assert len(query.record_ids) == 1 and len(query.leg_ids) == 4
    assert sorted(query.communities) == sorted([EAST, SOUTH])
    assert query.user == "CN=north viewer" and query.node == "127.0.0.9"
    # The RAD-69's success and failure records are one access; its legs name south.
    assert len(rad69.record_ids) == 2 and len(rad69.leg_ids) == 4
    assert rad69.communities == [SOUTH]
    assert (len(rad69.studies), len(rad69.series), rad69.instances) == (1, 1, 3)
    assert rad69.patients == {ALICE_S: "Lindqvist^Alice"}
    # The door's own query and manifest fetch are part of its C-GET, not accesses of their own.
    assert len(c_get.leg_ids) == 6
    assert c_get.communities == [EAST]
    assert (len(c_get.studies), c_get.instances) == (1, 2)
    assert c_get.user == "WORKSTATION"
    assert sum(len(a.record_ids) + len(a.leg_ids) for a in accesses) == len(messages)


def test_a_leg_without_its_primary_is_an_access_of_its_own() -> None:
    """East's record of a RAD-75 from a gateway that does not report here."""
    lone = study_flow(0)[:2]  # south's two RAD-75 records only
    (access,) = group_accesses(records(lone), person_of=alice)
    assert access.label == "RAD-75" and access.communities == [SOUTH]
    assert access.outcome == 4 and access.instances == 3
    assert access.user == "CN=north.xca-gateway.test"


CLINICIAN = am.HumanRequestor("dr-north", "Dr North Clinician<dr-north@https://127.0.0.1:8448>")
BROWSER = am.remote_node("127.0.0.7")
WEB = ctx("north").local_node("https://north:8445/iid")


def test_a_clinicians_launch_and_study_view_are_accesses_naming_them() -> None:
    """The web door's records (doors/web/audit.py): an IID launch (110103 with RAD-106) whose
    search fanned out to south, and a study south holds shown to the clinician (110103)."""
    study = f"{ARC}.90.2.1"
    launch_search = query_flow(0)[:1]  # south answering north's search
    launch = instances_accessed_message(
        ctx("north"),
        clinician=CLINICIAN,
        browser=BROWSER,
        door=WEB,
        patients=[am.PatientRef(ALICE_N, None)],
        study_uids=[],
        type_code=IID_LAUNCH,
        when=seconds(1),
    )
    view = instances_accessed_message(
        ctx("north"),
        clinician=CLINICIAN,
        browser=BROWSER,
        door=WEB,
        patients=[am.PatientRef(ALICE_S, "Lindqvist^Alice")],
        study_uids=[study],
        communities={study: SOUTH},
        when=seconds(5),
    )
    accesses = group_accesses(records([*launch_search, launch, view]), person_of=alice)
    assert [(a.kind, a.label) for a in accesses] == [
        ("view", "Study viewed (110103)"),
        ("launch", "IID launch (RAD-106)"),
    ]
    viewed, launched = accesses
    assert viewed.user == launched.user == CLINICIAN.user_name
    assert viewed.node == launched.node == "127.0.0.7"
    assert viewed.studies == {study} and viewed.communities == [SOUTH]
    assert viewed.patients == {ALICE_S: "Lindqvist^Alice"} and viewed.outcome == 0
    assert what_text(viewed) == f"viewed study {study}"
    # The launch's search is part of it: the community that answered is named.
    assert len(launched.leg_ids) == 1 and launched.communities == [SOUTH]
    assert what_text(launched) == "launch: the patient's studies listed"
