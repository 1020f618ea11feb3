"""Tests for detection/image_head.py and its path through training, prediction and the serve reply."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional

from lungdet.detection.config import load_config
from lungdet.detection.image_head import IMAGE_LOSS, IMAGE_PROBABILITY, has_image_head
from lungdet.detection.model import build_model

IMAGES = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(seed)) for seed in range(2)]


def targets(*, masks: bool = False) -> list[dict[str, torch.Tensor]]:
    """One image with a box, one without."""
    positive = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])}
    negative = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    if masks:
        positive["masks"], negative["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8), torch.zeros(0, 64, 64, dtype=torch.uint8)
    return [positive, negative]


def model_with_head(architecture: str, *, loss_weight: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(0)
    config = load_config(None, [f"model.architecture={architecture}", "model.pretrained=none", "model.image_size=64", "model.image_head=true"])
    return build_model(config.model, image_loss_weight=loss_weight)


@pytest.mark.parametrize("architecture", ["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn"])
def test_every_family_gets_the_image_loss_and_probability(architecture: str) -> None:
    model = model_with_head(architecture, loss_weight=2.0).train()
    captured = {}
    model.image_head.register_forward_hook(lambda module, args, logits: captured.update(logits=logits.detach()))
    losses = model(IMAGES, targets(masks=architecture.startswith("mask")))
    expected = 2.0 * functional.binary_cross_entropy_with_logits(captured["logits"], torch.tensor([1.0, 0.0]))
    assert losses[IMAGE_LOSS].item() == pytest.approx(expected.item(), rel=1e-6)
    assert len(losses) > 1  # the detector's own losses are still there
    model.eval()
    with torch.no_grad():
        outputs = model(IMAGES)
    probabilities = [float(output[IMAGE_PROBABILITY]) for output in outputs]
    assert all(0.0 < value < 1.0 for value in probabilities)
    assert "boxes" in outputs[0] and "scores" in outputs[0]


def test_the_head_learns_which_image_has_a_box() -> None:
    # In training mode: an untrained backbone's eval-mode batch norm shrinks every feature to nothing.
    model = model_with_head("fasterrcnn_mobilenet_v3_large_fpn").train()
    logits = {}
    model.image_head.register_forward_hook(lambda module, args, output: logits.update(last=output.detach()))
    optimizer = torch.optim.SGD(model.image_head.parameters(), lr=0.5)
    first = None
    for _ in range(30):
        loss = model(IMAGES, targets())[IMAGE_LOSS]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 2
    positive, negative = logits["last"].tolist()
    assert positive > 0 > negative  # probability above 0.5 for the image with a box, below for the other


def test_a_copy_predicts_with_its_own_head() -> None:
    """The EMA is a deep copy: its hooks must read its own backbone's features, not the original's."""
    model = model_with_head("fasterrcnn_mobilenet_v3_large_fpn").eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.image_head.mlp[3].bias.fill_(10.0)  # the copy now calls everything positive
        original = [float(output[IMAGE_PROBABILITY]) for output in model(IMAGES)]
        copied = [float(output[IMAGE_PROBABILITY]) for output in twin(IMAGES)]
    assert all(value > 0.99 for value in copied) and all(value < 0.99 for value in original)
    assert "_lungdet_top_level" not in model.backbone.__dict__  # nothing left behind after a forward


def test_state_dict_with_and_without_the_head() -> None:
    with_head = model_with_head("fasterrcnn_mobilenet_v3_large_fpn")
    config = load_config(None, ["model.architecture=fasterrcnn_mobilenet_v3_large_fpn", "model.pretrained=none", "model.image_size=64"])
    plain = build_model(config.model)
    head_keys = {key for key in with_head.state_dict() if key.startswith("image_head.")}
    assert head_keys == {"image_head.mlp.0.weight", "image_head.mlp.0.bias", "image_head.mlp.3.weight", "image_head.mlp.3.bias"}
    assert set(with_head.state_dict()) - head_keys == set(plain.state_dict())
    assert has_image_head(with_head) and not has_image_head(plain)


# --- through training, predict and the serve reply ----------------------------------------------


@pytest.fixture(scope="module")
def head_run(tmp_path_factory: pytest.TempPathFactory, make_tiny_dataset: Callable[[Path], Path], tiny_model_overrides: tuple[str, ...]) -> dict[str, Any]:
    from lungdet.detection.train import BEST_CHECKPOINT, train

    root = tmp_path_factory.mktemp("head")
    coco = make_tiny_dataset(root)
    overrides = [
        "model.architecture=fasterrcnn_mobilenet_v3_large_fpn", *tiny_model_overrides, "model.image_head=true", "optim.image_loss_weight=0.5",
        "data.batch_size=2", "optim.epochs=1", "max_minutes=0", "device=cpu",
    ]
    train(load_config(None, overrides), coco, root / "run", progress=False)
    return {"root": root, "checkpoint": root / "run" / BEST_CHECKPOINT}


def test_training_reports_the_auc_and_stores_the_cut_off(head_run: dict[str, Any]) -> None:
    metrics = (head_run["checkpoint"].parent / "metrics.csv").read_text().splitlines()
    header, row = metrics[0].split(","), metrics[1].split(",")
    values = dict(zip(header, row))
    assert "loss_image" in values and "val_auc" in values and "val_image_threshold" in values
    checkpoint = torch.load(head_run["checkpoint"], weights_only=True)
    assert checkpoint["image_threshold"] == pytest.approx(float(values["val_image_threshold"]))


def test_predict_writes_probabilities_and_raw_rows_carry_them(head_run: dict[str, Any], rsna_sample_dir: Path, tmp_path: Path) -> None:
    from lungdet.detection.predict import get_args_parser, main
    from lungdet.submission.raw_predictions import read_raw_predictions

    inputs = [str(path) for path in sorted(rsna_sample_dir.glob("*.dcm"))[:3]]
    args = ["--checkpoint", str(head_run["checkpoint"]), "--input", *inputs, "--device", "cpu", "--no-progress", "--tta", "hflip"]
    assert main(get_args_parser().parse_args([*args, "--probabilities", str(tmp_path / "p.csv"), "--raw", str(tmp_path / "raw.csv")])) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "patientId,probability" and len(lines) == 4
    raw = read_raw_predictions(tmp_path / "raw.csv")
    assert all(row.probability is not None for row in raw)
    by_patient: dict[str, list[float]] = {}
    for row in raw:
        by_patient.setdefault(row.patient_id, []).append(row.probability)
    for line in lines[1:]:
        patient, value = line.split(",")
        assert float(value) == pytest.approx(np.mean(by_patient[patient]), abs=1e-5)  # the mean over both passes


def test_probabilities_from_a_checkpoint_without_a_head_are_refused(serving_checkpoint: Path, rsna_sample_dir: Path, tmp_path: Path) -> None:
    from lungdet.errors import LungdetError
    from lungdet.detection.predict import get_args_parser, main

    args = get_args_parser().parse_args(
        ["--checkpoint", str(serving_checkpoint), "--input", str(next(rsna_sample_dir.glob("*.dcm"))), "--probabilities", str(tmp_path / "p.csv"), "--device", "cpu"]
    )
    with pytest.raises(LungdetError, match=r"no image-level head \(trained without model.image_head: true\)"):
        main(args)
    assert not (tmp_path / "p.csv").exists()


def test_the_serve_reply_takes_its_verdict_from_the_head(head_run: dict[str, Any], rsna_sample_dir: Path) -> None:
    from lungdet.detection.detect import detect_bytes, detection_json
    from lungdet.detection.detector import load_detector
    from lungdet.server.schemas import DetectReply

    detector = load_detector(head_run["checkpoint"], device="cpu")
    assert detector.image_threshold is not None
    detection = detect_bytes(detector, next(rsna_sample_dir.glob("*.dcm")).read_bytes())
    reply = detection_json(detection, detector_info=detector.info)
    DetectReply.model_validate(reply)
    assert reply["label"]["source"] == "image_head"
    positive = detection.probability >= detector.image_threshold
    assert reply["label"]["name"] == ("Lung Opacity" if positive else "No Lung Opacity")
    assert reply["label"]["confidence"] == pytest.approx(round(100 * (detection.probability if positive else 1 - detection.probability), 2))
    assert reply["model"]["image_threshold"] == detector.image_threshold
