"""``lungdet pretrain``: pretrain a detector's backbone on a folder of radiographs, for ``model.pretrained``.

The 2018 RSNA winners started from a backbone pretrained on NIH ChestX-ray14's 112k radiographs.
This stage does the same with the detector's own backbone, built by
:func:`lungdet.detection.model.build_model` so that every weight keeps the name the detector
gives it. Images are PNG, JPEG or DICOM files anywhere under a folder, read by lungdet's own
readers (:mod:`lungdet.data_tools.image_io`). Two methods:

- **supervised** (``--labels`` NIH's ``Data_Entry_2017.csv``): multi-label classification of the
  findings in ``Finding Labels``, with binary cross-entropy on a linear layer over the globally
  pooled top feature level of the backbone's body (the deepest stage, which the FPN's top level
  is computed from).
- **simsiam** (no labels): SimSiam (Chen & He, 2021). Two augmented views of each radiograph go
  through the same encoder (body, pooling, projection MLP); a small predictor MLP maps each view's
  projection onto the other's, scored by negative cosine similarity, and the other view's
  projection is a constant target (stop-gradient), which is what keeps the outputs from
  collapsing to one vector. Chosen for a CPU with two cores: it needs no negatives (SimCLR and
  MoCo need large batches or a queue to have enough of them), no momentum copy of the encoder
  (BYOL's target network costs a third forward pass per view), and its paper reports it works
  at small batches. The views suit grey radiographs: crops of 40-100% of the image, small
  rotations, brightness, contrast, gamma and blur, and flips; no colour jitter, since there is no colour.

Only the body's weights (``backbone.body.*``, batch-norm running statistics included) are
written; the FPN and the heads start fresh in ``lungdet train``. The file is a state dict plus
one ``lungdet_pretrain`` entry that says how it was made; ``model.pretrained: FILE`` loads it,
and the detector then trains every layer with ordinary batch norm
(:func:`lungdet.detection.model.uses_frozen_recipe`). Nothing is downloaded.

The files, labels and views are :mod:`~lungdet.detection.pretrain_data`'s, the networks
:mod:`~lungdet.detection.pretrain_models`'; this module trains them and writes the backbone file.

Run: ``lungdet pretrain --image-dir nih/images --labels nih/Data_Entry_2017.csv --out nih_backbone.pth --architecture fasterrcnn_mobilenet_v3_large_fpn --image-size 256``
"""

from __future__ import annotations

import argparse
import datetime
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lungdet.atomic import atomic_path
from lungdet.cli_types import device_name, int_in_range
from lungdet.detection.config import MODEL_ARCHITECTURES
from lungdet.detection.model import PRETRAIN_MARKER
from lungdet.detection.pretrain_data import (
    FindingLabels,
    RadiographViews,
    collate_views,
    find_radiographs,
    pair_with_labels,
    read_finding_labels,
)
from lungdet.detection.pretrain_models import MultiLabelClassifier, SimSiam, build_encoder
from lungdet.detection.runtime import Precision, resolve_device, resolve_precision
from lungdet.errors import LungdetError

SIMSIAM = "simsiam"
SUPERVISED = "supervised"
BODY_PREFIX = "backbone.body."  # where the detector keeps the body's weights
MOMENTUM = 0.9  # SGD momentum (SimSiam's)
WEIGHT_DECAY = 1e-4  # L2 penalty (SimSiam's)
SIMSIAM_MIN_CROP = 0.4  # the smallest crop of a view, as a fraction of the image area; smaller crops lose the chest
SUPERVISED_MIN_CROP = 0.7  # milder for labels: a crop must still show the finding it is labelled with


def build_optimizer(model: nn.Module, *, lr: float, batch_size: int) -> torch.optim.SGD:
    """SGD over ``model`` at ``lr`` per 256 images (scaled by ``batch_size / 256``, as SimSiam does).

    Two groups: the predictor (SimSiam's) keeps its rate, as the paper found best; everything else is scheduled.
    """
    predictor = list(model.predictor.parameters()) if isinstance(model, SimSiam) else []
    kept = {id(parameter) for parameter in predictor}
    scheduled = [parameter for parameter in model.parameters() if id(parameter) not in kept]
    groups = [{"params": scheduled, "scheduled": True}] + (
        [{"params": predictor, "scheduled": False}] if predictor else []
    )
    return torch.optim.SGD(groups, lr=lr * batch_size / 256, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def build_scheduler(optimizer: torch.optim.SGD, *, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay to 0 over ``total_steps`` for the scheduled group; the rest keep their rate."""

    def cosine(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [cosine if group["scheduled"] else (lambda step: 1.0) for group in optimizer.param_groups]
    )


# --- the loop ------------------------------------------------------------------------------------


@dataclass
class EpochResult:
    """What one epoch did: mean loss over its steps, images trained on, read failures (reasons), seconds."""

    loss: float
    images: int
    failures: list[str]
    seconds: float


def pretrain_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: DataLoader,
    device: torch.device,
    epoch: int,
    *,
    precision: Precision,
    scaler: torch.amp.GradScaler | None = None,
    max_steps: int = 0,
    progress: bool = True,
) -> EpochResult:
    """One pass over ``loader``: forward (``model.loss``), backward and step per batch; ``max_steps`` > 0 stops early."""
    model.train()
    total, steps, images, failures = 0.0, 0, 0, []
    started = time.perf_counter()
    bar = tqdm(loader, desc=f"pretrain epoch {epoch}", unit="batch", disable=None if progress else True, leave=False)
    for views, targets, failed in bar:
        failures += failed
        if len(views) < 2:  # batch norm needs two images; only a batch of unreadable files gets here
            continue
        views, targets = views.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with precision.autocast():
            loss = model.loss(views, targets)
        if not torch.isfinite(loss):
            raise LungdetError(
                f"pretraining loss is {loss.item()} at epoch {epoch}, step {steps + 1}; lower --lr (or use --amp none)"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        total, steps, images = total + loss.item(), steps + 1, images + len(views)
        bar.set_postfix(loss=f"{total / steps:.4f}")
        if max_steps and steps >= max_steps:
            break
    return EpochResult(total / max(steps, 1), images, failures, time.perf_counter() - started)


@dataclass(frozen=True)
class PretrainOptions:
    """How to pretrain; the CLI flags of the same names say what each means."""

    architecture: str = "fasterrcnn_mobilenet_v3_large_fpn"
    image_size: int = 256
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    amp: str = "auto"
    max_steps: int = 0  # optimizer steps per epoch at most (0 = the whole epoch); for speed checks and tests


def pretrain(
    paths: Sequence[Path],
    options: PretrainOptions,
    *,
    labels: FindingLabels | None = None,
    targets: np.ndarray | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """Pretrain ``options.architecture``'s backbone body on ``paths``; return the backbone file's contents.

    With ``labels`` (and ``targets``, float32 ``[len(paths), len(labels.names)]``) it is supervised
    multi-label classification, without it SimSiam. The returned dict holds the body's tensors
    under the detector's names (``backbone.body.*``) and the :data:`PRETRAIN_MARKER` entry.
    Raises LungdetError when there are fewer images than one batch.
    """
    if len(paths) < options.batch_size:
        raise LungdetError(
            f"{len(paths)} images, fewer than one batch (--batch-size {options.batch_size}); lower --batch-size (at least 2) or add images"
        )
    torch.manual_seed(options.seed)
    device = resolve_device(options.device)
    precision = resolve_precision(options.amp, device)
    supervised = labels is not None
    encoder = build_encoder(options.architecture, options.image_size, channels_last=True)
    model: nn.Module = MultiLabelClassifier(encoder, len(labels.names)) if supervised else SimSiam(encoder)
    model.to(device)
    dataset, loader = _views_loader(paths, options, targets=targets, supervised=supervised, device=device)
    steps_per_epoch = min(len(loader), options.max_steps) if options.max_steps else len(loader)
    optimizer = build_optimizer(model, lr=options.lr, batch_size=options.batch_size)
    scheduler = build_scheduler(optimizer, total_steps=steps_per_epoch * options.epochs)
    scaler = torch.amp.GradScaler("cuda") if precision.dtype == torch.float16 else None
    images_seen, failures, loss = 0, [], float("nan")
    for epoch in range(1, options.epochs + 1):
        dataset.set_epoch(epoch)
        result = pretrain_one_epoch(
            model,
            optimizer,
            scheduler,
            loader,
            device,
            epoch,
            precision=precision,
            scaler=scaler,
            max_steps=options.max_steps,
            progress=progress,
        )
        images_seen, failures, loss = images_seen + result.images, failures + result.failures, result.loss
        if progress:
            print(
                f"lungdet pretrain: epoch {epoch}/{options.epochs}: loss {loss:.4f}, {result.images / max(result.seconds, 1e-9):.1f} images/s"
            )
    marker = _backbone_marker(
        options, labels=labels, images=len(paths), images_seen=images_seen, failures=failures, loss=loss
    )
    body = {
        BODY_PREFIX + name: tensor.detach().cpu().contiguous() for name, tensor in encoder.body.state_dict().items()
    }
    return {**body, PRETRAIN_MARKER: marker}


def _views_loader(
    paths: Sequence[Path],
    options: PretrainOptions,
    *,
    targets: np.ndarray | None,
    supervised: bool,
    device: torch.device,
) -> tuple[RadiographViews, DataLoader]:
    """The views of ``paths`` (one per image with labels, two for SimSiam) and their shuffled loader, whole batches only."""
    dataset = RadiographViews(
        paths,
        image_size=options.image_size,
        views=1 if supervised else 2,
        min_crop=SUPERVISED_MIN_CROP if supervised else SIMSIAM_MIN_CROP,
        targets=targets,
        seed=options.seed,
    )
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=options.num_workers,
        collate_fn=collate_views,
        generator=torch.Generator().manual_seed(options.seed),
        pin_memory=device.type == "cuda",
    )
    return dataset, loader


def _backbone_marker(
    options: PretrainOptions,
    *,
    labels: FindingLabels | None,
    images: int,
    images_seen: int,
    failures: list[str],
    loss: float,
) -> dict[str, object]:
    """The :data:`PRETRAIN_MARKER` entry of a backbone file: how it was made, on how many images, and how it ended."""
    supervised = labels is not None
    return {
        "architecture": options.architecture,
        "image_size": options.image_size,
        "method": SUPERVISED if supervised else SIMSIAM,
        "labels": list(labels.names) if supervised else [],
        "images": images,
        "images_seen": images_seen,
        "epochs": options.epochs,
        "final_loss": loss,
        "unreadable": len(failures),
        "first_unreadable": failures[0] if failures else "",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def save_backbone(path: Path, contents: dict[str, object]) -> None:
    """Write :func:`pretrain`'s result to ``path`` atomically (a temporary name, then renamed)."""
    with atomic_path(Path(path)) as temporary:
        torch.save(contents, temporary)


# --- command line --------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``lungdet pretrain``."""
    parser = argparse.ArgumentParser(
        prog="lungdet pretrain",
        description="Pretrain a detector's backbone on a folder of radiographs (PNG, JPEG, DICOM; searched recursively): "
        "supervised on NIH's findings with --labels, else self-supervised (SimSiam). Writes a backbone file for "
        "'lungdet train ... model.pretrained=FILE'. Nothing is downloaded.",
        epilog="example: lungdet pretrain --image-dir nih/images --labels nih/Data_Entry_2017.csv --out nih_backbone.pth "
        "--architecture fasterrcnn_mobilenet_v3_large_fpn --image-size 256 --epochs 2",
    )
    parser.add_argument(
        "--image-dir",
        type=Path,
        required=True,
        help="folder of radiographs (.png, .jpg, .jpeg, .dcm), searched recursively",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="NIH Data_Entry_2017.csv ('Image Index', 'Finding Labels'): supervised multi-label pretraining; without it, self-supervised SimSiam",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="the backbone file to write (.pth), for model.pretrained"
    )
    parser.add_argument(
        "--architecture",
        default="fasterrcnn_mobilenet_v3_large_fpn",
        choices=MODEL_ARCHITECTURES,
        help="the detector whose backbone is pretrained; train must use the same model.architecture (default: %(default)s)",
    )
    parser.add_argument(
        "--image-size",
        type=int_in_range(64, 2048),
        default=256,
        help="square side of the training views in pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs", type=int_in_range(1), default=1, help="passes over the images (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=int_in_range(2),
        default=16,
        help="images per step, at least 2 for batch norm (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=0.05,
        help="SGD learning rate per 256 images; a step uses lr x batch-size / 256 (default: %(default)s, SimSiam's)",
    )
    parser.add_argument(
        "--max-images",
        type=int_in_range(0),
        default=0,
        help="use only the first N images, in path order (0 = all); for a quick run",
    )
    parser.add_argument(
        "--num-workers",
        type=int_in_range(0),
        default=0,
        help="DataLoader worker processes that read and augment (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        type=device_name,
        default="auto",
        help="'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N' (default: %(default)s)",
    )
    parser.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "none", "bf16", "fp16"),
        help="mixed precision, as train's amp: 'auto' is bf16 on GPUs and CPUs that have it, else fp16 on GPUs, fp32 on CPUs (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the weights, the order and the views (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines (for logs)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet pretrain`` with parsed arguments; returns the exit status (0 on success).

    With ``--labels`` only the images that have a row train (the rest are counted in one line); an ``--out`` that is a
    folder, a non-positive ``--lr`` or no images is a LungdetError before any training.
    """
    if args.out.is_dir():
        raise LungdetError(
            f"--out {args.out} is a folder; give the backbone file's path, e.g. {args.out / 'backbone.pth'}"
        )
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise LungdetError(f"--lr must be a positive number, got {args.lr}")
    labels = read_finding_labels(args.labels) if args.labels is not None else None
    paths = find_radiographs(args.image_dir)
    targets = None
    if labels is not None:
        paths, targets, missing_rows, unlabelled = pair_with_labels(paths, labels)
        if missing_rows or unlabelled:
            print(
                f"lungdet pretrain: {missing_rows:,} of {len(labels.by_file):,} rows of {args.labels} name a file not under {args.image_dir}, "
                f"and {unlabelled:,} files there are in no row; both are left out, {len(paths):,} labelled images remain"
            )
    if args.max_images:
        paths = paths[: args.max_images]
        targets = targets[: args.max_images] if targets is not None else None
    if not paths:
        which, check = ("labelled ", "--image-dir and --labels") if labels else ("", "--image-dir")
        raise LungdetError(f"{args.image_dir}: no {which}radiographs (.png, .jpg, .jpeg, .dcm) found; check {check}")
    options = PretrainOptions(
        architecture=args.architecture,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        num_workers=args.num_workers,
        device=args.device,
        amp=args.amp,
    )
    contents = pretrain(paths, options, labels=labels, targets=targets, progress=not args.no_progress)
    save_backbone(args.out, contents)
    made = contents[PRETRAIN_MARKER]
    if made["unreadable"]:
        print(
            f"lungdet pretrain: {made['unreadable']} image reads failed and were skipped (first: {made['first_unreadable']})"
        )
    print(
        f"lungdet pretrain: wrote {args.out}: {made['method']} backbone of {args.architecture} at {args.image_size} px, "
        f"{made['images_seen']:,} images seen, final loss {made['final_loss']:.4f}; "
        f"use it with 'lungdet train ... model.architecture={args.architecture} model.pretrained={args.out}'"
    )
    return 0
