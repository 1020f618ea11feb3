"""Tests for detection/engine.py: one training epoch, the NaN guard, prediction over a loader and the tuned validation mAP."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lungdet.boxes import xyxy_to_xywh
from lungdet.detection.config import AugmentConfig, DataConfig, load_config
from lungdet.detection.data import build_dataloaders, collate
from lungdet.detection.engine import (
    EpochHooks,
    NonFiniteLossError,
    OptimizerStep,
    evaluate,
    predict_loader,
    train_one_epoch,
)
from lungdet.detection.model import build_model
from lungdet.errors import LungdetError

IMAGE_SIZE = 64
CPU = torch.device("cpu")
MOBILENET = "model.architecture=fasterrcnn_mobilenet_v3_large_fpn"
TORCHVISION_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


@pytest.fixture(scope="module")
def loaders(
    tmp_path_factory: pytest.TempPathFactory, make_tiny_dataset: Callable[[Path], Path]
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders of 4 + 4 synthetic 64 px images (half positive), batches of 2, no augmentation."""
    coco = make_tiny_dataset(tmp_path_factory.mktemp("engine"))
    config = DataConfig(fold=0, batch_size=2)
    no_augmentation = AugmentConfig(hflip=0.0, brightness_contrast=0.0, shift_scale_rotate=0.0)
    train_loader, val_loader = build_dataloaders(coco, config, image_size=IMAGE_SIZE, seed=0, augment=no_augmentation)
    assert len(train_loader.dataset) == len(val_loader.dataset) == 4
    return train_loader, val_loader


@pytest.fixture(scope="module")
def tiny_model(tiny_model_overrides: tuple[str, ...]) -> Callable[..., nn.Module]:
    """Return ``build(seed=0)``: a tiny MobileNetV3-FPN Faster R-CNN, its weights drawn after ``torch.manual_seed(seed)``."""

    def build(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(load_config(None, [MOBILENET, *tiny_model_overrides]).model)

    return build


def constant_schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


# --- training -----------------------------------------------------------------------------------


def test_train_one_epoch_returns_finite_mean_losses_and_counts(
    loaders: tuple[DataLoader, DataLoader], tiny_model: Callable[..., nn.Module]
) -> None:
    train_loader, _ = loaders
    model = tiny_model()
    before = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scheduler = constant_schedule(optimizer)

    progress = train_one_epoch(
        model, OptimizerStep(optimizer, scheduler, grad_clip_norm=10.0), train_loader, CPU, epoch=1, progress=False
    )
    metrics = progress.metrics()

    assert set(metrics) == {
        "loss",
        *TORCHVISION_LOSSES,
        "images",
        "seconds",
        "images_per_second",
        "data_wait_fraction",
        "stopped_early",
    }
    assert progress.batches == 2
    assert 0.0 < metrics["data_wait_fraction"] < 1.0
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["images"] == 4.0
    assert metrics["stopped_early"] == 0.0
    # The mean of the summed loss is the sum of the mean components.
    assert metrics["loss"] == pytest.approx(sum(metrics[name] for name in TORCHVISION_LOSSES))
    assert scheduler.last_epoch == 2  # stepped once per batch
    assert model.training
    assert not torch.equal(model.roi_heads.box_predictor.cls_score.weight, before)


def test_train_one_epoch_stops_after_the_step_at_which_it_is_told_to(
    loaders: tuple[DataLoader, DataLoader], tiny_model: Callable[..., nn.Module]
) -> None:
    train_loader, _ = loaders
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    metrics = train_one_epoch(
        model,
        OptimizerStep(optimizer, constant_schedule(optimizer)),
        train_loader,
        CPU,
        epoch=1,
        hooks=EpochHooks(should_stop=lambda: True),
        progress=False,
    ).metrics()
    assert metrics["images"] == 2.0
    assert metrics["stopped_early"] == 1.0


def test_accumulation_steps_the_optimizer_once_per_group_and_calls_back_after_each_step(
    loaders: tuple[DataLoader, DataLoader], tiny_model: Callable[..., nn.Module]
) -> None:
    train_loader, _ = loaders
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    scheduler = constant_schedule(optimizer)
    seen: list[int] = []
    progress = train_one_epoch(
        model,
        OptimizerStep(optimizer, scheduler, accumulate_steps=2),
        train_loader,
        CPU,
        epoch=1,
        hooks=EpochHooks(on_optimizer_step=lambda state: seen.append(state.batches)),
        progress=False,
    )
    assert (progress.batches, scheduler.last_epoch, seen) == (2, 1, [2])


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it stepped with (train_one_epoch zeroes them afterwards)."""

    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        self.stepped_with = [
            p.grad.clone() if p.grad is not None else None for group in self.param_groups for p in group["params"]
        ]
        return super().step(closure)


def test_accumulated_gradients_are_the_mean_of_the_batches_gradients(
    tiny_model: Callable[..., nn.Module], loaders: tuple[DataLoader, DataLoader]
) -> None:
    train_loader, _ = loaders
    images, targets = next(iter(train_loader))
    singles = [([images[index]], [targets[index]]) for index in range(2)]
    model = tiny_model(seed=1)
    optimizer = RecordingSGD(model.parameters(), lr=0.0)
    torch.manual_seed(5)  # the RPN and box heads sample proposals from torch's stream
    train_one_epoch(
        model,
        OptimizerStep(optimizer, constant_schedule(optimizer), accumulate_steps=2),
        singles,
        CPU,
        epoch=1,
        progress=False,
    )

    reference = tiny_model(seed=1)
    reference.train()
    torch.manual_seed(5)
    for batch_images, batch_targets in singles:
        (sum(reference(batch_images, batch_targets).values()) / 2).backward()
    expected = [p.grad for p in reference.parameters()]
    assert sum(grad is not None for grad in expected) > 10
    for got, want in zip(optimizer.stepped_with, expected, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_training_naming_epoch_and_step(
    loaders: tuple[DataLoader, DataLoader],
    tiny_model: Callable[..., nn.Module],
    monkeypatch: pytest.MonkeyPatch,
    bad: float,
) -> None:
    train_loader, _ = loaders
    model = tiny_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    monkeypatch.setattr(model, "forward", lambda images, targets=None: {"loss": torch.tensor(bad)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)

    with pytest.raises(
        NonFiniteLossError,
        match=re.escape(
            f"epoch 3, batch 1 (optimizer step 1): loss is {bad} (loss={bad}); lower optim.lr or raise optim.warmup_iters"
        ),
    ):
        train_one_epoch(
            model, OptimizerStep(optimizer, constant_schedule(optimizer)), train_loader, CPU, epoch=3, progress=False
        )

    assert issubclass(NonFiniteLossError, LungdetError)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# --- prediction and validation ------------------------------------------------------------------


def test_predict_loader_truth_is_the_dataset_boxes_in_xywh(
    loaders: tuple[DataLoader, DataLoader], tiny_model: Callable[..., nn.Module]
) -> None:
    _, val_loader = loaders
    model = tiny_model()
    truth, predictions = predict_loader(model, val_loader, CPU)
    assert not model.training
    dataset = val_loader.dataset
    assert list(truth) == [str(record.image_id) for record in dataset.records]
    assert set(predictions) == set(truth)
    for index, record in enumerate(dataset.records):
        _, target = dataset[index]
        np.testing.assert_allclose(truth[str(record.image_id)], xyxy_to_xywh(target["boxes"].numpy()))
    for prediction in predictions.values():
        assert prediction.boxes.shape == (prediction.scores.shape[0], 4)
        assert (prediction.boxes[:, 2:] >= 0).all()


def test_evaluate_reports_the_best_threshold_and_a_map_per_threshold(
    loaders: tuple[DataLoader, DataLoader], tiny_model: Callable[..., nn.Module]
) -> None:
    _, val_loader = loaders
    thresholds = [0.05, 0.5, 0.9]
    metrics = evaluate(tiny_model(), val_loader, CPU, score_thresholds=thresholds)
    assert 0.0 <= metrics["val_map"] <= 1.0
    assert metrics["val_score_threshold"] in thresholds
    per_threshold = [metrics["val_map@0.05"], metrics["val_map@0.5"], metrics["val_map@0.9"]]
    assert all(0.0 <= value <= 1.0 for value in per_threshold)
    assert metrics["val_map"] == max(per_threshold)
    assert metrics["val_map"] == metrics[f"val_map@{metrics['val_score_threshold']:g}"]
    assert metrics["val_images"] == 4.0


class MixedPrecisionLossModel(nn.Module):
    """Returns one loss in bfloat16 and one in float32, as a detector under autocast can."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0))

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"loss_half": (self.weight * 0.75).to(torch.bfloat16), "loss_full": self.weight * 0.5}


def test_losses_in_different_precisions_are_summed_and_recorded_exactly() -> None:
    model = MixedPrecisionLossModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: every batch gives the same losses
    progress = train_one_epoch(
        model,
        OptimizerStep(optimizer, constant_schedule(optimizer), grad_clip_norm=0.0),
        oracle_loader(),
        CPU,
        epoch=1,
        progress=False,
    )
    metrics = progress.metrics()
    # 2.0 * 0.75 = 1.5 is exact in bfloat16; the total is float32's 1.0 plus it.
    assert (metrics["loss_half"], metrics["loss_full"], metrics["loss"]) == (1.5, 1.0, 2.5)


class OracleModel(nn.Module):
    """Predicts the truth box on the positive image (marked by a bright top-left pixel) at 0.9, and a 0.2 false alarm on the negative one."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            if image[0, 0, 0] == 1.0:
                outputs.append(
                    {
                        "boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0]]),
                        "scores": torch.tensor([0.9]),
                        "labels": torch.tensor([1]),
                    }
                )
            else:
                outputs.append(
                    {
                        "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
                        "scores": torch.tensor([0.2]),
                        "labels": torch.tensor([1]),
                    }
                )
        return outputs


def oracle_loader() -> DataLoader:
    positive = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
    positive[:, 0, 0] = 1.0
    samples = [
        (
            positive,
            {"boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0]]), "labels": torch.tensor([1]), "image_id": torch.tensor(1)},
        ),
        (
            torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE),
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": torch.tensor(2)},
        ),
    ]
    return DataLoader(samples, batch_size=2, collate_fn=collate)


def test_evaluate_hand_computed_on_one_positive_and_one_negative() -> None:
    # Cut-off 0.1: positive matched at IoU 1 (score 1), the negative's false alarm scores 0 -> mAP 0.5.
    # Cut-off 0.3: the false alarm is gone and a clean negative is not scored -> mAP 1.0.
    # Cut-off 0.95: the positive has no box (score 0), the negative is not scored -> mAP 0.0.
    metrics = evaluate(OracleModel(), oracle_loader(), CPU, score_thresholds=[0.1, 0.3, 0.95])
    assert metrics["val_map@0.1"] == 0.5
    assert metrics["val_map@0.3"] == 1.0
    assert metrics["val_map@0.95"] == 0.0
    assert metrics["val_map"] == 1.0
    assert metrics["val_score_threshold"] == 0.3
    assert metrics["val_sensitivity"] == 1.0
    assert metrics["val_specificity"] == 1.0
    assert metrics["val_mean_iou"] == 1.0
    assert metrics["val_images"] == 2.0


def test_evaluate_breaks_ties_the_same_way_whatever_the_threshold_order() -> None:
    forward = evaluate(OracleModel(), oracle_loader(), CPU, score_thresholds=[0.3, 0.25])
    backward = evaluate(OracleModel(), oracle_loader(), CPU, score_thresholds=[0.25, 0.3])
    assert forward["val_map"] == backward["val_map"] == 1.0
    assert forward["val_score_threshold"] == backward["val_score_threshold"] == 0.25
