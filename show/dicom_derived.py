"""What every lungdet DICOM result shares: which model made it, the UIDs derived from that, and the values copied from the X-ray.

Every result files in the X-ray's own study, in a series of its own (one per study, model and kind):
the report (:mod:`lungdet.show.dicom_sr`) in series 9901, the overlay
(:mod:`lungdet.show.dicom_overlay`) in 9902 and the presentation state
(:mod:`lungdet.show.dicom_gsps`) in 9903, each described as research use only.

Values copied from the source are copied unchanged, except where the source breaks their value
representation: RSNA's ``PatientAge`` ``51`` becomes ``051Y`` (an age string, PS3.5 6.2).

UIDs are derived from the source instance and the model (checkpoint sha256s and cut-off), not
drawn at random: the same image through the same model gets the same report UID, so a result
stored twice is one instance in the archive, and an archive can be asked whether it has it.
"""

from __future__ import annotations

import contextlib
import re
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

MANUFACTURER = "lungdet"
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/lungdet/lungdet/dicom-results")
RESEARCH_NOTICE = "Research use only, not for diagnosis"
REPORT_SERIES_NUMBER = 9901
REPORT_SERIES_DESCRIPTION = f"lungdet boxes - {RESEARCH_NOTICE}"
OVERLAY_SERIES_NUMBER = 9902
OVERLAY_SERIES_DESCRIPTION = f"lungdet overlay - {RESEARCH_NOTICE}"
GSPS_SERIES_NUMBER = 9903
GSPS_SERIES_DESCRIPTION = f"lungdet GSPS - {RESEARCH_NOTICE}"


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made a result: what goes into the algorithm identification, and into every derived UID."""

    version: str
    architectures: tuple[str, ...]
    checkpoint_sha256s: tuple[str, ...]
    cut_off: float

    @property
    def key(self) -> str:
        """The model's part of every derived UID: the checkpoint sha256s and the cut-off (``.6g``), joined by ``|``.

        The version and architectures are not in it: the same checkpoints and cut-off give the same UIDs.
        """
        return "|".join([*self.checkpoint_sha256s, f"{self.cut_off:.6g}"])


def model_identity(
    version: str, architectures: Sequence[str], checkpoint_sha256s: Sequence[str], cut_off: float
) -> ModelIdentity:
    """A :class:`ModelIdentity` from plain values: architectures deduplicated in order, sha256s kept as given."""
    return ModelIdentity(version, tuple(dict.fromkeys(architectures)), tuple(checkpoint_sha256s), float(cut_off))


def highdicom_missing(error: ImportError) -> ImportError:
    """The error a result module raises when highdicom (the ``dicom`` extra) is not installed: what failed, and what to install."""
    return ImportError(f"lungdet's DICOM results need highdicom ({error}); pip install 'lungdet[dicom]'")


def derived_uid(*parts: object) -> str:
    """A UID that is a function of ``parts`` only: the same inputs give the same UID on any machine.

    A name-based UUID (version 5) in the 2.25 form that DICOM defines for UUIDs (PS3.5 B.2).
    (pydicom's ``generate_uid`` ignores its entropy sources in that form and draws a random one.)
    """
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, '|'.join(str(part) for part in parts)).int}"


def report_uid(source: Dataset, model: ModelIdentity) -> str:
    """The SOP Instance UID of the report on ``source`` by ``model``."""
    return derived_uid("lungdet report", source.SOPInstanceUID, model.key)


def overlay_uid(source: Dataset, model: ModelIdentity) -> str:
    """The SOP Instance UID of the overlay image on ``source`` by ``model``."""
    return derived_uid("lungdet overlay", source.SOPInstanceUID, model.key)


def gsps_uid(source: Dataset, model: ModelIdentity) -> str:
    """The SOP Instance UID of the presentation state on ``source`` by ``model``."""
    return derived_uid("lungdet gsps", source.SOPInstanceUID, model.key)


def series_uid(source: Dataset, model: ModelIdentity, kind: str) -> str:
    """The Series Instance UID of ``kind`` (report, overlay, gsps) in ``source``'s study by ``model``."""
    # One series per study, model and kind: every report lungdet writes into a study files together.
    return derived_uid(f"lungdet {kind} series", source.StudyInstanceUID, model.key)


def box_polyline(box: np.ndarray) -> np.ndarray:
    """XYWH_ABS -> the closed polyline of its corners, ``[5, 2]`` (column, row), clockwise from the top left."""
    x, y, width, height = (float(value) for value in box)
    return np.array([[x, y], [x + width, y], [x + width, y + height], [x, y + height], [x, y]], dtype=np.float32)


def polyline_box(points: np.ndarray) -> np.ndarray:
    """The XYWH_ABS box a polyline spans (the inverse of :func:`box_polyline`)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x1, y1 = points.min(axis=0)
    x2, y2 = points.max(axis=0)
    return np.array([x1, y1, x2 - x1, y2 - y1])


@contextlib.contextmanager
def quiet_highdicom() -> Iterator[None]:
    """Context in which highdicom's warning about a PatientName without ``^`` is silenced; other warnings pass."""
    # highdicom warns that a PatientName without '^' may not be a person's name: RSNA's names are
    # patient IDs. The value is copied as it is; the warning says nothing a user can act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*unlikely to represent the intended person name.*")
        yield


AGE_STRING = re.compile(r"^\d{3}[DWMY]$")


# Type 2 (present, may be empty) in every image IOD, and copied into every result; some senders
# and older files leave them out, and highdicom then fails on the missing attribute.
PATIENT_AND_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)


def with_type2_present(source: Dataset) -> Dataset:
    """``source``, or a shallow copy with its missing Type 2 patient and study attributes present and empty (the caller's is not touched)."""
    missing = [keyword for keyword in PATIENT_AND_STUDY_TYPE2 if keyword not in source]
    if not missing:
        return source
    # A new element table over the same elements (Dataset(source) would share the table): adding to it leaves ``source`` alone.
    completed = Dataset({tag: source.get_item(tag) for tag in source.keys()})
    if hasattr(source, "file_meta"):
        completed.file_meta = source.file_meta  # the transfer syntax, which decoding the pixels needs
    for keyword in missing:
        setattr(completed, keyword, "")
    return completed


def repair_copied_values(derived: Dataset) -> Dataset:
    """Repair, in place, values copied from the source whose value representation the source broke.

    Only ``PatientAge`` today: RSNA writes ``51`` where an age string needs ``051Y``. A bare number
    of years is repaired; an age that cannot be read as one is dropped (the attribute is optional),
    not guessed. Everything else stays as the source had it.
    """
    age = str(derived.get("PatientAge", "") or "")
    if age and not AGE_STRING.match(age):
        years = age.strip().upper().removesuffix("Y")
        if years.isdigit() and int(years) < 1000:
            derived.PatientAge = f"{int(years):03d}Y"
        else:
            del derived.PatientAge
    return derived


def with_empty_laterality(derived: Dataset) -> Dataset:
    """``derived`` with an empty ``Laterality`` (General Series, Type 2C), set in place and returned."""
    # General Series' Laterality is Type 2C and dciodvfy asks for it: empty, since a chest is not a paired body part.
    derived.Laterality = ""
    return derived
