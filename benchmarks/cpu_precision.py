"""Is bf16 and channels_last worth it on this CPU? One training step in each setting (a benchmark, not a test).

``amp: auto`` trains in bf16 on CPUs with bfloat16 instructions (AVX512-BF16 or AMX) and in fp32
elsewhere, and ``channels_last`` is on by default; this script measures what those choices are
worth here: one training step of the config's model (from scratch, random images with one box
each) in fp32 and bf16 autocast, NCHW and channels_last, and the optimizer update alone, per
tensor (torch's CPU default) and fused. Mean of ``--steps`` after 2 untimed steps.

Run: ``.venv/bin/python benchmarks/cpu_precision.py [--config NAME] [--steps 3] [KEY=VALUE ...]``
(about a minute with the CPU config; 3-4 minutes with ``--config fasterrcnn_resnet50_fpn``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Callable

import torch

from lungdet.detection.config import load_config
from lungdet.detection.model import build_model, in_memory_layout
from lungdet.detection.runtime import cpu_has_native_bf16
from lungdet.errors import LungdetError

SETTINGS = (
    ("fp32, NCHW", False, False),
    ("fp32, channels_last", False, True),
    ("bf16, NCHW", True, False),
    ("bf16, channels_last", True, True),
)


def mean_seconds(function: Callable[[], object], *, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        function()
    start = time.perf_counter()
    for _ in range(steps):
        function()
    return (time.perf_counter() - start) / steps


def synthetic_batch(image_size: int, batch: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Random images, each with one tall box in the left lung's place (RSNA's shape)."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, image_size, image_size, generator=generator) for _ in range(batch)]
    box = torch.tensor([[0.2, 0.2, 0.45, 0.7]]) * image_size
    return images, [{"boxes": box.clone(), "labels": torch.ones(1, dtype=torch.int64)} for _ in range(batch)]


def step_seconds(config, *, bf16: bool, channels_last: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = in_memory_layout(build_model(config.model).train(), channels_last=channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images, targets = synthetic_batch(config.model.image_size, config.data.batch_size)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return mean_seconds(step, steps=steps)


def update_seconds(config, *, optimizer_name: str, fused: bool, steps: int) -> float:
    parameters = [
        parameter.detach().requires_grad_()
        for parameter in build_model(config.model).parameters()
        if parameter.requires_grad
    ]
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    options = {"fused": True} if fused else {}
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-4, **options)
    else:
        optimizer = torch.optim.SGD(parameters, lr=1e-2, momentum=0.9, weight_decay=1e-4, **options)
    return mean_seconds(optimizer.step, steps=max(steps, 10))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default="fasterrcnn_mobilenet_cpu",
        help="config name or YAML file (default fasterrcnn_mobilenet_cpu)",
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per setting, after 2 untimed ones (default 3)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (image size, batch, ...)")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise LungdetError(f"--steps must be >= 1, got {args.steps}")
    config = load_config(args.config, ["model.pretrained=none", "device=cpu", *args.overrides])
    print(
        f"\n{datetime.date.today()} | CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads | torch {torch.__version__} | "
        f"bfloat16 instructions: {'yes' if cpu_has_native_bf16() else 'no (bf16 is emulated here)'} | {args.config}: "
        f"{config.model.architecture} at {config.model.image_size} px, batch {config.data.batch_size}\n"
    )
    baseline = None
    print("| setting | training step | against fp32, NCHW |\n| --- | --- | --- |")
    for label, bf16, channels_last in SETTINGS:
        seconds = step_seconds(config, bf16=bf16, channels_last=channels_last, steps=args.steps)
        baseline = baseline or seconds
        print(f"| {label} | {seconds * 1000:.0f} ms | {baseline / seconds:.2f}x |", flush=True)
    print(
        "\n| optimizer update, all trainable weights | per tensor (torch's CPU default) | fused |\n| --- | --- | --- |"
    )
    for optimizer_name in ("adamw", "sgd"):
        per_tensor, fused = (
            update_seconds(config, optimizer_name=optimizer_name, fused=f, steps=args.steps) for f in (False, True)
        )
        print(f"| {optimizer_name} | {per_tensor * 1000:.1f} ms | {fused * 1000:.1f} ms |", flush=True)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except LungdetError as error:
        sys.exit(f"cpu_precision: error: {error}")
