"""Box formats, converted in one place.

lungdet's internal box format is **XYWH_ABS**: ``[x, y, width, height]`` in absolute pixels of a
named image (the DICOM's original pixels unless a docstring says otherwise), ``x, y`` being the
top-left corner. It is the format of the RSNA labels, of COCO ``bbox`` and of the Kaggle
PredictionString. torchvision detectors use **XYXY_ABS** ``[x1, y1, x2, y2]``; convert with
:func:`xywh_to_xyxy` / :func:`xyxy_to_xywh` at that edge only.
"""

from __future__ import annotations

import numpy as np


def as_box_array(boxes: object) -> np.ndarray:
    """Return ``boxes`` as a float64 array of shape ``[N, 4]`` (``N`` may be 0)."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"expected boxes of shape [N, 4], got {array.shape}")
    return array


def xywh_to_xyxy(boxes: object) -> np.ndarray:
    """``[N, 4]`` XYWH_ABS -> ``[N, 4]`` XYXY_ABS, same pixel space."""
    array = as_box_array(boxes).copy()
    array[:, 2] += array[:, 0]
    array[:, 3] += array[:, 1]
    return array


def xyxy_to_xywh(boxes: object) -> np.ndarray:
    """``[N, 4]`` XYXY_ABS -> ``[N, 4]`` XYWH_ABS, same pixel space."""
    array = as_box_array(boxes).copy()
    array[:, 2] -= array[:, 0]
    array[:, 3] -= array[:, 1]
    return array


def scale_xywh(boxes: object, *, scale_x: float, scale_y: float) -> np.ndarray:
    """Scale ``[N, 4]`` XYWH_ABS boxes from one pixel space to another (e.g. 1024² -> 256²)."""
    array = as_box_array(boxes).copy()
    array[:, [0, 2]] *= scale_x
    array[:, [1, 3]] *= scale_y
    return array


def clip_xywh(boxes: object, *, width: float, height: float) -> np.ndarray:
    """Clip ``[N, 4]`` XYWH_ABS boxes to an image of ``width`` x ``height`` pixels.

    Boxes that end up with zero width or height are kept (with size 0); callers decide whether
    to drop them, so that nothing disappears silently here.
    """
    xyxy = xywh_to_xyxy(boxes)
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, width)
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, height)
    return xyxy_to_xywh(xyxy)


def iou_matrix_xywh(boxes_a: object, boxes_b: object) -> np.ndarray:
    """Intersection over union of every pair: ``[N, 4]`` x ``[M, 4]`` XYWH_ABS -> ``[N, M]``.

    Boxes of zero area have IoU 0 with everything (never NaN).
    """
    a = xywh_to_xyxy(boxes_a)
    b = xywh_to_xyxy(boxes_b)
    inter_w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    inter_h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    intersection = inter_w.clip(min=0) * inter_h.clip(min=0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / np.where(union > 0, union, 1), 0.0)
    return iou
