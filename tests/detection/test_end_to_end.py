"""The pipeline learns: synth -> convert -> train on CPU -> predict DICOMs -> RSNA score.

A MobileNetV3-FPN Faster R-CNN trained from scratch for a fixed number of steps (five epochs
of 200 images, about two minutes on a 2-core CPU) must beat the same architecture untrained, on
held-out synthetic DICOMs scored with the official metric through ``predict_dicoms`` (original
pixel space). Measured on the reference machine (2 cores, torch 2.14.1): at six epochs, trained
mAP 0.318 (validation 0.394) in fp32 on 2026-11-22 and 0.256 (validation 0.223) in bf16, which
``amp: auto`` picks on that CPU, on 2026-11-27; at five epochs (since 2026-12-03, to keep the
suite under ten minutes), untrained 0.0035, trained 0.288 (validation 0.203) on that day's machine. Four
epochs are not enough (trained 0.046). The assertions leave a wide margin below the trained
figure while still failing if training stops learning.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.labels import read_labels
from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.data_tools.to_coco import ConvertOptions, convert_dataset
from lungdet.detection.config import load_config
from lungdet.detection.detector import load_trained_model
from lungdet.detection.ensemble import predict_dicoms
from lungdet.detection.model import build_model
from lungdet.detection.train import BEST_CHECKPOINT, seed_everything, train
from lungdet.submission.score import score_dataset

TRAIN_OVERRIDES = [
    "model.pretrained=none",  # tests never depend on downloads
    "optim.epochs=5",  # fixed steps, not max_minutes: the result must not depend on machine speed (four do not learn enough)
    "max_minutes=0",
    "seed=0",
]


def held_out_map(
    model: torch.nn.Module, images_dir, labels_csv, *, image_size: int, score_threshold: float, preprocessing=None
) -> float:
    predictions, bad = predict_dicoms(
        model,
        find_dicoms(images_dir),
        image_size=image_size,
        device=torch.device("cpu"),
        score_threshold=score_threshold,
        preprocessing=preprocessing,
        progress=False,
    )
    assert bad == []
    truth = {patient_id: labels.boxes for patient_id, labels in read_labels(labels_csv).items()}
    return score_dataset(truth, predictions).map


@pytest.mark.slow
def test_training_beats_an_untrained_model_on_held_out_dicoms(tmp_path):
    train_set = write_synthetic_dataset(tmp_path / "synth_train", count=200, seed=11, positive_fraction=0.5)
    held_out = write_synthetic_dataset(tmp_path / "synth_test", count=40, seed=12, positive_fraction=0.5)
    labels = read_labels(train_set.labels_csv)
    report = convert_dataset(
        train_set.images_dir, labels, tmp_path / "coco", ConvertOptions(image_size=256, folds=5, seed=0), progress=False
    )
    assert report.converted == 200 and report.bad_files == []

    config = load_config("fasterrcnn_mobilenet_cpu", TRAIN_OVERRIDES)
    seed_everything(0)
    untrained = build_model(config.model).eval()
    untrained_map = held_out_map(
        untrained, held_out.images_dir, held_out.labels_csv, image_size=256, score_threshold=0.5
    )

    best = train(config, tmp_path / "coco", tmp_path / "run", progress=False)
    model, _, checkpoint = load_trained_model(tmp_path / "run" / BEST_CHECKPOINT, device=torch.device("cpu"))
    trained_map = held_out_map(
        model,
        held_out.images_dir,
        held_out.labels_csv,
        image_size=256,
        score_threshold=checkpoint["score_threshold"],
        preprocessing=checkpoint["preprocessing"],
    )
    print(f"untrained mAP {untrained_map:.4f}, trained mAP {trained_map:.4f}, validation mAP {best['val_map']:.4f}")

    assert untrained_map < 0.05
    assert trained_map > 0.10
    assert trained_map > untrained_map + 0.08
    assert np.isfinite(best["loss"])
