"""Tests for detection/train.py: schedule, run folder, checkpoints, resume, CLI, devices, broken checkpoints."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import pytest
import torch

import lungdet.detection.train as train_module
from lungdet.detection.config import TrainConfig, config_to_dict, load_config
from lungdet.detection.distributed import Distributed
from lungdet.detection.model import build_model
from lungdet.detection.runtime import load_checkpoint
from lungdet.detection.train import (
    AUGMENTATIONS_DIR,
    BEST_CHECKPOINT,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    METRICS_FILE,
    TENSORBOARD_DIR,
    Run,
    build_optimizer,
    build_scheduler,
    compile_fixed_shape_parts,
    get_args_parser,
    lr_factor,
    main,
    train,
    warmup_warning,
    with_implementation_of,
    write_metrics_csv,
)
from lungdet.errors import LungdetError

IMAGE_SIZE = 64
# Besides the tiny model: 4 training images in batches of 2, two optimizer steps per epoch; on the CPU even where a GPU is, so runs repeat exactly.
RUN_EXTRAS = [
    "device=cpu",
    "data.batch_size=2",
    "optim.epochs=1",
    "optim.warmup_iters=1",
    "max_minutes=0",
    "val_score_thresholds=[0.1, 0.5]",
]
CHECKPOINT_KEYS = {
    "model",
    "train_model",
    "ema",
    "optimizer",
    "scheduler",
    "scaler",
    "epoch",
    "epoch_progress",
    "config",
    "frozen_batch_norm",
    "score_threshold",
    "val_map",
    "history",
    "rng",
    "preprocessing",
}


@pytest.fixture(scope="module")
def tiny_run(tiny_model_overrides: tuple[str, ...]) -> list[str]:
    """The overrides of a tiny 1-epoch run, architecture left to the config they go on top of."""
    return [*tiny_model_overrides, *RUN_EXTRAS]


@pytest.fixture(scope="module")
def tiny_config(tiny_run: list[str]) -> Callable[..., TrainConfig]:
    """Return ``build(*overrides)``: the tiny run's config for MobileNetV3-FPN."""

    def build(*overrides: str) -> TrainConfig:
        return load_config(None, ["model.architecture=fasterrcnn_mobilenet_v3_large_fpn", *tiny_run, *overrides])

    return build


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / METRICS_FILE, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, make_tiny_dataset: Callable[[Path], Path]) -> Path:
    """8 synthetic images (half positive) at 64 px in two folds: 4 train, 4 validate."""
    return make_tiny_dataset(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="module")
def finished_run(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path, tiny_config: Callable[..., TrainConfig]
) -> dict[str, Any]:
    """One finished 1-epoch run; tests that change it work on a copy."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    config = tiny_config()
    best = train(config, data_dir, run_dir, progress=False)
    return {"config": config, "run_dir": run_dir, "best": best}


def copy_run(finished_run: dict[str, Any], tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run["run_dir"], tmp_path / "run"))


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
    tiny_config: Callable[..., TrainConfig],
) -> None:
    config = tiny_config("optim.schedule=step", "optim.step_milestones=[2]", "optim.warmup_iters=0", "optim.lr=0.1")
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
    tiny_config: Callable[..., TrainConfig],
) -> None:
    config = tiny_config("optim.optimizer=adamw", "optim.lr=0.002", "model.trainable_backbone_layers=0")
    model = build_model(config.model, frozen_batch_norm=True)
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 0.002
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert 0 < len(optimizer.param_groups[0]["params"]) == len(trainable) < len(list(model.parameters()))
    sgd = build_optimizer(model, tiny_config("optim.momentum=0.5"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    # Parameters all on the CPU (or all on a GPU) get the fused update unless told otherwise.
    assert optimizer.defaults["fused"] is True and sgd.defaults["fused"] is True
    assert not build_optimizer(model, config, fused=False).defaults["fused"]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_the_fused_cpu_update_is_the_same_arithmetic(
    tiny_config: Callable[..., TrainConfig], optimizer_name: str
) -> None:
    config = tiny_config(f"optim.optimizer={optimizer_name}", "optim.lr=0.01", "optim.weight_decay=0.01")
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
    tiny_config: Callable[..., TrainConfig], optimizer_name: str
) -> None:
    config = tiny_config(f"optim.optimizer={optimizer_name}")
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


# --- compiling the fixed-shape parts -------------------------------------------------------------


@pytest.fixture
def eager_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile traces as it would, without inductor's code generation (a minute per model on this CPU)."""
    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "eager")


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@pytest.mark.parametrize(
    ("architecture", "parts"),
    [("fasterrcnn_mobilenet_v3_large_fpn", ["backbone", "rpn.head"]), ("retinanet_resnet50_fpn", ["backbone", "head"])],
)
def test_compile_takes_the_fixed_shape_parts_and_keeps_names_and_outputs(
    tiny_config: Callable[..., TrainConfig], eager_compile: None, architecture: str, parts: list[str]
) -> None:
    config = tiny_config(f"model.architecture={architecture}")
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
    tiny_config: Callable[..., TrainConfig], eager_compile: None
) -> None:
    config = tiny_config("compile=true", "optim.ema_decay=0.9")
    run = Run(config, job=Distributed(), device=torch.device("cpu"), steps_per_epoch=2, checkpoint=None)
    assert is_compiled(run.model.backbone) and is_compiled(run.model.rpn.head)
    assert not is_compiled(run.ema.module.backbone)  # it only validates: no minute of compiling for it
    plain = Run(tiny_config(), job=Distributed(), device=torch.device("cpu"), steps_per_epoch=2, checkpoint=None)
    assert not is_compiled(plain.model.backbone)


def test_training_with_compile_writes_an_ordinary_checkpoint(
    tiny_config: Callable[..., TrainConfig],
    eager_compile: None,
    data_dir: Path,
    finished_run: dict[str, Any],
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "compiled"
    train(tiny_config("compile=true"), data_dir, run_dir, progress=False)
    assert len(read_metrics(run_dir)) == 1
    checkpoint = load_checkpoint(run_dir / LAST_CHECKPOINT)
    assert checkpoint["model"].keys() == load_checkpoint(finished_run["run_dir"] / LAST_CHECKPOINT)["model"].keys()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_build_optimizer_fuses_the_update_of_gpu_parameters(tiny_config: Callable[..., TrainConfig]) -> None:
    config = tiny_config()
    model = build_model(config.model).cuda()
    optimizer = build_optimizer(model, config)
    assert optimizer.defaults["fused"] is True
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()  # the fused kernel runs on these parameters


# --- one run ------------------------------------------------------------------------------------


def test_train_writes_config_metrics_and_both_checkpoints(finished_run: dict[str, Any]) -> None:
    run_dir = finished_run["run_dir"]
    assert sorted(path.name for path in run_dir.iterdir()) == sorted(
        [CONFIG_FILE, METRICS_FILE, LAST_CHECKPOINT, BEST_CHECKPOINT, TENSORBOARD_DIR]
    )
    assert list((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert load_config(run_dir / CONFIG_FILE) == finished_run["config"]

    rows = read_metrics(run_dir)
    assert len(rows) == 1
    row = rows[0]
    for column in (
        "epoch",
        "lr",
        "loss",
        "loss_classifier",
        "images",
        "val_map",
        "val_score_threshold",
        "val_map@0.1",
        "val_map@0.5",
    ):
        assert column in row
    assert row["epoch"] == "1"
    assert row["images"] == "4"
    assert row["lr"] == "0.0001"  # the rate the epoch started at: warm-up begins at 1% of the default optim.lr=0.01
    assert 0.0 <= float(row["val_map"]) <= 1.0
    assert float(row["val_score_threshold"]) in (0.1, 0.5)
    assert finished_run["best"]["epoch"] == 1
    assert finished_run["best"]["val_map"] == pytest.approx(float(row["val_map"]), abs=1e-6)


def test_checkpoints_hold_everything_needed_to_resume_and_predict(finished_run: dict[str, Any]) -> None:
    run_dir, config = finished_run["run_dir"], finished_run["config"]
    last = load_checkpoint(run_dir / LAST_CHECKPOINT)
    best = load_checkpoint(run_dir / BEST_CHECKPOINT)
    assert set(last) == set(best) == CHECKPOINT_KEYS
    assert last["epoch"] == best["epoch"] == 1
    assert last["config"] == config_to_dict(config)
    assert last["frozen_batch_norm"] is False
    # No EMA, no fp16 scaler, and written at an epoch's end: nothing of those in it.
    assert (last["train_model"], last["ema"], last["scaler"], last["epoch_progress"]) == (None, None, None, None)
    assert set(last["rng"]) == {"torch"}
    assert set(last["model"]) == set(build_model(config.model).state_dict())
    assert last["optimizer"]["param_groups"][0]["lr"] == 0.0
    assert last["scheduler"]["last_epoch"] == 2
    assert len(last["history"]) == 1
    assert last["score_threshold"] == last["history"][0]["val_score_threshold"]
    assert last["val_map"] == last["history"][0]["val_map"]
    for key in ("backbone.body.0.0.weight", "roi_heads.box_predictor.cls_score.weight"):
        assert torch.equal(last["model"][key], best["model"][key])


def test_the_same_seed_gives_the_same_run(finished_run: dict[str, Any], data_dir: Path, tmp_path: Path) -> None:
    train(finished_run["config"], data_dir, tmp_path / "again", progress=False)
    first, second = read_metrics(finished_run["run_dir"])[0], read_metrics(tmp_path / "again")[0]
    for column in ("loss", "loss_classifier", "loss_objectness", "val_map", "val_score_threshold"):
        assert first[column] == second[column], column


# --- resume -------------------------------------------------------------------------------------


def test_resume_continues_at_the_next_epoch_and_keeps_the_first_row(
    tiny_config: Callable[..., TrainConfig],
    finished_run: dict[str, Any],
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    first_lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    capsys.readouterr()

    train(tiny_config("optim.epochs=2"), data_dir, run_dir, resume=True, progress=False)

    assert f"resumed from {run_dir / LAST_CHECKPOINT} after epoch 1" in capsys.readouterr().out
    lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    assert lines[:2] == first_lines
    assert [row["epoch"] for row in read_metrics(run_dir)] == ["1", "2"]
    last = load_checkpoint(run_dir / LAST_CHECKPOINT)
    assert last["epoch"] == 2
    assert len(last["history"]) == 2
    assert last["scheduler"]["last_epoch"] == 4  # 2 steps per epoch, continued rather than restarted
    assert load_config(run_dir / CONFIG_FILE).optim.epochs == 2


def test_resume_of_a_finished_run_is_an_error_and_changes_nothing(
    finished_run: dict[str, Any], data_dir: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    before = {path.relative_to(run_dir): path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    with pytest.raises(
        LungdetError,
        match=re.escape(
            f"{run_dir}: nothing to train: the run already finished 1 epochs of optim.epochs=1 (raise optim.epochs"
        ),
    ):
        train(finished_run["config"], data_dir, run_dir, resume=True, progress=False)
    assert {path.relative_to(run_dir): path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


def test_resume_without_a_checkpoint_is_an_error(
    tiny_config: Callable[..., TrainConfig], data_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(LungdetError, match=re.escape(f"{tmp_path / 'empty' / LAST_CHECKPOINT}: checkpoint not found")):
        train(tiny_config(), data_dir, tmp_path / "empty", resume=True, progress=False)


def test_a_run_refused_at_the_start_leaves_no_run_folder(
    tiny_config: Callable[..., TrainConfig], data_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(LungdetError, match=re.escape("amp=fp16 needs a CUDA GPU, but this run is on cpu")):
        train(tiny_config("amp=fp16"), data_dir, tmp_path / "fp16", progress=False)
    with pytest.raises(LungdetError, match=re.escape(str(tmp_path / "no_data"))):
        train(tiny_config(), tmp_path / "no_data", tmp_path / "missing_data", progress=False)
    with pytest.raises(LungdetError, match="checkpoint not found"):
        train(tiny_config(), data_dir, tmp_path / "nothing_to_resume", resume=True, progress=False)
    assert not any(tmp_path.iterdir())


def test_resume_after_a_crash_mid_epoch_continues_exactly(
    tiny_config: Callable[..., TrainConfig],
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    config = tiny_config("optim.epochs=2", "checkpoint_every_steps=1")
    train(config, data_dir, tmp_path / "whole", progress=False)

    real_save = train_module.save_checkpoint

    def save_then_crash_after_step_3(path: Path, state: dict[str, Any]) -> None:
        real_save(path, state)
        if state["scheduler"]["last_epoch"] == 3:  # the first step of epoch 2, its checkpoint safely written
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash_after_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, data_dir, tmp_path / "crashed", progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    saved = load_checkpoint(tmp_path / "crashed" / LAST_CHECKPOINT)
    assert saved["epoch"] == 1 and saved["epoch_progress"][0]["progress"]["batches"] == 1
    capsys.readouterr()

    train(config, data_dir, tmp_path / "crashed", resume=True, progress=False)

    assert f"resumed from {tmp_path / 'crashed' / LAST_CHECKPOINT} in epoch 2, after batch 1" in capsys.readouterr().out
    whole, resumed = (
        load_checkpoint(tmp_path / "whole" / LAST_CHECKPOINT),
        load_checkpoint(tmp_path / "crashed" / LAST_CHECKPOINT),
    )
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for column in ("loss", "loss_classifier", "loss_objectness", "images", "val_map"):
        assert [row[column] for row in read_metrics(tmp_path / "whole")] == [
            row[column] for row in read_metrics(tmp_path / "crashed")
        ], column


def test_ema_weights_are_validated_and_saved_for_predict_and_raw_weights_for_resume(
    tiny_config: Callable[..., TrainConfig], data_dir: Path, tmp_path: Path
) -> None:
    train(tiny_config("optim.ema_decay=0.5", "optim.lr=0.05"), data_dir, tmp_path / "ema", progress=False)
    last = load_checkpoint(tmp_path / "ema" / LAST_CHECKPOINT)
    assert last["ema"] is not None and int(last["ema"]["n_averaged"]) == 2  # one update per optimizer step
    key = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(last["model"][key], last["train_model"][key])
    torch.testing.assert_close(last["model"][key], last["ema"][f"module.{key}"])


def test_accumulation_counts_optimizer_steps_not_batches(
    tiny_config: Callable[..., TrainConfig], data_dir: Path, tmp_path: Path
) -> None:
    train(
        tiny_config("optim.accumulate_steps=2", "data.batch_size=1"), data_dir, tmp_path / "accumulate", progress=False
    )
    last = load_checkpoint(tmp_path / "accumulate" / LAST_CHECKPOINT)
    assert last["scheduler"]["last_epoch"] == 2  # 4 batches of 1, two per optimizer step
    assert read_metrics(tmp_path / "accumulate")[0]["images"] == "4"


def run_cli_in_subprocess(*arguments: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    # One thread, as in the test process: the same arithmetic in the same order, so runs agree to the bit.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "lungdet", *arguments],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigkill_at_any_moment_then_resume_gives_the_uninterrupted_result(
    tiny_run: list[str], data_dir: Path, tmp_path: Path
) -> None:
    overrides = [
        "model.architecture=fasterrcnn_mobilenet_v3_large_fpn",
        *tiny_run,
        "optim.epochs=3",
        "checkpoint_every_steps=1",
        "tensorboard=false",
    ]

    def command(out: Path, *extra: str) -> list[str]:
        return ["train", "--data", str(data_dir), "--out", str(out), "--no-progress", *extra, *overrides]

    whole = run_cli_in_subprocess(*command(tmp_path / "whole"))
    assert whole.wait(timeout=300) == 0, whole.stdout.read()

    killed = run_cli_in_subprocess(*command(tmp_path / "killed"))
    last = tmp_path / "killed" / LAST_CHECKPOINT
    deadline = time.monotonic() + 300
    while not last.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)  # wherever it is: mid-step, mid-validation or mid-save
    assert killed.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    saved = load_checkpoint(last)  # the latest checkpoint is whole, whatever the kill interrupted
    assert saved["epoch"] < 3

    resumed = run_cli_in_subprocess(*command(tmp_path / "killed", "--resume"))
    output = resumed.stdout.read()
    assert resumed.wait(timeout=300) == 0, output
    assert "resumed from" in output
    expected, got = load_checkpoint(tmp_path / "whole" / LAST_CHECKPOINT), load_checkpoint(last)
    assert got["epoch"] == 3 and [row["epoch"] for row in got["history"]] == [1, 2, 3]
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), key
    assert [row["val_map"] for row in expected["history"]] == [row["val_map"] for row in got["history"]]
    assert not [
        path for path in (tmp_path / "killed").iterdir() if path.name.startswith(".")
    ]  # no stray temporary files


# --- broken checkpoints -------------------------------------------------------------------------


def test_a_corrupt_checkpoint_is_a_lungdet_error(finished_run: dict[str, Any], data_dir: Path, tmp_path: Path) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    last = run_dir / LAST_CHECKPOINT
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as after a full disk
    with pytest.raises(LungdetError, match=re.escape(f"{last}: not a readable checkpoint (")):
        load_checkpoint(last)
    with pytest.raises(LungdetError, match=re.escape(f"{last}: not a readable checkpoint (")):
        train(finished_run["config"], data_dir, run_dir, resume=True, progress=False)


# --- metrics file -------------------------------------------------------------------------------


def test_metrics_csv_has_the_union_of_columns_in_first_seen_order(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    write_metrics_csv(path, [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25, "val_map": 1 / 3}])
    assert path.read_text(encoding="utf-8") == "epoch,loss,val_map\n1,0.5,\n2,0.25,0.333333\n"


# --- command line -------------------------------------------------------------------------------


def test_parser_separates_flags_from_overrides() -> None:
    args = get_args_parser().parse_args(["--data", "d", "--fold", "2", "--out", "o", "optim.lr=0.1", "seed=3"])
    assert (args.data, args.out, args.fold, args.config, args.resume) == (Path("d"), Path("o"), 2, None, False)
    assert args.overrides == ["optim.lr=0.1", "seed=3"]


def test_parser_requires_data_and_out(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--data", "d"])
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_cli_trains_with_a_named_config_overrides_and_fold(tiny_run: list[str], data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli_run"
    args = get_args_parser().parse_args(
        [
            "--config",
            "fasterrcnn_mobilenet_cpu",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--fold",
            "1",
            "--no-progress",
            *tiny_run,
        ]
    )
    assert main(args) == 0
    saved = load_config(out / CONFIG_FILE)
    assert saved.data.fold == 1
    assert saved.model.architecture == "fasterrcnn_mobilenet_v3_large_fpn"  # from the named config
    assert saved.optim.optimizer == "adamw"  # from the named config
    assert saved.model.image_size == IMAGE_SIZE  # from an override
    assert len(read_metrics(out)) == 1


def test_cli_resume_uses_the_config_stored_in_the_checkpoint(
    finished_run: dict[str, Any], data_dir: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    args = get_args_parser().parse_args(
        ["--data", str(data_dir), "--out", str(run_dir), "--resume", "--no-progress", "optim.epochs=2"]
    )
    assert main(args) == 0
    saved = load_config(run_dir / CONFIG_FILE)
    assert saved.model.image_size == IMAGE_SIZE and saved.optim.epochs == 2
    assert [row["epoch"] for row in read_metrics(run_dir)] == ["1", "2"]


def test_cli_rejects_resume_with_config_before_any_work(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    args = get_args_parser().parse_args(
        ["--config", "fasterrcnn_mobilenet_cpu", "--data", str(data_dir), "--out", str(out), "--resume"]
    )
    with pytest.raises(LungdetError, match=re.escape("--resume takes the config stored in OUT/last.pt; drop --config")):
        main(args)
    assert not out.exists()


def test_cli_show_augmentations_writes_pairs_and_trains_nothing(
    tiny_run: list[str], data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "look"
    args = get_args_parser().parse_args(
        ["--data", str(data_dir), "--out", str(out), "--show-augmentations", "3", *tiny_run, "augment.hflip=1.0"]
    )
    assert main(args) == 0
    written = sorted((out / AUGMENTATIONS_DIR).glob("augment_*.png"))
    assert len(written) == 3
    pair = cv2.imread(str(written[0]))
    assert pair.shape[0] >= IMAGE_SIZE and pair.shape[1] > 2 * IMAGE_SIZE  # original beside augmented
    assert sorted(path.name for path in out.iterdir()) == [AUGMENTATIONS_DIR]  # no checkpoint, no metrics
    assert (
        f"wrote 3 augmentation samples (original | augmented) to {out / AUGMENTATIONS_DIR}; nothing was trained"
        in capsys.readouterr().out
    )
