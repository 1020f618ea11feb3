"""Tests for detection/detect.py: the single-image reply shared by lungdet serve and lungdet predict --json."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungdet.data_tools.image_io import XrayImage
from lungdet.detection.detect import (
    LABEL_NEGATIVE,
    LABEL_POSITIVE,
    Detection,
    annotated_png,
    detect_bytes,
    detection_json,
    image_label,
    preview_jpeg,
    upload_id,
)
from lungdet.detection.predict import get_args_parser, main
from lungdet.errors import LungdetError
from lungdet.submission.prediction_string import Prediction, format_prediction_string, read_submission

INFO = {
    "architecture": "fasterrcnn_mobilenet_v3_large_fpn",
    "image_size": 128,
    "checkpoint_sha256": "ab" * 32,
    "score_threshold": 0.5,
}


def detection_of(scores: list[float], boxes: list[list[float]], *, width: int = 200, height: int = 100) -> Detection:
    image = XrayImage(pixels=np.zeros((height, width), dtype=np.uint8), format="png")
    return Detection(
        upload_id="0123456789abcdef", image=image, prediction=Prediction.from_arrays(scores, boxes), elapsed_ms=12.34
    )


# --- the verdict --------------------------------------------------------------------------------


def test_without_a_head_the_verdict_follows_the_boxes_and_claims_no_percentage() -> None:
    prediction = Prediction.from_arrays([0.3, 0.7], [[0, 0, 1, 1], [0, 0, 2, 2]])
    positive = {
        "name": LABEL_POSITIVE,
        "confidence": None,
        "probability": None,
        "calibrated": False,
        "source": "max_box",
    }
    negative = {**positive, "name": LABEL_NEGATIVE}
    assert image_label(prediction, score_threshold=0.5) == positive
    assert image_label(prediction, score_threshold=0.7) == positive
    assert image_label(prediction, score_threshold=0.71) == negative
    # No box at all: "No Lung Opacity", and not "100%" (the model never said how sure it is).
    assert image_label(Prediction.empty(), score_threshold=0.5) == negative


def test_with_a_head_the_verdict_states_the_probability() -> None:
    prediction = Prediction.from_arrays([0.9], [[0, 0, 1, 1]])
    label = image_label(prediction, score_threshold=0.5, probability=0.3, image_threshold=0.25, calibrated=True)
    assert label == {
        "name": LABEL_POSITIVE,
        "confidence": 30.0,
        "probability": 30.0,
        "calibrated": True,
        "source": "image_head",
    }
    label = image_label(Prediction.empty(), score_threshold=0.5, probability=0.12345, image_threshold=0.25)
    assert label == {
        "name": LABEL_NEGATIVE,
        "confidence": 87.66,
        "probability": 12.35,
        "calibrated": False,
        "source": "image_head",
    }


# --- the reply ----------------------------------------------------------------------------------


def test_detection_json_filters_rounds_and_orders_like_the_submission() -> None:
    detection = detection_of([0.41234, 0.91236, 0.6], [[10.04, 20, 30, 40], [100, 50.06, 50, 25], [0, 0, 200, 100]])
    reply = detection_json(detection, detector_info=INFO)
    assert reply["id"] == "0123456789abcdef"
    assert reply["label"] == {
        "name": LABEL_POSITIVE,
        "confidence": None,
        "probability": None,
        "calibrated": False,
        "source": "max_box",
    }
    assert reply["min_confidence"] == 50.0
    # Boxes at or above the checkpoint's 0.5, most confident first, with the PredictionString's rounding.
    assert reply["boxes"] == [
        {"x": 100.0, "y": 50.1, "width": 50.0, "height": 25.0, "confidence": 0.9124},
        {"x": 0.0, "y": 0.0, "width": 200.0, "height": 100.0, "confidence": 0.6},
    ]
    assert reply["prediction_string"] == "0.9124 100.0 50.1 50.0 25.0 0.6000 0.0 0.0 200.0 100.0"
    # Fractions of a 200 x 100 image, confidences in percent.
    assert reply["custom_labels"] == [
        {
            "name": LABEL_POSITIVE,
            "confidence": 91.24,
            "geometry": {"bounding_box": {"left": 0.5, "top": 0.501, "width": 0.25, "height": 0.25}},
        },
        {
            "name": LABEL_POSITIVE,
            "confidence": 60.0,
            "geometry": {"bounding_box": {"left": 0.0, "top": 0.0, "width": 1.0, "height": 1.0}},
        },
    ]
    assert reply["image"] == {
        "format": "png",
        "width": 200,
        "height": 100,
        "view_position": None,
        "sex": None,
        "age": None,
        "notes": [],
    }
    assert reply["model"] == INFO
    assert reply["elapsed_ms"] == 12.3
    assert "not a diagnostic device" in reply["notice"]
    json.dumps(reply)  # plain JSON types only


def test_min_confidence_filters_boxes_but_not_the_verdict() -> None:
    detection = detection_of([0.2, 0.45], [[0, 0, 10, 10], [5, 5, 10, 10]])
    everything = detection_json(detection, detector_info=INFO, min_confidence=0.0)
    assert [box["confidence"] for box in everything["boxes"]] == [0.45, 0.2]
    assert (
        everything["label"]["name"] == LABEL_NEGATIVE and everything["label"]["confidence"] is None
    )  # the checkpoint's 0.5 decides
    assert everything["min_confidence"] == 0.0
    assert (
        detection_json(detection, detector_info=INFO, min_confidence=0.45)["prediction_string"]
        == "0.4500 5.0 5.0 10.0 10.0"
    )
    assert detection_json(detection, detector_info=INFO)["boxes"] == []


def test_min_confidence_compares_the_confidence_as_shown() -> None:
    # 0.14386 is shown as 0.1439: typing the shown 14.39 % back keeps it, though the raw value is below.
    detection = detection_of([0.14386, 0.14384], [[0, 0, 10, 10], [5, 5, 10, 10]])
    kept = detection_json(detection, detector_info=INFO, min_confidence=14.39 / 100)
    assert [box["confidence"] for box in kept["boxes"]] == [0.1439]
    assert kept["prediction_string"] == "0.1439 0.0 0.0 10.0 10.0"
    assert [
        box["confidence"] for box in detection_json(detection, detector_info=INFO, min_confidence=0.1438)["boxes"]
    ] == [0.1439, 0.1438]


def test_upload_id_is_the_start_of_the_sha256() -> None:
    assert upload_id(b"lungdet") == hashlib.sha256(b"lungdet").hexdigest()[:16]


# --- pictures -----------------------------------------------------------------------------------


def test_preview_is_a_shrunk_jpeg_of_the_same_shape() -> None:
    pixels = np.tile(np.arange(2048, dtype=np.uint16) % 256, (1024, 1)).astype(np.uint8)
    preview = preview_jpeg(XrayImage(pixels=pixels, format="png"))
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(preview["data"]), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert preview["media_type"] == "image/jpeg"
    assert (preview["width"], preview["height"]) == (1024, 512) and decoded.shape == (512, 1024)


def test_annotated_png_draws_only_the_boxes_kept() -> None:
    detection = detection_of([0.9, 0.1], [[20, 20, 80, 50], [150, 10, 40, 40]], width=256, height=128)
    orange = np.array([0, 140, 255])  # BGR of visualize's prediction colour

    def orange_pixels_in(png: bytes, x0: int, x1: int) -> int:
        image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (128, 256, 3)
        return int(np.all(image[:, x0:x1] == orange, axis=2).sum())

    high = annotated_png(detection, min_confidence=0.5)
    assert orange_pixels_in(high, 18, 102) > 0
    assert orange_pixels_in(high, 148, 192) == 0
    assert orange_pixels_in(annotated_png(detection, min_confidence=0.05), 148, 192) > 0


# --- the real model, and the CLI ----------------------------------------------------------------


def test_detect_bytes_gives_the_submission_boxes(
    serving_detector, serving_checkpoint: Path, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    """An image gets the same boxes from predict --json (serve's code) as from a folder submission."""
    paths = sorted(rsna_sample_dir.glob("*.dcm"))[:3]
    folder = tmp_path / "dicoms"
    folder.mkdir()
    for path in paths:
        (folder / path.name).write_bytes(path.read_bytes())
    args = get_args_parser().parse_args(
        [
            "--checkpoint",
            str(serving_checkpoint),
            "--dicom-dir",
            str(folder),
            "--out",
            str(tmp_path / "s.csv"),
            "--batch-size",
            "1",
            "--device",
            "cpu",
            "--amp",
            "none",
            "--no-progress",
        ]
    )
    assert main(args) == 0
    submission = read_submission(tmp_path / "s.csv")
    boxes_seen = 0
    for path in paths:
        reply = detection_json(detect_bytes(serving_detector, path.read_bytes()), detector_info=serving_detector.info)
        assert reply["prediction_string"] == format_prediction_string(submission[path.stem]), path.name
        boxes_seen += len(reply["boxes"])
    assert boxes_seen > 0  # the checkpoint does find boxes on these files, so the comparison means something


def test_predict_json_prints_a_line_per_input_in_order(
    serving_checkpoint: Path, rsna_sample_dir: Path, tmp_path: Path, capsys
) -> None:
    good = sorted(rsna_sample_dir.glob("*.dcm"))[0]
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an x-ray\n" * 20)
    png = tmp_path / "chest.png"
    cv2.imwrite(str(png), np.full((300, 200), 90, dtype=np.uint8))
    args = get_args_parser().parse_args(
        [
            "--checkpoint",
            str(serving_checkpoint),
            "--input",
            str(good),
            str(text_file),
            str(png),
            "--json",
            "--device",
            "cpu",
            "--amp",
            "none",
        ]
    )
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 3
    assert lines[0]["id"] == hashlib.sha256(good.read_bytes()).hexdigest()[:16]
    assert lines[0]["image"]["format"] == "dicom" and lines[0]["model"]["score_threshold"] == 0.3
    assert lines[1] == {
        "error": {
            "kind": "not_an_image",
            "message": f"{text_file}: is not a format lungdet knows; lungdet reads DICOM (with the 'DICM' marker at byte 128), PNG and JPEG; export the X-ray in one of those",
        }
    }
    assert lines[2]["image"] == {
        "format": "png",
        "width": 200,
        "height": 300,
        "view_position": None,
        "sex": None,
        "age": None,
        "notes": [],
    }
    assert f"unreadable: {text_file}" in captured.err


def test_predict_input_writes_a_submission_from_any_format(
    serving_checkpoint: Path, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    good = sorted(rsna_sample_dir.glob("*.dcm"))[1]
    png = tmp_path / "chest.png"
    cv2.imwrite(str(png), np.full((300, 200), 90, dtype=np.uint8))
    out = tmp_path / "s.csv"
    args = get_args_parser().parse_args(
        ["--checkpoint", str(serving_checkpoint), "--input", str(good), str(png), "--out", str(out), "--device", "cpu"]
    )
    assert main(args) == 0
    assert list(read_submission(out)) == sorted([good.stem, "chest"])


def test_predict_needs_one_source(capsys) -> None:
    for extra, message in (
        (["--out", "s.csv"], "one of the arguments --dicom-dir --image-dir --input --input-list is required"),
        (["--input", "a.dcm", "--dicom-dir", "d", "--json"], "argument --dicom-dir: not allowed with argument --input"),
    ):
        with pytest.raises(SystemExit):
            get_args_parser().parse_args(["--checkpoint", "c.pt", *extra])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            [],
            "nothing to write: give --out submission.csv, --raw raw.csv, --probabilities probs.csv, --dicom-out DIR, or --json",
        ),
        (["--json", "--out", "s.csv"], "--json prints to the screen; drop --out/--raw"),
        (["--json", "--tta", "hflip"], "--json answers as lungdet serve does, with one checkpoint and no --tta"),
        (
            ["--json", "--checkpoint", "a.pt", "b.pt"],
            "--json answers as lungdet serve does, with one checkpoint and no --tta",
        ),
    ],
)
def test_predict_refuses_outputs_that_cannot_work_before_loading(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    args = get_args_parser().parse_args(
        ["--checkpoint", str(tmp_path / "never-read.pt"), "--input", str(tmp_path / "x.dcm"), *extra]
    )
    with pytest.raises(LungdetError, match=re.escape(message)):
        main(args)
