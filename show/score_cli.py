"""``lungdet score``: the official RSNA metric on a submission, printed as a table or JSON, and optionally a page.

The numbers come from :mod:`lungdet.submission.score` (the metric, its intervals and slices) and
:mod:`lungdet.submission.detection_metrics` (COCO AP, FROC, image AUC and ECE, printed after the
RSNA lines and under their own JSON keys); the HTML page from :mod:`lungdet.show.score_report`, imported only with ``--html`` since matplotlib
costs a second. This module only reads the files, calls them and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lungdet.cli_types import fraction, int_in_range
from lungdet.data_tools.labels import read_labels
from lungdet.errors import SubmissionError
from lungdet.submission.detection_metrics import DetectionMetrics, score_detection_metrics
from lungdet.submission.prediction_string import read_submission
from lungdet.submission.score import (
    BOOTSTRAP_DRAWS,
    SLICE_KEYS,
    format_report,
    format_slices,
    read_probabilities,
    read_slice_metadata,
    score_dataset,
    score_slices,
)


def get_args_parser() -> argparse.ArgumentParser:
    """The ``lungdet score`` command line; parsing does no work, so tests can call it alone."""
    parser = argparse.ArgumentParser(
        prog="lungdet score",
        description="Score a Kaggle submission.csv against RSNA labels with the official RSNA mAP\n"
        "(IoU thresholds 0.40..0.75), plus mean IoU, sensitivity and specificity; beside it COCO AP@[.50:.95],\n"
        "AP50 and AP40, the FROC, and with --probabilities the image-level AUC and ECE.",
        epilog="example:\n  lungdet score --submission runs/fold0/submission.csv "
        "--labels data/stage_2_train_labels.csv --min-confidence 0.3 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--submission", type=Path, required=True, metavar="PATH", help="submission CSV: patientId,PredictionString"
    )
    parser.add_argument(
        "--labels",
        type=Path,
        required=True,
        metavar="PATH",
        help="RSNA labels CSV (stage_2_train_labels.csv format); every patient in it is scored",
    )
    parser.add_argument(
        "--min-confidence",
        type=fraction,
        default=0.0,
        metavar="FLOAT",
        help="drop predicted boxes with a lower confidence before scoring, in [0, 1] (default: 0, keep all)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int_in_range(0),
        default=BOOTSTRAP_DRAWS,
        metavar="N",
        help=f"draws for the 95%% bootstrap intervals (mAP, COCO AP, FROC, AUC, ECE), resampling patients (default {BOOTSTRAP_DRAWS}; 0 = none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument(
        "--by",
        type=_slice_keys,
        default=[],
        metavar="KEYS",
        help=f"also score slices: a comma-separated list of {', '.join(SLICE_KEYS)} (needs --metadata)",
    )
    parser.add_argument(
        "--metadata",
        type=Path,
        metavar="PATH",
        help="annotations.json from lungdet convert: age, sex and view position per patient",
    )
    parser.add_argument(
        "--html",
        type=Path,
        metavar="PATH",
        help="also write one HTML page of figures: precision per IoU threshold, mAP against the cut-off, the metrics beside "
        "the RSNA mAP with the FROC curve, ROC and reliability (with --probabilities), the slices, the 20 worst images",
    )
    parser.add_argument(
        "--probabilities",
        type=Path,
        metavar="PATH",
        help="patientId,probability from lungdet predict --probabilities, for the image AUC and ECE and the ROC and reliability figures",
    )
    parser.add_argument(
        "--overlays",
        type=Path,
        metavar="DIR",
        help="the folder lungdet visualize wrote, to link the worst images to their pictures",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _slice_keys(text: str) -> list[str]:
    keys = [key.strip() for key in text.split(",") if key.strip()]
    unknown = [key for key in keys if key not in SLICE_KEYS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(SLICE_KEYS)}, got {text!r}")
    return keys


def main(args: argparse.Namespace) -> int:
    """Read the submission and labels, score, print the report; domain errors propagate to ``lungdet``."""
    if args.by and args.metadata is None:
        raise SubmissionError(
            "--by needs --metadata, the annotations.json lungdet convert wrote (it has each patient's age, sex and view position)"
        )
    metadata = read_slice_metadata(args.metadata) if args.by else {}
    probabilities = read_probabilities(args.probabilities) if args.probabilities is not None else None
    predictions = read_submission(args.submission)
    labels = read_labels(args.labels)
    truth = {patient_id: patient.boxes for patient_id, patient in labels.items()}
    report = score_dataset(
        truth, predictions, min_confidence=args.min_confidence, bootstrap_draws=args.bootstrap, seed=args.seed
    )
    metrics = score_detection_metrics(
        truth,
        predictions,
        probabilities=probabilities,
        min_confidence=args.min_confidence,
        bootstrap_draws=args.bootstrap,
        seed=args.seed,
    )
    slices = score_slices(
        truth,
        predictions,
        metadata,
        args.by,
        min_confidence=args.min_confidence,
        bootstrap_draws=args.bootstrap,
        seed=args.seed,
    )
    # Warnings go to stderr so that --json leaves exactly one JSON object on stdout.
    if report.n_unknown_predictions:
        print(
            f"warning: {report.n_unknown_predictions} patient(s) in {args.submission} are not in {args.labels}; "
            "they were not scored. Is this the labels file the images came from?",
            file=sys.stderr,
        )
    if report.n_missing_predictions:
        print(
            f"warning: {report.n_missing_predictions} of {report.n_images} labelled patient(s) have no row in "
            f"{args.submission}; they were scored as 'no boxes'. To score a subset (e.g. one fold), "
            "pass a labels CSV with only those patients.",
            file=sys.stderr,
        )
    if metrics.probabilities is not None and metrics.probabilities.n_images < report.n_images:
        print(
            f"warning: {report.n_images - metrics.probabilities.n_images} of {report.n_images} labelled patient(s) have no row in "
            f"{args.probabilities}; they were left out of the image AUC and ECE.",
            file=sys.stderr,
        )
    if args.html is not None:
        from lungdet.show.score_report import ReportFiles, write_score_report  # matplotlib, only for the page

        write_score_report(
            args.html,
            report=report,
            truth=truth,
            predictions=predictions,
            slices=slices,
            files=ReportFiles(args.submission, args.labels, args.overlays),
            min_confidence=args.min_confidence,
            probabilities=probabilities,
            metrics=metrics,
        )
        print(f"wrote {args.html}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        slices_json = [{"by": item.by, "value": item.value, **item.report.to_dict()} for item in slices]
        # The RSNA metric's keys first: it is the headline.
        print(json.dumps({**report.to_dict(), **metrics.to_dict(), **({"slices": slices_json} if args.by else {})}))
    else:
        print(format_report(report))
        print()
        print(format_detection_metrics(metrics))
        if slices:
            print()
            print(format_slices(slices))
    return 0


def format_detection_metrics(metrics: DetectionMetrics) -> str:
    """The block printed after the RSNA table: COCO AP, FROC and, with probabilities, image AUC and ECE."""

    def show(value: float | None, interval: tuple[float, float] | None, note: str, reason: str | None = None) -> str:
        if value is None:
            return f"n/a   ({reason})" if reason else "n/a"
        shown = f"{value:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")
        return f"{shown:<26} {note}".rstrip()

    coco, froc = metrics.coco, metrics.froc
    lines = [
        "Beside it (95% intervals over patients):",
        f"COCO AP@[.50:.95]  {show(coco.ap, coco.ap_interval, 'IoU >= 0.50..0.95 (COCOeval)', coco.reason)}",
        f"COCO AP50          {show(coco.ap50, coco.ap50_interval, 'IoU >= 0.50', coco.reason)}",
        f"COCO AP40          {show(coco.ap40, coco.ap40_interval, 'IoU >= 0.40 (VinDr-CXR)', coco.reason)}",
        f"FROC score         {show(froc.score, froc.score_interval, f'mean sensitivity at 1/8..8 FP per image, IoU > {froc.iou_threshold:g}', froc.reason)}",
    ]
    if froc.sensitivities is not None:
        lines.append(f"{'  FP per image':<18}" + "".join(f" {rate:>6g}" for rate in froc.fp_rates))
        lines.append(f"{'  sensitivity':<18}" + "".join(f" {value:6.3f}" for value in froc.sensitivities))
    if metrics.probabilities is not None:
        report = metrics.probabilities
        lines.append(
            f"image AUC          {show(report.auc, report.auc_interval, f'{report.n_images} images with a probability', report.auc_reason)}"
        )
        lines.append(
            f"ECE ({report.bins} bins)      {show(report.ece, report.ece_interval, 'probability against share positive')}"
        )
    return "\n".join(lines)
