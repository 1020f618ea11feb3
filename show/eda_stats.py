"""The numbers of ``lungdet eda``: class balance, boxes (count, size, where), and the DICOM tags by target; and the scan that reads the tags.

Pure functions of the labels and the tags, so they are tested without a figure.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lungdet.boxes import as_box_array
from lungdet.data_tools.dicom_io import read_dicom_metadata
from lungdet.data_tools.dicom_meta import DicomMeta
from lungdet.data_tools.image_io import read_picture_size
from lungdet.data_tools.labels import NORMAL_CLASS, NOT_NORMAL_CLASS, POSITIVE_CLASS, PatientLabels
from lungdet.data_tools.metadata import ImageTags, MetadataTable
from lungdet.errors import DicomReadError, ImageReadError

# The RSNA labels give boxes in the pixels of 1024x1024 images. A box whose DICOM is not at hand
# is normalised by this size (and the page says so); boxes with a DICOM use its Rows/Columns.
LABELS_PIXEL_SPACE = (1024, 1024)  # (rows, columns)
# Cells per side of the box-location heatmap: 64 gives 16 px cells in the 1024 space.
DEFAULT_GRID_SIZE = 64
# The last bar of "boxes per positive image" collects this many boxes and more (the real data has at most 4).
BOXES_PER_IMAGE_CAP = 4
# Older than this is a typo in the tag (the RSNA files hold a few ages above 140), not a patient.
MAX_PLAUSIBLE_AGE_YEARS = 120
# Display order of the classes: from "nothing there" to "opacity".
CLASS_ORDER = (NORMAL_CLASS, NOT_NORMAL_CLASS, POSITIVE_CLASS)
NO_CLASS = "no class info"


@dataclass(frozen=True)
class GroupCounts:
    """Patients of one group (a sex, a view position) by target."""

    negatives: int
    positives: int

    @property
    def total(self) -> int:
        """Patients in the group, negatives plus positives."""
        return self.negatives + self.positives

    @property
    def positive_rate(self) -> float | None:
        """Fraction of the group with Target 1; None for an empty group."""
        return self.positives / self.total if self.total else None


@dataclass(frozen=True)
class MetadataStats:
    """What the DICOM tags say, joined to the labels by patientId (the file stem).

    Only files the labels name count in the by-target numbers; the first file of a duplicated
    patientId wins. ``pixel_spacings_mm`` is float64 ``[K, 2]`` (row, column spacing in mm).
    """

    file_count: int
    labelled_count: int
    unlabelled_paths: list[Path]
    duplicate_paths: list[Path]
    labelled_without_dicom_count: int
    ages_by_target: dict[int, np.ndarray]
    missing_age_count: int
    implausible_age_count: int
    sex_by_target: dict[str, GroupCounts]
    view_by_target: dict[str, GroupCounts]
    pixel_spacings_mm: np.ndarray
    missing_spacing_count: int


@dataclass(frozen=True)
class EdaStats:
    """Everything the page shows, as numbers.

    ``box_widths`` / ``box_heights`` are float64 ``[B]`` in each image's original pixels.
    ``heatmap`` is float64 ``[grid, grid]`` (row = y): how many boxes cover each cell, counting a
    partly covered cell by the covered fraction, with boxes normalised to their image's size (so
    its sum is the total box area in cell units). ``class_counts`` counts patients per class and is
    None when no class info was given; ``boxes_per_positive`` maps '1', '2', '3', '4+' to patients.
    """

    patient_count: int
    positive_count: int
    box_count: int
    class_counts: dict[str, int] | None
    boxes_per_positive: dict[str, int]
    box_widths: np.ndarray
    box_heights: np.ndarray
    median_box_width: float | None
    median_box_height: float | None
    heatmap: np.ndarray
    heatmap_own_size_count: int
    heatmap_assumed_size_count: int
    assumed_image_size: tuple[int, int]
    metadata: MetadataStats | None = None

    @property
    def negative_count(self) -> int:
        """Patients with Target 0 (all patients less the positives)."""
        return self.patient_count - self.positive_count


def box_coverage_grid(boxes_unit: np.ndarray, *, grid_size: int) -> np.ndarray:
    """How much of each grid cell each box covers, summed over boxes.

    Parameters
    ----------
    boxes_unit
        ``[N, 4]`` XYWH in fractions of the image's width (x, w) and height (y, h). Parts outside
        ``[0, 1]`` fall off the grid.
    grid_size
        Cells per side.

    Returns
    -------
    np.ndarray
        float64 ``[grid_size, grid_size]``, row = y. A cell fully inside one box gets 1.
    """
    boxes = as_box_array(boxes_unit) * grid_size
    cells = np.arange(grid_size, dtype=np.float64)

    def overlap(start: np.ndarray, length: np.ndarray) -> np.ndarray:
        # [N, grid]: length of [start, start + length) inside each unit cell [i, i + 1).
        return (np.minimum((start + length)[:, None], cells + 1) - np.maximum(start[:, None], cells)).clip(min=0)

    # Each box covers the outer product of its x and y overlaps; a matrix product sums them all at once.
    return overlap(boxes[:, 1], boxes[:, 3]).T @ overlap(boxes[:, 0], boxes[:, 2])


def _boxes_per_image_bin(count: int) -> str:
    return f"{BOXES_PER_IMAGE_CAP}+" if count >= BOXES_PER_IMAGE_CAP else str(count)


def _group_name(value: str) -> str:
    return value.strip().upper() or "unknown"


def _count_groups(pairs: Sequence[tuple[str, int]]) -> dict[str, GroupCounts]:
    """``(group, target)`` pairs -> counts per group, groups sorted with 'unknown' last."""
    groups = sorted({group for group, _ in pairs}, key=lambda group: (group == "unknown", group))
    return {
        group: GroupCounts(
            negatives=sum(1 for name, target in pairs if name == group and target == 0),
            positives=sum(1 for name, target in pairs if name == group and target == 1),
        )
        for group in groups
    }


def compute_metadata_stats(labels: Mapping[str, PatientLabels], metadata: Sequence[DicomMeta]) -> MetadataStats:
    """Join DICOM metadata to the labels and count ages, sexes, view positions and pixel spacings by target."""
    labelled: dict[str, DicomMeta] = {}
    unlabelled: list[Path] = []
    duplicates: list[Path] = []
    for meta in metadata:
        if meta.patient_id not in labels:
            unlabelled.append(meta.path)
        elif meta.patient_id in labelled:
            duplicates.append(meta.path)
        else:
            labelled[meta.patient_id] = meta
    records = [(meta, labels[patient_id].target) for patient_id, meta in labelled.items()]
    ages = {
        target: np.array([meta.age for meta, t in records if t == target and meta.age is not None], dtype=np.float64)
        for target in (0, 1)
    }
    spacings = [meta.pixel_spacing for meta, _ in records if meta.pixel_spacing is not None]
    return MetadataStats(
        file_count=len(metadata),
        labelled_count=len(labelled),
        unlabelled_paths=unlabelled,
        duplicate_paths=duplicates,
        labelled_without_dicom_count=len(set(labels) - set(labelled)),
        ages_by_target=ages,
        missing_age_count=sum(1 for meta, _ in records if meta.age is None),
        implausible_age_count=sum(int((values > MAX_PLAUSIBLE_AGE_YEARS).sum()) for values in ages.values()),
        sex_by_target=_count_groups([(_group_name(meta.sex), target) for meta, target in records]),
        view_by_target=_count_groups([(_group_name(meta.view_position), target) for meta, target in records]),
        pixel_spacings_mm=np.array(spacings, dtype=np.float64).reshape(-1, 2),
        missing_spacing_count=len(records) - len(spacings),
    )


def compute_stats(
    labels: Mapping[str, PatientLabels],
    metadata: Sequence[DicomMeta] | None = None,
    *,
    grid_size: int = DEFAULT_GRID_SIZE,
    assumed_image_size: tuple[int, int] = LABELS_PIXEL_SPACE,
) -> EdaStats:
    """The numbers of the EDA page, from the labels and (optionally) the DICOMs' metadata.

    Parameters
    ----------
    labels
        ``{patientId: PatientLabels}`` from :func:`~lungdet.data_tools.labels.read_labels`; boxes XYWH_ABS
        in original pixels.
    metadata
        Tags of the DICOMs at hand, or None. A patient's Rows/Columns normalise its boxes for the
        heatmap; patients without metadata use ``assumed_image_size``.
    grid_size
        Heatmap cells per side.
    assumed_image_size
        (rows, columns) in pixels of the images whose DICOM is not given.
    """
    if grid_size < 1:
        raise ValueError(f"grid_size must be at least 1, got {grid_size}")
    metadata_stats = compute_metadata_stats(labels, metadata) if metadata is not None else None
    sizes: dict[str, tuple[int, int]] = {}
    for meta in metadata or ():
        sizes.setdefault(meta.patient_id, (meta.rows, meta.columns))

    positives = [patient for patient in labels.values() if patient.target == 1]
    all_boxes = [as_box_array(patient.boxes) for patient in positives]
    boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), dtype=np.float64)
    # Divide each box by its own image's (columns, rows, columns, rows).
    image_sizes = [sizes.get(patient.patient_id, assumed_image_size) for patient in positives]
    divisors = np.repeat(
        np.array([[columns, rows, columns, rows] for rows, columns in image_sizes], dtype=np.float64).reshape(-1, 4),
        [len(patient_boxes) for patient_boxes in all_boxes],
        axis=0,
    )
    own_size_count = sum(1 for patient in positives if patient.patient_id in sizes)

    bins = [_boxes_per_image_bin(count) for count in range(1, BOXES_PER_IMAGE_CAP + 1)]
    boxes_per_positive = dict.fromkeys(bins, 0)
    for patient_boxes in all_boxes:
        if len(patient_boxes):
            boxes_per_positive[_boxes_per_image_bin(len(patient_boxes))] += 1

    class_counts = None
    if any(patient.class_name is not None for patient in labels.values()):
        class_counts = dict.fromkeys(CLASS_ORDER, 0)
        for patient in labels.values():
            name = patient.class_name or NO_CLASS
            class_counts[name] = class_counts.get(name, 0) + 1

    return EdaStats(
        patient_count=len(labels),
        positive_count=len(positives),
        box_count=len(boxes),
        class_counts=class_counts,
        boxes_per_positive=boxes_per_positive,
        box_widths=boxes[:, 2].copy(),
        box_heights=boxes[:, 3].copy(),
        median_box_width=float(np.median(boxes[:, 2])) if len(boxes) else None,
        median_box_height=float(np.median(boxes[:, 3])) if len(boxes) else None,
        heatmap=box_coverage_grid(boxes / divisors if len(boxes) else boxes, grid_size=grid_size),
        heatmap_own_size_count=own_size_count,
        heatmap_assumed_size_count=len(positives) - own_size_count,
        assumed_image_size=tuple(assumed_image_size),
        metadata=metadata_stats,
    )


def sample_group(patient: PatientLabels, *, use_classes: bool) -> str:
    """The group a patient's sample image is shown under: its class, or 'Target 0/1' without class info."""
    if use_classes and patient.class_name:
        return patient.class_name
    return f"Target {patient.target}"


def order_sample_candidates(
    labels: Mapping[str, PatientLabels], available: Collection[str], *, use_classes: bool, seed: int
) -> dict[str, list[str]]:
    """Per group, the ``available`` patientIds in a seeded random order (take the first few that decode).

    Groups come in :data:`CLASS_ORDER` (or Target 0, Target 1); the order depends only on
    ``seed`` and the set of patients, not on the order of ``available``.
    """
    groups: dict[str, list[str]] = {}
    for patient_id in sorted(set(available) & set(labels)):
        groups.setdefault(sample_group(labels[patient_id], use_classes=use_classes), []).append(patient_id)
    order = [*CLASS_ORDER, "Target 0", "Target 1"]
    ordered = sorted(groups, key=lambda name: (order.index(name) if name in order else len(order), name))
    return {
        # One stream per group, so a group's choice does not change when another group grows.
        name: [groups[name][index] for index in np.random.default_rng([seed, position]).permutation(len(groups[name]))]
        for position, name in enumerate(ordered)
    }


@dataclass(frozen=True)
class MetadataScan:
    """Tags of every readable DICOM, and ``(path, reason)`` for each file that could not be read."""

    records: list[DicomMeta]
    unreadable: list[tuple[Path, str]]


def scan_metadata(paths: Sequence[Path], *, progress: bool = False) -> MetadataScan:
    """Read the tags (never the pixels) of each DICOM in ``paths``; unreadable files are listed, not fatal."""
    records: list[DicomMeta] = []
    unreadable: list[tuple[Path, str]] = []
    # disable=None lets tqdm switch itself off when stderr is not a terminal (CI logs, pipes).
    for path in tqdm(paths, desc="eda metadata", unit="file", disable=None if progress else True):
        try:
            records.append(read_dicom_metadata(path))
        except DicomReadError as error:
            unreadable.append((Path(path), error.reason))
    return MetadataScan(records=records, unreadable=unreadable)


def scan_pictures(paths: Sequence[Path], metadata: MetadataTable | None, *, progress: bool = False) -> MetadataScan:
    """Each PNG/JPEG's size from its header (no decoding) and its tags from ``metadata`` (empty without a row); unreadable files listed."""
    records: list[DicomMeta] = []
    unreadable: list[tuple[Path, str]] = []
    tags_of = metadata.tags if metadata is not None else {}
    for path in tqdm(paths, desc="eda images", unit="file", disable=None if progress else True):
        try:
            width, height = read_picture_size(Path(path))
        except ImageReadError as error:
            unreadable.append((Path(path), error.reason))
            continue
        tags = tags_of.get(Path(path).stem, ImageTags())
        records.append(
            DicomMeta(
                path=Path(path),
                patient_id=Path(path).stem,
                patient_id_tag="",
                age=tags.age,
                sex=tags.sex,
                view_position=tags.view_position,
                rows=height,
                columns=width,
                pixel_spacing=tags.pixel_spacing,
                modality="",
                photometric_interpretation="",
            )
        )
    return MetadataScan(records=records, unreadable=unreadable)
