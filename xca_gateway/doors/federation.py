"""The federation as the front doors see it: a patient's studies and their instances.

The DIMSE front door (:mod:`xca_gateway.doors.dimse`) and the DICOMweb front door
(:mod:`xca_gateway.doors.dicomweb`) answer from the same view of the XCA-I federation, reached
through the community's own initiating gateway in-process (no HTTP round trip to ourselves):

* a patient's studies are the KOS manifests an ITI-18 FindDocuments finds (fanned out as ITI-38
  to every community and asked of the local registry), all fetched in one ITI-43 (routed by
  homeCommunityId as parallel ITI-39 calls);
* XDS has no query by study alone, so a later request naming only a study (Study Root C-GET,
  WADO-RS, QIDO-RS below a study) is served from what a search found, but only to the caller
  whose search found it: each search grants its caller (the principal's name) access to the
  studies it found, for ``study_access_seconds``, in a :class:`StudyAccessStore` (in memory
  here; a store shared by replicas keeps the same small records). Never by UID alone across
  callers: another caller must name the patient, and the federation must confirm that the
  patient owns the study. The manifests themselves are a local cache (a bounded LRU) keyed by
  Study Instance UID; a grant whose manifest is no longer cached is served by asking the
  federation again for the patient the grant records;
* instances come from the gateway's Initiating Imaging Gateway in-process
  (``gateway.imaging.retrieve``: RAD-69 routed to local sources and as RAD-75 to peers), as an
  :class:`~xca_gateway.imaging.retrieve.ImagingRetrieval` read instance by instance; closing it
  releases the sources (files, peer responses) of instances never read.

The import of priors (:mod:`xca_gateway.doors.import_priors`) uses the same view inside a gateway.

Everything here is async and runs on the gateway's event loop; the DIMSE door calls it from
pynetdicom's threads through ``asyncio.run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from lxml import etree
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from xca_gateway.audit.messages import PatientRef
from xca_gateway.audit.patients import PatientMemory
from xca_gateway.consumer.imaging import (
    Manifest,
    find_manifests_request,
    imaging_request_from_kos,
    manifests_from_response,
)
from xca_gateway.doors.ports import InitiatingSide
from xca_gateway.imaging.request import (
    DocumentRequest,
    InvalidImagingRequest,
    RetrieveImagingDocumentSetRequest,
)
from xca_gateway.imaging.retrieve import ImagingRetrieval
from xca_gateway.protocol.namespaces import RIM, XDSB, ResponseStatus
from xca_gateway.security.callers import Principal, current_caller
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrs import RegistryError, adhoc_query_response
from xca_gateway.xds.kos import InstanceRef, kos_from_bytes, kos_references

log = logging.getLogger(__name__)

__all__ = [
    "AsyncStudyAccessStore",
    "FederationError",
    "FederationView",
    "FetchedManifests",
    "InMemoryStudyAccess",
    "ManifestsFound",
    "StudiesFound",
    "StudyAccessStore",
    "StudyAccessUnavailable",
    "StudyGrant",
    "StudyManifest",
    "audit_patients",
    "event_modalities",
    "header_patient_id",
    "imaging_request_for",
    "manifest_patient",
    "patient_cx",
]

# DICOM Controlled Terminology, as eventCodeList codes carry it (OID or the DCM designator).
_DCM_SCHEMES = frozenset({"1.2.840.10008.2.16.4", "DCM"})
# A KOS lists references only; anything this large is not a manifest we want in memory.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT = 120.0
DEFAULT_MAX_CACHED_STUDIES = 1000
# How long a search lets its caller name a study it found by UID alone (a reading session).
DEFAULT_STUDY_ACCESS_SECONDS = 3600.0
# Grants kept in memory at most (oldest first out): a caller whose grant was dropped names the
# patient again, nothing is served wrongly.
DEFAULT_MAX_STUDY_GRANTS = 100_000


class FederationError(Exception):
    """The federation could not answer (a failed query, no answer in time)."""

    def __init__(self, message: str, *, timeout: bool = False, unavailable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.timeout = timeout
        # A store this gateway needs is down (the replicas' shared database): 503, not 502.
        self.unavailable = unavailable

    @property
    def http_status(self) -> int:
        """What an HTTP front door answers: 504 (no answer in time), 503 (this gateway cannot
        decide now), else 502 (the federation failed)."""
        return 504 if self.timeout else 503 if self.unavailable else 502


@dataclass(frozen=True)
class StudyManifest:
    """One fetched KOS manifest: where it came from, its header and its references."""

    manifest: Manifest
    kos_bytes: bytes
    header: Dataset
    references: tuple[InstanceRef, ...]
    # Acquisition modalities of the study, from the DocumentEntry's eventCodeList (the KOS
    # itself says "KO"); empty when the registry did not record any.
    modalities: tuple[str, ...] = ()

    @property
    def study_instance_uids(self) -> tuple[str, ...]:
        uids = dict.fromkeys(r.study_instance_uid for r in self.references)
        return tuple(uids) or self.manifest.study_instance_uids


@dataclass
class StudiesFound:
    """A patient's studies, and what the federation said about the parts it could not answer
    (communities unavailable, manifests that could not be fetched)."""

    studies: list[StudyManifest]
    warnings: list[str] = field(default_factory=list)


@dataclass
class ManifestsFound:
    """The answer of the federation to a query for a patient's KOS manifests."""

    status: str
    errors: list[RegistryError]
    manifests: list[Manifest]
    # DocumentEntry uniqueId -> acquisition modalities (its DCM eventCodeList codes).
    modalities: dict[str, tuple[str, ...]]


@dataclass
class FetchedManifests:
    """KOS objects fetched by one ITI-43: their bytes, those refused, the retrieve's errors."""

    documents: list[tuple[Manifest, bytes]] = field(default_factory=list)
    unusable: list[tuple[Manifest, str]] = field(default_factory=list)
    errors: list[RegistryError] = field(default_factory=list)


# ----------------------------------------------------------------------------- study access


@dataclass(frozen=True)
class StudyGrant:
    """One caller's access to one study its own search found.

    ``patient_id`` is the CX the search named: what the federation is asked again with when the
    manifest is no longer cached (or was found through another replica). ``expires_at`` is POSIX
    time, a wall clock, so that replicas sharing a store agree on it.
    """

    principal: str
    study_instance_uid: str
    patient_id: str
    expires_at: float


class StudyAccessStore(Protocol):
    """Where grants live: in memory (:class:`InMemoryStudyAccess`) or a shared database."""

    def grant(self, grants: Sequence[StudyGrant]) -> None:
        """Record (or renew) each grant; a later grant for the same principal and study
        replaces the earlier one."""
        ...

    def granted(
        self, principal: str, study_instance_uids: Sequence[str], now: float
    ) -> list[StudyGrant]:
        """The principal's grants still valid at ``now`` for these studies (in the order
        asked, each study once)."""
        ...


class StudyAccessUnavailable(Exception):
    """A shared grant store could not be read (unreachable, or no answer in time)."""


@runtime_checkable
class AsyncStudyAccessStore(StudyAccessStore, Protocol):
    """A grant store behind I/O (a shared database): the front doors await these instead of
    blocking the event loop on :meth:`grant` / :meth:`granted`."""

    async def grant_async(self, grants: Sequence[StudyGrant]) -> None:
        """:meth:`grant`; a grant that cannot be recorded is logged, not raised."""
        ...

    async def granted_async(
        self, principal: str, study_instance_uids: Sequence[str], now: float
    ) -> list[StudyGrant]:
        """:meth:`granted`, raising :class:`StudyAccessUnavailable` when unknown."""
        ...


class InMemoryStudyAccess:
    """Grants in a bounded, thread-safe LRU (the DIMSE door asks from pynetdicom's threads)."""

    def __init__(self, max_grants: int = DEFAULT_MAX_STUDY_GRANTS) -> None:
        self.max_grants = max_grants
        self._grants: OrderedDict[tuple[str, str], StudyGrant] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._grants)

    def grant(self, grants: Sequence[StudyGrant]) -> None:
        with self._lock:
            for item in grants:
                key = (item.principal, item.study_instance_uid)
                self._grants[key] = item
                self._grants.move_to_end(key)
            while len(self._grants) > self.max_grants:
                self._grants.popitem(last=False)

    def granted(
        self, principal: str, study_instance_uids: Sequence[str], now: float
    ) -> list[StudyGrant]:
        found: list[StudyGrant] = []
        with self._lock:
            for uid in dict.fromkeys(study_instance_uids):
                item = self._grants.get((principal, uid))
                if item is None:
                    continue
                if item.expires_at <= now:
                    del self._grants[(principal, uid)]
                    continue
                found.append(item)
        return found


def _caller_key(caller: Principal | None) -> str | None:
    """Grants are per principal name; a request without a caller gets none and grants none."""
    return caller.key if caller is not None else None


# ----------------------------------------------------------------------------- sans-IO


def patient_cx(patient_id: str, issuer: str | None, local_authority: str) -> str:
    """The XDS patient id (CX ``id^^^&oid&ISO``) for a DICOM Patient ID and its issuer.

    No issuer means the community's own assigning authority. A foreign issuer is kept: the
    initiating gateway's patient-ID mapping resolves it (cross-reference table, PIX, XCPD).
    """
    return f"{patient_id}^^^&{issuer or local_authority}&ISO"


def header_patient_id(header: Dataset) -> str | None:
    """The patient of a manifest header as a CX (``id^^^&issuer&ISO``), or the bare id when
    the header names no issuer."""
    pid = str(header.get("PatientID", "") or "").strip()
    issuer = str(header.get("IssuerOfPatientID", "") or "").strip()
    for item in header.get("IssuerOfPatientIDQualifiersSequence", []) or []:
        issuer = issuer or str(item.get("UniversalEntityID", "") or "").strip()
    return f"{pid}^^^&{issuer}&ISO" if pid and issuer else pid or None


def manifest_patient(header: Dataset) -> PatientRef | None:
    """The patient of a manifest (or instance) header, with its name, for the audit."""
    patient_id = header_patient_id(header)
    if patient_id is None:
        return None
    name = str(header.get("PatientName", "") or "").strip()
    return PatientRef(patient_id, name or None)


def audit_patients(asked: Sequence[str], found: Sequence[PatientRef]) -> list[PatientRef]:
    """The patients a front door's retrieve record names: the id the caller asked with (its
    own domain's) named as the manifests found for it name the person, else the manifests'
    own patients (a request that named a study alone)."""
    if asked:
        name = next((p.name for p in found if p.name), None)
        return [PatientRef(asked[0], name)]
    unique: dict[str, PatientRef] = {}
    for patient in found:
        unique.setdefault(patient.patient_id, patient)
    return list(unique.values())


def event_modalities(response: etree._Element) -> dict[str, tuple[str, ...]]:
    """DocumentEntry uniqueId -> acquisition modalities (DCM eventCodeList codes)."""
    found: dict[str, tuple[str, ...]] = {}
    for entry in response.iter(f"{{{RIM}}}ExtrinsicObject"):
        unique_id = next(
            (
                e.get("value", "")
                for e in entry.iterfind(f"{{{RIM}}}ExternalIdentifier")
                if e.get("identificationScheme") == ebrim.DE_UNIQUE_ID
            ),
            "",
        )
        codes: list[str] = []
        for classification in entry.iterfind(f"{{{RIM}}}Classification"):
            if classification.get("classificationScheme") != ebrim.DE_EVENT_CODE:
                continue
            schemes = {
                (v.text or "").strip()
                for slot in classification.iterfind(f"{{{RIM}}}Slot")
                if slot.get("name") == "codingScheme"
                for v in slot.iterfind(f"{{{RIM}}}ValueList/{{{RIM}}}Value")
            }
            code = (classification.get("nodeRepresentation") or "").strip().upper()
            if code and schemes & _DCM_SCHEMES and code not in codes:
                codes.append(code)
        if unique_id:
            found[unique_id] = tuple(codes)
    return found


def imaging_request_for(
    studies: Iterable[StudyManifest],
    wanted: set[str] | None,
    transfer_syntaxes: Sequence[str],
) -> RetrieveImagingDocumentSetRequest:
    """The RAD-69 request for the instances ``wanted`` (SOP Instance UIDs; None = all) of
    ``studies``, each instance once even when two manifests reference it.

    Raises :class:`xca_gateway.consumer.imaging.ConsumerError` when a manifest names no source."""
    documents: list[DocumentRequest] = []
    seen: set[str] = set()
    for study in studies:
        full = _request_from_kos(
            study.kos_bytes, study.manifest.home_community_id, tuple(transfer_syntaxes)
        )
        for doc in full.documents:
            uid = doc.document_unique_id
            if (wanted is None or uid in wanted) and uid not in seen:
                seen.add(uid)
                documents.append(doc)
    return RetrieveImagingDocumentSetRequest(tuple(documents), tuple(transfer_syntaxes))


@functools.lru_cache(maxsize=32)
def _request_from_kos(
    kos_bytes: bytes, home_community_id: str, transfer_syntaxes: tuple[str, ...]
) -> RetrieveImagingDocumentSetRequest:
    """A manifest's whole RAD-69 request, parsed once: a viewer asks for one image of a study at
    a time, and reading a 200-reference KOS again for each took longer than the source's answer
    (the request is immutable; the bytes hash once)."""
    return imaging_request_from_kos(kos_bytes, home_community_id, transfer_syntaxes)


async def close_body(body: object) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


# ----------------------------------------------------------------------------- I/O


class FederationView:
    """A gateway's federation as seen by a front door (one per door)."""

    def __init__(
        self,
        gateway: InitiatingSide,
        *,
        max_cached_studies: int = DEFAULT_MAX_CACHED_STUDIES,
        timeout: float = DEFAULT_TIMEOUT,
        access: StudyAccessStore | None = None,
        study_access_seconds: float = DEFAULT_STUDY_ACCESS_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gateway = gateway
        self.timeout = timeout
        self.max_cached_studies = max_cached_studies
        self.access: StudyAccessStore = access if access is not None else InMemoryStudyAccess()
        self.study_access_seconds = study_access_seconds
        self.clock = clock
        # Study Instance UID -> manifest, learnt from earlier queries: a cache, not a right
        # (the grants decide who may name a study alone). DIMSE handlers read it from
        # pynetdicom's threads, hence the lock.
        self._studies: OrderedDict[str, StudyManifest] = OrderedDict()
        self._lock = threading.Lock()

    # -- the study cache and the callers' grants

    def remember(self, studies: Iterable[StudyManifest]) -> None:
        studies = list(studies)
        with self._lock:
            for study in studies:
                for uid in study.study_instance_uids:
                    self._studies[uid] = study
                    self._studies.move_to_end(uid)
            while len(self._studies) > self.max_cached_studies:
                self._studies.popitem(last=False)
        # The gateway's audit names the patient of the retrieves that follow (RAD-75 to the
        # communities holding these studies) from the manifests' headers.
        memory: PatientMemory | None = getattr(self.gateway, "audit_patients", None)
        if memory is None:
            return
        for study in studies:
            patient = manifest_patient(study.header)
            if patient is None:
                continue
            memory.learn(study.manifest.document_unique_id, patient)
            for uid in study.study_instance_uids:
                memory.learn(uid, patient)
            for ref in study.references:
                memory.learn_sop_class(ref.sop_instance_uid, ref.sop_class_uid)

    async def grant(
        self, caller: Principal | None, patient_id: str, studies: Iterable[StudyManifest]
    ) -> None:
        """Let ``caller`` name these studies, found by its search for ``patient_id``, alone."""
        key = _caller_key(caller)
        if key is None:
            return
        expires = self.clock() + self.study_access_seconds
        uids = dict.fromkeys(uid for study in studies for uid in study.study_instance_uids)
        grants = [StudyGrant(key, uid, patient_id, expires) for uid in uids]
        if isinstance(self.access, AsyncStudyAccessStore):
            await self.access.grant_async(grants)
        else:
            self.access.grant(grants)

    async def _granted(self, uids: Sequence[str], caller: Principal | None) -> list[StudyGrant]:
        """May raise :class:`FederationError` (unavailable) when a shared store is down."""
        key = _caller_key(caller)
        if key is None:
            return []
        if not isinstance(self.access, AsyncStudyAccessStore):
            return self.access.granted(key, uids, self.clock())
        try:
            return await self.access.granted_async(key, uids, self.clock())
        except StudyAccessUnavailable as exc:
            raise FederationError(
                f"study access could not be checked: {exc}", unavailable=True
            ) from None

    def _from_cache(self, uids: Iterable[str]) -> list[StudyManifest]:
        with self._lock:
            found = [self._studies[u] for u in uids if u in self._studies]
        unique: dict[int, StudyManifest] = {id(s): s for s in found}
        return list(unique.values())

    async def cached(
        self, study_instance_uids: Iterable[str], caller: Principal | None = None
    ) -> list[StudyManifest]:
        """Cached manifests of these studies that ``caller`` (default: the current caller)
        found by its own search (each once, in the order asked); nothing for studies only
        another caller found, nor when there is no caller."""
        caller = caller if caller is not None else current_caller()
        granted = await self._granted(list(study_instance_uids), caller)
        return self._from_cache(g.study_instance_uid for g in granted)

    def cached_manifests(self, study_instance_uids: Iterable[str]) -> list[StudyManifest]:
        """Cached manifests of these studies, whoever found them: for what was already served
        to a granted caller (its audit names the patient), never to decide access."""
        return self._from_cache(study_instance_uids)

    async def studies_by_uid(
        self, study_instance_uids: Sequence[str], caller: Principal | None = None
    ) -> list[StudyManifest]:
        """Like :meth:`cached`, but a granted study whose manifest is not cached here (evicted,
        or found through another replica) is looked up again through the patient its grant
        records. May raise :class:`FederationError` then."""
        caller = caller if caller is not None else current_caller()
        granted = await self._granted(study_instance_uids, caller)
        uids = [g.study_instance_uid for g in granted]
        studies = self._from_cache(uids)
        have = {uid for s in studies for uid in s.study_instance_uids}
        for patient in dict.fromkeys(
            g.patient_id for g in granted if g.study_instance_uid not in have
        ):
            # Not a new search by the caller: the grant keeps its expiry.
            found = await self._studies_of_patient(patient)
            studies.extend(s for s in found.studies if set(s.study_instance_uids) & set(uids))
        unique: dict[int, StudyManifest] = {id(s): s for s in studies}
        return list(unique.values())

    # -- queries

    async def studies_of_patient(
        self, patient_id: str, caller: Principal | None = None
    ) -> StudiesFound:
        """The patient's studies in every community; remembered, and granted to ``caller``
        (default: the current caller), whose search this is.

        ``patient_id`` is a CX in any assigning authority the initiating gateway can map.
        An unknown patient has no studies; any other failure of the whole query raises
        :class:`FederationError`."""
        caller = caller if caller is not None else current_caller()
        found = await self._studies_of_patient(patient_id)
        await self.grant(caller, patient_id, found.studies)
        return found

    async def _studies_of_patient(self, patient_id: str) -> StudiesFound:
        try:
            async with asyncio.timeout(self.timeout):
                found = await self._fetch(patient_id)
        except TimeoutError:
            raise FederationError(
                f"the federation did not answer within {self.timeout:g} s", timeout=True
            ) from None
        self.remember(found.studies)
        return found

    async def _fetch(self, patient_id: str) -> StudiesFound:
        found = await self.find_manifests(patient_id)
        codes = {e.error_code for e in found.errors if e.is_error}
        if found.status == ResponseStatus.FAILURE and not found.manifests:
            # An unknown patient is an empty answer, not a failure, to an imaging client.
            if codes - {"XDSUnknownPatientId"}:
                detail = "; ".join(
                    f"{e.error_code}: {e.code_context}" for e in found.errors if e.is_error
                )
                raise FederationError(f"federation query failed: {detail[:500]}")
            return StudiesFound([])
        warnings = [
            f"{e.error_code} ({e.location or 'unknown'}): {e.code_context}"
            for e in found.errors
            if e.is_error and e.error_code != "XDSUnknownPatientId"
        ]
        if not found.manifests:
            return StudiesFound([], warnings)
        fetched = await self.fetch_manifests(found.manifests)
        studies: list[StudyManifest] = []
        for manifest, problem in fetched.unusable:
            warnings.append(f"manifest {manifest.document_unique_id} unusable: {problem}")
        for manifest, kos_bytes in fetched.documents:
            try:
                kos = kos_from_bytes(kos_bytes)
                references = tuple(kos_references(kos))
            except (ValueError, InvalidDicomError) as exc:
                log.warning("manifest %s unusable: %s", manifest.document_unique_id, exc)
                warnings.append(f"manifest {manifest.document_unique_id} unusable: {exc}")
                continue
            studies.append(
                StudyManifest(
                    manifest,
                    kos_bytes,
                    kos,
                    references,
                    found.modalities.get(manifest.document_unique_id, ()),
                )
            )
        warnings.extend(
            f"{e.error_code} ({e.location or 'unknown'}): {e.code_context}"
            for e in fetched.errors
            if e.is_error
        )
        return StudiesFound(studies, warnings)

    async def find_manifests(self, patient_id: str) -> ManifestsFound:
        """ITI-18 FindDocuments for the patient's KOS manifests, fanned out by the initiating
        gateway (no deadline of its own: the initiating gateway's apply)."""
        outcome = await self.gateway.initiating.query(find_manifests_request(patient_id))
        response = adhoc_query_response(outcome.status, outcome.errors, outcome.objects)
        return ManifestsFound(
            outcome.status,
            list(outcome.errors),
            manifests_from_response(response),
            event_modalities(response),
        )

    async def fetch_manifests(self, manifests: Sequence[Manifest]) -> FetchedManifests:
        """The KOS objects of ``manifests`` in one ITI-43, which the initiating gateway splits
        by community into parallel ITI-39 calls."""
        result = await self.gateway.retrieving.retrieve(_retrieve_manifests_request(manifests))
        by_key = {(m.repository_unique_id, m.document_unique_id): m for m in manifests}
        fetched = FetchedManifests(errors=list(result.errors))
        try:
            for document in result.documents:
                key = (document.repository_unique_id, document.document_unique_id)
                manifest = by_key.get(key)
                if manifest is None:  # pragma: no cover - the retrieve returns what was asked
                    continue
                try:
                    data = await _read_limited(document.body, MAX_MANIFEST_BYTES)
                except ValueError as exc:
                    log.warning("manifest %s unusable: %s", manifest.document_unique_id, exc)
                    fetched.unusable.append((manifest, str(exc)))
                    continue
                fetched.documents.append((manifest, data))
        finally:
            result.close()
        return fetched

    # -- retrieves

    async def retrieve(self, request: RetrieveImagingDocumentSetRequest) -> ImagingRetrieval:
        """RAD-69 through the gateway's Initiating Imaging Gateway in-process (routed to local
        sources and as RAD-75 to peers); the caller reads it and must ``aclose()`` it."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self.gateway.imaging.retrieve(request)
        except TimeoutError:
            raise FederationError(
                f"the imaging retrieve did not start within {self.timeout:g} s", timeout=True
            ) from None
        except InvalidImagingRequest as exc:
            raise FederationError(f"cannot retrieve these instances: {exc.reason}") from None


def _retrieve_manifests_request(manifests: Sequence[Manifest]) -> etree._Element:
    root = etree.Element(f"{{{XDSB}}}RetrieveDocumentSetRequest", nsmap={"xdsb": XDSB})
    for manifest in manifests:
        request = etree.SubElement(root, f"{{{XDSB}}}DocumentRequest")
        etree.SubElement(request, f"{{{XDSB}}}HomeCommunityId").text = manifest.home_community_id
        etree.SubElement(
            request, f"{{{XDSB}}}RepositoryUniqueId"
        ).text = manifest.repository_unique_id
        etree.SubElement(request, f"{{{XDSB}}}DocumentUniqueId").text = manifest.document_unique_id
    return root


async def _read_limited(body: bytes | AsyncIterator[bytes], limit: int) -> bytes:
    if isinstance(body, bytes):
        if len(body) > limit:
            raise ValueError(f"larger than {limit} bytes")
        return body
    data = bytearray()
    try:
        async for chunk in body:
            data += chunk
            if len(data) > limit:
                raise ValueError(f"larger than {limit} bytes")
    finally:
        await close_body(body)
    return bytes(data)
