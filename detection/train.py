"""``lungdet train``: train a detector on the output of ``lungdet convert``.

Run folder layout::

    RUN/config.yaml   the resolved config (every default filled in)
    RUN/metrics.csv   one row per epoch: losses, images/s, validation RSNA mAP and its tuned cut-off
    RUN/last.pt       checkpoint after the latest epoch (model, optimizer, scheduler, epoch, config)
    RUN/best.pt       the checkpoint with the best validation mAP so far

Checkpoints are written to a temporary name and renamed, so a kill never leaves a broken one.
Run: ``lungdet train --config fasterrcnn_resnet50_fpn --data data/coco --out runs/r50 --fold 0``
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.atomic import atomic_path, write_text_atomic
from data_tools.errors import LungdetError
from detection.config import TrainConfig, apply_overrides, config_from_dict, config_to_dict, load_config, save_config
from detection.data import build_dataloaders, load_preprocessing
from detection.engine import evaluate, train_one_epoch
from detection.model import build_model, load_pretrained_state

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.yaml"


def resolve_device(name: str) -> torch.device:
    """``'auto'`` picks CUDA when present; an explicit CUDA device without CUDA is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LungdetError(f"device={name!r} is not a device name; use device=auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LungdetError(f"device={name!r} but this machine has no CUDA GPU; use device=cpu or device=auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if config.optim.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    return torch.optim.SGD(parameters, lr=config.optim.lr, momentum=config.optim.momentum, weight_decay=config.optim.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_iters: int, total_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 1% of the learning rate, then cosine decay to 0 at ``total_iters``."""
    warmup_iters = min(warmup_iters, max(total_iters - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_iters:
            return 0.01 + 0.99 * step / warmup_iters
        progress = (step - warmup_iters) / max(total_iters - warmup_iters, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary name, then rename: a kill mid-save keeps the previous file intact."""
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a lungdet checkpoint (plain tensors and dicts only: ``weights_only``, nothing executable)."""
    if not Path(path).is_file():
        raise LungdetError(f"{path}: checkpoint not found; was this run folder trained with 'lungdet train ... --out RUN'? (RUN/last.pt to resume, RUN/best.pt to predict)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise LungdetError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None


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


def train(config: TrainConfig, data_dir: Path, out_dir: Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train per ``config`` on ``data_dir`` (a ``lungdet convert`` output); write the run into ``out_dir``.

    Returns the best epoch's metrics row. With ``resume``, continues from ``out_dir/last.pt``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    train_loader, val_loader = build_dataloaders(data_dir, config.data, image_size=config.model.image_size, seed=config.seed)
    preprocessing = load_preprocessing(data_dir)

    checkpoint = load_checkpoint(out_dir / LAST_CHECKPOINT) if resume else None
    if checkpoint is not None and int(checkpoint["epoch"]) >= config.optim.epochs:
        # Checked here, not by the empty-history check after the loop: a resumed history is never empty.
        raise LungdetError(
            f"{out_dir}: nothing to train: the run already finished {checkpoint['epoch']} epochs of optim.epochs={config.optim.epochs} "
            "(raise optim.epochs to continue, e.g. optim.epochs=20)"
        )
    if checkpoint is not None:
        frozen = bool(checkpoint["frozen_batch_norm"])
        model = build_model(config.model, frozen_batch_norm=frozen)
        model.load_state_dict(checkpoint["model"])
        notice = f"resumed from {out_dir / LAST_CHECKPOINT} after epoch {checkpoint['epoch']}"
    else:
        pretrained_state, notice = load_pretrained_state(config.model)
        frozen = pretrained_state is not None
        model = build_model(config.model, pretrained_state=pretrained_state)
    print(f"lungdet train: {notice}")
    model.to(device)

    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, warmup_iters=config.optim.warmup_iters, total_iters=config.optim.epochs * len(train_loader))
    history: list[dict[str, Any]] = []
    start_epoch, best_map = 1, -1.0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history = list(checkpoint["history"])
        start_epoch = int(checkpoint["epoch"]) + 1
        best_map = max((row["val_map"] for row in history), default=-1.0)
        torch.set_rng_state(checkpoint["torch_rng_state"])

    save_config(config, out_dir / CONFIG_FILE)
    print(
        f"lungdet train: {config.model.architecture} at {config.model.image_size}px on {device}; "
        f"{len(train_loader.dataset)} training / {len(val_loader.dataset)} validation images (fold {config.data.fold})"
    )
    deadline = time.monotonic() + config.max_minutes * 60 if config.max_minutes > 0 else None
    for epoch in range(start_epoch, config.optim.epochs + 1):
        epoch_lr = optimizer.param_groups[0]["lr"]
        train_metrics = train_one_epoch(
            model, optimizer, scheduler, train_loader, device,
            epoch=epoch, grad_clip_norm=config.optim.grad_clip_norm, deadline=deadline, progress=progress,
        )
        val_metrics = evaluate(model, val_loader, device, score_thresholds=config.val_score_thresholds, progress=progress)
        row = {"epoch": epoch, "lr": epoch_lr, **train_metrics, **val_metrics}
        history.append(row)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "config": config_to_dict(config),
            "frozen_batch_norm": frozen,
            # How convert prepared the training images; predict repeats it on raw DICOMs.
            "preprocessing": preprocessing,
            "score_threshold": row["val_score_threshold"],
            "val_map": row["val_map"],
            "history": history,
            "torch_rng_state": torch.get_rng_state(),
        }
        save_checkpoint(out_dir / LAST_CHECKPOINT, state)
        improved = row["val_map"] > best_map
        if improved:
            best_map = row["val_map"]
            save_checkpoint(out_dir / BEST_CHECKPOINT, state)
        write_metrics_csv(out_dir / METRICS_FILE, history)
        print(
            f"epoch {epoch}/{config.optim.epochs}: loss {row['loss']:.3f}, {row['images_per_second']:.1f} img/s, "
            f"val mAP {row['val_map']:.4f} at confidence >= {row['val_score_threshold']:g}"
            f"{' (best)' if improved else ''}"
        )
        if train_metrics["stopped_early"]:
            print(f"lungdet train: stopped after max_minutes={config.max_minutes:g}; the last epoch was partial")
            break
    best = max(history, key=lambda row: row["val_map"])
    print(f"lungdet train: best val mAP {best['val_map']:.4f} (epoch {best['epoch']}); checkpoints in {out_dir}")
    return best


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungdet train",
        description="Train a torchvision Faster R-CNN on a dataset written by 'lungdet convert'. "
        "Validation uses the official RSNA metric; the best checkpoint and its tuned confidence cut-off are kept.",
        epilog="example: lungdet train --config fasterrcnn_mobilenet_cpu --data data/coco --out runs/mobilenet --fold 0 optim.epochs=4",
    )
    parser.add_argument("--config", default=None, help="YAML file, or a name from configs/ (e.g. fasterrcnn_resnet50_fpn); default: built-in defaults")
    parser.add_argument("--data", type=Path, required=True, help="output folder of lungdet convert (holds annotations.json)")
    parser.add_argument("--out", type=Path, required=True, help="run folder for checkpoints, metrics.csv and config.yaml")
    parser.add_argument("--fold", type=int, default=None, help="validation fold (overrides data.fold)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt with the config stored in it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=0.005 model.image_size=384")
    return parser


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"data.fold={args.fold}"] if args.fold is not None else [])
    if args.resume:
        if args.config is not None:
            raise LungdetError("--resume takes the config stored in OUT/last.pt; drop --config (KEY=VALUE overrides still apply, e.g. optim.epochs=20)")
        stored = load_checkpoint(args.out / LAST_CHECKPOINT)["config"]
        config = config_from_dict(apply_overrides(stored, overrides))
    else:
        config = load_config(args.config, overrides)
    train(config, args.data, args.out, resume=args.resume, progress=not args.no_progress)
    return 0
