"""``lungdet cv``: cross-validation in one command, and the out-of-fold predictions that tuning needs.

Trains one run per fold into ``OUT/fold{k}/`` (as ``lungdet train --fold k``), then lets each
fold's best model predict its own validation patients: ``OUT/oof.csv`` holds their raw
predictions (every box down to the model's floor, in original pixels, with the fold), and
``OUT/oof_labels.csv`` their truth in the RSNA format, so that ``lungdet tune`` needs nothing
else. ``OUT/summary.json`` gives each fold's mAP on its patients at its tuned cut-off, their mean
and standard deviation, and the pooled out-of-fold mAP with its 95% bootstrap interval.

The folds themselves (training, resuming, out-of-fold prediction) are in :mod:`lungdet.detection.folds`.
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

import numpy as np

from lungdet.atomic import write_text_atomic
from lungdet.cli_types import int_in_range
from lungdet.data_tools.labels import format_labels_csv
from lungdet.detection.config import load_config
from lungdet.detection.data import load_records
from lungdet.detection.distributed import from_environment, start, stop
from lungdet.detection.folds import FINAL_DIR, predict_out_of_fold, train_final, train_folds
from lungdet.detection.ray_cluster import add_ray_arguments
from lungdet.detection.train import training_device
from lungdet.detection.tta import TTA_EXAMPLE, tta_argument
from lungdet.errors import LungdetError
from lungdet.submission.prediction_string import Prediction, keep_confident
from lungdet.submission.raw_predictions import RawPrediction, write_raw_predictions
from lungdet.submission.score import BOOTSTRAP_DRAWS, score_dataset

OOF_FILE = "oof.csv"
OOF_LABELS_FILE = "oof_labels.csv"
SUMMARY_FILE = "summary.json"


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
    add_ray_arguments(
        parser, runs="train the folds in parallel, one Ray task each (one GPU each where the cluster has GPUs)"
    )
    parser.add_argument(
        "--ray-fold-cpus",
        type=int_in_range(1),
        default=1,
        help="with --ray: CPUs each fold's task takes, and torch's threads in it (default 1)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every fold, e.g. optim.epochs=6"
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet cv`` with parsed arguments; returns the exit status (0 on success).

    Every process trains the folds (and, with ``--final``, the final model); rank 0 alone then predicts out of fold and
    writes ``oof.csv``, ``oof_labels.csv`` and ``summary.json``. With ``--ray`` the folds train and predict in Ray
    tasks instead. A fold the dataset lacks is a LungdetError before any training.
    """
    available = sorted({record.fold for record in load_records(args.data)})
    folds = args.folds if args.folds is not None else available
    missing = [fold for fold in folds if fold not in available]
    if missing:
        raise LungdetError(f"{args.data} has folds {available}; there is no fold {', '.join(map(str, missing))}")
    job = from_environment()
    base = load_config(args.config, list(args.overrides))  # a bad config or override fails before any training
    if args.ray is not None:
        if job.enabled:
            raise LungdetError("--ray runs each fold in a Ray task; run it without torchrun")
        rows, truth, thresholds = _cv_on_ray(args, folds)
    else:
        if args.verbose or args.ray_fold_cpus != 1:
            raise LungdetError("--ray-fold-cpus and --verbose set how --ray runs; give --ray too")
        rows, truth, thresholds = _cv_here(args, folds, base.device, job)
        if not job.is_main:
            return 0
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


def _cv_here(
    args: argparse.Namespace, folds: Sequence[int], device_name: str, job: Any
) -> tuple[list[RawPrediction], dict[str, np.ndarray], dict[int, float]]:
    """The folds one after the other in this process tree (every torchrun process trains; rank 0 predicts)."""
    device = training_device(device_name, job)
    joined = start(job, device)
    try:
        train_folds(args.config, args.data, args.out, folds, list(args.overrides), progress=not args.no_progress)
        if args.final:
            train_final(args.config, args.data, args.out, folds, list(args.overrides), progress=not args.no_progress)
    finally:
        if joined:
            stop(job)
    if not job.is_main:
        return [], {}, {}
    return predict_out_of_fold(
        args.data,
        args.out,
        folds,
        device=device,
        tta=args.tta,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )


def _cv_on_ray(
    args: argparse.Namespace, folds: Sequence[int]
) -> tuple[list[RawPrediction], dict[str, np.ndarray], dict[int, float]]:
    """``--ray``: the folds in parallel on a Ray cluster (Ray only when asked for)."""
    from lungdet.detection.ray_cv import RayFolds, train_folds_on_ray

    run = RayFolds(
        address=args.ray or None,
        cpus_per_fold=args.ray_fold_cpus,
        tta=args.tta,
        batch_size=args.batch_size,
        verbose=args.verbose,
        progress=not args.no_progress,
    )
    return train_folds_on_ray(run, args.config, args.data, args.out, folds, list(args.overrides), final=args.final)
