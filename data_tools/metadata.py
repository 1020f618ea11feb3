"""DICOM tags for images that come without them: a metadata CSV beside a folder of PNGs or JPEGs.

RSNA data often circulates as PNG or JPEG derivatives named ``{patientId}.png``, with the tags
that the DICOMs carried (age, sex, view position) in a CSV. ``lungdet convert --image-dir DIR
--metadata M`` and ``lungdet eda --metadata M`` read that CSV here, so that the image records,
the EDA page and the score's slices get the same fields as from DICOMs::

    patientId,PatientAge,PatientSex,ViewPosition,PixelSpacing
    0004cfab-14fd-4e49-80ba-63a80b6bddd6,51,F,PA,0.14300000000000002\\0.14300000000000002

``patientId`` is required, with any of the four tag columns (others, such as Modality, are
ignored). Values read as the DICOM tags do: ages as '51', '051Y' or '006M' (in years),
PixelSpacing as DICOM's 'row\\column' (a comma, a space or one value for both also work), in mm.
A value that cannot be read is left empty and reported with its line; the rest of the file is used.

:func:`metadata_features` turns the tags into what an image-level model reads beside the pixels
(``model.image_metadata``): one-hot view position, sex and age band, where a missing or
unexpected value is a category of its own, never a guess.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungdet.data_tools.dicom_meta import DicomMeta, parse_age
from lungdet.errors import LabelError

PATIENT_COLUMN = "patientId"
TAG_COLUMNS = ("PatientAge", "PatientSex", "ViewPosition", "PixelSpacing")
SEXES = ("M", "F", "O")
_SPACING_SEPARATORS = re.compile(r"[\\,;\s]+")


@dataclass(frozen=True)
class ImageTags:
    """What a DICOM would have said about one image: ``age`` in years, ``sex`` and ``view_position`` ('' if unknown), ``pixel_spacing`` (row, column) mm."""

    age: int | None = None
    sex: str = ""
    view_position: str = ""
    pixel_spacing: tuple[float, float] | None = None


@dataclass
class MetadataTable:
    """A read metadata CSV: ``tags`` by patientId, the columns it had, and ``problems`` (``{"file", "kind", "reason"}``, as convert's notes)."""

    path: Path
    tags: dict[str, ImageTags] = field(default_factory=dict)
    columns: tuple[str, ...] = ()
    problems: list[dict[str, str]] = field(default_factory=list)


def parse_spacing(text: str) -> tuple[float, float] | None:
    """(row, column) spacing in mm from '0.139\\0.139', '0.139,0.139', '[0.139, 0.139]' or '0.139'; None if unreadable or not positive."""
    parts = [part for part in _SPACING_SEPARATORS.split(text.strip().strip("[]()")) if part]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        return None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(math.isfinite(value) and value > 0 for value in values):
        return None
    return values[0], values[1]


def read_metadata_csv(path: Path) -> MetadataTable:
    """Read a metadata CSV (see the module docstring) into a :class:`MetadataTable`.

    Raises
    ------
    LabelError
        The file is missing, has no ``patientId`` column, or none of the tag columns.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(
            f"{path}: file not found; --metadata takes a CSV of patientId plus any of {', '.join(TAG_COLUMNS)}"
        )
    table = MetadataTable(path=path)
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        header = reader.fieldnames or []
        columns = tuple(column for column in TAG_COLUMNS if column in header)
        if PATIENT_COLUMN not in header or not columns:
            raise LabelError(
                f"{path}: header {','.join(header) or '(none)'}; a metadata CSV needs a {PATIENT_COLUMN} column and at least one of "
                f"{', '.join(TAG_COLUMNS)} (the DICOM tag names)"
            )
        table.columns = columns
        for row in reader:
            where = f"{path} line {reader.line_num}"
            patient_id = (row.get(PATIENT_COLUMN) or "").strip()
            if not patient_id:
                table.problems.append(
                    {"file": where, "kind": "metadata_no_patient", "reason": "empty patientId; row ignored"}
                )
                continue
            if patient_id in table.tags:
                table.problems.append(
                    {
                        "file": where,
                        "kind": "metadata_duplicate",
                        "reason": f"patient {patient_id} has an earlier row; this one is ignored",
                    }
                )
                continue
            table.tags[patient_id] = _row_tags(row, patient_id, where, table.problems)
    return table


def _row_tags(row: dict[str, str | None], patient_id: str, where: str, problems: list[dict[str, str]]) -> ImageTags:
    def text(column: str) -> str:
        return (row.get(column) or "").strip()

    age = parse_age(text("PatientAge")) if text("PatientAge") else None
    if text("PatientAge") and age is None:
        problems.append(
            {
                "file": where,
                "kind": "age_unreadable",
                "reason": f"patient {patient_id}: PatientAge {text('PatientAge')!r} is not a number of years ('51', '051Y'); age left empty",
            }
        )
    sex = text("PatientSex").upper()
    if sex and sex not in SEXES:
        problems.append(
            {
                "file": where,
                "kind": "sex_unreadable",
                "reason": f"patient {patient_id}: PatientSex {text('PatientSex')!r} is not one of {', '.join(SEXES)}; sex left empty",
            }
        )
        sex = ""
    spacing = parse_spacing(text("PixelSpacing")) if text("PixelSpacing") else None
    if text("PixelSpacing") and spacing is None:
        problems.append(
            {
                "file": where,
                "kind": "spacing_unreadable",
                "reason": f"patient {patient_id}: PixelSpacing {text('PixelSpacing')!r} is not two positive numbers in mm ('0.139\\0.139'); left empty",
            }
        )
    return ImageTags(age=age, sex=sex, view_position=text("ViewPosition").upper(), pixel_spacing=spacing)


# --- the tags as an image-level model's input ------------------------------------------------------

VIEW_POSITIONS = ("AP", "PA")
FEATURE_SEXES = ("M", "F")
# (first year, last year or None, label): the bands the score's slices use too.
AGE_BANDS = ((0, 17, "0-17"), (18, 39, "18-39"), (40, 59, "40-59"), (60, None, "60+"))
UNKNOWN = "unknown"
# The order of metadata_features' entries: one-hot view, sex and age band, each with its own 'unknown'.
METADATA_FEATURES = (
    *(f"view {value}" for value in (*VIEW_POSITIONS, UNKNOWN)),
    *(f"sex {value}" for value in (*FEATURE_SEXES, UNKNOWN)),
    *(f"age {label}" for *_, label in AGE_BANDS),
    f"age {UNKNOWN}",
)


def age_band(age: object) -> str:
    """'0-17', '18-39', '40-59', '60+', or 'unknown' for a missing or unreadable age (years)."""
    if age is None or isinstance(age, bool) or not isinstance(age, (int, float)) or not math.isfinite(age) or age < 0:
        return UNKNOWN
    for first, last, label in AGE_BANDS:
        if age >= first and (last is None or age <= last):
            return label
    return UNKNOWN


def _one_hot(value: str, values: tuple[str, ...]) -> list[float]:
    # A value outside ``values`` (a lateral 'LL', sex 'O', '') is the trailing 'unknown' entry.
    index = values.index(value) if value in values else len(values)
    return [float(position == index) for position in range(len(values) + 1)]


def metadata_features(tags: ImageTags | None) -> np.ndarray:
    """float32 ``[len(METADATA_FEATURES)]``: one-hot view position (AP, PA, unknown), sex (M, F, unknown) and age band.

    ``None`` (no tags at all, e.g. a PNG without a metadata row) is unknown in all three. The
    view and sex are compared upper-cased, so 'ap' from a hand-written CSV is AP.
    """
    tags = tags or ImageTags()
    bands = tuple(label for *_, label in AGE_BANDS)
    values = [
        *_one_hot((tags.view_position or "").strip().upper(), VIEW_POSITIONS),
        *_one_hot((tags.sex or "").strip().upper(), FEATURE_SEXES),
        *_one_hot(age_band(tags.age), bands),
    ]
    return np.asarray(values, dtype=np.float32)


def dicom_tags(meta: DicomMeta) -> ImageTags:
    """A DICOM's age, sex, view position and pixel spacing as :class:`ImageTags`."""
    return ImageTags(age=meta.age, sex=meta.sex, view_position=meta.view_position, pixel_spacing=meta.pixel_spacing)


def laid_over(file_tags: ImageTags, given: ImageTags | None) -> ImageTags:
    """``file_tags`` with every value that ``given`` (a metadata CSV's row, a dataset record) knows put in its place."""
    if given is None:
        return file_tags
    return ImageTags(
        age=given.age if given.age is not None else file_tags.age,
        sex=given.sex or file_tags.sex,
        view_position=given.view_position or file_tags.view_position,
        pixel_spacing=given.pixel_spacing or file_tags.pixel_spacing,
    )


def has_any_tag(tags: ImageTags | None) -> bool:
    """Whether ``tags`` know any of view position, sex or age."""
    return tags is not None and bool(tags.view_position or tags.sex or tags.age is not None)
