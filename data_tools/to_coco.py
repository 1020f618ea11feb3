"""``lungdet convert``: RSNA DICOMs (or PNG/JPEG derivatives) + labels -> a COCO dataset with 8-bit images and patient-level folds.

Output folder layout::

    OUT/annotations.json        COCO: images (negatives kept, zero annotations), annotations, 1 category
    OUT/images/{patientId}.jpg  the DICOM's own JPEG stream, copied byte for byte, when nothing changes
                                its pixels (original size, no normalisation, 8-bit grey MONOCHROME2
                                JPEG Baseline: every real RSNA file)
                                (from --image-dir: the JPEG or PNG file itself, when it is 8-bit grey and upright)
    OUT/images/{patientId}.png  otherwise: 8-bit grey at --image-size, normalised
    OUT/folds.csv               patientId,fold,target,n_boxes (seeded, stratified, patient-level)
    OUT/conversion_report.json  what was converted, skipped and why, and notes on odd inputs

Annotation ``bbox`` is COCO ``[x, y, w, h]`` (XYWH_ABS) in the *written image's* pixels; each image
record keeps ``original_width``/``original_height``, the pixel space of the labels (a DICOM's own
size; for PNG/JPEG, the image's own size or ``--label-space``), so predictions can be mapped back.
Run: ``lungdet convert --dicom-dir stage_2_train_images --labels stage_2_train_labels.csv --out data/coco``
or   ``lungdet convert --image-dir images --labels labels.csv --metadata metadata.csv --out data/coco``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.pool
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from lungdet.atomic import write_text_atomic
from lungdet.cli_types import image_dimensions, int_in_range
from lungdet.data_tools.coco import assemble_coco, spooled_images_with_folds, write_coco_json
from lungdet.data_tools.conversion_report import (
    ANNOTATIONS_FILE,
    FOLDS_FILE,
    REPORT_FILE,
    ConversionReport,
    format_report,
)
from lungdet.data_tools.convert_worker import (
    IMAGES_DIR,
    JOURNAL_FILE,
    JOURNAL_VERSION,
    ConvertTask,
    convert_file,
    ends_with_newline,
    file_signature,
    init_worker,
    keep_freed_memory,
    load_journal,
    still_valid,
)
from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.folds import assign_folds, box_stratum, write_folds_csv
from lungdet.data_tools.image_io import find_images
from lungdet.data_tools.labels import PatientLabels, read_labels
from lungdet.data_tools.metadata import ImageTags, MetadataTable, read_metadata_csv
from lungdet.data_tools.pixels import NORMALIZATIONS, check_normalization
from lungdet.errors import LungdetError

# What convert reads: DICOMs (--dicom-dir) or the PNG/JPEG derivatives RSNA data often circulates as (--image-dir).
SOURCES = ("dicom", "picture")


@dataclass(frozen=True)
class ConvertOptions:
    """How ``lungdet convert`` writes the dataset: the images' size and contrast, and the folds.

    ``image_size`` writes square N x N PNGs with the boxes scaled to match (None: each image at its
    own size, a DICOM's JPEG stream kept where possible); ``normalization`` is one of
    :data:`~lungdet.data_tools.pixels.NORMALIZATIONS`; ``folds`` patient-level folds, stratified
    by box count and assigned with ``seed``. annotations.json's ``info`` records all four.
    """

    image_size: int | None = None
    normalization: str = "none"
    folds: int = 5
    seed: int = 42


def convert_dataset(
    source_dir: Path,
    labels: Mapping[str, PatientLabels],
    out_dir: Path,
    options: ConvertOptions = ConvertOptions(),
    *,
    source: str = "dicom",
    metadata: MetadataTable | None = None,
    label_space: tuple[int, int] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> ConversionReport:
    """Convert every labelled image under ``source_dir`` into a COCO dataset in ``out_dir``, written as ``options`` say.

    ``source`` is ``'dicom'`` (``*.dcm``; tags from each file) or ``'picture'`` (``*.png``,
    ``*.jpg``, ``*.jpeg`` named by patientId; tags from ``metadata``, else empty). The labels'
    boxes are in each image's own pixels, or, with ``label_space=(width, height)``, in that space
    (RSNA's 1024x1024 labels on resized derivatives); either way they are scaled to the written
    image and back at prediction.

    Bad files are skipped and recorded in the report, never fatal; files the labels do not
    name are skipped too (their truth is unknown, and writing them with no annotations would
    claim they are negative). ``workers`` processes convert in parallel; the output is the same
    for any number. A rerun converts only new or changed files, and a run killed at any moment
    and started again ends with the same output as an uninterrupted one.
    """
    check_normalization(options.normalization)  # before any work, not in the first worker
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "dicom" and (metadata is not None or label_space is not None):
        raise LungdetError(
            "--metadata and --label-space are for PNG/JPEG folders (--image-dir); a DICOM carries its own tags and pixel space"
        )
    # Workers start now, so that their start-up (about 0.3 s of imports each) overlaps the scan
    # of the folder. spawn, not fork: a forked child inherits OpenCV's thread pool mid-use and
    # can hang on its first resize.
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker) if workers > 1 else None
    try:
        return _convert_dataset(
            source_dir,
            labels,
            Path(out_dir),
            pool,
            options,
            source=source,
            metadata=metadata,
            label_space=label_space,
            progress=progress,
        )
    finally:
        if pool is not None:
            pool.terminate()


def _convert_dataset(
    source_dir: Path,
    labels: Mapping[str, PatientLabels],
    out_dir: Path,
    pool: multiprocessing.pool.Pool | None,
    options: ConvertOptions,
    *,
    source: str,
    metadata: MetadataTable | None,
    label_space: tuple[int, int] | None,
    progress: bool,
) -> ConversionReport:
    """:func:`convert_dataset`'s work, with its ``pool`` already started (None: convert in this process)."""
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    # A SIGKILL during a write leaves its temporary file (never a half image under the real name).
    for stale in (out_dir / IMAGES_DIR).glob(".*.tmp"):
        stale.unlink()
    report = _start_report(labels, source=source, metadata=metadata, label_space=label_space)
    candidates = _find_labelled_files(source_dir, labels, report, source=source)
    boxes_per_patient, image_spool, annotation_spool = _convert_files(
        candidates,
        labels,
        out_dir,
        pool,
        report,
        options,
        source=source,
        label_space=label_space,
        tags=None if metadata is None else metadata.tags,
        progress=progress,
    )

    # Stratify on the boxes actually written: a positive whose boxes all fell outside is a negative image here.
    for patient, count in boxes_per_patient.items():
        boxes_per_patient[patient] = box_stratum(count)  # in place: one dict of 26k entries, not two
    fold_of = assign_folds(boxes_per_patient, k=options.folds, seed=options.seed)
    del boxes_per_patient
    info = {
        "description": "RSNA lung opacity, written by lungdet convert",
        "image_size": options.image_size,
        "normalization": options.normalization,
        "folds": options.folds,
        "fold_seed": options.seed,
        "source": source,
        "label_space": report.label_space,
    }
    with image_spool, annotation_spool:
        write_folds_csv(out_dir / FOLDS_FILE, spooled_images_with_folds(image_spool, fold_of))
        write_coco_json(
            out_dir / ANNOTATIONS_FILE, info, spooled_images_with_folds(image_spool, fold_of), annotation_spool
        )
    write_text_atomic(out_dir / REPORT_FILE, json.dumps(report.to_dict(), indent=2))
    return report


def _start_report(
    labels: Mapping[str, PatientLabels],
    *,
    source: str,
    metadata: MetadataTable | None,
    label_space: tuple[int, int] | None,
) -> ConversionReport:
    """The report before any file is read: the run's source and label space, and the metadata CSV's problems."""
    report = ConversionReport(
        source=source,
        label_space="image" if label_space is None else f"{label_space[0]}x{label_space[1]}",
        metadata=None if metadata is None else str(metadata.path),
        metadata_columns=[] if metadata is None else list(metadata.columns),
    )
    if metadata is not None:
        report.metadata_problems.extend(metadata.problems)
        report.metadata_problems.extend(
            {
                "file": str(metadata.path),
                "kind": "metadata_unknown_patient",
                "reason": f"patient {patient} is not in the labels; row ignored",
            }
            for patient in metadata.tags
            if patient not in labels
        )
    return report


def _find_labelled_files(
    source_dir: Path, labels: Mapping[str, PatientLabels], report: ConversionReport, *, source: str
) -> list[str]:
    """The files to convert, in file order: the first file of each labelled patientId.

    Unlabelled files, second files of a patientId and labelled patients without a file go to ``report``.
    """
    # Plain strings, not Path objects: at 26k files the difference is megabytes.
    found: set[str] = set()
    candidates: list[str] = []
    for path in find_dicoms(source_dir) if source == "dicom" else find_images(source_dir):
        if path.stem not in labels:
            report.unlabelled_files.append(str(path))
        elif path.stem in found:
            report.duplicate_files.append(str(path))
        else:
            candidates.append(str(path))
        found.add(path.stem)
    report.labelled_without_dicom_ids = sorted(set(labels) - found)
    report.labelled_without_dicom = len(report.labelled_without_dicom_ids)
    del found
    return candidates


def _convert_files(
    candidates: list[str],
    labels: Mapping[str, PatientLabels],
    out_dir: Path,
    pool: multiprocessing.pool.Pool | None,
    report: ConversionReport,
    options: ConvertOptions,
    *,
    source: str,
    label_space: tuple[int, int] | None,
    tags: Mapping[str, ImageTags] | None,
    progress: bool,
) -> tuple[dict[str, int], IO[str], IO[str]]:
    """Convert ``candidates`` (by ``pool`` when given) or reuse their journal entries, and assemble the COCO records.

    Each new result goes to the journal as it comes, so that a killed run resumes where it
    stopped. Returns ``{patientId: boxes kept}`` in file order, and the image and annotation
    spools (temporary files, one JSON record a line) that :func:`~lungdet.data_tools.coco.assemble_coco` filled.
    """
    settings = {
        "image_size": options.image_size,
        "normalization": options.normalization,
        "source": source,
        "journal_version": JOURNAL_VERSION,
    }
    journal_path = out_dir / JOURNAL_FILE
    previous = load_journal(journal_path, settings)
    reusable = {path: previous[path] for path in candidates if still_valid(previous.get(path), Path(path), out_dir)}
    # Tasks are made as the workers ask for them, not held as a list; reusable entries are popped
    # as they are used, so the generator needs its own fixed set of what to skip.
    kept_paths = frozenset(reusable)
    todo = (
        ConvertTask(path, file_signature(Path(path)), str(out_dir), options.image_size, options.normalization, source)
        for path in candidates
        if path not in kept_paths
    )
    todo_count = len(candidates) - len(kept_paths)
    fresh_journal = not previous
    del previous  # entries of files no longer here need not stay in memory
    # Unreadable files are not read again either (same signature), but only images count as kept.
    report.reused = sum(entry.image is not None for entry in reusable.values())

    with open(journal_path, "w" if fresh_journal else "a", encoding="utf-8") as journal:
        if fresh_journal:
            journal.write(json.dumps({"settings": settings}) + "\n")
        elif not ends_with_newline(journal_path):
            journal.write("\n")  # close the line a killed run cut short, so the next entry starts clean
        results = (
            pool.imap(convert_file, todo, chunksize=4)
            if pool is not None and todo_count > 1
            else map(convert_file, todo)
        )
        # disable=None lets tqdm switch itself off when stderr is not a terminal (CI logs, pipes).
        fresh = iter(tqdm(results, total=todo_count, desc="convert", unit="file", disable=None if progress else True))

        def entries_in_file_order() -> Iterator[dict[str, Any]]:
            # todo is in file order and imap keeps order, so new results interleave with kept ones
            # without holding every entry in memory.
            for path in candidates:
                entry = reusable.pop(path, None)
                if entry is None:
                    entry = next(fresh)
                    journal.write(json.dumps(entry.to_journal()) + "\n")
                    journal.flush()
                yield entry

        # Records wait on disk until every image is known (folds need all of them), so memory does
        # not grow with the number of files; the spools vanish when closed, even after a crash.
        image_spool = tempfile.TemporaryFile("w+", encoding="utf-8", dir=out_dir)
        annotation_spool = tempfile.TemporaryFile("w+", encoding="utf-8", dir=out_dir)
        boxes_per_patient = assemble_coco(
            entries_in_file_order(),
            labels,
            report,
            image_spool=image_spool,
            annotation_spool=annotation_spool,
            label_space=label_space,
            tags=tags,
        )
    return boxes_per_patient, image_spool, annotation_spool


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``lungdet convert``."""
    parser = argparse.ArgumentParser(
        prog="lungdet convert",
        description="Convert RSNA DICOMs (or their PNG/JPEG derivatives) and labels into a COCO dataset (8-bit images, negatives kept) "
        "with patient-level folds.",
        epilog="examples:\n"
        "  lungdet convert --dicom-dir stage_2_train_images --labels stage_2_train_labels.csv "
        "--class-info stage_2_detailed_class_info.csv --out data/coco --image-size 512\n"
        "  lungdet convert --image-dir rsna_real/images --labels rsna_real/labels.csv --class-info rsna_real/class_info.csv "
        "--metadata rsna_real/metadata.csv --out data/real256 --image-size 256\n"
        "  lungdet convert --image-dir png256 --labels stage_2_train_labels.csv --label-space 1024x1024 --out data/png256",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dicom-dir", type=Path, help="folder with the .dcm files (searched recursively)")
    source.add_argument(
        "--image-dir",
        type=Path,
        help="folder with PNG or JPEG files named {patientId}.png|.jpg (searched recursively), instead of DICOMs",
    )
    parser.add_argument(
        "--labels", type=Path, required=True, help="stage_2_train_labels.csv (patientId,x,y,width,height,Target)"
    )
    parser.add_argument(
        "--class-info", type=Path, default=None, help="optional stage_2_detailed_class_info.csv (patientId,class)"
    )
    parser.add_argument(
        "--metadata",
        type=Path,
        default=None,
        help="with --image-dir: CSV of patientId plus any of PatientAge, PatientSex, ViewPosition, PixelSpacing (the DICOM tags "
        "the images lost); without it those fields are unknown",
    )
    parser.add_argument(
        "--label-space",
        type=image_dimensions,
        default=None,
        metavar="WxH",
        help="with --image-dir: the pixel space of the labels' boxes as WIDTHxHEIGHT, e.g. 1024x1024 for RSNA labels on resized copies "
        "(default: each image's own size)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder for annotations.json, images/, folds.csv"
    )
    parser.add_argument(
        "--image-size",
        type=int_in_range(32, 4096),
        default=None,
        help="write square N x N PNGs (boxes scaled to match); default: the DICOM's own size, kept as its own JPEG stream where possible",
    )
    parser.add_argument(
        "--folds",
        type=int_in_range(2),
        default=5,
        help="number of patient-level folds, stratified by box count (default 5)",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the fold assignment (default 42)")
    parser.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        default="none",
        help="contrast normalisation of the written images (recorded in annotations.json; predict applies the same): "
        "none, clahe (local contrast) or equalize (global histogram); default none",
    )
    parser.add_argument(
        "--workers",
        type=int_in_range(1),
        default=os.cpu_count() or 1,
        help="parallel processes (default: all cores); the output is the same for any number",
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any DICOM could not be read")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet convert`` with parsed arguments and print the summary; returns the exit status (0 on success).

    1 when no image was converted, or with ``--strict`` when any file could not be read. ``--metadata`` or
    ``--label-space`` with ``--dicom-dir`` raises :class:`LungdetError`.
    """
    if args.dicom_dir is not None and (args.metadata is not None or args.label_space is not None):
        raise LungdetError(
            "--metadata and --label-space go with --image-dir; a DICOM carries its own tags and pixel space"
        )
    keep_freed_memory()  # this process converts too when --workers is 1
    labels = read_labels(args.labels, args.class_info)
    metadata = read_metadata_csv(args.metadata) if args.metadata is not None else None
    source_dir, source = (args.dicom_dir, "dicom") if args.dicom_dir is not None else (args.image_dir, "picture")
    report = convert_dataset(
        source_dir,
        labels,
        args.out,
        ConvertOptions(image_size=args.image_size, normalization=args.normalize, folds=args.folds, seed=args.seed),
        source=source,
        metadata=metadata,
        label_space=args.label_space,
        workers=args.workers,
    )
    print(format_report(report, args.out))
    if report.converted == 0:
        kind = ".dcm files" if source == "dicom" else ".png or .jpg files"
        print(
            f"lungdet convert: no image was converted; check that {source_dir} holds {kind} named by patientId",
            file=sys.stderr,
        )
        return 1
    return 1 if args.strict and report.bad_files else 0
