"""A held-out test set, chosen once: patients that nothing is ever trained or tuned on.

``holdout_split`` picks a seeded, patient-level, target-stratified share of a labels file;
``write_split_csv`` / ``read_split_csv`` keep it as ``patientId,split`` (``cv`` or ``holdout``)
so the choice is written down and every later run reads the same patients. ``link_images``
makes a folder of links to one side's images, which ``lungdet convert --image-dir`` (or
``--dicom-dir``) then converts like any other folder.

The real-data benchmark (``benchmarks/real_data.py``) and ``lungdet demo --real`` split
``../shared/data/rsna_real`` this way: 800 images for cross-validation, 200 held out.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from lungdet.atomic import atomic_open
from lungdet.data_tools.folds import assign_folds
from lungdet.data_tools.labels import PatientLabels
from lungdet.errors import LabelError, LungdetError

SPLITS = ("cv", "holdout")


def holdout_split(labels: Mapping[str, PatientLabels], *, holdout_fraction: float, seed: int) -> dict[str, str]:
    """``{patientId: 'cv' | 'holdout'}``: ``holdout_fraction`` of each target (positive, negative) held out, seeded.

    Patient-level by construction (one labels entry per patient). The held-out patients are one
    fold of a stratified ``round(1 / holdout_fraction)``-fold assignment, so positives and
    negatives are held out in the same proportion, and the result depends only on the patients
    and the seed, never on file order.
    """
    if not 0.0 < holdout_fraction <= 0.5:
        raise ValueError(f"holdout_fraction must be in (0, 0.5], got {holdout_fraction}")
    folds = assign_folds(
        {patient: labels[patient].target for patient in labels}, k=round(1.0 / holdout_fraction), seed=seed
    )
    return {patient: "holdout" if folds[patient] == 0 else "cv" for patient in sorted(labels)}


def write_split_csv(path: Path, split: Mapping[str, str]) -> None:
    """Write ``patientId,split`` sorted by patientId, atomically."""
    with atomic_open(Path(path), "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["patientId", "split"])
        for patient in sorted(split):
            writer.writerow([patient, split[patient]])


def read_split_csv(path: Path) -> dict[str, str]:
    """Read ``patientId,split``; raises :class:`LabelError` naming the line for a split that is not ``cv`` or ``holdout``."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: file not found; write the split once with write_split_csv")
    split: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        if reader.fieldnames != ["patientId", "split"]:
            raise LabelError(f"{path}: header {reader.fieldnames}; expected patientId,split")
        for row in reader:
            if row["split"] not in SPLITS:
                raise LabelError(
                    f"{path} line {reader.line_num}: split {row['split']!r} is not one of {', '.join(SPLITS)}"
                )
            split[row["patientId"]] = row["split"]
    return split


def link_images(image_paths: Iterable[Path], patients: set[str], out_dir: Path) -> int:
    """Make ``out_dir`` hold links to the images whose stem is in ``patients`` (and nothing else); returns how many.

    Symbolic links cost no copy of the data; where the file system refuses them, the files are copied.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():
        stale.unlink()
    count = 0
    for path in image_paths:
        if Path(path).stem not in patients:
            continue
        target = out_dir / Path(path).name
        try:
            os.symlink(Path(path).resolve(), target)
        except OSError:
            target.write_bytes(Path(path).read_bytes())
        count += 1
    if count != len(patients):
        raise LungdetError(
            f"{out_dir}: found images for {count} of {len(patients)} patients; is the image folder complete?"
        )
    return count
