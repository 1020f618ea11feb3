"""Tests for show/dicom_derived.py: what every DICOM result shares, here the values copied from the source and repaired."""

from __future__ import annotations

import warnings

import pydicom
import pytest

from lungdet.show.dicom_derived import repair_copied_values


@pytest.mark.parametrize(
    ("age", "repaired"),
    [("51", "051Y"), ("6", "006Y"), ("051Y", "051Y"), ("030M", "030M"), ("51Y", "051Y"), ("old", None), ("", "")],
)
def test_a_copied_age_is_repaired_only_where_the_source_broke_its_vr(age: str, repaired: str | None) -> None:
    dataset = pydicom.Dataset()
    with warnings.catch_warnings():  # pydicom warns that the broken ages are broken: that is the input
        warnings.simplefilter("ignore")
        dataset.PatientAge, dataset.PatientName = age, "0004cfab"
    repair_copied_values(dataset)
    assert dataset.get("PatientAge") == repaired and dataset.PatientName == "0004cfab"
