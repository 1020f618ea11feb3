"""Tests for data_tools/metadata.py: the tags CSV that PNG/JPEG derivatives come with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungdet.data_tools.metadata import ImageTags, parse_spacing, read_metadata_csv
from lungdet.errors import LabelError


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
    assert table.tags["0004cfab-14fd-4e49-80ba-63a80b6bddd6"] == ImageTags(
        age=51, sex="F", view_position="PA", pixel_spacing=None
    )
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
        ("3", "age_unreadable"),
        ("3", "sex_unreadable"),
        ("3", "spacing_unreadable"),
        ("4", "metadata_no_patient"),
        ("5", "metadata_duplicate"),
    ]
    assert "'old' is not a number of years" in table.problems[0]["reason"]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("id,PatientAge\n", "needs a patientId column"),
        ("patientId,Modality\n", "at least one of PatientAge, PatientSex, ViewPosition, PixelSpacing"),
    ],
)
def test_a_csv_without_the_columns_is_refused(header: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "metadata.csv"
    path.write_text(header + "a,b\n")
    with pytest.raises(LabelError, match=message):
        read_metadata_csv(path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match="file not found; --metadata takes a CSV of patientId"):
        read_metadata_csv(tmp_path / "nope.csv")


# --- the tags as an image-level model's input ------------------------------------------------------


def features_named(tags: ImageTags | None) -> list[str]:
    """The names of the features that are on, for readable assertions."""
    from lungdet.data_tools.metadata import METADATA_FEATURES, metadata_features

    values = metadata_features(tags)
    assert values.dtype == np.float32 and values.shape == (len(METADATA_FEATURES),)
    assert set(values.tolist()) <= {0.0, 1.0}
    return [name for name, value in zip(METADATA_FEATURES, values.tolist(), strict=True) if value]


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (ImageTags(age=51, sex="F", view_position="PA"), ["view PA", "sex F", "age 40-59"]),
        (ImageTags(age=17, sex="M", view_position="AP"), ["view AP", "sex M", "age 0-17"]),
        (
            ImageTags(age=18, sex="m", view_position="ap"),
            ["view AP", "sex M", "age 18-39"],
        ),  # hand-written CSVs are not always upper-case
        (ImageTags(age=39), ["view unknown", "sex unknown", "age 18-39"]),
        (
            ImageTags(age=40, view_position="LL"),
            ["view unknown", "sex unknown", "age 40-59"],
        ),  # a lateral is not AP or PA
        (ImageTags(age=59, sex="O"), ["view unknown", "sex unknown", "age 40-59"]),
        (ImageTags(age=60), ["view unknown", "sex unknown", "age 60+"]),
        (ImageTags(age=148), ["view unknown", "sex unknown", "age 60+"]),
        (ImageTags(), ["view unknown", "sex unknown", "age unknown"]),
        (None, ["view unknown", "sex unknown", "age unknown"]),
    ],
)
def test_metadata_features_one_hot_with_unknown_as_its_own_value(tags: ImageTags | None, expected: list[str]) -> None:
    assert features_named(tags) == expected


@pytest.mark.parametrize(
    ("age", "band"),
    [
        (0, "0-17"),
        (17, "0-17"),
        (18, "18-39"),
        (39, "18-39"),
        (40, "40-59"),
        (59, "40-59"),
        (60, "60+"),
        (None, "unknown"),
        (-1, "unknown"),
        (float("nan"), "unknown"),
        (True, "unknown"),
        ("51", "unknown"),
    ],
)
def test_age_band_edges(age: object, band: str) -> None:
    from lungdet.data_tools.metadata import age_band

    assert age_band(age) == band


def test_given_tags_are_laid_over_the_files_and_fill_only_what_they_know() -> None:
    from lungdet.data_tools.metadata import has_any_tag, laid_over

    file_tags = ImageTags(age=51, sex="F", view_position="PA", pixel_spacing=(0.14, 0.14))
    assert laid_over(file_tags, None) == file_tags
    assert laid_over(file_tags, ImageTags(view_position="AP")) == ImageTags(
        age=51, sex="F", view_position="AP", pixel_spacing=(0.14, 0.14)
    )
    assert laid_over(ImageTags(), ImageTags(age=0, sex="M")) == ImageTags(age=0, sex="M")  # age 0 is known, not missing
    assert not has_any_tag(ImageTags()) and not has_any_tag(None) and has_any_tag(ImageTags(age=0))


def test_dicom_tags_of_a_real_rsna_file(rsna_sample_dir: Path) -> None:
    from lungdet.data_tools.dicom_io import read_dicom_metadata
    from lungdet.data_tools.metadata import dicom_tags

    meta = read_dicom_metadata(rsna_sample_dir / "0004cfab-14fd-4e49-80ba-63a80b6bddd6.dcm")
    tags = dicom_tags(meta)
    assert (tags.age, tags.sex, tags.view_position) == (51, "F", "PA")
    assert features_named(tags) == ["view PA", "sex F", "age 40-59"]
