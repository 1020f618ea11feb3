"""Tests for detection/tta.py and the scaled passes through predict, and for multi-scale training's sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lungdet.detection.tta import PLAIN, TtaPass, hflip_back, input_size, parse_tta
from lungdet.submission.prediction_string import Prediction


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("none", ["plain"]),
        ("", ["plain"]),
        ("hflip", ["plain", "hflip"]),
        ("hflip,scale0.8,scale1.2", ["plain", "hflip", "scale0.8", "scale1.2"]),
        (" Scale1.25 , HFLIP ", ["plain", "scale1.25", "hflip"]),
    ],
)
def test_parse_tta_names_the_passes_plain_first(text: str, names: list[str]) -> None:
    passes = parse_tta(text)
    assert [tta_pass.name for tta_pass in passes] == names
    assert passes[0] == PLAIN
    assert {tta_pass.name: (tta_pass.mirror, tta_pass.scale) for tta_pass in passes}.get("scale0.8", (False, 0.8)) == (
        False,
        0.8,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "vflip",
            r"unknown pass 'vflip'; use 'none' or a comma-separated list of hflip and scaleS, e.g. hflip,scale0.8,scale1.2",
        ),
        ("scale3", r"'scale3': the scale must be in \[0.5, 2\] and not 1"),
        ("scale1", r"'scale1': the scale must be in \[0.5, 2\] and not 1"),
        ("scalex", r"'scalex' is not scaleS with a number S"),
        ("hflip,hflip", r"hflip is listed twice"),
        ("scale0.8,scale0.80", r"scale0.8 is listed twice"),
    ],
)
def test_parse_tta_refuses_what_it_cannot_run(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_tta(text)


def test_input_size_of_a_pass() -> None:
    assert input_size(256, PLAIN) == 256
    assert input_size(256, TtaPass("scale0.8", scale=0.8)) == 205
    assert input_size(256, TtaPass("scale1.2", scale=1.2)) == 307


def test_hflip_back_mirrors_x_only() -> None:
    back = hflip_back(Prediction.from_arrays([0.7], [[10, 20, 30, 40]]), width=100)
    assert back.boxes.tolist() == [[60, 20, 30, 40]] and back.scores.tolist() == [0.7]


def test_a_scaled_pass_is_the_model_run_at_that_size_with_boxes_in_the_images_pixels(
    serving_checkpoint: Path, rsna_sample_dir: Path
) -> None:
    """scale0.75 of a 128 px model equals the same weights run as a 96 px model, mapped back to the 1024 px image."""
    from lungdet.detection.detector import ModelRunner, load_detector
    from lungdet.detection.ensemble import predict_raw
    from lungdet.detection.prepared_images import read_dicom_input

    detector = load_detector(serving_checkpoint, device="cpu", amp="none")
    paths = sorted(rsna_sample_dir.glob("*.dcm"))[:3]
    rows, bad = predict_raw([detector], ["m"], paths, read=read_dicom_input, tta="scale0.75", progress=False)
    assert (
        bad == [] and [row.pass_name for row in rows] == ["plain"] * 3 + ["scale0.75"] * 3
    )  # one batch: each pass over all its images
    runner = detector.runner
    smaller = ModelRunner(
        runner.model, 96, runner.device, runner.preprocessing, runner.precision, runner.probability_map
    )
    for path, row in zip(paths, [row for row in rows if row.pass_name == "scale0.75"], strict=True):
        expected = smaller.predict_batch([read_dicom_input(path).pixels])[0].prediction
        assert len(expected.scores) > 0
        np.testing.assert_allclose(row.prediction.boxes, expected.boxes, atol=1e-3)
        np.testing.assert_allclose(row.prediction.scores, expected.scores, atol=1e-6)
        assert row.prediction.boxes[:, 0].max() > 128  # in the 1024 px image's pixels, not the model's
    assert (
        runner.model.transform.min_size[-1] == 128 and runner.model.transform.max_size == 128
    )  # put back after the pass
    assert any(
        not np.array_equal(a.prediction.scores, b.prediction.scores) for a, b in zip(rows[:3], rows[3:], strict=True)
    )  # another size, other boxes


def test_an_export_refuses_scaled_passes_with_the_fix(serving_checkpoint: Path, rsna_sample_dir: Path) -> None:
    from types import SimpleNamespace

    from lungdet.detection.ensemble import predict_raw
    from lungdet.detection.prepared_images import read_dicom_input
    from lungdet.errors import LungdetError

    export_like = SimpleNamespace(format="onnx", image_size=128, preprocessing={}, runner=object())
    with pytest.raises(
        LungdetError, match=r"an onnx export takes one input size, fixed when it was traced.*use the checkpoint"
    ):
        predict_raw(
            [export_like],
            ["m"],
            sorted(rsna_sample_dir.glob("*.dcm"))[:1],
            read=read_dicom_input,
            tta="hflip,scale0.8",
            progress=False,
        )


def test_raw_predictions_accept_scaled_pass_names(tmp_path: Path) -> None:
    from lungdet.submission.raw_predictions import (
        RawPrediction,
        is_pass_name,
        read_raw_predictions,
        write_raw_predictions,
    )

    rows = [
        RawPrediction("p", "m", name, 64, 64, Prediction.empty())
        for name in ("plain", "hflip", "scale0.8", "scale1.25")
    ]
    write_raw_predictions(tmp_path / "raw.csv", rows)
    assert [row.pass_name for row in read_raw_predictions(tmp_path / "raw.csv")] == [
        "plain",
        "hflip",
        "scale0.8",
        "scale1.25",
    ]
    assert not any(is_pass_name(name) for name in ("scale", "scalex", "scale0.80", "scale-1", "mirror"))


# --- multi-scale training ------------------------------------------------------------------------


def test_multiscale_training_draws_sizes_and_validates_at_image_size() -> None:
    from lungdet.detection.config import load_config
    from lungdet.detection.model import build_model, training_sizes
    from lungdet.errors import ConfigError

    config = load_config(
        None,
        [
            "model.architecture=fasterrcnn_mobilenet_v3_large_fpn",
            "model.pretrained=none",
            "model.image_size=128",
            "model.multiscale_train=[96,192]",
            "model.rpn_pre_nms_top_n_train=50",
            "model.rpn_post_nms_top_n_train=20",
        ],
    )
    assert training_sizes(config.model) == (96, 160, 192, 128)
    torch.manual_seed(0)
    model = build_model(config.model).train()
    seen: set[tuple[int, int]] = set()
    model.backbone.register_forward_hook(lambda module, args, output: seen.add(tuple(args[0].shape[-2:])))
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[5.0, 5.0, 60.0, 80.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    for _ in range(12):
        model(images, targets)
    assert len(seen) >= 3 and seen <= {(96, 96), (128, 128), (160, 160), (192, 192)}
    seen.clear()
    with torch.no_grad():
        model.eval()(images)
    assert seen == {(128, 128)}
    with pytest.raises(
        ConfigError, match=r"model.multiscale_train.*\[low, high\] pixels with 64 <= low <= high <= 2048"
    ):
        load_config(None, ["model.multiscale_train=[300,200]"])
