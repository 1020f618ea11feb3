"""Tests for detection/distributed.py and multi-process training: torchrun's environment, and a 2-process gloo run on CPU."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lungdet.detection.config import load_config
from lungdet.detection.data import EpochSampler, sample_seed
from lungdet.detection.distributed import (
    BACKEND_VARIABLE,
    Distributed,
    choose_backend,
    cuda_device_for,
    from_environment,
    gather_to_main,
    share_from_main,
    sum_over_ranks,
)
from lungdet.detection.model import build_model
from lungdet.detection.runtime import load_checkpoint
from lungdet.detection.train import LAST_CHECKPOINT, METRICS_FILE
from lungdet.errors import LungdetError

# --- the environment ----------------------------------------------------------------------------


def test_without_torchrun_it_is_one_process() -> None:
    job = from_environment({})
    assert (job.rank, job.world_size, job.local_rank, job.enabled, job.is_main) == (0, 1, 0, False, True)


def test_torchrun_variables_give_rank_world_size_and_local_rank() -> None:
    job = from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (job.rank, job.world_size, job.local_rank, job.enabled, job.is_main) == (3, 4, 1, True, False)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"WORLD_SIZE": "2"}, "torchrun environment is incomplete or malformed"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "torchrun environment is incomplete or malformed"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is outside WORLD_SIZE=2"),
    ],
)
def test_a_broken_torchrun_environment_is_a_clear_error(environ: dict[str, str], message: str) -> None:
    with pytest.raises(LungdetError, match=re.escape(message)):
        from_environment(environ)


def test_collectives_are_identities_for_one_process() -> None:
    job = Distributed()
    assert gather_to_main(job, {"a": 1}) == [{"a": 1}]
    assert share_from_main(job, 5) == 5
    assert sum_over_ranks(job, [1.0, 2.5]) == [1.0, 2.5]


@pytest.mark.parametrize(
    ("device_type", "chosen", "backend"),
    [
        ("cuda", "", "nccl"),
        ("cpu", "", "gloo"),
        ("cuda", "gloo", "gloo"),
        ("cuda", " NCCL ", "nccl"),
        ("cpu", "gloo", "gloo"),
    ],
)
def test_backend_is_nccl_on_gpus_gloo_on_cpu_unless_the_variable_says(
    device_type: str, chosen: str, backend: str
) -> None:
    assert choose_backend(device_type, {BACKEND_VARIABLE: chosen}) == backend


@pytest.mark.parametrize(
    ("device_type", "chosen", "message"),
    [
        ("cuda", "mpi", "LUNGDET_DIST_BACKEND='mpi' is not a backend; use one of nccl, gloo"),
        ("cpu", "nccl", "LUNGDET_DIST_BACKEND=nccl needs CUDA GPUs but this run is on cpu"),
    ],
)
def test_a_wrong_backend_variable_is_a_clear_error(device_type: str, chosen: str, message: str) -> None:
    with pytest.raises(LungdetError, match=re.escape(message)):
        choose_backend(device_type, {BACKEND_VARIABLE: chosen})


def test_each_rank_gets_its_own_gpu_and_gloo_ranks_share_when_there_are_too_few() -> None:
    ranks = [Distributed(rank=r, world_size=4, local_rank=r) for r in range(4)]
    assert [cuda_device_for(job, 4, "nccl").index for job in ranks] == [0, 1, 2, 3]
    assert [cuda_device_for(job, 2, "gloo").index for job in ranks] == [0, 1, 0, 1]
    with pytest.raises(
        LungdetError,
        match=re.escape(
            "LOCAL_RANK=2 but this machine has 2 CUDA GPUs: start torchrun with --nproc_per_node=2 or fewer"
        ),
    ):
        cuda_device_for(ranks[2], 2, "nccl")


# --- the sampler's shards -----------------------------------------------------------------------


def test_two_shards_cover_the_epoch_once_each_padded_to_equal_length() -> None:
    whole = EpochSampler(7, seed=3)
    shards = [EpochSampler(7, seed=3, rank=rank, world_size=2) for rank in range(2)]
    for sampler in (whole, *shards):
        sampler.set_epoch(2)
    order = whole.shard()
    assert sorted(order) == list(range(7))
    first, second = (shard.shard() for shard in shards)
    assert len(first) == len(second) == 4
    # Interleaved from the same order, the head repeated once to even the shards out.
    assert first == (order + order[:1])[0::2] and second == (order + order[:1])[1::2]
    # A sample's augmentation seed does not depend on which process draws it.
    assert list(shards[0]) == [(index, sample_seed(3, 2, index)) for index in first]


def test_sampler_order_depends_on_seed_and_epoch_only_and_resume_skips_the_done_samples() -> None:
    sampler = EpochSampler(10, seed=1)
    sampler.set_epoch(1)
    epoch_one = list(sampler)
    sampler.set_epoch(2)
    epoch_two = list(sampler)
    assert [index for index, _ in epoch_one] != [index for index, _ in epoch_two]
    again = EpochSampler(10, seed=1)
    again.set_epoch(2)
    assert list(again) == epoch_two
    again.resume_at(4)
    assert list(again) == epoch_two[4:] and len(again) == 6
    # Each sample's augmentation seed is its own: the same image in another epoch gets another one.
    assert dict(epoch_one)[0] != dict(epoch_two)[0]


# --- two processes ------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / METRICS_FILE, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, make_tiny_dataset: Callable[[Path], Path]) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("ddp_data"))


def test_two_gloo_processes_keep_the_same_books_as_one(
    tiny_model_overrides: tuple[str, ...], data_dir: Path, tmp_path: Path
) -> None:
    overrides = [
        "model.architecture=fasterrcnn_mobilenet_v3_large_fpn",
        *tiny_model_overrides,
        "device=cpu",
        "data.batch_size=1",
        "optim.epochs=2",
        "optim.warmup_iters=1",
        "val_score_thresholds=[0.1, 0.5]",
        "tensorboard=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(out: Path, *launcher: str) -> str:
        command = [
            *launcher,
            "-m",
            "lungdet",
            "train",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--no-progress",
            *overrides,
        ]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    single = train(tmp_path / "one", sys.executable)
    double = train(
        tmp_path / "two", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"
    )

    assert "x 2 processes" in double and "x 2 processes" not in single
    assert double.count("epoch 2/2:") == 1  # only rank 0 prints
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [row["epoch"] for row in one] == [row["epoch"] for row in two] == ["1", "2"]
    # Every training image is seen once per epoch, across both processes; every validation image is scored once.
    assert [row["images"] for row in one] == [row["images"] for row in two] == ["4", "4"]
    assert [row["val_images"] for row in one] == [row["val_images"] for row in two] == ["4", "4"]
    checkpoint = load_checkpoint(tmp_path / "two" / LAST_CHECKPOINT)
    assert checkpoint["epoch"] == 2
    # Half the optimizer steps: each step averages two processes' batches.
    assert load_checkpoint(tmp_path / "one" / LAST_CHECKPOINT)["scheduler"]["last_epoch"] == 8
    assert checkpoint["scheduler"]["last_epoch"] == 4
    model = build_model(load_config(None, overrides).model)
    model.load_state_dict(checkpoint["model"])  # plain weights, no DDP 'module.' prefix
    assert torch.isfinite(torch.cat([value.flatten().float() for value in checkpoint["model"].values()])).all()
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == sorted(
        path.name for path in (tmp_path / "one").iterdir()
    )
