"""Tests for detection/augment.py: the pipeline built from AugmentConfig, per-sample seeding, box handling, sample PNGs."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungdet.detection.augment import (
    PANEL_GAP,
    augment_sample,
    build_augmentation,
    keep_valid_boxes,
    write_augmentation_samples,
)
from lungdet.detection.config import AugmentConfig
from lungdet.show.draw import TRUTH_COLOR

# Every transform off; tests switch on what they need.
ALL_OFF = {
    "hflip": 0.0,
    "shift_scale_rotate": 0.0,
    "brightness_contrast": 0.0,
    "gamma": 0.0,
    "blur": 0.0,
    "noise": 0.0,
    "clahe": 0.0,
}
PIXEL_ONLY = ("brightness_contrast", "gamma", "blur", "noise", "clahe")
# albumentations' float32 box round trip moves boxes by ~1e-5 px; far below a pixel.
BOX_TOLERANCE = 1e-3


def config_with(**settings: float) -> AugmentConfig:
    return AugmentConfig(**{**ALL_OFF, **settings})


def synthetic_image(rows: int = 64, columns: int = 96) -> np.ndarray:
    """A horizontal grey ramp (40..199) with a bright rectangle: asymmetric, with sharp edges and mid-range values."""
    pixels = np.tile(np.linspace(40, 199, columns).round().astype(np.uint8), (rows, 1))
    pixels[10:30, 15:40] = 230
    return pixels


BOXES = np.array([[15.0, 10.0, 40.0, 30.0], [60.0, 20.0, 90.0, 60.0]])  # XYXY_ABS in synthetic_image's pixels


def assert_boxes_valid(boxes: np.ndarray, *, rows: int, columns: int) -> None:
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= columns).all() and (boxes[:, 3] <= rows).all()


# --- the pipeline ---------------------------------------------------------------------------------


def test_a_transform_with_probability_zero_is_left_out() -> None:
    names = [type(t).__name__ for t in build_augmentation(config_with(hflip=0.5, gamma=0.2, clahe=1.0)).transforms]
    assert names == ["HorizontalFlip", "RandomGamma", "CLAHE"]
    everything = config_with(
        hflip=0.1, shift_scale_rotate=0.1, brightness_contrast=0.1, gamma=0.1, blur=0.1, noise=0.1, clahe=0.1
    )
    assert [type(t).__name__ for t in build_augmentation(everything).transforms] == [
        "HorizontalFlip",
        "Affine",
        "RandomBrightnessContrast",
        "RandomGamma",
        "GaussianBlur",
        "GaussNoise",
        "CLAHE",
    ]


def test_the_all_zero_config_returns_the_input_unchanged() -> None:
    pipeline = build_augmentation(config_with())
    assert len(pipeline.transforms) == 0
    pixels = synthetic_image()
    out_pixels, out_boxes = augment_sample(pipeline, pixels, BOXES, sample_seed=3)
    np.testing.assert_array_equal(out_pixels, pixels)
    np.testing.assert_array_equal(out_boxes, BOXES.astype(np.float32))
    assert out_boxes.dtype == np.float32
    assert out_pixels is not pixels  # a copy: the caller may modify it


def test_a_flip_mirrors_the_image_and_the_boxes_exactly() -> None:
    pixels = synthetic_image()
    columns = pixels.shape[1]
    out_pixels, out_boxes = augment_sample(build_augmentation(config_with(hflip=1.0)), pixels, BOXES, sample_seed=0)
    np.testing.assert_array_equal(out_pixels, pixels[:, ::-1])
    expected = np.stack([columns - BOXES[:, 2], BOXES[:, 1], columns - BOXES[:, 0], BOXES[:, 3]], axis=1)
    np.testing.assert_allclose(out_boxes, expected, atol=BOX_TOLERANCE)


@pytest.mark.parametrize("name", ["hflip", "shift_scale_rotate", *PIXEL_ONLY])
def test_every_transform_alone_keeps_boxes_valid_and_inside_the_image(name: str) -> None:
    # The largest allowed geometric jitter, so boxes near the border really get cut.
    config = config_with(**{name: 1.0}, shift_limit=0.3, scale_limit=0.3, rotate_limit=30.0)
    pipeline = build_augmentation(config)
    pixels = synthetic_image()
    rows, columns = pixels.shape
    border_boxes = np.vstack([BOXES, [[0.0, 0.0, 20.0, 64.0], [80.0, 50.0, 96.0, 64.0]]])
    for seed in range(8):
        out_pixels, out_boxes = augment_sample(pipeline, pixels, border_boxes, sample_seed=seed)
        assert out_pixels.dtype == np.uint8 and out_pixels.shape == (rows, columns)
        assert len(out_boxes) <= len(border_boxes)
        assert_boxes_valid(out_boxes, rows=rows, columns=columns)


@pytest.mark.parametrize("name", PIXEL_ONLY)
def test_pixel_transforms_change_pixels_but_not_boxes(name: str) -> None:
    # A gamma range that excludes 100%, so every draw visibly changes the image.
    pipeline = build_augmentation(config_with(**{name: 1.0}, gamma_limit=[50.0, 70.0]))
    pixels = synthetic_image()
    for seed in range(5):
        out_pixels, out_boxes = augment_sample(pipeline, pixels, BOXES, sample_seed=seed)
        assert not np.array_equal(out_pixels, pixels), f"{name} left the pixels unchanged with seed {seed}"
        np.testing.assert_allclose(out_boxes, BOXES, atol=BOX_TOLERANCE)


def test_noise_std_is_a_fraction_of_255() -> None:
    # albumentations 2.x: GaussNoise std_range is a fraction of the dtype maximum; 0.1 -> 25.5 grey levels.
    pipeline = build_augmentation(config_with(noise=1.0, noise_std=0.1))
    flat = np.full((128, 128), 128, dtype=np.uint8)
    out_pixels, _ = augment_sample(pipeline, flat, np.zeros((0, 4)), sample_seed=0)
    assert np.std(out_pixels.astype(np.float64) - 128) == pytest.approx(25.5, rel=0.05)


def test_a_negative_image_stays_negative() -> None:
    pipeline = build_augmentation(AugmentConfig(hflip=1.0, shift_scale_rotate=1.0, brightness_contrast=1.0))
    _, out_boxes = augment_sample(pipeline, synthetic_image(), np.zeros((0, 4)), sample_seed=1)
    assert out_boxes.shape == (0, 4) and out_boxes.dtype == np.float32


def test_zoom_keeps_the_aspect_ratio() -> None:
    # albumentations' Affine draws x and y scales independently unless keep_ratio is set; a zoom must not stretch.
    pipeline = build_augmentation(
        config_with(shift_scale_rotate=1.0, shift_limit=0.0, scale_limit=0.3, rotate_limit=0.0)
    )
    box = np.array([[38.0, 22.0, 58.0, 42.0]])  # 20 x 20, near the centre of the 96 x 64 image
    for seed in range(5):
        _, out_boxes = augment_sample(pipeline, synthetic_image(), box, sample_seed=seed)
        width, height = out_boxes[0, 2] - out_boxes[0, 0], out_boxes[0, 3] - out_boxes[0, 1]
        assert width == pytest.approx(height, abs=0.01) and 14 - 0.01 <= width <= 26 + 0.01


# --- dropping boxes -------------------------------------------------------------------------------


def test_boxes_shifted_mostly_outside_are_dropped_per_min_visibility() -> None:
    """Pure shifts of up to 100 px on a 400 px image: predict each box's fate from the shift, read off a tracker box.

    The tracker (centre, the only box 80 px tall) always stays fully inside, so its output
    position gives the shift (tx, ty). The 100 px edge boxes keep (100 - |tx|)/100 of their area
    when pushed out; they must survive exactly when that is >= min_visibility, clipped to the image.
    """
    size, min_visibility = 400, 0.3
    config = config_with(
        shift_scale_rotate=1.0, shift_limit=0.25, scale_limit=0.0, rotate_limit=0.0, min_visibility=min_visibility
    )
    pipeline = build_augmentation(config)
    pixels = np.zeros((size, size), dtype=np.uint8)
    left, tracker, right = [0.0, 150.0, 100.0, 250.0], [170.0, 160.0, 230.0, 240.0], [300.0, 150.0, 400.0, 250.0]
    boxes = np.array([left, tracker, right])
    outcomes = {"dropped": 0, "clipped": 0}
    for seed in range(60):
        _, out_boxes = augment_sample(pipeline, pixels, boxes, sample_seed=seed)
        (tracker_out,) = [box for box in out_boxes if abs(box[3] - box[1] - 80) < 1]
        tx, ty = tracker_out[0] - tracker[0], tracker_out[1] - tracker[1]
        shifted = boxes + [tx, ty, tx, ty]
        clipped = shifted.clip(0, size)
        visibility = np.prod(clipped[:, 2:] - clipped[:, :2], axis=1) / np.prod(shifted[:, 2:] - shifted[:, :2], axis=1)
        if np.any(np.abs(visibility - min_visibility) < 0.01):
            continue  # too close to the threshold to predict through float32 rounding
        expected = clipped[visibility >= min_visibility]
        np.testing.assert_allclose(out_boxes, expected, atol=BOX_TOLERANCE, err_msg=f"seed {seed}, shift ({tx}, {ty})")
        outcomes["dropped"] += int((visibility < min_visibility).any())
        outcomes["clipped"] += int(((visibility >= min_visibility) & (visibility < 1)).any())
    assert outcomes["dropped"] >= 3 and outcomes["clipped"] >= 3, outcomes  # both cases were really exercised


def test_a_box_thinner_than_min_box_side_is_dropped() -> None:
    pipeline = build_augmentation(config_with(hflip=1.0, min_box_side=10.0))
    boxes = np.array([[10.0, 10.0, 18.0, 40.0], [30.0, 10.0, 50.0, 40.0]])  # 8 and 20 px wide
    _, out_boxes = augment_sample(pipeline, synthetic_image(), boxes, sample_seed=0)
    np.testing.assert_allclose(out_boxes, [[96 - 50, 10, 96 - 30, 40]], atol=BOX_TOLERANCE)


def test_keep_valid_boxes_clips_to_the_image_and_drops_empty_boxes() -> None:
    boxes = np.array(
        [[-2.0, 3.0, 10.0, 8.0], [5.0, 5.0, 5.0, 9.0], [30.0, 1.0, 45.0, 20.0000001], [41.0, 2.0, 50.0, 6.0]]
    )
    kept = keep_valid_boxes(boxes, rows=20, columns=40)
    assert kept.dtype == np.float32
    np.testing.assert_array_equal(kept, [[0, 3, 10, 8], [30, 1, 40, 20]])
    assert keep_valid_boxes(np.zeros((0, 4)), rows=20, columns=40).shape == (0, 4)


# --- seeding --------------------------------------------------------------------------------------


def test_the_output_depends_only_on_the_sample_seed() -> None:
    config = AugmentConfig(
        hflip=0.5, shift_scale_rotate=0.7, brightness_contrast=0.7, gamma=0.5, blur=0.5, noise=0.5, clahe=0.3
    )
    pipeline = build_augmentation(config, seed=1)
    pixels = synthetic_image()
    first = augment_sample(pipeline, pixels, BOXES, sample_seed=42)
    for other_seed in range(5):  # calls in between must not matter
        augment_sample(pipeline, pixels, BOXES, sample_seed=other_seed)
    again = augment_sample(pipeline, pixels, BOXES, sample_seed=42)
    # A worker's copy (DataLoader pickles the dataset) built with another pipeline seed, called fresh.
    elsewhere = augment_sample(
        pickle.loads(pickle.dumps(build_augmentation(config, seed=9))), pixels, BOXES, sample_seed=42
    )
    for result in (again, elsewhere):
        np.testing.assert_array_equal(result[0], first[0])
        np.testing.assert_array_equal(result[1], first[1])
    outputs = {augment_sample(pipeline, pixels, BOXES, sample_seed=seed)[0].tobytes() for seed in range(10)}
    assert len(outputs) == 10  # different seeds, different augmentations


def test_transforms_are_switched_on_independently() -> None:
    """albumentations 2.0's set_random_seed gives every transform the same seed, so p=0.3 fired only together with p=0.5."""
    pipeline = build_augmentation(
        config_with(hflip=0.5, brightness_contrast=0.3, contrast_limit=0.0, brightness_limit=0.2)
    )
    pixels = synthetic_image()
    counts = np.zeros((2, 2), dtype=int)  # [flipped, brightened]
    for seed in range(400):
        out_pixels, _ = augment_sample(pipeline, pixels, BOXES, sample_seed=seed)
        flipped = out_pixels[0, 0] > out_pixels[0, -1]  # the ramp rises to the right
        brightened = int(out_pixels.astype(int).sum()) != int(pixels.astype(int).sum())
        counts[int(flipped), int(brightened)] += 1
    # Independent: each of the four combinations has about 400 * p1 * p2 samples (>= 60 expected each).
    assert counts.min() >= 30, counts.tolist()
    assert counts[:, 1].sum() / 400 == pytest.approx(0.3, abs=0.08)


# --- input checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pixels", "boxes", "message"),
    [
        (
            np.zeros((8, 8), dtype=np.float32),
            np.zeros((0, 4)),
            "pixels must be a uint8 [H, W] grey image, got float32 (8, 8)",
        ),
        (
            np.zeros((8, 8, 3), dtype=np.uint8),
            np.zeros((0, 4)),
            "pixels must be a uint8 [H, W] grey image, got uint8 (8, 8, 3)",
        ),
        (
            np.zeros((8, 8), dtype=np.uint8),
            np.array([[4.0, 1.0, 2.0, 5.0]]),
            "x2 > x1 and y2 > y1; box 0 is [4.0, 1.0, 2.0, 5.0]",
        ),
        (
            np.zeros((8, 8), dtype=np.uint8),
            np.array([[1.0, 1.0, 2.0, 2.0], [9.0, 1.0, 12.0, 5.0]]),
            "box 1 [9.0, 1.0, 12.0, 5.0] (XYXY_ABS) lies wholly outside the 8x8 image",
        ),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(pixels: np.ndarray, boxes: np.ndarray, message: str) -> None:
    pipeline = build_augmentation(config_with(hflip=1.0))
    with pytest.raises(ValueError, match=re.escape(message)):
        augment_sample(pipeline, pixels, boxes, sample_seed=0)


# --- sample PNGs ----------------------------------------------------------------------------------


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, f"{path} is not a readable image"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def test_write_augmentation_samples_writes_count_side_by_side_pngs(tmp_path: Path) -> None:
    small = synthetic_image(64, 96)
    large = np.zeros((128, 128), dtype=np.uint8)
    samples = [("patient-a", small, BOXES), ("patient/b", large, np.array([[20.0, 40.0, 50.0, 100.0]]))]
    out_dir = tmp_path / "augmentations"
    paths = write_augmentation_samples(samples, config_with(hflip=1.0), out_dir, count=5, seed=0)

    # Cycled through the samples; a path separator in a name does not leave out_dir.
    assert [path.name for path in paths] == [
        "augment_000_patient-a.png",
        "augment_001_patient_b.png",
        "augment_002_patient-a.png",
        "augment_003_patient_b.png",
        "augment_004_patient-a.png",
    ]
    assert sorted(out_dir.iterdir()) == sorted(paths)  # nothing else, no temporary files
    for path, (_, pixels, _) in zip(paths, [samples[i % 2] for i in range(5)], strict=True):
        rows, columns = pixels.shape
        assert read_rgb(path).shape == (rows, 2 * columns + PANEL_GAP, 3)

    # The box [20, 40, 50, 100] is drawn at its place on the left and mirrored (x 78..108) on the right.
    image = read_rgb(paths[1])
    right = 128 + PANEL_GAP
    assert tuple(image[70, 20]) == TRUTH_COLOR and tuple(image[70, 49]) == TRUTH_COLOR
    assert tuple(image[70, right + 78]) == TRUTH_COLOR and tuple(image[70, right + 107]) == TRUTH_COLOR
    assert tuple(image[70, right + 20]) != TRUTH_COLOR  # the flipped panel has no box where the original had one


def test_write_augmentation_samples_checks_its_arguments(tmp_path: Path) -> None:
    assert write_augmentation_samples([], AugmentConfig(), tmp_path, count=0) == []
    with pytest.raises(ValueError, match="asked for 2 augmentation samples but got no images to augment"):
        write_augmentation_samples([], AugmentConfig(), tmp_path, count=2)
    with pytest.raises(ValueError, match="count must be >= 0, got -1"):
        write_augmentation_samples([("a", synthetic_image(), BOXES)], AugmentConfig(), tmp_path, count=-1)


def test_importing_the_augmentations_asks_the_internet_nothing() -> None:
    """albumentations looks its latest version up on PyPI at import unless NO_ALBUMENTATIONS_UPDATE is set."""
    code = (
        "import urllib.request\n"
        "def refuse(*args, **kwargs):\n"
        "    raise SystemExit('albumentations opened ' + str(args[1:2]))\n"
        "urllib.request.OpenerDirector.open = refuse\n"
        "import lungdet.detection.augment, lungdet.detection.data, lungdet.detection.pretrain_data\n"
        "print('quiet')\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "NO_ALBUMENTATIONS_UPDATE"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environment)
    assert done.stdout.strip() == "quiet", done.stderr
