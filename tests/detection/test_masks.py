"""Tests for detection/masks.py: rectangle and ellipse masks drawn from XYXY_ABS boxes, checked pixel by pixel."""

from __future__ import annotations

import math

import pytest
import torch

from lungdet.detection.masks import box_masks


def test_rectangle_fills_exactly_the_pixels_inside_an_integer_box() -> None:
    # A 4 px tall, 6 px wide box (rows 1..4, columns 2..7) in an 8x10 image.
    masks = box_masks(torch.tensor([[2.0, 1.0, 8.0, 5.0]]), height=8, width=10, shape="rectangle")
    expected = torch.zeros(1, 8, 10, dtype=torch.uint8)
    expected[0, 1:5, 2:8] = 1
    assert masks.dtype == torch.uint8
    torch.testing.assert_close(masks, expected)
    assert int(masks.sum()) == 4 * 6


def test_rectangle_with_fractional_corners_takes_the_pixels_whose_centres_are_inside() -> None:
    # Column centres 1.5, 2.5, 3.5 lie in [1.4, 3.6); of the row centres only 1.5 lies in [0.6, 2.4).
    masks = box_masks(torch.tensor([[1.4, 0.6, 3.6, 2.4]]), height=4, width=5, shape="rectangle")
    expected = torch.zeros(1, 4, 5, dtype=torch.uint8)
    expected[0, 1, 1:4] = 1
    torch.testing.assert_close(masks, expected)


def test_ellipse_in_a_4x4_box_leaves_out_the_four_corner_pixels() -> None:
    # Corner pixel centre (0.5, 0.5): ((0.5 - 2) / 2)^2 * 2 = 1.125 > 1, outside; its neighbour (1.5, 0.5): 0.0625 + 0.5625 <= 1, inside.
    masks = box_masks(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), height=4, width=4, shape="ellipse")
    expected = torch.tensor([[[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]]], dtype=torch.uint8)
    torch.testing.assert_close(masks, expected)


def test_ellipse_is_inscribed_in_a_tall_box() -> None:
    # Box rows 1..4, columns 2..7: centre (5, 3), semi-axes 3 (x) and 2 (y).
    masks = box_masks(torch.tensor([[2.0, 1.0, 8.0, 5.0]]), height=8, width=10, shape="ellipse")[0]
    assert masks[2, 4] == 1 and masks[3, 5] == 1  # the pixels around the centre
    for row, col in ((1, 2), (1, 7), (4, 2), (4, 7)):  # the box's corner pixels
        assert masks[row, col] == 0
    assert masks[2, 2] == 1 and masks[2, 7] == 1  # the ends of the long axis, level with the centre
    assert int(masks.sum()) == 20  # 4 + 6 + 6 + 4 per row
    assert int(masks[:1].sum()) == int(masks[5:].sum()) == 0 and int(masks[:, :2].sum()) == int(masks[:, 8:].sum()) == 0


def test_ellipse_area_is_close_to_pi_a_b() -> None:
    masks = box_masks(torch.tensor([[10.0, 20.0, 70.0, 60.0]]), height=80, width=100, shape="ellipse")
    area = math.pi * 30 * 20  # semi-axes 30 and 20 px
    assert abs(int(masks.sum()) - area) / area < 0.01
    assert int(masks.sum()) < 60 * 40  # strictly inside its box


def test_several_boxes_give_one_mask_each_in_order() -> None:
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [3.0, 1.0, 5.0, 4.0]])
    masks = box_masks(boxes, height=4, width=6, shape="rectangle")
    assert masks.shape == (2, 4, 6)
    assert [int(mask.sum()) for mask in masks] == [4, 6]
    assert masks[0, 0, 0] == 1 and masks[0, 1, 3] == 0 and masks[1, 1, 3] == 1 and masks[1, 0, 0] == 0


def test_boxes_are_cut_at_the_image_border() -> None:
    masks = box_masks(torch.tensor([[-3.0, 2.0, 3.0, 12.0]]), height=4, width=4, shape="rectangle")
    expected = torch.zeros(1, 4, 4, dtype=torch.uint8)
    expected[0, 2:, :3] = 1
    torch.testing.assert_close(masks, expected)


@pytest.mark.parametrize("shape", ["ellipse", "rectangle"])
def test_no_boxes_give_no_masks_of_the_image_size(shape: str) -> None:
    masks = box_masks(torch.zeros(0, 4), height=3, width=5, shape=shape)
    assert masks.shape == (0, 3, 5)
    assert masks.dtype == torch.uint8


@pytest.mark.parametrize("shape", ["ellipse", "rectangle"])
def test_a_zero_width_box_draws_nothing(shape: str) -> None:
    masks = box_masks(torch.tensor([[3.5, 1.0, 3.5, 5.0]]), height=8, width=10, shape=shape)
    assert int(masks.sum()) == 0


def test_unknown_shape_is_rejected_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"shape='circle': expected one of ellipse, rectangle \(model.mask_shape\)"):
        box_masks(torch.zeros(0, 4), height=4, width=4, shape="circle")


def test_boxes_not_shaped_n_by_4_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"expected shape \[N, 4\] \(x1, y1, x2, y2\), got \[4\]"):
        box_masks(torch.tensor([0.0, 0.0, 2.0, 2.0]), height=4, width=4, shape="rectangle")


def test_an_xywh_box_with_x2_below_x1_is_rejected_with_its_index() -> None:
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [5.0, 1.0, 2.0, 3.0]])  # the second is x, y, w, h
    with pytest.raises(ValueError, match=r"boxes_xyxy\[1\] = \[5.0, 1.0, 2.0, 3.0\]: x2 < x1 or y2 < y1"):
        box_masks(boxes, height=8, width=8, shape="ellipse")


def test_a_mask_size_below_one_pixel_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"mask size 0x4: height and width must be >= 1 pixel"):
        box_masks(torch.zeros(0, 4), height=0, width=4, shape="ellipse")
