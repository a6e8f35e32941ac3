"""The audit records of the DICOMweb front door: QIDO-RS (RAD-129) and WADO-RS (RAD-107).

:func:`qido_audit` and :func:`wado_audit` build the messages (pure); :func:`audit_query` and
:class:`RetrieveAudit` write them to the gateway's audit trail when a request ends, and never
let an audit failure touch the transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from xca_gateway.audit import messages as m
from xca_gateway.doors.dicomweb.negotiation import DicomWebError
from xca_gateway.doors.federation import StudyManifest, audit_patients, manifest_patient
from xca_gateway.doors.ports import DoorHost
from xca_gateway.protocol.http_server import Request
from xca_gateway.security.callers import current_caller
from xca_gateway.xds.kos import InstanceRef

log = logging.getLogger(__name__)


class AuditedDoor(Protocol):
    """What the audit of a request needs of the door that served it
    (:class:`xca_gateway.doors.dicomweb.door.DicomWebFrontDoor`)."""

    @property
    def gateway(self) -> DoorHost: ...

    @property
    def base_url(self) -> str: ...


# Audit event types (IHE Transactions code system). The imaging retrieve pattern (RAD TF-3
# 4.69.4.1.4, as IPF's Rad69 audit strategies implement it): the serving side of a retrieve
# audits "DICOM Instances Transferred" (110104, action R), as an Imaging Document Source does
# for RAD-69; a query is 110112 "Query" (action E). The transactions are IHE WIA's RAD-129
# "QIDO-RS Query" and RAD-107 "WADO-RS Retrieve" (IHE RAD TF-2 4.107).
QIDO_RS_QUERY = m.CodedValue("RAD-129", "IHE Transactions", "QIDO-RS Query")
WADO_RS_RETRIEVE = m.CodedValue("RAD-107", "IHE Transactions", "WADO-RS Retrieve")


def qido_audit(
    ctx: m.AuditContext,
    *,
    requester: m.Node,
    responder: m.Node,
    target: str,
    patient_id: str | None,
    outcome: m.EventOutcome,
    outcome_description: str | None = None,
    human_requestors: Sequence[m.HumanRequestor] = (),
) -> m.AuditMessage:
    """QIDO-RS as a Query (110112, E): the requester is the Source, we the Destination; the
    request target (path and query) is the ParticipantObjectQuery. A person who asked (a
    clinician at the web door) is the requestor then, the browser's machine only its Source."""
    objects = [m.patient_object(patient_id)] if patient_id else []
    objects.append(
        m.query_object(
            QIDO_RS_QUERY,
            target.partition("?")[0],
            target.encode("utf-8"),
            [(m.DETAIL_QUERY_ENCODING, b"UTF-8")],
        )
    )
    return m.AuditMessage(
        event=m.EventIdentification(
            event_id=m.EventId.QUERY,
            action="E",
            outcome=outcome,
            date_time=datetime.now(UTC),
            type_codes=(QIDO_RS_QUERY,),
            outcome_description=outcome_description,
        ),
        participants=(
            m.system_participant(requester, m.RoleId.SOURCE, not human_requestors),
            *(
                m.ActiveParticipant(
                    user_id=h.user_id,
                    user_is_requestor=True,
                    user_name=h.user_name,
                    role_id_codes=h.roles,
                )
                for h in human_requestors
            ),
            m.system_participant(responder, m.RoleId.DESTINATION, False),
        ),
        source=ctx.audit_source,
        objects=tuple(objects),
    )


def wado_audit(
    ctx: m.AuditContext,
    *,
    requester: m.Node,
    responder: m.Node,
    study_uid: str,
    delivered: Sequence[m.ImagingInstanceReference],
    failed: Sequence[m.ImagingInstanceReference],
    patient_ids: Sequence[str | m.PatientRef],
    failure_outcome: m.EventOutcome = m.EventOutcome.SERIOUS_FAILURE,
    outcome_description: str | None = None,
    human_requestors: Sequence[m.HumanRequestor] = (),
) -> list[m.AuditMessage]:
    """WADO-RS as "DICOM Instances Transferred" (110104, R): we are the Source, the requester
    the Destination. One message for what was delivered, one for what failed (DICOM A.5.2)."""
    groups: list[tuple[m.EventOutcome, Sequence[m.ImagingInstanceReference]]] = []
    if delivered:
        groups.append((m.EventOutcome.SUCCESS, delivered))
    if failed or not delivered:
        groups.append((failure_outcome, failed))
    when = datetime.now(UTC)  # one time for the records of one retrieve (A.5.2)
    return [
        m.instances_transferred(
            ctx,
            when=when,
            source=responder,
            destination=requester,
            study_uid=study_uid,
            instances=group,
            patient_ids=patient_ids,
            outcome=outcome,
            outcome_description=outcome_description if outcome else None,
            type_code=WADO_RS_RETRIEVE,
            human_requestors=human_requestors,
        )
        for outcome, group in groups
    ]


class RetrieveAudit:
    """The audit record(s) of one WADO-RS request, written when it ends."""

    def __init__(
        self, door: AuditedDoor, request: Request, study_uid: str, patients: list[str]
    ) -> None:
        self.door = door
        self.request = request
        self.study_uid = study_uid
        self.patients: list[str | m.PatientRef] = list(patients)
        self.references: dict[str, m.ImagingInstanceReference] = {}
        # Taken now: the record is written when the body is sent, maybe in another context.
        self.humans = human_requestors()

    def name_patients(self, studies: Sequence[StudyManifest]) -> None:
        """The patients of the record from the manifests found: the caller's id with the name
        the manifests give it, or, for a request naming the study alone, the manifests'."""
        found = [p for s in studies if (p := manifest_patient(s.header)) is not None]
        asked = [p if isinstance(p, str) else p.patient_id for p in self.patients[:1]]
        self.patients = [*audit_patients(asked, found)]

    def describe(self, documents: Sequence[Any], refs: Sequence[InstanceRef]) -> None:
        classes = {r.sop_instance_uid: r.sop_class_uid for r in refs}
        for doc in documents:
            self.references[doc.document_unique_id] = m.ImagingInstanceReference(
                study_instance_uid=doc.study_instance_uid,
                series_instance_uid=doc.series_instance_uid,
                sop_instance_uid=doc.document_unique_id,
                sop_class_uid=classes.get(doc.document_unique_id),
                repository_unique_id=doc.repository_unique_id,
                home_community_id=doc.home_community_id,
            )

    def failed_before_streaming(self, error: DicomWebError) -> None:
        self._record(
            [],
            list(self.references),
            error.message,
            m.EventOutcome.MINOR_FAILURE if error.status < 500 else m.EventOutcome.SERIOUS_FAILURE,
        )

    def completed(self, ok: bool, delivered: list[str], missing: list[str]) -> None:
        sent = set(delivered)
        failed = [uid for uid in self.references if uid not in sent]
        description = None
        if not ok:
            description = "response aborted before every instance was sent"
        elif missing:
            description = f"{len(missing)} instance(s) not returned by the federation"
        self._record(delivered, failed, description, m.EventOutcome.SERIOUS_FAILURE)

    def _record(
        self,
        delivered: Sequence[str],
        failed: Sequence[str],
        description: str | None,
        failure_outcome: m.EventOutcome,
    ) -> None:
        trail = self.door.gateway.audit
        if not trail.config.enabled:
            return
        try:

            def refs(uids: Iterable[str]) -> list[m.ImagingInstanceReference]:
                return [self.references[u] for u in uids if u in self.references]

            trail.record(
                wado_audit(
                    trail.context,
                    requester=_requester(self.request),
                    responder=trail.local_node(self.door.base_url + self.request.path),
                    study_uid=self.study_uid,
                    delivered=refs(delivered),
                    failed=refs(failed),
                    patient_ids=self.patients,
                    failure_outcome=failure_outcome,
                    outcome_description=description,
                    human_requestors=self.humans,
                )
            )
        except Exception:  # an audit failure must not touch the transaction
            log.exception("building the WADO-RS audit record failed")


def human_requestors() -> tuple[m.HumanRequestor, ...]:
    """The person the current request is for (a clinician admitted by the web door), as the
    human requestor of its records (ITI TF-2 3.40.4.2 form: ``name<sub@iss>``); none for a
    system caller, which its machine participant names already."""
    principal = current_caller()
    if principal is None or not principal.is_person:
        return ()
    return (m.HumanRequestor(principal.user_id, principal.audit_user_name),)


def _requester(request: Request) -> m.Node:
    peer = request.peer
    subject = peer.certificate.subject if peer.certificate is not None else None
    return m.remote_node(peer.address, certificate_subject=subject)


def audit_query(
    door: AuditedDoor,
    request: Request,
    patient: str | None,
    outcome: m.EventOutcome,
    description: str | None,
) -> None:
    trail = door.gateway.audit
    if not trail.config.enabled:
        return
    try:
        trail.record(
            qido_audit(
                trail.context,
                requester=_requester(request),
                responder=trail.local_node(door.base_url + request.path),
                target=request.target,
                patient_id=patient,
                outcome=outcome,
                outcome_description=description,
                human_requestors=human_requestors(),
            )
        )
    except Exception:
        log.exception("building the QIDO-RS audit record failed")
