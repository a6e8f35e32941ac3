"""Transfer syntax choice and the lossless conversions the gateway can do itself.

RAD-69 (RAD TF-3 4.69.4.2.3): pixel data is returned in one of the requested transfer syntaxes,
or the instance is reported with an error; never silently in another syntax. An instance already
stored in a requested syntax is passed through untouched (byte-identical). Otherwise the gateway
converts in memory, one instance at a time, between the syntaxes pydicom handles reliably
without optional codec packages:

* native (uncompressed) Explicit VR Little Endian, Implicit VR Little Endian and Deflated
  Explicit VR Little Endian, re-encoded into each other, and
* RLE Lossless, decoded and encoded with pydicom's own RLE codec.

JPEG, JPEG-LS and JPEG 2000 would need pylibjpeg/openjpeg plus numpy; without them such an
instance is only served when it is stored in a requested syntax. The gateway never encodes into a
lossy syntax: it only ever produces the lossless syntaxes above, so lossy output can only reach a
consumer that listed a lossy syntax and whose source holds (or produces) exactly that.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Collection, Iterable, Sequence

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_LOSSLESS_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"

# Syntaxes whose encoders may discard information (PS3.5 Table A-1 / PS3.6 Annex A).
LOSSY: frozenset[str] = frozenset(
    {
        JPEG_BASELINE,
        JPEG_EXTENDED,
        JPEG_LS_NEAR_LOSSLESS,
        JPEG_2000,
        HTJ2K,
        "1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile / Main Level
        "1.2.840.10008.1.2.4.101",
        "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264
        "1.2.840.10008.1.2.4.103",
        "1.2.840.10008.1.2.4.104",
        "1.2.840.10008.1.2.4.105",
        "1.2.840.10008.1.2.4.106",
        "1.2.840.10008.1.2.4.107",  # HEVC/H.265
        "1.2.840.10008.1.2.4.108",
    }
)

NATIVE: frozenset[str] = frozenset(
    {EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN}
)
# What a client that keeps instances as they are stored asks for: native, then the lossless
# compressed syntaxes (an instance stored in one of them comes as it is, byte for byte; one
# stored otherwise is converted to native when it can be).
LOSSLESS_AS_STORED: tuple[str, ...] = (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    RLE_LOSSLESS,
    JPEG_LS_LOSSLESS,
    JPEG_2000_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    JPEG_LOSSLESS,
    HTJ2K_LOSSLESS,
)
# What the gateway can decode from and encode into (all lossless).
CONVERTIBLE: frozenset[str] = NATIVE | {RLE_LOSSLESS}

TRANSFER_SYNTAX_ERROR = "cannot encode the pixel data using any of the requested transfer syntaxes"


class TranscodeError(Exception):
    pass


def is_lossy(uid: str) -> bool:
    return uid in LOSSY


def lossless_first(requested: Sequence[str]) -> list[str]:
    """Requested syntaxes, lossless ones first, each group in the consumer's order."""
    return [ts for ts in requested if ts not in LOSSY] + [ts for ts in requested if ts in LOSSY]


def can_convert(source: str, target: str) -> bool:
    return source == target or (source in CONVERTIBLE and target in CONVERTIBLE)


def choose_target(stored: str, requested: Sequence[str]) -> str | None:
    """The syntax to deliver an instance stored in ``stored``: as-is if requested, else the
    first requested (lossless first) the gateway can convert to, else None."""
    if stored in requested:
        return stored
    for target in lossless_first(requested):
        if can_convert(stored, target):
            return target
    return None


def derivable(available: Iterable[str], requested: Sequence[str]) -> str | None:
    """A requested syntax reachable from one of ``available`` (what a source guarantees)."""
    available = list(available)
    for target in lossless_first(requested):
        if any(can_convert(source, target) for source in available):
            return target
    return None


def fetch_syntax_for(target: str, available: Collection[str]) -> str | None:
    """Which of the ``available`` syntaxes to ask a source for so ``target`` can be produced."""
    if target in available:
        return target
    for source in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, *sorted(available)):
        if source in available and can_convert(source, target):
            return source
    return None


# ---------------------------------------------------------------------------------- sniffing

_PREAMBLE = 128
_EXPLICIT_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN"})
_EXPLICIT_LONG_VRS |= {b"UR", b"UT", b"SV", b"UV"}
META_SNIFF_LIMIT = 64 * 1024


class NeedMoreData(Exception):
    pass


def sniff_transfer_syntax(prefix: bytes) -> str:
    """The (0002,0010) Transfer Syntax UID of a Part 10 file from its first bytes.

    Raises NeedMoreData if ``prefix`` ends before the element, TranscodeError if the bytes are
    not a DICOM Part 10 file.
    """
    if len(prefix) < _PREAMBLE + 4:
        raise NeedMoreData
    if prefix[_PREAMBLE : _PREAMBLE + 4] != b"DICM":
        raise TranscodeError("not a DICOM Part 10 file (no DICM prefix)")
    pos = _PREAMBLE + 4
    while True:  # File meta elements are always Explicit VR Little Endian (PS3.10 7.1).
        if len(prefix) < pos + 8:
            raise NeedMoreData
        group, element = struct.unpack_from("<HH", prefix, pos)
        if group != 0x0002:
            raise TranscodeError("file meta information has no Transfer Syntax UID")
        vr = prefix[pos + 4 : pos + 6]
        if vr in _EXPLICIT_LONG_VRS:
            if len(prefix) < pos + 12:
                raise NeedMoreData
            (length,) = struct.unpack_from("<I", prefix, pos + 8)
            value_at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", prefix, pos + 6)
            value_at = pos + 8
        if length > META_SNIFF_LIMIT:
            raise TranscodeError("implausible file meta element length")
        if len(prefix) < value_at + length:
            raise NeedMoreData
        if element == 0x0010:
            value = prefix[value_at : value_at + length].rstrip(b"\x00 ")
            try:
                return value.decode("ascii")
            except UnicodeDecodeError:
                raise TranscodeError("Transfer Syntax UID is not ASCII") from None
        pos = value_at + length


def split_meta(data: bytes) -> tuple[bytes, bytes]:
    """(file meta incl. preamble, dataset) of a Part 10 file; for comparing dataset bytes."""
    pos = _PREAMBLE + 4
    while pos + 8 <= len(data):
        group = struct.unpack_from("<H", data, pos)[0]
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _EXPLICIT_LONG_VRS:
            length = struct.unpack_from("<I", data, pos + 8)[0]
            pos += 12 + length
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            pos += 8 + length
    return data[:pos], data[pos:]


# ------------------------------------------------------------------------------- conversion


def _decompress_rle(ds: Dataset) -> None:
    from pydicom.pixels.decoders.base import get_decoder

    decoder = get_decoder(UID(RLE_LOSSLESS))
    # as_buffer needs no numpy; it returns native little-endian frames, planar configuration 0.
    buffer, _meta = decoder.as_buffer(ds)
    ds.PixelData = bytes(buffer)
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    ds["PixelData"].is_undefined_length = False
    if ds.get("SamplesPerPixel", 1) > 1:
        ds.PlanarConfiguration = 0


def transcode(data: bytes, target: str) -> bytes:
    """Re-encode one Part 10 instance into ``target`` (lossless only); in memory."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except Exception as exc:  # pydicom raises many types for bad input
        raise TranscodeError(f"unreadable DICOM instance: {exc}") from None
    source = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if source == target:
        return data
    if not can_convert(source, target):
        raise TranscodeError(f"no conversion from {source} to {target}")
    try:
        if "PixelData" in ds and source == RLE_LOSSLESS:
            _decompress_rle(ds)
        if target == RLE_LOSSLESS and "PixelData" in ds:
            # Same instance, new encoding: keep the SOP Instance UID (pydicom renews it by
            # default, which would make the consumer see a different object).
            ds.compress(UID(RLE_LOSSLESS), encoding_plugin="pydicom", generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = UID(target)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    except Exception as exc:
        raise TranscodeError(f"conversion from {source} to {target} failed: {exc}") from None
    return out.getvalue()
