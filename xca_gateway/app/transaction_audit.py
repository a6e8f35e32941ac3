"""Which audit record each exchange produces, on both sides (ATNA ITI-20).

The SOAP layer reports every served request (after the response went out, or failed) and the
peer client every outbound call; this module turns each into an
:class:`~xca_gateway.audit.exchange.Exchange` and hands it to the transaction that knows its
record (``audit_served`` / ``audit_called`` in ``xca_gateway.transactions.<name>``), through the
tables below, and the records to the non-blocking :class:`~xca_gateway.audit.trail.AuditTrail`.
Recording never raises into a clinical transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from lxml import etree

from xca_gateway.audit import extract
from xca_gateway.audit import messages as m
from xca_gateway.audit.exchange import (
    CONTEXT_RETURNED_INSTANCES,
    Exchange,
    ImagingFacts,
    context_patients,
    exchange_outcome,
)
from xca_gateway.audit.patients import CONTEXT_PATIENTS, PatientMemory, entry_patients
from xca_gateway.audit.trail import AuditTrail, soap_requester
from xca_gateway.imaging.request import (
    InvalidImagingRequest,
    RetrieveImagingDocumentSetRequest,
    requested_references,
)
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.soap_service import CURRENT_REQUEST, Handler, SoapRequest, SoapResponse
from xca_gateway.registry.model import (
    Kind,
    ObjectFilter,
    RegistryAction,
    ValueAttribute,
    ValueCondition,
    load_element,
)
from xca_gateway.security.callers import Role, current_caller
from xca_gateway.security.policy import current_authorization
from xca_gateway.security.xua import audit_purposes_of_use, audit_requestor
from xca_gateway.transactions import iti18, iti38, iti39, iti42, iti43, iti45, iti55, rad69, rad75
from xca_gateway.xds import ebrim

log = logging.getLogger(__name__)

# The records of one exchange, built by the transaction that knows them.
AuditOf = Callable[[m.AuditContext, Exchange], Sequence[m.AuditMessage]]

# A request served here, by the transaction its endpoint operation names.
SERVED: Mapping[str, AuditOf] = {
    "ITI-18": iti18.audit_served,
    "ITI-38": iti38.audit_served,
    "ITI-39": iti39.audit_served,
    "ITI-42": iti42.audit_served,
    "ITI-43": iti43.audit_served,
    "ITI-45": iti45.audit_served,
    "ITI-55": iti55.audit_served,
    "RAD-69": rad69.audit_served,
    "RAD-75": rad75.audit_served,
}

# A call this gateway made, by its wsa:Action.
CALLED: Mapping[str, AuditOf] = {
    Action.ITI18: iti18.audit_called,
    Action.ITI38: iti38.audit_called,
    Action.ITI39: iti39.audit_called,
    Action.ITI43: iti43.audit_called,
    iti45.ACTION: iti45.audit_called,
    iti55.ACTION: iti55.audit_called,
    Action.RAD69: rad69.audit_called,
    Action.RAD75: rad75.audit_called,
    RegistryAction.ITI42: iti42.audit_called,
}


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
    # An imaging retrieve sent and read without trees: its instances.
    imaging: ImagingFacts | None = None


def local_caller_requestor() -> m.HumanRequestor | None:
    """The current local caller (a system of this community) as an audit requestor."""
    principal = current_caller()
    if principal is None or principal.has(Role.PEER_GATEWAY):
        return None
    return m.HumanRequestor(user_id=principal.user_id, user_name=principal.audit_user_name)


class TransactionAuditor:
    """Builds each exchange's records. Every retrieve record names its patient: what the
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
        audit = SERVED.get(transaction)
        if audit is None:
            return []
        parties = m.Parties(
            requester=soap_requester(request),
            responder=self.trail.local_node(self.base_url() + request.endpoint.path),
            # Why something was withheld (consent) when nothing failed outright.
            outcome_description=error or request.context.get("audit_outcome_description"),
            **_identity(request),
        )
        exchange = Exchange(
            request=request.payload,
            response=response,
            outcome=exchange_outcome(response, error),
            parties=parties,
            error=error,
            community=self._own_community(request),
            context=request.context,
            memory=self.patients,
            imaging=served_imaging(request) if transaction in IMAGING_TRANSACTIONS else None,
        )
        return audit(self.ctx, exchange)

    # -------------------------------------------------------------- outbound calls

    def called(self, call: OutboundCall) -> None:
        try:
            self.trail.record(self._called(call))
        except Exception:
            log.exception("building the audit record of an outbound %s failed", call.action)

    def _called(self, call: OutboundCall) -> Sequence[m.AuditMessage]:
        audit = CALLED.get(call.action)
        if audit is None:
            return []
        parties = m.Parties(
            requester=self.trail.local_node(self.base_url()),
            responder=m.endpoint_node(call.url),
            # The local system the gateway acts for is a requestor of the outbound call too.
            human_requestors=[call.on_behalf_of] if call.on_behalf_of is not None else (),
            outcome_description=call.error,
        )
        # Made while serving a request (an RG's ITI-39 relayed as ITI-43, an IG's ITI-43 split
        # into ITI-39s): what that request's handler learnt applies here too.
        serving = CURRENT_REQUEST.get()
        exchange = Exchange(
            request=call.request,
            response=call.reply,
            outcome=exchange_outcome(call.reply, call.error),
            parties=parties,
            # Failures of the call itself; a reply that came back is judged item by item.
            error=call.error,
            community=self.peer_communities.get(call.url),
            context=serving.context if serving is not None else {},
            memory=self.patients,
            imaging=call.imaging,
        )
        return audit(self.ctx, exchange)


IMAGING_TRANSACTIONS = frozenset({"RAD-69", "RAD-75"})


def served_imaging(request: SoapRequest) -> ImagingFacts:
    """The instances of a RAD-69 / RAD-75 served here, from the compact records the request
    was read into (its payload element no longer holds them) and the instances the streamed
    response listed (the handler's context); from the elements where there are none."""
    parsed = request.parsed
    requested: Callable[[], Iterable[m.ImagingInstanceReference]]
    if isinstance(parsed, RetrieveImagingDocumentSetRequest):
        requested = partial(requested_references, parsed)
    elif isinstance(parsed, InvalidImagingRequest):
        requested = partial(iter, parsed.requested)
    else:
        requested = partial(extract.requested_instances, request.payload)
    returned = request.context.get(CONTEXT_RETURNED_INSTANCES)
    return ImagingFacts(requested, returned if callable(returned) else None)


def requested_imaging_studies(request: SoapRequest) -> list[str]:
    """The Study Instance UIDs a RAD-69 / RAD-75 request asks for."""
    parsed = request.parsed
    if isinstance(parsed, RetrieveImagingDocumentSetRequest):
        return list(dict.fromkeys(d.study_instance_uid for d in parsed.requested))
    return [i.study_instance_uid for i in served_imaging(request).requested()]


def _identity(request: SoapRequest) -> dict[str, Any]:
    """The human requestor (alias<user@issuer>) and purposes of use of a validated XUA
    assertion, when the authorization gate established one for this request (kept on the
    request: the record is written once the answer went out, from the connection's context,
    where the handler's context variables are not set)."""

    auth = request.context.get("authorization") or current_authorization()
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
                    found = await self.lookup((), requested_imaging_studies(request))
                else:
                    uids = [
                        d.document_unique_id for d in extract.requested_documents(request.payload)
                    ]
                    found = await self.lookup(uids, ())
                if found:
                    request.context[CONTEXT_PATIENTS] = {
                        **context_patients(request.context),
                        **found,
                    }
            except Exception:  # the audit's lookup never stops a retrieve
                log.exception("looking up the patients of a retrieve for its audit failed")
            return await handler(request)

        return handle
