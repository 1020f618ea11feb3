"""Tests for show/dicom_results.py: reports and overlays that say what was predicted, checked by highdicom and DCMTK.

``lungdet predict --dicom-out``, which writes them, is tested in tests/detection/test_predict_dicom_out.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungdet.data_tools.dicom_io import read_dicom
from lungdet.show.dicom_derived import (
    GSPS_SERIES_DESCRIPTION,
    OVERLAY_SERIES_DESCRIPTION,
    REPORT_SERIES_DESCRIPTION,
    gsps_uid,
    model_identity,
    report_uid,
)
from lungdet.show.dicom_results import (
    overlay_image,
    presentation_state,
    read_report,
    structured_report,
    write_results,
)
from lungdet.submission.prediction_string import Prediction
from tests.conftest import require_program

MODEL = model_identity("9.9.9", ["fasterrcnn_mobilenet_v3_large_fpn"], ["ab" * 32], 0.4)
BOXES = Prediction.from_arrays([0.82, 0.71], [[72.5, 230.8, 233.7, 576.0], [516.2, 436.8, 216.4, 368.9]])


def dsrdump() -> str:
    return require_program("dsrdump", "dcmtk")


@pytest.fixture(scope="module")
def sources(rsna_sample_dir: Path) -> list[Path]:
    return sorted(rsna_sample_dir.glob("*.dcm"))


def test_report_reads_back_with_the_boxes_confidences_and_source(sources: list[Path], tmp_path: Path) -> None:
    source = pydicom.dcmread(sources[0], stop_before_pixels=True)
    [path] = write_results(tmp_path, "one", source, BOXES, 0.93, MODEL)
    report = pydicom.dcmread(path)
    assert report.SOPClassUID.name == "Comprehensive 3D SR Storage" and report.Modality == "SR"
    assert (
        report.SeriesDescription == REPORT_SERIES_DESCRIPTION
        and "Research use only, not for diagnosis" in report.SeriesDescription
    )
    for keyword in ("PatientID", "PatientName", "PatientSex", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
        assert report.get(keyword) == source.get(keyword), keyword
    assert report.SeriesInstanceUID != source.SeriesInstanceUID and report.PreliminaryFlag == "PRELIMINARY"
    contents = read_report(report)
    assert contents.source_sop_instance_uid == source.SOPInstanceUID
    np.testing.assert_allclose(contents.prediction.scores, BOXES.scores)
    np.testing.assert_allclose(contents.prediction.boxes, BOXES.boxes, atol=1e-3)  # SCOORD holds float32
    assert contents.opacity_present and contents.probability == pytest.approx(0.93)


def content_names(items) -> list[tuple[str, str]]:
    return [
        (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptNameCodeSequence[0].CodingSchemeDesignator)
        for item in items
    ]


def test_the_verdict_is_report_level_so_every_measurement_group_is_a_region(sources: list[Path]) -> None:
    # OHIF reads an image region from every measurement group: a group without one stops it drawing any box.
    report = structured_report(pydicom.dcmread(sources[0], stop_before_pixels=True), BOXES, 0.93, MODEL)
    root = report.ContentSequence
    [measurements] = [item for item in root if content_names([item]) == [("126010", "DCM")]]
    for group in measurements.ContentSequence:
        assert [item.ValueType for item in group.ContentSequence].count("SCOORD") == 1
    assert len(measurements.ContentSequence) == 2
    [evaluations] = [item for item in root if content_names([item]) == [("C0034375", "UMLS")]]
    assert content_names(evaluations.ContentSequence) == [("112001", "DCM"), ("122157", "DCM")]
    assert evaluations.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "52101004"  # present
    assert evaluations.ContentSequence[1].TextValue == "0.9300"
    assert ("C0034375", "UMLS") in content_names(
        structured_report(pydicom.dcmread(sources[0], stop_before_pixels=True), BOXES, None, MODEL).ContentSequence
    )
    [procedure] = [item for item in root if content_names([item]) == [("121058", "DCM")]]
    assert procedure.ConceptCodeSequence[0].CodeValue == "363679005"  # Imaging procedure, in CID 100


def test_a_report_without_boxes_is_a_chest_cad_report_without_findings(sources: list[Path]) -> None:
    source = pydicom.dcmread(sources[1], stop_before_pixels=True)
    report = structured_report(source, Prediction.empty(), 0.12, MODEL)
    assert (
        report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.65"
        and report.file_meta.MediaStorageSOPClassUID == report.SOPClassUID
    )  # Chest CAD SR
    assert report.SOPInstanceUID == report_uid(source, MODEL) and report.SeriesDescription == REPORT_SERIES_DESCRIPTION
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "4100"
    assert content_names(report.ContentSequence) == [
        ("121049", "DCM"),
        ("111017", "DCM"),
        ("111064", "DCM"),
        ("111065", "DCM"),
    ]
    assert report.ContentSequence[1].ConceptCodeSequence[0].CodeMeaning == "All algorithms succeeded; without findings"
    contents = read_report(report)
    assert (contents.opacity_present, contents.probability, contents.source_sop_instance_uid) == (
        False,
        0.12,
        source.SOPInstanceUID,
    )
    assert len(contents.prediction.scores) == 0
    assert read_report(structured_report(source, Prediction.empty(), None, MODEL)).probability is None


def test_results_carry_the_repaired_age(sources: list[Path]) -> None:
    source = pydicom.dcmread(sources[0])
    assert source.PatientAge == "51"  # RSNA's form, which the AS value representation does not allow
    for derived in (
        structured_report(source, BOXES, None, MODEL),
        presentation_state(source, source.pixel_array, BOXES, MODEL),
    ):
        assert derived.PatientAge == "051Y"


def test_the_algorithm_and_model_are_identified(sources: list[Path]) -> None:
    report = structured_report(pydicom.dcmread(sources[0], stop_before_pixels=True), BOXES, None, MODEL)
    texts = {element.value for element in report.iterall() if element.keyword == "TextValue"}
    for expected in (
        "lungdet",
        "9.9.9",
        f"checkpoint sha256 {'ab' * 32}",
        "architecture fasterrcnn_mobilenet_v3_large_fpn",
        "box cut-off 0.4",
    ):
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
        [written] = write_results(
            tmp_path, path.stem, pydicom.dcmread(path, stop_before_pixels=True), prediction, 0.5, MODEL
        )
        done = subprocess.run([parser, str(written)], capture_output=True, text=True, timeout=60)
        # DCMTK checks TID 1500 itself; of TID 4100 (the Chest CAD SR) it says it cannot, and parses the rest.
        allowed = "" if index % 2 == 0 else "W: Check for template constraints not yet supported\n"
        assert done.returncode == 0 and done.stderr == allowed, done.stderr
        title = "Imaging Measurement Report" if index % 2 == 0 else "Chest CAD Report"
        assert title in done.stdout and ("POLYLINE" in done.stdout) == (index % 2 == 0)


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
