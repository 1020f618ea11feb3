"""Tests of show/draw.py: box colours, dashed errors, the legend's corner, scaling for display, encoding."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lungdet.show import draw
from lungdet.submission.prediction_string import Prediction


def _outline_pixels(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The RGB values at the middle of each of the four edges of an XYWH box, ``[4, 3]``."""
    x, y, width, height = box
    x2, y2 = x + width - 1, y + height - 1
    return np.array(
        [image[y, x + width // 2], image[y2, x + width // 2], image[y + height // 2, x], image[y + height // 2, x2]]
    )


def test_draw_overlay_draws_truth_green_and_prediction_orange() -> None:
    pixels = np.full((512, 512), 90, dtype=np.uint8)
    truth_box = (100, 200, 120, 160)
    predicted_box = (300, 220, 100, 150)
    image = draw.draw_overlay(pixels, truth=np.array([truth_box], dtype=float), prediction=None, title="patient-1")
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    assert (_outline_pixels(image, truth_box) == draw.TRUTH_COLOR).all()

    image = draw.draw_overlay(
        pixels, truth=None, prediction=Prediction.from_arrays([0.87], [predicted_box]), title="patient-1"
    )
    # The confidence tag sits on the top edge; the other three edges are plain outline.
    assert (_outline_pixels(image, predicted_box)[1:] == draw.PREDICTION_COLOR).all()
    # The tag is a filled prediction-coloured patch right above the box.
    assert (image[predicted_box[1] - 3, predicted_box[0] + 2] == draw.PREDICTION_COLOR).all()
    # Far from boxes and legend, the grey pixel is untouched and grey in all three channels.
    assert (image[300, 260] == (90, 90, 90)).all()


def test_with_truth_and_predictions_the_errors_are_dashed() -> None:
    pixels = np.full((512, 512), 90, dtype=np.uint8)
    found_box, missed_box = (60, 200, 120, 160), (300, 40, 100, 100)
    hit_box, alarm_box = (64, 204, 120, 160), (300, 300, 120, 150)  # hit: IoU 0.91 with found_box
    truth = np.array([found_box, missed_box], dtype=float)
    prediction = Prediction.from_arrays([0.9, 0.6], [hit_box, alarm_box])
    image = draw.draw_overlay(pixels, truth=truth, prediction=prediction, title="p")
    assert (_outline_pixels(image, found_box)[1:] == draw.TRUTH_COLOR).all()
    assert (_outline_pixels(image, hit_box)[1:] == draw.PREDICTION_COLOR).all()
    # Dashed: the missed truth box's left edge alternates between its colour and the background.
    left_edge = image[missed_box[1] : missed_box[1] + missed_box[3], missed_box[0]]
    assert (left_edge == draw.MISSED_COLOR).all(axis=1).any() and (left_edge == 90).all(axis=1).any()
    bottom_edge = image[alarm_box[1] + alarm_box[3] - 1, alarm_box[0] : alarm_box[0] + alarm_box[2]]
    assert (bottom_edge == draw.FALSE_ALARM_COLOR).all(axis=1).any() and (bottom_edge == 90).all(axis=1).any()
    # One hit, one false alarm, one miss at every IoU threshold: 1 / (1 + 1 + 1).
    assert draw.judge_image(truth, prediction) == {"score": pytest.approx(1 / 3), "missed": 1, "false_alarms": 1}


def test_draw_overlay_without_sources_still_has_legend_and_notice() -> None:
    pixels = np.full((256, 256), 128, dtype=np.uint8)
    image = draw.draw_overlay(pixels, truth=None, prediction=None, title="abc")
    assert image.shape == (256, 256, 3)
    # The legend panel darkens the top-left corner, the notice the bottom-left one.
    assert image[3:10, 3:10].mean() < 128 * 0.5
    assert image[-10:-3, 3:10].mean() < 128 * 0.5
    # The legend's colour swatches are the only coloured pixels: nothing between legend and notice.
    assert (image[:60] == draw.TRUTH_COLOR).all(axis=2).any()
    assert not (image[60:-30] == draw.TRUTH_COLOR).all(axis=2).any()
    assert not (image[60:-30] == draw.PREDICTION_COLOR).all(axis=2).any()
    assert (image[60:-30] == 128).all()


def test_legend_moves_away_from_a_box_in_the_top_left_corner() -> None:
    pixels = np.full((512, 512), 128, dtype=np.uint8)
    corner_box = np.array([[5.0, 5.0, 200.0, 100.0]])
    image = draw.draw_overlay(pixels, truth=corner_box, prediction=None, title="abc")
    assert (_outline_pixels(image, (5, 5, 200, 100)) == draw.TRUTH_COLOR).all()
    assert image[8:14, -14:-8].mean() < 128 * 0.5  # legend went top-right


def test_draw_overlay_rejects_colour_input() -> None:
    with pytest.raises(ValueError, match=r"uint8 \[H, W\] grey image, got uint8 \(4, 4, 3\)"):
        draw.draw_overlay(np.zeros((4, 4, 3), np.uint8), truth=None, prediction=None, title="x")


def test_fit_for_display_scales_boxes_with_the_image() -> None:
    pixels = np.zeros((1024, 2048), dtype=np.uint8)
    truth = np.array([[100.0, 200.0, 300.0, 400.0]])
    prediction = Prediction.from_arrays([0.5], [[1000.0, 500.0, 200.0, 100.0]])
    small, small_truth, small_prediction = draw.fit_for_display(pixels, truth, prediction, max_size=512)
    assert small.shape == (256, 512)
    np.testing.assert_allclose(small_truth, [[25.0, 50.0, 75.0, 100.0]])
    np.testing.assert_allclose(small_prediction.boxes, [[250.0, 125.0, 50.0, 25.0]])
    np.testing.assert_allclose(small_prediction.scores, [0.5])
    # Never enlarged.
    same, same_truth, _ = draw.fit_for_display(pixels, truth, None, max_size=4096)
    assert same is pixels and same_truth is truth


def test_encode_image_keeps_grey_and_rgb_pixels() -> None:
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    rgb = np.zeros((6, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red in RGB: encoded as BGR, it must decode back red
    assert np.array_equal(
        cv2.imdecode(np.frombuffer(draw.encode_image(grey, ".png", what="g"), np.uint8), cv2.IMREAD_UNCHANGED),
        grey,
    )
    decoded = cv2.imdecode(np.frombuffer(draw.encode_image(rgb, ".png", what="c"), np.uint8), cv2.IMREAD_COLOR)
    assert (decoded[..., 2] == 200).all() and (decoded[..., :2] == 0).all()
