"""What every way of running a detector shares: the input it is given and the answer it gives back.

A lungdet checkpoint run by torch, an ONNX export run by onnxruntime and a TorchScript export
all take the same input: a decoded X-ray (uint8 ``[H, W]``) prepared by :func:`prepare_input`
into uint8 ``[image_size, image_size]``. They all hand back boxes as torchvision does (XYXY_ABS
at ``image_size``), which :func:`image_result` maps to an :class:`ImageResult` in the image's own
pixels. Keeping this module free of torch and of the training code is what lets an ONNX export
run with numpy, OpenCV and onnxruntime alone (tests/detection/test_exported.py checks it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import cv2
import numpy as np

from lungdet.boxes import scale_xywh, xyxy_to_xywh
from lungdet.data_tools.metadata import ImageTags, metadata_features
from lungdet.data_tools.pixels import prepare_pixels
from lungdet.submission.platt import apply_platt, logit, sigmoid
from lungdet.submission.prediction_string import Prediction


class ImageResult(NamedTuple):
    """One image's answer: every box (XYWH_ABS, the image's own pixels) and, from a model with an image head, its probability."""

    prediction: Prediction
    probability: float | None = None


class LoadedImage(NamedTuple):
    """A decoded X-ray (uint8 ``[H, W]``) and what its file says of the patient (view, sex, age; empty for a PNG)."""

    pixels: np.ndarray
    tags: ImageTags = ImageTags()


def with_metadata(probability: float | None, tags: ImageTags | None, weights: Sequence[float] | None) -> float | None:
    """The image-level probability with the metadata term added: ``sigmoid(logit(probability) + weights . features(tags))``.

    ``probability`` is the model's own (the pixels' part, see :mod:`lungdet.detection.image_head`);
    ``weights`` the head's metadata weights, None for a head without metadata (the probability is
    then returned as it is).
    """
    if probability is None or weights is None:
        return probability
    return with_metadata_features(probability, metadata_features(tags), weights)


def with_metadata_features(probability: float, features: np.ndarray, weights: Sequence[float]) -> float:
    """:func:`with_metadata` for an already encoded metadata vector (float ``[F]``)."""
    term = float(np.dot(np.asarray(weights, dtype=np.float64), np.asarray(features, dtype=np.float64)))
    return float(sigmoid(logit(probability) + term))


@dataclass(frozen=True)
class ProbabilityMap:
    """How a model's own image probability becomes the one lungdet reports: its metadata term added, then Platt scaling.

    ``metadata_weights`` are the head's (None without metadata), ``platt`` the ``(slope,
    intercept)`` fitted on validation (None for a checkpoint from before calibration, or one
    without a head). Every runner (checkpoint, ONNX, TorchScript) holds one, so they agree to the float.
    """

    metadata_weights: tuple[float, ...] | None = None
    platt: tuple[float, float] | None = None

    def apply(self, probability: float | None, tags: ImageTags | None) -> float | None:
        """The reported probability: the metadata term for ``tags`` added, then Platt scaling; None stays None."""
        return apply_platt(with_metadata(probability, tags, self.metadata_weights), self.platt)


def prepare_input(pixels: np.ndarray, *, image_size: int, preprocessing: Mapping[str, Any]) -> np.ndarray:
    """A decoded X-ray (uint8 ``[H, W]``) as the model saw its training images: uint8 ``[image_size, image_size]``.

    ``preprocessing`` is what ``lungdet convert`` did (``image_size``, ``normalization``, stored in
    the checkpoint and in every export); the result is then resized to the model's square
    ``image_size``, as the training loader does with the converted PNGs. Scaling to [0, 1] and
    repeating the grey channel happen later, on the device (or inside an exported graph).
    """
    pixels = prepare_pixels(
        pixels,
        image_size=preprocessing.get("image_size"),
        normalization=str(preprocessing.get("normalization", "none")),
    )
    if pixels.shape != (image_size, image_size):
        # INTER_AREA, as convert: it averages source pixels when shrinking, which keeps faint opacities.
        pixels = cv2.resize(pixels, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(pixels)


def image_result(
    boxes_xyxy: np.ndarray, scores: np.ndarray, probability: float | None, *, image_size: int, rows: int, columns: int
) -> ImageResult:
    """A detector's output for one image (XYXY_ABS at ``image_size``) -> :class:`ImageResult` (XYWH_ABS in the ``rows x columns`` original)."""
    boxes = scale_xywh(
        xyxy_to_xywh(np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)),
        scale_x=columns / image_size,
        scale_y=rows / image_size,
    )
    return ImageResult(Prediction.from_arrays(np.asarray(scores, dtype=np.float64).reshape(-1), boxes), probability)


class PreparedInputRunner:
    """What every runner does with decoded X-rays before its own forward pass: prepare each, stack them, run.

    A subclass has ``image_size``, ``preprocessing`` (None for none) and
    ``predict_prepared(batch uint8 [N, S, S], shapes [(rows, columns)], tags)``, where ``tags``
    (one :class:`ImageTags` per image, or None: all unknown) feed an image head with metadata.
    """

    image_size: int
    preprocessing: Mapping[str, Any] | None

    def predict_prepared(
        self, batch: Any, shapes: Sequence[tuple[int, int]], tags: Sequence[ImageTags] | None = None
    ) -> list[ImageResult]:
        """Every box for stacked prepared inputs (uint8 ``[N, S, S]``), ``shapes`` their originals' ``(rows, columns)``.

        Returns an :class:`ImageResult` per image, in order, boxes XYWH_ABS in its original pixels; subclasses implement
        it.
        """
        raise NotImplementedError

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """A decoded X-ray (uint8 ``[H, W]``) as this model's input: uint8 ``[image_size, image_size]``."""
        return prepare_input(pixels, image_size=self.image_size, preprocessing=self.preprocessing or {})

    def predict_batch(self, images: list[np.ndarray], tags: Sequence[ImageTags] | None = None) -> list[ImageResult]:
        """Every box for each decoded X-ray (uint8 ``[H, W]``, any sizes), XYWH_ABS in its own pixels, in order; ``tags`` as for ``predict_prepared``."""
        return self.predict_prepared(
            np.stack([self.prepare(pixels) for pixels in images]), [pixels.shape[:2] for pixels in images], tags
        )
