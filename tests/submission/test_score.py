"""The RSNA metric on hand-computed cases (``lungdet score``'s command line is tested in tests/show/test_score_cli.py).

Boxes are XYWH_ABS. Most cases use the truth box ``[0, 0, 10, 10]`` (area 100), so IoUs are
easy to check by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungdet.errors import SubmissionError
from lungdet.submission.prediction_string import Prediction
from lungdet.submission.score import (
    RSNA_IOU_THRESHOLDS,
    Match,
    ThresholdResult,
    match_predictions,
    score_dataset,
    score_image,
)

SQUARE = [0.0, 0.0, 10.0, 10.0]
NO_TRUTH = np.zeros((0, 4))


def truth(*boxes: list[float]) -> np.ndarray:
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


def predict(*groups: tuple[float, list[float]]) -> Prediction:
    """A Prediction from ``(confidence, [x, y, width, height])`` pairs."""
    return Prediction.from_arrays([score for score, _ in groups], [box for _, box in groups])


def counts(result: ThresholdResult) -> tuple[int, int, int]:
    return result.true_positives, result.false_positives, result.false_negatives


# --- one image ----------------------------------------------------------------------------------


def test_no_truth_and_no_prediction_is_left_out() -> None:
    assert score_image(NO_TRUTH, Prediction.empty()) is None


def test_prediction_on_a_negative_scores_zero() -> None:
    image = score_image(NO_TRUTH, predict((0.9, SQUARE)))
    assert image is not None
    assert image.score == 0.0
    assert [counts(result) for result in image.per_threshold] == [(0, 1, 0)] * 8


def test_truth_without_prediction_scores_zero() -> None:
    image = score_image(truth(SQUARE, [20, 20, 10, 10]), Prediction.empty())
    assert image is not None
    assert image.score == 0.0
    assert [counts(result) for result in image.per_threshold] == [(0, 0, 2)] * 8


def test_two_truths_one_perfect_prediction_scores_half() -> None:
    image = score_image(truth(SQUARE, [20, 20, 10, 10]), predict((0.9, SQUARE)))
    assert image is not None
    # TP 1, FP 0, FN 1 at every threshold: 1 / 2.
    assert [counts(result) for result in image.per_threshold] == [(1, 0, 1)] * 8
    assert [result.precision for result in image.per_threshold] == [0.5] * 8
    assert image.score == 0.5


def test_iou_exactly_at_a_threshold_is_not_a_hit() -> None:
    # Intersection 50, union 100: IoU is exactly 0.5, a hit only when strictly greater than t.
    image = score_image(truth(SQUARE), predict((0.9, [0, 0, 10, 5])))
    assert image is not None
    assert [result.iou_threshold for result in image.per_threshold] == [0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75]
    assert [result.precision for result in image.per_threshold] == [1, 1, 0, 0, 0, 0, 0, 0]
    assert image.score == 0.25  # 2 / 8


def test_iou_exactly_065_is_not_a_hit_at_065() -> None:
    # The prediction lies inside the truth: IoU = 130 / 200 = 0.65 exactly, a hit at 0.40 .. 0.60.
    # With np.arange thresholds (whose 0.65 is 0.6499999999999999) it would also hit at 0.65.
    image = score_image(truth([0, 0, 20, 10]), predict((0.9, [0, 0, 13, 10])))
    assert image is not None
    assert image.score == 0.625  # 5 / 8


# Two truth boxes side by side and two predictions. WIDE covers all of T1 and part of T2:
# IoU(WIDE, T1) = 100 / 186 = 0.538, IoU(WIDE, T2) = 86 / 200 = 0.43. EXACT is T1 itself.
T1, T2 = SQUARE, [10.0, 0.0, 10.0, 10.0]
WIDE, EXACT = [0.0, 0.0, 18.6, 10.0], SQUARE


def test_higher_confidence_matches_first_even_when_listed_second() -> None:
    prediction = predict((0.3, WIDE), (0.9, EXACT))
    # EXACT (0.9) takes T1, leaving WIDE only T2 at IoU 0.43: a hit at t = 0.40 only.
    # t = 0.40: TP 2, FP 0, FN 0 -> 1.  Other 7 thresholds: TP 1, FP 1, FN 1 -> 1/3.
    image = score_image(truth(T1, T2), prediction)
    assert image is not None
    assert [counts(result) for result in image.per_threshold] == [(2, 0, 0)] + [(1, 1, 1)] * 7
    assert image.score == pytest.approx((1 + 7 / 3) / 8)  # 5/12

    matches = match_predictions(truth(T1, T2), prediction, iou_threshold=0.40)
    assert [(match.prediction_index, match.truth_index) for match in matches] == [(1, 0), (0, 1)]
    assert [match.iou for match in matches] == pytest.approx([1.0, 0.43])


def test_lower_iou_prediction_matching_first_changes_the_score() -> None:
    # Same boxes, confidences swapped: WIDE now takes T1 (its best IoU, 0.538) at t <= 0.50
    # and EXACT is left with T2 (IoU 0): TP 1, FP 1, FN 1. At t >= 0.55 WIDE misses and
    # EXACT takes T1: TP 1, FP 1, FN 1 again. 1/3 everywhere, not 5/12.
    image = score_image(truth(T1, T2), predict((0.9, WIDE), (0.3, EXACT)))
    assert image is not None
    assert [counts(result) for result in image.per_threshold] == [(1, 1, 1)] * 8
    assert image.score == pytest.approx(1 / 3)


def test_prediction_takes_the_unmatched_truth_with_highest_iou() -> None:
    # [2, 0, 18, 10] overlaps T1 by 80 (IoU 80 / 200 = 0.4) and T2 by 100 (IoU 100 / 180): T2 wins
    # although T1 is listed first.
    matches = match_predictions(truth(T1, T2), predict((0.9, [2, 0, 18, 10])), iou_threshold=0.0)
    assert matches == [Match(prediction_index=0, truth_index=1, iou=pytest.approx(100 / 180))]


def test_score_image_rejects_empty_thresholds() -> None:
    with pytest.raises(ValueError, match="thresholds must not be empty"):
        score_image(truth(SQUARE), Prediction.empty(), thresholds=())


# --- dataset ------------------------------------------------------------------------------------


def test_dataset_map_averages_scored_images_only() -> None:
    report = score_dataset(
        {
            "perfect": truth(SQUARE),  # 1
            "false-alarm": NO_TRUTH,  # 0
            "half": truth(SQUARE, [20, 20, 10, 10]),  # 1/2
            "left-out": NO_TRUTH,  # neither truth nor prediction
        },
        {
            "perfect": predict((0.9, SQUARE)),
            "false-alarm": predict((0.9, SQUARE)),
            "half": predict((0.9, SQUARE)),
            "left-out": Prediction.empty(),
        },
    )
    assert report.map == 0.5  # (1 + 0 + 0.5) / 3
    assert (report.n_images, report.n_scored, report.n_positive, report.n_negative) == (4, 3, 2, 2)
    assert report.n_predicted_boxes == 3
    assert [summary.mean_precision for summary in report.per_threshold] == [0.5] * 8
    # TP: perfect 1 + half 1; FP: false-alarm 1; FN: half 1.
    assert [(s.true_positives, s.false_positives, s.false_negatives) for s in report.per_threshold] == [(2, 1, 1)] * 8
    assert (report.sensitivity, report.specificity) == (1.0, 0.5)


def test_prediction_on_negative_is_included_in_the_mean() -> None:
    report = score_dataset(
        {"negative": NO_TRUTH, "positive": truth(SQUARE)},
        {"negative": predict((0.1, SQUARE)), "positive": predict((0.9, SQUARE))},
    )
    assert (report.map, report.n_scored) == (0.5, 2)


def test_patient_missing_from_submission_counts_as_no_predictions() -> None:
    report = score_dataset({"found": truth(SQUARE), "missing": truth(SQUARE)}, {"found": predict((0.9, SQUARE))})
    assert report.map == 0.5  # (1 + 0) / 2
    assert (report.n_scored, report.n_missing_predictions, report.sensitivity) == (2, 1, 0.5)


def test_predictions_for_unknown_patients_are_counted_not_scored() -> None:
    report = score_dataset(
        {"known": truth(SQUARE)}, {"known": predict((0.9, SQUARE)), "stranger": predict((0.9, SQUARE))}
    )
    assert (report.map, report.n_images, report.n_unknown_predictions, report.n_predicted_boxes) == (1.0, 1, 1, 1)


def test_min_confidence_drops_boxes_before_scoring() -> None:
    labels = {"positive": truth(SQUARE), "negative": NO_TRUTH}
    predictions = {
        "positive": predict((0.9, SQUARE), (0.3, [50, 50, 10, 10])),  # a hit and a false positive
        "negative": predict((0.2, SQUARE)),
    }
    everything = score_dataset(labels, predictions)
    assert (everything.map, everything.n_scored, everything.specificity) == (0.25, 2, 0.0)  # (1/2 + 0) / 2

    confident = score_dataset(labels, predictions, min_confidence=0.5)
    # Only the hit is left; the negative has no box any more and is left out.
    assert (confident.map, confident.n_scored, confident.n_predicted_boxes, confident.specificity) == (1.0, 1, 1, 1.0)
    assert confident.min_confidence == 0.5

    at_boundary = score_dataset(labels, predictions, min_confidence=0.3)  # a box at exactly 0.3 is kept
    assert (at_boundary.map, at_boundary.n_predicted_boxes) == (0.5, 2)


def test_min_confidence_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"min_confidence must be in \[0, 1\], got 1.5"):
        score_dataset({}, {}, min_confidence=1.5)


def test_mean_iou_over_pairs_matched_at_any_overlap() -> None:
    report = score_dataset(
        {"a": truth(SQUARE), "b": truth(SQUARE), "c": NO_TRUTH},
        {
            "a": predict((0.9, [0, 0, 10, 5])),  # IoU 50 / 100 = 0.5
            # The 0.95 box (IoU 20 / 100 = 0.2) comes first and takes the truth, so the better
            # 0.5 box (IoU 50 / 150) is unmatched; the box far away overlaps nothing.
            "b": predict((0.5, [5, 0, 10, 10]), (0.95, [0, 0, 10, 2]), (0.4, [50, 50, 10, 10])),
            "c": predict((0.9, SQUARE)),  # no truth, no pair
        },
    )
    assert report.mean_iou == pytest.approx((0.5 + 0.2) / 2)


def test_sensitivity_and_specificity_on_a_mixed_set() -> None:
    report = score_dataset(
        {"p1": truth(SQUARE), "p2": truth(SQUARE), "n1": NO_TRUTH, "n2": NO_TRUTH, "n3": NO_TRUTH},
        # Image level: a box anywhere on a positive image counts, even one that misses.
        {"p1": predict((0.9, [500, 500, 10, 10])), "n1": predict((0.9, SQUARE))},
    )
    assert report.sensitivity == 0.5  # 1 of 2 positives has a box
    assert report.specificity == pytest.approx(2 / 3)  # 2 of 3 negatives have none
    assert report.map == 0.0
    assert report.mean_iou is None


def test_nothing_to_score() -> None:
    report = score_dataset({"n1": NO_TRUTH}, {})
    assert (report.map, report.n_scored, report.n_images) == (0.0, 0, 1)
    assert (report.mean_iou, report.sensitivity, report.specificity) == (None, None, 1.0)
    assert [summary.mean_precision for summary in report.per_threshold] == [0.0] * 8


def test_thresholds_are_the_exact_literals() -> None:
    assert RSNA_IOU_THRESHOLDS == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)


# --- bootstrap intervals ------------------------------------------------------------------------


def test_bootstrap_interval_of_a_constant_score_is_that_score() -> None:
    from lungdet.submission.score import bootstrap_interval

    assert bootstrap_interval(np.full(50, 0.25)) == (0.25, 0.25)
    # Unscored patients never count, but a draw of only unscored ones scores 0, as the metric does (chance 8/27).
    assert bootstrap_interval(np.array([0.4, np.nan, np.nan])) == pytest.approx((0.0, 0.4))
    assert bootstrap_interval(np.array([np.nan, np.nan])) == (0.0, 0.0)
    assert bootstrap_interval(np.array([])) == (0.0, 0.0)


def test_bootstrap_interval_spans_the_resamples_and_repeats_with_its_seed() -> None:
    from lungdet.submission.score import bootstrap_interval

    # Two patients scoring 1 and 0: a resample's mean is 0, 0.5 or 1 with chances 1/4, 1/2, 1/4.
    assert bootstrap_interval(np.array([1.0, 0.0]), draws=1000, seed=3) == (0.0, 1.0)
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=400)
    low, high = bootstrap_interval(scores, seed=1)
    assert low < scores.mean() < high
    # The standard error of a mean of 400 uniforms is 0.0144: a 95% interval about 0.057 wide.
    assert 0.045 < high - low < 0.07
    assert bootstrap_interval(scores, seed=1) == (low, high)
    assert bootstrap_interval(scores, seed=2) != (low, high)


def test_score_dataset_carries_the_interval_only_when_asked() -> None:
    truths = {f"p{index}": truth(SQUARE) for index in range(20)}
    predictions = {f"p{index}": predict((0.9, SQUARE)) for index in range(10)}  # half found exactly, half missed
    assert score_dataset(truths, predictions).map_interval is None
    report = score_dataset(truths, predictions, bootstrap_draws=500, seed=0)
    assert report.map == 0.5
    low, high = report.map_interval
    assert low < 0.5 < high and report.to_dict()["map_interval"] == (low, high)


# --- slices -------------------------------------------------------------------------------------


def test_slices_add_up_to_the_whole() -> None:
    from lungdet.submission.score import score_slices

    truths = {"a": truth(SQUARE), "b": NO_TRUTH, "c": truth(SQUARE), "d": NO_TRUTH, "e": truth(SQUARE)}
    predictions = {"a": predict((0.9, SQUARE)), "b": predict((0.5, SQUARE)), "c": predict((0.8, [0, 0, 10, 14]))}
    metadata = {
        "a": {"view_position": "AP", "sex": "F", "age_band": "18-39"},
        "b": {"view_position": "PA", "sex": "F", "age_band": "60+"},
        "c": {"view_position": "AP", "sex": "M", "age_band": "60+"},
        "d": {"view_position": "PA", "sex": "M", "age_band": "40-59"},
    }  # "e" has no metadata: it falls in 'unknown'
    whole = score_dataset(truths, predictions)
    slices = score_slices(truths, predictions, metadata, ["view_position", "sex"])
    assert [(item.by, item.value) for item in slices] == [
        ("view_position", "AP"),
        ("view_position", "PA"),
        ("view_position", "unknown"),
        ("sex", "F"),
        ("sex", "M"),
        ("sex", "unknown"),
    ]
    for key in ("view_position", "sex"):
        parts = [item.report for item in slices if item.by == key]
        assert sum(part.n_images for part in parts) == whole.n_images == 5
        assert sum(part.n_scored for part in parts) == whole.n_scored
        assert sum(part.map * part.n_scored for part in parts) == pytest.approx(whole.map * whole.n_scored)
    ap = slices[0].report  # a: 1.0; c: IoU 100/140 = 0.714, a hit up to 0.70 -> 7/8
    assert ap.map == pytest.approx((1.0 + 7 / 8) / 2)


def test_slices_need_known_keys() -> None:
    from lungdet.submission.score import score_slices

    with pytest.raises(SubmissionError, match="cannot slice by hospital; choose from view_position, sex, age_band"):
        score_slices({}, {}, {}, ["hospital"])


def test_read_slice_metadata(annotations_json: Path) -> None:
    from lungdet.submission.score import read_slice_metadata

    assert read_slice_metadata(annotations_json) == {
        "pos": {"view_position": "AP", "sex": "F", "age_band": "18-39"},
        "neg": {"view_position": "PA", "sex": "M", "age_band": "60+"},
        "empty": {"view_position": "unknown", "sex": "unknown", "age_band": "unknown"},
    }


# --- image-level probabilities ------------------------------------------------------------------


def test_roc_auc_by_hand() -> None:
    from lungdet.submission.score import roc_auc

    assert roc_auc([True, False, True, False], [0.9, 0.1, 0.8, 0.3]) == 1.0
    # Positives 0.2 and 0.9 against negatives 0.8 and 0.1: 3 of the 4 pairs ordered right.
    assert roc_auc([True, True, False, False], [0.2, 0.9, 0.8, 0.1]) == pytest.approx(0.75)
    assert roc_auc([True, False], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
    assert roc_auc([True, True], [0.1, 0.2]) is None


def test_youden_threshold_separates_where_it_can() -> None:
    from lungdet.submission.score import youden_threshold

    assert youden_threshold([True, False, True, False], [0.9, 0.1, 0.8, 0.3]) == 0.8
    assert youden_threshold([False, False], [0.1, 0.2]) is None
