"""Tests for data_tools/image_io.py: one X-ray from bytes (DICOM, PNG, JPEG), told apart by content, with size limits checked before decoding."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate

from lungdet.data_tools.dicom_io import read_dicom
from lungdet.data_tools.image_io import (
    MIN_SIDE,
    find_images,
    read_input_list,
    read_picture_size,
    read_xray,
    sniff_format,
)
from lungdet.errors import DicomReadError, ImageReadError, LungdetError


def png_bytes(pixels: np.ndarray, **save_options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", **save_options)
    return buffer.getvalue()


def jpeg_bytes(pixels: np.ndarray, **save_options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, **save_options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels of 8-bit grey, with a tiny data chunk."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def gradient(rows: int = 64, columns: int = 96) -> np.ndarray:
    return (np.add.outer(np.arange(rows), np.arange(columns)) % 256).astype(np.uint8)


# --- formats ------------------------------------------------------------------------------------


def test_sniff_format_reads_content_not_names(rsna_sample_dir: Path) -> None:
    dicom = next(rsna_sample_dir.glob("*.dcm")).read_bytes()
    assert sniff_format(dicom) == "dicom"
    assert sniff_format(png_bytes(gradient())) == "png"
    assert sniff_format(jpeg_bytes(gradient())) == "jpeg"
    assert sniff_format(b"GIF89a" + b"\x00" * 200) is None
    assert sniff_format(b"") is None


def test_real_dicoms_read_as_dicom_io_reads_them(rsna_sample_dir: Path) -> None:
    for path in sorted(rsna_sample_dir.glob("*.dcm")):
        image = read_xray(path.read_bytes(), name=path.name)
        reference = read_dicom(path)
        assert np.array_equal(image.pixels, reference.pixels), path.name
        assert image.format == "dicom"
        assert (image.width, image.height) == (reference.meta.columns, reference.meta.rows) == (1024, 1024)
        assert image.view_position == reference.meta.view_position in ("AP", "PA")
        assert image.sex == reference.meta.sex in ("M", "F")
        assert image.age == reference.meta.age
        assert image.notes == ()


def test_describe_carries_no_identifying_tag(rsna_sample_dir: Path) -> None:
    path = next(rsna_sample_dir.glob("*.dcm"))
    description = read_xray(path.read_bytes(), name=path.name).describe()
    assert set(description) == {"format", "width", "height", "view_position", "sex", "age", "notes"}
    assert path.stem not in repr(description)  # the patientId (file stem and PatientID tag)


def test_monochrome1_dicom_is_inverted_and_noted(siim_dicom: Path, siim_monochrome1_dicom: Path) -> None:
    plain = read_xray(siim_dicom.read_bytes(), name="plain")
    twin = read_xray(siim_monochrome1_dicom.read_bytes(), name="twin")
    assert np.array_equal(twin.pixels, 255 - plain.pixels)
    assert [note["kind"] for note in twin.notes] == ["monochrome1_inverted"]


def test_grey_png_keeps_its_pixels() -> None:
    pixels = gradient()
    image = read_xray(png_bytes(pixels), name="grey.png")
    assert image.format == "png"
    assert np.array_equal(image.pixels, pixels)
    assert (image.width, image.height) == (96, 64)
    assert (image.view_position, image.sex, image.age, image.notes) == (None, None, None, ())


def test_jpeg_decodes_within_compression_error() -> None:
    pixels = gradient()
    image = read_xray(jpeg_bytes(pixels), name="grey.jpg")
    assert image.format == "jpeg" and image.pixels.shape == (64, 96)
    assert np.abs(image.pixels.astype(int) - pixels).mean() < 2


def test_colour_png_becomes_luma_and_is_noted() -> None:
    rgb = np.zeros((40, 50, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    image = read_xray(png_bytes(rgb), name="colour.png")
    # ITU-R 601 luma, as the DICOM reader uses: 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 124.2
    assert np.all(image.pixels == 124)
    assert image.notes == ({"kind": "rgb_converted", "reason": "colour image (RGB) converted to grey (luma)"},)


def test_16_bit_png_is_stretched_to_8_bits() -> None:
    pixels = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16).repeat(20, axis=0).repeat(20, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    image = read_xray(buffer.getvalue(), name="deep.png")
    assert image.pixels[0, 0] == 0 and image.pixels[-1, -1] == 255
    assert image.pixels[0, -1] == round((2000 - 1000) * 255 / 4000)
    assert [note["kind"] for note in image.notes] == ["high_bit_depth_rescaled"]


def test_exif_rotated_jpeg_is_turned_upright() -> None:
    pixels = gradient(40, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    image = read_xray(jpeg_bytes(pixels, exif=exif.tobytes()), name="phone.jpg")
    assert (image.width, image.height) == (40, 80)
    assert [note["kind"] for note in image.notes] == ["exif_rotated"]


def test_only_an_upright_8_bit_grey_file_is_its_own_pixels() -> None:
    """convert copies a PNG/JPEG byte for byte only when decoding the file gives exactly the pixels lungdet reads."""
    grey = gradient(40, 80)
    assert read_xray(png_bytes(grey), name="grey.png").file_is_pixels
    assert read_xray(jpeg_bytes(grey), name="grey.jpg").file_is_pixels
    assert not read_xray(png_bytes(np.dstack([grey] * 3)), name="colour.png").file_is_pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    assert not read_xray(jpeg_bytes(grey, exif=exif.tobytes()), name="phone.jpg").file_is_pixels


def test_picture_size_from_the_header_alone(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "phone.jpg").write_bytes(jpeg_bytes(gradient(40, 80), exif=exif.tobytes()))
    (tmp_path / "plain.png").write_bytes(png_bytes(gradient(40, 80)))
    (tmp_path / "cut.png").write_bytes(png_bytes(gradient(40, 80))[:12])
    (tmp_path / "notes.txt").write_text("hello")
    assert read_picture_size(tmp_path / "plain.png") == (80, 40)
    assert read_picture_size(tmp_path / "phone.jpg") == (40, 80)  # upright, as read_xray turns it
    with pytest.raises(ImageReadError, match="header cannot be read") as cut:
        read_picture_size(tmp_path / "cut.png")
    assert cut.value.kind == "undecodable"
    with pytest.raises(ImageReadError, match="not a PNG or JPEG"):
        read_picture_size(tmp_path / "notes.txt")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.JPEG").write_bytes(jpeg_bytes(gradient(40, 80)))
    assert [path.name for path in find_images(tmp_path)] == ["cut.png", "phone.jpg", "plain.png", "deep.JPEG"]


# --- bad input ----------------------------------------------------------------------------------


def test_empty_upload() -> None:
    with pytest.raises(ImageReadError, match=r"^upload abc: the file is empty \(0 bytes\)") as caught:
        read_xray(b"", name="upload abc")
    assert caught.value.kind == "empty"


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"GIF89a" + b"\x00" * 300, "a GIF file"),
        (b"%PDF-1.7\n" * 40, "a PDF file"),
        (b'{"x": 1}', "text"),
        (b"hello world" * 30, "not a format lungdet knows"),
    ],
)
def test_not_an_image_says_what_it_is(data: bytes, named: str) -> None:
    with pytest.raises(ImageReadError, match=f"is {named}.*lungdet reads DICOM.*PNG and JPEG") as caught:
        read_xray(data, name="x")
    assert caught.value.kind == "not_an_image"


def test_truncated_png() -> None:
    data = png_bytes(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))
    with pytest.raises(ImageReadError, match="probably truncated") as caught:
        read_xray(data[: len(data) // 2], name="cut.png")
    assert caught.value.kind == "truncated"


def test_one_pixel_image_is_too_small() -> None:
    with pytest.raises(ImageReadError, match=f"is 1 x 1 pixels, too small.*at least {MIN_SIDE}") as caught:
        read_xray(png_bytes(np.zeros((1, 1), dtype=np.uint8)), name="dot.png")
    assert caught.value.kind == "too_small"


def test_png_bomb_is_refused_from_its_header() -> None:
    data = png_declaring(60_000, 60_000)
    assert len(data) < 200
    with pytest.raises(ImageReadError, match=r"declares an image too large|declares 60000 x 60000") as caught:
        read_xray(data, name="bomb.png")
    assert caught.value.kind == "too_many_pixels"


def test_png_over_the_limit_is_refused_before_decoding() -> None:
    # 5000 x 5000 is under Pillow's own guard; the header alone must trip ours (the data could not even decode).
    with pytest.raises(
        ImageReadError, match=r"declares 5000 x 5000 pixels \(25\.0 megapixels\), over the limit of 10"
    ) as caught:
        read_xray(png_declaring(5000, 5000), name="big.png", max_pixels=10_000_000)
    assert caught.value.kind == "too_many_pixels"


def test_dicom_declaring_huge_rows_and_columns_is_refused(make_dicom: Callable[..., Path]) -> None:
    path = make_dicom("huge", rows=64, columns=64)
    dataset = pydicom.dcmread(path)
    dataset.Rows = dataset.Columns = 50_000  # the stored pixels stay 64 x 64 bytes
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    with pytest.raises(
        DicomReadError, match=r"declares 50000 x 50000 pixels \(2500\.0 megapixels\), over the limit"
    ) as caught:
        read_xray(buffer.getvalue(), name="upload huge")
    assert caught.value.kind == "too_many_pixels"


def jpeg_dicom(tags_size: int, stream_size: int, template: Path) -> bytes:
    """A real RSNA DICOM re-encoded: Rows/Columns say ``tags_size`` but the JPEG frame header says ``stream_size``."""
    stream = bytearray(cv2.imencode(".jpg", np.full((tags_size, tags_size), 128, dtype=np.uint8))[1].tobytes())
    start_of_frame = stream.index(b"\xff\xc0")
    stream[start_of_frame + 5 : start_of_frame + 9] = struct.pack(">HH", stream_size, stream_size)
    dataset = pydicom.dcmread(template)
    dataset.Rows = dataset.Columns = tags_size
    dataset.PixelData = encapsulate([bytes(stream)])
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def test_dicom_whose_jpeg_declares_a_huge_frame_is_refused_before_decoding(rsna_sample_dir: Path) -> None:
    data = jpeg_dicom(64, 30_000, next(rsna_sample_dir.glob("*.dcm")))
    with pytest.raises(
        DicomReadError, match=r"compressed frame declares 30000 x 30000 pixels \(900\.0 megapixels\)"
    ) as caught:
        read_xray(data, name="upload bomb")
    assert caught.value.kind == "too_many_pixels"


def test_dicom_whose_jpeg_disagrees_with_its_tags_is_refused(rsna_sample_dir: Path) -> None:
    data = jpeg_dicom(64, 96, next(rsna_sample_dir.glob("*.dcm")))
    with pytest.raises(
        DicomReadError, match=r"compressed frame is 96 x 96 pixels but Rows/Columns say 64 x 64"
    ) as caught:
        read_xray(data, name="upload odd")
    assert caught.value.kind == "bad_shape"


def test_dicom_errors_keep_their_kind(make_dicom: Callable[..., Path]) -> None:
    data = make_dicom("frames", number_of_frames=3, rows=40, columns=40).read_bytes()
    with pytest.raises(DicomReadError, match="multi-frame") as caught:
        read_xray(data, name="upload frames")
    assert caught.value.kind == "multi_frame"
    assert isinstance(caught.value, ImageReadError)


def test_input_list_skips_blanks_and_comments_and_refuses_an_empty_one(tmp_path: Path) -> None:
    listing = tmp_path / "files.txt"
    listing.write_text("# the archive\n/data/a.dcm\n\n  /data/b.png  \n")
    assert read_input_list(listing) == [Path("/data/a.dcm"), Path("/data/b.png")]
    listing.write_text("# nothing\n")
    with pytest.raises(LungdetError, match="names no file"):
        read_input_list(listing)
