"""PredictionString and submission CSV: formatting, parsing, round trips and every malformed input."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from lungdet.errors import SubmissionError
from lungdet.submission.prediction_string import (
    Prediction,
    format_prediction_string,
    keep_confident,
    parse_prediction_string,
    read_submission,
    write_submission,
)


def make_prediction(*groups: tuple[float, float, float, float, float]) -> Prediction:
    """A Prediction from ``(confidence, x, y, width, height)`` groups."""
    array = np.array(groups, dtype=np.float64).reshape(-1, 5)
    return Prediction.from_arrays(array[:, 0], array[:, 1:])


def assert_same(actual: Prediction, expected: Prediction) -> None:
    np.testing.assert_array_equal(actual.scores, expected.scores)
    np.testing.assert_array_equal(actual.boxes, expected.boxes)


# --- format -------------------------------------------------------------------------------------


def test_format_sorts_by_descending_confidence_and_rounds() -> None:
    prediction = make_prediction((0.5, 1, 2, 3, 4), (0.91234, 10.26, 20, 30, 40.04))
    assert format_prediction_string(prediction) == "0.9123 10.3 20.0 30.0 40.0 0.5000 1.0 2.0 3.0 4.0"


def test_format_keeps_ties_in_given_order() -> None:
    prediction = make_prediction((0.5, 1, 1, 1, 1), (0.9, 2, 2, 2, 2), (0.5, 3, 3, 3, 3))
    assert format_prediction_string(prediction, decimals=0) == "0.9000 2 2 2 2 0.5000 1 1 1 1 0.5000 3 3 3 3"


def test_format_empty_is_empty_string() -> None:
    assert format_prediction_string(Prediction.empty()) == ""


def test_format_refuses_what_parse_would_reject() -> None:
    with pytest.raises(
        SubmissionError, match=r"patientId abc: PredictionString box 1 has confidence 2\.5, outside \[0, 1\]"
    ):
        format_prediction_string(make_prediction((2.5, 0, 0, 1, 1)), where="patientId abc")


def test_from_arrays_rejects_unpaired_scores() -> None:
    with pytest.raises(ValueError, match="got 2 scores for 1 boxes"):
        Prediction.from_arrays([0.5, 0.6], [[0, 0, 1, 1]])


# --- parse --------------------------------------------------------------------------------------


def test_parse_reads_groups_in_string_order() -> None:
    parsed = parse_prediction_string(" 0.5 1 2 3 4   0.9 10.5 20 30 40 ")
    assert_same(parsed, make_prediction((0.5, 1, 2, 3, 4), (0.9, 10.5, 20, 30, 40)))


@pytest.mark.parametrize("text", ["", "   ", None, math.nan])
def test_parse_empty_means_no_boxes(text: str | float | None) -> None:
    parsed = parse_prediction_string(text)
    assert parsed.scores.shape == (0,)
    assert parsed.boxes.shape == (0, 4)


def test_round_trip_is_exact_after_rounding() -> None:
    prediction = make_prediction((0.3, 100.04, 200.06, 50.0, 60.0), (0.87654, 1.0, 2.0, 3.0, 4.0))
    parsed = parse_prediction_string(format_prediction_string(prediction))
    # Descending confidence, confidence to 4 decimals, coordinates to 1.
    assert_same(parsed, make_prediction((0.8765, 1.0, 2.0, 3.0, 4.0), (0.3, 100.0, 200.1, 50.0, 60.0)))
    assert format_prediction_string(parsed) == format_prediction_string(prediction)


def test_round_trip_empty() -> None:
    assert_same(parse_prediction_string(format_prediction_string(Prediction.empty())), Prediction.empty())


def test_zero_size_box_and_negative_corner_are_allowed() -> None:
    parsed = parse_prediction_string("0.5 -3 -4 0 0")
    assert_same(parsed, make_prediction((0.5, -3, -4, 0, 0)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.5 1 2 3", r"row 7 \(patientId abc\): PredictionString has 4 tokens, not a multiple of 5"),
        ("0.5 1 2 3 4 0.9 1 2 3", r"row 7 \(patientId abc\): PredictionString has 9 tokens"),
        ("0.5 1 2 3 4 0.9 1 2,5 3 4", r"token 8 \('2,5', in box 2\) is not a number"),
        (
            "0.5 1 2 -3 4",
            r"row 7 \(patientId abc\): PredictionString box 1 has width -3\.0 and height 4\.0; they must be >= 0",
        ),
        ("0.5 1 2 3 -4", r"box 1 has width 3\.0 and height -4\.0"),
        ("nan 1 2 3 4", r"box 1 has a non-finite value \[nan, 1\.0, 2\.0, 3\.0, 4\.0\]"),
        ("0.5 1 2 3 4 0.5 inf 2 3 4", r"box 2 has a non-finite value"),
        ("1.5 1 2 3 4", r"box 1 has confidence 1\.5, outside \[0, 1\]"),
        ("-0.1 1 2 3 4", r"box 1 has confidence -0\.1, outside \[0, 1\]"),
    ],
)
def test_parse_rejects_malformed(text: str, message: str) -> None:
    with pytest.raises(SubmissionError, match=message):
        parse_prediction_string(text, where="submission.csv row 7 (patientId abc)")


# --- submission CSV -----------------------------------------------------------------------------


def test_write_then_read_submission(tmp_path: Path) -> None:
    path = tmp_path / "out" / "submission.csv"
    predictions = {
        "b-patient": make_prediction((0.25, 1, 2, 3, 4), (0.75, 5, 6, 7, 8)),
        "a-patient": Prediction.empty(),
    }
    write_submission(path, predictions)

    assert path.read_text(encoding="utf-8") == (
        "patientId,PredictionString\nb-patient,0.7500 5.0 6.0 7.0 8.0 0.2500 1.0 2.0 3.0 4.0\na-patient,\n"
    )
    read = read_submission(path)
    assert list(read) == ["b-patient", "a-patient"]
    assert_same(read["b-patient"], make_prediction((0.75, 5, 6, 7, 8), (0.25, 1, 2, 3, 4)))
    assert_same(read["a-patient"], Prediction.empty())
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temporary file left


def write_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "submission.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_read_skips_blank_lines_and_tolerates_byte_order_mark(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "\ufeffpatientId,PredictionString\n\nabc,0.5 1 2 3 4\n\n")
    assert_same(read_submission(path)["abc"], make_prediction((0.5, 1, 2, 3, 4)))


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SubmissionError, match=r"nope\.csv: file not found; check the --submission path"):
        read_submission(tmp_path / "nope.csv")


def test_read_empty_file(tmp_path: Path) -> None:
    message = r"submission\.csv: the file is empty; expected the header patientId,PredictionString"
    with pytest.raises(SubmissionError, match=message):
        read_submission(write_csv(tmp_path, ""))


@pytest.mark.parametrize(
    "header",
    ["patientId,predictionString", "patientId", "patientId,PredictionString,Target", "id,PredictionString"],
)
def test_read_rejects_bad_header(tmp_path: Path, header: str) -> None:
    found = re.escape(str(header.split(",")))
    message = rf"header has columns {found}, expected exactly \['patientId', 'PredictionString'\]"
    with pytest.raises(SubmissionError, match=message):
        read_submission(write_csv(tmp_path, f"{header}\nabc,\n"))


def test_read_names_line_and_patient_of_malformed_string(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "patientId,PredictionString\nabc,\ndef,0.5 1 2 3\n")
    with pytest.raises(
        SubmissionError, match=r"submission\.csv line 3 \(patientId def\): PredictionString has 4 tokens"
    ):
        read_submission(path)


def test_read_rejects_duplicate_patient_naming_both_lines(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "patientId,PredictionString\nabc,0.5 1 2 3 4\ndef,\nabc,0.6 1 2 3 4\n")
    message = r"submission\.csv line 4: patientId abc also appears on line 2; Kaggle allows one row per patient"
    with pytest.raises(SubmissionError, match=message):
        read_submission(path)


def test_read_rejects_comma_separated_boxes(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "patientId,PredictionString\nabc,0.5 1 2 3 4,0.6 1 2 3 4\n")
    with pytest.raises(SubmissionError, match=r"submission\.csv line 2: 3 fields, expected 2"):
        read_submission(path)


def test_read_rejects_empty_patient_id(tmp_path: Path) -> None:
    with pytest.raises(SubmissionError, match=r"submission\.csv line 2: empty patientId"):
        read_submission(write_csv(tmp_path, "patientId,PredictionString\n,0.5 1 2 3 4\n"))


def test_keep_confident_drops_low_scores() -> None:
    prediction = Prediction.from_arrays([0.9, 0.2, 0.5], [[0, 0, 1, 1], [1, 1, 1, 1], [2, 2, 1, 1]])
    kept = keep_confident(prediction, min_confidence=0.5)
    np.testing.assert_allclose(kept.scores, [0.9, 0.5])
    np.testing.assert_allclose(kept.boxes[:, 0], [0, 2])
