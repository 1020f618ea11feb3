"""The one place lungdet reads DICOM files.

``read_dicom`` gives the pixels as a 2-D uint8 array ready for a detector plus the metadata the
RSNA work needs (:mod:`~lungdet.data_tools.dicom_meta`); ``read_dicom_metadata`` reads the tags
only (no pixel decoding), for when the pixels are not needed. Real RSNA files are 8-bit grey JPEG
Baseline: those are decoded by OpenCV's libjpeg-turbo, about four times faster than pylibjpeg,
and everything else by pydicom. Compressed frames are checked before any decoding (the size they
declare, a frame cut short) by :mod:`~lungdet.data_tools.dicom_frames`, which also holds that
fast path.

Every failure is a :class:`~lungdet.errors.DicomReadError` naming the file and the reason, so
a caller converting thousands of files can skip one bad file and list it at the end.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from lungdet.data_tools.dicom_frames import (
    check_complete_frame,
    check_declared_size,
    decode_grey_jpeg,
    grey_jpeg_baseline_stream,
)
from lungdet.data_tools.dicom_meta import DicomMeta, metadata_from_dataset
from lungdet.errors import DicomReadError, LungdetError

# Length field of an element whose end is marked by a delimiter instead (sequences, compressed pixel data).
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class DicomImage:
    """A decoded DICOM: ``pixels`` is uint8 ``[rows, columns]``, bright = dense (MONOCHROME2 sense).

    ``source_jpeg`` is the file's own JPEG stream when decoding it gives exactly ``pixels`` (8-bit
    grey MONOCHROME2 JPEG Baseline, like every RSNA file), else None: ``convert`` can then keep
    that stream as the image file instead of encoding the pixels again.
    """

    pixels: np.ndarray
    meta: DicomMeta
    source_jpeg: bytes | None = None


def find_dicoms(folder: Path) -> list[Path]:
    """All ``*.dcm`` files under ``folder`` (recursive), sorted so that every run sees the same order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LungdetError(
            f"{folder}: not a folder; pass the folder that holds the .dcm files (e.g. stage_2_train_images/)"
        )
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() == ".dcm" and path.is_file())


def find_cut_element(dataset: Dataset) -> str | None:
    """Describe the element the file ends inside (its value shorter than its declared length), or None.

    pydicom reads a value cut short by the end of the file without a word, so a truncated file
    would otherwise show up later as missing tags, odd values or undecodable pixels.
    """
    for group in (getattr(dataset, "file_meta", None) or Dataset(), dataset):
        for tag in group.keys():
            # get_item gives the element as read (raw, not yet converted), so this costs no parsing.
            element = group.get_item(tag, keep_deferred=True)
            if not isinstance(element, RawDataElement) or element.value is None or element.length == _UNDEFINED_LENGTH:
                continue
            if len(element.value) < element.length:
                return f"the file ends inside element {element.tag}, after {len(element.value)} of its {element.length} bytes"
    return None


def _open_dataset(path: Path, *, stop_before_pixels: bool, data: bytes | None = None) -> Dataset:
    """Parse a DICOM from the file at ``path``, or from ``data`` when given (``path`` then only names it in messages)."""
    path = Path(path)
    if data is None:
        if not path.is_file():
            raise DicomReadError(path, "file not found", kind="missing")
        size = path.stat().st_size
    else:
        size = len(data)
    if size == 0:
        raise DicomReadError(path, "file is empty (0 bytes); copy or download it again", kind="empty")
    try:
        with warnings.catch_warnings():
            # On a file that ends early pydicom only warns and returns a dataset with *no* elements,
            # which would later read as "no Rows/Columns"; make it an error while the cause is known.
            warnings.filterwarnings(
                "error", message="(End of file reached|Unexpected end of file)", category=UserWarning
            )
            dataset = pydicom.dcmread(path if data is None else io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise DicomReadError(
            path,
            "not a DICOM file (no 'DICM' marker after the 128-byte preamble); remove it from the folder",
            kind="not_dicom",
        ) from None
    except UserWarning as warning:
        raise DicomReadError(
            path,
            f"file is truncated ({str(warning).split(' in file ')[0]}); copy or download it again",
            kind="truncated",
        ) from None
    except Exception as error:  # pydicom raises many types on damaged files; all mean the same to the user
        raise DicomReadError(
            path,
            f"cannot be parsed ({type(error).__name__}: {error}); the file is probably truncated or damaged, copy it again",
            kind="damaged",
        ) from None
    cut_element = find_cut_element(dataset)
    if cut_element is not None:
        raise DicomReadError(path, f"file is truncated ({cut_element}); copy or download it again", kind="truncated")
    return dataset


def find_missing_decoder(transfer_syntax: str) -> str | None:
    """Why pixels in ``transfer_syntax`` cannot be decoded in this environment, or None if they can.

    Checked before decoding so that "install a plugin" is told apart from "the file is damaged".
    An empty syntax (no file meta) is left to the decoder, which guesses the encoding.
    """
    if not transfer_syntax:
        return None
    name = UID(transfer_syntax).name
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        return (
            f"pixel data uses transfer syntax {name}, which no pydicom decoder supports (a private or retired compression); "
            "export the image again as uncompressed or JPEG Baseline"
        )
    if not decoder.is_available:
        return (
            f"pixel data is {name} and no decoder for it is installed ({'; '.join(decoder.missing_dependencies)}); "
            "install one of those plugins and convert again"
        )
    return None


def read_dicom_metadata(path: Path) -> DicomMeta:
    """Read the metadata of one DICOM without decoding its pixels.

    Raises
    ------
    DicomReadError
        The file is missing, empty, not DICOM, damaged, or not an image.
    """
    dataset = _open_dataset(path, stop_before_pixels=True)
    return metadata_from_dataset(Path(path), dataset)


def window_to_uint8(values: np.ndarray, *, lower: float, upper: float) -> np.ndarray:
    """Map ``values`` linearly from ``[lower, upper]`` to ``[0, 255]`` (clipped) as uint8."""
    if upper <= lower:
        # A window of width 1 is a threshold (and a constant image has nothing to stretch).
        return np.where(values > lower, 255, 0).astype(np.uint8)
    scaled = (values.astype(np.float64) - lower) * (255.0 / (upper - lower))
    return np.rint(scaled.clip(0, 255)).astype(np.uint8)


@dataclass(frozen=True)
class DisplayWindow:
    """How lungdet maps stored pixel values to its 8 bits: ``value * slope + intercept``, then ``[lower, upper]`` -> ``[0, 255]``.

    The same mapping goes into the presentation states lungdet writes, so a viewer shows the X-ray
    as lungdet saw it. ``center``/``width`` are that window in DICOM's linear form (PS3.3 C.11.2.1.2).
    """

    slope: float
    intercept: float
    lower: float
    upper: float

    @property
    def center(self) -> float:
        """The window centre (DICOM Window Center) in stored pixel values after rescale."""
        return (self.lower + self.upper + 1) / 2

    @property
    def width(self) -> float:
        """The window width (DICOM Window Width) in stored pixel values after rescale."""
        return self.upper - self.lower + 1


def _first_value(value: Any) -> float:
    # Multi-valued windows list alternatives; the first is the modality's preferred one.
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)


def display_window(pixels: np.ndarray, dataset: Dataset) -> DisplayWindow:
    """The mapping :func:`pixels_to_uint8` applies to ``pixels`` (stored values) of ``dataset``.

    8-bit data passes through unchanged (so real RSNA pixels are untouched). Deeper data gets
    RescaleSlope/Intercept, then the first Window Center/Width if present, else its own min..max.
    """
    bits_stored = int(dataset.get("BitsStored", 8) or 8)
    if pixels.dtype == np.uint8 and bits_stored <= 8:
        return DisplayWindow(slope=1.0, intercept=0.0, lower=0.0, upper=255.0)
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is not None and width is not None:
        # DICOM PS3.3 C.11.2.1.2: the linear window maps c - 0.5 -/+ (w - 1) / 2 to the output's ends.
        center, width = _first_value(center), _first_value(width)
        return DisplayWindow(
            slope, intercept, lower=center - 0.5 - (width - 1) / 2, upper=center - 0.5 + (width - 1) / 2
        )
    values = pixels.astype(np.float64) * slope + intercept
    return DisplayWindow(slope, intercept, lower=float(values.min()), upper=float(values.max()))


def pixels_to_uint8(pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Turn stored pixel values into 8-bit display values, bright = dense, by :func:`display_window`.

    MONOCHROME1 (bright = air) is inverted last, so every image reaches the model the same way up.
    """
    window = display_window(pixels, dataset)
    if pixels.dtype == np.uint8 and (window.lower, window.upper, window.slope, window.intercept) == (
        0.0,
        255.0,
        1.0,
        0.0,
    ):
        display = pixels  # the identity, without a float copy of every pixel
    else:
        display = window_to_uint8(
            pixels.astype(np.float64) * window.slope + window.intercept, lower=window.lower, upper=window.upper
        )
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        display = 255 - display
    return np.ascontiguousarray(display, dtype=np.uint8)


def read_dataset(path: Path, *, headers_only: bool = False) -> Dataset:
    """One DICOM file as pydicom's Dataset, for what references or re-encodes it (a report's source, a result to send).

    ``headers_only`` stops before the pixel data (the tags only); otherwise the whole file, its
    pixel data as stored (not decoded). Raises :class:`DicomReadError` for a file that is missing,
    empty, not DICOM, truncated or damaged, as :func:`read_dicom` does.
    """
    return _open_dataset(Path(path), stop_before_pixels=headers_only)


def read_dataset_bytes(data: bytes, *, name: str, untrusted: bool = False) -> Dataset:
    """:func:`read_dataset` for a DICOM held in memory (a C-STORE instance, an upload); ``name`` stands for the file in messages.

    ``untrusted`` refuses a Deflated file before parsing it: pydicom inflates the whole dataset in
    memory before any tag can be checked, so a small upload could inflate to gigabytes.
    """
    path = Path(name)
    if untrusted and _file_meta_transfer_syntax(data) == DeflatedExplicitVRLittleEndian:
        raise DicomReadError(
            path,
            f"uses transfer syntax {DeflatedExplicitVRLittleEndian.name}, which is refused here: it inflates in memory before its size "
            "can be checked; export the image uncompressed or as JPEG Baseline",
            kind="unsupported_compression",
        )
    return _open_dataset(path, stop_before_pixels=False, data=data)


def dicom_bytes(dataset: Dataset) -> bytes:
    """A Dataset encoded as a DICOM file (preamble and file meta included): what is stored, sent or checked again."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_dicom(path: Path, *, max_pixels: int | None = None) -> DicomImage:
    """Read one DICOM: pixels as uint8 ``[rows, columns]`` (see :func:`pixels_to_uint8`) and metadata.

    With ``max_pixels``, an image declaring more pixels (in its tags or its compressed frame) is
    refused before decoding (see :func:`~lungdet.data_tools.dicom_frames.check_declared_size`).

    Raises
    ------
    DicomReadError
        The file is missing, empty, not DICOM, damaged, has no pixel data, uses a compression no
        installed decoder supports, cannot be decoded, is not a single-frame image, or is over ``max_pixels``.
    """
    path = Path(path)
    return image_from_dataset(_open_dataset(path, stop_before_pixels=False), name=path, max_pixels=max_pixels)


def read_dicom_bytes(data: bytes, *, name: str, max_pixels: int | None = None) -> DicomImage:
    """:func:`read_dicom` for a DICOM held in memory (an upload); ``name`` stands for the file in messages and in ``meta.path``.

    With ``max_pixels`` (untrusted input), a Deflated file is refused too: pydicom inflates the
    whole dataset in memory before any tag can be checked, so a small upload could inflate to gigabytes.
    """
    dataset = read_dataset_bytes(data, name=name, untrusted=max_pixels is not None)
    return image_from_dataset(dataset, name=name, max_pixels=max_pixels)


def _file_meta_transfer_syntax(data: bytes) -> str:
    """The Transfer Syntax UID of a DICOM's file meta group, read without parsing the dataset ('' if unreadable)."""
    stream = io.BytesIO(data)
    try:
        read_preamble(stream, False)
        # pydicom has no public reader of the file meta from a stream; this is what dcmread uses.
        return str(_read_file_meta_info(stream).get("TransferSyntaxUID", "") or "")
    except Exception:  # not DICOM or damaged: the full parse reports it properly
        return ""


def image_from_dataset(dataset: Dataset, *, name: str | Path, max_pixels: int | None = None) -> DicomImage:
    """The image of a Dataset already parsed (by :func:`read_dataset_bytes`), so that nothing parses an instance twice.

    ``name`` stands for the file in messages and in ``meta.path``; ``max_pixels`` as in :func:`read_dicom`.
    """
    path = Path(name)
    meta = metadata_from_dataset(path, dataset)
    if "PixelData" not in dataset:
        raise DicomReadError(
            path,
            "has no pixel data (7FE0,0010), so there is no image to read; remove it from the folder",
            kind="no_pixels",
        )
    if meta.number_of_frames > 1:
        raise DicomReadError(
            path,
            f"is multi-frame ({meta.number_of_frames} frames); a chest radiograph has one frame, remove it or split it first",
            kind="multi_frame",
        )
    missing_decoder = find_missing_decoder(meta.transfer_syntax)
    if missing_decoder is not None:
        raise DicomReadError(path, missing_decoder, kind="unsupported_compression")
    if max_pixels is not None:
        check_declared_size(path, dataset, meta, max_pixels=max_pixels)
    check_complete_frame(path, dataset, meta)
    stream = grey_jpeg_baseline_stream(dataset, meta)
    pixels = decode_grey_jpeg(stream, (meta.rows, meta.columns)) if stream is not None else None
    if pixels is None:
        stream = None  # not decodable by the fast path: pydicom decodes it, and the stream is not kept
    try:
        if pixels is None:
            pixels = dataset.pixel_array
    except Exception as error:  # decoder plugins raise their own types; the user needs the reason and the syntax
        syntax_name = UID(meta.transfer_syntax).name if meta.transfer_syntax else "unknown"
        # Plugin messages can span lines; one line per file keeps the summary and the report readable.
        detail = " ".join(str(error).split())
        raise DicomReadError(
            path,
            f"pixel data cannot be decoded (transfer syntax {syntax_name}: {type(error).__name__}: {detail}); "
            "the file may be truncated, or needs a decoder plugin that is not installed",
            kind="undecodable",
        ) from None
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        # Colour X-rays exist (secondary captures); the detector wants one channel, so use luma.
        pixels = np.rint(pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(pixels.dtype)
    if pixels.ndim != 2:
        raise DicomReadError(path, f"pixel array has shape {pixels.shape}; expected a 2-D grey image", kind="bad_shape")
    if pixels.shape != (meta.rows, meta.columns):
        raise DicomReadError(
            path,
            f"pixel array is {pixels.shape} but Rows/Columns say {(meta.rows, meta.columns)}; the file is inconsistent",
            kind="bad_shape",
        )
    try:
        display = pixels_to_uint8(pixels, dataset)
    except Exception as error:  # a malformed Rescale or Window value (DS strings) only fails when it is read here
        raise DicomReadError(
            path,
            f"pixels cannot be mapped to 8 bits ({type(error).__name__}: {error}); check Rescale Slope/Intercept and Window Center/Width",
            kind="bad_tag",
        ) from None
    # pixels_to_uint8 leaves 8-bit MONOCHROME2 untouched, so the stream still decodes to display.
    keeps_stream = stream is not None and meta.photometric_interpretation.upper() == "MONOCHROME2"
    return DicomImage(pixels=display, meta=meta, source_jpeg=stream if keeps_stream else None)
