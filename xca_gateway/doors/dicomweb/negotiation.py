"""The HTTP side of the DICOMweb front door, sans I/O: errors, routes and content negotiation.

A request path becomes a :class:`Route` (the PS3.18 resource it names), Accept header values
become media ranges and then what to answer (application/dicom+json, or instances in the
transfer syntaxes asked for); anything else is a :class:`DicomWebError` carrying the HTTP
status and message, turned into a response by :func:`error_response`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from xca_gateway.imaging import transfer_syntax as ts
from xca_gateway.protocol.http_server import Response
from xca_gateway.xds.ebrs import RegistryError
from xca_gateway.xds.kos import is_valid_uid

PREFIX = "/dicomweb"
DICOM_JSON = "application/dicom+json"
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
_WARN_AGENT = "xca-gateway"


# ----------------------------------------------------------------------------- errors


class DicomWebError(Exception):
    """An answer other than success: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


def bad_request(message: str) -> DicomWebError:
    return DicomWebError(400, message)


def error_response(error: DicomWebError) -> Response:
    body = json.dumps({"status": error.status, "message": error.message}).encode() + b"\n"
    return Response(error.status, [("content-type", "application/json"), *error.headers], body)


def warning_header(text: str) -> tuple[str, str]:
    """An RFC 7234 Warning 299 (PS3.18 uses it for partial answers)."""
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    quoted = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in quoted)[:500]
    return ("warning", f'299 {_WARN_AGENT} "{quoted}"')


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


# ----------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    """What a request path names (PS3.18 10.4 / 10.6 resources).

    ``rendered`` and ``thumbnail`` routes of an instance may name ``frames`` (1-based, in the
    order asked)."""

    kind: Literal["search", "retrieve", "metadata", "rendered", "thumbnail", "unsupported"]
    level: Level
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    detail: str = ""
    frames: tuple[int, ...] = ()


Level = Literal["STUDY", "SERIES", "IMAGE"]
_LEVEL_OF: dict[str, Level] = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}
# Bulk data (frames as octet streams, bulkdata URIs) is not served: instances and renderings are.
_UNSUPPORTED_TAILS = frozenset({"frames", "bulkdata", "pixeldata"})
_MAX_FRAMES_LISTED = 1000


def uid_segment(value: str, what: str) -> str:
    if not is_valid_uid(value):
        raise bad_request(f"{what} {value[:80]!r} is not a valid UID")
    return value


def frame_list(value: str) -> tuple[int, ...]:
    """A PS3.18 frame list ("1,3,5"): positive integers, each once, in the order asked."""
    frames: list[int] = []
    for item in value.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1 or len(item) > 9:
            raise bad_request(f"frame number {item[:20]!r} is not a positive integer")
        if int(item) not in frames:
            frames.append(int(item))
    if len(frames) > _MAX_FRAMES_LISTED:
        raise bad_request(f"at most {_MAX_FRAMES_LISTED} frames per request")
    return tuple(frames)


def _tail(
    rest: list[str],
    level: Level,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> Route | None:
    """The resource below a study, series or instance: metadata, rendered, thumbnail..."""
    head = rest[0]
    if rest in (["rendered"], ["thumbnail"]):
        return Route(head, level, study, series, instance)  # type: ignore[arg-type]
    if rest == ["metadata"]:
        return Route("metadata", level, study, series, instance)
    if (
        head == "frames"
        and instance is not None
        and len(rest) == 3
        and rest[2]
        in (
            "rendered",
            "thumbnail",
        )
    ):
        frames = frame_list(rest[1])
        return Route(rest[2], level, study, series, instance, frames=frames)  # type: ignore[arg-type]
    if head in _UNSUPPORTED_TAILS:
        return Route("unsupported", level, study, series, instance, detail=head)
    return None


def parse_route(path: str) -> Route | None:
    """The resource of a path below ``/dicomweb``; None if there is none (404).

    Raises DicomWebError(400) for a malformed UID or frame list in the path."""
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
    study = uid_segment(segments[1], "StudyInstanceUID")
    rest = segments[2:]
    if not rest:
        return Route("retrieve", "STUDY", study)
    if rest in (["series"], ["instances"]):
        return Route("search", _LEVEL_OF[rest[0]], study)
    if rest[0] != "series":
        return _tail(rest, "STUDY", study)
    if len(rest) < 2:
        return None
    series = uid_segment(rest[1], "SeriesInstanceUID")
    rest = rest[2:]
    if not rest:
        return Route("retrieve", "SERIES", study, series)
    if rest == ["instances"]:
        return Route("search", "IMAGE", study, series)
    if rest[0] != "instances":
        return _tail(rest, "SERIES", study, series)
    if len(rest) < 2:
        return None
    instance = uid_segment(rest[1], "SOPInstanceUID")
    rest = rest[2:]
    if not rest:
        return Route("retrieve", "IMAGE", study, series, instance)
    return _tail(rest, "IMAGE", study, series, instance)


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
        raise bad_request("Accept: unterminated quoted string")
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
                raise bad_request(f"Accept: malformed media range {media_type[:80]!r}")
            params: list[tuple[str, str]] = []
            q = 1.0
            for raw in raw_params:
                name, sep, val = raw.strip().partition("=")
                name = name.strip().lower()
                val = val.strip()
                if not sep or not name:
                    raise bad_request(f"Accept: malformed parameter {raw.strip()[:80]!r}")
                if len(val) >= 2 and val[0] == val[-1] == '"':
                    val = val[1:-1].replace('\\"', '"')
                if name == "q":
                    try:
                        q = float(val)
                    except ValueError:
                        raise bad_request(f"Accept: bad q value {val[:20]!r}") from None
                    if not 0 <= q <= 1:
                        raise bad_request(f"Accept: q value {val[:20]!r} is outside 0..1")
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
            raise bad_request(f"Accept: transfer-syntax {syntax[:80]!r} is not a UID")
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
