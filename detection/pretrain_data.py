"""What ``lungdet pretrain`` learns from: radiograph files, NIH's finding labels, and random views of each image.

The views (crops, flips, small rotations, exposure, blur; no colour, since there is none) are
drawn per item from a seed of (seed, epoch, index) alone, so any number of loader workers gives
the same ones. See :mod:`lungdet.detection.pretrain` for how they are used.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.image_io import find_images, read_xray_file
from lungdet.errors import ImageReadError, LabelError

# NIH ChestX-ray14's Data_Entry_2017.csv: the file name and the pipe-separated findings.
IMAGE_COLUMN = "Image Index"
FINDINGS_COLUMN = "Finding Labels"
NO_FINDING = "No Finding"  # NIH's label for an image without any of the findings: all zeros


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
