"""Which audit record each transaction produces, on both sides (ATNA ITI-20).

The SOAP layer reports every served request (after the response went out, or failed) and the
peer client every outbound call; this module turns each into the DICOM audit messages the IHE
framework requires for that transaction and side, and hands them to the non-blocking
:class:`~xca_gateway.audit.trail.AuditTrail`. Recording never raises into a clinical transaction.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lxml import etree

from xca_gateway.audit import extract
from xca_gateway.audit import messages as m
from xca_gateway.audit.patients import (
    CONTEXT_INSTANCES,
    CONTEXT_PATIENTS,
    InstanceObservations,
    PatientMemory,
    entry_patients,
)
from xca_gateway.audit.trail import AuditTrail, soap_requester
from xca_gateway.protocol.namespaces import RIM, RS, Action
from xca_gateway.protocol.soap_service import CURRENT_REQUEST, Handler, SoapRequest, SoapResponse
from xca_gateway.registry.model import (
    Kind,
    ObjectFilter,
    ValueAttribute,
    ValueCondition,
    load_element,
)
from xca_gateway.security.callers import Role, current_caller
from xca_gateway.security.policy import current_authorization
from xca_gateway.security.xua import audit_purposes_of_use, audit_requestor
from xca_gateway.xds import ebrim

log = logging.getLogger(__name__)

_HL7 = "urn:hl7-org:v3"


@dataclass(frozen=True)
class OutboundCall:
    """One call of the peer client, as the auditor sees it."""

    url: str
    action: str
    request: etree._Element
    reply: etree._Element | None
    error: str | None = None
    # The verified local caller the gateway made this call for (None: the gateway's own call).
    on_behalf_of: m.HumanRequestor | None = None


def local_caller_requestor() -> m.HumanRequestor | None:
    """The current local caller (a system of this community) as an audit requestor."""
    principal = current_caller()
    if principal is None or principal.has(Role.PEER_GATEWAY):
        return None
    return m.HumanRequestor(user_id=principal.user_id, user_name=principal.name)


def response_status(payload: etree._Element | None) -> str | None:
    """The ebRS status of a query or retrieve response (None if there is none)."""
    if payload is None:
        return None
    status = payload.get("status")
    if status:
        return status
    inner = payload.find(f"{{{RS}}}RegistryResponse")
    return inner.get("status") if inner is not None else None


def _outcome(payload: etree._Element | None, error: str | None) -> m.EventOutcome:
    if error is not None:
        return m.EventOutcome.SERIOUS_FAILURE
    if payload is not None and payload.tag.startswith(f"{{{_HL7}}}"):
        code = payload.find(f"{{{_HL7}}}acknowledgement/{{{_HL7}}}typeCode")
        ok = code is None or code.get("code") in ("AA", "CA")
        return m.EventOutcome.SUCCESS if ok else m.EventOutcome.MINOR_FAILURE
    return m.outcome_for_registry_status(response_status(payload))


def _hl7_query(payload: etree._Element) -> tuple[str | None, bytes, list[str]]:
    """(queryId extension, queryByParameter bytes, patient ids) of an HL7v3 query message."""
    query = payload.find(f".//{{{_HL7}}}queryByParameter")
    if query is None:
        return None, etree.tostring(payload), []
    query_id = query.find(f"{{{_HL7}}}queryId")
    patients = [
        f"{v.get('extension')}^^^&{v.get('root')}&ISO"
        for v in query.iter(f"{{{_HL7}}}value")
        if v.get("root") and v.get("extension")
    ]
    return (
        query_id.get("extension") if query_id is not None else None,
        etree.tostring(query),
        patients,
    )


def _submission(payload: etree._Element) -> tuple[str, str | None]:
    unique_id, patient = "", None
    for package in payload.iter(f"{{{RIM}}}RegistryPackage"):
        for ext in package.iter(f"{{{RIM}}}ExternalIdentifier"):
            scheme = ext.get("identificationScheme")
            if scheme == ebrim.SS_UNIQUE_ID:
                unique_id = ext.get("value", "")
            elif scheme == ebrim.SS_PATIENT_ID:
                patient = ext.get("value")
    return unique_id, patient


def _context_patients(context: Mapping[str, Any] | None) -> Mapping[str, m.PatientRef]:
    found = (context or {}).get(CONTEXT_PATIENTS)
    return found if isinstance(found, Mapping) else {}


def _current_request_context() -> Mapping[str, Any] | None:
    """The context of the SOAP request being served, if an outbound call is made for one."""

    request = CURRENT_REQUEST.get()
    return request.context if request is not None else None


class TransactionAuditor:
    """Builds each transaction's records. Every retrieve record names its patient: what the
    handler put in the request's context (the registry's metadata, the instances' headers as
    they streamed), else what :attr:`patients` learnt from the query answers and manifests
    that went through this gateway, else "patient not known to this node"."""

    def __init__(
        self,
        trail: AuditTrail,
        base_url: Callable[[], str],
        patients: PatientMemory | None = None,
        *,
        home_community_id: str | None = None,
        peer_communities: Mapping[str, str] | None = None,
        queries_local_community: bool = True,
    ) -> None:
        self.trail = trail
        self.base_url = base_url
        self.patients = patients if patients is not None else PatientMemory()
        # Which community a cross-gateway query was answered by, for its record: this one on
        # the responding side, the peer (by endpoint URL) on the initiating side.
        self.home_community_id = home_community_id
        self.peer_communities = dict(peer_communities or {})
        # An ITI-18 served here asks this community's registry too (the registry endpoint,
        # or the initiating gateway's fan-out when it includes the local community).
        self.queries_local_community = queries_local_community

    def _own_community(self, request: SoapRequest) -> str | None:
        if request.endpoint.path.startswith("/ig/") and not self.queries_local_community:
            return None
        return self.home_community_id

    def _document_patients(
        self, docs: Sequence[m.DocumentReference], context: Mapping[str, Any] | None
    ) -> dict[str, m.PatientRef]:
        known = _context_patients(context)
        found: dict[str, m.PatientRef] = {}
        for doc in docs:
            uid = doc.document_unique_id
            patient = known.get(uid) or self.patients.patient(uid)
            if patient is not None:
                found[uid] = patient
        return found

    def _instances(
        self, refs: Sequence[m.ImagingInstanceReference], context: Mapping[str, Any] | None
    ) -> tuple[list[m.ImagingInstanceReference], dict[str, m.PatientRef]]:
        """The instances with their SOP classes filled in where known, and their patients:
        the headers seen as they streamed, the handler's, then the memory's (instance, then
        study)."""
        observed = (context or {}).get(CONTEXT_INSTANCES)
        seen: Mapping[str, m.PatientRef] = {}
        classes: Mapping[str, str] = {}
        if isinstance(observed, InstanceObservations):
            seen, classes = observed.patients(), observed.sop_classes
        known = _context_patients(context)
        out: list[m.ImagingInstanceReference] = []
        patients: dict[str, m.PatientRef] = {}
        for ref in refs:
            sop, study = ref.sop_instance_uid, ref.study_instance_uid
            sop_class = ref.sop_class_uid or classes.get(sop) or self.patients.sop_class(sop)
            out.append(dataclasses.replace(ref, sop_class_uid=sop_class) if sop_class else ref)
            patient = (
                seen.get(sop)
                or known.get(sop)
                or (known.get(study) if study else None)
                or self.patients.patient(sop, study)
            )
            if patient is not None:
                patients[sop] = patient
        return out, patients

    def _retrieve_objects(
        self,
        transaction: str,
        request: etree._Element,
        reply: etree._Element | None,
        error: str | None,
        context: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """documents/instances, failed and patients of a retrieve, for its builder."""
        returned = extract.returned_documents(reply) if reply is not None else []
        if transaction in ("ITI-39", "ITI-43"):
            delivered, failed = extract.split_documents(
                extract.requested_documents(request), returned
            )
            if error is not None:
                delivered, failed = [], [*delivered, *failed]
            return {
                "documents": delivered,
                "failed": failed,
                "patients": self._document_patients([*delivered, *failed], context),
            }
        requested, patients = self._instances(extract.requested_instances(request), context)
        delivered_i, failed_i = extract.split_instances(requested, returned)
        if error is not None:
            delivered_i, failed_i = [], [*delivered_i, *failed_i]
        return {"instances": delivered_i, "failed": failed_i, "patients": patients}

    def _learn(self, reply: etree._Element | None) -> None:
        """The patients of the DocumentEntries in a query answer, for the retrieves that
        follow it."""
        if reply is not None:
            self.patients.learn_entries(reply)

    @property
    def ctx(self) -> m.AuditContext:
        return self.trail.context

    # -------------------------------------------------------------- served (our side)

    def served(
        self,
        request: SoapRequest,
        transaction: str,
        response: etree._Element | None,
        *,
        fault: str | None = None,
        delivered: bool = True,
    ) -> None:
        try:
            error = fault or (None if delivered else "response not delivered")
            self.trail.record(self._served(request, transaction, response, error))
        except Exception:  # an audit failure must not touch the transaction
            log.exception("building the %s audit record failed", transaction)

    def _served(
        self,
        request: SoapRequest,
        transaction: str,
        response: etree._Element | None,
        error: str | None,
    ) -> Sequence[m.AuditMessage]:
        requester = soap_requester(request)
        responder = self.trail.local_node(self.base_url() + request.endpoint.path)
        payload = request.payload
        outcome = _outcome(response, error)
        common: dict[str, Any] = {
            "requester": requester,
            "responder": responder,
            # Why something was withheld (consent) when nothing failed outright.
            "outcome_description": error or request.context.get("audit_outcome_description"),
            **_identity(request),
        }
        if transaction in ("ITI-38", "ITI-18"):
            self._learn(response)
            q = extract.stored_query(payload)
            query: dict[str, Any] = {
                "query_id": q.query_id,
                "query": q.query,
                "home_community_id": q.home_community_id
                or (self._own_community(request) if transaction in ("ITI-38", "ITI-18") else None),
                "patient_ids": q.patient_ids,
                "outcome": outcome,
            }
            if transaction == "ITI-38":
                return [m.iti38_query(self.ctx, side="responding", **query, **common)]
            return [m.iti18_query(self.ctx, side="registry", **query, **common)]
        if transaction in ("ITI-39", "ITI-43", "RAD-75", "RAD-69"):
            objects = self._retrieve_objects(transaction, payload, response, error, request.context)
            if transaction == "ITI-39":
                return m.iti39_retrieve(self.ctx, side="responding", **objects, **common)
            if transaction == "ITI-43":
                return m.iti43_retrieve(self.ctx, side="repository", **objects, **common)
            if transaction == "RAD-75":
                return m.rad75_retrieve(self.ctx, side="responding", **objects, **common)
            return m.rad69_retrieve(self.ctx, side="imaging_document_source", **objects, **common)
        if transaction in ("ITI-55", "ITI-45"):
            query_id, query_bytes, patients = _hl7_query(payload)
            hl7: dict[str, Any] = {
                "query_id": query_id,
                "query": query_bytes,
                "patient_ids": patients,
            }
            if transaction == "ITI-55":
                return [
                    m.iti55_query(self.ctx, side="responding", outcome=outcome, **hl7, **common)
                ]
            return [m.iti45_query(self.ctx, side="manager", outcome=outcome, **hl7, **common)]
        if transaction == "ITI-42":
            unique_id, patient = _submission(payload)
            return [
                m.iti42_register(
                    self.ctx,
                    side="registry",
                    submission_set_unique_id=unique_id or "unknown",
                    patient_id=patient,
                    outcome=outcome,
                    **common,
                )
            ]
        return []

    # -------------------------------------------------------------- outbound calls

    def called(self, call: OutboundCall) -> None:
        try:
            self.trail.record(self._called(call))
        except Exception:
            log.exception("building the audit record of an outbound %s failed", call.action)

    def _called(self, call: OutboundCall) -> Sequence[m.AuditMessage]:
        requester = self.trail.local_node(self.base_url())
        responder = m.endpoint_node(call.url)
        outcome = _outcome(call.reply, call.error)
        common: dict[str, Any] = {
            "requester": requester,
            "responder": responder,
            "outcome_description": call.error,
        }
        if call.on_behalf_of is not None:
            # The local system the gateway acts for is a requestor of the outbound call too.
            common["human_requestors"] = [call.on_behalf_of]
        action = call.action
        if action in (Action.ITI38, Action.ITI18):
            self._learn(call.reply)
            q = extract.stored_query(call.request)
            query: dict[str, Any] = {
                "query_id": q.query_id,
                "query": q.query,
                "home_community_id": q.home_community_id
                or (self.peer_communities.get(call.url) if action == Action.ITI38 else None),
                "patient_ids": q.patient_ids,
                "outcome": outcome,
            }
            if action == Action.ITI38:
                return [m.iti38_query(self.ctx, side="initiating", **query, **common)]
            return [m.iti18_query(self.ctx, side="consumer", **query, **common)]
        retrieves = {
            Action.ITI39: "ITI-39",
            Action.ITI43: "ITI-43",
            Action.RAD75: "RAD-75",
            Action.RAD69: "RAD-69",
        }
        if action in retrieves:
            # Made while serving a request (an RG's ITI-39 relayed as ITI-43, an IG's ITI-43
            # split into ITI-39s): what that request's handler learnt applies here too.
            objects = self._retrieve_objects(
                retrieves[action], call.request, call.reply, call.error, _current_request_context()
            )
            # Failures of the call itself are in call.error; a reply that came back is judged
            # document by document.
            if action == Action.ITI39:
                return m.iti39_retrieve(self.ctx, side="initiating", **objects, **common)
            if action == Action.ITI43:
                return m.iti43_retrieve(self.ctx, side="consumer", **objects, **common)
            if action == Action.RAD75:
                return m.rad75_retrieve(self.ctx, side="initiating", **objects, **common)
            return m.rad69_retrieve(self.ctx, side="consumer", **objects, **common)
        if action.endswith("PRPA_IN201305UV02:CrossGatewayPatientDiscovery"):
            query_id, query_bytes, patients = _hl7_query(call.request)
            return [
                m.iti55_query(
                    self.ctx,
                    side="initiating",
                    query_id=query_id,
                    query=query_bytes,
                    patient_ids=patients,
                    outcome=outcome,
                    **common,
                )
            ]
        if action == "urn:hl7-org:v3:PRPA_IN201309UV02":
            query_id, query_bytes, patients = _hl7_query(call.request)
            return [
                m.iti45_query(
                    self.ctx,
                    side="consumer",
                    query_id=query_id,
                    query=query_bytes,
                    patient_ids=patients,
                    outcome=outcome,
                    **common,
                )
            ]
        return []


def _identity(request: SoapRequest) -> dict[str, Any]:
    """The human requestor (alias<user@issuer>) and purposes of use of a validated XUA
    assertion, when the authorization gate established one for this request."""

    auth = current_authorization()
    if auth is None or auth.assertion is None:
        return {}
    return {
        "human_requestors": [audit_requestor(auth.assertion)],
        "purposes_of_use": audit_purposes_of_use(auth.assertion),
    }


# --------------------------------------------------------------------------- registry lookup

# DocumentEntries asked of the store at once (bounded SQL parameter lists).
_LOOKUP_BATCH = 500


class RegistryPatients:
    """The patients of the documents and studies a retrieve asks for, from the community's own
    registry: the DocumentEntry's patientId and sourcePatientInfo name, and for a study the
    KOS manifest entries whose referenceIdList names it. Only an embedded registry is asked (a
    remote one would be one more audited transaction per retrieve); the instances' headers and
    the gateway's memory cover the rest."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    async def lookup(
        self, document_uids: Sequence[str], study_uids: Sequence[str]
    ) -> dict[str, m.PatientRef]:
        store = getattr(self.registry, "store", None)
        if store is None:
            return {}
        found: dict[str, m.PatientRef] = {}
        docs = list(dict.fromkeys(u for u in document_uids if u))
        for start in range(0, len(docs), _LOOKUP_BATCH):
            batch = tuple(docs[start : start + _LOOKUP_BATCH])
            rows = await store.select(
                ObjectFilter(kind=Kind.DOCUMENT_ENTRY, unique_ids=batch), with_xml=True
            )
            for row in rows:
                for entry in entry_patients(load_element(row.xml)) if row.xml else ():
                    found.setdefault(entry.document_unique_id, entry.patient)
        studies = list(dict.fromkeys(u for u in study_uids if u))
        for start in range(0, len(studies), _LOOKUP_BATCH):
            references = tuple(
                f"{uid}^^^^{ebrim.REFERENCE_ID_STUDY_INSTANCE_UID}"
                for uid in studies[start : start + _LOOKUP_BATCH]
            )
            rows = await store.select(
                ObjectFilter(
                    kind=Kind.DOCUMENT_ENTRY,
                    values=(ValueCondition(ValueAttribute.REFERENCE_ID, references),),
                ),
                with_xml=True,
            )
            wanted = set(studies)
            for row in rows:
                for entry in entry_patients(load_element(row.xml)) if row.xml else ():
                    for study in entry.study_instance_uids:
                        if study in wanted:
                            found.setdefault(study, entry.patient)
        return found

    def wrap(self, handler: Handler, *, imaging: bool) -> Handler:
        """``handler`` with the patients of what the request asks for in its context."""

        async def handle(request: SoapRequest) -> SoapResponse:
            try:
                if imaging:
                    studies = [
                        i.study_instance_uid for i in extract.requested_instances(request.payload)
                    ]
                    found = await self.lookup((), studies)
                else:
                    uids = [
                        d.document_unique_id for d in extract.requested_documents(request.payload)
                    ]
                    found = await self.lookup(uids, ())
                if found:
                    request.context[CONTEXT_PATIENTS] = {
                        **_context_patients(request.context),
                        **found,
                    }
            except Exception:  # the audit's lookup never stops a retrieve
                log.exception("looking up the patients of a retrieve for its audit failed")
            return await handler(request)

        return handle
