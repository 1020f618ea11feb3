"""Training data: the COCO output of ``lungdet convert`` as torch datasets, negatives included.

Images are read from the converted files (PNG, or the DICOM's own JPEG stream), resized to ``model.image_size`` and augmented with
albumentations; boxes follow every geometric change. Targets follow torchvision's detection
convention: ``boxes`` FloatTensor[N, 4] XYXY_ABS in the resized image's pixels, ``labels``
Int64Tensor[N]; a negative image has ``boxes`` of shape [0, 4], which torchvision trains on as
pure background. That is how the model learns to say "nothing here" (77% of RSNA images).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_tools.boxes import scale_xywh, xywh_to_xyxy
from data_tools.errors import LungdetError
from data_tools.to_coco import ANNOTATIONS_FILE
from detection.config import DataConfig

# Boxes that augmentation shrinks below this side (pixels) or visible fraction are dropped,
# since a sliver at the border is no longer an opacity a reader would mark.
MIN_BOX_SIDE = 2.0
MIN_VISIBILITY = 0.3


@dataclass(frozen=True)
class ImageRecord:
    """One converted image: its file, size, fold and truth boxes (XYWH_ABS, in that file's pixels)."""

    image_id: int
    patient_id: str
    path: Path
    width: int
    height: int
    original_width: int
    original_height: int
    fold: int
    boxes: np.ndarray


def read_annotations(data_dir: Path) -> dict:
    """The parsed ``annotations.json`` of a ``lungdet convert`` output folder."""
    annotations_path = Path(data_dir) / ANNOTATIONS_FILE
    if not annotations_path.is_file():
        raise LungdetError(f"{annotations_path}: not found; run 'lungdet convert ... --out {data_dir}' first")
    return json.loads(annotations_path.read_text(encoding="utf-8"))


def load_records(data_dir: Path) -> list[ImageRecord]:
    """Read ``annotations.json`` written by ``lungdet convert`` into image records (file order)."""
    data_dir = Path(data_dir)
    annotations_path = data_dir / ANNOTATIONS_FILE
    coco = read_annotations(data_dir)
    boxes: dict[int, list[list[float]]] = {}
    for annotation in coco["annotations"]:
        boxes.setdefault(annotation["image_id"], []).append(annotation["bbox"])
    records = []
    for image in coco["images"]:
        if "fold" not in image:
            raise LungdetError(f"{annotations_path}: image {image.get('file_name')} has no 'fold'; re-run lungdet convert")
        records.append(ImageRecord(
            image_id=int(image["id"]),
            patient_id=str(image.get("patient_id", Path(image["file_name"]).stem)),
            path=data_dir / image["file_name"],
            width=int(image["width"]),
            height=int(image["height"]),
            original_width=int(image.get("original_width", image["width"])),
            original_height=int(image.get("original_height", image["height"])),
            fold=int(image["fold"]),
            boxes=np.array(boxes.get(image["id"], []), dtype=np.float64).reshape(-1, 4),
        ))
    return records


def load_preprocessing(data_dir: Path) -> dict[str, object]:
    """How ``lungdet convert`` prepared the images (``image_size``, ``normalization``), for predict to repeat.

    Datasets written before normalisation existed have no such entry: they are un-normalised.
    """
    info = read_annotations(data_dir).get("info", {})
    return {"image_size": info.get("image_size"), "normalization": info.get("normalization", "none")}


def split_records(records: list[ImageRecord], *, fold: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """``(train, validation)``: validation is fold ``fold``, training every other fold."""
    folds = sorted({record.fold for record in records})
    if fold not in folds:
        raise LungdetError(f"fold {fold} does not exist in this dataset; its folds are {folds}")
    return [r for r in records if r.fold != fold], [r for r in records if r.fold == fold]


def build_augmentation(config: DataConfig, *, train: bool, seed: int | None = None) -> A.Compose | None:
    """Albumentations pipeline on uint8 [H, W] images with pascal_voc (XYXY_ABS) boxes; None for validation."""
    if not train:
        return None
    return A.Compose(
        [
            A.HorizontalFlip(p=config.hflip),
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-7, 7), border_mode=cv2.BORDER_CONSTANT, fill=0, p=config.shift_scale_rotate),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=config.brightness_contrast),
        ],
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=MIN_VISIBILITY, min_width=MIN_BOX_SIDE, min_height=MIN_BOX_SIDE, clip=True),
        seed=seed,
    )


def load_image(path: Path) -> np.ndarray:
    """uint8 [H, W] grey image from a converted PNG or JPEG."""
    pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise LungdetError(f"{path}: missing or unreadable image; re-run lungdet convert for this dataset")
    return pixels


def to_model_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W] -> FloatTensor[3, H, W] in [0, 1]; grey is repeated because the backbones expect RGB."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(255.0)
    return tensor.unsqueeze(0).expand(3, -1, -1).contiguous()


class DetectionDataset(Dataset):
    """Converted images resized to ``image_size`` square, with torchvision detection targets."""

    def __init__(self, records: list[ImageRecord], *, image_size: int, augmentation: A.Compose | None) -> None:
        self.records = records
        self.image_size = image_size
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.records[index]
        pixels = load_image(record.path)
        height, width = pixels.shape
        boxes = record.boxes
        if (height, width) != (self.image_size, self.image_size):
            pixels = cv2.resize(pixels, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
            boxes = scale_xywh(boxes, scale_x=self.image_size / width, scale_y=self.image_size / height)
        boxes_xyxy = xywh_to_xyxy(boxes)
        if self.augmentation is not None:
            augmented = self.augmentation(image=pixels, bboxes=boxes_xyxy, labels=[1] * len(boxes_xyxy))
            pixels, boxes_xyxy = augmented["image"], augmented["bboxes"]
        box_tensor = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4))
        target = {
            "boxes": box_tensor,
            "labels": torch.ones(box_tensor.shape[0], dtype=torch.int64),
            "image_id": torch.tensor(record.image_id),
        }
        return to_model_input(pixels), target


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches are lists: images may differ in size and targets in box count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def seed_augmentation_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker's augmentation its own seed.

    Every worker gets a copy of the seeded pipeline, so without this all workers would draw the
    same flips and jitters in lock-step. ``info.seed`` differs per worker and per epoch and follows
    the loader's generator, so runs stay reproducible.
    """
    info = torch.utils.data.get_worker_info()
    augmentation = getattr(info.dataset, "augmentation", None)
    if augmentation is not None:
        augmentation.set_random_seed(info.seed % 2**32)


def build_dataloaders(data_dir: Path, config: DataConfig, *, image_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders for ``config.fold``; validation is never augmented or shuffled."""
    train_records, val_records = split_records(load_records(data_dir), fold=config.fold)
    if config.max_train_images:
        train_records = train_records[: config.max_train_images]
    if config.max_val_images:
        val_records = val_records[: config.max_val_images]
    if not train_records or not val_records:
        raise LungdetError(f"{data_dir}: fold {config.fold} leaves {len(train_records)} training and {len(val_records)} validation images; need at least one of each")
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        DetectionDataset(train_records, image_size=image_size, augmentation=build_augmentation(config, train=True, seed=seed)),
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        collate_fn=collate,
        generator=generator,
        worker_init_fn=seed_augmentation_worker,
        persistent_workers=config.num_workers > 0,
        drop_last=len(train_records) > config.batch_size,
    )
    val_loader = DataLoader(
        DetectionDataset(val_records, image_size=image_size, augmentation=build_augmentation(config, train=False)),
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=config.num_workers,
        collate_fn=collate,
        persistent_workers=config.num_workers > 0,
    )
    return train_loader, val_loader
