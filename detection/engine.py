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


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Iterable[tuple[list[torch.Tensor], list[dict]]],
    device: torch.device,
    *,
    epoch: int,
    precision: Precision | None = None,
    scaler: torch.amp.GradScaler | None = None,
    accumulate_steps: int = 1,
    grad_clip_norm: float = 0.0,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    state: EpochProgress | None = None,
    on_optimizer_step: Callable[[EpochProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = True,
) -> EpochProgress:
    """Train one pass over ``loader`` (or what is left of it after a resume); returns the epoch's progress.

    Gradients of ``accumulate_steps`` batches are summed per optimizer step (the loss is divided
    so the step equals one of a batch that many times larger); under DistributedDataParallel the
    gradient all-reduce runs only on the step's last batch. ``state`` continues an epoch that a
    mid-epoch checkpoint recorded. ``on_optimizer_step`` is called after every optimizer step
    (the caller writes checkpoints there). Training stops early, at a step boundary, when
    ``should_stop()`` says so (a time limit; under DDP every rank must get the same answer).

    Raises
    ------
    NonFiniteLossError
        A loss was NaN or infinite; the message names the epoch, the batch and each loss.
    """
    precision = precision or Precision(device.type, None)
    state = state if state is not None else EpochProgress()
    model.train()
    optimizer.zero_grad(set_to_none=True)
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
        # One copy to the host per step, not one per loss: each copy waits for the GPU to catch up,
        # and the values must be checked before the weights are touched.
        loss_value, *part_values = (
            torch.stack([loss.detach(), *(value.detach() for value in losses.values())]).float().tolist()
        )
        if not math.isfinite(loss_value):
            parts = ", ".join(f"{name}={value:.4g}" for name, value in zip(losses, part_values, strict=True))
            raise NonFiniteLossError(
                f"epoch {epoch}, batch {batch} (optimizer step {scheduler.last_epoch + 1}): loss is {loss_value} ({parts}); "
                "lower optim.lr or raise optim.warmup_iters, and check the boxes in the dataset"
            )
        steps_now = batch % accumulate_steps == 0 or position == remaining
        # Only the step's last backward needs DDP's all-reduce; the others just add to local gradients.
        syncing = model.no_sync() if (not steps_now and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with syncing:
            scaled = loss / accumulate_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if steps_now:
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            if grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model.module if hasattr(model, "module") else model)
        state.batches = batch
        state.images += len(images)
        state.totals["loss"] = state.totals.get("loss", 0.0) + loss_value
        for name, value in zip(losses, part_values, strict=True):
            state.totals[name] = state.totals.get(name, 0.0) + value
        now = time.perf_counter()
        state.seconds += now - clock  # the whole step, its data wait included
        state.data_seconds += data_seconds
        clock = now
        bar.set_postfix(
            loss=f"{state.totals['loss'] / state.batches:.3f}",
            img_s=f"{state.images / max(state.seconds, 1e-9):.1f}",
            data=f"{state.data_seconds / max(state.seconds, 1e-9):.0%}",
        )
        if steps_now:
            if on_optimizer_step is not None:
                on_optimizer_step(state)
            if should_stop is not None and should_stop():
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
