"""What the C-STORE node decides about an arriving instance, before anything is written: :func:`check_instance`.

Kept apart from :mod:`lungdet.pacs.dimse` (the node's threads and pynetdicom's server) because it
is a pure function of the instance's bytes: the handler calls it, and so do its tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.uid import UID

from lungdet.data_tools.dicom_io import find_missing_decoder, image_from_dataset, read_dataset_bytes
from lungdet.data_tools.gate import not_frontal_chest
from lungdet.data_tools.image_io import DEFAULT_MAX_PIXELS
from lungdet.errors import DicomReadError, ImageReadError
from lungdet.pacs.audit import Study
from lungdet.pacs.inbox import CANNOT_UNDERSTAND, DATA_SET_MISMATCH, Refusal
from lungdet.pacs.node import OWN_SERIES

# What the node could accept; :func:`accepted_transfer_syntaxes` keeps those with a decoder installed.
# Deflate is left out: read_dataset_bytes refuses it from the network (it inflates before any size check).
CANDIDATE_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.1": "Explicit VR LE",
    "1.2.840.10008.1.2": "Implicit VR LE",  # every SCU can send it
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",  # the RSNA files
    "1.2.840.10008.1.2.4.51": "JPEG Extended",  # 12-bit
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",  # the usual lossless DX export
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.2": "Explicit VR BE",  # retired, still sent by old modalities
}


def accepted_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes of :data:`CANDIDATE_TRANSFER_SYNTAXES` whose pixels this environment decodes."""
    return [syntax for syntax in CANDIDATE_TRANSFER_SYNTAXES if find_missing_decoder(syntax) is None]


# --- what the C-STORE handler checks --------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """An instance the node can analyse: its UIDs, and whether it is one of the node's own results coming back."""

    sop: str
    study: str
    own_result: bool = False
    not_frontal_chest: str | None = None  # why the gate skips it: acknowledged, and no result
    # For the audit trail only: who the image is of, and its SOP class. Out of repr (and of equality),
    # so that an Arrival shown in a log or a test failure names no patient.
    patient_id: str = field(default="", repr=False, compare=False)
    patient_name: str = field(default="", repr=False, compare=False)
    sop_class: str = field(default="", repr=False, compare=False)

    def audit_study(self) -> Study:
        """The study and patient as the audit trail records them."""
        return Study(self.study, self.patient_id, self.patient_name, ((self.sop_class, 1),) if self.sop_class else ())


def check_instance(
    data: bytes, *, sop_class: str, max_pixels: int = DEFAULT_MAX_PIXELS, gate: bool = True
) -> Arrival | Refusal:
    """Decide on one C-STORE request: ``data`` is the instance as a DICOM file, ``sop_class`` the Affected SOP Class of the request.

    Parses the instance once (:func:`~lungdet.data_tools.dicom_io.read_dataset_bytes`), reads the
    tags, then decodes the pixels from the same Dataset (with the size limit against decompression
    bombs), so that whatever is acknowledged can be analysed. Returns the :class:`Refusal` with its
    status for anything else. With ``gate``, an Arrival whose tags say it is not a frontal chest
    radiograph carries why, in ``not_frontal_chest``.
    """
    try:
        header = read_dataset_bytes(data, name="instance", untrusted=True)
    except DicomReadError as error:
        # What is wrong only, in the sender's terms: the reader's advice ("copy it again") is for files.
        return Refusal(
            CANNOT_UNDERSTAND, error.reason.split("; ")[0].replace("file is truncated", "the data set is truncated", 1)
        )
    try:
        sop, study, dataset_class = str(header.SOPInstanceUID), str(header.StudyInstanceUID), str(header.SOPClassUID)
    except AttributeError as error:
        return Refusal(
            DATA_SET_MISMATCH,
            f"lacks {str(error).split(' ')[-1]} (SOP Class, SOP Instance and Study Instance UIDs are needed)",
        )
    if not UID(sop).is_valid or not UID(study).is_valid:
        return Refusal(
            CANNOT_UNDERSTAND, f"SOP Instance UID {sop[:64]!r} or Study Instance UID {study[:64]!r} is not a valid UID"
        )
    if dataset_class != sop_class:
        return Refusal(DATA_SET_MISMATCH, f"its SOP Class UID {dataset_class} is not the request's {sop_class}")
    who = {
        "patient_id": str(header.get("PatientID", "") or ""),
        "patient_name": str(header.get("PatientName", "") or ""),
        "sop_class": dataset_class,
    }
    if str(header.get("SeriesDescription", "") or "") in OWN_SERIES:
        return Arrival(sop, study, own_result=True, **who)
    try:
        image = image_from_dataset(header, name=f"instance {sop}", max_pixels=max_pixels)
    except ImageReadError as error:
        # What is wrong only: the reader's advice ("remove it from the folder") is for files, not a sender.
        reason = error.reason.split("; ")[0]
        status = DATA_SET_MISMATCH if error.kind in ("multi_frame", "no_pixels", "not_image") else CANNOT_UNDERSTAND
        return Refusal(status, reason)
    return Arrival(sop, study, not_frontal_chest=not_frontal_chest(image.meta) if gate else None, **who)
