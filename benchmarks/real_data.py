"""lungdet on 1,000 real RSNA radiographs: cross-validation on 800, every figure on the 200 held out (a benchmark, not a test).

One command (``make benchmark-real``) from ``../shared/data/rsna_real`` to a table:

1. **prepare**: the seeded 800 / 200 split (``benchmarks/rsna_real_split.csv``), each side converted
   with ``lungdet convert --image-dir`` (the 800 with 5 patient-level folds, their view, sex, age
   and RSNA class);
2. **cv**: ``lungdet cv`` over the folds with ``--tta`` (out-of-fold predictions of the 800; with
   ``--final`` also a model on all 800), then ``lungdet tune`` on them: the post-processing file,
   tuned on nothing held out;
3. **holdout**: every model, with every TTA pass, on the 200 held-out JPEGs (their tags from
   ``metadata.csv``), once;
4. **report**, each held-out figure with its 95% bootstrap interval over patients: the RSNA mAP
   first, then COCO AP@[.50:.95] and AP40, the FROC score, sensitivity and specificity, and the
   image AUC and ECE where the step has probabilities:

   - the naive priors: the 800's median left and right lung box on every image, and on the
     positives only (what a perfect image classifier with no localisation would score);
   - the winners' path, a step at a time: the single model (fold 0), + TTA, + 5-fold fusion,
     + gating, + tuned post-processing, + shrink (the README's cv -> tune -> predict recipe),
     + the final model (with ``--final``), and the final model alone;
   - the recipe with the package's 'avg' fusion, and with 'avg' + batch calibration (the
     earlier default), with the boxes per image each keeps against what tuning saw;
   - where the loss goes: the same boxes kept on the true positives only (a perfect image-level
     decision), against the figure with the model's own decision;
   - slices by view, sex and age band; the score report's HTML and a worst-first overlay gallery;
   - the learning curves of every fold (``report/learning_curves.png``, written after the cv stage).

With ``--stages cv --folds 0,1`` it stops after the out-of-fold summary of those folds: the
recipe search, which never touches the held-out side (``--search-table`` appends a row).

Run: ``.venv/bin/python benchmarks/real_data.py --work runs/real [--config fasterrcnn_mobilenet_real_cpu] [--tta PASSES] [--final] [KEY=VALUE ...]``
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import io
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lungdet.atomic import write_bytes_atomic
from lungdet.data_tools.image_io import find_images
from lungdet.data_tools.labels import read_labels
from lungdet.detection.config import load_config
from lungdet.detection.cv import OOF_FILE, OOF_LABELS_FILE, SUMMARY_FILE, parse_folds
from lungdet.detection.cv import get_args_parser as cv_parser
from lungdet.detection.cv import main as cv_main
from lungdet.detection.detector import load_detector
from lungdet.detection.ensemble import predict_raw
from lungdet.detection.folds import FINAL_DIR, fold_dir
from lungdet.detection.prepared_images import read_any_input
from lungdet.detection.real_data import RealSet, load_split, lung_prior_boxes, prepare, prior_predictions, real_data_dir
from lungdet.detection.train import BEST_CHECKPOINT
from lungdet.detection.tta import tta_argument
from lungdet.show.figures import figure_to_png, new_figure
from lungdet.show.score_cli import get_args_parser as score_parser
from lungdet.show.score_cli import main as score_main
from lungdet.show.visualize import worst_first, write_overlays
from lungdet.submission.detection_metrics import score_detection_metrics
from lungdet.submission.postprocess import PostprocessConfig, apply_postprocess, load_postprocess, save_postprocess
from lungdet.submission.prediction_string import Prediction, write_submission
from lungdet.submission.raw_predictions import read_raw_predictions, write_raw_predictions
from lungdet.submission.score import (
    BOOTSTRAP_DRAWS,
    read_slice_metadata,
    roc_auc,
    score_dataset,
    score_slices,
    write_probabilities,
)
from lungdet.submission.tune import tune_postprocess
from lungdet.typed_config import flattened

DEFAULT_CONFIG = "fasterrcnn_mobilenet_real_cpu"
DEFAULT_TTA = "hflip,scale0.8,scale1.2"
STAGES = ("prepare", "cv", "holdout", "report")
HOLDOUT_RAW = "holdout_raw.csv"
TIMINGS = "timings.json"


def record_time(work: Path, stage: str, seconds: float) -> None:
    path = work / TIMINGS
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[stage] = round(seconds, 1)
    path.write_text(json.dumps(timings, indent=1))


def oof_auc(rows, truth) -> float | None:
    """Image-level AUC of the plain passes' probabilities against whether the image has a box."""
    plain = {
        row.patient_id: row.probability for row in rows if row.pass_name == "plain" and row.probability is not None
    }
    patients = [patient for patient in plain if patient in truth]
    return (
        roc_auc([len(truth[patient]) > 0 for patient in patients], [plain[patient] for patient in patients])
        if patients
        else None
    )


def run_cv(args: argparse.Namespace, cv_data: Path, work: Path) -> dict:
    """``lungdet cv`` (resumable) then ``lungdet tune``; returns the out-of-fold figures."""
    started = time.time()
    cv_args = [
        "--config",
        args.config,
        "--data",
        str(cv_data),
        "--out",
        str(work / "cv"),
        "--tta",
        args.tta,
        "--no-progress",
    ]
    if args.folds:
        cv_args += ["--folds", ",".join(map(str, args.folds))]
    if args.final:
        cv_args.append("--final")
    cv_main(cv_parser().parse_args([*cv_args, *args.overrides]))
    record_time(work, "cv", time.time() - started)
    rows = read_raw_predictions(work / "cv" / OOF_FILE)
    truth = {patient: labels.boxes for patient, labels in read_labels(work / "cv" / OOF_LABELS_FILE).items()}
    tuned = tune_postprocess(rows, truth)
    save_postprocess(
        tuned.config,
        work / "cv" / "postprocess.yaml",
        comment=f"benchmarks/real_data.py: lungdet tune on {work / 'cv' / OOF_FILE}",
    )
    summary = json.loads((work / "cv" / SUMMARY_FILE).read_text())
    return {
        "oof_map": summary["oof_map"],
        "oof_map_interval": summary["oof_map_interval"],
        "oof_images": summary["n_images"],
        "oof_auc": oof_auc(rows, truth),
        "tuned_honest": tuned.honest,
        "tuned_honest_interval": tuned.honest_interval,
        "tuned": flattened(tuned.config),
        "fold_train_minutes": {fold: training_minutes(fold_dir(work / "cv", int(fold))) for fold in summary["folds"]},
        "fold_metrics": {fold: epoch_curve(fold_dir(work / "cv", int(fold))) for fold in summary["folds"]},
    }


def training_minutes(run_dir: Path) -> float:
    """Wall minutes of a run's epochs (training and validation), from its metrics.csv."""
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as stream:
        return sum(float(row["seconds"]) for row in csv.DictReader(stream)) / 60


def epoch_curve(run_dir: Path) -> list[dict]:
    """Per epoch: the loss and its parts, validation mAP and AUC (the learning curve)."""
    keep = (
        "epoch",
        "loss",
        "loss_box_reg",
        "loss_classifier",
        "loss_image",
        "loss_objectness",
        "loss_rpn_box_reg",
        "val_map",
        "val_auc",
    )
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as stream:
        return [
            {key: float(row[key]) for key in keep if row.get(key) not in (None, "")} for row in csv.DictReader(stream)
        ]


def plot_learning_curves(fold_metrics: dict, path: Path) -> None:
    """Per fold, by epoch: the training loss, validation mAP and validation image AUC, as one PNG."""
    figure = new_figure(12, 3.6)
    panels = figure.subplots(1, 3)
    for fold, curve in sorted(fold_metrics.items()):
        epochs = [row["epoch"] for row in curve]
        for panel, key in zip(panels, ("loss", "val_map", "val_auc"), strict=True):
            panel.plot(epochs, [row.get(key, np.nan) for row in curve], marker=".", label=f"fold {fold}")
    for panel, title in zip(
        panels, ("training loss", "validation RSNA mAP (each fold's 160)", "validation image AUC"), strict=True
    ):
        panel.set_title(title, fontsize=10)
        panel.set_xlabel("epoch")
        panel.grid(alpha=0.3)
    panels[0].legend(fontsize=8)
    write_bytes_atomic(path, figure_to_png(figure))


def holdout_models(work: Path, folds: list[int], *, final: bool) -> dict[str, Path]:
    """The models the held-out images are predicted with: every fold's, and the final one when cv trained it."""
    models = {f"fold{fold}": fold_dir(work / "cv", fold) / BEST_CHECKPOINT for fold in folds}
    if final:
        models[FINAL_DIR] = work / "cv" / FINAL_DIR / BEST_CHECKPOINT
    return models


def predict_holdout(work: Path, prepared, models: dict[str, Path], *, tta: str) -> list:
    """Every model, with every TTA pass, on the held-out images, cached in ``holdout_raw.csv``."""
    path = work / HOLDOUT_RAW
    if path.is_file():
        return read_raw_predictions(path)
    started = time.time()
    detectors = [load_detector(checkpoint, device="cpu") for checkpoint in models.values()]
    rows, bad = predict_raw(
        detectors,
        list(models),
        find_images(prepared.holdout_images),
        read=read_any_input,
        tags=prepared.holdout_tags,
        tta=tta,
        progress=False,
    )
    if bad:
        raise SystemExit(f"unreadable held-out images: {bad}")
    write_raw_predictions(path, rows)
    record_time(work, "holdout_predict", time.time() - started)
    return rows


def score_step(truth, predictions, *, probabilities: dict[str, float] | None = None, seed: int = 0) -> dict:
    """The RSNA mAP and, beside it, what papers report (COCO AP, AP40, FROC; AUC and ECE with probabilities), each with its interval."""
    report = score_dataset(truth, predictions, bootstrap_draws=BOOTSTRAP_DRAWS, seed=seed)
    metrics = score_detection_metrics(
        truth, predictions, probabilities=probabilities, bootstrap_draws=BOOTSTRAP_DRAWS, seed=seed
    )
    boxes = sum(len(prediction.scores) for prediction in predictions.values())
    step = {
        "map": report.map,
        "interval": report.map_interval,
        "mean_iou": report.mean_iou,
        "sensitivity": report.sensitivity,
        "specificity": report.specificity,
        "boxes_per_image": boxes / max(1, len(predictions)),
        "coco_ap": metrics.coco.ap,
        "coco_ap_interval": metrics.coco.ap_interval,
        "coco_ap40": metrics.coco.ap40,
        "coco_ap40_interval": metrics.coco.ap40_interval,
        "froc": metrics.froc.score,
        "froc_interval": metrics.froc.score_interval,
    }
    if metrics.probabilities is not None:
        step.update(
            auc=metrics.probabilities.auc,
            auc_interval=metrics.probabilities.auc_interval,
            ece=metrics.probabilities.ece,
            ece_interval=metrics.probabilities.ece_interval,
        )
    return step


def image_probabilities(rows: list, models: set[str] | None = None) -> dict[str, float]:
    """Each image's probability: the mean over the rows (of ``models``) that carry one, as post-processing gates on it."""
    values: dict[str, list[float]] = {}
    for row in rows:
        if row.probability is not None and (models is None or row.model in models):
            values.setdefault(row.patient_id, []).append(row.probability)
    return {patient: float(np.mean(found)) for patient, found in values.items()}


def report_holdout(
    args: argparse.Namespace, work: Path, prepared, rows: list, folds: list[int], models: dict[str, Path]
) -> dict:
    """Every held-out figure: priors, the single model, the path step by step, the recipe against its alternatives, slices."""
    real = RealSet(args.real_dir)
    split = load_split(real)
    labels = read_labels(real.labels_csv)
    truth = {patient: labels[patient].boxes for patient in prepared.holdout_patients}
    positives = {patient for patient in truth if len(truth[patient])}
    prior = lung_prior_boxes({patient: labels[patient] for patient, side in split.items() if side == "cv"})
    detectors = {name: load_detector(path, device="cpu") for name, path in models.items()}
    fold_names = [f"fold{fold}" for fold in folds]
    cut_offs = [detectors[name].score_threshold for name in fold_names]
    image_cut_offs = [
        detectors[name].image_threshold for name in fold_names if detectors[name].image_threshold is not None
    ]
    tuned = load_postprocess(work / "cv" / "postprocess.yaml")
    first = fold_names[0]
    single_plain = [row for row in rows if row.model == first and row.pass_name == "plain"]
    single_tta = [row for row in rows if row.model == first]
    folds_only = [row for row in rows if row.model in fold_names]
    passes = sorted({row.pass_name for row in rows} - {"plain"})
    tta = f" + TTA {'+'.join(passes)}" if passes else ""
    steps = {
        "1 single model (fold 0), its own cut-off": (single_plain, PostprocessConfig(score_threshold=cut_offs[0])),
        f"2{tta or ' (no TTA)'}, same cut-off": (single_tta, PostprocessConfig(score_threshold=cut_offs[0])),
        "3 + 5-fold fusion (finders), the folds' mean cut-off": (
            folds_only,
            PostprocessConfig(score_threshold=float(np.mean(cut_offs))),
        ),
        "4 + gating at the folds' mean image cut-off": (
            folds_only,
            PostprocessConfig(
                score_threshold=float(np.mean(cut_offs)),
                gate_threshold=float(np.mean(image_cut_offs)) if image_cut_offs else 0.0,
            ),
        ),
        "5 + tuned post-processing, no shrink": (folds_only, dataclasses.replace(tuned, shrink=1.0)),
        "6 + shrink: the README recipe (cv -> tune -> predict)": (folds_only, tuned),
        "control: single model + tuned post-processing": (single_tta, tuned),
        "alternative: the package's 'avg' fusion, as tuned": (
            folds_only,
            dataclasses.replace(tuned, wbf_conf_type="avg"),
        ),
        "alternative: 'avg' fusion + batch calibration (the earlier default)": (
            folds_only,
            dataclasses.replace(tuned, wbf_conf_type="avg", calibration="batch"),
        ),
    }
    if FINAL_DIR in models:
        steps["7 + the final model on every image (6 models)"] = (rows, tuned)
        steps["the final model alone, tuned post-processing"] = ([row for row in rows if row.model == FINAL_DIR], tuned)
    recipe_name = "6 + shrink: the README recipe (cv -> tune -> predict)"
    results: dict[str, dict] = {
        "prior: median lung boxes on every image": score_step(truth, prior_predictions(truth, prior)),
        "prior: median lung boxes on the positives only (a perfect classifier)": score_step(
            truth, prior_predictions(truth, prior, only=positives)
        ),
    }
    kept = {}
    for name, (step_rows, config) in steps.items():
        result = apply_postprocess(step_rows, config)
        kept[name] = result
        probabilities = image_probabilities(step_rows) or None
        results[name] = {
            **score_step(truth, result.predictions, probabilities=probabilities),
            "calibration": result.note,
            "expected_boxes_per_image": config.tuning.expected_boxes_per_image or None,
            "applied": {
                "score_threshold": result.applied.score_threshold,
                "gate_threshold": result.applied.gate_threshold,
            },
        }
    # Where the loss goes: the same boxes with a perfect image-level decision (kept on the true positives only).
    for name in ("1 single model (fold 0), its own cut-off", recipe_name):
        oracle = {
            patient: prediction if patient in positives else Prediction.empty()
            for patient, prediction in kept[name].predictions.items()
        }
        results[f"diagnostic: {name.split(':')[0].split(',')[0]}, boxes on the true positives only"] = score_step(
            truth, oracle
        )
    metadata = read_slice_metadata(prepared.holdout_data / "annotations.json")
    slices = {}
    for name in ("1 single model (fold 0), its own cut-off", recipe_name):
        slices[name] = [
            {
                "by": item.by,
                "value": item.value,
                "map": item.report.map,
                "interval": item.report.map_interval,
                "images": item.report.n_images,
            }
            for item in score_slices(
                truth,
                kept[name].predictions,
                metadata,
                ["view_position", "sex", "age_band"],
                bootstrap_draws=BOOTSTRAP_DRAWS,
            )
        ]
    # Pages to look at: the recipe's submission scored with figures, and the held-out gallery worst first.
    report_dir = work / "report"
    report_dir.mkdir(exist_ok=True)
    for tag, name, probability in (
        ("single", "1 single model (fold 0), its own cut-off", image_probabilities(single_plain)),
        ("recipe", recipe_name, image_probabilities(folds_only)),
    ):
        write_submission(
            report_dir / f"submission_{tag}.csv",
            {patient: kept[name].predictions[patient] for patient in sorted(truth)},
        )
        if probability:
            write_probabilities(
                report_dir / f"probabilities_{tag}.csv", {patient: probability[patient] for patient in sorted(truth)}
            )
        overlays = report_dir / f"overlays_{tag}"
        write_overlays(
            worst_first(find_images(prepared.holdout_images), truth, kept[name].predictions),
            overlays,
            labels={patient: labels[patient] for patient in truth},
            predictions=kept[name].predictions,
            max_size=512,
        )
        score_args = [
            "--submission",
            str(report_dir / f"submission_{tag}.csv"),
            "--labels",
            str(prepared.holdout_labels_csv),
            "--html",
            str(report_dir / f"score_{tag}.html"),
            "--metadata",
            str(prepared.holdout_data / "annotations.json"),
            "--by",
            "view_position,sex,age_band",
            "--overlays",
            str(overlays),
        ]
        if probability:
            score_args += ["--probabilities", str(report_dir / f"probabilities_{tag}.csv")]
        with contextlib.redirect_stdout(io.StringIO()):  # its table repeats what the report prints
            score_main(score_parser().parse_args(score_args))
    return {"steps": results, "slices": slices, "tuned": dataclasses.asdict(tuned)}


def interval_text(value: float | None, interval) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def format_table(results: dict) -> str:
    lines = [
        "| held-out (200 real radiographs) | RSNA mAP [95% interval] | COCO AP | AP40 | FROC | image AUC | ECE | sens. / spec. | boxes per image (tuning expected) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, step in results["steps"].items():
        expected = f" ({step['expected_boxes_per_image']:.3f})" if step.get("expected_boxes_per_image") else ""
        auc = f"{step['auc']:.3f}" if step.get("auc") is not None else ""
        ece = f"{step['ece']:.3f}" if step.get("ece") is not None else ""
        sensitivity = f"{step['sensitivity']:.2f} / {step['specificity']:.2f}"
        lines.append(
            f"| {name} | {interval_text(step['map'], step['interval'])} | {step['coco_ap'] or 0:.4f} | {step['coco_ap40'] or 0:.4f} | "
            f"{step['froc'] or 0:.3f} | {auc} | {ece} | {sensitivity} | {step['boxes_per_image']:.3f}{expected} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", type=Path, required=True, help="folder for the converted data, the cv runs and the report (resumable)"
    )
    parser.add_argument(
        "--real-dir", type=Path, default=real_data_dir(), help=f"the rsna_real folder (default {real_data_dir()})"
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"training config for every fold (default {DEFAULT_CONFIG})"
    )
    parser.add_argument(
        "--normalize", choices=("none", "clahe", "equalize"), default="none", help="convert's --normalize for the 800"
    )
    parser.add_argument(
        "--folds", type=parse_folds, default=None, help="folds to run (default all 5); fewer for the recipe search"
    )
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated stages to run, of {', '.join(STAGES)}"
    )
    parser.add_argument(
        "--tta",
        type=tta_argument,
        default=DEFAULT_TTA,
        help=f"TTA passes for the out-of-fold and held-out predictions, as lungdet predict's (default {DEFAULT_TTA})",
    )
    parser.add_argument(
        "--final",
        action="store_true",
        help="lungdet cv --final: also a model on all 800, predicted on the 200 beside the folds",
    )
    parser.add_argument(
        "--search-table", type=Path, help="with --stages cv: append this run's out-of-fold row to this Markdown file"
    )
    parser.add_argument("--label", default="", help="what this run tries, for --search-table")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides for every fold (model.image_head=true is always added)",
    )
    args = parser.parse_args()
    args.overrides = ["model.image_head=true", *args.overrides]
    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    started = time.time()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config, args.overrides)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    prepared = prepare(
        RealSet(args.real_dir), work, image_size=config.model.image_size, normalization=args.normalize, progress=False
    )
    folds = args.folds or [0, 1, 2, 3, 4]
    out: dict = {
        "command": command,
        "date": str(datetime.date.today()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    if "cv" in stages:
        out["cv"] = run_cv(args, prepared.cv_data, work)
        cv = out["cv"]
        (work / "report").mkdir(exist_ok=True)
        plot_learning_curves(cv["fold_metrics"], work / "report" / "learning_curves.png")
        minutes = float(np.mean(list(cv["fold_train_minutes"].values())))
        print(
            f"out-of-fold ({cv['oof_images']} images, folds {folds}): mAP {cv['oof_map']:.4f} [{cv['oof_map_interval'][0]:.4f}, {cv['oof_map_interval'][1]:.4f}] "
            f"at each fold's cut-off; tuned (honest) {cv['tuned_honest']:.4f}; image AUC {cv['oof_auc']:.3f}; {minutes:.1f} min per fold"
        )
        if args.search_table is not None:
            with open(args.search_table, "a", encoding="utf-8") as stream:
                honest = (
                    f"{cv['tuned_honest']:.4f} [{cv['tuned_honest_interval'][0]:.4f}, {cv['tuned_honest_interval'][1]:.4f}]"
                    if cv["tuned_honest_interval"]
                    else "n/a"
                )
                stream.write(
                    f"| {args.label or ' '.join(args.overrides[1:])} | {cv['oof_map']:.4f} [{cv['oof_map_interval'][0]:.4f}, {cv['oof_map_interval'][1]:.4f}] "
                    f"| {honest} | {cv['oof_auc']:.3f} | {minutes:.1f} |\n"
                )
    if "holdout" in stages or "report" in stages:
        models = holdout_models(work, folds, final=args.final)
        rows = predict_holdout(work, prepared, models, tta=args.tta)
        if "report" in stages:
            out["holdout"] = report_holdout(args, work, prepared, rows, folds, models)
            print(format_table(out["holdout"]))
    out["wall_minutes"] = (time.time() - started) / 60
    (work / "results.json").write_text(json.dumps(out, indent=1, default=str))
    print(
        f"\n{out['date']}, {out['machine']}; {command}; {out['wall_minutes']:.0f} min this run; wrote {work / 'results.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
