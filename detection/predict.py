"""``lungdet predict``: run a trained checkpoint on DICOMs and write a Kaggle ``submission.csv``.

One row per DICOM (``patientId`` = file stem), rows sorted by patientId; PredictionString groups
``confidence x y width height`` in the DICOM's *original* pixels (boxes are predicted at
``model.image_size`` and scaled back per axis), empty when nothing passes the cut-off.
Run: ``lungdet predict --checkpoint runs/r50/best.pt --dicom-dir stage_2_test_images --out submission.csv``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data_tools.boxes import scale_xywh, xyxy_to_xywh
from data_tools.cli_types import fraction, int_in_range
from data_tools.dicom_io import DicomImage, find_dicoms, read_dicom
from data_tools.errors import DicomReadError, ImageReadError, LungdetError
from data_tools.to_coco import prepare_pixels
from detection.config import AMP_MODES, TrainConfig, config_from_dict
from detection.data import to_model_input
from detection.engine import Precision, resolve_precision
from detection.model import build_model, in_memory_layout
from detection.train import load_checkpoint, resolve_device
from submission.prediction_string import Prediction, keep_confident, write_submission


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
) -> list[Prediction]:
    """One forward pass over decoded X-rays (uint8 ``[H, W]`` each, any sizes); a Prediction per image, in order.

    Boxes are XYWH_ABS in each image's own pixels, with confidence >= ``score_threshold``.
    ``preprocessing`` is the checkpoint's (see :func:`model_input_for`); ``precision`` (default
    fp32) is the autocast the forward pass runs under. ``lungdet predict`` and ``lungdet serve``
    both come through here, so an image gets the same boxes from either.
    """
    inputs = [model_input_for(pixels, image_size=image_size, preprocessing=preprocessing or {}) for pixels in images]
    with (precision or Precision(device.type, None)).autocast():
        outputs = model([tensor.to(device) for tensor in inputs])
    return [
        to_original_space(output, image_size=image_size, rows=pixels.shape[0], columns=pixels.shape[1], score_threshold=score_threshold)
        for pixels, output in zip(images, outputs, strict=True)
    ]


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
    """Predict every DICOM in ``paths``: ``({patientId: Prediction}, [(bad file, reason)])``.

    An unreadable file gets an empty prediction (Kaggle wants a row per image) and is listed.
    ``precision`` (default fp32) is the autocast the forward pass runs under.
    """
    predictions: dict[str, Prediction] = {}
    bad: list[tuple[Path, str]] = []
    batch: list[DicomImage] = []

    def flush() -> None:
        batch_predictions = predict_pixels(
            model, [image.pixels for image in batch], image_size=image_size, device=device, score_threshold=score_threshold,
            preprocessing=preprocessing, precision=precision,
        )
        for image, prediction in zip(batch, batch_predictions, strict=True):
            predictions[image.meta.patient_id] = prediction
        batch.clear()

    for path in tqdm(paths, desc="predict", unit="file", disable=None if progress else True):
        try:
            batch.append(read_dicom(path))
        except DicomReadError as error:
            bad.append((path, error.reason))
            predictions[path.stem] = Prediction.empty()
            continue
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return predictions, bad


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


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungdet predict",
        description="Predict lung-opacity boxes for every DICOM in a folder and write a Kaggle submission.csv "
        "(patientId,PredictionString; boxes in original DICOM pixels), or print the JSON that lungdet serve returns "
        "for each file (--json).",
        epilog="examples:\n"
        "  lungdet predict --checkpoint runs/mobilenet/best.pt --dicom-dir stage_2_test_images --out submission.csv\n"
        "  lungdet predict --checkpoint runs/mobilenet/best.pt --input patient.dcm chest.png --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint from lungdet train (RUN/best.pt)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dicom-dir", type=Path, help="folder with .dcm files (searched recursively)")
    source.add_argument(
        "--input", type=Path, nargs="+", metavar="FILE",
        help="X-ray files: DICOM (any extension or none), PNG or JPEG, told apart by content; patientId is the file stem",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="submission CSV to write")
    target.add_argument(
        "--json", action="store_true",
        help="print one JSON object per file on its own line, in input order: what lungdet serve's /api/v1/detect returns "
        "(a file that cannot be read gets {\"error\": {\"kind\", \"message\"}} in its place, and the exit status is 2)",
    )
    parser.add_argument(
        "--score-threshold", type=fraction, default=None,
        help="keep boxes with at least this confidence; default: the cut-off tuned on validation and stored in the checkpoint "
        "(with --json the image's verdict still uses the stored cut-off)",
    )
    parser.add_argument("--batch-size", type=int_in_range(1), default=4, help="images per forward pass with --dicom-dir (default 4)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu' or 'cuda:N'")
    parser.add_argument(
        "--amp", choices=AMP_MODES, default="auto",
        help="mixed precision, as train's amp key: 'auto' (default) is bf16 on GPUs and CPUs that have it, fp16 on older GPUs, else fp32",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def predict_files(args: argparse.Namespace, paths: Sequence[Path]) -> int:
    """``--input`` or ``--json``: one file at a time through :mod:`detection.detect`, the code ``lungdet serve`` runs."""
    # Imported here: detect pulls in the image readers and drawing code that a folder submission does not need.
    from detection.detect import detect_bytes, detection_json, error_json, load_detector

    detector = load_detector(args.checkpoint, device=args.device, amp=args.amp)
    threshold = args.score_threshold if args.score_threshold is not None else detector.score_threshold
    predictions: dict[str, Prediction] = {}
    failed: list[tuple[Path, str]] = []
    for path in tqdm(paths, desc="predict", unit="file", disable=None if not args.no_progress else True):
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            reason = f"cannot be read ({error.strerror or error}); check the path"
            failed.append((path, reason))
            if args.json:
                print(json.dumps({"error": {"kind": "missing", "message": f"{path}: {reason}"}}), flush=True)
            continue
        try:
            detection = detect_bytes(detector, data, name=str(path))
        except ImageReadError as error:
            failed.append((path, error.reason))
            if args.json:
                print(json.dumps(error_json(error)), flush=True)
            else:
                predictions[Path(path).stem] = Prediction.empty()
            continue
        if args.json:
            print(json.dumps(detection_json(detection, detector_info=detector.info, min_confidence=args.score_threshold)), flush=True)
        else:
            predictions[Path(path).stem] = keep_confident(detection.prediction, min_confidence=threshold)
    if not args.json:
        write_submission(args.out, {patient_id: predictions[patient_id] for patient_id in sorted(predictions)})
        with_boxes = sum(prediction.boxes.shape[0] > 0 for prediction in predictions.values())
        print(f"wrote {args.out}: {len(predictions)} rows, {with_boxes} with boxes (confidence >= {threshold:g}; {detector.device}, {detector.precision.name})")
    for path, reason in failed:
        print(f"  unreadable{'' if args.json else ', written with no boxes'}: {path}: {reason}", file=sys.stderr)
    return 2 if failed and args.json else 0


def main(args: argparse.Namespace) -> int:
    if args.input is not None:
        paths = list(args.input)
    else:
        paths = find_dicoms(args.dicom_dir)
        if not paths:
            raise LungdetError(f"{args.dicom_dir}: no .dcm files found")
    if not args.json:
        check_unique_patient_ids(paths)
    if args.json or args.input is not None:
        return predict_files(args, paths)
    device = resolve_device(args.device)
    precision = resolve_precision(args.amp, device)
    model, config, checkpoint = load_trained_model(args.checkpoint, device=device)
    threshold = args.score_threshold if args.score_threshold is not None else float(checkpoint.get("score_threshold", 0.5))
    predictions, bad = predict_dicoms(
        model, paths, image_size=config.model.image_size, device=device, score_threshold=threshold,
        preprocessing=checkpoint.get("preprocessing"), batch_size=args.batch_size, progress=not args.no_progress, precision=precision,
    )
    write_submission(args.out, {patient_id: predictions[patient_id] for patient_id in sorted(predictions)})
    with_boxes = sum(prediction.boxes.shape[0] > 0 for prediction in predictions.values())
    print(f"wrote {args.out}: {len(predictions)} rows, {with_boxes} with boxes (confidence >= {threshold:g}; {device}, {precision.name})")
    for path, reason in bad:
        print(f"  unreadable, written with no boxes: {path}: {reason}", file=sys.stderr)
    return 0
