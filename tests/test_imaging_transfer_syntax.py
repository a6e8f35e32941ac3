"""Transfer syntax choice and the gateway's own lossless conversions (real DICOM files)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from tests.test_imaging_support import make_study, pixel_data
from xca_gateway.imaging.transfer_syntax import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    JPEG_2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_LOSSLESS_SV1,
    RLE_LOSSLESS,
    NeedMoreData,
    TranscodeError,
    choose_target,
    derivable,
    lossless_first,
    sniff_transfer_syntax,
    split_meta,
    transcode,
)


def test_choice_prefers_as_stored_then_lossless_in_request_order() -> None:
    ele, ile, rle = EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, RLE_LOSSLESS
    assert choose_target(ele, [rle, ele]) == ele  # pass-through beats conversion
    assert choose_target(ele, [JPEG_BASELINE, rle, ile]) == rle  # lossless first
    assert choose_target(JPEG_BASELINE, [JPEG_BASELINE]) == JPEG_BASELINE
    assert choose_target(JPEG_BASELINE, [ele]) is None  # no JPEG decoder: error, not a guess
    assert choose_target(ele, [JPEG_BASELINE]) is None  # never encode lossy
    assert choose_target(ele, [JPEG_2000_LOSSLESS]) is None
    assert lossless_first([JPEG_BASELINE, JPEG_LOSSLESS_SV1]) == [JPEG_LOSSLESS_SV1, JPEG_BASELINE]
    assert derivable([ele], [JPEG_BASELINE, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN]) == (
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    )


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Path:
    study = make_study(tmp_path_factory.mktemp("ts"), instances=1, rows=48, columns=40)
    return study.files[0]


@pytest.mark.parametrize(
    "chain",
    [
        [IMPLICIT_VR_LITTLE_ENDIAN],
        [DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN],
        [RLE_LOSSLESS],
        [RLE_LOSSLESS, IMPLICIT_VR_LITTLE_ENDIAN],
        [RLE_LOSSLESS, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN],
    ],
)
def test_conversions_are_pixel_identical_and_keep_the_instance(
    instance: Path, chain: list[str]
) -> None:
    original = instance.read_bytes()
    data = original
    for target in chain:
        data = transcode(data, target)
        assert sniff_transfer_syntax(data) == target
    assert pixel_data(data) == pixel_data(original)
    converted, source = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(instance)
    assert converted.SOPInstanceUID == source.SOPInstanceUID
    assert converted.StudyInstanceUID == source.StudyInstanceUID
    assert converted.PatientName == source.PatientName
    assert converted.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID


def test_same_syntax_is_untouched_and_impossible_ones_refused(instance: Path) -> None:
    original = instance.read_bytes()
    assert transcode(original, EXPLICIT_VR_LITTLE_ENDIAN) is original
    with pytest.raises(TranscodeError):
        transcode(original, JPEG_BASELINE)
    with pytest.raises(TranscodeError):
        transcode(b"not dicom at all", RLE_LOSSLESS)


def test_sniffing_needs_only_the_file_meta(instance: Path) -> None:
    data = instance.read_bytes()
    meta, dataset = split_meta(data)
    assert sniff_transfer_syntax(meta) == EXPLICIT_VR_LITTLE_ENDIAN
    assert meta + dataset == data and dataset[:2] == b"\x08\x00"
    value_at = data.index(EXPLICIT_VR_LITTLE_ENDIAN.encode(), 132)
    for cut in (0, 100, 140, value_at + 5):
        with pytest.raises(NeedMoreData):
            sniff_transfer_syntax(data[:cut])
    with pytest.raises(TranscodeError):
        sniff_transfer_syntax(b"\0" * 128 + b"XXXX" + b"\0" * 100)
