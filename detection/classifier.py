"""A dedicated image classifier for "does this radiograph have an opacity": i-pan's path in the 2018 challenge.

The 1st place gated its detectors with separate classification networks at a larger input than
the detectors'. This module builds one from torchvision (ResNet-18/34, EfficientNet-B0,
DenseNet-121, MobileNetV3) with the same image-level outputs as the detector's head
(:mod:`lungdet.detection.image_head`): one logit, optionally a metadata term (view, sex, age
band) and RSNA's three classes as an auxiliary target, and trains it on a ``lungdet convert``
dataset's fold with the detector's data pipeline (the same augmentation, the same half-positive
epochs), choosing the epoch of best validation AUC.

``benchmarks/image_classifier.py`` weighs it against the detector's head on the real
cross-validation: AUC, the RSNA mAP once it gates the boxes, and minutes of CPU. It is a
measurement, not yet a stage of the recipe: ``lungdet cv`` trains it only if it wins (see
docs/benchmarks.md for the verdict).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader
from torchvision import models

from lungdet.data_tools.metadata import METADATA_FEATURES
from lungdet.detection.augment import build_augmentation
from lungdet.detection.config import AugmentConfig, DataConfig
from lungdet.detection.data import DetectionDataset, EpochSampler, ImageRecord, collate, select_records
from lungdet.detection.image_head import IMAGE_CLASSES, NO_CLASS
from lungdet.detection.runtime import Precision
from lungdet.errors import ConfigError
from lungdet.submission.score import roc_auc

# name -> (builder taking weights=None, the attribute path of its final layer)
CLASSIFIERS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "resnet18": (models.resnet18, "fc"),
    "resnet34": (models.resnet34, "fc"),
    "efficientnet_b0": (models.efficientnet_b0, "classifier.1"),
    "densenet121": (models.densenet121, "classifier"),
    "mobilenet_v3_large": (models.mobilenet_v3_large, "classifier.3"),
    "mobilenet_v3_small": (models.mobilenet_v3_small, "classifier.3"),
}


class ImageClassifier(nn.Module):
    """A torchvision classification network whose last layer gives the features for one logit (and three classes).

    ``forward(images [N, 3, S, S], metadata [N, F] or None)`` returns ``{"logits": [N]}`` and,
    with ``class_info``, ``"class_logits": [N, 3]``; the metadata term is added to the logit here,
    as the detector's head adds it (zero at the start).
    """

    def __init__(self, architecture: str, *, metadata: bool = False, class_info: bool = False) -> None:
        super().__init__()
        if architecture not in CLASSIFIERS:
            raise ConfigError(f"classifier {architecture!r}: unknown; use one of {', '.join(CLASSIFIERS)}")
        build, last = CLASSIFIERS[architecture]
        network = build(weights=None)
        parent = network
        *path, name = last.split(".")
        for part in path:
            parent = getattr(parent, part)
        features = getattr(parent, name).in_features
        setattr(parent, name, nn.Identity())
        for module in network.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                # torchvision's MobileNetV3 keeps running statistics with momentum 0.01, tuned for
                # ImageNet's hundreds of thousands of steps; from scratch on a few hundred steps they
                # stay near their initial values and eval mode outputs one constant (measured: every
                # validation probability equal). 0.1, the default elsewhere, follows the batches.
                module.momentum = 0.1
        self.network = network
        self.logit = nn.Linear(features, 1)
        self.metadata = nn.Linear(len(METADATA_FEATURES), 1, bias=False) if metadata else None
        if self.metadata is not None:
            nn.init.zeros_(self.metadata.weight)
        self.classes = nn.Linear(features, len(IMAGE_CLASSES)) if class_info else None

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits for float32 ``images`` ``[N, 3, S, S]`` in [0, 1]: ``{"logits": [N]}`` (and ``"class_logits"``).

        ``"class_logits"`` ``[N, 3]`` comes with ``class_info``. ``metadata`` ``[N, F]`` (one-hot ``METADATA_FEATURES``)
        adds its learned term to the logit when the classifier was built with ``metadata``; otherwise, or when None, it
        adds nothing.
        """
        features = self.network(images).float()
        logits = self.logit(features).squeeze(1)
        if self.metadata is not None and metadata is not None:
            logits = logits + self.metadata(metadata.float()).squeeze(1)
        outputs = {"logits": logits}
        if self.classes is not None:
            outputs["class_logits"] = self.classes(features)
        return outputs


@dataclass(frozen=True)
class ClassifierSettings:
    """One classifier run: the network, its input side (pixels), the schedule, and the image-level inputs and targets."""

    architecture: str = "resnet18"
    image_size: int = 384
    epochs: int = 12
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    metadata: bool = True
    class_info: bool = True
    class_loss_weight: float = 0.1
    positive_fraction: float = 0.5
    seed: int = 0


def image_batch(
    images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A detection batch as a classifier's: images ``[N, 3, S, S]``, has-a-box labels, metadata ``[N, F]``, class indices ``[N]``."""
    labels = torch.tensor([float(target["boxes"].shape[0] > 0) for target in targets])
    return (
        torch.stack(images),
        labels,
        torch.stack([target["metadata"] for target in targets]),
        torch.stack([target["class_index"] for target in targets]).reshape(-1),
    )


def classifier_loss(
    outputs: dict[str, torch.Tensor], labels: torch.Tensor, classes: torch.Tensor, *, class_loss_weight: float
) -> torch.Tensor:
    """Binary cross-entropy on the logit, plus the weighted three-class cross-entropy on the images that have a class."""
    loss = functional.binary_cross_entropy_with_logits(outputs["logits"], labels)
    if "class_logits" in outputs:
        known = classes != NO_CLASS
        if bool(known.any()):
            loss = loss + class_loss_weight * functional.cross_entropy(outputs["class_logits"][known], classes[known])
    return loss


# Training images whose batch statistics re-estimate batch norm before each validation.
PRECISE_BN_IMAGES = 256


@torch.no_grad()
def recompute_batch_norm(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: Precision
) -> None:
    """Replace every batch norm's running statistics by the plain average over ``batches`` of (images, metadata), for the weights as they are now.

    Trained from scratch for a few hundred steps, the running averages lag behind activations
    whose scale keeps changing; deep in the network they were measured 20 times the batches'
    variance, and eval mode then shrank every image to the same output (every validation
    probability equal). Re-estimating them before evaluating ("precise BN") removes the lag.
    """
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    momenta = [module.momentum for module in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # a cumulative average over the batches below
    model.train()
    for images, metadata in batches:
        with precision.autocast():
            model(images.contiguous(memory_format=torch.channels_last), metadata)
    for module, momentum in zip(norms, momenta, strict=True):
        module.momentum = momentum


@torch.no_grad()
def predict_probabilities(
    model: ImageClassifier, loader: DataLoader, precision: Precision
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``(probabilities, has-a-box labels, image ids)`` over a validation loader."""
    model.eval()
    probabilities, labels, ids = [], [], []
    for images, targets in loader:
        batch, batch_labels, metadata, _ = image_batch(images, targets)
        with precision.autocast():
            outputs = model(batch.contiguous(memory_format=torch.channels_last), metadata)
        probabilities.append(torch.sigmoid(outputs["logits"].float()).numpy())
        labels.append(batch_labels.numpy())
        ids += [int(target["image_id"]) for target in targets]
    return np.concatenate(probabilities), np.concatenate(labels), ids


def train_classifier(
    settings: ClassifierSettings,
    data_dir: Path,
    *,
    fold: int,
    precision: Precision | None = None,
    say: Callable[[str], None] = print,
) -> dict:
    """Train on every fold but ``fold`` and validate on it each epoch; returns the best epoch's AUC and probabilities, and the minutes it took.

    The result: ``{"auc", "epoch", "probabilities": {image id: p}, "minutes", "history": [{"epoch", "loss", "auc"}]}``.
    """
    torch.manual_seed(settings.seed)
    precision = precision or Precision("cpu", None)
    data = DataConfig(fold=fold, batch_size=settings.batch_size, positive_fraction=settings.positive_fraction)
    train_records, val_records = select_records(data_dir, data)
    sampler, train_loader, val_loader = _classifier_loaders(settings, train_records, val_records)
    model = ImageClassifier(settings.architecture, metadata=settings.metadata, class_info=settings.class_info).to(
        memory_format=torch.channels_last
    )
    statistics_batches = _statistics_batches(settings, train_records)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / max(steps, 1), 1.0)))
    )
    started = time.time()
    history: list[dict] = []
    best: dict = {"auc": -1.0}
    for epoch in range(1, settings.epochs + 1):
        sampler.set_epoch(epoch)
        losses = _train_one_epoch(
            model, train_loader, optimizer, scheduler, precision, class_loss_weight=settings.class_loss_weight
        )
        recompute_batch_norm(model, statistics_batches, precision)
        probabilities, labels, ids = predict_probabilities(model, val_loader, precision)
        auc = roc_auc(labels > 0.5, probabilities)
        auc = float("nan") if auc is None else auc  # None: one class only (an AUC of 0.0 is a value)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "auc": auc})
        say(
            f"classifier {settings.architecture} at {settings.image_size}px, fold {fold}, epoch {epoch}/{settings.epochs}: loss {np.mean(losses):.3f}, val AUC {auc:.3f}"
        )
        if auc > best["auc"]:
            patients = {record.image_id: record.patient_id for record in val_records}
            best = {
                "auc": auc,
                "epoch": epoch,
                "probabilities": {patients[image_id]: float(p) for image_id, p in zip(ids, probabilities, strict=True)},
            }
    return {**best, "minutes": (time.time() - started) / 60, "history": history}


def _classifier_loaders(
    settings: ClassifierSettings, train_records: list[ImageRecord], val_records: list[ImageRecord]
) -> tuple[EpochSampler, DataLoader, DataLoader]:
    """The training sampler (half positives per epoch), the augmented training loader and the plain validation loader."""
    augment = AugmentConfig(shift_scale_rotate=0.6, scale_limit=0.15, brightness_contrast=0.6, gamma=0.3, blur=0.1)
    sampler = EpochSampler(
        len(train_records),
        seed=settings.seed,
        positives=[len(record.boxes) > 0 for record in train_records],
        positive_fraction=settings.positive_fraction,
    )
    train_loader = DataLoader(
        DetectionDataset(
            train_records, image_size=settings.image_size, augmentation=build_augmentation(augment, seed=settings.seed)
        ),
        batch_size=settings.batch_size,
        sampler=sampler,
        collate_fn=collate,
        drop_last=True,
    )
    val_loader = DataLoader(
        DetectionDataset(val_records, image_size=settings.image_size, augmentation=None),
        batch_size=settings.batch_size,
        collate_fn=collate,
    )
    return sampler, train_loader, val_loader


def _statistics_batches(
    settings: ClassifierSettings, train_records: list[ImageRecord]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first :data:`PRECISE_BN_IMAGES` training images, unaugmented, as (images, metadata) batches, read once."""
    statistics_loader = DataLoader(
        DetectionDataset(train_records[:PRECISE_BN_IMAGES], image_size=settings.image_size, augmentation=None),
        batch_size=settings.batch_size,
        collate_fn=collate,
    )
    return [image_batch(images, targets)[::2] for images, targets in statistics_loader]


def _train_one_epoch(
    model: ImageClassifier,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
    *,
    class_loss_weight: float,
) -> list[float]:
    """One pass over ``loader``, a step per batch; returns each batch's loss."""
    model.train()
    losses = []
    for images, targets in loader:
        batch, labels, metadata, classes = image_batch(images, targets)
        with precision.autocast():
            outputs = model(batch.contiguous(memory_format=torch.channels_last), metadata)
        loss = classifier_loss(outputs, labels, classes, class_loss_weight=class_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return losses
