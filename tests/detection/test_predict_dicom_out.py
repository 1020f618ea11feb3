"""Tests for ``lungdet predict --dicom-out`` (detection/predict.py): the submission's boxes as DICOM reports and overlays."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungdet.data_tools.dicom_io import read_dicom
from lungdet.show.dicom_sr import read_report
from lungdet.submission.prediction_string import read_submission


@pytest.fixture(scope="module")
def sources(rsna_sample_dir: Path) -> list[Path]:
    return sorted(rsna_sample_dir.glob("*.dcm"))


def run_predict(*argv: str) -> int:
    from lungdet.detection.predict import get_args_parser, main

    return main(get_args_parser().parse_args([*argv, "--no-progress", "--device", "cpu", "--amp", "none"]))


def test_predict_dicom_out_writes_the_submissions_boxes(
    serving_checkpoint: Path, sources: list[Path], tmp_path: Path, capsys
) -> None:
    png = tmp_path / "chest.png"
    import cv2

    cv2.imwrite(str(png), read_dicom(sources[0]).pixels)
    inputs = [str(path) for path in sources[:3]] + [str(png)]
    out, folder = tmp_path / "submission.csv", tmp_path / "dicom"
    assert (
        run_predict(
            "--checkpoint",
            str(serving_checkpoint),
            "--input",
            *inputs,
            "--out",
            str(out),
            "--dicom-out",
            str(folder),
            "--dicom-out-overlay",
            "--dicom-out-gsps",
        )
        == 0
    )
    captured = capsys.readouterr()
    assert (
        f"wrote 3 DICOM report(s) and 3 overlay(s) and 3 presentation state(s) to {folder} (research use only)"
        in captured.out
    )
    assert f"no DICOM report for {png}: not a DICOM image" in captured.err
    submission = read_submission(out)
    assert sum(len(prediction.scores) for prediction in submission.values()) > 0
    for path in sources[:3]:
        contents = read_report(pydicom.dcmread(folder / f"{path.stem}_sr.dcm"))
        assert contents.source_sop_instance_uid == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        expected = submission[path.stem]  # the CSV rounds boxes to 0.1 px and confidences to 1e-4
        np.testing.assert_allclose(contents.prediction.boxes, expected.boxes, atol=0.05 + 1e-3)
        np.testing.assert_allclose(contents.prediction.scores, expected.scores, atol=5e-5 + 1e-9)
        gsps = pydicom.dcmread(folder / f"{path.stem}_gsps.dcm")
        [annotation] = gsps.GraphicAnnotationSequence
        assert len(annotation.get("GraphicObjectSequence", [])) == len(expected.scores)
        assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == contents.source_sop_instance_uid
    expected_files = [f"{p.stem}_{kind}.dcm" for p in sources[:3] for kind in ("sr", "overlay", "gsps")]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected_files)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--dicom-out-overlay", "--out", "x.csv"],
            "--dicom-out-overlay adds overlays to --dicom-out DIR; give --dicom-out too",
        ),
        (
            ["--dicom-out-gsps", "--out", "x.csv"],
            "--dicom-out-gsps adds presentation states to --dicom-out DIR; give --dicom-out too",
        ),
        (["--dicom-out", "d", "--json"], "--json prints to the screen; drop --dicom-out"),
    ],
)
def test_predict_dicom_out_option_errors(
    serving_checkpoint: Path, sources: list[Path], extra: list[str], message: str
) -> None:
    from lungdet.errors import LungdetError

    with pytest.raises(LungdetError, match=message):
        run_predict("--checkpoint", str(serving_checkpoint), "--input", str(sources[0]), *extra)


def test_without_highdicom_dicom_out_says_what_to_install(
    serving_checkpoint: Path, sources: list[Path], tmp_path: Path, monkeypatch
) -> None:
    from lungdet.errors import LungdetError

    monkeypatch.setitem(sys.modules, "highdicom", None)
    # dicom_results and the modules under it that import highdicom, so that importing it meets the missing highdicom again.
    for module in (
        "lungdet.show.dicom_results",
        "lungdet.show.dicom_sr",
        "lungdet.show.dicom_gsps",
        "lungdet.show.dicom_overlay",
    ):
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(
        LungdetError, match=r"--dicom-out: lungdet's DICOM results need highdicom .*pip install 'lungdet\[dicom\]'"
    ):
        run_predict(
            "--checkpoint", str(serving_checkpoint), "--input", str(sources[0]), "--dicom-out", str(tmp_path / "d")
        )
    assert not (tmp_path / "d").exists()
