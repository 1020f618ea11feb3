"""Tests for detection/run_state.py: compiling the fixed-shape parts of the trained model (and not of its EMA copy)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lungdet.detection.config import TrainConfig
from lungdet.detection.distributed import Distributed
from lungdet.detection.model import build_model
from lungdet.detection.run_state import Run, compile_fixed_shape_parts

IMAGE_SIZE = 64  # the tiny model's input side


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@pytest.mark.parametrize(
    ("architecture", "parts"),
    [("fasterrcnn_mobilenet_v3_large_fpn", ["backbone", "rpn.head"]), ("retinanet_resnet50_fpn", ["backbone", "head"])],
)
def test_compile_takes_the_fixed_shape_parts_and_keeps_names_and_outputs(
    tiny_train_config: Callable[..., TrainConfig], eager_compile: None, architecture: str, parts: list[str]
) -> None:
    config = tiny_train_config(f"model.architecture={architecture}")
    torch.manual_seed(0)
    plain = build_model(config.model).eval()
    compiled = build_model(config.model).eval()
    compiled.load_state_dict(plain.state_dict())
    assert compile_fixed_shape_parts(compiled) == parts
    assert all(is_compiled(compiled.get_submodule(name)) for name in parts)
    assert compiled.state_dict().keys() == plain.state_dict().keys()  # checkpoints do not change
    images = [torch.rand(3, IMAGE_SIZE, IMAGE_SIZE) for _ in range(2)]
    with torch.no_grad():
        for got, expected in zip(compiled(images), plain(images), strict=True):
            assert torch.equal(got["boxes"], expected["boxes"]) and torch.equal(got["scores"], expected["scores"])


def test_compile_takes_the_trained_model_not_the_ema_copy(
    tiny_train_config: Callable[..., TrainConfig], eager_compile: None
) -> None:
    config = tiny_train_config("compile=true", "optim.ema_decay=0.9")
    run = Run(config, job=Distributed(), device=torch.device("cpu"), steps_per_epoch=2, checkpoint=None)
    assert is_compiled(run.model.backbone) and is_compiled(run.model.rpn.head)
    assert not is_compiled(run.ema.module.backbone)  # it only validates: no minute of compiling for it
    plain = Run(tiny_train_config(), job=Distributed(), device=torch.device("cpu"), steps_per_epoch=2, checkpoint=None)
    assert not is_compiled(plain.model.backbone)
