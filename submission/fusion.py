"""Weighted boxes fusion of several passes over one image, keeping how many passes found each box.

Passes are one model's plain and mirrored predictions, or several models'. Fusion follows
weighted boxes fusion (Solovyev et al., 2021; the ``ensemble-boxes`` package): every box at or
above ``skip_box_thr`` joins, in descending weighted confidence, the cluster whose fused box it
overlaps most (IoU above ``iou_thr``), or starts one; a cluster's box is the confidence-weighted
mean of its members. What differs from the package is that the clusters are kept, so a fused
box carries its **support** (the weighted share of the passes that found it) beside its
confidence, and the confidence can be told in three ways (``conf_type``):

- ``'finders'``: the weighted mean confidence of the passes that found the box. A box five of
  five models found at 0.6 and one two of five found at 0.6 both get 0.6: the confidence keeps
  the scale of one model's whatever the number of models and passes, so a cut-off tuned on one
  model's out-of-fold predictions means the same on an ensemble. Agreement is the separate
  ``support``, which post-processing can require (``min_support``).
- ``'avg'``: the package's default, the mean over *every* pass, a pass that missed counting 0:
  ``support x finders`` when each pass gives a cluster one box. The more the passes disagree, the
  lower it falls, so a cut-off tuned on one model keeps fewer boxes on five.
- ``'max'``: the most confident member's.

``tests/submission/test_fusion.py`` checks 'avg' and 'max' against ``ensemble-boxes`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONF_TYPES = ("finders", "avg", "max")


@dataclass(frozen=True)
class FusedBoxes:
    """Fused boxes, most confident first: ``boxes`` ``[K, 4]`` XYXY in fractions of the image, ``scores`` and ``support`` ``[K]`` in [0, 1]."""

    boxes: np.ndarray
    scores: np.ndarray
    support: np.ndarray


def _iou_with(fused: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of one XYXY box with each row of ``fused`` ``[K, 4]``."""
    left, top = np.maximum(fused[:, 0], box[0]), np.maximum(fused[:, 1], box[1])
    right, bottom = np.minimum(fused[:, 2], box[2]), np.minimum(fused[:, 3], box[3])
    intersection = np.maximum(right - left, 0.0) * np.maximum(bottom - top, 0.0)
    areas = (fused[:, 2] - fused[:, 0]) * (fused[:, 3] - fused[:, 1])
    return intersection / (areas + (box[2] - box[0]) * (box[3] - box[1]) - intersection)


def fuse_boxes(
    boxes: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    *,
    weights: Sequence[float],
    iou_thr: float,
    skip_box_thr: float = 0.0,
    conf_type: str = "finders",
) -> FusedBoxes:
    """Fuse one image's passes: ``boxes[t]`` ``[n_t, 4]`` XYXY in fractions of the image (clipped to [0, 1]), ``scores[t]`` ``[n_t]``.

    ``weights`` has one weight per pass. Boxes under ``skip_box_thr`` and boxes of zero area
    (after clipping) take no part. Ties in weighted confidence keep pass order, then box order.
    """
    if conf_type not in CONF_TYPES:
        raise ValueError(f"conf_type must be one of {', '.join(CONF_TYPES)}, got {conf_type!r}")
    if not (len(boxes) == len(scores) == len(weights)):
        raise ValueError(
            f"got {len(boxes)} box arrays, {len(scores)} score arrays and {len(weights)} weights; one of each per pass"
        )
    pass_weights = np.asarray(weights, dtype=np.float64)
    members: list[tuple[float, float, int, np.ndarray]] = []  # (weighted score, weight, pass, box)
    for index, (pass_boxes, pass_scores) in enumerate(zip(boxes, scores, strict=True)):
        for box, score in zip(
            np.asarray(pass_boxes, dtype=np.float64).reshape(-1, 4),
            np.asarray(pass_scores, dtype=np.float64).reshape(-1),
            strict=True,
        ):
            if score < skip_box_thr:
                continue
            x1, x2 = sorted((min(max(box[0], 0.0), 1.0), min(max(box[2], 0.0), 1.0)))
            y1, y2 = sorted((min(max(box[1], 0.0), 1.0), min(max(box[3], 0.0), 1.0)))
            if (x2 - x1) * (y2 - y1) == 0.0:
                continue
            members.append((score * pass_weights[index], pass_weights[index], index, np.array([x1, y1, x2, y2])))
    if not members:
        return FusedBoxes(np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    order = np.argsort(-np.array([member[0] for member in members]), kind="stable")
    clusters: list[list[tuple[float, float, int, np.ndarray]]] = []
    fused = np.zeros((0, 4))
    for position in order:
        member = members[position]
        overlaps = _iou_with(fused, member[3]) if len(fused) else np.zeros(0)
        best = int(np.argmax(overlaps)) if len(overlaps) else -1
        if best >= 0 and overlaps[best] > iou_thr:
            clusters[best].append(member)
            weighted = np.array([item[0] for item in clusters[best]])
            fused[best] = (weighted[:, None] * np.stack([item[3] for item in clusters[best]])).sum(
                axis=0
            ) / weighted.sum()
        else:
            clusters.append([member])
            fused = np.vstack([fused, member[3]])
    total = pass_weights.sum()
    result_scores, support = [], []
    for cluster in clusters:
        weighted = np.array([item[0] for item in cluster])
        member_weights = np.array([item[1] for item in cluster])
        support.append(min(1.0, sum(pass_weights[index] for index in {item[2] for item in cluster}) / total))
        if conf_type == "finders":
            result_scores.append(weighted.sum() / member_weights.sum())
        elif conf_type == "avg":
            result_scores.append(weighted.mean() * min(len(pass_weights), len(cluster)) / total)
        else:
            result_scores.append(weighted.max() / pass_weights.max())
    scores_array = np.asarray(result_scores)
    ranked = np.argsort(-scores_array, kind="stable")
    return FusedBoxes(fused[ranked], scores_array[ranked], np.asarray(support)[ranked])
