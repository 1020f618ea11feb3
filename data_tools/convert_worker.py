"""One file of ``lungdet convert``, as a worker process does it: read, write the image (atomically), and say what it was.

The result is typed (:class:`FileResult`), and is also the line the resume journal keeps for the
file (:meth:`FileResult.to_journal`), so that a rerun skips what is done and a killed run resumes.
Also the worker processes' set-up (one OpenCV thread, freed memory kept for the next file).
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from lungdet.atomic import write_bytes_atomic
from lungdet.data_tools.dicom_io import DicomImage, read_dicom
from lungdet.data_tools.dicom_meta import DicomMeta, conversion_notes
from lungdet.data_tools.image_io import XrayImage, read_xray
from lungdet.data_tools.pixels import prepare_pixels
from lungdet.errors import DicomReadError, ImageReadError, LungdetError

IMAGES_DIR = "images"
# What convert may write into IMAGES_DIR (see image_bytes).
IMAGE_EXTENSIONS = (".jpg", ".png")
# Progress of conversions, so that a rerun skips finished files and a killed run can resume.
JOURNAL_FILE = ".convert_journal.jsonl"
# Bumped when journal entries gain a field: entries of an older run lack it and are converted again.
JOURNAL_VERSION = 4
# Chest radiographs are about 1000-4000 pixels a side; outside these bounds an image is probably a
# thumbnail or a localiser (tiny) or a stitched or oversampled scan (huge). Converted, but noted.
TINY_IMAGE_SIDE = 256
HUGE_IMAGE_SIDE = 4096
# No patient is older than this; a larger PatientAge is a typing error.
MAX_PLAUSIBLE_AGE = 120


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


class ConvertTask(NamedTuple):
    """One file to convert, as a worker process receives it (small and picklable)."""

    path: str
    signature: list[int]  # file_signature(path) when the task was made
    out_dir: str
    image_size: int | None
    normalization: str
    source: str  # 'dicom' or 'picture'


@dataclass(frozen=True, slots=True)
class ConvertedImage:
    """The COCO image record's fields that converting one file gives, in the record's key order.

    ``width``/``height`` are the written image's pixels, ``original_width``/``original_height`` the
    source's (the labels' pixel space unless ``--label-space`` says otherwise). A PNG/JPEG's tags
    are empty here; the metadata CSV fills them at assembly.
    """

    patient_id: str
    file_name: str  # relative to the output folder: images/{patientId}.jpg or .png
    width: int
    height: int
    original_width: int
    original_height: int
    age: int | None
    sex: str
    view_position: str
    pixel_spacing: list[float] | None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a file could not be converted: ``reason`` for the user, ``kind`` for the report's counts."""

    reason: str
    kind: str


@dataclass(frozen=True, slots=True)
class FileResult:
    """What converting one file gave: its image and notes on odd inputs, or the refusal. Also its journal line.

    Boxes are not in it: they come from the labels when the dataset is assembled, so a changed
    labels file never needs the images converted again; the notes are in it, so a rerun that keeps
    the image still reports them.
    """

    file: str
    signature: list[int]
    image: ConvertedImage | None = None
    notes: list[dict[str, str]] = field(default_factory=list)
    refusal: Refusal | None = None

    def to_journal(self) -> dict[str, Any]:
        """The journal's JSON object for this file (``image`` and ``notes``, or ``bad``), keys in the order the journal has always had."""
        if self.refusal is not None:
            return {"file": self.file, "signature": self.signature, "bad": asdict(self.refusal)}
        return {"file": self.file, "signature": self.signature, "image": asdict(self.image), "notes": self.notes}

    @classmethod
    def from_journal(cls, entry: dict[str, Any]) -> FileResult:
        """The result a journal line records (the inverse of :meth:`to_journal`).

        A malformed entry raises ``KeyError`` or ``TypeError``.
        """
        if "bad" in entry:
            return cls(entry["file"], entry["signature"], refusal=Refusal(**entry["bad"]))
        return cls(entry["file"], entry["signature"], image=ConvertedImage(**entry["image"]), notes=entry["notes"])


def convert_file(task: ConvertTask) -> FileResult:
    """Worker: read one DICOM (or PNG/JPEG, by the task's source) and write its image (atomically)."""
    path, signature, out_dir, image_size, normalization, source = task
    if source == "picture":
        return _convert_picture(path, signature, out_dir, image_size=image_size, normalization=normalization)
    try:
        image = read_dicom(Path(path))
    except DicomReadError as error:
        return FileResult(path, signature, refusal=Refusal(error.reason, error.kind))
    extension, data = image_bytes(image, image_size=image_size, normalization=normalization)
    file_name = _write_image(out_dir, image.meta.patient_id, extension, data)
    height, width = (image_size, image_size) if image_size is not None else image.pixels.shape
    meta = image.meta
    converted = ConvertedImage(
        patient_id=meta.patient_id,
        file_name=file_name,
        width=width,
        height=height,
        original_width=meta.columns,
        original_height=meta.rows,
        age=meta.age,
        sex=meta.sex,
        view_position=meta.view_position,
        pixel_spacing=list(meta.pixel_spacing) if meta.pixel_spacing else None,
    )
    return FileResult(path, signature, image=converted, notes=input_notes(meta))


def _convert_picture(
    path: str, signature: list[int], out_dir: str, *, image_size: int | None, normalization: str
) -> FileResult:
    """:func:`convert_file` for a PNG or JPEG; the patientId is the file stem, the tags are filled at assembly."""
    try:
        data = Path(path).read_bytes()
        image = read_xray(data, name=path)
        # Content decides, but a DICOM in an image folder would carry tags the records would then lack.
        if image.format == "dicom":
            raise ImageReadError(
                path, "is a DICOM file with a picture's name; convert DICOMs with --dicom-dir", kind="not_an_image"
            )
    except ImageReadError as error:
        return FileResult(path, signature, refusal=Refusal(error.reason, error.kind))
    except OSError as error:
        return FileResult(
            path, signature, refusal=Refusal(f"cannot be read ({error.strerror or error}); check the file", "missing")
        )
    patient_id = Path(path).stem
    extension, encoded = picture_bytes(image, data, image_size=image_size, normalization=normalization)
    file_name = _write_image(out_dir, patient_id, extension, encoded)
    height, width = (image_size, image_size) if image_size is not None else image.pixels.shape
    converted = ConvertedImage(
        patient_id=patient_id,
        file_name=file_name,
        width=width,
        height=height,
        original_width=image.width,
        original_height=image.height,
        age=None,
        sex="",
        view_position="",
        pixel_spacing=None,
    )
    notes = [dict(note) for note in image.notes] + size_notes(rows=image.height, columns=image.width)
    return FileResult(path, signature, image=converted, notes=notes)


def init_worker() -> None:
    """The set-up of each worker process."""
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


def load_journal(path: Path, settings: dict[str, Any]) -> dict[str, FileResult]:
    """Results of an earlier (possibly killed) run with the same settings, keyed by file; ``{}`` otherwise.

    The journal is JSON lines: a settings header, then one line per finished file, appended only
    after that file's image is in place. A kill can cut the last line short; it is ignored.
    """
    if not path.is_file():
        return {}
    entries: dict[str, FileResult] = {}
    with open(path, encoding="utf-8") as stream:
        lines = stream.read().splitlines()
    try:
        if not lines or json.loads(lines[0]) != {"settings": settings}:
            return {}
    except json.JSONDecodeError:
        return {}
    for line in lines[1:]:
        try:
            entry = FileResult.from_journal(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # the line being written when a run was killed
        entries[entry.file] = entry
    return entries


def ends_with_newline(path: Path) -> bool:
    """Whether the journal's last line is whole (a killed run can leave it cut short)."""
    with open(path, "rb") as stream:
        stream.seek(0, os.SEEK_END)
        if stream.tell() == 0:
            return True
        stream.seek(-1, os.SEEK_END)
        return stream.read(1) == b"\n"


def still_valid(entry: FileResult | None, path: Path, out_dir: Path) -> bool:
    """Whether an earlier run's result for ``path`` stands: the same file, and its image still there (a refusal stands as it is)."""
    if entry is None or entry.signature != file_signature(path):
        return False
    return entry.image is None or (out_dir / entry.image.file_name).is_file()
