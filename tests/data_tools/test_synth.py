"""Tests of data_tools.synth: DICOM format, labels CSVs, determinism, geometry and statistics."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from lungdet.data_tools import synth
from lungdet.data_tools.labels import read_labels


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthSummary]:
    """Six 256x256 images, half of them positive, written once for the module."""
    out_dir = tmp_path_factory.mktemp("synth")
    summary = synth.write_synthetic_dataset(out_dir, count=6, seed=3, positive_fraction=0.5, size=(256, 256))
    return out_dir, summary


def test_summary_counts_and_layout(small_dataset: tuple[Path, synth.SynthSummary]) -> None:
    out_dir, summary = small_dataset
    assert summary.count == 6
    assert summary.positive_count == 3  # round(6 * 0.5), exactly
    assert summary.images_dir == out_dir / "stage_2_train_images"
    assert len(list(summary.images_dir.glob("*.dcm"))) == 6
    assert summary.labels_csv.name == "stage_2_train_labels.csv"
    assert summary.class_info_csv.name == "stage_2_detailed_class_info.csv"
    # Atomic writes leave no temporary files behind.
    assert not [path for path in out_dir.rglob(".*") if path.is_file()]


def test_dicom_tags_match_the_real_rsna_layout(small_dataset: tuple[Path, synth.SynthSummary]) -> None:
    out_dir, summary = small_dataset
    labels = read_labels(summary.labels_csv)
    for path in sorted(summary.images_dir.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        assert dataset.file_meta.TransferSyntaxUID == JPEGBaseline8Bit == "1.2.840.10008.1.2.4.50"
        assert dataset.file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage
        assert dataset.SOPClassUID == SecondaryCaptureImageStorage
        assert dataset.SOPInstanceUID == dataset.file_meta.MediaStorageSOPInstanceUID
        assert dataset.preamble == b"\x00" * 128
        assert dataset.Modality == "CR"
        assert (dataset.Rows, dataset.Columns) == (256, 256)
        assert dataset.SamplesPerPixel == 1
        assert dataset.PhotometricInterpretation == "MONOCHROME2"
        assert (dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation) == (8, 8, 7, 0)
        assert dataset.PatientID == str(dataset.PatientName) == path.stem
        assert dataset.PatientSex in ("M", "F")
        # A plain integer string, as in the real files ('51', not '051Y').
        assert dataset["PatientAge"].value.isdigit() and 1 <= int(dataset["PatientAge"].value) <= 92
        assert dataset.ViewPosition in ("AP", "PA")
        assert dataset.SeriesDescription == f"view: {dataset.ViewPosition}"
        assert dataset.BodyPartExamined == "CHEST"
        assert dataset.LossyImageCompression == "01"
        # 256 px cover the field of view of a real 1024 px film: spacing is 4x a real value.
        assert min(abs(float(dataset.PixelSpacing[0]) / 4 - choice) for choice in synth.PIXEL_SPACING_CHOICES_MM) < 1e-6
        assert dataset["PixelData"].is_undefined_length
        assert path.stem in labels


def test_pixels_decode_close_to_what_was_drawn() -> None:
    case = synth.generate_case(np.random.default_rng(11), size=(256, 256), positive=True)
    dicom_bytes = synth.encode_dicom(case)
    dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dicom_bytes))
    decoded = dataset.pixel_array  # pylibjpeg
    assert decoded.shape == (256, 256) and decoded.dtype == np.uint8
    # Two JPEG decoders agree within 1 grey level on the same bytes ...
    jpeg = next(generate_frames(dataset.PixelData, number_of_frames=1))
    opencv_decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert np.abs(decoded.astype(int) - opencv_decoded.astype(int)).max() <= 1
    # ... and lossy JPEG at quality 90 stays within a few grey levels of the drawing on average.
    assert np.abs(decoded.astype(float) - case.pixels).mean() < 3.0


def test_labels_csv_has_the_rsna_format(small_dataset: tuple[Path, synth.SynthSummary]) -> None:
    out_dir, summary = small_dataset
    with open(summary.labels_csv, newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["patientId", "x", "y", "width", "height", "Target"]
    box_rows: dict[str, int] = {}
    for patient_id, x, y, width, height, target in rows[1:]:
        if target == "0":
            assert (x, y, width, height) == ("", "", "", "")
            box_rows[patient_id] = 0
        else:
            assert target == "1"
            assert all("." in value for value in (x, y, width, height))  # floats like '264.0'
            box_rows[patient_id] = box_rows.get(patient_id, 0) + 1
    assert len(box_rows) == 6
    assert sum(count > 0 for count in box_rows.values()) == 3

    labels = read_labels(summary.labels_csv, summary.class_info_csv)
    for patient_id, patient in labels.items():
        assert len(patient.boxes) == box_rows[patient_id]
        assert patient.target == int(box_rows[patient_id] > 0)
        assert (patient.class_name == "Lung Opacity") == (patient.target == 1)
        assert patient.class_name in ("Lung Opacity", "Normal", "No Lung Opacity / Not Normal")

    with open(summary.class_info_csv, newline="") as stream:
        class_rows = list(csv.reader(stream))
    assert class_rows[0] == ["patientId", "class"]
    # Same row order as the labels file, as in the real pair.
    assert [row[0] for row in class_rows[1:]] == [row[0] for row in rows[1:]]


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    first = synth.write_synthetic_dataset(tmp_path / "a", count=3, seed=5, size=(128, 128), positive_fraction=0.34)
    second = synth.write_synthetic_dataset(tmp_path / "b", count=3, seed=5, size=(128, 128), positive_fraction=0.34)
    other = synth.write_synthetic_dataset(tmp_path / "c", count=3, seed=6, size=(128, 128), positive_fraction=0.34)

    def contents(summary: synth.SynthSummary) -> dict[str, bytes]:
        files = {path.name: path.read_bytes() for path in summary.images_dir.glob("*.dcm")}
        files["labels"] = summary.labels_csv.read_bytes()
        files["class_info"] = summary.class_info_csv.read_bytes()
        return files

    assert contents(first) == contents(second)
    assert set(contents(first)) != set(contents(other))  # different patientIds
    assert contents(first)["labels"] != contents(other)["labels"]


def test_non_square_image_keeps_boxes_inside_and_stretches_anatomy() -> None:
    rows, columns = 200, 320
    for index in range(20):
        case = synth.generate_case(np.random.default_rng([2, index]), size=(rows, columns), positive=True)
        assert case.pixels.shape == (rows, columns)
        assert 1 <= len(case.boxes) <= 4
        x, y, width, height = case.boxes.T
        assert (x >= 0).all() and (y >= 0).all() and (width > 0).all() and (height > 0).all()
        assert (x + width <= columns).all() and (y + height <= rows).all()
        # Boxes sit in the lung fields: their centres in the middle 80% of the width.
        assert ((x + width / 2 > 0.1 * columns) & (x + width / 2 < 0.9 * columns)).all()


def test_negative_case_has_no_boxes_and_a_negative_class() -> None:
    case = synth.generate_case(np.random.default_rng(4), size=(128, 128), positive=False)
    assert case.boxes.shape == (0, 4)
    assert case.target == 0
    assert case.class_name in ("Normal", "No Lung Opacity / Not Normal")


def test_opacity_brightens_inside_its_box_not_the_ring_around_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The label must be where the patch is drawn.

    Each case is drawn twice from the same seed, the second time with the patches drawn onto a
    throw-away copy (same random draws, so everything else is identical). The difference is
    the patch alone: it must brighten the inside of each box and leave a ring around it nearly
    untouched (the soft edge may spill a little).
    """
    draw_opacities = synth.draw_opacities

    def draw_on_a_copy(rng: np.random.Generator, image: np.ndarray, planned: list, **kwargs: int) -> np.ndarray:
        return draw_opacities(rng, image.copy(), planned, **kwargs)

    checked = 0
    for index in range(30):
        with_patches = synth.generate_case(np.random.default_rng([3, index]), size=(256, 256), positive=True)
        with monkeypatch.context() as patch:
            patch.setattr(synth, "draw_opacities", draw_on_a_copy)
            without = synth.generate_case(np.random.default_rng([3, index]), size=(256, 256), positive=True)
        np.testing.assert_array_equal(with_patches.boxes, without.boxes)
        added = with_patches.pixels.astype(float) - without.pixels.astype(float)
        for x, y, width, height in with_patches.boxes.astype(int):
            inside = np.zeros(added.shape, dtype=bool)
            inside[y : y + height, x : x + width] = True
            ring_width = max(3, int(0.1 * min(width, height)))
            ring = np.zeros(added.shape, dtype=bool)
            ring[max(0, y - ring_width) : y + height + ring_width, max(0, x - ring_width) : x + width + ring_width] = (
                True
            )
            ring &= ~inside
            if len(with_patches.boxes) > 1:
                # Another patch may sit in this box's ring; only look where no other box is.
                for other in with_patches.boxes.astype(int):
                    ring[other[1] : other[1] + other[3], other[0] : other[0] + other[2]] = False
            assert added[inside].mean() > 20, f"case {index}: box {(x, y, width, height)} barely brightened"
            assert added[ring].mean() < 0.25 * added[inside].mean(), (
                f"case {index}: patch spills out of box {(x, y, width, height)}"
            )
            checked += 1
    assert checked >= 30


def test_box_size_medians_match_the_real_labels() -> None:
    """Over 300 positives at 256 px, median width/height within 12% of the real medians (scaled 1024 -> 256)."""
    widths, heights = [], []
    for index in range(300):
        case = synth.generate_case(np.random.default_rng([17, index]), size=(256, 256), positive=True)
        widths.extend(case.boxes[:, 2])
        heights.extend(case.boxes[:, 3])
    assert np.median(widths) == pytest.approx(synth.REAL_BOX_WIDTH_MEDIAN_1024 / 4, rel=0.12)
    assert np.median(heights) == pytest.approx(synth.REAL_BOX_HEIGHT_MEDIAN_1024 / 4, rel=0.12)
    # Roughly 1.6 boxes per positive image, as in the real labels (9,555 / 6,012 = 1.59).
    assert 1.4 < len(widths) / 300 < 1.75


def test_refuses_to_mix_with_existing_images_unless_overwrite(tmp_path: Path) -> None:
    synth.write_synthetic_dataset(tmp_path, count=2, seed=0, size=(96, 96))
    with pytest.raises(synth.SynthError, match=r"already holds 2 \.dcm files.*--overwrite"):
        synth.write_synthetic_dataset(tmp_path, count=1, seed=1, size=(96, 96))
    summary = synth.write_synthetic_dataset(tmp_path, count=1, seed=1, size=(96, 96), overwrite=True)
    assert len(list(summary.images_dir.glob("*.dcm"))) == 1


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("count", 0, r"count must be between 1 and 1000000, got 0"),
        ("positive_fraction", 1.5, r"positive_fraction must be between 0 and 1, got 1.5"),
        ("seed", -1, r"seed must be >= 0, got -1"),
        ("size", (32, 256), r"image rows must be between 64 and 8192 pixels, got 32"),
    ],
)
def test_write_rejects_out_of_range_arguments(tmp_path: Path, keyword: str, value: object, message: str) -> None:
    arguments = {"count": 1, "size": (96, 96), keyword: value}
    with pytest.raises(ValueError, match=message):
        synth.write_synthetic_dataset(tmp_path, **arguments)  # type: ignore[arg-type]


def test_cli_parses_and_checks_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    parser = synth.get_args_parser()
    args = parser.parse_args(["--out", "x", "--size", "800x1200", "--count", "5", "--positive-fraction", "0.3"])
    assert (
        args.size == (1200, 800) and args.count == 5
    )  # WIDTHxHEIGHT in, (rows, columns) out and args.positive_fraction == 0.3 and args.seed == 0
    assert parser.parse_args(["--out", "x", "--size", "512"]).size == (512, 512)
    assert parser.parse_args(["--out", "x"]).count == 200
    for bad, message in [
        (["--size", "800by1200"], "argument --size: expected WIDTHxHEIGHT in pixels like 1024x1024, got '800by1200'"),
        (["--size", "10"], "--size: image rows must be between 64 and 8192"),
        (["--positive-fraction", "2"], "argument --positive-fraction: must be in [0, 1], got 2"),
        (["--count", "0"], "argument --count: must be between 1 and 1000000, got 0"),
    ]:
        with pytest.raises(SystemExit):
            parser.parse_args(["--out", "x", *bad])
        assert message in capsys.readouterr().err


def test_cli_main_writes_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = synth.get_args_parser().parse_args(
        ["--out", str(tmp_path), "--count", "3", "--size", "96x128", "--seed", "2"]
    )
    assert synth.main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 synthetic DICOMs (96x128, seed 2)" in printed  # 96 wide, 128 tall
    assert {pydicom.dcmread(path).pixel_array.shape for path in (tmp_path / "stage_2_train_images").glob("*.dcm")} == {
        (128, 96)
    }
    assert str(tmp_path / "stage_2_train_labels.csv") in printed
    assert len(list((tmp_path / "stage_2_train_images").glob("*.dcm"))) == 3
