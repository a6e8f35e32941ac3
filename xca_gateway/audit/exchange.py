"""One audited exchange, as each transaction's record builder reads it. Sans-IO.

The SOAP layer reports every request it served and the peer client every call it made; the
dispatcher (:mod:`xca_gateway.app.transaction_audit`) turns either into an :class:`Exchange`
and hands it to the transaction's own ``audit_served`` / ``audit_called`` (in
``xca_gateway.transactions.<name>``). What every record of a transaction shares (who asked,
who answered, the XUA user, why something failed) travels as one :class:`Parties`; what only
some need (the patients of a retrieve, the community that answered a query) is read here, so
that the builders stay short.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from xca_gateway.audit import extract
from xca_gateway.audit.messages import (
    DocumentReference,
    EventOutcome,
    ImagingInstanceReference,
    Parties,
    PatientRef,
    outcome_for_registry_status,
)
from xca_gateway.audit.patients import (
    CONTEXT_INSTANCES,
    CONTEXT_PATIENTS,
    InstanceObservations,
    PatientMemory,
)
from xca_gateway.protocol.namespaces import RS

__all__ = [
    "CONTEXT_RETURNED_INSTANCES",
    "Exchange",
    "ImagingFacts",
    "StoredQueryFacts",
    "context_patients",
    "exchange_outcome",
    "response_status",
]

_HL7 = "urn:hl7-org:v3"

# Request context: () -> the SOP Instance UIDs a streamed imaging response listed (its
# payload element does not hold its DocumentResponses).
CONTEXT_RETURNED_INSTANCES = "imaging_returned_instances"


@dataclass(frozen=True)
class StoredQueryFacts:
    """What the record of a stored query (ITI-18, ITI-38) names of the query itself."""

    query_id: str | None
    query: bytes
    home_community_id: str | None
    patient_ids: tuple[str, ...]


@dataclass(frozen=True)
class ImagingFacts:
    """A RAD-69 / RAD-75 exchange as compact records, for when its messages were never trees
    (a 20,000-instance retrieve is read and written element by element): every instance the
    request asked for, and the SOP Instance UIDs the response listed (None: read them from
    the response element). Called only when the record is built."""

    requested: Callable[[], Iterable[ImagingInstanceReference]]
    returned: Callable[[], Iterable[str]] | None = None


@dataclass(frozen=True)
class Exchange:
    """One request and its answer (or failure), seen on either side of a transaction."""

    request: etree._Element
    response: etree._Element | None
    outcome: EventOutcome
    parties: Parties
    # What failed: the fault or undelivered response of a served request, the error of a
    # call. When set, nothing counts as delivered.
    error: str | None = None
    # The community that answered, when the request does not say (AdhocQuery/@home): this one
    # for a query served here, the peer for a call to its endpoint.
    community: str | None = None
    # What the handler of the request being served learnt for its audit (patients, instances).
    context: Mapping[str, Any] = field(default_factory=dict)
    # What this gateway learnt from earlier answers (query answers, manifests).
    memory: PatientMemory = field(default_factory=PatientMemory)
    # An imaging retrieve read and written without trees: its instances (``request`` and
    # ``response`` are then the payload elements without them).
    imaging: ImagingFacts | None = None

    def remember_answer(self) -> None:
        """The patients of the DocumentEntries in a query answer, for the retrieves that
        follow it."""
        if self.response is not None:
            self.memory.learn_entries(self.response)

    def stored_query(self) -> StoredQueryFacts:
        """The stored query of an ITI-18 / ITI-38 request (its community: AdhocQuery/@home)."""
        q = extract.stored_query(self.request)
        return StoredQueryFacts(
            query_id=q.query_id,
            query=q.query,
            home_community_id=q.home_community_id,
            patient_ids=q.patient_ids,
        )

    def documents(
        self,
    ) -> tuple[list[DocumentReference], list[DocumentReference], dict[str, PatientRef]]:
        """(delivered, failed, patients by uniqueId) of an ITI-39 / ITI-43 exchange."""
        returned = extract.returned_documents(self.response) if self.response is not None else []
        delivered, failed = extract.split_documents(
            extract.requested_documents(self.request), returned
        )
        if self.error is not None:
            delivered, failed = [], [*delivered, *failed]
        known = context_patients(self.context)
        patients: dict[str, PatientRef] = {}
        for doc in [*delivered, *failed]:
            uid = doc.document_unique_id
            patient = known.get(uid) or self.memory.patient(uid)
            if patient is not None:
                patients[uid] = patient
        return delivered, failed, patients

    def instances(
        self,
    ) -> tuple[
        list[ImagingInstanceReference], list[ImagingInstanceReference], dict[str, PatientRef]
    ]:
        """(delivered, failed, patients by SOP Instance UID) of a RAD-69 / RAD-75 exchange,
        the SOP classes filled in where known. A patient is looked for in the headers seen as
        they streamed, then the handler's context, then the memory (instance, then study)."""
        observed = self.context.get(CONTEXT_INSTANCES)
        seen: Mapping[str, PatientRef] = {}
        classes: Mapping[str, str] = {}
        if isinstance(observed, InstanceObservations):
            seen, classes = observed.patients(), observed.sop_classes
        known = context_patients(self.context)
        requested: list[ImagingInstanceReference] = []
        patients: dict[str, PatientRef] = {}
        asked = (
            self.imaging.requested()
            if self.imaging is not None
            else extract.requested_instances(self.request)
        )
        for ref in asked:
            sop, study = ref.sop_instance_uid, ref.study_instance_uid
            sop_class = ref.sop_class_uid or classes.get(sop) or self.memory.sop_class(sop)
            requested.append(
                dataclasses.replace(ref, sop_class_uid=sop_class) if sop_class else ref
            )
            patient = (
                seen.get(sop)
                or known.get(sop)
                or (known.get(study) if study else None)
                or self.memory.patient(sop, study)
            )
            if patient is not None:
                patients[sop] = patient
        if self.imaging is not None and self.imaging.returned is not None:
            got = set(self.imaging.returned())
        elif self.response is not None:
            got = {d.document_unique_id for d in extract.returned_documents(self.response)}
        else:
            got = set()
        delivered = [i for i in requested if i.sop_instance_uid in got]
        failed = [i for i in requested if i.sop_instance_uid not in got]
        if self.error is not None:
            delivered, failed = [], [*delivered, *failed]
        return delivered, failed, patients


def context_patients(context: Mapping[str, Any] | None) -> Mapping[str, PatientRef]:
    """The patients a handler put in its request's context, by uid."""
    found = (context or {}).get(CONTEXT_PATIENTS)
    return found if isinstance(found, Mapping) else {}


def response_status(payload: etree._Element | None) -> str | None:
    """The ebRS status of a query or retrieve response (None if there is none)."""
    if payload is None:
        return None
    status = payload.get("status")
    if status:
        return status
    inner = payload.find(f"{{{RS}}}RegistryResponse")
    return inner.get("status") if inner is not None else None


def exchange_outcome(payload: etree._Element | None, error: str | None) -> EventOutcome:
    """EventOutcomeIndicator of an exchange: a failure when it failed outright, else what the
    answer says (HL7 v3 acknowledgement, ebRS status)."""
    if error is not None:
        return EventOutcome.SERIOUS_FAILURE
    if payload is not None and payload.tag.startswith(f"{{{_HL7}}}"):
        code = payload.find(f"{{{_HL7}}}acknowledgement/{{{_HL7}}}typeCode")
        ok = code is None or code.get("code") in ("AA", "CA")
        return EventOutcome.SUCCESS if ok else EventOutcome.MINOR_FAILURE
    return outcome_for_registry_status(response_status(payload))
