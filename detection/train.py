"""``lungdet train``: train a detector on the output of ``lungdet convert``.

Run folder layout::

    RUN/config.yaml   the resolved config (every default filled in)
    RUN/metrics.csv   one row per epoch: losses, images/s, data-wait fraction, validation RSNA mAP and its tuned cut-off
    RUN/tensorboard/  the same metrics for TensorBoard (``tensorboard --logdir RUN``)
    RUN/last.pt       the latest checkpoint: after each epoch, and every ``checkpoint_every_steps`` optimizer steps
    RUN/best.pt       the end-of-epoch checkpoint with the best validation mAP so far

Checkpoints are written to a temporary name and renamed, so a kill never leaves a broken one,
and ``--resume`` continues from last.pt exactly where it was written, mid-epoch included.
Under ``torchrun --nproc_per_node=N --no-python lungdet train ...`` each process trains on its
shard with DistributedDataParallel; rank 0 scores validation and writes every file.

This module puts the run together and hangs the saving and stopping on the loop as hooks; the
loop is :mod:`~lungdet.detection.engine`'s, the run's state :mod:`~lungdet.detection.run_state`'s,
the optimizer and schedule :mod:`~lungdet.detection.optim`'s, metrics.csv and TensorBoard
:mod:`~lungdet.detection.run_log`'s.
Run: ``lungdet train --config fasterrcnn_resnet50_fpn --data data/coco --out runs/r50 --fold 0``
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungdet.atomic import atomic_path
from lungdet.detection.augment import write_augmentation_samples
from lungdet.detection.config import TrainConfig, apply_overrides, config_from_dict, load_config, save_config
from lungdet.detection.data import (
    ALL_FOLDS,
    build_dataloaders,
    check_image_targets,
    load_preprocessing,
    load_records,
    load_sample,
    split_records,
)
from lungdet.detection.distributed import (
    Distributed,
    choose_backend,
    cuda_device_for,
    from_environment,
    gather_to_main,
    share_from_main,
    start,
    stop,
    sum_over_ranks,
)
from lungdet.detection.engine import EpochHooks, EpochProgress, OptimizerStep, evaluate, train_one_epoch
from lungdet.detection.model import needs_masks
from lungdet.detection.optim import warmup_warning
from lungdet.detection.run_log import epoch_metrics, log_to_tensorboard, open_tensorboard, write_metrics_csv
from lungdet.detection.run_state import Run, rng_states
from lungdet.detection.runtime import load_checkpoint, resolve_device, resolve_precision, save_checkpoint
from lungdet.errors import LungdetError

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.yaml"
TENSORBOARD_DIR = "tensorboard"
AUGMENTATIONS_DIR = "augmentations"


def training_device(name: str, job: Distributed) -> torch.device:
    """:func:`resolve_device`, except that under torchrun a CUDA run uses one GPU per process: ``cuda:LOCAL_RANK`` (see :func:`cuda_device_for`)."""
    if job.enabled and name in ("auto", "cuda") and torch.cuda.is_available():
        device = cuda_device_for(job, torch.cuda.device_count(), choose_backend("cuda"))
        torch.cuda.set_device(device)  # NCCL collectives and gather_object use the current device
        return device
    return resolve_device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch's (CPU and every CUDA device) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    config: TrainConfig, data_dir: Path, out_dir: Path, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train per ``config`` on ``data_dir`` (a ``lungdet convert`` output); write the run into ``out_dir``.

    Returns the best epoch's metrics row. With ``resume``, continues from ``out_dir/last.pt``,
    mid-epoch if that is where it was written. Under ``torchrun`` each process trains its shard
    and only rank 0 prints and writes.
    """
    job = from_environment()
    device = training_device(config.device, job)
    resolve_precision(config.amp, device)  # an amp this device cannot run is refused before any work
    joined = start(job, device)
    try:
        return _train(config, Path(data_dir), Path(out_dir), job=job, device=device, resume=resume, progress=progress)
    finally:
        if joined:
            stop(job)


def _train(
    config: TrainConfig,
    data_dir: Path,
    out_dir: Path,
    *,
    job: Distributed,
    device: torch.device,
    resume: bool,
    progress: bool,
) -> dict[str, Any]:
    say = print if job.is_main else (lambda *args, **kwargs: None)
    seed_everything(config.seed)
    train_loader, val_loader = _build_loaders(config, data_dir, job=job, device=device)
    preprocessing = load_preprocessing(data_dir)
    checkpoint = _resumed_checkpoint(config, out_dir) if resume else None
    # The run folder only once the data and any checkpoint have been read: a mistake there leaves nothing behind.
    if job.is_main:
        _open_run_folder(out_dir)
    steps_per_epoch = -(-len(train_loader) // config.optim.accumulate_steps)
    run = Run(
        config,
        job=job,
        device=device,
        steps_per_epoch=steps_per_epoch,
        checkpoint=checkpoint,
        source=out_dir / LAST_CHECKPOINT,
    )
    del checkpoint
    say(f"lungdet train: {run.notice}")
    if job.is_main:
        save_config(config, out_dir / CONFIG_FILE)
    tensorboard = open_tensorboard(out_dir / TENSORBOARD_DIR, config.tensorboard) if job.is_main else None
    validating = config.data.fold != ALL_FOLDS
    _describe_run(say, run, train_loader.dataset, val_loader.dataset, steps_per_epoch=steps_per_epoch)
    last = LastCheckpoint(run, out_dir / LAST_CHECKPOINT, preprocessing=preprocessing)
    should_stop = _time_limit(config, job)
    # The same optimizer, schedule, scaler and average every epoch; only the loader's position moves.
    optimizer_step = OptimizerStep(
        run.optimizer,
        run.scheduler,
        scaler=run.scaler,
        accumulate_steps=config.optim.accumulate_steps,
        grad_clip_norm=config.optim.grad_clip_norm,
        ema=run.ema,
    )
    hooks = EpochHooks(on_optimizer_step=last.after_optimizer_step, should_stop=should_stop)
    best_map = max((row.get("val_map", -1.0) for row in run.history), default=-1.0)
    for epoch in range(run.completed_epochs + 1, config.optim.epochs + 1):
        row = _train_epoch(
            run, epoch, optimizer_step, hooks, train_loader, val_loader, validating=validating, progress=progress
        )
        improved, best_map = _record_epoch(
            run, row, out_dir, last=last, tensorboard=tensorboard, best_map=best_map, validating=validating
        )
        say(_epoch_line(row, config, improved=improved, validating=validating))
        if row["stopped_early"]:
            say(f"lungdet train: stopped after max_minutes={config.max_minutes:g}; the last epoch was partial")
            break
    if tensorboard is not None:
        tensorboard.close()
    return _finish(say, run, out_dir, validating=validating)


def _build_loaders(
    config: TrainConfig, data_dir: Path, *, job: Distributed, device: torch.device
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """This process's training and validation loaders (its shard under torchrun), the training targets checked."""
    train_loader, val_loader = build_dataloaders(
        data_dir,
        config.data,
        image_size=config.model.image_size,
        seed=config.seed,
        augment=config.augment,
        mask_shape=config.model.mask_shape if needs_masks(config.model.architecture) else None,
        rank=job.rank,
        world_size=job.world_size,
        pin_memory=config.data.pin_memory and device.type == "cuda",
    )
    check_image_targets(train_loader.dataset.records, config.model, data_dir=data_dir)
    return train_loader, val_loader


def _resumed_checkpoint(config: TrainConfig, out_dir: Path) -> dict[str, Any]:
    """``out_dir``'s last.pt to resume from; a run that already trained ``optim.epochs`` is a LungdetError."""
    checkpoint = load_checkpoint(out_dir / LAST_CHECKPOINT)
    if int(checkpoint["epoch"]) >= config.optim.epochs:
        # Checked here, not by the empty-history check after the loop: a resumed history is never empty.
        raise LungdetError(
            f"{out_dir}: nothing to train: the run already finished {checkpoint['epoch']} epochs of optim.epochs={config.optim.epochs} "
            "(raise optim.epochs to continue, e.g. optim.epochs=20)"
        )
    return checkpoint


def _open_run_folder(out_dir: Path) -> None:
    """Create the run folder, without the temporary files a killed save left behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # A SIGKILL during a save leaves its temporary file (never a broken checkpoint under the real name).
    for stale in out_dir.glob(".*.tmp"):
        stale.unlink()


def _describe_run(say: Callable[[str], None], run: Run, train_set: Any, val_set: Any, *, steps_per_epoch: int) -> None:
    """Say what trains where, on how many images, and point out a warm-up too long for the run.

    Every process calls it: the validation images are counted over all of them.
    """
    config, job = run.config, run.job
    processes = f" x {job.world_size} processes" if job.enabled else ""
    (validation_images,) = sum_over_ranks(job, [float(len(val_set))])  # each process holds its shard
    say(
        f"lungdet train: {config.model.architecture} at {config.model.image_size}px on {run.device}{processes}, {run.precision.name}; "
        f"{len(train_set)} training / {validation_images:.0f} validation images (fold {config.data.fold})"
    )
    warning = warmup_warning(config.optim.warmup_iters, total_steps=steps_per_epoch * config.optim.epochs)
    if warning:
        say(f"lungdet train: note: {warning}")


@dataclasses.dataclass
class LastCheckpoint:
    """Writes ``run``'s ``last.pt`` at ``path``: after each epoch, and as the optimizer-step hook every ``checkpoint_every_steps``."""

    run: Run
    path: Path
    preprocessing: dict[str, Any]

    def save(self, epoch_progress: EpochProgress | None, *, path: Path | None = None) -> None:
        """Write last.pt (or ``path``); mid-epoch, with every process's progress and random state (collected on rank 0)."""
        run = self.run
        rng = rng_states(run.device)
        per_rank = None
        if epoch_progress is not None:
            per_rank = gather_to_main(run.job, {"progress": dataclasses.asdict(epoch_progress), "rng": rng})
        if run.job.is_main:
            save_checkpoint(
                path or self.path, run.state(preprocessing=self.preprocessing, epoch_progress=per_rank, rng=rng)
            )

    def after_optimizer_step(self, epoch_progress: EpochProgress) -> None:
        """The hook :func:`train_one_epoch` runs after each optimizer step: a mid-epoch save every ``checkpoint_every_steps``."""
        every = self.run.config.checkpoint_every_steps
        if every and self.run.scheduler.last_epoch % every == 0:
            self.save(epoch_progress)


def _time_limit(config: TrainConfig, job: Distributed) -> Callable[[], bool] | None:
    """The hook that ends training ``max_minutes`` from now (None without a limit)."""
    if config.max_minutes <= 0:
        return None
    deadline = time.monotonic() + config.max_minutes * 60
    # Rank 0's clock decides for all: ranks that stopped at different steps would wait on each other for ever.
    return lambda: share_from_main(job, time.monotonic() >= deadline)


def _train_epoch(
    run: Run,
    epoch: int,
    optimizer_step: OptimizerStep,
    hooks: EpochHooks,
    train_loader: torch.utils.data.DataLoader,
    val_loader: torch.utils.data.DataLoader,
    *,
    validating: bool,
    progress: bool,
) -> dict[str, Any]:
    """Train epoch ``epoch`` (from where a mid-epoch checkpoint left it) and validate: its metrics row."""
    config, job = run.config, run.job
    sampler = train_loader.sampler
    sampler.set_epoch(epoch)
    epoch_progress, run.epoch_progress = run.epoch_progress, None
    if epoch_progress is not None:
        sampler.resume_at(epoch_progress.batches * config.data.batch_size)
    epoch_lr = run.optimizer.param_groups[0]["lr"]
    epoch_progress = train_one_epoch(
        run.trained,
        optimizer_step,
        train_loader,
        run.device,
        epoch=epoch,
        precision=run.precision,
        state=epoch_progress,
        hooks=hooks,
        progress=progress and job.is_main,
    )
    train_metrics = epoch_metrics(job, epoch_progress)
    val_metrics = (
        evaluate(
            run.evaluated,
            val_loader,
            run.device,
            score_thresholds=config.val_score_thresholds,
            progress=progress,
            precision=run.precision,
            job=job,
        )
        if validating
        else {}
    )
    return {"epoch": epoch, "lr": epoch_lr, **train_metrics, **val_metrics}


def _record_epoch(
    run: Run,
    row: dict[str, Any],
    out_dir: Path,
    *,
    last: LastCheckpoint,
    tensorboard: Any,
    best_map: float,
    validating: bool,
) -> tuple[bool, float]:
    """Add ``row`` to the history and write last.pt, best.pt when it improved, metrics.csv and TensorBoard.

    Returns whether the epoch improved and the best validation mAP so far.
    """
    run.history.append(row)
    run.completed_epochs = row["epoch"]
    # Without validation the last epoch is the model: the epoch count was chosen elsewhere (lungdet cv --final).
    improved = row["val_map"] > best_map if validating else True
    if improved:
        best_map = row.get("val_map", best_map)
        # best.pt first, then last.pt as its copy: a kill between the two leaves the old last.pt, so a
        # resumed run trains this epoch again. (The other order left a last.pt past the best epoch and no best.pt.)
        last.save(None, path=out_dir / BEST_CHECKPOINT)
        if run.job.is_main:
            with atomic_path(out_dir / LAST_CHECKPOINT) as temporary:
                shutil.copyfile(out_dir / BEST_CHECKPOINT, temporary)
    else:
        last.save(None)
    if run.job.is_main:
        write_metrics_csv(out_dir / METRICS_FILE, run.history)
        log_to_tensorboard(tensorboard, row)
    return improved, best_map


def _epoch_line(row: dict[str, Any], config: TrainConfig, *, improved: bool, validating: bool) -> str:
    """The line printed after each epoch: loss, speed, data wait, and the validation mAP, cut-off and AUC."""
    validation = (
        f", val mAP {row['val_map']:.4f} at confidence >= {row['val_score_threshold']:g}"
        + (f", image AUC {row['val_auc']:.3f}" if "val_auc" in row else "")
        if validating
        else ", no validation (every image trains)"
    )
    return (
        f"epoch {row['epoch']}/{config.optim.epochs}: loss {row['loss']:.3f}, {row['images_per_second']:.1f} img/s "
        f"({row['data_wait_fraction']:.0%} waiting for data){validation}{' (best)' if improved and validating else ''}"
    )


def _finish(say: Callable[[str], None], run: Run, out_dir: Path, *, validating: bool) -> dict[str, Any]:
    """Say where the run ended; returns the best epoch's row (the last one without validation)."""
    if not validating:
        say(
            f"lungdet train: trained {run.completed_epochs} epochs on every image, no validation; best.pt is the last epoch, in {out_dir}"
        )
        return run.history[-1]
    best = max(run.history, key=lambda row: row["val_map"])
    say(f"lungdet train: best val mAP {best['val_map']:.4f} (epoch {best['epoch']}); checkpoints in {out_dir}")
    return best


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``lungdet train``."""
    parser = argparse.ArgumentParser(
        prog="lungdet train",
        description="Train a torchvision Faster R-CNN on a dataset written by 'lungdet convert'. "
        "Validation uses the official RSNA metric; the best checkpoint and its tuned confidence cut-off are kept.",
        epilog="example: lungdet train --config fasterrcnn_mobilenet_cpu --data data/coco --out runs/mobilenet --fold 0 optim.epochs=4",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file, or a name from configs/ (e.g. fasterrcnn_resnet50_fpn); default: built-in defaults",
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="output folder of lungdet convert (holds annotations.json)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="run folder for checkpoints, metrics.csv and config.yaml"
    )
    parser.add_argument("--fold", type=int, default=None, help="validation fold (overrides data.fold)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt with the config stored in it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    parser.add_argument(
        "--show-augmentations",
        type=int,
        default=0,
        metavar="N",
        help="write N training images beside an augmentation of each, boxes drawn, to OUT/augmentations/ and stop (check them before a long run)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=0.005 model.image_size=384"
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet train`` with parsed arguments; returns the exit status (0 on success).

    ``--fold`` becomes a ``data.fold`` override; ``--resume`` takes the config stored in ``OUT/last.pt`` (with
    ``--config`` too it is a LungdetError); ``--show-augmentations N`` writes samples and trains nothing.
    """
    overrides = list(args.overrides) + ([f"data.fold={args.fold}"] if args.fold is not None else [])
    if args.resume:
        if args.config is not None:
            raise LungdetError(
                "--resume takes the config stored in OUT/last.pt; drop --config (KEY=VALUE overrides still apply, e.g. optim.epochs=20)"
            )
        stored = load_checkpoint(args.out / LAST_CHECKPOINT)["config"]
        config = config_from_dict(apply_overrides(stored, overrides))
    else:
        config = load_config(args.config, overrides)
    if args.show_augmentations:
        paths = show_augmentations(config, args.data, args.out / AUGMENTATIONS_DIR, count=args.show_augmentations)
        print(
            f"lungdet train: wrote {len(paths)} augmentation samples (original | augmented) to {args.out / AUGMENTATIONS_DIR}; nothing was trained"
        )
        return 0
    train(config, args.data, args.out, resume=args.resume, progress=not args.no_progress)
    return 0


def show_augmentations(config: TrainConfig, data_dir: Path, out_dir: Path, *, count: int) -> list[Path]:
    """Write ``count`` training images of ``config.data.fold``'s split beside their augmentation (positives first: they have boxes to follow)."""
    train_records, _ = split_records(load_records(data_dir), fold=config.data.fold)
    chosen = sorted(train_records, key=lambda record: record.boxes.shape[0] == 0)[:count]
    samples = [(record.patient_id, *load_sample(record, image_size=config.model.image_size)) for record in chosen]
    return write_augmentation_samples(samples, config.augment, out_dir, count=count, seed=config.seed)
