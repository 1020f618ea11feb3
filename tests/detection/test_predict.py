"""Tests for detection/predict.py: folders with bad files, TTA, several checkpoints, post-processing, the CLI.

Rebuilding a trained model and mapping its boxes back to DICOM pixels (detection/detector.py) are in test_detector.py;
:func:`predict_raw` and :func:`predict_dicoms` on their own (detection/ensemble.py) in test_ensemble.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lungdet.detection.predict import get_args_parser, main, report_operating_point
from lungdet.detection.runtime import resolve_precision
from lungdet.errors import LungdetError
from lungdet.submission.postprocess import OperatingPoint, PostprocessConfig, PostprocessResult
from lungdet.submission.prediction_string import Prediction, keep_confident, read_submission

CPU = torch.device("cpu")
# --- command line -------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    return main(get_args_parser().parse_args([*argv, "--no-progress"]))


def test_cli_writes_a_sorted_submission_with_a_row_per_dicom(
    trained: dict[str, Any], dicom_dir: Path, good_stems: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "submission.csv"
    assert (
        run_cli(
            "--checkpoint",
            str(trained["checkpoint"]),
            "--dicom-dir",
            str(dicom_dir),
            "--out",
            str(out),
            "--batch-size",
            "3",
        )
        == 0
    )

    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "patientId,PredictionString"
    expected_ids = sorted(["corrupt-0000", *good_stems])
    assert [line.split(",")[0] for line in lines[1:]] == expected_ids
    assert "corrupt-0000," in lines
    submission = read_submission(out)
    assert list(submission) == expected_ids

    # With no --score-threshold the cut-off tuned on validation is used.
    threshold = torch.load(trained["checkpoint"], weights_only=True)["score_threshold"]
    captured = capsys.readouterr()
    assert f"wrote {out}: 4 rows" in captured.out
    assert f"(confidence >= {threshold:g}; cpu, {resolve_precision('auto', CPU).name})" in captured.out
    assert all((prediction.scores >= threshold).all() for prediction in submission.values())
    assert "unreadable, written with no boxes:" in captured.err and "corrupt-0000.dcm" in captured.err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--score-threshold", "1.5"], "argument --score-threshold: must be in [0, 1], got 1.5"),
        (["--score-threshold", "-0.1"], "argument --score-threshold: must be in [0, 1], got -0.1"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--amp", "bf32"], "argument --amp: invalid choice: 'bf32'"),
    ],
)
def test_cli_rejects_bad_options_before_any_work(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    # The checkpoint and folder do not exist: the option check must come first.
    with pytest.raises(SystemExit):
        run_cli(
            "--checkpoint",
            str(tmp_path / "none.pt"),
            "--dicom-dir",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "s.csv"),
            *extra,
        )
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_cli_with_no_dicoms_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LungdetError, match=re.escape(f"{tmp_path / 'empty'}: no .dcm files found")):
        run_cli(
            "--checkpoint",
            str(tmp_path / "none.pt"),
            "--dicom-dir",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "s.csv"),
        )


def test_cli_refuses_fp16_on_the_cpu_before_loading_anything(tmp_path: Path, dicom_dir: Path) -> None:
    with pytest.raises(LungdetError, match=re.escape("amp=fp16 needs a CUDA GPU, but this run is on cpu")):
        run_cli(
            "--checkpoint",
            str(tmp_path / "none.pt"),
            "--dicom-dir",
            str(dicom_dir),
            "--out",
            str(tmp_path / "s.csv"),
            "--device",
            "cpu",
            "--amp",
            "fp16",
        )
    assert not (tmp_path / "s.csv").exists()


def test_cli_refuses_two_dicoms_with_one_patient_id(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / "dicoms" / folder).mkdir(parents=True)
        (tmp_path / "dicoms" / folder / "same-id.dcm").write_bytes(b"not read: the check comes first")
    with pytest.raises(
        LungdetError, match=r"dicoms/a/same-id\.dcm and .*dicoms/b/same-id\.dcm have the same patientId 'same-id'"
    ):
        run_cli(
            "--checkpoint",
            str(tmp_path / "none.pt"),
            "--dicom-dir",
            str(tmp_path / "dicoms"),
            "--out",
            str(tmp_path / "s.csv"),
        )
    assert not (tmp_path / "s.csv").exists()


# --- TTA, several checkpoints, raw predictions, post-processing ---------------------------------


def test_two_copies_of_a_checkpoint_fuse_to_the_single_model_submission(
    serving_checkpoint: Path, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "dicoms"
    folder.mkdir()
    for path in sorted(rsna_sample_dir.glob("*.dcm"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    copies = []
    for name in ("fold0", "fold1"):
        (tmp_path / name).mkdir()
        copies.append(tmp_path / name / "best.pt")
        copies[-1].write_bytes(serving_checkpoint.read_bytes())
    common = ["--dicom-dir", str(folder), "--device", "cpu", "--amp", "none"]
    assert run_cli("--checkpoint", str(copies[0]), *common, "--out", str(tmp_path / "one.csv")) == 0
    assert (
        run_cli(
            "--checkpoint",
            *map(str, copies),
            *common,
            "--out",
            str(tmp_path / "two.csv"),
            "--raw",
            str(tmp_path / "raw.csv"),
        )
        == 0
    )
    single, fused = read_submission(tmp_path / "one.csv"), read_submission(tmp_path / "two.csv")
    assert list(single) == list(fused)
    assert sum(len(prediction.scores) for prediction in single.values()) > 0
    for patient_id in single:
        np.testing.assert_allclose(fused[patient_id].scores, single[patient_id].scores, atol=1e-4)
        np.testing.assert_allclose(fused[patient_id].boxes, single[patient_id].boxes, atol=0.11)

    from lungdet.submission.raw_predictions import read_raw_predictions

    raw = read_raw_predictions(tmp_path / "raw.csv")
    assert len(raw) == 3 * 2 and {row.model for row in raw} == {"fold0", "fold1"}
    assert all(row.width == row.height == 1024 and row.pass_name == "plain" for row in raw)
    assert min(score for row in raw for score in row.prediction.scores) < 0.3  # raw keeps what the cut-off drops


def test_postprocess_file_is_applied(serving_checkpoint: Path, rsna_sample_dir: Path, tmp_path: Path) -> None:
    from lungdet.submission.postprocess import PostprocessConfig, save_postprocess

    save_postprocess(PostprocessConfig(score_threshold=0.05, max_boxes=1, shrink=0.5), tmp_path / "pp.yaml")
    inputs = [str(path) for path in sorted(rsna_sample_dir.glob("*.dcm"))[:4]]
    common = ["--checkpoint", str(serving_checkpoint), "--input", *inputs, "--device", "cpu", "--amp", "none"]
    assert run_cli(*common, "--out", str(tmp_path / "plain.csv"), "--score-threshold", "0.05") == 0
    assert run_cli(*common, "--out", str(tmp_path / "pp.csv"), "--postprocess", str(tmp_path / "pp.yaml")) == 0
    plain, processed = read_submission(tmp_path / "plain.csv"), read_submission(tmp_path / "pp.csv")
    assert any(len(prediction.scores) > 1 for prediction in plain.values())
    for patient_id, prediction in processed.items():
        assert len(prediction.scores) == min(1, len(plain[patient_id].scores))
        if len(prediction.scores):
            best = plain[patient_id]
            np.testing.assert_allclose(prediction.boxes[0, 2:], best.boxes[0, 2:] * 0.5, atol=0.11)


def test_tta_writes_both_passes_and_fuses_them(
    serving_checkpoint: Path, mirrored_pair: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    from lungdet.submission.postprocess import PostprocessConfig, postprocess
    from lungdet.submission.raw_predictions import read_raw_predictions

    args = [
        "--checkpoint",
        str(serving_checkpoint),
        "--input",
        str(mirrored_pair[0]),
        "--device",
        "cpu",
        "--amp",
        "none",
        "--tta",
        "hflip",
    ]
    assert (
        run_cli(*args, "--out", str(tmp_path / "s.csv"), "--raw", str(tmp_path / "raw.csv"), "--score-threshold", "0.2")
        == 0
    )
    assert "(confidence >= 0.2, TTA hflip; cpu, fp32)" in capsys.readouterr().out
    raw = read_raw_predictions(tmp_path / "raw.csv")
    assert [row.pass_name for row in raw] == ["plain", "hflip"]
    # The submission is the two passes fused, then cut at 0.2: the same as post-processing the raw file.
    expected = postprocess(raw, PostprocessConfig(score_threshold=0.2))["upright"]
    written = read_submission(tmp_path / "s.csv")["upright"]
    np.testing.assert_allclose(written.scores, expected.scores, atol=1e-4)
    plain_only = keep_confident(raw[0].prediction, min_confidence=0.2)
    assert len(written.scores) != len(plain_only.scores) or not np.allclose(
        written.scores, plain_only.scores, atol=1e-4
    )  # fusion did something


def test_output_is_identical_for_any_number_of_workers(
    serving_checkpoint: Path, rsna_sample_dir: Path, dicom_dir: Path, tmp_path: Path
) -> None:
    # Real 1024 px DICOMs, synthetic 128 x 256 ones and a corrupt file, through two models with
    # different input specs (the checkpoint and a copy whose convert step resized to 96 px) and hflip TTA.
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in [*sorted(rsna_sample_dir.glob("*.dcm"))[:4], *sorted(dicom_dir.glob("*.dcm"))]:
        (folder / path.name).write_bytes(path.read_bytes())
    resized = tmp_path / "resized" / "best.pt"
    resized.parent.mkdir()
    checkpoint = torch.load(serving_checkpoint, weights_only=True)
    torch.save({**checkpoint, "preprocessing": {"image_size": 96, "normalization": "equalize"}}, resized)
    outputs = {}
    for workers in (0, 1, 2):
        out, raw = tmp_path / f"w{workers}.csv", tmp_path / f"w{workers}_raw.csv"
        argv = [
            "--checkpoint",
            str(serving_checkpoint),
            str(resized),
            "--dicom-dir",
            str(folder),
            "--tta",
            "hflip",
            "--batch-size",
            "3",
        ]
        assert run_cli(*argv, "--amp", "none", "--workers", str(workers), "--out", str(out), "--raw", str(raw)) == 0
        outputs[workers] = (out.read_bytes(), raw.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    lines = outputs[0][0].decode().splitlines()
    assert len(lines) == 1 + 8 and "corrupt-0000," in lines
    raw_lines = outputs[0][1].decode().splitlines()
    assert len(raw_lines) == 1 + 7 * 2 * 2  # readable images x models x passes


def test_an_image_folder_predicts_as_its_files_do_and_label_space_scales_the_boxes(
    serving_checkpoint: Path, rsna_real_dir: Path, tmp_path: Path
) -> None:
    """--image-dir reads PNG/JPEG like --input; --label-space writes a 256 px copy's boxes in the labels' 1024 space."""
    import cv2

    jpegs, pngs = tmp_path / "jpegs", tmp_path / "png256"
    jpegs.mkdir()
    pngs.mkdir()
    chosen = sorted((rsna_real_dir / "images").glob("*.jpg"))[:4]
    for path in chosen:
        (jpegs / path.name).symlink_to(path)
        small = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (256, 256), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(pngs / f"{path.stem}.png"), small)
    common = [
        "--checkpoint",
        str(serving_checkpoint),
        "--device",
        "cpu",
        "--amp",
        "none",
        "--score-threshold",
        "0.05",
        "--workers",
        "0",
    ]
    assert run_cli(*common, "--image-dir", str(jpegs), "--out", str(tmp_path / "folder.csv")) == 0
    assert run_cli(*common, "--input", *map(str, chosen), "--out", str(tmp_path / "files.csv")) == 0
    assert (tmp_path / "folder.csv").read_text() == (tmp_path / "files.csv").read_text()

    assert run_cli(*common, "--image-dir", str(pngs), "--out", str(tmp_path / "own.csv")) == 0
    assert (
        run_cli(*common, "--image-dir", str(pngs), "--label-space", "1024x1024", "--out", str(tmp_path / "labels.csv"))
        == 0
    )
    own, scaled = read_submission(tmp_path / "own.csv"), read_submission(tmp_path / "labels.csv")
    assert sum(len(prediction.scores) for prediction in own.values()) > 0
    assert max(prediction.boxes.max(initial=0) for prediction in own.values()) <= 256
    for patient_id, prediction in own.items():
        np.testing.assert_allclose(scaled[patient_id].scores, prediction.scores)
        np.testing.assert_allclose(scaled[patient_id].boxes, prediction.boxes * 4, atol=0.5)  # the CSV rounds to 0.1 px


def operating_point(boxes_per_image: float, expected: float) -> PostprocessResult:
    config = PostprocessConfig(
        score_threshold=0.3,
        tuning=OperatingPoint(expected_boxes_per_image=expected, tuned_models_per_image=1, tuned_passes_per_model=2),
    )
    return PostprocessResult(
        predictions={"p1": Prediction.empty()},
        applied=config,
        calibrated=False,
        note="",
        boxes_per_image=boxes_per_image,
    )


def test_predict_prints_the_boxes_per_image_beside_tuning_and_warns_only_beyond_2x(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report_operating_point(operating_point(0.5, 0.3))
    near = capsys.readouterr()
    assert near.out == "kept 0.500 boxes per image (tuning expected 0.300)\n" and near.err == ""
    report_operating_point(operating_point(0.1, 0.3))
    far = capsys.readouterr()
    assert far.out == "kept 0.100 boxes per image (tuning expected 0.300)\n"
    assert far.err.count("\n") == 1 and far.err.startswith(
        "warning: 0.100 boxes per image is more than 2x from tuning's 0.300"
    )


def test_the_gate_refuses_a_lateral_and_a_ct_unless_any_view_is_allowed(
    serving_checkpoint: Path, rsna_sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Refused rows are written with no boxes, named on stderr with the tag, and counted; --allow-any-view predicts them, with a warning."""
    import pydicom
    from pydicom.data import get_testdata_file

    frontal = sorted(rsna_sample_dir.glob("*.dcm"))[0]
    lateral = tmp_path / "lateral.dcm"
    dataset = pydicom.dcmread(frontal)
    dataset.ViewPosition = "LL"
    dataset.save_as(lateral)
    ct = Path(get_testdata_file("CT_small.dcm", download=False))
    common = ["--checkpoint", str(serving_checkpoint), "--device", "cpu", "--amp", "none", "--score-threshold", "0.05"]
    common += ["--workers", "0"]
    out = tmp_path / "gated.csv"
    assert run_cli(*common, "--input", str(frontal), str(lateral), str(ct), "--out", str(out)) == 0
    captured = capsys.readouterr()
    submission = read_submission(out)
    assert sorted(submission) == sorted([frontal.stem, "lateral", "CT_small"])
    assert len(submission[frontal.stem].scores) > 0  # the frontal film gets its boxes, the others none
    assert len(submission["lateral"].scores) == len(submission["CT_small"].scores) == 0
    assert "; 2 refused (not frontal chest radiographs)" in captured.out
    assert (
        f"refused, written with no boxes: {lateral}: not a frontal chest radiograph: ViewPosition LL "
        "(only AP and PA views are frontal)" in captured.err
    )
    assert f"refused, written with no boxes: {ct}: not a frontal chest radiograph: Modality CT" in captured.err

    allowed = tmp_path / "allowed.csv"
    assert run_cli(*common, "--input", str(frontal), str(lateral), "--out", str(allowed), "--allow-any-view") == 0
    captured = capsys.readouterr()
    assert "warning: --allow-any-view: the frontal-chest check on DICOM tags is off" in captured.err
    assert "refused" not in captured.out + captured.err
    both = read_submission(allowed)
    np.testing.assert_allclose(both["lateral"].boxes, both[frontal.stem].boxes)  # the same pixels, now predicted
