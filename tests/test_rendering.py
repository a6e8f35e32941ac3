"""Rendered resources, sans I/O: the pixel pipeline (imaging.rendering) and the parameters
(doors.dicomweb.rendered), on sample instances generated as the demo's (Explicit VR Little
Endian and RLE Lossless) and datasets built here for the other photometric interpretations."""

from __future__ import annotations

import io
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from xca_gateway.doors.dicomweb.negotiation import DicomWebError, Route
from xca_gateway.doors.dicomweb.rendered import (
    THUMBNAIL_SIZE,
    negotiate_rendered,
    parse_rendered,
    parse_viewport,
    parse_window,
    thumbnail_instance,
)
from xca_gateway.imaging.rendering import (
    JPEG,
    PNG,
    FrameOutOfRange,
    NotRenderable,
    RenderOptions,
    Viewport,
    Window,
    apply_window,
    frame_count,
    is_image_sop_class,
    render_frame,
)
from xca_gateway.tools.dicom_samples import SamplePatient, generate_study
from xca_gateway.xds.kos import InstanceRef

CT = "1.2.840.10008.5.1.4.1.1.2"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def sample(tmp: Path, syntax: str = str(ExplicitVRLittleEndian)) -> Dataset:
    study = generate_study(
        tmp,
        patient=SamplePatient("k", "Doe", "Jane", "19700101", "F"),
        patient_id="P1",
        issuer_oid="1.2.3",
        modality="CT",
        body_part="CHEST",
        study_date=date(2020, 1, 1),
        institution="X",
        accession_number="A1",
        uid_root="1.2.826.0.1.3680043.9.9999",
        series_count=1,
        instances_per_series=1,
        rows=64,
        columns=48,
        seed=3,
        transfer_syntax_uid=syntax,
    )
    return dcmread(study.files[0])


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def built(pixels: np.ndarray, photometric: str, *, frames: int = 1) -> Dataset:
    """A minimal native dataset holding ``pixels`` (frames, rows, columns[, 3])."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    color = pixels.ndim == (4 if frames > 1 else 3)
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if color else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    return ds


# ----------------------------------------------------------------------------- the pipeline


def test_png_is_the_instance_window_applied_losslessly(tmp_path: Path) -> None:
    ds = sample(tmp_path)
    png = render_frame(ds, 0, RenderOptions())
    assert png.startswith(b"\x89PNG")
    image = decoded(png)
    assert image.shape == (64, 48) and image.dtype == np.uint8
    # The sample's own window (center 40, width 400) over its rescaled values, exactly.
    values = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = apply_window(values, Window(float(ds.WindowCenter), float(ds.WindowWidth)))
    assert np.array_equal(image, expected)
    assert image.min() != image.max()


def test_rle_lossless_decodes_to_the_same_image(tmp_path: Path) -> None:
    native = render_frame(sample(tmp_path / "a"), 0, RenderOptions())
    rle = sample(tmp_path / "b", str(RLELossless))
    assert rle.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(decoded(render_frame(rle, 0, RenderOptions())), decoded(native))


def test_window_parameter_overrides_the_instance_window(tmp_path: Path) -> None:
    ds = sample(tmp_path)
    default = decoded(render_frame(ds, 0, RenderOptions()))
    wide = decoded(render_frame(ds, 0, RenderOptions(window=Window(1000, 6000))))
    assert not np.array_equal(default, wide)
    # A window far above every value renders black; far below renders white.
    assert decoded(render_frame(ds, 0, RenderOptions(window=Window(1e6, 10)))).max() == 0
    assert decoded(render_frame(ds, 0, RenderOptions(window=Window(-1e6, 10)))).min() == 255


def test_window_functions_follow_ps3_3() -> None:
    x = np.array([0.0, 50.0, 99.0, 100.0, 101.0, 150.0, 200.0])
    linear = apply_window(x, Window(100, 101))  # c - 0.5 - (w-1)/2 = 49.5 .. 149.5
    assert list(linear[[0, 5, 6]]) == [0, 255, 255] and linear[1] == 1
    exact = apply_window(x, Window(100, 100, "linear-exact"))
    assert list(exact) == [0, 0, 125, 128, 130, 255, 255]
    sigmoid = apply_window(x, Window(100, 50, "sigmoid"))
    assert sigmoid[3] == 128 and sigmoid[0] == 0 and sigmoid[-1] == 255


def test_monochrome1_is_inverted_and_the_range_stretched_without_a_window() -> None:
    ramp = np.arange(16, dtype=np.uint16).reshape(4, 4) * 100
    mono2 = decoded(render_frame(built(ramp, "MONOCHROME2"), 0, RenderOptions()))
    mono1 = decoded(render_frame(built(ramp, "MONOCHROME1"), 0, RenderOptions()))
    assert mono2[0, 0] == 0 and mono2[3, 3] == 255
    assert np.array_equal(mono1, 255 - mono2)


def test_rgb_and_multiframe() -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 2] = (0, 0, 255)
    image = decoded(render_frame(built(rgb, "RGB"), 0, RenderOptions()))
    assert image.shape == (2, 3, 3) and tuple(image[0, 0]) == (255, 0, 0)
    frames = np.zeros((3, 4, 4), dtype=np.uint8)
    for index in range(3):
        frames[index, index, index] = 9  # each frame marked at its own place
    multi = built(frames, "MONOCHROME2", frames=3)
    assert frame_count(multi) == 3
    last = decoded(render_frame(multi, 2, RenderOptions()))
    assert last[2, 2] == 255 and last.sum() == 255
    with pytest.raises(FrameOutOfRange):
        render_frame(multi, 3, RenderOptions())


def test_viewport_fits_preserving_aspect_and_crops_and_flips(tmp_path: Path) -> None:
    ds = sample(tmp_path)  # 48 wide, 64 high
    assert decoded(render_frame(ds, 0, RenderOptions(viewport=Viewport(96, 96)))).shape == (96, 72)
    full = decoded(render_frame(ds, 0, RenderOptions()))
    crop = decoded(render_frame(ds, 0, RenderOptions(viewport=Viewport(10, 20, 5, 6, 10, 20))))
    assert np.array_equal(crop, full[6:26, 5:15])
    flipped = decoded(
        render_frame(ds, 0, RenderOptions(viewport=Viewport(48, 64, 0, 0, -48, None)))
    )
    assert np.array_equal(flipped, full[:, ::-1])


def test_jpeg_is_lossy_and_follows_quality(tmp_path: Path) -> None:
    ds = sample(tmp_path)
    low = render_frame(ds, 0, RenderOptions(JPEG, quality=5))
    high = render_frame(ds, 0, RenderOptions(JPEG, quality=95))
    assert low.startswith(b"\xff\xd8") and len(low) < len(high)


def test_instances_without_an_image_are_not_renderable(tmp_path: Path) -> None:
    ds = sample(tmp_path)
    del ds.PixelData
    with pytest.raises(NotRenderable):
        render_frame(ds, 0, RenderOptions())
    odd = built(np.zeros((2, 2), dtype=np.uint8), "HSV")
    with pytest.raises(NotRenderable):
        render_frame(odd, 0, RenderOptions())
    assert is_image_sop_class(CT) and not is_image_sop_class(KOS)
    assert is_image_sop_class("1.2.840.10008.5.1.4.1.1.481.1")  # RT Image
    assert not is_image_sop_class("1.2.840.10008.5.1.4.1.1.481.2")  # RT Dose


# ----------------------------------------------------------------------------- parameters


INSTANCE = Route("rendered", "IMAGE", "1.2", "3.4", "5.6")


def test_media_type_negotiation() -> None:
    assert negotiate_rendered([]) == PNG
    assert negotiate_rendered(["*/*"]) == PNG
    assert negotiate_rendered(["image/jpeg"]) == JPEG
    assert negotiate_rendered(["image/jpeg;q=0.5, image/png"]) == PNG
    with pytest.raises(DicomWebError) as caught:
        negotiate_rendered(["image/gif"])
    assert caught.value.status == 406


def test_rendered_parameters() -> None:
    asked = parse_rendered(
        INSTANCE,
        [("window", "40,400,sigmoid"), ("viewport", "512,512"), ("quality", "80")],
        ["image/jpeg"],
    )
    assert asked.options == RenderOptions(JPEG, 80, Window(40, 400, "sigmoid"), Viewport(512, 512))
    assert parse_window("-600,1500") == Window(-600, 1500, "linear")
    assert parse_viewport("100,50,,,-20,") == Viewport(100, 50, 0, 0, -20, None)
    annotated = parse_rendered(INSTANCE, [("annotation", "patient"), ("PatientID", "X")], [])
    assert annotated.warnings and annotated.options == RenderOptions()
    thumb = parse_rendered(Route("thumbnail", "STUDY", "1.2"), [], [])
    assert thumb.options.viewport == Viewport(THUMBNAIL_SIZE, THUMBNAIL_SIZE)


@pytest.mark.parametrize(
    ("pairs", "words"),
    [
        ([("window", "40")], "center,width"),
        ([("window", "a,400,linear")], "not a number"),
        ([("window", "40,0.5,linear")], "positive"),
        ([("window", "40,400,cubic")], "function"),
        ([("viewport", "0,10")], "1..8192"),
        ([("viewport", "10,10,1")], "vw,vh"),
        ([("viewport", "10,x")], "integer"),
        ([("quality", "101")], "1..100"),
        ([("colour", "blue")], "unsupported"),
        ([("quality", "5"), ("quality", "6")], "more than once"),
    ],
)
def test_bad_parameters_get_400_with_a_clear_message(
    pairs: list[tuple[str, str]], words: str
) -> None:
    with pytest.raises(DicomWebError) as caught:
        parse_rendered(INSTANCE, pairs, [])
    assert caught.value.status == 400 and words in caught.value.message


def test_thumbnail_takes_only_a_viewport() -> None:
    with pytest.raises(DicomWebError) as caught:
        parse_rendered(Route("thumbnail", "STUDY", "1.2"), [("window", "1,2")], [])
    assert caught.value.status == 400


def test_thumbnail_is_the_middle_image_of_the_first_series() -> None:
    def ref(series: str, sop: str, cls: str = CT) -> InstanceRef:
        return InstanceRef("1.2", series, cls, sop)

    refs = [ref("9", "0", KOS), ref("3", "1"), ref("3", "2"), ref("3", "3"), ref("4", "4")]
    chosen = thumbnail_instance(refs)
    assert chosen is not None and chosen.sop_instance_uid == "2"
    assert thumbnail_instance([ref("9", "0", KOS)]) is None


def test_jpeg_2000_lossless_stored_instances_render_like_native(tmp_path: Path) -> None:
    from pydicom.uid import JPEG2000Lossless

    native = sample(tmp_path / "a")
    compressed = sample(tmp_path / "b")
    compressed.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    assert compressed.file_meta.TransferSyntaxUID == JPEG2000Lossless
    reread = dcmread(io.BytesIO(_to_bytes(compressed)))
    assert np.array_equal(
        decoded(render_frame(reread, 0, RenderOptions())),
        decoded(render_frame(native, 0, RenderOptions())),
    )


def _to_bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
