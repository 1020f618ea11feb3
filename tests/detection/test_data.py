"""Tests for detection/data.py: records from a converted synthetic dataset, folds, targets, augmentation, loaders."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lungdet.data_tools.labels import read_labels
from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.data_tools.to_coco import ConvertOptions, convert_dataset
from lungdet.detection.augment import build_augmentation
from lungdet.detection.config import AugmentConfig, DataConfig
from lungdet.detection.data import (
    DetectionDataset,
    ImageRecord,
    build_dataloaders,
    collate,
    load_image,
    load_records,
    split_records,
)
from lungdet.errors import LungdetError

IMAGE_COUNT = 8
PNG_SIZE = 64  # ConvertOptions(image_size=...): the PNGs and the COCO boxes are in this space
DICOM_SIZE = 128
NO_AUGMENTATION = dict(hflip=0.0, brightness_contrast=0.0, shift_scale_rotate=0.0)


def write_tiny_dataset(root: Path, *, count: int = IMAGE_COUNT) -> Path:
    """Synthetic 128 px DICOMs (half positive) converted to 64 px PNGs in two patient-level folds."""
    synth = write_synthetic_dataset(
        root / "synth", count=count, seed=3, positive_fraction=0.5, size=(DICOM_SIZE, DICOM_SIZE)
    )
    report = convert_dataset(
        synth.images_dir,
        read_labels(synth.labels_csv),
        root / "coco",
        ConvertOptions(image_size=PNG_SIZE, folds=2, seed=0),
        progress=False,
    )
    assert report.converted == count and report.bad_files == []
    return root / "coco"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def coco(data_dir: Path) -> dict:
    return json.loads((data_dir / "annotations.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def records(data_dir: Path) -> list[ImageRecord]:
    return load_records(data_dir)


def first_positive(records: list[ImageRecord]) -> ImageRecord:
    return next(record for record in records if record.boxes.shape[0] > 0)


def first_negative(records: list[ImageRecord]) -> ImageRecord:
    return next(record for record in records if record.boxes.shape[0] == 0)


# --- records and folds --------------------------------------------------------------------------


def test_load_records_reads_every_image_in_file_order_with_its_coco_boxes(
    data_dir: Path, coco: dict, records: list[ImageRecord]
) -> None:
    assert [record.image_id for record in records] == [image["id"] for image in coco["images"]]
    for record, image in zip(records, coco["images"], strict=True):
        expected = [a["bbox"] for a in coco["annotations"] if a["image_id"] == image["id"]]
        np.testing.assert_array_equal(record.boxes, np.array(expected, dtype=np.float64).reshape(-1, 4))
        assert record.path == data_dir / image["file_name"] and record.path.is_file()
        assert record.patient_id == image["patient_id"]
        assert record.fold == image["fold"]
        assert (record.width, record.height) == (PNG_SIZE, PNG_SIZE)
        assert (record.original_width, record.original_height) == (DICOM_SIZE, DICOM_SIZE)


def test_negatives_are_kept_with_empty_boxes(records: list[ImageRecord]) -> None:
    negatives = [record for record in records if record.boxes.shape[0] == 0]
    positives = [record for record in records if record.boxes.shape[0] > 0]
    assert len(negatives) == len(positives) == IMAGE_COUNT // 2
    assert all(record.boxes.shape == (0, 4) for record in negatives)


def test_split_is_patient_disjoint_and_covers_every_image(records: list[ImageRecord]) -> None:
    train, val = split_records(records, fold=1)
    assert {r.fold for r in val} == {1}
    assert {r.fold for r in train} == {0}
    assert not {r.patient_id for r in train} & {r.patient_id for r in val}
    assert sorted(r.image_id for r in train + val) == sorted(r.image_id for r in records)


def test_a_missing_fold_is_an_error_listing_the_folds(records: list[ImageRecord]) -> None:
    with pytest.raises(LungdetError, match=re.escape("fold 5 does not exist in this dataset; its folds are [0, 1]")):
        split_records(records, fold=5)


def test_missing_annotations_tells_to_run_convert(tmp_path: Path) -> None:
    with pytest.raises(
        LungdetError,
        match=re.escape(
            f"{tmp_path / 'annotations.json'}: not found; run 'lungdet convert ... --out {tmp_path}' first"
        ),
    ):
        load_records(tmp_path)


def test_an_image_without_fold_tells_to_rerun_convert(tmp_path: Path) -> None:
    (tmp_path / "annotations.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "images/a.png", "width": 4, "height": 4}], "annotations": []})
    )
    with pytest.raises(LungdetError, match=re.escape("image images/a.png has no 'fold'; re-run lungdet convert")):
        load_records(tmp_path)


def test_an_unreadable_png_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(LungdetError, match=re.escape(f"{path}: missing or unreadable image; re-run lungdet convert")):
        load_image(path)


# --- one sample ---------------------------------------------------------------------------------


def test_sample_is_a_unit_range_image_and_boxes_scaled_to_the_model_size(records: list[ImageRecord]) -> None:
    record = first_positive(records)
    image, target = DetectionDataset([record], image_size=96, augmentation=None)[0]
    assert image.dtype == torch.float32 and image.shape == (3, 96, 96)
    assert 0.0 <= image.min() and image.max() <= 1.0
    torch.testing.assert_close(image[0], image[2])
    # COCO bbox [x, y, w, h] at 64 px -> XYXY at 96 px: every coordinate times 96 / 64 = 1.5.
    x, y, w, h = record.boxes[0]
    expected_first = torch.tensor([x * 1.5, y * 1.5, (x + w) * 1.5, (y + h) * 1.5], dtype=torch.float32)
    torch.testing.assert_close(target["boxes"][0], expected_first)
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (record.boxes.shape[0], 4)
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1] * record.boxes.shape[0]
    assert int(target["image_id"]) == record.image_id


def test_at_the_png_size_pixels_and_boxes_pass_through(records: list[ImageRecord]) -> None:
    record = first_positive(records)
    image, target = DetectionDataset([record], image_size=PNG_SIZE, augmentation=None)[0]
    torch.testing.assert_close(
        image[0], torch.from_numpy(cv2.imread(str(record.path), cv2.IMREAD_GRAYSCALE)).float() / 255.0
    )
    xywh = torch.tensor(record.boxes, dtype=torch.float32)
    torch.testing.assert_close(target["boxes"], torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))


@pytest.mark.parametrize("item", [0, (0, 7)])
def test_a_negative_image_has_no_boxes_and_no_labels(records: list[ImageRecord], item: int | tuple[int, int]) -> None:
    augmentation = build_augmentation(AugmentConfig(hflip=1.0, brightness_contrast=1.0, shift_scale_rotate=1.0))
    _, target = DetectionDataset([first_negative(records)], image_size=PNG_SIZE, augmentation=augmentation)[item]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


# --- augmentation in the dataset -----------------------------------------------------------------


def test_a_plain_index_is_never_augmented_and_a_seeded_one_always_the_same_way(records: list[ImageRecord]) -> None:
    record = first_positive(records)
    flip = build_augmentation(AugmentConfig(**{**NO_AUGMENTATION, "hflip": 1.0}))
    dataset = DetectionDataset([record], image_size=PNG_SIZE, augmentation=flip)
    plain, _ = DetectionDataset([record], image_size=PNG_SIZE, augmentation=None)[0]
    torch.testing.assert_close(dataset[0][0], plain)  # validation indexes by plain int
    torch.testing.assert_close(dataset[(0, 11)][0], plain.flip(-1))
    jitter = DetectionDataset(
        [record] * 2,
        image_size=PNG_SIZE,
        augmentation=build_augmentation(AugmentConfig(brightness_contrast=1.0, shift_scale_rotate=1.0)),
    )
    first = jitter[(0, 11)]
    jitter[(1, 12)]  # other samples in between change nothing
    again = jitter[(0, 11)]
    torch.testing.assert_close(first[0], again[0])
    torch.testing.assert_close(first[1]["boxes"], again[1]["boxes"])
    assert not torch.equal(jitter[(0, 13)][0], first[0])


def test_masks_are_drawn_from_the_final_boxes_when_asked_for(records: list[ImageRecord]) -> None:
    record = first_positive(records)
    _, target = DetectionDataset([record], image_size=PNG_SIZE, augmentation=None, mask_shape="rectangle")[0]
    masks = target["masks"]
    assert masks.shape == (record.boxes.shape[0], PNG_SIZE, PNG_SIZE) and masks.dtype == torch.uint8
    x1, y1, x2, y2 = (int(round(float(v))) for v in target["boxes"][0])
    assert masks[0, (y1 + y2) // 2, (x1 + x2) // 2] == 1 and masks[0].sum() > 0
    assert "masks" not in DetectionDataset([record], image_size=PNG_SIZE, augmentation=None)[0][1]


# --- loaders ------------------------------------------------------------------------------------


def test_collate_keeps_lists_of_images_and_targets() -> None:
    images, targets = collate([(torch.zeros(3, 2, 2), {"a": 1}), (torch.ones(3, 4, 4), {"a": 2})])
    assert [image.shape[-1] for image in images] == [2, 4]
    assert targets == [{"a": 1}, {"a": 2}]


def test_build_dataloaders_splits_by_fold_and_respects_the_image_limits(
    data_dir: Path, records: list[ImageRecord]
) -> None:
    config = DataConfig(fold=0, batch_size=2, max_train_images=3, max_val_images=2)
    train_loader, val_loader = build_dataloaders(
        data_dir, config, image_size=PNG_SIZE, seed=0, augment=AugmentConfig(**NO_AUGMENTATION)
    )
    train_expected, val_expected = split_records(records, fold=0)
    assert [r.image_id for r in train_loader.dataset.records] == [r.image_id for r in train_expected[:3]]
    assert [r.image_id for r in val_loader.dataset.records] == [r.image_id for r in val_expected[:2]]
    assert val_loader.dataset.augmentation is None and train_loader.dataset.augmentation is not None
    # Validation keeps its order; training drops the incomplete last batch (3 images, batches of 2).
    assert [int(target["image_id"]) for _, targets in val_loader for target in targets] == [
        r.image_id for r in val_expected[:2]
    ]
    train_loader.sampler.set_epoch(1)
    assert [len(images) for images, _ in train_loader] == [2]


def test_a_training_set_smaller_than_a_batch_still_gives_one_batch(data_dir: Path) -> None:
    config = DataConfig(fold=0, batch_size=8, max_train_images=3)
    train_loader, _ = build_dataloaders(
        data_dir, config, image_size=PNG_SIZE, seed=0, augment=AugmentConfig(**NO_AUGMENTATION)
    )
    train_loader.sampler.set_epoch(1)
    assert [len(images) for images, _ in train_loader] == [3]


def test_an_empty_split_is_a_clear_error(tmp_path: Path, data_dir: Path, coco: dict) -> None:
    # A one-image dataset has a single fold: validating on it leaves nothing to train on.
    only = {
        **coco,
        "images": coco["images"][:1],
        "annotations": [a for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"]],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(only))
    shutil.copytree(data_dir / "images", tmp_path / "images")
    fold = coco["images"][0]["fold"]
    with pytest.raises(
        LungdetError,
        match=re.escape(
            f"{tmp_path}: fold {fold} leaves 0 training and 1 validation images; need at least one of each"
        ),
    ):
        build_dataloaders(tmp_path, DataConfig(fold=fold), image_size=PNG_SIZE, seed=0)


def test_training_batches_are_the_same_with_any_number_of_workers(data_dir: Path) -> None:
    # Augmentation is seeded per sample from (seed, epoch, index), so which worker loads an image
    # changes nothing; and two epochs differ in both order and augmentation.
    augment = AugmentConfig(hflip=0.5, brightness_contrast=1.0, shift_scale_rotate=1.0)

    def epochs(workers: int) -> list[list[torch.Tensor]]:
        config = DataConfig(fold=0, batch_size=1, num_workers=workers)
        train_loader, _ = build_dataloaders(data_dir, config, image_size=PNG_SIZE, seed=0, augment=augment)
        result = []
        for epoch in (1, 2):
            train_loader.sampler.set_epoch(epoch)
            result.append([images[0] for images, _ in train_loader])
        return result

    in_process, with_workers = epochs(0), epochs(2)
    assert len(in_process[0]) == 4
    for mine, theirs in zip(in_process, with_workers, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(*in_process, strict=True))


# --- positive_fraction: more positives per epoch, same length -----------------------------------


def test_positive_fraction_repeats_positives_evenly_and_keeps_the_epoch_length() -> None:
    from collections import Counter

    from lungdet.detection.data import EpochSampler, sample_seed

    positives = [index % 5 == 0 for index in range(20)]  # images 0, 5, 10, 15
    sampler = EpochSampler(20, seed=4, positives=positives, positive_fraction=0.5)
    sampler.set_epoch(3)
    samples = list(sampler)
    assert len(samples) == len(sampler) == 20
    counts = Counter(index for index, _ in samples)
    assert sorted(counts[index] for index in (0, 5, 10, 15)) == [
        2,
        2,
        3,
        3,
    ]  # 10 positive samples, as evenly as they go
    negatives = [index for index in counts if not positives[index]]
    assert len(negatives) == 10 and all(counts[index] == 1 for index in negatives)
    # Every repeat of an image is augmented differently; the first keeps the seed it has without repeats.
    assert len({seed for _, seed in samples}) == 20
    first_seen = {}
    for index, seed in samples:
        first_seen.setdefault(index, seed)
    assert {seed for index, seed in first_seen.items()} >= {sample_seed(4, 3, index) for index in negatives}
    # The order is a function of (seed, epoch): the same again, other negatives in another epoch.
    again = EpochSampler(20, seed=4, positives=positives, positive_fraction=0.5)
    again.set_epoch(3)
    assert list(again) == samples
    again.set_epoch(4)
    assert {index for index, _ in again if not positives[index]} != set(negatives)


def test_without_positive_fraction_the_order_is_the_plain_shuffle() -> None:
    import torch

    from lungdet.detection.data import EpochSampler, sample_seed

    sampler = EpochSampler(12, seed=2, positives=[index < 3 for index in range(12)])
    sampler.set_epoch(5)
    expected = torch.randperm(12, generator=torch.Generator().manual_seed(2 * 100_003 + 5)).tolist()
    assert list(sampler) == [(index, sample_seed(2, 5, index)) for index in expected]


def test_positive_fraction_is_range_checked() -> None:
    from lungdet.detection.config import load_config
    from lungdet.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.positive_fraction.*in \[0, 0.9\]"):
        load_config(None, ["data.positive_fraction=0.95"])
