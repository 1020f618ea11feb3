"""Every kind of DICOM object lungdet writes, through three independent validators, on real sources.

- dicom3tools' ``dciodvfy`` checks each object against its IOD (modules, types, value representations);
- PixelMed's ``DicomSRValidator`` checks the reports against TID 1500 and its context groups;
- DCMTK's ``dcmpschk`` checks the presentation states.

Zero errors are allowed. Each warning must be one of the accepted ones below, each with its reason
(docs/dicom_and_pacs.md lists them too), so a new warning fails the test until someone reads it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pydicom
import pytest

from lungdet.data_tools.dicom_io import read_dicom
from lungdet.show.dicom_derived import model_identity
from lungdet.show.dicom_results import write_results
from lungdet.submission.prediction_string import Prediction
from tests.conftest import require_program, skip_or_fail

MODEL = model_identity("9.9.9", ["fasterrcnn_mobilenet_v3_large_fpn"], ["ab" * 32], 0.4)
BOXES = Prediction.from_arrays([0.82, 0.71], [[72.5, 230.8, 233.7, 576.0], [516.2, 436.8, 216.4, 368.9]])

ACCEPTED_DCIODVFY_WARNINGS = {
    # RSNA's PatientName is the patient ID, without '^': copied unchanged, as the source has it.
    r"Value dubious for this VR - \(0x0010,0x0010\) PN Patient's Name .* Retired Person Name form": "the source's name, copied",
    # The sources have no Study ID; a derived object does not invent one.
    r"Missing attribute or value that would be needed to build DICOMDIR - Study ID": "the source has none",
    # 99LUNGDET is lungdet's private coding scheme (the 99 prefix is DICOM's for private schemes).
    r"Unrecognized defined term <99LUNGDET> for value 1 of attribute <Coding Scheme Designator>": "a private scheme",
    # Laterality is Type 2C: dciodvfy asks for it (an error when absent), then warns that empty means unknown.
    r"is only permitted to be empty when actually unknown; .* attribute <Laterality>": "a chest is not paired",
}

# PixelMed's SR validator, once for every report: building it compiles its templates (~6 s), so one JVM does them all.
SR_VALIDATOR = """
public class ValidateSR {
    public static void main(String[] paths) throws Exception {
        com.pixelmed.validate.DicomSRValidator validator = new com.pixelmed.validate.DicomSRValidator();
        for (String path : paths) {
            System.out.println("==== " + path);
            System.out.println(validator.validate(path));
        }
    }
}
"""
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# Recent Java caps XPath expressions far below what PixelMed's compiled templates need.
JAVA_XPATH_LIMITS = ["-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0"]


@pytest.fixture(scope="module")
def written(
    rsna_sample_dir: Path, siim_monochrome1_dicom: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A report with boxes, a report without, an overlay and a GSPS, for a real RSNA file and a MONOCHROME1 one."""
    folder = tmp_path_factory.mktemp("validators")
    files: dict[str, Path] = {}
    for name, path in (("rsna", sorted(rsna_sample_dir.glob("*.dcm"))[0]), ("monochrome1", siim_monochrome1_dicom)):
        source = pydicom.dcmread(path)
        sr, overlay, gsps = write_results(
            folder, f"{name}_boxes", source, BOXES, 0.91, MODEL, pixels=read_dicom(path).pixels, gsps=True
        )
        [empty] = write_results(folder, f"{name}_none", source, Prediction.empty(), 0.07, MODEL)
        files.update(
            {
                f"{name} report": sr,
                f"{name} overlay": overlay,
                f"{name} gsps": gsps,
                f"{name} report without boxes": empty,
            }
        )
    return files


def test_dciodvfy_finds_no_error_in_anything_lungdet_writes(written: dict[str, Path]) -> None:
    verifier = require_program("dciodvfy", "dicom3tools")
    for kind, path in written.items():
        done = subprocess.run([verifier, str(path)], capture_output=True, text=True, timeout=60)
        lines = (done.stdout + done.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        assert errors == [], (kind, errors)
        warnings = [line.removeprefix("Warning - ") for line in lines if line.startswith("Warning")]
        unexplained = [
            line for line in warnings if not any(re.search(pattern, line) for pattern in ACCEPTED_DCIODVFY_WARNINGS)
        ]
        assert unexplained == [], (kind, unexplained)


def test_pixelmed_finds_no_error_in_the_reports(written: dict[str, Path], tmp_path: Path) -> None:
    java = require_program("java", "default-jre-headless")
    if not PIXELMED_JAR.is_file():
        skip_or_fail(f"PixelMed is not installed ({PIXELMED_JAR}): apt-get install libpixelmed-java")
    source = tmp_path / "ValidateSR.java"
    source.write_text(SR_VALIDATOR)
    # The RSNA file's two reports: a report's structure does not depend on the source's photometric
    # interpretation (dciodvfy checks the MONOCHROME1 ones), and each report costs the validator seconds.
    reports = [path for kind, path in written.items() if kind.startswith("rsna report")]
    done = subprocess.run(
        [java, *JAVA_XPATH_LIMITS, "-cp", str(PIXELMED_JAR), str(source), *map(str, reports)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    per_file = done.stdout.split("==== ")[1:]
    assert len(per_file) == len(reports)
    for path, text in zip(reports, per_file, strict=True):
        errors = [line for line in text.splitlines() if line.startswith("Error")]
        assert errors == [], (path.name, errors)
        warnings = [line for line in text.splitlines() if line.startswith("Warning")]
        if "without boxes" in next(kind for kind, written_path in written.items() if written_path == path):
            # This PixelMed has the Chest CAD SR IOD and its content constraints, not TID 4100 itself:
            # it checks the IOD, value types and relationships, and lists every item as outside a template.
            assert "Found ChestCADSR IOD" in text, text
            assert all(line.endswith("Content Item not in template") for line in warnings), warnings
        else:
            assert "Found Root Template TID_1500 (MeasurementReport)" in text, text
            assert warnings == [], warnings


def test_dcmpschk_passes_the_presentation_states(written: dict[str, Path]) -> None:
    checker = require_program("dcmpschk", "dcmtk")
    for kind, path in written.items():
        if kind.endswith("gsps"):
            done = subprocess.run([checker, str(path)], capture_output=True, text=True, timeout=60)
            output = done.stdout + done.stderr
            assert done.returncode == 0 and "Test passed" in output and "E:" not in output, (kind, output)
