"""Tests for lungdet/boxes.py: format conversion, scaling, clipping and IoU by hand."""

from __future__ import annotations

import numpy as np
import pytest

from lungdet.boxes import as_box_array, clip_xywh, iou_matrix_xywh, scale_xywh, xywh_to_xyxy, xyxy_to_xywh


def test_xywh_to_xyxy_and_back() -> None:
    xywh = [[10.0, 20.0, 30.0, 40.0], [0.5, 1.5, 2.0, 3.0]]
    xyxy = xywh_to_xyxy(xywh)
    np.testing.assert_array_equal(xyxy, [[10, 20, 40, 60], [0.5, 1.5, 2.5, 4.5]])
    np.testing.assert_array_equal(xyxy_to_xywh(xyxy), xywh)


def test_conversion_does_not_modify_its_input() -> None:
    boxes = np.array([[1.0, 2.0, 3.0, 4.0]])
    xywh_to_xyxy(boxes)
    scale_xywh(boxes, scale_x=2, scale_y=2)
    np.testing.assert_array_equal(boxes, [[1, 2, 3, 4]])


def test_empty_boxes_keep_shape_n_by_4() -> None:
    for empty in ([], np.zeros((0, 4)), np.zeros(0)):
        assert xywh_to_xyxy(empty).shape == (0, 4)
    assert iou_matrix_xywh([], [[0, 0, 1, 1]]).shape == (0, 1)


def test_wrong_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"expected boxes of shape \[N, 4\], got \(4,\)"):
        as_box_array([1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"got \(1, 3\)"):
        as_box_array([[1, 2, 3]])


def test_scale_per_axis() -> None:
    # 1200 x 800 image written as 400 x 400: x and width by 1/3, y and height by 1/2.
    scaled = scale_xywh([[600, 400, 300, 200]], scale_x=400 / 1200, scale_y=400 / 800)
    np.testing.assert_allclose(scaled, [[200, 200, 100, 100]])


def test_clip_to_image() -> None:
    boxes = [[-10, 5, 30, 10], [90, 90, 20, 20], [200, 10, 5, 5], [10, 10, 20, 20]]
    np.testing.assert_array_equal(
        clip_xywh(boxes, width=100, height=100),
        [[0, 5, 20, 10], [90, 90, 10, 10], [100, 10, 0, 5], [10, 10, 20, 20]],
    )


@pytest.mark.parametrize(
    ("box_a", "box_b", "iou"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),  # identical
        ([0, 0, 10, 10], [20, 20, 5, 5], 0.0),  # disjoint
        ([0, 0, 10, 10], [10, 0, 10, 10], 0.0),  # touching edges
        ([0, 0, 10, 10], [0, 0, 10, 5], 0.5),  # one half of the other: 50 / 100
        ([0, 0, 10, 10], [5, 0, 10, 10], 1 / 3),  # shifted by half: 50 / 150
        ([0, 0, 10, 10], [5, 5, 10, 10], 25 / 175),  # quarter overlap
        ([0, 0, 0, 10], [0, 0, 0, 10], 0.0),  # zero area, identical: 0, not NaN
        ([5, 5, 0, 0], [0, 0, 10, 10], 0.0),  # zero area inside a box
    ],
)
def test_iou_hand_values(box_a: list[float], box_b: list[float], iou: float) -> None:
    matrix = iou_matrix_xywh([box_a], [box_b])
    assert matrix.shape == (1, 1)
    assert matrix[0, 0] == pytest.approx(iou)
    assert iou_matrix_xywh([box_b], [box_a])[0, 0] == pytest.approx(iou)


def test_iou_matrix_shape_and_order() -> None:
    a = [[0, 0, 10, 10], [100, 100, 10, 10]]
    b = [[0, 0, 10, 5], [100, 100, 10, 10], [50, 50, 1, 1]]
    np.testing.assert_allclose(iou_matrix_xywh(a, b), [[0.5, 0, 0], [0, 1, 0]])
