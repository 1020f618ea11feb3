"""Tests for show/dicom_overlay.py: the Secondary Capture keeps the X-ray's geometry and shows the boxes."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from lungdet.data_tools.dicom_io import read_dicom
from lungdet.show.dicom_derived import OVERLAY_SERIES_DESCRIPTION, model_identity
from lungdet.show.dicom_overlay import overlay_image
from lungdet.show.dicom_results import write_results
from lungdet.submission.prediction_string import Prediction

MODEL = model_identity("9.9.9", ["fasterrcnn_mobilenet_v3_large_fpn"], ["ab" * 32], 0.4)
BOXES = Prediction.from_arrays([0.82, 0.71], [[72.5, 230.8, 233.7, 576.0], [516.2, 436.8, 216.4, 368.9]])


@pytest.fixture(scope="module")
def sources(rsna_sample_dir: Path) -> list[Path]:
    return sorted(rsna_sample_dir.glob("*.dcm"))


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
