"""Tests for show/dicom_results.py: every result for one X-ray carries the source's values, repaired or completed where the source lacks them.

Each result has its own tests (test_dicom_sr.py, test_dicom_overlay.py, test_dicom_gsps.py); ``lungdet predict --dicom-out``,
which writes them, is tested in tests/detection/test_predict_dicom_out.py.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from lungdet.data_tools.dicom_io import read_dicom
from lungdet.show.dicom_derived import model_identity
from lungdet.show.dicom_gsps import presentation_state
from lungdet.show.dicom_overlay import overlay_image
from lungdet.show.dicom_sr import structured_report
from lungdet.submission.prediction_string import Prediction

MODEL = model_identity("9.9.9", ["fasterrcnn_mobilenet_v3_large_fpn"], ["ab" * 32], 0.4)
BOXES = Prediction.from_arrays([0.82, 0.71], [[72.5, 230.8, 233.7, 576.0], [516.2, 436.8, 216.4, 368.9]])


@pytest.fixture(scope="module")
def sources(rsna_sample_dir: Path) -> list[Path]:
    return sorted(rsna_sample_dir.glob("*.dcm"))


def test_results_carry_the_repaired_age(sources: list[Path]) -> None:
    source = pydicom.dcmread(sources[0])
    assert source.PatientAge == "51"  # RSNA's form, which the AS value representation does not allow
    for derived in (
        structured_report(source, BOXES, None, MODEL),
        presentation_state(source, source.pixel_array, BOXES, MODEL),
    ):
        assert derived.PatientAge == "051Y"


def test_a_source_without_type_2_patient_and_study_attributes_still_gets_every_result(sources: list[Path]) -> None:
    source = pydicom.dcmread(sources[0])
    for keyword in ("PatientSex", "StudyDate", "AccessionNumber", "PatientBirthDate"):
        del source[keyword]
    pixels = read_dicom(sources[0]).pixels
    results = [
        structured_report(source, BOXES, None, MODEL),
        structured_report(source, Prediction.empty(), None, MODEL),
        overlay_image(source, pixels, BOXES, MODEL),
        presentation_state(source, source.pixel_array, BOXES, MODEL),
    ]
    for result in results:
        for keyword in ("PatientSex", "StudyDate", "AccessionNumber"):  # present and empty
            assert keyword in result and result[keyword].value in ("", None), (result.Modality, keyword)
        assert result.PatientID == source.PatientID
    assert "PatientSex" not in source  # the caller's dataset is left as it was
