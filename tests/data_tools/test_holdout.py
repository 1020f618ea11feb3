"""Tests for data_tools/holdout.py: the held-out patients, chosen once and written down."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lungdet.data_tools.holdout import holdout_split, link_images, read_split_csv, write_split_csv
from lungdet.data_tools.labels import PatientLabels, read_labels
from lungdet.errors import LabelError, LungdetError
from tests.conftest import REPO_ROOT

REAL_SPLIT = REPO_ROOT / "benchmarks" / "rsna_real_split.csv"
REAL_SPLIT_SEED = 2026


def toy_labels(positives: int, negatives: int) -> dict[str, PatientLabels]:
    labels = {
        f"pos-{index:03d}": PatientLabels(f"pos-{index:03d}", np.array([[1.0, 2.0, 3.0, 4.0]]), 1)
        for index in range(positives)
    }
    labels.update(
        {f"neg-{index:03d}": PatientLabels(f"neg-{index:03d}", np.zeros((0, 4)), 0) for index in range(negatives)}
    )
    return labels


def test_holdout_is_stratified_by_target_and_seeded() -> None:
    labels = toy_labels(25, 75)
    split = holdout_split(labels, holdout_fraction=0.2, seed=1)
    counts = Counter((value, labels[patient].target) for patient, value in split.items())
    assert counts == {("holdout", 1): 5, ("holdout", 0): 15, ("cv", 1): 20, ("cv", 0): 60}
    assert holdout_split(dict(reversed(list(labels.items()))), holdout_fraction=0.2, seed=1) == split
    assert holdout_split(labels, holdout_fraction=0.2, seed=2) != split


def test_the_written_real_split_is_the_seeded_one(rsna_real_dir: Path) -> None:
    """benchmarks/rsna_real_split.csv was written once from this seed; if the code drifts, the held-out patients must not."""
    labels = read_labels(rsna_real_dir / "labels.csv")
    written = read_split_csv(REAL_SPLIT)
    assert written == holdout_split(labels, holdout_fraction=0.2, seed=REAL_SPLIT_SEED)
    held_out = [patient for patient, value in written.items() if value == "holdout"]
    assert len(held_out) == 200 and sum(labels[patient].target for patient in held_out) == 50


def test_split_csv_round_trip_and_bad_values(tmp_path: Path) -> None:
    split = {"b": "cv", "a": "holdout"}
    write_split_csv(tmp_path / "split.csv", split)
    assert (tmp_path / "split.csv").read_text() == "patientId,split\na,holdout\nb,cv\n"
    assert read_split_csv(tmp_path / "split.csv") == split
    (tmp_path / "bad.csv").write_text("patientId,split\na,test\n")
    with pytest.raises(LabelError, match=r"bad.csv line 2: split 'test' is not one of cv, holdout"):
        read_split_csv(tmp_path / "bad.csv")


def test_link_images_holds_exactly_one_side(tmp_path: Path) -> None:
    source = tmp_path / "all"
    source.mkdir()
    for name in ("a", "b", "c"):
        (source / f"{name}.jpg").write_bytes(name.encode())
    (tmp_path / "side").mkdir()
    (tmp_path / "side" / "stale.jpg").write_bytes(b"old")
    assert link_images(sorted(source.iterdir()), {"a", "c"}, tmp_path / "side") == 2
    assert sorted(path.name for path in (tmp_path / "side").iterdir()) == ["a.jpg", "c.jpg"]
    assert (tmp_path / "side" / "c.jpg").read_bytes() == b"c"
    with pytest.raises(LungdetError, match="found images for 1 of 2 patients"):
        link_images(sorted(source.iterdir()), {"a", "zz"}, tmp_path / "other")
