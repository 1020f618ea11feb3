"""``lungdet demo``: the whole pipeline on an embedded default, on CPU, in a few minutes.

1. ``synth``: synthetic RSNA-shaped DICOMs (JPEG Baseline, 1024x1024) with known opacity boxes;
2. ``convert``: COCO dataset at 256 px with patient-level folds;
3. ``train``: MobileNetV3-FPN Faster R-CNN (``configs/fasterrcnn_mobilenet_cpu.yaml``), time-boxed;
4. ``predict`` + ``score``: on a held-out synthetic set, and on the real RSNA sample DICOMs when
   ``../shared/data/rsna_sample`` (or ``--sample-dir``) is there;
5. ``visualize``: overlays of truth and predicted boxes, with an index.html.

Everything goes under ``--out`` (default ``demo_output/`` in the current folder).

``lungdet demo --real`` runs the same stages on 1,000 real RSNA radiographs instead
(``../shared/data/rsna_real``, or ``--real-dir``): the 800 cross-validation patients of the
written split converted, one model trained with ``configs/fasterrcnn_mobilenet_real_cpu.yaml``
on four of their folds (the fifth validates and sets the cut-offs), then the 200 held-out
patients, which nothing was tuned on, predicted, scored with a 95% interval, reported
(``lungdet score --html``) and drawn worst first. It takes about as long as that config trains.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from pathlib import Path

import torch

from lungdet.atomic import write_text_atomic
from lungdet.data_tools.conversion_report import format_report
from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.image_io import find_images
from lungdet.data_tools.labels import read_labels
from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.data_tools.to_coco import ConvertOptions, convert_dataset
from lungdet.detection.config import load_config
from lungdet.detection.detector import Detector, load_detector, load_trained_model
from lungdet.detection.ensemble import predict_dicoms, predict_raw
from lungdet.detection.prepared_images import read_any_input
from lungdet.detection.real_data import PreparedRealData, RealSet, prepare, real_data_dir, shared_data_dir
from lungdet.detection.runtime import resolve_precision
from lungdet.detection.train import BEST_CHECKPOINT, train
from lungdet.show.score_cli import format_detection_metrics
from lungdet.show.score_cli import get_args_parser as score_parser
from lungdet.show.score_cli import main as score_main
from lungdet.show.visualize import worst_first, write_overlays
from lungdet.submission.detection_metrics import DetectionMetrics, score_detection_metrics
from lungdet.submission.postprocess import PostprocessConfig, apply_postprocess
from lungdet.submission.prediction_string import write_submission
from lungdet.submission.score import BOOTSTRAP_DRAWS, ScoreReport, score_dataset, write_probabilities

DEMO_CONFIG = "fasterrcnn_mobilenet_cpu"
REAL_CONFIG = "fasterrcnn_mobilenet_real_cpu"
REAL_DEMO_DURATION = "about 13 minutes on 2 cores"
# Half positives instead of the real 23%: a few CPU minutes need enough boxes to learn from.
DEMO_POSITIVE_FRACTION = 0.5


def predict_and_score(
    model: torch.nn.Module,
    checkpoint: dict,
    dicom_dir: Path,
    labels_csv: Path,
    out_dir: Path,
    *,
    name: str,
    image_size: int,
) -> ScoreReport:
    """Predict every DICOM in ``dicom_dir`` at the checkpoint's tuned cut-off, write ``submission_{name}.csv``, score it, draw overlays."""
    paths = find_dicoms(dicom_dir)
    predictions, _ = predict_dicoms(
        model,
        paths,
        image_size=image_size,
        device=torch.device("cpu"),
        score_threshold=float(checkpoint["score_threshold"]),
        preprocessing=checkpoint.get("preprocessing"),
        progress=False,
        precision=resolve_precision("auto", torch.device("cpu")),
    )
    write_submission(
        out_dir / f"submission_{name}.csv", {patient_id: predictions[patient_id] for patient_id in sorted(predictions)}
    )
    # Score only the patients whose DICOMs are here: the sample labels file lists 26,684 patients.
    labels = {patient_id: value for patient_id, value in read_labels(labels_csv).items() if patient_id in predictions}
    report = score_dataset(
        {patient_id: value.boxes for patient_id, value in labels.items()}, predictions, bootstrap_draws=BOOTSTRAP_DRAWS
    )
    write_text_atomic(out_dir / f"score_{name}.json", json.dumps(report.to_dict(), indent=2))
    write_overlays(paths, out_dir / f"overlays_{name}", labels=labels, predictions=predictions)
    return report


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``lungdet demo``."""
    parser = argparse.ArgumentParser(
        prog="lungdet demo",
        description="Run synth -> convert -> train -> predict -> score -> visualize on CPU in a few minutes.",
        epilog="example: lungdet demo --out demo_output --minutes 3",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo_output"),
        help="folder for everything the demo writes (default: ./demo_output)",
    )
    parser.add_argument("--count", type=int, default=300, help="synthetic training DICOMs to generate (default 300)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="cap training at this many minutes (default 0: run the config's 7 epochs, about 3 minutes on 2 cores; "
        "a cap makes the score depend on machine speed)",
    )
    parser.add_argument(
        "--sample-dir",
        type=Path,
        default=shared_data_dir() / "rsna_sample",
        help="real RSNA sample folder (stage_2_train_images/ + stage_2_train_labels.csv; default: rsna_sample in "
        "$LUNGDET_SHARED_DATA, else ../shared/data from the current folder)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for data, folds and training (default 0)")
    parser.add_argument(
        "--real",
        action="store_true",
        help=f"instead: train {REAL_CONFIG} on the 800 cross-validation patients of 1,000 real RSNA radiographs and score the 200 held out "
        f"({REAL_DEMO_DURATION}; --out defaults to demo_real_output)",
    )
    parser.add_argument(
        "--real-dir",
        type=Path,
        default=None,
        help="the rsna_real folder (images/, labels.csv, class_info.csv, metadata.csv); default: rsna_real in "
        "$LUNGDET_SHARED_DATA, else ../shared/data from the current folder",
    )
    return parser


def real_main(args: argparse.Namespace) -> int:
    """``lungdet demo --real``: convert, train one model, predict, score and draw the real held-out patients."""
    started = time.time()
    out: Path = args.out if args.out != Path("demo_output") else Path("demo_real_output")
    real = RealSet(args.real_dir or real_data_dir())
    print(
        f"lungdet demo --real: a research tool, not a diagnostic device. It takes {REAL_DEMO_DURATION} (measured 2026-12-02), most of it training."
    )
    print(
        f"[1/5] convert the 800 cross-validation patients of {real.root} (the 200 held out are only predicted) -> {out}"
    )
    prepared = prepare(real, out / "data", image_size=load_config(REAL_CONFIG).model.image_size)
    print(format_report(prepared.cv_report, prepared.cv_data))
    print(f"[2/5] train {REAL_CONFIG} on folds 1-4 (640 images), validating on fold 0 (160) -> {out / 'run'}")
    train(load_config(REAL_CONFIG, [f"seed={args.seed}", "data.fold=0"]), prepared.cv_data, out / "run")

    print(f"[3/5] predict the {len(prepared.holdout_patients)} held-out patients (nothing was tuned on them)")
    detector = load_detector(out / "run" / BEST_CHECKPOINT, device="cpu")
    paths = find_images(prepared.holdout_images)
    rows, _ = predict_raw([detector], ["model"], paths, read=read_any_input, tags=prepared.holdout_tags, progress=True)
    result = apply_postprocess(rows, single_model_postprocess(detector))
    labels = read_labels(prepared.holdout_labels_csv)
    truth = {patient: labels[patient].boxes for patient in prepared.holdout_patients}
    write_submission(
        out / "submission_holdout.csv", {patient: result.predictions[patient] for patient in sorted(truth)}
    )
    probabilities = {row.patient_id: row.probability for row in rows if row.probability is not None}
    if probabilities:
        write_probabilities(
            out / "probabilities_holdout.csv", {patient: probabilities[patient] for patient in sorted(truth)}
        )

    print("[4/5] score and draw (worst first)")
    report = score_dataset(truth, result.predictions, bootstrap_draws=BOOTSTRAP_DRAWS)
    write_text_atomic(out / "score_holdout.json", json.dumps(report.to_dict(), indent=2))
    write_overlays(
        worst_first(paths, truth, result.predictions),
        out / "overlays_holdout",
        labels={patient: labels[patient] for patient in truth},
        predictions=result.predictions,
        max_size=512,
    )
    _write_real_score_report(out, prepared, with_probabilities=bool(probabilities))

    minutes = (time.time() - started) / 60
    metrics = score_detection_metrics(
        truth, result.predictions, probabilities=probabilities or None, bootstrap_draws=BOOTSTRAP_DRAWS
    )
    print(f"[5/5] done in {minutes:.0f} min\n")
    _print_real_summary(report, metrics, out)
    return 0


def _write_real_score_report(out: Path, prepared: PreparedRealData, *, with_probabilities: bool) -> None:
    """``lungdet score --html`` on the held-out submission, by view, sex and age band, linked to the overlays."""
    score_args = [
        "--submission",
        str(out / "submission_holdout.csv"),
        "--labels",
        str(prepared.holdout_labels_csv),
        "--html",
        str(out / "score_holdout.html"),
        "--metadata",
        str(prepared.holdout_data / "annotations.json"),
        "--by",
        "view_position,sex,age_band",
        "--overlays",
        str(out / "overlays_holdout"),
    ]
    if with_probabilities:
        score_args += ["--probabilities", str(out / "probabilities_holdout.csv")]
    with contextlib.redirect_stdout(io.StringIO()):
        score_main(score_parser().parse_args(score_args))


def _print_real_summary(report: ScoreReport, metrics: DetectionMetrics, out: Path) -> None:
    """The held-out scores: RSNA mAP with its interval, IoU, sensitivity, specificity, the papers' figures; where the files are."""
    low, high = report.map_interval
    print(
        f"Held-out real RSNA radiographs ({report.n_images} patients, {report.n_positive} with opacities; nothing was tuned on them):"
    )
    print(f"  RSNA mAP {report.map:.4f} [{low:.4f}, {high:.4f}] (95% bootstrap interval over patients)")
    print(
        f"  mean IoU {report.mean_iou if report.mean_iou is None else round(report.mean_iou, 3)}, sensitivity {report.sensitivity:.2f}, "
        f"specificity {report.specificity:.2f}"
    )
    print("\n".join(f"  {line}" for line in format_detection_metrics(metrics).splitlines()))
    print(
        "  (one MobileNet trained from scratch on 640 images on a CPU; the 2018 winners reached about 0.25 with pretrained weights on 26,684 images)"
    )
    print(f"\nWhere things are:\n  run:       {out / 'run'} (best.pt, metrics.csv, config.yaml)")
    print(
        f"  report:    {out / 'score_holdout.html'}\n  overlays:  {out / 'overlays_holdout' / 'index.html'} (worst first)"
    )
    print(f"  submission {out / 'submission_holdout.csv'}")


def single_model_postprocess(detector: Detector) -> PostprocessConfig:
    """How one trained model is applied on its own: the cut-off its validation chose (and nothing the held-out side could tune)."""
    return PostprocessConfig(score_threshold=detector.score_threshold)


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet demo`` with parsed arguments; returns the exit status (0 on success).

    With ``--real`` it is :func:`real_main`; otherwise the five stages run on CPU under ``--out``, and the real RSNA
    sample is predicted and scored too when ``--sample-dir`` holds it.
    """
    if args.real:
        return real_main(args)
    out: Path = args.out
    print("lungdet demo: a research tool, not a diagnostic device.")
    _synthesize_convert_and_train(args, out)

    print(
        "[4/5] predict + score on held-out synthetic DICOMs"
        + (" and the real RSNA sample" if args.sample_dir.is_dir() else "")
    )
    model, config, checkpoint = load_trained_model(out / "run" / BEST_CHECKPOINT, device=torch.device("cpu"))
    threshold = float(checkpoint["score_threshold"])
    held_out = write_synthetic_dataset(
        out / "synth_test", count=40, seed=args.seed + 1, positive_fraction=DEMO_POSITIVE_FRACTION, overwrite=True
    )
    results = {
        "synthetic held-out": predict_and_score(
            model,
            checkpoint,
            held_out.images_dir,
            held_out.labels_csv,
            out,
            name="synth",
            image_size=config.model.image_size,
        )
    }
    sample_images, sample_labels = (
        args.sample_dir / "stage_2_train_images",
        args.sample_dir / "stage_2_train_labels.csv",
    )
    if sample_images.is_dir() and sample_labels.is_file():
        results["real RSNA sample"] = predict_and_score(
            model, checkpoint, sample_images, sample_labels, out, name="real", image_size=config.model.image_size
        )
    else:
        print(f"  (no real sample at {args.sample_dir}; pass --sample-dir to include one)")

    _print_demo_summary(results, threshold, out)
    return 0


def _synthesize_convert_and_train(args: argparse.Namespace, out: Path) -> None:
    """Steps 1-3 of the demo: synthetic DICOMs under ``out``, converted at 256 px, one MobileNet trained on them."""
    print(f"[1/5] synth: {args.count} synthetic DICOMs -> {out / 'synth_train'}")
    synth = write_synthetic_dataset(
        out / "synth_train",
        count=args.count,
        seed=args.seed,
        positive_fraction=DEMO_POSITIVE_FRACTION,
        overwrite=True,
        progress=True,
    )
    print(f"[2/5] convert -> {out / 'coco'}")
    conversion = convert_dataset(
        synth.images_dir,
        read_labels(synth.labels_csv, synth.class_info_csv),
        out / "coco",
        ConvertOptions(image_size=256, seed=args.seed),
        workers=os.cpu_count() or 1,
    )
    print(format_report(conversion, out / "coco"))
    limit = f", at most {args.minutes:g} min" if args.minutes > 0 else ""
    print(f"[3/5] train ({DEMO_CONFIG}{limit}) -> {out / 'run'}")
    config = load_config(DEMO_CONFIG, [f"max_minutes={args.minutes}", f"seed={args.seed}"])
    train(config, out / "coco", out / "run")


def _print_demo_summary(results: dict[str, ScoreReport], threshold: float, out: Path) -> None:
    """Each set's RSNA mAP with its interval, mean IoU and images, at the tuned cut-off; where the files are."""
    print("[5/5] overlays written")
    print(
        f"\nResults (confidence >= {threshold:g}, tuned on validation; mAP with its 95% bootstrap interval over patients):"
    )
    for name, report in results.items():
        iou = f"{report.mean_iou:.3f}" if report.mean_iou is not None else "n/a"
        low, high = report.map_interval
        print(
            f"  {name:<20} RSNA mAP {report.map:.4f} [{low:.4f}, {high:.4f}]  mean IoU {iou}  images {report.n_images}"
        )
    if "real RSNA sample" in results:
        print(
            "  (a model trained minutes on synthetic images is not expected to find real opacities; train on the real set for that)"
        )
    print(f"\nWhere things are:\n  run:         {out / 'run'} (best.pt, metrics.csv, config.yaml)")
    for name in ("synth", "real"):
        if (out / f"submission_{name}.csv").is_file():
            print(
                f"  {name:<12} {out / f'submission_{name}.csv'}, {out / f'score_{name}.json'}, {out / f'overlays_{name}' / 'index.html'}"
            )
