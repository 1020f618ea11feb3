"""Tests for data_tools/metadata.py: the tags CSV that PNG/JPEG derivatives come with."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungdet.errors import LabelError
from lungdet.data_tools.metadata import ImageTags, parse_spacing, read_metadata_csv


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.139\\0.14", (0.139, 0.14)),
        ("0.139,0.14", (0.139, 0.14)),
        ("[0.139, 0.14]", (0.139, 0.14)),
        ("0.168", (0.168, 0.168)),
        ("abc", None),
        ("0.1\\0.1\\0.1", None),
        ("-0.1", None),
        ("nan", None),
    ],
)
def test_parse_spacing(text: str, expected) -> None:
    assert parse_spacing(text) == expected


def test_real_metadata_csv_reads_every_row(rsna_real_dir: Path) -> None:
    table = read_metadata_csv(rsna_real_dir / "metadata.csv")
    assert len(table.tags) == 1000 and table.problems == []
    assert table.columns == ("PatientAge", "PatientSex", "ViewPosition")
    assert table.tags["0004cfab-14fd-4e49-80ba-63a80b6bddd6"] == ImageTags(age=51, sex="F", view_position="PA", pixel_spacing=None)
    assert sum(tags.view_position == "AP" for tags in table.tags.values()) == 500


def test_unreadable_values_are_left_empty_and_named_by_line(tmp_path: Path) -> None:
    path = tmp_path / "metadata.csv"
    path.write_text(
        "patientId,PatientAge,PatientSex,ViewPosition,PixelSpacing\n"
        "a,051Y,m,pa,0.14\\0.14\n"
        "b,old,X,AP,wide\n"
        ",40,F,PA,\n"
        "a,60,F,AP,\n"
        "c,,,,\n"
    )
    table = read_metadata_csv(path)
    assert table.tags["a"] == ImageTags(age=51, sex="M", view_position="PA", pixel_spacing=(0.14, 0.14))
    assert table.tags["b"] == ImageTags(age=None, sex="", view_position="AP", pixel_spacing=None)
    assert table.tags["c"] == ImageTags()
    assert [(problem["file"].rsplit(" ", 1)[-1], problem["kind"]) for problem in table.problems] == [
        ("3", "age_unreadable"), ("3", "sex_unreadable"), ("3", "spacing_unreadable"), ("4", "metadata_no_patient"), ("5", "metadata_duplicate"),
    ]
    assert "'old' is not a number of years" in table.problems[0]["reason"]


@pytest.mark.parametrize(
    ("header", "message"),
    [("id,PatientAge\n", "needs a patientId column"), ("patientId,Modality\n", "at least one of PatientAge, PatientSex, ViewPosition, PixelSpacing")],
)
def test_a_csv_without_the_columns_is_refused(header: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "metadata.csv"
    path.write_text(header + "a,b\n")
    with pytest.raises(LabelError, match=message):
        read_metadata_csv(path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match="file not found; --metadata takes a CSV of patientId"):
        read_metadata_csv(tmp_path / "nope.csv")
