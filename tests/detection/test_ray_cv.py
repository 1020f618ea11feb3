"""Tests of detection/ray_cv.py: ``lungdet cv --ray`` on a two-node cluster trains the folds in parallel and writes a serial run's out-of-fold files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lungdet.detection.cv import OOF_FILE, OOF_LABELS_FILE
from lungdet.detection.folds import FINAL_DIR, STATE_FILE
from lungdet.detection.train import BEST_CHECKPOINT
from tests.detection.conftest import TINY_MODEL_OVERRIDES, write_tiny_coco
from tests.ray_cluster import LoopbackCluster

RUN = [
    *TINY_MODEL_OVERRIDES,
    "model.architecture=fasterrcnn_mobilenet_v3_large_fpn",
    "data.batch_size=2",
    "optim.epochs=2",
    "max_minutes=0",
    "device=cpu",
    "optim.warmup_iters=1",
]


@pytest.fixture(scope="module")
def three_folds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 synthetic 128 px DICOMs converted at 64 px in three folds of 3 patients."""
    return write_tiny_coco(tmp_path_factory.mktemp("ray_cv"), count=9, folds=3)


def cv_command(data: Path, out: Path, *extra: str) -> list[str]:
    """``lungdet cv`` with the final model too (``--final``), the tiny model for two epochs a fold."""
    return [
        sys.executable,
        "-m",
        "lungdet",
        "cv",
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-progress",
        "--final",
        *extra,
        *RUN,
    ]


def test_three_folds_on_a_cluster_write_the_serial_run_s_out_of_fold_files_though_a_fold_s_worker_dies(
    ray_cluster: LoopbackCluster, three_folds: Path, tmp_path: Path
) -> None:
    # Ray gives each fold's torch as many threads as the task has CPUs (one here); the serial run is given as many.
    serial = subprocess.run(
        cv_command(three_folds, tmp_path / "serial"),
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert serial.returncode == 0, serial.stderr

    # --verbose: the folds' own lines come to the driver, the retried fold's "resumed from" among them.
    driver = subprocess.Popen(
        ray_cluster.command(cv_command(three_folds, tmp_path / "ray", "--ray", ray_cluster.address, "--verbose")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ray_cluster.env, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    deadline = time.monotonic() + 120
    # SIGKILL a fold's worker once the fold has saved its first epoch: Ray runs the task again, which continues from there.
    while not (killed := [fold for fold in (0, 1, 2) if (tmp_path / "ray" / f"fold{fold}" / "last.pt").exists()]):
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.05)
    workers = ray_cluster.processes("ray::run_fold")
    assert workers and driver.poll() is None
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    out, err = driver.communicate(timeout=240)
    assert driver.returncode == 0, err
    assert f"resumed from {tmp_path / 'ray' / f'fold{killed[0]}' / 'last.pt'} after epoch 1" in out + err

    for fold in (0, 1, 2):
        assert f"lungdet cv: fold {fold} done on 127.0.0.2 in" in err
    for run in ("fold0", "fold1", "fold2", FINAL_DIR):
        expected = torch.load(tmp_path / "serial" / run / BEST_CHECKPOINT, weights_only=True)["model"]
        got = torch.load(tmp_path / "ray" / run / BEST_CHECKPOINT, weights_only=True)["model"]
        assert all(torch.equal(got[name], tensor) for name, tensor in expected.items()), run
    # The final model's lines reach the terminal past Ray's log, as in a serial run.
    assert (
        f"lungdet cv: the final model on every image, 1 epochs (the folds' median best) -> {tmp_path / 'ray' / FINAL_DIR}"
        in err
    )
    assert "lungdet cv: the final model takes the folds' mean cut-offs: score_threshold" in err
    for name in (OOF_FILE, OOF_LABELS_FILE):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes(), name
    assert (tmp_path / "ray" / STATE_FILE).read_text() == '{"done": [0, 1, 2], "final": true}\n'
    summary = serial.stdout[serial.stdout.index("fold   mAP") :]
    assert summary.replace("/serial/", "/ray/") in out  # cv's own summary, the serial run's bar the folders named
