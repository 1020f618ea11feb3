"""Is this a frontal chest radiograph? The check on an image's DICOM tags before lungdet predicts on it.

lungdet's models were trained on frontal (AP or PA) chest radiographs only; on a CT slice, an
abdomen film or a lateral view they would still draw boxes, and those boxes would mean nothing.
:func:`not_frontal_chest` reads the tags that say what an image is and returns why it is not a
frontal chest radiograph, or None when nothing says so:

- **Modality**: CR, DX or DR (projection radiography); SC (secondary capture) only with a chest body
  part, as the RSNA challenge's files are stored. An absent Modality passes: the other tags decide.
- **BodyPartExamined**, when present: a chest (CHEST, THORAX, LUNG and the like).
- **ViewPosition**, when present: AP or PA. A lateral (LL, RL, LAT, LATERAL), decubitus or oblique
  view is refused.

An empty tag never refuses an image on its own: many archives leave BodyPartExamined and
ViewPosition empty on real chest films. PNG and JPEG files carry no tags, so this check cannot
judge them (no image-level check is built: see docs/dicom_and_pacs.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Protocol

from lungdet.errors import ImageReadError

PROJECTION_MODALITIES = ("CR", "DX", "DR")
# Secondary Capture holds anything; the RSNA challenge stored its chest films so, with Modality CR or SC.
CAPTURE_MODALITIES = ("SC", "OT")
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LUNG", "PORT CHEST", "TORAX", "THORAX_LUNG")
FRONTAL_VIEWS = ("AP", "PA")
REFUSAL_PREFIX = "not a frontal chest radiograph"
# The ImageReadError kind of a refused image: the server's 422 and predict's "refused" rows tell it from an unreadable file by it.
REFUSAL_KIND = "not_frontal_chest"
ALLOW_ANY_VIEW_WARNING = (
    "warning: --allow-any-view: the frontal-chest check on DICOM tags is off; lungdet will draw boxes on whatever it is "
    "sent (CT, lateral views, other body parts), and those boxes mean nothing"
)


class ImageKindTags(Protocol):
    """What says what an image is: a :class:`~lungdet.data_tools.dicom_meta.DicomMeta` or an :class:`~lungdet.data_tools.image_io.XrayImage`."""

    modality: str | None
    body_part_examined: str | None
    view_position: str | None


def _normal(value: str | None) -> str:
    return " ".join((value or "").upper().replace("-", " ").split())


def is_refusal(reason: str) -> bool:
    """Whether a reader's reason is this gate's refusal rather than a file that cannot be read."""
    return reason.startswith(REFUSAL_PREFIX)


def not_frontal_chest(meta: ImageKindTags) -> str | None:
    """Why ``meta``'s image is not a frontal chest radiograph ("not a frontal chest radiograph: ..."), or None.

    A PNG or JPEG (an XrayImage with no tags) always passes: nothing in it says what it is.
    """
    modality, body_part, view = _normal(meta.modality), _normal(meta.body_part_examined), _normal(meta.view_position)
    chest = body_part in CHEST_BODY_PARTS
    if modality and modality not in PROJECTION_MODALITIES:
        if modality not in CAPTURE_MODALITIES:
            return (
                f"{REFUSAL_PREFIX}: Modality {modality} (lungdet's models were made for CR, DX or DR chest radiographs)"
            )
        if not chest:
            return (
                f"{REFUSAL_PREFIX}: Modality {modality} (a secondary capture) without a chest BodyPartExamined "
                f"({body_part or 'empty'})"
            )
    if body_part and not chest:
        return f"{REFUSAL_PREFIX}: BodyPartExamined {body_part}"
    if view and view not in FRONTAL_VIEWS:
        return f"{REFUSAL_PREFIX}: ViewPosition {view} (only AP and PA views are frontal)"
    return None


def refuse_unless_frontal_chest(tags: ImageKindTags, *, name: object) -> None:
    """Raise ImageReadError (kind :data:`REFUSAL_KIND`, the reason from :func:`not_frontal_chest`) for an image the gate refuses."""
    reason = not_frontal_chest(tags)
    if reason is not None:
        raise ImageReadError(name, reason, kind=REFUSAL_KIND)


def bad_input_counts(bad: Sequence[tuple[object, str]]) -> str:
    """'; N refused (not frontal chest radiographs), M unreadable' for a summary line; '' when every input was read."""
    refused = sum(is_refusal(reason) for _, reason in bad)
    parts = [f"{refused} refused (not frontal chest radiographs)"] * bool(refused)
    parts += [f"{len(bad) - refused} unreadable"] * bool(len(bad) - refused)
    return f"; {', '.join(parts)}" if parts else ""


def bad_input_lines(bad: Sequence[tuple[object, str]], *, written_empty: bool) -> list[str]:
    """A line per input refused here or unreadable: '  refused[, written with no boxes]: PATH: reason'."""
    note = ", written with no boxes" if written_empty else ""
    return [f"  {'refused' if is_refusal(reason) else 'unreadable'}{note}: {path}: {reason}" for path, reason in bad]


def add_allow_any_view_argument(parser: argparse.ArgumentParser) -> None:
    """``--allow-any-view``, the one switch that turns this check off, worded the same for every command."""
    parser.add_argument(
        "--allow-any-view",
        action="store_true",
        help="turn off the check that keeps DICOMs whose tags say they are not frontal chest radiographs (CT, MR, a lateral "
        "view, another body part) away from the model: for sites whose tags are wrong; the boxes on such images mean nothing",
    )
