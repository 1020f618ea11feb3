"""RoI pooling alone: torchvision's MultiScaleRoIAlign against the sparse product (a benchmark, not a test).

``model.batched_heads`` pools with :mod:`lungdet.detection.sparse_roi_align` on a CPU, because
torchvision's RoI Align, its backward pass above all, took 40% of a MobileNetV3 training step
there. This script times the two on the pooling a Faster R-CNN training step does: ResNet-50-FPN
feature maps (4 levels, strides 4 to 32, 256 channels) for a batch, and the box head's sampled
proposals (``--rois`` per image, sizes spread over every level), output 7x7 with 2x2 sample
points. It reports the forward pass, forward plus backward, and the largest difference between the
two results. On a CUDA device it runs the sparse product there too (``lungdet train`` does not:
:data:`lungdet.detection.sparse_roi_align.SPARSE_DEVICE_TYPES`), which is what a GPU session should measure
before that choice changes.

Run: ``.venv/bin/python benchmarks/roi_align_speed.py [--device cpu] [--image-size 512] [--batch 8] [--rois 512]``
(about half a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable

import torch
from torchvision.ops import MultiScaleRoIAlign

from lungdet.detection.sparse_roi_align import sparse_multiscale_roi_align
from lungdet.errors import LungdetError

LEVELS = ["0", "1", "2", "3"]


def make_inputs(*, image_size: int, batch: int, rois: int, channels: int, dtype: torch.dtype, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    maps = OrderedDict(
        (
            name,
            torch.randn(batch, channels, image_size // 4 >> level, image_size // 4 >> level, generator=generator)
            .to(device=device, dtype=dtype)
            .contiguous(memory_format=torch.channels_last),
        )
        for level, name in enumerate(LEVELS)
    )
    boxes = []
    for _ in range(batch):
        corners = torch.rand(rois, 2, generator=generator) * image_size * 0.8
        sizes = (torch.rand(rois, 2, generator=generator) ** 2 * image_size).clamp_min(4.0)
        boxes.append(torch.cat([corners, (corners + sizes).clamp(max=image_size)], dim=1).to(device))
    return maps, boxes


def timed(function: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` runs after one untimed, in seconds."""
    function()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    maps, boxes = make_inputs(
        image_size=args.image_size, batch=args.batch, rois=args.rois, channels=args.channels, dtype=dtype, device=device
    )
    pooler = MultiScaleRoIAlign(LEVELS, 7, 2)
    image_shapes = [(args.image_size, args.image_size)] * args.batch
    with (
        torch.no_grad(),
        torch.autocast(device.type, dtype=dtype, enabled=args.bf16),
    ):  # torchvision's kernel takes bf16 maps only under autocast
        pooler(maps, boxes, image_shapes)  # sets up its scales and level mapper
    levels = pooler.map_levels(boxes)

    def torchvision_pool(inputs):
        return pooler(inputs, boxes, image_shapes)

    def sparse_pool(inputs):
        return sparse_multiscale_roi_align(
            list(inputs.values()), boxes, levels, scales=pooler.scales, output_size=(7, 7), sampling_ratio=2
        )

    result = {}
    outputs = {}
    for name, pool in (("torchvision", torchvision_pool), ("sparse", sparse_pool)):
        leaves = OrderedDict((key, value.detach().requires_grad_()) for key, value in maps.items())

        # Each closure runs within its own iteration; the defaults bind this iteration's values all the same.
        def forward(name: str = name, pool=pool) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=args.bf16):
                outputs[name] = pool(maps)

        def forward_backward(pool=pool, leaves=leaves) -> None:
            for leaf in leaves.values():
                # As a training step's zero_grad: otherwise each repeat also adds into the last one's gradient.
                leaf.grad = None
            with torch.autocast(device.type, dtype=dtype, enabled=args.bf16):
                pooled = pool(leaves)
            pooled.float().square().mean().backward()

        result[f"{name} forward"] = timed(forward, device, args.repeats)
        result[f"{name} forward + backward"] = timed(forward_backward, device, args.repeats)
    result["largest difference"] = float((outputs["sparse"].float() - outputs["torchvision"].float()).abs().max())
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--image-size", type=int, default=512, help="input image side in pixels (default 512)")
    parser.add_argument("--batch", type=int, default=8, help="images (default 8)")
    parser.add_argument(
        "--rois", type=int, default=512, help="boxes per image (default 512, torchvision's box_batch_size_per_image)"
    )
    parser.add_argument("--channels", type=int, default=256, help="feature channels (default 256, the FPN's)")
    parser.add_argument("--fp32", dest="bf16", action="store_false", help="float32 maps instead of bf16 under autocast")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, the fastest reported (default 3)")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.image_size < 64 or args.batch < 1 or args.rois < 1 or args.repeats < 1:
        raise LungdetError("--image-size must be >= 64 and --batch, --rois, --repeats >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise LungdetError(f"--device {args.device}: no CUDA GPU here; use --device cpu")
    result = measure(args)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(
        f"\n{datetime.date.today()} | {name} | torch {torch.__version__} | {args.batch} images at {args.image_size} px, "
        f"{args.rois} boxes each, {'bf16' if args.bf16 else 'fp32'} maps, channels_last\n"
    )
    print("| pooling | forward ms | forward + backward ms |")
    print("| --- | --- | --- |")
    for kind in ("torchvision", "sparse"):
        print(
            f"| {kind} | {result[f'{kind} forward'] * 1000:.1f} | {result[f'{kind} forward + backward'] * 1000:.1f} |"
        )
    speedup = result["torchvision forward + backward"] / result["sparse forward + backward"]
    print(
        f"\nsparse / torchvision, forward + backward: {speedup:.2f}x faster; largest difference in the pooled values: {result['largest difference']:.2e}"
    )


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except LungdetError as error:
        sys.exit(f"roi_align_speed: error: {error}")
