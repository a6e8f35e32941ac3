"""The DICOM front door: DIMSE C-FIND / C-GET / C-MOVE SCP in front of the XCA-I federation.

PACS workstations speak DIMSE, not XDS-I. This module lets them query and retrieve across the
federation through the community's own initiating gateway, in-process:

* C-FIND (Patient Root and Study Root, PATIENT/STUDY/SERIES/IMAGE): the identifier's Patient ID
  (with Issuer of Patient ID, or an Other Patient IDs Sequence item of the local issuer) becomes
  an ITI-18 FindDocuments for KOS manifests through the initiating gateway (fan-out to every
  community and the local registry); each manifest is fetched (ITI-43 / ITI-39) and its
  references become the study / series / instance matches, with what QIDO-RS answers from the
  same view (ModalitiesInStudy from the registry, the study / series / patient counts, SOP
  Classes in Study, series Modality), and can be matched on it (ModalitiesInStudy, Modality).
* C-GET and C-MOVE: the same manifests give the DocumentRequests of a RAD-69 through the
  initiating gateway (routed as RAD-75). Instances are sent one by one as they arrive, either
  on the association (C-GET) or to the move destination from the ``[[dicom.destinations]]``
  AE table (C-MOVE), byte for byte in the syntax they are stored in whenever the receiver
  accepted it (see "transfer syntaxes" below). An instance is decoded completely before it is
  sent, so a truncated or malformed one from a source is reported as a failed sub-operation
  and never half-stored.

Who may call: DICOM TLS by default (:mod:`xca_gateway.doors.dicom_tls`), and every association is
admitted by the gateway's door guard on its calling AE title tied to the certificate (or, in
plain DIMSE on loopback, the address); the admitted principal is the current caller of every
federation call made for it.

Audit (DICOM PS3.15 A.5.3, through the gateway's audit trail): each C-FIND is a "Query"
(110112) with the calling AE as Source, the identifier as ParticipantObjectQuery of the SOP
class queried; each C-GET / C-MOVE a "DICOM Instances Transferred" (110104) per study, from our
AE to the requester (C-GET) or the move destination (C-MOVE), its outcome from the C-STORE
sub-operations as the destination answered them.

The federation logic (manifests, the study cache, RAD-69 in-process) is shared with the
DICOMweb front door in :mod:`xca_gateway.doors.federation`. pynetdicom runs the associations in
its own threads; the federation calls run on the gateway's asyncio loop through
``asyncio.run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import io
import logging
import threading
import weakref
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.status import STATUS_FAILURE, STORAGE_SERVICE_CLASS_STATUS
from pynetdicom.status import STATUS_SUCCESS as STATUS_SUCCESS_CATEGORY
from pynetdicom.status import STATUS_WARNING as STATUS_WARNING_CATEGORY

from xca_gateway.audit import messages as m
from xca_gateway.audit.trail import AuditTrail
from xca_gateway.consumer.imaging import ConsumerError
from xca_gateway.doors.dicom_tls import TlsAssociationServer, association_identity
from xca_gateway.doors.dicomweb.model import StudyEntity, study_entities
from xca_gateway.doors.federation import (
    FederationError,
    FederationView,
    StudyManifest,
    audit_patients,
    header_patient_id,
    imaging_request_for,
    manifest_patient,
    patient_cx,
)
from xca_gateway.doors.ports import DoorHost
from xca_gateway.imaging import transfer_syntax as ts
from xca_gateway.imaging.dicom_negotiation import (
    NATIVE_SYNTAXES,
    STORAGE_SYNTAXES,
    move_contexts,
    outgoing_syntax,
    request_syntaxes,
    syntaxes_by_sop_class,
    take_requestor_order,
)
from xca_gateway.imaging.instance import decode_instance
from xca_gateway.imaging.request import DocumentRequest, RetrieveImagingDocumentSetRequest
from xca_gateway.protocol.tls import HandshakeFailure, gateway_client_context, server_context
from xca_gateway.schema import AeTitle, NonEmpty, PeerPort, Port, Section
from xca_gateway.security.callers import Door, Principal, set_current_caller
from xca_gateway.security.guard import DoorGuard
from xca_gateway.settings import TlsConfig, is_loopback_host
from xca_gateway.xds.kos import InstanceRef

log = logging.getLogger(__name__)

__all__ = [
    "DicomDestination",
    "DicomFrontConfig",
    "DicomFrontDoor",
    "FindQuery",
    "QueryError",
    "StudyManifest",
    "parse_dicom_front_config",
    "parse_identifier",
]

# DIMSE statuses (PS3.4 C.4).
STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_IDENTIFIER_MISMATCH = 0xA900  # Identifier does not match SOP Class
STATUS_UNABLE_TO_PROCESS = 0xC000
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
STATUS_SUBOPS_WITH_FAILURES = 0xB000
STATUS_SUBOPS_UNPERFORMED = 0xA702  # Refused: unable to perform sub-operations
STATUS_CANCEL = 0xFE00
STATUS_NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized (PS3.7 C.5.21)
_C_STORE_RSP = 0x8001  # Command Field (PS3.7 E.1)

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# Keys the front door can match or return; anything else in an identifier is returned empty
# (PS3.4 C.2.2.1: unsupported return keys get zero length), except unsupported *matching*.
_UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
# Identifier keys read by parse_identifier itself.
_HANDLED_KEYS = frozenset(
    {
        "QueryRetrieveLevel",
        "PatientID",
        "IssuerOfPatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SpecificCharacterSet",
        "RetrieveAETitle",
    }
)
# Keys the manifest header answers (patient and study modules), so they can be matched.
_FILTERABLE_KEYS = frozenset(
    {
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "ReferringPhysicianName",
    }
)
# ... and what the registry (eventCodeList) and the manifests' references answer, by level.
_FILTERABLE_BY_LEVEL = {
    "PATIENT": _FILTERABLE_KEYS,
    "STUDY": _FILTERABLE_KEYS | {"ModalitiesInStudy"},
    "SERIES": _FILTERABLE_KEYS | {"ModalitiesInStudy", "Modality"},
    "IMAGE": _FILTERABLE_KEYS | {"ModalitiesInStudy", "Modality", "SOPClassUID"},
}
_CALL_TIMEOUT = 120.0

T = TypeVar("T")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class DicomDestination:
    """A C-MOVE destination: the AE title a workstation names and where it listens.

    ``tls``: the gateway opens the association with DICOM TLS (its own certificate, the
    destination's checked against the trust store and its host name); plain only to loopback.
    """

    ae_title: str
    host: str
    port: int
    tls: bool = True


@dataclass(frozen=True)
class DicomFrontConfig:
    ae_title: str = "XCA-GATEWAY"
    host: str = "127.0.0.1"
    port: int = 11112
    destinations: tuple[DicomDestination, ...] = ()
    # DICOM TLS (PS3.15 Annex B: mutual, the gateway's certificate and trust store, TLS 1.2
    # floor); plain DIMSE only on a loopback address, like the DICOMweb door and MLLP.
    tls: bool = True

    def destination(self, ae_title: str) -> DicomDestination | None:
        wanted = ae_title.strip()
        return next((d for d in self.destinations if d.ae_title == wanted), None)


class DicomDestinationSection(Section):
    """A C-MOVE destination (the AE table): where a workstation's C-MOVE sends instances."""

    ae_title: AeTitle = Field(description="Its AE title.", examples=["WORKSTATION1"])
    host: NonEmpty = Field(
        "127.0.0.1",
        description="Its address (checked against its TLS certificate).",
        examples=["ws1.north.example.org"],
    )
    port: PeerPort = Field(description="Its port.", examples=[2762])
    tls: bool = Field(True, description="DICOM TLS; false only for a loopback destination.")


class DicomSection(Section):
    """The DICOM front door: C-FIND / C-GET / C-MOVE SCP over the federation, for PACS
    workstations. Who may associate: [[policy.callers]] with the local-consumer role naming
    the calling AE titles, tied to the certificate (or, plain DIMSE on loopback, the address);
    any other calling AE gets A-ASSOCIATE-RJ and a Security Alert."""

    ae_title: AeTitle = Field("XCA-GATEWAY", description="Our AE title.")
    host: NonEmpty = Field("127.0.0.1", description="Address to listen on.")
    port: Port = Field(11112, description="DICOM port (0: any free port).")
    tls: bool = Field(
        True,
        description="DICOM TLS (PS3.15 Annex B, mutual, with [tls]); false only on loopback.",
    )
    destinations: list[DicomDestinationSection] = Field([], description="The C-MOVE AE table.")


def _ae_title(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value.strip()) > 16:
        raise ConfigError(f"{where} must be an AE title of 1-16 characters")
    if "\\" in value or not value.isascii():
        raise ConfigError(f"{where} must be ASCII without backslashes")
    return value.strip()


def _port(value: Any, where: str, *, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 65535:
        raise ConfigError(f"{where} must be a TCP port number")
    return value


def _host(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a host name or address")
    return value


def _tls(value: Any, where: str, host: str, host_key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false")
    if not value and not is_loopback_host(host):
        raise ConfigError(
            f"{where} = false is only allowed with a loopback {host_key} (127.0.0.1, ::1, "
            f"localhost), not {host!r}: patient data over DIMSE needs DICOM TLS"
        )
    return value


def parse_dicom_front_config(
    table: dict[str, Any], base_dir: Path | None = None
) -> DicomFrontConfig:
    """Validate the ``[dicom]`` table (``base_dir`` is unused: no paths in it yet)."""
    known = {"ae_title", "host", "port", "tls", "destinations"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[dicom]: unknown key(s) {', '.join(sorted(unknown))}")
    destinations = []
    raw = table.get("destinations", [])
    if not isinstance(raw, list):
        raise ConfigError("[[dicom.destinations]] must be an array of tables")
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        where = f"dicom.destinations[{index}]"
        if not isinstance(entry, dict) or set(entry) - {"ae_title", "host", "port", "tls"}:
            raise ConfigError(f"{where} takes ae_title, host, port and tls")
        title = _ae_title(entry.get("ae_title"), f"{where}.ae_title")
        if title in seen:
            raise ConfigError(f"{where}: AE title {title} is listed twice")
        seen.add(title)
        host = _host(entry.get("host", "127.0.0.1"), f"{where}.host")
        destinations.append(
            DicomDestination(
                title,
                host,
                _port(entry.get("port"), f"{where}.port", allow_zero=False),
                _tls(entry.get("tls", True), f"{where}.tls", host, f"{where}.host"),
            )
        )
    host = _host(table.get("host", "127.0.0.1"), "dicom.host")
    return DicomFrontConfig(
        ae_title=_ae_title(table.get("ae_title", "XCA-GATEWAY"), "dicom.ae_title"),
        host=host,
        port=_port(table.get("port", 11112), "dicom.port", allow_zero=True),
        destinations=tuple(destinations),
        tls=_tls(table.get("tls", True), "dicom.tls", host, "dicom.host"),
    )


# ----------------------------------------------------------------------------- sans-IO


class QueryError(Exception):
    """An identifier the front door cannot serve; ``status`` is the DIMSE status to answer."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class FindQuery:
    level: str
    patient_id: str | None  # CX form ID^^^&issuer&ISO, None when not given
    study_instance_uids: tuple[str, ...] = ()
    series_instance_uids: tuple[str, ...] = ()
    sop_instance_uids: tuple[str, ...] = ()
    # (keyword, pattern) matched against what the manifests tell (PS3.4 C.2.2.2).
    filters: tuple[tuple[str, str], ...] = ()
    identifier: Dataset = field(default_factory=Dataset, compare=False)


def _uid_list(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value in (None, ""):
        return ()
    values = [value] if isinstance(value, str) else list(value)  # single or multi-valued
    uids = tuple(str(v).strip() for v in values if str(v).strip())
    for uid in uids:
        if "*" in uid or "?" in uid:
            raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"{keyword}: no wildcards in UIDs")
    return uids


def _issuer(ds: Dataset) -> str | None:
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    if issuer:
        return issuer
    for item in ds.get("IssuerOfPatientIDQualifiersSequence", []) or []:
        uid = str(item.get("UniversalEntityID", "") or "").strip()
        if uid:
            return uid
    return None


def _patient_id(ds: Dataset, local_authority: str) -> str | None:
    """The XDS patient id (CX) for the identifier, in the local assigning authority.

    The primary Patient ID counts when its issuer is the local one (or not given); otherwise an
    Other Patient IDs Sequence item with the local issuer is used. A foreign id without a local
    one is passed on as it is: the initiating gateway's patient-ID mapping resolves it.
    """
    pid = str(ds.get("PatientID", "") or "").strip()
    if "*" in pid or "?" in pid or "\\" in pid:
        raise QueryError(STATUS_IDENTIFIER_MISMATCH, "PatientID: wildcards are not supported")
    issuer = _issuer(ds)
    if pid and issuer in (None, local_authority):
        return patient_cx(pid, None, local_authority)
    for item in ds.get("OtherPatientIDsSequence", []) or []:
        other = str(item.get("PatientID", "") or "").strip()
        if other and _issuer(item) == local_authority:
            return patient_cx(other, None, local_authority)
    if pid and issuer:
        return patient_cx(pid, issuer, local_authority)
    return None


def value_matches(keyword: str, pattern: str, value: str) -> bool:
    """Single value, wildcard (* ?) and, for dates and times, range matching."""
    if keyword in ("StudyDate", "PatientBirthDate", "StudyTime") and "-" in pattern:
        low, _, high = pattern.partition("-")
        return bool(value) and (not low or value >= low) and (not high or value <= high)
    if "*" in pattern or "?" in pattern:
        return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))
    if keyword == "PatientName":
        return value.upper() == pattern.upper()
    return value == pattern


def _text(value: Any) -> str:
    """An element value as DICOM text: multiple values joined by backslashes."""
    if value is None:
        return ""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return str(value).strip()
    return "\\".join(str(v).strip() for v in value)


def parse_identifier(ds: Dataset, *, model: str, local_authority: str) -> FindQuery:
    """Read a C-FIND/C-GET/C-MOVE identifier; ``model`` is "PATIENT" or "STUDY" root."""
    level = str(ds.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"unsupported QueryRetrieveLevel {level!r}")
    if model == "STUDY" and level == "PATIENT":
        raise QueryError(STATUS_IDENTIFIER_MISMATCH, "the Study Root model has no PATIENT level")
    filters = []
    for element in ds:
        keyword = element.keyword
        if not keyword or keyword in _HANDLED_KEYS or element.VR == "SQ":
            continue
        value = _text(element.value)
        if not value or value == "*":
            continue  # a return key (or universal match)
        if keyword not in _FILTERABLE_BY_LEVEL[level]:
            raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"matching on {keyword} is not supported")
        filters.append((keyword, value))
    return FindQuery(
        level=level,
        filters=tuple(filters),
        patient_id=_patient_id(ds, local_authority),
        study_instance_uids=_uid_list(ds, "StudyInstanceUID"),
        series_instance_uids=_uid_list(ds, "SeriesInstanceUID"),
        sop_instance_uids=_uid_list(ds, "SOPInstanceUID"),
        identifier=ds,
    )


def select_references(query: FindQuery, studies: list[StudyManifest]) -> list[InstanceRef]:
    refs = [r for s in studies for r in s.references]
    if query.study_instance_uids:
        refs = [r for r in refs if r.study_instance_uid in query.study_instance_uids]
    if query.series_instance_uids:
        refs = [r for r in refs if r.series_instance_uid in query.series_instance_uids]
    if query.sop_instance_uids:
        refs = [r for r in refs if r.sop_instance_uid in query.sop_instance_uids]
    return refs


_PATIENT_KEYS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
_STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID")
_STUDY_EXTRA = ("StudyDescription", "ReferringPhysicianName")
_LIST_KEYS = frozenset({"ModalitiesInStudy", "Modality", "SOPClassUID"})


def entity_matches(keyword: str, pattern: str, ds: Dataset, entity: StudyEntity) -> bool:
    """PS3.4 C.2.2.2 matching of one key against a candidate response; multi-valued keys
    (ModalitiesInStudy) match when any value does, each pattern value may be a wildcard."""
    if keyword == "Modality" and "Modality" not in ds:
        # Series modality unknown (the registry lists a multi-modality study's modalities, not
        # each series'): the series of a study with the modality match, as in QIDO-RS.
        return any(
            value_matches(keyword, p, m) for p in pattern.split("\\") for m in entity.modalities
        )
    if keyword in _LIST_KEYS:
        values = _text(ds.get(keyword)).split("\\")
        return any(
            value_matches(keyword, p.upper(), v.upper())
            for p in pattern.split("\\")
            for v in values
            if v
        )
    return value_matches(keyword, pattern, _text(ds.get(keyword)))


def _study_attributes(entity: StudyEntity, caller_pid: str, caller_issuer: str | None) -> Dataset:
    """What the federation knows of a study, as QIDO-RS answers it: the manifest header's
    patient and study attributes, the modalities the registry recorded, the counts."""
    header = entity.header
    ds = Dataset()
    for keyword in ("SpecificCharacterSet", *_PATIENT_KEYS, *_STUDY_KEYS, *_STUDY_EXTRA):
        if keyword in header:
            element = header[keyword]  # copied: the cached manifest must stay as it is
            ds.add_new(element.tag, element.VR, element.value)
    if caller_pid:
        # Other communities' manifests carry their own patient id: the caller gets its own
        # Patient ID (and issuer) back, as it asked, so that matches stay one patient.
        ds.PatientID = caller_pid
        if caller_issuer is not None:
            ds.IssuerOfPatientID = caller_issuer
    ds.StudyInstanceUID = entity.uid
    if entity.modalities:
        ds.ModalitiesInStudy = list(entity.modalities)
    refs = [r for members in entity.series.values() for r in members]
    ds.NumberOfStudyRelatedSeries = len(entity.series)
    ds.NumberOfStudyRelatedInstances = len(refs)
    ds.SOPClassesInStudy = list(dict.fromkeys(r.sop_class_uid for r in refs))
    return ds


def _copy(ds: Dataset) -> Dataset:
    """A dataset with new elements (setting a value on a shared element changes both)."""
    out = Dataset()
    for element in ds:
        out.add_new(element.tag, element.VR, element.value)
    return out


def candidates(query: FindQuery, studies: Sequence[StudyManifest]) -> list[Dataset]:
    """Every entity at the query level with all the attributes the federation knows of it
    (the study's and those of the levels above), that matches the identifier's keys."""
    asked = query.identifier
    caller_pid = str(asked.get("PatientID", "") or "").strip()
    caller_issuer = str(asked.IssuerOfPatientID) if "IssuerOfPatientID" in asked else None
    found: list[Dataset] = []
    for entity in study_entities(studies):
        if query.study_instance_uids and entity.uid not in query.study_instance_uids:
            continue
        study = _study_attributes(entity, caller_pid, caller_issuer)
        if query.level in ("PATIENT", "STUDY"):
            if all(entity_matches(k, p, study, entity) for k, p in query.filters):
                found.append(study)
            continue
        modality = entity.modalities[0] if len(entity.modalities) == 1 else None
        for series_uid, refs in entity.series.items():
            if query.series_instance_uids and series_uid not in query.series_instance_uids:
                continue
            series = _copy(study)
            series.SeriesInstanceUID = series_uid
            if modality:
                series.Modality = modality
            series.NumberOfSeriesRelatedInstances = len(refs)
            if query.level == "SERIES":
                if all(entity_matches(k, p, series, entity) for k, p in query.filters):
                    found.append(series)
                continue
            for ref in refs:
                if query.sop_instance_uids and ref.sop_instance_uid not in query.sop_instance_uids:
                    continue
                instance = _copy(series)
                instance.SOPInstanceUID = ref.sop_instance_uid
                instance.SOPClassUID = ref.sop_class_uid
                if all(entity_matches(k, p, instance, entity) for k, p in query.filters):
                    found.append(instance)
    return found


def _patients(studies: Sequence[Dataset]) -> list[Dataset]:
    """PATIENT level: one answer per patient, the counts over the studies that matched."""
    by_patient: dict[str, Dataset] = {}
    for study in studies:
        key = str(study.get("PatientID", "") or "")
        patient = by_patient.get(key)
        if patient is None:
            patient = Dataset()
            for keyword in ("SpecificCharacterSet", *_PATIENT_KEYS):
                if keyword in study:
                    element = study[keyword]
                    patient.add_new(element.tag, element.VR, element.value)
            patient.NumberOfPatientRelatedStudies = 0
            patient.NumberOfPatientRelatedSeries = 0
            patient.NumberOfPatientRelatedInstances = 0
            by_patient[key] = patient
        patient.NumberOfPatientRelatedStudies += 1
        patient.NumberOfPatientRelatedSeries += int(study.NumberOfStudyRelatedSeries)
        patient.NumberOfPatientRelatedInstances += int(study.NumberOfStudyRelatedInstances)
    return list(by_patient.values())


def build_matches(
    query: FindQuery, studies: list[StudyManifest], *, retrieve_ae_title: str
) -> list[Dataset]:
    """The C-FIND responses: one per distinct entity at the query level, with every requested
    key the federation knows (the same as QIDO-RS answers), the others zero-length."""
    requested = {element.keyword for element in query.identifier if element.keyword}
    found = candidates(query, studies)
    if query.level == "PATIENT":
        found = _patients(found)
    unique = _UNIQUE_KEYS[query.level]
    matches: list[Dataset] = []
    seen: set[str] = set()
    for ds in found:
        key = str(ds.get(unique, "") or "")
        if not key or key in seen:
            continue
        seen.add(key)
        ds.QueryRetrieveLevel = query.level
        ds.RetrieveAETitle = retrieve_ae_title
        # Requested keys that the federation cannot answer come back empty.
        for keyword in requested - set(ds.dir()):
            try:
                setattr(ds, keyword, None)
            except (ValueError, TypeError):  # pragma: no cover - odd keyword
                continue
        keep = {"QueryRetrieveLevel", "RetrieveAETitle", "SpecificCharacterSet"}
        for keyword in set(ds.dir()) - requested - keep:
            if keyword not in _UNIQUE_KEYS.values():
                delattr(ds, keyword)
        if "SpecificCharacterSet" in ds and all(
            _text(e.value).isascii() for e in ds if e.VR in ("PN", "LO", "SH", "LT", "ST", "UT")
        ):
            del ds.SpecificCharacterSet  # the default repertoire says it all
        matches.append(ds)
    return matches


def imaging_request(
    query: FindQuery,
    studies: list[StudyManifest],
    transfer_syntaxes: Sequence[str] = NATIVE_SYNTAXES,
) -> RetrieveImagingDocumentSetRequest:
    """The RAD-69 request for the instances the retrieve identifier selects."""
    wanted = {r.sop_instance_uid for r in select_references(query, studies)}
    return imaging_request_for(studies, wanted, tuple(transfer_syntaxes))


# ----------------------------------------------------------------------------- audit


def dimse_requester(ae_title: str, address: str | None) -> m.Node:
    """A DIMSE peer as an audit participant: its AE title, and its IP address."""
    return m.Node(ae_title.strip() or "unknown", address or None)


def find_audit(
    ctx: m.AuditContext,
    *,
    requester: m.Node,
    responder: m.Node,
    sop_class_uid: str,
    identifier: bytes,
    transfer_syntax: str | None,
    patient_ids: Sequence[str],
    status: int,
    comment: str | None = None,
) -> m.AuditMessage:
    """C-FIND as a DICOM "Query" (110112, E); ``status`` the final DIMSE status: a refused
    identifier is a minor failure, a query the federation could not answer a serious one."""
    if status in (STATUS_SUCCESS, STATUS_CANCEL):
        outcome = m.EventOutcome.SUCCESS
    elif status == STATUS_IDENTIFIER_MISMATCH:
        outcome = m.EventOutcome.MINOR_FAILURE
    else:
        outcome = m.EventOutcome.SERIOUS_FAILURE
    return m.dicom_query(
        ctx,
        requester=requester,
        responder=responder,
        sop_class_uid=sop_class_uid,
        query=identifier,
        transfer_syntax=transfer_syntax,
        patient_ids=patient_ids,
        outcome=outcome,
        outcome_description=comment if status != STATUS_SUCCESS else None,
    )


def transfer_audits(
    ctx: m.AuditContext,
    *,
    documents: Sequence[DocumentRequest],
    sop_classes: Mapping[str, str],
    delivered: Collection[str],
    failures: Mapping[str, str],
    source: m.Node,
    destination: m.Node,
    requester: m.Node | None,
    patient_ids: Sequence[str | m.PatientRef],
    unresolved: Mapping[str, str] | None = None,
) -> list[m.AuditMessage]:
    """C-GET / C-MOVE as "DICOM Instances Transferred" (110104, R), one message per study:
    outcome 0 when every instance asked for was stored at the destination, 4 when some
    sub-operations failed, 8 when all did. The study lists the instances transferred (all
    those asked for when none was); ``failures`` say why the others were not. ``unresolved``
    studies (uid -> reason) are those whose instances could not even be asked for."""
    by_study: dict[str, list[DocumentRequest]] = {}
    for doc in documents:
        by_study.setdefault(doc.study_instance_uid, []).append(doc)
    # (study, outcome, description, instances listed)
    studies: list[tuple[str, m.EventOutcome, str | None, list[DocumentRequest]]] = [
        (uid, m.EventOutcome.SERIOUS_FAILURE, f"no instance transferred: {reason}", [])
        for uid, reason in (unresolved or {}).items()
        if uid not in by_study
    ]
    for study_uid, docs in by_study.items():
        sent = [d for d in docs if d.document_unique_id in delivered]
        lost = [d.document_unique_id for d in docs if d.document_unique_id not in delivered]
        reasons = "; ".join(dict.fromkeys(failures.get(u, "not transferred") for u in lost))
        if not lost:
            studies.append((study_uid, m.EventOutcome.SUCCESS, None, sent))
        elif sent:
            description = f"{len(lost)} of {len(docs)} instance(s) not transferred: {reasons}"
            studies.append((study_uid, m.EventOutcome.MINOR_FAILURE, description, sent))
        else:
            description = f"no instance transferred: {reasons}"
            studies.append((study_uid, m.EventOutcome.SERIOUS_FAILURE, description, docs))
    when = datetime.now(UTC)  # one time for the records of one retrieve
    return [
        m.instances_transferred(
            ctx,
            source=source,
            destination=destination,
            requester=requester,
            study_uid=study_uid,
            instances=[
                m.ImagingInstanceReference(
                    d.study_instance_uid,
                    d.series_instance_uid,
                    d.document_unique_id,
                    sop_classes.get(d.document_unique_id) or None,
                    d.repository_unique_id,
                    d.home_community_id,
                )
                for d in listed
            ],
            patient_ids=patient_ids,
            outcome=outcome,
            outcome_description=description[:1024] if description else None,
            when=when,
        )
        for study_uid, outcome, description, listed in studies
    ]


# ----------------------------------------------------------------------------- I/O


class _Transfer:
    """One C-GET / C-MOVE as the audit sees it: what was asked for, what each C-STORE
    sub-operation answered (from the C-STORE-RSPs received, EVT_DIMSE_RECV) and why instances
    were not sent. :meth:`finish` writes the records once, however the retrieve ended."""

    def __init__(
        self,
        door: DicomFrontDoor,
        *,
        destination: m.Node,
        requester: m.Node | None,
        study_uids: Sequence[str],
        assoc: Any = None,
    ) -> None:
        self.door = door
        self.destination = destination
        self.requester = requester
        self.study_uids = tuple(study_uids)
        self.documents: tuple[DocumentRequest, ...] = ()
        self.sop_classes: dict[str, str] = {}
        self.patient_ids: list[str | m.PatientRef] = []
        self.failures: dict[str, str] = {}  # SOP Instance UID -> why it was not sent
        self.sent: set[str] = set()  # C-STORE sub-operations started
        self.responses: dict[str, int] = {}  # SOP Instance UID -> C-STORE status
        self.refused: str | None = None
        # SOP Class UID -> transfer syntaxes the receiving side accepted (None: not known).
        self.accepted: dict[str, list[str]] | None = None
        self._finished = False
        # C-GET: the C-STOREs go back on the requester's association.
        self._assoc = assoc
        if assoc is not None:
            assoc.bind(evt.EVT_DIMSE_RECV, self.on_dimse)

    def on_dimse(self, event: Any) -> None:
        """EVT_DIMSE_RECV on the association that carries the C-STOREs (pynetdicom thread)."""
        command = getattr(event.message, "command_set", None)
        if command is None or command.get("CommandField") != _C_STORE_RSP:
            return
        uid = str(command.get("AffectedSOPInstanceUID", "") or "")
        self.responses[uid] = int(command.get("Status", STATUS_UNABLE_TO_PROCESS))

    def on_accepted(self, event: Any) -> None:
        """EVT_ACCEPTED on the association to a C-MOVE destination: what it accepted."""
        self.accepted = syntaxes_by_sop_class(event.assoc.accepted_contexts)

    def describe(self, query: FindQuery, studies: Sequence[StudyManifest]) -> None:
        found = [p for s in studies if (p := manifest_patient(s.header)) is not None]
        asked = [query.patient_id] if query.patient_id is not None else []
        self.patient_ids = [*audit_patients(asked, found)]
        self.sop_classes = {
            r.sop_instance_uid: r.sop_class_uid for s in studies for r in s.references
        }

    def stored(self, uid: str) -> bool:
        """Whether the C-STORE of ``uid`` succeeded, as pynetdicom counts sub-operations."""

        status = self.responses.get(uid)
        if status is None:
            return False
        category = STORAGE_SERVICE_CLASS_STATUS.get(status, (STATUS_FAILURE, ""))[0]
        return category in (STATUS_SUCCESS_CATEGORY, STATUS_WARNING_CATEGORY)

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._assoc is not None:
            self._assoc.unbind(evt.EVT_DIMSE_RECV, self.on_dimse)
        trail = self.door.audit
        if not trail.config.enabled or not (self.documents or self.refused):
            return
        try:
            delivered = {u for u in self.sent if self.stored(u)}
            failures = dict(self.failures)
            for uid in self.sent - delivered:
                status = self.responses.get(uid)
                failures.setdefault(
                    uid,
                    "no C-STORE response" if status is None else f"C-STORE status 0x{status:04X}",
                )
            unresolved = {u: self.refused for u in self.study_uids} if self.refused else {}
            trail.record(
                transfer_audits(
                    trail.context,
                    documents=self.documents,
                    sop_classes=self.sop_classes,
                    delivered=delivered,
                    failures=failures,
                    source=trail.local_node(self.door.config.ae_title),
                    destination=self.destination,
                    requester=self.requester,
                    patient_ids=self.patient_ids,
                    unresolved=unresolved,
                )
            )
        except Exception:  # an audit failure must not touch the transfer
            log.exception("building the DIMSE retrieve audit record failed")


@dataclass(frozen=True)
class DicomFrontServices:
    """What the DIMSE door needs of its gateway, and nothing more: the federation view, the
    audit trail, the door guard (who may call), the local patient id domain, and the TLS
    material (``tls``: its certificate and trust store)."""

    view: FederationView
    audit: AuditTrail
    guard: DoorGuard
    local_authority: str
    tls: TlsConfig
    # Hears each refused DICOM TLS handshake (on the gateway's loop).
    on_handshake_failure: Callable[[HandshakeFailure], None] | None = None
    # [server] hello_timeout, and who counts connections refused at accept (metrics; called
    # from the accept thread).
    hello_timeout: float = 5.0
    on_refused: Callable[[str, str], None] | None = None

    @classmethod
    def of(
        cls,
        gateway: DoorHost,
        *,
        on_handshake_failure: Callable[[HandshakeFailure], None] | None = None,
    ) -> DicomFrontServices:
        return cls(
            view=FederationView(gateway, timeout=_CALL_TIMEOUT),
            audit=gateway.audit,
            guard=gateway.guard,
            local_authority=gateway.config.community.patient_id_assigning_authority,
            tls=gateway.config.tls,
            on_handshake_failure=on_handshake_failure,
            hello_timeout=gateway.config.server.hello_timeout,
            on_refused=gateway.connection_refused,
        )


class DicomFrontDoor:
    """pynetdicom's AE serving C-ECHO/C-FIND/C-GET/C-MOVE over the federation.

    Every association is admitted by the door guard before it is negotiated: the calling AE
    title must belong to a ``[[policy.callers]]`` entry that holds the certificate the
    association proved (DICOM TLS) or, in plain DIMSE on loopback, its address. Others get an
    A-ASSOCIATE-RJ "calling AE title not recognized", audited once by the guard.
    """

    def __init__(self, services: DicomFrontServices, config: DicomFrontConfig) -> None:

        self.services = services
        self.config = config
        self.audit = services.audit
        self.local_authority = services.local_authority
        # Manifests and the studies learnt from C-FIND (for Study Root retrieves that name no
        # patient), shared logic with the DICOMweb door.
        self.view = services.view
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: TlsAssociationServer | None = None
        self._server_tls = server_context(services.tls) if config.tls else None
        self._client_tls = (
            gateway_client_context(services.tls)
            if any(d.tls for d in config.destinations)
            else None
        )
        # The principal each admitted association acts for (pynetdicom thread -> caller).
        self._callers: weakref.WeakKeyDictionary[Any, Principal] = weakref.WeakKeyDictionary()
        self.ae = AE(ae_title=config.ae_title)
        self.ae.maximum_associations = 10
        self.ae.add_supported_context(Verification)
        for sop_class in (
            PatientRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelMove,
        ):
            self.ae.add_supported_context(sop_class)
        for sop_class in (
            PatientRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelGet,
        ):
            self.ae.add_supported_context(sop_class)
        # C-GET: the SCU proposes storage contexts in which we act as SCU (SCP/SCU role
        # selection); C-MOVE: we request them towards the destination.
        for context in StoragePresentationContexts:
            self.ae.add_supported_context(
                str(context.abstract_syntax),
                list(STORAGE_SYNTAXES),
                scu_role=False,
                scp_role=True,
            )
        self.ae.requested_contexts = StoragePresentationContexts

    @property
    def port(self) -> int:
        if self._server is None:
            return self.config.port
        return int(self._server.server_address[1])

    async def start(self) -> None:
        """Start listening; call from the gateway's event loop."""
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.to_thread(self._make_server)
        threading.Thread(
            target=self._server.serve_forever, name="dicom-front-accept", daemon=True
        ).start()
        log.info(
            "DICOM front door %s on %s:%d (%s)",
            self.config.ae_title,
            self.config.host,
            self.port,
            "DICOM TLS" if self._server_tls is not None else "plain DIMSE, loopback only",
        )

    def _make_server(self) -> TlsAssociationServer:

        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
        ]
        server = self.ae.make_server(
            (self.config.host, self.config.port),
            ssl_context=self._server_tls,
            evt_handlers=handlers,
            server_class=TlsAssociationServer,
        )
        assert isinstance(server, TlsAssociationServer)
        server.handshake_timeout = self.services.tls.handshake_timeout
        server.on_handshake_failure = self._handshake_failed
        server.hello_timeout = self.services.hello_timeout
        server.on_refused = self.services.on_refused
        return server

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)

    def _handshake_failed(self, failure: HandshakeFailure) -> None:
        """From a connection's thread: the gateway hears it on its own loop."""
        report = self.services.on_handshake_failure
        if report is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(report, failure)

    # -- admission (EVT_REQUESTED, in the association's thread, before negotiation)

    def _on_requested(self, event: Any) -> None:

        assoc = event.assoc
        try:
            decision = self.services.guard.admit(
                association_identity(assoc), Door.DIMSE, resource=self._resource()
            )
            if decision.allowed and decision.principal is not None:
                self._callers[assoc] = decision.principal
                # Each storage context (C-GET) with the SCU's first choice of syntax.
                take_requestor_order(assoc)
                return
        except Exception:  # fail closed: pynetdicom would negotiate after a failed handler
            log.exception("admitting a DIMSE association failed")
        # The guard logged and audited the refusal. Answer as pynetdicom's own calling-AE
        # check does: rejected-permanent, service-user, calling AE title not recognized.
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _resource(self) -> str:
        return f"DIMSE {self.config.ae_title} (C-FIND/C-GET/C-MOVE)"

    def _caller(self, event: Any) -> Principal | None:
        """The association's principal, made the current caller of this (pynetdicom) thread
        for what runs here synchronously."""
        principal = self._callers.get(event.assoc)
        set_current_caller(principal)
        return principal

    # -- bridging to the gateway's loop

    def _call(self, coroutine: Awaitable[T], caller: Principal | None) -> T:
        """Run ``coroutine`` on the gateway's loop as ``caller``: contextvars do not cross
        from pynetdicom's threads, so the task sets the current caller itself and everything
        it starts (fan-out, audit, XUA) sees the local caller."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(_as_caller(coroutine, caller), self._loop)
        try:
            return future.result(_CALL_TIMEOUT)
        except BaseException:
            future.cancel()
            raise

    # -- federation

    def _studies_for(self, query: FindQuery, caller: Principal | None) -> list[StudyManifest]:
        """The patient's studies (a search: its caller may then name them alone), or the
        studies named alone that this caller's own earlier search found."""
        try:
            if query.patient_id is not None:
                found = self._call(self.view.studies_of_patient(query.patient_id, caller), caller)
                return found.studies
            known = self._call(self.view.studies_by_uid(query.study_instance_uids, caller), caller)
        except FederationError as exc:
            raise QueryError(STATUS_UNABLE_TO_PROCESS, exc.message) from None
        if not known:
            raise QueryError(
                STATUS_IDENTIFIER_MISMATCH,
                "a Patient ID is required (XDS queries are per patient) unless the study "
                "was found by an earlier C-FIND of this caller",
            )
        return known

    def _plan(
        self, query: FindQuery, transfer: _Transfer, caller: Principal | None
    ) -> RetrieveImagingDocumentSetRequest:
        """The instances a C-GET/C-MOVE asks for, as a RAD-69 request (its transfer syntaxes
        are set once the receiving side is known); raises :class:`_Refused`."""
        try:
            studies = self._studies_for(query, caller)
            transfer.describe(query, studies)
            return imaging_request(query, studies)
        except QueryError as exc:
            if exc.status != STATUS_IDENTIFIER_MISMATCH:
                transfer.refused = exc.comment
            raise _Refused(exc.status, exc.comment) from None
        except ConsumerError as exc:
            transfer.refused = str(exc)
            raise _Refused(STATUS_UNABLE_TO_PROCESS, str(exc)) from None
        except Exception as exc:
            log.exception("finding the manifests to retrieve failed")
            transfer.refused = f"query failed: {type(exc).__name__}"
            raise _Refused(STATUS_UNABLE_TO_PROCESS, transfer.refused) from None

    def _deliver(
        self,
        request: RetrieveImagingDocumentSetRequest,
        transfer: _Transfer,
        caller: Principal | None,
    ) -> Iterator[Any]:
        """The C-GET/C-MOVE generator body after the destination: the count, then each
        instance as the federation returns it, in a syntax the receiving side accepted.

        The count comes first: pynetdicom opens a C-MOVE's association to the destination
        right after it, so the RAD-69 can ask for what the destination accepted."""
        if not request.documents:
            transfer.finish()  # nothing matched: nothing to audit
            yield 0
            yield STATUS_SUCCESS, None
            return
        transfer.documents = request.documents
        requested = [d.document_unique_id for d in request.documents]
        yield len(requested)
        accepted = transfer.accepted
        if accepted is not None:
            classes = {transfer.sop_classes.get(u, "") for u in requested}
            request = dataclasses.replace(
                request, transfer_syntax_uids=request_syntaxes(accepted, sorted(classes))
            )
        try:
            retrieval = self._call(self.view.retrieve(request), caller)
        except Exception as exc:
            log.exception("RAD-69 through the gateway failed")
            reason = f"retrieve failed: {type(exc).__name__}"
            transfer.failures = dict.fromkeys(requested, reason)
            transfer.finish()
            yield _failure(STATUS_UNABLE_TO_PROCESS, reason, failed=requested)
            return
        uids = retrieval.uids
        missing = retrieval.missing
        why = "; ".join(f"{e.error_code}: {e.code_context}" for e in retrieval.errors if e.is_error)
        transfer.failures.update(dict.fromkeys(missing, why or "not returned by the federation"))
        failed = list(missing)
        wanted = set(requested)
        try:
            for index, uid in enumerate(uids):
                if uid not in wanted:  # a source that sent more than asked: not ours to pass on
                    continue
                try:
                    data = self._call(retrieval.read(index), caller)
                except Exception as exc:
                    # A broken stream cannot be resumed: the rest of the retrieve is lost.
                    log.warning("instance %s not retrieved: %s", uid, exc)
                    transfer.failures.update(dict.fromkeys(uids[index:], f"not retrieved: {exc}"))
                    failed.extend(u for u in uids[index:] if u in wanted)
                    break
                try:
                    ds = self._outgoing(data, uid, accepted)
                except ValueError as exc:
                    # Complete but not valid DICOM, or in no syntax the receiver accepted:
                    # refuse this one, carry on with the rest.
                    log.warning("instance %s refused: %s", uid, exc)
                    transfer.failures[uid] = f"refused: {exc}"
                    failed.append(uid)
                    continue
                transfer.sent.add(uid)
                yield STATUS_PENDING, ds  # pynetdicom sends the C-STORE, then resumes here
        finally:
            # Instances never read still hold their sources (file, peer response) open.
            self._call(retrieval.aclose(), caller)
        # Every C-STORE has been answered by now: the records can say what arrived.
        transfer.finish()
        if failed and not transfer.sent:
            # Not one sub-operation could be performed (PS3.4 C.4.3.1.4): say why.
            reason = transfer.failures.get(failed[0], "not retrieved")
            yield _failure(STATUS_SUBOPS_UNPERFORMED, reason, failed=failed)
            return
        if failed:
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = failed
            yield STATUS_SUBOPS_WITH_FAILURES, ds
            return
        yield STATUS_SUCCESS, None

    @staticmethod
    def _outgoing(data: bytes, uid: str, accepted: Mapping[str, Sequence[str]] | None) -> Dataset:
        """The instance to send: checked whole first, then read afresh and left undecoded, so
        that pynetdicom writes its elements back byte for byte (a decoded value is re-encoded,
        not always to the same bytes). Converted losslessly when the receiver did not accept
        its syntax; ValueError when it cannot be sent."""
        checked = decode_instance(data, uid)
        stored = str(checked.file_meta.TransferSyntaxUID)
        sop_class = str(checked.SOPClassUID)
        del checked
        if accepted is not None:
            allowed = accepted.get(sop_class, [])
            target = outgoing_syntax(stored, allowed)
            if target is None:
                raise ValueError(
                    f"stored in {stored}; the receiver accepted "
                    f"{', '.join(allowed) or 'no transfer syntax'} for {sop_class}"
                )
            if target != stored:
                try:
                    data = ts.transcode(data, target)
                except ts.TranscodeError as exc:
                    raise ValueError(str(exc)) from None
        return dcmread(io.BytesIO(data))

    # -- DIMSE handlers (pynetdicom threads)

    def _model(self, event: Any) -> str:
        uid = str(event.request.AffectedSOPClassUID)
        return "PATIENT" if uid.startswith("1.2.840.10008.5.1.4.1.2.1.") else "STUDY"

    def _on_find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        caller = self._caller(event)
        if caller is None:  # never admitted (fail closed; EVT_REQUESTED rejects these)
            yield _failure(STATUS_NOT_AUTHORIZED, "the calling AE was not admitted")
            return
        patients: list[str] = []
        audited = False

        def audit(status: int, comment: str | None = None) -> None:
            nonlocal audited
            if not audited:
                audited = True
                self._audit_find(event, patients, status, comment)

        try:
            try:
                query = parse_identifier(
                    event.identifier, model=self._model(event), local_authority=self.local_authority
                )
                if query.patient_id is None and not query.study_instance_uids:
                    raise QueryError(
                        STATUS_IDENTIFIER_MISMATCH,
                        "a Patient ID is required: XDS queries are per patient",
                    )
                if query.patient_id is not None:
                    patients.append(query.patient_id)
                studies = self._studies_for(query, caller)
                if not patients:
                    patients.extend(p for s in studies if (p := header_patient_id(s.header)))
                matches = build_matches(query, studies, retrieve_ae_title=self.config.ae_title)
            except QueryError as exc:
                audit(exc.status, exc.comment)
                yield _failure(exc.status, exc.comment)
                return
            except Exception as exc:
                log.exception("C-FIND failed")
                comment = f"query failed: {type(exc).__name__}"
                audit(STATUS_UNABLE_TO_PROCESS, comment)
                yield _failure(STATUS_UNABLE_TO_PROCESS, comment)
                return
            for match in matches:
                if event.is_cancelled:
                    audit(STATUS_CANCEL, "cancelled by the requester")
                    yield STATUS_CANCEL, None
                    return
                yield STATUS_PENDING, match
            audit(STATUS_SUCCESS)
            yield STATUS_SUCCESS, None
        finally:
            audit(STATUS_UNABLE_TO_PROCESS, "association ended before the query completed")

    def _audit_find(
        self, event: Any, patients: Sequence[str], status: int, comment: str | None
    ) -> None:
        trail = self.audit
        if not trail.config.enabled:
            return
        try:
            identifier = event.request.Identifier
            trail.record(
                find_audit(
                    trail.context,
                    requester=_requester(event),
                    responder=trail.local_node(self.config.ae_title),
                    sop_class_uid=str(event.request.AffectedSOPClassUID),
                    identifier=identifier.getvalue() if identifier is not None else b"",
                    transfer_syntax=str(event.context.transfer_syntax),
                    patient_ids=patients,
                    status=status,
                    comment=comment,
                )
            )
        except Exception:  # an audit failure must not touch the query
            log.exception("building the C-FIND audit record failed")

    def _parse_retrieve(self, event: Any) -> FindQuery:
        query = parse_identifier(
            event.identifier, model=self._model(event), local_authority=self.local_authority
        )
        if query.level == "PATIENT" and query.patient_id is None:
            raise QueryError(STATUS_IDENTIFIER_MISMATCH, "PATIENT level needs a Patient ID")
        if query.level in ("STUDY", "SERIES", "IMAGE") and not query.study_instance_uids:
            raise QueryError(STATUS_IDENTIFIER_MISMATCH, "StudyInstanceUID is required")
        if query.level in ("SERIES", "IMAGE") and not query.series_instance_uids:
            raise QueryError(STATUS_IDENTIFIER_MISMATCH, "SeriesInstanceUID is required")
        if query.level == "IMAGE" and not query.sop_instance_uids:
            raise QueryError(STATUS_IDENTIFIER_MISMATCH, "SOPInstanceUID is required")
        return query

    def _on_get(self, event: Any) -> Iterator[Any]:
        caller = self._caller(event)
        if caller is None:  # never admitted (fail closed; EVT_REQUESTED rejects these)
            yield from _refuse(STATUS_NOT_AUTHORIZED, "the calling AE was not admitted")
            return
        try:
            query = self._parse_retrieve(event)
        except QueryError as exc:
            yield from _refuse(exc.status, exc.comment)
            return
        # The C-STOREs go back on this association: its C-STORE-RSPs tell what arrived.
        transfer = _Transfer(
            self,
            destination=_requester(event),
            requester=None,
            study_uids=query.study_instance_uids,
            assoc=event.assoc,
        )
        transfer.accepted = syntaxes_by_sop_class(event.assoc.accepted_contexts)
        try:
            try:
                request = self._plan(query, transfer, caller)
            except _Refused as exc:
                yield from _refuse(exc.status, exc.comment, transfer)
                return
            yield from self._deliver(request, transfer, caller)
        finally:
            transfer.finish()  # if the association ended the retrieve half-way

    def _on_move(self, event: Any) -> Iterator[Any]:

        caller = self._caller(event)
        destination = self.config.destination(str(event.move_destination or ""))
        if destination is None:
            yield None, None
            return
        if caller is None:  # never admitted (fail closed; EVT_REQUESTED rejects these)
            yield destination.host, destination.port
            yield from _refuse(STATUS_NOT_AUTHORIZED, "the calling AE was not admitted")
            return
        try:
            query = self._parse_retrieve(event)
        except QueryError as exc:
            yield destination.host, destination.port
            yield from _refuse(exc.status, exc.comment)
            return
        transfer = _Transfer(
            self,
            destination=dimse_requester(destination.ae_title, destination.host),
            requester=_requester(event),
            study_uids=query.study_instance_uids,
        )
        try:
            try:
                request = self._plan(query, transfer, caller)
            except _Refused as exc:
                yield destination.host, destination.port
                yield from _refuse(exc.status, exc.comment, transfer)
                return
            # pynetdicom opens the association to the destination with these: the SOP classes
            # to send in native and compressed syntaxes, what the destination accepted, and
            # its C-STORE-RSPs (what arrived).
            options: dict[str, Any] = {
                "evt_handlers": [
                    (evt.EVT_ACCEPTED, transfer.on_accepted),
                    (evt.EVT_DIMSE_RECV, transfer.on_dimse),
                ],
                "contexts": move_contexts(
                    transfer.sop_classes.get(d.document_unique_id, "") for d in request.documents
                )
                or StoragePresentationContexts,
            }
            if destination.tls:
                assert self._client_tls is not None
                options["tls_args"] = (self._client_tls, destination.host)
            yield destination.host, destination.port, options
            yield from self._deliver(request, transfer, caller)
        finally:
            transfer.finish()  # if the association ended the retrieve half-way


def _requester(event: Any) -> m.Node:
    peer = event.assoc.requestor
    return dimse_requester(str(peer.ae_title or ""), str(peer.address or "") or None)


async def _as_caller(awaitable: Awaitable[T], caller: Principal | None) -> T:
    set_current_caller(caller)  # this task's context only
    return await awaitable


def _refuse(status: int, comment: str, transfer: _Transfer | None = None) -> Iterator[Any]:
    """Fail a C-GET/C-MOVE before any sub-operation (audited first: pynetdicom does not resume
    the generator after a final status).

    pynetdicom answers Success by itself when zero sub-operations are announced, so announce
    one and fail it.
    """
    if transfer is not None:
        transfer.finish()
    yield 1
    yield _failure(status, comment)


def _failure(
    status: int, comment: str, *, failed: Sequence[str] = ()
) -> tuple[Dataset, Dataset | None]:
    """A failure status with its Error Comment (pynetdicom takes a status Dataset), and for a
    retrieve the Failed SOP Instance UID List."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    if not failed:
        return ds, None
    identifier = Dataset()
    identifier.FailedSOPInstanceUIDList = list(failed)
    return ds, identifier


class _Refused(Exception):
    """A C-GET/C-MOVE refused before any sub-operation."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
