"""Tests for show/dicom_results.py: reports and overlays that say what was predicted, checked by highdicom and DCMTK.

``lungdet predict --dicom-out``, which writes them, is tested in tests/detection/test_predict_dicom_out.py.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from lungdet.data_tools.dicom_io import read_dicom
from lungdet.show.dicom_derived import OVERLAY_SERIES_DESCRIPTION, model_identity
from lungdet.show.dicom_gsps import presentation_state
from lungdet.show.dicom_results import overlay_image, write_results
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


def test_overlay_keeps_the_sources_geometry_and_shows_the_boxes(sources: list[Path], tmp_path: Path) -> None:
    source = pydicom.dcmread(sources[0])
    pixels = read_dicom(sources[0]).pixels
    [_, path] = write_results(tmp_path, "one", source, BOXES, None, MODEL, pixels=pixels)
    overlay = pydicom.dcmread(path)
    assert (
        overlay.SOPClassUID.name == "Secondary Capture Image Storage"
        and overlay.SeriesDescription == OVERLAY_SERIES_DESCRIPTION
    )
    assert (overlay.Rows, overlay.Columns) == (source.Rows, source.Columns)
    assert [float(value) for value in overlay.PixelSpacing] == pytest.approx(
        [float(value) for value in source.PixelSpacing], rel=1e-9
    )
    assert overlay.StudyInstanceUID == source.StudyInstanceUID and overlay.SeriesInstanceUID != source.SeriesInstanceUID
    assert overlay.PatientOrientation == source.PatientOrientation and overlay.Laterality == ""
    image = overlay.pixel_array
    assert image.shape == (1024, 1024, 3)
    # The first box's top edge is orange (R > G > B); the X-ray is grey there otherwise.
    edge = image[231, 100:300]
    assert ((edge[:, 0] > 200) & (edge[:, 2] < 100)).mean() > 0.9
    with pytest.raises(ValueError, match="do not match the source's 1024 x 1024"):
        overlay_image(source, pixels[:512], BOXES, MODEL)


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
