"""Consent enforcement on the responding side: what may leave the community (sans-IO).

The ITI-38 / ITI-39 / RAD-75 handlers call these pure functions with the metadata they have and
a decision function (normally
:meth:`xca_gateway.security.consent.service.ConsentService.verdicts_for_documents`
bound to the requesting community). Nothing here does I/O.

Error codes, and why:

* Query (ITI-38): withheld DocumentEntries are removed, with one ``LocalPolicyRestrictionError``
  (ITI TF-3 Table 4.2.4.1-2: "not permitted because of local policy restrictions or violation of
  a previously reached agreement"; IPF ``ErrorCode.LOCAL_POLICY_RESTRICTION_ERROR``) of severity
  Error, so the status is PartialSuccess when something remains and Failure when nothing does
  (ITI TF-3 4.2.4.2). The code names the cause, which the catch-all ``XDSRegistryError``
  ("internal error") would misstate. The error names neither the documents nor their number: the
  requester learns that policy withheld something, not what.
* Retrieve (ITI-39, RAD-75): each refused DocumentRequest / study gets ``XDSDocumentUniqueIdError``
  (with ``LocalPolicyRestrictionError`` available as an option). ITI TF-3 defines it as "the
  document ... is not available. This could be because the document is not available, the
  requestor is not authorized to access that document or the document is no longer available",
  so every XCA initiating gateway already handles it per document, and a withheld document is
  indistinguishable from an unknown one.

The RegistryError ``location`` is our homeCommunityId, as for every error a responding gateway
returns (ITI39-012 and the ITI-38 equivalent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from lxml import etree

from xca_gateway.protocol.namespaces import RIM
from xca_gateway.security.consent.service import DocumentClassification, DocumentCode
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrs import LOCAL_POLICY_RESTRICTION_ERROR, RegistryError, status_for

XDS_DOCUMENT_UNIQUE_ID_ERROR = "XDSDocumentUniqueIdError"

_EXTRINSIC_OBJECT = f"{{{RIM}}}ExtrinsicObject"
_REGISTRY_PACKAGE = f"{{{RIM}}}RegistryPackage"
_ASSOCIATION = f"{{{RIM}}}Association"
_OBJECT_REF = f"{{{RIM}}}ObjectRef"
_CLASSIFICATION = f"{{{RIM}}}Classification"
_PACKAGE_PATIENT_SCHEMES = frozenset({ebrim.SS_PATIENT_ID, ebrim.FOLDER_PATIENT_ID})


class _Verdict(Protocol):
    @property
    def allowed(self) -> bool: ...

    @property
    def reason(self) -> str: ...


# (patient id, [(classCode, confidentialityCode(s))]) -> one decision per document, either a
# bool or a verdict with a reason (ConsentService.verdicts_for_documents).
DecisionFn = Callable[
    [str | None, Sequence[DocumentClassification]], Sequence[bool] | Sequence[_Verdict]
]


def _decisions(
    decide: DecisionFn, patient: str | None, documents: Sequence[DocumentClassification]
) -> list[tuple[bool, str]]:
    results: list[bool | _Verdict] = list(decide(patient, documents))
    if len(results) != len(documents):
        raise ValueError("the consent decision must answer every document")
    out: list[tuple[bool, str]] = []
    for result in results:
        if isinstance(result, bool):
            out.append((result, "consent" if result else "withheld by patient consent"))
        else:
            out.append((result.allowed, result.reason))
    return out


# --------------------------------------------------------------------------- metadata facts


@dataclass(frozen=True)
class DocumentFacts:
    """What consent decisions need from a DocumentEntry (``rim:ExtrinsicObject``)."""

    entry_uuid: str | None
    unique_id: str | None
    patient_id: str | None
    class_code: DocumentCode | None
    confidentiality_codes: tuple[DocumentCode, ...] = ()
    repository_unique_id: str | None = None
    home_community_id: str | None = None
    study_instance_uids: tuple[str, ...] = ()

    @property
    def classification(self) -> DocumentClassification:
        return (self.class_code, self.confidentiality_codes)


def _slot_values(element: etree._Element, name: str) -> list[str]:
    values: list[str] = []
    for slot in element.iterfind(f"{{{RIM}}}Slot"):
        if slot.get("name") == name:
            values.extend(
                (v.text or "").strip() for v in slot.iterfind(f"{{{RIM}}}ValueList/{{{RIM}}}Value")
            )
    return values


def _code(classification: etree._Element) -> DocumentCode:
    schemes = _slot_values(classification, ebrim.SLOT_CODING_SCHEME)
    return DocumentCode(
        classification.get("nodeRepresentation", ""), schemes[0] if schemes else None
    )


def _external_id(element: etree._Element, schemes: Iterable[str]) -> str | None:
    wanted = set(schemes)
    for ext in element.iterfind(f"{{{RIM}}}ExternalIdentifier"):
        if ext.get("identificationScheme") in wanted:
            return ext.get("value")
    return None


def _study_uids(element: etree._Element) -> tuple[str, ...]:
    uids = []
    for value in _slot_values(element, ebrim.SLOT_REFERENCE_ID_LIST):
        parts = value.split("^")
        if len(parts) >= 5 and parts[4] == ebrim.REFERENCE_ID_STUDY_INSTANCE_UID and parts[0]:
            uids.append(parts[0])
    return tuple(uids)


def document_facts(extrinsic_object: etree._Element) -> DocumentFacts:
    classifications = list(extrinsic_object.iterfind(f"{{{RIM}}}Classification"))
    class_code = next(
        (_code(c) for c in classifications if c.get("classificationScheme") == ebrim.DE_CLASS_CODE),
        None,
    )
    confidentiality = tuple(
        _code(c)
        for c in classifications
        if c.get("classificationScheme") == ebrim.DE_CONFIDENTIALITY_CODE
    )
    repository = _slot_values(extrinsic_object, ebrim.SLOT_REPOSITORY_UNIQUE_ID)
    return DocumentFacts(
        entry_uuid=extrinsic_object.get("id"),
        unique_id=_external_id(extrinsic_object, [ebrim.DE_UNIQUE_ID]),
        patient_id=_external_id(extrinsic_object, [ebrim.DE_PATIENT_ID]),
        class_code=class_code,
        confidentiality_codes=confidentiality,
        repository_unique_id=repository[0] if repository else None,
        home_community_id=extrinsic_object.get("home"),
        study_instance_uids=_study_uids(extrinsic_object),
    )


def study_index(objects: Iterable[etree._Element]) -> dict[str, list[DocumentFacts]]:
    """Study Instance UID → the DocumentEntries (KOS manifests) that reference it (RAD-75)."""
    index: dict[str, list[DocumentFacts]] = {}
    for obj in objects:
        if obj.tag == _EXTRINSIC_OBJECT:
            facts = document_facts(obj)
            for uid in facts.study_instance_uids:
                index.setdefault(uid, []).append(facts)
    return index


# --------------------------------------------------------------------------- query results


@dataclass
class QueryFilter:
    kept: list[etree._Element]
    errors: list[RegistryError]
    withheld: list[DocumentFacts] = field(default_factory=list)
    # ids of every object removed (entries, packages, associations, refs)
    removed_ids: set[str] = field(default_factory=set)
    reasons: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return status_for(self.errors, results=len(self.kept))

    @property
    def audit_description(self) -> str | None:
        """Why documents were withheld, for the transaction's audit record (not the wire)."""
        if not self.withheld and not self.removed_ids:
            return None
        entries = ", ".join(f.entry_uuid or f.unique_id or "?" for f in self.withheld)
        reasons = "; ".join(dict.fromkeys(self.reasons))
        return (
            f"consent: withheld {len(self.withheld)} document entr"
            f"{'y' if len(self.withheld) == 1 else 'ies'} ({entries}): {reasons}"
        )


def query_patients(objects: Iterable[etree._Element]) -> set[str | None]:
    """The patients whose consent :func:`filter_query_objects` will ask about (to read their
    rules first)."""
    patients: set[str | None] = set()
    for obj in objects:
        if obj.tag == _EXTRINSIC_OBJECT:
            patients.add(_external_id(obj, [ebrim.DE_PATIENT_ID]))
        elif obj.tag == _REGISTRY_PACKAGE:
            patients.add(_external_id(obj, _PACKAGE_PATIENT_SCHEMES))
    return patients


def filter_query_objects(
    objects: Sequence[etree._Element],
    decision_fn: DecisionFn,
    *,
    home_community_id: str,
    error_code: str = LOCAL_POLICY_RESTRICTION_ERROR,
) -> QueryFilter:
    """Remove what consent withholds from a LeafClass query result.

    Withheld: DocumentEntries the decision refuses (or without a patient id), SubmissionSets and
    Folders of patients whose record as such may not be shared, and every Association,
    Classification or ObjectRef pointing at a withheld object (their ids would reveal it).
    Call it on the full metadata, before reducing a result to ObjectRefs.
    """
    entries = [o for o in objects if o.tag == _EXTRINSIC_OBJECT]
    facts = [document_facts(e) for e in entries]
    by_patient: dict[str | None, list[int]] = {}
    for i, f in enumerate(facts):
        by_patient.setdefault(f.patient_id, []).append(i)

    result = QueryFilter(kept=[], errors=[])
    for patient, indexes in by_patient.items():
        decisions = _decisions(decision_fn, patient, [facts[i].classification for i in indexes])
        for i, (allowed, reason) in zip(indexes, decisions, strict=True):
            if not allowed:
                result.withheld.append(facts[i])
                result.reasons.append(reason)
                entry_uuid = facts[i].entry_uuid
                if entry_uuid:
                    result.removed_ids.add(entry_uuid)

    for obj in objects:
        if obj.tag != _REGISTRY_PACKAGE:
            continue
        patient = _external_id(obj, _PACKAGE_PATIENT_SCHEMES)
        allowed, reason = _decisions(decision_fn, patient, [(None, None)])[0]
        if not allowed and obj.get("id"):
            result.removed_ids.add(obj.get("id", ""))
            result.reasons.append(reason)

    removed = result.removed_ids
    for obj in objects:
        obj_id = obj.get("id")
        if obj_id in removed:
            continue
        if obj.tag == _ASSOCIATION and (
            obj.get("sourceObject") in removed or obj.get("targetObject") in removed
        ):
            if obj_id:
                removed.add(obj_id)
            continue
        if obj.tag == _CLASSIFICATION and obj.get("classifiedObject") in removed:
            continue
        if obj.tag == _OBJECT_REF and obj_id in removed:
            continue
        result.kept.append(obj)

    if removed:
        result.errors.append(
            RegistryError(
                error_code,
                "Some registry objects were withheld: the patient's consent or local policy "
                "does not permit sharing them with the requesting community",
                location=home_community_id,
            )
        )
    return result


# --------------------------------------------------------------------------- retrieves


T = TypeVar("T")


@dataclass
class RetrieveFilter(Generic[T]):
    permitted: list[T]
    refused: list[T]
    errors: list[RegistryError]
    reasons: list[str] = field(default_factory=list)

    @property
    def audit_description(self) -> str | None:
        if not self.refused:
            return None
        return f"consent: refused {len(self.refused)} request(s): " + "; ".join(
            dict.fromkeys(self.reasons)
        )


def _describe_document(item: object) -> str:
    uid = getattr(item, "document_unique_id", None)
    return f"document {uid}" if uid else "document"


def filter_retrieve(
    requests: Sequence[T],
    facts_for: Callable[[T], DocumentFacts | Sequence[DocumentFacts] | None],
    decision_fn: DecisionFn,
    *,
    home_community_id: str,
    describe: Callable[[T], str] = _describe_document,
    error_code: str = XDS_DOCUMENT_UNIQUE_ID_ERROR,
    refuse_unknown: bool = True,
) -> RetrieveFilter[T]:
    """Split retrieve requests into permitted and refused, with one RegistryError per refusal.

    ``facts_for`` gives the metadata of what a request asks for: the DocumentEntry of an ITI-39
    DocumentRequest, or every KOS DocumentEntry referencing the study of a RAD-75 request (see
    :func:`study_index`); a request is refused if any of them is. Requests without metadata are
    refused unless ``refuse_unknown`` is False: consent cannot be established for them. Errors
    are deduplicated by text, so a refused study yields one error however many of its
    instances were asked for.
    """
    result: RetrieveFilter[T] = RetrieveFilter([], [], [])
    seen: set[str] = set()
    for item in requests:
        found = facts_for(item)
        if found is None:
            documents: list[DocumentFacts] = []
        elif isinstance(found, DocumentFacts):
            documents = [found]
        else:
            documents = list(found)
        if not documents:
            allowed, reason = (not refuse_unknown), "no metadata to establish consent"
        else:
            allowed, reason = True, ""
            by_patient: dict[str | None, list[DocumentFacts]] = {}
            for f in documents:
                by_patient.setdefault(f.patient_id, []).append(f)
            for patient, group in by_patient.items():
                for ok, why in _decisions(decision_fn, patient, [f.classification for f in group]):
                    if not ok:
                        allowed, reason = False, why
        if allowed:
            result.permitted.append(item)
            continue
        result.refused.append(item)
        result.reasons.append(f"{describe(item)}: {reason}")
        text = f"{describe(item)} is not available to the requesting community"
        if text not in seen:
            seen.add(text)
            result.errors.append(RegistryError(error_code, text, location=home_community_id))
    return result


def filter_document_requests(
    requests: Sequence[T],
    metadata: dict[str, DocumentFacts],
    decision_fn: DecisionFn,
    *,
    home_community_id: str,
    error_code: str = XDS_DOCUMENT_UNIQUE_ID_ERROR,
) -> RetrieveFilter[T]:
    """ITI-39: requests carry ``document_unique_id``; ``metadata`` maps uniqueId → facts."""
    return filter_retrieve(
        requests,
        lambda r: metadata.get(getattr(r, "document_unique_id", "")),
        decision_fn,
        home_community_id=home_community_id,
        error_code=error_code,
    )


def filter_imaging_requests(
    requests: Sequence[T],
    studies: dict[str, list[DocumentFacts]],
    decision_fn: DecisionFn,
    *,
    home_community_id: str,
    error_code: str = XDS_DOCUMENT_UNIQUE_ID_ERROR,
) -> RetrieveFilter[T]:
    """RAD-75: requests carry ``study_instance_uid``; ``studies`` from :func:`study_index`."""
    return filter_retrieve(
        requests,
        lambda r: studies.get(getattr(r, "study_instance_uid", "")),
        decision_fn,
        home_community_id=home_community_id,
        describe=lambda r: f"study {getattr(r, 'study_instance_uid', '?')}",
        error_code=error_code,
    )
