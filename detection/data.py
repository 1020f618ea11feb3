"""Training data: the COCO output of ``lungdet convert`` as torch datasets, negatives included.

Images are read from the converted files (PNG, or the DICOM's own JPEG stream), resized to
``model.image_size`` and augmented (see :mod:`lungdet.detection.augment`); boxes follow every geometric
change. Targets follow torchvision's detection
convention: ``boxes`` FloatTensor[N, 4] XYXY_ABS in the resized image's pixels, ``labels``
Int64Tensor[N]; a negative image has ``boxes`` of shape [0, 4], which torchvision trains on as
pure background. That is how the model learns to say "nothing here" (77% of RSNA images).
For the image-level head, targets also carry ``metadata`` (FloatTensor[F], the record's view,
sex and age band: :func:`~lungdet.data_tools.metadata.metadata_features`) and ``class_index``
(Int64Tensor[], RSNA's three classes, -1 without one).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lungdet.boxes import scale_xywh, xywh_to_xyxy
from lungdet.data_tools.conversion_report import ANNOTATIONS_FILE
from lungdet.data_tools.metadata import ImageTags, has_any_tag, metadata_features
from lungdet.detection.augment import augment_sample, build_augmentation
from lungdet.detection.config import AugmentConfig, DataConfig, ModelConfig
from lungdet.detection.image_head import IMAGE_CLASSES, class_index
from lungdet.detection.masks import box_masks
from lungdet.detection.runtime import to_model_input
from lungdet.errors import LungdetError


@dataclass(frozen=True)
class ImageRecord:
    """One converted image: its file, size, fold and truth boxes (XYWH_ABS, in that file's pixels), its tags and RSNA class (None when unknown)."""

    image_id: int
    patient_id: str
    path: Path
    width: int
    height: int
    original_width: int
    original_height: int
    fold: int
    boxes: np.ndarray
    tags: ImageTags = ImageTags()
    class_name: str | None = None


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
            raise LungdetError(
                f"{annotations_path}: image {image.get('file_name')} has no 'fold'; re-run lungdet convert"
            )
        records.append(
            ImageRecord(
                image_id=int(image["id"]),
                patient_id=str(image.get("patient_id", Path(image["file_name"]).stem)),
                path=data_dir / image["file_name"],
                width=int(image["width"]),
                height=int(image["height"]),
                original_width=int(image.get("original_width", image["width"])),
                original_height=int(image.get("original_height", image["height"])),
                fold=int(image["fold"]),
                boxes=np.array(boxes.get(image["id"], []), dtype=np.float64).reshape(-1, 4),
                tags=ImageTags(
                    age=image.get("age"),
                    sex=str(image.get("sex") or ""),
                    view_position=str(image.get("view_position") or ""),
                ),
                class_name=image.get("class_name") or None,
            )
        )
    return records


def check_image_targets(records: Sequence[ImageRecord], config: ModelConfig, *, data_dir: Path) -> None:
    """Raise LungdetError when ``config`` asks the image head for metadata or three classes that ``records`` do not have.

    One image without them is fine (its value is 'unknown', its class left out of that loss);
    a dataset where no image has them would train an input or a target that is never there.
    """
    where = Path(data_dir) / ANNOTATIONS_FILE
    if config.image_metadata and not any(has_any_tag(record.tags) for record in records):
        raise LungdetError(
            f"{where}: no image has a view position, sex or age, so model.image_metadata has nothing to learn from; convert again with "
            "the DICOMs (their tags) or --metadata CSV (patientId,PatientAge,PatientSex,ViewPosition), or set model.image_metadata=false"
        )
    if config.image_class_info and not any(record.class_name in IMAGE_CLASSES for record in records):
        raise LungdetError(
            f"{where}: no image has an RSNA class ({' / '.join(IMAGE_CLASSES)}), so model.image_class_info has no target; convert again "
            "with --class-info stage_2_detailed_class_info.csv (patientId,class), or set model.image_class_info=false"
        )


def load_preprocessing(data_dir: Path) -> dict[str, object]:
    """How ``lungdet convert`` prepared the images (``image_size``, ``normalization``), for predict to repeat.

    Datasets written before normalisation existed have no such entry: they are un-normalised.
    """
    info = read_annotations(data_dir).get("info", {})
    return {"image_size": info.get("image_size"), "normalization": info.get("normalization", "none")}


# data.fold = ALL_FOLDS: every image trains and none validates (the final model of lungdet cv --final).
ALL_FOLDS = -1


def split_records(records: list[ImageRecord], *, fold: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """``(train, validation)``: validation is fold ``fold``, training every other fold; with :data:`ALL_FOLDS`, all train and none validate."""
    if fold == ALL_FOLDS:
        return list(records), []
    folds = sorted({record.fold for record in records})
    if fold not in folds:
        raise LungdetError(f"fold {fold} does not exist in this dataset; its folds are {folds}")
    return [r for r in records if r.fold != fold], [r for r in records if r.fold == fold]


def select_records(data_dir: Path, config: DataConfig) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """``(train, validation)`` records of ``data_dir`` for ``config.fold``, cut to ``max_train_images`` / ``max_val_images``."""
    train_records, val_records = split_records(load_records(data_dir), fold=config.fold)
    if config.max_train_images:
        train_records = train_records[: config.max_train_images]
    if config.max_val_images:
        val_records = val_records[: config.max_val_images]
    return train_records, val_records


def load_image(path: Path) -> np.ndarray:
    """uint8 [H, W] grey image from a converted PNG or JPEG."""
    pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise LungdetError(f"{path}: missing or unreadable image; re-run lungdet convert for this dataset")
    return pixels


def load_sample(record: ImageRecord, *, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A record's image resized to ``image_size`` square (uint8 [H, W]) and its boxes there (XYXY_ABS)."""
    pixels = load_image(record.path)
    height, width = pixels.shape
    boxes = record.boxes
    if (height, width) != (image_size, image_size):
        pixels = cv2.resize(pixels, (image_size, image_size), interpolation=cv2.INTER_AREA)
        boxes = scale_xywh(boxes, scale_x=image_size / width, scale_y=image_size / height)
    return pixels, xywh_to_xyxy(boxes)


def sample_seed(seed: int, epoch: int, index: int, occurrence: int = 0) -> int:
    """The augmentation seed of one training sample: a function of (run seed, epoch, image index) only.

    Drawing augmentations from a stream shared by a worker would tie them to which worker loads
    which image, and to what came before in the epoch: a resumed run or a run with another
    number of workers (or GPUs) would see different augmentations. Seeding per sample makes them
    all identical. SeedSequence mixes the three numbers so neighbouring seeds are unrelated.
    ``occurrence`` numbers the repeats of an image within one epoch (``data.positive_fraction``),
    so that each repeat is augmented differently; the first keeps the seed it always had.
    """
    key = [seed, epoch, index] if occurrence == 0 else [seed, epoch, index, occurrence]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


class EpochSampler(torch.utils.data.Sampler):
    """Training order for one epoch: a seeded shuffle, this process's shard of it, and a resume point.

    Yields ``(image index, augmentation seed)``. The order depends only on ``(seed, epoch)``;
    with ``world_size`` processes, process ``rank`` takes every ``world_size``-th image of it
    (the order is first padded by repeating its head, as DistributedSampler does, so every
    process gets the same number of batches and none waits for the others at the end). After
    :meth:`resume_at`, the first batches of the epoch are skipped without loading them.

    With ``positive_fraction`` above 0, an epoch keeps its length (one sample per image) but
    that share of its samples comes from the images with boxes (``positives``): each positive
    is repeated as evenly as the share needs, and negatives are left out to make room, a
    different seeded choice of them each epoch.
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        positives: Sequence[bool] | None = None,
        positive_fraction: float = 0.0,
    ) -> None:
        if size < 1:
            raise LungdetError("cannot sample from an empty training set")
        if positive_fraction and (positives is None or len(positives) != size):
            raise ValueError("positive_fraction needs a positives flag for every image")
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 1
        self.start = 0
        self.positive_fraction = positive_fraction
        self.positives = [index for index in range(size) if positives[index]] if positives is not None else []
        self.negatives = [index for index in range(size) if positives is not None and not positives[index]]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (from 1; it seeds the order) at its first sample, undoing any :meth:`resume_at`."""
        self.epoch = epoch
        self.start = 0

    def resume_at(self, samples_done: int) -> None:
        """Skip this process's first ``samples_done`` samples of the current epoch (they were trained before a kill)."""
        self.start = samples_done

    def epoch_order(self) -> list[tuple[int, int]]:
        """Every process's ``(image index, occurrence)`` for the current epoch, in training order, before sharding."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if not self.positive_fraction or not self.positives or not self.negatives:
            return [(index, 0) for index in torch.randperm(self.size, generator=generator).tolist()]
        wanted_positives = max(1, round(self.positive_fraction * self.size))
        pool: list[tuple[int, int]] = []
        for group, wanted in ((self.positives, wanted_positives), (self.negatives, self.size - wanted_positives)):
            shuffled = [group[position] for position in torch.randperm(len(group), generator=generator).tolist()]
            pool += [(shuffled[count % len(group)], count // len(group)) for count in range(wanted)]
        return [pool[position] for position in torch.randperm(len(pool), generator=generator).tolist()]

    def shard(self) -> list[int]:
        """This process's image indices for the current epoch, in training order."""
        return [index for index, _ in self._shard()]

    def _shard(self) -> list[tuple[int, int]]:
        order = self.epoch_order()
        per_rank = -(-self.size // self.world_size)
        order = (order * self.world_size)[: per_rank * self.world_size]  # pad by repeating the head
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index, occurrence in self._shard()[self.start :]:
            yield index, sample_seed(self.seed, self.epoch, index, occurrence)

    def __len__(self) -> int:
        return -(-self.size // self.world_size) - self.start


class DetectionDataset(Dataset):
    """Converted images resized to ``image_size`` square, with torchvision detection targets.

    Indexed by an image index (no augmentation) or, from :class:`EpochSampler`, by
    ``(index, augmentation seed)``. With ``mask_shape`` set (Mask R-CNN), targets also carry
    ``masks`` drawn from the final boxes.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        *,
        image_size: int,
        augmentation: A.Compose | None,
        mask_shape: str | None = None,
    ) -> None:
        self.records = records
        self.image_size = image_size
        self.augmentation = augmentation
        self.mask_shape = mask_shape

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        record = self.records[index]
        pixels, boxes_xyxy = load_sample(record, image_size=self.image_size)
        if self.augmentation is not None and seed is not None:
            pixels, boxes_xyxy = augment_sample(self.augmentation, pixels, boxes_xyxy, sample_seed=seed)
        box_tensor = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4))
        target = {
            "boxes": box_tensor,
            "labels": torch.ones(box_tensor.shape[0], dtype=torch.int64),
            "image_id": torch.tensor(record.image_id),
            "metadata": torch.from_numpy(metadata_features(record.tags)),
            "class_index": torch.tensor(class_index(record.class_name)),
        }
        if self.mask_shape is not None:
            target["masks"] = box_masks(
                box_tensor, height=self.image_size, width=self.image_size, shape=self.mask_shape
            )
        return to_model_input(pixels), target


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches are lists: images may differ in size and targets in box count."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def build_dataloaders(
    data_dir: Path,
    config: DataConfig,
    *,
    image_size: int,
    seed: int,
    augment: AugmentConfig | None = None,
    mask_shape: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders for ``config.fold``; validation is never augmented or shuffled.

    The training loader's sampler is an :class:`EpochSampler` (call its ``set_epoch`` each epoch).
    With ``world_size`` processes, each gets its shard of both: training via the sampler,
    validation as every ``world_size``-th image (unpadded, so no image is scored twice).
    """
    train_records, val_records = select_records(data_dir, config)
    if not train_records or (not val_records and config.fold != ALL_FOLDS):
        raise LungdetError(
            f"{data_dir}: fold {config.fold} leaves {len(train_records)} training and {len(val_records)} validation images; need at least one of each"
        )
    augmentation = build_augmentation(augment or AugmentConfig(), seed=seed)
    workers = {
        "num_workers": config.num_workers,
        "collate_fn": collate,
        "pin_memory": pin_memory,
        # Workers that outlive the epoch skip re-importing torch and re-reading the records each epoch.
        "persistent_workers": config.num_workers > 0,
        # The loader draws a base seed per epoch; from its own generator, not the global one, so
        # that the global stream (used by the model) is the same whether or not a run was resumed.
        "generator": torch.Generator().manual_seed(seed),
    }
    sampler = EpochSampler(
        len(train_records),
        seed=seed,
        rank=rank,
        world_size=world_size,
        positives=[len(record.boxes) > 0 for record in train_records],
        positive_fraction=config.positive_fraction,
    )
    # Dropping the last incomplete batch avoids a tiny, noisy final step, except when one batch is all there is.
    drop_last = len(sampler) > config.batch_size
    train_loader = DataLoader(
        DetectionDataset(train_records, image_size=image_size, augmentation=augmentation, mask_shape=mask_shape),
        batch_size=config.batch_size,
        sampler=sampler,
        drop_last=drop_last,
        **workers,
    )
    val_loader = DataLoader(
        DetectionDataset(val_records[rank::world_size], image_size=image_size, augmentation=None),
        batch_size=config.batch_size,
        shuffle=False,
        **workers,
    )
    return train_loader, val_loader
