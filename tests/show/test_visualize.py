"""Tests of show/visualize.py: the gallery page, the CLI, choosing and ordering images, and skipping a corrupt DICOM."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from lungdet.data_tools import synth
from lungdet.data_tools.labels import read_labels
from lungdet.errors import LungdetError
from lungdet.show import visualize
from lungdet.submission.prediction_string import Prediction, write_submission


@pytest.fixture()
def dataset_with_corrupt_file(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Three synthetic 256x256 DICOMs (one positive), a corrupt .dcm beside them, labels and a submission."""
    summary = synth.write_synthetic_dataset(tmp_path / "data", count=3, seed=1, positive_fraction=0.34, size=(256, 256))
    (summary.images_dir / "corrupt.dcm").write_bytes(np.random.default_rng(0).bytes(100))
    labels = read_labels(summary.labels_csv)
    predictions = {}
    for index, (patient_id, patient) in enumerate(labels.items()):
        # Predict each truth box shifted by 5 px, plus one false positive on the first image.
        boxes = patient.boxes + [5.0, 5.0, 0.0, 0.0]
        scores = np.linspace(0.9, 0.6, len(boxes))
        if index == 0:
            boxes = np.vstack([boxes, [[20.0, 20.0, 30.0, 30.0]]])
            scores = np.append(scores, 0.33)
        predictions[patient_id] = Prediction.from_arrays(scores, boxes)
    submission = tmp_path / "submission.csv"
    write_submission(submission, predictions)
    return summary.images_dir, summary.labels_csv, submission


def test_cli_writes_pngs_and_index_and_skips_the_corrupt_file(
    dataset_with_corrupt_file: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images_dir, labels_csv, submission = dataset_with_corrupt_file
    out = tmp_path / "overlays"
    args = visualize.get_args_parser().parse_args(
        [
            "--dicom-dir",
            str(images_dir),
            "--labels",
            str(labels_csv),
            "--submission",
            str(submission),
            "--out",
            str(out),
        ]
    )
    assert visualize.main(args) == 0

    labels = read_labels(labels_csv)
    pngs = sorted(path.stem for path in out.glob("*.png"))
    assert pngs == sorted(labels)
    for patient_id in labels:
        image = cv2.imread(str(out / f"{patient_id}.png"))
        assert image.shape == (256, 256, 3)
    printed = capsys.readouterr()
    assert "wrote 3 overlay PNGs" in printed.out
    assert "skipped 1 unreadable file(s)" in printed.out
    assert "corrupt.dcm" in printed.out and "not a DICOM file" in printed.out

    page = (out / "index.html").read_text(encoding="utf-8")
    assert "Not a diagnostic device" in page
    for patient_id, patient in labels.items():
        assert f'src="{patient_id}.png"' in page
        assert f"<b>{patient_id}</b><br>truth: {len(patient.boxes)} · predicted:" in page
    assert "max confidence: 0.90" in page
    assert "corrupt.dcm" in page
    # Atomic writes leave no temporary files behind.
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [f"{patient_id}.png" for patient_id in labels] + ["index.html"]
    )


def test_cli_only_positive_and_limit(dataset_with_corrupt_file: tuple[Path, Path, Path], tmp_path: Path) -> None:
    images_dir, labels_csv, _ = dataset_with_corrupt_file
    labels = read_labels(labels_csv)
    positives = [patient_id for patient_id, patient in labels.items() if patient.target == 1]
    out = tmp_path / "positives"
    args = visualize.get_args_parser().parse_args(
        [
            "--dicom-dir",
            str(images_dir),
            "--labels",
            str(labels_csv),
            "--out",
            str(out),
            "--only-positive",
            "--limit",
            "5",
            "--max-size",
            "128",
        ]
    )
    assert visualize.main(args) == 0
    assert sorted(path.stem for path in out.glob("*.png")) == sorted(positives) and len(positives) == 1
    assert cv2.imread(str(out / f"{positives[0]}.png")).shape == (128, 128, 3)


def test_cli_rejects_only_positive_without_a_box_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = visualize.get_args_parser()
    args = parser.parse_args(["--dicom-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--only-positive"])
    with pytest.raises(LungdetError, match="--only-positive needs --labels or --submission"):
        visualize.main(args)
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        parser.parse_args(["--dicom-dir", "d", "--out", "o", "--limit", "0"])
    assert "argument --limit: must be at least 1, got 0" in capsys.readouterr().err


def test_cli_draws_a_folder_of_real_jpegs(
    rsna_real_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    positive = "01be392f-a46d-4aef-a57e-9cd1a80dd47e"  # two truth boxes
    for name in (positive, "0004cfab-14fd-4e49-80ba-63a80b6bddd6"):
        (folder / f"{name}.jpg").symlink_to(rsna_real_dir / "images" / f"{name}.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "overlays"
    args = visualize.get_args_parser().parse_args(
        [
            "--image-dir",
            str(folder),
            "--labels",
            str(rsna_real_dir / "labels.csv"),
            "--out",
            str(out),
            "--max-size",
            "512",
        ]
    )
    assert visualize.main(args) == 0
    assert "wrote 2 overlay PNGs to" in capsys.readouterr().out
    page = (out / "index.html").read_text(encoding="utf-8")
    assert f"<b>{positive}</b><br>truth: 2" in page and "broken.png" in page
    assert cv2.imread(str(out / f"{positive}.png")).shape == (512, 512, 3)


def test_cli_reports_an_empty_folder(tmp_path: Path) -> None:
    args = visualize.get_args_parser().parse_args(["--dicom-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(LungdetError, match=r"no \.dcm files found"):
        visualize.main(args)


def test_gallery_can_sort_worst_first_and_filter_errors() -> None:
    entries = [
        visualize.OverlayEntry("good", "good.png", 1, 1, 0.9, score=1.0),
        visualize.OverlayEntry("miss", "miss.png", 1, 0, None, score=0.0, missed=1),
        visualize.OverlayEntry("alarm", "alarm.png", 0, 1, 0.7, score=0.0, false_alarms=1),
        visualize.OverlayEntry("clear", "clear.png", 0, 0, None, score=None),
    ]
    page = visualize.render_index_html(entries, [])
    assert 'data-order="0" data-score="1.000000" data-missed="0" data-false-alarms="0"' in page
    assert 'data-order="1" data-score="0.000000" data-missed="1"' in page
    assert 'data-order="3" data-score="2.000000"' in page  # unscored images sort after the worst
    assert '<option value="score">worst RSNA score first</option>' in page and '<option value="missed">' in page
    assert "RSNA score: not scored · missed: 0 · false alarms: 0" in page
    plain = visualize.render_index_html([visualize.OverlayEntry("x", "x.png", None, 2, 0.5)], [])
    assert 'id="order"' not in plain and "<script>" not in plain  # nothing to judge without truth


def test_worst_first_orders_by_image_score_and_puts_the_costless_last() -> None:
    truth = {
        "hit": np.array([[0.0, 0, 100, 100]]),
        "miss": np.array([[0.0, 0, 100, 100]]),
        "quiet": np.zeros((0, 4)),
        "alarm": np.zeros((0, 4)),
    }
    predictions = {
        "hit": Prediction.from_arrays([0.9], [[0, 0, 100, 100]]),
        "miss": Prediction.empty(),
        "quiet": Prediction.empty(),
        "alarm": Prediction.from_arrays([0.9], [[0, 0, 50, 50]]),
    }
    paths = [Path(f"/x/{name}.jpg") for name in ("quiet", "hit", "miss", "alarm")]
    assert [path.stem for path in visualize.worst_first(paths, truth, predictions)] == ["alarm", "miss", "hit", "quiet"]
