"""Platt scaling: a probability's logit mapped by ``slope * logit + intercept`` so that it means what it says.

An image head trained on 640 images with half of every epoch positive (``data.positive_fraction``)
is over-confident and shifted: its raw 0.8 is not 80%. ``lungdet train`` fits the two numbers on
each epoch's validation probabilities (:func:`fit_platt`, a one-feature logistic regression by
Newton's method) and stores the best epoch's in the checkpoint; every runner applies them
(:func:`apply_platt`), so the probability a page shows is calibrated on images the model did not
train on. The map is monotonic: it changes no ranking, no AUC, and no decision once the cut-off
is mapped with it.

Pure numpy, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Probabilities are kept off exactly 0 and 1 before taking their logit (float32's sigmoid
# saturates at |logit| ~ 17, where no calibration changes a decision anyway).
PROBABILITY_CLIP = 1e-7
# A little L2 on the slope and intercept, towards the identity map: with perfectly separated
# validation images the maximum-likelihood slope is infinite; this keeps it finite.
RIDGE = 1e-3
NEWTON_STEPS = 50
# Newton steps are cut to this length: on near-constant probabilities (an untrained model) the
# curvature is tiny and a full step overshoots by orders of magnitude.
MAX_STEP = 1.0
# The map is kept increasing and within these bounds: outside them the fit says the validation
# images could not calibrate it (too few, one probability for all), not that the model is sharper.
SLOPE_RANGE = (0.0, 10.0)
INTERCEPT_RANGE = (-10.0, 10.0)


def logit(probability: np.ndarray | float) -> np.ndarray:
    """``log(p / (1 - p))`` of probabilities clipped to [1e-7, 1 - 1e-7], in float64."""
    clipped = np.clip(np.asarray(probability, dtype=np.float64), PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
    return np.log(clipped) - np.log1p(-clipped)


def sigmoid(value: np.ndarray | float) -> np.ndarray:
    """``1 / (1 + exp(-value))`` elementwise in float64, the inverse of :func:`logit`; values in (0, 1)."""
    # Clipped: exp of more than ~709 overflows float64, and sigmoid is 0 or 1 to the last bit long before.
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(value, dtype=np.float64), -500.0, 500.0)))


def fit_platt(labels: Sequence[bool], probabilities: Sequence[float]) -> tuple[float, float] | None:
    """``(slope, intercept)`` of the logistic regression of ``labels`` on ``logit(probabilities)``; None without both classes.

    Newton's method (steps cut to :data:`MAX_STEP`) on the mean negative log-likelihood plus
    :data:`RIDGE` times the squared parameters' distance from (1, 0), the identity map: a tiny
    pull that keeps separable data finite. The result is clipped to :data:`SLOPE_RANGE` and
    :data:`INTERCEPT_RANGE`, so the map never reverses the ranking.
    """
    truth = np.asarray(labels, dtype=np.float64)
    if truth.size == 0 or truth.min() == truth.max():
        return None
    features = np.stack([logit(probabilities), np.ones_like(truth)], axis=1)
    parameters = np.array([1.0, 0.0])
    identity = np.array([1.0, 0.0])
    for _ in range(NEWTON_STEPS):
        predicted = sigmoid(features @ parameters)
        gradient = features.T @ (predicted - truth) / len(truth) + 2 * RIDGE * (parameters - identity)
        weights = predicted * (1.0 - predicted)
        hessian = (features * weights[:, None]).T @ features / len(truth) + 2 * RIDGE * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        length = float(np.abs(step).max())
        if length > MAX_STEP:
            step = step * (MAX_STEP / length)
        parameters = parameters - step
        if length < 1e-10:
            break
    return float(np.clip(parameters[0], *SLOPE_RANGE)), float(np.clip(parameters[1], *INTERCEPT_RANGE))


def apply_platt(probability: float | None, platt: Sequence[float] | None) -> float | None:
    """``sigmoid(slope * logit(probability) + intercept)``; the probability as it is when ``platt`` is None (or it is None)."""
    if probability is None or platt is None:
        return probability
    slope, intercept = platt
    return float(sigmoid(slope * logit(probability) + intercept))
