"""One HTML page that shows where a submission's score is lost: ``lungdet score --html report.html``.

Figures (matplotlib, embedded in the page as PNG, so the report is one file):

- precision at each IoU threshold of the metric;
- mAP against the confidence cut-off, marking the cut-off the submission was written with and the best one;
- the metrics papers report beside the RSNA mAP (:mod:`lungdet.submission.detection_metrics`):
  a table of COCO AP@[.50:.95], AP50, AP40, the FROC score and its points, image AUC and ECE,
  each with its interval, and the FROC curve;
- with image probabilities (``--probabilities``): the ROC curve with its AUC, and a reliability
  diagram (predicted probability against the observed share of positive images, in ten bins,
  with the ECE);

then the slice table (``--by``), and the 20 worst images with their score, misses and false
alarms, each linked to its overlay PNG when ``--overlays`` names the folder ``lungdet
visualize`` wrote.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungdet.atomic import write_text_atomic
from lungdet.show.draw import DISCLAIMER, judge_image
from lungdet.show.figures import figure_to_png, new_figure
from lungdet.show.pages import render_page
from lungdet.submission.detection_metrics import (
    CALIBRATION_BINS,
    DetectionMetrics,
    calibration_bins,
    froc_sensitivities,
)
from lungdet.submission.postprocess import PostprocessConfig
from lungdet.submission.prediction_string import Prediction
from lungdet.submission.score import ScoreReport, SliceReport, roc_auc, roc_curve
from lungdet.submission.tune import build_table, image_scores, mean_score

CUT_OFFS = tuple(round(float(value), 3) for value in np.arange(0.0, 0.951, 0.025))
WORST_COUNT = 20
RELIABILITY_BINS = CALIBRATION_BINS  # the same bins as the ECE, so the diagram shows what the number sums


@dataclass(frozen=True)
class ImageRow:
    """One image in the worst-images table."""

    patient_id: str
    score: float
    truth: int
    predicted: int
    missed: int
    false_alarms: int


def cut_off_curve(
    truth: Mapping[str, np.ndarray], predictions: Mapping[str, Prediction], cut_offs: Sequence[float] = CUT_OFFS
) -> list[tuple[float, float]]:
    """``(cut-off, mAP)`` for each cut-off: the submission's boxes at or above it, scored (fast: see :mod:`lungdet.submission.tune`)."""
    patients = list(truth)
    merged = {patient: predictions.get(patient, Prediction.empty()) for patient in patients}
    table = build_table(merged, truth, dict.fromkeys(patients), patients, shrink=1.0)
    return [
        (cut_off, mean_score(image_scores(table, PostprocessConfig(score_threshold=cut_off)))) for cut_off in cut_offs
    ]


def worst_images(
    truth: Mapping[str, np.ndarray], predictions: Mapping[str, Prediction], *, count: int = WORST_COUNT
) -> list[ImageRow]:
    """The ``count`` scored images with the lowest RSNA score (ties: the most errors first, then patientId)."""
    rows = []
    for patient, boxes in truth.items():
        prediction = predictions.get(patient, Prediction.empty())
        judged = judge_image(boxes, prediction)
        if judged["score"] is None:
            continue
        rows.append(
            ImageRow(
                patient, judged["score"], len(boxes), len(prediction.scores), judged["missed"], judged["false_alarms"]
            )
        )
    rows.sort(key=lambda row: (row.score, -(row.missed + row.false_alarms), row.patient_id))
    return rows[:count]


@dataclass(frozen=True)
class EmbeddedFigure:
    """A figure the page embeds as a base64 PNG, with its title (also the image's alt text) and caption."""

    title: str
    png: bytes
    caption: str = ""

    @property
    def png_base64(self) -> str:
        """The PNG as base64 ASCII, for a ``data:image/png`` address."""
        return base64.b64encode(self.png).decode("ascii")


def plot_precision_per_threshold(report: ScoreReport) -> bytes:
    """PNG bar chart of the mean precision TP/(TP+FP+FN) at each IoU threshold of the metric, the mAP as a line."""
    figure = new_figure(6.0, 3.2)
    axes = figure.add_subplot()
    thresholds = [summary.iou_threshold for summary in report.per_threshold]
    precisions = [summary.mean_precision for summary in report.per_threshold]
    axes.bar([f"{value:.2f}" for value in thresholds], precisions, color="#4a7fb5")
    axes.axhline(report.map, color="#b35c00", linestyle="--", label=f"mAP {report.map:.3f}")
    axes.set_xlabel("IoU threshold")
    axes.set_ylabel("mean precision TP/(TP+FP+FN)")
    axes.set_ylim(0, max(1e-3, max(precisions + [report.map]) * 1.15))
    axes.legend(loc="upper right")
    return figure_to_png(figure)


def plot_cut_off_curve(curve: Sequence[tuple[float, float]], *, used: float) -> bytes:
    """PNG of mAP against cut-off from ``curve`` (:func:`cut_off_curve`), marking the cut-off ``used`` and the best."""
    figure = new_figure(6.0, 3.2)
    axes = figure.add_subplot()
    cut_offs, maps = zip(*curve, strict=True)
    axes.plot(cut_offs, maps, marker="o", markersize=3, color="#4a7fb5")
    best = max(curve, key=lambda point: point[1])
    axes.axvline(used, color="#b35c00", linestyle="--", label=f"this submission: >= {used:g}")
    axes.plot(
        [best[0]],
        [best[1]],
        marker="*",
        markersize=12,
        color="#1d6b34",
        linestyle="none",
        label=f"best: {best[0]:g} (mAP {best[1]:.3f})",
    )
    axes.set_xlabel("confidence cut-off")
    axes.set_ylabel("mAP")
    axes.legend(loc="best")
    return figure_to_png(figure)


def plot_roc(labels: Sequence[bool], probabilities: Sequence[float]) -> bytes:
    """PNG ROC curve of image probabilities in [0, 1] against ``labels`` (True: an opacity), its AUC in the legend."""
    figure = new_figure(4.2, 4.0)
    axes = figure.add_subplot()
    false_rates, true_rates, _ = roc_curve(labels, probabilities)
    auc = roc_auc(labels, probabilities)
    axes.plot(false_rates, true_rates, color="#4a7fb5", label=f"AUC {auc:.3f}" if auc is not None else "AUC n/a")
    axes.plot([0, 1], [0, 1], color="#999999", linestyle=":")
    axes.set_xlabel("false positive rate (1 - specificity)")
    axes.set_ylabel("true positive rate (sensitivity)")
    axes.legend(loc="lower right")
    return figure_to_png(figure)


def reliability_bins(
    labels: Sequence[bool], probabilities: Sequence[float], *, bins: int = RELIABILITY_BINS
) -> list[tuple[float, float, int]]:
    """``(mean probability, share of positive images, images)`` per non-empty bin of width 1/``bins`` (the ECE's bins)."""
    return calibration_bins(labels, probabilities, bins=bins)


def plot_reliability(labels: Sequence[bool], probabilities: Sequence[float], *, ece: float | None = None) -> bytes:
    """PNG reliability diagram: each :func:`reliability_bins` bin's mean probability against its share of positives.

    Each point is labelled with its bin's image count; ``ece``, when given, goes in the legend.
    """
    figure = new_figure(4.2, 4.0)
    axes = figure.add_subplot()
    points = reliability_bins(labels, probabilities)
    axes.plot([0, 1], [0, 1], color="#999999", linestyle=":", label="perfectly calibrated")
    label = "this model" if ece is None else f"this model (ECE {ece:.3f})"
    axes.plot([p for p, _, _ in points], [s for _, s, _ in points], marker="o", color="#4a7fb5", label=label)
    for predicted, observed, count in points:
        axes.annotate(str(count), (predicted, observed), fontsize=7, xytext=(3, -9), textcoords="offset points")
    axes.set_xlabel("predicted probability (bin mean)")
    axes.set_ylabel("share of images with an opacity")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.legend(loc="upper left")
    return figure_to_png(figure)


def plot_froc(metrics: DetectionMetrics) -> bytes:
    """Sensitivity against false positives per image (log scale), as the FROC score reads it, its points with their intervals."""
    froc = metrics.froc
    figure = new_figure(6.0, 3.4)
    axes = figure.add_subplot()
    fp_per_image, sensitivity = froc.curve
    rates = np.geomspace(froc.fp_rates[0] / 2, froc.fp_rates[-1] * 2, 200)
    axes.plot(
        rates, froc_sensitivities(fp_per_image, sensitivity, rates), color="#4a7fb5", label="interpolated as MONAI"
    )
    points = np.asarray(froc.sensitivities)
    if froc.sensitivity_intervals is not None and all(interval is not None for interval in froc.sensitivity_intervals):
        low = points - np.array([interval[0] for interval in froc.sensitivity_intervals])
        high = np.array([interval[1] for interval in froc.sensitivity_intervals]) - points
        axes.errorbar(
            froc.fp_rates,
            points,
            yerr=np.clip([low, high], 0, None),
            fmt="o",
            color="#b35c00",
            capsize=3,
            label=f"FROC points (score {froc.score:.3f})",
        )
    else:
        axes.plot(froc.fp_rates, points, "o", color="#b35c00", label=f"FROC points (score {froc.score:.3f})")
    reached = float(fp_per_image[-1])
    if reached < rates[-1]:
        axes.axvline(
            max(reached, rates[0]), color="#999999", linestyle=":", label=f"all boxes kept: {reached:.2f} FP per image"
        )
    axes.set_xscale("log", base=2)
    axes.set_xticks(froc.fp_rates, [f"{rate:g}" for rate in froc.fp_rates])
    axes.set_xlabel(f"false positives per image (IoU > {froc.iou_threshold:g} is a hit)")
    axes.set_ylabel("sensitivity (truth boxes hit)")
    axes.set_ylim(0, 1.02)
    axes.legend(loc="lower right")
    return figure_to_png(figure)


def _value(value: float | None, interval: tuple[float, float] | None, reason: str | None = None) -> tuple[str, str]:
    """(value, interval) cells: 'n/a' with the reason when undefined."""
    if value is None:
        return f"n/a ({reason})" if reason else "n/a", ""
    return f"{value:.4f}", f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""


def _metric_row(name: str, cells: tuple[str, str], note: str) -> dict[str, str]:
    return {"name": name, "value": cells[0], "interval": cells[1], "note": note}


def metrics_section(metrics: DetectionMetrics) -> dict[str, object]:
    """What the section "Beside the RSNA metric" shows below the RSNA row: each figure with its interval and convention, the FROC points and curve."""
    coco, froc = metrics.coco, metrics.froc
    rows = [
        _metric_row(
            "COCO AP@[.50:.95]",
            _value(coco.ap, coco.ap_interval, coco.reason),
            f"COCOeval, mean of AP at IoU ≥ 0.50, 0.55, ..., 0.95; 101 recall points; maxDets {coco.max_detections}",
        ),
        _metric_row("COCO AP50", _value(coco.ap50, coco.ap50_interval, coco.reason), "COCOeval AP at IoU ≥ 0.50"),
        _metric_row(
            "COCO AP40",
            _value(coco.ap40, coco.ap40_interval, coco.reason),
            "COCOeval AP at IoU ≥ 0.40 (VinDr-CXR's convention)",
        ),
        _metric_row(
            "FROC score",
            _value(froc.score, froc.score_interval, froc.reason),
            f"mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 false positives per image; a hit is IoU > {froc.iou_threshold:g}, each truth box hit once",
        ),
    ]
    if metrics.probabilities is not None:
        probability = metrics.probabilities
        rows += [
            _metric_row(
                "image AUC",
                _value(probability.auc, probability.auc_interval, probability.auc_reason),
                f"image probability against 'has a truth box', {probability.n_images:,} images",
            ),
            _metric_row(
                f"ECE ({probability.bins} bins)",
                _value(probability.ece, probability.ece_interval),
                "sum over equal-width bins of the bin's share of images × |share positive − mean probability|",
            ),
        ]
    froc_points = None
    if froc.sensitivities is not None:
        froc_points = {
            "rates": froc.fp_rates,
            "sensitivities": froc.sensitivities,
            "intervals": froc.sensitivity_intervals,
            "curve": EmbeddedFigure("FROC curve", plot_froc(metrics)),
        }
    return {
        "rows": rows,
        "counts": f"{metrics.n_images:,}",
        "truth_boxes": f"{metrics.n_truth_boxes:,}",
        "predicted_boxes": f"{metrics.n_predicted_boxes:,}",
        "froc": froc_points,
    }


def _interval(report: ScoreReport) -> str:
    return f" [{report.map_interval[0]:.3f}, {report.map_interval[1]:.3f}]" if report.map_interval else ""


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _probability_figures(
    probabilities: tuple[list[bool], list[float]], metrics: DetectionMetrics | None
) -> list[EmbeddedFigure]:
    ece = metrics.probabilities.ece if metrics is not None and metrics.probabilities is not None else None
    return [
        EmbeddedFigure(
            "Image-level ROC",
            plot_roc(*probabilities),
            "How well the image-level probability separates images with an opacity from those without.",
        ),
        EmbeddedFigure(
            "Reliability",
            plot_reliability(*probabilities, ece=ece),
            "Predicted probability against how often it came true, in ten bins (counts beside the points); the ECE sums each "
            "bin's gap to the diagonal, weighted by its share of images.",
        ),
    ]


def _slice_rows(slices: Sequence[SliceReport]) -> list[dict[str, object]]:
    return [
        {
            "by": item.by,
            "value": item.value,
            "map": f"{item.report.map:.3f}{_interval(item.report)}",
            "sensitivity": _fraction(item.report.sensitivity),
            "specificity": _fraction(item.report.specificity),
            "images": item.report.n_images,
        }
        for item in slices
    ]


def render_score_report(
    *,
    report: ScoreReport,
    curve: Sequence[tuple[float, float]],
    used_cut_off: float,
    slices: Sequence[SliceReport],
    worst: Sequence[ImageRow],
    files: ReportFiles,
    probabilities: tuple[list[bool], list[float]] | None = None,
    overlay_link: str | None = None,
    metrics: DetectionMetrics | None = None,
) -> str:
    """The page; ``overlay_link`` is the overlays folder relative to the page (None: no links); ``metrics`` (None: no section) go beside the mAP."""
    figures = [
        EmbeddedFigure(
            "Precision at each IoU threshold",
            plot_precision_per_threshold(report),
            "The metric averages these eight; a drop at the high thresholds means boxes in the right place but of the wrong size.",
        ),
        EmbeddedFigure(
            "mAP against the confidence cut-off",
            plot_cut_off_curve(curve, used=used_cut_off),
            "Boxes below a cut-off are dropped before scoring; the metric scores any box on a clear image 0, so the cut-off matters as much as the model.",
        ),
    ]
    return render_page(
        "score_report.html.j2",
        title="lungdet score report",
        heading="lungdet score report",
        disclaimer=DISCLAIMER,
        notice="These figures describe a model on a data set, for research; they say nothing about any one patient.",
        submission=files.submission,
        labels=files.labels,
        report=report,
        interval=_interval(report),
        rsna_interval=f"[{report.map_interval[0]:.4f}, {report.map_interval[1]:.4f}]" if report.map_interval else "",
        mean_iou=_fraction(report.mean_iou),
        sensitivity=_fraction(report.sensitivity),
        specificity=_fraction(report.specificity),
        figures=figures,
        metrics=metrics_section(metrics) if metrics is not None else None,
        probability_figures=_probability_figures(probabilities, metrics) if probabilities is not None else [],
        slices=_slice_rows(slices),
        worst=worst,
        overlay_link=overlay_link,
    )


@dataclass(frozen=True)
class ReportFiles:
    """The files the page names: the submission and labels scored, and the folder ``lungdet visualize`` wrote (None: no links)."""

    submission: Path
    labels: Path
    overlays: Path | None = None


def write_score_report(
    path: Path,
    *,
    report: ScoreReport,
    truth: Mapping[str, np.ndarray],
    predictions: Mapping[str, Prediction],
    slices: Sequence[SliceReport],
    files: ReportFiles,
    min_confidence: float = 0.0,
    probabilities: Mapping[str, float] | None = None,
    metrics: DetectionMetrics | None = None,
) -> None:
    """Compute the curve and the worst images and write the page atomically to ``path``; ``metrics`` (None: left out) go beside the mAP."""
    kept = [score for prediction in predictions.values() for score in prediction.scores.tolist()]
    used = max(min_confidence, min(kept)) if kept else min_confidence
    pairs = None
    if probabilities:
        known = [patient for patient in truth if patient in probabilities]
        pairs = ([len(truth[patient]) > 0 for patient in known], [probabilities[patient] for patient in known])
    overlay_link = None
    if files.overlays is not None:
        overlay_link = Path(os.path.relpath(Path(files.overlays).resolve(), Path(path).resolve().parent)).as_posix()
    page = render_score_report(
        report=report,
        curve=cut_off_curve(truth, predictions),
        used_cut_off=used,
        slices=slices,
        worst=worst_images(truth, predictions),
        files=files,
        probabilities=pairs,
        overlay_link=overlay_link,
        metrics=metrics,
    )
    write_text_atomic(Path(path), page)
