"""Inference-only settings on the real cross-validation: the box NMS threshold and the box-score floor (a benchmark, not a test).

Neither setting changes training, so the trained fold models of one ``benchmarks/real_data.py``
run are reused: each fold's checkpoint is copied with ``model.box_nms_thresh`` /
``model.box_score_thresh`` changed, predicts its own validation patients again (with hflip, as
``lungdet cv --tta hflip`` does), and ``lungdet tune`` scores the out-of-fold predictions honestly
(each fold tuned on the others). Nothing here looks at the 200 held-out patients.

Run: ``.venv/bin/python benchmarks/real_inference_sweep.py --work runs/real [--nms 0.1 0.2 0.3 0.5] [--floor 0.01 0.05]``
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from lungdet.detection.cv import summarize
from lungdet.detection.folds import fold_dir, predict_out_of_fold
from lungdet.detection.runtime import load_checkpoint
from lungdet.detection.train import BEST_CHECKPOINT
from lungdet.submission.tune import tune_postprocess


def sweep_row(work: Path, data: Path, folds: list[int], *, nms: float, floor: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="sweep_") as folder:
        for fold in folds:
            checkpoint = load_checkpoint(fold_dir(work / "cv", fold) / BEST_CHECKPOINT)
            checkpoint["config"]["model"]["box_nms_thresh"] = nms
            checkpoint["config"]["model"]["box_score_thresh"] = floor
            fold_dir(Path(folder), fold).mkdir(parents=True)
            torch.save(checkpoint, fold_dir(Path(folder), fold) / BEST_CHECKPOINT)
        rows, truth, thresholds = predict_out_of_fold(
            data, Path(folder), folds, device=torch.device("cpu"), tta="hflip", progress=False
        )
    summary = summarize(rows, truth, thresholds)
    tuned = tune_postprocess(rows, truth)
    return {
        "nms": nms,
        "floor": floor,
        "oof_map": summary["oof_map"],
        "interval": summary["oof_map_interval"],
        "honest": tuned.honest,
        "honest_interval": tuned.honest_interval,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", type=Path, required=True, help="a benchmarks/real_data.py work folder with its cv/fold{k}/best.pt"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="its converted cross-validation data (default: the one cv_*_* folder in --work)",
    )
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--nms", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--floor", type=float, nargs="+", default=[0.01])
    args = parser.parse_args()
    data = args.data or next(path for path in sorted(args.work.glob("cv_*_*")) if path.is_dir())
    print(
        "| box NMS IoU | box-score floor | OOF mAP at each fold's cut-off [95%] | OOF mAP, post-processing tuned on the other folds [95%] |"
    )
    print("| --- | --- | --- | --- |")
    for nms in args.nms:
        for floor in args.floor:
            row = sweep_row(args.work, data, args.folds, nms=nms, floor=floor)
            print(
                f"| {nms:g} | {floor:g} | {row['oof_map']:.4f} [{row['interval'][0]:.4f}, {row['interval'][1]:.4f}] "
                f"| {row['honest']:.4f} [{row['honest_interval'][0]:.4f}, {row['honest_interval'][1]:.4f}] |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
