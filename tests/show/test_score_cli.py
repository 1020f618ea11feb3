"""Tests for show/score_cli.py: the ``lungdet score`` command line, its table, JSON, slices and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lungdet.errors import SubmissionError
from lungdet.show.score_cli import get_args_parser, main
from lungdet.submission.score import RSNA_IOU_THRESHOLDS


@pytest.fixture
def cli_files(tmp_path: Path) -> tuple[Path, Path]:
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "patientId,x,y,width,height,Target\npos,0,0,10,10,1\npos,20,0,10,10,1\nneg,,,,,0\nquiet,,,,,0\n",
        encoding="utf-8",
    )
    submission = tmp_path / "submission.csv"
    submission.write_text(
        "patientId,PredictionString\n"
        "pos,0.9 0 0 10 10 0.2 500 500 10 10\n"  # a perfect box, and a false positive that --min-confidence drops
        "neg,0.8 0 0 5 5\n"
        "stranger,0.5 1 1 1 1\n",
        encoding="utf-8",
    )
    return labels, submission


def test_cli_json(cli_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    labels, submission = cli_files
    args = get_args_parser().parse_args(
        ["--submission", str(submission), "--labels", str(labels), "--min-confidence", "0.5", "--json"]
    )
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    # pos: TP 1, FN 1 -> 1/2; neg: a false positive -> 0; quiet: missing from the submission, left out.
    assert result["map"] == 0.25
    assert result["mean_iou"] == 1.0
    assert (result["n_images"], result["n_scored"], result["n_positive"], result["n_negative"]) == (3, 2, 1, 2)
    assert (result["sensitivity"], result["specificity"]) == (1.0, 0.5)
    assert (result["n_unknown_predictions"], result["n_missing_predictions"], result["n_predicted_boxes"]) == (1, 1, 2)
    assert result["min_confidence"] == 0.5
    assert [row["iou_threshold"] for row in result["per_threshold"]] == list(RSNA_IOU_THRESHOLDS)
    assert result["per_threshold"][0] == {
        "iou_threshold": 0.4,
        "mean_precision": 0.25,
        "true_positives": 1,
        "false_positives": 1,
        "false_negatives": 1,
    }
    assert "1 patient(s) in" in captured.err and "are not in" in captured.err
    assert "1 of 3 labelled patient(s) have no row" in captured.err


def test_cli_json_puts_the_rsna_metric_first_and_the_other_metrics_beside_it(
    cli_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    labels, submission = cli_files
    args = get_args_parser().parse_args(
        ["--submission", str(submission), "--labels", str(labels), "--min-confidence", "0.5", "--json"]
    )
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    keys = list(result)
    assert keys[0] == "map" and keys[-4:] == ["coco", "froc", "image_auc", "ece"]
    # Boxes by confidence: pos 0.9 (IoU 1, TP), neg 0.8 (FP); 2 truth boxes. Precision 1, 1/2 at recall 1/2, 1/2:
    # recall points 0.00..0.50 (51) read 1, the rest 0, at every IoU threshold -> 51/101.
    coco = result["coco"]
    for key in ("ap", "ap50", "ap40"):
        assert coco[key] == pytest.approx(51 / 101, abs=1e-12)
        low, high = coco[f"{key}_interval"]
        assert low <= coco[key] <= high
    assert (
        coco["n_images"],
        coco["n_truth_boxes"],
        coco["n_predicted_boxes"],
        coco["max_detections"],
        coco["reason"],
    ) == (3, 2, 2, 100, None)
    # FROC over 3 images: (0, 0), then 0.9 -> (0, 1/2), 0.8 -> (1/3, 1/2): 1/2 at every FP rate.
    froc = result["froc"]
    assert froc["fp_per_image"] == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert froc["sensitivities"] == [0.5] * 7 and froc["score"] == 0.5
    assert len(froc["sensitivity_intervals"]) == 7 and froc["score_interval"][0] <= 0.5 <= froc["score_interval"][1]
    assert (froc["iou_threshold"], froc["n_truth_boxes"], froc["reason"]) == (0.4, 2, None)
    assert (result["image_auc"], result["ece"]) == (None, None)  # no --probabilities


def test_cli_json_image_auc_and_ece_with_probabilities(
    cli_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels, submission = cli_files
    (tmp_path / "p.csv").write_text("patientId,probability\npos,0.9\nneg,0.3\n")  # quiet has none
    common = ["--submission", str(submission), "--labels", str(labels), "--probabilities", str(tmp_path / "p.csv")]
    assert main(get_args_parser().parse_args([*common, "--json", "--bootstrap", "0"])) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    # pos (positive) 0.9 ranks above neg 0.3: AUC 1. ECE: bin 9 gap |1 - 0.9|, bin 3 gap |0 - 0.3|, weight 1/2 each -> 0.2.
    assert result["image_auc"] == {"value": 1.0, "interval": None, "reason": None, "n_images": 2, "n_positive": 1}
    assert (
        result["ece"]["value"] == pytest.approx(0.2)
        and result["ece"]["bins"] == 10
        and result["ece"]["interval"] is None
    )
    assert result["coco"]["ap_interval"] is None  # --bootstrap 0: no intervals
    assert (
        "1 of 3 labelled patient(s) have no row in" in captured.err
        and "left out of the image AUC and ECE" in captured.err
    )
    assert main(get_args_parser().parse_args(common)) == 0
    table = capsys.readouterr().out
    assert "image AUC          1.0000" in table and "ECE (10 bins)      0.2000" in table


def test_cli_table(cli_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    labels, submission = cli_files
    assert main(get_args_parser().parse_args(["--submission", str(submission), "--labels", str(labels)])) == 0
    out = capsys.readouterr().out
    # Without the filter pos has TP 1, FP 1, FN 1 at every threshold: 1/3; neg 0 -> mAP 1/6.
    assert "mAP          0.1667 [0.0000, 0.3333]   images scored 2 / 3" in out  # 3 patients resampled: 0 to 1/3
    assert "specificity  0.5000" in out
    assert "0.40      0.1667        1        2        1" in out  # FP: pos 1 + neg 1
    # The other metrics come after the RSNA table. Boxes by confidence: pos 0.9 TP, neg 0.8 FP, pos 0.2 FP; 2 truth boxes.
    # Precision 1, 1/2, 1/3 at recall 1/2: envelope 1 up to recall 0.50 (51 points), then 0 -> 51/101 = 0.5050.
    assert out.index("mAP ") < out.index("IoU >  precision") < out.index("Beside it (95% intervals over patients):")
    assert "COCO AP@[.50:.95]  0.5050 [" in out and "COCO AP40          0.5050 [" in out
    # FROC: (0, 1/2), then 1/3 and 2/3 FP per image, still 1/2: the score is 0.5.
    assert "FROC score         0.5000 [" in out
    assert "  sensitivity       0.500  0.500" in out
    assert "image AUC" not in out  # no --probabilities


def test_cli_rejects_min_confidence_out_of_range(
    cli_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    labels, submission = cli_files
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(
            ["--submission", str(submission), "--labels", str(labels), "--min-confidence", "1.5"]
        )
    assert "argument --min-confidence: must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_cli_raises_domain_error_for_bad_submission(cli_files: tuple[Path, Path], tmp_path: Path) -> None:
    labels, _ = cli_files
    args = get_args_parser().parse_args(["--submission", str(tmp_path / "missing.csv"), "--labels", str(labels)])
    with pytest.raises(SubmissionError, match=r"missing\.csv: file not found"):
        main(args)


def test_cli_slices_in_the_table_and_the_json(
    cli_files: tuple[Path, Path], annotations_json: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels, submission = cli_files
    common = [
        "--submission",
        str(submission),
        "--labels",
        str(labels),
        "--by",
        "sex,age_band",
        "--metadata",
        str(annotations_json),
    ]
    assert main(get_args_parser().parse_args(common)) == 0
    table = capsys.readouterr().out
    assert "sex F" in table and "age_band 60+" in table and "95% interval" in table
    assert main(get_args_parser().parse_args([*common, "--json"])) == 0
    report = json.loads(capsys.readouterr().out)
    by_sex = [item for item in report["slices"] if item["by"] == "sex"]
    assert sum(item["n_images"] for item in by_sex) == report["n_images"]
    assert report["map_interval"] is not None and all(item["map_interval"] is not None for item in report["slices"])


def test_cli_by_needs_metadata_and_known_keys(cli_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    labels, submission = cli_files
    args = get_args_parser().parse_args(["--submission", str(submission), "--labels", str(labels), "--by", "sex"])
    with pytest.raises(SubmissionError, match="--by needs --metadata"):
        main(args)
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--submission", str(submission), "--labels", str(labels), "--by", "sex,height"])
    assert (
        "expected a comma-separated list of view_position, sex, age_band, got 'sex,height'" in capsys.readouterr().err
    )
