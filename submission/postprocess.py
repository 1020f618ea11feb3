"""Post-processing of raw predictions into a submission, and the typed ``postprocess.yaml`` that holds its settings.

For each image, in this order:

1. **fuse** every pass of every model (``plain``, ``hflip``; several checkpoints) with weighted
   boxes fusion from the ``ensemble-boxes`` package (``wbf_iou_thr``, ``wbf_skip_box_thr``,
   ``model_weights``); a lone pass is left as it is;
2. **gate**: drop every box of an image whose image-level probability (the mean over passes
   that have one) is below ``gate_threshold``;
3. keep boxes with confidence at least ``score_threshold``;
4. **shrink** each box's width and height by ``shrink`` about its centre (the 2018 winners
   shrank to 0.875: models draw opacities wider than the readers did);
5. keep at most ``max_boxes``, the most confident.

Everything here works on numpy arrays and is tested without torch. ``lungdet predict
--postprocess FILE`` applies a file, ``lungdet tune`` writes one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from data_tools.atomic import write_text_atomic
from data_tools.boxes import as_box_array, xywh_to_xyxy, xyxy_to_xywh
from data_tools.errors import ConfigError
from data_tools.typed_config import RangeRule, build_dataclass, check_ranges, read_yaml_mapping
from submission.prediction_string import Prediction, keep_confident
from submission.raw_predictions import RawPrediction, group_by_patient


@dataclass
class PostprocessConfig:
    """How raw predictions become a submission (see the module docstring for the order)."""

    score_threshold: float = 0.5  # keep boxes with at least this confidence, after fusion and gating
    gate_threshold: float = 0.0  # drop all boxes of an image whose image-level probability is below this (0 = no gating; ignored for models without an image head)
    wbf_iou_thr: float = 0.55  # weighted boxes fusion: boxes of different passes or models overlapping more than this become one
    wbf_skip_box_thr: float = 0.0  # weighted boxes fusion: boxes under this confidence are left out before fusing
    model_weights: list[float] = field(default_factory=list)  # weight of each model in the fusion, in --checkpoint order (empty = equal)
    shrink: float = 1.0  # scale each box's width and height about its centre (1 = unchanged; the 2018 winners used 0.875)
    max_boxes: int = 0  # keep at most this many boxes per image, most confident first (0 = no limit; RSNA images have at most 4)


_RANGE_RULES: list[RangeRule] = [
    ("score_threshold", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ("gate_threshold", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ("wbf_iou_thr", lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    ("wbf_skip_box_thr", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("model_weights", lambda v: all(weight > 0 for weight in v), "a list of positive weights (or empty for equal weights)"),
    ("shrink", lambda v: 0.5 <= v <= 1.5, "in [0.5, 1.5]"),
    ("max_boxes", lambda v: v >= 0, ">= 0 (0 = no limit)"),
]


def postprocess_from_dict(values: Mapping[str, object], *, where: str = "postprocess") -> PostprocessConfig:
    """Build and check a :class:`PostprocessConfig`; unknown keys get a suggestion, values a range."""
    try:
        config = build_dataclass(PostprocessConfig, dict(values))
        check_ranges(config, _RANGE_RULES, name="postprocess")
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    return config


def load_postprocess(path: Path) -> PostprocessConfig:
    """Read a ``postprocess.yaml`` (see :class:`PostprocessConfig`); raises ``ConfigError`` naming the file and the key."""
    return postprocess_from_dict(read_yaml_mapping(Path(path), what="post-processing settings (score_threshold:, shrink:, ...)"), where=str(path))


def save_postprocess(config: PostprocessConfig, path: Path, *, comment: str = "") -> None:
    """Write ``config`` as YAML atomically, after ``comment`` lines (how it was tuned), so that it loads back equal."""
    header = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    write_text_atomic(Path(path), header + yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


# --- the steps ----------------------------------------------------------------------------------


def fuse_passes(
    passes: Sequence[Prediction], *, width: int, height: int, weights: Sequence[float], iou_thr: float, skip_box_thr: float
) -> Prediction:
    """Weighted boxes fusion of several predictions of one ``width`` x ``height`` image (XYWH_ABS in its pixels).

    Fusion works in fractions of the image, as ``ensemble-boxes`` wants; coordinates are clipped
    to it first. A box found by only some of the passes keeps a share of its confidence in
    proportion to their weight ('avg'), so agreement between models raises a box.
    """
    from ensemble_boxes import weighted_boxes_fusion  # imported here: it loads numba, which only fusion needs

    if len(passes) != len(weights):
        raise ValueError(f"got {len(weights)} weights for {len(passes)} passes")
    scale = np.array([width, height, width, height], dtype=np.float64)
    boxes_list, scores_list, labels_list = [], [], []
    for prediction in passes:
        boxes_list.append((xywh_to_xyxy(prediction.boxes) / scale).clip(0.0, 1.0).tolist())
        scores_list.append(prediction.scores.tolist())
        labels_list.append([0] * len(prediction.scores))
    if not any(scores_list):
        return Prediction.empty()
    boxes, scores, _ = weighted_boxes_fusion(
        boxes_list, scores_list, labels_list, weights=list(weights), iou_thr=iou_thr, skip_box_thr=skip_box_thr
    )
    return Prediction.from_arrays(np.asarray(scores, dtype=np.float64).clip(0.0, 1.0), xyxy_to_xywh(as_box_array(boxes) * scale))


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
        [row.prediction for row in rows], width=rows[0].width, height=rows[0].height, weights=[weight_of[row.model] for row in rows],
        iou_thr=config.wbf_iou_thr, skip_box_thr=config.wbf_skip_box_thr,
    )


def finish_image(merged: Prediction, probability: float | None, config: PostprocessConfig) -> Prediction:
    """Steps 2-5 for one image's merged boxes: gate, cut-off, shrink, cap."""
    if probability is not None and probability < config.gate_threshold:
        return Prediction.empty()
    kept = keep_confident(merged, min_confidence=config.score_threshold)
    if config.shrink != 1.0:
        kept = shrink_boxes(kept, factor=config.shrink)
    return most_confident(kept, max_boxes=config.max_boxes)


def postprocess(rows: Sequence[RawPrediction], config: PostprocessConfig) -> dict[str, Prediction]:
    """Raw predictions -> ``{patientId: Prediction}`` ready for ``write_submission``, patients in file order."""
    models = model_order(rows)
    return {
        patient_id: finish_image(merge_image(group, config, models=models), mean_probability(group), config)
        for patient_id, group in group_by_patient(rows).items()
    }
