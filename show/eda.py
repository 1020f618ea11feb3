"""``lungdet eda``: one HTML page of figures about the RSNA labels (and DICOM tags), to read before training.

The page shows the class balance, boxes per positive image, box sizes, where boxes fall, and,
when a DICOM folder is given, age / sex / view position against the target, pixel spacing and a
few sample images per class with their truth boxes. Numbers are computed by the pure
:func:`compute_stats` (no images involved), then drawn by matplotlib (Agg, no display needed).
DICOM tags are read metadata-only; pixels are decoded only for the sample images.

Run::

    lungdet eda --labels stage_2_train_labels.csv --class-info stage_2_detailed_class_info.csv \\
        --dicom-dir stage_2_train_images --out eda

then open ``eda/index.html``. Every file is written atomically. Boxes are XYWH_ABS in each
DICOM's original pixels, as in the labels CSV. For PNG/JPEG derivatives, ``--image-dir DIR
--metadata metadata.csv`` takes the place of ``--dicom-dir``: sizes from each file's header, tags
from the CSV (see :mod:`lungdet.data_tools.metadata`), unknown without it.
"""

from __future__ import annotations

import argparse
import html
import io
import re
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from lungdet.atomic import write_bytes_atomic, write_text_atomic
from lungdet.boxes import as_box_array
from lungdet.cli_types import int_in_range
from lungdet.data_tools.dicom_io import DicomMeta, find_dicoms, read_dicom_metadata
from lungdet.data_tools.image_io import find_images, read_picture_size, read_xray_file
from lungdet.data_tools.labels import NORMAL_CLASS, NOT_NORMAL_CLASS, POSITIVE_CLASS, PatientLabels, read_labels
from lungdet.data_tools.metadata import ImageTags, MetadataTable, read_metadata_csv
from lungdet.errors import DicomReadError, ImageReadError, LungdetError
from lungdet.show.visualize import draw_overlay, encode_image, fit_for_display

INDEX_FILE = "index.html"
DISCLAIMER = "lungdet is a research tool, not a diagnostic device"
# The RSNA labels give boxes in the pixels of 1024x1024 images. A box whose DICOM is not at hand
# is normalised by this size (and the page says so); boxes with a DICOM use its Rows/Columns.
LABELS_PIXEL_SPACE = (1024, 1024)  # (rows, columns)
# Cells per side of the box-location heatmap: 64 gives 16 px cells in the 1024 space.
DEFAULT_GRID_SIZE = 64
# Longer side of the sample images on the page, in pixels: enough to see a box, small enough to load fast.
SAMPLE_MAX_SIZE = 384
DEFAULT_SAMPLES_PER_CLASS = 3
# The last bar of "boxes per positive image" collects this many boxes and more (the real data has at most 4).
BOXES_PER_IMAGE_CAP = 4
# Older than this is a typo in the tag (the RSNA files hold a few ages above 140), not a patient.
MAX_PLAUSIBLE_AGE_YEARS = 120
# Display order of the classes: from "nothing there" to "opacity".
CLASS_ORDER = (NORMAL_CLASS, NOT_NORMAL_CLASS, POSITIVE_CLASS)
NO_CLASS = "no class info"
# Negatives blue, positives orange (they stay apart for red-green colour blindness); the
# "not normal" negatives purple, between the two.
TARGET_COLORS = {0: "#4c72b0", 1: "#dd8452"}
CLASS_COLORS = {NORMAL_CLASS: "#4c72b0", NOT_NORMAL_CLASS: "#8172b3", POSITIVE_CLASS: "#dd8452", NO_CLASS: "#999999"}
FIGURE_DPI = 100


# --- the numbers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupCounts:
    """Patients of one group (a sex, a view position) by target."""

    negatives: int
    positives: int

    @property
    def total(self) -> int:
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


# --- reading DICOM metadata ---------------------------------------------------------------------


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


# --- figures ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One figure on the page: its PNG, a title, a one-line caption and the key numbers beside it."""

    png_name: str
    title: str
    caption: str
    numbers: list[str]


@dataclass(frozen=True)
class SampleImage:
    png_name: str
    patient_id: str
    box_count: int


@dataclass
class EdaReport:
    """What :func:`write_eda` wrote, and the files it could not read (``(path, reason)``)."""

    index_html: Path
    stats: EdaStats
    sections: list[Section]
    samples: dict[str, list[SampleImage]]
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def png_names(self) -> list[str]:
        return [section.png_name for section in self.sections] + [
            sample.png_name for group in self.samples.values() for sample in group
        ]


def new_figure(width_inches: float, height_inches: float) -> Figure:
    figure = Figure(figsize=(width_inches, height_inches), layout="constrained")
    # An explicit Agg canvas: no pyplot, so no global figure state and no display is ever needed.
    FigureCanvasAgg(figure)
    return figure


def figure_to_png(figure: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return buffer.getvalue()


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def _annotate_bars(axes, bars, labels: Sequence[str]) -> None:
    for bar, text in zip(bars, labels, strict=True):
        axes.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )


def plot_class_balance(stats: EdaStats) -> bytes:
    """Bars of patients per class (or per Target without class info)."""
    if stats.class_counts is not None:
        counts = {name: count for name, count in stats.class_counts.items() if count or name != NO_CLASS}
        colors = [CLASS_COLORS.get(name, "#999999") for name in counts]
    else:
        counts = {"Target 0 (no box)": stats.negative_count, "Target 1 (box)": stats.positive_count}
        colors = [TARGET_COLORS[0], TARGET_COLORS[1]]
    figure = new_figure(6, 3.6)
    axes = figure.add_subplot()
    bars = axes.bar(range(len(counts)), list(counts.values()), color=colors)
    axes.set_xticks(range(len(counts)), [name.replace(" / ", " /\n") for name in counts], fontsize=9)
    _annotate_bars(axes, bars, [f"{count:,}\n({_percent(count, stats.patient_count)})" for count in counts.values()])
    axes.set_ylabel("patients")
    axes.set_ylim(0, max([*counts.values(), 1]) * 1.25)
    axes.set_title("Patients per class" if stats.class_counts is not None else "Patients per Target")
    return figure_to_png(figure)


def plot_boxes_per_image(stats: EdaStats) -> bytes:
    """Bars of positive patients by their number of boxes."""
    figure = new_figure(5, 3.4)
    axes = figure.add_subplot()
    names, counts = list(stats.boxes_per_positive), list(stats.boxes_per_positive.values())
    bars = axes.bar(names, counts, color=TARGET_COLORS[1])
    _annotate_bars(axes, bars, [f"{count:,} ({_percent(count, stats.positive_count)})" for count in counts])
    axes.set_xlabel("boxes in the image")
    axes.set_ylabel("positive patients")
    axes.set_ylim(0, max([*counts, 1]) * 1.2)
    axes.set_title("Boxes per positive image")
    return figure_to_png(figure)


def plot_box_sizes(stats: EdaStats) -> bytes:
    """2-D histogram of box width x height (original pixels) with marginal histograms and median lines."""
    figure = new_figure(6, 6)
    grid = figure.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4))
    main = figure.add_subplot(grid[1, 0])
    top = figure.add_subplot(grid[0, 0], sharex=main)
    right = figure.add_subplot(grid[1, 1], sharey=main)
    widths, heights = stats.box_widths, stats.box_heights
    # One range for both axes, so a square box sits on the diagonal and shapes compare by eye.
    limit = float(max(widths.max(initial=0), heights.max(initial=0), 1)) * 1.02
    edges = np.linspace(0, limit, 41)
    counts, _, _ = np.histogram2d(widths, heights, bins=[edges, edges])
    shown = np.ma.masked_equal(counts.T, 0)  # empty bins stay white instead of the colormap's lowest colour
    image = main.pcolormesh(edges, edges, shown, cmap="viridis")
    figure.colorbar(image, ax=right, label="boxes per bin", location="right")
    top.hist(widths, bins=edges, color=TARGET_COLORS[1])
    right.hist(heights, bins=edges, color=TARGET_COLORS[1], orientation="horizontal")
    if stats.median_box_width is not None:
        for axes in (main, top):
            axes.axvline(stats.median_box_width, color="crimson", linestyle="--", linewidth=1)
        for axes in (main, right):
            axes.axhline(stats.median_box_height, color="crimson", linestyle="--", linewidth=1)
        # In the empty corner, not at the crossing, where it would sit on the densest bins.
        main.text(
            0.97,
            0.03,
            f"dashed: medians\nwidth {stats.median_box_width:.0f} px, height {stats.median_box_height:.0f} px",
            transform=main.transAxes,
            ha="right",
            va="bottom",
            color="crimson",
            fontsize=9,
        )
    main.set_xlim(0, limit)
    main.set_ylim(0, limit)
    main.set_xlabel("box width (px, original image pixels)")
    main.set_ylabel("box height (px, original image pixels)")
    top.set_ylabel("boxes")
    right.set_xlabel("boxes")
    top.tick_params(labelbottom=False)
    right.tick_params(labelleft=False)
    top.set_title(f"Box width and height ({stats.box_count:,} boxes)")
    return figure_to_png(figure)


def plot_box_heatmap(stats: EdaStats) -> bytes:
    """Where boxes fall: boxes covering each grid cell per 100 positive images."""
    figure = new_figure(5.6, 4.8)
    axes = figure.add_subplot()
    per_hundred = stats.heatmap * (100 / stats.positive_count) if stats.positive_count else stats.heatmap
    image = axes.imshow(per_hundred, extent=(0, 1, 1, 0), cmap="magma", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="boxes over the cell per 100 positive images")
    axes.set_xlabel("x / image width  (image left = patient's right)")
    axes.set_ylabel("y / image height")
    grid = stats.heatmap.shape[0]
    axes.set_title(f"Box locations ({grid}x{grid} grid)")
    return figure_to_png(figure)


def plot_age_by_target(metadata: MetadataStats) -> bytes:
    """Histograms of patient age (years) for Target 0 and 1, each scaled to its own total."""
    figure = new_figure(6, 3.6)
    axes = figure.add_subplot()
    edges = np.arange(0, MAX_PLAUSIBLE_AGE_YEARS + 5, 5)
    for target, name in ((0, "Target 0 (no box)"), (1, "Target 1 (box)")):
        ages = metadata.ages_by_target[target]
        ages = ages[ages <= MAX_PLAUSIBLE_AGE_YEARS]
        if len(ages):
            # Each group as a share of itself: positives are a quarter of the data and would look flat.
            axes.hist(
                ages,
                bins=edges,
                weights=np.full(len(ages), 100 / len(ages)),
                histtype="step",
                linewidth=2,
                color=TARGET_COLORS[target],
                label=f"{name}, n={len(ages):,}",
            )
    axes.set_xlabel("age (years, 5-year bins)")
    axes.set_ylabel("% of the group")
    axes.set_xlim(0, 100)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=9, loc="upper right")  # few patients are over 80, so that corner is empty
    axes.set_title("Age by target")
    return figure_to_png(figure)


def plot_groups_by_target(groups: Mapping[str, GroupCounts], *, title: str, xlabel: str) -> bytes:
    """Side-by-side bars of negatives and positives per group, with each group's positive rate above."""
    figure = new_figure(5, 3.6)
    axes = figure.add_subplot()
    names = list(groups)
    positions = np.arange(len(names))
    negatives = [groups[name].negatives for name in names]
    positives = [groups[name].positives for name in names]
    axes.bar(positions - 0.2, negatives, width=0.4, color=TARGET_COLORS[0], label="Target 0")
    axes.bar(positions + 0.2, positives, width=0.4, color=TARGET_COLORS[1], label="Target 1")
    top = max([*negatives, *positives, 1])
    for position, name in zip(positions, names, strict=True):
        rate = groups[name].positive_rate
        text = f"{100 * rate:.1f}% positive" if rate is not None else "–"
        axes.annotate(
            text,
            (position, max(groups[name].negatives, groups[name].positives)),
            ha="center",
            va="bottom",
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=9,
        )
    axes.set_xticks(positions, names)
    axes.set_ylim(0, top * 1.25)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("patients")
    axes.legend(fontsize=9, loc="upper left")
    axes.set_title(title)
    return figure_to_png(figure)


def plot_pixel_spacing(metadata: MetadataStats) -> bytes:
    """Histogram of the row pixel spacing (mm)."""
    figure = new_figure(5, 3.4)
    axes = figure.add_subplot()
    spacing = metadata.pixel_spacings_mm[:, 0]
    if len(spacing):
        low, high = float(spacing.min()), float(spacing.max())
        axes.hist(spacing, bins=np.linspace(low - 0.005, high + 0.005, 31), color="#55a868")
    axes.set_xlabel("pixel spacing (mm per pixel, rows)")
    axes.set_ylabel("DICOMs")
    axes.set_title("Pixel spacing")
    return figure_to_png(figure)


def encode_sample_png(patient: PatientLabels, path: Path) -> tuple[bytes, int]:
    """Read one image's pixels (DICOM, PNG or JPEG) and draw its truth boxes (XYWH_ABS, original pixels) at page size.

    Returns the PNG bytes and the number of boxes drawn. Raises ImageReadError if it cannot be decoded.
    """
    image = read_xray_file(path)
    pixels, truth, _ = fit_for_display(image.pixels, as_box_array(patient.boxes), None, max_size=SAMPLE_MAX_SIZE)
    rgb = draw_overlay(pixels, truth=truth, prediction=None, title=patient.patient_id)
    return encode_image(rgb, ".png", what=f"{path}: the sample image"), len(truth)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --- the page -----------------------------------------------------------------------------------


def _format_median(values: np.ndarray) -> str:
    return f"{np.median(values):.0f}" if len(values) else "–"


def build_sections(stats: EdaStats) -> list[tuple[Section, bytes]]:
    """Every figure of the page with its caption and numbers, rendered to PNG bytes."""
    sections: list[tuple[Section, bytes]] = []
    total = stats.patient_count
    balance_numbers = [
        f"{total:,} patients, {stats.box_count:,} boxes",
        f"positive (Target 1): {stats.positive_count:,} ({_percent(stats.positive_count, total)})",
        f"negative (Target 0): {stats.negative_count:,} ({_percent(stats.negative_count, total)})",
    ]
    if stats.class_counts is not None:
        balance_numbers += [
            f"{name}: {count:,} ({_percent(count, total)})"
            for name, count in stats.class_counts.items()
            if count or name != NO_CLASS
        ]
    sections.append(
        (
            Section(
                "class_balance.png",
                "Class balance",
                "Patients per class (one image each); negatives are kept for training, the model must learn to say 'nothing here'."
                if stats.class_counts is not None
                else "Patients per Target (no --class-info given, so Normal and Not Normal are not told apart).",
                balance_numbers,
            ),
            plot_class_balance(stats),
        )
    )
    sections.append(
        (
            Section(
                "boxes_per_image.png",
                "Boxes per positive image",
                "How many opacity boxes each positive image has; the detector must find all of them.",
                [
                    f"{name} box{'es' if name != '1' else ''}: {count:,} ({_percent(count, stats.positive_count)})"
                    for name, count in stats.boxes_per_positive.items()
                ]
                + [
                    f"mean {stats.box_count / stats.positive_count:.2f} boxes per positive image"
                    if stats.positive_count
                    else "no positive images"
                ],
            ),
            plot_boxes_per_image(stats),
        )
    )
    size_numbers = ["no boxes"]
    if stats.box_count:
        size_numbers = [
            f"median width {stats.median_box_width:.0f} px, median height {stats.median_box_height:.0f} px",
            f"width {stats.box_widths.min():.0f}..{stats.box_widths.max():.0f} px, height {stats.box_heights.min():.0f}..{stats.box_heights.max():.0f} px",
            f"median height / width {np.median(stats.box_heights / stats.box_widths):.2f}",
        ]
    sections.append(
        (
            Section(
                "box_sizes.png",
                "Box size",
                "Width against height of every box in original image pixels; dashed lines mark the medians.",
                size_numbers,
            ),
            plot_box_sizes(stats),
        )
    )
    rows, columns = stats.assumed_image_size
    heat_numbers = [f"grid {stats.heatmap.shape[0]} x {stats.heatmap.shape[1]} cells over each image"]
    if stats.heatmap_own_size_count:
        heat_numbers.append(
            f"{stats.heatmap_own_size_count:,} positive images normalised by their own image size (DICOM Rows/Columns or the file's)"
        )
    if stats.heatmap_assumed_size_count:
        heat_numbers.append(
            f"{stats.heatmap_assumed_size_count:,} positive images without a DICOM: assumed {columns}x{rows} px (the labels' pixel space)"
        )
    if stats.positive_count:
        heat_numbers.append(
            f"peak: {stats.heatmap.max() * 100 / stats.positive_count:.1f} boxes per 100 positive images"
        )
    sections.append(
        (
            Section(
                "box_heatmap.png",
                "Box locations",
                "How often a box covers each cell, per 100 positive images, with every box scaled to its own image's size.",
                heat_numbers,
            ),
            plot_box_heatmap(stats),
        )
    )
    metadata = stats.metadata
    if metadata is None or metadata.labelled_count == 0:
        return sections
    ages = metadata.ages_by_target
    sections.append(
        (
            Section(
                "age_by_target.png",
                "Age",
                "Patient age (PatientAge tag) for negatives and positives, each as a share of its own group.",
                [
                    f"median age, Target 0: {_format_median(ages[0])} years (n={len(ages[0]):,})",
                    f"median age, Target 1: {_format_median(ages[1])} years (n={len(ages[1]):,})",
                    f"missing age: {metadata.missing_age_count:,}; above {MAX_PLAUSIBLE_AGE_YEARS} (tag typos, not plotted): {metadata.implausible_age_count:,}",
                ],
            ),
            plot_age_by_target(metadata),
        )
    )
    for png_name, title, tag, groups in (
        ("sex_by_target.png", "Sex", "PatientSex", metadata.sex_by_target),
        ("view_position_by_target.png", "View position", "ViewPosition", metadata.view_by_target),
    ):
        numbers = [
            f"{name}: {counts.total:,} patients, {counts.positives:,} positive ({_percent(counts.positives, counts.total)})"
            for name, counts in groups.items()
        ]
        caption = f"{tag} against Target, with the positive rate of each group."
        if tag == "ViewPosition":
            # Why this figure matters: a detector can pick up the view as a shortcut.
            caption = "ViewPosition against Target: AP films are often portable films of sicker patients, so a model may learn the view instead of the lung."
        sections.append(
            (
                Section(png_name, title, caption, numbers),
                plot_groups_by_target(groups, title=f"{title} by target", xlabel=tag),
            )
        )
    spacing = metadata.pixel_spacings_mm
    if not len(spacing):
        return sections  # an empty plot says nothing; the page says why it is missing
    spacing_numbers = [f"missing PixelSpacing: {metadata.missing_spacing_count:,}"]
    if len(spacing):
        spacing_numbers = [
            f"median {np.median(spacing[:, 0]):.3f} mm, range {spacing[:, 0].min():.3f}..{spacing[:, 0].max():.3f} mm",
            f"non-square pixels: {int((spacing[:, 0] != spacing[:, 1]).sum()):,}",
            *spacing_numbers,
        ]
    sections.append(
        (
            Section(
                "pixel_spacing.png",
                "Pixel spacing",
                "PixelSpacing (mm per pixel) of the labelled DICOMs: how many millimetres a box pixel is.",
                spacing_numbers,
            ),
            plot_pixel_spacing(metadata),
        )
    )
    return sections


_PAGE_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
.notice { background: #fbe9e7; border-left: 4px solid #c62828; padding: 0.5em 1em; }
table.sources td { padding: 0.1em 1em 0.1em 0; }
section.figure { display: flex; gap: 2em; align-items: flex-start; border-top: 1px solid #ddd; padding: 1em 0; }
section.figure img { max-width: 620px; width: 100%; height: auto; }
.caption { font-style: italic; color: #555; }
.samples { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1em; }
.samples figure { margin: 0; }
.samples img { width: 100%; height: auto; }
figcaption { font-size: 0.85em; word-break: break-all; }
code { font-size: 0.9em; }
"""


def _source_line(name: str, path: Path | None, note: str) -> str:
    shown = f"<code>{html.escape(str(path))}</code>" if path is not None else f"<i>{html.escape(note)}</i>"
    return f"<tr><td>{html.escape(name)}</td><td>{shown}</td></tr>"


def _file_list(title: str, items: Sequence[str]) -> str:
    if not items:
        return ""
    entries = "".join(f"<li><code>{html.escape(item)}</code></li>" for item in items)
    # Collapsed: pointed at a folder with the test images too, this list runs to thousands.
    return f"<details><summary>{html.escape(title)} ({len(items):,})</summary><ul>{entries}</ul></details>"


def render_index_html(
    report: EdaReport,
    *,
    labels_csv: Path,
    class_info_csv: Path | None,
    dicom_dir: Path | None,
    dicom_count: int | None,
    samples_per_class: int,
    seed: int,
    source_kind: str = "DICOM",
    metadata_csv: Path | None = None,
) -> str:
    """The HTML page: header (files used, counts, notice), one block per figure, samples, file lists.

    ``source_kind`` is 'DICOM' or 'image' (PNG/JPEG with ``metadata_csv``); ``dicom_dir`` is the folder of either.
    """
    stats = report.stats
    metadata = stats.metadata
    counts = f"{stats.patient_count:,} patients ({stats.positive_count:,} positive, {stats.negative_count:,} negative), {stats.box_count:,} boxes"
    if dicom_count is not None and metadata is not None:
        counts += (
            f"; {dicom_count:,} {source_kind} files found: {metadata.labelled_count:,} in the labels, {len(metadata.unlabelled_paths):,} not in the labels, "
            f"{len(metadata.duplicate_paths):,} duplicate patientIds, {len(report.unreadable):,} unreadable; "
            f"{metadata.labelled_without_dicom_count:,} labelled patients have no {source_kind} file in the folder"
        )
    blocks = []
    for section in report.sections:
        numbers = "".join(f"<li>{html.escape(number)}</li>" for number in section.numbers)
        source = html.escape(section.png_name, quote=True)
        blocks.append(
            f'<section class="figure"><div><img src="{source}" alt="{html.escape(section.title, quote=True)}">'
            f'<p class="caption">{html.escape(section.caption)}</p></div>'
            f"<div><h2>{html.escape(section.title)}</h2><ul>{numbers}</ul></div></section>"
        )
    if metadata is None:
        blocks.append(
            "<p><i>No --dicom-dir (or --image-dir) given: age, sex, view position and pixel spacing come from DICOM tags "
            "(or --metadata) and are not shown.</i></p>"
        )
    elif source_kind == "image" and metadata_csv is None:
        blocks.append(
            "<p><i>PNG/JPEG files carry no DICOM tags and no --metadata CSV was given: age, sex, view position and pixel spacing are unknown.</i></p>"
        )
    elif metadata.labelled_count and not len(metadata.pixel_spacings_mm):
        blocks.append(
            f"<p><i>None of the {metadata.labelled_count:,} labelled images has a PixelSpacing, so there is no pixel-spacing figure.</i></p>"
        )
    if report.samples:
        sample_blocks = []
        for group, samples in report.samples.items():
            figures = "".join(
                f'<figure><img src="{html.escape(sample.png_name, quote=True)}" alt="{html.escape(sample.patient_id, quote=True)}">'
                f"<figcaption>{html.escape(sample.patient_id)}: {sample.box_count} truth box{'es' if sample.box_count != 1 else ''}</figcaption></figure>"
                for sample in samples
            )
            sample_blocks.append(f'<h3>{html.escape(group)} ({len(samples)})</h3><div class="samples">{figures}</div>')
        blocks.append(
            '<section><h2>Sample images</h2><p class="caption">'
            f"Up to {samples_per_class} images per class chosen at random (seed {seed}) among the {source_kind} files in the folder, "
            f"truth boxes in green, shrunk to {SAMPLE_MAX_SIZE} px.</p>{''.join(sample_blocks)}</section>"
        )
    elif dicom_dir is None and samples_per_class:
        blocks.append("<p><i>No --dicom-dir given, so there are no sample images.</i></p>")
    files = _file_list(
        f"Unreadable {source_kind} files (skipped)", [f"{path}: {reason}" for path, reason in report.unreadable]
    )
    if metadata is not None:
        files += _file_list(
            f"{source_kind} files not in the labels (skipped)", [str(path) for path in metadata.unlabelled_paths]
        )
        files += _file_list(
            f"{source_kind} files repeating a patientId (skipped; the first one counts)",
            [str(path) for path in metadata.duplicate_paths],
        )
    if files:
        blocks.append(f"<section><h2>Skipped files</h2>{files}</section>")
    sources = "".join(
        [
            _source_line("Labels", labels_csv, ""),
            _source_line("Class info", class_info_csv, "not given"),
            _source_line("DICOM folder" if source_kind == "DICOM" else "Image folder", dicom_dir, "not given"),
            *([_source_line("Metadata CSV", metadata_csv, "")] if metadata_csv is not None else []),
        ]
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>lungdet EDA</title>
<style>{_PAGE_STYLE}</style>
</head>
<body>
<h1>lungdet EDA: RSNA lung opacity labels</h1>
<p class="notice"><b>{html.escape(DISCLAIMER)}.</b> These figures describe a data set for research; they say nothing about any one patient.</p>
<table class="sources">{sources}</table>
<p>{html.escape(counts)}.</p>
{chr(10).join(blocks)}
</body>
</html>
"""


def write_eda(
    out_dir: Path,
    labels: Mapping[str, PatientLabels],
    *,
    labels_csv: Path,
    class_info_csv: Path | None = None,
    dicom_paths: Sequence[Path] | None = None,
    dicom_dir: Path | None = None,
    image_paths: Sequence[Path] | None = None,
    image_dir: Path | None = None,
    metadata: MetadataTable | None = None,
    samples_per_class: int = DEFAULT_SAMPLES_PER_CLASS,
    seed: int = 0,
    progress: bool = False,
) -> EdaReport:
    """Compute the statistics, write every figure PNG and ``out_dir/index.html`` (all atomically).

    ``dicom_paths`` (None: no DICOMs) are read metadata-only; or ``image_paths`` (PNG/JPEG), their
    sizes from the headers and their tags from ``metadata``. Only the chosen sample images are
    decoded. Unreadable files are listed in the report and on the page, never fatal.
    """
    if dicom_paths is not None and image_paths is not None:
        raise ValueError("give dicom_paths or image_paths, not both")
    out_dir = Path(out_dir)
    if dicom_paths is not None:
        scan = scan_metadata(dicom_paths, progress=progress)
    elif image_paths is not None:
        scan = scan_pictures(image_paths, metadata, progress=progress)
    else:
        scan = None
    stats = compute_stats(labels, scan.records if scan is not None else None)
    unreadable = list(scan.unreadable) if scan is not None else []

    sections = []
    for section, png in build_sections(stats):
        write_bytes_atomic(out_dir / section.png_name, png)
        sections.append(section)

    samples: dict[str, list[SampleImage]] = {}
    if scan is not None and samples_per_class > 0:
        paths = {}
        for meta in scan.records:
            paths.setdefault(meta.patient_id, meta.path)
        candidates = order_sample_candidates(labels, paths, use_classes=stats.class_counts is not None, seed=seed)
        for group, patient_ids in candidates.items():
            chosen: list[SampleImage] = []
            for patient_id in patient_ids:
                if len(chosen) == samples_per_class:
                    break
                try:
                    png, box_count = encode_sample_png(labels[patient_id], paths[patient_id])
                except ImageReadError as error:
                    # Tags read fine but the pixels do not decode: list it and take the next candidate.
                    unreadable.append((paths[patient_id], error.reason))
                    continue
                png_name = f"sample_{_slug(group)}_{len(chosen) + 1}.png"
                write_bytes_atomic(out_dir / png_name, png)
                chosen.append(SampleImage(png_name=png_name, patient_id=patient_id, box_count=box_count))
            if chosen:
                samples[group] = chosen

    report = EdaReport(
        index_html=out_dir / INDEX_FILE, stats=stats, sections=sections, samples=samples, unreadable=unreadable
    )
    page = render_index_html(
        report,
        labels_csv=labels_csv,
        class_info_csv=class_info_csv,
        dicom_dir=dicom_dir if image_paths is None else image_dir,
        dicom_count=len(dicom_paths)
        if dicom_paths is not None
        else len(image_paths)
        if image_paths is not None
        else None,
        source_kind="DICOM" if image_paths is None else "image",
        metadata_csv=None if metadata is None else metadata.path,
        samples_per_class=samples_per_class,
        seed=seed,
    )
    write_text_atomic(report.index_html, page)
    return report


# --- command line -------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Arguments of ``lungdet eda``."""
    parser = argparse.ArgumentParser(
        prog="lungdet eda",
        description="Exploratory figures of the RSNA labels (and DICOM tags) on one HTML page, to read before training.",
        epilog=(
            "example: lungdet eda --labels data/stage_2_train_labels.csv --class-info data/stage_2_detailed_class_info.csv "
            "--dicom-dir data/stage_2_train_images --out runs/eda --samples-per-class 3 --seed 0"
        ),
        add_help=add_help,
    )
    parser.add_argument(
        "--labels", type=Path, required=True, help="RSNA labels CSV (patientId,x,y,width,height,Target)"
    )
    parser.add_argument(
        "--class-info",
        type=Path,
        help="RSNA class info CSV (patientId,class) to split the negatives into Normal and Not Normal",
    )
    images = parser.add_mutually_exclusive_group()
    images.add_argument(
        "--dicom-dir",
        type=Path,
        help="folder of .dcm files (searched recursively) for age/sex/view/spacing figures and sample images; tags only, except the samples",
    )
    images.add_argument(
        "--image-dir",
        type=Path,
        help="instead of DICOMs: folder of {patientId}.png|.jpg files (searched recursively) for the sample images, with their tags from --metadata",
    )
    parser.add_argument(
        "--metadata",
        type=Path,
        help="with --image-dir: CSV of patientId plus any of PatientAge, PatientSex, ViewPosition, PixelSpacing (see lungdet convert --metadata)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write index.html and the PNG figures into")
    parser.add_argument(
        "--samples-per-class",
        type=int_in_range(0, 50),
        default=DEFAULT_SAMPLES_PER_CLASS,
        help=f"sample images per class with their truth boxes, 0..50; needs --dicom-dir or --image-dir (default: {DEFAULT_SAMPLES_PER_CLASS})",
    )
    parser.add_argument(
        "--seed", type=int_in_range(0), default=0, help="random seed >= 0 for choosing the sample images (default: 0)"
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet eda``; returns the exit status."""
    started = time.perf_counter()
    if args.out.exists() and not args.out.is_dir():
        raise LungdetError(f"--out {args.out}: is a file; pass a folder to write index.html and the PNGs into")
    # Find the DICOMs and read the CSVs before drawing anything, so a bad input fails in a second.
    if args.metadata is not None and args.image_dir is None:
        raise LungdetError(
            "--metadata gives the tags of PNG/JPEG files; give their folder with --image-dir (DICOMs carry their own tags)"
        )
    dicom_paths = find_dicoms(args.dicom_dir) if args.dicom_dir is not None else None
    if dicom_paths is not None and not dicom_paths:
        raise LungdetError(
            f"{args.dicom_dir}: no .dcm files found; pass the folder that holds the DICOMs (e.g. stage_2_train_images/) or leave out --dicom-dir"
        )
    image_paths = find_images(args.image_dir) if args.image_dir is not None else None
    if image_paths is not None and not image_paths:
        raise LungdetError(
            f"{args.image_dir}: no .png or .jpg files found; pass the folder that holds the images or leave out --image-dir"
        )
    metadata = read_metadata_csv(args.metadata) if args.metadata is not None else None
    labels = read_labels(args.labels, args.class_info)
    report = write_eda(
        args.out,
        labels,
        labels_csv=args.labels,
        class_info_csv=args.class_info,
        dicom_paths=dicom_paths,
        dicom_dir=args.dicom_dir,
        image_paths=image_paths,
        image_dir=args.image_dir,
        metadata=metadata,
        samples_per_class=args.samples_per_class,
        seed=args.seed,
        progress=True,
    )
    stats = report.stats
    elapsed = time.perf_counter() - started
    sample_count = sum(len(group) for group in report.samples.values())
    print(
        f"wrote {report.index_html} with {len(report.sections)} figures and {sample_count} sample images in {elapsed:.1f} s"
    )
    print(f"  {stats.patient_count:,} patients, {stats.positive_count:,} positive, {stats.box_count:,} boxes")
    if stats.median_box_width is not None:
        print(f"  median box {stats.median_box_width:.0f} x {stats.median_box_height:.0f} px (width x height)")
    if stats.metadata is not None:
        kind = "DICOMs" if image_paths is None else "images"
        print(
            f"  {len(stats.metadata.unlabelled_paths)} {kind} not in the labels, {len(report.unreadable)} unreadable (listed on the page)"
        )
    if metadata is not None and metadata.problems:
        print(
            f"  {len(metadata.problems)} rows of {args.metadata} not used as given, e.g. {metadata.problems[0]['file']}: {metadata.problems[0]['reason']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
