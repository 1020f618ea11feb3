"""Tests for data_tools/dicom_io.py: real RSNA files, a synthetic DICOM per case, and bad input."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames

from lungdet.data_tools.dicom_io import (
    find_dicoms,
    read_dicom,
    read_dicom_bytes,
    read_dicom_metadata,
)
from lungdet.errors import DicomReadError, LungdetError

RSNA_FILE_COUNT = 13
POSITIVE_SAMPLE = "00436515-870c-4b36-a041-de91049b9ab4"


def rsna_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == RSNA_FILE_COUNT, f"expected {RSNA_FILE_COUNT} sample DICOMs in {folder}, found {len(files)}"
    return files


# --- real RSNA files -------------------------------------------------------------------------


def test_metadata_of_real_files_equals_the_tags(rsna_sample_dir: Path) -> None:
    for path in rsna_files(rsna_sample_dir):
        tags = pydicom.dcmread(path, stop_before_pixels=True)
        meta = read_dicom_metadata(path)
        assert meta.path == path
        assert meta.patient_id == path.stem == meta.patient_id_tag == tags.PatientID
        assert meta.sex == tags.PatientSex and meta.sex in ("M", "F")
        assert meta.view_position == tags.ViewPosition and meta.view_position in ("PA", "AP")
        assert meta.age == int(tags.PatientAge)
        assert (meta.rows, meta.columns) == (tags.Rows, tags.Columns) == (1024, 1024)
        assert meta.pixel_spacing == (float(tags.PixelSpacing[0]), float(tags.PixelSpacing[1]))
        assert 0.13 < meta.pixel_spacing[0] < 0.2
        assert meta.modality == "CR"
        assert meta.photometric_interpretation == "MONOCHROME2"


def test_metadata_to_dict_is_json_ready(rsna_sample_dir: Path) -> None:
    path = rsna_sample_dir / f"{POSITIVE_SAMPLE}.dcm"
    record = read_dicom_metadata(path).to_dict()
    assert record["path"] == str(path)
    assert record["pixel_spacing"] == [0.139, 0.139]
    assert (record["age"], record["sex"], record["view_position"]) == (32, "F", "AP")


def test_pixels_of_real_files_are_the_stored_8_bit_values(rsna_sample_dir: Path) -> None:
    for path in rsna_files(rsna_sample_dir):
        image = read_dicom(path)
        assert image.pixels.dtype == np.uint8
        assert image.pixels.shape == (1024, 1024)
        by_pydicom = pydicom.dcmread(path).pixel_array.astype(np.int16)
        # libjpeg-turbo (our fast path) and pylibjpeg round the IDCT differently, by one level at most.
        difference = np.abs(image.pixels.astype(np.int16) - by_pydicom)
        assert difference.max() <= 1, path.name
        assert (difference > 0).mean() < 0.05, path.name
        assert image.meta == read_dicom_metadata(path)


def test_a_jpeg_frame_cut_short_is_refused_not_decoded_half_grey(rsna_sample_dir: Path) -> None:
    # pylibjpeg decodes half a stream without a word and fills the rest grey: the reader must refuse it.
    dataset = pydicom.dcmread(rsna_files(rsna_sample_dir)[0])
    stream = next(generate_frames(dataset.PixelData, number_of_frames=1))
    for cut in (stream[: len(stream) // 2], stream[:-2]):
        dataset.PixelData = encapsulate([cut])
        buffer = io.BytesIO()
        dataset.save_as(buffer)
        with pytest.raises(
            DicomReadError,
            match=r"JPEG Baseline \(Process 1\): the frame has no end marker, it was cut short\); the file is truncated",
        ) as caught:
            read_dicom_bytes(buffer.getvalue(), name="cut.dcm")
        assert caught.value.kind == "undecodable"
    dataset.PixelData = encapsulate([stream])  # the whole stream, padded to an even length, still reads
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    assert read_dicom_bytes(buffer.getvalue(), name="whole.dcm").pixels.std() > 20


def test_only_monochrome2_keeps_its_jpeg_stream(siim_dicom: Path, siim_monochrome1_dicom: Path) -> None:
    # A MONOCHROME1 stream decodes to inverted pixels, so it is not the image and must not be kept.
    assert read_dicom(siim_dicom).source_jpeg is not None
    assert read_dicom(siim_monochrome1_dicom).source_jpeg is None


def test_every_real_file_matches_an_independent_jpeg_decoder(
    rsna_sample_dir: Path, siim_dicom: Path, siim_monochrome1_dicom: Path
) -> None:
    """All 13 RSNA files and both SIIM files: our pixels equal Pillow's decode of the JPEG stream."""
    paths = [*rsna_files(rsna_sample_dir), siim_dicom, siim_monochrome1_dicom]
    assert len(paths) == 15
    for path in paths:
        dataset = pydicom.dcmread(path)
        (frame,) = list(generate_frames(dataset.PixelData, number_of_frames=1))
        decoded_by_pillow = np.asarray(Image.open(io.BytesIO(frame)), dtype=np.int16)
        if dataset.PhotometricInterpretation == "MONOCHROME1":
            decoded_by_pillow = 255 - decoded_by_pillow  # Pillow gives stored values; the reader shows dense as bright
        pixels = read_dicom(path).pixels.astype(np.int16)
        assert decoded_by_pillow.shape == pixels.shape, path.name
        # Pillow uses libjpeg-turbo too, so the two agree exactly (pydicom's pylibjpeg is within 1 level).
        np.testing.assert_array_equal(decoded_by_pillow, pixels, err_msg=path.name)
        assert pixels.std() > 20, f"{path.name}: a real radiograph, not a flat image"


def test_monochrome1_twin_is_inverted(siim_dicom: Path, siim_monochrome1_dicom: Path) -> None:
    monochrome2 = read_dicom(siim_dicom)
    monochrome1 = read_dicom(siim_monochrome1_dicom)
    assert monochrome1.meta.photometric_interpretation == "MONOCHROME1"
    np.testing.assert_array_equal(
        pydicom.dcmread(siim_dicom).pixel_array, pydicom.dcmread(siim_monochrome1_dicom).pixel_array
    )
    np.testing.assert_array_equal(monochrome1.pixels, 255 - monochrome2.pixels)
    assert monochrome2.pixels.std() > 20


# --- synthetic 8-bit and 16-bit pixels -------------------------------------------------------


def test_8_bit_pixels_pass_through(make_dicom) -> None:
    ramp = np.array([[0, 1, 2], [127, 128, 255]])
    image = read_dicom(make_dicom(rows=2, columns=3, pixels=ramp))
    np.testing.assert_array_equal(image.pixels, ramp)
    assert image.pixels.dtype == np.uint8


def test_8_bit_monochrome1_is_inverted(make_dicom) -> None:
    ramp = np.array([[0, 1, 2], [127, 128, 255]])
    image = read_dicom(make_dicom(rows=2, columns=3, pixels=ramp, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(image.pixels, [[255, 254, 253], [128, 127, 0]])


def test_16_bit_window_maps_linearly(make_dicom) -> None:
    # DICOM linear window, centre 150, width 100: [149.5 - 49.5, 149.5 + 49.5] = [100, 199] -> [0, 255], 255/99 per unit.
    stored = np.array([[0, 100, 125, 150, 175, 199, 300]])
    path = make_dicom(rows=1, columns=7, pixels=stored, bits=16, window_center=150, window_width=100)
    # below -> 0; 25 * 255/99 = 64.39 -> 64; 50 * 255/99 = 128.79 -> 129; 75 * 255/99 = 193.18 -> 193; 199 and above -> 255
    np.testing.assert_array_equal(read_dicom(path).pixels, [[0, 0, 64, 129, 193, 255, 255]])


def test_window_of_width_one_is_a_threshold(make_dicom) -> None:
    # Width 1: values above c - 0.5 are white, the rest black (PS3.3 C.11.2.1.2).
    path = make_dicom(rows=1, columns=3, pixels=np.array([[99, 100, 101]]), bits=16, window_center=100, window_width=1)
    np.testing.assert_array_equal(read_dicom(path).pixels, [[0, 255, 255]])


def test_16_bit_without_window_uses_min_max(make_dicom) -> None:
    stored = np.array([[1000, 1400, 2000, 1998]])
    path = make_dicom(rows=1, columns=4, pixels=stored, bits=16)
    # (v - 1000) * 255 / 1000: 0, 102, 255, 254.49 -> 254
    np.testing.assert_array_equal(read_dicom(path).pixels, [[0, 102, 255, 254]])


def test_16_bit_rescale_is_applied_before_the_window(make_dicom) -> None:
    stored = np.array([[500, 700, 1500]])
    path = make_dicom(
        rows=1,
        columns=3,
        pixels=stored,
        bits=16,
        rescale_slope=2,
        rescale_intercept=-1000,
        window_center=1000,
        window_width=2000,
    )
    # 2*v - 1000 = 0, 400, 2000 over the window [0, 1999] -> 0, 51, 255 (without rescale the values would differ).
    np.testing.assert_array_equal(read_dicom(path).pixels, [[0, 51, 255]])


def test_16_bit_monochrome1_is_inverted(make_dicom) -> None:
    stored = np.array([[1000, 1400, 2000]])
    path = make_dicom(rows=1, columns=3, pixels=stored, bits=16, photometric="MONOCHROME1")
    # min-max gives 0, 102, 255; inverted 255, 153, 0
    np.testing.assert_array_equal(read_dicom(path).pixels, [[255, 153, 0]])


def test_16_bit_flat_image_is_black_not_nan(make_dicom) -> None:
    path = make_dicom(rows=2, columns=2, pixels=np.full((2, 2), 700), bits=16)
    np.testing.assert_array_equal(read_dicom(path).pixels, np.zeros((2, 2)))


def test_rgb_becomes_luma(make_dicom) -> None:
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]])
    image = read_dicom(make_dicom(rows=1, columns=4, pixels=colours, samples_per_pixel=3))
    # 0.299*255 = 76.2, 0.587*255 = 149.7, 0.114*255 = 29.1
    np.testing.assert_array_equal(image.pixels, [[76, 150, 29, 255]])


def test_synthetic_metadata(make_dicom) -> None:
    meta = read_dicom_metadata(make_dicom("patient-a", rows=4, columns=6, patient_age="051Y"))
    assert (meta.patient_id, meta.patient_id_tag, meta.age, meta.sex, meta.view_position) == (
        "patient-a",
        "patient-a",
        51,
        "F",
        "PA",
    )
    assert (meta.rows, meta.columns, meta.pixel_spacing, meta.modality) == (4, 6, (0.168, 0.168), "CR")


def test_metadata_read_does_not_decode_pixels(make_dicom) -> None:
    path = make_dicom("garbage-pixels", rows=4, columns=6, pixel_data=b"garbage!")
    meta = read_dicom_metadata(path)
    assert (meta.rows, meta.columns) == (4, 6)
    with pytest.raises(DicomReadError, match=r"garbage-pixels\.dcm: pixel data cannot be decoded"):
        read_dicom(path)


def test_missing_optional_tags_give_empty_values(make_dicom) -> None:
    path = make_dicom(patient_age=None, patient_sex=None, view_position=None, pixel_spacing=None)
    meta = read_dicom_metadata(path)
    assert (meta.age, meta.sex, meta.view_position, meta.pixel_spacing) == (None, "", "", None)
    assert meta.to_dict()["pixel_spacing"] is None
    assert read_dicom(path).pixels.shape == (4, 6)


# --- bad input -------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    for reader in (read_dicom, read_dicom_metadata):
        with pytest.raises(DicomReadError, match=r"empty\.dcm: file is empty \(0 bytes\)"):
            reader(path)


def test_text_file_named_dcm(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("patientId,x,y,width,height,Target\n" * 20)
    with pytest.raises(DicomReadError, match=r"notes\.dcm: not a DICOM file") as caught:
        read_dicom(path)
    assert caught.value.path == path
    assert caught.value.reason.startswith("not a DICOM file")


def test_truncated_real_file(rsna_sample_dir: Path, tmp_path: Path) -> None:
    data = (rsna_sample_dir / f"{POSITIVE_SAMPLE}.dcm").read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DicomReadError, match=r"truncated\.dcm: .*truncated"):
        read_dicom(path)


def test_truncated_uncompressed_file(make_dicom) -> None:
    path = make_dicom("cut", rows=64, columns=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(DicomReadError, match=r"cut\.dcm: .*truncated"):
        read_dicom(path)


def test_dicom_without_pixel_data(make_dicom) -> None:
    path = make_dicom("no-pixels", with_pixels=False)
    assert read_dicom_metadata(path).rows == 4
    with pytest.raises(DicomReadError, match=r"no-pixels\.dcm: has no pixel data"):
        read_dicom(path)


def test_multi_frame_file(make_dicom) -> None:
    path = make_dicom("cine", number_of_frames=3)
    with pytest.raises(DicomReadError, match=r"cine\.dcm: is multi-frame \(3 frames\)"):
        read_dicom(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.dcm"
    for reader in (read_dicom, read_dicom_metadata):
        with pytest.raises(DicomReadError, match=r"nowhere\.dcm: file not found"):
            reader(path)


def test_dicom_read_error_is_a_lungdet_error() -> None:
    error = DicomReadError(Path("a.dcm"), "file not found")
    assert isinstance(error, LungdetError) and isinstance(error, ValueError)
    assert str(error) == "a.dcm: file not found"


# --- find_dicoms -----------------------------------------------------------------------------


def test_find_dicoms_is_sorted_recursive_and_ignores_other_files(tmp_path: Path) -> None:
    for name in ("b.dcm", "a.dcm", "sub/deeper/c.dcm", "sub/0.DCM", "notes.txt", "a.dcm.bak", "sub/image.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.dcm").mkdir()
    found = find_dicoms(tmp_path)
    assert [path.relative_to(tmp_path).as_posix() for path in found] == [
        "a.dcm",
        "b.dcm",
        "sub/0.DCM",
        "sub/deeper/c.dcm",
    ]


def test_find_dicoms_on_the_sample(rsna_sample_dir: Path) -> None:
    found = find_dicoms(rsna_sample_dir)
    assert len(found) == RSNA_FILE_COUNT
    assert found == sorted(found)


def test_find_dicoms_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(LungdetError, match=re.escape(str(tmp_path / "absent")) + ": not a folder"):
        find_dicoms(tmp_path / "absent")


# --- DICOMs held in memory --------------------------------------------------------------------


def test_read_dicom_bytes_equals_read_dicom(rsna_sample_dir: Path) -> None:
    from lungdet.data_tools.dicom_io import read_dicom_bytes

    path = rsna_files(rsna_sample_dir)[0]
    from_file, from_bytes = read_dicom(path), read_dicom_bytes(path.read_bytes(), name="upload 0123")
    assert np.array_equal(from_file.pixels, from_bytes.pixels)
    assert from_bytes.meta.patient_id == "upload 0123"
    assert from_bytes.meta.age == from_file.meta.age and from_bytes.meta.view_position == from_file.meta.view_position
    with pytest.raises(DicomReadError, match="^upload 0123: file is empty"):
        read_dicom_bytes(b"", name="upload 0123")


def test_deflated_dicom_is_refused_only_when_limits_are_on(make_dicom) -> None:
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from lungdet.data_tools.dicom_io import read_dicom_bytes

    dataset = pydicom.dcmread(make_dicom("deflated", rows=40, columns=40))
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    assert read_dicom_bytes(buffer.getvalue(), name="trusted").pixels.shape == (40, 40)
    with pytest.raises(
        DicomReadError, match="Deflated Explicit VR Little Endian, which is refused here: it inflates in memory"
    ) as caught:
        read_dicom_bytes(buffer.getvalue(), name="upload", max_pixels=10**6)
    assert caught.value.kind == "unsupported_compression"


def test_datasets_for_what_references_or_re_encodes_a_dicom(rsna_sample_dir: Path, tmp_path: Path) -> None:
    from lungdet.data_tools.dicom_io import image_from_dataset, read_dataset, read_dataset_bytes

    path = rsna_files(rsna_sample_dir)[0]
    headers, whole = read_dataset(path, headers_only=True), read_dataset(path)
    assert "PixelData" not in headers and headers.SOPInstanceUID == whole.SOPInstanceUID
    assert whole.PixelData == pydicom.dcmread(path).PixelData  # stored as it is, not decoded
    # One parse serves both the tags and the pixels: the image is the one read_dicom gives.
    parsed = read_dataset_bytes(path.read_bytes(), name="instance 1", untrusted=True)
    image = image_from_dataset(parsed, name="instance 1", max_pixels=10**7)
    assert np.array_equal(image.pixels, read_dicom(path).pixels) and image.meta.patient_id == "instance 1"
    # The reader's checks hold for every caller: truncation, not-DICOM, a missing file.
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(DicomReadError, match=r"cut\.dcm: file is truncated") as caught:
        read_dataset(cut)
    assert caught.value.kind == "truncated"
    with pytest.raises(DicomReadError, match="^instance 2: not a DICOM file"):
        read_dataset_bytes(b"\0" * 200, name="instance 2")
    with pytest.raises(DicomReadError, match=r"gone\.dcm: file not found"):
        read_dataset(tmp_path / "gone.dcm", headers_only=True)
