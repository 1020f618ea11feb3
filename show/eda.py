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
    compute_stats,
    order_sample_candidates,
    scan_metadata,
    scan_pictures,
)

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


def build_sections(stats: EdaStats) -> list[tuple[Section, bytes]]:
    """Every figure of the page with its caption and numbers, rendered to PNG bytes."""
    sections: list[tuple[Section, bytes]] = []
    total = stats.patient_count
    balance_numbers = [
        f"{total:,} patients, {stats.box_count:,} boxes",
        f"positive (Target 1): {stats.positive_count:,} ({percent(stats.positive_count, total)})",
        f"negative (Target 0): {stats.negative_count:,} ({percent(stats.negative_count, total)})",
    ]
    if stats.class_counts is not None:
        balance_numbers += [
            f"{name}: {count:,} ({percent(count, total)})"
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
                    f"{name} box{'es' if name != '1' else ''}: {count:,} ({percent(count, stats.positive_count)})"
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
            f"{name}: {counts.total:,} patients, {counts.positives:,} positive ({percent(counts.positives, counts.total)})"
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
