"""Rendered and thumbnail resources, sans I/O: parameters, media types, what to fetch.

PS3.18 10.4 (Retrieve transaction, rendered resources) and 8.3.5 (rendered query parameters):
``window=center,width,function``, ``viewport=vw,vh[,sx,sy,sw,sh]``, ``quality``, ``annotation``
(not supported: the answer says so in a Warning), and for thumbnails only ``viewport``. The
media type comes from Accept (or the ``accept`` query parameter): ``image/png`` (lossless, the
default here: a clinician's first look must not be a lossy one) or ``image/jpeg``.

Study and series rendered resources answer every frame of every image instance as
``multipart/related; type="image/png"`` (or jpeg); an instance or frame list with one frame
answers the single image; a thumbnail is always one image, chosen by :func:`thumbnail_instance`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from xca_gateway.doors.dicomweb.negotiation import (
    DicomWebError,
    Route,
    bad_request,
    parse_accept,
)
from xca_gateway.imaging.rendering import (
    JPEG,
    MAX_VIEWPORT,
    PNG,
    MediaType,
    RenderOptions,
    Viewport,
    Window,
    WindowFunction,
    is_image_sop_class,
)
from xca_gateway.xds.kos import InstanceRef

THUMBNAIL_SIZE = 128
_OFFERED = f"{PNG}, {JPEG}"
_FUNCTIONS: dict[str, WindowFunction] = {
    "linear": "linear",
    "linear-exact": "linear-exact",
    "sigmoid": "sigmoid",
}
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
# Parameters that identify the patient (the door's extension), read by the door itself.
PATIENT_KEYS = frozenset({"PatientID", "00100020", "IssuerOfPatientID", "00100021"})


@dataclass(frozen=True)
class RenderRequest:
    options: RenderOptions
    warnings: list[str] = field(default_factory=list)


def negotiate_rendered(accept: Sequence[str]) -> MediaType:
    """image/png unless image/jpeg is preferred; 406 when neither is acceptable."""
    if not accept:
        return PNG
    for media in parse_accept(accept):
        if media.media_type in (PNG, "image/*", "*/*"):
            return PNG
        if media.media_type == JPEG:
            return JPEG
    raise DicomWebError(
        406, f"none of the accepted media types can be rendered; offered: {_OFFERED}"
    )


def _number(text: str, what: str) -> float:
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        raise bad_request(f"{what}: {text[:20]!r} is not a number")
    return float(text)


def parse_window(value: str) -> Window:
    """``center,width,function`` (PS3.18 8.3.5.1.4); function linear, linear-exact or sigmoid."""
    parts = value.split(",")
    if len(parts) not in (2, 3):
        raise bad_request("window must be center,width,function")
    center = _number(parts[0], "window center")
    width = _number(parts[1], "window width")
    function = parts[2].strip().lower() if len(parts) == 3 else "linear"
    if function not in _FUNCTIONS:
        raise bad_request(
            f"window function {function[:20]!r} is not one of linear, linear-exact, sigmoid"
        )
    if width <= 0 or (function == "linear" and width < 1):
        raise bad_request("window width must be positive (at least 1 for linear)")
    if abs(center) > 1e9 or width > 1e9:
        raise bad_request("window center or width out of range")
    return Window(center, width, _FUNCTIONS[function])


def parse_viewport(value: str) -> Viewport:
    """``vw,vh`` or ``vw,vh,sx,sy,sw,sh`` (PS3.18 8.3.5.1.3); sx..sh may be empty (whole)."""
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 6):
        raise bad_request("viewport must be vw,vh or vw,vh,sx,sy,sw,sh")

    def integer(text: str, what: str, *, signed: bool = False) -> int:
        if not re.fullmatch(r"-?\d{1,6}" if signed else r"\d{1,6}", text):
            raise bad_request(f"viewport {what}: {text[:20]!r} is not an integer")
        return int(text)

    vw, vh = integer(parts[0], "vw"), integer(parts[1], "vh")
    if not (1 <= vw <= MAX_VIEWPORT and 1 <= vh <= MAX_VIEWPORT):
        raise bad_request(f"viewport vw and vh must be within 1..{MAX_VIEWPORT}")
    if len(parts) == 2:
        return Viewport(vw, vh)
    sx = integer(parts[2], "sx") if parts[2] else 0
    sy = integer(parts[3], "sy") if parts[3] else 0
    sw = integer(parts[4], "sw", signed=True) if parts[4] else None
    sh = integer(parts[5], "sh", signed=True) if parts[5] else None
    return Viewport(vw, vh, sx, sy, sw, sh)


def parse_rendered(
    route: Route, pairs: Sequence[tuple[str, str]], accept: Sequence[str]
) -> RenderRequest:
    """The rendering asked for by a rendered or thumbnail request's query (patient keys aside).

    Raises DicomWebError 400 for a malformed or unknown parameter, 406 for a media type."""
    media_type = negotiate_rendered(accept)
    thumbnail = route.kind == "thumbnail"
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int | None = None
    warnings: list[str] = []
    seen: set[str] = set()
    for key, value in pairs:
        if key in PATIENT_KEYS or key.lower() in ("accept", "charset"):
            continue
        if key in seen:
            raise bad_request(f"{key[:40]} is given more than once")
        seen.add(key)
        if key == "viewport":
            viewport = parse_viewport(value)
        elif thumbnail:
            raise bad_request(f"unsupported query parameter {key[:80]!r} for a thumbnail")
        elif key == "window":
            window = parse_window(value)
        elif key == "quality":
            if not re.fullmatch(r"\d{1,3}", value.strip()) or not 1 <= int(value) <= 100:
                raise bad_request("quality must be an integer within 1..100")
            quality = int(value)
        elif key == "annotation":
            warnings.append("The annotation parameter is not supported: no annotation is burnt in")
        elif key == "iccprofile":
            if value.strip().lower() != "no":
                warnings.append("The iccprofile parameter is not supported: no profile is embedded")
        else:
            raise bad_request(f"unsupported query parameter {key[:80]!r} for a rendered resource")
    if thumbnail and viewport is None:
        viewport = Viewport(THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    return RenderRequest(RenderOptions(media_type, quality, window, viewport), warnings)


def thumbnail_instance(refs: Sequence[InstanceRef]) -> InstanceRef | None:
    """The instance that represents a study or series: the middle image of its first series
    that has images (a middle slice says more than the first)."""
    images = [r for r in refs if is_image_sop_class(r.sop_class_uid)]
    if not images:
        return None
    first_series = images[0].series_instance_uid
    series = [r for r in images if r.series_instance_uid == first_series]
    return series[len(series) // 2]


def image_refs(refs: Sequence[InstanceRef]) -> list[InstanceRef]:
    """The references that may be rendered (non-image classes are left out of a study's or
    series' rendering rather than failing it)."""
    return [r for r in refs if is_image_sop_class(r.sop_class_uid)]
