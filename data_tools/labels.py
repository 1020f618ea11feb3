"""Read the RSNA label files into per-patient box lists.

``stage_2_train_labels.csv`` has one row per box (``patientId,x,y,width,height,Target``; a
patient with two opacities has two rows) and one row with empty coordinates and ``Target`` 0
per negative patient. ``stage_2_detailed_class_info.csv`` (``patientId,class``) adds the
three-way class: ``Lung Opacity``, ``No Lung Opacity / Not Normal`` or ``Normal``.

Boxes come out in lungdet's internal format, XYWH_ABS in the DICOM's original pixels.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungdet.errors import LabelError

LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_INFO_COLUMNS = ("patientId", "class")
POSITIVE_CLASS = "Lung Opacity"
NOT_NORMAL_CLASS = "No Lung Opacity / Not Normal"
NORMAL_CLASS = "Normal"
KNOWN_CLASSES = (POSITIVE_CLASS, NOT_NORMAL_CLASS, NORMAL_CLASS)
# Shared by every negative patient (77% of RSNA): one read-only array instead of 20,000 empty ones.
NO_BOXES = np.zeros((0, 4), dtype=np.float64)
NO_BOXES.flags.writeable = False


@dataclass(frozen=True, slots=True)
class PatientLabels:
    """Truth for one image. ``boxes`` is float64 ``[N, 4]`` XYWH_ABS, original pixels; ``N`` is 0 for negatives."""

    patient_id: str
    boxes: np.ndarray
    target: int
    class_name: str | None = None


def _read_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line_number, row)`` from a CSV after checking its header has ``required`` columns."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: file not found; pass the RSNA CSV (e.g. stage_2_train_labels.csv)")
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        header = reader.fieldnames or []
        missing = [column for column in required if column not in header]
        if missing:
            raise LabelError(
                f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header) or 'no header'}. "
                f"Expected the RSNA header {','.join(required)}"
            )
        for row in reader:
            # Line 1 is the header, so the first data row is line 2: the number an editor shows.
            yield reader.line_num, row


def _parse_float(text: str, *, path: Path, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LabelError(f"{path} line {line}: {column}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise LabelError(f"{path} line {line}: {column}={text!r} is not a finite number")
    return value


def _parse_target(text: str, *, path: Path, line: int) -> int:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (0.0, 1.0):
        raise LabelError(f"{path} line {line}: Target={text!r}; it must be 0 (no opacity) or 1 (one row per box)")
    return int(value)


def _parse_box(row: dict[str, str], *, path: Path, line: int) -> list[float]:
    box = [
        _parse_float(row[column] or "", path=path, line=line, column=column) for column in ("x", "y", "width", "height")
    ]
    if box[2] <= 0 or box[3] <= 0:
        raise LabelError(
            f"{path} line {line}: patient {row['patientId']} has width={row['width']} height={row['height']}; "
            "box width and height must be positive (x, y is the top-left corner)"
        )
    return box


def read_labels(labels_csv: Path, class_info_csv: Path | None = None) -> dict[str, PatientLabels]:
    """Read RSNA labels (and optionally class info) into ``{patientId: PatientLabels}``, in file order.

    Raises
    ------
    LabelError
        A column is missing, a Target is not 0/1, a positive row has a missing or non-positive
        size, a negative row has coordinates, a patient is both positive and negative, or the
        class info disagrees with Target. The message names the file and line.
    """
    labels_csv = Path(labels_csv)
    boxes: dict[str, list[list[float]]] = {}
    targets: dict[str, int] = {}
    for line, row in _read_rows(labels_csv, LABEL_COLUMNS):
        patient_id = (row["patientId"] or "").strip()
        if not patient_id:
            raise LabelError(f"{labels_csv} line {line}: empty patientId")
        target = _parse_target((row["Target"] or "").strip(), path=labels_csv, line=line)
        if patient_id in targets and targets[patient_id] != target:
            raise LabelError(
                f"{labels_csv} line {line}: patient {patient_id} has Target {target} here but {targets[patient_id]} "
                "on an earlier row; a patient is either positive (box rows) or negative (one empty row)"
            )
        targets[patient_id] = target
        patient_boxes = boxes.setdefault(patient_id, [])
        if target == 1:
            patient_boxes.append(_parse_box(row, path=labels_csv, line=line))
        elif any((row[column] or "").strip() not in ("", "nan", "NaN") for column in ("x", "y", "width", "height")):
            raise LabelError(
                f"{labels_csv} line {line}: patient {patient_id} has Target 0 but a box; a negative row has empty x,y,width,height"
            )

    classes = _read_class_info(Path(class_info_csv), targets) if class_info_csv is not None else {}
    return {
        patient_id: PatientLabels(
            patient_id=patient_id,
            boxes=np.array(patient_boxes, dtype=np.float64).reshape(-1, 4) if patient_boxes else NO_BOXES,
            target=targets[patient_id],
            class_name=classes.get(patient_id),
        )
        for patient_id, patient_boxes in boxes.items()
    }


def _read_class_info(path: Path, targets: dict[str, int]) -> dict[str, str]:
    classes: dict[str, str] = {}
    for line, row in _read_rows(path, CLASS_INFO_COLUMNS):
        patient_id, class_name = (row["patientId"] or "").strip(), (row["class"] or "").strip()
        if class_name not in KNOWN_CLASSES:
            raise LabelError(f"{path} line {line}: class {class_name!r} is not one of {', '.join(KNOWN_CLASSES)}")
        if patient_id in targets and (class_name == POSITIVE_CLASS) != (targets[patient_id] == 1):
            raise LabelError(
                f"{path} line {line}: patient {patient_id} has class {class_name!r} but Target {targets[patient_id]} in the labels; "
                f"Target is 1 exactly when the class is {POSITIVE_CLASS!r}. Are the two files from the same release?"
            )
        classes[patient_id] = class_name
    return classes


def format_labels_csv(boxes_by_patient: Mapping[str, np.ndarray]) -> str:
    """``stage_2_train_labels.csv`` text: one row per XYWH_ABS box, one empty-box row per patient without one.

    Coordinates are written as Python floats ('264.0'), as the real file writes them, so
    :func:`read_labels` reads back exactly the boxes given.
    """
    lines = ["patientId,x,y,width,height,Target"]
    for patient_id, boxes in boxes_by_patient.items():
        if len(boxes) == 0:
            lines.append(f"{patient_id},,,,,0")
        for box in boxes:
            lines.append(",".join([patient_id, *(repr(float(value)) for value in box), "1"]))
    return "\n".join(lines) + "\n"
