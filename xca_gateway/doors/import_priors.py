"""Import of priors: a patient's studies from other communities into the local PACS, reconciled.

The flow (IHE RAD IRWF.b Importer, fed by XCA-I): ITI-18 through the initiating gateway finds
the patient's KOS manifests in every community → the foreign ones are kept (homeCommunityId of
the manifest ≠ ours) → each manifest is fetched (ITI-43, routed as ITI-39) → RAD-69 (routed as
RAD-75) streams its instances → each instance is decoded completely, reconciled
(:mod:`xca_gateway.doors.reconcile`: local patient id, prefixed accession number, previous values in
the Original Attributes Sequence) and sent by C-STORE to the local PACS. One instance at a time
is held in memory; one that does not decode, does not reconcile or that the PACS refuses is
reported and never half-stored.

Two ways to reach the federation: :class:`HttpsFederation` (a consumer over mutual TLS, as
``xca-gateway retrieve-study`` does) and :class:`InProcessFederation` (inside a gateway, for
the HL7 auto-prefetch). ``xca-gateway import-priors`` is the command line of this module; an
ATNA "Import" (110107) audit message per study goes to an audit record repository when one is
given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from lxml import etree
from pydicom.dataset import Dataset

from xca_gateway.audit.config import AuditConfig, AuditDestination
from xca_gateway.audit.messages import (
    DETAIL_XCA_HOME_COMMUNITY_ID,
    AuditContext,
    AuditMessage,
    EventId,
    EventIdentification,
    EventOutcome,
    ImagingInstanceReference,
    Node,
    RoleId,
    patient_object,
    study_objects,
    system_participant,
)
from xca_gateway.audit.trail import AuditTrail
from xca_gateway.consumer.commands import ExchangeError, check_reachable
from xca_gateway.consumer.endpoints_file import EndpointsFile
from xca_gateway.consumer.imaging import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    Consumer,
    ConsumerError,
    InstanceBegins,
    InstanceEnds,
    Manifest,
    Rad69Root,
    find_manifests_request,
    imaging_request_from_kos,
    manifests_from_response,
)
from xca_gateway.doors.federation import FederationError, FederationView, event_modalities
from xca_gateway.doors.ports import InitiatingSide
from xca_gateway.doors.reconcile import (
    Reconciliation,
    ReconciliationError,
    accession_prefix_for,
    reconcile,
)
from xca_gateway.imaging import transfer_syntax as ts
from xca_gateway.imaging.instance import decode_instance
from xca_gateway.imaging.request import RetrieveImagingDocumentSetRequest
from xca_gateway.imaging.retrieve import InstanceTooLarge
from xca_gateway.progress import ProgressLine
from xca_gateway.protocol import mtom
from xca_gateway.protocol.credentials import check_key_pair
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.tls import client_context
from xca_gateway.transactions.iti43 import same_community
from xca_gateway.xds.ebrs import RegistryError, parse_registry_errors
from xca_gateway.xds.kos import InstanceRef, is_valid_uid, kos_from_bytes, kos_references
from xca_gateway.xds.patient_id import PatientId, parse_patient_id

log = logging.getLogger(__name__)

__all__ = [
    "Demographics",
    "HttpsFederation",
    "ImportReport",
    "InProcessFederation",
    "PacsStore",
    "PriorManifest",
    "PriorSelection",
    "StudyImport",
    "add_import_priors_command",
    "decode_instance",
    "import_audit_messages",
    "import_priors",
    "prior_manifests",
    "select_priors",
]

# Native, then the lossless compressed syntaxes: an instance stored compressed comes and goes
# to the PACS as it is; one the PACS does not take compressed is converted if it can be.
DEFAULT_TRANSFER_SYNTAXES = ts.LOSSLESS_AS_STORED
# One instance is held in memory while it is decoded, reconciled and stored.
DEFAULT_MAX_INSTANCE_BYTES = 512 * 1024 * 1024
# pynetdicom / PS3.8: at most 128 presentation contexts per association.
_MAX_CONTEXTS = 128
# C-STORE statuses that mean "stored" (PS3.4 B.2.3: warnings included).
_STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
# Query errors that only say a community does not know the patient.
_HARMLESS_QUERY_ERRORS = frozenset({"XDSUnknownPatientId"})


# ----------------------------------------------------------------------------- sans-IO


@dataclass(frozen=True)
class PriorManifest:
    """A KOS manifest DocumentEntry plus the modalities its eventCodeList names (DCM)."""

    manifest: Manifest
    modalities: tuple[str, ...] = ()

    @property
    def home_community_id(self) -> str:
        return self.manifest.home_community_id


def prior_manifests(payload: etree._Element) -> list[PriorManifest]:
    """The KOS DocumentEntries of an AdhocQueryResponse with their modality event codes."""
    modalities = event_modalities(payload)
    return [
        PriorManifest(m, modalities.get(m.document_unique_id, ()))
        for m in manifests_from_response(payload)
    ]


@dataclass(frozen=True)
class PriorSelection:
    """Which manifests count as priors to import."""

    local_home_community_id: str
    # Only from these communities (empty: any foreign community).
    from_communities: frozenset[str] = frozenset()
    study_instance_uids: frozenset[str] = frozenset()
    # Only studies with one of these modalities (empty: any).
    modalities: frozenset[str] = frozenset()
    # Only studies on or after this date (YYYYMMDD); studies without a date are kept.
    not_before: str | None = None
    include_local: bool = False

    @staticmethod
    def lookback(days: int | None, today: date | None = None) -> str | None:
        if days is None:
            return None
        return ((today or datetime.now(UTC).date()) - timedelta(days=days)).strftime("%Y%m%d")


def select_priors(
    manifests: Iterable[PriorManifest], selection: PriorSelection
) -> tuple[list[PriorManifest], int]:
    """(the manifests to import, how many local ones were left out)."""
    chosen: list[PriorManifest] = []
    local = 0
    for prior in manifests:
        home = prior.home_community_id
        if same_community(home, selection.local_home_community_id) and not selection.include_local:
            local += 1
            continue
        if selection.from_communities and not any(
            same_community(home, c) for c in selection.from_communities
        ):
            continue
        studies = set(prior.manifest.study_instance_uids)
        if selection.study_instance_uids and not studies & selection.study_instance_uids:
            continue
        if selection.modalities and not set(prior.modalities) & selection.modalities:
            continue
        start = (prior.manifest.service_start_time or "")[:8]
        if selection.not_before and start and start < selection.not_before:
            continue
        chosen.append(prior)
    return chosen, local


@dataclass(frozen=True)
class Demographics:
    """Local demographics to coerce (IRWF: the local record wins), when the caller has them."""

    name: str | None = None  # DICOM PN
    birth_date: str | None = None  # YYYYMMDD
    sex: str | None = None


@dataclass(frozen=True)
class InstanceFailure:
    sop_instance_uid: str
    reason: str


@dataclass
class StudyImport:
    """What happened to one manifest's study."""

    manifest: Manifest
    accession_prefix: str
    requested: int = 0
    stored: list[InstanceRef] = field(default_factory=list)
    failed: list[InstanceFailure] = field(default_factory=list)
    errors: list[RegistryError] = field(default_factory=list)
    # The study as the PACS now files it (from the first instance stored).
    accession_number: str | None = None
    original_accession_number: str | None = None

    @property
    def study_instance_uid(self) -> str:
        uids = self.manifest.study_instance_uids
        return uids[0] if uids else self.manifest.document_unique_id

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class ImportReport:
    patient_id: str
    studies: list[StudyImport] = field(default_factory=list)
    local_studies_skipped: int = 0
    query_errors: list[RegistryError] = field(default_factory=list)

    @property
    def stored(self) -> int:
        return sum(len(s.stored) for s in self.studies)

    @property
    def failed(self) -> int:
        return sum(len(s.failed) for s in self.studies)

    @property
    def blocking_query_errors(self) -> list[RegistryError]:
        """Query errors that may hide priors (a community down), not "patient unknown"."""
        return [
            e
            for e in self.query_errors
            if e.is_error and e.error_code not in _HARMLESS_QUERY_ERRORS
        ]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocking_query_errors

    @property
    def nothing_to_import(self) -> bool:
        return not self.studies


def storage_pairs(
    refs: Iterable[InstanceRef], transfer_syntaxes: Sequence[str]
) -> list[tuple[str, str]]:
    """The (SOP class, transfer syntax) presentation contexts a manifest's instances need."""
    pairs: dict[tuple[str, str], None] = {}
    for ref in refs:
        if not is_valid_uid(ref.sop_class_uid):
            continue  # the instance itself will tell when it arrives
        for syntax in transfer_syntaxes:
            pairs[(ref.sop_class_uid, syntax)] = None
    return list(pairs)


def import_audit_messages(
    ctx: AuditContext,
    *,
    study: StudyImport,
    patient_id: str,
    importer: Node,
    source: Node,
    pacs: Node,
    refs: Mapping[str, InstanceRef] | None = None,
    when: datetime | None = None,
    patient_name: str | None = None,
) -> tuple[AuditMessage, ...]:
    """DICOM "Import" (110107, action C) for one study (PS3.15 A.5.3.9).

    Participants: the importing process (requestor, Destination), the source community
    (Source) and the PACS the instances went to (Destination). Objects: the local patient and
    the study with its SOP classes and instances. As for the other retrieves (A.5.2), stored
    and failed instances get one message each.
    """

    known = dict(refs or {})
    home = study.manifest.home_community_id

    def reference(ref: InstanceRef) -> ImagingInstanceReference:
        return ImagingInstanceReference(
            ref.study_instance_uid,
            ref.series_instance_uid,
            ref.sop_instance_uid,
            ref.sop_class_uid or None,
            home_community_id=home,
        )

    participants = (
        system_participant(source, RoleId.SOURCE, False),
        system_participant(importer, RoleId.DESTINATION, True),
        system_participant(pacs, RoleId.DESTINATION, False),
    )
    stored = [reference(r) for r in study.stored]
    failed = [
        reference(
            known.get(f.sop_instance_uid)
            or InstanceRef(study.study_instance_uid, "", "", f.sop_instance_uid)
        )
        for f in study.failed
    ]
    groups: list[tuple[EventOutcome, list[ImagingInstanceReference], str | None]] = []
    if stored:
        groups.append((EventOutcome.SUCCESS, stored, None))
    if failed:
        reasons = "; ".join(sorted({f.reason for f in study.failed}))
        groups.append((EventOutcome.SERIOUS_FAILURE, failed, reasons[:1024]))
    if not groups:  # nothing could even be asked for (e.g. the manifest was not retrieved)
        reasons = "; ".join(f"{e.error_code}: {e.code_context}" for e in study.errors)
        groups.append((EventOutcome.SERIOUS_FAILURE, [], reasons[:1024] or "nothing retrieved"))
    messages = []
    when = when or datetime.now(UTC)  # one time for the records of one study
    for outcome, instances, description in groups:
        objects = [patient_object(patient_id, patient_name)]
        if instances:
            objects.extend(
                study_objects(instances, home_community_detail=DETAIL_XCA_HOME_COMMUNITY_ID)
            )
        messages.append(
            AuditMessage(
                event=EventIdentification(
                    event_id=EventId.IMPORT,
                    action="C",
                    outcome=outcome,
                    date_time=when or datetime.now(UTC),
                    outcome_description=description,
                ),
                participants=participants,
                source=ctx.audit_source,
                objects=tuple(objects),
            )
        )
    return tuple(messages)


# ----------------------------------------------------------------------------- federation


InstanceSink = Callable[[str, bytes], Awaitable[None]]


@dataclass
class RetrieveOutcome:
    errors: list[RegistryError] = field(default_factory=list)
    # Instances the response announced but that were not delivered (broken stream, too big).
    lost: list[InstanceFailure] = field(default_factory=list)


class Federation(Protocol):
    """The three federation calls of the import, whichever way the gateway is reached."""

    async def find(self, patient_id: str) -> tuple[list[PriorManifest], list[RegistryError]]: ...

    async def fetch_manifest(self, manifest: Manifest) -> bytes: ...

    async def retrieve(
        self,
        request: RetrieveImagingDocumentSetRequest,
        sink: InstanceSink,
        max_instance_bytes: int,
    ) -> RetrieveOutcome: ...


class HttpsFederation(Consumer):
    """The initiating gateway over mutual TLS (ITI-18, ITI-43, RAD-69)."""

    async def find(self, patient_id: str) -> tuple[list[PriorManifest], list[RegistryError]]:
        payload, _ = await self._soap("/ig/iti18", find_manifests_request(patient_id), Action.ITI18)
        return prior_manifests(payload), parse_registry_errors(payload)

    async def retrieve(
        self,
        request: RetrieveImagingDocumentSetRequest,
        sink: InstanceSink,
        max_instance_bytes: int,
    ) -> RetrieveOutcome:
        # local: the CLI's HTTPS client (httpx, ~6 MB of RSS): this federation's client is one
        import httpx

        outcome = RetrieveOutcome()
        index: Rad69Root | None = None
        delivered: set[str] = set()
        data: bytearray | None = None
        uid = ""
        try:
            async with contextlib.aclosing(self.rad69_stream(request)) as events:
                async for event in events:
                    if isinstance(event, Rad69Root):
                        index = event
                        outcome.errors = list(event.errors)
                    elif isinstance(event, InstanceBegins):
                        uid, data = event.uid, bytearray()
                    elif isinstance(event, InstanceEnds):
                        delivered.add(uid)
                        if data is not None:
                            payload, data = bytes(data), None
                            await sink(uid, payload)
                    elif data is not None:
                        data += event
                        if len(data) > max_instance_bytes:
                            outcome.lost.append(
                                InstanceFailure(uid, f"larger than {max_instance_bytes} bytes")
                            )
                            data = None
        except (httpx.HTTPError, mtom.MtomError) as exc:
            # The stream broke: what was not complete is lost, the rest was handled.
            reason = f"retrieve stream broken: {exc}"
            if index is None:
                raise ConsumerError(reason) from None
            outcome.lost.extend(
                InstanceFailure(u, reason) for u in index.names.values() if u not in delivered
            )
        return outcome


class InProcessFederation:
    """A gateway's own initiating side, called in-process (no HTTPS round trip): the
    :class:`~xca_gateway.doors.federation.FederationView` the front doors use."""

    def __init__(self, gateway: InitiatingSide, view: FederationView | None = None) -> None:
        self.view = view or FederationView(gateway)

    async def find(self, patient_id: str) -> tuple[list[PriorManifest], list[RegistryError]]:
        found = await self.view.find_manifests(patient_id)
        priors = [
            PriorManifest(m, found.modalities.get(m.document_unique_id, ()))
            for m in found.manifests
        ]
        return priors, found.errors

    async def fetch_manifest(self, manifest: Manifest) -> bytes:
        fetched = await self.view.fetch_manifests([manifest])
        if fetched.documents:
            return fetched.documents[0][1]
        if fetched.unusable:
            raise ConsumerError(f"manifest unusable: {fetched.unusable[0][1]}")
        raise ConsumerError(
            "manifest not retrieved: "
            + "; ".join(f"{e.error_code} {e.code_context}" for e in fetched.errors)
        )

    async def retrieve(
        self,
        request: RetrieveImagingDocumentSetRequest,
        sink: InstanceSink,
        max_instance_bytes: int,
    ) -> RetrieveOutcome:
        try:
            retrieval = await self.view.retrieve(request)
        except FederationError as exc:
            raise ConsumerError(exc.message) from None
        outcome = RetrieveOutcome(errors=list(retrieval.errors))
        uids = retrieval.uids
        try:
            for index, uid in enumerate(uids):
                try:
                    data = await retrieval.read(index, max_instance_bytes)
                except InstanceTooLarge:
                    outcome.lost.append(
                        InstanceFailure(uid, f"larger than {max_instance_bytes} bytes")
                    )
                    continue
                except Exception as exc:
                    # A broken stream cannot be resumed: the rest of the retrieve is lost.
                    reason = f"retrieve stream broken: {exc}"
                    outcome.lost.extend(InstanceFailure(u, reason) for u in uids[index:])
                    break
                await sink(uid, data)
        finally:
            # Instances never read still hold their sources (file, peer response) open.
            await retrieval.aclose()
        return outcome


# ----------------------------------------------------------------------------- the PACS


class StoreError(Exception):
    pass


class SyntaxNotAccepted(StoreError):
    """The PACS does not take this SOP class in this transfer syntax."""


class PacsStore:
    """C-STORE SCU towards the local PACS (blocking: call through ``asyncio.to_thread``).

    Presentation contexts are proposed for the (SOP class, transfer syntax) pairs announced
    with :meth:`propose`; an instance whose pair the association lacks gets a new association
    that includes it, so each instance is sent in its own transfer syntax, byte for byte.
    """

    def __init__(
        self,
        host: str,
        port: int,
        called_ae_title: str,
        calling_ae_title: str = "XCA-IMPORT",
        *,
        timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.called_ae_title = called_ae_title
        self.calling_ae_title = calling_ae_title
        self.timeout = timeout
        self._pairs: dict[tuple[str, str], None] = {}
        self._assoc: Any = None
        self._accepted: set[tuple[str, str]] = set()

    def propose(self, pairs: Iterable[tuple[str, str]]) -> None:
        for pair in pairs:
            self._pairs[pair] = None

    def _associate(self, needed: tuple[str, str]) -> None:
        from pynetdicom import AE

        self.close()
        self._pairs.pop(needed, None)
        self._pairs[needed] = None  # most recent last: kept if the list must be cut
        pairs = list(self._pairs)[-_MAX_CONTEXTS:]
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for sop_class, syntax in pairs:
            ae.add_requested_context(sop_class, [syntax])
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae_title)
        if not assoc.is_established:
            raise StoreError(
                f"the PACS {self.called_ae_title}@{self.host}:{self.port} refused or did not "
                "answer the association"
            )
        self._assoc = assoc
        self._accepted = {
            (str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts
        }

    def echo(self) -> None:
        """C-ECHO the PACS before anything is fetched for it: a PACS that is down, refuses
        our AE title or does not answer is said at once, in one line (StoreError)."""
        import socket

        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        where = f"the PACS {self.called_ae_title}@{self.host}:{self.port}"
        try:
            socket.create_connection((self.host, self.port), timeout=self.timeout).close()
        except ConnectionRefusedError:
            raise StoreError(f"{where}: connection refused (is it running?)") from None
        except TimeoutError:
            raise StoreError(f"{where}: no answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise StoreError(f"{where}: cannot connect: {exc.strerror or exc}") from None
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.add_requested_context(Verification)
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae_title)
        if assoc.is_rejected:
            raise StoreError(
                f"{where} rejected the association (does it know the calling AE title "
                f"{self.calling_ae_title} and its own AE title {self.called_ae_title}?)"
            )
        if not assoc.is_established:
            raise StoreError(f"{where} did not accept a DICOM association")
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        if not status or int(status.get("Status", -1)) != 0:
            raise StoreError(f"{where} did not answer the C-ECHO")

    def store(self, ds: Dataset) -> int:
        """C-STORE one instance; its status (success or warning), or StoreError."""
        pair = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if self._assoc is None or not self._assoc.is_established or pair not in self._accepted:
            self._associate(pair)
            if pair not in self._accepted:
                raise SyntaxNotAccepted(
                    f"the PACS does not accept SOP class {pair[0]} in transfer syntax {pair[1]}"
                )
        try:
            status = self._assoc.send_c_store(ds)
        except (OSError, RuntimeError, ValueError) as exc:
            self.close()
            raise StoreError(f"C-STORE failed: {exc}") from None
        if not status or "Status" not in status:
            self.close()
            raise StoreError("no C-STORE response (association aborted or timed out)")
        code = int(status.Status)
        if code not in _STORED_STATUSES:
            comment = str(status.get("ErrorComment", "") or "")
            raise StoreError(f"C-STORE status 0x{code:04X}{': ' + comment if comment else ''}")
        return code

    def close(self) -> None:
        assoc, self._assoc = self._assoc, None
        self._accepted = set()
        if assoc is not None and assoc.is_established:
            with contextlib.suppress(Exception):
                assoc.release()


# ----------------------------------------------------------------------------- the flow


class PriorsProgress(Protocol):
    """Told as an import goes (a progress line in the CLI; nothing in-process)."""

    def study_started(self, study: StudyImport) -> None: ...

    def instance(self, nbytes: int) -> None: ...

    def study_finished(self, study: StudyImport) -> None: ...


class PriorsProgressLine:
    """One progress line per study: instances with rate, MB/s and time left; erased when the
    study is done (its result line follows on stdout)."""

    def __init__(self, stream: Any, names: Mapping[str, str] | None = None) -> None:
        self.stream = stream
        self.names = names or {}
        self._line: Any = None

    def study_started(self, study: StudyImport) -> None:
        self.study_finished(study)
        home = study.manifest.home_community_id
        label = f"{self.names.get(home, home)} …{study.study_instance_uid[-10:]}"

        self._line = ProgressLine(
            label, study.requested, unit="instances", stream=self.stream, transient=True
        )

    def instance(self, nbytes: int) -> None:
        if self._line is not None:
            self._line.advance(nbytes=nbytes)

    def study_finished(self, study: StudyImport) -> None:
        if self._line is not None:
            self._line.close()
            self._line = None


async def import_priors(
    federation: Federation,
    *,
    patient_id: str,
    selection: PriorSelection,
    store: PacsStore,
    accession_prefixes: Mapping[str, str] | None = None,
    community_names: Mapping[str, str] | None = None,
    demographics: Demographics | None = None,
    modifying_system: str = "xca-gateway",
    transfer_syntaxes: Sequence[str] = DEFAULT_TRANSFER_SYNTAXES,
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
    on_study: Callable[[StudyImport, Mapping[str, InstanceRef]], None] | None = None,
    progress: PriorsProgress | None = None,
) -> ImportReport:
    """Import the patient's priors (``patient_id``: the local CX id, written into each
    instance) into the PACS behind ``store``; one StudyImport per manifest."""
    pid: PatientId = parse_patient_id(patient_id)
    report = ImportReport(str(pid))
    manifests, report.query_errors = await federation.find(str(pid))
    priors, report.local_studies_skipped = select_priors(manifests, selection)
    demographics = demographics or Demographics()
    try:
        for prior in priors:
            manifest = prior.manifest
            # Our own community's accession numbers are already ours.
            prefix = (
                ""
                if same_community(manifest.home_community_id, selection.local_home_community_id)
                else accession_prefix_for(
                    manifest.home_community_id, accession_prefixes, community_names
                )
            )
            study = StudyImport(manifest, prefix)
            report.studies.append(study)
            refs: dict[str, InstanceRef] = {}
            try:
                await _import_study(
                    federation,
                    study,
                    refs,
                    Reconciliation(
                        local_patient_id=pid.id,
                        local_issuer=pid.assigning_authority,
                        source_community_id=manifest.home_community_id,
                        accession_prefix=prefix,
                        local_patient_name=demographics.name,
                        local_patient_birth_date=demographics.birth_date,
                        local_patient_sex=demographics.sex,
                        modifying_system=modifying_system,
                    ),
                    store,
                    transfer_syntaxes,
                    max_instance_bytes,
                    progress,
                )
            except Exception as exc:  # one study's failure must not stop the others
                expected = (ConsumerError, ValueError, mtom.MtomError)
                log.warning(
                    "prior %s not imported: %s",
                    manifest.document_unique_id,
                    exc,
                    # An HTTPS transport error (httpx: the CLI's federation only, so httpx is
                    # not imported here for the test) is expected too: no traceback.
                    exc_info=not isinstance(exc, expected) and not _from_httpx(exc),
                )
                study.errors.append(RegistryError("XDSRepositoryError", str(exc)))
                done = {r.sop_instance_uid for r in study.stored} | {
                    f.sop_instance_uid for f in study.failed
                }
                missing = [u for u in refs if u not in done] or [study.study_instance_uid]
                study.failed.extend(InstanceFailure(u, str(exc)) for u in missing)
            if progress is not None:
                progress.study_finished(study)
            if on_study is not None:
                on_study(study, refs)
    finally:
        await asyncio.to_thread(store.close)
    return report


async def _import_study(
    federation: Federation,
    study: StudyImport,
    refs: dict[str, InstanceRef],
    reconciliation: Reconciliation,
    store: PacsStore,
    transfer_syntaxes: Sequence[str],
    max_instance_bytes: int,
    progress: PriorsProgress | None = None,
) -> None:
    kos = await federation.fetch_manifest(study.manifest)
    request = imaging_request_from_kos(kos, study.manifest.home_community_id, transfer_syntaxes)
    refs.update((r.sop_instance_uid, r) for r in kos_references(kos_from_bytes(kos)))
    study.requested = len(request.documents)
    if progress is not None:
        progress.study_started(study)
    store.propose(storage_pairs(refs.values(), transfer_syntaxes))
    handled: set[str] = set()

    async def sink(uid: str, data: bytes) -> None:
        handled.add(uid)
        if progress is not None:
            progress.instance(len(data))
        try:
            ds = decode_instance(data, uid)
            reconciled = reconcile(ds, reconciliation).dataset
            try:
                await asyncio.to_thread(store.store, reconciled)
            except SyntaxNotAccepted:
                # Stored compressed, refused so by the PACS: native, losslessly, if possible.
                stored = str(ds.file_meta.TransferSyntaxUID)
                if stored in ts.NATIVE or not ts.can_convert(stored, EXPLICIT_VR_LITTLE_ENDIAN):
                    raise
                try:
                    data = await asyncio.to_thread(ts.transcode, data, EXPLICIT_VR_LITTLE_ENDIAN)
                except ts.TranscodeError as exc:
                    raise ValueError(str(exc)) from None
                ds = decode_instance(data, uid)
                reconciled = reconcile(ds, reconciliation).dataset
                await asyncio.to_thread(store.store, reconciled)
        except (ValueError, ReconciliationError, StoreError) as exc:
            log.warning("instance %s not imported: %s", uid, exc)
            study.failed.append(InstanceFailure(uid, str(exc)))
            return
        study.stored.append(
            refs.get(uid)
            or InstanceRef(
                str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID), uid
            )
        )
        if study.accession_number is None:
            study.accession_number = str(reconciled.get("AccessionNumber", "") or "")
            study.original_accession_number = str(ds.get("AccessionNumber", "") or "")

    outcome = await federation.retrieve(request, sink, max_instance_bytes)
    study.errors.extend(outcome.errors)
    for lost in outcome.lost:
        if lost.sop_instance_uid not in handled:
            handled.add(lost.sop_instance_uid)
            study.failed.append(lost)
    why = "; ".join(f"{e.error_code}: {e.code_context}" for e in outcome.errors if e.is_error)
    for document in request.documents:
        if document.document_unique_id not in handled:
            study.failed.append(
                InstanceFailure(document.document_unique_id, f"not retrieved ({why or 'absent'})")
            )


# ----------------------------------------------------------------------------- CLI


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


def parse_audit_target(value: str) -> tuple[str, str, int]:
    """``tls://host:port``, ``udp://host:port`` or ``host:port`` (TLS) → (transport, host, port)."""
    transport = "tls"
    for scheme in ("tls", "udp"):
        if value.lower().startswith(f"{scheme}://"):
            transport, value = scheme, value[len(scheme) + 3 :]
    host, port = parse_host_port(value, "--audit")
    return transport, host, port


def parse_accession_prefixes(items: Sequence[str], map_file: str | None) -> dict[str, str]:
    prefixes: dict[str, str] = {}
    if map_file:
        data = json.loads(Path(map_file).read_text())
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise ValueError(f"{map_file}: expected a JSON object homeCommunityId -> prefix")
        prefixes.update(data)
    for item in items:
        home, sep, prefix = item.partition("=")
        if not sep or not home.strip():
            raise ValueError(f"--accession-prefix must be HOMEID=PREFIX, not {item!r}")
        prefixes[home.strip()] = prefix
    return prefixes


def add_import_priors_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "import-priors",
        help="import a patient's studies from other communities into the local PACS",
        description="Find the patient's imaging manifests across communities through the "
        "initiating gateway (ITI-18), fetch each foreign study (ITI-43, RAD-69) and store its "
        "instances in the local PACS by C-STORE, reconciled (IHE IRWF.b): the local patient "
        "id and issuer, the accession number prefixed per source community, the previous "
        "values kept in the Original Attributes Sequence and the foreign id in Other Patient "
        "IDs. Studies of the local community are not imported. Exit status 1 when any "
        "instance failed.",
    )
    parser.add_argument(
        "--patient", required=True, help="the LOCAL patient id, ID^^^&OID&ISO (written as is)"
    )
    parser.add_argument(
        "--study", action="append", default=[], metavar="UID", help="only this study (repeatable)"
    )
    parser.add_argument(
        "--from-community",
        action="append",
        default=[],
        metavar="HOMEID",
        help="only from this community's homeCommunityId (repeatable; default: every foreign one)",
    )
    parser.add_argument("--modality", action="append", default=[], help="only studies with it")
    parser.add_argument("--lookback-days", type=int, help="only studies at most this many days old")
    parser.add_argument("--pacs", required=True, metavar="HOST:PORT", help="the local PACS")
    parser.add_argument("--pacs-ae", required=True, metavar="AE", help="its AE title")
    parser.add_argument(
        "--calling-ae", default="XCA-IMPORT", metavar="AE", help="our AE title (XCA-IMPORT)"
    )
    parser.add_argument(
        "--accession-prefix",
        action="append",
        default=[],
        metavar="HOMEID=PREFIX",
        help="accession prefix for a source community (repeatable); default: its name in "
        "endpoints.json upper-cased plus '-' (SOUTH-), else the last arc of its OID",
    )
    parser.add_argument(
        "--accession-prefix-map", metavar="FILE", help="JSON object homeCommunityId -> prefix"
    )
    parser.add_argument("--patient-name", help="local Patient's Name to write (DICOM PN)")
    parser.add_argument("--endpoints", help="a demo's endpoints.json")
    parser.add_argument("--community", help="with --endpoints: the local community's name")
    parser.add_argument("--gateway", help="initiating gateway base URL (instead of --endpoints)")
    parser.add_argument("--home-community-id", help="with --gateway: the local homeCommunityId")
    parser.add_argument("--ca", help="with --gateway: CA certificate (PEM)")
    parser.add_argument("--cert", help="with --gateway: client certificate (PEM)")
    parser.add_argument("--key", help="with --gateway: client private key (PEM)")
    parser.add_argument(
        "--audit",
        metavar="TARGET",
        help="audit record repository, tls://HOST:PORT (default scheme) or udp://HOST:PORT; "
        "default: endpoints.json auditRepository.syslogTls if present",
    )
    parser.add_argument(
        "--no-audit", action="store_true", help="do not audit even if endpoints.json names an ARR"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress line (shown on a terminal)"
    )
    parser.add_argument(
        "--audit-spool",
        metavar="DIR",
        help="durable spool for audit records not yet delivered "
        "(default: ~/.local/state/xca-gateway/import-audit)",
    )
    parser.set_defaults(func=_cmd_import_priors)


@dataclass
class _Target:
    gateway: str
    ca: Path
    cert: Path
    key: Path
    home_community_id: str
    names: dict[str, str]
    audit: str | None


def _target(args: argparse.Namespace) -> _Target:
    if args.endpoints:
        endpoints = EndpointsFile.load(Path(args.endpoints))
        community = endpoints.community(args.community)
        audit = (endpoints.data.get("auditRepository") or {}).get("syslogTls")
        return _Target(
            community.base_url,
            endpoints.ca,
            endpoints.client.cert,
            endpoints.client.key,
            community.home_community_id,
            endpoints.community_names_by_home(),
            f"tls://{audit}" if audit else None,
        )
    needed = (args.gateway, args.ca, args.cert, args.key, args.home_community_id)
    if not all(needed):
        raise ValueError(
            "give --endpoints and --community, or --gateway, --ca, --cert, --key and "
            "--home-community-id"
        )
    return _Target(
        args.gateway,
        Path(args.ca),
        Path(args.cert),
        Path(args.key),
        args.home_community_id,
        {},
        None,
    )


async def _open_audit(target: _Target, args: argparse.Namespace) -> AuditTrail | None:
    spec = None if args.no_audit else (args.audit or target.audit)
    if spec is None:
        return None

    transport, host, port = parse_audit_target(spec)
    spool = Path(
        args.audit_spool
        or Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
        / "xca-gateway"
        / "import-audit"
    )
    tls = transport == "tls"
    destination = AuditDestination(
        name="arr",
        transport="tls" if tls else "udp",
        host=host,
        port=port,
        certificate=target.cert if tls else None,
        private_key=target.key if tls else None,
        trust_store=target.ca if tls else None,
    )
    trail = AuditTrail(
        AuditConfig(
            enabled=True,
            spool_dir=spool,
            destinations=(destination,),
            audit_source_id="xca-gateway-import",
            segment_bytes=1024 * 1024,
        )
    )
    await trail.start(application_activity_events=False)
    return trail


async def _run_import(args: argparse.Namespace, target: _Target) -> ImportReport:
    # local: the CLI's HTTPS client (httpx, ~6 MB of RSS) loads only in the commands that call
    import httpx

    pacs_host, pacs_port = parse_host_port(args.pacs, "--pacs")
    prefixes = parse_accession_prefixes(args.accession_prefix, args.accession_prefix_map)
    selection = PriorSelection(
        local_home_community_id=target.home_community_id,
        from_communities=frozenset(args.from_community),
        study_instance_uids=frozenset(args.study),
        modalities=frozenset(m.upper() for m in args.modality),
        not_before=PriorSelection.lookback(args.lookback_days),
    )
    store = PacsStore(pacs_host, pacs_port, args.pacs_ae, args.calling_ae)
    audit = await _open_audit(target, args)
    ctx = client_context(target.ca, target.cert, target.key)
    try:
        async with httpx.AsyncClient(verify=ctx, timeout=httpx.Timeout(300, connect=10)) as client:
            federation = HttpsFederation(client, target.gateway, progress=False)

            def audited(study: StudyImport, refs: Mapping[str, InstanceRef]) -> None:
                _print_study(study)
                if audit is None:
                    return
                audit.record(
                    import_audit_messages(
                        audit.context,
                        study=study,
                        patient_id=args.patient,
                        importer=audit.context.local_node(args.calling_ae),
                        source=Node(study.manifest.home_community_id, _host(target.gateway)),
                        pacs=Node(args.pacs_ae, pacs_host),
                        refs=refs,
                        patient_name=args.patient_name,
                    )
                )

            return await import_priors(
                federation,
                patient_id=args.patient,
                selection=selection,
                store=store,
                accession_prefixes=prefixes,
                community_names=target.names,
                demographics=Demographics(name=args.patient_name),
                modifying_system=f"xca-gateway import-priors {args.calling_ae}",
                on_study=audited,
                progress=(
                    PriorsProgressLine(sys.stderr, target.names)
                    if not args.no_progress and sys.stderr.isatty()
                    else None
                ),
            )
    finally:
        if audit is not None:
            try:
                await audit.wait_delivered(15.0)
            except TimeoutError:
                print(
                    "xca-gateway: audit records not delivered yet; they stay in "
                    f"{audit.config.spool_dir} for the next run",
                    file=sys.stderr,
                )
            await audit.stop(application_activity_events=False, drain_timeout=0.1)


def _from_httpx(exc: BaseException) -> bool:
    """An error of the CLI's HTTPS client (one of ``httpx.HTTPError``)."""
    return type(exc).__module__.partition(".")[0] == "httpx"


def _host(url: str) -> str | None:
    # local: the CLI's HTTPS client (httpx, ~6 MB of RSS) loads only in the commands that call
    import httpx

    return httpx.URL(url).host or None


def _print_study(study: StudyImport) -> None:
    accession = ""
    if study.accession_number:
        accession = f" accession {study.original_accession_number} -> {study.accession_number}"
    print(
        f"{study.manifest.home_community_id} study {study.study_instance_uid}{accession}: "
        f"stored {len(study.stored)}, failed {len(study.failed)}",
        flush=True,
    )
    for failure in study.failed:
        print(f"  {failure.sop_instance_uid}: {failure.reason}", file=sys.stderr)


def _cmd_import_priors(args: argparse.Namespace) -> int:
    # local: the CLI's HTTPS client (httpx, ~6 MB of RSS) loads only in the commands that call
    import httpx

    if logging.getLogger().level > logging.DEBUG:
        # One INFO line per DIMSE message drowns the per-study report.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    try:
        target = _target(args)
        parse_patient_id(args.patient)
        pacs_host, pacs_port = parse_host_port(args.pacs, "--pacs")
        parse_accession_prefixes(args.accession_prefix, args.accession_prefix_map)
        check_key_pair(target.cert, target.key, what="client certificate")
    except (ValueError, OSError, KeyError, TypeError) as exc:
        print(f"xca-gateway: import-priors: {exc}", file=sys.stderr)
        return 2
    # Fail fast on an unreachable destination or gateway, before anything is fetched.
    try:
        PacsStore(pacs_host, pacs_port, args.pacs_ae, args.calling_ae, timeout=10).echo()
        check_reachable(
            target.gateway + "/ig/iti18", client_context(target.ca, target.cert, target.key)
        )
    except (StoreError, ExchangeError) as exc:
        print(f"xca-gateway: import-priors: {exc}", file=sys.stderr)
        return 1
    try:
        report = asyncio.run(_run_import(args, target))
    except (ConsumerError, httpx.HTTPError, OSError, ValueError, mtom.MtomError) as exc:
        print(f"xca-gateway: import-priors failed: {exc}", file=sys.stderr)
        return 1
    for error in report.query_errors:
        print(f"  query: {error.error_code}: {error.code_context}", file=sys.stderr)
    if report.nothing_to_import:
        print(
            f"no foreign prior study found for {report.patient_id}"
            + (
                f" ({report.local_studies_skipped} local one(s) not imported)"
                if report.local_studies_skipped
                else ""
            )
        )
    print(f"stored {report.stored} instance(s), failed {report.failed}")
    return 0 if report.ok else 1
