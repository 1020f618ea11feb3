"""The one place lungdet reads DICOM files.

``read_dicom`` gives the pixels as a 2-D uint8 array ready for a detector plus the metadata the
RSNA work needs; ``read_dicom_metadata`` reads the tags only (no pixel decoding), for when the
pixels are not needed. Real RSNA files are 8-bit grey JPEG Baseline: those are decoded by
OpenCV's libjpeg-turbo (see :func:`decode_grey_jpeg`), about four times faster than pylibjpeg,
and everything else by pydicom.

Every failure is a :class:`~data_tools.errors.DicomReadError` naming the file and the reason, so
a caller converting thousands of files can skip one bad file and list it at the end.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID, JPEGBaseline8Bit

from data_tools.errors import DicomReadError, LungdetError

# Length field of an element whose end is marked by a delimiter instead (sequences, compressed pixel data).
_UNDEFINED_LENGTH = 0xFFFFFFFF
# DICOM age strings are 'nnnY', 'nnnM', 'nnnW' or 'nnnD'; RSNA files store a plain integer ('51').
_AGE_PATTERN = re.compile(r"^\s*(\d{1,3})\s*([YMWD]?)\s*$", re.IGNORECASE)
_UNITS_PER_YEAR = {"": 1.0, "Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}


@dataclass(frozen=True)
class DicomMeta:
    """Metadata of one DICOM file. Strings are '' and numbers None when a tag is absent.

    ``patient_id`` is the file stem, which is how RSNA labels and submissions name an image;
    ``patient_id_tag`` is the PatientID tag as stored (equal to the stem in RSNA files).
    ``pixel_spacing`` is (row spacing, column spacing) in mm. ``bits_stored``, ``samples_per_pixel``
    and ``number_of_frames`` default to what the reader assumes when the tag is absent (8 bits, one
    channel, one frame); ``transfer_syntax`` is the UID from the file meta ('' if absent).
    """

    path: Path
    patient_id: str
    patient_id_tag: str
    age: int | None
    sex: str
    view_position: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None
    modality: str
    photometric_interpretation: str
    bits_stored: int = 8
    samples_per_pixel: int = 1
    number_of_frames: int = 1
    transfer_syntax: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (path as a string, spacing as a list)."""
        record = asdict(self)
        record["path"] = str(self.path)
        record["pixel_spacing"] = list(self.pixel_spacing) if self.pixel_spacing else None
        return record


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


def parse_age(value: object) -> int | None:
    """Patient age in whole years from '51', '051Y', '006M', '010W' or '003D'; None if absent or unreadable."""
    if value is None:
        return None
    match = _AGE_PATTERN.match(str(value))
    if match is None:
        return None
    number, unit = int(match.group(1)), match.group(2).upper()
    return int(number / _UNITS_PER_YEAR[unit])


def find_dicoms(folder: Path) -> list[Path]:
    """All ``*.dcm`` files under ``folder`` (recursive), sorted so that every run sees the same order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LungdetError(f"{folder}: not a folder; pass the folder that holds the .dcm files (e.g. stage_2_train_images/)")
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


def _open_dataset(path: Path, *, stop_before_pixels: bool) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise DicomReadError(path, "file not found", kind="missing")
    if path.stat().st_size == 0:
        raise DicomReadError(path, "file is empty (0 bytes); copy or download it again", kind="empty")
    try:
        with warnings.catch_warnings():
            # On a file that ends early pydicom only warns and returns a dataset with *no* elements,
            # which would later read as "no Rows/Columns"; make it an error while the cause is known.
            warnings.filterwarnings("error", message="(End of file reached|Unexpected end of file)", category=UserWarning)
            dataset = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise DicomReadError(path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble); remove it from the folder", kind="not_dicom") from None
    except UserWarning as warning:
        raise DicomReadError(path, f"file is truncated ({str(warning).split(' in file ')[0]}); copy or download it again", kind="truncated") from None
    except Exception as error:  # pydicom raises many types on damaged files; all mean the same to the user
        raise DicomReadError(path, f"cannot be parsed ({type(error).__name__}: {error}); the file is probably truncated or damaged, copy it again", kind="damaged") from None
    cut_element = find_cut_element(dataset)
    if cut_element is not None:
        raise DicomReadError(path, f"file is truncated ({cut_element}); copy or download it again", kind="truncated")
    return dataset


def _numeric_tag(path: Path, dataset: Dataset, keyword: str, convert: Callable[[Any], Any], default: Any) -> Any:
    """``convert(value)`` of a number tag, ``default`` when it is absent or empty; a malformed value is a DicomReadError."""
    try:
        value = dataset.get(keyword)
        return convert(value) if value else default
    except Exception as error:  # pydicom parses values when first read, so a malformed DS/IS string fails here
        raise DicomReadError(path, f"tag {keyword} has an unreadable value ({type(error).__name__}: {error}); fix the tag or remove the file", kind="bad_tag") from None


def _spacing_pair(value: Any) -> tuple[float, float] | None:
    return (float(value[0]), float(value[1])) if isinstance(value, pydicom.multival.MultiValue) and len(value) == 2 else None


def _metadata_from_dataset(path: Path, dataset: Dataset) -> DicomMeta:
    if "Rows" not in dataset or "Columns" not in dataset:
        raise DicomReadError(path, "has no Rows/Columns tags, so it is not an image; remove it from the folder", kind="not_image")
    pixel_spacing = _numeric_tag(path, dataset, "PixelSpacing", _spacing_pair, None) or _numeric_tag(path, dataset, "ImagerPixelSpacing", _spacing_pair, None)
    return DicomMeta(
        path=Path(path),
        patient_id=Path(path).stem,
        patient_id_tag=str(dataset.get("PatientID", "") or ""),
        age=parse_age(dataset.get("PatientAge")),
        sex=str(dataset.get("PatientSex", "") or ""),
        view_position=str(dataset.get("ViewPosition", "") or ""),
        rows=int(dataset.Rows),
        columns=int(dataset.Columns),
        pixel_spacing=pixel_spacing,
        modality=str(dataset.get("Modality", "") or ""),
        photometric_interpretation=str(dataset.get("PhotometricInterpretation", "") or ""),
        bits_stored=_numeric_tag(path, dataset, "BitsStored", int, 8),
        samples_per_pixel=_numeric_tag(path, dataset, "SamplesPerPixel", int, 1),
        number_of_frames=_numeric_tag(path, dataset, "NumberOfFrames", int, 1),
        transfer_syntax=str((getattr(dataset, "file_meta", None) or {}).get("TransferSyntaxUID", "") or ""),
    )


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
    return _metadata_from_dataset(Path(path), dataset)


def window_to_uint8(values: np.ndarray, *, lower: float, upper: float) -> np.ndarray:
    """Map ``values`` linearly from ``[lower, upper]`` to ``[0, 255]`` (clipped) as uint8."""
    if upper <= lower:
        # A window of width 1 is a threshold (and a constant image has nothing to stretch).
        return np.where(values > lower, 255, 0).astype(np.uint8)
    scaled = (values.astype(np.float64) - lower) * (255.0 / (upper - lower))
    return np.rint(scaled.clip(0, 255)).astype(np.uint8)


def pixels_to_uint8(pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Turn stored pixel values into 8-bit display values, bright = dense.

    8-bit data passes through unchanged (so real RSNA pixels are untouched). Deeper data gets
    RescaleSlope/Intercept, then the first Window Center/Width if present, else its own min..max.
    MONOCHROME1 (bright = air) is inverted last, so every image reaches the model the same way up.
    """
    bits_stored = int(dataset.get("BitsStored", 8) or 8)
    if pixels.dtype == np.uint8 and bits_stored <= 8:
        display = pixels
    else:
        values = pixels.astype(np.float64)
        slope = float(dataset.get("RescaleSlope", 1) or 1)
        intercept = float(dataset.get("RescaleIntercept", 0) or 0)
        values = values * slope + intercept
        center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
        if center is not None and width is not None:
            # Multi-valued windows list alternatives; the first is the modality's preferred one.
            center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
            width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
            # DICOM PS3.3 C.11.2.1.2: the linear window maps c - 0.5 -/+ (w - 1) / 2 to the output's ends.
            display = window_to_uint8(values, lower=center - 0.5 - (width - 1) / 2, upper=center - 0.5 + (width - 1) / 2)
        else:
            display = window_to_uint8(values, lower=float(values.min()), upper=float(values.max()))
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        display = 255 - display
    return np.ascontiguousarray(display, dtype=np.uint8)


def grey_jpeg_baseline_stream(dataset: Dataset, meta: DicomMeta) -> bytes | None:
    """The complete JPEG stream of an 8-bit grey single-frame JPEG Baseline DICOM, or None for any other file.

    None too when the stream is incomplete (no End Of Image marker, as in a file cut short), so
    that pydicom's decoder gets the file and reports what is wrong with it.
    """
    if (
        meta.transfer_syntax != JPEGBaseline8Bit
        or meta.samples_per_pixel != 1
        or meta.bits_stored != 8
        or meta.number_of_frames != 1
        or meta.photometric_interpretation.upper() not in ("MONOCHROME1", "MONOCHROME2")
    ):
        return None
    try:
        stream = next(generate_frames(dataset.PixelData, number_of_frames=1))
    except Exception:  # damaged encapsulation: pydicom's decode reports it properly
        return None
    # Fragments are padded to an even length with a zero byte, which is not part of the stream.
    stream = stream.rstrip(b"\x00")
    return stream if stream.startswith(b"\xff\xd8") and stream.endswith(b"\xff\xd9") else None


def decode_grey_jpeg(stream: bytes, shape: tuple[int, int]) -> np.ndarray | None:
    """A :func:`grey_jpeg_baseline_stream` decoded by libjpeg-turbo, or None (decode failed, or not ``shape``) to leave it to pydicom.

    The real RSNA files are all of this kind, and pylibjpeg (pydicom's decoder for it) takes
    about 11 ms per 1024² image where libjpeg-turbo takes about 2.5 ms. The two IDCTs round
    differently, so about 3% of pixels differ by one grey level; libjpeg-turbo is also what
    Pillow uses.
    """
    # libjpeg-turbo would only warn about a damaged stream and fill the rest grey; the End Of
    # Image check of grey_jpeg_baseline_stream catches the common case, a file cut short.
    pixels = cv2.imdecode(np.frombuffer(stream, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    return pixels if pixels is not None and pixels.shape == shape else None


def read_dicom(path: Path) -> DicomImage:
    """Read one DICOM: pixels as uint8 ``[rows, columns]`` (see :func:`pixels_to_uint8`) and metadata.

    Raises
    ------
    DicomReadError
        The file is missing, empty, not DICOM, damaged, has no pixel data, uses a compression no
        installed decoder supports, cannot be decoded, or is not a single-frame image.
    """
    path = Path(path)
    dataset = _open_dataset(path, stop_before_pixels=False)
    meta = _metadata_from_dataset(path, dataset)
    if "PixelData" not in dataset:
        raise DicomReadError(path, "has no pixel data (7FE0,0010), so there is no image to read; remove it from the folder", kind="no_pixels")
    if meta.number_of_frames > 1:
        raise DicomReadError(
            path, f"is multi-frame ({meta.number_of_frames} frames); a chest radiograph has one frame, remove it or split it first", kind="multi_frame"
        )
    missing_decoder = find_missing_decoder(meta.transfer_syntax)
    if missing_decoder is not None:
        raise DicomReadError(path, missing_decoder, kind="unsupported_compression")
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
        raise DicomReadError(path, f"pixel array is {pixels.shape} but Rows/Columns say {(meta.rows, meta.columns)}; the file is inconsistent", kind="bad_shape")
    try:
        display = pixels_to_uint8(pixels, dataset)
    except Exception as error:  # a malformed Rescale or Window value (DS strings) only fails when it is read here
        raise DicomReadError(
            path, f"pixels cannot be mapped to 8 bits ({type(error).__name__}: {error}); check Rescale Slope/Intercept and Window Center/Width", kind="bad_tag"
        ) from None
    # pixels_to_uint8 leaves 8-bit MONOCHROME2 untouched, so the stream still decodes to display.
    keeps_stream = stream is not None and meta.photometric_interpretation.upper() == "MONOCHROME2"
    return DicomImage(pixels=display, meta=meta, source_jpeg=stream if keeps_stream else None)
