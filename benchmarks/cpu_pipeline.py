"""Throughput of each pipeline stage on this machine (a benchmark, not a test).

Times, on synthetic RSNA-shaped DICOMs (1024x1024, JPEG Baseline): ``synth`` and ``convert``
in files/s, training in images/s for the CPU config (and optionally another config), and
``predict`` in DICOMs/s including decoding. Prints a Markdown table to paste into
docs/benchmarks.md with the machine and date.

Run: ``.venv/bin/python benchmarks/cpu_pipeline.py [--count 200] [--train-steps 20] [--config NAME ...]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.labels import read_labels
from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.data_tools.to_coco import ConvertOptions, convert_dataset
from lungdet.detection.config import load_config
from lungdet.detection.data import build_dataloaders
from lungdet.detection.engine import OptimizerStep, train_one_epoch
from lungdet.detection.ensemble import predict_dicoms
from lungdet.detection.model import build_model, in_memory_layout
from lungdet.detection.optim import build_optimizer, build_scheduler
from lungdet.detection.runtime import resolve_precision
from lungdet.detection.train import seed_everything

CPU = torch.device("cpu")


def time_call(function, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def training_throughput(config_name: str, data_dir: Path, *, steps: int) -> tuple[float, float]:
    """(training images/s over ``steps`` batches after one warm-up batch, inference images/s on the same model).

    With the config's precision and memory layout on this CPU, as ``lungdet train`` has them.
    """
    config = load_config(config_name, ["model.pretrained=none", "data.max_train_images=0"])
    seed_everything(0)
    train_loader, _ = build_dataloaders(
        data_dir, config.data, image_size=config.model.image_size, seed=0, augment=config.augment
    )
    train_loader.sampler.set_epoch(1)
    precision = resolve_precision(config.amp, CPU)
    model = in_memory_layout(build_model(config.model), channels_last=config.channels_last)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=10_000)
    batches = [next(iter(train_loader)) for _ in range(steps + 1)]
    # One warm-up step so that allocator and kernel selection are not timed.
    step = OptimizerStep(optimizer, scheduler)
    train_one_epoch(model, step, batches[:1], CPU, epoch=0, progress=False, precision=precision)
    metrics = train_one_epoch(model, step, batches[1:], CPU, epoch=1, progress=False, precision=precision).metrics()
    model.eval()
    images = [image for batch_images, _ in batches[1:] for image in batch_images]
    with torch.no_grad(), precision.autocast():
        start = time.perf_counter()
        for index in range(0, len(images), config.data.batch_size):
            model(images[index : index + config.data.batch_size])
        inference = len(images) / (time.perf_counter() - start)
    return metrics["images_per_second"], inference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="synthetic DICOMs to generate (default 200)")
    parser.add_argument("--train-steps", type=int, default=20, help="timed training batches per config (default 20)")
    parser.add_argument(
        "--config", action="append", default=None, help="config name(s) to time (default: fasterrcnn_mobilenet_cpu)"
    )
    args = parser.parse_args()
    configs = args.config or ["fasterrcnn_mobilenet_cpu"]
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        synth, seconds = time_call(
            write_synthetic_dataset, root / "synth", count=args.count, seed=0, positive_fraction=0.5
        )
        rows.append(("synth, 1024x1024 JPEG DICOMs", f"{args.count / seconds:.1f} files/s"))
        labels = read_labels(synth.labels_csv)
        _, seconds = time_call(
            convert_dataset, synth.images_dir, labels, root / "coco", ConvertOptions(image_size=256), progress=False
        )
        rows.append(("convert to 256 px PNG (1 process)", f"{args.count / seconds:.1f} files/s"))
        for name in configs:
            train_rate, inference_rate = training_throughput(name, root / "coco", steps=args.train_steps)
            rows.append((f"train {name}", f"{train_rate:.2f} images/s"))
            rows.append((f"model forward only {name}", f"{inference_rate:.2f} images/s"))
        config = load_config(configs[0], ["model.pretrained=none"])
        model = in_memory_layout(build_model(config.model).eval(), channels_last=config.channels_last)
        paths = find_dicoms(synth.images_dir)[:64]
        _, seconds = time_call(
            predict_dicoms,
            model,
            paths,
            image_size=config.model.image_size,
            device=CPU,
            score_threshold=0.5,
            progress=False,
            precision=resolve_precision("auto", CPU),
        )
        rows.append(
            (f"predict {configs[0]} from DICOM (decode + resize + model)", f"{len(paths) / seconds:.2f} DICOMs/s")
        )

    print(
        f"\n{datetime.date.today()} | {platform.processor() or platform.machine()} | {os.cpu_count()} cores | "
        f"torch {torch.__version__} | {torch.get_num_threads()} threads | {resolve_precision('auto', CPU).name} | no GPU used\n"
    )
    print("| stage | throughput |\n| --- | --- |")
    for stage, value in rows:
        print(f"| {stage} | {value} |")


if __name__ == "__main__":
    main()
