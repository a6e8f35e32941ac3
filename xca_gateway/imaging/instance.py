"""Checking an instance from the federation before it is sent on (C-STORE to a workstation, a
move destination or the local PACS).

An imaging source may send a cut or malformed instance (a file truncated on disk, a stream
that broke inside an element); pydicom reads a value cut short by the end of the data without
complaint. An instance is therefore decoded completely, element by element, and its Pixel Data
length checked, before any byte of it goes out: a bad one is refused whole, never half-stored.
"""

from __future__ import annotations

import io

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_expected_length

__all__ = ["check_pixel_data", "decode_instance"]


def decode_instance(data: bytes, expected_uid: str) -> Dataset:
    """A complete, well-formed Part 10 instance with the expected SOP Instance UID.

    Raises ValueError otherwise (the message leaves the UID to the caller's report).
    """
    try:
        ds = dcmread(io.BytesIO(data))
        for _element in ds.iterall():  # decode every element now, not half-way a C-STORE
            pass
        uid = str(ds.SOPInstanceUID)
        str(ds.SOPClassUID)  # C-STORE needs it
        if not ds.file_meta.get("TransferSyntaxUID"):
            raise ValueError("no Transfer Syntax UID in the file meta information")
        check_pixel_data(ds)
    except (InvalidDicomError, AttributeError, EOFError, OSError, ValueError, KeyError) as exc:
        raise ValueError(f"not valid DICOM: {exc}") from None
    if uid != expected_uid:
        raise ValueError(f"the source sent {uid} instead")
    return ds


def check_pixel_data(ds: Dataset) -> None:
    """ValueError when native Pixel Data is shorter (or longer) than its attributes say."""
    if "PixelData" not in ds:
        return
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        return  # fragments are delimited; a cut shows as a missing Sequence Delimiter
    expected = get_expected_length(ds, unit="bytes")
    actual = len(ds.PixelData)
    # Odd lengths are padded to even (PS3.5 8.1.1).
    if actual not in (expected, expected + expected % 2):
        raise ValueError(f"Pixel Data has {actual} bytes, {expected} expected (truncated?)")
