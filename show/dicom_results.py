"""lungdet's boxes for one X-ray as DICOM: a Structured Report, an overlay image and a presentation state, in the X-ray's own study, and the files they go to.

**The report** is a TID 1500 Measurement Report with one region per box, or, for an image
without boxes, a Chest CAD SR without findings: :mod:`lungdet.show.dicom_sr` builds it and reads it back.

**The overlay** (with ``--dicom-out-overlay``) is a Secondary Capture image of the X-ray as lungdet
reads it, with the boxes and the research-use notice burnt in: :mod:`lungdet.show.dicom_overlay`.

**The presentation state** (with ``--dicom-out-gsps``) is a Grayscale Softcopy Presentation State
that a GSPS-capable viewer draws over the untouched X-ray as a switchable layer: the boxes, their
confidences, the notice and lungdet's window; :mod:`lungdet.show.dicom_gsps` builds it.

What every result shares (which model made it, the UIDs derived from that, the values copied from
the X-ray and how they are repaired) is in :mod:`lungdet.show.dicom_derived`.

This module puts them together: :func:`result_datasets` builds those asked for, :func:`write_results`
writes them as ``{name}_sr.dcm``, ``{name}_overlay.dcm`` and ``{name}_gsps.dcm``, and
:func:`write_results_for_files` does so for every file ``lungdet predict --dicom-out`` predicted,
skipping, with the reason, those that are not DICOM images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from tqdm import tqdm

from lungdet.atomic import write_bytes_atomic
from lungdet.data_tools.dicom_io import dicom_bytes, read_dataset, read_dicom
from lungdet.errors import DicomReadError
from lungdet.show.dicom_derived import ModelIdentity
from lungdet.show.dicom_gsps import presentation_state
from lungdet.show.dicom_overlay import overlay_image
from lungdet.show.dicom_sr import structured_report
from lungdet.submission.prediction_string import Prediction


def result_datasets(
    source: Dataset,
    pixels: np.ndarray | None,
    prediction: Prediction,
    probability: float | None,
    model: ModelIdentity,
    *,
    overlay: bool = False,
    gsps: bool = False,
) -> list[Dataset]:
    """Every result lungdet files for one X-ray: the report, then the overlay and the GSPS when asked for.

    ``source`` must hold its pixel data for ``gsps`` (the window is worked out from its stored values);
    ``pixels`` (the source as lungdet reads it) are needed for ``overlay``.
    """
    datasets: list[Dataset] = [structured_report(source, prediction, probability, model)]
    if overlay:
        if pixels is None:
            raise ValueError("an overlay needs the pixels lungdet read")
        datasets.append(overlay_image(source, pixels, prediction, model))
    if gsps:
        datasets.append(presentation_state(source, source.pixel_array, prediction, model))
    return datasets


RESULT_SUFFIXES = {"SR": "sr", "OT": "overlay", "PR": "gsps"}


def result_name(dataset: Dataset) -> str:
    """The file-name suffix of a result: ``sr``, ``overlay`` or ``gsps`` (by its modality)."""
    return RESULT_SUFFIXES[str(dataset.Modality)]


def write_results(
    out_dir: Path,
    name: str,
    source: Dataset,
    prediction: Prediction,
    probability: float | None,
    model: ModelIdentity,
    *,
    pixels: np.ndarray | None = None,
    gsps: bool = False,
) -> list[Path]:
    """Write ``OUT/{name}_sr.dcm``, ``OUT/{name}_overlay.dcm`` when ``pixels`` are given and ``OUT/{name}_gsps.dcm`` with ``gsps``, each whole or not at all."""
    datasets = result_datasets(source, pixels, prediction, probability, model, overlay=pixels is not None, gsps=gsps)
    paths = [Path(out_dir) / f"{name}_{result_name(dataset)}.dcm" for dataset in datasets]
    for path, dataset in zip(paths, datasets, strict=True):
        write_bytes_atomic(path, dicom_bytes(dataset))
    return paths


def write_results_for_files(
    out_dir: Path,
    results: Sequence[tuple[Path, Prediction, float | None]],
    model: ModelIdentity,
    *,
    overlay: bool = False,
    gsps: bool = False,
    progress: bool = True,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Reports (and overlays, and presentation states) for predicted files: ``(files written, [(input skipped, why)])``.

    Each input is ``(path, prediction already cut off, image probability or None)``. A file that
    is not a DICOM image (a PNG, a JPEG) has no study to file a report in and is skipped with
    its reason, as is one whose tags cannot be read.
    """
    written: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path, prediction, probability in tqdm(
        results, desc="dicom out", unit="file", disable=None if progress else True
    ):
        try:
            source = read_dataset(path, headers_only=not gsps)
            missing = [
                keyword
                for keyword in (
                    "SOPClassUID",
                    "SOPInstanceUID",
                    "StudyInstanceUID",
                    "SeriesInstanceUID",
                    "Rows",
                    "Columns",
                )
                if keyword not in source
            ]
        except DicomReadError as error:
            skipped.append(
                (
                    Path(path),
                    f"not a DICOM image, so there is no study to file a report in ({error.reason.split('; ')[0][:80]})",
                )
            )
            continue
        if missing:
            skipped.append((Path(path), f"lacks {', '.join(missing)}, which a report must reference"))
            continue
        try:
            pixels = read_dicom(Path(path)).pixels if overlay else None
        except DicomReadError as error:
            skipped.append((Path(path), error.reason))
            continue
        photometric = str(source.get("PhotometricInterpretation", "")).upper()
        if gsps and photometric not in ("MONOCHROME1", "MONOCHROME2"):
            skipped.append(
                (
                    Path(path),
                    f"is {photometric or 'without PhotometricInterpretation'}; a grayscale presentation state needs MONOCHROME1/2 (--dicom-out-gsps)",
                )
            )
            continue
        written += write_results(
            out_dir, Path(path).stem, source, prediction, probability, model, pixels=pixels, gsps=gsps
        )
    return written, skipped
