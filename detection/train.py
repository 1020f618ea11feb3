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
Run: ``lungdet train --config fasterrcnn_resnet50_fpn --data data/coco --out runs/r50 --fold 0``
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungdet.atomic import atomic_path, write_text_atomic
from lungdet.detection.augment import write_augmentation_samples
from lungdet.detection.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
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
from lungdet.detection.model import (
    build_model,
    in_memory_layout,
    load_pretrained_state,
    needs_masks,
    uses_frozen_recipe,
)
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


# Where torch has fused AdamW and SGD kernels (the CPU's since torch 2.4).
FUSED_DEVICE_TYPES = ("cuda", "cpu")


def build_optimizer(model: torch.nn.Module, config: TrainConfig, *, fused: bool | None = None) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s trainable parameters.

    ``fused`` (by default: when every parameter is on a GPU, or every one on the CPU) updates all
    parameters in one kernel instead of several per tensor: the same arithmetic, far fewer
    launches for a host-bound GPU step, and on a CPU a vectorised loop (AdamW over MobileNetV3-FPN's
    weights: 48 ms a step unfused, 8 ms fused, on 2 EPYC cores).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    if fused is None:
        fused = (
            bool(parameters)
            and len({p.device.type for p in parameters}) == 1
            and parameters[0].device.type in FUSED_DEVICE_TYPES
        )
    options = {"fused": True} if fused else {}
    if config.optim.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.optim.lr, weight_decay=config.optim.weight_decay, **options)
    return torch.optim.SGD(
        parameters,
        lr=config.optim.lr,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
        **options,
    )


# torch.compile's backend; the tests swap in "eager", which traces the same way without generating code.
COMPILE_BACKEND = "inductor"


def compile_fixed_shape_parts(model: torch.nn.Module) -> list[str]:
    """Compile, in place, the parts of ``model`` whose input shapes never change within a run; returns their names.

    The backbone with its FPN sees the same padded batch every step, and so do the RPN and
    RetinaNet heads on its feature maps; the box heads see a different number of proposals each
    step and would recompile, so they stay as they are. ``Module.compile`` keeps parameter names,
    so checkpoints are the same as without. A smaller last batch, and eval mode, compile once more.
    """
    modules = dict(model.named_modules())
    names = [name for name in ("backbone", "rpn.head", "head") if name in modules]
    for name in names:
        modules[name].compile(dynamic=False, backend=COMPILE_BACKEND)
    return names


def with_implementation_of(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (an optimizer state dict) set to run with ``optimizer``'s implementation (fused, foreach).

    A state dict carries the implementation flags it was saved with, and loading it would bring
    them back: a checkpoint saved unfused (by an older lungdet, or with ``fused=False``) would
    resume unfused, and a fused one would ask for the fused kernel where there may be none. How to
    update is this machine's choice; set before loading, so torch places the saved state where
    that implementation wants it.
    """
    implementation = {key: optimizer.defaults[key] for key in ("fused", "foreach") if key in optimizer.defaults}
    return {**saved, "param_groups": [{**group, **implementation} for group in saved["param_groups"]]}


def lr_factor(
    step: int, *, warmup_steps: int, total_steps: int, schedule: str, milestone_steps: list[int], gamma: float
) -> float:
    """The learning-rate multiplier at optimizer step ``step``.

    Linear warm-up from 1% over ``warmup_steps``, then either cosine decay to 0 at ``total_steps``
    or a multiplication by ``gamma`` at each of ``milestone_steps``.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if step < warmup_steps:
        return 0.01 + 0.99 * step / warmup_steps
    if schedule == "step":
        return gamma ** sum(step >= milestone for milestone in milestone_steps)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_warning(warmup_steps: int, *, total_steps: int) -> str | None:
    """A note when the warm-up takes over a quarter of the run: the learning rate peaks late or never.

    A config written for the full RSNA set (fasterrcnn_resnet50_fpn warms up over 500 steps) run on a
    few hundred images would otherwise train at a fraction of its learning rate without a word.
    """
    shorter = max(total_steps // 10, 1)
    # A run of a few steps cannot warm up for less than one: nothing to suggest then.
    if total_steps <= 0 or warmup_steps * 4 <= total_steps or warmup_steps <= shorter:
        return None
    return (
        f"optim.warmup_iters={warmup_steps} is {min(warmup_steps / total_steps, 1):.0%} of this run's {total_steps} optimizer steps, "
        f"so the learning rate peaks late or never; for a run this short try optim.warmup_iters={shorter}"
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, *, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of ``config.optim`` in optimizer steps (milestones are given in epochs)."""
    factor = functools.partial(
        lr_factor,
        warmup_steps=config.optim.warmup_iters,
        total_steps=config.optim.epochs * steps_per_epoch,
        schedule=config.optim.schedule,
        milestone_steps=[milestone * steps_per_epoch for milestone in config.optim.step_milestones],
        gamma=config.optim.step_gamma,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    """Rewrite the whole metrics file from the history kept in the checkpoint (so resume stays consistent)."""
    columns: list[str] = []
    for row in history:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})
    write_text_atomic(path, buffer.getvalue())


def rng_states(device: torch.device) -> dict[str, Any]:
    """This process's random streams that training draws from (the model samples proposals from torch's)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Set torch's CPU random state, and ``device``'s CUDA one when saved, from a :func:`rng_states` dict."""
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def open_tensorboard(out_dir: Path, enabled: bool) -> Any:
    """A SummaryWriter on ``RUN/tensorboard``, or None (disabled, or the package is missing: said once)."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(
            "lungdet train: tensorboard is not installed, so metrics go to metrics.csv only (pip install tensorboard, or tensorboard=false)"
        )
        return None
    return SummaryWriter(str(out_dir / TENSORBOARD_DIR))


class Run:
    """One training run's state: what it trains, how far it got, and how to save and restore all of it.

    A checkpoint holds everything needed to carry on exactly where it was written: the weights
    (and their EMA), optimizer, schedule, gradient scaler, completed epochs and metrics history;
    a mid-epoch checkpoint adds each process's progress through the epoch and its random state.
    ``model`` in a checkpoint is always the weights to predict with (the EMA when there is one).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        job: Distributed,
        device: torch.device,
        steps_per_epoch: int,
        checkpoint: dict[str, Any] | None,
        source: Path | None = None,
    ) -> None:
        self.config, self.job, self.device = config, job, device
        if checkpoint is not None:
            self.frozen = bool(checkpoint["frozen_batch_norm"])
            self.model = build_model(
                config.model,
                frozen_batch_norm=self.frozen,
                image_loss_weight=config.optim.image_loss_weight,
                image_class_loss_weight=config.optim.image_class_loss_weight,
            )
            self.model.load_state_dict(checkpoint.get("train_model") or checkpoint["model"])
            if checkpoint.get("epoch_progress") is None:
                where = f"after epoch {checkpoint['epoch']}"
            else:
                where = f"in epoch {checkpoint['epoch'] + 1}, after batch {checkpoint['epoch_progress'][0]['progress']['batches']}"
            self.notice = f"resumed from {source} {where}"
        else:
            pretrained_state, self.notice = load_pretrained_state(config.model)
            self.frozen = uses_frozen_recipe(pretrained_state)
            self.model = build_model(
                config.model,
                pretrained_state=pretrained_state,
                image_loss_weight=config.optim.image_loss_weight,
                image_class_loss_weight=config.optim.image_class_loss_weight,
            )
        self.precision = resolve_precision(config.amp, device)
        in_memory_layout(self.model, channels_last=config.channels_last)
        self.model.to(device)
        self.ema = None
        if config.optim.ema_decay > 0:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model,
                multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.optim.ema_decay),
                use_buffers=True,
            )
        if config.compile:
            # Only the trained model: the EMA copy just validates, and compiling it would cost another minute.
            compile_fixed_shape_parts(self.model)
        # DDP after the EMA copy: the EMA follows the plain module, and the wrapper only adds gradient averaging.
        self.trained = self.model
        if job.enabled:
            device_ids = [device.index] if device.type == "cuda" else None
            self.trained = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, steps_per_epoch=steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.dtype == torch.float16 else None
        self.history: list[dict[str, Any]] = []
        self.completed_epochs = 0
        self.epoch_progress: EpochProgress | None = None
        if checkpoint is not None:
            self._restore(checkpoint)

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights that are validated and saved for predict: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(with_implementation_of(self.optimizer, checkpoint["optimizer"]))
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None:
            if checkpoint.get("ema") is not None:
                self.ema.load_state_dict(checkpoint["ema"])
            else:
                self.ema.module.load_state_dict(self.model.state_dict())  # EMA switched on at resume: it starts here
        self.history = list(checkpoint["history"])
        self.completed_epochs = int(checkpoint["epoch"])
        per_rank = checkpoint.get("epoch_progress")
        if per_rank is not None:
            if len(per_rank) == self.job.world_size:
                mine = per_rank[self.job.rank]
                self.epoch_progress = EpochProgress(**mine["progress"])
                restore_rng_states(mine["rng"], self.device)
            else:
                self.notice += f"; it was saved by {len(per_rank)} processes, not {self.job.world_size}, so epoch {self.completed_epochs + 1} starts again"
                restore_rng_states(checkpoint["rng"], self.device)
        else:
            restore_rng_states(checkpoint["rng"], self.device)

    def state(
        self, *, preprocessing: dict[str, Any], epoch_progress: list[dict[str, Any]] | None, rng: dict[str, Any]
    ) -> dict[str, Any]:
        """The checkpoint written as ``last.pt`` (and copied to ``best.pt``), everything needed to carry on.

        ``model`` holds the weights to predict with (the EMA when there is one, the trained weights then in
        ``train_model``); then the optimizer, scheduler and scaler states, completed epochs, the config,
        ``preprocessing``, the latest epoch's tuned cut-offs (``score_threshold`` 0.5 before any validation) and
        ``val_map``, the history and ``rng``. ``epoch_progress`` is each process's progress and random state mid-epoch,
        None at an epoch's end.
        """
        last = self.history[-1] if self.history else {}
        return {
            "model": self.evaluated.state_dict(),
            "train_model": self.model.state_dict() if self.ema is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.completed_epochs,
            "epoch_progress": epoch_progress,
            "config": config_to_dict(self.config),
            "frozen_batch_norm": self.frozen,
            # How convert prepared the training images; predict repeats it on raw DICOMs.
            "preprocessing": preprocessing,
            "score_threshold": last.get("val_score_threshold", 0.5),
            # With an image head: the probability cut-off of best sensitivity + specificity on validation.
            **({"image_threshold": last["val_image_threshold"]} if "val_image_threshold" in last else {}),
            # With an image head: Platt scaling of its probability, fitted on validation (lungdet.submission.platt); the cut-off above is on the scaled one.
            **(
                {"image_calibration": [last["val_platt_slope"], last["val_platt_intercept"]]}
                if "val_platt_slope" in last
                else {}
            ),
            "val_map": last.get("val_map", -1.0),
            "history": self.history,
            "rng": rng,
        }


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
    preprocessing = load_preprocessing(data_dir)
    checkpoint = load_checkpoint(out_dir / LAST_CHECKPOINT) if resume else None
    if checkpoint is not None and int(checkpoint["epoch"]) >= config.optim.epochs:
        # Checked here, not by the empty-history check after the loop: a resumed history is never empty.
        raise LungdetError(
            f"{out_dir}: nothing to train: the run already finished {checkpoint['epoch']} epochs of optim.epochs={config.optim.epochs} "
            "(raise optim.epochs to continue, e.g. optim.epochs=20)"
        )
    # The run folder only once the data and any checkpoint have been read: a mistake there leaves nothing behind.
    if job.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A SIGKILL during a save leaves its temporary file (never a broken checkpoint under the real name).
        for stale in out_dir.glob(".*.tmp"):
            stale.unlink()
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
    tensorboard = open_tensorboard(out_dir, config.tensorboard) if job.is_main else None
    processes = f" x {job.world_size} processes" if job.enabled else ""
    validating = config.data.fold != ALL_FOLDS
    (validation_images,) = sum_over_ranks(job, [float(len(val_loader.dataset))])  # each process holds its shard
    say(
        f"lungdet train: {config.model.architecture} at {config.model.image_size}px on {device}{processes}, {run.precision.name}; "
        f"{len(train_loader.dataset)} training / {validation_images:.0f} validation images (fold {config.data.fold})"
    )
    warning = warmup_warning(config.optim.warmup_iters, total_steps=steps_per_epoch * config.optim.epochs)
    if warning:
        say(f"lungdet train: note: {warning}")

    def save_last(epoch_progress: EpochProgress | None) -> None:
        """Write last.pt; mid-epoch, with every process's progress and random state (collected on rank 0)."""
        rng = rng_states(device)
        per_rank = None
        if epoch_progress is not None:
            per_rank = gather_to_main(job, {"progress": dataclasses.asdict(epoch_progress), "rng": rng})
        if job.is_main:
            save_checkpoint(
                out_dir / LAST_CHECKPOINT, run.state(preprocessing=preprocessing, epoch_progress=per_rank, rng=rng)
            )

    def after_optimizer_step(epoch_progress: EpochProgress) -> None:
        every = config.checkpoint_every_steps
        if every and run.scheduler.last_epoch % every == 0:
            save_last(epoch_progress)

    should_stop = None
    if config.max_minutes > 0:
        deadline = time.monotonic() + config.max_minutes * 60
        # Rank 0's clock decides for all: ranks that stopped at different steps would wait on each other for ever.
        should_stop = lambda: share_from_main(job, time.monotonic() >= deadline)  # noqa: E731
    # The same optimizer, schedule, scaler and average every epoch; only the loader's position moves.
    optimizer_step = OptimizerStep(
        run.optimizer,
        run.scheduler,
        scaler=run.scaler,
        accumulate_steps=config.optim.accumulate_steps,
        grad_clip_norm=config.optim.grad_clip_norm,
        ema=run.ema,
    )
    hooks = EpochHooks(on_optimizer_step=after_optimizer_step, should_stop=should_stop)
    best_map = max((row.get("val_map", -1.0) for row in run.history), default=-1.0)
    sampler = train_loader.sampler
    for epoch in range(run.completed_epochs + 1, config.optim.epochs + 1):
        sampler.set_epoch(epoch)
        epoch_progress, run.epoch_progress = run.epoch_progress, None
        if epoch_progress is not None:
            sampler.resume_at(epoch_progress.batches * config.data.batch_size)
        epoch_lr = run.optimizer.param_groups[0]["lr"]
        epoch_progress = train_one_epoch(
            run.trained,
            optimizer_step,
            train_loader,
            device,
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
                device,
                score_thresholds=config.val_score_thresholds,
                progress=progress,
                precision=run.precision,
                job=job,
            )
            if validating
            else {}
        )
        row = {"epoch": epoch, "lr": epoch_lr, **train_metrics, **val_metrics}
        run.history.append(row)
        run.completed_epochs = epoch
        save_last(None)
        # Without validation the last epoch is the model: the epoch count was chosen elsewhere (lungdet cv --final).
        improved = row["val_map"] > best_map if validating else True
        if improved:
            best_map = row.get("val_map", best_map)
            if job.is_main:
                with atomic_path(out_dir / BEST_CHECKPOINT) as temporary:
                    shutil.copyfile(out_dir / LAST_CHECKPOINT, temporary)
        if job.is_main:
            write_metrics_csv(out_dir / METRICS_FILE, run.history)
            log_to_tensorboard(tensorboard, row)
        validation = (
            f", val mAP {row['val_map']:.4f} at confidence >= {row['val_score_threshold']:g}"
            + (f", image AUC {row['val_auc']:.3f}" if "val_auc" in row else "")
            if validating
            else ", no validation (every image trains)"
        )
        say(
            f"epoch {epoch}/{config.optim.epochs}: loss {row['loss']:.3f}, {row['images_per_second']:.1f} img/s "
            f"({row['data_wait_fraction']:.0%} waiting for data){validation}{' (best)' if improved and validating else ''}"
        )
        if train_metrics["stopped_early"]:
            say(f"lungdet train: stopped after max_minutes={config.max_minutes:g}; the last epoch was partial")
            break
    if tensorboard is not None:
        tensorboard.close()
    if not validating:
        say(
            f"lungdet train: trained {run.completed_epochs} epochs on every image, no validation; best.pt is the last epoch, in {out_dir}"
        )
        return run.history[-1]
    best = max(run.history, key=lambda row: row["val_map"])
    say(f"lungdet train: best val mAP {best['val_map']:.4f} (epoch {best['epoch']}); checkpoints in {out_dir}")
    return best


def epoch_metrics(job: Distributed, progress: EpochProgress) -> dict[str, float]:
    """The epoch's training metrics over every process: losses averaged, images summed, time from the slowest."""
    names = sorted(progress.totals)
    summed = sum_over_ranks(
        job,
        [progress.totals[name] for name in names]
        + [float(progress.batches), float(progress.images), progress.data_seconds],
    )
    totals, (batches, images, data_seconds) = dict(zip(names, summed[: len(names)], strict=True)), summed[len(names) :]
    # Every process trains for the same wall time; throughput is all images over that time.
    combined = EpochProgress(
        batches=int(batches),
        images=int(images),
        seconds=progress.seconds,
        data_seconds=data_seconds / job.world_size,
        stopped_early=progress.stopped_early,
        totals=totals,
    )
    return combined.metrics()


def log_to_tensorboard(writer: Any, row: dict[str, Any]) -> None:
    """Log ``row``'s finite numbers (not ``epoch``) as scalars at step ``row['epoch']``; nothing if ``writer`` is None.

    Each is grouped by the part before its first underscore (``val_map`` -> ``val/map``); the writer is flushed after
    the row.
    """
    if writer is None:
        return
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
            # 'val_map@0.3' -> 'val/map@0.3': TensorBoard groups charts by the part before the slash.
            group, _, name = key.partition("_")
            writer.add_scalar(f"{group}/{name}" if name else key, value, row["epoch"])
    writer.flush()


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
