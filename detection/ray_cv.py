"""``lungdet cv --ray``: the folds trained in parallel on a Ray cluster, one Ray task per fold, then what cv does serially.

Each fold is one task that trains the fold as ``lungdet cv`` does (continuing from its
``last.pt`` when there is one) and predicts its own validation patients; the driver records each
fold done as its task returns and writes the out-of-fold files in fold order, as a serial run does.
A task whose worker process or node dies is run again by Ray (``max_retries``); the new attempt
finds the fold's ``last.pt`` and continues from there, not from scratch. Runs live in ``--out``,
which every node must see at the same path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lungdet.detection.config import load_config
from lungdet.detection.folds import fold_dir, mark_done, predict_out_of_fold, read_done, train_final, train_resumably
from lungdet.detection.ray_cluster import check_every_node_sees, connect, largest_node_cpus, ray_output_to
from lungdet.detection.runtime import resolve_device
from lungdet.errors import LungdetError
from lungdet.submission.raw_predictions import RawPrediction

# Ray runs a fold again after its worker process or node dies, up to this many times; a Python
# error (a bad config, an unreadable image) is not retried: it would fail the same way again.
FOLD_RETRIES = 3
LOG_NAME = "cv.ray.log"


@dataclass(frozen=True)
class RayFolds:
    """How ``cv --ray`` runs: the cluster, what each fold task asks of it, and what it does."""

    address: str | None
    cpus_per_fold: int
    tta: str
    batch_size: int
    verbose: bool = False
    progress: bool = True


@dataclass
class FoldResult:
    """What one fold's task sends back: its out-of-fold rows, truth and cut-off, and where and how long it ran."""

    fold: int
    rows: list[RawPrediction]
    truth: dict[str, np.ndarray]
    threshold: float
    node: str
    seconds: float


def run_fold(
    config_name: str | None,
    data_dir: str,
    out_dir: str,
    fold: int,
    overrides: Sequence[str],
    *,
    train: bool,
    tta: str,
    batch_size: int,
) -> FoldResult:
    """In a Ray worker: train fold ``fold`` (unless ``train`` is False: done before) and predict its validation patients."""
    import ray

    started = time.monotonic()
    if train:
        train_resumably(
            config_name,
            Path(data_dir),
            fold_dir(Path(out_dir), fold),
            [*overrides, f"data.fold={fold}"],
            progress=False,
        )
    device = resolve_device(load_config(config_name, list(overrides)).device)
    rows, truth, thresholds = predict_out_of_fold(
        Path(data_dir), Path(out_dir), [fold], device=device, tta=tta, batch_size=batch_size, progress=False
    )
    return FoldResult(fold, rows, truth, thresholds[fold], ray.util.get_node_ip_address(), time.monotonic() - started)


def _final_on_ray(ray: Any, options: dict[str, Any]) -> Any:
    """A ``run`` for :func:`~lungdet.detection.folds.train_final`: the final model trained in one Ray task, waited for."""
    task = ray.remote(train_resumably).options(**options)

    def run(
        config_name: str | None, data_dir: Path, run_dir: Path, overrides: Sequence[str], *, progress: bool
    ) -> None:
        _get(ray, task.remote(config_name, data_dir, run_dir, list(overrides), progress=False))

    return run


def _get(ray: Any, reference: Any) -> Any:
    """``ray.get``, with lungdet's own error (a bad config, a damaged dataset) as its one line, not Ray's traceback."""
    try:
        return ray.get(reference)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, LungdetError):
            raise LungdetError(str(error.cause)) from None
        raise


def _task_options(ray: Any, config_name: str | None, overrides: Sequence[str], cpus: int) -> dict[str, Any]:
    """Each fold's resource request: ``cpus`` CPUs, and one GPU where the cluster has any and the config allows."""
    widest = largest_node_cpus(ray)
    if cpus > widest:
        # No node could ever take the task; Ray would wait for such a node for ever.
        raise LungdetError(f"--ray-fold-cpus {cpus}: the largest node of the Ray cluster has {widest:g} CPU(s)")
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = load_config(config_name, list(overrides)).device
    if device.startswith("cuda") and not gpus:
        raise LungdetError(f"device={device}: the Ray cluster has no GPU; use device=cpu or device=auto")
    return {"num_cpus": cpus, "num_gpus": 1 if gpus and device != "cpu" else 0, "max_retries": FOLD_RETRIES}


def train_folds_on_ray(
    run: RayFolds,
    config_name: str | None,
    data_dir: Path,
    out_dir: Path,
    folds: Sequence[int],
    overrides: Sequence[str],
    *,
    final: bool = False,
) -> tuple[list[RawPrediction], dict[str, np.ndarray], dict[int, float]]:
    """Train and predict every fold on the cluster at ``run.address``; returns what :func:`~lungdet.detection.folds.predict_out_of_fold` does.

    With ``final`` (``--final``), the final model then trains in one more task, as :func:`~lungdet.detection.folds.train_final` says.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with ray_output_to(out_dir / LOG_NAME, command="cv", verbose=run.verbose) as terminal:
        ray = connect(run.address, verbose=run.verbose)
        try:
            if run.address is not None:  # a Ray started here for this command runs on this machine's files
                check_every_node_sees(ray, {"folder": [Path(data_dir), out_dir]})
            options = _task_options(ray, config_name, overrides, run.cpus_per_fold)
            results = _run_folds(
                ray, run, options, config_name, Path(data_dir).resolve(), out_dir, folds, overrides, terminal
            )
            if final:
                train_final(
                    config_name,
                    Path(data_dir),
                    out_dir,
                    folds,
                    overrides,
                    run=_final_on_ray(ray, options),
                    say=lambda line: print(line, file=terminal),  # stdout goes to Ray's log for the while
                )
        finally:
            ray.shutdown()
    rows = [row for fold in folds for row in results[fold].rows]
    truth = {patient: boxes for fold in folds for patient, boxes in results[fold].truth.items()}
    return rows, truth, {fold: results[fold].threshold for fold in folds}


def _run_folds(
    ray: Any,
    run: RayFolds,
    options: dict[str, Any],
    config_name: str | None,
    data_dir: Path,
    out_dir: Path,
    folds: Sequence[int],
    overrides: Sequence[str],
    terminal: Any,
) -> dict[int, FoldResult]:
    """Start one task per fold, record each fold done as it returns, and show a bar over folds."""
    task = ray.remote(run_fold).options(**options)
    done = set(read_done(out_dir))
    pending = {
        task.remote(
            config_name,
            str(data_dir),
            str(out_dir),
            fold,
            list(overrides),
            train=fold not in done,
            tta=run.tta,
            batch_size=run.batch_size,
        ): fold
        for fold in folds
    }
    if done & set(folds):
        print(
            f"lungdet cv: folds {', '.join(map(str, sorted(done & set(folds))))} are done; only predicted",
            file=terminal,
        )
    results: dict[int, FoldResult] = {}
    with tqdm(
        total=len(folds), desc="folds", unit="fold", file=terminal, disable=None if run.progress else True
    ) as bar:
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            pending.pop(ready)
            result = _get(ray, ready)
            results[result.fold] = result
            mark_done(out_dir, result.fold)  # the driver alone writes cv_state.json
            bar.update(1)
            bar.write(
                f"lungdet cv: fold {result.fold} done on {result.node} in {result.seconds:.0f} s "
                f"-> {fold_dir(out_dir, result.fold)}",
                file=terminal,
            )
    return results
