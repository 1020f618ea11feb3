"""``lungdet tune``: search the post-processing on out-of-fold predictions, honestly.

Run: ``lungdet tune --oof runs/cv/oof.csv --labels stage_2_train_labels.csv --out postprocess.yaml``

The search is coordinate ascent over :class:`~lungdet.submission.postprocess.PostprocessConfig`: each
parameter in turn takes the value of its grid that scores best with the others held, until a
round changes nothing. Gating is searched only when the predictions carry image probabilities,
fusion only when an image has several passes or models.

Scores come from a table per (fusion, shrink) setting: for every image, its boxes in descending
confidence and its RSNA score with the first k of them, for every k. The metric's greedy
matching takes boxes in that order, so the first k boxes match exactly as they would alone;
a cut-off, a gate or a cap only chooses k. One table costs one pass of the metric, and each
candidate cut-off then costs a few array operations (tested equal to post-processing and
scoring for real).

Tuning on the predictions it is scored on flatters it. With a ``fold`` column (``lungdet cv``
writes one), each fold is scored with settings tuned on the other folds only, and that pooled
figure is reported as the honest one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lungdet.boxes import as_box_array, iou_matrix_xywh
from lungdet.data_tools.labels import read_labels
from lungdet.errors import SubmissionError
from lungdet.submission.postprocess import (
    OperatingPoint,
    PostprocessConfig,
    mean_probability,
    merge_image,
    model_order,
    prediction_shape,
    save_postprocess,
    shrink_boxes,
)
from lungdet.submission.prediction_string import Prediction
from lungdet.submission.raw_predictions import RawPrediction, group_by_patient, read_raw_predictions
from lungdet.submission.score import BOOTSTRAP_DRAWS, RSNA_IOU_THRESHOLDS, bootstrap_interval, match_by_iou
from lungdet.typed_config import flattened

NEUTRAL = PostprocessConfig()
GRIDS: dict[str, tuple[Any, ...]] = {
    "score_threshold": tuple(round(float(value), 3) for value in np.arange(0.05, 0.951, 0.025)),
    "gate_threshold": tuple(round(float(value), 3) for value in np.arange(0.0, 0.951, 0.05)),
    "shrink": tuple(round(float(value), 3) for value in np.arange(0.75, 1.051, 0.025)),
    "max_boxes": (1, 2, 3, 4, 0),  # 0 = no cap: the most boxes, so last
    "wbf_iou_thr": (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7),
    "wbf_skip_box_thr": (0.0, 0.01, 0.02, 0.05, 0.1),
    "min_support": (0.0, 0.5, 1.0),  # out of fold a model's two passes: any, or both
}
MAX_ROUNDS = 4
# Settings that switch a step on: when off scores as well as on, they stay off.
OFF_WHEN_TIED = {"gate_threshold", "max_boxes", "min_support"}


@dataclass(frozen=True)
class PrefixTable:
    """Every image's score as a function of how many of its most confident boxes are kept.

    ``scores`` is ``[N, M]`` box confidences in descending order, padded with -inf; ``table`` is
    ``[N, M + 1]``, the image's RSNA score keeping its first k boxes (NaN where that leaves an
    image with no truth and no box: out of the mean); ``probability`` is ``[N]``, NaN without one.
    """

    scores: np.ndarray
    table: np.ndarray
    probability: np.ndarray


def prefix_scores(truth_boxes: np.ndarray, sorted_boxes: np.ndarray) -> np.ndarray:
    """``[P + 1]`` RSNA scores of an image keeping its first k predicted boxes (given in descending confidence), k = 0..P."""
    truth = as_box_array(truth_boxes)
    n_truth, n_predicted = truth.shape[0], sorted_boxes.shape[0]
    kept = np.arange(n_predicted + 1)
    if n_truth == 0:
        scores = np.zeros(n_predicted + 1)
        scores[0] = np.nan
        return scores
    iou = iou_matrix_xywh(sorted_boxes, truth)
    precisions = []
    for threshold in RSNA_IOU_THRESHOLDS:
        hits = np.zeros(n_predicted + 1)
        for row, _ in match_by_iou(iou, iou_threshold=threshold):
            hits[row + 1 :] += 1
        precisions.append(hits / (kept + n_truth - hits))
    return np.mean(precisions, axis=0)


def build_table(
    merged: Mapping[str, Any],
    truth: Mapping[str, np.ndarray],
    probabilities: Mapping[str, float | None],
    patients: Sequence[str],
    *,
    shrink: float,
) -> PrefixTable:
    """The :class:`PrefixTable` of ``patients``' merged predictions (``{patientId: Prediction}``), boxes shrunk by ``shrink``."""
    width = max([len(merged[patient].scores) for patient in patients] + [0])
    scores = np.full((len(patients), width), -np.inf)
    table = np.full((len(patients), width + 1), np.nan)
    for index, patient in enumerate(patients):
        prediction = merged[patient]
        order = np.argsort(-prediction.scores, kind="stable")
        sorted_prediction = shrink_boxes(Prediction(prediction.scores[order], prediction.boxes[order]), factor=shrink)
        count = len(order)
        scores[index, :count] = sorted_prediction.scores
        row = prefix_scores(truth[patient], sorted_prediction.boxes)
        table[index, : count + 1] = row
        table[index, count + 1 :] = row[-1]  # a cut-off can never keep more boxes than the image has
    probability = np.array(
        [np.nan if probabilities[patient] is None else probabilities[patient] for patient in patients]
    )
    return PrefixTable(scores=scores, table=table, probability=probability)


def kept_counts(table: PrefixTable, config: PostprocessConfig) -> np.ndarray:
    """How many boxes each image keeps under ``config``'s cut-off, gate and cap."""
    kept = (table.scores >= config.score_threshold).sum(axis=1)
    if config.max_boxes:
        kept = np.minimum(kept, config.max_boxes)
    gated = ~np.isnan(table.probability) & (table.probability < config.gate_threshold)
    return np.where(gated, 0, kept)


def image_scores(table: PrefixTable, config: PostprocessConfig) -> np.ndarray:
    """``[N]`` image scores under ``config`` (NaN for an image out of the mean)."""
    return table.table[np.arange(len(table.table)), kept_counts(table, config)]


def mean_score(scores: np.ndarray) -> float:
    """The metric's mean: over scored images, 0.0 when none is."""
    scored = scores[~np.isnan(scores)]
    return float(scored.mean()) if scored.size else 0.0


class Tuner:
    """Raw predictions and truth for one set of patients, with their prefix tables cached by (fusion, shrink)."""

    def __init__(
        self, rows: Sequence[RawPrediction], truth: Mapping[str, np.ndarray], *, progress: bool = False
    ) -> None:
        groups = group_by_patient(rows)
        self.patients = [patient for patient in groups if patient in truth]
        self.groups = groups
        self.truth = truth
        self.models = model_order(rows)
        self.multi_pass = any(len(groups[patient]) > 1 for patient in self.patients)
        self.probabilities = {patient: mean_probability(groups[patient]) for patient in self.patients}
        self.has_probabilities = any(value is not None for value in self.probabilities.values())
        self.folds = np.array(
            [-1 if groups[patient][0].fold is None else groups[patient][0].fold for patient in self.patients]
        )
        self.progress = progress
        self._merged: dict[tuple[float, float, float], dict[str, Any]] = {}
        self._tables: dict[tuple[float, float, float, float], PrefixTable] = {}

    def table(self, config: PostprocessConfig) -> PrefixTable:
        """The :class:`PrefixTable` for ``config``'s fusion and shrink, built once and cached.

        The fusion settings count only when an image has several passes or models.
        """
        fusion = (
            (config.wbf_iou_thr, config.wbf_skip_box_thr, config.min_support) if self.multi_pass else (0.0, 0.0, 0.0)
        )
        key = (*fusion, config.shrink)
        if key not in self._tables:
            if fusion not in self._merged:
                self._merged[fusion] = {
                    patient: merge_image(self.groups[patient], config, models=self.models) for patient in self.patients
                }
            self._tables[key] = build_table(
                self._merged[fusion], self.truth, self.probabilities, self.patients, shrink=config.shrink
            )
        return self._tables[key]

    def score(self, config: PostprocessConfig, subset: np.ndarray | None = None) -> float:
        """The RSNA mean score under ``config`` of ``subset`` (a boolean mask over ``self.patients``; all when None)."""
        scores = image_scores(self.table(config), config)
        return mean_score(scores if subset is None else scores[subset])

    def searched(self) -> list[str]:
        """The parameters worth searching for these predictions."""
        names = ["score_threshold", "shrink", "max_boxes"]
        if self.has_probabilities:
            names.insert(1, "gate_threshold")
        if self.multi_pass:
            names += ["wbf_iou_thr", "wbf_skip_box_thr", "min_support"]
        return names

    def tune(self, subset: np.ndarray | None = None, *, start: PostprocessConfig | None = None) -> PostprocessConfig:
        """Coordinate ascent on ``subset`` of the patients (all by default).

        When several values of a parameter score the same best, the middle one of them is taken:
        the centre of a plateau is the setting least likely to fall off it on new images. A gate
        or a cap that does not help is left off instead, and a parameter whose every value
        scores the same keeps its value.
        """
        best = dataclasses.replace(start or NEUTRAL)
        best_score = self.score(best, subset)
        for _ in range(MAX_ROUNDS):
            improved = False
            for name in tqdm(
                self.searched(), desc="tune", unit="parameter", disable=None if self.progress else True, leave=False
            ):
                scores = [self.score(dataclasses.replace(best, **{name: value}), subset) for value in GRIDS[name]]
                top = max(scores)
                tied = [value for value, score in zip(GRIDS[name], scores, strict=True) if score >= top - 1e-12]
                improved |= top > best_score + 1e-12
                neutral = getattr(NEUTRAL, name)
                if len(tied) == len(GRIDS[name]):  # the predictions say nothing about this parameter: leave it
                    choice = getattr(best, name)
                elif name in OFF_WHEN_TIED and neutral in tied:
                    choice = neutral
                else:
                    choice = tied[len(tied) // 2]
                best, best_score = dataclasses.replace(best, **{name: choice}), top
            if not improved:
                break
        return best


def with_operating_point(config: PostprocessConfig, tuner: Tuner, rows: Sequence[RawPrediction]) -> PostprocessConfig:
    """``config`` with what it did on the tuning predictions written in: their shape, the gate's share and the boxes per image.

    ``lungdet predict`` calibrates to these when it fuses more models than tuning saw, and
    compares its own boxes per image with them (see :mod:`lungdet.submission.postprocess`).
    """
    models, passes = prediction_shape(rows)
    table = tuner.table(config)
    probability = table.probability
    with_probability = ~np.isnan(probability)
    gated_share = (
        float((probability[with_probability] >= config.gate_threshold).mean())
        if config.gate_threshold > 0 and with_probability.any()
        else 1.0
    )
    tuning = OperatingPoint(
        tuned_models_per_image=models,
        tuned_passes_per_model=passes,
        expected_gated_share=round(gated_share, 6),
        expected_boxes_per_image=round(float(kept_counts(table, config).mean()), 6),
    )
    return dataclasses.replace(config, tuning=tuning)


@dataclass(frozen=True)
class TuneReport:
    """What ``lungdet tune`` found; mAPs are over the out-of-fold patients."""

    config: PostprocessConfig
    n_patients: int
    before: float  # the neutral settings: cut-off 0.5, nothing else
    after: float  # the tuned settings, tuned and scored on the same predictions (optimistic)
    honest: float | None  # each fold scored with settings tuned on the other folds; None without folds
    honest_interval: tuple[float, float] | None
    honest_per_fold: dict[int, float]
    effects: dict[str, float]  # each searched parameter: mAP lost when it alone goes back to neutral

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (what ``--json`` prints), ``config`` laid out as in postprocess.yaml."""
        return {**dataclasses.asdict(self), "config": flattened(self.config)}


def tune_postprocess(
    rows: Sequence[RawPrediction],
    truth: Mapping[str, np.ndarray],
    *,
    progress: bool = False,
    bootstrap_draws: int = BOOTSTRAP_DRAWS,
) -> TuneReport:
    """Tune on all of ``rows`` (patients also in ``truth``), and score honestly by rotating over their folds when they have them."""
    tuner = Tuner(rows, truth, progress=progress)
    if not tuner.patients:
        raise SubmissionError(
            "none of the raw predictions' patients is in the labels; are they predictions of these labels' images?"
        )
    tuned = with_operating_point(tuner.tune(), tuner, rows)
    honest = interval = None
    per_fold: dict[int, float] = {}
    folds = sorted(set(tuner.folds.tolist()) - {-1})
    if len(folds) >= 2 and not (tuner.folds == -1).any():
        pooled = np.full(len(tuner.patients), np.nan)
        for fold in folds:
            held_out = tuner.folds == fold
            fold_config = tuner.tune(~held_out)
            scores = image_scores(tuner.table(fold_config), fold_config)
            pooled[held_out] = scores[held_out]
            per_fold[fold] = mean_score(scores[held_out])
        honest = mean_score(pooled)
        interval = bootstrap_interval(pooled, draws=bootstrap_draws) if bootstrap_draws else None
    effects = {
        name: tuner.score(tuned) - tuner.score(dataclasses.replace(tuned, **{name: getattr(NEUTRAL, name)}))
        for name in tuner.searched()
    }
    return TuneReport(
        config=tuned,
        n_patients=len(tuner.patients),
        before=tuner.score(NEUTRAL),
        after=tuner.score(tuned),
        honest=honest,
        honest_interval=interval,
        honest_per_fold=per_fold,
        effects=effects,
    )


def format_tune_report(report: TuneReport) -> str:
    """The report as text: the mAPs before, tuned and honest, each tuned setting's effect, and the operating point."""
    lines = [
        f"out-of-fold patients   {report.n_patients}",
        f"mAP before             {report.before:.4f}   (cut-off 0.5, nothing else)",
        f"mAP tuned              {report.after:.4f}   (tuned and scored on the same predictions: optimistic)",
    ]
    if report.honest is not None:
        interval = (
            f" [{report.honest_interval[0]:.4f}, {report.honest_interval[1]:.4f}]" if report.honest_interval else ""
        )
        folds = ", ".join(f"fold {fold} {value:.4f}" for fold, value in report.honest_per_fold.items())
        lines.append(f"mAP honest             {report.honest:.4f}{interval}   (each fold tuned on the others: {folds})")
    else:
        lines.append(
            "mAP honest             n/a   (no fold column: run lungdet cv for out-of-fold predictions with folds)"
        )
    lines += ["", "tuned setting          value    mAP lost without it"]
    for name, effect in report.effects.items():
        lines.append(f"{name:<22} {getattr(report.config, name)!s:<8} {effect:+.4f}")
    config = report.config
    lines += [
        "",
        f"operating point        {config.tuning.expected_boxes_per_image:.3f} boxes per image, gate lets {config.tuning.expected_gated_share:.0%} of images through "
        f"({config.tuning.tuned_models_per_image} model(s) x {config.tuning.tuned_passes_per_model} pass(es) per image)",
        "                       lungdet predict applies these image by image; it warns when its boxes per image are far from this",
    ]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``lungdet tune``."""
    parser = argparse.ArgumentParser(
        prog="lungdet tune",
        description="Search the post-processing (cut-off, gating, shrink, box cap, fusion) on out-of-fold raw predictions and "
        "write postprocess.yaml for lungdet predict --postprocess.",
        epilog="example: lungdet tune --oof runs/cv/oof.csv --labels stage_2_train_labels.csv --out runs/cv/postprocess.yaml",
    )
    parser.add_argument(
        "--oof",
        type=Path,
        required=True,
        help="raw predictions: lungdet cv's oof.csv, or lungdet predict --raw on labelled images",
    )
    parser.add_argument("--labels", type=Path, required=True, help="RSNA labels CSV with the truth for those patients")
    parser.add_argument("--out", type=Path, required=True, help="postprocess.yaml to write")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet tune`` with parsed arguments; returns the exit status (0 on success).

    Writes ``--out`` and prints the report; patients of ``--oof`` not in ``--labels`` are left out, with a warning.
    """
    rows = read_raw_predictions(args.oof)
    labels = read_labels(args.labels)
    truth = {patient_id: patient.boxes for patient_id, patient in labels.items()}
    unknown = len({row.patient_id for row in rows} - set(truth))
    report = tune_postprocess(rows, truth, progress=not args.no_progress)
    comment = (
        f"lungdet tune on {args.oof} ({report.n_patients} patients) against {args.labels}\n"
        f"mAP before {report.before:.4f}, tuned {report.after:.4f} (optimistic), "
        + (
            f"honest {report.honest:.4f} (each fold tuned on the others)"
            if report.honest is not None
            else "no honest figure (no folds)"
        )
    )
    save_postprocess(report.config, args.out, comment=comment)
    if unknown:
        print(
            f"warning: {unknown} patient(s) in {args.oof} are not in {args.labels}; they were left out", file=sys.stderr
        )
    print(json.dumps(report.to_dict()) if args.json else f"{format_tune_report(report)}\n\nwrote {args.out}")
    return 0
