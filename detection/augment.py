"""Training-time augmentation: an albumentations pipeline built from ``AugmentConfig``, seeded per sample.

Images are uint8 ``[H, W]`` grey X-rays; boxes are pascal_voc, i.e. XYXY_ABS ``[x1, y1, x2, y2]``
in that image's pixels, and follow every geometric change. Each call is seeded on its own
(:func:`augment_sample`), so what a sample looks like depends only on its seed, never on the
calls before it: a resumed run, or one with another number of DataLoader workers, sees exactly
the same augmentations.

To look at what the pipeline does, :func:`write_augmentation_samples` writes PNGs with the
original and the augmented image side by side, boxes drawn on both.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from lungdet.atomic import write_bytes_atomic
from lungdet.boxes import as_box_array, xyxy_to_xywh
from lungdet.detection.config import AugmentConfig
from lungdet.errors import LungdetError
from lungdet.show.draw import draw_overlay, encode_image

# Dark grey column between the two panels of a sample PNG, so their edges do not run together.
PANEL_GAP = 8
PANEL_GAP_COLOR = (64, 64, 64)


def _opencv_sigma(kernel_size: int) -> float:
    """The sigma OpenCV pairs with a Gaussian kernel of this size (``cv2.getGaussianKernel`` with sigma <= 0)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def build_augmentation(config: AugmentConfig, *, seed: int = 0) -> A.Compose:
    """The training augmentation pipeline for uint8 ``[H, W]`` images with pascal_voc (XYXY_ABS) boxes.

    Each transform runs with its configured probability; one with probability 0 is left out,
    so an all-zero config gives an empty pipeline (which :func:`augment_sample` skips). Boxes
    are clipped to the image, and dropped when they keep less than ``min_visibility`` of their
    area or end up thinner than ``min_box_side`` pixels. Pass each sample through
    :func:`augment_sample`, which seeds the pipeline for that sample; ``seed`` only seeds a
    pipeline called directly.
    """
    # (probability, factory): factories, so nothing is built for a transform that is left out.
    candidates = [
        (config.hflip, lambda p: A.HorizontalFlip(p=p)),
        (
            config.shift_scale_rotate,
            lambda p: A.Affine(
                scale=(1.0 - config.scale_limit, 1.0 + config.scale_limit),
                # Without keep_ratio, Affine draws the x and y scales independently and stretches the image.
                keep_ratio=True,
                translate_percent=(-config.shift_limit, config.shift_limit),
                rotate=(-config.rotate_limit, config.rotate_limit),
                # A rotated box becomes the box of its rotated inscribed ellipse: opacities are rounded, and
                # the default (the rotated corners' box) grows a 100x140 box ~16% wider at 7 degrees.
                rotate_method="ellipse",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,  # black outside the X-ray, like the collimated edges of a real film
                p=p,
            ),
        ),
        (
            config.brightness_contrast,
            # brightness_by_max: the brightness shift is a fraction of 255, as the config says.
            lambda p: A.RandomBrightnessContrast(
                brightness_limit=config.brightness_limit,
                contrast_limit=config.contrast_limit,
                brightness_by_max=True,
                p=p,
            ),
        ),
        (config.gamma, lambda p: A.RandomGamma(gamma_limit=tuple(config.gamma_limit), p=p)),
        (
            config.blur,
            # albumentations 2.x draws sigma independently of the kernel size; capping it at the
            # sigma OpenCV uses for the largest kernel keeps the Gaussian from being cut off into a box filter.
            lambda p: A.GaussianBlur(
                blur_limit=(3, config.blur_limit), sigma_limit=(0.5, _opencv_sigma(config.blur_limit)), p=p
            ),
        ),
        (
            config.noise,
            # albumentations 2.x: std_range is a fraction of the dtype's maximum (255 for uint8), like noise_std.
            lambda p: A.GaussNoise(std_range=(config.noise_std, config.noise_std), mean_range=(0.0, 0.0), p=p),
        ),
        (config.clahe, lambda p: A.CLAHE(p=p)),
    ]
    transforms = [factory(probability) for probability, factory in candidates if probability > 0]
    with warnings.catch_warnings():
        # albumentations warns when no transform moves boxes; a pixel-only (or empty) pipeline rightly leaves them alone.
        warnings.filterwarnings("ignore", message="Got processor for bboxes, but no transform to process it")
        pipeline = A.Compose(
            transforms,
            bbox_params=A.BboxParams(
                format="pascal_voc",
                label_fields=["labels"],
                clip=True,
                min_visibility=config.min_visibility,
                min_width=config.min_box_side,
                min_height=config.min_box_side,
            ),
        )
    _seed_pipeline(pipeline, seed)
    return pipeline


def _seed_pipeline(pipeline: A.Compose, seed: int) -> None:
    """Give ``pipeline`` and all its transforms one fresh random stream drawn from ``seed``.

    Not ``Compose(seed=...)`` / ``set_random_seed``: in albumentations 2.0 they give every
    transform its own generator with the *same* seed, so all transforms draw the same first
    number and their on/off decisions are perfectly correlated (with hflip 0.5 and brightness
    0.3, brightness never ran without a flip). One shared stream makes them independent.
    """
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def _check_sample(pixels: np.ndarray, boxes: np.ndarray) -> None:
    """Raise ValueError unless ``pixels`` is uint8 [H, W] and every XYXY box has positive size and overlaps the image."""
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be a uint8 [H, W] grey image, got {pixels.dtype} {pixels.shape}")
    rows, columns = pixels.shape
    inverted = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]) | ~np.isfinite(boxes).all(axis=1)
    if inverted.any():
        index = int(np.flatnonzero(inverted)[0])
        raise ValueError(
            f"boxes must be XYXY_ABS [x1, y1, x2, y2] with x2 > x1 and y2 > y1; box {index} is {boxes[index].tolist()}"
        )
    # Boxes partly outside are clipped to the image; one wholly outside has nothing left to clip to.
    outside = (boxes[:, 0] >= columns) | (boxes[:, 1] >= rows) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"box {index} {boxes[index].tolist()} (XYXY_ABS) lies wholly outside the {columns}x{rows} image; "
            "were the boxes scaled to this image's pixels?"
        )


def augment_sample(
    pipeline: A.Compose, pixels: np.ndarray, boxes_xyxy: np.ndarray, *, sample_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Augment one image and its boxes, seeded by ``sample_seed`` alone.

    Parameters
    ----------
    pipeline
        From :func:`build_augmentation`. Its random state is replaced on every call.
    pixels
        uint8 ``[H, W]`` grey image.
    boxes_xyxy
        ``[N, 4]`` XYXY_ABS in the pixels of ``pixels`` (``N`` may be 0), each with x2 > x1, y2 > y1
        and overlapping the image; parts outside the image are clipped off first.
    sample_seed
        The same seed (with the same pipeline config and inputs) always gives the same output.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        New arrays: uint8 ``[H, W]`` pixels and float32 ``[M, 4]`` XYXY_ABS boxes, ``M <= N``,
        each inside the image with x2 > x1 and y2 > y1. Boxes that augmentation pushes out of
        the image or shrinks too far (``min_visibility``, ``min_box_side``) are dropped.

    Raises
    ------
    ValueError
        If ``pixels`` is not uint8 [H, W], or a box is empty, inverted, not finite or wholly outside the image.
    """
    boxes = as_box_array(boxes_xyxy)
    _check_sample(pixels, boxes)
    if not pipeline.transforms:
        # An all-zero config: skip albumentations, whose box round trip through normalised
        # float32 coordinates would move the boxes by ~1e-6 pixels and cost time for nothing.
        return pixels.copy(), boxes.astype(np.float32)
    _seed_pipeline(pipeline, sample_seed)
    result = pipeline(image=pixels, bboxes=boxes, labels=np.ones(len(boxes), dtype=np.int64))
    out_pixels = np.ascontiguousarray(result["image"])
    if out_pixels.shape != pixels.shape or out_pixels.dtype != np.uint8:
        raise LungdetError(
            f"augmentation turned a uint8 {pixels.shape} image into {out_pixels.dtype} {out_pixels.shape}; "
            "every transform must keep uint8 [H, W]: check the albumentations version"
        )
    return out_pixels, keep_valid_boxes(as_box_array(result["bboxes"]), rows=pixels.shape[0], columns=pixels.shape[1])


def keep_valid_boxes(boxes_xyxy: np.ndarray, *, rows: int, columns: int) -> np.ndarray:
    """``[N, 4]`` XYXY_ABS boxes clipped to a ``columns`` x ``rows`` image, without those left empty, as float32 ``[M, 4]``.

    albumentations 2.0.8 already clips and drops such boxes; this holds :func:`augment_sample`'s
    promise (non-empty boxes inside the image) should another version keep a box clipped to
    zero width (possible with ``min_box_side`` 0) or leave an edge a float32 rounding outside.
    """
    clipped = as_box_array(boxes_xyxy).clip(0, [columns, rows, columns, rows])
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep].astype(np.float32)


def _file_safe(name: str) -> str:
    # Names become part of a file name; anything but letters, digits, '.', '_' and '-' becomes '_'.
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "sample"


def render_augmentation_pair(
    pixels: np.ndarray, boxes_xyxy: np.ndarray, augmented: np.ndarray, augmented_boxes_xyxy: np.ndarray, *, name: str
) -> np.ndarray:
    """Original (left) and augmented (right) image with their XYXY_ABS boxes, captioned, as uint8 ``[H, 2W + PANEL_GAP, 3]`` RGB."""
    left = draw_overlay(pixels, truth=xyxy_to_xywh(boxes_xyxy), prediction=None, title=f"original {name}")
    right = draw_overlay(augmented, truth=xyxy_to_xywh(augmented_boxes_xyxy), prediction=None, title="augmented")
    gap = np.empty((left.shape[0], PANEL_GAP, 3), dtype=np.uint8)
    gap[:] = PANEL_GAP_COLOR
    return np.concatenate([left, gap, right], axis=1)


def write_augmentation_samples(
    samples: Sequence[tuple[str, np.ndarray, np.ndarray]],
    config: AugmentConfig,
    out_dir: Path,
    *,
    count: int,
    seed: int = 0,
) -> list[Path]:
    """Write ``count`` PNGs ``out_dir/augment_{i:03d}_{name}.png``, each the original beside one augmentation.

    ``samples`` are ``(name, uint8 [H, W] pixels, [N, 4] XYXY_ABS boxes in those pixels)``;
    they are cycled through when ``count`` exceeds their number, each round with new
    augmentations. PNG ``i`` is augmented with a seed drawn from ``(seed, i)``. Files are
    written atomically. Returns the paths in order.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count > 0 and not samples:
        raise ValueError(f"asked for {count} augmentation samples but got no images to augment")
    out_dir = Path(out_dir)
    pipeline = build_augmentation(config, seed=seed)
    paths = []
    for index in range(count):
        name, pixels, boxes = samples[index % len(samples)]
        boxes = as_box_array(boxes)
        # SeedSequence mixes (seed, index) so neighbouring PNGs get unrelated augmentations.
        sample_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        augmented, augmented_boxes = augment_sample(pipeline, pixels, boxes, sample_seed=sample_seed)
        rgb = render_augmentation_pair(pixels, boxes, augmented, augmented_boxes, name=name)
        path = out_dir / f"augment_{index:03d}_{_file_safe(name)}.png"
        write_bytes_atomic(path, encode_image(rgb, ".png", what=f"the augmentation sample for {name}"))
        paths.append(path)
    return paths
