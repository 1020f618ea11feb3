"""Tests of detection/ray_cv.py: ``lungdet cv --ray`` on a two-node cluster trains the folds in parallel and writes a serial run's out-of-fold files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lungdet.data_tools.labels import read_labels
from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.data_tools.to_coco import ConvertOptions, convert_dataset
from lungdet.detection.cv import OOF_FILE, OOF_LABELS_FILE
from lungdet.detection.folds import STATE_FILE
from lungdet.detection.train import BEST_CHECKPOINT
from tests.detection.conftest import TINY_IMAGE_SIZE, TINY_MODEL_OVERRIDES
from tests.ray_cluster import LoopbackCluster

RUN = [
    *TINY_MODEL_OVERRIDES,
    "model.architecture=fasterrcnn_mobilenet_v3_large_fpn",
    "data.batch_size=2",
    "optim.epochs=1",
    "max_minutes=0",
    "device=cpu",
    "optim.warmup_iters=1",
]


@pytest.fixture(scope="module")
def three_folds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 synthetic 128 px DICOMs converted at 64 px in three folds of 3 patients."""
    root = tmp_path_factory.mktemp("ray_cv")
    synth = write_synthetic_dataset(root / "synth", count=9, seed=3, positive_fraction=0.5, size=(128, 128))
    convert_dataset(
        synth.images_dir,
        read_labels(synth.labels_csv, synth.class_info_csv),
        root / "coco",
        ConvertOptions(image_size=TINY_IMAGE_SIZE, folds=3, seed=0),
        progress=False,
    )
    return root / "coco"


def run_cv(data: Path, out: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lungdet", "cv", "--data", str(data), "--out", str(out), "--no-progress", *extra]
    return subprocess.run(
        [*command, *RUN], capture_output=True, text=True, timeout=240, env={**env, "RAY_USAGE_STATS_ENABLED": "0"}
    )


def test_three_folds_on_a_cluster_write_the_serial_run_s_out_of_fold_files(
    ray_cluster: LoopbackCluster, three_folds: Path, tmp_path: Path
) -> None:
    # Ray gives each fold's torch as many threads as the task has CPUs (one here); the serial run is given as many.
    serial = run_cv(three_folds, tmp_path / "serial", {**os.environ, "OMP_NUM_THREADS": "1"})
    assert serial.returncode == 0, serial.stderr
    on_ray = run_cv(three_folds, tmp_path / "ray", ray_cluster.env, "--ray", ray_cluster.address)
    assert on_ray.returncode == 0, on_ray.stderr

    for fold in (0, 1, 2):
        assert f"lungdet cv: fold {fold} done on 127.0.0.2 in" in on_ray.stderr
        expected = torch.load(tmp_path / "serial" / f"fold{fold}" / BEST_CHECKPOINT, weights_only=True)["model"]
        got = torch.load(tmp_path / "ray" / f"fold{fold}" / BEST_CHECKPOINT, weights_only=True)["model"]
        assert all(torch.equal(got[name], tensor) for name, tensor in expected.items()), fold
    for name in (OOF_FILE, OOF_LABELS_FILE):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes(), name
    assert (tmp_path / "ray" / STATE_FILE).read_text() == '{"done": [0, 1, 2]}\n'
    # The summary cv prints is the serial run's, bar the folders named (the folds' own lines stay in Ray's workers).
    summary = serial.stdout[serial.stdout.index("fold   mAP") :]
    assert on_ray.stdout.replace("/ray/", "/serial/") == summary
    assert "(raylet)" not in on_ray.stdout + on_ray.stderr and not (tmp_path / "ray" / "cv.ray.log").exists()
