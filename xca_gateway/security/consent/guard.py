"""Patient consent on the responding side: what the patient withheld never leaves the community.

Wraps the ITI-38, ITI-39 and RAD-75 handlers. Queries are run for full metadata and filtered
before they are answered (ObjectRef requests are reduced afterwards, so ids of withheld objects
never leak); retrieves are checked against the registered metadata of what they ask for (the
DocumentEntry of an ITI-39 document, the KOS manifests of a RAD-75 study) and only permitted
requests reach the repository or imaging source. The decisions themselves are the pure
functions of :mod:`xca_gateway.security.consent.enforcement`; the reason goes into the
transaction's audit record.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from lxml import etree

from xca_gateway.imaging.request import (
    RetrieveImagingDocumentSetRequest,
    parse_retrieve_imaging_request,
)
from xca_gateway.protocol.namespaces import QUERY, RIM, RS, XDSB, XDSI, ErrorSeverity
from xca_gateway.protocol.soap_service import Handler, SoapRequest, SoapResponse
from xca_gateway.registry.model import (
    Kind,
    ObjectFilter,
    ValueAttribute,
    ValueCondition,
    load_element,
)
from xca_gateway.security.callers import current_caller
from xca_gateway.security.consent.enforcement import (
    DecisionFn,
    DocumentFacts,
    document_facts,
    filter_document_requests,
    filter_imaging_requests,
    filter_query_objects,
    query_patients,
)
from xca_gateway.security.consent.service import ConsentService
from xca_gateway.security.policy import current_authorization
from xca_gateway.transactions import TRANSACTIONS
from xca_gateway.transactions.iti43 import (
    build_retrieve_document_set_response,
    parse_retrieve_document_set_request,
)
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrs import RegistryError, adhoc_query_response, status_for

log = logging.getLogger(__name__)

_UNKNOWN_COMMUNITY = "urn:oid:0"  # no identity established: only the default mode applies


def requesting_community(request: SoapRequest) -> str:
    """Who asks: the community of the authenticated peer gateway, never a message's claim.

    The principal comes from the TLS certificate through the access policy; an assertion's
    homeCommunityId is not used (a peer could claim another community's id), and the gate has
    already refused an assertion whose community is not the peer's.
    """
    principal = current_caller()
    if principal is not None and principal.home_community_id:
        return principal.home_community_id
    auth = current_authorization()
    if auth is not None and auth.decision.home_community_id:
        return auth.decision.home_community_id
    return _UNKNOWN_COMMUNITY


class ConsentGuard:
    def __init__(self, consent: ConsentService, registry: Any, home_community_id: str) -> None:
        self.consent = consent
        self.registry = registry
        self.home = home_community_id

    async def _decide(self, community: str, patients: Iterable[str | None]) -> DecisionFn:
        """The decision for these patients' documents: their rules are read first, off the
        event loop (a shared database may be slow); unreadable rules withhold everything."""
        rules = await self.consent.rules_of(patients)

        def decide(patient: str | None, docs: Sequence[Any]) -> Sequence[Any]:
            known = None if rules is None else rules.get(patient or "", [])
            return self.consent.verdicts_with(known, patient, community, docs)

        return decide

    async def _select(self, flt: ObjectFilter) -> list[DocumentFacts]:
        store = getattr(self.registry, "store", None)
        if store is None:  # a remote registry: no metadata to decide with, so nothing passes
            return []
        rows = await store.select(flt, with_xml=True)
        return [document_facts(load_element(row.xml)) for row in rows if row.xml]

    # ------------------------------------------------------------------ ITI-38

    def iti38(self, handler: Handler) -> Handler:
        async def handle(request: SoapRequest) -> SoapResponse:
            option = request.payload.find(f"{{{QUERY}}}ResponseOption")
            wanted = option.get("returnType", "ObjectRef") if option is not None else "ObjectRef"
            if option is not None and wanted == "ObjectRef":
                # Decide on full metadata, then reduce: ids alone cannot be judged.
                option.set("returnType", "LeafClass")
            response = await handler(request)
            payload = response.payload
            object_list = payload.find(f"{{{RIM}}}RegistryObjectList")
            objects = list(object_list.iterchildren("{*}*")) if object_list is not None else []
            filtered = filter_query_objects(
                objects,
                await self._decide(requesting_community(request), query_patients(objects)),
                home_community_id=self.home,
            )
            if wanted == "ObjectRef":
                kept = [_object_ref(o) for o in filtered.kept]
            else:
                kept = filtered.kept
            errors = _registry_errors(payload) + filtered.errors
            response.payload = adhoc_query_response(
                status_for(errors, results=len(kept)), errors, kept
            )
            if filtered.audit_description:
                request.context["audit_outcome_description"] = filtered.audit_description
            return response

        return handle

    # ------------------------------------------------------------------ ITI-39

    def iti39(self, handler: Handler) -> Handler:
        async def handle(request: SoapRequest) -> SoapResponse:
            parsed = parse_retrieve_document_set_request(request.payload)
            uids = tuple(d.document_unique_id for d in parsed.documents)
            facts = await self._select(ObjectFilter(kind=Kind.DOCUMENT_ENTRY, unique_ids=uids))
            metadata = {f.unique_id: f for f in facts if f.unique_id}
            decision = filter_document_requests(
                list(parsed.documents),
                metadata,
                await self._decide(requesting_community(request), (f.patient_id for f in facts)),
                home_community_id=self.home,
            )
            if not decision.refused:
                return await handler(request)
            refused = {d.document_unique_id for d in decision.refused}
            for element in list(request.payload.iter(f"{{{XDSB}}}DocumentRequest")):
                if (element.findtext(f"{{{XDSB}}}DocumentUniqueId") or "").strip() in refused:
                    parent = element.getparent()
                    if parent is not None:
                        parent.remove(element)
            request.context["audit_outcome_description"] = decision.audit_description
            return await self._answer_retrieve(request, handler, decision.errors)

        return handle

    # ------------------------------------------------------------------ RAD-75

    def rad75(self, handler: Handler) -> Handler:
        async def handle(request: SoapRequest) -> SoapResponse:
            parsed: object = request.parsed
            if not isinstance(parsed, RetrieveImagingDocumentSetRequest):
                if parsed is not None:
                    return await handler(request)  # the handler answers malformed requests
                try:
                    parsed = parse_retrieve_imaging_request(request.payload)
                except ValueError:
                    return await handler(request)
            assert isinstance(parsed, RetrieveImagingDocumentSetRequest)
            studies: dict[str, list[DocumentFacts]] = {}
            for study in {d.study_instance_uid for d in parsed.documents}:
                reference = f"{study}^^^^{ebrim.REFERENCE_ID_STUDY_INSTANCE_UID}"
                studies[study] = await self._select(
                    ObjectFilter(
                        kind=Kind.DOCUMENT_ENTRY,
                        statuses=(ebrim.STATUS_APPROVED,),
                        values=(ValueCondition(ValueAttribute.REFERENCE_ID, (reference,)),),
                    )
                )
            patients = (f.patient_id for facts in studies.values() for f in facts)
            decision = filter_imaging_requests(
                list(parsed.documents),
                {k: v for k, v in studies.items() if v},
                await self._decide(requesting_community(request), patients),
                home_community_id=self.home,
            )
            if not decision.refused:
                return await handler(request)
            refused_studies = {d.study_instance_uid for d in decision.refused}
            if request.parsed is not None:  # read as it arrived: the records are the request
                request.parsed = dataclasses.replace(
                    parsed,
                    documents=tuple(
                        d for d in parsed.documents if d.study_instance_uid not in refused_studies
                    ),
                    rejected=tuple(
                        r
                        for r in parsed.rejected
                        if r.document.study_instance_uid not in refused_studies
                    ),
                )
            for element in list(request.payload.iter(f"{{{XDSI}}}StudyRequest")):
                if element.get("studyInstanceUID") in refused_studies:
                    parent = element.getparent()
                    if parent is not None:
                        parent.remove(element)
            request.context["audit_outcome_description"] = decision.audit_description
            return await self._answer_retrieve(request, handler, decision.errors)

        return handle

    async def _answer_retrieve(
        self, request: SoapRequest, handler: Handler, errors: list[RegistryError]
    ) -> SoapResponse:
        """Run the handler for what remains (if anything) and add the refusals to its answer."""

        remaining: Sequence[object] = list(
            request.payload.iter(f"{{{XDSB}}}DocumentRequest")
        ) or list(request.payload.iter(f"{{{XDSI}}}DocumentRequest"))
        if isinstance(request.parsed, RetrieveImagingDocumentSetRequest):
            remaining = request.parsed.requested
        if not remaining:
            spec_action = request.envelope.addressing.action

            spec = next(t for t in TRANSACTIONS if t.action == spec_action)
            payload = build_retrieve_document_set_response(
                status_for(errors, results=0), errors, []
            )
            return SoapResponse(payload, spec.response_action, mtom=True, outcome="failure")
        response = await handler(request)
        registry_response = response.payload.find(f"{{{RS}}}RegistryResponse")
        if registry_response is not None:
            own = _registry_errors(registry_response)
            delivered = len(response.payload.findall(f"{{{XDSB}}}DocumentResponse"))
            if response.streamed is not None:
                delivered += response.streamed.count
            merged = own + errors
            replacement = build_retrieve_document_set_response(
                status_for(merged, results=delivered), merged, []
            ).find(f"{{{RS}}}RegistryResponse")
            assert replacement is not None
            registry_response.getparent().replace(registry_response, replacement)  # type: ignore[union-attr]
            response.outcome = "partial" if delivered else "failure"
        return response


def _registry_errors(parent: etree._Element) -> list[RegistryError]:
    return [
        RegistryError(
            e.get("errorCode", ""),
            e.get("codeContext", ""),
            e.get("location"),
            e.get("severity", ErrorSeverity.ERROR),
        )
        for e in parent.iterfind(f"{{{RS}}}RegistryErrorList/{{{RS}}}RegistryError")
    ]


def _object_ref(obj: etree._Element) -> etree._Element:
    ref = etree.Element(f"{{{RIM}}}ObjectRef")
    ref.set("id", obj.get("id", ""))
    if obj.get("home"):
        ref.set("home", obj.get("home", ""))
    return copy.copy(ref)
