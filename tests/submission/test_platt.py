"""Tests for submission/platt.py: Platt scaling of image-level probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from lungdet.submission.platt import apply_platt, fit_platt, logit, sigmoid


def test_fit_recovers_a_known_logistic_map() -> None:
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.02, 0.98, 20_000)
    # Truth drawn from sigmoid(2 * logit(raw) - 1): the raw probability is over-confident by a factor 2 and shifted.
    labels = rng.uniform(size=raw.size) < sigmoid(2.0 * logit(raw) - 1.0)
    slope, intercept = fit_platt(labels, raw)
    assert slope == pytest.approx(2.0, abs=0.06) and intercept == pytest.approx(-1.0, abs=0.05)


def test_calibrated_probabilities_match_the_share_of_positives() -> None:
    rng = np.random.default_rng(1)
    raw = rng.uniform(0.05, 0.95, 5_000)
    labels = rng.uniform(size=raw.size) < sigmoid(0.5 * logit(raw) + 0.3)  # under-confident
    platt = fit_platt(labels, raw)
    calibrated = np.array([apply_platt(value, platt) for value in raw])
    # A logistic fit with an intercept matches the mean exactly (its gradient's second component is zero), up to the tiny ridge.
    assert calibrated.mean() == pytest.approx(labels.mean(), abs=2e-3)
    high = calibrated > 0.6
    assert calibrated[high].mean() == pytest.approx(labels[high].mean(), abs=0.03)


def test_one_class_gives_no_map_and_no_map_changes_nothing() -> None:
    assert fit_platt([True, True], [0.2, 0.9]) is None
    assert fit_platt([], []) is None
    assert apply_platt(0.37, None) == 0.37 and apply_platt(None, (2.0, 1.0)) is None
    assert apply_platt(0.5, (3.0, 0.0)) == pytest.approx(0.5) and apply_platt(0.5, (1.0, np.log(3))) == pytest.approx(
        0.75
    )


def test_separable_validation_keeps_the_map_finite_and_monotonic() -> None:
    labels = [False, False, False, True, True, True]
    raw = [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]
    slope, intercept = fit_platt(labels, raw)
    assert np.isfinite(slope) and np.isfinite(intercept) and slope > 0
    mapped = [apply_platt(value, (slope, intercept)) for value in raw]
    assert mapped == sorted(mapped) and mapped[0] < 0.5 < mapped[-1]


def test_near_constant_probabilities_keep_the_map_bounded_and_quiet() -> None:
    """An untrained model gives every image nearly the same probability: the fit must stay finite, increasing and warning-free."""
    import warnings

    rng = np.random.default_rng(2)
    raw = 0.5 + rng.normal(0, 1e-5, 16)
    labels = raw > 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slope, intercept = fit_platt(labels, raw)
        assert 0.0 <= slope <= 10.0 and -10.0 <= intercept <= 10.0
        assert apply_platt(0.9999999, (slope, intercept)) >= apply_platt(0.0000001, (slope, intercept))
        assert sigmoid(-1e6) < 1e-200 and sigmoid(1e6) == 1.0
    reversed_labels = [False] * 8 + [True] * 8
    slope, _ = fit_platt(reversed_labels, np.linspace(0.9, 0.1, 16))  # worse than chance: never a reversing map
    assert slope == 0.0
