"""Tests for ``lungdet convert --image-dir``: PNG/JPEG derivatives, their metadata CSV, the labels' pixel space, bad input.

The real images are six of the 1,000 RSNA JPEGs in ``shared/data/rsna_real``, linked (never
copied into the repo) into a temporary folder; the odd and broken files are made in code.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungdet.cli import main as cli_main
from lungdet.data_tools.conversion_report import format_report
from lungdet.data_tools.labels import PatientLabels, read_labels
from lungdet.data_tools.metadata import read_metadata_csv
from lungdet.data_tools.to_coco import ConvertOptions, convert_dataset

# Two positives with two boxes, one with one, three negatives; AP and PA views.
TWO_BOXES_AP = "01be392f-a46d-4aef-a57e-9cd1a80dd47e"  # 14 M AP, boxes (535,626,177,240) and (175,825,168,109)
TWO_BOXES_AP_2 = "06420c87-02ee-4315-aa3a-63e911174435"
ONE_BOX_AP = "049d7317-5a8b-4fc4-b81f-159fe6b45a92"
NEGATIVE_PA = "0004cfab-14fd-4e49-80ba-63a80b6bddd6"  # 51 F PA; also a DICOM in rsna_sample
NEGATIVE_PA_2 = "00f87de5-5fe0-4921-93ea-914d7e683266"
NEGATIVE_AP = "01c0b605-0a82-401b-9649-81252304ac45"
REAL_PATIENTS = (TWO_BOXES_AP, TWO_BOXES_AP_2, ONE_BOX_AP, NEGATIVE_PA, NEGATIVE_PA_2, NEGATIVE_AP)


@pytest.fixture(scope="module")
def real_labels(rsna_real_dir: Path) -> dict[str, PatientLabels]:
    return read_labels(rsna_real_dir / "labels.csv", rsna_real_dir / "class_info.csv")


@pytest.fixture
def real_image_dir(rsna_real_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for patient in REAL_PATIENTS:
        os.symlink(rsna_real_dir / "images" / f"{patient}.jpg", folder / f"{patient}.jpg")
    return folder


def subset_labels(labels: dict[str, PatientLabels], patients) -> dict[str, PatientLabels]:
    return {patient: labels[patient] for patient in patients}


def read_metadata_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return {row["patientId"]: row for row in csv.DictReader(stream)}


def coco_images(out_dir: Path) -> dict[str, dict]:
    return {image["patient_id"]: image for image in json.loads((out_dir / "annotations.json").read_text())["images"]}


def coco_boxes(out_dir: Path) -> dict[str, list[list[float]]]:
    coco = json.loads((out_dir / "annotations.json").read_text())
    by_id = {image["id"]: image["patient_id"] for image in coco["images"]}
    boxes: dict[str, list[list[float]]] = {patient: [] for patient in by_id.values()}
    for annotation in coco["annotations"]:
        boxes[by_id[annotation["image_id"]]].append(annotation["bbox"])
    return boxes


# --- real JPEGs at their own size ------------------------------------------------------------


def test_real_jpegs_convert_with_their_tags_boxes_and_bytes(
    real_image_dir: Path, rsna_real_dir: Path, real_labels, tmp_path: Path
) -> None:
    out_dir = tmp_path / "coco"
    metadata = read_metadata_csv(rsna_real_dir / "metadata.csv")
    report = convert_dataset(
        real_image_dir,
        real_labels,
        out_dir,
        ConvertOptions(folds=2),
        source="picture",
        metadata=metadata,
        progress=False,
    )
    assert (report.converted, report.positives, report.boxes) == (6, 3, 5)
    assert (
        report.bad_files == [] and report.notes == [] and report.boxes_past_edge == 0 and report.metadata_problems == []
    )
    assert report.labelled_without_dicom == 994
    images = coco_images(out_dir)
    tags = read_metadata_rows(rsna_real_dir / "metadata.csv")
    for patient in REAL_PATIENTS:
        image = images[patient]
        # Nothing changes the pixels: the JPEG itself is the converted image, byte for byte.
        assert image["file_name"] == f"images/{patient}.jpg"
        assert (out_dir / image["file_name"]).read_bytes() == (rsna_real_dir / "images" / f"{patient}.jpg").read_bytes()
        assert (image["width"], image["height"], image["original_width"], image["original_height"]) == (
            1024,
            1024,
            1024,
            1024,
        )
        assert (image["age"], image["sex"], image["view_position"]) == (
            int(tags[patient]["PatientAge"]),
            tags[patient]["PatientSex"],
            tags[patient]["ViewPosition"],
        )
        assert image["pixel_spacing"] is None  # the CSV has no PixelSpacing column
    assert images[TWO_BOXES_AP]["class_name"] == "Lung Opacity" and images[NEGATIVE_PA]["target"] == 0
    assert sorted(coco_boxes(out_dir)[TWO_BOXES_AP]) == [[175.0, 825.0, 168.0, 109.0], [535.0, 626.0, 177.0, 240.0]]
    assert coco_boxes(out_dir)[NEGATIVE_AP] == []
    summary = format_report(report, out_dir)
    assert "the labels are taken to be in each image's own pixels" in summary
    assert "tags PatientAge, PatientSex, ViewPosition from" in summary and "(no PixelSpacing: unknown)" in summary


def test_without_metadata_the_tags_are_unknown_and_said_so(real_image_dir: Path, real_labels, tmp_path: Path) -> None:
    report = convert_dataset(
        real_image_dir,
        subset_labels(real_labels, REAL_PATIENTS),
        tmp_path / "coco",
        ConvertOptions(folds=2),
        source="picture",
        progress=False,
    )
    image = coco_images(tmp_path / "coco")[NEGATIVE_PA]
    assert (image["age"], image["sex"], image["view_position"]) == (None, "", "")
    assert report.notes == []  # one line in the summary, not a note per file
    assert "no --metadata: age, sex and view position are unknown" in format_report(report, tmp_path / "coco")


def test_resized_copies_scale_the_labels_from_their_space(rsna_real_dir: Path, real_labels, tmp_path: Path) -> None:
    """RSNA labels (1024 px) on 256 px PNG derivatives: --label-space 1024x1024 scales each box by 1/4, and back at prediction."""
    folder = tmp_path / "png256"
    folder.mkdir()
    for patient in (TWO_BOXES_AP, NEGATIVE_PA):
        pixels = cv2.imread(str(rsna_real_dir / "images" / f"{patient}.jpg"), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(folder / f"{patient}.png"), cv2.resize(pixels, (256, 256), interpolation=cv2.INTER_AREA))
    labels = subset_labels(real_labels, (TWO_BOXES_AP, NEGATIVE_PA))
    scaled = convert_dataset(
        folder,
        labels,
        tmp_path / "scaled",
        ConvertOptions(folds=2),
        source="picture",
        label_space=(1024, 1024),
        progress=False,
    )
    assert sorted(coco_boxes(tmp_path / "scaled")[TWO_BOXES_AP]) == [
        [43.75, 206.25, 42.0, 27.25],
        [133.75, 156.5, 44.25, 60.0],
    ]
    image = coco_images(tmp_path / "scaled")[TWO_BOXES_AP]
    assert (image["width"], image["original_width"], image["file_name"]) == (256, 1024, f"images/{TWO_BOXES_AP}.png")
    # The PNG is 8-bit grey and unchanged: copied byte for byte too.
    assert (tmp_path / "scaled" / image["file_name"]).read_bytes() == (folder / f"{TWO_BOXES_AP}.png").read_bytes()
    assert scaled.boxes_past_edge == 0
    assert "the labels are in 1024x1024 pixels (--label-space)" in format_report(scaled, tmp_path / "scaled")
    assert json.loads((tmp_path / "scaled" / "annotations.json").read_text())["info"]["label_space"] == "1024x1024"

    # Without --label-space the 1024 px boxes land past the 256 px images, and the summary says what to do.
    unscaled = convert_dataset(
        folder, labels, tmp_path / "unscaled", ConvertOptions(folds=2), source="picture", progress=False
    )
    assert unscaled.boxes_past_edge == 2 and len(unscaled.dropped_boxes) == 2
    assert "give --label-space 1024x1024" in format_report(unscaled, tmp_path / "unscaled")


def test_a_resize_writes_a_png_of_the_prepared_pixels(real_image_dir: Path, real_labels, tmp_path: Path) -> None:
    convert_dataset(
        real_image_dir,
        subset_labels(real_labels, REAL_PATIENTS),
        tmp_path / "coco",
        ConvertOptions(image_size=256, folds=2),
        source="picture",
        progress=False,
    )
    image = coco_images(tmp_path / "coco")[ONE_BOX_AP]
    assert image["file_name"] == f"images/{ONE_BOX_AP}.png" and (image["width"], image["original_width"]) == (256, 1024)
    assert coco_boxes(tmp_path / "coco")[ONE_BOX_AP] == [[161.25, 94.5, 49.75, 24.0]]
    written = cv2.imread(str(tmp_path / "coco" / image["file_name"]), cv2.IMREAD_GRAYSCALE)
    source = cv2.imread(str(real_image_dir / f"{ONE_BOX_AP}.jpg"), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(written, cv2.resize(source, (256, 256), interpolation=cv2.INTER_AREA))


# --- bad and odd input -----------------------------------------------------------------------


@pytest.fixture
def messy_image_dir(real_image_dir: Path, rsna_real_dir: Path) -> Path:
    """The six real JPEGs plus broken and odd files, each named after a labelled patient unless said otherwise."""
    real = (rsna_real_dir / "images" / f"{NEGATIVE_PA}.jpg").read_bytes()
    (real_image_dir / "truncated-0001.jpg").write_bytes(real[: len(real) // 3])
    (real_image_dir / "empty-0002.png").write_bytes(b"")
    (real_image_dir / "text-0003.png").write_text("not a picture")
    colour = np.zeros((300, 300, 3), dtype=np.uint8)
    colour[:, :, 2] = 200  # red in OpenCV's BGR order
    cv2.imwrite(str(real_image_dir / "colour-0004.png"), colour)
    cv2.imwrite(str(real_image_dir / "small-0005.png"), np.full((100, 120), 90, dtype=np.uint8))
    cv2.imwrite(str(real_image_dir / "speck-0006.png"), np.full((10, 10), 90, dtype=np.uint8))
    cv2.imwrite(str(real_image_dir / "unlabelled-0007.png"), np.full((300, 300), 90, dtype=np.uint8))
    return real_image_dir


def messy_labels(real_labels) -> dict[str, PatientLabels]:
    labels = subset_labels(real_labels, REAL_PATIENTS)
    for patient in (
        "truncated-0001",
        "empty-0002",
        "text-0003",
        "colour-0004",
        "small-0005",
        "speck-0006",
        "no-file-0008",
    ):
        labels[patient] = PatientLabels(patient, np.zeros((0, 4)), 0)
    return labels


def write_metadata(path: Path, rows: list[str]) -> Path:
    path.write_text("patientId,PatientAge,PatientSex,ViewPosition\n" + "\n".join(rows) + "\n")
    return path


def test_every_bad_input_is_named_and_counted(messy_image_dir: Path, real_labels, tmp_path: Path) -> None:
    metadata = write_metadata(
        tmp_path / "metadata.csv",
        [
            f"{TWO_BOXES_AP},14,M,AP",
            f"{TWO_BOXES_AP_2},47,M,AP",
            f"{ONE_BOX_AP},15,M,AP",
            f"{NEGATIVE_PA},fifty,F,PA",
            f"{NEGATIVE_PA_2},36,M,PA",
            f"{NEGATIVE_AP},68,M,AP",
            "colour-0004,40,F,PA",
            "small-0005,40,F,PA",
            "stranger-0099,33,F,PA",  # not in the labels
        ],
    )
    out_dir = tmp_path / "coco"
    report = convert_dataset(
        messy_image_dir,
        messy_labels(real_labels),
        out_dir,
        ConvertOptions(folds=2),
        source="picture",
        metadata=read_metadata_csv(metadata),
        progress=False,
    )
    bad = {Path(item["file"]).stem: item["kind"] for item in report.bad_files}
    assert bad == {
        "truncated-0001": "truncated",
        "empty-0002": "empty",
        "text-0003": "not_an_image",
        "speck-0006": "too_small",
    }
    notes = {
        (Path(item["file"]).stem if not item["file"].endswith(".csv") else "csv", item["kind"]) for item in report.notes
    }
    assert ("colour-0004", "rgb_converted") in notes and ("small-0005", "tiny_image") in notes
    assert {
        Path(item["file"]).name for item in report.notes if item["kind"] == "no_metadata"
    } == set()  # every converted file had a row
    problems = {item["kind"]: item for item in report.metadata_problems}
    assert set(problems) == {"age_unreadable", "metadata_unknown_patient"}
    assert (
        problems["age_unreadable"]["file"].endswith("metadata.csv line 5")
        and "'fifty'" in problems["age_unreadable"]["reason"]
    )
    assert "stranger-0099" in problems["metadata_unknown_patient"]["reason"]
    assert [Path(path).name for path in report.unlabelled_files] == ["unlabelled-0007.png"]
    assert report.labelled_without_dicom_ids == ["no-file-0008"]
    assert report.converted == 8
    images = coco_images(out_dir)
    assert (
        images[NEGATIVE_PA]["age"] is None and images[NEGATIVE_PA]["sex"] == "F"
    )  # the unreadable age alone is left out
    colour = cv2.imread(str(out_dir / images["colour-0004"]["file_name"]), cv2.IMREAD_UNCHANGED)
    assert colour.ndim == 2 and images["colour-0004"]["file_name"].endswith(".png")
    summary = format_report(report, out_dir)
    for line in (
        "skipped 4 unreadable images (empty: 1, not_an_image: 1, too_small: 1, truncated: 1)",
        "skipped 1 images the labels do not name",
        "1 labelled patients have no image file in this folder",
        "2 metadata rows not used as given (age_unreadable: 1, metadata_unknown_patient: 1)",
        "converted with notes (rgb_converted: 1, tiny_image: 1)",
    ):
        assert line in summary


def test_a_converted_image_without_a_metadata_row_is_noted(real_image_dir: Path, real_labels, tmp_path: Path) -> None:
    metadata = write_metadata(tmp_path / "metadata.csv", [f"{TWO_BOXES_AP},14,M,AP"])
    report = convert_dataset(
        real_image_dir,
        subset_labels(real_labels, REAL_PATIENTS),
        tmp_path / "coco",
        ConvertOptions(folds=2),
        source="picture",
        metadata=read_metadata_csv(metadata),
        progress=False,
    )
    assert sorted(Path(note["file"]).stem for note in report.notes if note["kind"] == "no_metadata") == sorted(
        set(REAL_PATIENTS) - {TWO_BOXES_AP}
    )
    assert coco_images(tmp_path / "coco")[ONE_BOX_AP]["view_position"] == ""


def test_a_dicom_in_an_image_folder_is_refused(
    real_image_dir: Path, rsna_sample_dir: Path, real_labels, tmp_path: Path
) -> None:
    (real_image_dir / f"{NEGATIVE_PA}.jpg").unlink()
    (real_image_dir / f"{NEGATIVE_PA}.png").write_bytes((rsna_sample_dir / f"{NEGATIVE_PA}.dcm").read_bytes())
    report = convert_dataset(
        real_image_dir,
        subset_labels(real_labels, REAL_PATIENTS),
        tmp_path / "coco",
        ConvertOptions(folds=2),
        source="picture",
        progress=False,
    )
    assert [(Path(item["file"]).name, item["kind"]) for item in report.bad_files] == [
        (f"{NEGATIVE_PA}.png", "not_an_image")
    ]
    assert "--dicom-dir" in report.bad_files[0]["reason"]


def test_a_rerun_after_new_metadata_keeps_the_images(real_image_dir: Path, real_labels, tmp_path: Path) -> None:
    labels = subset_labels(real_labels, REAL_PATIENTS)
    convert_dataset(
        real_image_dir, labels, tmp_path / "coco", ConvertOptions(folds=2), source="picture", progress=False
    )
    metadata = write_metadata(tmp_path / "metadata.csv", [f"{patient},40,F,PA" for patient in REAL_PATIENTS])
    report = convert_dataset(
        real_image_dir,
        labels,
        tmp_path / "coco",
        ConvertOptions(folds=2),
        source="picture",
        metadata=read_metadata_csv(metadata),
        progress=False,
    )
    assert report.reused == 6
    assert {image["age"] for image in coco_images(tmp_path / "coco").values()} == {40}


# --- the command -----------------------------------------------------------------------------


def test_cli_converts_an_image_folder(real_image_dir: Path, rsna_real_dir: Path, tmp_path: Path, capsys) -> None:
    status = cli_main(
        [
            "convert",
            "--image-dir",
            str(real_image_dir),
            "--labels",
            str(rsna_real_dir / "labels.csv"),
            "--class-info",
            str(rsna_real_dir / "class_info.csv"),
            "--metadata",
            str(rsna_real_dir / "metadata.csv"),
            "--out",
            str(tmp_path / "coco"),
            "--image-size",
            "256",
            "--workers",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "converted 6 images (3 with opacities, 5 boxes)" in out
    assert "994 labelled patients have no image file in this folder" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dicom-dir", "x", "--metadata", "m.csv"], "--metadata and --label-space go with --image-dir"),
        (["--dicom-dir", "x", "--label-space", "1024x1024"], "--metadata and --label-space go with --image-dir"),
        (["--image-dir", "x", "--label-space", "1024by1024"], "expected WIDTHxHEIGHT in pixels like 1024x1024"),
        (["--image-dir", "x", "--dicom-dir", "y"], "not allowed with argument"),
    ],
)
def test_cli_rejects_misplaced_options(extra: list[str], message: str, tmp_path: Path, capsys) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("patientId,x,y,width,height,Target\na,,,,,0\n")
    try:
        status = cli_main(["convert", *extra, "--labels", str(labels), "--out", str(tmp_path / "out")])
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_image_folder_without_images(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("patientId,x,y,width,height,Target\na,,,,,0\n")
    status = cli_main(
        ["convert", "--image-dir", str(tmp_path / "empty"), "--labels", str(labels), "--out", str(tmp_path / "out")]
    )
    assert status == 1
    assert "holds .png or .jpg files named by patientId" in capsys.readouterr().err
