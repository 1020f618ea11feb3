"""Tests for detection/pretrain_models.py: the SimSiam stop-gradient and loss, and the body under the detector's names."""

from __future__ import annotations

import pytest
import torch

from lungdet.detection.config import ModelConfig
from lungdet.detection.model import build_model
from lungdet.detection.pretrain import BODY_PREFIX, build_optimizer
from lungdet.detection.pretrain_models import SimSiam, build_encoder, simsiam_loss

MOBILENET = "fasterrcnn_mobilenet_v3_large_fpn"
RESNET50 = "fasterrcnn_resnet50_fpn"
SIZE = 64


def test_simsiam_targets_are_stop_gradient_and_a_few_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = SimSiam(build_encoder(MOBILENET, SIZE))
    views = torch.randint(0, 256, (4, 2, 1, SIZE, SIZE), dtype=torch.uint8)
    predictions, targets = model(views[:, 0], views[:, 1])
    assert all(prediction.requires_grad for prediction in predictions)
    # The stop-gradient: without it both branches chase each other and collapse to a constant.
    assert all(target.grad_fn is None and not target.requires_grad for target in targets)
    assert predictions[0].shape == targets[0].shape == (4, 512)

    # 6.4 per 256 images is 0.1 a step at batch 4. On one repeated batch SimSiam's loss wanders near 0 for
    # a few steps while momentum builds, then falls towards -1 (-0.8 by step 25).
    optimizer = build_optimizer(model, lr=6.4, batch_size=4)
    losses = []
    for _ in range(10):
        loss = model.loss(views, torch.zeros(4, 0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(-1.0 <= loss <= 1.0 for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02, losses


def test_simsiam_loss_is_minus_one_when_predictions_match_their_targets() -> None:
    first, second = torch.randn(3, 8), torch.randn(3, 8)
    assert simsiam_loss((first * 2, second), (first, second * 5)).item() == pytest.approx(-1.0)
    assert simsiam_loss((first, second), (-first, -second)).item() == pytest.approx(1.0)


@pytest.mark.parametrize("architecture", [MOBILENET, RESNET50])
def test_the_pretrained_body_has_the_detector_backbone_names_and_shapes(architecture: str) -> None:
    encoder = build_encoder(architecture, SIZE)
    detector = build_model(ModelConfig(architecture=architecture, image_size=SIZE, pretrained="none")).state_dict()
    body = {BODY_PREFIX + name: tensor.shape for name, tensor in encoder.body.state_dict().items()}
    assert body and all(detector[name].shape == shape for name, shape in body.items())
    assert encoder.channels == {MOBILENET: 960, RESNET50: 2048}[architecture]
