"""Tests for show/score_report.py: the page's numbers equal the metric's, the worst images, the links."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from lungdet.show.score_cli import get_args_parser, main
from lungdet.show.score_report import cut_off_curve, reliability_bins, worst_images
from lungdet.submission.prediction_string import Prediction, write_submission
from lungdet.submission.score import score_dataset

SQUARE = [0.0, 0.0, 10.0, 10.0]


def case() -> tuple[dict[str, np.ndarray], dict[str, Prediction]]:
    truth = {
        "hit": np.array([SQUARE]),
        "miss": np.array([SQUARE]),
        "alarm": np.zeros((0, 4)),
        "clear": np.zeros((0, 4)),
        "half": np.array([SQUARE, [20.0, 20.0, 10.0, 10.0]]),
    }
    predictions = {
        "hit": Prediction.from_arrays([0.9], [SQUARE]),
        "alarm": Prediction.from_arrays([0.35], [SQUARE]),
        "half": Prediction.from_arrays([0.8, 0.2], [SQUARE, [50.0, 50.0, 5.0, 5.0]]),
    }
    return truth, predictions


def test_cut_off_curve_equals_scoring_at_each_cut_off() -> None:
    truth, predictions = case()
    for cut_off, value in cut_off_curve(truth, predictions, cut_offs=(0.0, 0.3, 0.4, 0.85, 0.95)):
        assert value == pytest.approx(score_dataset(truth, predictions, min_confidence=cut_off).map), cut_off


def test_worst_images_come_worst_first_with_their_errors() -> None:
    truth, predictions = case()
    rows = worst_images(truth, predictions, count=3)
    # miss and alarm both score 0; the tie goes to patientId order (one error each).
    assert [(row.patient_id, row.score, row.missed, row.false_alarms) for row in rows] == [
        ("alarm", 0.0, 0, 1),
        ("miss", 0.0, 1, 0),
        ("half", pytest.approx(1 / 3), 1, 1),
    ]
    assert "clear" not in [row.patient_id for row in worst_images(truth, predictions)]  # not scored: nothing to show


def test_reliability_bins_by_hand() -> None:
    bins = reliability_bins([True, False, True, True], [0.05, 0.08, 0.92, 0.97], bins=10)
    assert bins == [(pytest.approx(0.065), 0.5, 2), (pytest.approx(0.945), 1.0, 2)]


def write_case_files(folder: Path) -> None:
    """The case's labels (labels.csv), submission (s.csv) and image probabilities (p.csv) in ``folder``."""
    truth, predictions = case()
    labels = ["patientId,x,y,width,height,Target"]
    for patient, boxes in truth.items():
        labels += [f"{patient},{x},{y},{w},{h},1" for x, y, w, h in boxes] or [f"{patient},,,,,0"]
    (folder / "labels.csv").write_text("\n".join(labels) + "\n")
    write_submission(folder / "s.csv", predictions)
    (folder / "p.csv").write_text("patientId,probability\nhit,0.9\nmiss,0.4\nalarm,0.6\nclear,0.1\nhalf,0.7\n")


def test_cli_writes_one_page_with_figures_and_links(tmp_path: Path, capsys) -> None:
    write_case_files(tmp_path)
    (tmp_path / "overlays").mkdir()
    args = get_args_parser().parse_args(
        [
            "--submission",
            str(tmp_path / "s.csv"),
            "--labels",
            str(tmp_path / "labels.csv"),
            "--html",
            str(tmp_path / "out" / "report.html"),
            "--probabilities",
            str(tmp_path / "p.csv"),
            "--overlays",
            str(tmp_path / "overlays"),
        ]
    )
    assert main(args) == 0
    page = (tmp_path / "out" / "report.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 5  # precision, cut-off, FROC, ROC, reliability
    titles = (
        "Precision at each IoU threshold",
        "mAP against the confidence cut-off",
        "Beside the RSNA metric",
        "FROC curve",
        "Image-level ROC",
        "Reliability",
        "The 4 worst images",
    )  # 5 patients, one unscored
    assert [page.index(title) for title in titles] == sorted(page.index(title) for title in titles)
    # The RSNA mAP is the headline: the summary line, then first in the metrics table.
    assert (
        page.index("mAP <b>")
        < page.index("Beside the RSNA metric")
        < page.index("<b>RSNA mAP</b>")
        < page.index("COCO AP@[.50:.95]")
    )
    assert '<a href="../overlays/alarm.png">alarm</a>' in page
    assert "Not a diagnostic device" in page
    assert f"wrote {tmp_path / 'out' / 'report.html'}" in capsys.readouterr().out


def test_page_shows_the_metrics_the_json_reports(tmp_path: Path, capsys) -> None:
    write_case_files(tmp_path)
    common = [
        "--submission",
        str(tmp_path / "s.csv"),
        "--labels",
        str(tmp_path / "labels.csv"),
        "--probabilities",
        str(tmp_path / "p.csv"),
        "--bootstrap",
        "200",
    ]
    assert main(get_args_parser().parse_args([*common, "--json"])) == 0
    result = json.loads(capsys.readouterr().out)
    assert main(get_args_parser().parse_args([*common, "--html", str(tmp_path / "report.html")])) == 0
    page = (tmp_path / "report.html").read_text()
    coco, froc = result["coco"], result["froc"]
    # Boxes by confidence: hit 0.9 TP, half 0.8 TP, alarm 0.35 FP, half 0.2 FP; 4 truth boxes. Precision 1, 1, 2/3, 1/2 at
    # recall 1/4, 1/2, 1/2, 1/2: recall points 0.00..0.50 (51) read 1 -> AP 51/101 at every threshold.
    assert coco["ap"] == pytest.approx(51 / 101, abs=1e-12)
    for name, key in (("COCO AP@[.50:.95]", "ap"), ("COCO AP50", "ap50"), ("COCO AP40", "ap40")):
        low, high = coco[f"{key}_interval"]
        assert f"<td>{name}</td><td>{coco[key]:.4f}</td><td>[{low:.4f}, {high:.4f}]</td>" in page
    assert f"<td>FROC score</td><td>{froc['score']:.4f}</td>" in page
    assert "".join(f"<td>{value:.3f}</td>" for value in froc["sensitivities"]) in page
    assert f"<td>image AUC</td><td>{result['image_auc']['value']:.4f}</td>" in page
    assert f"<td>ECE (10 bins)</td><td>{result['ece']['value']:.4f}</td>" in page


def test_bad_probabilities_file_fails_before_scoring(tmp_path: Path) -> None:
    from lungdet.errors import SubmissionError

    (tmp_path / "p.csv").write_text("patientId,probability\nx,1.7\n")
    args = get_args_parser().parse_args(
        [
            "--submission",
            str(tmp_path / "none.csv"),
            "--labels",
            str(tmp_path / "none.csv"),
            "--probabilities",
            str(tmp_path / "p.csv"),
        ]
    )
    with pytest.raises(SubmissionError, match=r"p.csv line 2: probability 1.7 is outside \[0, 1\]"):
        main(args)
