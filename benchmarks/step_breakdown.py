"""Where a training step's time goes, part by part of the detector (a benchmark, not a test).

Issue 4's throughput target is missed on an H100 because, the figures suggest, torchvision's
per-image work in the RPN and box heads (anchor matching, sampling, box coding, NMS) takes the
step, not the convolutions: MobileNetV3 and ResNet-50 train at the same ~90 images/s. This script
measures it instead of inferring it. It runs ``lungdet train``'s model, precision and layout on a
converted set and times, per batch:

- the whole step without any added synchronisation (the honest images/s);
- the same steps with the device synchronised around each part, to split the time between the
  host-to-device copy, the model's transform, backbone, RPN (head, anchors, proposal filtering,
  target assignment, loss) and box heads (sampling, RoI pooling, box head, predictor), the
  backward pass and the optimizer step. Synchronising costs a little, so the parts add up to
  slightly more than the unsynchronised step.

One part is not the GPU's on a CPU: RoI pooling there is one sparse product
(detection/sparse_roi_align.py), where a GPU runs torchvision's kernels level by level.

Run: ``.venv/bin/python benchmarks/step_breakdown.py [--config NAME] [--count 64] [--steps 5] [--device auto] [KEY=VALUE ...]``
(about a minute on 2 CPU cores with the CPU config; on a CUDA machine it uses the GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# The same synthetic set as the reference comparison (this folder is on sys.path when a script in it runs).
from train_vs_reference import prepare_dataset

from lungdet.detection.config import load_config
from lungdet.detection.data import build_dataloaders
from lungdet.detection.engine import move_to_device
from lungdet.detection.model import build_model, in_memory_layout, needs_masks
from lungdet.detection.optim import build_optimizer
from lungdet.detection.run_state import compile_fixed_shape_parts
from lungdet.detection.runtime import resolve_device, resolve_precision
from lungdet.detection.train import seed_everything
from lungdet.errors import LungdetError

# (label, path from the model to the object, method): the parts worth telling apart. Missing ones
# (RetinaNet has no RPN; only Mask R-CNN has a mask head) are skipped.
PARTS = (
    ("transform", "transform", "forward"),
    ("backbone", "backbone", "forward"),
    ("rpn", "rpn", "forward"),
    ("  rpn head (convolutions)", "rpn.head", "forward"),
    ("  anchors", "rpn.anchor_generator", "forward"),
    ("  proposal filtering (NMS)", "rpn", "filter_proposals"),
    ("  anchor matching", "rpn", "assign_targets_to_anchors"),
    ("  rpn loss (sampling)", "rpn", "compute_loss"),
    ("roi heads", "roi_heads", "forward"),
    ("  proposal sampling", "roi_heads", "select_training_samples"),
    ("  RoI pooling", "roi_heads.box_roi_pool", "forward"),
    ("  box head", "roi_heads.box_head", "forward"),
    ("  box predictor", "roi_heads.box_predictor", "forward"),
    ("  mask branch", "roi_heads.mask_head", "forward"),
    ("retinanet head", "head", "forward"),
    ("  anchors", "anchor_generator", "forward"),
    ("  retinanet loss (matching)", "", "compute_loss"),
)


# Profiler ranges named after the parts start with this, to tell them from operators.
PART_MARK = "part: "


# The optimizer's phase of the step, whose .item() calls are not waits (see count_operations).
OPTIMIZER_PART = "optimizer step"
# .tolist() copies to the host without dispatching an operator on a CPU, so the profiled step
# marks each call with a range of this name (see count_tolist_calls).
TOLIST_MARK = "host::tolist"
# Operators whose result's size or value the host must read before it can go on: on a GPU each
# waits until every kernel queued before it has run, and the GPU then idles while the host queues
# the next ones. A boolean index goes through nonzero; .item() through _local_scalar_dense;
# torchvision's CUDA NMS copies its overlap mask to the host.
HOST_WAIT_OPERATORS = frozenset(
    {
        "aten::nonzero",
        "aten::_local_scalar_dense",
        "aten::masked_select",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::repeat_interleave",
        "aten::is_nonzero",
        "aten::equal",
        "torchvision::nms",
        TOLIST_MARK,
    }
)


@contextlib.contextmanager
def count_tolist_calls() -> Iterator[None]:
    """Mark every ``Tensor.tolist()`` for the profiler while inside, so that :func:`count_operations` sees it."""
    original = torch.Tensor.tolist

    def tolist(tensor: torch.Tensor) -> Any:
        with torch.profiler.record_function(TOLIST_MARK):
            return original(tensor)

    torch.Tensor.tolist = tolist
    try:
        yield
    finally:
        torch.Tensor.tolist = original


def count_operations(events: Any) -> dict[str, Any]:
    """Operators dispatched in a profiled step and the host waits among them: totals and per part (sub-parts included).

    An operator called by another operator (a convolution's own calls, say) is not counted again:
    each counted one is roughly one kernel launch, the host's work on a GPU, whatever the device.
    A host wait (:data:`HOST_WAIT_OPERATORS`) is counted where it happens, nested or not, once
    per outermost waiting operator. Device-to-host copies cannot be told from other conversions
    on a CPU, so they are not counted. With ``compile=true`` the compiled parts' generated kernels
    are counted only where the profiler names them as Triton kernels (on a GPU); there, compare
    the step times rather than the counts.
    """
    counts = {"operations": 0, "waits": 0, "part_operations": defaultdict(int), "part_waits": defaultdict(int)}

    def add(kind: str, parts: tuple[str, ...]) -> None:
        counts[kind] += 1
        for part in set(parts):
            counts["part_" + kind][part] += 1

    def count_waits(event: Any, parts: tuple[str, ...]) -> None:
        if OPTIMIZER_PART in parts:
            return  # its .item() calls read step counters kept on the CPU, or none when fused: no wait on a GPU
        if event.name in HOST_WAIT_OPERATORS:
            add("waits", parts)
            return
        for child in event.cpu_children:
            count_waits(child, parts)

    def walk(event: Any, parts: tuple[str, ...]) -> None:
        if event.name.startswith(PART_MARK):
            parts = (*parts, event.name[len(PART_MARK) :])
        elif ("::" in event.name and not event.name.startswith(("autograd::", "Optimizer."))) or event.name.startswith(
            "triton_"
        ):
            add("operations", parts)
            count_waits(event, parts)
            return
        for child in event.cpu_children:
            walk(child, parts)

    for event in events:
        if event.cpu_parent is None:
            walk(event, ())
    return {key: dict(value) if isinstance(value, defaultdict) else value for key, value in counts.items()}


def resolve_path(root: Any, path: str) -> Any:
    """The object at a dotted attribute ``path`` under ``root`` ('' is root), or None."""
    target = root
    for name in filter(None, path.split(".")):
        target = getattr(target, name, None)
        if target is None:
            return None
    return target


class PartTimer:
    """Wraps methods so each call is timed between two device synchronisations, while ``enabled``.

    While ``labelling``, each call is instead marked for the profiler (see :func:`count_operations`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.enabled = False
        self.labelling = False

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, owner: Any, method: str, label: str) -> None:
        original: Callable[..., Any] = getattr(owner, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.labelling:
                with torch.profiler.record_function(PART_MARK + label.strip()):
                    return original(*args, **kwargs)
            if not self.enabled:
                return original(*args, **kwargs)
            self.sync()
            start = time.perf_counter()
            result = original(*args, **kwargs)
            self.sync()
            self.seconds[label] += time.perf_counter() - start
            return result

        setattr(owner, method, timed)  # an instance attribute shadows the class's method

    def time(self, label: str, function: Callable[[], Any]) -> Any:
        """Time a phase of the step that is not a model method (copy, backward, optimizer)."""
        if self.labelling:
            with torch.profiler.record_function(PART_MARK + label.strip()):
                return function()
        self.sync()
        start = time.perf_counter()
        result = function()
        self.sync()
        self.seconds[label] += time.perf_counter() - start
        return result


def breakdown(config, data_dir: Path, *, steps: int, warmup: int) -> dict[str, Any]:
    device = resolve_device(config.device)
    precision = resolve_precision(config.amp, device)
    seed_everything(config.seed)
    model = in_memory_layout(build_model(config.model), channels_last=config.channels_last)
    model.to(device).train()
    # Compiled parts are not split further: a timing wrapper inside them would break the compiled graph.
    compiled = compile_fixed_shape_parts(model) if config.compile else []
    optimizer = build_optimizer(model, config)
    loader, _ = build_dataloaders(
        data_dir,
        config.data,
        image_size=config.model.image_size,
        seed=config.seed,
        pin_memory=config.data.pin_memory and device.type == "cuda",
        mask_shape=config.model.mask_shape if needs_masks(config.model.architecture) else None,
    )
    # Batches held in host memory, so neither measurement waits for the loader; a small set is
    # passed over again (the same batches: the timing does not care).
    if len(loader) == 0:
        raise LungdetError(f"{data_dir}: no training batches; raise --count")
    batches: list[Any] = []
    while len(batches) < warmup + steps:
        batches.extend(batch for _, batch in zip(range(warmup + steps - len(batches)), loader, strict=False))

    timer = PartTimer(device)
    labels = []
    for label, path, method in PARTS:
        if any(path == name or path.startswith(name + ".") for name in compiled):
            continue
        owner = resolve_path(model, path)
        if owner is not None and hasattr(owner, method):
            timer.wrap(owner, method, label)
            labels.append(label)

    def step(images, targets, timed: bool) -> None:
        phase = timer.time if timed else (lambda _label, function: function())
        images, targets = phase("copy to device", lambda: move_to_device(images, targets, device))
        with precision.autocast():
            losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        phase("backward", loss.backward)
        if config.optim.grad_clip_norm > 0:
            phase(
                "gradient clipping",
                lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm),
            )
        phase(OPTIMIZER_PART, optimizer.step)

    for images, targets in batches[:warmup]:
        step(images, targets, timed=False)
    timer.sync()
    start = time.perf_counter()
    for images, targets in batches[warmup:]:
        step(images, targets, timed=False)
    timer.sync()
    plain = (time.perf_counter() - start) / steps

    timer.enabled = True
    start = time.perf_counter()
    for images, targets in batches[warmup:]:
        step(images, targets, timed=True)
    synced = (time.perf_counter() - start) / steps

    timer.enabled, timer.labelling = False, True
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, count_tolist_calls():
        step(*batches[warmup], timed=True)
    timer.labelling = False
    counts = count_operations(profile.events())
    per_batch = {label: seconds / steps for label, seconds in timer.seconds.items()}
    order = ["copy to device", *labels, "backward", "gradient clipping", OPTIMIZER_PART]
    return {
        "device": device,
        "precision": precision.name,
        "plain": plain,
        "synced": synced,
        "parts": [(label, per_batch[label]) for label in order if label in per_batch],
        "batch": config.data.batch_size,
        **counts,
    }


def print_table(config, result: dict[str, Any], *, config_name: str) -> None:
    device = result["device"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(
        f"\n{datetime.date.today()} | {name} | torch {torch.__version__} | {config_name}: {config.model.architecture} at "
        f"{config.model.image_size} px, batch {result['batch']}, {result['precision']}\n"
    )
    print(
        f"step without added synchronisation: {result['plain'] * 1000:.1f} ms/batch = {result['batch'] / result['plain']:.1f} images/s"
    )
    print(f"step with synchronisation around each part: {result['synced'] * 1000:.1f} ms/batch")
    print(
        f"operators dispatched by the host in one step: {result['operations']}, of which waiting for the device: "
        f"{result['waits']} (model.batched_heads={config.model.batched_heads}, compile={config.compile})\n"
    )
    print(
        "| part (indented: inside the one above) | ms per batch | share of the synchronised step | operators | host waits |"
    )
    print("| --- | --- | --- | --- | --- |")
    for label, seconds in result["parts"]:
        shown = label.replace("  ", "&nbsp;&nbsp;", 1) if label.startswith("  ") else label
        operations = result["part_operations"].get(label.strip(), 0)
        waits = result["part_waits"].get(label.strip(), 0)
        print(f"| {shown} | {seconds * 1000:.1f} | {seconds / result['synced']:.0%} | {operations} | {waits} |")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default="fasterrcnn_mobilenet_cpu",
        help="config name or YAML file (default fasterrcnn_mobilenet_cpu)",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="an existing 'lungdet convert' output instead of a synthetic one"
    )
    parser.add_argument("--count", type=int, default=64, help="synthetic DICOMs to generate (default 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed batches, after 2 untimed ones (default 5)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (image size, batch, ...)")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise LungdetError(f"--steps must be >= 1, got {args.steps}")
    config = load_config(args.config, ["model.pretrained=none", f"device={args.device}", *args.overrides])
    with tempfile.TemporaryDirectory(prefix="step_breakdown_") as folder:
        data_dir = args.data or prepare_dataset(Path(folder), count=args.count, image_size=config.model.image_size)
        result = breakdown(config, data_dir, steps=args.steps, warmup=2)
    print_table(config, result, config_name=args.config)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except LungdetError as error:
        sys.exit(f"step_breakdown: error: {error}")
