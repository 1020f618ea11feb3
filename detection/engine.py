"""The loops: one training epoch, prediction over a loader, validation with the RSNA metric.

Functions here receive built objects (model, optimizer, loader, device), never a config, so they
can be reused by any driver: ``lungdet train``, the demo, tests and benchmarks.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_tools.boxes import xyxy_to_xywh
from data_tools.errors import LungdetError
from submission.prediction_string import Prediction
from submission.score import score_dataset


class NonFiniteLossError(LungdetError):
    """Training produced a NaN or infinite loss; continuing would only spread NaNs into the weights."""


def move_to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    return [image.to(device, non_blocking=True) for image in images], [
        {key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets
    ]


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: DataLoader,
    device: torch.device,
    *,
    epoch: int,
    grad_clip_norm: float = 0.0,
    deadline: float | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train one pass over ``loader``; stop early once ``time.monotonic()`` passes ``deadline``.

    Returns mean losses (``loss`` and each torchvision component), ``images``, ``seconds``,
    ``images_per_second`` and ``stopped_early`` (1.0 or 0.0).

    Raises
    ------
    NonFiniteLossError
        A loss was NaN or infinite; the message names the epoch, the step and each component.
    """
    model.train()
    totals: dict[str, float] = defaultdict(float)
    images_seen = steps = 0
    stopped_early = False
    start = time.monotonic()
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=None if progress else True, leave=False)
    for step, (images, targets) in enumerate(bar, start=1):
        images, targets = move_to_device(images, targets, device)
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            parts = ", ".join(f"{name}={value.item():.4g}" for name, value in losses.items())
            raise NonFiniteLossError(
                f"epoch {epoch} step {step}: loss is {loss.item()} ({parts}); lower optim.lr or raise optim.warmup_iters, "
                "and check the boxes in the dataset"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
        scheduler.step()
        steps += 1
        images_seen += len(images)
        totals["loss"] += loss.item()
        for name, value in losses.items():
            totals[name] += value.item()
        elapsed = time.monotonic() - start
        bar.set_postfix(loss=f"{totals['loss'] / steps:.3f}", img_s=f"{images_seen / max(elapsed, 1e-9):.1f}")
        if deadline is not None and time.monotonic() >= deadline:
            stopped_early = True
            break
    seconds = time.monotonic() - start
    metrics = {name: total / max(steps, 1) for name, total in totals.items()}
    metrics.update(images=float(images_seen), seconds=seconds, images_per_second=images_seen / max(seconds, 1e-9), stopped_early=float(stopped_early))
    return metrics


@torch.no_grad()
def predict_loader(model: nn.Module, loader: DataLoader, device: torch.device, *, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Prediction]]:
    """Run ``model`` over a validation loader: ``(truth, predictions)`` keyed by image id.

    Both are XYWH_ABS in the loader's image pixels (the model's input size). Truth comes from the
    same targets the loader yields, so it is in exactly the same space as the predictions.
    """
    model.eval()
    truth: dict[str, np.ndarray] = {}
    predictions: dict[str, Prediction] = {}
    for images, targets in tqdm(loader, desc="validate", unit="batch", disable=None if progress else True, leave=False):
        outputs = model([image.to(device) for image in images])
        for target, output in zip(targets, outputs):
            key = str(int(target["image_id"]))
            truth[key] = xyxy_to_xywh(target["boxes"].numpy())
            predictions[key] = Prediction.from_arrays(output["scores"].cpu().numpy(), xyxy_to_xywh(output["boxes"].cpu().numpy()))
    return truth, predictions


def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, *, score_thresholds: Sequence[float], progress: bool = False
) -> dict[str, float]:
    """Validation RSNA mAP at each confidence cut-off; report the best cut-off and its mAP.

    The RSNA metric punishes any box on a negative image with a 0, so the cut-off matters as much
    as the model; tuning it on validation and storing it with the checkpoint is what users need.
    """
    truth, predictions = predict_loader(model, loader, device, progress=progress)
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
    metrics.update({f"val_map@{threshold:g}": reports[threshold].map for threshold in score_thresholds})
    return metrics
