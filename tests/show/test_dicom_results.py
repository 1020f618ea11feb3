"""Tests for show/dicom_results.py: reports and overlays that say what was predicted, checked by highdicom and DCMTK.

``lungdet predict --dicom-out``, which writes them, is tested in tests/detection/test_predict_dicom_out.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungdet.data_tools.dicom_io import read_dicom
from lungdet.show.dicom_results import (
    OVERLAY_SERIES_DESCRIPTION,
    REPORT_SERIES_DESCRIPTION,
    model_identity,
    overlay_image,
    read_report,
    report_uid,
    structured_report,
    write_results,
)
from lungdet.submission.prediction_string import Prediction

MODEL = model_identity("9.9.9", ["fasterrcnn_mobilenet_v3_large_fpn"], ["ab" * 32], 0.4)
BOXES = Prediction.from_arrays([0.82, 0.71], [[72.5, 230.8, 233.7, 576.0], [516.2, 436.8, 216.4, 368.9]])


def dsrdump() -> str:
    """DCMTK's SR parser; missing, the test skips saying how to install it (under CI it fails: .ci/run installs it)."""
    found = shutil.which("dsrdump")
    if found is None:
        reason = "DCMTK's dsrdump is not installed: apt-get install dcmtk"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def sources(rsna_sample_dir: Path) -> list[Path]:
    return sorted(rsna_sample_dir.glob("*.dcm"))


def test_report_reads_back_with_the_boxes_confidences_and_source(sources: list[Path], tmp_path: Path) -> None:
    source = pydicom.dcmread(sources[0], stop_before_pixels=True)
    [path] = write_results(tmp_path, "one", source, BOXES, 0.93, MODEL)
    report = pydicom.dcmread(path)
    assert report.SOPClassUID.name == "Comprehensive 3D SR Storage" and report.Modality == "SR"
    assert report.SeriesDescription == REPORT_SERIES_DESCRIPTION and "Research use only, not for diagnosis" in report.SeriesDescription
    for keyword in ("PatientID", "PatientName", "PatientSex", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
        assert report.get(keyword) == source.get(keyword), keyword
    assert report.SeriesInstanceUID != source.SeriesInstanceUID and report.PreliminaryFlag == "PRELIMINARY"
    contents = read_report(report)
    assert contents.source_sop_instance_uid == source.SOPInstanceUID
    np.testing.assert_allclose(contents.prediction.scores, BOXES.scores)
    np.testing.assert_allclose(contents.prediction.boxes, BOXES.boxes, atol=1e-3)  # SCOORD holds float32
    assert contents.opacity_present and contents.probability == pytest.approx(0.93)


def test_an_image_without_boxes_gets_a_report_that_says_so(sources: list[Path]) -> None:
    contents = read_report(structured_report(pydicom.dcmread(sources[1], stop_before_pixels=True), Prediction.empty(), None, MODEL))
    assert (len(contents.prediction.scores), contents.opacity_present, contents.probability) == (0, False, None)


def test_the_algorithm_and_model_are_identified(sources: list[Path]) -> None:
    report = structured_report(pydicom.dcmread(sources[0], stop_before_pixels=True), BOXES, None, MODEL)
    texts = {element.value for element in report.iterall() if element.keyword == "TextValue"}
    for expected in ("lungdet", "9.9.9", f"checkpoint sha256 {'ab' * 32}", "architecture fasterrcnn_mobilenet_v3_large_fpn", "box cut-off 0.4"):
        assert expected in texts, expected


def test_report_uids_follow_the_image_and_the_model(sources: list[Path]) -> None:
    first, second = (pydicom.dcmread(path, stop_before_pixels=True) for path in sources[:2])
    other_model = model_identity("9.9.9", ["fasterrcnn_mobilenet_v3_large_fpn"], ["cd" * 32], 0.4)
    assert structured_report(first, BOXES, None, MODEL).SOPInstanceUID == report_uid(first, MODEL)
    assert report_uid(first, MODEL) == report_uid(first, MODEL)
    assert len({report_uid(first, MODEL), report_uid(second, MODEL), report_uid(first, other_model)}) == 3


def test_dcmtk_parses_every_report(sources: list[Path], tmp_path: Path) -> None:
    parser = dsrdump()
    for index, path in enumerate(sources[:4]):
        prediction = BOXES if index % 2 == 0 else Prediction.empty()
        [written] = write_results(tmp_path, path.stem, pydicom.dcmread(path, stop_before_pixels=True), prediction, 0.5, MODEL)
        done = subprocess.run([parser, str(written)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert "Imaging Measurement Report" in done.stdout and ("POLYLINE" in done.stdout) == (index % 2 == 0)


def test_overlay_keeps_the_sources_geometry_and_shows_the_boxes(sources: list[Path], tmp_path: Path) -> None:
    source = pydicom.dcmread(sources[0])
    pixels = read_dicom(sources[0]).pixels
    [_, path] = write_results(tmp_path, "one", source, BOXES, None, MODEL, pixels=pixels)
    overlay = pydicom.dcmread(path)
    assert overlay.SOPClassUID.name == "Secondary Capture Image Storage" and overlay.SeriesDescription == OVERLAY_SERIES_DESCRIPTION
    assert (overlay.Rows, overlay.Columns) == (source.Rows, source.Columns)
    assert [float(value) for value in overlay.PixelSpacing] == pytest.approx([float(value) for value in source.PixelSpacing], rel=1e-9)
    assert overlay.StudyInstanceUID == source.StudyInstanceUID and overlay.SeriesInstanceUID != source.SeriesInstanceUID
    assert overlay.PatientOrientation == source.PatientOrientation
    image = overlay.pixel_array
    assert image.shape == (1024, 1024, 3)
    # The first box's top edge is orange (R > G > B); the X-ray is grey there otherwise.
    edge = image[231, 100:300]
    assert ((edge[:, 0] > 200) & (edge[:, 2] < 100)).mean() > 0.9
    with pytest.raises(ValueError, match="do not match the source's 1024 x 1024"):
        overlay_image(source, pixels[:512], BOXES, MODEL)
