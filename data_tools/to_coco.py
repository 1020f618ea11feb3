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
import csv
import ctypes
import json
import multiprocessing
import multiprocessing.pool
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np
from tqdm import tqdm

from lungdet.atomic import atomic_open, write_bytes_atomic, write_text_atomic
from lungdet.boxes import clip_xywh, scale_xywh
from lungdet.cli_types import image_dimensions, int_in_range
from lungdet.data_tools.dicom_io import DicomImage, DicomMeta, conversion_notes, find_dicoms, read_dicom
from lungdet.data_tools.image_io import XrayImage, find_images, read_xray
from lungdet.data_tools.labels import PatientLabels, read_labels
from lungdet.data_tools.metadata import TAG_COLUMNS, ImageTags, MetadataTable, read_metadata_csv
from lungdet.data_tools.pixels import NORMALIZATIONS, check_normalization, prepare_pixels
from lungdet.errors import DicomReadError, ImageReadError, LungdetError

CATEGORY = {"id": 1, "name": "lung_opacity", "supercategory": "lung"}
ANNOTATIONS_FILE = "annotations.json"
FOLDS_FILE = "folds.csv"
REPORT_FILE = "conversion_report.json"
# Progress of conversions, so that a rerun skips finished files and a killed run can resume.
JOURNAL_FILE = ".convert_journal.jsonl"
# Bumped when journal entries gain a field: entries of an older run lack it and are converted again.
JOURNAL_VERSION = 4
# What convert reads: DICOMs (--dicom-dir) or the PNG/JPEG derivatives RSNA data often circulates as (--image-dir).
SOURCES = ("dicom", "picture")
IMAGES_DIR = "images"
# What convert may write into IMAGES_DIR (see image_bytes).
IMAGE_EXTENSIONS = (".jpg", ".png")
# A box clipped to the image that keeps less than this many pixels of width or height is no box.
MIN_BOX_SIDE = 1.0
# A box that reaches further than this past its image's edge (in the labels' pixels) hints that the
# labels are in another pixel space than the image (RSNA's 1024x1024 labels on a 256 px derivative).
PAST_EDGE_TOLERANCE = 1.0
# Chest radiographs are about 1000-4000 pixels a side; outside these bounds an image is probably a
# thumbnail or a localiser (tiny) or a stitched or oversampled scan (huge). Converted, but noted.
TINY_IMAGE_SIDE = 256
HUGE_IMAGE_SIDE = 4096
# No patient is older than this; a larger PatientAge is a typing error.
MAX_PLAUSIBLE_AGE = 120
# The printed summary names at most this many files per kind; conversion_report.json lists them all.
SUMMARY_EXAMPLES = 5


@dataclass
class ConversionReport:
    """What ``convert_dataset`` did: counts plus every skipped file with its reason.

    ``notes`` lists inputs that were converted but are odd (``{"file", "kind", "reason"}``, see
    :func:`input_notes`); a file can have several.
    """

    converted: int = 0
    positives: int = 0
    boxes: int = 0
    bad_files: list[dict[str, str]] = field(default_factory=list)
    unlabelled_files: list[str] = field(default_factory=list)
    duplicate_files: list[str] = field(default_factory=list)
    dropped_boxes: list[dict[str, object]] = field(default_factory=list)
    labelled_without_dicom: int = 0
    labelled_without_dicom_ids: list[str] = field(
        default_factory=list
    )  # sorted patientIds (with --image-dir: no image file)
    notes: list[dict[str, str]] = field(default_factory=list)
    reused: int = 0  # files whose image from an earlier run with the same settings was kept
    source: str = "dicom"  # one of SOURCES
    label_space: str = "image"  # the labels' pixel space: 'image' (each image's own size) or 'WxH' (--label-space)
    boxes_past_edge: int = 0  # label boxes reaching past their image's edge (clipped or dropped)
    metadata: str | None = None  # the --metadata CSV, when one was given
    metadata_columns: list[str] = field(default_factory=list)  # the tag columns it had
    metadata_problems: list[dict[str, str]] = field(
        default_factory=list
    )  # rows of --metadata that could not be used as given

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def assign_folds(strata: Mapping[str, int], *, k: int, seed: int) -> dict[str, int]:
    """Assign each patient a fold in ``0..k-1``, balanced within each stratum.

    ``strata`` maps patientId -> stratum (e.g. number of boxes, capped). Patients are sorted
    before the seeded shuffle, so the result depends only on the set of patients and the seed,
    not on file order. Patient-level by construction: one patient, one fold.
    """
    if k < 2:
        raise LungdetError(f"--folds {k}: need at least 2 folds (one to validate on, the rest to train on)")
    rng = np.random.default_rng(seed)
    folds: dict[str, int] = {}
    offset = 0
    for stratum in sorted(set(strata.values())):
        members = sorted(patient for patient, value in strata.items() if value == stratum)
        order = rng.permutation(len(members))
        for position, index in enumerate(order):
            folds[members[index]] = (position + offset) % k
        # Rotating the start keeps fold sizes even when strata sizes are not multiples of k.
        offset = (offset + len(members)) % k
    return folds


def box_stratum(n_boxes: int) -> int:
    """Stratum for fold balancing: 0 negative, 1 one box, 2 two or more boxes."""
    return min(n_boxes, 2)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W]`` image."""
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise LungdetError("PNG encoding failed")
    return encoded.tobytes()


def file_signature(path: Path) -> list[int]:
    """``[size, mtime_ns]``: a changed or replaced source file gets a new signature and is converted again."""
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]


def input_notes(meta: DicomMeta) -> list[dict[str, str]]:
    """Notes on a readable DICOM that is odd for a chest radiograph: ``[{"kind", "reason"}, ...]``, [] if none.

    Each is converted anyway (colour to grey, MONOCHROME1 inverted, deep pixels windowed to 8
    bits, any size resized), but a user should know: the oddity may mean a wrong file or bad tags.
    """
    notes = conversion_notes(meta)
    if meta.age is None:
        notes.append({"kind": "missing_age", "reason": "PatientAge is missing or unreadable; age left empty"})
    return notes + age_notes(meta.age) + size_notes(rows=meta.rows, columns=meta.columns)


def age_notes(age: int | None) -> list[dict[str, str]]:
    """Notes on an age (years) that reads but is suspect: 0 (a placeholder) or over ``MAX_PLAUSIBLE_AGE``."""
    if age == 0:
        # '000Y' is how some systems fill an unknown age; an infant's radiograph in this set would be a surprise too.
        return [
            {
                "kind": "age_zero",
                "reason": "PatientAge reads as 0 years (often a placeholder for unknown); check it before using ages",
            }
        ]
    if age is not None and age > MAX_PLAUSIBLE_AGE:
        return [
            {
                "kind": "age_implausible",
                "reason": f"PatientAge reads as {age} years, over {MAX_PLAUSIBLE_AGE}; probably a typing error",
            }
        ]
    return []


def size_notes(*, rows: int, columns: int) -> list[dict[str, str]]:
    """Notes on an image too small or too large to be an ordinary chest radiograph."""
    notes = []
    size = f"{rows} rows x {columns} columns"
    if min(rows, columns) < TINY_IMAGE_SIDE:
        notes.append(
            {
                "kind": "tiny_image",
                "reason": f"{size}, under {TINY_IMAGE_SIDE} on a side: a thumbnail or localiser rather than a radiograph?",
            }
        )
    if max(rows, columns) > HUGE_IMAGE_SIDE:
        notes.append(
            {
                "kind": "huge_image",
                "reason": f"{size}, over {HUGE_IMAGE_SIDE} on a side: check that its labels use the same pixels",
            }
        )
    return notes


def image_bytes(image: DicomImage, *, image_size: int | None, normalization: str) -> tuple[str, bytes]:
    """``(extension, file bytes)`` of what ``convert`` writes for one decoded DICOM.

    When the settings leave the pixels as decoded, the DICOM's own JPEG stream is the image:
    copying it is lossless (it decodes to exactly these pixels), costs nothing to encode, and is
    about a third of the size of a PNG. Anything else is prepared and written as PNG.
    """
    unchanged = normalization == "none" and (image_size is None or image.pixels.shape == (image_size, image_size))
    if unchanged and image.source_jpeg is not None:
        return ".jpg", image.source_jpeg
    return ".png", encode_png(prepare_pixels(image.pixels, image_size=image_size, normalization=normalization))


def picture_bytes(image: XrayImage, data: bytes, *, image_size: int | None, normalization: str) -> tuple[str, bytes]:
    """``(extension, file bytes)`` of what ``convert`` writes for one decoded PNG or JPEG whose file held ``data``.

    As for DICOMs: when nothing changes the pixels and the file decodes to exactly them (8-bit
    grey, upright), the file itself is copied byte for byte; a colour, rotated or 16-bit file,
    a resize or a normalisation is written as a PNG of the prepared pixels.
    """
    unchanged = normalization == "none" and (image_size is None or image.pixels.shape == (image_size, image_size))
    if unchanged and image.file_is_pixels:
        return (".jpg" if image.format == "jpeg" else ".png"), data
    return ".png", encode_png(prepare_pixels(image.pixels, image_size=image_size, normalization=normalization))


def _write_image(out_dir: str, patient_id: str, extension: str, data: bytes) -> str:
    """Write one converted image atomically; returns its file name relative to ``out_dir``."""
    images_dir = Path(out_dir) / IMAGES_DIR
    file_name = f"{patient_id}{extension}"
    write_bytes_atomic(images_dir / file_name, data)
    # A run with other settings may have written this image in the other format; only one may stay,
    # or a folder of images would hold two versions of one patient.
    for other in IMAGE_EXTENSIONS:
        if other != extension:
            (images_dir / f"{patient_id}{other}").unlink(missing_ok=True)
    return f"{IMAGES_DIR}/{file_name}"


def convert_file(task: tuple[str, list[int], str, int | None, str, str]) -> dict[str, Any]:
    """Worker: read one DICOM (or PNG/JPEG, by the task's source) and write its image (atomically). Returns a journal entry.

    The entry holds the image's metadata, file name and sizes (``"image"``) and its
    :func:`input_notes` (``"notes"``), or why it could not be read (``"bad"``). Boxes are not in
    it: they come from the labels when the dataset is assembled, so a changed labels file never
    needs the images converted again; the notes are in it, so a rerun that keeps the image still
    reports them. A PNG/JPEG's tags come from the metadata CSV at assembly too, for the same reason.
    """
    path, signature, out_dir, image_size, normalization, source = task
    if source == "picture":
        return _convert_picture(path, signature, out_dir, image_size=image_size, normalization=normalization)
    try:
        image = read_dicom(Path(path))
    except DicomReadError as error:
        return {"file": path, "signature": signature, "bad": {"reason": error.reason, "kind": error.kind}}
    extension, data = image_bytes(image, image_size=image_size, normalization=normalization)
    file_name = _write_image(out_dir, image.meta.patient_id, extension, data)
    height, width = (image_size, image_size) if image_size is not None else image.pixels.shape
    meta = image.meta
    return {
        "file": path,
        "signature": signature,
        "image": {
            "patient_id": meta.patient_id,
            "file_name": file_name,
            "width": width,
            "height": height,
            "original_width": meta.columns,
            "original_height": meta.rows,
            "age": meta.age,
            "sex": meta.sex,
            "view_position": meta.view_position,
            "pixel_spacing": list(meta.pixel_spacing) if meta.pixel_spacing else None,
        },
        "notes": input_notes(meta),
    }


def _convert_picture(
    path: str, signature: list[int], out_dir: str, *, image_size: int | None, normalization: str
) -> dict[str, Any]:
    """:func:`convert_file` for a PNG or JPEG; the patientId is the file stem, the tags are filled at assembly."""
    try:
        data = Path(path).read_bytes()
        image = read_xray(data, name=path)
        if (
            image.format == "dicom"
        ):  # content decides, but a DICOM in an image folder would carry tags the records would then lack
            raise ImageReadError(
                path, "is a DICOM file with a picture's name; convert DICOMs with --dicom-dir", kind="not_an_image"
            )
    except ImageReadError as error:
        return {"file": path, "signature": signature, "bad": {"reason": error.reason, "kind": error.kind}}
    except OSError as error:
        return {
            "file": path,
            "signature": signature,
            "bad": {"reason": f"cannot be read ({error.strerror or error}); check the file", "kind": "missing"},
        }
    patient_id = Path(path).stem
    extension, encoded = picture_bytes(image, data, image_size=image_size, normalization=normalization)
    file_name = _write_image(out_dir, patient_id, extension, encoded)
    height, width = (image_size, image_size) if image_size is not None else image.pixels.shape
    return {
        "file": path,
        "signature": signature,
        "image": {
            "patient_id": patient_id,
            "file_name": file_name,
            "width": width,
            "height": height,
            "original_width": image.width,
            "original_height": image.height,
            "age": None,
            "sex": "",
            "view_position": "",
            "pixel_spacing": None,
        },
        "notes": [dict(note) for note in image.notes] + size_notes(rows=image.height, columns=image.width),
    }


def _init_worker() -> None:
    # Each process converts one file at a time; OpenCV's own threads would only fight the other workers.
    cv2.setNumThreads(1)
    keep_freed_memory()


# glibc mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST_MMAP_THRESHOLD = 32 * 2**20


def keep_freed_memory() -> None:
    """Let this process reuse freed image buffers instead of handing them back to the OS after each file.

    A fresh worker process returns each decoded image's megabytes to the kernel and faults them
    in again for the next file: about 500 page faults per 1024² file, which made a worker a
    third slower than the same loop in a long-lived process. Keeping up to a few image sizes of
    freed memory costs tens of megabytes at most. A no-op where glibc's mallopt is missing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _LARGEST_MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the default allocator is used
        pass


def load_journal(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Entries of an earlier (possibly killed) run with the same settings, keyed by file; ``{}`` otherwise.

    The journal is JSON lines: a settings header, then one line per finished file, appended only
    after that file's image is in place. A kill can cut the last line short; it is ignored.
    """
    if not path.is_file():
        return {}
    entries: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as stream:
        lines = stream.read().splitlines()
    try:
        if not lines or json.loads(lines[0]) != {"settings": settings}:
            return {}
    except json.JSONDecodeError:
        return {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written when a run was killed
        entries[entry["file"]] = entry
    return entries


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as stream:
        stream.seek(0, os.SEEK_END)
        if stream.tell() == 0:
            return True
        stream.seek(-1, os.SEEK_END)
        return stream.read(1) == b"\n"


def _still_valid(entry: dict[str, Any] | None, path: Path, out_dir: Path) -> bool:
    if entry is None or entry["signature"] != file_signature(path):
        return False
    return "bad" in entry or (out_dir / entry["image"]["file_name"]).is_file()


def convert_dataset(
    source_dir: Path,
    labels: Mapping[str, PatientLabels],
    out_dir: Path,
    *,
    source: str = "dicom",
    metadata: MetadataTable | None = None,
    label_space: tuple[int, int] | None = None,
    image_size: int | None = None,
    normalization: str = "none",
    folds: int = 5,
    seed: int = 42,
    workers: int = 1,
    progress: bool = True,
) -> ConversionReport:
    """Convert every labelled image under ``source_dir`` into a COCO dataset in ``out_dir``.

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
    check_normalization(normalization)  # before any work, not in the first worker
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "dicom" and (metadata is not None or label_space is not None):
        raise LungdetError(
            "--metadata and --label-space are for PNG/JPEG folders (--image-dir); a DICOM carries its own tags and pixel space"
        )
    # Workers start now, so that their start-up (about 0.3 s of imports each) overlaps the scan
    # of the folder. spawn, not fork: a forked child inherits OpenCV's thread pool mid-use and
    # can hang on its first resize.
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) if workers > 1 else None
    try:
        return _convert_dataset(
            source_dir,
            labels,
            Path(out_dir),
            pool,
            source=source,
            metadata=metadata,
            label_space=label_space,
            image_size=image_size,
            normalization=normalization,
            folds=folds,
            seed=seed,
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
    *,
    source: str,
    metadata: MetadataTable | None,
    label_space: tuple[int, int] | None,
    image_size: int | None,
    normalization: str,
    folds: int,
    seed: int,
    progress: bool,
) -> ConversionReport:
    """:func:`convert_dataset`'s work, with its ``pool`` already started (None: convert in this process)."""
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    # A SIGKILL during a write leaves its temporary file (never a half image under the real name).
    for stale in (out_dir / IMAGES_DIR).glob(".*.tmp"):
        stale.unlink()
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

    settings = {
        "image_size": image_size,
        "normalization": normalization,
        "source": source,
        "journal_version": JOURNAL_VERSION,
    }
    journal_path = out_dir / JOURNAL_FILE
    previous = load_journal(journal_path, settings)
    reusable = {path: previous[path] for path in candidates if _still_valid(previous.get(path), Path(path), out_dir)}
    # Tasks are made as the workers ask for them, not held as a list; reusable entries are popped
    # as they are used, so the generator needs its own fixed set of what to skip.
    kept_paths = frozenset(reusable)
    todo = (
        (path, file_signature(Path(path)), str(out_dir), image_size, normalization, source)
        for path in candidates
        if path not in kept_paths
    )
    todo_count = len(candidates) - len(kept_paths)
    fresh_journal = not previous
    del previous  # entries of files no longer here need not stay in memory
    # Unreadable files are not read again either (same signature), but only images count as kept.
    report.reused = sum("image" in entry for entry in reusable.values())

    with open(journal_path, "w" if fresh_journal else "a", encoding="utf-8") as journal:
        if fresh_journal:
            journal.write(json.dumps({"settings": settings}) + "\n")
        elif not _ends_with_newline(journal_path):
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
                    journal.write(json.dumps(entry) + "\n")
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
            tags=None if metadata is None else metadata.tags,
        )

    # Stratify on the boxes actually written: a positive whose boxes all fell outside is a negative image here.
    for patient, count in boxes_per_patient.items():
        boxes_per_patient[patient] = box_stratum(count)  # in place: one dict of 26k entries, not two
    fold_of = assign_folds(boxes_per_patient, k=folds, seed=seed)
    del boxes_per_patient
    info = {
        "description": "RSNA lung opacity, written by lungdet convert",
        "image_size": image_size,
        "normalization": normalization,
        "folds": folds,
        "fold_seed": seed,
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


def assemble_coco(
    entries: Iterable[dict[str, Any]],
    labels: Mapping[str, PatientLabels],
    report: ConversionReport,
    *,
    image_spool: IO[str],
    annotation_spool: IO[str],
    label_space: tuple[int, int] | None = None,
    tags: Mapping[str, ImageTags] | None = None,
) -> dict[str, int]:
    """COCO image and annotation records from journal entries (in file order) and the labels.

    Each record is written as one JSON line to its spool (images without their fold, which is
    known only at the end); returns ``{patientId: boxes kept}`` in file order. Boxes are scaled
    from the labels' pixels (the DICOM's, the image's own, or ``label_space`` ``(width, height)``,
    which then becomes the record's ``original_width``/``original_height``) to the written image's
    pixels per axis and clipped to it; a box left thinner than ``MIN_BOX_SIDE`` is dropped and
    reported. ``tags`` (from a metadata CSV) fill a PNG/JPEG's age, sex, view and spacing. Bad
    files and the notes on converted files go to the report.
    """
    boxes_per_patient: dict[str, int] = {}
    annotation_count = 0
    for entry in entries:
        if "bad" in entry:
            report.bad_files.append(
                {"file": entry["file"], "reason": entry["bad"]["reason"], "kind": entry["bad"]["kind"]}
            )
            continue
        report.notes.extend({"file": entry["file"], **note} for note in entry["notes"])
        image = dict(entry["image"])
        patient_id, width, height = image["patient_id"], image["width"], image["height"]
        if label_space is not None:
            image["original_width"], image["original_height"] = label_space
        if tags is not None:
            image.update(_tag_fields(entry["file"], tags.get(patient_id), report))
        truth = labels[patient_id]
        if len(truth.boxes):
            ends = truth.boxes[:, :2] + truth.boxes[:, 2:]
            report.boxes_past_edge += int(
                (
                    (ends[:, 0] > image["original_width"] + PAST_EDGE_TOLERANCE)
                    | (ends[:, 1] > image["original_height"] + PAST_EDGE_TOLERANCE)
                ).sum()
            )
        scaled = scale_xywh(
            truth.boxes, scale_x=width / image["original_width"], scale_y=height / image["original_height"]
        )
        clipped = clip_xywh(scaled, width=width, height=height)
        image_id = len(boxes_per_patient) + 1
        kept = 0
        for original, box in zip(truth.boxes.tolist(), clipped.tolist(), strict=True):
            if box[2] < MIN_BOX_SIDE or box[3] < MIN_BOX_SIDE:
                report.dropped_boxes.append({"patientId": patient_id, "box": original, "reason": "outside the image"})
                continue
            kept += 1
            annotation_count += 1
            annotation = {
                # Ids start at 1: pycocotools treats id 0 as "no match" in its evaluation.
                "id": annotation_count,
                "image_id": image_id,
                "category_id": CATEGORY["id"],
                "bbox": [round(value, 3) for value in box],
                "area": round(box[2] * box[3], 3),
                "iscrowd": 0,
            }
            annotation_spool.write(json.dumps(annotation) + "\n")
        record = {
            "id": image_id,
            **image,
            "target": truth.target,
            "class_name": truth.class_name,
            "n_boxes": kept,
        }
        image_spool.write(json.dumps(record) + "\n")
        boxes_per_patient[patient_id] = kept
        report.converted += 1
        report.positives += int(kept > 0)
        report.boxes += kept
    return boxes_per_patient


def _tag_fields(file: str, tags: ImageTags | None, report: ConversionReport) -> dict[str, Any]:
    """The image record's tag fields from a metadata row (empty, with a note, when the patient has none)."""
    if tags is None:
        report.notes.append(
            {
                "file": file,
                "kind": "no_metadata",
                "reason": "the metadata CSV has no row for this patient; age, sex and view left unknown",
            }
        )
        tags = ImageTags()
    report.notes.extend({"file": file, **note} for note in age_notes(tags.age))
    return {
        "age": tags.age,
        "sex": tags.sex,
        "view_position": tags.view_position,
        "pixel_spacing": list(tags.pixel_spacing) if tags.pixel_spacing else None,
    }


def spooled_images_with_folds(image_spool: IO[str], fold_of: Mapping[str, int]) -> Iterator[dict[str, Any]]:
    """Image records back from their spool, each with its fold added; can be read any number of times."""
    image_spool.seek(0)
    for line in image_spool:
        record = json.loads(line)
        record["fold"] = fold_of[record["patient_id"]]
        yield record


def write_coco_json(
    path: Path, info: dict[str, Any], images: Iterable[dict[str, Any]], annotation_spool: IO[str]
) -> None:
    """Write the COCO file one record at a time (atomically), the same text ``json.dumps`` would give."""
    annotation_spool.seek(0)
    with atomic_open(path, "w", encoding="utf-8") as stream:
        stream.write(f'{{"info": {json.dumps(info)}, "images": [')
        for index, record in enumerate(images):
            stream.write((", " if index else "") + json.dumps(record))
        stream.write('], "annotations": [')
        for index, line in enumerate(annotation_spool):
            stream.write((", " if index else "") + line.rstrip("\n"))
        stream.write(f'], "categories": {json.dumps([CATEGORY])}}}')


def write_folds_csv(path: Path, images: Iterable[dict[str, Any]]) -> None:
    """Write ``patientId,fold,target,n_boxes`` for every converted image, atomically."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["patientId", "fold", "target", "n_boxes"])
        for record in images:
            writer.writerow([record["patient_id"], record["fold"], record["target"], record["n_boxes"]])


def _examples(items: list[str]) -> list[str]:
    """Up to ``SUMMARY_EXAMPLES`` of ``items`` as indented lines, then how many more the JSON report has."""
    lines = [f"    {item}" for item in items[:SUMMARY_EXAMPLES]]
    if len(items) > SUMMARY_EXAMPLES:
        lines.append(f"    ... and {len(items) - SUMMARY_EXAMPLES} more in {REPORT_FILE}")
    return lines


def _count_kinds(records: list[dict[str, str]]) -> str:
    return ", ".join(
        f"{kind}: {count}" for kind, count in sorted(Counter(record["kind"] for record in records).items())
    )


def format_report(report: ConversionReport, out_dir: Path) -> str:
    """Human summary of a conversion: counts, then each kind of problem with a few example files.

    The length does not grow with the dataset (at most ``SUMMARY_EXAMPLES`` files per kind), so
    26k files with one systematic problem print a screenful; conversion_report.json has every file.
    """
    files = "DICOMs" if report.source == "dicom" else "images"
    lines = [
        f"converted {report.converted} images ({report.positives} with opacities, {report.boxes} boxes) into {out_dir}",
        f"  COCO: {out_dir / ANNOTATIONS_FILE}   folds: {out_dir / FOLDS_FILE}   report: {out_dir / REPORT_FILE}",
    ]
    if report.source == "picture":
        if report.label_space == "image":
            lines.append(
                "  boxes: the labels are taken to be in each image's own pixels (the default; --label-space WxH says otherwise)"
            )
        else:
            lines.append(
                f"  boxes: the labels are in {report.label_space} pixels (--label-space), scaled to each image's own size"
            )
        if report.metadata is None:
            lines.append(
                "  no --metadata: age, sex and view position are unknown (EDA, score slices and the page say so)"
            )
        else:
            missing = [column for column in TAG_COLUMNS if column not in report.metadata_columns]
            lines.append(
                f"  tags {', '.join(report.metadata_columns)} from {report.metadata}"
                + (f" (no {', '.join(missing)}: unknown)" if missing else "")
            )
    if report.boxes_past_edge:
        hint = ""
        if report.source == "picture" and report.label_space == "image":
            hint = "; are the labels in another pixel space than the images? RSNA's are 1024x1024: give --label-space 1024x1024"
        lines.append(
            f"  {report.boxes_past_edge} label boxes reach past their image's edge (clipped to it, dropped when nothing was left){hint}"
        )
    if report.labelled_without_dicom:
        # Usual when converting a subset, so only counted here; the patientIds are in the JSON report.
        lines.append(
            f"  {report.labelled_without_dicom} labelled patients have no {'DICOM' if report.source == 'dicom' else 'image file'} in this folder "
            f"(fine for a subset; their patientIds are in {REPORT_FILE})"
        )
    if report.unlabelled_files:
        lines.append(f"  skipped {len(report.unlabelled_files)} {files} the labels do not name (truth unknown):")
        lines.extend(_examples(report.unlabelled_files))
    if report.duplicate_files:
        lines.append(
            f"  skipped {len(report.duplicate_files)} {files} whose patientId (file name) was already found in another folder:"
        )
        lines.extend(_examples(report.duplicate_files))
    if report.metadata_problems:
        lines.append(
            f"  {len(report.metadata_problems)} metadata rows not used as given ({_count_kinds(report.metadata_problems)}):"
        )
        for kind in sorted({problem["kind"] for problem in report.metadata_problems}):
            lines.extend(
                _examples(
                    [
                        f"{problem['file']}: {problem['reason']}"
                        for problem in report.metadata_problems
                        if problem["kind"] == kind
                    ]
                )
            )
    if report.dropped_boxes:
        lines.append(f"  dropped {len(report.dropped_boxes)} boxes outside the image:")
        lines.extend(
            _examples(
                [f"{dropped['patientId']} {dropped['box']}: {dropped['reason']}" for dropped in report.dropped_boxes]
            )
        )
    if report.reused:
        lines.append(f"  {report.reused} images were already converted with these settings and kept")
    if report.bad_files:
        lines.append(f"  skipped {len(report.bad_files)} unreadable {files} ({_count_kinds(report.bad_files)}):")
        for kind in sorted({bad["kind"] for bad in report.bad_files}):
            lines.extend(
                _examples([f"{bad['file']}: {bad['reason']}" for bad in report.bad_files if bad["kind"] == kind])
            )
    if report.notes:
        lines.append(f"  converted with notes ({_count_kinds(report.notes)}):")
        for kind in sorted({note["kind"] for note in report.notes}):
            lines.extend(
                _examples([f"{note['file']}: {note['reason']}" for note in report.notes if note["kind"] == kind])
            )
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
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
        source=source,
        metadata=metadata,
        label_space=args.label_space,
        image_size=args.image_size,
        normalization=args.normalize,
        folds=args.folds,
        seed=args.seed,
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
