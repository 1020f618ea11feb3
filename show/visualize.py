"""Draw truth and predicted boxes over chest X-rays, one PNG per DICOM plus an HTML index.

Truth boxes (from an RSNA labels CSV) are green, predicted boxes (from a Kaggle submission CSV)
orange with their confidence; a legend on each image names the colours, the patientId and says
that this is not a diagnostic device. Boxes are XYWH_ABS in the DICOM's original pixels and are
scaled with the image when ``--max-size`` shrinks it.

Run::

    lungdet visualize --dicom-dir stage_2_train_images --labels stage_2_train_labels.csv \\
        --submission submission.csv --out overlays --limit 50

then open ``overlays/index.html``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lungdet.atomic import write_bytes_atomic, write_text_atomic
from lungdet.cli_types import fraction, int_in_range
from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.image_io import find_images, read_file_pixels
from lungdet.data_tools.labels import PatientLabels, read_labels
from lungdet.errors import ImageReadError, LungdetError
from lungdet.show.draw import (
    DEFAULT_MAX_SIZE,
    DISCLAIMER,
    FALSE_ALARM_COLOR,
    MATCH_IOU,
    MISSED_COLOR,
    PREDICTION_COLOR,
    TRUTH_COLOR,
    draw_overlay,
    encode_image,
    fit_for_display,
    judge_image,
)
from lungdet.show.pages import render_page
from lungdet.submission.prediction_string import Prediction, keep_confident, read_submission
from lungdet.submission.score import score_image

INDEX_FILE = "index.html"


@dataclass(frozen=True)
class OverlayEntry:
    """One written PNG, as the HTML index lists it. Counts are None when that source was not given."""

    patient_id: str
    png_name: str
    truth_count: int | None
    prediction_count: int | None
    max_confidence: float | None
    score: float | None = None  # the image's RSNA score, when truth and predictions are both given and it is scored
    missed: int = 0  # truth boxes no prediction found at IoU > MATCH_IOU
    false_alarms: int = 0  # predictions that found no truth box at IoU > MATCH_IOU


@dataclass(frozen=True)
class VisualizeSummary:
    """What :func:`write_overlays` wrote and what it skipped (``(path, reason)`` pairs)."""

    entries: list[OverlayEntry]
    skipped: list[tuple[Path, str]]
    index_html: Path


def render_index_html(entries: Sequence[OverlayEntry], skipped: Sequence[tuple[Path, str]]) -> str:
    """An HTML page showing every overlay PNG in a grid with its caption, and the skipped files.

    With truth and predictions, the gallery can be sorted worst first (by RSNA score) and
    filtered to images with misses or with false alarms (a few lines of inline script; the page
    stays one file that opens from disk).
    """
    judged = any(entry.score is not None or entry.missed or entry.false_alarms for entry in entries)
    legend = [(TRUTH_COLOR, "truth"), (PREDICTION_COLOR, "prediction (confidence)")]
    if judged:
        legend = [
            (TRUTH_COLOR, "truth found"),
            (MISSED_COLOR, "truth missed (dashed)"),
            (PREDICTION_COLOR, "correct prediction"),
            (FALSE_ALARM_COLOR, "false alarm (dashed)"),
        ]
    return render_page(
        "overlays.html.j2",
        title="lungdet overlays",
        heading=f"lungdet overlays ({len(entries)} images)",
        disclaimer=DISCLAIMER,
        notice="These pictures show a model's output for research and debugging only; they are not for diagnosis or treatment.",
        dark=True,
        entries=entries,
        judged=judged,
        legend=legend,
        match_iou=MATCH_IOU,
        skipped=skipped,
    )


def write_overlays(
    paths: Sequence[Path],
    out_dir: Path,
    *,
    labels: Mapping[str, PatientLabels] | None,
    predictions: Mapping[str, Prediction] | None,
    max_size: int = DEFAULT_MAX_SIZE,
    min_confidence: float = 0.0,
    progress: bool = False,
) -> VisualizeSummary:
    """Write ``out_dir/{patientId}.png`` for each X-ray (DICOM, PNG or JPEG; patientId = file stem) in ``paths`` and ``out_dir/index.html``.

    ``labels`` and ``predictions`` map patientId to boxes in each image's original pixels (XYWH_ABS);
    None means that source was not given, and a patient missing from a given source is shown
    as 'not given' too. Unreadable files are skipped and returned with the reason.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[OverlayEntry] = []
    skipped: list[tuple[Path, str]] = []
    for path in tqdm(paths, desc="visualize", unit="img", disable=None if progress else True):
        try:
            pixels = read_file_pixels(path)
        except ImageReadError as error:
            skipped.append((Path(path), error.reason))
            tqdm.write(f"skipped {path}: {error.reason}")
            continue
        patient_id = Path(path).stem
        truth = labels[patient_id].boxes if labels is not None and patient_id in labels else None
        prediction = predictions.get(patient_id) if predictions is not None else None
        if prediction is not None:
            prediction = keep_confident(prediction, min_confidence=min_confidence)
        pixels, shown_truth, shown_prediction = fit_for_display(pixels, truth, prediction, max_size=max_size)
        rgb = draw_overlay(pixels, truth=shown_truth, prediction=shown_prediction, title=patient_id)
        png_name = f"{patient_id}.png"
        write_bytes_atomic(out_dir / png_name, encode_image(rgb, ".png", what=f"{path}: the overlay"))
        judged = judge_image(truth, prediction)
        entries.append(
            OverlayEntry(
                patient_id=patient_id,
                png_name=png_name,
                truth_count=None if truth is None else len(truth),
                prediction_count=None if prediction is None else len(prediction.scores),
                max_confidence=float(prediction.scores.max())
                if prediction is not None and len(prediction.scores)
                else None,
                **judged,
            )
        )
    index_html = out_dir / INDEX_FILE
    write_text_atomic(index_html, render_index_html(entries, skipped))
    return VisualizeSummary(entries=entries, skipped=skipped, index_html=index_html)


def worst_first(
    paths: Sequence[Path], truth: Mapping[str, np.ndarray], predictions: Mapping[str, Prediction]
) -> list[Path]:
    """``paths`` ordered by their image's RSNA score, worst first; images with no truth and no box (they cost nothing) last.

    The patientId is the file stem; ties keep patientId order. A gallery drawn in this order
    opens on the model's mistakes.
    """

    def key(path: Path) -> tuple[float, str]:
        patient = Path(path).stem
        prediction = predictions.get(patient, Prediction.empty())
        boxes = truth.get(patient, np.zeros((0, 4)))
        scored = score_image(boxes, prediction)
        return (2.0 if scored is None else scored.score, patient)

    return sorted(paths, key=key)


def select_images(
    paths: Sequence[Path],
    *,
    labels: Mapping[str, PatientLabels] | None,
    predictions: Mapping[str, Prediction] | None,
    only_positive: bool,
    limit: int | None,
) -> list[Path]:
    """``paths`` (in order) kept to those with a truth or predicted box when ``only_positive``, then cut to ``limit``.

    The file stem is the patientId, so this needs no DICOM reads.
    """
    selected = list(paths)
    if only_positive:

        def has_box(patient_id: str) -> bool:
            in_truth = labels is not None and patient_id in labels and len(labels[patient_id].boxes) > 0
            in_prediction = (
                predictions is not None and patient_id in predictions and len(predictions[patient_id].scores) > 0
            )
            return in_truth or in_prediction

        selected = [path for path in selected if has_box(Path(path).stem)]
    return selected[:limit] if limit is not None else selected


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Arguments of ``lungdet visualize``."""
    parser = argparse.ArgumentParser(
        prog="lungdet visualize",
        description="Draw truth (green) and predicted (orange, with confidence) boxes over DICOMs (or PNG/JPEG X-rays): one PNG each plus index.html.",
        epilog=(
            "example: lungdet visualize --dicom-dir data/stage_2_train_images --labels data/stage_2_train_labels.csv "
            "--submission runs/exp1/submission.csv --out runs/exp1/overlays --limit 50 --only-positive"
        ),
        add_help=add_help,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dicom-dir", type=Path, help="folder of .dcm files (searched recursively)")
    source.add_argument(
        "--image-dir", type=Path, help="folder of {patientId}.png|.jpg X-rays (searched recursively), instead of DICOMs"
    )
    parser.add_argument(
        "--labels", type=Path, help="RSNA labels CSV (patientId,x,y,width,height,Target) for the truth boxes"
    )
    parser.add_argument(
        "--submission", type=Path, help="Kaggle submission CSV (patientId,PredictionString) for the predicted boxes"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write {patientId}.png and index.html into")
    parser.add_argument(
        "--limit", type=int_in_range(1), help="draw at most this many images (after --only-positive); default: all"
    )
    parser.add_argument(
        "--only-positive",
        action="store_true",
        help="only images with at least one truth or predicted box (needs --labels or --submission)",
    )
    parser.add_argument(
        "--max-size",
        type=int_in_range(64),
        default=DEFAULT_MAX_SIZE,
        help=f"shrink images so the longer side is at most this many pixels (default: {DEFAULT_MAX_SIZE})",
    )
    parser.add_argument(
        "--min-confidence",
        type=fraction,
        default=0.0,
        help="hide predicted boxes below this confidence, 0..1 (default: 0, show all)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet visualize``; returns the exit status."""
    if args.only_positive and args.labels is None and args.submission is None:
        raise LungdetError(
            "--only-positive needs --labels or --submission to know which images have boxes; add one or drop --only-positive"
        )
    # Read both CSVs before any drawing, so a bad file fails in a second, not after an hour.
    labels = read_labels(args.labels) if args.labels is not None else None
    predictions = read_submission(args.submission) if args.submission is not None else None
    all_paths = find_dicoms(args.dicom_dir) if args.dicom_dir is not None else find_images(args.image_dir)
    kind = "DICOMs" if args.dicom_dir is not None else "images"
    if not all_paths:
        found = (
            "no .dcm files found; pass the folder that holds the DICOMs (e.g. stage_2_train_images/)"
            if args.dicom_dir is not None
            else "no .png or .jpg files found; pass the folder that holds the X-ray images"
        )
        raise LungdetError(f"{args.dicom_dir or args.image_dir}: {found}")
    paths = select_images(
        all_paths, labels=labels, predictions=predictions, only_positive=args.only_positive, limit=args.limit
    )
    summary = write_overlays(
        paths,
        args.out,
        labels=labels,
        predictions=predictions,
        max_size=args.max_size,
        min_confidence=args.min_confidence,
        progress=True,
    )
    print(
        f"wrote {len(summary.entries)} overlay PNGs to {args.out} (of {len(all_paths)} {kind} found, {len(paths)} selected)"
    )
    print(f"  index: {summary.index_html}")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} unreadable file(s):")
        for path, reason in summary.skipped:
            print(f"  {path}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
