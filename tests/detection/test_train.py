"""Tests for detection/train.py: run folder, checkpoints, resume, compiling within a run, CLI, devices, broken checkpoints."""

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
from lungdet.detection.model import build_model
from lungdet.detection.runtime import load_checkpoint
from lungdet.detection.train import (
    AUGMENTATIONS_DIR,
    BEST_CHECKPOINT,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    METRICS_FILE,
    TENSORBOARD_DIR,
    get_args_parser,
    main,
    train,
)
from lungdet.errors import LungdetError

IMAGE_SIZE = 64
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


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / METRICS_FILE, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, make_tiny_dataset: Callable[[Path], Path]) -> Path:
    """8 synthetic images (half positive) at 64 px in two folds: 4 train, 4 validate."""
    return make_tiny_dataset(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="module")
def finished_run(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path, tiny_train_config: Callable[..., TrainConfig]
) -> dict[str, Any]:
    """One finished 1-epoch run; tests that change it work on a copy."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    config = tiny_train_config()
    best = train(config, data_dir, run_dir, progress=False)
    return {"config": config, "run_dir": run_dir, "best": best}


def copy_run(finished_run: dict[str, Any], tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run["run_dir"], tmp_path / "run"))


# --- compiling within a run ---------------------------------------------------------------------


def test_training_with_compile_writes_an_ordinary_checkpoint(
    tiny_train_config: Callable[..., TrainConfig],
    eager_compile: None,
    data_dir: Path,
    finished_run: dict[str, Any],
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "compiled"
    train(tiny_train_config("compile=true"), data_dir, run_dir, progress=False)
    assert len(read_metrics(run_dir)) == 1
    checkpoint = load_checkpoint(run_dir / LAST_CHECKPOINT)
    assert checkpoint["model"].keys() == load_checkpoint(finished_run["run_dir"] / LAST_CHECKPOINT)["model"].keys()


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
    tiny_train_config: Callable[..., TrainConfig],
    finished_run: dict[str, Any],
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    first_lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    capsys.readouterr()

    train(tiny_train_config("optim.epochs=2"), data_dir, run_dir, resume=True, progress=False)

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
    tiny_train_config: Callable[..., TrainConfig], data_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(LungdetError, match=re.escape(f"{tmp_path / 'empty' / LAST_CHECKPOINT}: checkpoint not found")):
        train(tiny_train_config(), data_dir, tmp_path / "empty", resume=True, progress=False)


def test_a_run_refused_at_the_start_leaves_no_run_folder(
    tiny_train_config: Callable[..., TrainConfig], data_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(LungdetError, match=re.escape("amp=fp16 needs a CUDA GPU, but this run is on cpu")):
        train(tiny_train_config("amp=fp16"), data_dir, tmp_path / "fp16", progress=False)
    with pytest.raises(LungdetError, match=re.escape(str(tmp_path / "no_data"))):
        train(tiny_train_config(), tmp_path / "no_data", tmp_path / "missing_data", progress=False)
    with pytest.raises(LungdetError, match="checkpoint not found"):
        train(tiny_train_config(), data_dir, tmp_path / "nothing_to_resume", resume=True, progress=False)
    assert not any(tmp_path.iterdir())


def test_resume_after_a_crash_mid_epoch_continues_exactly(
    tiny_train_config: Callable[..., TrainConfig],
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    config = tiny_train_config("optim.epochs=2", "checkpoint_every_steps=1")
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
    tiny_train_config: Callable[..., TrainConfig], data_dir: Path, tmp_path: Path
) -> None:
    train(tiny_train_config("optim.ema_decay=0.5", "optim.lr=0.05"), data_dir, tmp_path / "ema", progress=False)
    last = load_checkpoint(tmp_path / "ema" / LAST_CHECKPOINT)
    assert last["ema"] is not None and int(last["ema"]["n_averaged"]) == 2  # one update per optimizer step
    key = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(last["model"][key], last["train_model"][key])
    torch.testing.assert_close(last["model"][key], last["ema"][f"module.{key}"])


def test_accumulation_counts_optimizer_steps_not_batches(
    tiny_train_config: Callable[..., TrainConfig], data_dir: Path, tmp_path: Path
) -> None:
    train(
        tiny_train_config("optim.accumulate_steps=2", "data.batch_size=1"),
        data_dir,
        tmp_path / "accumulate",
        progress=False,
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
