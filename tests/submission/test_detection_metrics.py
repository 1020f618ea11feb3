"""COCO AP, FROC, image AUC and ECE on hand-computed cases (submission/detection_metrics.py).

Boxes are XYWH_ABS. Truth boxes are 10 x 10 squares (area 100), so a prediction ``[x, y, 10, h]``
lying inside one has IoU h / 10.

COCOeval's precision is TP / (TP + FP + eps) with eps = 2.2e-16, so a precision of 1 is stored as
0.9999999999999998; hand-computed APs are compared to 1e-12 for that reason alone.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from lungdet.submission.detection_metrics import (
    COCO_IOU_THRESHOLDS,
    accumulate_precision,
    average_precisions,
    build_coco,
    coco_matches,
    coco_precision,
    evaluate_coco,
    expected_calibration_error,
    froc_curve,
    froc_matches,
    froc_sensitivities,
    percentile_interval,
    score_coco,
    score_detection_metrics,
    score_froc,
    score_probabilities,
)
from lungdet.submission.prediction_string import Prediction
from lungdet.submission.score import roc_auc, score_dataset

EXACT = 1e-12
T1, T2 = [0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 10.0, 10.0]
NO_TRUTH = np.zeros((0, 4))


def truth(*boxes: list[float]) -> np.ndarray:
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


def predict(*groups: tuple[float, list[float]]) -> Prediction:
    """A Prediction from ``(confidence, [x, y, width, height])`` pairs."""
    return Prediction.from_arrays([score for score, _ in groups], [box for _, box in groups])


# Two images, three truth boxes, four predictions:
#   image A: truth T1, T2; p1 (0.9) is T1 itself (IoU 1); p4 (0.6) is [20, 0, 10, 4.5] inside T2 (IoU 0.45).
#   image B: truth T1;     p2 (0.8) is far away (IoU 0); p3 (0.7) is [0, 0, 10, 6.2] inside T1 (IoU 0.62).
IMAGE_A = (truth(T1, T2), predict((0.9, T1), (0.6, [20.0, 0.0, 10.0, 4.5])))
IMAGE_B = (truth(T1), predict((0.8, [50.0, 50.0, 10.0, 10.0]), (0.7, [0.0, 0.0, 10.0, 6.2])))
# A negative image with one confident box.
IMAGE_C = (NO_TRUTH, predict((0.95, T1)))


def random_images(count: int, seed: int) -> list[tuple[np.ndarray, Prediction]]:
    """About 30% positive images with 1-3 shifted truth boxes found at random confidences, plus 0-2 stray boxes each.

    Confidences are rounded to 0.05, so many tie across images (the sort's tie rule matters).
    """
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        boxes, scores, predicted = [], [], []
        for _ in range(rng.integers(1, 4) if rng.random() < 0.3 else 0):
            x, y, w, h = *rng.uniform(0, 600, 2), *rng.uniform(50, 300, 2)
            boxes.append([x, y, w, h])
            scores.append(round(rng.uniform(0.3, 1.0) * 20) / 20)
            predicted.append([x + rng.uniform(-40, 40), y + rng.uniform(-40, 40), w, h])
        for _ in range(rng.integers(0, 3)):
            scores.append(round(rng.uniform(0.0, 0.8) * 20) / 20)
            predicted.append([*rng.uniform(0, 600, 2), *rng.uniform(50, 300, 2)])
        images.append((truth(*boxes), Prediction.from_arrays(scores, predicted)))
    return images


# --- COCO AP ----------------------------------------------------------------------------------


def test_coco_ap_by_hand() -> None:
    # COCOeval pools the four boxes by confidence: p1 (A), p2 (B), p3 (B), p4 (A); 3 truth boxes.
    # IoU >= 0.50, 0.55, 0.60: p1 TP, p2 FP, p3 TP (0.62), p4 FP (0.45).
    #   recall    1/3, 1/3, 2/3, 2/3;  precision 1, 1/2, 2/3, 1/2;  envelope 1, 2/3, 2/3, 1/2.
    #   Recall points 0.00..0.33 (34) read 1, 0.34..0.66 (33) read 2/3, 0.67..1.00 (34) read 0:
    #   AP = (34 + 33 * 2/3) / 101 = 56/101.
    # IoU >= 0.65 .. 0.95 (7 thresholds): only p1 is a TP. Precision 1, 1/2, 1/3, 1/4 -> 34 points read 1: 34/101.
    # AP@[.50:.95] = (3 * 56 + 7 * 34) / 1010 = 406/1010.
    # IoU >= 0.40: p4 is a TP too. Recall 1/3, 1/3, 2/3, 1; precision 1, 1/2, 2/3, 3/4; envelope 1, 3/4, 3/4, 3/4.
    #   34 points read 1, the other 67 read 3/4: AP40 = (34 + 67 * 3/4) / 101 = 84.25/101.
    report = score_coco([IMAGE_A, IMAGE_B])
    assert report.reason is None and report.max_detections == 100
    assert report.ap50 == pytest.approx(56 / 101, abs=EXACT)
    assert report.ap == pytest.approx(406 / 1010, abs=EXACT)
    assert report.ap40 == pytest.approx(84.25 / 101, abs=EXACT)
    assert report.ap_interval is None  # no draws asked for


def test_ap40_counts_an_iou_of_045_at_040_but_not_at_050() -> None:
    # One truth box, one prediction inside it at IoU 0.45: a hit only at the 0.40 threshold.
    report = score_coco([(truth(T1), predict((0.9, [0.0, 0.0, 10.0, 4.5])))])
    assert report.ap40 == pytest.approx(1.0, abs=EXACT)  # precision 1 at every recall point
    assert (report.ap50, report.ap) == (0.0, 0.0)


def test_negative_images_count_their_boxes_as_false_positives() -> None:
    # IMAGE_C's 0.95 box comes first and is a false positive.
    # IoU >= 0.5: FP, TP, FP, TP, FP -> recall 0, 1/3, 1/3, 2/3, 2/3; precision 0, 1/2, 1/3, 1/2, 2/5;
    #   envelope 1/2, 1/2, 1/2, 1/2, 2/5. Recall points 0.00..0.66 (67) read 1/2, the rest 0: AP50 = 33.5/101.
    # IoU >= 0.4: FP, TP, FP, TP, TP -> precision 0, 1/2, 1/3, 1/2, 3/5; envelope 3/5 everywhere: AP40 = 3/5.
    report = score_coco([IMAGE_A, IMAGE_B, IMAGE_C])
    assert report.ap50 == pytest.approx(33.5 / 101, abs=EXACT)
    assert report.ap40 == pytest.approx(0.6, abs=EXACT)


def test_ap_equals_pycocotools_summarize_with_its_default_parameters() -> None:
    # Adding the 0.40 threshold and dropping the small/medium/large ranges must not change AP@[.50:.95] or AP50.
    images = random_images(60, seed=4)
    truth_coco, predicted_coco = build_coco(images)
    default = COCOeval(truth_coco, predicted_coco, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        default.evaluate()
        default.accumulate()
        default.summarize()
    report = score_coco(images)
    assert default.stats[0] > 0.05  # a case where AP is far from 0
    assert (report.ap, report.ap50) == (default.stats[0], default.stats[1])


def test_reaccumulation_equals_cocoeval_on_the_whole_set_and_on_a_resample() -> None:
    images = random_images(80, seed=1)
    evaluation = evaluate_coco(images)
    matches = coco_matches(evaluation)
    whole = accumulate_precision(matches, np.arange(len(images)))
    assert whole.shape == (len(COCO_IOU_THRESHOLDS), 101)
    np.testing.assert_allclose(whole, coco_precision(evaluation), rtol=0, atol=1e-9)
    assert average_precisions(whole) == pytest.approx(average_precisions(coco_precision(evaluation)), abs=1e-9)
    # A resample in which patients repeat: COCOeval on the repeated images (each its own image id) agrees.
    drawn = np.random.default_rng(7).integers(0, len(images), size=len(images))
    assert len(set(drawn.tolist())) < len(images)
    resampled = evaluate_coco([images[index] for index in drawn])
    np.testing.assert_allclose(accumulate_precision(matches, drawn), coco_precision(resampled), rtol=0, atol=1e-9)


def test_max_detections_grows_so_no_box_is_dropped() -> None:
    # 149 confident false positives, then the one hit at the lowest confidence. With maxDets 100 the hit
    # would be dropped (AP 0); kept, recall reaches 1 only at the 150th box: precision 1/150 at every point.
    far = [(0.9, [500.0 + index, 500.0, 10.0, 10.0]) for index in range(149)]
    report = score_coco([(truth(T1), predict(*far, (0.1, T1)))])
    assert report.max_detections == 150
    assert report.ap50 == pytest.approx(1 / 150, abs=EXACT)


def test_coco_with_no_predictions_scores_zero() -> None:
    report = score_coco([(truth(T1), Prediction.empty()), (NO_TRUTH, Prediction.empty())], bootstrap_draws=50)
    assert (report.ap, report.ap50, report.ap40, report.reason) == (0.0, 0.0, 0.0, None)
    assert report.ap_interval == (0.0, 0.0)


def test_coco_is_undefined_without_truth_boxes() -> None:
    report = score_coco([(NO_TRUTH, predict((0.9, T1))), (NO_TRUTH, Prediction.empty())], bootstrap_draws=50)
    assert (report.ap, report.ap50, report.ap40, report.ap_interval) == (None, None, None, None)
    assert report.reason == "no truth box: COCO AP is undefined (pycocotools reports -1)"
    assert score_coco([]).reason == "no labelled image"


# --- FROC -------------------------------------------------------------------------------------


def test_froc_matches_each_truth_box_once_above_040() -> None:
    hits = froc_matches(
        truth(T1, T2),
        predict(
            (0.9, T1),  # IoU 1: hits T1
            (0.8, [0.0, 0.0, 10.0, 9.0]),  # IoU 0.9 with T1, already hit: a false positive
            (0.7, [20.0, 0.0, 10.0, 4.0]),  # IoU exactly 0.4 with T2: not above 0.4, a miss
            (0.6, [20.0, 0.0, 10.0, 4.5]),  # IoU 0.45 with T2: a hit
        ),
    )
    assert hits.tolist() == [True, False, False, True]


def test_froc_by_hand() -> None:
    # 4 images, 2 truth boxes (A: T1, B: T2), boxes by confidence:
    #   0.9 A hits T1 and 0.9 C (negative) -> tied, one point: 1 FP, 1 TP
    #   0.7 D FP, 0.6 D FP, 0.5 B hits T2 (IoU 0.45), 0.4 A second box on T1 (FP: T1 is taken)
    # Points (FP per image, sensitivity): (0, 0), (1/4, 1/2), (1/2, 1/2), (3/4, 1/2), (3/4, 1), (1, 1).
    # np.interp: at 1/8 halfway from (0, 0) to (1/4, 1/2) -> 1/4; at 1/4 -> 1/2; at 1/2 -> 1/2; at 1 -> 1;
    # beyond the last point (all boxes kept, 1 FP per image) it stays 1. Mean (1/4 + 1/2 + 1/2 + 4) / 7 = 3/4.
    images = [
        (truth(T1), predict((0.9, T1), (0.4, [0.0, 0.0, 10.0, 9.0]))),
        (truth(T2), predict((0.5, [20.0, 0.0, 10.0, 4.5]))),
        (NO_TRUTH, predict((0.9, T1))),
        (NO_TRUTH, predict((0.7, T1), (0.6, T2))),
    ]
    report = score_froc(images)
    fp_per_image, sensitivity = report.curve
    assert fp_per_image.tolist() == [0.0, 0.25, 0.5, 0.75, 0.75, 1.0]
    assert sensitivity.tolist() == [0.0, 0.5, 0.5, 0.5, 1.0, 1.0]
    assert report.fp_rates == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    assert report.sensitivities == (0.25, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0)
    assert report.score == 0.75
    assert (report.n_truth_boxes, report.iou_threshold) == (2, 0.4)


def test_froc_reads_the_highest_sensitivity_at_a_repeated_fp_rate() -> None:
    # Two points at 0.5 FP per image (sensitivity 1/4, then 1): the rate reads 1, as np.interp does in MONAI.
    fp_per_image, sensitivity = np.array([0.0, 0.5, 0.5, 1.0]), np.array([0.0, 0.25, 1.0, 1.0])
    assert froc_sensitivities(fp_per_image, sensitivity, (0.25, 0.5, 0.75)).tolist() == [0.125, 1.0, 1.0]


def test_froc_top_sensitivity_is_the_rsna_hits_at_040() -> None:
    images = random_images(50, seed=2)
    report = score_froc(images)
    rsna = score_dataset(
        {str(index): boxes for index, (boxes, _) in enumerate(images)},
        {str(index): prediction for index, (_, prediction) in enumerate(images)},
    )
    assert report.curve[1][-1] == rsna.per_threshold[0].true_positives / report.n_truth_boxes


def test_froc_with_no_predictions_is_zero_and_undefined_without_truth() -> None:
    empty = score_froc([(truth(T1), Prediction.empty()), (NO_TRUTH, Prediction.empty())], bootstrap_draws=50)
    assert (empty.sensitivities, empty.score, empty.score_interval) == ((0.0,) * 7, 0.0, (0.0, 0.0))
    assert [array.tolist() for array in empty.curve] == [[0.0], [0.0]]
    negative = score_froc([(NO_TRUTH, predict((0.9, T1)))], bootstrap_draws=50)
    assert (negative.sensitivities, negative.score, negative.score_interval) == (None, None, None)
    assert negative.reason == "no truth box: lesion-level sensitivity is undefined"


def test_froc_curve_needs_truth_boxes() -> None:
    with pytest.raises(ValueError, match="the FROC needs truth boxes and images, got 0 truth boxes on 3 images"):
        froc_curve(np.zeros(0), np.zeros(0, dtype=bool), truth_boxes=0, images=3)


# --- image-level probabilities ----------------------------------------------------------------


def test_ece_by_hand() -> None:
    # Bin 0: 0.05 (positive), 0.08 -> mean 0.065, share positive 1/2: gap 0.435, weight 2/5.
    # Bin 5: 0.55 (negative) -> gap 0.55, weight 1/5.   Bin 9: 0.92, 1.0 (both positive) -> mean 0.96, gap 0.04, weight 2/5.
    # ECE = (2 * 0.435 + 0.55 + 2 * 0.04) / 5 = 1.5 / 5 = 0.3.
    labels = [True, False, False, True, True]
    assert expected_calibration_error(labels, [0.05, 0.08, 0.55, 0.92, 1.0]) == pytest.approx(0.3)
    assert expected_calibration_error([True, False], [1.0, 0.0]) == 0.0
    assert expected_calibration_error([], []) is None


def test_probability_report_auc_and_ece() -> None:
    labels, probabilities = [True, True, False, False], [0.2, 0.9, 0.8, 0.1]
    report = score_probabilities(labels, probabilities)
    assert report.auc == roc_auc(labels, probabilities) == pytest.approx(0.75)
    # Each image has a bin of its own (bins 1, 2, 8, 9), weight 1/4 each; gaps |0 - 0.1|, |1 - 0.2|, |0 - 0.8|, |1 - 0.9|.
    # ECE = (0.1 + 0.8 + 0.8 + 0.1) / 4 = 0.45.
    assert report.ece == pytest.approx(0.45)
    assert (report.n_images, report.n_positive, report.bins) == (4, 2, 10)
    one_class = score_probabilities([True, True], [0.2, 0.9], bootstrap_draws=20)
    assert (one_class.auc, one_class.auc_interval) == (None, None)
    assert one_class.auc_reason == "the AUC needs images with and without an opacity"


# --- bootstrap intervals ----------------------------------------------------------------------


def test_percentile_interval_leaves_out_undefined_draws() -> None:
    assert percentile_interval([np.nan, 0.5, 0.5, np.nan]) == (0.5, 0.5)
    assert percentile_interval([np.nan, np.nan]) is None
    assert percentile_interval(np.arange(101) / 100) == pytest.approx((0.025, 0.975))


def test_intervals_are_seeded_and_contain_the_point_estimate() -> None:
    images = random_images(120, seed=3)
    truth_map = {f"p{index}": boxes for index, (boxes, _) in enumerate(images)}
    predictions = {f"p{index}": prediction for index, (_, prediction) in enumerate(images)}
    rng = np.random.default_rng(5)
    probabilities = {
        patient: float(np.clip(0.3 + 0.4 * (len(boxes) > 0) + rng.normal(0, 0.25), 0, 1))
        for patient, boxes in truth_map.items()
    }

    metrics = score_detection_metrics(truth_map, predictions, probabilities=probabilities, bootstrap_draws=300, seed=0)
    coco, froc, probability = metrics.coco, metrics.froc, metrics.probabilities
    estimates = [
        (coco.ap, coco.ap_interval),
        (coco.ap50, coco.ap50_interval),
        (coco.ap40, coco.ap40_interval),
        (froc.score, froc.score_interval),
        *zip(froc.sensitivities, froc.sensitivity_intervals, strict=True),
        (probability.auc, probability.auc_interval),
        (probability.ece, probability.ece_interval),
    ]
    for value, (low, high) in estimates:
        assert low <= value <= high
    assert coco.ap_interval[0] < coco.ap < coco.ap_interval[1]  # a real spread, not a point
    assert (
        score_detection_metrics(truth_map, predictions, probabilities=probabilities, bootstrap_draws=300, seed=0)
        == metrics
    )
    other = score_detection_metrics(truth_map, predictions, probabilities=probabilities, bootstrap_draws=300, seed=1)
    assert other.coco.ap == coco.ap and other.coco.ap_interval != coco.ap_interval
    assert other.froc.score_interval != froc.score_interval


# --- the whole set, as lungdet score calls it ----------------------------------------------------


def test_score_detection_metrics_filters_like_the_rsna_metric() -> None:
    truth_map = {"a": truth(T1, T2), "b": truth(T1), "c": NO_TRUTH, "quiet": NO_TRUTH}
    predictions = {
        "a": IMAGE_A[1],
        "b": IMAGE_B[1],
        "c": predict((0.2, T1)),  # dropped by min_confidence 0.5
        "stranger": predict((0.99, T1)),  # not labelled: ignored
    }
    metrics = score_detection_metrics(truth_map, predictions, min_confidence=0.5)
    assert (metrics.n_images, metrics.n_truth_boxes, metrics.n_predicted_boxes) == (4, 3, 4)
    assert metrics.coco.ap50 == pytest.approx(56 / 101, abs=EXACT)  # the hand case above: "c" and "quiet" add no box
    assert metrics.probabilities is None
    result = metrics.to_dict()
    assert list(result) == ["coco", "froc", "image_auc", "ece"]
    assert (result["image_auc"], result["ece"]) == (None, None)
    assert set(result["coco"]) == {
        "ap",
        "ap50",
        "ap40",
        "ap_interval",
        "ap50_interval",
        "ap40_interval",
        "max_detections",
        "reason",
        "n_images",
        "n_truth_boxes",
        "n_predicted_boxes",
    }
    assert result["froc"]["fp_per_image"] == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    with pytest.raises(ValueError, match=r"min_confidence must be in \[0, 1\], got -0.1"):
        score_detection_metrics(truth_map, predictions, min_confidence=-0.1)


def test_all_negative_truth_reports_why() -> None:
    metrics = score_detection_metrics(
        {"n1": NO_TRUTH, "n2": NO_TRUTH},
        {"n1": predict((0.9, T1))},
        probabilities={"n1": 0.7, "n2": 0.1},
        bootstrap_draws=20,
    )
    result = metrics.to_dict()
    assert (result["coco"]["ap"], result["coco"]["ap_interval"]) == (None, None)
    assert "no truth box" in result["coco"]["reason"] and "no truth box" in result["froc"]["reason"]
    assert (
        result["image_auc"]["value"] is None
        and result["image_auc"]["reason"] == "the AUC needs images with and without an opacity"
    )
    # Both images are negative: ECE = 1/2 * |0 - 0.7| + 1/2 * |0 - 0.1| = 0.4.
    assert result["ece"]["value"] == pytest.approx(0.4)
