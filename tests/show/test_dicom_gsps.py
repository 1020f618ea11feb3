"""Tests for show/dicom_gsps.py: presentation states that draw the boxes over the X-ray, checked and rendered by DCMTK."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungdet.data_tools.dicom_io import read_dicom
from lungdet.show.dicom_derived import GSPS_SERIES_DESCRIPTION, gsps_uid, model_identity
from lungdet.show.dicom_gsps import presentation_state
from lungdet.show.dicom_results import write_results
from lungdet.submission.prediction_string import Prediction
from tests.conftest import require_program

MODEL = model_identity("9.9.9", ["fasterrcnn_mobilenet_v3_large_fpn"], ["ab" * 32], 0.4)
BOXES = Prediction.from_arrays([0.82, 0.71], [[72.5, 230.8, 233.7, 576.0], [516.2, 436.8, 216.4, 368.9]])


@pytest.fixture(scope="module")
def sources(rsna_sample_dir: Path) -> list[Path]:
    return sorted(rsna_sample_dir.glob("*.dcm"))


def uncompressed(path: Path, folder: Path) -> Path:
    """The source with its pixels decoded: dcmp2pgm reads no JPEG."""
    dataset = pydicom.dcmread(path)
    dataset.decompress(generate_instance_uid=False)  # the same instance, which the presentation state references
    out = folder / f"{path.stem}_plain.dcm"
    dataset.save_as(out, enforce_file_format=True)
    return out


def dcmtk_render(gsps: Path, image: Path, folder: Path) -> tuple[np.ndarray, str]:
    """DCMTK's rendering of ``image`` through ``gsps`` (a PGM) and its dump of the presentation state."""
    out = folder / f"{gsps.stem}.pgm"
    done = subprocess.run(
        [require_program("dcmp2pgm", "dcmtk"), "-v", "-p", str(gsps), str(image), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr
    import cv2

    return cv2.imread(str(out), cv2.IMREAD_UNCHANGED), done.stdout + done.stderr


def dumped_polylines(dump: str) -> list[np.ndarray]:
    lines = [line.split("coordinates:")[1] for line in dump.splitlines() if "coordinates:" in line]
    return [
        np.array([[float(value) for value in point.split("\\")] for point in line.strip(" ,").split(", ")])
        for line in lines
    ]


@pytest.mark.parametrize("which", ["rsna", "monochrome1"])
def test_gsps_draws_the_boxes_over_the_xray_as_lungdet_saw_it(
    which: str, sources: list[Path], siim_monochrome1_dicom: Path, tmp_path: Path
) -> None:
    path = sources[0] if which == "rsna" else siim_monochrome1_dicom
    source = pydicom.dcmread(path)
    [_, gsps_path] = write_results(tmp_path, "one", source, BOXES, None, MODEL, gsps=True)
    gsps = pydicom.dcmread(gsps_path)
    assert (
        gsps.SOPClassUID.name == "Grayscale Softcopy Presentation State Storage"
        and gsps.SeriesDescription == GSPS_SERIES_DESCRIPTION
    )
    assert gsps.SOPInstanceUID == gsps_uid(source, MODEL) and gsps.StudyInstanceUID == source.StudyInstanceUID
    assert gsps.PresentationLUTShape == ("INVERSE" if which == "monochrome1" else "IDENTITY")
    checked = subprocess.run(
        [require_program("dcmpschk", "dcmtk"), str(gsps_path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0 and "Test passed" in checked.stderr + checked.stdout, checked.stderr

    rendered, dump = dcmtk_render(gsps_path, uncompressed(path, tmp_path), tmp_path)
    # DCMTK reads the boxes back at their corners, in the source's pixels, on the one layer...
    polylines = dumped_polylines(dump)
    assert len(polylines) == 2 and "Graphic Layer #1 [LUNGDET]" in dump
    for polyline, box in zip(polylines, BOXES.boxes, strict=True):
        x, y, width, height = box
        np.testing.assert_allclose(
            polyline, [[x, y], [x + width, y], [x + width, y + height], [x, y + height], [x, y]], atol=0.05
        )
    assert '"opacity 0.82"' in dump and '"opacity 0.71"' in dump and "Research use only, not for diagnosis" in dump
    assert "displayed area TLHC=1\\1 BRHC=1024\\1024" in dump
    # ...and shows the X-ray the way lungdet read it: its window, and a MONOCHROME1 image the right way up.
    # (dcmp2pgm renders pixels, VOI and presentation LUT; vector graphics it leaves to the viewer.)
    lungdet_pixels = read_dicom(path).pixels.astype(int)
    assert np.abs(rendered.astype(int) - lungdet_pixels).max() <= 1


def test_gsps_needs_a_grey_image(sources: list[Path]) -> None:
    source = pydicom.dcmread(sources[0])
    source.PhotometricInterpretation = "RGB"
    with pytest.raises(ValueError, match="needs a MONOCHROME1/2 image; this one is RGB"):
        presentation_state(source, source.pixel_array, BOXES, MODEL)
