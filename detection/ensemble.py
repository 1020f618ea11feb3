"""Every model's every TTA pass over a list of files: :func:`predict_raw`, what ``lungdet predict`` fuses.

Several checkpoints (or exports) and TTA passes run over the same images, each image read and
prepared once per distinct input spec in loader workers (:mod:`lungdet.detection.prepared_images`).
The result is raw predictions, every box of every model and pass, in the images' own pixels;
:func:`predict_dicoms` is the one-model case with a confidence cut-off.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from lungdet.data_tools.metadata import ImageTags
from lungdet.detection.detector import ModelRunner
from lungdet.detection.inference import ImageResult, LoadedImage
from lungdet.detection.prepared_images import InputSpec, PreparedBatch, prepared_loader, read_dicom_input
from lungdet.detection.runtime import Precision
from lungdet.detection.tta import TtaPass, hflip_back, parse_tta
from lungdet.errors import LungdetError
from lungdet.submission.prediction_string import Prediction, keep_confident
from lungdet.submission.raw_predictions import RawPrediction


class BatchPredictor(Protocol):
    """What :func:`predict_raw` runs: a :class:`ModelRunner`, a :class:`Detector`, an export, or anything that answers the same way.

    ``image_size`` and ``preprocessing`` say how an image is prepared (:func:`~lungdet.detection.inference.prepare_input`),
    which :func:`predict_raw` does in its loader workers; models that share both share the prepared inputs.
    """

    @property
    def image_size(self) -> int:
        """The square side, in pixels, images are resized to for the model."""
        ...

    @property
    def preprocessing(self) -> Mapping[str, Any] | None:
        """What ``lungdet convert`` did to the training images (``image_size``, ``normalization``); None for nothing."""
        ...

    def predict_prepared(
        self, batch: Any, shapes: Sequence[tuple[int, int]], tags: Sequence[ImageTags] | None = None
    ) -> list[ImageResult]:
        """Every box for stacked prepared inputs (uint8 ``[N, S, S]``), ``shapes`` their originals' ``(rows, columns)``.

        An :class:`ImageResult` per image, in order, boxes XYWH_ABS in its original pixels; ``tags`` feed an image head
        with metadata.
        """
        ...


def predict_dicoms(
    model: nn.Module,
    paths: Sequence[Path],
    *,
    image_size: int,
    device: torch.device,
    score_threshold: float,
    preprocessing: Mapping[str, Any] | None = None,
    batch_size: int = 4,
    progress: bool = True,
    precision: Precision | None = None,
) -> tuple[dict[str, Prediction], list[tuple[Path, str]]]:
    """Predict every DICOM in ``paths`` with one model: ``({patientId: Prediction}, [(bad file, reason)])``.

    Boxes at or above ``score_threshold``. An unreadable file gets an empty prediction (Kaggle
    wants a row per image) and is listed. ``precision`` (default fp32) is the autocast the
    forward pass runs under.
    """
    runner = ModelRunner(model, image_size, device, preprocessing, precision)
    rows, bad = predict_raw([runner], ["model"], paths, read=read_dicom_input, batch_size=batch_size, progress=progress)
    predictions = {row.patient_id: keep_confident(row.prediction, min_confidence=score_threshold) for row in rows}
    for path, _ in bad:
        predictions[path.stem] = Prediction.empty()
    return predictions, bad


def input_spec(predictor: BatchPredictor) -> InputSpec:
    """What decides ``predictor``'s inputs: its image size and its preprocessing as sorted JSON.

    Predictors with equal specs share the prepared inputs.
    """
    return int(predictor.image_size), json.dumps(dict(predictor.preprocessing or {}), sort_keys=True)


def predict_raw(
    detectors: Sequence[BatchPredictor],
    names: Sequence[str],
    paths: Sequence[Path],
    *,
    read: Callable[[Path], LoadedImage],
    tags: Mapping[str, ImageTags] | None = None,
    tta: str | Sequence[TtaPass] = "none",
    batch_size: int = 4,
    progress: bool = True,
    workers: int = 0,
) -> tuple[list[RawPrediction], list[tuple[Path, str]]]:
    """Every model's every pass over every image: ``(raw predictions, [(unreadable file, reason)])``, both in ``paths`` order.

    ``read(path)`` gives an image's uint8 ``[H, W]`` pixels and its file's tags (a
    :class:`~lungdet.detection.inference.LoadedImage`) or raises ``ImageReadError``; the patientId
    is the file stem, and ``tags`` (patientId -> view, sex, age: a metadata CSV, a dataset's
    records) fill in or replace what the file says, for an image head with metadata. Each image is read once, prepared once per distinct input spec
    (image size and preprocessing: each model sees its input as it was trained), and with
    run once per TTA pass (``tta``: a list as ``--tta`` takes it, e.g. 'hflip,scale0.8', or the
    parsed passes; see :mod:`lungdet.detection.tta`), mirrored boxes mapped back. Boxes are kept
    down to each model's own floor, in original pixels.

    Reading and preparing run in ``workers`` DataLoader processes (0: in this process), so that
    decoding overlaps the forward pass; batches are formed in file order whatever the worker
    count, so the output does not depend on it. On CUDA the batches are pinned for a fast copy.
    """
    passes = parse_tta(tta) if isinstance(tta, str) else tuple(tta)
    if any(tta_pass.scale != 1.0 for tta_pass in passes):
        fixed = [getattr(detector, "format", "") for detector in detectors if not accepts_other_sizes(detector)]
        if fixed:
            raise LungdetError(
                f"--tta {','.join(tta_pass.name for tta_pass in passes[1:])}: an {fixed[0]} export takes one input size, fixed when it was traced, "
                "so it cannot run scaled passes; use the checkpoint (RUN/best.pt), or drop the scaleS passes"
            )
    specs, spec_of = input_specs(detectors)
    on_cuda = any("cuda" in str(getattr(detector, "device", "")) for detector in detectors)
    loader = prepared_loader(
        paths,
        read=read,
        specs=specs,
        passes=passes,
        tags=tags,
        batch_size=batch_size,
        workers=workers,
        pin_memory=on_cuda,
    )
    rows: list[RawPrediction] = []
    bad: list[tuple[Path, str]] = []
    with tqdm(total=len(paths), desc="predict", unit="file", disable=None if progress else True) as bar:
        for batch in loader:
            bad.extend(batch.unreadable)
            rows.extend(predict_batch(detectors, names, batch, spec_of=spec_of, passes=passes))
            bar.update(len(batch.paths) + len(batch.unreadable))
    return rows, bad


def input_specs(detectors: Sequence[BatchPredictor]) -> tuple[list[InputSpec], list[int]]:
    """The distinct input specs of ``detectors``, in first-seen order, and each detector's index into them."""
    specs = list(dict.fromkeys(input_spec(detector) for detector in detectors))
    return specs, [specs.index(input_spec(detector)) for detector in detectors]


def predict_batch(
    detectors: Sequence[BatchPredictor],
    names: Sequence[str],
    batch: PreparedBatch,
    *,
    spec_of: Sequence[int],
    passes: Sequence[TtaPass],
) -> list[RawPrediction]:
    """Every model's every pass over one prepared batch: a :class:`RawPrediction` per readable file, model and pass.

    ``spec_of[i]`` is the index of detector ``i``'s input spec in the batch's inputs (:func:`input_specs`);
    mirrored passes' boxes are mapped back, so every box is in its image's original pixels.
    """
    rows: list[RawPrediction] = []
    if not batch.paths:
        return rows
    for detector, name, spec in zip(detectors, names, spec_of, strict=True):
        for tta_pass in passes:
            results = detector.predict_prepared(batch.inputs[tta_pass.name][spec], batch.shapes, batch.tags)
            for path, (height, width), result in zip(batch.paths, batch.shapes, results, strict=True):
                prediction = hflip_back(result.prediction, width=width) if tta_pass.mirror else result.prediction
                rows.append(
                    RawPrediction(path.stem, name, tta_pass.name, width, height, prediction, result.probability)
                )
    return rows


def accepts_other_sizes(detector: BatchPredictor) -> bool:
    """Whether ``detector`` can run inputs of other sizes than its own (a checkpoint can; a traced export cannot)."""
    runner = getattr(detector, "runner", detector)
    return isinstance(runner, ModelRunner)
