"""DICOM images as consumer images, sans I/O: the pixel pipeline of WADO-RS rendered resources.

One frame of a pydicom dataset becomes a PNG or JPEG (DICOM PS3.18 8.3.5, 9.5 rendered media
types) the way a viewer would display it (PS3.3 C.11, the grayscale pipeline):

1. the stored pixels of the frame, decoded by pydicom's pixel handlers (native, RLE Lossless with
   pydicom's own codec; JPEG, JPEG-LS, JPEG 2000 and HTJ2K through pylibjpeg's plugins);
2. grayscale: the Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence), then the VOI
   (the window asked for; else the instance's first window or VOI LUT; else the frame's range),
   MONOCHROME1 inverted so that 0 is always black; colour (RGB, YCbCr, PALETTE COLOR) is shown
   as RGB, scaled to 8 bits;
3. the viewport: an optional source region (negative width/height flip), scaled to fit the
   viewport preserving the aspect ratio;
4. PNG (lossless, the default) or JPEG at ``quality``.

Everything here is a plain function of bytes and parameters: the door fetches the instance and
runs it in a thread.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array

__all__ = [
    "JPEG",
    "PNG",
    "FrameOutOfRange",
    "NotRenderable",
    "RenderOptions",
    "Viewport",
    "Window",
    "frame_count",
    "is_image_sop_class",
    "render_frame",
]

PNG: Final = "image/png"
JPEG: Final = "image/jpeg"
MediaType = Literal["image/png", "image/jpeg"]
WindowFunction = Literal["linear", "linear-exact", "sigmoid"]
DEFAULT_JPEG_QUALITY = 90
# A decoded frame larger than this is refused rather than rendered (memory is per request).
MAX_FRAME_PIXELS = 64 * 1024 * 1024
MAX_VIEWPORT = 8192

# SOP classes without pixels to render (PS3.4 B.5): structured reports and key object
# selections, presentation states, waveforms, encapsulated documents, raw data, spectroscopy,
# registrations and segmentations stored as surfaces.
_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # SR, KOS
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF, CDA, STL...
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, surface segmentation
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR spectroscopy
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects (RT Image .1 is the exception below)
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
)
_RT_IMAGE = "1.2.840.10008.5.1.4.1.1.481.1"


class NotRenderable(Exception):
    """The instance has no image to render (no pixel data, a non-image SOP class, an
    undecodable or unsupported encoding)."""


class FrameOutOfRange(Exception):
    """A frame number beyond the instance's Number of Frames."""


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): center and width in modality units."""

    center: float
    width: float
    function: WindowFunction = "linear"


@dataclass(frozen=True)
class Viewport:
    """PS3.18 8.3.5.1.3: the output size and an optional source region (sx, sy, sw, sh).

    A negative ``sw``/``sh`` flips the region horizontally/vertically; None means the whole
    extent from ``sx``/``sy``."""

    width: int
    height: int
    sx: int = 0
    sy: int = 0
    sw: int | None = None
    sh: int | None = None


@dataclass(frozen=True)
class RenderOptions:
    media_type: MediaType = PNG
    quality: int | None = None
    window: Window | None = None
    viewport: Viewport | None = None


def is_image_sop_class(sop_class_uid: str) -> bool:
    """Whether instances of the class carry an image (a guess from the class alone, used to pick
    a thumbnail and to refuse before fetching; the dataset decides in the end)."""
    if sop_class_uid == _RT_IMAGE:
        return True
    return not sop_class_uid.startswith(_NON_IMAGE_PREFIXES)


def frame_count(ds: Dataset) -> int:
    """The frames of an image instance (1 when Number of Frames is absent)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NotRenderable("the instance has no pixel data")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise NotRenderable("Number of Frames is not a number") from None
    return max(frames, 1)


def render_frame(ds: Dataset, frame: int, options: RenderOptions) -> bytes:
    """``frame`` (0-based) of ``ds`` encoded as ``options.media_type``."""
    frames = frame_count(ds)
    if not 0 <= frame < frames:
        raise FrameOutOfRange(f"frame {frame + 1} is outside 1..{frames}")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or columns <= 0 or rows * columns > MAX_FRAME_PIXELS:
        raise NotRenderable(f"unsupported image size {rows}x{columns}")
    try:
        stored = pixel_array(ds, index=frame)
    except (NotImplementedError, RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise NotRenderable(f"the pixel data cannot be decoded: {exc}") from None
    image = _display_pixels(stored, ds, options.window)
    image = _apply_viewport(image, options.viewport)
    return _encode(image, options)


# ----------------------------------------------------------------------------- the pipeline


def _display_pixels(stored: NDArray[np.generic], ds: Dataset, window: Window | None) -> Image.Image:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if stored.ndim != 2:
            raise NotRenderable(f"a {photometric} frame of shape {stored.shape}")
        gray = _voi(stored, ds, window)
        if photometric == "MONOCHROME1":
            gray = 255 - gray
        return Image.fromarray(gray, mode="L")
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(stored, ds)
        except (ValueError, KeyError, AttributeError) as exc:
            raise NotRenderable(f"the palette cannot be applied: {exc}") from None
        bits = 16 if rgb.dtype.itemsize > 1 else 8
        return Image.fromarray(_to_8bit(rgb, bits), mode="RGB")
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"):
        # pydicom converts YCbCr to RGB while decoding (as_rgb defaults to true).
        if stored.ndim != 3 or stored.shape[-1] != 3:
            raise NotRenderable(f"a colour frame of shape {stored.shape}")
        bits = int(ds.get("BitsStored", 8) or 8)
        return Image.fromarray(_to_8bit(stored, bits), mode="RGB")
    raise NotRenderable(f"Photometric Interpretation {photometric[:20]!r} is not supported")


def _to_8bit(values: NDArray[np.generic], bits: int) -> NDArray[np.uint8]:
    scaled = values.astype(np.float64)
    if bits > 8:
        scaled = np.rint(scaled * (255.0 / float((1 << bits) - 1)))
    out: NDArray[np.uint8] = np.clip(scaled, 0, 255).astype(np.uint8)
    return out


def _first(value: object) -> float | None:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _instance_window(ds: Dataset) -> Window | None:
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    named: dict[str, WindowFunction] = {
        "LINEAR": "linear",
        "LINEAR_EXACT": "linear-exact",
        "SIGMOID": "sigmoid",
    }
    return Window(center, width, named.get(function, "linear"))


# Integer frames whose value range is at most this wide go through a lookup table: the
# pipeline is computed once per stored value instead of once per pixel (a 512 x 512 CT frame:
# ~1 ms instead of ~20 ms).
_MAX_LUT_SPAN = 1 << 17


def _voi(stored: NDArray[np.generic], ds: Dataset, window: Window | None) -> NDArray[np.uint8]:
    """Modality LUT then VOI to 8-bit display values (PS3.3 C.11.2.1.2)."""
    if stored.dtype.kind in "iu" and stored.size:
        low, high = int(stored.min()), int(stored.max())
        if high - low < _MAX_LUT_SPAN:
            domain = np.arange(low, high + 1, dtype=np.int64).astype(stored.dtype)
            table = _voi_values(domain, ds, window)
            index = stored.astype(np.int64) - low
            out: NDArray[np.uint8] = table[index]
            return out
    return _voi_values(stored, ds, window)


def _voi_values(
    stored: NDArray[np.generic], ds: Dataset, window: Window | None
) -> NDArray[np.uint8]:
    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise NotRenderable(f"the modality LUT cannot be applied: {exc}") from None
    if window is None:
        window = _instance_window(ds)
    if window is None and "VOILUTSequence" in ds:
        try:
            lut_out = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float64)
        except (ValueError, KeyError, AttributeError, TypeError, IndexError):
            lut_out = values
        return _stretch(lut_out)
    if window is None:
        return _stretch(values)
    return apply_window(values, window)


def _stretch(values: NDArray[np.float64]) -> NDArray[np.uint8]:
    """The frame's own range to 0..255 (no window known)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def apply_window(values: NDArray[np.float64], window: Window) -> NDArray[np.uint8]:
    """The VOI LUT functions of PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.1 (SIGMOID) and
    C.11.2.1.3.2 (LINEAR_EXACT), to output range 0..255."""
    c, w = window.center, window.width
    if window.function == "sigmoid":
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - c) / max(w, 1e-9)))
    elif window.function == "linear-exact":
        w = max(w, 1e-9)
        out = ((values - c) / w + 0.5) * 255.0
    else:
        # LINEAR: width below 1 is an error in the standard; treat it as the narrowest window.
        w = max(w, 1.0)
        if w == 1.0:
            out = np.where(values <= c - 0.5, 0.0, 255.0)
        else:
            out = ((values - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0
    clipped: NDArray[np.uint8] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return clipped


def _apply_viewport(image: Image.Image, viewport: Viewport | None) -> Image.Image:
    if viewport is None:
        return image
    columns, rows = image.size
    sx = min(max(viewport.sx, 0), columns - 1)
    sy = min(max(viewport.sy, 0), rows - 1)
    sw = viewport.sw if viewport.sw is not None else columns - sx
    sh = viewport.sh if viewport.sh is not None else rows - sy
    flip_x, flip_y = sw < 0, sh < 0
    sw = min(abs(sw) or columns - sx, columns - sx)
    sh = min(abs(sh) or rows - sy, rows - sy)
    if (sx, sy, sw, sh) != (0, 0, columns, rows):
        image = image.crop((sx, sy, sx + sw, sy + sh))
    if flip_x:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if flip_y:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    # Fit the viewport, preserving the aspect ratio of the region (never distorted).
    scale = min(viewport.width / sw, viewport.height / sh)
    size = (max(1, round(sw * scale)), max(1, round(sh * scale)))
    if size != image.size:
        image = image.resize(
            size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR
        )
    return image


def _encode(image: Image.Image, options: RenderOptions) -> bytes:
    out = io.BytesIO()
    if options.media_type == JPEG:
        quality = options.quality if options.quality is not None else DEFAULT_JPEG_QUALITY
        image.save(out, format="JPEG", quality=quality)
    else:
        # PNG is lossless whatever quality says; a fast compression level keeps latency low.
        image.save(out, format="PNG", compress_level=1)
    return out.getvalue()
