"""Tuned post-processing applied to a fusion of disagreeing models: calibration keeps tuning's operating point.

``lungdet tune`` sees one model per image (out of fold); ``lungdet predict`` with every fold's
checkpoint fuses five. These tests build both by hand, with models that disagree, and check
that the tuned settings still keep boxes on the ensemble (they did not before calibration).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lungdet.submission.postprocess import (
    MIN_CALIBRATION_IMAGES,
    PostprocessConfig,
    apply_postprocess,
    calibrate,
    kth_largest_or_beyond,
    prediction_shape,
)
from lungdet.submission.prediction_string import Prediction
from lungdet.submission.raw_predictions import RawPrediction
from lungdet.submission.score import score_dataset
from lungdet.submission.tune import tune_postprocess

SIZE = 1024
FOLDS = 5


def truth_box(rng: np.random.Generator) -> np.ndarray:
    return np.array([[rng.uniform(100, 500), rng.uniform(100, 500), rng.uniform(200, 300), rng.uniform(250, 400)]])


def false_alarm(rng: np.random.Generator) -> np.ndarray:
    return np.array([[rng.uniform(0, 700), rng.uniform(0, 600), 150.0, 200.0]])


def jitter(boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return boxes + rng.normal(0, 6, boxes.shape)


def passes_of(patient: str, model: str, boxes: np.ndarray, scores: list[float], probability: float, fold: int | None, rng) -> list[RawPrediction]:
    """A model's plain and mirrored pass over one image: the same boxes, a little apart."""
    return [
        RawPrediction(patient, model, pass_name, SIZE, SIZE, Prediction.from_arrays(scores, jitter(boxes, rng)), probability, fold)
        for pass_name in ("plain", "hflip")
    ]


def out_of_fold(rng: np.random.Generator, patients: int = 150) -> tuple[list[RawPrediction], dict[str, np.ndarray]]:
    """One model per image (its fold's), which finds every opacity at 0.7 and puts a 0.35 false alarm on each negative."""
    rows, truth = [], {}
    for index in range(patients):
        patient, fold = f"oof{index:03d}", index % FOLDS
        positive = index % 4 == 0
        truth[patient] = truth_box(rng) if positive else np.zeros((0, 4))
        boxes, scores = (truth[patient], [0.7]) if positive else (false_alarm(rng), [0.35])
        rows += passes_of(patient, f"fold{fold}", boxes, scores, 0.8 if positive else 0.3, fold, rng)
    return rows, truth


def disagreeing_ensemble(rng: np.random.Generator, patients: int = 120) -> tuple[list[RawPrediction], dict[str, np.ndarray]]:
    """Five models per image: each opacity is found by two of them only, each negative gets one false alarm per model, all apart."""
    rows, truth = [], {}
    for index in range(patients):
        patient = f"test{index:03d}"
        positive = index % 4 == 0
        truth[patient] = truth_box(rng) if positive else np.zeros((0, 4))
        finders = set(rng.choice(FOLDS, size=2, replace=False).tolist()) if positive else set()
        for fold in range(FOLDS):
            if fold in finders:
                boxes, scores = truth[patient], [0.7]
            elif positive:
                boxes, scores = np.zeros((0, 4)), []
            else:
                boxes, scores = false_alarm(rng), [0.35]
            probability = (0.6 if fold in finders else 0.45) if positive else 0.3
            rows += passes_of(patient, f"fold{fold}", boxes, scores, probability, None, rng)
    return rows, truth


def test_settings_tuned_out_of_fold_keep_boxes_on_a_fusion_of_disagreeing_folds() -> None:
    rng = np.random.default_rng(0)
    oof, oof_truth = out_of_fold(rng)
    tuned = tune_postprocess(oof, oof_truth, bootstrap_draws=0).config
    assert (tuned.tuned_models_per_image, tuned.tuned_passes_per_model) == (1, 2)
    assert tuned.expected_boxes_per_image == pytest.approx(38 / 150, abs=1e-6)  # the 38 positives' boxes, no false alarm
    assert 0.35 < tuned.score_threshold <= 0.7

    test, test_truth = disagreeing_ensemble(rng)
    # As tuned, without calibration: the fused opacities sit at 0.7 x 2/5 = 0.28, under the cut-off; nothing is kept.
    uncalibrated = apply_postprocess(test, dataclasses.replace(tuned, calibration="off"))
    assert uncalibrated.boxes_per_image == 0 and not uncalibrated.calibrated
    assert uncalibrated.far_from_expected()

    result = apply_postprocess(test, tuned)
    assert result.calibrated and "calibrated to 5 models x 2 passes per image (tuning saw 1 x 2)" in result.note
    assert tuned.expected_boxes_per_image / 1.5 <= result.boxes_per_image <= tuned.expected_boxes_per_image * 1.5
    assert not result.far_from_expected()
    # The boxes kept are the opacities, not the (unfused, so fainter) false alarms.
    assert score_dataset(test_truth, result.predictions).map > 0.8
    assert "kept 0.250 boxes per image (tuning expected 0.253)" == result.expectation_line()


def test_the_same_shape_as_tuning_is_applied_as_written() -> None:
    rng = np.random.default_rng(1)
    oof, oof_truth = out_of_fold(rng)
    tuned = tune_postprocess(oof, oof_truth, bootstrap_draws=0).config
    single = [row for row in disagreeing_ensemble(rng)[0] if row.model == "fold0"]
    result = apply_postprocess(single, tuned)
    assert not result.calibrated and result.note == "" and result.applied == tuned


def test_too_few_images_are_applied_as_written_and_said_so() -> None:
    rng = np.random.default_rng(2)
    oof, oof_truth = out_of_fold(rng)
    tuned = tune_postprocess(oof, oof_truth, bootstrap_draws=0).config
    test, _ = disagreeing_ensemble(rng, patients=MIN_CALIBRATION_IMAGES - 1)
    result = apply_postprocess(test, tuned)
    assert not result.calibrated and result.applied == tuned
    assert f"only {MIN_CALIBRATION_IMAGES - 1} images: too few to calibrate" in result.note


def test_a_file_without_what_tuning_saw_is_never_calibrated() -> None:
    test, _ = disagreeing_ensemble(np.random.default_rng(3))
    result = apply_postprocess(test, PostprocessConfig(score_threshold=0.5))
    assert not result.calibrated and result.note == "" and result.expectation_line() == ""


def test_calibrate_keeps_the_gate_share_and_the_boxes_per_image() -> None:
    merged = {f"p{index}": Prediction.from_arrays([0.9 - index * 0.1, 0.05], [[0, 0, 10, 10], [50, 50, 10, 10]]) for index in range(8)}
    probabilities = {f"p{index}": 0.1 * index for index in range(8)}  # p0 0.0 ... p7 0.7
    config = PostprocessConfig(score_threshold=0.5, gate_threshold=0.5, max_boxes=1, expected_gated_share=0.5, expected_boxes_per_image=0.25)
    applied = calibrate(config, merged, probabilities)
    # Half of the 8 pass the gate: p4..p7 (0.4 and up); 2 boxes in all, one per image at most: p4 (0.5) and p5 (0.4).
    assert applied.gate_threshold == pytest.approx(0.4)
    assert applied.score_threshold == pytest.approx(0.4)
    assert (applied.shrink, applied.max_boxes) == (config.shrink, config.max_boxes)


def test_kth_largest_or_beyond() -> None:
    values = np.array([0.2, 0.9, 0.5, 0.5])
    assert kth_largest_or_beyond(values, 1) == 0.9
    assert kth_largest_or_beyond(values, 2) == 0.5  # ties: both 0.5s are kept
    assert kth_largest_or_beyond(values, 9) == 0.2
    assert kth_largest_or_beyond(values, 0) > 0.9
    assert kth_largest_or_beyond(np.zeros(0), 3) == 0.0


def test_prediction_shape_counts_models_per_image_and_passes_per_model() -> None:
    rows, _ = disagreeing_ensemble(np.random.default_rng(4), patients=3)
    assert prediction_shape(rows) == (5, 2)
    assert prediction_shape([row for row in rows if row.pass_name == "plain" and row.model == "fold1"]) == (1, 1)
    assert prediction_shape([]) == (0, 0)
