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
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungdet.atomic import write_bytes_atomic, write_text_atomic
from lungdet.cli_types import int_in_range
from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.image_io import find_images
from lungdet.data_tools.labels import PatientLabels, read_labels
from lungdet.data_tools.metadata import MetadataTable, read_metadata_csv
from lungdet.errors import ImageReadError, LungdetError
from lungdet.show.eda_figures import (
    SAMPLE_MAX_SIZE,
    encode_sample_png,
    percent,
    plot_age_by_target,
    plot_box_heatmap,
    plot_box_sizes,
    plot_boxes_per_image,
    plot_class_balance,
    plot_groups_by_target,
    plot_pixel_spacing,
)
from lungdet.show.eda_stats import (
    MAX_PLAUSIBLE_AGE_YEARS,
    NO_CLASS,
    EdaStats,
    MetadataScan,
    MetadataStats,
    compute_stats,
    order_sample_candidates,
    scan_metadata,
    scan_pictures,
)
from lungdet.show.pages import render_page

INDEX_FILE = "index.html"
DISCLAIMER = "lungdet is a research tool, not a diagnostic device"
DEFAULT_SAMPLES_PER_CLASS = 3


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
    """One sample X-ray on the page: its PNG (truth boxes drawn), the patient it shows and how many boxes were drawn."""

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
        """File names, in the output folder, of every PNG written: the figures, then the sample images."""
        return [section.png_name for section in self.sections] + [
            sample.png_name for group in self.samples.values() for sample in group
        ]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --- the page -----------------------------------------------------------------------------------


def _format_median(values: np.ndarray) -> str:
    return f"{np.median(values):.0f}" if len(values) else "–"


def _class_balance(stats: EdaStats) -> tuple[Section, bytes]:
    total = stats.patient_count
    numbers = [
        f"{total:,} patients, {stats.box_count:,} boxes",
        f"positive (Target 1): {stats.positive_count:,} ({percent(stats.positive_count, total)})",
        f"negative (Target 0): {stats.negative_count:,} ({percent(stats.negative_count, total)})",
    ]
    if stats.class_counts is not None:
        numbers += [
            f"{name}: {count:,} ({percent(count, total)})"
            for name, count in stats.class_counts.items()
            if count or name != NO_CLASS
        ]
    caption = (
        "Patients per class (one image each); negatives are kept for training, the model must learn to say 'nothing here'."
        if stats.class_counts is not None
        else "Patients per Target (no --class-info given, so Normal and Not Normal are not told apart)."
    )
    return Section("class_balance.png", "Class balance", caption, numbers), plot_class_balance(stats)


def _boxes_per_image(stats: EdaStats) -> tuple[Section, bytes]:
    numbers = [
        f"{name} box{'es' if name != '1' else ''}: {count:,} ({percent(count, stats.positive_count)})"
        for name, count in stats.boxes_per_positive.items()
    ]
    numbers.append(
        f"mean {stats.box_count / stats.positive_count:.2f} boxes per positive image"
        if stats.positive_count
        else "no positive images"
    )
    caption = "How many opacity boxes each positive image has; the detector must find all of them."
    return Section("boxes_per_image.png", "Boxes per positive image", caption, numbers), plot_boxes_per_image(stats)


def _box_sizes(stats: EdaStats) -> tuple[Section, bytes]:
    numbers = ["no boxes"]
    if stats.box_count:
        numbers = [
            f"median width {stats.median_box_width:.0f} px, median height {stats.median_box_height:.0f} px",
            f"width {stats.box_widths.min():.0f}..{stats.box_widths.max():.0f} px, height {stats.box_heights.min():.0f}..{stats.box_heights.max():.0f} px",
            f"median height / width {np.median(stats.box_heights / stats.box_widths):.2f}",
        ]
    caption = "Width against height of every box in original image pixels; dashed lines mark the medians."
    return Section("box_sizes.png", "Box size", caption, numbers), plot_box_sizes(stats)


def _box_heatmap(stats: EdaStats) -> tuple[Section, bytes]:
    rows, columns = stats.assumed_image_size
    numbers = [f"grid {stats.heatmap.shape[0]} x {stats.heatmap.shape[1]} cells over each image"]
    if stats.heatmap_own_size_count:
        numbers.append(
            f"{stats.heatmap_own_size_count:,} positive images normalised by their own image size (DICOM Rows/Columns or the file's)"
        )
    if stats.heatmap_assumed_size_count:
        numbers.append(
            f"{stats.heatmap_assumed_size_count:,} positive images without a DICOM: assumed {columns}x{rows} px (the labels' pixel space)"
        )
    if stats.positive_count:
        numbers.append(f"peak: {stats.heatmap.max() * 100 / stats.positive_count:.1f} boxes per 100 positive images")
    caption = (
        "How often a box covers each cell, per 100 positive images, with every box scaled to its own image's size."
    )
    return Section("box_heatmap.png", "Box locations", caption, numbers), plot_box_heatmap(stats)


def _age(metadata: MetadataStats) -> tuple[Section, bytes]:
    ages = metadata.ages_by_target
    numbers = [
        f"median age, Target 0: {_format_median(ages[0])} years (n={len(ages[0]):,})",
        f"median age, Target 1: {_format_median(ages[1])} years (n={len(ages[1]):,})",
        f"missing age: {metadata.missing_age_count:,}; above {MAX_PLAUSIBLE_AGE_YEARS} (tag typos, not plotted): {metadata.implausible_age_count:,}",
    ]
    caption = "Patient age (PatientAge tag) for negatives and positives, each as a share of its own group."
    return Section("age_by_target.png", "Age", caption, numbers), plot_age_by_target(metadata)


def _sex_and_view(metadata: MetadataStats) -> list[tuple[Section, bytes]]:
    sections = []
    for png_name, title, tag, groups in (
        ("sex_by_target.png", "Sex", "PatientSex", metadata.sex_by_target),
        ("view_position_by_target.png", "View position", "ViewPosition", metadata.view_by_target),
    ):
        numbers = [
            f"{name}: {counts.total:,} patients, {counts.positives:,} positive ({percent(counts.positives, counts.total)})"
            for name, counts in groups.items()
        ]
        caption = f"{tag} against Target, with the positive rate of each group."
        if tag == "ViewPosition":
            # Why this figure matters: a detector can pick up the view as a shortcut.
            caption = "ViewPosition against Target: AP films are often portable films of sicker patients, so a model may learn the view instead of the lung."
        plot = plot_groups_by_target(groups, title=f"{title} by target", xlabel=tag)
        sections.append((Section(png_name, title, caption, numbers), plot))
    return sections


def _pixel_spacing(metadata: MetadataStats) -> tuple[Section, bytes]:
    spacing = metadata.pixel_spacings_mm
    numbers = [
        f"median {np.median(spacing[:, 0]):.3f} mm, range {spacing[:, 0].min():.3f}..{spacing[:, 0].max():.3f} mm",
        f"non-square pixels: {int((spacing[:, 0] != spacing[:, 1]).sum()):,}",
        f"missing PixelSpacing: {metadata.missing_spacing_count:,}",
    ]
    caption = "PixelSpacing (mm per pixel) of the labelled DICOMs: how many millimetres a box pixel is."
    return Section("pixel_spacing.png", "Pixel spacing", caption, numbers), plot_pixel_spacing(metadata)


def build_sections(stats: EdaStats) -> list[tuple[Section, bytes]]:
    """Every figure of the page with its caption and numbers, rendered to PNG bytes.

    The DICOM tags' figures (age, sex, view, spacing) only when there are labelled images with
    tags; no pixel-spacing figure when none has a PixelSpacing (an empty plot says nothing; the
    page says why it is missing).
    """
    sections = [_class_balance(stats), _boxes_per_image(stats), _box_sizes(stats), _box_heatmap(stats)]
    metadata = stats.metadata
    if metadata is None or metadata.labelled_count == 0:
        return sections
    sections += [_age(metadata), *_sex_and_view(metadata)]
    if len(metadata.pixel_spacings_mm):
        sections.append(_pixel_spacing(metadata))
    return sections


@dataclass(frozen=True)
class EdaSources:
    """The files a page describes: the labels CSVs, and the X-rays beside them, if any.

    ``image_paths`` are DICOMs (``kind`` 'DICOM': tags read from each, pixels only for the samples)
    or PNG/JPEG files (``kind`` 'image': sizes from each header, tags from ``metadata``); None:
    the labels alone. ``image_dir`` is the folder they were found in, named on the page.
    """

    labels_csv: Path
    class_info_csv: Path | None = None
    image_paths: Sequence[Path] | None = None
    image_dir: Path | None = None
    kind: str = "DICOM"
    metadata: MetadataTable | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("DICOM", "image"):
            raise ValueError(f"kind is 'DICOM' or 'image', not {self.kind!r}")


def _counts_line(report: EdaReport, sources: EdaSources) -> str:
    stats, metadata, kind = report.stats, report.stats.metadata, sources.kind
    counts = f"{stats.patient_count:,} patients ({stats.positive_count:,} positive, {stats.negative_count:,} negative), {stats.box_count:,} boxes"
    if sources.image_paths is not None and metadata is not None:
        counts += (
            f"; {len(sources.image_paths):,} {kind} files found: {metadata.labelled_count:,} in the labels, {len(metadata.unlabelled_paths):,} not in the labels, "
            f"{len(metadata.duplicate_paths):,} duplicate patientIds, {len(report.unreadable):,} unreadable; "
            f"{metadata.labelled_without_dicom_count:,} labelled patients have no {kind} file in the folder"
        )
    return counts


def _missing_figure_notes(report: EdaReport, sources: EdaSources, samples_per_class: int) -> list[str]:
    """Why a figure a reader might look for is not on the page."""
    metadata, notes = report.stats.metadata, []
    if metadata is None:
        notes.append(
            "No --dicom-dir (or --image-dir) given: age, sex, view position and pixel spacing come from DICOM tags "
            "(or --metadata) and are not shown."
        )
    elif sources.kind == "image" and sources.metadata is None:
        notes.append(
            "PNG/JPEG files carry no DICOM tags and no --metadata CSV was given: age, sex, view position and pixel spacing are unknown."
        )
    elif metadata.labelled_count and not len(metadata.pixel_spacings_mm):
        notes.append(
            f"None of the {metadata.labelled_count:,} labelled images has a PixelSpacing, so there is no pixel-spacing figure."
        )
    if not report.samples and sources.image_dir is None and samples_per_class:
        notes.append("No --dicom-dir given, so there are no sample images.")
    return notes


def _skipped_lists(report: EdaReport, kind: str) -> list[tuple[str, list[str]]]:
    """``(title, items)`` for each non-empty list of files the page did not use."""
    lists = [(f"Unreadable {kind} files (skipped)", [f"{path}: {reason}" for path, reason in report.unreadable])]
    metadata = report.stats.metadata
    if metadata is not None:
        lists += [
            (f"{kind} files not in the labels (skipped)", [str(path) for path in metadata.unlabelled_paths]),
            (
                f"{kind} files repeating a patientId (skipped; the first one counts)",
                [str(path) for path in metadata.duplicate_paths],
            ),
        ]
    return [(title, items) for title, items in lists if items]


def render_index_html(report: EdaReport, sources: EdaSources, *, samples_per_class: int, seed: int) -> str:
    """The HTML page: header (files used, counts, notice), one block per figure, samples, file lists."""
    kind = sources.kind
    rows = [
        {"name": "Labels", "path": sources.labels_csv, "note": ""},
        {"name": "Class info", "path": sources.class_info_csv, "note": "not given"},
        {"name": "DICOM folder" if kind == "DICOM" else "Image folder", "path": sources.image_dir, "note": "not given"},
    ]
    if sources.metadata is not None:
        rows.append({"name": "Metadata CSV", "path": sources.metadata.path, "note": ""})
    return render_page(
        "eda.html.j2",
        title="lungdet EDA",
        heading="lungdet EDA: RSNA lung opacity labels",
        disclaimer=DISCLAIMER,
        notice="These figures describe a data set for research; they say nothing about any one patient.",
        sources=rows,
        counts=_counts_line(report, sources),
        sections=report.sections,
        notes=_missing_figure_notes(report, sources, samples_per_class),
        samples=report.samples,
        samples_caption=(
            f"Up to {samples_per_class} images per class chosen at random (seed {seed}) among the {kind} files in the folder, "
            f"truth boxes in green, shrunk to {SAMPLE_MAX_SIZE} px."
        ),
        skipped=_skipped_lists(report, kind),
    )


def _write_samples(
    out_dir: Path,
    labels: Mapping[str, PatientLabels],
    scan: MetadataScan,
    *,
    use_classes: bool,
    samples_per_class: int,
    seed: int,
    unreadable: list[tuple[Path, str]],
) -> dict[str, list[SampleImage]]:
    """Draw up to ``samples_per_class`` images per class with their truth boxes; files that fail to decode go to ``unreadable``."""
    paths: dict[str, Path] = {}
    for meta in scan.records:
        paths.setdefault(meta.patient_id, meta.path)
    samples: dict[str, list[SampleImage]] = {}
    for group, patient_ids in order_sample_candidates(labels, paths, use_classes=use_classes, seed=seed).items():
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
    return samples


def write_eda(
    out_dir: Path,
    labels: Mapping[str, PatientLabels],
    sources: EdaSources,
    *,
    samples_per_class: int = DEFAULT_SAMPLES_PER_CLASS,
    seed: int = 0,
    progress: bool = False,
) -> EdaReport:
    """Compute the statistics, write every figure PNG and ``out_dir/index.html`` (all atomically).

    DICOMs are read metadata-only; PNG/JPEG files give their sizes from the headers and their
    tags from ``sources.metadata``. Only the chosen sample images are decoded. Unreadable files
    are listed in the report and on the page, never fatal.
    """
    out_dir = Path(out_dir)
    scan = None
    if sources.image_paths is not None and sources.kind == "DICOM":
        scan = scan_metadata(sources.image_paths, progress=progress)
    elif sources.image_paths is not None:
        scan = scan_pictures(sources.image_paths, sources.metadata, progress=progress)
    stats = compute_stats(labels, scan.records if scan is not None else None)
    unreadable = list(scan.unreadable) if scan is not None else []

    sections = []
    for section, png in build_sections(stats):
        write_bytes_atomic(out_dir / section.png_name, png)
        sections.append(section)
    samples: dict[str, list[SampleImage]] = {}
    if scan is not None and samples_per_class > 0:
        samples = _write_samples(
            out_dir,
            labels,
            scan,
            use_classes=stats.class_counts is not None,
            samples_per_class=samples_per_class,
            seed=seed,
            unreadable=unreadable,
        )
    report = EdaReport(
        index_html=out_dir / INDEX_FILE, stats=stats, sections=sections, samples=samples, unreadable=unreadable
    )
    write_text_atomic(
        report.index_html, render_index_html(report, sources, samples_per_class=samples_per_class, seed=seed)
    )
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
    sources = EdaSources(
        labels_csv=args.labels,
        class_info_csv=args.class_info,
        image_paths=dicom_paths if image_paths is None else image_paths,
        image_dir=args.dicom_dir if image_paths is None else args.image_dir,
        kind="DICOM" if image_paths is None else "image",
        metadata=metadata,
    )
    report = write_eda(
        args.out, labels, sources, samples_per_class=args.samples_per_class, seed=args.seed, progress=True
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
