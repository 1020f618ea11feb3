"""``lungdet cv``: cross-validation in one command, and the out-of-fold predictions that tuning needs.

Trains one run per fold into ``OUT/fold{k}/`` (as ``lungdet train --fold k``), then lets each
fold's best model predict its own validation patients: ``OUT/oof.csv`` holds their raw
predictions (every box down to the model's floor, in original pixels, with the fold), and
``OUT/oof_labels.csv`` their truth in the RSNA format, so that ``lungdet tune`` needs nothing
else. ``OUT/summary.json`` gives each fold's mAP on its patients at its tuned cut-off, their mean
and standard deviation, and the pooled out-of-fold mAP with its 95% bootstrap interval.

A killed run resumes: folds listed as done in ``OUT/cv_state.json`` are skipped, and the fold
that was training continues from its ``last.pt``. Under ``torchrun`` every fold trains on all
processes; rank 0 alone predicts and writes the out-of-fold files.

Run: ``lungdet cv --config fasterrcnn_mobilenet_cpu --data data/coco256 --out runs/cv [--folds 0,1,2,3,4] [--tta hflip]``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from lungdet.atomic import write_text_atomic
from lungdet.boxes import scale_xywh
from lungdet.data_tools.labels import format_labels_csv
from lungdet.detection.config import apply_overrides, config_from_dict, load_config
from lungdet.detection.data import ALL_FOLDS, ImageRecord, load_records
from lungdet.detection.detector import ModelRunner, load_trained_model, probability_map_of
from lungdet.detection.distributed import from_environment, start, stop
from lungdet.detection.ensemble import predict_raw
from lungdet.detection.inference import LoadedImage
from lungdet.detection.runtime import load_checkpoint, resolve_precision, save_checkpoint
from lungdet.detection.train import BEST_CHECKPOINT, LAST_CHECKPOINT, train, training_device
from lungdet.detection.tta import TTA_EXAMPLE, tta_argument
from lungdet.errors import LungdetError
from lungdet.submission.prediction_string import Prediction, keep_confident
from lungdet.submission.raw_predictions import RawPrediction, write_raw_predictions
from lungdet.submission.score import BOOTSTRAP_DRAWS, score_dataset

STATE_FILE = "cv_state.json"
# The model trained on every image by --final; 'fold_all' so that the recipe's runs/cv/fold*/best.pt takes it in too.
FINAL_DIR = "fold_all"
OOF_FILE = "oof.csv"
OOF_LABELS_FILE = "oof_labels.csv"
SUMMARY_FILE = "summary.json"


def fold_dir(out_dir: Path, fold: int) -> Path:
    """Fold ``fold``'s run folder: ``OUT/fold{fold}``."""
    return Path(out_dir) / f"fold{fold}"


def read_state(out_dir: Path) -> dict[str, Any]:
    """``OUT/cv_state.json``: ``done``, the finished folds, and ``final`` once the final model is trained.

    ``{"done": []}`` when there is no such file yet.
    """
    path = Path(out_dir) / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"done": []}


def read_done(out_dir: Path) -> list[int]:
    """The folds recorded as finished in ``OUT/cv_state.json`` (empty without the file)."""
    return read_state(out_dir)["done"]


def mark_done(out_dir: Path, fold: int | None = None, *, final: bool = False) -> None:
    """Record a finished fold (or, with ``final``, the finished final model) in ``OUT/cv_state.json``."""
    state = read_state(out_dir)
    if fold is not None:
        state["done"] = sorted(set(state["done"]) | {fold})
    if final:
        state["final"] = True
    write_text_atomic(Path(out_dir) / STATE_FILE, json.dumps(state) + "\n")


def parse_folds(text: str) -> list[int]:
    """``--folds``: ``'0,2,1'`` -> ``[0, 1, 2]`` (sorted, no repeats).

    An ``ArgumentTypeError`` for anything but comma-separated fold numbers >= 0.
    """
    try:
        folds = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fold numbers like 0,1,2, got {text!r}") from None
    if not folds or folds[0] < 0:
        raise argparse.ArgumentTypeError(f"expected fold numbers >= 0, got {text!r}")
    return folds


def train_folds(
    config_name: str | None,
    data_dir: Path,
    out_dir: Path,
    folds: Sequence[int],
    overrides: Sequence[str],
    *,
    progress: bool = True,
) -> None:
    """Train every fold not yet done, resuming one that has a ``last.pt``; mark each done when it finishes."""
    job = from_environment()
    done = read_done(out_dir)
    for fold in folds:
        run_dir = fold_dir(out_dir, fold)
        if fold in done:
            if job.is_main:
                print(f"lungdet cv: fold {fold} is done ({run_dir}); skipped")
            continue
        if job.is_main:
            print(f"lungdet cv: fold {fold} of {', '.join(map(str, folds))} -> {run_dir}")
        train_resumably(config_name, data_dir, run_dir, [*overrides, f"data.fold={fold}"], progress=progress)
        if job.is_main:
            mark_done(out_dir, fold)


def train_resumably(
    config_name: str | None, data_dir: Path, run_dir: Path, overrides: Sequence[str], *, progress: bool
) -> None:
    """Train one run into ``run_dir``, continuing from its ``last.pt`` (with the config stored there) when a kill left one."""
    resume = (run_dir / LAST_CHECKPOINT).is_file()
    if resume:
        config = config_from_dict(apply_overrides(load_checkpoint(run_dir / LAST_CHECKPOINT)["config"], overrides))
        if from_environment().is_main:
            print(f"lungdet cv: continuing from {run_dir / LAST_CHECKPOINT}")
    else:
        config = load_config(config_name, overrides)
    try:
        train(config, data_dir, run_dir, resume=resume, progress=progress)
    except LungdetError as error:
        if not (resume and "nothing to train" in str(error)):  # killed after its last epoch, before it was marked done
            raise


def final_epochs(out_dir: Path, folds: Sequence[int]) -> int:
    """The epoch count for the final model: the median of the folds' best epochs (what their validation chose), rounded up."""
    epochs = [int(load_checkpoint(fold_dir(out_dir, fold) / BEST_CHECKPOINT)["epoch"]) for fold in folds]
    return int(np.ceil(np.median(epochs)))


def carry_fold_cut_offs(final_checkpoint: Path, fold_checkpoints: Sequence[Path]) -> dict[str, Any]:
    """Write into the final model's checkpoint the folds' mean box cut-off, image cut-off and Platt scaling; returns them.

    The final model has no validation images of its own to choose them on; the folds' were
    chosen on images their models never trained on, at the same epoch count give or take.
    """
    folds = [load_checkpoint(path) for path in fold_checkpoints]
    carried: dict[str, Any] = {
        "score_threshold": float(np.mean([checkpoint.get("score_threshold", 0.5) for checkpoint in folds]))
    }
    if all("image_threshold" in checkpoint for checkpoint in folds):
        carried["image_threshold"] = float(np.mean([checkpoint["image_threshold"] for checkpoint in folds]))
    if all(checkpoint.get("image_calibration") for checkpoint in folds):
        carried["image_calibration"] = [
            float(value) for value in np.mean([checkpoint["image_calibration"] for checkpoint in folds], axis=0)
        ]
    checkpoint = load_checkpoint(final_checkpoint)
    checkpoint.update(carried)
    checkpoint["cut_offs_from"] = [str(path) for path in fold_checkpoints]
    save_checkpoint(final_checkpoint, checkpoint)
    return carried


def train_final(
    config_name: str | None,
    data_dir: Path,
    out_dir: Path,
    folds: Sequence[int],
    overrides: Sequence[str],
    *,
    progress: bool = True,
) -> None:
    """``--final``: one model on every image, for the folds' median best epoch count, with the folds' cut-offs (``OUT/fold_all/``)."""
    job = from_environment()
    run_dir = Path(out_dir) / FINAL_DIR
    if read_state(out_dir).get("final"):
        if job.is_main:
            print(f"lungdet cv: the final model is done ({run_dir}); skipped")
        return
    epochs = final_epochs(out_dir, folds)
    if job.is_main:
        print(f"lungdet cv: the final model on every image, {epochs} epochs (the folds' median best) -> {run_dir}")
    train_resumably(
        config_name,
        data_dir,
        run_dir,
        [*overrides, f"data.fold={ALL_FOLDS}", f"optim.epochs={epochs}"],
        progress=progress,
    )
    if job.is_main:
        carried = carry_fold_cut_offs(
            run_dir / BEST_CHECKPOINT, [fold_dir(out_dir, fold) / BEST_CHECKPOINT for fold in folds]
        )
        print(
            f"lungdet cv: the final model takes the folds' mean cut-offs: {', '.join(f'{key} {value}' for key, value in carried.items())}"
        )
        mark_done(out_dir, final=True)


def read_converted(path: Path) -> LoadedImage:
    """A converted image's pixels; its tags come from the dataset's records (see :func:`predict_out_of_fold`)."""
    pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise LungdetError(f"{path}: cannot be read as an image; convert the dataset again")
    return LoadedImage(pixels)


def to_original(record: ImageRecord, boxes: np.ndarray) -> np.ndarray:
    """XYWH_ABS boxes in a converted image's pixels -> the DICOM's original pixels, each axis by its own scale."""
    return scale_xywh(
        boxes, scale_x=record.original_width / record.width, scale_y=record.original_height / record.height
    )


def predict_out_of_fold(
    data_dir: Path,
    out_dir: Path,
    folds: Sequence[int],
    *,
    device: torch.device,
    tta: str = "none",
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[list[RawPrediction], dict[str, np.ndarray], dict[int, float]]:
    """Each fold's best model on its own validation images: (raw rows in original pixels, truth in original pixels, cut-off per fold).

    The converted images are already at the dataset's size and normalised, as the training loader
    reads them, so the model gets them only resized to its input; boxes go back to the DICOM's
    original pixels with each record's own scale. An unreadable converted image stops the run
    (:func:`read_converted` raises): the dataset itself is damaged.
    """
    records = load_records(data_dir)
    rows: list[RawPrediction] = []
    truth: dict[str, np.ndarray] = {}
    thresholds: dict[int, float] = {}
    for fold in folds:
        model, config, checkpoint = load_trained_model(fold_dir(out_dir, fold) / BEST_CHECKPOINT, device=device)
        thresholds[fold] = float(checkpoint.get("score_threshold", 0.5))
        runner = ModelRunner(
            model,
            config.model.image_size,
            device,
            None,
            resolve_precision(config.amp, device),
            probability_map_of(model, checkpoint),
        )
        # predict_raw names a row by its file's stem, which convert makes the patientId.
        by_stem = {record.path.stem: record for record in (record for record in records if record.fold == fold)}
        fold_rows, _ = predict_raw(
            [runner],
            [f"fold{fold}"],
            [record.path for record in by_stem.values()],
            read=read_converted,
            tags={stem: record.tags for stem, record in by_stem.items()},
            tta=tta,
            batch_size=batch_size,
            progress=progress,
        )
        for row in fold_rows:
            record = by_stem[row.patient_id]
            rows.append(
                RawPrediction(
                    record.patient_id,
                    row.model,
                    row.pass_name,
                    record.original_width,
                    record.original_height,
                    Prediction(row.prediction.scores, to_original(record, row.prediction.boxes)),
                    row.probability,
                    fold,
                )
            )
        for record in by_stem.values():
            truth[record.patient_id] = to_original(record, record.boxes)
    return rows, truth, thresholds


def summarize(
    rows: Sequence[RawPrediction], truth: dict[str, np.ndarray], thresholds: dict[int, float]
) -> dict[str, Any]:
    """Each fold's mAP on its patients at its cut-off, their mean and sd, and the pooled OOF mAP with its interval.

    With TTA rows, the plain pass is scored: fusing needs the post-processing that ``lungdet tune`` chooses.
    """
    plain = {row.patient_id: (row.fold, row.prediction) for row in rows if row.pass_name == "plain"}
    per_fold = {}
    pooled: dict[str, Prediction] = {}
    for fold, threshold in thresholds.items():
        patients = [patient for patient, (row_fold, _) in plain.items() if row_fold == fold]
        predictions = {patient: keep_confident(plain[patient][1], min_confidence=threshold) for patient in patients}
        pooled.update(predictions)
        report = score_dataset({patient: truth[patient] for patient in patients}, predictions)
        per_fold[fold] = {"map": report.map, "score_threshold": threshold, "n_images": report.n_images}
    maps = [value["map"] for value in per_fold.values()]
    overall = score_dataset(truth, pooled, bootstrap_draws=BOOTSTRAP_DRAWS)
    return {
        "folds": per_fold,
        "map_mean": float(np.mean(maps)),
        "map_sd": float(np.std(maps, ddof=1)) if len(maps) > 1 else 0.0,
        "oof_map": overall.map,
        "oof_map_interval": overall.map_interval,
        "n_images": overall.n_images,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """:func:`summarize`'s result as ``lungdet cv`` prints it.

    One line per fold (mAP, cut-off, images), their mean and sd, and the pooled out-of-fold mAP with its interval.
    """
    lines = ["fold   mAP      cut-off  images"]
    for fold, values in summary["folds"].items():
        lines.append(f"{fold:<6} {values['map']:.4f}   {values['score_threshold']:<7g}  {values['n_images']}")
    low, high = summary["oof_map_interval"]
    lines += [
        f"mean   {summary['map_mean']:.4f} ± {summary['map_sd']:.4f} (sd over folds)",
        f"pooled out-of-fold mAP {summary['oof_map']:.4f} [{low:.4f}, {high:.4f}] over {summary['n_images']} images, each fold at its own cut-off",
    ]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``lungdet cv``."""
    parser = argparse.ArgumentParser(
        prog="lungdet cv",
        description="Cross-validation: train one run per fold, predict each fold's validation patients with its model "
        "(out-of-fold raw predictions for lungdet tune), and summarize the folds' mAPs.",
        epilog="example: lungdet cv --config fasterrcnn_mobilenet_cpu --data data/coco256 --out runs/cv --tta hflip optim.epochs=6\n"
        "then:    lungdet tune --oof runs/cv/oof.csv --labels runs/cv/oof_labels.csv --out runs/cv/postprocess.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file or a name from configs/, as for lungdet train")
    parser.add_argument(
        "--data", type=Path, required=True, help="output folder of lungdet convert (its folds.csv decides the folds)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for fold{k}/ runs, oof.csv, oof_labels.csv and summary.json"
    )
    parser.add_argument(
        "--folds",
        type=parse_folds,
        default=None,
        help="comma-separated folds to run (default: every fold in the dataset)",
    )
    parser.add_argument(
        "--tta",
        type=tta_argument,
        default="none",
        metavar="PASSES",
        help=f"out-of-fold predictions also with these passes (as lungdet predict's --tta, e.g. {TTA_EXAMPLE}), for tuning the fusion (default none)",
    )
    parser.add_argument(
        "--final",
        action="store_true",
        help=f"after the folds, also train one model on every image for the folds' median best epoch count, with their mean cut-offs, "
        f"into OUT/{FINAL_DIR}/ (so OUT/fold*/best.pt takes it in beside the folds)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=4, help="images per forward pass for the out-of-fold predictions (default 4)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every fold, e.g. optim.epochs=6"
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet cv`` with parsed arguments; returns the exit status (0 on success).

    Every process trains the folds (and, with ``--final``, the final model); rank 0 alone then predicts out of fold and
    writes ``oof.csv``, ``oof_labels.csv`` and ``summary.json``. A fold the dataset lacks is a LungdetError before any
    training.
    """
    available = sorted({record.fold for record in load_records(args.data)})
    folds = args.folds if args.folds is not None else available
    missing = [fold for fold in folds if fold not in available]
    if missing:
        raise LungdetError(f"{args.data} has folds {available}; there is no fold {', '.join(map(str, missing))}")
    job = from_environment()
    base = load_config(args.config, list(args.overrides))  # a bad config or override fails before any training
    device = training_device(base.device, job)
    joined = start(job, device)
    try:
        train_folds(args.config, args.data, args.out, folds, list(args.overrides), progress=not args.no_progress)
        if args.final:
            train_final(args.config, args.data, args.out, folds, list(args.overrides), progress=not args.no_progress)
    finally:
        if joined:
            stop(job)
    if not job.is_main:
        return 0
    rows, truth, thresholds = predict_out_of_fold(
        args.data,
        args.out,
        folds,
        device=device,
        tta=args.tta,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    write_raw_predictions(args.out / OOF_FILE, rows)
    write_text_atomic(args.out / OOF_LABELS_FILE, format_labels_csv(truth))
    summary = summarize(rows, truth, thresholds)
    write_text_atomic(args.out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(
        f"wrote {args.out / OOF_FILE} ({len(rows)} raw rows), {args.out / OOF_LABELS_FILE}, {args.out / SUMMARY_FILE}"
    )
    print(
        f"next: lungdet tune --oof {args.out / OOF_FILE} --labels {args.out / OOF_LABELS_FILE} --out {args.out / 'postprocess.yaml'}"
    )
    return 0
