"""Post-processing of raw predictions into a submission, and the typed ``postprocess.yaml`` that holds its settings.

For each image, in this order:

1. **fuse** every pass of every model (``plain``, ``hflip``; several checkpoints) with weighted
   boxes fusion (:mod:`lungdet.submission.fusion`: ``wbf_iou_thr``, ``wbf_skip_box_thr``,
   ``model_weights``, ``wbf_conf_type``), and drop fused boxes that fewer than ``min_support``
   of the passes found; a lone pass is left as it is;
2. **gate**: drop every box of an image whose image-level probability (the mean over passes
   that have one) is below ``gate_threshold``;
3. keep boxes with confidence at least ``score_threshold``;
4. **shrink** each box's width and height by ``shrink`` about its centre (the 2018 winners
   shrank to 0.875: models draw opacities wider than the readers did);
5. keep at most ``max_boxes``, the most confident.

Every step looks at one image only: what an image gets never depends on the other images
predicted with it, so a folder of normals or a screening population gets what the same images
would get inside an RSNA test set.

**Many models, settings tuned on one.** ``lungdet tune`` sees out-of-fold predictions: one
model per image (and its mirrored pass); ``lungdet predict`` with every fold's checkpoint fuses
five. The default fusion (``wbf_conf_type: finders``) gives a fused box the mean confidence of
the passes that *found* it, which keeps one model's scale for any number of models, so the
tuned cut-off keeps its meaning; how many passes agreed is the box's support, a feature of its
own (``min_support``, tuned on the mirrored passes). The package's 'avg' fusion instead counts
a pass that missed as 0, so the more models disagree the lower fused confidences fall (one smoke
run of five disagreeing models came out empty at the tuned cut-off).

**Batch calibration (opt-in).** ``calibration: batch`` (``lungdet predict --batch-calibration``)
re-derives the gate and cut-off on the fused predictions of the images at hand, so that they keep
the operating point tuning saw (the share of images the gate let through, the boxes per image).
It **assumes the batch has the training set's share of positives**: an RSNA test set does; a
hospital's batch, a screening population or a folder of normals does not, and there it puts
boxes on a fixed share of images whatever they contain. It needs at least
``MIN_CALIBRATION_IMAGES`` images, and says when it moved a setting far from the tuned value.
Files from before this change say ``calibration: auto``; it is read as ``off``, with a note.

Everything here works on numpy arrays and is tested without torch. ``lungdet predict
--postprocess FILE`` applies a file, ``lungdet tune`` writes one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from lungdet.atomic import write_text_atomic
from lungdet.boxes import as_box_array, xywh_to_xyxy, xyxy_to_xywh
from lungdet.errors import ConfigError
from lungdet.submission.fusion import CONF_TYPES, fuse_boxes
from lungdet.submission.prediction_string import Prediction, keep_confident
from lungdet.submission.raw_predictions import RawPrediction, group_by_patient
from lungdet.typed_config import (
    build_dataclass,
    check_ranges,
    flat_section,
    flattened,
    nest_flat_keys,
    ranged,
    read_yaml_mapping,
)

WBF_CONF_TYPES = CONF_TYPES
# 'auto' is what files tuned before batch calibration became opt-in say: read as 'off', with a note.
CALIBRATIONS = ("off", "batch", "auto")
LEGACY_CALIBRATION = "auto"
# Fewer images than this make a poor sample of a test set's confidences: the settings are then applied as written.
MIN_CALIBRATION_IMAGES = 50
# Batch calibration says so when it moves the gate or the cut-off by more than this (both are in [0, 1]).
FAR_CALIBRATION_MOVE = 0.1


@dataclass
class OperatingPoint:
    """The tuning record: what ``lungdet tune`` saw where it chose the settings, never set by hand.

    ``lungdet predict`` compares a run's boxes per image with it, and batch calibration keeps it.
    In ``postprocess.yaml`` its keys sit beside the settings' (the file's layout since before).
    """

    # models per image in the predictions tuning saw (0 = unknown, never calibrated)
    tuned_models_per_image: int = ranged(0, check=lambda v: v >= 0, allowed=">= 0 (0 = unknown)")
    # passes per model there (1 plain, 2 with hflip)
    tuned_passes_per_model: int = ranged(0, check=lambda v: v >= 0, allowed=">= 0 (0 = unknown)")
    # share of images the gate let through on the tuning predictions
    expected_gated_share: float = ranged(1.0, check=lambda v: 0.0 <= v <= 1.0, allowed="in [0, 1]")
    # boxes per image these settings kept on the tuning predictions (predict compares; 0 = unknown)
    expected_boxes_per_image: float = ranged(0.0, check=lambda v: v >= 0.0, allowed=">= 0 (0 = unknown)")


@dataclass
class PostprocessConfig:
    """How raw predictions become a submission (see the module docstring for the order): the user's settings, and ``tuning``, the record ``lungdet tune`` keeps."""

    # keep boxes with at least this confidence, after fusion and gating
    score_threshold: float = ranged(0.5, check=lambda v: 0.0 <= v <= 1.0, allowed="in [0, 1]")
    # drop all boxes of an image whose image-level probability is below this (0 = no gating; ignored for models without an image head)
    gate_threshold: float = ranged(0.0, check=lambda v: 0.0 <= v <= 1.0, allowed="in [0, 1]")
    # weighted boxes fusion: boxes of different passes or models overlapping more than this become one
    wbf_iou_thr: float = ranged(0.55, check=lambda v: 0.0 < v < 1.0, allowed="in (0, 1)")
    # weighted boxes fusion: boxes under this confidence are left out before fusing
    wbf_skip_box_thr: float = ranged(0.0, check=lambda v: 0.0 <= v < 1.0, allowed="in [0, 1)")
    # weight of each model in the fusion, in --checkpoint order (empty = equal)
    model_weights: list[float] = ranged(
        default_factory=list,
        check=lambda v: all(weight > 0 for weight in v),
        allowed="a list of positive weights (or empty for equal weights)",
    )
    # scale each box's width and height about its centre (1 = unchanged; the 2018 winners used 0.875)
    shrink: float = ranged(1.0, check=lambda v: 0.5 <= v <= 1.5, allowed="in [0.5, 1.5]")
    # keep at most this many boxes per image, most confident first (0 = no limit; RSNA images have at most 4)
    max_boxes: int = ranged(0, check=lambda v: v >= 0, allowed=">= 0 (0 = no limit)")
    # fused confidence: 'finders' (the mean of the passes that found the box: one model's scale for any number of models), 'avg' (over every pass, a pass that missed counting 0) or 'max' (the most confident pass's)
    wbf_conf_type: str = ranged(
        "finders", check=lambda v: v in WBF_CONF_TYPES, allowed=f"one of {', '.join(WBF_CONF_TYPES)}"
    )
    # drop fused boxes found by less than this share of the passes (0 = keep all; 1 = every pass must find it)
    min_support: float = ranged(0.0, check=lambda v: 0.0 <= v <= 1.0, allowed="a share of the passes in [0, 1]")
    # 'off': apply as written, image by image; 'batch': re-derive gate and cut-off on each predicted batch to keep tuning's operating point, which ASSUMES the batch has the training set's share of positives (see the module docstring)
    calibration: str = ranged("off", check=lambda v: v in CALIBRATIONS, allowed="'off' or 'batch'")
    # what lungdet tune saw (its keys sit at this level in postprocess.yaml)
    tuning: OperatingPoint = flat_section(OperatingPoint)


def postprocess_from_dict(values: Mapping[str, object], *, where: str = "postprocess") -> PostprocessConfig:
    """Build and check a :class:`PostprocessConfig`; unknown keys get a suggestion, values a range."""
    try:
        config = build_dataclass(PostprocessConfig, nest_flat_keys(PostprocessConfig, dict(values)))
        check_ranges(config, name="postprocess")
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    return config


def load_postprocess(path: Path) -> PostprocessConfig:
    """Read a ``postprocess.yaml`` (see :class:`PostprocessConfig`); raises ``ConfigError`` naming the file and the key."""
    return postprocess_from_dict(
        read_yaml_mapping(Path(path), what="post-processing settings (score_threshold:, shrink:, ...)"), where=str(path)
    )


def save_postprocess(config: PostprocessConfig, path: Path, *, comment: str = "") -> None:
    """Write ``config`` as YAML atomically, after ``comment`` lines (how it was tuned), so that it loads back equal."""
    header = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    write_text_atomic(Path(path), header + yaml.safe_dump(flattened(config), sort_keys=False))


# --- the steps ----------------------------------------------------------------------------------


def fuse_passes(
    passes: Sequence[Prediction],
    *,
    width: int,
    height: int,
    weights: Sequence[float],
    iou_thr: float,
    skip_box_thr: float,
    conf_type: str = "finders",
    min_support: float = 0.0,
) -> Prediction:
    """Weighted boxes fusion of several predictions of one ``width`` x ``height`` image (XYWH_ABS in its pixels).

    Fusion works in fractions of the image; coordinates are clipped to it first. See
    :mod:`lungdet.submission.fusion` for ``conf_type``; fused boxes found by less than
    ``min_support`` of the (weighted) passes are dropped.
    """
    if len(passes) != len(weights):
        raise ValueError(f"got {len(weights)} weights for {len(passes)} passes")
    scale = np.array([width, height, width, height], dtype=np.float64)
    fused = fuse_boxes(
        [xywh_to_xyxy(prediction.boxes) / scale for prediction in passes],
        [prediction.scores for prediction in passes],
        weights=weights,
        iou_thr=iou_thr,
        skip_box_thr=skip_box_thr,
        conf_type=conf_type,
    )
    # A hair under the share, so that 'half of the passes' keeps a box two of four found despite float rounding.
    kept = fused.support >= min_support - 1e-9
    return Prediction.from_arrays(
        fused.scores[kept].clip(0.0, 1.0), xyxy_to_xywh(as_box_array(fused.boxes[kept]) * scale)
    )


def shrink_boxes(prediction: Prediction, *, factor: float) -> Prediction:
    """Scale each XYWH_ABS box's width and height by ``factor`` about its centre; confidences unchanged."""
    boxes = prediction.boxes.copy()
    boxes[:, 0] += boxes[:, 2] * (1.0 - factor) / 2
    boxes[:, 1] += boxes[:, 3] * (1.0 - factor) / 2
    boxes[:, 2:] *= factor
    return Prediction(prediction.scores.copy(), boxes)


def most_confident(prediction: Prediction, *, max_boxes: int) -> Prediction:
    """The ``max_boxes`` most confident boxes (ties: the first given), in descending confidence; all of them when ``max_boxes`` is 0."""
    order = np.argsort(-prediction.scores, kind="stable")
    if max_boxes:
        order = order[:max_boxes]
    return Prediction(prediction.scores[order], prediction.boxes[order])


def mean_probability(rows: Sequence[RawPrediction]) -> float | None:
    """The image-level probability: the mean over the passes that have one, None when none has."""
    values = [row.probability for row in rows if row.probability is not None]
    return float(np.mean(values)) if values else None


def model_order(rows: Sequence[RawPrediction]) -> list[str]:
    """Model names in order of first appearance: the order of ``--checkpoint``, which ``model_weights`` follows."""
    return list(dict.fromkeys(row.model for row in rows))


def merge_image(rows: Sequence[RawPrediction], config: PostprocessConfig, *, models: Sequence[str]) -> Prediction:
    """Step 1 for one image: its passes fused (or its one pass as given), before any cut-off."""
    if len(rows) == 1:
        return rows[0].prediction
    if config.model_weights and len(config.model_weights) != len(models):
        raise ConfigError(
            f"postprocess model_weights has {len(config.model_weights)} weights for {len(models)} models ({', '.join(models)}); "
            "give one per --checkpoint, or none for equal weights"
        )
    weight_of = dict(zip(models, config.model_weights or [1.0] * len(models), strict=True))
    return fuse_passes(
        [row.prediction for row in rows],
        width=rows[0].width,
        height=rows[0].height,
        weights=[weight_of[row.model] for row in rows],
        iou_thr=config.wbf_iou_thr,
        skip_box_thr=config.wbf_skip_box_thr,
        conf_type=config.wbf_conf_type,
        min_support=config.min_support,
    )


def finish_image(merged: Prediction, probability: float | None, config: PostprocessConfig) -> Prediction:
    """Steps 2-5 for one image's merged boxes: gate, cut-off, shrink, cap."""
    if probability is not None and probability < config.gate_threshold:
        return Prediction.empty()
    kept = keep_confident(merged, min_confidence=config.score_threshold)
    if config.shrink != 1.0:
        kept = shrink_boxes(kept, factor=config.shrink)
    return most_confident(kept, max_boxes=config.max_boxes)


# --- calibration and the whole -------------------------------------------------------------------


# predict warns when the boxes per image it kept and tuning's differ by more than this factor either way.
FAR_FROM_EXPECTED_FACTOR = 2.0


@dataclass(frozen=True)
class PostprocessResult:
    """What :func:`apply_postprocess` made: the predictions, the settings as applied, and what calibration did."""

    predictions: dict[str, Prediction]  # patientId -> boxes (XYWH_ABS, original pixels), patients in file order
    applied: PostprocessConfig  # the settings used: the file's, or with calibrated score_threshold and gate_threshold
    calibrated: bool
    note: str  # one line on the calibration, or on why it could not be done; '' when it did not apply
    boxes_per_image: float  # the mean over every image, negatives included

    def expectation_line(self) -> str:
        """'kept B boxes per image (tuning expected E)', '' when the file does not say what tuning expected."""
        if not self.applied.tuning.expected_boxes_per_image:
            return ""
        return f"kept {self.boxes_per_image:.3f} boxes per image (tuning expected {self.applied.tuning.expected_boxes_per_image:.3f})"

    def far_from_expected(self, *, factor: float = FAR_FROM_EXPECTED_FACTOR) -> bool:
        """True when the boxes per image differ from what tuning expected by more than ``factor`` either way."""
        expected = self.applied.tuning.expected_boxes_per_image
        if not expected or not self.predictions:
            return False
        return not expected / factor <= self.boxes_per_image <= expected * factor


def prediction_shape(rows: Sequence[RawPrediction]) -> tuple[int, int]:
    """``(models per image, passes per model)``, the largest over the images: the shape of what gets fused."""
    models: dict[str, set[str]] = {}
    passes: dict[tuple[str, str], int] = {}
    for row in rows:
        models.setdefault(row.patient_id, set()).add(row.model)
        passes[row.patient_id, row.model] = passes.get((row.patient_id, row.model), 0) + 1
    return max(map(len, models.values()), default=0), max(passes.values(), default=0)


def kth_largest_or_beyond(values: np.ndarray, k: int) -> float:
    """A threshold that keeps the ``k`` largest of ``values`` (ties kept too): all of them when ``k >= len``, none when ``k <= 0``."""
    if len(values) == 0 or k >= len(values):
        return float(values.min()) if len(values) else 0.0
    ordered = np.sort(values)[::-1]
    if k <= 0:
        return float(np.nextafter(ordered[0], np.inf))
    return float(ordered[k - 1])


def calibrate(
    config: PostprocessConfig, merged: Mapping[str, Prediction], probabilities: Mapping[str, float | None]
) -> PostprocessConfig:
    """``config`` with its gate and cut-off re-derived on ``merged`` (fused, not yet cut) to keep tuning's operating point.

    The gate becomes the probability that lets ``expected_gated_share`` of the images with a
    probability through; the cut-off, the confidence that keeps ``expected_boxes_per_image``
    boxes per image over all images, counting only the images the gate lets through and at most
    ``max_boxes`` per image. Ties keep every box they touch. Shrink, cap and fusion are unchanged.
    """
    gate = config.gate_threshold
    known = np.array([value for value in probabilities.values() if value is not None], dtype=np.float64)
    if gate > 0 and len(known):
        gate = min(1.0, kth_largest_or_beyond(known, round(config.tuning.expected_gated_share * len(known))))
    candidates = []
    for patient, prediction in merged.items():
        probability = probabilities.get(patient)
        if probability is not None and probability < gate:
            continue
        scores = np.sort(prediction.scores)[::-1]
        candidates.append(scores[: config.max_boxes] if config.max_boxes else scores)
    scores = np.concatenate(candidates) if candidates else np.zeros(0)
    cut_off = min(1.0, kth_largest_or_beyond(scores, round(config.tuning.expected_boxes_per_image * len(merged))))
    return dataclasses.replace(config, score_threshold=cut_off, gate_threshold=gate)


def apply_postprocess(rows: Sequence[RawPrediction], config: PostprocessConfig) -> PostprocessResult:
    """Raw predictions -> a :class:`PostprocessResult`: fused and finished image by image (re-derived on the batch only with ``calibration: batch``)."""
    models = model_order(rows)
    groups = group_by_patient(rows)
    merged = {patient_id: merge_image(group, config, models=models) for patient_id, group in groups.items()}
    probabilities = {patient_id: mean_probability(group) for patient_id, group in groups.items()}
    applied, calibrated, note = config, False, ""
    if config.calibration == LEGACY_CALIBRATION:
        applied = dataclasses.replace(config, calibration="off")
        note = (
            "calibration: auto (a file tuned by an older lungdet) is read as off: the settings apply image by image; "
            "set calibration: batch, or pass --batch-calibration, to re-derive them on each batch (it assumes the training set's share of positives)"
        )
    elif config.calibration == "batch":
        applied, calibrated, note = calibrate_batch(config, merged, probabilities)
    predictions = {
        patient_id: finish_image(merged[patient_id], probabilities[patient_id], applied) for patient_id in groups
    }
    boxes = sum(len(prediction.scores) for prediction in predictions.values())
    return PostprocessResult(predictions, applied, calibrated, note, boxes / len(predictions) if predictions else 0.0)


def calibrate_batch(
    config: PostprocessConfig, merged: Mapping[str, Prediction], probabilities: Mapping[str, float | None]
) -> tuple[PostprocessConfig, bool, str]:
    """``calibration: batch``: (settings as applied, whether they were re-derived, one line on what happened)."""
    if not config.tuning.expected_boxes_per_image:
        return (
            config,
            False,
            "calibration: batch needs the operating point lungdet tune writes (expected_boxes_per_image); this file has none, so it is applied as written",
        )
    if len(merged) < MIN_CALIBRATION_IMAGES:
        return (
            config,
            False,
            (
                f"calibration: batch, but only {len(merged)} images: too few to calibrate the cut-offs on (at least {MIN_CALIBRATION_IMAGES}); "
                "they are applied as tuned"
            ),
        )
    applied = calibrate(config, merged, probabilities)
    gate = f", gate {config.gate_threshold:g} -> {applied.gate_threshold:.3f}" if config.gate_threshold > 0 else ""
    note = (
        f"batch calibration (assumes this batch has the training set's share of positives): cut-off {config.score_threshold:g} -> "
        f"{applied.score_threshold:.3f}{gate}, to keep tuning's {config.tuning.expected_boxes_per_image:.3f} boxes per image"
    )
    moved = max(
        abs(applied.score_threshold - config.score_threshold), abs(applied.gate_threshold - config.gate_threshold)
    )
    if moved > FAR_CALIBRATION_MOVE:
        note += (
            f"; warning: that moves a setting by {moved:.2f}, far from the tuned value: if this batch's share of positives differs from "
            "the training set's, drop --batch-calibration"
        )
    return applied, True, note


def postprocess(rows: Sequence[RawPrediction], config: PostprocessConfig) -> dict[str, Prediction]:
    """Raw predictions -> ``{patientId: Prediction}`` ready for ``write_submission``, patients in file order (see :func:`apply_postprocess`)."""
    return apply_postprocess(rows, config).predictions
