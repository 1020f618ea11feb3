"""How fast ``lungdet predict`` turns DICOMs into boxes, and what limits it (a benchmark, not a test).

One run, the same files throughout:

1. the bare decode loop: read each DICOM and prepare the model's input, in this process (one core);
2. the model's forward pass alone, on inputs decoded beforehand;
3. ``predict`` end to end (``predict_raw``, what ``lungdet predict`` runs) decoding in the main
   process, with 1 loader worker and with ``--workers``;
4. the same forward pass through an ONNX export in onnxruntime (the CUDA provider on a GPU when
   onnxruntime-gpu is installed, else the CPU), beside eager torch in float32.

The target: end to end with all workers reaches at least 0.9x the slower of (decode rate x
workers) and (forward rate). On a CPU the workers and the forward pass share the same cores, so
that bound is optimistic there; on a GPU it is the real one.

Files: ``--dicom-dir`` (e.g. the 13 real RSNA samples), else ``--count`` synthetic RSNA-shaped
DICOMs (1024x1024, JPEG Baseline) written to a temporary folder. Model: ``--checkpoint``, else
the ``--config`` architecture with untrained weights (timing only; its boxes mean nothing).
Prints a Markdown table for docs/benchmarks.md; ``--json`` writes the figures.

Run: ``.venv/bin/python benchmarks/predict_speed.py [--config fasterrcnn_mobilenet_cpu] [--count 256] [--batch-size 8] [--device auto]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lungdet.data_tools.dicom_io import find_dicoms, read_dicom
from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.detection.config import config_to_dict, load_config
from lungdet.detection.detector import load_detector
from lungdet.detection.ensemble import predict_raw
from lungdet.detection.inference import prepare_input
from lungdet.detection.model import build_model
from lungdet.detection.prepared_images import default_workers, read_dicom_input

TARGET_FRACTION = 0.9


def untrained_checkpoint(config_name: str, overrides: list[str], path: Path) -> Path:
    """A lungdet checkpoint of ``config_name`` with fresh weights: the right shapes and cost, nothing learned."""
    config = load_config(config_name, ["model.pretrained=none", *overrides])
    torch.manual_seed(0)
    model = build_model(config.model)
    torch.save(
        {
            "model": model.state_dict(),
            "config": config_to_dict(config),
            "frozen_batch_norm": False,
            "preprocessing": {"image_size": None, "normalization": "none"},
            "score_threshold": 0.5,
        },
        path,
    )
    return path


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def decode_rate(paths: list[Path], image_size: int) -> tuple[float, list[np.ndarray], list[tuple[int, int]]]:
    """Files/s of read + prepare in this process, and the prepared inputs with their original shapes."""
    start = time.perf_counter()
    inputs, shapes = [], []
    for path in paths:
        pixels = read_dicom(path).pixels
        shapes.append(pixels.shape[:2])
        inputs.append(prepare_input(pixels, image_size=image_size, preprocessing={}))
    return rate(len(paths), time.perf_counter() - start), inputs, shapes


def forward_rate(
    predictor, inputs: list[np.ndarray], shapes: list[tuple[int, int]], batch_size: int, *, passes: int = 2
) -> float:
    """Images/s of ``predict_prepared`` over ``inputs`` in batches, after one warm-up batch; outputs are copied back, so GPU work is finished."""
    batches = [
        (np.stack(inputs[i : i + batch_size]), shapes[i : i + batch_size]) for i in range(0, len(inputs), batch_size)
    ]
    predictor.predict_prepared(*batches[0])
    start = time.perf_counter()
    for _ in range(passes):
        for batch, batch_shapes in batches:
            predictor.predict_prepared(batch, batch_shapes)
    return rate(passes * len(inputs), time.perf_counter() - start)


def end_to_end_rate(detector, paths: list[Path], batch_size: int, workers: int) -> float:
    start = time.perf_counter()
    rows, bad = predict_raw(
        [detector], ["model"], paths, read=read_dicom_input, batch_size=batch_size, progress=False, workers=workers
    )
    seconds = time.perf_counter() - start
    assert not bad and len(rows) == len(paths), (len(rows), bad)
    return rate(len(paths), seconds)


def onnx_rows(checkpoint: Path, folder: Path, inputs, shapes, args, eager_fp32: float) -> list[tuple[str, float, str]]:
    """The ONNX export's forward rate (and eager fp32 for comparison); nothing when onnx/onnxruntime are missing."""
    try:
        import onnxruntime
    except ImportError:
        return [("onnxruntime forward", float("nan"), "onnxruntime not installed: pip install 'lungdet[onnx]'")]
    from lungdet.detection.export import export_checkpoint
    from lungdet.detection.exported import load_onnx

    exported = folder / "model.onnx"
    export_checkpoint(checkpoint, exported, fmt="onnx", batch_size=args.batch_size)
    wants_cuda = args.device != "cpu" and torch.cuda.is_available()
    provider_device = "auto" if wants_cuda else "cpu"
    model = load_onnx(exported, device=provider_device)
    provider = "CUDA" if model.device == "cuda" else "CPU"
    rows = [
        (
            f"onnxruntime forward ({provider} provider, fp32)",
            forward_rate(model, inputs, shapes, args.batch_size),
            "uint8 batch in, boxes out",
        )
    ]
    if wants_cuda and provider == "CPU":
        rows[0] = (
            rows[0][0],
            rows[0][1],
            f"no CUDA provider in this onnxruntime ({', '.join(onnxruntime.get_available_providers())})",
        )
    rows.append(("eager torch forward (fp32)", eager_fp32, "same batches, for the ONNX comparison"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dicom-dir", type=Path, help="DICOMs to predict (default: --count synthetic ones)")
    parser.add_argument(
        "--count", type=int, default=256, help="synthetic DICOMs to write when no --dicom-dir (default 256)"
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="a lungdet checkpoint (default: --config with untrained weights)"
    )
    parser.add_argument(
        "--config",
        default="fasterrcnn_mobilenet_cpu",
        help="config for the untrained model (default fasterrcnn_mobilenet_cpu)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="config overrides for the untrained model, e.g. model.image_size=512",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help=f"loader workers for the 'all workers' row (default: the cores, {default_workers()})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the main process (default: torch's, all cores). On a CPU, --threads 1 --workers 1 gives the "
        "forward pass and the decoding a core each, as a GPU and the host would have",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", help="precision of the eager model, as lungdet predict's --amp")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX rows")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        if args.dicom_dir is not None:
            paths = find_dicoms(args.dicom_dir)
        else:
            paths = find_dicoms(
                write_synthetic_dataset(folder / "synth", count=args.count, seed=0, positive_fraction=0.5).images_dir
            )
        checkpoint = args.checkpoint or untrained_checkpoint(args.config, args.override, folder / "untrained.pt")
        detector = load_detector(checkpoint, device=args.device, amp=args.amp)
        decode, inputs, shapes = decode_rate(paths, detector.image_size)
        forward = forward_rate(detector, inputs, shapes, args.batch_size)
        # The loader's fork server starts once per process (it imports lungdet and torch): a fixed
        # cost that a real run pays once, timed on its own so the rates below are per file.
        start = time.perf_counter()
        predict_raw(
            [detector],
            ["model"],
            paths[: args.batch_size],
            read=read_dicom_input,
            batch_size=args.batch_size,
            progress=False,
            workers=1,
        )
        server_start = time.perf_counter() - start
        in_process = end_to_end_rate(detector, paths, args.batch_size, 0)
        one_worker = end_to_end_rate(detector, paths, args.batch_size, 1)
        all_workers = end_to_end_rate(detector, paths, args.batch_size, args.workers)
        bound = min(decode * args.workers, forward)
        rows: list[tuple[str, float, str]] = [
            ("decode + prepare, 1 process", decode, "pydicom + OpenCV JPEG decode, resize"),
            (
                f"forward alone ({detector.precision_name})",
                forward,
                f"batch {args.batch_size}, inputs decoded beforehand",
            ),
            (
                "predict end to end, decoding in the main process (--workers 0)",
                in_process,
                "decode and forward one after the other",
            ),
            (
                "predict end to end, 1 worker",
                one_worker,
                f"after the workers' fork server started (once per process: {server_start:.1f} s)",
            ),
            (
                f"predict end to end, {args.workers} worker{'s' if args.workers != 1 else ''}",
                all_workers,
                f"{all_workers / bound:.2f}x min(decode x {args.workers}, forward) = {bound:.1f}; target {TARGET_FRACTION}x: "
                + ("met" if all_workers >= TARGET_FRACTION * bound else "missed"),
            ),
        ]
        if not args.no_onnx:
            eager_fp32 = forward
            if detector.precision_name != "fp32":
                eager_fp32 = forward_rate(
                    load_detector(checkpoint, device=args.device, amp="none"), inputs, shapes, args.batch_size
                )
            rows += onnx_rows(checkpoint, folder, inputs, shapes, args, eager_fp32)

    device_name = (
        torch.cuda.get_device_name()
        if detector.device.startswith("cuda")
        else (platform.processor() or platform.machine())
    )
    print(
        f"\n{datetime.date.today()} | {device_name} | {os.cpu_count()} cores | torch {torch.__version__} | "
        f"{detector.architecture} at {detector.image_size} px | {len(paths)} DICOMs | batch {args.batch_size} | "
        f"{torch.get_num_threads()} torch threads, {args.workers} workers\n"
    )
    print("| measurement | files or images/s | note |\n| --- | --- | --- |")
    for name, value, note in rows:
        print(f"| {name} | {value:.1f} | {note} |")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "date": str(datetime.date.today()),
                    "device": device_name,
                    "cores": os.cpu_count(),
                    "architecture": detector.architecture,
                    "image_size": detector.image_size,
                    "files": len(paths),
                    "batch_size": args.batch_size,
                    "rows": [{"measurement": name, "rate": value, "note": note} for name, value, note in rows],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
