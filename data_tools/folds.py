"""Patient-level folds for cross-validation: seeded, stratified by box count, written as ``folds.csv``."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lungdet.atomic import atomic_open
from lungdet.errors import LungdetError

FOLDS_FILE = "folds.csv"


def assign_folds(strata: Mapping[str, int], *, k: int, seed: int) -> dict[str, int]:
    """Assign each patient a fold in ``0..k-1``, balanced within each stratum.

    ``strata`` maps patientId -> stratum (e.g. number of boxes, capped). Patients are sorted
    before the seeded shuffle, so the result depends only on the set of patients and the seed,
    not on file order. Patient-level by construction: one patient, one fold.
    """
    if k < 2:
        raise LungdetError(f"--folds {k}: need at least 2 folds (one to validate on, the rest to train on)")
    rng = np.random.default_rng(seed)
    folds: dict[str, int] = {}
    offset = 0
    for stratum in sorted(set(strata.values())):
        members = sorted(patient for patient, value in strata.items() if value == stratum)
        order = rng.permutation(len(members))
        for position, index in enumerate(order):
            folds[members[index]] = (position + offset) % k
        # Rotating the start keeps fold sizes even when strata sizes are not multiples of k.
        offset = (offset + len(members)) % k
    return folds


def box_stratum(n_boxes: int) -> int:
    """Stratum for fold balancing: 0 negative, 1 one box, 2 two or more boxes."""
    return min(n_boxes, 2)


def write_folds_csv(path: Path, images: Iterable[dict[str, Any]]) -> None:
    """Write ``patientId,fold,target,n_boxes`` for every converted image, atomically."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["patientId", "fold", "target", "n_boxes"])
        for record in images:
            writer.writerow([record["patient_id"], record["fold"], record["target"], record["n_boxes"]])
