"""Tests for detection/demo.py's predict-and-score step (the whole demo runs in minutes: `make demo`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.detection.config import load_config
from lungdet.detection.demo import predict_and_score
from lungdet.detection.detector import load_trained_model
from lungdet.detection.train import BEST_CHECKPOINT, train
from lungdet.submission.prediction_string import read_submission


def test_predict_and_score_writes_the_submission_score_and_overlays_for_a_folder(
    tmp_path: Path, make_tiny_dataset: Callable[[Path], Path], tiny_model_overrides: tuple[str, ...]
) -> None:
    config = load_config(
        None,
        [
            "model.architecture=fasterrcnn_mobilenet_v3_large_fpn",
            *tiny_model_overrides,
            "data.batch_size=2",
            "optim.epochs=1",
            "device=cpu",
        ],
    )
    train(config, make_tiny_dataset(tmp_path), tmp_path / "run", progress=False)
    model, config, checkpoint = load_trained_model(tmp_path / "run" / BEST_CHECKPOINT, device=torch.device("cpu"))
    held_out = write_synthetic_dataset(tmp_path / "held_out", count=4, seed=11, positive_fraction=0.5, size=(96, 128))

    report = predict_and_score(
        model,
        checkpoint,
        held_out.images_dir,
        held_out.labels_csv,
        tmp_path / "out",
        name="synth",
        image_size=config.model.image_size,
    )

    submission = read_submission(tmp_path / "out" / "submission_synth.csv")
    assert sorted(submission) == sorted(path.stem for path in held_out.images_dir.glob("*.dcm"))
    assert report.n_images == 4 and report.n_positive == 2
    assert json.loads((tmp_path / "out" / "score_synth.json").read_text())["map"] == pytest.approx(report.map)
    assert (tmp_path / "out" / "overlays_synth" / "index.html").is_file()
    assert len(list((tmp_path / "out" / "overlays_synth").glob("*.png"))) == 4
