"""A trained model loaded once: a ``lungdet train`` checkpoint, or an ONNX or TorchScript export, behind one :class:`Detector`.

Everything that runs a model shares this: ``lungdet predict`` (:mod:`lungdet.detection.predict`)
for folders, :mod:`lungdet.detection.detect` for one uploaded file (``lungdet serve``, ``predict
--json``), ``lungdet pacs``, export's checks. It knows checkpoints, devices and precision, not
files of X-rays or submissions.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lungdet.data_tools.metadata import ImageTags
from lungdet.detection.config import TrainConfig, config_from_dict
from lungdet.detection.exported import ExportedModel, export_format, load_exported
from lungdet.detection.image_head import IMAGE_PROBABILITY, has_image_head, image_metadata_weights
from lungdet.detection.inference import ImageResult, PreparedInputRunner, ProbabilityMap, image_result, prepare_input
from lungdet.detection.model import build_model, in_memory_layout
from lungdet.detection.runtime import Precision, load_checkpoint, resolve_device, resolve_precision, to_model_input
from lungdet.errors import LungdetError
from lungdet.submission.prediction_string import Prediction, keep_confident


def read_trained_checkpoint(checkpoint_path: Path) -> dict:
    """A ``lungdet train`` checkpoint, checked to hold a model and its config (anything else is a one-line LungdetError)."""
    checkpoint = load_checkpoint(checkpoint_path)
    for key in ("model", "config"):
        if key not in checkpoint:
            raise LungdetError(f"{checkpoint_path}: has no '{key}' entry; is it a lungdet checkpoint (RUN/best.pt)?")
    return checkpoint


def model_from_checkpoint(
    checkpoint: Mapping[str, Any], *, batched_heads: bool | None = None
) -> tuple[nn.Module, TrainConfig]:
    """The model a checkpoint was saved from, with its weights, as built (NCHW, CPU, train mode), and its config.

    ``batched_heads`` overrides the config's choice (the heads hold no weights, so either loads).
    """
    config = config_from_dict(checkpoint["config"])
    model_config = config.model if batched_heads is None else replace(config.model, batched_heads=batched_heads)
    model = build_model(model_config, frozen_batch_norm=bool(checkpoint.get("frozen_batch_norm", False)))
    model.load_state_dict(checkpoint["model"])
    return model, config


def probability_map_of(model: nn.Module, checkpoint: Mapping[str, Any]) -> ProbabilityMap:
    """The model's metadata term and the checkpoint's Platt scaling (``image_calibration``; none in older checkpoints)."""
    weights = image_metadata_weights(model)
    platt = checkpoint.get("image_calibration")
    return ProbabilityMap(
        tuple(weights) if weights is not None else None, tuple(float(value) for value in platt) if platt else None
    )


def load_trained_model(checkpoint_path: Path, *, device: torch.device) -> tuple[nn.Module, TrainConfig, dict]:
    """Rebuild the model a checkpoint was saved from and load its weights; returns (model in eval mode, config, checkpoint).

    The model has the memory layout it was trained in (``channels_last``), which its kernels are fastest with.
    """
    checkpoint = read_trained_checkpoint(checkpoint_path)
    model, config = model_from_checkpoint(checkpoint)
    return in_memory_layout(model, channels_last=config.channels_last).to(device).eval(), config, checkpoint


def model_input_for(pixels: np.ndarray, *, image_size: int, preprocessing: Mapping[str, Any]) -> torch.Tensor:
    """The model's input for a decoded X-ray (uint8 ``[H, W]``): :func:`~lungdet.detection.inference.prepare_input`, as a FloatTensor[3, S, S] in [0, 1]."""
    return to_model_input(prepare_input(pixels, image_size=image_size, preprocessing=preprocessing))


def to_original_space(
    output: dict[str, torch.Tensor], *, image_size: int, rows: int, columns: int, score_threshold: float
) -> Prediction:
    """torchvision output (XYXY_ABS at ``image_size``) -> Prediction (XYWH_ABS in the DICOM's original pixels)."""
    return keep_confident(
        image_result(*_boxes_and_scores(output), None, image_size=image_size, rows=rows, columns=columns).prediction,
        min_confidence=score_threshold,
    )


def _boxes_and_scores(output: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    # .float(): under bf16 autocast the heads may hand back half-precision scores, which numpy cannot hold.
    return output["boxes"].detach().float().cpu().numpy(), output["scores"].detach().float().cpu().numpy()


@torch.no_grad()
def predict_pixels(
    model: nn.Module,
    images: Sequence[np.ndarray],
    *,
    image_size: int,
    device: torch.device,
    score_threshold: float,
    preprocessing: Mapping[str, Any] | None = None,
    precision: Precision | None = None,
) -> list[ImageResult]:
    """One forward pass over decoded X-rays (uint8 ``[H, W]`` each, any sizes); an :class:`ImageResult` per image, in order.

    Boxes are XYWH_ABS in each image's own pixels, with confidence >= ``score_threshold``; the
    probability is the image head's, None for a model without one.
    ``preprocessing`` is the checkpoint's (see :func:`~lungdet.detection.inference.prepare_input`); ``precision``
    (default fp32) is the autocast the forward pass runs under. ``lungdet predict`` and ``lungdet serve``
    both come through here, so an image gets the same boxes from either.
    """
    results = ModelRunner(model, image_size, device, preprocessing, precision).predict_batch(list(images))
    return [
        ImageResult(keep_confident(result.prediction, min_confidence=score_threshold), result.probability)
        for result in results
    ]


@contextlib.contextmanager
def input_size_of(model: nn.Module, size: int) -> Iterator[None]:
    """Let ``model``'s own resize keep ``size`` px inputs as they are for the duration (torchvision resizes every input to its min_size)."""
    transform = getattr(model, "transform", None)
    if transform is None or (tuple(transform.min_size)[-1] == size and transform.max_size == size):
        yield
        return
    saved = transform.min_size, transform.max_size
    transform.min_size, transform.max_size = (size,), size
    try:
        yield
    finally:
        transform.min_size, transform.max_size = saved


@dataclass
class ModelRunner(PreparedInputRunner):
    """A bare model with its input size, preprocessing and precision: every box (down to the model's own floor) for a batch.

    ``probability_map`` turns the image head's probability into the reported one (its metadata
    term, then the checkpoint's Platt scaling: :func:`probability_map_of`); by default the
    model's own metadata term and no scaling.
    """

    model: nn.Module
    image_size: int
    device: torch.device
    preprocessing: Mapping[str, Any] | None
    precision: Precision | None
    probability_map: ProbabilityMap | None = None

    def __post_init__(self) -> None:
        if self.probability_map is None:
            weights = image_metadata_weights(self.model)
            self.probability_map = ProbabilityMap(tuple(weights) if weights is not None else None)

    @property
    def metadata_weights(self) -> tuple[float, ...] | None:
        """The image head's metadata weights (one per ``METADATA_FEATURES`` entry); None without them."""
        return self.probability_map.metadata_weights

    @torch.no_grad()
    def predict_prepared(
        self, batch: Any, shapes: Sequence[tuple[int, int]], tags: Sequence[ImageTags] | None = None
    ) -> list[ImageResult]:
        """Inputs from :meth:`prepare` stacked (uint8 ``[N, S, S]``, numpy or a tensor, pinned for a fast copy) and each original ``(rows, columns)``.

        ``tags`` (one per image; None: all unknown) go into an image head with metadata.
        """
        # Scaled and given its three channels on the device: a quarter of the bytes cross the bus.
        inputs = (
            torch.as_tensor(batch)
            .to(self.device, non_blocking=True)
            .float()
            .div_(255.0)
            .unsqueeze(1)
            .expand(-1, 3, -1, -1)
        )
        # A scaled TTA pass hands over another size than the model's own (lungdet.detection.tta).
        size = int(inputs.shape[-1])
        with (self.precision or Precision(self.device.type, None)).autocast(), input_size_of(self.model, size):
            outputs = self.model(list(inputs.unbind(0)))
        tags = list(tags) if tags is not None else [ImageTags()] * len(shapes)
        return [
            image_result(
                *_boxes_and_scores(output),
                self.probability_map.apply(float(output[IMAGE_PROBABILITY]), image_tags)
                if IMAGE_PROBABILITY in output
                else None,
                image_size=size,
                rows=rows,
                columns=columns,
            )
            for (rows, columns), output, image_tags in zip(shapes, outputs, tags, strict=True)
        ]


@dataclass
class Detector:
    """A trained model, loaded once, ready for one image at a time or a batch: a checkpoint, or an ONNX or TorchScript export.

    ``score_threshold`` is the cut-off tuned on validation (stored in the checkpoint and in every
    export): the image verdict and the default box filter use it. ``checkpoint_sha256`` names the
    exact trained weights in every reply (for an export, those of the checkpoint it was made from),
    so a result can be traced to the file that made it.
    """

    runner: ModelRunner | ExportedModel
    architecture: str
    score_threshold: float
    checkpoint_sha256: str
    # with an image head: its probability cut-off tuned on validation; None without one
    image_threshold: float | None = None
    format: str = "checkpoint"  # or 'onnx', 'torchscript'
    # One forward pass at a time: the model is shared, and parallel passes on one device only contend.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def image_size(self) -> int:
        """The square side, in pixels, images are resized to for the model."""
        return self.runner.image_size

    @property
    def preprocessing(self) -> Mapping[str, Any]:
        """What ``lungdet convert`` did to the training images (``image_size``, ``normalization``); ``{}`` for none."""
        return self.runner.preprocessing or {}

    @property
    def device(self) -> str:
        """The device the model runs on, as a string (e.g. ``'cpu'``, ``'cuda'``)."""
        return str(self.runner.device)

    @property
    def precision_name(self) -> str:
        """The forward pass's precision: ``'fp32'``, ``'bf16'`` or ``'fp16'``; an export runs in ``'fp32'``."""
        # Exports are traced in float32 and run so.
        precision = getattr(self.runner, "precision", None)
        return precision.name if precision is not None else "fp32"

    @property
    def info(self) -> dict[str, Any]:
        """The ``model`` part of every reply."""
        return {
            "architecture": self.architecture,
            "format": self.format,
            "image_size": self.image_size,
            "checkpoint_sha256": self.checkpoint_sha256,
            "score_threshold": self.score_threshold,
            "image_threshold": self.image_threshold,
            "image_metadata": self.uses_metadata,
            "image_calibrated": self.image_threshold is not None
            and getattr(self.runner.probability_map, "platt", None) is not None,
        }

    @property
    def uses_metadata(self) -> bool:
        """Whether the image-level probability depends on the view, sex and age (an image head trained with them)."""
        return getattr(self.runner, "metadata_weights", None) is not None

    def predict(self, pixels: np.ndarray, tags: ImageTags | None = None) -> ImageResult:
        """Every box the model gives for uint8 ``[H, W]`` pixels (down to its own ``box_score_thresh``), XYWH_ABS in those pixels.

        ``tags`` (the file's view, sex and age; None: unknown) feed an image head with metadata.
        """
        return self.predict_batch([pixels], [tags or ImageTags()])[0]

    def predict_batch(self, images: list[np.ndarray], tags: Sequence[ImageTags] | None = None) -> list[ImageResult]:
        """:meth:`predict` for several images in one forward pass (any sizes), in order."""
        with self.lock:
            return self.runner.predict_batch(images, tags)

    def predict_prepared(
        self, batch: Any, shapes: Sequence[tuple[int, int]], tags: Sequence[ImageTags] | None = None
    ) -> list[ImageResult]:
        """:meth:`predict_batch` for inputs already prepared (see :class:`BatchPredictor`)."""
        with self.lock:
            return self.runner.predict_prepared(batch, shapes, tags)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces (a ResNet-50 checkpoint is 300 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for piece in iter(lambda: stream.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def load_detector(checkpoint_path: Path, *, device: str = "auto", amp: str = "auto") -> Detector:
    """Load a ``lungdet train`` checkpoint, or a ``lungdet export`` file, on ``device`` ('auto', 'cpu', 'cuda:N') under ``amp``.

    An export is told by its content and runs as it was exported, in float32: ``amp`` 'auto' and
    'none' mean that, a half precision is refused. Raises ``LungdetError`` for a missing or foreign
    file, an unknown device or an amp the device cannot run.
    """
    kind = export_format(Path(checkpoint_path))
    if kind is not None:
        if amp not in ("auto", "none"):
            raise LungdetError(
                f"{checkpoint_path}: an {kind} export runs in float32 as it was exported; drop --amp {amp}"
            )
        exported = load_exported(Path(checkpoint_path), device=device)
        metadata = exported.metadata
        return Detector(
            runner=exported,
            architecture=str(metadata["architecture"]),
            score_threshold=float(metadata["score_threshold"]),
            checkpoint_sha256=str(metadata["source_checkpoint"]["sha256"]),
            image_threshold=None if metadata["image_threshold"] is None else float(metadata["image_threshold"]),
            format=kind,
        )
    torch_device = resolve_device(device)
    precision = resolve_precision(amp, torch_device)
    model, config, checkpoint = load_trained_model(Path(checkpoint_path), device=torch_device)
    runner = ModelRunner(
        model,
        config.model.image_size,
        torch_device,
        dict(checkpoint.get("preprocessing") or {}),
        precision,
        probability_map_of(model, checkpoint),
    )
    return Detector(
        runner=runner,
        architecture=config.model.architecture,
        score_threshold=float(checkpoint.get("score_threshold", 0.5)),
        checkpoint_sha256=file_sha256(Path(checkpoint_path)),
        image_threshold=float(checkpoint.get("image_threshold", 0.5)) if has_image_head(model) else None,
    )
