"""Tests for data_tools/gate.py: real chest films pass; CT, MR, a lateral view and other body parts are refused with the tag that says so."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from lungdet.data_tools.dicom_io import read_dicom_metadata
from lungdet.data_tools.dicom_meta import DicomMeta
from lungdet.data_tools.gate import not_frontal_chest


def test_the_real_chest_films_pass(rsna_sample_dir: Path, siim_dicom: Path, siim_monochrome1_dicom: Path) -> None:
    files = [*sorted(rsna_sample_dir.glob("*.dcm")), siim_dicom, siim_monochrome1_dicom]
    assert len(files) == 15
    for path in files:
        meta = read_dicom_metadata(path)
        assert (meta.modality, meta.body_part_examined) == ("CR", "CHEST") and meta.view_position in ("AP", "PA")
        assert not_frontal_chest(meta) is None, path


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("CT_small.dcm", "Modality CT (lungdet's models were made for CR, DX or DR chest radiographs)"),
        ("MR_small.dcm", "Modality MR (lungdet's models were made for CR, DX or DR chest radiographs)"),
    ],
)
def test_pydicom_s_ct_and_mr_files_are_refused_by_their_modality(name: str, reason: str) -> None:
    meta = read_dicom_metadata(Path(get_testdata_file(name, download=False)))
    assert not_frontal_chest(meta) == f"not a frontal chest radiograph: {reason}"


@pytest.fixture
def chest(rsna_sample_dir: Path) -> DicomMeta:
    """A real RSNA film's tags (CR, CHEST, PA), to edit one at a time."""
    return read_dicom_metadata(sorted(rsna_sample_dir.glob("*.dcm"))[0])


@pytest.mark.parametrize(
    ("edits", "reason"),
    [
        ({"view_position": "LL"}, "ViewPosition LL (only AP and PA views are frontal)"),
        ({"view_position": "lateral"}, "ViewPosition LATERAL (only AP and PA views are frontal)"),
        ({"view_position": "RLD"}, "ViewPosition RLD (only AP and PA views are frontal)"),
        ({"body_part_examined": "ABDOMEN"}, "BodyPartExamined ABDOMEN"),
        ({"body_part_examined": "HAND", "modality": "DX"}, "BodyPartExamined HAND"),
        (
            {"modality": "SC", "body_part_examined": ""},
            "Modality SC (a secondary capture) without a chest BodyPartExamined (empty)",
        ),
        ({"modality": "US"}, "Modality US (lungdet's models were made for CR, DX or DR chest radiographs)"),
    ],
)
def test_tags_that_say_another_image_refuse_it_with_the_tag(chest: DicomMeta, edits: dict, reason: str) -> None:
    assert not_frontal_chest(dataclasses.replace(chest, **edits)) == f"not a frontal chest radiograph: {reason}"


@pytest.mark.parametrize(
    "edits",
    [
        {"view_position": "", "body_part_examined": ""},  # many archives leave both empty on real chest films
        {"modality": ""},
        {"modality": "DX", "body_part_examined": "thorax", "view_position": "ap"},
        {"modality": "SC", "body_part_examined": "CHEST"},  # secondary captures of chest films, as RSNA's
        {"modality": "DR", "body_part_examined": "PORT-CHEST"},
    ],
)
def test_empty_tags_and_other_spellings_of_a_frontal_chest_pass(chest: DicomMeta, edits: dict) -> None:
    assert not_frontal_chest(dataclasses.replace(chest, **edits)) is None
