"""The loops: one training epoch, prediction over a loader, validation with the RSNA metric.

Functions here receive built objects (model, optimizer, loader, device), never a config, so they
can be reused by any driver: ``lungdet train``, the demo, tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lungdet.boxes import xyxy_to_xywh
from lungdet.detection.distributed import Distributed, gather_to_main, share_from_main
from lungdet.detection.image_head import IMAGE_PROBABILITY, image_metadata_weights
from lungdet.detection.inference import with_metadata_features
from lungdet.detection.runtime import Precision
from lungdet.errors import LungdetError
from lungdet.submission.platt import apply_platt, fit_platt
from lungdet.submission.prediction_string import Prediction
from lungdet.submission.score import roc_auc, score_dataset, youden_threshold


class NonFiniteLossError(LungdetError):
    """Training produced a NaN or infinite loss; continuing would only spread NaNs into the weights."""


def move_to_device(
    images: list[torch.Tensor], targets: list[dict], device: torch.device
) -> tuple[list[torch.Tensor], list[dict]]:
    """A batch's images and every tensor of its targets on ``device`` (new lists and dicts), copied without blocking.

    The copies overlap the computation only from pinned memory; every target value must be a tensor.
    """
    return [image.to(device, non_blocking=True) for image in images], [
        {key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets
    ]


@dataclass
class EpochProgress:
    """How far an epoch has got; saved in mid-epoch checkpoints so that a resumed run carries on exactly.

    ``totals`` sums each loss over batches; ``data_seconds`` is time spent waiting for the loader.
    """

    batches: int = 0
    images: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0
    stopped_early: bool = False
    totals: dict[str, float] = field(default_factory=dict)

    def add_batch(self, images: int, loss: float, parts: dict[str, float], seconds: float, data_seconds: float) -> None:
        """Count one batch: its images, its summed loss and each part, its wall time and the time spent waiting for it."""
        self.batches += 1
        self.images += images
        self.totals["loss"] = self.totals.get("loss", 0.0) + loss
        for name, value in parts.items():
            self.totals[name] = self.totals.get(name, 0.0) + value
        self.seconds += seconds
        self.data_seconds += data_seconds

    def metrics(self) -> dict[str, float]:
        """Mean losses, ``images``, ``seconds``, ``images_per_second``, ``data_wait_fraction`` and ``stopped_early`` (1.0/0.0)."""
        metrics = {name: total / max(self.batches, 1) for name, total in self.totals.items()}
        metrics.update(
            images=float(self.images),
            seconds=self.seconds,
            images_per_second=self.images / max(self.seconds, 1e-9),
            data_wait_fraction=self.data_seconds / max(self.seconds, 1e-9),
            stopped_early=float(self.stopped_early),
        )
        return metrics


@dataclass
class OptimizerStep:
    """What turns losses into new weights: the backward pass of each batch, and every ``accumulate_steps`` batches a step.

    A step unscales the gradients (fp16), clips their global norm at ``grad_clip_norm`` (0 = off),
    steps the optimizer, zeroes the gradients, advances the schedule and updates the weights'
    moving average ``ema``. Each loss is divided by ``accumulate_steps``, so that a step equals one
    of a batch that many times larger; under DistributedDataParallel the gradient all-reduce runs
    only in the step's last backward pass.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None
    accumulate_steps: int = 1
    grad_clip_norm: float = 0.0
    ema: torch.optim.swa_utils.AveragedModel | None = None

    @property
    def number(self) -> int:
        """The optimizer step the next ``step()`` makes, counted from 1 over the whole run (for messages)."""
        return self.scheduler.last_epoch + 1

    def backward(self, model: nn.Module, loss: torch.Tensor, *, last_of_step: bool) -> None:
        """Add ``loss``'s gradients (scaled for fp16, divided by ``accumulate_steps``) to the weights' ``.grad``."""
        # Only the step's last backward needs DDP's all-reduce; the others just add to local gradients.
        syncing = model.no_sync() if (not last_of_step and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with syncing:
            scaled = loss / self.accumulate_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def step(self, model: nn.Module) -> None:
        """One optimizer step on the summed gradients, then the schedule and the moving average."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if self.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(model.module if hasattr(model, "module") else model)


@dataclass
class EpochHooks:
    """What the caller runs at each optimizer step: ``on_optimizer_step(progress)`` (a checkpoint), then ``should_stop()``.

    ``should_stop`` ends the epoch early at that step boundary (a time limit; under DDP every rank
    must get the same answer).
    """

    on_optimizer_step: Callable[[EpochProgress], None] | None = None
    should_stop: Callable[[], bool] | None = None


def finite_loss_values(
    loss: torch.Tensor, losses: dict[str, torch.Tensor], *, epoch: int, batch: int, step: int
) -> tuple[float, list[float]]:
    """``loss`` (the sum of ``losses``) and each part as floats, read in one copy; NonFiniteLossError if the sum is not finite.

    One copy per step, not one per loss: each copy waits for the GPU to catch up, and the values
    must be checked before the weights are touched.
    """
    loss_value, *part_values = (
        torch.stack([loss.detach(), *(value.detach() for value in losses.values())]).float().tolist()
    )
    if not math.isfinite(loss_value):
        parts = ", ".join(f"{name}={value:.4g}" for name, value in zip(losses, part_values, strict=True))
        raise NonFiniteLossError(
            f"epoch {epoch}, batch {batch} (optimizer step {step}): loss is {loss_value} ({parts}); "
            "lower optim.lr or raise optim.warmup_iters, and check the boxes in the dataset"
        )
    return loss_value, part_values


def train_one_epoch(
    model: nn.Module,
    optimizer_step: OptimizerStep,
    loader: Iterable[tuple[list[torch.Tensor], list[dict]]],
    device: torch.device,
    *,
    epoch: int,
    precision: Precision | None = None,
    state: EpochProgress | None = None,
    hooks: EpochHooks | None = None,
    progress: bool = True,
) -> EpochProgress:
    """Train one pass over ``loader`` (or what is left of it after a resume); returns the epoch's progress.

    Each batch is a list of float ``[3, H, W]`` images in [0, 1] and their targets (``boxes`` XYXY
    in those pixels, ``labels``). ``optimizer_step`` does the backward passes and the steps (see
    :class:`OptimizerStep`); ``state`` continues an epoch that a mid-epoch checkpoint recorded;
    ``hooks`` run at each optimizer step (:class:`EpochHooks`).

    Raises
    ------
    NonFiniteLossError
        A loss was NaN or infinite; the message names the epoch, the batch and each loss.
    """
    precision = precision or Precision(device.type, None)
    state = state if state is not None else EpochProgress()
    hooks = hooks or EpochHooks()
    model.train()
    optimizer_step.optimizer.zero_grad(set_to_none=True)
    remaining = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(
        loader, desc=f"epoch {epoch}", unit="batch", total=remaining, disable=None if progress else True, leave=False
    )
    clock = time.perf_counter()
    for position, (images, targets) in enumerate(bar, start=1):
        data_seconds = time.perf_counter() - clock
        batch = state.batches + 1
        images, targets = move_to_device(images, targets, device)
        with precision.autocast():
            losses = model(images, targets)
        loss = sum(losses.values())
        loss_value, part_values = finite_loss_values(loss, losses, epoch=epoch, batch=batch, step=optimizer_step.number)
        last_of_step = batch % optimizer_step.accumulate_steps == 0 or position == remaining
        optimizer_step.backward(model, loss, last_of_step=last_of_step)
        if last_of_step:
            optimizer_step.step(model)
        now = time.perf_counter()
        # The whole step's time, its data wait included.
        state.add_batch(len(images), loss_value, dict(zip(losses, part_values, strict=True)), now - clock, data_seconds)
        clock = now
        bar.set_postfix(
            loss=f"{state.totals['loss'] / state.batches:.3f}",
            img_s=f"{state.images / max(state.seconds, 1e-9):.1f}",
            data=f"{state.data_seconds / max(state.seconds, 1e-9):.0%}",
        )
        if last_of_step:
            if hooks.on_optimizer_step is not None:
                hooks.on_optimizer_step(state)
            if hooks.should_stop is not None and hooks.should_stop():
                state.stopped_early = True
                break
    return state


@torch.no_grad()
def predict_loader(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    progress: bool = False,
    precision: Precision | None = None,
    probabilities: dict[str, float] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Prediction]]:
    """Run ``model`` over a validation loader: ``(truth, predictions)`` keyed by image id.

    Both are XYWH_ABS in the loader's image pixels (the model's input size). Truth comes from the
    same targets the loader yields, so it is in exactly the same space as the predictions. A
    model with an image-level head also fills ``probabilities`` (image id -> probability, with its
    metadata term from each target's ``metadata``), when given.
    """
    model.eval()
    metadata_weights = image_metadata_weights(model)
    truth: dict[str, np.ndarray] = {}
    predictions: dict[str, Prediction] = {}
    for images, targets in tqdm(loader, desc="validate", unit="batch", disable=None if progress else True, leave=False):
        with (precision or Precision(device.type, None)).autocast():
            outputs = model([image.to(device, non_blocking=True) for image in images])
        for target, output in zip(targets, outputs, strict=True):
            key = str(int(target["image_id"]))
            truth[key] = xyxy_to_xywh(target["boxes"].numpy())
            # .float(): under bf16 autocast the heads may hand back half-precision scores.
            predictions[key] = Prediction.from_arrays(
                output["scores"].float().cpu().numpy(), xyxy_to_xywh(output["boxes"].float().cpu().numpy())
            )
            if probabilities is not None and IMAGE_PROBABILITY in output:
                probability = float(output[IMAGE_PROBABILITY])
                if metadata_weights is not None:
                    probability = with_metadata_features(probability, target["metadata"].numpy(), metadata_weights)
                probabilities[key] = probability
    return truth, predictions


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    score_thresholds: Sequence[float],
    progress: bool = False,
    precision: Precision | None = None,
    job: Distributed | None = None,
) -> dict[str, float]:
    """Validation RSNA mAP at each confidence cut-off; report the best cut-off and its mAP.

    The RSNA metric punishes any box on a negative image with a 0, so the cut-off matters as much
    as the model; tuning it on validation and storing it with the checkpoint is what users need.
    A model with an image-level head adds its AUC, the Platt scaling of its probabilities fitted
    on these images (``val_platt_slope``, ``val_platt_intercept``) and the scaled probability's
    cut-off of best sensitivity + specificity. Under ``job`` with several processes, each predicts its shard of
    the loader, rank 0 scores them all, and every rank returns rank 0's metrics.
    """
    job = job or Distributed()
    probabilities: dict[str, float] = {}
    truth, predictions = predict_loader(
        model, loader, device, progress=progress and job.is_main, precision=precision, probabilities=probabilities
    )
    shards = gather_to_main(job, (truth, predictions, probabilities))
    if not job.is_main:
        return share_from_main(job, {})
    for shard_truth, shard_predictions, shard_probabilities in shards[1:]:
        truth.update(shard_truth)
        predictions.update(shard_predictions)
        probabilities.update(shard_probabilities)
    return share_from_main(job, score_predictions(truth, predictions, score_thresholds, probabilities=probabilities))


def score_predictions(
    truth: dict[str, np.ndarray],
    predictions: dict[str, Prediction],
    score_thresholds: Sequence[float],
    *,
    probabilities: dict[str, float] | None = None,
) -> dict[str, float]:
    """The validation metrics of ``predictions`` (and image ``probabilities``, if any) against ``truth`` (see :func:`evaluate`)."""
    reports = {threshold: score_dataset(truth, predictions, min_confidence=threshold) for threshold in score_thresholds}
    best = max(reports, key=lambda threshold: (reports[threshold].map, -threshold))
    report = reports[best]
    metrics = {
        "val_map": report.map,
        "val_score_threshold": best,
        "val_mean_iou": report.mean_iou if report.mean_iou is not None else math.nan,
        "val_sensitivity": report.sensitivity if report.sensitivity is not None else math.nan,
        "val_specificity": report.specificity if report.specificity is not None else math.nan,
        "val_images": float(report.n_images),
    }
    if probabilities:
        keys = [key for key in truth if key in probabilities]
        labels = [len(truth[key]) > 0 for key in keys]
        # Platt scaling fitted on these validation images; the cut-off is chosen on the scaled
        # probabilities, which is what every runner reports once the checkpoint carries the two numbers.
        platt = fit_platt(labels, [probabilities[key] for key in keys])
        values = [apply_platt(probabilities[key], platt) for key in keys]
        auc, cut_off = roc_auc(labels, values), youden_threshold(labels, values)
        metrics["val_auc"] = auc if auc is not None else math.nan
        metrics["val_image_threshold"] = cut_off if cut_off is not None else 0.5
        if platt is not None:
            metrics["val_platt_slope"], metrics["val_platt_intercept"] = platt
    metrics.update({f"val_map@{threshold:g}": reports[threshold].map for threshold in score_thresholds})
    return metrics
