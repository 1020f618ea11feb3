"""The metadata of a parsed DICOM: the tags the RSNA work needs, as a typed :class:`DicomMeta`.

:func:`metadata_from_dataset` reads them from a pydicom Dataset that
:mod:`lungdet.data_tools.dicom_io` (the one reader) has parsed; :func:`parse_age` reads DICOM's
and RSNA's age strings; :func:`conversion_notes` says what the reader will do to a file's pixels
beyond decoding. Nothing here opens a file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from lungdet.errors import DicomReadError

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
    channel, one frame); ``transfer_syntax`` is the UID from the file meta ('' if absent);
    ``body_part_examined`` is the BodyPartExamined tag as stored ('' if absent).
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
    body_part_examined: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (path as a string, spacing as a list)."""
        record = asdict(self)
        record["path"] = str(self.path)
        record["pixel_spacing"] = list(self.pixel_spacing) if self.pixel_spacing else None
        return record


def parse_age(value: object) -> int | None:
    """Patient age in whole years from '51', '051Y', '006M', '010W' or '003D'; None if absent or unreadable."""
    if value is None:
        return None
    match = _AGE_PATTERN.match(str(value))
    if match is None:
        return None
    number, unit = int(match.group(1)), match.group(2).upper()
    return int(number / _UNITS_PER_YEAR[unit])


def _numeric_tag(path: Path, dataset: Dataset, keyword: str, convert: Callable[[Any], Any], default: Any) -> Any:
    """``convert(value)`` of a number tag, ``default`` when it is absent or empty; a malformed value is a DicomReadError."""
    try:
        value = dataset.get(keyword)
        return convert(value) if value else default
    except Exception as error:  # pydicom parses values when first read, so a malformed DS/IS string fails here
        raise DicomReadError(
            path,
            f"tag {keyword} has an unreadable value ({type(error).__name__}: {error}); fix the tag or remove the file",
            kind="bad_tag",
        ) from None


def _spacing_pair(value: Any) -> tuple[float, float] | None:
    return (
        (float(value[0]), float(value[1]))
        if isinstance(value, pydicom.multival.MultiValue) and len(value) == 2
        else None
    )


def metadata_from_dataset(path: Path, dataset: Dataset) -> DicomMeta:
    """The :class:`DicomMeta` of ``dataset``, parsed from the file at ``path`` (which names it in messages).

    Raises
    ------
    DicomReadError
        The dataset has no Rows/Columns (not an image), or a number tag has a malformed value.
    """
    if "Rows" not in dataset or "Columns" not in dataset:
        raise DicomReadError(
            path, "has no Rows/Columns tags, so it is not an image; remove it from the folder", kind="not_image"
        )
    pixel_spacing = _numeric_tag(path, dataset, "PixelSpacing", _spacing_pair, None) or _numeric_tag(
        path, dataset, "ImagerPixelSpacing", _spacing_pair, None
    )
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
        body_part_examined=str(dataset.get("BodyPartExamined", "") or ""),
    )


def conversion_notes(meta: DicomMeta) -> list[dict[str, str]]:
    """What :func:`read_dicom` does to this file's pixels beyond decoding: ``[{"kind", "reason"}, ...]``, [] for plain 8-bit grey.

    Colour becomes grey (luma), MONOCHROME1 is inverted, deeper pixels are windowed to 8 bits.
    ``convert`` reports these per file and ``lungdet serve`` returns them with each image.
    """
    notes = []
    if meta.samples_per_pixel == 3:
        notes.append(
            {
                "kind": "rgb_converted",
                "reason": f"colour image ({meta.photometric_interpretation}) converted to grey (luma)",
            }
        )
    if meta.photometric_interpretation.upper() == "MONOCHROME1":
        notes.append(
            {"kind": "monochrome1_inverted", "reason": "MONOCHROME1 (bright = air) inverted so that bright = dense"}
        )
    if meta.bits_stored > 8:
        notes.append(
            {
                "kind": "high_bit_depth_rescaled",
                "reason": f"{meta.bits_stored}-bit pixels mapped to 8 bits (Window Center/Width if present, else the image's own min..max)",
            }
        )
    return notes
