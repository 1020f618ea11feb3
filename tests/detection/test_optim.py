"""Tests for detection/optim.py: the learning-rate schedule, the optimizer it follows, and the fused update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from lungdet.detection.config import TrainConfig
from lungdet.detection.model import build_model
from lungdet.detection.optim import build_optimizer, build_scheduler, lr_factor, warmup_warning, with_implementation_of

# --- schedule and optimizer ---------------------------------------------------------------------


def scheduled_factors(steps: list[int], **schedule: Any) -> list[float]:
    settings = {
        "warmup_steps": 0,
        "total_steps": 100,
        "schedule": "cosine",
        "milestone_steps": [],
        "gamma": 0.1,
        **schedule,
    }
    return [lr_factor(step, **settings) for step in steps]


def test_schedule_warms_up_from_one_percent_then_decays_to_zero() -> None:
    # 10 warm-up steps of 110: 1% at 0; half-way up at 5 (0.01 + 0.99 / 2 = 0.505);
    # peak at 10; cosine half-way at 60 (0.5); zero at 110 and after.
    factors = scheduled_factors([0, 5, 10, 60, 110, 200], warmup_steps=10, total_steps=110)
    assert factors == pytest.approx([0.01, 0.505, 1.0, 0.5, 0.0, 0.0], abs=1e-12)


def test_schedule_shortens_a_warm_up_longer_than_the_run() -> None:
    # warm-up 50 of 10 steps becomes 9: the peak is reached at step 9, zero at 10.
    assert scheduled_factors([0, 9, 10], warmup_steps=50, total_steps=10) == pytest.approx([0.01, 1.0, 0.0], abs=1e-12)


def test_a_warm_up_over_a_quarter_of_the_run_is_pointed_out_with_a_shorter_one() -> None:
    assert warmup_warning(25, total_steps=100) is None
    assert warmup_warning(0, total_steps=0) is None
    assert warmup_warning(26, total_steps=100) == (
        "optim.warmup_iters=26 is 26% of this run's 100 optimizer steps, so the learning rate peaks late or never; "
        "for a run this short try optim.warmup_iters=10"
    )
    # A 3-step run with a 1-step warm-up: the shortest there is, so no note suggesting the same value.
    assert warmup_warning(1, total_steps=3) is None
    assert warmup_warning(2, total_steps=3) == (
        "optim.warmup_iters=2 is 67% of this run's 3 optimizer steps, so the learning rate peaks late or never; "
        "for a run this short try optim.warmup_iters=1"
    )
    # The benchmark's case: 500 warm-up steps in a 4-epoch run of 48 steps each.
    assert warmup_warning(500, total_steps=192).startswith(
        "optim.warmup_iters=500 is 100% of this run's 192 optimizer steps"
    )


def test_step_schedule_drops_by_gamma_at_each_milestone_after_warm_up() -> None:
    factors = scheduled_factors(
        [0, 5, 79, 80, 109, 110, 500], warmup_steps=5, schedule="step", milestone_steps=[80, 110], gamma=0.1
    )
    assert factors == pytest.approx([0.01, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01], abs=1e-12)


def test_build_scheduler_counts_milestones_in_epochs_and_steps_in_optimizer_steps(
    tiny_train_config: Callable[..., TrainConfig],
) -> None:
    config = tiny_train_config(
        "optim.schedule=step", "optim.step_milestones=[2]", "optim.warmup_iters=0", "optim.lr=0.1"
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=3)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Epoch 2 ends after optimizer step 6: from there the rate is a tenth.
    assert lrs == pytest.approx([0.1] * 6 + [0.01] * 2)


def test_build_optimizer_follows_the_config_and_skips_frozen_parameters(
    tiny_train_config: Callable[..., TrainConfig],
) -> None:
    config = tiny_train_config("optim.optimizer=adamw", "optim.lr=0.002", "model.trainable_backbone_layers=0")
    model = build_model(config.model, frozen_batch_norm=True)
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 0.002
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert 0 < len(optimizer.param_groups[0]["params"]) == len(trainable) < len(list(model.parameters()))
    sgd = build_optimizer(model, tiny_train_config("optim.momentum=0.5"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    # Parameters all on the CPU (or all on a GPU) get the fused update unless told otherwise.
    assert optimizer.defaults["fused"] is True and sgd.defaults["fused"] is True
    assert not build_optimizer(model, config, fused=False).defaults["fused"]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_the_fused_cpu_update_is_the_same_arithmetic(
    tiny_train_config: Callable[..., TrainConfig], optimizer_name: str
) -> None:
    config = tiny_train_config(f"optim.optimizer={optimizer_name}", "optim.lr=0.01", "optim.weight_decay=0.01")
    torch.manual_seed(0)
    models = [torch.nn.Linear(64, 32) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    initial = models[0].weight.detach().clone()
    optimizers = [build_optimizer(models[0], config), build_optimizer(models[1], config, fused=False)]
    assert [bool(o.defaults["fused"]) for o in optimizers] == [True, False]
    inputs = torch.randn(5, 8, 64)
    for batch in inputs:
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            model(batch).square().mean().backward()
            optimizer.step()
    assert (models[0].weight - initial).abs().max() > 1e-3  # the updates did move the weights
    for fused_parameter, plain_parameter in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(fused_parameter, plain_parameter, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_resume_takes_the_update_implementation_of_this_machine_not_the_checkpoint(
    tiny_train_config: Callable[..., TrainConfig], optimizer_name: str
) -> None:
    config = tiny_train_config(f"optim.optimizer={optimizer_name}")
    model = torch.nn.Linear(3, 2)
    fused = build_optimizer(model, config, fused=True)  # as saved on a GPU
    model(torch.ones(1, 3)).sum().backward()
    fused.step()
    plain = build_optimizer(
        model, config, fused=False
    )  # resumed where there is no fused kernel (or by an older lungdet)
    plain.load_state_dict(with_implementation_of(plain, fused.state_dict()))
    assert not plain.param_groups[0]["fused"]
    assert plain.state_dict()["state"].keys() == fused.state_dict()["state"].keys()  # the moments come along
    plain.step()  # and the unfused update runs on them
    # The other way round: an unfused checkpoint resumed where the fused update is chosen.
    fused_again = build_optimizer(model, config, fused=True)
    fused_again.load_state_dict(with_implementation_of(fused_again, plain.state_dict()))
    assert fused_again.param_groups[0]["fused"] is True
    fused_again.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_build_optimizer_fuses_the_update_of_gpu_parameters(tiny_train_config: Callable[..., TrainConfig]) -> None:
    config = tiny_train_config()
    model = build_model(config.model).cuda()
    optimizer = build_optimizer(model, config)
    assert optimizer.defaults["fused"] is True
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()  # the fused kernel runs on these parameters
