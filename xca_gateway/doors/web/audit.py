"""The audit records of the web door (ATNA, DICOM PS3.15 A.5.3).

Builders are pure (``*_message``); the ``record_*`` functions write them to the gateway's audit
trail and never let an audit failure touch the request.

* A refused token or login is **User Authentication (110114) / Login (110122)** with a failure
  outcome (A.5.3.12: a user's failed authentication). The person is named as the token *claims*
  (unverified, and said so), the browser by its address. Not a Security Alert: that is kept for
  a verified caller using a function its role does not allow (``DoorGuard``), so the officer
  can tell "someone failed to sign in" from "a known user was refused".
* A completed login is 110114 / Login with outcome 0, a logout 110114 / Logout.
* A study viewed and an IID launch are **DICOM Instances Accessed (110103)**, action R (A.5.3.3:
  instances read, here displayed), the clinician as human requestor and the patient; the launch
  carries the IID transaction RAD-106 as its EventTypeCode.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Protocol

from xca_gateway.audit import messages as m
from xca_gateway.doors.ports import DoorHost
from xca_gateway.protocol.http_server import Request
from xca_gateway.security.callers import Principal

log = logging.getLogger(__name__)

IID_LAUNCH = m.CodedValue("RAD-106", "IHE Transactions", "Invoke Image Display")
# How a refused person is named: what the token claimed, which nothing has verified.
CLAIMED = " (claimed, unverified)"


class AuditedWebDoor(Protocol):
    """What the records need of the door (:class:`xca_gateway.doors.web.door.WebDoor`)."""

    @property
    def gateway(self) -> DoorHost: ...

    @property
    def base_url(self) -> str: ...


def person(principal: Principal) -> m.HumanRequestor:
    return m.HumanRequestor(principal.user_id, principal.audit_user_name)


def authentication_message(
    ctx: m.AuditContext,
    *,
    event: str,
    user_id: str,
    user_name: str | None,
    address: str | None,
    authenticator: m.Node,
    outcome: m.EventOutcome,
    description: str | None,
) -> m.AuditMessage:
    return m.user_authentication(
        ctx,
        event="logout" if event == "logout" else "login",
        user=m.HumanRequestor(user_id, user_name),
        authenticator=authenticator,
        user_node=m.remote_node(address) if address else None,
        outcome=outcome,
        outcome_description=description,
    )


def instances_accessed_message(
    ctx: m.AuditContext,
    *,
    clinician: m.HumanRequestor,
    browser: m.Node,
    door: m.Node,
    patients: Sequence[m.PatientRef],
    study_uids: Sequence[str],
    type_code: m.CodedValue | None = None,
    outcome: m.EventOutcome = m.EventOutcome.SUCCESS,
    outcome_description: str | None = None,
    when: datetime | None = None,
    communities: Mapping[str, str] | None = None,
) -> m.AuditMessage:
    """DICOM Instances Accessed (110103, R): who looked (the clinician, the requestor; the
    browser's address on its machine participant), at which patient's studies, through us.
    ``communities``: the homeCommunityId holding each study (by UID), as a detail of the
    study's object, the way XCA records name the community of a document: the officer's
    report says in which community the viewed study is."""
    objects = m.patient_objects(patients)
    objects.extend(
        m.ParticipantObject(
            object_id=uid,
            id_type_code=m.ParticipantObjectIdType.STUDY_INSTANCE_UID,
            type_code=m.ObjectType.SYSTEM_OBJECT,
            type_code_role=m.ObjectRole.REPORT,
            details=(
                ((m.DETAIL_XCA_HOME_COMMUNITY_ID, community.encode()),)
                if (community := (communities or {}).get(uid))
                else ()
            ),
            description=m.DicomObjectDescription(study_uids=(uid,)),
        )
        for uid in dict.fromkeys(study_uids)
    )
    participants = (
        m.ActiveParticipant(
            user_id=clinician.user_id,
            user_is_requestor=True,
            user_name=clinician.user_name,
            role_id_codes=clinician.roles,
        ),
        # The browser asked on the person's behalf: a requestor too (A.5.3.3 lets every
        # participant that manipulated the data be one), so the record says where from.
        m.system_participant(browser, None, True),
        m.system_participant(door, None, False),
    )
    return m.AuditMessage(
        event=m.EventIdentification(
            event_id=m.EventId.DICOM_INSTANCES_ACCESSED,
            action="R",
            outcome=outcome,
            date_time=when or datetime.now(UTC),
            type_codes=(type_code,) if type_code is not None else (),
            outcome_description=outcome_description,
        ),
        participants=participants,
        source=ctx.audit_source,
        objects=tuple(objects),
    )


def _browser(request: Request) -> m.Node:
    return m.remote_node(request.peer.address)


def record_authentication(
    door: AuditedWebDoor,
    request: Request,
    *,
    event: str = "login",
    user_id: str,
    user_name: str | None,
    outcome: m.EventOutcome,
    description: str | None = None,
) -> None:
    trail = door.gateway.audit
    if not trail.config.enabled:
        return
    try:
        trail.record(
            authentication_message(
                trail.context,
                event=event,
                user_id=user_id,
                user_name=user_name,
                address=request.peer.address,
                authenticator=trail.local_node(door.base_url + request.path[:200]),
                outcome=outcome,
                description=description,
            )
        )
    except Exception:  # an audit failure must not touch the request
        log.exception("building the web door's User Authentication record failed")


def record_study_viewed(
    door: AuditedWebDoor,
    request: Request,
    clinician: Principal,
    *,
    study_uid: str,
    patient: m.PatientRef | None,
    community: str | None = None,
) -> None:
    """One study displayed to ``clinician`` (110103). The web door calls it for each WADO-RS
    study retrieve that succeeded, once per session and study; a page that shows a study by
    other means calls it too. ``community``: the homeCommunityId that holds the study."""
    _record_access(
        door,
        request,
        clinician,
        patients=[patient] if patient is not None else [],
        study_uids=[study_uid],
        type_code=None,
        outcome=m.EventOutcome.SUCCESS,
        description=None,
        communities={study_uid: community} if community else None,
    )


def record_launch(
    door: AuditedWebDoor,
    request: Request,
    clinician: Principal,
    *,
    patient_id: str | None,
    patient_name: str | None = None,
    study_uids: Sequence[str] = (),
    outcome: m.EventOutcome = m.EventOutcome.SUCCESS,
    description: str | None = None,
) -> None:
    """An IHE IID launch (RAD-106) by ``clinician`` for a patient (and studies): call it once
    per launch request, with a failure outcome and the reason when the launch was refused."""
    _record_access(
        door,
        request,
        clinician,
        patients=[m.PatientRef(patient_id, patient_name)] if patient_id else [],
        study_uids=study_uids,
        type_code=IID_LAUNCH,
        outcome=outcome,
        description=description,
    )


def _record_access(
    door: AuditedWebDoor,
    request: Request,
    clinician: Principal,
    *,
    patients: Sequence[m.PatientRef],
    study_uids: Sequence[str],
    type_code: m.CodedValue | None,
    outcome: m.EventOutcome,
    description: str | None,
    communities: Mapping[str, str] | None = None,
) -> None:
    trail = door.gateway.audit
    if not trail.config.enabled:
        return
    try:
        trail.record(
            instances_accessed_message(
                trail.context,
                clinician=person(clinician),
                browser=_browser(request),
                door=trail.local_node(door.base_url + request.path[:200]),
                patients=patients,
                study_uids=study_uids,
                type_code=type_code,
                outcome=outcome,
                outcome_description=description,
                communities=communities,
            )
        )
    except Exception:  # an audit failure must not touch the request
        log.exception("building the web door's Instances Accessed record failed")
