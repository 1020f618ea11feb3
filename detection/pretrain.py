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

Run: ``lungdet pretrain --image-dir nih/images --labels nih/Data_Entry_2017.csv --out nih_backbone.pth --architecture fasterrcnn_mobilenet_v3_large_fpn --image-size 256``
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lungdet.atomic import atomic_path
from lungdet.cli_types import int_in_range
from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.image_io import find_images, read_xray_file
from lungdet.detection.config import MODEL_ARCHITECTURES, ModelConfig
from lungdet.detection.model import PRETRAIN_MARKER, build_model, in_memory_layout
from lungdet.detection.runtime import Precision, resolve_device, resolve_precision
from lungdet.errors import ImageReadError, LabelError, LungdetError

SIMSIAM = "simsiam"
SUPERVISED = "supervised"
# NIH ChestX-ray14's Data_Entry_2017.csv: the file name and the pipe-separated findings.
IMAGE_COLUMN = "Image Index"
FINDINGS_COLUMN = "Finding Labels"
NO_FINDING = "No Finding"  # NIH's label for an image without any of the findings: all zeros
BODY_PREFIX = "backbone.body."  # where the detector keeps the body's weights
PROJECTION_DIM = 512  # SimSiam's projection width (2048 in the paper, for ImageNet on GPUs)
PREDICTOR_DIM = 128  # the predictor's bottleneck, a quarter of the projection as in the paper
MOMENTUM = 0.9  # SGD momentum (SimSiam's)
WEIGHT_DECAY = 1e-4  # L2 penalty (SimSiam's)
SIMSIAM_MIN_CROP = 0.4  # the smallest crop of a view, as a fraction of the image area; smaller crops lose the chest
SUPERVISED_MIN_CROP = 0.7  # milder for labels: a crop must still show the finding it is labelled with


@dataclass(frozen=True)
class FindingLabels:
    """Multi-label truth from an NIH-style CSV.

    ``names`` are the findings seen, sorted; ``by_file`` maps an image file name (``00000001_000.png``)
    to a float32 ``[len(names)]`` vector of 0/1 in that order ('No Finding' is all zeros).
    """

    names: tuple[str, ...]
    by_file: dict[str, np.ndarray]


def parse_findings(text: str) -> list[str]:
    """``'Cardiomegaly|Emphysema'`` -> ``['Cardiomegaly', 'Emphysema']``; ``'No Finding'`` (or nothing) -> ``[]``."""
    return [finding.strip() for finding in text.split("|") if finding.strip() and finding.strip() != NO_FINDING]


def read_finding_labels(csv_path: Path) -> FindingLabels:
    """Read NIH's ``Data_Entry_2017.csv`` layout: ``Image Index`` and ``Finding Labels``; other columns are ignored.

    Raises LabelError when the file lacks either column or names no finding at all.
    """
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            columns = reader.fieldnames or []
            for column in (IMAGE_COLUMN, FINDINGS_COLUMN):
                if column not in columns:
                    raise LabelError(
                        f"{csv_path}: no '{column}' column (it has: {', '.join(columns) or 'no header'}); "
                        f"pass NIH's Data_Entry_2017.csv, or a CSV with '{IMAGE_COLUMN}' (file name) and '{FINDINGS_COLUMN}' (findings joined by '|')"
                    )
            # A short row has None for its missing cells; a row without a file name names nothing to train on.
            findings = {(row[IMAGE_COLUMN] or "").strip(): parse_findings(row[FINDINGS_COLUMN] or "") for row in reader}
            findings.pop("", None)
    except OSError as error:
        raise LabelError(
            f"{csv_path}: cannot be read ({error.strerror or error}); check the path given to --labels"
        ) from None
    names = tuple(sorted({finding for found in findings.values() for finding in found}))
    if not names:
        raise LabelError(
            f"{csv_path}: every row is '{NO_FINDING}', so there is nothing to learn; pretrain without --labels (self-supervised) instead"
        )
    column = {name: index for index, name in enumerate(names)}
    by_file = {}
    for file_name, found in findings.items():
        vector = np.zeros(len(names), dtype=np.float32)
        vector[[column[finding] for finding in found]] = 1.0
        by_file[file_name] = vector
    return FindingLabels(names, by_file)


def find_radiographs(folder: Path) -> list[Path]:
    """Every PNG, JPEG and DICOM (``.dcm``) file under ``folder``, recursive, sorted."""
    return sorted([*find_images(folder), *find_dicoms(folder)])


def pair_with_labels(paths: Sequence[Path], labels: FindingLabels) -> tuple[list[Path], np.ndarray, int, int]:
    """The labelled files among ``paths`` (matched on file name) and their label vectors.

    Returns ``(paths, targets, missing_rows, unlabelled_files)``: ``targets`` is float32
    ``[len(paths), len(labels.names)]``; ``missing_rows`` counts CSV rows whose file is not among
    ``paths``, ``unlabelled_files`` the files no row names. A name found twice counts once, first path first.
    """
    by_name: dict[str, Path] = {}
    for path in paths:
        by_name.setdefault(path.name, path)
    kept = [name for name in by_name if name in labels.by_file]
    missing_rows = sum(1 for name in labels.by_file if name not in by_name)
    targets = (
        np.stack([labels.by_file[name] for name in kept])
        if kept
        else np.zeros((0, len(labels.names)), dtype=np.float32)
    )
    return [by_name[name] for name in kept], targets, missing_rows, len(by_name) - len(kept)


def build_view_augmentation(image_size: int, *, min_crop: float) -> A.Compose:
    """Random views of a uint8 ``[H, W]`` radiograph as uint8 ``[image_size, image_size]``: crop, flip, rotation, exposure, blur."""
    return A.Compose(
        [
            A.RandomResizedCrop(size=(image_size, image_size), scale=(min_crop, 1.0), ratio=(3 / 4, 4 / 3)),
            A.HorizontalFlip(p=0.5),
            A.Affine(rotate=(-10, 10), border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, brightness_by_max=True, p=0.8),
            A.RandomGamma(gamma_limit=(70, 150), p=0.5),
            A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, 2.0), p=0.5),  # kernel size from sigma
        ]
    )


def shrink_to(pixels: np.ndarray, side: int) -> np.ndarray:
    """uint8 ``[H, W]`` scaled down (area averaging) so that its shorter side is ``side``; smaller images are kept as they are.

    A 1024 px radiograph cropped straight to 256 px would alias; shrinking first also makes the views cheap.
    """
    height, width = pixels.shape
    scale = side / min(height, width)
    if scale >= 1.0:
        return pixels
    return cv2.resize(
        pixels, (max(side, round(width * scale)), max(side, round(height * scale))), interpolation=cv2.INTER_AREA
    )


class RadiographViews(Dataset):
    """Radiograph files as ``views`` augmented uint8 tensors each, with their label vector.

    An item is ``(views, target)``: uint8 ``[views, 1, image_size, image_size]`` and float32
    ``[labels]`` (``[0]`` without labels), or the reason as a string when the file cannot be read
    (the loader skips it and counts it; one bad file in 112k should not end a long run). Each
    item's views are drawn from a seed of (seed, epoch, index) alone, so any number of workers
    gives the same views.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        image_size: int,
        views: int,
        min_crop: float,
        targets: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        self.paths = list(paths)
        self.image_size = image_size
        self.views = views
        self.targets = targets if targets is not None else np.zeros((len(self.paths), 0), dtype=np.float32)
        self.seed = seed
        self.epoch = 0
        self.augmentation = build_view_augmentation(image_size, min_crop=min_crop)

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the current one: it seeds the views drawn from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | str:
        try:
            pixels = shrink_to(read_xray_file(self.paths[index]).pixels, self.image_size)
        except ImageReadError as error:
            return str(error)
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        # One shared stream for all transforms (see detection/augment.py's _seed_pipeline for why not Compose(seed=...)).
        self.augmentation.set_random_state(np.random.default_rng(seed), random.Random(seed))
        views = np.stack([self.augmentation(image=pixels)["image"] for _ in range(self.views)])
        return torch.from_numpy(views).unsqueeze(1), torch.from_numpy(self.targets[index])


def collate_views(batch: list[tuple[torch.Tensor, torch.Tensor] | str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack the readable items: uint8 ``[N, views, 1, H, W]``, float32 ``[N, labels]``, and the reasons of those that were not."""
    readable = [item for item in batch if not isinstance(item, str)]
    failures = [item for item in batch if isinstance(item, str)]
    if not readable:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0), failures
    return torch.stack([views for views, _ in readable]), torch.stack([target for _, target in readable]), failures


# --- models --------------------------------------------------------------------------------------


class PooledBody(nn.Module):
    """The detector's backbone body with its input normalisation and global average pooling.

    uint8 ``[N, 1, H, W]`` grey pixels -> float32 ``[N, channels]``. The grey image is repeated to
    three channels and normalised with the detector's own mean and std, as the detector's transform
    does, so the body learns on the inputs it will see in ``lungdet train``.
    """

    def __init__(
        self, body: nn.Module, *, image_mean: Sequence[float], image_std: Sequence[float], channels_last: bool = False
    ) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.channels_last = channels_last
        # The top stage's width (960 for MobileNetV3, 2048 for ResNet-50), from one small image in eval mode.
        training = body.training
        body.eval()
        with torch.no_grad():
            self.channels = int(self(torch.zeros(1, 1, 64, 64, dtype=torch.uint8)).shape[1])
        body.train(training)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 1, H, W]`` grey pixels -> float32 ``[N, channels]``, the deepest stage averaged over space."""
        images = (pixels.float().div(255.0).expand(-1, 3, -1, -1) - self.image_mean) / self.image_std
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # The body returns its stages finest first; the last is the deepest, whose every cell sees most of the chest.
        top = next(reversed(self.body(images).values()))
        return top.float().mean(dim=(2, 3))


class SimSiam(nn.Module):
    """SimSiam on :class:`PooledBody`: encoder ``f`` (body, pooling, projection MLP) and predictor ``h``.

    ``forward(view_a, view_b)`` returns ``(predictions, targets)``: ``(h(f(a)), h(f(b)))`` and
    ``(f(b), f(a))`` detached, each float32 ``[N, projection_dim]``; :func:`simsiam_loss` compares them pairwise.
    """

    def __init__(
        self, encoder: PooledBody, *, projection_dim: int = PROJECTION_DIM, predictor_dim: int = PREDICTOR_DIM
    ) -> None:
        super().__init__()
        self.encoder = encoder
        channels = encoder.channels
        # The paper's projector: three layers, batch norm after each, the last without its affine part.
        self.projector = nn.Sequential(
            nn.Linear(channels, projection_dim, bias=False),
            nn.BatchNorm1d(projection_dim),
            nn.ReLU(inplace=True),
            nn.Linear(projection_dim, projection_dim, bias=False),
            nn.BatchNorm1d(projection_dim),
            nn.ReLU(inplace=True),
            nn.Linear(projection_dim, projection_dim, bias=False),
            nn.BatchNorm1d(projection_dim, affine=False),
        )
        # A bottleneck: the paper found it needed, and batch norm on the predictor's output unstable.
        self.predictor = nn.Sequential(
            nn.Linear(projection_dim, predictor_dim, bias=False),
            nn.BatchNorm1d(predictor_dim),
            nn.ReLU(inplace=True),
            nn.Linear(predictor_dim, projection_dim),
        )

    def forward(
        self, view_a: torch.Tensor, view_b: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``((h(f(a)), h(f(b))), (f(b), f(a)))`` for uint8 views ``[N, 1, H, W]``, each ``[N, projection_dim]``.

        The targets ``f(b), f(a)`` are detached: the stop-gradient.
        """
        projection_a = self.projector(self.encoder(view_a))
        projection_b = self.projector(self.encoder(view_b))
        # The stop-gradient: each view's projection is a constant target for the other's prediction.
        return (self.predictor(projection_a), self.predictor(projection_b)), (
            projection_b.detach(),
            projection_a.detach(),
        )

    def loss(self, views: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Negative cosine similarity for uint8 ``views`` ``[N, 2, 1, H, W]``; ``targets`` (labels) are unused."""
        predictions, projections = self(views[:, 0], views[:, 1])
        return simsiam_loss(predictions, projections)


def simsiam_loss(predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean negative cosine similarity of each ``[N, D]`` prediction with its target: -1 when all agree, in [-1, 1]."""
    similarities = [
        functional.cosine_similarity(prediction.float(), target.float(), dim=1).mean()
        for prediction, target in zip(predictions, targets, strict=True)
    ]
    return -torch.stack(similarities).mean()


class MultiLabelClassifier(nn.Module):
    """A linear layer on :class:`PooledBody`: uint8 ``[N, 1, H, W]`` -> float32 logits ``[N, labels]``."""

    def __init__(self, encoder: PooledBody, labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.channels, labels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 1, H, W]`` grey pixels -> one logit per finding, ``[N, labels]``."""
        return self.head(self.encoder(pixels))

    def loss(self, views: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy with logits over the labels, for ``views`` ``[N, 1, 1, H, W]`` and 0/1 ``targets`` ``[N, labels]``."""
        return functional.binary_cross_entropy_with_logits(self(views[:, 0]), targets.float())


def build_encoder(architecture: str, image_size: int, *, channels_last: bool = False) -> PooledBody:
    """The body of ``architecture``'s backbone, built exactly as ``lungdet train`` builds it from scratch, pooled."""
    detector = build_model(ModelConfig(architecture=architecture, image_size=image_size, pretrained="none"))
    body = detector.backbone.body
    if channels_last:
        in_memory_layout(body, channels_last=True)
    return PooledBody(
        body,
        image_mean=detector.transform.image_mean,
        image_std=detector.transform.image_std,
        channels_last=channels_last,
    )


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
    marker = {
        "architecture": options.architecture,
        "image_size": options.image_size,
        "method": SUPERVISED if supervised else SIMSIAM,
        "labels": list(labels.names) if supervised else [],
        "images": len(paths),
        "images_seen": images_seen,
        "epochs": options.epochs,
        "final_loss": loss,
        "unreadable": len(failures),
        "first_unreadable": failures[0] if failures else "",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    body = {
        BODY_PREFIX + name: tensor.detach().cpu().contiguous() for name, tensor in encoder.body.state_dict().items()
    }
    return {**body, PRETRAIN_MARKER: marker}


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
        "--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N' (default: %(default)s)"
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
