"""The pixels a model sees: what ``convert`` writes for an image, and what ``predict`` repeats for a new one.

One function for both, so that a model sees at prediction the pixels it was trained on: resized
to the dataset's size, then contrast-normalised as the dataset was.
"""

from __future__ import annotations

import cv2
import numpy as np

from lungdet.errors import LungdetError

NORMALIZATIONS = ("none", "clahe", "equalize")


def normalize_pixels(pixels: np.ndarray, *, method: str) -> np.ndarray:
    """Contrast normalisation of a uint8 ``[H, W]`` image: ``'none'``, ``'clahe'`` or ``'equalize'``."""
    check_normalization(method)
    if method == "none":
        return pixels
    if method == "clahe":
        # Tiles of 1/8 of the image and a clip of 2 are OpenCV's usual chest X-ray settings:
        # local contrast rises without amplifying the noise of flat regions.
        return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(pixels)
    return cv2.equalizeHist(pixels)


def check_normalization(method: str) -> None:
    """Raise :class:`LungdetError` unless ``method`` is one of ``NORMALIZATIONS``."""
    if method not in NORMALIZATIONS:
        raise LungdetError(f"normalization {method!r}: must be one of {', '.join(NORMALIZATIONS)}")


def prepare_pixels(pixels: np.ndarray, *, image_size: int | None, normalization: str) -> np.ndarray:
    """What ``convert`` writes for one DICOM: resized to ``image_size`` square (if given), then normalised.

    ``predict`` calls this too, with the dataset's settings, so a model sees the same pixels at
    prediction as in training.
    """
    if image_size is not None and pixels.shape != (image_size, image_size):
        # INTER_AREA averages source pixels when shrinking, which keeps faint opacities visible.
        pixels = cv2.resize(pixels, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return normalize_pixels(pixels, method=normalization)
