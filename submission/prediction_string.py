"""The Kaggle RSNA submission format: PredictionString and submission CSV.

A submission is a CSV with the header ``patientId,PredictionString`` and one row per patient.
The PredictionString holds space-separated groups ``confidence x y width height``: XYWH_ABS
boxes (``x, y`` the top-left corner) in the DICOM's original pixels, one group per box, and is
empty when the patient has no box::

    patientId,PredictionString
    0004cfab-14fd-4e49-80ba-63a80b6bddd6,
    00436515-870c-4b36-a041-de91049b9ab4,0.9731 264.0 152.0 213.0 379.0 0.4102 562.0 152.0 256.0 453.0

``write_submission`` writes such a file (``lungdet predict`` calls it) and ``read_submission``
reads it back with errors naming the line, patient and token (``lungdet score`` calls it).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lungdet.atomic import atomic_open
from lungdet.boxes import as_box_array
from lungdet.errors import SubmissionError

SUBMISSION_COLUMNS = ("patientId", "PredictionString")
TOKENS_PER_BOX = 5  # confidence x y width height
# 4 decimals keep the ranking of a model's boxes within one image and the granularity of
# --min-confidence; more digits only make the file longer.
CONFIDENCE_DECIMALS = 4
# RSNA truth boxes are whole pixels of a 1024x1024 image. Rounding to 0.1 px moves x, y, width
# and height by at most 0.05 px each, which changes the IoU of a 100 px box by a few thousandths
# at most, far below the metric's 0.05 threshold steps; more digits only make the file longer.
COORDINATE_DECIMALS = 1


class Prediction(NamedTuple):
    """The boxes predicted for one image.

    ``scores`` is float64 ``[N]``, one confidence in [0, 1] per box; ``boxes`` is float64
    ``[N, 4]`` XYWH_ABS in the DICOM's original pixels. ``N`` is 0 when nothing was found.
    Build one with :meth:`from_arrays` (which checks the shapes) or :meth:`empty`.
    """

    scores: np.ndarray
    boxes: np.ndarray

    @classmethod
    def from_arrays(cls, scores: object, boxes: object) -> Prediction:
        """Coerce ``scores`` ``[N]`` and XYWH_ABS ``boxes`` ``[N, 4]`` to float64.

        Raises ``ValueError`` if the shapes disagree (a programming error, not a file problem).
        """
        score_array = np.asarray(scores, dtype=np.float64).reshape(-1)
        box_array = as_box_array(boxes)
        if score_array.shape[0] != box_array.shape[0]:
            raise ValueError(f"got {score_array.shape[0]} scores for {box_array.shape[0]} boxes; they must be paired")
        return cls(score_array, box_array)

    @classmethod
    def empty(cls) -> Prediction:
        """A prediction with no boxes (the image is called negative)."""
        return cls(np.zeros(0, dtype=np.float64), np.zeros((0, 4), dtype=np.float64))


def _location(where: str) -> str:
    return f"{where}: " if where else ""


def keep_confident(prediction: Prediction, *, min_confidence: float) -> Prediction:
    """The boxes of ``prediction`` whose confidence is at least ``min_confidence`` (a box exactly at it is kept)."""
    keep = prediction.scores >= min_confidence
    return Prediction(prediction.scores[keep], prediction.boxes[keep])


def check_prediction(prediction: Prediction, *, where: str = "") -> None:
    """Raise ``SubmissionError`` unless every confidence is in [0, 1] and every box is finite with width, height >= 0.

    Kaggle accepted any float as a confidence, since the metric uses only their order. lungdet
    asks for probabilities so that ``--min-confidence`` means the same for every submission and
    a model that writes raw logits is caught. Zero-sized boxes are allowed (they score IoU 0);
    negative ``x, y`` are allowed (a box may start off the image). ``where`` (e.g.
    ``"submission.csv line 7 (patientId abc)"``) starts the message.
    """
    for index, (score, box) in enumerate(zip(prediction.scores.tolist(), prediction.boxes.tolist(), strict=True)):
        box_name = f"{_location(where)}PredictionString box {index + 1}"
        values = [score, *box]
        if not all(math.isfinite(value) for value in values):
            raise SubmissionError(
                f"{box_name} has a non-finite value {values}; write finite numbers "
                "(a NaN here usually means the model diverged)"
            )
        if not 0.0 <= score <= 1.0:
            raise SubmissionError(
                f"{box_name} has confidence {score}, outside [0, 1]; write probabilities "
                "(apply a sigmoid or softmax to raw logits)"
            )
        if box[2] < 0 or box[3] < 0:
            raise SubmissionError(
                f"{box_name} has width {box[2]} and height {box[3]}; they must be >= 0. "
                "The format is 'confidence x y width height' with x, y the top-left corner, "
                "not 'x1 y1 x2 y2'"
            )


def format_prediction_string(prediction: Prediction, *, decimals: int = COORDINATE_DECIMALS, where: str = "") -> str:
    """Format one image's XYWH_ABS boxes (original pixels) as a PredictionString.

    Groups come in descending confidence, ties in their original order, so the file shows the
    order in which the metric matches them. Confidences get :data:`CONFIDENCE_DECIMALS`
    decimals, coordinates ``decimals``. No boxes gives ``""``. Raises ``SubmissionError`` (see
    :func:`check_prediction`) rather than write what :func:`parse_prediction_string` would reject.
    """
    check_prediction(prediction, where=where)
    # Sorting before rounding also keeps the order of confidences that round to the same value:
    # the metric's stable sort then keeps them in file order, which is this order.
    order = np.argsort(-prediction.scores, kind="stable")
    groups = [
        f"{prediction.scores[index]:.{CONFIDENCE_DECIMALS}f} "
        + " ".join(f"{value:.{decimals}f}" for value in prediction.boxes[index])
        for index in order
    ]
    return " ".join(groups)


def parse_prediction_string(text: str | float | None, *, where: str = "") -> Prediction:
    """Parse a PredictionString into a :class:`Prediction` (XYWH_ABS, original pixels), in the string's order.

    Empty or whitespace-only text, ``None`` and pandas' NaN for an empty cell all mean no boxes.

    Raises
    ------
    SubmissionError
        The token count is not a multiple of 5, a token is not a number, or a value fails
        :func:`check_prediction`. The message starts with ``where``.
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return Prediction.empty()
    tokens = str(text).split()
    if len(tokens) % TOKENS_PER_BOX:
        raise SubmissionError(
            f"{_location(where)}PredictionString has {len(tokens)} tokens, not a multiple of {TOKENS_PER_BOX}; "
            "each box is 'confidence x y width height', separated by spaces"
        )
    values: list[float] = []
    for index, token in enumerate(tokens):
        try:
            values.append(float(token))
        except ValueError:
            raise SubmissionError(
                f"{_location(where)}PredictionString token {index + 1} ({token!r}, in box {index // TOKENS_PER_BOX + 1}) "
                "is not a number; write plain decimals separated by spaces (no commas or brackets)"
            ) from None
    groups = np.array(values, dtype=np.float64).reshape(-1, TOKENS_PER_BOX)
    prediction = Prediction.from_arrays(groups[:, 0], groups[:, 1:])
    check_prediction(prediction, where=where)
    return prediction


def write_submission(path: Path, predictions: Mapping[str, Prediction]) -> None:
    """Write a Kaggle submission CSV atomically: one row per patient, in ``predictions``' order.

    Boxes are XYWH_ABS in original pixels. Pass patients in a fixed (e.g. sorted) order so that
    two runs give identical files. Patients with no boxes get an empty PredictionString: Kaggle
    expects a row for every test image.
    """
    with atomic_open(Path(path), "w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(SUBMISSION_COLUMNS)
        for patient_id, prediction in predictions.items():
            writer.writerow([patient_id, format_prediction_string(prediction, where=f"patientId {patient_id}")])


def read_submission(path: Path) -> dict[str, Prediction]:
    """Read a Kaggle submission CSV into ``{patientId: Prediction}`` (XYWH_ABS, original pixels), in file order.

    Blank lines are skipped. Line numbers in messages count the header as line 1, as an editor does.

    Raises
    ------
    SubmissionError
        The file is missing or empty, the header is not exactly ``patientId,PredictionString``,
        a row has the wrong number of fields or no patientId, a PredictionString is malformed
        (see :func:`parse_prediction_string`), or a patientId appears twice.
    """
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(
            f"{path}: file not found; check the --submission path (lungdet predict writes submission.csv)"
        )
    predictions: dict[str, Prediction] = {}
    first_line: dict[str, int] = {}
    # utf-8-sig: a spreadsheet that saved the file may have put a byte-order mark before the header.
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None:
            raise SubmissionError(f"{path}: the file is empty; expected the header {','.join(SUBMISSION_COLUMNS)}")
        if tuple(header) != SUBMISSION_COLUMNS:
            raise SubmissionError(
                f"{path}: header has columns {header}, expected exactly {list(SUBMISSION_COLUMNS)}; "
                f"make the first line '{','.join(SUBMISSION_COLUMNS)}'"
            )
        for row in reader:
            if not row:
                continue
            line = reader.line_num
            if len(row) != len(SUBMISSION_COLUMNS):
                raise SubmissionError(
                    f"{path} line {line}: {len(row)} fields, expected {len(SUBMISSION_COLUMNS)} "
                    f"({','.join(SUBMISSION_COLUMNS)}); "
                    "separate boxes inside the PredictionString with spaces, not commas"
                )
            patient_id, text = row[0].strip(), row[1]
            if not patient_id:
                raise SubmissionError(f"{path} line {line}: empty patientId; every row needs the image's patientId")
            if patient_id in first_line:
                raise SubmissionError(
                    f"{path} line {line}: patientId {patient_id} also appears on line {first_line[patient_id]}; "
                    "Kaggle allows one row per patient: put all of its boxes in one PredictionString"
                )
            first_line[patient_id] = line
            predictions[patient_id] = parse_prediction_string(
                text, where=f"{path} line {line} (patientId {patient_id})"
            )
    return predictions
