"""Raw predictions: every box of every pass of every model, before any cut-off, for tuning and ensembling.

A submission keeps one merged, thresholded set of boxes per patient; tuning the post-processing
and fusing models need what came before that. One CSV row is one model's one pass over one
image (``plain``, ``hflip``, or ``scale0.8``: see :mod:`lungdet.detection.tta`)::

    patientId,model,pass,fold,width,height,probability,PredictionString
    0004cfab-14fd-4e49-80ba-63a80b6bddd6,fold0,plain,0,1024,1024,0.0312,0.0841 511.2 300.0 200.5 310.0

``fold`` is the fold whose validation set the patient was in (out-of-fold predictions from
``lungdet cv``; empty otherwise), ``width``/``height`` the image's original size in pixels
(boxes are fused in fractions of it), ``probability`` the image-level probability of a model
with an image head (empty without one). PredictionString is the Kaggle format: XYWH_ABS in
original pixels, every box the model gave down to its own floor (``box_score_thresh``).

``lungdet predict --raw`` and ``lungdet cv`` write these files; ``lungdet tune`` reads them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lungdet.atomic import atomic_open
from lungdet.errors import SubmissionError
from lungdet.submission.prediction_string import Prediction, format_prediction_string, parse_prediction_string

RAW_COLUMNS = ("patientId", "model", "pass", "fold", "width", "height", "probability", "PredictionString")
PLAIN_PASS = "plain"
# Passes are 'plain', 'hflip' (mirrored) and 'scaleS' (the input at S times the model's size; see lungdet.detection.tta).
PASSES = (PLAIN_PASS, "hflip")
SCALE_PREFIX = "scale"


def format_scale_pass(factor: float) -> str:
    """The pass name of an input-size factor: 0.8 -> 'scale0.8', 1.25 -> 'scale1.25'."""
    return f"{SCALE_PREFIX}{factor:g}"


def is_pass_name(name: str) -> bool:
    """Whether ``name`` is a pass lungdet writes: plain, hflip, or scale followed by a positive number."""
    if name in PASSES:
        return True
    if not name.startswith(SCALE_PREFIX):
        return False
    try:
        factor = float(name[len(SCALE_PREFIX) :])
    except ValueError:
        return False
    return math.isfinite(factor) and factor > 0 and format_scale_pass(factor) == name


# Raw boxes keep 4 decimals of confidence like a submission, but 2 of position: tuning shrinks
# and fuses them, and rounding twice should not move a box by a tenth of a pixel.
RAW_COORDINATE_DECIMALS = 2
PROBABILITY_DECIMALS = 6


@dataclass(frozen=True)
class RawPrediction:
    """One model's one pass over one image: ``prediction`` is XYWH_ABS in the image's original ``width`` x ``height`` pixels."""

    patient_id: str
    model: str
    pass_name: str
    width: int
    height: int
    prediction: Prediction
    probability: float | None = None
    fold: int | None = None


def write_raw_predictions(path: Path, rows: Iterable[RawPrediction]) -> int:
    """Write ``rows`` to a raw-predictions CSV atomically, in the order given; returns the number of rows."""
    count = 0
    with atomic_open(Path(path), "w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(RAW_COLUMNS)
        for row in rows:
            where = f"patientId {row.patient_id} ({row.model}, {row.pass_name})"
            writer.writerow(
                [
                    row.patient_id,
                    row.model,
                    row.pass_name,
                    "" if row.fold is None else row.fold,
                    row.width,
                    row.height,
                    "" if row.probability is None else f"{row.probability:.{PROBABILITY_DECIMALS}f}",
                    format_prediction_string(row.prediction, decimals=RAW_COORDINATE_DECIMALS, where=where),
                ]
            )
            count += 1
    return count


def _positive_int(text: str, *, column: str, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SubmissionError(
            f"{where}: {column} {text!r} is not a whole number; it is the image's original size in pixels"
        ) from None
    if value <= 0:
        raise SubmissionError(f"{where}: {column} is {value}; an image's size in pixels must be positive")
    return value


def read_raw_predictions(path: Path) -> list[RawPrediction]:
    """Read a raw-predictions CSV (see the module docstring), in file order.

    Raises
    ------
    SubmissionError
        The file is missing, its header differs, a row has the wrong number of fields, an
        unknown pass, a bad size, fold or probability, a malformed PredictionString, or the same
        (patientId, model, pass) twice. Messages name the line.
    """
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: file not found; lungdet predict --raw and lungdet cv write raw predictions")
    rows: list[RawPrediction] = []
    seen: dict[tuple[str, str, str], int] = {}
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None or tuple(header) != RAW_COLUMNS:
            raise SubmissionError(
                f"{path}: header is {header}, expected {list(RAW_COLUMNS)}; is it a submission? Tuning needs raw predictions "
                "(lungdet predict --raw, or lungdet cv's oof.csv)"
            )
        for fields in reader:
            if not fields:
                continue
            where = f"{path} line {reader.line_num}"
            if len(fields) != len(RAW_COLUMNS):
                raise SubmissionError(
                    f"{where}: {len(fields)} fields, expected {len(RAW_COLUMNS)} ({','.join(RAW_COLUMNS)})"
                )
            patient_id, model, pass_name, fold, width, height, probability, text = fields
            if not is_pass_name(pass_name):
                raise SubmissionError(
                    f"{where}: pass {pass_name!r} is not one of {', '.join(PASSES)} or scaleS (e.g. scale0.8)"
                )
            key = (patient_id, model, pass_name)
            if key in seen:
                raise SubmissionError(
                    f"{where}: patientId {patient_id}, model {model}, pass {pass_name} also appears on line {seen[key]}"
                )
            seen[key] = reader.line_num
            rows.append(
                RawPrediction(
                    patient_id=patient_id,
                    model=model,
                    pass_name=pass_name,
                    width=_positive_int(width, column="width", where=where),
                    height=_positive_int(height, column="height", where=where),
                    prediction=parse_prediction_string(text, where=f"{where} (patientId {patient_id})"),
                    probability=_probability(probability, where=where),
                    fold=None if fold == "" else _fold(fold, where=where),
                )
            )
    return rows


def _probability(text: str, *, where: str) -> float | None:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise SubmissionError(
            f"{where}: probability {text!r} is not a number; leave it empty when the model has no image head"
        ) from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise SubmissionError(f"{where}: probability {value} is outside [0, 1]")
    return value


def _fold(text: str, *, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SubmissionError(
            f"{where}: fold {text!r} is not a whole number; leave it empty outside cross-validation"
        ) from None
    if value < 0:
        raise SubmissionError(f"{where}: fold {value} is negative")
    return value


def group_by_patient(rows: Sequence[RawPrediction]) -> dict[str, list[RawPrediction]]:
    """``{patientId: its rows}``, patients and rows in file order; every row of a patient must give the same image size."""
    groups: dict[str, list[RawPrediction]] = {}
    for row in rows:
        group = groups.setdefault(row.patient_id, [])
        if group and (group[0].width, group[0].height) != (row.width, row.height):
            raise SubmissionError(
                f"patientId {row.patient_id}: model {row.model} saw a {row.width} x {row.height} image but model {group[0].model} "
                f"a {group[0].width} x {group[0].height} one; raw predictions of one image must come from the same file"
            )
        group.append(row)
    return groups
