"""``lungdet predict``: run a trained checkpoint on DICOMs and write a Kaggle ``submission.csv``.

One row per DICOM (``patientId`` = file stem), rows sorted by patientId; PredictionString groups
``confidence x y width height`` in the DICOM's *original* pixels (boxes are predicted at
``model.image_size`` and scaled back per axis), empty when nothing passes the cut-off.
Run: ``lungdet predict --checkpoint runs/r50/best.pt --dicom-dir stage_2_test_images --out submission.csv``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data_tools.boxes import scale_xywh, xyxy_to_xywh
from data_tools.cli_types import fraction, int_in_range
from data_tools.dicom_io import find_dicoms, read_dicom
from data_tools.errors import ImageReadError, LungdetError
from data_tools.image_io import read_xray
from data_tools.to_coco import prepare_pixels
from detection.config import AMP_MODES, TrainConfig, config_from_dict
from detection.data import to_model_input
from detection.engine import Precision, resolve_precision
from detection.image_head import IMAGE_PROBABILITY, has_image_head
from detection.model import build_model, in_memory_layout
from detection.train import load_checkpoint, resolve_device
from submission.postprocess import PostprocessConfig, load_postprocess, mean_probability, postprocess
from submission.prediction_string import Prediction, keep_confident, write_submission
from submission.raw_predictions import RawPrediction, group_by_patient, write_raw_predictions
from submission.score import write_probabilities


def load_trained_model(checkpoint_path: Path, *, device: torch.device) -> tuple[nn.Module, TrainConfig, dict]:
    """Rebuild the model a checkpoint was saved from and load its weights; returns (model in eval mode, config, checkpoint).

    The model has the memory layout it was trained in (``channels_last``), which its kernels are fastest with.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    for key in ("model", "config"):
        if key not in checkpoint:
            raise LungdetError(f"{checkpoint_path}: has no '{key}' entry; is it a lungdet checkpoint (RUN/best.pt)?")
    config = config_from_dict(checkpoint["config"])
    model = build_model(config.model, frozen_batch_norm=bool(checkpoint.get("frozen_batch_norm", False)))
    model.load_state_dict(checkpoint["model"])
    return in_memory_layout(model, channels_last=config.channels_last).to(device).eval(), config, checkpoint


def model_input_for(pixels: np.ndarray, *, image_size: int, preprocessing: Mapping[str, Any]) -> torch.Tensor:
    """The model's input for a decoded X-ray (uint8 ``[H, W]``), prepared exactly as training images were.

    ``preprocessing`` is what ``lungdet convert`` did (``image_size``, ``normalization``, stored in
    the checkpoint); the result is then resized to the model's square ``image_size``, as the
    training loader does with the converted PNGs.
    """
    pixels = prepare_pixels(
        pixels, image_size=preprocessing.get("image_size"), normalization=str(preprocessing.get("normalization", "none"))
    )
    if pixels.shape != (image_size, image_size):
        pixels = cv2.resize(pixels, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return to_model_input(pixels)


def to_original_space(output: dict[str, torch.Tensor], *, image_size: int, rows: int, columns: int, score_threshold: float) -> Prediction:
    """torchvision output (XYXY_ABS at ``image_size``) -> Prediction (XYWH_ABS in the DICOM's original pixels)."""
    # .float(): under bf16 autocast the heads may hand back half-precision scores, which numpy cannot hold.
    boxes = scale_xywh(xyxy_to_xywh(output["boxes"].detach().float().cpu().numpy()), scale_x=columns / image_size, scale_y=rows / image_size)
    prediction = Prediction.from_arrays(output["scores"].detach().float().cpu().numpy(), boxes)
    return keep_confident(prediction, min_confidence=score_threshold)


class ImageResult(NamedTuple):
    """One image's answer: every box (XYWH_ABS, the image's own pixels) and, from a model with an image head, its probability."""

    prediction: Prediction
    probability: float | None = None


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
    ``preprocessing`` is the checkpoint's (see :func:`model_input_for`); ``precision`` (default
    fp32) is the autocast the forward pass runs under. ``lungdet predict`` and ``lungdet serve``
    both come through here, so an image gets the same boxes from either.
    """
    inputs = [model_input_for(pixels, image_size=image_size, preprocessing=preprocessing or {}) for pixels in images]
    with (precision or Precision(device.type, None)).autocast():
        outputs = model([tensor.to(device) for tensor in inputs])
    return [
        ImageResult(
            to_original_space(output, image_size=image_size, rows=pixels.shape[0], columns=pixels.shape[1], score_threshold=score_threshold),
            float(output[IMAGE_PROBABILITY]) if IMAGE_PROBABILITY in output else None,
        )
        for pixels, output in zip(images, outputs, strict=True)
    ]


class BatchPredictor(Protocol):
    """What :func:`predict_raw` runs: a :class:`Detector`, or any model wrapped to answer the same way."""

    def predict_batch(self, images: list[np.ndarray]) -> list[ImageResult]: ...


@dataclass
class ModelRunner:
    """A bare model with its input size, preprocessing and precision, as a :class:`BatchPredictor`."""

    model: nn.Module
    image_size: int
    device: torch.device
    preprocessing: Mapping[str, Any] | None
    precision: Precision | None

    def predict_batch(self, images: list[np.ndarray]) -> list[ImageResult]:
        return predict_pixels(
            self.model, images, image_size=self.image_size, device=self.device, score_threshold=0.0,
            preprocessing=self.preprocessing, precision=self.precision,
        )


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
    rows, bad = predict_raw([runner], ["model"], paths, read=read_dicom_pixels, batch_size=batch_size, progress=progress)
    predictions = {row.patient_id: keep_confident(row.prediction, min_confidence=score_threshold) for row in rows}
    for path, _ in bad:
        predictions[path.stem] = Prediction.empty()
    return predictions, bad


@dataclass
class Detector(ModelRunner):
    """A trained checkpoint, loaded once, ready for one image at a time.

    ``score_threshold`` is the cut-off tuned on validation (stored in the checkpoint): the image
    verdict and the default box filter use it. ``checkpoint_sha256`` names the exact weights in
    every reply, so a result can be traced to the file that made it.
    """

    config: TrainConfig
    score_threshold: float
    checkpoint_sha256: str
    image_threshold: float | None = None  # with an image head: its probability cut-off tuned on validation; None without one
    # One forward pass at a time: the model is shared, and parallel passes on one device only contend.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def info(self) -> dict[str, Any]:
        """The ``model`` part of every reply."""
        return {
            "architecture": self.config.model.architecture,
            "image_size": self.image_size,
            "checkpoint_sha256": self.checkpoint_sha256,
            "score_threshold": self.score_threshold,
            "image_threshold": self.image_threshold,
        }

    def predict(self, pixels: np.ndarray) -> ImageResult:
        """Every box the model gives for uint8 ``[H, W]`` pixels (down to its own ``box_score_thresh``), XYWH_ABS in those pixels."""
        return self.predict_batch([pixels])[0]

    def predict_batch(self, images: list[np.ndarray]) -> list[ImageResult]:
        """:meth:`predict` for several images in one forward pass (any sizes), in order."""
        with self.lock:
            return super().predict_batch(images)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces (a ResNet-50 checkpoint is 300 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for piece in iter(lambda: stream.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def load_detector(checkpoint_path: Path, *, device: str = "auto", amp: str = "auto") -> Detector:
    """Load a ``lungdet train`` checkpoint for single-image detection on ``device`` ('auto', 'cpu', 'cuda:N') under ``amp``.

    Raises ``LungdetError`` for a missing or foreign checkpoint, an unknown device or an amp the device cannot run.
    """
    torch_device = resolve_device(device)
    precision = resolve_precision(amp, torch_device)
    model, config, checkpoint = load_trained_model(Path(checkpoint_path), device=torch_device)
    return Detector(
        model=model,
        image_size=config.model.image_size,
        device=torch_device,
        preprocessing=dict(checkpoint.get("preprocessing") or {}),
        precision=precision,
        config=config,
        score_threshold=float(checkpoint.get("score_threshold", 0.5)),
        checkpoint_sha256=file_sha256(Path(checkpoint_path)),
        image_threshold=float(checkpoint.get("image_threshold", 0.5)) if has_image_head(model) else None,
    )


def check_unique_patient_ids(paths: Sequence[Path]) -> None:
    """A submission has one row per patientId (the file stem); two files with one stem would be ambiguous."""
    first_seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in first_seen:
            raise LungdetError(
                f"{first_seen[path.stem]} and {path} have the same patientId '{path.stem}'; "
                "a submission needs one row per patient, so keep one of them (or predict the folders separately)"
            )
        first_seen[path.stem] = path


TTA_MODES = ("none", "hflip")


def hflip_back(prediction: Prediction, *, width: int) -> Prediction:
    """Boxes predicted on a mirrored image, mapped back: XYWH_ABS ``x`` becomes ``width - x - w``."""
    boxes = prediction.boxes.copy()
    boxes[:, 0] = width - boxes[:, 0] - boxes[:, 2]
    return Prediction(prediction.scores.copy(), boxes)


def model_names(paths: Sequence[Path]) -> list[str]:
    """A short, distinct name per checkpoint for raw predictions: its run folder ('fold0'), else the whole path."""
    folders = [Path(path).parent.name or Path(path).stem for path in paths]
    return folders if len(set(folders)) == len(folders) else [str(path) for path in paths]


def predict_raw(
    detectors: Sequence[BatchPredictor],
    names: Sequence[str],
    paths: Sequence[Path],
    *,
    read: Callable[[Path], np.ndarray],
    tta: str = "none",
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[list[RawPrediction], list[tuple[Path, str]]]:
    """Every model's every pass over every image: ``(raw predictions, [(unreadable file, reason)])``.

    ``read(path)`` gives an image's uint8 ``[H, W]`` pixels or raises ``ImageReadError``; the
    patientId is the file stem. Each image is read once and run through every model (each
    prepares its input as it was trained), and with ``tta='hflip'`` also mirrored, its boxes
    mapped back. Boxes are kept down to each model's own floor, in original pixels.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    rows: list[RawPrediction] = []
    bad: list[tuple[Path, str]] = []
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        images = [pixels for _, pixels in batch]
        mirrored = [np.ascontiguousarray(pixels[:, ::-1]) for pixels in images] if tta == "hflip" else []
        for detector, name in zip(detectors, names, strict=True):
            passes = [("plain", detector.predict_batch(images))]
            if mirrored:
                flipped = detector.predict_batch(mirrored)
                passes.append(("hflip", [
                    ImageResult(hflip_back(result.prediction, width=pixels.shape[1]), result.probability) for result, pixels in zip(flipped, images, strict=True)
                ]))
            for pass_name, results in passes:
                for (patient_id, pixels), result in zip(batch, results, strict=True):
                    rows.append(RawPrediction(patient_id, name, pass_name, int(pixels.shape[1]), int(pixels.shape[0]), result.prediction, result.probability))
        batch.clear()

    for path in tqdm(paths, desc="predict", unit="file", disable=None if progress else True):
        try:
            batch.append((Path(path).stem, read(Path(path))))
        except ImageReadError as error:
            bad.append((Path(path), error.reason))
            continue
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return rows, bad


def read_dicom_pixels(path: Path) -> np.ndarray:
    return read_dicom(path).pixels


def read_file_bytes(path: Path) -> bytes:
    """The bytes of an input file; a file that cannot be read is an ``ImageReadError`` (kind 'missing'), like an unreadable image."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ImageReadError(path, f"cannot be read ({error.strerror or error}); check the path", kind="missing") from None


def read_any_pixels(path: Path) -> np.ndarray:
    return read_xray(read_file_bytes(path), name=str(path)).pixels


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungdet predict",
        description="Predict lung-opacity boxes for every DICOM in a folder (or given files) and write a Kaggle submission.csv "
        "(patientId,PredictionString; boxes in original pixels), raw predictions for tuning (--raw), or the JSON that "
        "lungdet serve returns for each file (--json). Several checkpoints are fused into one submission.",
        epilog="examples:\n"
        "  lungdet predict --checkpoint runs/mobilenet/best.pt --dicom-dir stage_2_test_images --out submission.csv\n"
        "  lungdet predict --checkpoint runs/cv/fold*/best.pt --tta hflip --postprocess postprocess.yaml --dicom-dir test --out submission.csv\n"
        "  lungdet predict --checkpoint runs/mobilenet/best.pt --input patient.dcm chest.png --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", type=Path, nargs="+", required=True,
        help="one or more checkpoints from lungdet train (RUN/best.pt); several are fused with weighted boxes fusion",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dicom-dir", type=Path, help="folder with .dcm files (searched recursively)")
    source.add_argument(
        "--input", type=Path, nargs="+", metavar="FILE",
        help="X-ray files: DICOM (any extension or none), PNG or JPEG, told apart by content; patientId is the file stem",
    )
    parser.add_argument("--out", type=Path, help="submission CSV to write")
    parser.add_argument(
        "--raw", type=Path,
        help="also (or only) write raw predictions: every box of every model and pass, for lungdet tune (see submission/raw_predictions.py)",
    )
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON object per file on its own line, in input order: what lungdet serve's /api/v1/detect returns "
        "(a file that cannot be read gets {\"error\": {\"kind\", \"message\"}} in its place, and the exit status is 2); "
        "one checkpoint, no --tta",
    )
    parser.add_argument(
        "--probabilities", type=Path,
        help="also write patientId,probability: the image-level probability of checkpoints trained with model.image_head: true (the mean over models and passes)",
    )
    parser.add_argument("--tta", choices=TTA_MODES, default="none", help="test-time augmentation: 'hflip' also runs each image mirrored and fuses both (default none)")
    parser.add_argument(
        "--postprocess", type=Path,
        help="postprocess.yaml from lungdet tune: fusion, gating, cut-off, shrink, box cap; default: the checkpoints' tuned cut-off "
        "(their mean for several) and nothing else",
    )
    parser.add_argument(
        "--score-threshold", type=fraction, default=None,
        help="keep boxes with at least this confidence, over --postprocess and the checkpoints' cut-off "
        "(with --json the image's verdict still uses the stored cut-off)",
    )
    parser.add_argument("--batch-size", type=int_in_range(1), default=4, help="images per forward pass (default 4)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu' or 'cuda:N'")
    parser.add_argument(
        "--amp", choices=AMP_MODES, default="auto",
        help="mixed precision, as train's amp key: 'auto' (default) is bf16 on GPUs and CPUs that have it, fp16 on older GPUs, else fp32",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot work, before any model is loaded."""
    if args.json and (args.out or args.raw):
        raise LungdetError("--json prints to the screen; drop --out/--raw, or drop --json to write files")
    if not (args.json or args.out or args.raw or args.probabilities):
        raise LungdetError("nothing to write: give --out submission.csv, --raw raw.csv, --probabilities probs.csv, or --json")
    if args.json and args.probabilities:
        raise LungdetError("--json already gives each image's verdict; drop --probabilities, or drop --json to write files")
    if args.json and (len(args.checkpoint) > 1 or args.tta != "none"):
        raise LungdetError("--json answers as lungdet serve does, with one checkpoint and no --tta; write a submission (--out) to fuse several")


def predict_json(args: argparse.Namespace, paths: Sequence[Path]) -> int:
    """``--json``: one file at a time through :mod:`detection.detect`, the code ``lungdet serve`` runs."""
    # Imported here: detect pulls in the image readers and drawing code that a folder submission does not need.
    from detection.detect import detect_bytes, detection_json, error_json

    detector = load_detector(args.checkpoint[0], device=args.device, amp=args.amp)
    failed: list[tuple[Path, str]] = []
    for path in tqdm(paths, desc="predict", unit="file", disable=None if not args.no_progress else True):
        try:
            detection = detect_bytes(detector, read_file_bytes(path), name=str(path))
        except ImageReadError as error:
            failed.append((path, error.reason))
            print(json.dumps(error_json(error)), flush=True)
            continue
        print(json.dumps(detection_json(detection, detector_info=detector.info, min_confidence=args.score_threshold)), flush=True)
    for path, reason in failed:
        print(f"  unreadable: {path}: {reason}", file=sys.stderr)
    return 2 if failed else 0


def main(args: argparse.Namespace) -> int:
    check_outputs(args)
    if args.input is not None:
        paths = list(args.input)
    else:
        paths = find_dicoms(args.dicom_dir)
        if not paths:
            raise LungdetError(f"{args.dicom_dir}: no .dcm files found")
    if args.json:
        return predict_json(args, paths)
    check_unique_patient_ids(paths)
    # Read before the models load, so a bad file fails in a second.
    postprocess_config = load_postprocess(args.postprocess) if args.postprocess is not None else None
    detectors = [load_detector(path, device=args.device, amp=args.amp) for path in args.checkpoint]
    if args.probabilities is not None and all(detector.image_threshold is None for detector in detectors):
        raise LungdetError(
            f"{', '.join(map(str, args.checkpoint))}: no image-level head (trained without model.image_head: true), so there are no probabilities "
            "to write; train with model.image_head=true, or drop --probabilities"
        )
    if postprocess_config is None:
        postprocess_config = PostprocessConfig(score_threshold=float(np.mean([detector.score_threshold for detector in detectors])))
    if args.score_threshold is not None:
        postprocess_config.score_threshold = args.score_threshold
    rows, bad = predict_raw(
        detectors, model_names(args.checkpoint), paths, read=read_dicom_pixels if args.input is None else read_any_pixels,
        tta=args.tta, batch_size=args.batch_size, progress=not args.no_progress,
    )
    device, precision = detectors[0].device, detectors[0].precision
    if args.raw is not None:
        written = write_raw_predictions(args.raw, rows)
        print(f"wrote {args.raw}: {written} raw rows ({len(detectors)} model(s) x {1 + (args.tta == 'hflip')} pass(es) per image)")
    if args.probabilities is not None:
        groups = group_by_patient(rows)
        write_probabilities(args.probabilities, {patient: mean_probability(groups[patient]) for patient in sorted(groups)})
        print(f"wrote {args.probabilities}: {len(groups)} image probabilities")
    if args.out is not None:
        predictions = postprocess(rows, postprocess_config)
        for path, _ in bad:  # Kaggle wants a row per image
            predictions[Path(path).stem] = Prediction.empty()
        write_submission(args.out, {patient_id: predictions[patient_id] for patient_id in sorted(predictions)})
        with_boxes = sum(prediction.boxes.shape[0] > 0 for prediction in predictions.values())
        fused = f", {len(detectors)} models fused" if len(detectors) > 1 else ""
        tta = ", hflip TTA" if args.tta == "hflip" else ""
        print(
            f"wrote {args.out}: {len(predictions)} rows, {with_boxes} with boxes "
            f"(confidence >= {postprocess_config.score_threshold:g}{fused}{tta}; {device}, {precision.name})"
        )
    for path, reason in bad:
        print(f"  unreadable{', written with no boxes' if args.out else ''}: {path}: {reason}", file=sys.stderr)
    return 0
