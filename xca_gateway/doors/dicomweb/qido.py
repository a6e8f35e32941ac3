"""QIDO-RS query parameters (PS3.18 10.6) read into a :class:`QidoQuery`, sans I/O.

Keywords or tags, matching values (single values, UID lists, date and time ranges, wildcards),
``includefield``, ``limit``/``offset`` and ``fuzzymatching`` are checked against what the
federation's manifests can answer at each level; the PatientID (with IssuerOfPatientID, default
the community's assigning authority) becomes the CX of the XDS query. Bad input is a 400.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pydicom.datadict import keyword_for_tag, tag_for_keyword

from xca_gateway.doors.dicomweb.negotiation import Level, Route, bad_request, uid_segment
from xca_gateway.doors.federation import patient_cx

# ----------------------------------------------------------------------------- QIDO-RS query


def _keyword(key: str) -> str:
    """The attribute keyword of a QIDO-RS query key (keyword or 8-digit tag), or 400."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        keyword = keyword_for_tag(int(key, 16))
        if not keyword:
            raise bad_request(f"unknown attribute tag {key}")
        return str(keyword)
    if "." in key:
        raise bad_request(f"{key[:80]}: matching on sequence attributes is not supported")
    if tag_for_keyword(key) is None:
        raise bad_request(f"unknown query key {key[:80]!r}")
    return key


# What the manifests (KOS header, references) and DocumentEntries can answer, by level.
_MATCH_STUDY = frozenset(
    {
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "ReferringPhysicianName",
        "ModalitiesInStudy",
    }
)
_MATCHABLE = {
    "STUDY": _MATCH_STUDY,
    "SERIES": _MATCH_STUDY | {"SeriesInstanceUID", "Modality"},
    "IMAGE": _MATCH_STUDY | {"SeriesInstanceUID", "Modality", "SOPInstanceUID", "SOPClassUID"},
}
_UID_KEYS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"})
RANGE_KEYS = frozenset({"StudyDate", "StudyTime", "PatientBirthDate"})


@dataclass(frozen=True)
class QidoQuery:
    level: Level
    patient_id: str | None  # CX for the federation; None when not given
    caller_patient_id: str | None = None
    caller_issuer: str | None = None
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_uids: tuple[str, ...] = ()
    # (keyword, value) matched against what the manifests tell (PS3.4 C.2.2.2 matching).
    filters: tuple[tuple[str, str], ...] = ()
    include: frozenset[str] = frozenset()
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    # Resources named in the path (their attributes are not repeated at lower levels).
    study_in_path: bool = False
    series_in_path: bool = False


_DATE = r"\d{8}"
_TIME = r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?"


def _check_date(value: str, what: str) -> None:
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise bad_request(f"{what}: {value[:40]!r} is not a date (YYYYMMDD)") from None


def _check_time(value: str, what: str) -> None:
    hh, mm, ss = int(value[:2]), int(value[2:4] or 0), int(value[4:6] or 0)
    if hh > 23 or mm > 59 or ss > 60:
        raise bad_request(f"{what}: {value[:40]!r} is not a time (HHMMSS)")


def _check_range_value(keyword: str, value: str) -> None:
    """Single value or range (``a-b``, ``a-``, ``-b``) of a date or time, else 400."""
    pattern, check = (_TIME, _check_time) if keyword == "StudyTime" else (_DATE, _check_date)
    bounds = value.split("-")
    if len(bounds) > 2 or (len(bounds) == 2 and not (bounds[0] or bounds[1])):
        raise bad_request(f"{keyword}: malformed range {value[:40]!r}")
    for bound in bounds:
        if bound:
            if not re.fullmatch(pattern, bound):
                what = "time (HHMMSS)" if keyword == "StudyTime" else "date (YYYYMMDD)"
                raise bad_request(f"{keyword}: {bound[:40]!r} is not a {what}")
            check(bound, keyword)
    if len(bounds) == 2 and bounds[0] and bounds[1] and bounds[0] > bounds[1]:
        raise bad_request(f"{keyword}: range {value[:40]!r} ends before it starts")


def split_values(raw: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\\]", raw) if v.strip()]


def cx_safe(value: str, what: str) -> str:
    if any(ch in value for ch in "*?\\^&~|") or not value.isprintable() or len(value) > 64:
        raise bad_request(f"{what}: wildcards and the characters \\ ^ & ~ | are not supported")
    return value


def parse_qido(
    route: Route,
    pairs: Sequence[tuple[str, str]],
    *,
    local_authority: str,
    max_results: int,
) -> QidoQuery:
    """Read a QIDO-RS request's query parameters; DicomWebError(400) if bad."""
    level = route.level
    filters: list[tuple[str, str]] = []
    seen: set[str] = set()
    uids: dict[str, list[str]] = {k: [] for k in ("StudyInstanceUID", "SeriesInstanceUID")}
    uids["SOPInstanceUID"] = []
    include: set[str] = set()
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = False
    pid: str | None = None
    issuer: str | None = None
    for raw_key, value in pairs:
        key = raw_key.strip()
        lowered = key.lower()
        value = value.strip()
        if lowered == "includefield":
            for item in split_values(value):
                if item.lower() == "all":
                    include_all = True
                else:
                    include.add(_keyword(item))
            continue
        if lowered in ("limit", "offset"):
            if lowered in seen:
                raise bad_request(f"{lowered} is given twice")
            seen.add(lowered)
            if not value.isdigit() or len(value) > 9:
                raise bad_request(f"{lowered} must be a non-negative integer, not {value[:20]!r}")
            number = int(value)
            if lowered == "limit":
                if number < 1:
                    raise bad_request("limit must be at least 1")
                limit = number
            else:
                offset = number
            continue
        if lowered == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise bad_request("fuzzymatching must be true or false")
            fuzzy = value.lower() == "true"
            continue
        if lowered in ("accept", "charset"):
            continue  # media type negotiation is done by the caller
        keyword = _keyword(key)
        if keyword in ("PatientID", "IssuerOfPatientID"):
            if keyword in seen:
                raise bad_request(f"{keyword} is given twice")
            seen.add(keyword)
            if keyword == "PatientID":
                pid = cx_safe(value, "PatientID") if value else None
            else:
                issuer = value or None
            continue
        if not value or value == "*":
            include.add(keyword)  # a universal match is a return key
            continue
        if keyword in uids:
            if "*" in value or "?" in value:
                raise bad_request(f"{keyword}: no wildcards in UIDs")
            for uid in split_values(value):
                uids[keyword].append(uid_segment(uid, keyword))
            include.add(keyword)
            continue
        if keyword not in _MATCHABLE[level]:
            raise bad_request(
                f"matching on {keyword} is not supported at the {level.lower()} level"
            )
        if keyword in seen:
            raise bad_request(f"{keyword} is given twice")
        seen.add(keyword)
        if keyword in RANGE_KEYS:
            _check_range_value(keyword, value)
        elif keyword == "SOPClassUID":
            uid_segment(value, keyword)
        filters.append((keyword, value))
        include.add(keyword)
    if issuer is not None and pid is None:
        raise bad_request("IssuerOfPatientID needs a PatientID")
    if issuer is not None and not re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", issuer):
        raise bad_request("IssuerOfPatientID must be the OID of the patient's assigning authority")
    study_uids = tuple(dict.fromkeys(uids["StudyInstanceUID"]))
    if route.study is not None:
        if study_uids and route.study not in study_uids:
            raise bad_request("StudyInstanceUID in the query contradicts the one in the path")
        study_uids = (route.study,)
    series_uids = tuple(dict.fromkeys(uids["SeriesInstanceUID"]))
    if route.series is not None:
        if series_uids and route.series not in series_uids:
            raise bad_request("SeriesInstanceUID in the query contradicts the one in the path")
        series_uids = (route.series,)
    if level == "STUDY" and (series_uids or uids["SOPInstanceUID"]):
        raise bad_request("series and instance UIDs cannot be matched at the study level")
    if level == "SERIES" and uids["SOPInstanceUID"]:
        raise bad_request("SOPInstanceUID cannot be matched at the series level")
    return QidoQuery(
        level=level,
        patient_id=patient_cx(pid, issuer, local_authority) if pid else None,
        caller_patient_id=pid,
        caller_issuer=(issuer or local_authority) if pid else None,
        study_uids=study_uids,
        series_uids=series_uids,
        sop_uids=tuple(dict.fromkeys(uids["SOPInstanceUID"])),
        filters=tuple(filters),
        include=frozenset(include),
        include_all=include_all,
        limit=min(limit, max_results) if limit is not None else max_results,
        offset=offset,
        fuzzy=fuzzy,
        study_in_path=route.study is not None,
        series_in_path=route.series is not None,
    )
