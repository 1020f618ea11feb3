"""Tests for data_tools/labels.py: the real RSNA label files, and tiny CSVs built per case."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lungdet.data_tools.labels import PatientLabels, read_labels
from lungdet.errors import LabelError

HEADER = "patientId,x,y,width,height,Target\n"
CLASS_HEADER = "patientId,class\n"


def write_csv(folder: Path, name: str, text: str, *, encoding: str = "utf-8") -> Path:
    path = folder / name
    path.write_text(text, encoding=encoding)
    return path


def error_at(path: Path, line: int, problem: str) -> str:
    """Regex for a LabelError naming ``path`` and ``line`` followed by ``problem`` (a regex)."""
    return re.escape(f"{path} line {line}: ") + problem


# --- the real files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_labels(rsna_labels_csv: Path, rsna_class_info_csv: Path) -> dict[str, PatientLabels]:
    return read_labels(rsna_labels_csv, rsna_class_info_csv)


def test_real_labels_counts(real_labels: dict[str, PatientLabels]) -> None:
    assert len(real_labels) == 26_684
    assert sum(labels.target for labels in real_labels.values()) == 6_012
    assert sum(labels.boxes.shape[0] for labels in real_labels.values()) == 9_555
    negatives = [labels for labels in real_labels.values() if labels.target == 0]
    assert len(negatives) == 20_672
    assert all(labels.boxes.shape == (0, 4) for labels in negatives)
    assert all(labels.boxes.shape[0] >= 1 for labels in real_labels.values() if labels.target == 1)


def test_real_class_counts(real_labels: dict[str, PatientLabels]) -> None:
    classes = Counter(labels.class_name for labels in real_labels.values())
    assert classes == {"Lung Opacity": 6_012, "No Lung Opacity / Not Normal": 11_821, "Normal": 8_851}


def test_real_labels_without_class_info(rsna_labels_csv: Path) -> None:
    labels = read_labels(rsna_labels_csv)
    assert len(labels) == 26_684
    assert {patient.class_name for patient in labels.values()} == {None}


def test_real_patient_with_two_boxes_in_file_order(real_labels: dict[str, PatientLabels]) -> None:
    # Lines 6-7 of stage_2_train_labels.csv.
    patient = real_labels["00436515-870c-4b36-a041-de91049b9ab4"]
    assert patient.target == 1
    assert patient.class_name == "Lung Opacity"
    assert patient.boxes.dtype == np.float64
    np.testing.assert_array_equal(patient.boxes, [[264.0, 152.0, 213.0, 379.0], [562.0, 152.0, 256.0, 453.0]])


def test_real_labels_keep_file_order(real_labels: dict[str, PatientLabels]) -> None:
    first = list(real_labels)[:5]
    assert first == [
        "0004cfab-14fd-4e49-80ba-63a80b6bddd6",
        "00313ee0-9eaa-42f4-b0ab-c148ed3241cd",
        "00322d4d-1c29-4943-afc9-b6754be640eb",
        "003d8fa0-6bf1-40ed-b54c-ac657f8495c5",
        "00436515-870c-4b36-a041-de91049b9ab4",
    ]
    assert real_labels["0004cfab-14fd-4e49-80ba-63a80b6bddd6"].class_name == "No Lung Opacity / Not Normal"


# --- tiny files: good input ------------------------------------------------------------------


def test_negative_and_positive_patients(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "labels.csv", HEADER + "neg,,,,,0\npos,10,20,30,40,1\npos,50.5,60,70,80,1\n")
    labels = read_labels(path)
    assert list(labels) == ["neg", "pos"]
    assert labels["neg"].boxes.shape == (0, 4)
    assert labels["neg"].target == 0
    assert labels["pos"].target == 1
    np.testing.assert_array_equal(labels["pos"].boxes, [[10, 20, 30, 40], [50.5, 60, 70, 80]])


def test_byte_order_mark_and_float_target_are_accepted(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "labels.csv", HEADER + "pos,1,2,3,4,1.0\nneg,nan,nan,nan,nan,0\n", encoding="utf-8-sig")
    labels = read_labels(path)
    assert (labels["pos"].target, labels["neg"].target) == (1, 0)
    assert labels["neg"].boxes.shape == (0, 4)


def test_class_info_is_attached(tmp_path: Path) -> None:
    labels_csv = write_csv(tmp_path, "labels.csv", HEADER + "a,,,,,0\nb,,,,,0\nc,1,2,3,4,1\n")
    class_csv = write_csv(
        tmp_path, "classes.csv", CLASS_HEADER + "a,Normal\nb,No Lung Opacity / Not Normal\nc,Lung Opacity\n"
    )
    labels = read_labels(labels_csv, class_csv)
    assert [labels[name].class_name for name in "abc"] == ["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]


def test_missing_column_lists_missing_and_found(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "labels.csv", "patientId,x,y,width,height\nneg,,,,\n")
    with pytest.raises(
        LabelError, match=re.escape(f"{path}: missing column(s) Target; found patientId, x, y, width, height")
    ):
        read_labels(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match=re.escape(f"{tmp_path / 'absent.csv'}: file not found")):
        read_labels(tmp_path / "absent.csv")


@pytest.mark.parametrize(
    ("rows", "line", "problem"),
    [
        (
            "neg,,,,,0\npos,10,20,-5,40,1\n",
            3,
            r"patient pos has width=-5 height=40; box width and height must be positive",
        ),
        ("pos,10,20,30,0,1\n", 2, r"patient pos has width=30 height=0; box width and height must be positive"),
        ("pos,abc,20,30,40,1\n", 2, r"x='abc' is not a number"),
        ("pos,,20,30,40,1\n", 2, r"x='' is not a number"),
        ("pos,10,inf,30,40,1\n", 2, r"y='inf' is not a finite number"),
        ("neg,,,,,0\npos,10,20,30,40,2\n", 3, r"Target='2'; it must be 0"),
        ("pos,10,20,30,40,\n", 2, r"Target=''; it must be 0"),
        ("neg,10,20,30,40,0\n", 2, r"patient neg has Target 0 but a box"),
        ("pos,10,20,30,40,1\npos,,,,,0\n", 3, r"patient pos has Target 0 here but 1 on an earlier row"),
        ("neg,,,,,0\nneg,10,20,30,40,1\n", 3, r"patient neg has Target 1 here but 0 on an earlier row"),
        ("neg,,,,,0\n,,,,,0\n", 3, r"empty patientId"),
    ],
)
def test_bad_label_rows(tmp_path: Path, rows: str, line: int, problem: str) -> None:
    path = write_csv(tmp_path, "labels.csv", HEADER + rows)
    with pytest.raises(LabelError, match=error_at(path, line, problem)):
        read_labels(path)


@pytest.mark.parametrize(
    ("rows", "line", "problem"),
    [
        ("neg,Normal\npos,Normal\n", 3, re.escape("patient pos has class 'Normal' but Target 1 in the labels")),
        (
            "neg,Lung Opacity\npos,Lung Opacity\n",
            2,
            re.escape("patient neg has class 'Lung Opacity' but Target 0 in the labels"),
        ),
        (
            "neg,Pneumonia\n",
            2,
            re.escape("class 'Pneumonia' is not one of Lung Opacity, No Lung Opacity / Not Normal, Normal"),
        ),
    ],
)
def test_bad_class_info(tmp_path: Path, rows: str, line: int, problem: str) -> None:
    labels_csv = write_csv(tmp_path, "labels.csv", HEADER + "neg,,,,,0\npos,1,2,3,4,1\n")
    class_csv = write_csv(tmp_path, "classes.csv", CLASS_HEADER + rows)
    with pytest.raises(LabelError, match=error_at(class_csv, line, problem)):
        read_labels(labels_csv, class_csv)


def test_class_info_missing_column(tmp_path: Path) -> None:
    labels_csv = write_csv(tmp_path, "labels.csv", HEADER + "neg,,,,,0\n")
    class_csv = write_csv(tmp_path, "classes.csv", "patientId,label\nneg,Normal\n")
    with pytest.raises(LabelError, match=re.escape(f"{class_csv}: missing column(s) class; found patientId, label")):
        read_labels(labels_csv, class_csv)


def test_format_labels_csv_reads_back_exactly(tmp_path) -> None:
    import numpy as np

    from lungdet.data_tools.labels import format_labels_csv

    boxes = {"pos": np.array([[264.0, 152.0, 213.0, 379.0], [562.25, 152.5, 256.0, 453.0]]), "neg": np.zeros((0, 4))}
    text = format_labels_csv(boxes)
    assert text.splitlines() == [
        "patientId,x,y,width,height,Target",
        "pos,264.0,152.0,213.0,379.0,1",
        "pos,562.25,152.5,256.0,453.0,1",
        "neg,,,,,0",
    ]
    (tmp_path / "labels.csv").write_text(text)
    read = read_labels(tmp_path / "labels.csv")
    assert np.array_equal(read["pos"].boxes, boxes["pos"]) and read["neg"].boxes.shape == (0, 4)
