"""Files per second of ``lungdet predict --ray`` against plain ``lungdet predict``, on the same CPUs and files (a benchmark, not a test).

Both run as a user runs them, as commands: plain predict with its loader workers, and ``--ray``
alone, which starts a Ray of its own on this machine (its reading tasks and one model actor
per two CPUs). Each command runs on all ``--count`` files and on the first ``--small`` of them:

- **end to end** is files / wall time of the whole command (Python and torch start-up, model
  load, and for Ray the cluster's start and stop);
- **steady state** is the difference of the two runs, (count - small) / (wall(count) - wall(small)),
  which takes every fixed cost out, the same way for both.

The issue's target is 0.9x plain predict. Ray's fixed cost (starting a local cluster and its
actors, and stopping it) is some seconds, so on a few hundred files end to end cannot reach it
on one machine; the steady-state ratio is the engine's overhead per file.

Files: ``--dicom-dir``, else ``--count`` synthetic RSNA-shaped DICOMs (1024x1024, JPEG Baseline).
Model: ``--checkpoint``, else the ``--config`` architecture with untrained weights (timing only).

Run: ``.venv/bin/python benchmarks/ray_predict.py [--count 512] [--small 64] [--config fasterrcnn_mobilenet_cpu]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.synth import write_synthetic_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_speed import untrained_checkpoint  # noqa: E402  the same untrained model as the predict benchmark


def predict_command(checkpoint: Path, listing: Path, out: Path, *extra: str) -> list[str]:
    """``lungdet predict`` over the files ``listing`` names, writing the submission ``out``, without a progress bar."""
    return [
        sys.executable,
        "-m",
        "lungdet",
        "predict",
        "--checkpoint",
        str(checkpoint),
        "--input-list",
        str(listing),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def timed_predict(checkpoint: Path, listing: Path, out: Path, *extra: str) -> float:
    """Wall seconds of one ``lungdet predict`` over ``listing``; a failure stops the benchmark with its output."""
    command = predict_command(checkpoint, listing, out, *extra)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dicom-dir", type=Path, default=None)
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--small", type=int, default=64, help="files of the short runs that measure the fixed costs")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--config", default="fasterrcnn_mobilenet_cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--ray-actor-cpus",
        nargs="+",
        default=["default", "1"],
        help="the --ray-actor-cpus values to run; 'default' leaves the flag out (default: default and 1, Ray's own)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ray_bench") as temporary:
        work = Path(temporary)
        if args.dicom_dir is not None:
            files = find_dicoms(args.dicom_dir)[: args.count]
        else:
            synth = write_synthetic_dataset(work / "synth", count=args.count, seed=0, positive_fraction=0.3)
            files = sorted(synth.images_dir.glob("*.dcm"))
        checkpoint = args.checkpoint or untrained_checkpoint(args.config, [], work / "untrained.pt")
        listings = {}
        for name, chosen in (("all", files), ("small", files[: args.small])):
            listings[name] = work / f"{name}.txt"
            listings[name].write_text("".join(f"{path}\n" for path in chosen))
        walls: dict[str, dict[str, float]] = {}
        runs = [("plain", ())] + [
            (f"ray, actor CPUs {cpus}", ("--ray",) if cpus == "default" else ("--ray", "--ray-actor-cpus", cpus))
            for cpus in args.ray_actor_cpus
        ]
        for label, extra in runs:
            walls[label] = {}
            for name in ("small", "all"):
                out = work / f"{label}_{name}.csv"
                walls[label][name] = timed_predict(
                    checkpoint, listings[name], out, "--batch-size", str(args.batch_size), *extra
                )
                print(f"{label} on {len(files) if name == 'all' else args.small} files: {walls[label][name]:.1f} s")

    count, small = len(files), min(args.small, len(files))
    figures = {}
    for label, wall in walls.items():
        figures[label] = {
            "end_to_end_files_per_s": count / wall["all"],
            "steady_files_per_s": (count - small) / (wall["all"] - wall["small"]),
            "fixed_seconds": wall["all"] - (count / ((count - small) / (wall["all"] - wall["small"]))),
            "wall_all_s": wall["all"],
            "wall_small_s": wall["small"],
        }
    plain = figures["plain"]
    print(f"\n{count} files, {os.cpu_count()} CPUs, batch {args.batch_size}\n")
    print("| | end to end, files/s | steady state, files/s | fixed cost, s | end to end vs plain | steady vs plain |")
    print("|---|---|---|---|---|---|")
    for label, figure in figures.items():
        figure["end_to_end_ratio"] = figure["end_to_end_files_per_s"] / plain["end_to_end_files_per_s"]
        figure["steady_ratio"] = figure["steady_files_per_s"] / plain["steady_files_per_s"]
        print(
            f"| {label} | {figure['end_to_end_files_per_s']:.1f} | {figure['steady_files_per_s']:.1f} | "
            f"{figure['fixed_seconds']:.1f} | {figure['end_to_end_ratio']:.2f}x | {figure['steady_ratio']:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps({"count": count, "small": small, "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
