"""Tests for submission/tune.py: the fast score table equals the real pipeline, the search finds planted settings, the honest rotation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from lungdet.submission.postprocess import OperatingPoint, PostprocessConfig, load_postprocess, postprocess
from lungdet.submission.prediction_string import Prediction
from lungdet.submission.raw_predictions import RawPrediction, write_raw_predictions
from lungdet.submission.score import score_dataset, score_image
from lungdet.submission.tune import Tuner, get_args_parser, main, prefix_scores, tune_postprocess

SIZE = 1024


def random_case(seed: int, *, patients: int = 60, passes: int = 1, probabilities: bool = False, folds: int = 0):
    """Raw predictions and truth: truth boxes with noisy predictions near them, plus false alarms, random confidences."""
    rng = np.random.default_rng(seed)
    truth, rows = {}, []
    for index in range(patients):
        patient = f"p{index:03d}"
        n_truth = int(rng.integers(0, 3))
        boxes = np.column_stack([rng.uniform(0, 600, (n_truth, 2)), rng.uniform(150, 350, (n_truth, 2))])
        truth[patient] = boxes
        probability = float(np.clip(0.3 + 0.4 * (n_truth > 0) + rng.normal(0, 0.2), 0, 1)) if probabilities else None
        for pass_index in range(passes):
            near = boxes + rng.normal(0, 25, boxes.shape)
            n_alarms = int(rng.integers(0, 3))
            alarms = np.column_stack([rng.uniform(0, 600, (n_alarms, 2)), rng.uniform(100, 300, (n_alarms, 2))])
            predicted = np.vstack([near, alarms])
            scores = np.concatenate([rng.uniform(0.4, 1.0, len(near)), rng.uniform(0.0, 0.7, n_alarms)])
            rows.append(
                RawPrediction(
                    patient,
                    f"m{pass_index // 2}",
                    ("plain", "hflip")[pass_index % 2],
                    SIZE,
                    SIZE,
                    Prediction.from_arrays(scores, predicted),
                    probability,
                    index % folds if folds else None,
                )
            )
    return rows, truth


def test_prefix_scores_equal_scoring_each_prefix_alone() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        n_truth = int(rng.integers(0, 4))
        truth = np.column_stack([rng.uniform(0, 100, (n_truth, 2)), rng.uniform(20, 60, (n_truth, 2))])
        n_boxes = int(rng.integers(0, 6))
        boxes = np.column_stack([rng.uniform(0, 100, (n_boxes, 2)), rng.uniform(20, 60, (n_boxes, 2))])
        table = prefix_scores(truth, boxes)
        for kept in range(n_boxes + 1):
            alone = score_image(truth, Prediction.from_arrays(np.linspace(1, 0.5, kept) if kept else [], boxes[:kept]))
            assert np.isnan(table[kept]) if alone is None else table[kept] == pytest.approx(alone.score), (kept, table)


@pytest.mark.parametrize(("passes", "probabilities"), [(1, False), (1, True), (4, True)])
def test_table_scores_equal_postprocessing_and_scoring(passes: int, probabilities: bool) -> None:
    rows, truth = random_case(2, passes=passes, probabilities=probabilities)
    tuner = Tuner(rows, truth)
    rng = np.random.default_rng(3)
    for _ in range(12):
        config = PostprocessConfig(
            score_threshold=float(rng.choice([0.1, 0.35, 0.5, 0.8])),
            gate_threshold=float(rng.choice([0.0, 0.4, 0.6])),
            shrink=float(rng.choice([0.8, 1.0, 1.05])),
            max_boxes=int(rng.choice([0, 1, 2])),
            wbf_iou_thr=float(rng.choice([0.4, 0.55])),
            wbf_skip_box_thr=float(rng.choice([0.0, 0.05])),
        )
        expected = score_dataset(truth, postprocess(rows, config)).map
        assert tuner.score(config) == pytest.approx(expected, abs=1e-9), config


def planted_case(seed: int, *, patients: int = 100, folds: int = 5):
    """Predictions whose right settings are known: true boxes at 0.8 confidence drawn 1/0.8 too big (IoU 0.64), false alarms at 0.6."""
    rng = np.random.default_rng(seed)
    truth, rows = {}, []
    for index in range(patients):
        patient = f"p{index:03d}"
        positive = index % 2 == 0
        box = np.array([[rng.uniform(100, 500), rng.uniform(100, 500), 200.0, 300.0]]) if positive else np.zeros((0, 4))
        truth[patient] = box
        grown = box.copy()
        grown[:, :2] -= grown[:, 2:] * (1 / 0.8 - 1) / 2
        grown[:, 2:] /= 0.8
        alarm = np.array([[700.0, 700.0, 150.0, 150.0]])
        prediction = Prediction.from_arrays([0.8] * len(box) + [0.6], np.vstack([grown, alarm]))
        rows.append(RawPrediction(patient, "m", "plain", SIZE, SIZE, prediction, None, index % folds))
    return rows, truth


def test_tuning_finds_planted_settings_and_scores_honestly() -> None:
    rows, truth = planted_case(4)
    report = tune_postprocess(rows, truth, bootstrap_draws=200)
    assert 0.6 < report.config.score_threshold <= 0.8
    # Every shrink from 0.75 to 0.9 brings the IoU above 0.75; the middle of that plateau is taken.
    assert report.config.shrink == 0.825
    assert report.config.max_boxes == 0  # a cap changes nothing here, so it stays off
    assert report.after == pytest.approx(1.0)
    assert report.before < 0.5  # every image has the 0.6 false alarm at the 0.5 cut-off
    assert sorted(report.honest_per_fold) == [0, 1, 2, 3, 4]
    assert report.honest == pytest.approx(1.0) and report.honest_interval == pytest.approx((1.0, 1.0))
    assert report.effects["score_threshold"] > 0.3 and report.effects["shrink"] > 0
    assert set(report.effects) == {
        "score_threshold",
        "shrink",
        "max_boxes",
    }  # no probabilities, one pass: no gate, no fusion


def test_honest_score_is_below_the_optimistic_one_on_noise() -> None:
    rows, truth = random_case(5, patients=200, folds=5)
    report = tune_postprocess(rows, truth, bootstrap_draws=0)
    assert report.honest is not None and report.honest_interval is None
    assert report.honest <= report.after + 1e-12


def test_without_folds_there_is_no_honest_figure() -> None:
    rows, truth = random_case(6)
    report = tune_postprocess(rows, truth, bootstrap_draws=0)
    assert report.honest is None and report.honest_per_fold == {}


def test_cli_writes_a_file_that_loads_back(tmp_path: Path, capsys) -> None:
    rows, truth = planted_case(7, patients=40)
    write_raw_predictions(tmp_path / "oof.csv", rows)
    lines = ["patientId,x,y,width,height,Target"]
    for patient, boxes in truth.items():
        lines += [f"{patient},{x},{y},{w},{h},1" for x, y, w, h in boxes] or [f"{patient},,,,,0"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    args = get_args_parser().parse_args(
        [
            "--oof",
            str(tmp_path / "oof.csv"),
            "--labels",
            str(tmp_path / "labels.csv"),
            "--out",
            str(tmp_path / "pp.yaml"),
            "--no-progress",
        ]
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mAP honest             1.0000" in out and f"wrote {tmp_path / 'pp.yaml'}" in out
    loaded = load_postprocess(tmp_path / "pp.yaml")
    assert 0.75 <= loaded.shrink <= 0.9 and 0.6 < loaded.score_threshold <= 0.8
    assert (tmp_path / "pp.yaml").read_text().startswith("# lungdet tune on ")
    assert dataclasses.asdict(loaded)["max_boxes"] == 0


def test_parameters_the_predictions_say_nothing_about_stay_neutral() -> None:
    # No truth and no boxes anywhere: every setting scores the same, so none should move.
    rows = [
        RawPrediction(f"p{index}", "m", "plain", SIZE, SIZE, Prediction.empty(), None, index % 2) for index in range(6)
    ]
    truth = {f"p{index}": np.zeros((0, 4)) for index in range(6)}
    tuned = tune_postprocess(rows, truth, bootstrap_draws=0).config
    # Only what tuning saw is written in: one model, one pass, no boxes kept.
    assert tuned == dataclasses.replace(
        PostprocessConfig(), tuning=OperatingPoint(tuned_models_per_image=1, tuned_passes_per_model=1)
    )
