"""Tests for detection/pretrain_data.py: finding radiographs, NIH's finding labels and pairing them with the files."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from lungdet.detection.pretrain_data import find_radiographs, pair_with_labels, read_finding_labels
from lungdet.errors import LabelError


def test_find_radiographs_takes_pictures_and_dicoms_at_any_depth(tmp_path: Path) -> None:
    for name in ("a.png", "deep/er/b.JPG", "c.jpeg", "d/e.dcm", "notes.txt", "f.dcm.bak"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [path.relative_to(tmp_path).as_posix() for path in find_radiographs(tmp_path)] == [
        "a.png",
        "c.jpeg",
        "d/e.dcm",
        "deep/er/b.JPG",
    ]


def test_nih_findings_become_label_vectors(tmp_path: Path, nih_header: str) -> None:
    csv_path = tmp_path / "Data_Entry_2017.csv"
    csv_path.write_text(
        nih_header
        + "00000001_000.png,Cardiomegaly|Emphysema,0,1,58,M,PA\n"
        + "00000002_000.png,No Finding,0,2,81,F,PA\n"
        + "00000003_000.png,Effusion,1,3,74,F,AP\n"
    )
    labels = read_finding_labels(csv_path)
    assert labels.names == (
        "Cardiomegaly",
        "Effusion",
        "Emphysema",
    )  # the union of findings, sorted; No Finding is none of them
    assert {name: vector.tolist() for name, vector in labels.by_file.items()} == {
        "00000001_000.png": [1.0, 0.0, 1.0],
        "00000002_000.png": [0.0, 0.0, 0.0],
        "00000003_000.png": [0.0, 1.0, 0.0],
    }


def test_a_csv_without_the_findings_column_is_a_label_error_naming_the_fix(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("Image Index,Labels\n00000001_000.png,Effusion\n")
    with pytest.raises(
        LabelError,
        match=re.escape(
            f"{csv_path}: no 'Finding Labels' column (it has: Image Index, Labels); pass NIH's Data_Entry_2017.csv"
        ),
    ):
        read_finding_labels(csv_path)


def test_rows_without_a_file_and_files_without_a_row_are_counted(
    tmp_path: Path, make_nih_pngs: Callable[..., list[Path]], nih_header: str
) -> None:
    paths = make_nih_pngs(tmp_path / "images", 3)
    csv_path = tmp_path / "Data_Entry_2017.csv"
    csv_path.write_text(
        nih_header
        + "00000001_000.png,Mass,0,1,1,M,PA\n00000002_000.png,No Finding,0,2,1,M,PA\n00000077_000.png,Mass,0,7,1,M,PA\n"
    )
    kept, targets, missing_rows, unlabelled = pair_with_labels(paths, read_finding_labels(csv_path))
    assert [path.name for path in kept] == ["00000001_000.png", "00000002_000.png"]
    assert targets.tolist() == [[1.0], [0.0]]
    assert (missing_rows, unlabelled) == (1, 1)
