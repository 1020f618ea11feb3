"""data_tools/folds.py: seeded, stratified, patient-level folds."""

from __future__ import annotations

from collections import Counter

import pytest

from lungdet.data_tools.folds import assign_folds, box_stratum
from lungdet.errors import LungdetError


def example_strata() -> dict[str, int]:
    # 13 negatives, 6 with one box, 4 with two: strata sizes that are not multiples of k=5.
    strata = {f"neg-{index:02d}": 0 for index in range(13)}
    strata.update({f"one-{index:02d}": 1 for index in range(6)})
    strata.update({f"two-{index:02d}": 2 for index in range(4)})
    return strata


def fold_sizes(folds: dict[str, int], k: int, members: list[str] | None = None) -> list[int]:
    counts = Counter(folds[patient] for patient in (members if members is not None else folds))
    return [counts.get(fold, 0) for fold in range(k)]


def test_assign_folds_is_deterministic_per_seed() -> None:
    strata = example_strata()
    first = assign_folds(strata, k=5, seed=42)
    assert assign_folds(strata, k=5, seed=42) == first
    assert assign_folds(strata, k=5, seed=7) != first


def test_assign_folds_ignores_input_order() -> None:
    strata = example_strata()
    reversed_strata = dict(reversed(list(strata.items())))
    assert assign_folds(reversed_strata, k=5, seed=3) == assign_folds(strata, k=5, seed=3)


def test_assign_folds_is_patient_level_and_balanced() -> None:
    strata = example_strata()
    k = 5
    folds = assign_folds(strata, k=k, seed=0)
    assert set(folds) == set(strata)
    assert set(folds.values()) <= set(range(k))
    sizes = fold_sizes(folds, k)
    assert sum(sizes) == 23 and max(sizes) - min(sizes) <= 1  # 23 = 4*5 + 3 -> sizes 5,5,5,4,4
    for stratum in (0, 1, 2):
        members = [patient for patient, value in strata.items() if value == stratum]
        per_stratum = fold_sizes(folds, k, members)
        assert max(per_stratum) - min(per_stratum) <= 1, f"stratum {stratum}: {per_stratum}"


def test_assign_folds_two_patients_two_folds() -> None:
    assert sorted(assign_folds({"a": 0, "b": 0}, k=2, seed=1).values()) == [0, 1]


@pytest.mark.parametrize("k", [1, 0, -3])
def test_assign_folds_needs_two_folds(k: int) -> None:
    with pytest.raises(LungdetError, match=rf"--folds {k}: need at least 2 folds"):
        assign_folds({"a": 0}, k=k, seed=0)


def test_box_stratum_caps_at_two() -> None:
    assert [box_stratum(n) for n in (0, 1, 2, 3)] == [0, 1, 2, 2]
