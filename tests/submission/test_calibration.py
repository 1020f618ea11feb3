"""Tuned post-processing applied to a fusion of models that agree and disagree, image by image, and batch calibration as an opt-in.

``lungdet tune`` sees one model per image (out of fold); ``lungdet predict`` with every fold's
checkpoint fuses five. These tests build both by hand and check that the tuned settings keep
their meaning on the ensemble without looking at the batch, that an image gets the same boxes
whatever else is in its batch, and what batch calibration does (and assumes) when asked for.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lungdet.submission.postprocess import (
    FAR_CALIBRATION_MOVE,
    MIN_CALIBRATION_IMAGES,
    OperatingPoint,
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


def passes_of(
    patient: str, model: str, boxes: np.ndarray, scores: list[float], probability: float, fold: int | None, rng
) -> list[RawPrediction]:
    """A model's plain and mirrored pass over one image: the same boxes, a little apart."""
    return [
        RawPrediction(
            patient, model, pass_name, SIZE, SIZE, Prediction.from_arrays(scores, jitter(boxes, rng)), probability, fold
        )
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


def disagreeing_ensemble(
    rng: np.random.Generator, patients: int = 120
) -> tuple[list[RawPrediction], dict[str, np.ndarray]]:
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


def agreeing_negatives(
    rng: np.random.Generator, patients: int, *, start: int = 0
) -> tuple[list[RawPrediction], dict[str, np.ndarray]]:
    """Negatives on which all five models agree: every third gets the same confident false alarm (0.6) from each, the rest a faint one (0.1-0.3)."""
    rows, truth = [], {}
    for index in range(start, start + patients):
        patient = f"neg{index:03d}"
        truth[patient] = np.zeros((0, 4))
        alarm, score = false_alarm(rng), 0.6 if index % 3 == 0 else float(rng.uniform(0.1, 0.3))
        for fold in range(FOLDS):
            rows += passes_of(patient, f"fold{fold}", alarm, [score], 0.7 if index % 3 == 0 else 0.2, None, rng)
    return rows, truth


def tuned_on_out_of_fold(seed: int) -> PostprocessConfig:
    rng = np.random.default_rng(seed)
    oof, oof_truth = out_of_fold(rng)
    return tune_postprocess(oof, oof_truth, bootstrap_draws=0).config


def test_settings_tuned_out_of_fold_keep_their_meaning_on_a_fusion_of_disagreeing_folds() -> None:
    rng = np.random.default_rng(0)
    oof, oof_truth = out_of_fold(rng)
    tuned = tune_postprocess(oof, oof_truth, bootstrap_draws=0).config
    assert (tuned.tuning.tuned_models_per_image, tuned.tuning.tuned_passes_per_model) == (1, 2)
    assert tuned.tuning.expected_boxes_per_image == pytest.approx(
        38 / 150, abs=1e-6
    )  # the 38 positives' boxes, no false alarm
    assert 0.35 < tuned.score_threshold <= 0.7
    assert tuned.calibration == "off" and tuned.wbf_conf_type == "finders"

    test, test_truth = disagreeing_ensemble(rng)
    # Each opacity was found by two of the five models at 0.7: 'finders' fusion keeps 0.7, over the cut-off.
    result = apply_postprocess(test, tuned)
    assert not result.calibrated and result.note == ""
    assert result.boxes_per_image == pytest.approx(30 / 120)  # the 30 opacities, no false alarm (each alone at 0.35)
    assert score_dataset(test_truth, result.predictions).map > 0.8
    assert not result.far_from_expected()
    assert "kept 0.250 boxes per image (tuning expected 0.253)" == result.expectation_line()
    # The package's 'avg' counts the three models that missed as 0: 0.7 x 2/5 = 0.28 falls under the cut-off, nothing is kept.
    averaged = apply_postprocess(test, dataclasses.replace(tuned, wbf_conf_type="avg"))
    assert averaged.boxes_per_image == 0 and averaged.far_from_expected()


def test_an_image_gets_the_same_boxes_whatever_else_is_in_its_batch() -> None:
    """All-negative, 5%-positive and 25%-positive batches: the same negatives get the same boxes in each, models agreeing or not."""
    rng = np.random.default_rng(5)
    tuned = tuned_on_out_of_fold(5)
    negatives, _ = agreeing_negatives(rng, 60)
    disagreeing, _ = disagreeing_ensemble(rng, patients=80)  # 20 positives, 60 negatives with scattered false alarms
    positives = [row for row in disagreeing if int(row.patient_id[4:]) % 4 == 0]
    scattered = [row for row in disagreeing if int(row.patient_id[4:]) % 4 != 0]
    batches = {
        "all negative": negatives + scattered,
        "5% positive": negatives + scattered + [row for row in positives if int(row.patient_id[4:]) < 24],  # 6 of 126
        "25% positive": negatives + scattered + positives,  # 20 of 140
    }
    results = {name: apply_postprocess(rows, tuned).predictions for name, rows in batches.items()}
    shared = {row.patient_id for row in negatives + scattered}
    boxed = {
        name: sorted(patient for patient in shared if len(predictions[patient].scores))
        for name, predictions in results.items()
    }
    assert boxed["all negative"] == boxed["5% positive"] == boxed["25% positive"]
    assert (
        len(boxed["all negative"]) == 20
    )  # the negatives on which every model agreed on a confident false alarm, and only those
    for patient in shared:
        np.testing.assert_array_equal(results["all negative"][patient].boxes, results["25% positive"][patient].boxes)


def test_batch_calibration_keeps_the_operating_point_and_assumes_the_share_of_positives() -> None:
    rng = np.random.default_rng(6)
    tuned = tuned_on_out_of_fold(6)
    test, test_truth = disagreeing_ensemble(rng)
    averaged = dataclasses.replace(tuned, wbf_conf_type="avg", calibration="batch")
    result = apply_postprocess(test, averaged)
    assert result.calibrated and "assumes this batch has the training set's share of positives" in result.note
    assert (
        tuned.tuning.expected_boxes_per_image / 1.5
        <= result.boxes_per_image
        <= tuned.tuning.expected_boxes_per_image * 1.5
    )
    assert score_dataset(test_truth, result.predictions).map > 0.8
    # On a batch of negatives it still boxes its share of images, and says it moved the cut-off far.
    negatives, _ = agreeing_negatives(rng, 90)
    scattered, _ = disagreeing_ensemble(rng, patients=60)
    only_negatives = negatives + [row for row in scattered if int(row.patient_id[4:]) % 4 != 0]
    alone = apply_postprocess(only_negatives, averaged)
    boxed = sum(len(prediction.scores) > 0 for prediction in alone.predictions.values()) / len(alone.predictions)
    assert boxed == pytest.approx(tuned.tuning.expected_boxes_per_image, abs=0.05)
    assert "warning: that moves a setting by" in alone.note
    assert abs(alone.applied.score_threshold - tuned.score_threshold) > FAR_CALIBRATION_MOVE
    # Image by image (the default), the same negatives get a box only where every model agreed on a confident false alarm.
    default = apply_postprocess(only_negatives, tuned)
    assert sum(len(prediction.scores) > 0 for prediction in default.predictions.values()) == 30


def test_batch_calibration_needs_enough_images_and_tunings_operating_point() -> None:
    tuned = dataclasses.replace(tuned_on_out_of_fold(2), calibration="batch")
    test, _ = disagreeing_ensemble(np.random.default_rng(2), patients=MIN_CALIBRATION_IMAGES - 1)
    result = apply_postprocess(test, tuned)
    assert not result.calibrated and result.applied == tuned
    assert f"only {MIN_CALIBRATION_IMAGES - 1} images: too few to calibrate" in result.note
    untuned = apply_postprocess(
        disagreeing_ensemble(np.random.default_rng(3))[0], PostprocessConfig(score_threshold=0.5, calibration="batch")
    )
    assert not untuned.calibrated and "needs the operating point lungdet tune writes" in untuned.note
    assert untuned.expectation_line() == ""


def test_a_file_from_an_older_lungdet_is_applied_image_by_image_and_says_so() -> None:
    tuned = tuned_on_out_of_fold(4)
    test, _ = disagreeing_ensemble(np.random.default_rng(4))
    legacy = apply_postprocess(test, dataclasses.replace(tuned, calibration="auto"))
    assert not legacy.calibrated and legacy.applied.calibration == "off"
    assert legacy.note.startswith("calibration: auto (a file tuned by an older lungdet) is read as off")
    assert legacy.predictions.keys() == apply_postprocess(test, tuned).predictions.keys()


def test_calibrate_keeps_the_gate_share_and_the_boxes_per_image() -> None:
    merged = {
        f"p{index}": Prediction.from_arrays([0.9 - index * 0.1, 0.05], [[0, 0, 10, 10], [50, 50, 10, 10]])
        for index in range(8)
    }
    probabilities = {f"p{index}": 0.1 * index for index in range(8)}  # p0 0.0 ... p7 0.7
    config = PostprocessConfig(
        score_threshold=0.5,
        gate_threshold=0.5,
        max_boxes=1,
        tuning=OperatingPoint(expected_gated_share=0.5, expected_boxes_per_image=0.25),
    )
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
