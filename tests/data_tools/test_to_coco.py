"""Tests for data_tools/to_coco.py: folds, conversion of the real sample, synthetic geometry, bad input, CLI."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lungdet.cli import main as cli_main
from lungdet.data_tools.conversion_report import ConversionReport, format_report
from lungdet.data_tools.dicom_io import read_dicom
from lungdet.data_tools.labels import PatientLabels, read_labels
from lungdet.data_tools.pixels import normalize_pixels
from lungdet.data_tools.to_coco import ConvertOptions, convert_dataset
from lungdet.errors import LungdetError

POSITIVE_SAMPLE = "00436515-870c-4b36-a041-de91049b9ab4"
NEGATIVE_SAMPLE = "0004cfab-14fd-4e49-80ba-63a80b6bddd6"
# Patients in the labels whose DICOMs are not in the sample: names for the broken files.
LABELLED_NOT_IN_SAMPLE = (
    "00d7c36e-3cdf-4df6-ac03-6c30cdc8e85b",
    "00f08de1-517e-4652-a04f-d1dc9ee48593",
    "00f87de5-5fe0-4921-93ea-914d7e683266",
)
LABEL_HEADER = "patientId,x,y,width,height,Target\n"


def read_folds_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def temporary_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.endswith(".tmp")]


def evaluate_bbox_ap(coco: COCO, detections: list[dict[str, object]]) -> np.ndarray:
    """COCO bbox stats of ``detections`` against ``coco`` (pycocotools prints its table; keep it quiet)."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


@pytest.fixture(scope="module")
def real_labels(rsna_labels_csv: Path) -> dict[str, PatientLabels]:
    return read_labels(rsna_labels_csv)


# --- the real sample at 256 x 256 ------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_sample(rsna_sample_dir: Path, real_labels, tmp_path_factory) -> tuple[Path, ConversionReport]:
    out_dir = tmp_path_factory.mktemp("coco256")
    report = convert_dataset(rsna_sample_dir, real_labels, out_dir, ConvertOptions(image_size=256), progress=False)
    return out_dir, report


def test_real_conversion_report(converted_sample) -> None:
    out_dir, report = converted_sample
    assert (report.converted, report.positives, report.boxes) == (13, 4, 8)
    assert report.bad_files == [] and report.unlabelled_files == [] and report.dropped_boxes == []
    assert report.labelled_without_dicom == 26_684 - 13
    assert json.loads((out_dir / "conversion_report.json").read_text())["converted"] == 13


def test_real_conversion_coco_file(converted_sample) -> None:
    out_dir, _ = converted_sample
    coco = COCO(str(out_dir / "annotations.json"))
    assert len(coco.getImgIds()) == 13
    assert len(coco.getAnnIds()) == 8
    assert sorted(coco.getImgIds()) == list(range(1, 14))
    assert sorted(coco.getAnnIds()) == list(range(1, 9))
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "lung_opacity", "supercategory": "lung"}]
    # Negatives are kept: 9 images with no annotation at all.
    assert sum(1 for image_id in coco.getImgIds() if not coco.getAnnIds(imgIds=image_id)) == 9
    for image in coco.dataset["images"]:
        assert (image["width"], image["height"]) == (256, 256)
        assert (image["original_width"], image["original_height"]) == (1024, 1024)
        assert image["file_name"] == f"images/{image['patient_id']}.png"


def test_real_conversion_boxes_are_scaled_to_256(converted_sample, real_labels) -> None:
    out_dir, _ = converted_sample
    coco = COCO(str(out_dir / "annotations.json"))
    image_of = {image["patient_id"]: image for image in coco.dataset["images"]}
    # By hand: line 6 of the labels, 264,152,213,379 at 1024 -> x 0.25 = 66, 38, 53.25, 94.75.
    first = coco.loadAnns(coco.getAnnIds(imgIds=image_of[POSITIVE_SAMPLE]["id"]))
    assert first[0]["bbox"] == [66.0, 38.0, 53.25, 94.75]
    assert first[0]["area"] == pytest.approx(53.25 * 94.75, abs=1e-3)
    for patient_id, image in image_of.items():
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        expected = real_labels[patient_id].boxes * 256 / 1024
        written = np.array([annotation["bbox"] for annotation in annotations], dtype=np.float64).reshape(-1, 4)
        np.testing.assert_allclose(written, expected, atol=1e-3)
        assert image["target"] == real_labels[patient_id].target
        assert image["n_boxes"] == len(annotations)
        for annotation in annotations:
            assert annotation["category_id"] == 1 and annotation["iscrowd"] == 0
            assert annotation["area"] == pytest.approx(annotation["bbox"][2] * annotation["bbox"][3], abs=1e-3)


def test_real_conversion_pngs(converted_sample, rsna_sample_dir: Path) -> None:
    out_dir, _ = converted_sample
    pngs = sorted((out_dir / "images").glob("*.png"))
    assert [path.stem for path in pngs] == sorted(path.stem for path in rsna_sample_dir.glob("*.dcm"))
    for path in pngs:
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert pixels.shape == (256, 256) and pixels.dtype == np.uint8
    # Area averaging keeps the mean grey level of the 1024 x 1024 original.
    original = read_dicom(rsna_sample_dir / f"{POSITIVE_SAMPLE}.dcm").pixels
    written = cv2.imread(str(out_dir / "images" / f"{POSITIVE_SAMPLE}.png"), cv2.IMREAD_UNCHANGED)
    assert abs(float(written.mean()) - float(original.mean())) < 1.0
    assert temporary_files(out_dir) == []


def test_real_conversion_folds_csv(converted_sample) -> None:
    out_dir, _ = converted_sample
    rows = read_folds_csv(out_dir / "folds.csv")
    assert len(rows) == 13
    assert len({row["patientId"] for row in rows}) == 13
    assert {int(row["fold"]) for row in rows} <= set(range(5))
    assert sum(int(row["target"]) for row in rows) == 4
    assert sum(int(row["n_boxes"]) for row in rows) == 8
    coco = json.loads((out_dir / "annotations.json").read_text())
    assert {row["patientId"]: int(row["fold"]) for row in rows} == {
        image["patient_id"]: image["fold"] for image in coco["images"]
    }


def test_cocoeval_truth_as_detections_scores_one(converted_sample) -> None:
    out_dir, _ = converted_sample
    coco = COCO(str(out_dir / "annotations.json"))
    truth = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0}
        for a in coco.dataset["annotations"]
    ]
    assert evaluate_bbox_ap(coco, truth)[0] == pytest.approx(1.0)


def test_cocoeval_shifted_detections_score_lower(converted_sample) -> None:
    out_dir, _ = converted_sample
    coco = COCO(str(out_dir / "annotations.json"))
    shifted = []
    for annotation in coco.dataset["annotations"]:
        x, y, width, height = annotation["bbox"]
        shifted.append(
            {
                "image_id": annotation["image_id"],
                "category_id": 1,
                "bbox": [x + 0.2 * width, y, width, height],
                "score": 1.0,
            }
        )
    # A shift of 0.2 widths leaves IoU 0.8 / 1.2 = 0.667: a match at thresholds .50 .55 .60 .65 only -> AP 4/10.
    stats = evaluate_bbox_ap(coco, shifted)
    assert stats[0] == pytest.approx(0.4)
    assert stats[1] == pytest.approx(1.0)  # AP at IoU 0.5


# --- synthetic geometry ----------------------------------------------------------------------


@pytest.fixture
def wide_dataset(make_dicom, tmp_path: Path) -> tuple[Path, dict[str, PatientLabels]]:
    """Two 800-row x 1200-column DICOMs: one positive with inside / partly outside / outside boxes, one negative."""
    dicom_dir = tmp_path / "dicoms"
    make_dicom("wide-pos", folder=dicom_dir, rows=800, columns=1200)
    make_dicom("wide-neg", folder=dicom_dir, rows=800, columns=1200)
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text(
        LABEL_HEADER
        + "wide-pos,600,400,300,200,1\n"  # inside
        + "wide-pos,1100,700,200,200,1\n"  # right and bottom halves outside
        + "wide-pos,1300,100,50,50,1\n"  # entirely right of the image
        + "wide-neg,,,,,0\n"
    )
    return dicom_dir, read_labels(labels_csv)


def load_boxes(out_dir: Path) -> dict[str, list[list[float]]]:
    coco = json.loads((out_dir / "annotations.json").read_text())
    patient_of = {image["id"]: image["patient_id"] for image in coco["images"]}
    boxes: dict[str, list[list[float]]] = {patient: [] for patient in patient_of.values()}
    for annotation in coco["annotations"]:
        boxes[patient_of[annotation["image_id"]]].append(annotation["bbox"])
    return boxes


def test_non_square_image_boxes_scale_per_axis(wide_dataset, tmp_path: Path) -> None:
    dicom_dir, labels = wide_dataset
    out_dir = tmp_path / "out400"
    report = convert_dataset(dicom_dir, labels, out_dir, ConvertOptions(image_size=400), progress=False)
    boxes = load_boxes(out_dir)
    # x, width * 400/1200 = 1/3; y, height * 400/800 = 1/2.
    # 600,400,300,200 -> 200,200,100,100.  1100,700,200,200 -> 366.667,350,66.667,100, clipped at 400 -> 33.333 x 50.
    np.testing.assert_allclose(boxes["wide-pos"], [[200, 200, 100, 100], [366.667, 350, 33.333, 50]], atol=1e-3)
    assert boxes["wide-neg"] == []
    assert cv2.imread(str(out_dir / "images" / "wide-pos.png"), cv2.IMREAD_UNCHANGED).shape == (400, 400)
    images = {image["patient_id"]: image for image in json.loads((out_dir / "annotations.json").read_text())["images"]}
    assert (images["wide-pos"]["width"], images["wide-pos"]["height"]) == (400, 400)
    assert (images["wide-pos"]["original_width"], images["wide-pos"]["original_height"]) == (1200, 800)
    assert report.dropped_boxes == [
        {"patientId": "wide-pos", "box": [1300.0, 100.0, 50.0, 50.0], "reason": "outside the image"}
    ]
    assert (report.converted, report.positives, report.boxes) == (2, 1, 2)


def test_default_size_keeps_original_pixels(wide_dataset, tmp_path: Path) -> None:
    dicom_dir, labels = wide_dataset
    out_dir = tmp_path / "out-native"
    report = convert_dataset(dicom_dir, labels, out_dir, progress=False)
    boxes = load_boxes(out_dir)
    np.testing.assert_allclose(boxes["wide-pos"], [[600, 400, 300, 200], [1100, 700, 100, 100]])
    written = cv2.imread(str(out_dir / "images" / "wide-pos.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(written, read_dicom(dicom_dir / "wide-pos.dcm").pixels)
    assert written.shape == (800, 1200)
    assert [dropped["box"] for dropped in report.dropped_boxes] == [[1300.0, 100.0, 50.0, 50.0]]
    assert {row["patientId"]: row["n_boxes"] for row in read_folds_csv(out_dir / "folds.csv")} == {
        "wide-neg": "0",
        "wide-pos": "2",
    }


def test_original_size_keeps_each_real_dicoms_own_jpeg_stream(
    rsna_sample_dir: Path, real_labels, tmp_path: Path
) -> None:
    out_dir = tmp_path / "native"
    convert_dataset(rsna_sample_dir, real_labels, out_dir, progress=False)
    images = json.loads((out_dir / "annotations.json").read_text())["images"]
    assert len(images) == 13
    for image in images:
        assert image["file_name"] == f"images/{image['patient_id']}.jpg"
        assert (image["width"], image["height"]) == (1024, 1024)
        dicom = read_dicom(rsna_sample_dir / f"{image['patient_id']}.dcm")
        written = out_dir / image["file_name"]
        # Byte for byte the DICOM's stream, so no loss and no encoding; and it decodes to the very pixels predict sees.
        assert written.read_bytes() == dicom.source_jpeg
        np.testing.assert_array_equal(cv2.imread(str(written), cv2.IMREAD_UNCHANGED), dicom.pixels)
    assert sorted(path.suffix for path in (out_dir / "images").iterdir()) == [".jpg"] * 13


def test_changed_settings_leave_one_image_per_patient(rsna_sample_dir: Path, real_labels, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    convert_dataset(rsna_sample_dir, real_labels, out_dir, progress=False)
    convert_dataset(rsna_sample_dir, real_labels, out_dir, ConvertOptions(normalization="clahe"), progress=False)
    # CLAHE changes the pixels, so the stream cannot be kept: PNGs replace the JPEGs.
    assert sorted(path.suffix for path in (out_dir / "images").iterdir()) == [".png"] * 13
    assert all(
        image["file_name"].endswith(".png")
        for image in json.loads((out_dir / "annotations.json").read_text())["images"]
    )
    report = convert_dataset(rsna_sample_dir, real_labels, out_dir, progress=False)
    assert report.reused == 0
    assert sorted(path.suffix for path in (out_dir / "images").iterdir()) == [".jpg"] * 13


def test_uncompressed_or_monochrome1_dicoms_are_written_as_png(
    make_dicom, siim_monochrome1_dicom: Path, tmp_path: Path
) -> None:
    dicom_dir = tmp_path / "dicoms"
    make_dicom("raw", folder=dicom_dir, rows=8, columns=8)
    shutil.copy(siim_monochrome1_dicom, dicom_dir / "inverted.dcm")
    labels = {name: PatientLabels(name, np.zeros((0, 4)), 0) for name in ("raw", "inverted")}
    convert_dataset(dicom_dir, labels, tmp_path / "out", progress=False)
    assert sorted(path.name for path in (tmp_path / "out" / "images").iterdir()) == ["inverted.png", "raw.png"]
    # MONOCHROME1 is inverted, so its stored stream is not the image.
    written = cv2.imread(str(tmp_path / "out" / "images" / "inverted.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(written, read_dicom(siim_monochrome1_dicom).pixels)


def test_duplicate_patient_ids_are_converted_once(make_dicom, tmp_path: Path) -> None:
    dicom_dir = tmp_path / "dicoms"
    make_dicom("twin", folder=dicom_dir / "a")
    make_dicom("twin", folder=dicom_dir / "b")
    labels = {"twin": PatientLabels("twin", np.zeros((0, 4)), 0)}
    report = convert_dataset(dicom_dir, labels, tmp_path / "out", progress=False)
    assert report.converted == 1
    assert report.duplicate_files == [str(dicom_dir / "b" / "twin.dcm")]


# --- bad input -------------------------------------------------------------------------------


@pytest.fixture
def messy_dir(rsna_sample_dir: Path, siim_dicom: Path, make_dicom, tmp_path: Path) -> Path:
    """Two good real files, three broken files named by labelled patients, one unlabelled real file."""
    folder = tmp_path / "messy"
    folder.mkdir()
    for stem in (POSITIVE_SAMPLE, NEGATIVE_SAMPLE):
        shutil.copy(rsna_sample_dir / f"{stem}.dcm", folder)
    empty, truncated, no_pixels = LABELLED_NOT_IN_SAMPLE
    (folder / f"{empty}.dcm").write_bytes(b"")
    data = (rsna_sample_dir / f"{POSITIVE_SAMPLE}.dcm").read_bytes()
    (folder / f"{truncated}.dcm").write_bytes(data[: len(data) // 2])
    make_dicom(no_pixels, folder=folder, with_pixels=False)
    shutil.copy(siim_dicom, folder)
    return folder


def test_bad_files_are_skipped_and_reported(messy_dir: Path, real_labels, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    report = convert_dataset(messy_dir, real_labels, out_dir, ConvertOptions(image_size=64), progress=False)
    assert report.converted == 2
    assert (report.positives, report.boxes) == (1, 2)
    empty, truncated, no_pixels = LABELLED_NOT_IN_SAMPLE
    reasons = {Path(bad["file"]).stem: bad["reason"] for bad in report.bad_files}
    assert set(reasons) == {empty, truncated, no_pixels}
    assert reasons[empty].startswith("file is empty")
    assert reasons[truncated].startswith("file is truncated")
    assert reasons[no_pixels].startswith("has no pixel data")
    assert report.unlabelled_files == [str(messy_dir / "siim_pneumothorax_PA.dcm")]
    coco = json.loads((out_dir / "annotations.json").read_text())
    assert sorted(image["patient_id"] for image in coco["images"]) == sorted([POSITIVE_SAMPLE, NEGATIVE_SAMPLE])
    assert sorted(path.stem for path in (out_dir / "images").iterdir()) == sorted([POSITIVE_SAMPLE, NEGATIVE_SAMPLE])
    saved = json.loads((out_dir / "conversion_report.json").read_text())
    assert len(saved["bad_files"]) == 3
    assert temporary_files(out_dir) == [] and temporary_files(messy_dir) == []


def convert_args(dicom_dir: Path, labels_csv: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "convert",
        "--dicom-dir",
        str(dicom_dir),
        "--labels",
        str(labels_csv),
        "--out",
        str(out_dir),
        "--image-size",
        "64",
        *extra,
    ]


def test_cli_lists_bad_files_and_strict_fails(messy_dir: Path, rsna_labels_csv: Path, tmp_path: Path, capsys) -> None:
    assert cli_main(convert_args(messy_dir, rsna_labels_csv, tmp_path / "out")) == 0
    printed = capsys.readouterr().out
    assert "converted 2 images (1 with opacities, 2 boxes)" in printed
    assert "skipped 3 unreadable DICOMs" in printed
    for stem in LABELLED_NOT_IN_SAMPLE:
        assert f"{stem}.dcm" in printed
    assert "siim_pneumothorax_PA.dcm" in printed

    assert cli_main(convert_args(messy_dir, rsna_labels_csv, tmp_path / "strict", "--strict")) == 1
    assert "skipped 3 unreadable DICOMs" in capsys.readouterr().out
    assert temporary_files(tmp_path) == []


def test_cli_strict_passes_on_clean_input(rsna_sample_dir: Path, rsna_labels_csv: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "clean"
    folder.mkdir()
    shutil.copy(rsna_sample_dir / f"{NEGATIVE_SAMPLE}.dcm", folder)
    assert cli_main(convert_args(folder, rsna_labels_csv, tmp_path / "out", "--strict")) == 0
    assert "converted 1 images (0 with opacities, 0 boxes)" in capsys.readouterr().out


def test_cli_labels_missing_column(rsna_sample_dir: Path, tmp_path: Path, capsys) -> None:
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("patientId,x,y,width,Target\nneg,,,,0\n")
    assert cli_main(convert_args(rsna_sample_dir, labels_csv, tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert error.startswith("lungdet convert: error: ")
    assert str(labels_csv) in error
    assert "missing column(s) height" in error


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--image-size", "16"), "argument --image-size: must be between 32 and 4096, got 16"),
        (("--folds", "1"), "argument --folds: must be at least 2, got 1"),
    ],
)
def test_cli_rejects_bad_options_before_any_work(tmp_path: Path, capsys, extra, message) -> None:
    # Neither input exists: reading anything would fail with a different message.
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        cli_main([*convert_args(tmp_path / "absent", tmp_path / "absent.csv", out_dir), *extra])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not out_dir.exists()


def test_cli_folder_without_dicoms(tmp_path: Path, capsys) -> None:
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text(LABEL_HEADER + "neg,,,,,0\n")
    (tmp_path / "empty").mkdir()
    assert cli_main(convert_args(tmp_path / "empty", labels_csv, tmp_path / "out")) == 1
    assert re.search(r"no image was converted; check that .*empty holds \.dcm files", capsys.readouterr().err)


def test_cli_missing_dicom_folder(tmp_path: Path, capsys) -> None:
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text(LABEL_HEADER + "neg,,,,,0\n")
    assert cli_main(convert_args(tmp_path / "absent", labels_csv, tmp_path / "out")) == 2
    assert "absent: not a folder" in capsys.readouterr().err


# --- scale: workers, incremental reruns, resuming a killed run, normalisation --------------------


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory: pytest.TempPathFactory):
    from lungdet.data_tools.synth import write_synthetic_dataset

    synth = write_synthetic_dataset(
        tmp_path_factory.mktemp("scale") / "synth", count=12, seed=5, positive_fraction=0.5, size=(256, 256)
    )
    return synth, read_labels(synth.labels_csv)


def dataset_bytes(out_dir: Path) -> dict[str, bytes]:
    """Every output file's bytes (the journal aside: it records how the output was reached, not what it is)."""
    return {
        str(path.relative_to(out_dir)): path.read_bytes()
        for path in sorted(out_dir.rglob("*"))
        if path.is_file() and path.name not in (".convert_journal.jsonl", "conversion_report.json")
    }


def test_two_workers_write_exactly_what_one_writes(synth_set, tmp_path: Path) -> None:
    synth, labels = synth_set
    convert_dataset(
        synth.images_dir, labels, tmp_path / "one", ConvertOptions(image_size=128), workers=1, progress=False
    )
    convert_dataset(
        synth.images_dir, labels, tmp_path / "two", ConvertOptions(image_size=128), workers=2, progress=False
    )
    one, two = dataset_bytes(tmp_path / "one"), dataset_bytes(tmp_path / "two")
    assert len(one) == 12 + 2  # 12 PNGs, annotations.json, folds.csv
    assert one == two


def test_a_rerun_converts_only_new_or_changed_files(synth_set, tmp_path: Path) -> None:
    synth, labels = synth_set
    dicoms = tmp_path / "dicoms"
    shutil.copytree(synth.images_dir, dicoms)
    first = convert_dataset(dicoms, labels, tmp_path / "out", ConvertOptions(image_size=128), progress=False)
    assert (first.converted, first.reused) == (12, 0)
    again = convert_dataset(dicoms, labels, tmp_path / "out", ConvertOptions(image_size=128), progress=False)
    assert (again.converted, again.reused) == (12, 12)
    changed = sorted(dicoms.glob("*.dcm"))[0]
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    after_touch = convert_dataset(dicoms, labels, tmp_path / "out", ConvertOptions(image_size=128), progress=False)
    assert after_touch.reused == 11
    resized = convert_dataset(dicoms, labels, tmp_path / "out", ConvertOptions(image_size=96), progress=False)
    assert resized.reused == 0  # new settings: every image is converted again
    assert json.loads((tmp_path / "out" / "annotations.json").read_text())["images"][0]["width"] == 96


def test_a_killed_run_resumes_to_the_same_output(synth_set, tmp_path: Path) -> None:
    synth, labels = synth_set
    convert_dataset(synth.images_dir, labels, tmp_path / "clean", ConvertOptions(image_size=128), progress=False)
    killed = tmp_path / "killed"
    convert_dataset(synth.images_dir, labels, killed, ConvertOptions(image_size=128), progress=False)
    # Simulate a SIGKILL after 5 files: the journal ends in a cut-off line, later PNGs and the
    # final files were never written, and a temporary file was left mid-write.
    journal = killed / ".convert_journal.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:6]) + "\n" + lines[6][:25])
    for line in lines[6:]:
        (killed / "images" / f"{json.loads(line)['image']['patient_id']}.png").unlink()
    for name in ("annotations.json", "folds.csv"):
        (killed / name).unlink()
    (killed / "images" / ".half.png.abc.tmp").write_bytes(b"half")

    report = convert_dataset(synth.images_dir, labels, killed, ConvertOptions(image_size=128), progress=False)
    assert report.reused == 5
    assert dataset_bytes(killed) == dataset_bytes(tmp_path / "clean")
    # The cut-off line was closed before appending, so every file converted since is on record.
    assert (
        convert_dataset(synth.images_dir, labels, killed, ConvertOptions(image_size=128), progress=False).reused == 12
    )


def test_normalisation_is_applied_and_recorded(synth_set, tmp_path: Path) -> None:
    synth, labels = synth_set
    for method in ("none", "clahe", "equalize"):
        convert_dataset(
            synth.images_dir,
            labels,
            tmp_path / method,
            ConvertOptions(image_size=128, normalization=method),
            progress=False,
        )
    coco = {
        method: json.loads((tmp_path / method / "annotations.json").read_text())
        for method in ("none", "clahe", "equalize")
    }
    assert [coco[m]["info"]["normalization"] for m in coco] == ["none", "clahe", "equalize"]
    name = coco["none"]["images"][0]["file_name"]
    plain = cv2.imread(str(tmp_path / "none" / name), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(
        cv2.imread(str(tmp_path / "equalize" / name), cv2.IMREAD_GRAYSCALE), cv2.equalizeHist(plain)
    )
    clahe = cv2.imread(str(tmp_path / "clahe" / name), cv2.IMREAD_GRAYSCALE)
    assert not np.array_equal(clahe, plain)
    np.testing.assert_array_equal(clahe, normalize_pixels(plain, method="clahe"))
    with pytest.raises(LungdetError, match="normalization 'gamma': must be one of none, clahe, equalize"):
        convert_dataset(
            synth.images_dir, labels, tmp_path / "bad", ConvertOptions(normalization="gamma"), progress=False
        )


def test_bad_files_are_counted_by_kind(synth_set, tmp_path: Path, capsys) -> None:
    synth, labels = synth_set
    dicoms = tmp_path / "dicoms"
    shutil.copytree(synth.images_dir, dicoms)
    victims = sorted(dicoms.glob("*.dcm"))[:3]
    victims[0].write_bytes(b"")
    victims[1].write_bytes(b"plain text, not DICOM" * 10)
    victims[2].write_bytes(victims[2].read_bytes()[:2000])
    report = convert_dataset(dicoms, labels, tmp_path / "out", ConvertOptions(image_size=64), progress=False)
    assert sorted(bad["kind"] for bad in report.bad_files) == ["empty", "not_dicom", "truncated"]
    assert "(empty: 1, not_dicom: 1, truncated: 1)" in format_report(report, tmp_path / "out")


@pytest.mark.parametrize("n_images, n_annotations", [(0, 0), (1, 0), (3, 2)])
def test_streamed_coco_json_is_the_text_json_dumps_gives(tmp_path: Path, n_images: int, n_annotations: int) -> None:
    import tempfile

    from lungdet.data_tools.coco import CATEGORY, write_coco_json

    info = {"description": "x", "image_size": None, "folds": 5}
    images = [{"id": index + 1, "patient_id": f"p{index}", "fold": index % 2} for index in range(n_images)]
    annotations = [{"id": index + 1, "image_id": 1, "bbox": [1.5, 2.0, 3.0, 4.25]} for index in range(n_annotations)]
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        spool.writelines(json.dumps(annotation) + "\n" for annotation in annotations)
        write_coco_json(tmp_path / "a.json", info, iter(images), spool)
    expected = json.dumps({"info": info, "images": images, "annotations": annotations, "categories": [CATEGORY]})
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == expected
