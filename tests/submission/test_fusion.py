"""Tests for submission/fusion.py: weighted boxes fusion with each fused box's support, against ensemble-boxes itself."""

from __future__ import annotations

import numpy as np
import pytest

from lungdet.submission.fusion import fuse_boxes


def random_passes(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
    """1-5 passes of 0-4 boxes each around three centres (XYXY in fractions), continuous scores, random weights."""
    centres = rng.uniform(0.2, 0.8, (3, 2))
    boxes, scores = [], []
    for _ in range(int(rng.integers(1, 6))):
        count = int(rng.integers(0, 5))
        centre = centres[rng.integers(0, 3, count)] + rng.normal(0, 0.03, (count, 2))
        half = rng.uniform(0.05, 0.15, (count, 2))
        boxes.append(np.concatenate([centre - half, centre + half], axis=1).clip(0, 1))
        scores.append(rng.uniform(0.01, 1.0, count))
    return boxes, scores, rng.uniform(0.5, 2.0, len(boxes)).tolist()


@pytest.mark.parametrize("conf_type", ["avg", "max"])
def test_avg_and_max_equal_ensemble_boxes(conf_type: str) -> None:
    from ensemble_boxes import weighted_boxes_fusion

    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(200):
        boxes, scores, weights = random_passes(rng)
        iou_thr, skip = float(rng.choice([0.4, 0.55, 0.7])), float(rng.choice([0.0, 0.05]))
        theirs_boxes, theirs_scores, _ = weighted_boxes_fusion(
            [b.tolist() for b in boxes],
            [s.tolist() for s in scores],
            [[0] * len(s) for s in scores],
            weights=weights,
            iou_thr=iou_thr,
            skip_box_thr=skip,
            conf_type=conf_type,
        )
        ours = fuse_boxes(boxes, scores, weights=weights, iou_thr=iou_thr, skip_box_thr=skip, conf_type=conf_type)
        assert len(ours.scores) == len(theirs_scores)
        if len(theirs_scores):
            # Both most confident first; compared in one order so that equal scores cannot swap rows.
            theirs, mine = (
                np.lexsort((theirs_boxes[:, 0], -theirs_scores)),
                np.lexsort((ours.boxes[:, 0], -ours.scores)),
            )
            np.testing.assert_allclose(
                ours.scores[mine], theirs_scores[theirs], atol=1e-6
            )  # ensemble-boxes works in float32
            np.testing.assert_allclose(ours.boxes[mine], theirs_boxes[theirs], atol=1e-6)
            compared += len(theirs_scores)
    assert compared > 300


def test_finders_confidence_and_support_by_hand() -> None:
    box = np.array([[0.1, 0.1, 0.3, 0.4]])
    passes = [box, box + 0.01, np.zeros((0, 4)), np.zeros((0, 4)), np.array([[0.6, 0.6, 0.8, 0.9]])]
    scores = [np.array([0.8]), np.array([0.6]), np.zeros(0), np.zeros(0), np.array([0.9])]
    fused = fuse_boxes(passes, scores, weights=[1, 1, 1, 1, 1], iou_thr=0.5)
    # The lone 0.9 first (found by one pass of five), then the pair: mean 0.7 of the two that found it, support 2/5.
    np.testing.assert_allclose(fused.scores, [0.9, 0.7])
    np.testing.assert_allclose(fused.support, [0.2, 0.4])
    np.testing.assert_allclose(fused.boxes[1], (0.8 * box[0] + 0.6 * (box[0] + 0.01)) / 1.4)
    averaged = fuse_boxes(passes, scores, weights=[1, 1, 1, 1, 1], iou_thr=0.5, conf_type="avg")
    np.testing.assert_allclose(sorted(averaged.scores), [0.9 / 5, 1.4 / 5])  # a missing pass counts as 0


def test_weights_count_in_confidence_and_support() -> None:
    box = np.array([[0.1, 0.1, 0.3, 0.4]])
    fused = fuse_boxes(
        [box, box, np.zeros((0, 4))], [np.array([0.9]), np.array([0.3]), np.zeros(0)], weights=[3, 1, 2], iou_thr=0.5
    )
    np.testing.assert_allclose(fused.scores, [(0.9 * 3 + 0.3 * 1) / 4])
    np.testing.assert_allclose(fused.support, [4 / 6])


def test_two_boxes_of_one_pass_in_a_cluster_count_that_pass_once() -> None:
    box = np.array([[0.1, 0.1, 0.3, 0.4]])
    fused = fuse_boxes(
        [np.vstack([box, box + 0.005]), np.zeros((0, 4))],
        [np.array([0.8, 0.7]), np.zeros(0)],
        weights=[1, 1],
        iou_thr=0.5,
    )
    np.testing.assert_allclose(fused.support, [0.5])
    np.testing.assert_allclose(fused.scores, [0.75])


def test_skipped_and_degenerate_boxes_take_no_part_and_bad_arguments_are_refused() -> None:
    boxes = [np.array([[0.1, 0.1, 0.3, 0.4], [0.5, 0.5, 0.5, 0.9], [1.2, 0.1, 1.5, 0.4]])]
    fused = fuse_boxes(boxes, [np.array([0.04, 0.9, 0.9])], weights=[1], iou_thr=0.5, skip_box_thr=0.05)
    assert fused.boxes.shape == (0, 4)  # under the skip, zero width, and zero width once clipped to the image
    with pytest.raises(ValueError, match="conf_type must be one of finders, avg, max"):
        fuse_boxes(boxes, [np.array([0.5, 0.5, 0.5])], weights=[1], iou_thr=0.5, conf_type="mean")
    with pytest.raises(ValueError, match="one of each per pass"):
        fuse_boxes(boxes, [np.array([0.5, 0.5, 0.5])], weights=[1, 1], iou_thr=0.5)
