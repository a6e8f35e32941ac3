"""The DICOMweb front door: QIDO-RS and WADO-RS (DICOM PS3.18) over the XCA-I federation.

Web viewers and VNAs speak DICOMweb, not XDS-I. This door lets them search and retrieve across
the federation through the community's own initiating gateway, in-process, with the same
federation logic as the DIMSE door (:mod:`xca_gateway.federation_view`):

* QIDO-RS (``GET /dicomweb/studies``, ``/series``, ``/instances`` and the study/series-scoped
  forms): the PatientID (with IssuerOfPatientID, default the community's assigning authority)
  becomes an ITI-18 FindDocuments for KOS manifests across the federation; the manifests and
  their DocumentEntries answer the match (application/dicom+json).
* WADO-RS (``GET /dicomweb/studies/{study}[/series/{series}[/instances/{instance}]]``): a
  RAD-69 through the initiating gateway (routed as RAD-75); instances are streamed as
  ``multipart/related; type="application/dicom"`` part by part as they arrive, never buffered.
  ``.../metadata`` answers the headers as application/dicom+json without pixel data.

XDS is per patient: there is no query by study alone. A request that names only a study
(every WADO-RS request, QIDO-RS below a study) is served from the studies an earlier QIDO-RS
found; otherwise it must carry ``PatientID`` (an extension on WADO-RS URLs), else 400.

Each search is audited as a Query (110112, RAD-129 "QIDO-RS Query") and each retrieve as
"DICOM Instances Transferred" (110104, RAD-107 "WADO-RS Retrieve"), through the gateway's
audit trail when one is configured.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, unquote

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from xca_gateway.audit import messages as m
from xca_gateway.consumer import ConsumerError
from xca_gateway.ebrs import RegistryError
from xca_gateway.federation_view import (
    FederationError,
    FederationView,
    StudyManifest,
    close_body,
    header_patient_id,
    imaging_request_for,
    patient_cx,
)
from xca_gateway.imaging import transfer_syntax as ts
from xca_gateway.imaging.retrieve import ImagingRetrieval
from xca_gateway.kos import InstanceRef, is_valid_uid
from xca_gateway.server import BodyTooLarge, HttpServer, Request, Response, ServerTimeouts
from xca_gateway.tls import HandshakeFailure, server_context

if TYPE_CHECKING:
    from xca_gateway.gateway import Gateway

log = logging.getLogger(__name__)

__all__ = [
    "ConfigError",
    "DicomWebError",
    "DicomWebFrontConfig",
    "DicomWebFrontDoor",
    "QidoQuery",
    "Route",
    "negotiate_json",
    "negotiate_transfer_syntaxes",
    "parse_accept",
    "parse_dicomweb_front_config",
    "parse_qido",
    "parse_route",
    "search",
    "to_dicom_json",
]

PREFIX = "/dicomweb"
DICOM_JSON = "application/dicom+json"
DEFAULT_PORT = 8444
# Every transfer syntax the federation may hold, for "transfer-syntax=*": listing them all in
# the RAD-69 request makes every source pass instances through as stored (byte-identical).
ANY_TRANSFER_SYNTAX: tuple[str, ...] = (
    ts.EXPLICIT_VR_LITTLE_ENDIAN,
    ts.IMPLICIT_VR_LITTLE_ENDIAN,
    ts.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    ts.EXPLICIT_VR_BIG_ENDIAN,
    ts.RLE_LOSSLESS,
    ts.JPEG_LOSSLESS,
    ts.JPEG_LOSSLESS_SV1,
    ts.JPEG_LS_LOSSLESS,
    ts.JPEG_2000_LOSSLESS,
    ts.HTJ2K_LOSSLESS,
    ts.HTJ2K_LOSSLESS_RPCL,
    *sorted(ts.LOSSY),
)
# Binary values above this size are left out of metadata (no bulk data resource is served).
METADATA_INLINE_LIMIT = 64 * 1024
# An instance's header is parsed from a spooled copy: in memory up to this size, then on disk.
_HEADER_SPOOL_MEMORY = 4 * 1024 * 1024
_MAX_REQUEST_BODY = 64 * 1024
_MAX_QUERY_FIELDS = 200
_WARN_AGENT = "xca-gateway"

# Audit event types (IHE Transactions code system). The digest (shared/docs atna.md §4.3)
# names the imaging retrieve pattern: the serving side of a retrieve audits "DICOM Instances
# Transferred" (110104, action R), as an Imaging Document Source does for RAD-69; a query is
# 110112 "Query" (action E). The transactions are IHE WIA's RAD-129 "QIDO-RS Query" and
# RAD-107 "WADO-RS Retrieve" (imaging.md §7 names RAD-107).
QIDO_RS_QUERY = m.CodedValue("RAD-129", "IHE Transactions", "QIDO-RS Query")
WADO_RS_RETRIEVE = m.CodedValue("RAD-107", "IHE Transactions", "WADO-RS Retrieve")


class ConfigError(ValueError):
    pass


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DicomWebFrontConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # Mutual TLS with the gateway's certificate and trust store (ATNA ITI-19); plain HTTP only
    # on loopback, e.g. behind a TLS-terminating proxy on the same host.
    tls: bool = True
    # Base of the RetrieveURLs in QIDO-RS answers (default: https://host:port as bound; set it
    # when clients reach the door under another name, e.g. when bound to 0.0.0.0).
    public_base_url: str | None = None
    # Most matches one QIDO-RS answer carries (limit/offset page through the rest).
    max_results: int = 1000


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_dicomweb_front_config(
    table: dict[str, Any], base_dir: Path | None = None
) -> DicomWebFrontConfig:
    """Validate the ``[dicomweb]`` table (``base_dir`` is unused: no paths in it)."""
    known = {"host", "port", "tls", "public_base_url", "max_results"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[dicomweb]: unknown key(s) {', '.join(sorted(unknown))}")
    host = table.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise ConfigError("dicomweb.host must be a host name or address")
    port = table.get("port", DEFAULT_PORT)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError("dicomweb.port must be a TCP port number (0 = any free port)")
    tls = table.get("tls", True)
    if not isinstance(tls, bool):
        raise ConfigError("dicomweb.tls must be true or false")
    if not tls and not _is_loopback(host):
        raise ConfigError(
            f"dicomweb.tls = false is only allowed on a loopback host (127.0.0.1, localhost), "
            f"not {host!r}: images and patient data need mutual TLS (ATNA ITI-19)"
        )
    base = table.get("public_base_url")
    if base is not None and (
        not isinstance(base, str) or not re.match(r"^https?://[^/\s]+(/\S*)?$", base)
    ):
        raise ConfigError("dicomweb.public_base_url must be an http(s) URL")
    max_results = table.get("max_results", 1000)
    if not isinstance(max_results, int) or isinstance(max_results, bool) or max_results < 1:
        raise ConfigError("dicomweb.max_results must be a positive integer")
    return DicomWebFrontConfig(
        host=host,
        port=port,
        tls=tls,
        public_base_url=base.rstrip("/") if base else None,
        max_results=max_results,
    )


# ----------------------------------------------------------------------------- errors


class DicomWebError(Exception):
    """An answer other than success: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


def _bad(message: str) -> DicomWebError:
    return DicomWebError(400, message)


def error_response(error: DicomWebError) -> Response:
    body = json.dumps({"status": error.status, "message": error.message}).encode() + b"\n"
    return Response(error.status, [("content-type", "application/json"), *error.headers], body)


def warning_header(text: str) -> tuple[str, str]:
    """An RFC 7234 Warning 299 (PS3.18 uses it for partial answers)."""
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    quoted = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in quoted)[:500]
    return ("warning", f'299 {_WARN_AGENT} "{quoted}"')


# ----------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    """What a request path names (PS3.18 10.4 / 10.6 resources)."""

    kind: Literal["search", "retrieve", "metadata", "unsupported"]
    level: Level
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    detail: str = ""


Level = Literal["STUDY", "SERIES", "IMAGE"]
_LEVEL_OF: dict[str, Level] = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}
_UNSUPPORTED_TAILS = frozenset({"rendered", "thumbnail", "frames", "bulkdata", "pixeldata"})


def _uid_segment(value: str, what: str) -> str:
    if not is_valid_uid(value):
        raise _bad(f"{what} {value[:80]!r} is not a valid UID")
    return value


def parse_route(path: str) -> Route | None:
    """The resource of a path below ``/dicomweb``; None if there is none (404).

    Raises DicomWebError(400) for a malformed UID in the path."""
    if path != PREFIX and not path.startswith(PREFIX + "/"):
        return None
    segments = [unquote(s) for s in path[len(PREFIX) :].strip("/").split("/") if s]
    if not segments:
        return None
    head = segments[0]
    if len(segments) == 1:
        level = _LEVEL_OF.get(head)
        return Route("search", level) if level else None
    if head != "studies":
        return None
    study = _uid_segment(segments[1], "StudyInstanceUID")
    rest = segments[2:]
    if not rest:
        return Route("retrieve", "STUDY", study)
    if rest[0] in _UNSUPPORTED_TAILS:
        return Route("unsupported", "STUDY", study, detail=rest[0])
    if rest == ["metadata"]:
        return Route("metadata", "STUDY", study)
    if rest in (["series"], ["instances"]):
        return Route("search", _LEVEL_OF[rest[0]], study)
    if rest[0] != "series":
        return None
    series = _uid_segment(rest[1], "SeriesInstanceUID")
    rest = rest[2:]
    if not rest:
        return Route("retrieve", "SERIES", study, series)
    if rest[0] in _UNSUPPORTED_TAILS:
        return Route("unsupported", "SERIES", study, series, detail=rest[0])
    if rest == ["metadata"]:
        return Route("metadata", "SERIES", study, series)
    if rest == ["instances"]:
        return Route("search", "IMAGE", study, series)
    if rest[0] != "instances":
        return None
    instance = _uid_segment(rest[1], "SOPInstanceUID")
    rest = rest[2:]
    if not rest:
        return Route("retrieve", "IMAGE", study, series, instance)
    if rest[0] in _UNSUPPORTED_TAILS:
        return Route("unsupported", "IMAGE", study, series, instance, detail=rest[0])
    if rest == ["metadata"]:
        return Route("metadata", "IMAGE", study, series, instance)
    return None


# ----------------------------------------------------------------------------- Accept


@dataclass(frozen=True)
class MediaRange:
    media_type: str  # lower case, e.g. "multipart/related", "*/*"
    params: tuple[tuple[str, str], ...] = ()
    q: float = 1.0

    def param(self, name: str) -> str | None:
        return next((v for k, v in self.params if k == name), None)


def _split_outside_quotes(value: str, separator: str) -> list[str]:
    items, current, quoted, escaped = [], [], False, False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            current.append(ch)
            quoted = not quoted
        elif ch == separator and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quoted:
        raise _bad("Accept: unterminated quoted string")
    items.append("".join(current))
    return items


def parse_accept(values: Iterable[str]) -> list[MediaRange]:
    """The media ranges of Accept header values (RFC 9110 12.5.1), best q first."""
    ranges: list[MediaRange] = []
    for value in values:
        for item in _split_outside_quotes(value, ","):
            if not item.strip():
                continue
            media_type, *raw_params = _split_outside_quotes(item, ";")
            media_type = media_type.strip().lower()
            if not re.fullmatch(r"[a-z0-9!#$&^_.+*-]+/[a-z0-9!#$&^_.+*-]+", media_type):
                raise _bad(f"Accept: malformed media range {media_type[:80]!r}")
            params: list[tuple[str, str]] = []
            q = 1.0
            for raw in raw_params:
                name, sep, val = raw.strip().partition("=")
                name = name.strip().lower()
                val = val.strip()
                if not sep or not name:
                    raise _bad(f"Accept: malformed parameter {raw.strip()[:80]!r}")
                if len(val) >= 2 and val[0] == val[-1] == '"':
                    val = val[1:-1].replace('\\"', '"')
                if name == "q":
                    try:
                        q = float(val)
                    except ValueError:
                        raise _bad(f"Accept: bad q value {val[:20]!r}") from None
                    if not 0 <= q <= 1:
                        raise _bad(f"Accept: q value {val[:20]!r} is outside 0..1")
                else:
                    params.append((name, val))
            ranges.append(MediaRange(media_type, tuple(params), q))
    return sorted((r for r in ranges if r.q > 0), key=lambda r: -r.q)


def _not_acceptable(offered: str) -> DicomWebError:
    return DicomWebError(406, f"none of the accepted media types can be served; offered: {offered}")


_INSTANCES_OFFERED = 'multipart/related; type="application/dicom"; transfer-syntax=<UID>|*'


def negotiate_transfer_syntaxes(accept: Sequence[str]) -> tuple[str, ...]:
    """Transfer syntaxes acceptable for instances, preferred first (WADO-RS).

    No Accept (or ``*/*``) and no transfer-syntax parameter mean Explicit VR Little Endian,
    the PS3.18 default for application/dicom; ``transfer-syntax=*`` means any, i.e. as stored.
    Raises DicomWebError 406 when nothing acceptable can be produced, 400 when malformed.
    """
    ranges = parse_accept(accept) if accept else [MediaRange("*/*")]
    chosen: list[str] = []
    for media in ranges:
        if media.media_type in ("*/*", "multipart/*"):
            syntax: str = ts.EXPLICIT_VR_LITTLE_ENDIAN
        elif media.media_type == "multipart/related":
            if (media.param("type") or "application/dicom").lower() != "application/dicom":
                continue
            syntax = media.param("transfer-syntax") or ts.EXPLICIT_VR_LITTLE_ENDIAN
        else:
            continue
        if syntax == "*":
            return ANY_TRANSFER_SYNTAX
        if not is_valid_uid(syntax):
            raise _bad(f"Accept: transfer-syntax {syntax[:80]!r} is not a UID")
        if syntax not in chosen:
            chosen.append(syntax)
    if not chosen:
        raise _not_acceptable(_INSTANCES_OFFERED)
    return tuple(chosen)


def negotiate_json(accept: Sequence[str]) -> str:
    """application/dicom+json for QIDO-RS and metadata, or 406 (e.g. only dicom+xml)."""
    if not accept:
        return DICOM_JSON
    for media in parse_accept(accept):
        if media.media_type in (DICOM_JSON, "application/json", "application/*", "*/*"):
            return DICOM_JSON
    raise _not_acceptable(DICOM_JSON)


# ----------------------------------------------------------------------------- QIDO-RS query


def _keyword(key: str) -> str:
    """The attribute keyword of a QIDO-RS query key (keyword or 8-digit tag), or 400."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        keyword = keyword_for_tag(int(key, 16))
        if not keyword:
            raise _bad(f"unknown attribute tag {key}")
        return str(keyword)
    if "." in key:
        raise _bad(f"{key[:80]}: matching on sequence attributes is not supported")
    if tag_for_keyword(key) is None:
        raise _bad(f"unknown query key {key[:80]!r}")
    return key


_PATIENT_ATTRS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
_STUDY_ATTRS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
_SERIES_ATTRS = ("SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances")
_INSTANCE_ATTRS = ("SOPInstanceUID", "SOPClassUID")

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
_RANGE_KEYS = frozenset({"StudyDate", "StudyTime", "PatientBirthDate"})
_LIST_KEYS = frozenset({"ModalitiesInStudy", "Modality"})

# Attributes QIDO-RS returns by default at each level (PS3.18 10.6, the search transaction).
_DEFAULT_RETURN = {
    "STUDY": (
        *_PATIENT_ATTRS,
        *_STUDY_ATTRS,
        "InstanceAvailability",
        "RetrieveURL",
    ),
    "SERIES": (*_SERIES_ATTRS, "StudyInstanceUID", "InstanceAvailability", "RetrieveURL"),
    "IMAGE": (
        *_INSTANCE_ATTRS,
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "InstanceAvailability",
        "RetrieveURL",
    ),
}


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
        raise _bad(f"{what}: {value[:40]!r} is not a date (YYYYMMDD)") from None


def _check_time(value: str, what: str) -> None:
    hh, mm, ss = int(value[:2]), int(value[2:4] or 0), int(value[4:6] or 0)
    if hh > 23 or mm > 59 or ss > 60:
        raise _bad(f"{what}: {value[:40]!r} is not a time (HHMMSS)")


def _check_range_value(keyword: str, value: str) -> None:
    """Single value or range (``a-b``, ``a-``, ``-b``) of a date or time, else 400."""
    pattern, check = (_TIME, _check_time) if keyword == "StudyTime" else (_DATE, _check_date)
    bounds = value.split("-")
    if len(bounds) > 2 or (len(bounds) == 2 and not (bounds[0] or bounds[1])):
        raise _bad(f"{keyword}: malformed range {value[:40]!r}")
    for bound in bounds:
        if bound:
            if not re.fullmatch(pattern, bound):
                what = "time (HHMMSS)" if keyword == "StudyTime" else "date (YYYYMMDD)"
                raise _bad(f"{keyword}: {bound[:40]!r} is not a {what}")
            check(bound, keyword)
    if len(bounds) == 2 and bounds[0] and bounds[1] and bounds[0] > bounds[1]:
        raise _bad(f"{keyword}: range {value[:40]!r} ends before it starts")


def _values(raw: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\\]", raw) if v.strip()]


def _cx_safe(value: str, what: str) -> str:
    if any(ch in value for ch in "*?\\^&~|") or not value.isprintable() or len(value) > 64:
        raise _bad(f"{what}: wildcards and the characters \\ ^ & ~ | are not supported")
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
            for item in _values(value):
                if item.lower() == "all":
                    include_all = True
                else:
                    include.add(_keyword(item))
            continue
        if lowered in ("limit", "offset"):
            if lowered in seen:
                raise _bad(f"{lowered} is given twice")
            seen.add(lowered)
            if not value.isdigit() or len(value) > 9:
                raise _bad(f"{lowered} must be a non-negative integer, not {value[:20]!r}")
            number = int(value)
            if lowered == "limit":
                if number < 1:
                    raise _bad("limit must be at least 1")
                limit = number
            else:
                offset = number
            continue
        if lowered == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise _bad("fuzzymatching must be true or false")
            fuzzy = value.lower() == "true"
            continue
        if lowered in ("accept", "charset"):
            continue  # media type negotiation is done by the caller
        keyword = _keyword(key)
        if keyword in ("PatientID", "IssuerOfPatientID"):
            if keyword in seen:
                raise _bad(f"{keyword} is given twice")
            seen.add(keyword)
            if keyword == "PatientID":
                pid = _cx_safe(value, "PatientID") if value else None
            else:
                issuer = value or None
            continue
        if not value or value == "*":
            include.add(keyword)  # a universal match is a return key
            continue
        if keyword in uids:
            if "*" in value or "?" in value:
                raise _bad(f"{keyword}: no wildcards in UIDs")
            for uid in _values(value):
                uids[keyword].append(_uid_segment(uid, keyword))
            include.add(keyword)
            continue
        if keyword not in _MATCHABLE[level]:
            raise _bad(f"matching on {keyword} is not supported at the {level.lower()} level")
        if keyword in seen:
            raise _bad(f"{keyword} is given twice")
        seen.add(keyword)
        if keyword in _RANGE_KEYS:
            _check_range_value(keyword, value)
        elif keyword == "SOPClassUID":
            _uid_segment(value, keyword)
        filters.append((keyword, value))
        include.add(keyword)
    if issuer is not None and pid is None:
        raise _bad("IssuerOfPatientID needs a PatientID")
    if issuer is not None and not re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", issuer):
        raise _bad("IssuerOfPatientID must be the OID of the patient's assigning authority")
    study_uids = tuple(dict.fromkeys(uids["StudyInstanceUID"]))
    if route.study is not None:
        if study_uids and route.study not in study_uids:
            raise _bad("StudyInstanceUID in the query contradicts the one in the path")
        study_uids = (route.study,)
    series_uids = tuple(dict.fromkeys(uids["SeriesInstanceUID"]))
    if route.series is not None:
        if series_uids and route.series not in series_uids:
            raise _bad("SeriesInstanceUID in the query contradicts the one in the path")
        series_uids = (route.series,)
    if level == "STUDY" and (series_uids or uids["SOPInstanceUID"]):
        raise _bad("series and instance UIDs cannot be matched at the study level")
    if level == "SERIES" and uids["SOPInstanceUID"]:
        raise _bad("SOPInstanceUID cannot be matched at the series level")
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


# ----------------------------------------------------------------------------- the model


@dataclass
class StudyEntity:
    """One study as the federation knows it, merged over the manifests that reference it."""

    uid: str
    header: Dataset
    modalities: tuple[str, ...]
    series: dict[str, list[InstanceRef]] = field(default_factory=dict)


def study_entities(studies: Iterable[StudyManifest]) -> list[StudyEntity]:
    entities: dict[str, StudyEntity] = {}
    for study in studies:
        for ref in study.references:
            entity = entities.get(ref.study_instance_uid)
            if entity is None:
                entity = StudyEntity(ref.study_instance_uid, study.header, study.modalities)
                entities[ref.study_instance_uid] = entity
            elif study.modalities:
                merged = dict.fromkeys((*entity.modalities, *study.modalities))
                entity.modalities = tuple(merged)
            members = entity.series.setdefault(ref.series_instance_uid, [])
            if all(r.sop_instance_uid != ref.sop_instance_uid for r in members):
                members.append(ref)
    return list(entities.values())


def _study_dataset(entity: StudyEntity, query: QidoQuery, base_url: str) -> Dataset:
    header = entity.header
    ds = Dataset()
    for keyword in (*_PATIENT_ATTRS, *_STUDY_ATTRS[1:6]):
        if keyword in header:
            element = header[keyword]  # copied: the cached manifest must stay as it is
            ds.add_new(element.tag, element.VR, element.value)
    if query.caller_patient_id:
        # Other communities' manifests carry their own patient id: answer with the caller's,
        # so that the matches stay one patient (as the DIMSE door does).
        ds.PatientID = query.caller_patient_id
        ds.IssuerOfPatientID = query.caller_issuer
    ds.StudyInstanceUID = entity.uid
    if entity.modalities:
        ds.ModalitiesInStudy = list(entity.modalities)
    ds.NumberOfStudyRelatedSeries = len(entity.series)
    ds.NumberOfStudyRelatedInstances = sum(len(v) for v in entity.series.values())
    ds.InstanceAvailability = "ONLINE"
    ds.RetrieveURL = f"{base_url}{PREFIX}/studies/{entity.uid}"
    return ds


def _copy(ds: Dataset) -> Dataset:
    """A dataset with new elements (setting a value on a shared element changes both)."""
    out = Dataset()
    for element in ds:
        out.add_new(element.tag, element.VR, element.value)
    return out


def _series_modality(entity: StudyEntity) -> str | None:
    # A DocumentEntry lists the study's modalities, not each series': exact only when single.
    return entity.modalities[0] if len(entity.modalities) == 1 else None


def _matches(keyword: str, pattern: str, ds: Dataset, entity: StudyEntity) -> bool:
    if keyword == "Modality" and "Modality" not in ds:
        # Series modality unknown (a multi-modality study): answer the series of a study that
        # has the modality rather than hide images; the client sees Modality absent.
        return any(v.upper() in entity.modalities for v in _values(pattern))
    element = ds.get(keyword)
    if element is None or element == "":
        return False
    if keyword in _LIST_KEYS:
        have = {str(v).upper() for v in ([element] if isinstance(element, str) else element)}
        return any(v.upper() in have for v in _values(pattern))
    value = str(element)
    if keyword in _RANGE_KEYS:
        low, dash, high = pattern.partition("-")
        if not dash:
            return value[: len(pattern)] == pattern if keyword == "StudyTime" else value == pattern
        return (not low or value >= low) and (not high or value[: len(high)] <= high)
    if keyword == "PatientName":
        value, pattern = value.upper(), pattern.upper()
    if "*" in pattern or "?" in pattern:
        regex = "".join(
            ".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern
        )
        return re.fullmatch(regex, value, re.DOTALL) is not None
    return value == pattern


def _project(ds: Dataset, query: QidoQuery, extra: Sequence[str]) -> Dataset:
    """The attributes to return: defaults of the level, what was matched or included."""
    if query.include_all:
        return ds
    wanted = {*_DEFAULT_RETURN[query.level], *extra, *query.include}
    out = Dataset()
    for element in ds:
        if element.keyword in wanted:
            out.add(element)
    for keyword in sorted(wanted - {e.keyword for e in ds}):
        tag = tag_for_keyword(keyword)
        if keyword in query.include and tag is not None:
            # Asked for but unknown to the manifests: present with no Value (PS3.18 Annex F).
            vr = str(dictionary_VR(tag))
            if " or " not in vr:
                out.add_new(tag, vr, [] if vr == "SQ" else None)
    return out


@dataclass
class SearchResult:
    matches: list[Dataset]
    remaining: int  # matches beyond this page


def search(query: QidoQuery, studies: Iterable[StudyManifest], base_url: str) -> SearchResult:
    """Match ``query`` against the manifests' studies; newest study first, then manifest order."""
    entities = [
        e for e in study_entities(studies) if not query.study_uids or e.uid in query.study_uids
    ]
    entities.sort(
        key=lambda e: (str(e.header.get("StudyDate", "")), str(e.header.get("StudyTime", ""))),
        reverse=True,
    )
    found: list[Dataset] = []
    for entity in entities:
        study = _study_dataset(entity, query, base_url)
        if query.level == "STUDY":
            if all(_matches(k, p, study, entity) for k, p in query.filters):
                found.append(_project(study, query, ()))
            continue
        study_extra = () if query.study_in_path else (*_PATIENT_ATTRS, *_STUDY_ATTRS)
        modality = _series_modality(entity)
        for series_uid, refs in entity.series.items():
            if query.series_uids and series_uid not in query.series_uids:
                continue
            series = _copy(study)
            series.SeriesInstanceUID = series_uid
            if modality:
                series.Modality = modality
            series.NumberOfSeriesRelatedInstances = len(refs)
            series_url = f"{study.RetrieveURL}/series/{series_uid}"
            series.RetrieveURL = series_url
            if query.level == "SERIES":
                if all(_matches(k, p, series, entity) for k, p in query.filters):
                    found.append(_project(series, query, study_extra))
                continue
            series_extra = () if query.series_in_path else _SERIES_ATTRS
            for ref in refs:
                if query.sop_uids and ref.sop_instance_uid not in query.sop_uids:
                    continue
                instance = _copy(series)
                instance.SOPClassUID = ref.sop_class_uid
                instance.SOPInstanceUID = ref.sop_instance_uid
                instance.RetrieveURL = f"{series_url}/instances/{ref.sop_instance_uid}"
                if all(_matches(k, p, instance, entity) for k, p in query.filters):
                    found.append(_project(instance, query, (*study_extra, *series_extra)))
    page_end = query.offset + (query.limit if query.limit is not None else len(found))
    return SearchResult(found[query.offset : page_end], max(0, len(found) - page_end))


def to_dicom_json(ds: Dataset, *, suppress_invalid: bool = False) -> dict[str, Any]:
    """The PS3.18 Annex F JSON model of ``ds``: tag keys, vr, Value (PN as Alphabetic...).

    ``suppress_invalid`` leaves out values that cannot be converted (instance headers come
    from sources we do not control) instead of failing the whole answer."""
    result: dict[str, Any] = ds.to_json_dict(
        bulk_data_threshold=1 << 62, suppress_invalid_tags=suppress_invalid
    )
    return dict(sorted(result.items()))  # ascending tags, as the examples in PS3.18 F show


def _drop_bulk(ds: Dataset, limit: int) -> None:
    """Remove pixel data and binary values above ``limit`` bytes (recursively)."""
    for element in list(ds):
        if element.VR == "SQ":
            for item in element.value or []:
                _drop_bulk(item, limit)
        elif element.tag in (0x7FE00010, 0x7FE00008, 0x7FE00009) or (
            element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN")
            and element.value is not None
            and len(element.value) > limit
        ):
            del ds[element.tag]


def metadata_json(ds: Dataset, inline_limit: int = METADATA_INLINE_LIMIT) -> dict[str, Any]:
    """An instance's metadata (WADO-RS /metadata): every attribute but bulk data."""
    _drop_bulk(ds, inline_limit)
    return to_dicom_json(ds, suppress_invalid=True)


# ----------------------------------------------------------------------------- multipart


def part_header(boundary: str, content_type: str, *, first: bool) -> bytes:
    lead = "" if first else "\r\n"
    return f"{lead}--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("ascii")


def closing_delimiter(boundary: str, *, empty: bool) -> bytes:
    lead = "" if empty else "\r\n"
    return f"{lead}--{boundary}--\r\n".encode("ascii")


# ----------------------------------------------------------------------------- audit


def qido_audit(
    ctx: m.AuditContext,
    *,
    requester: m.Node,
    responder: m.Node,
    target: str,
    patient_id: str | None,
    outcome: m.EventOutcome,
    outcome_description: str | None = None,
) -> m.AuditMessage:
    """QIDO-RS as a Query (110112, E): the requester is the Source, we the Destination; the
    request target (path and query) is the ParticipantObjectQuery."""
    objects = [m.patient_object(patient_id)] if patient_id else []
    objects.append(
        m.query_object(
            QIDO_RS_QUERY,
            target.partition("?")[0],
            target.encode("utf-8"),
            [(m.DETAIL_QUERY_ENCODING, b"UTF-8")],
        )
    )
    return m.AuditMessage(
        event=m.EventIdentification(
            event_id=m.EventId.QUERY,
            action="E",
            outcome=outcome,
            date_time=datetime.now(UTC),
            type_codes=(QIDO_RS_QUERY,),
            outcome_description=outcome_description,
        ),
        participants=(
            m.system_participant(requester, m.RoleId.SOURCE, True),
            m.system_participant(responder, m.RoleId.DESTINATION, False),
        ),
        source=ctx.audit_source,
        objects=tuple(objects),
    )


def wado_audit(
    ctx: m.AuditContext,
    *,
    requester: m.Node,
    responder: m.Node,
    study_uid: str,
    delivered: Sequence[m.ImagingInstanceReference],
    failed: Sequence[m.ImagingInstanceReference],
    patient_ids: Sequence[str],
    failure_outcome: m.EventOutcome = m.EventOutcome.SERIOUS_FAILURE,
    outcome_description: str | None = None,
) -> list[m.AuditMessage]:
    """WADO-RS as "DICOM Instances Transferred" (110104, R): we are the Source, the requester
    the Destination. One message for what was delivered, one for what failed (DICOM A.5.2)."""
    groups: list[tuple[m.EventOutcome, Sequence[m.ImagingInstanceReference]]] = []
    if delivered:
        groups.append((m.EventOutcome.SUCCESS, delivered))
    if failed or not delivered:
        groups.append((failure_outcome, failed))
    return [
        m.instances_transferred(
            ctx,
            source=responder,
            destination=requester,
            study_uid=study_uid,
            instances=group,
            patient_ids=patient_ids,
            outcome=outcome,
            outcome_description=outcome_description if outcome else None,
            type_code=WADO_RS_RETRIEVE,
        )
        for outcome, group in groups
    ]


# ----------------------------------------------------------------------------- I/O


class _InstanceError(Exception):
    """An instance from the federation that cannot be sent as it is (not Part 10, cut)."""


@dataclass
class _Delivery:
    delivered: list[str] = field(default_factory=list)


class DicomWebFrontDoor:
    """The HTTP(S) server of the DICOMweb front door for ``gateway``."""

    def __init__(
        self,
        gateway: Gateway,
        config: DicomWebFrontConfig,
        *,
        on_handshake_failure: Callable[[HandshakeFailure], None] | None = None,
    ) -> None:
        self.gateway = gateway
        self.config = config
        self.local_authority = gateway.config.community.patient_id_assigning_authority
        self.view = FederationView(gateway)
        server = gateway.config.server
        self.server = HttpServer(
            self,
            ssl_context=server_context(gateway.config.tls) if config.tls else None,
            on_handshake_failure=on_handshake_failure,
            timeouts=ServerTimeouts(
                handshake=gateway.config.tls.handshake_timeout,
                header=server.header_timeout,
                body=server.body_timeout,
                keepalive=server.keepalive_timeout,
                handler=server.handler_timeout,
                min_body_rate=server.min_body_rate,
                body_grace=server.body_grace,
            ),
            max_connections=server.max_connections,
            max_header_bytes=gateway.config.limits.max_header_bytes,
        )
        self._started = False
        self._closing: set[asyncio.Future[None]] = set()

    @property
    def port(self) -> int:
        return self.server.port if self._started else self.config.port

    @property
    def base_url(self) -> str:
        """Where the door is reached (the service root is this plus ``/dicomweb``)."""
        if self.config.public_base_url:
            return self.config.public_base_url
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"{self.server.scheme}://{host}:{self.port}"

    async def start(self) -> None:
        await self.server.start(self.config.host, self.config.port)
        self._started = True
        log.info("DICOMweb front door on %s%s", self.base_url, PREFIX)

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self.server.close()

    # -- HTTP

    async def __call__(self, request: Request) -> Response:
        started = time.monotonic()
        transaction = "DICOMweb"
        try:
            try:
                await request.read(_MAX_REQUEST_BODY)  # GET has none; lets keep-alive go on
            except BodyTooLarge:
                raise DicomWebError(413, "request bodies are not accepted here") from None
            route = parse_route(request.path)
            if route is None:
                raise DicomWebError(404, f"no DICOMweb resource at {request.path[:200]}")
            transaction = "QIDO-RS" if route.kind == "search" else "WADO-RS"
            if request.method != "GET":
                raise DicomWebError(
                    405,
                    f"{request.method[:20]} is not supported (QIDO-RS and WADO-RS only)",
                    [("allow", "GET")],
                )
            if route.kind == "unsupported":
                raise DicomWebError(
                    406,
                    f"{route.detail} resources are not served: only DICOM instances "
                    f'(multipart/related; type="application/dicom") and metadata '
                    f"({DICOM_JSON})",
                )
            if route.kind == "search":
                response = await self._search(request, route)
            else:
                response = await self._retrieve(request, route)
        except DicomWebError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("DICOMweb request %s failed", request.path[:200])
            response = error_response(DicomWebError(500, "internal error"))
        metrics = self.gateway.metrics
        outcome = (
            "success"
            if response.status == 200
            else "partial"
            if response.status == 206
            else "failure"
        )
        metrics.requests.labels(transaction, outcome).inc()
        metrics.latency.labels(transaction).observe(time.monotonic() - started)
        return response

    def _pairs(self, request: Request) -> list[tuple[str, str]]:
        try:
            return parse_qsl(
                request.query, keep_blank_values=True, max_num_fields=_MAX_QUERY_FIELDS
            )
        except ValueError:
            raise _bad(f"too many query parameters (at most {_MAX_QUERY_FIELDS})") from None

    def _accept(self, request: Request, pairs: Sequence[tuple[str, str]]) -> list[str]:
        # PS3.18: an "accept" query parameter takes precedence over the Accept header.
        from_query = [v for k, v in pairs if k.lower() == "accept"]
        if from_query:
            return from_query
        return [v for k, v in request.headers if k == "accept"]

    async def _studies(
        self, patient_id: str | None, study_uids: Sequence[str]
    ) -> tuple[list[StudyManifest], list[str]]:
        """The studies to answer from, and warnings: from the federation when a patient is
        named, else from those found before (400 if there are none)."""
        if patient_id is not None:
            try:
                found = await self.view.studies_of_patient(patient_id)
            except FederationError as exc:
                raise DicomWebError(504 if exc.timeout else 502, exc.message) from None
            return found.studies, found.warnings
        if not study_uids:
            raise _bad("a PatientID is required: XDS queries are per patient")
        known = self.view.cached(study_uids)
        if not known:
            raise _bad(
                f"study {study_uids[0]} is not known to this gateway: a PatientID is required "
                "(XDS queries are per patient); search for the patient's studies first "
                "(QIDO-RS with PatientID) or add PatientID to the request"
            )
        return known, []

    # -- QIDO-RS

    async def _search(self, request: Request, route: Route) -> Response:
        patient: str | None = None
        try:
            pairs = self._pairs(request)
            negotiate_json(self._accept(request, pairs))
            query = parse_qido(
                route,
                pairs,
                local_authority=self.local_authority,
                max_results=self.config.max_results,
            )
            patient = query.patient_id
            studies, warnings = await self._studies(query.patient_id, query.study_uids)
            result = search(query, studies, self.base_url)
        except DicomWebError as exc:
            _audit_query(
                self,
                request,
                patient,
                m.EventOutcome.MINOR_FAILURE
                if exc.status < 500
                else m.EventOutcome.SERIOUS_FAILURE,
                exc.message,
            )
            raise
        headers = [("content-type", DICOM_JSON)]
        if query.fuzzy:
            headers.append(
                warning_header(
                    "The fuzzymatching parameter is not supported. "
                    "Only literal matching has been performed."
                )
            )
        if result.remaining:
            headers.append(
                warning_header(
                    f"There are {result.remaining} additional results that can be requested"
                )
            )
        headers.extend(warning_header(w) for w in warnings[:10])
        body = json.dumps([to_dicom_json(ds) for ds in result.matches], separators=(",", ":"))
        _audit_query(
            self,
            request,
            patient,
            m.EventOutcome.MINOR_FAILURE if warnings else m.EventOutcome.SUCCESS,
            "; ".join(warnings)[:1000] or None,
        )
        return Response(200, headers, body.encode("utf-8"))

    # -- WADO-RS

    async def _retrieve(self, request: Request, route: Route) -> Response:
        assert route.study is not None
        pairs = self._pairs(request)
        pid: str | None = None
        issuer: str | None = None
        for key, value in pairs:
            if key in ("PatientID", "00100020"):
                pid = _cx_safe(value.strip(), "PatientID") or None
            elif key in ("IssuerOfPatientID", "00100021"):
                issuer = value.strip() or None
            elif key.lower() not in ("accept", "charset"):
                raise _bad(f"unsupported query parameter {key[:80]!r} for a retrieve")
        if issuer is not None and not re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", issuer):
            raise _bad("IssuerOfPatientID must be the OID of the patient's assigning authority")
        accept = self._accept(request, pairs)
        metadata = route.kind == "metadata"
        # Metadata: whatever is stored (no transcoding just to read a header).
        syntaxes: tuple[str, ...] = ANY_TRANSFER_SYNTAX
        if metadata:
            negotiate_json(accept)
        else:
            syntaxes = negotiate_transfer_syntaxes(accept)
        patient = patient_cx(pid, issuer, self.local_authority) if pid else None
        audit = _RetrieveAudit(self, request, route.study, [patient] if patient else [])
        try:
            studies, _ = await self._studies(patient, [route.study])
            matching = [s for s in studies if route.study in s.study_instance_uids]
            if not matching:
                raise DicomWebError(404, f"study {route.study} not found for this patient")
            if not patient:
                audit.patients = [p for s in matching if (p := header_patient_id(s.header))]
            refs = [
                r
                for s in matching
                for r in s.references
                if r.study_instance_uid == route.study
                and (route.series is None or r.series_instance_uid == route.series)
                and (route.instance is None or r.sop_instance_uid == route.instance)
            ]
            if not refs:
                what = f"instance {route.instance}" if route.instance else f"series {route.series}"
                raise DicomWebError(404, f"{what} not found in study {route.study}")
            try:
                imaging = imaging_request_for(
                    matching, {r.sop_instance_uid for r in refs}, syntaxes
                )
            except ConsumerError as exc:
                raise DicomWebError(502, f"unusable manifest: {exc}") from None
            audit.describe(imaging.documents, refs)
            try:
                retrieval = await self.view.retrieve(imaging)
            except FederationError as exc:
                raise DicomWebError(504 if exc.timeout else 502, exc.message) from None
        except DicomWebError as exc:
            audit.failed_before_streaming(exc)
            raise
        if not retrieval.instances:
            await retrieval.aclose()
            error = retrieve_failure(retrieval.errors)
            audit.failed_before_streaming(error)
            raise error
        headers: list[tuple[str, str]] = []
        missing = retrieval.missing
        if missing:
            first = retrieval.errors[0].code_context if retrieval.errors else "not returned"
            headers.append(
                warning_header(
                    f"{len(missing)} of {len(imaging.documents)} instances could not be "
                    f"retrieved: {first}"
                )
            )
        delivery = _Delivery()
        body: AsyncIterator[bytes]
        if metadata:
            headers.insert(0, ("content-type", DICOM_JSON))
            body = self._metadata_body(retrieval, delivery)
        else:
            boundary = uuid.uuid4().hex
            headers.insert(
                0,
                (
                    "content-type",
                    f'multipart/related; type="application/dicom"; boundary={boundary}',
                ),
            )
            body = self._multipart_body(retrieval, boundary, delivery)

        def complete(ok: bool) -> None:
            audit.completed(ok, delivery.delivered, missing)
            # A body the server never started has not closed the retrieval's sources.
            task = asyncio.ensure_future(retrieval.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

        return Response(206 if missing else 200, headers, body, on_complete=complete)

    async def _multipart_body(
        self, retrieval: ImagingRetrieval, boundary: str, delivery: _Delivery
    ) -> AsyncIterator[bytes]:
        """Each instance as one part, in arrival order, its header written once the file meta
        told its transfer syntax. A broken instance raises: the server then resets the
        connection, so a client never mistakes a cut study for a complete one."""
        try:
            for index, uid in enumerate(retrieval.uids):
                chunks = retrieval.take(index)
                try:
                    prefix = bytearray()
                    syntax: str | None = None
                    async for chunk in chunks:
                        if syntax is not None:
                            yield chunk
                            continue
                        prefix += chunk
                        try:
                            syntax = ts.sniff_transfer_syntax(bytes(prefix))
                        except ts.NeedMoreData:
                            if len(prefix) > ts.META_SNIFF_LIMIT + 4096:
                                raise _InstanceError(f"instance {uid}: no file meta") from None
                            continue
                        except ts.TranscodeError as exc:
                            raise _InstanceError(f"instance {uid}: {exc}") from None
                        content_type = f"application/dicom; transfer-syntax={syntax}"
                        yield part_header(boundary, content_type, first=index == 0)
                        yield bytes(prefix)
                        prefix = bytearray()
                    if syntax is None:
                        raise _InstanceError(f"instance {uid}: cut before its file meta ended")
                finally:
                    await close_body(chunks)
                delivery.delivered.append(uid)
            yield closing_delimiter(boundary, empty=not retrieval.uids)
        finally:
            await retrieval.aclose()

    async def _metadata_body(
        self, retrieval: ImagingRetrieval, delivery: _Delivery
    ) -> AsyncIterator[bytes]:
        """A JSON array, one instance's metadata at a time (each read through a spool)."""
        try:
            yield b"["
            for index, uid in enumerate(retrieval.uids):
                chunks = retrieval.take(index)
                try:
                    ds = await self._read_header(chunks, uid)
                finally:
                    await close_body(chunks)
                item = json.dumps(metadata_json(ds), separators=(",", ":")).encode("utf-8")
                yield (b"," if index else b"") + item
                delivery.delivered.append(uid)
            yield b"]"
        finally:
            await retrieval.aclose()

    async def _read_header(self, chunks: AsyncIterator[bytes], uid: str) -> Dataset:
        spool_dir = self.gateway.config.limits.spool_dir
        with tempfile.SpooledTemporaryFile(
            max_size=_HEADER_SPOOL_MEMORY, dir=str(spool_dir) if spool_dir else None
        ) as spool:
            size = 0
            async for chunk in chunks:
                size += len(chunk)
                if size > _HEADER_SPOOL_MEMORY:
                    await asyncio.to_thread(spool.write, chunk)  # on disk by now
                else:
                    spool.write(chunk)
            return await asyncio.to_thread(_parse_header, spool, uid)


def _parse_header(spool: IO[bytes], uid: str) -> Dataset:
    spool.seek(0)
    try:
        ds = dcmread(spool, stop_before_pixels=True)
        for _element in ds.iterall():  # decode now: a bad element must fail here
            pass
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise _InstanceError(f"instance {uid} is not valid DICOM: {exc}") from None
    if str(ds.get("SOPInstanceUID", "")) != uid:
        raise _InstanceError(f"instance {uid}: the source sent {ds.get('SOPInstanceUID')}")
    return ds


def retrieve_failure(errors: Sequence[RegistryError]) -> DicomWebError:
    """The answer to a retrieve of which nothing came back, from the RAD-69 errors."""
    detail = "; ".join(f"{e.error_code}: {e.code_context}" for e in errors)[:500] or "no reason"
    if errors and all(ts.TRANSFER_SYNTAX_ERROR in e.code_context for e in errors):
        return DicomWebError(
            406, f"no instance is available in an accepted transfer syntax: {detail}"
        )
    if errors and all(e.error_code == "XDSDocumentUniqueIdError" for e in errors):
        return DicomWebError(404, f"the imaging source does not hold the instances: {detail}")
    if any("no answer within" in e.code_context for e in errors):
        return DicomWebError(504, f"the federation did not answer in time: {detail}")
    return DicomWebError(502, f"the federation could not retrieve the instances: {detail}")


class _RetrieveAudit:
    """The audit record(s) of one WADO-RS request, written when it ends."""

    def __init__(
        self, door: DicomWebFrontDoor, request: Request, study_uid: str, patients: list[str]
    ) -> None:
        self.door = door
        self.request = request
        self.study_uid = study_uid
        self.patients = patients
        self.references: dict[str, m.ImagingInstanceReference] = {}

    def describe(self, documents: Sequence[Any], refs: Sequence[InstanceRef]) -> None:
        classes = {r.sop_instance_uid: r.sop_class_uid for r in refs}
        for doc in documents:
            self.references[doc.document_unique_id] = m.ImagingInstanceReference(
                study_instance_uid=doc.study_instance_uid,
                series_instance_uid=doc.series_instance_uid,
                sop_instance_uid=doc.document_unique_id,
                sop_class_uid=classes.get(doc.document_unique_id),
                repository_unique_id=doc.repository_unique_id,
                home_community_id=doc.home_community_id,
            )

    def failed_before_streaming(self, error: DicomWebError) -> None:
        self._record(
            [],
            list(self.references),
            error.message,
            m.EventOutcome.MINOR_FAILURE if error.status < 500 else m.EventOutcome.SERIOUS_FAILURE,
        )

    def completed(self, ok: bool, delivered: list[str], missing: list[str]) -> None:
        sent = set(delivered)
        failed = [uid for uid in self.references if uid not in sent]
        description = None
        if not ok:
            description = "response aborted before every instance was sent"
        elif missing:
            description = f"{len(missing)} instance(s) not returned by the federation"
        self._record(delivered, failed, description, m.EventOutcome.SERIOUS_FAILURE)

    def _record(
        self,
        delivered: Sequence[str],
        failed: Sequence[str],
        description: str | None,
        failure_outcome: m.EventOutcome,
    ) -> None:
        trail = self.door.gateway.audit
        if not trail.config.enabled:
            return
        try:

            def refs(uids: Iterable[str]) -> list[m.ImagingInstanceReference]:
                return [self.references[u] for u in uids if u in self.references]

            trail.record(
                wado_audit(
                    trail.context,
                    requester=_requester(self.request),
                    responder=trail.local_node(self.door.base_url + self.request.path),
                    study_uid=self.study_uid,
                    delivered=refs(delivered),
                    failed=refs(failed),
                    patient_ids=self.patients,
                    failure_outcome=failure_outcome,
                    outcome_description=description,
                )
            )
        except Exception:  # an audit failure must not touch the transaction
            log.exception("building the WADO-RS audit record failed")


def _requester(request: Request) -> m.Node:
    peer = request.peer
    subject = peer.certificate.subject if peer.certificate is not None else None
    return m.remote_node(peer.address, certificate_subject=subject)


def _audit_query(
    door: DicomWebFrontDoor,
    request: Request,
    patient: str | None,
    outcome: m.EventOutcome,
    description: str | None,
) -> None:
    trail = door.gateway.audit
    if not trail.config.enabled:
        return
    try:
        trail.record(
            qido_audit(
                trail.context,
                requester=_requester(request),
                responder=trail.local_node(door.base_url + request.path),
                target=request.target,
                patient_id=patient,
                outcome=outcome,
                outcome_description=description,
            )
        )
    except Exception:
        log.exception("building the QIDO-RS audit record failed")
