"""Tests for detection/real_data.py (the real RSNA split, its conversion, the naive priors) and ``lungdet demo --real`` on a subset.

The images are real RSNA JPEGs from ``shared/data/rsna_real``, linked into temporary folders;
the demo's model is the tests' tiny one, trained for one epoch: seconds, not the minutes the
real recipe takes (that belongs to benchmarks/real_data.py).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lungdet.data_tools.holdout import write_split_csv
from lungdet.data_tools.labels import PatientLabels, read_labels
from lungdet.data_tools.metadata import read_metadata_csv
from lungdet.detection import demo
from lungdet.detection.real_data import RealSet, load_split, lung_prior_boxes, prepare, prior_predictions
from lungdet.errors import LungdetError
from lungdet.submission.prediction_string import Prediction
from lungdet.submission.score import score_dataset


def subset_of_real(rsna_real_dir: Path, folder: Path, *, positives: int, negatives: int) -> RealSet:
    """A folder laid out as rsna_real/ with the first ``positives`` and ``negatives`` patients of its labels."""
    labels = read_labels(rsna_real_dir / "labels.csv")
    chosen = [patient for patient in labels if labels[patient].target][:positives] + [
        patient for patient in labels if not labels[patient].target
    ][:negatives]
    (folder / "images").mkdir(parents=True)
    for patient in chosen:
        (folder / "images" / f"{patient}.jpg").symlink_to(rsna_real_dir / "images" / f"{patient}.jpg")
    for name in ("labels.csv", "class_info.csv", "metadata.csv"):
        with open(rsna_real_dir / name, newline="", encoding="utf-8") as source:
            rows = list(csv.reader(source))
        with open(folder / name, "w", newline="", encoding="utf-8") as target:
            csv.writer(target).writerows([rows[0], *(row for row in rows[1:] if row[0] in set(chosen))])
    return RealSet(folder)


def test_the_real_split_is_800_and_200_and_matches_the_written_file(rsna_real_dir: Path) -> None:
    split = load_split(RealSet(rsna_real_dir))
    assert sum(value == "holdout" for value in split.values()) == 200 and len(split) == 1000


def test_a_written_split_that_drifted_is_refused(rsna_real_dir: Path, tmp_path: Path) -> None:
    split = load_split(RealSet(rsna_real_dir))
    moved = dict(split)
    first_cv, first_holdout = (
        next(p for p, v in split.items() if v == "cv"),
        next(p for p, v in split.items() if v == "holdout"),
    )
    moved[first_cv], moved[first_holdout] = "holdout", "cv"
    write_split_csv(tmp_path / "split.csv", moved)
    with pytest.raises(LungdetError, match="the held-out patients must not change"):
        load_split(RealSet(rsna_real_dir), split_file=tmp_path / "split.csv")


def test_prepare_converts_each_side_and_writes_the_held_out_labels(rsna_real_dir: Path, tmp_path: Path) -> None:
    real = subset_of_real(rsna_real_dir, tmp_path / "real", positives=10, negatives=30)
    prepared = prepare(real, tmp_path / "work", image_size=128, progress=False)
    assert len(prepared.holdout_patients) == 8
    holdout_labels = read_labels(prepared.holdout_labels_csv)
    assert (
        list(holdout_labels) == prepared.holdout_patients
        and sum(labels.target for labels in holdout_labels.values()) == 2
    )
    assert prepared.cv_report.converted == 32 and prepared.cv_report.positives == 8
    assert sorted(path.stem for path in prepared.holdout_images.iterdir()) == prepared.holdout_patients
    # The held-out patients' view, sex and age from metadata.csv, for an image head that reads them at predict.
    metadata = read_metadata_csv(real.metadata_csv)
    assert prepared.holdout_tags == {patient: metadata.tags[patient] for patient in prepared.holdout_patients}
    assert all(tags.view_position in ("AP", "PA") for tags in prepared.holdout_tags.values())
    # The two sides share no patient.
    assert not set(prepared.holdout_patients) & {path.stem for path in (tmp_path / "work" / "images_cv").iterdir()}


def test_lung_prior_is_the_median_box_of_each_side() -> None:
    labels = {
        "a": PatientLabels("a", np.array([[100.0, 300, 200, 300], [600, 320, 220, 280]]), 1),
        "b": PatientLabels("b", np.array([[120.0, 340, 220, 260]]), 1),
        "c": PatientLabels("c", np.array([[110.0, 320, 180, 400], [640, 300, 200, 300], [620, 310, 240, 320]]), 1),
        "d": PatientLabels("d", np.zeros((0, 4)), 0),
    }
    prior = lung_prior_boxes(labels)
    np.testing.assert_allclose(prior, [[110, 320, 200, 300], [620, 310, 220, 300]])
    predictions = prior_predictions(labels, prior, only={"a"})
    assert len(predictions["a"].scores) == 2 and len(predictions["d"].scores) == 0
    assert score_dataset({"d": labels["d"].boxes}, {"d": Prediction.empty()}).n_scored == 0


def test_a_prior_needs_boxes_on_both_sides() -> None:
    with pytest.raises(LungdetError, match="one side of the images only"):
        lung_prior_boxes({"a": PatientLabels("a", np.array([[100.0, 300, 200, 300]]), 1)})


def test_demo_real_runs_every_stage_on_a_subset(
    rsna_real_dir: Path, tmp_path: Path, tiny_model_overrides, monkeypatch, capsys
) -> None:
    real = subset_of_real(rsna_real_dir, tmp_path / "real", positives=10, negatives=30)
    tiny = tmp_path / "tiny.yaml"
    overrides = dict(override.split("=", 1) for override in tiny_model_overrides)
    tiny.write_text(
        "model:\n  architecture: fasterrcnn_mobilenet_v3_large_fpn\n  image_head: true\n"
        + "".join(f"  {key.split('.', 1)[1]}: {value}\n" for key, value in overrides.items())
        + "data:\n  batch_size: 4\noptim:\n  optimizer: adamw\n  epochs: 1\n  warmup_iters: 2\ndevice: cpu\n"
    )
    monkeypatch.setattr(demo, "REAL_CONFIG", str(tiny))
    args = demo.get_args_parser().parse_args(["--real", "--real-dir", str(real.root), "--out", str(tmp_path / "out")])
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    assert "Held-out real RSNA radiographs (8 patients, 2 with opacities" in printed and "RSNA mAP " in printed
    # The figures papers report, beside it; the head gives a probability, so the AUC and ECE too.
    for figure in ("COCO AP@[.50:.95]", "COCO AP40", "FROC score", "image AUC", "ECE (10 bins)"):
        assert f"  {figure}" in printed, figure
    assert printed.index("RSNA mAP ") < printed.index("COCO AP@[.50:.95]")
    assert "not a diagnostic device" in printed
    out = tmp_path / "out"
    for name in (
        "run/best.pt",
        "submission_holdout.csv",
        "score_holdout.json",
        "score_holdout.html",
        "overlays_holdout/index.html",
        "probabilities_holdout.csv",
    ):
        assert (out / name).is_file(), name
    page = (out / "overlays_holdout" / "index.html").read_text(encoding="utf-8")
    assert page.count("<figure") == 8
