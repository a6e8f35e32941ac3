"""IHE Invoke Image Display (IID, RAD-106) requests and the study list they show, sans I/O.

An EHR opens ``GET <launch>?requestType=PATIENT&patientID=<CX>[...]`` (or ``requestType=STUDY``
with ``studyUID`` / ``accessionNumber``) in the clinician's browser (RAD TF-2 4.106.4.1.2).
:func:`parse_iid` turns the query into an :class:`IidRequest` or an :class:`IidError` (HTTP 400
with a message that says what is wrong); :func:`study_rows` makes one :class:`StudyRow` per study
of the federation's manifests (which community holds it, date, modalities, description,
instances) and :func:`select_studies` applies the request's filters (studies, accession numbers,
date range, modalities, most recent N), newest first.

XDS is queried per patient, so a STUDY request must name the patient too (``patientID``): the
federation has no query by study alone, and a study UID must never open a study of someone the
EHR did not name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Literal

from pydicom.dataset import Dataset

from xca_gateway.doors.federation import StudyManifest, patient_cx
from xca_gateway.xds.kos import is_valid_uid

__all__ = [
    "IidError",
    "IidRequest",
    "StudyRow",
    "parse_iid",
    "select_studies",
    "study_rows",
]

RequestType = Literal["PATIENT", "STUDY"]
_KNOWN = (
    "requestType",
    "patientID",
    "studyUID",
    "accessionNumber",
    "lowerDateTime",
    "upperDateTime",
    "mostRecentResults",
    "modalitiesInStudy",
    "viewerType",
    "diagnosticQuality",
    "keyImagesOnly",
)
_MAX_LIST = 100
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_MODALITY = re.compile(r"[A-Z0-9]{1,16}")


class IidError(Exception):
    """A launch that cannot be served as asked: HTTP 400 with this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class IidRequest:
    request_type: RequestType
    patient_id: str  # CX id^^^&oid&ISO
    study_uids: tuple[str, ...] = ()
    accession_numbers: tuple[str, ...] = ()
    lower: datetime | None = None
    upper: datetime | None = None
    most_recent: int | None = None
    modalities: tuple[str, ...] = ()
    viewer_type: str | None = None
    diagnostic_quality: bool = True
    key_images_only: bool = False


def _patient(value: str, local_authority: str) -> str:
    """``id^^^&oid&ISO`` (or a bare id: the community's own domain) as a checked CX."""
    value = value.strip()
    pid, _, rest = value.partition("^")
    if not pid or len(pid) > 64 or any(c in pid for c in "&~\\|") or not pid.isprintable():
        raise IidError("patientID must be a patient id with its issuer: id^^^&OID&ISO")
    issuer: str | None = None
    if rest:
        components = rest.split("^")
        authority = components[2] if len(components) >= 3 else ""
        parts = authority.split("&")
        if len(parts) != 3 or not _OID.fullmatch(parts[1]) or parts[2] != "ISO":
            raise IidError(
                f"patientID {value[:80]!r}: the assigning authority must be &OID&ISO "
                "(a CX such as 12345^^^&1.2.3.4&ISO)"
            )
        issuer = parts[1]
    return patient_cx(pid, issuer, local_authority)


def _datetime(value: str, name: str) -> datetime:
    """ISO 8601 date or date-time (``2024-05-06`` or ``2024-05-06T10:00:00Z``)."""
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text) if "T" in text else None
        if parsed is None:
            parsed = datetime.combine(date.fromisoformat(text), datetime.min.time())
    except ValueError:
        raise IidError(
            f"{name} {text[:40]!r} is not an ISO 8601 date-time (e.g. 2024-05-06T10:00:00Z)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _list(value: str, name: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise IidError(f"{name} is empty")
    if len(items) > _MAX_LIST:
        raise IidError(f"{name}: at most {_MAX_LIST} values")
    return items


def _boolean(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise IidError(f"{name} must be true or false")
    return lowered == "true"


def parse_iid(pairs: Sequence[tuple[str, str]], local_authority: str) -> IidRequest:
    """The RAD-106 request of a query string's pairs. Parameters IID does not define are
    ignored (the profile lets invokers add their own); a defined one given twice or malformed,
    or a missing required one, raises :class:`IidError`."""
    seen: dict[str, str] = {}
    for key, value in pairs:
        if key not in _KNOWN:
            continue
        if key in seen:
            raise IidError(f"{key} is given more than once")
        seen[key] = value
    kind = seen.get("requestType", "").strip().upper()
    if kind not in ("PATIENT", "STUDY"):
        raise IidError("requestType must be PATIENT or STUDY")
    if "patientID" not in seen:
        raise IidError(
            "patientID is required (id^^^&OID&ISO): the federation is searched per patient"
        )
    patient = _patient(seen["patientID"], local_authority)
    studies: list[str] = []
    accessions: list[str] = []
    if kind == "STUDY":
        if "studyUID" not in seen and "accessionNumber" not in seen:
            raise IidError("requestType=STUDY needs studyUID or accessionNumber")
        if "studyUID" in seen:
            studies = _list(seen["studyUID"], "studyUID")
            bad = next((u for u in studies if not is_valid_uid(u)), None)
            if bad is not None:
                raise IidError(f"studyUID {bad[:80]!r} is not a valid UID")
        if "accessionNumber" in seen:
            accessions = [
                a.split("^")[0] for a in _list(seen["accessionNumber"], "accessionNumber")
            ]
            bad = next((a for a in accessions if len(a) > 16 or not a.isprintable()), None)
            if bad is not None:
                raise IidError(f"accessionNumber {bad[:40]!r} is not an accession number")
    else:
        for name in ("studyUID", "accessionNumber"):
            if name in seen:
                raise IidError(f"{name} is for requestType=STUDY")
    lower = _datetime(seen["lowerDateTime"], "lowerDateTime") if "lowerDateTime" in seen else None
    upper = _datetime(seen["upperDateTime"], "upperDateTime") if "upperDateTime" in seen else None
    if lower and upper and lower > upper:
        raise IidError("lowerDateTime is after upperDateTime")
    most_recent: int | None = None
    if "mostRecentResults" in seen:
        text = seen["mostRecentResults"].strip()
        if not text.isdigit() or not 1 <= int(text) <= 10_000:
            raise IidError("mostRecentResults must be a positive integer")
        most_recent = int(text)
    modalities: list[str] = []
    if "modalitiesInStudy" in seen:
        modalities = [m.upper() for m in _list(seen["modalitiesInStudy"], "modalitiesInStudy")]
        bad = next((m for m in modalities if not _MODALITY.fullmatch(m)), None)
        if bad is not None:
            raise IidError(f"modalitiesInStudy: {bad[:20]!r} is not a modality code")
    viewer_type = seen.get("viewerType", "").strip()[:64] or None
    return IidRequest(
        request_type=kind,  # type: ignore[arg-type]
        patient_id=patient,
        study_uids=tuple(studies),
        accession_numbers=tuple(accessions),
        lower=lower,
        upper=upper,
        most_recent=most_recent,
        modalities=tuple(modalities),
        viewer_type=viewer_type,
        diagnostic_quality=_boolean(seen["diagnosticQuality"], "diagnosticQuality")
        if "diagnosticQuality" in seen
        else True,
        key_images_only=_boolean(seen["keyImagesOnly"], "keyImagesOnly")
        if "keyImagesOnly" in seen
        else False,
    )


# ----------------------------------------------------------------------------- the list


@dataclass(frozen=True)
class StudyRow:
    """One study as the launch page lists it."""

    study_uid: str
    communities: tuple[str, ...]
    study_date: str  # YYYYMMDD, may be empty
    study_time: str
    modalities: tuple[str, ...]
    description: str
    accession_number: str
    series: int
    instances: int
    patient_name: str = ""
    series_uids: tuple[str, ...] = field(default=(), compare=False)

    @property
    def when(self) -> datetime | None:
        if not re.fullmatch(r"\d{8}", self.study_date):
            return None
        digits = re.sub(r"\D", "", self.study_time.split(".")[0])[:6].ljust(6, "0")
        try:
            return datetime.strptime(self.study_date + digits, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        except ValueError:
            return None

    @property
    def display_date(self) -> str:
        d = self.study_date
        return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if re.fullmatch(r"\d{8}", d) else d


@dataclass
class _Merged:
    header: Dataset
    communities: dict[str, None] = field(default_factory=dict)
    modalities: dict[str, None] = field(default_factory=dict)
    series: dict[str, None] = field(default_factory=dict)
    instances: set[str] = field(default_factory=set)


def study_rows(
    studies: Iterable[StudyManifest], community_names: Mapping[str, str]
) -> list[StudyRow]:
    """One row per study over the manifests (a study two manifests reference is one row, its
    instances counted once), named by the community (home community id → name) holding it."""
    merged: dict[str, _Merged] = {}
    for study in studies:
        home = study.manifest.home_community_id
        community = community_names.get(home, home)
        for ref in study.references:
            entry = merged.setdefault(ref.study_instance_uid, _Merged(study.header))
            entry.communities[community] = None
            entry.modalities.update(dict.fromkeys(study.modalities))
            entry.series[ref.series_instance_uid] = None
            entry.instances.add(ref.sop_instance_uid)
    rows: list[StudyRow] = []
    for uid, entry in merged.items():

        def text(keyword: str, header: Dataset = entry.header) -> str:
            return str(header.get(keyword, "") or "").strip()

        rows.append(
            StudyRow(
                study_uid=uid,
                communities=tuple(entry.communities),
                study_date=text("StudyDate"),
                study_time=text("StudyTime"),
                modalities=tuple(entry.modalities),
                description=text("StudyDescription"),
                accession_number=text("AccessionNumber"),
                series=len(entry.series),
                instances=len(entry.instances),
                patient_name=text("PatientName").replace("^", " ").strip(),
                series_uids=tuple(entry.series),
            )
        )
    return rows


def select_studies(rows: Iterable[StudyRow], request: IidRequest) -> list[StudyRow]:
    """The rows the request asks for, newest first (undated last)."""
    chosen: list[StudyRow] = []
    for row in rows:
        if (request.study_uids or request.accession_numbers) and not (
            row.study_uid in request.study_uids
            or (row.accession_number and row.accession_number in request.accession_numbers)
        ):
            continue
        if request.modalities and not set(request.modalities) & set(row.modalities):
            continue
        when = row.when
        if request.lower and (when is None or when < request.lower):
            continue
        if request.upper and (when is None or when > request.upper):
            continue
        chosen.append(row)
    epoch = datetime.min.replace(tzinfo=UTC)
    chosen.sort(key=lambda r: r.when or epoch, reverse=True)
    if request.most_recent is not None:
        chosen = chosen[: request.most_recent]
    return chosen
