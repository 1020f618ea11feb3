"""What each step after the detector is worth, on synthetic data on the CPU (a benchmark, not a test).

For each seed: synthetic RSNA-shaped DICOMs (the generator's defaults: 22.5% positive, as the
real set), converted at 256 px, ``lungdet cv`` over 5 folds with the CPU config plus the
image-level head and hflip TTA in the out-of-fold predictions, ``lungdet tune`` on those; then
a held-out synthetic set that no step has seen is predicted once by all five models with and
without mirroring, and scored at each step:

1. single model: fold 0's checkpoint, its tuned cut-off;
2. + hflip TTA: the same model, both passes fused (WBF at its defaults);
3. + 5-fold WBF: all five checkpoints, both passes, the mean of their cut-offs;
4. + gating: drop the boxes of images whose mean image probability is below the mean of the
   checkpoints' image cut-offs;
5. + tuned post-processing: the postprocess.yaml that lungdet tune chose on the out-of-fold
   predictions (cut-off, gate, shrink, cap, fusion);

and, as a control, step 1's single model with step 5's file, which tells what tuning gives
from what the ensemble gives.

Each held-out mAP comes with its 95% bootstrap interval. Prints a Markdown table for
docs/benchmarks.md.

Run: ``.venv/bin/python benchmarks/postprocess_ablation.py --seeds 0 1 [--count 400] [--test-count 200] [--epochs 7]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.labels import read_labels
from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.data_tools.to_coco import ConvertOptions, convert_dataset
from lungdet.detection.cv import OOF_FILE, OOF_LABELS_FILE
from lungdet.detection.cv import get_args_parser as cv_parser
from lungdet.detection.cv import main as cv_main
from lungdet.detection.detector import load_detector
from lungdet.detection.ensemble import predict_raw
from lungdet.detection.folds import fold_dir
from lungdet.detection.prepared_images import read_dicom_input
from lungdet.detection.train import BEST_CHECKPOINT
from lungdet.submission.postprocess import PostprocessConfig, postprocess
from lungdet.submission.raw_predictions import read_raw_predictions
from lungdet.submission.score import BOOTSTRAP_DRAWS, score_dataset
from lungdet.submission.tune import tune_postprocess
from lungdet.typed_config import flattened

CONFIG = "fasterrcnn_mobilenet_cpu"
FOLDS = 5


def run_seed(seed: int, workdir: Path, *, count: int, test_count: int, epochs: int) -> dict:
    started = time.time()
    train_set = write_synthetic_dataset(workdir / "synth_train", count=count, seed=seed, progress=False)
    test_set = write_synthetic_dataset(workdir / "synth_test", count=test_count, seed=seed + 1000, progress=False)
    convert_dataset(
        train_set.images_dir,
        read_labels(train_set.labels_csv),
        workdir / "coco",
        ConvertOptions(image_size=256, folds=FOLDS, seed=seed),
        progress=False,
    )
    overrides = [
        "model.pretrained=none",
        "model.image_head=true",
        f"optim.epochs={epochs}",
        f"seed={seed}",
        "max_minutes=0",
    ]
    cv_args = cv_parser().parse_args(
        [
            "--config",
            CONFIG,
            "--data",
            str(workdir / "coco"),
            "--out",
            str(workdir / "cv"),
            "--tta",
            "hflip",
            "--no-progress",
            *overrides,
        ]
    )
    cv_main(cv_args)
    oof = read_raw_predictions(workdir / "cv" / OOF_FILE)
    oof_truth = {patient: labels.boxes for patient, labels in read_labels(workdir / "cv" / OOF_LABELS_FILE).items()}
    tuned = tune_postprocess(oof, oof_truth)

    detectors = [load_detector(fold_dir(workdir / "cv", fold) / BEST_CHECKPOINT, device="cpu") for fold in range(FOLDS)]
    names = [f"fold{fold}" for fold in range(FOLDS)]
    rows, bad = predict_raw(
        detectors, names, find_dicoms(test_set.images_dir), read=read_dicom_input, tta="hflip", progress=False
    )
    assert not bad, bad
    truth = {patient: labels.boxes for patient, labels in read_labels(test_set.labels_csv).items()}
    cut_offs = [detector.score_threshold for detector in detectors]
    image_cut_offs = [detector.image_threshold for detector in detectors]
    fold0 = [row for row in rows if row.model == "fold0"]
    steps = {
        "1 single model (fold 0)": (
            [row for row in fold0 if row.pass_name == "plain"],
            PostprocessConfig(score_threshold=cut_offs[0]),
        ),
        "2 + hflip TTA": (fold0, PostprocessConfig(score_threshold=cut_offs[0])),
        "3 + 5-fold WBF": (rows, PostprocessConfig(score_threshold=float(np.mean(cut_offs)))),
        "4 + gating": (
            rows,
            PostprocessConfig(score_threshold=float(np.mean(cut_offs)), gate_threshold=float(np.mean(image_cut_offs))),
        ),
        "5 + tuned post-processing": (rows, tuned.config),
        # A control, not a step: the tuned file on the single model alone, to tell tuning from ensembling.
        "control: single model + tuned post-processing": (
            [row for row in fold0 if row.pass_name == "plain"],
            tuned.config,
        ),
    }
    results = {}
    for name, (step_rows, config) in steps.items():
        report = score_dataset(truth, postprocess(step_rows, config), bootstrap_draws=BOOTSTRAP_DRAWS, seed=seed)
        results[name] = {"map": report.map, "interval": report.map_interval, "config": flattened(config)}
    summary = json.loads((workdir / "cv" / "summary.json").read_text())
    return {
        "seed": seed,
        "minutes": (time.time() - started) / 60,
        "steps": results,
        "cv_oof_map": summary["oof_map"],
        "tune": {"before": tuned.before, "after": tuned.after, "honest": tuned.honest, "effects": tuned.effects},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--count", type=int, default=400, help="synthetic training DICOMs per seed (5-fold CV over them)"
    )
    parser.add_argument("--test-count", type=int, default=200, help="held-out synthetic DICOMs per seed")
    parser.add_argument("--epochs", type=int, default=7, help="epochs per fold (the CPU config's, as make demo)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"ablation_{seed}_") as folder:
            runs.append(run_seed(seed, Path(folder), count=args.count, test_count=args.test_count, epochs=args.epochs))
        print(json.dumps(runs[-1], indent=1), flush=True)
    names = list(runs[0]["steps"])
    print(
        f"\n{datetime.date.today()}, {platform.machine()} CPU, torch {torch.__version__}; {args.count} training / {args.test_count} held-out synthetic DICOMs per seed, 5 folds x {args.epochs} epochs"
    )
    print("| step | " + " | ".join(f"seed {run['seed']} held-out mAP [95% interval]" for run in runs) + " | mean |")
    print("| --- | " + " | ".join("---" for _ in runs) + " | --- |")
    for name in names:
        cells = [
            f"{run['steps'][name]['map']:.3f} [{run['steps'][name]['interval'][0]:.3f}, {run['steps'][name]['interval'][1]:.3f}]"
            for run in runs
        ]
        mean = np.mean([run["steps"][name]["map"] for run in runs])
        print(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} |")
    for run in runs:
        tune = run["tune"]
        print(
            f"seed {run['seed']}: OOF mAP at each fold's cut-off {run['cv_oof_map']:.3f}; tune before {tune['before']:.3f}, "
            f"tuned {tune['after']:.3f}, honest {tune['honest']:.3f}; {run['minutes']:.0f} min"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
