"""What a training run reports after each epoch: its metrics combined over processes, ``metrics.csv`` and TensorBoard."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from lungdet.atomic import write_text_atomic
from lungdet.detection.distributed import Distributed, sum_over_ranks
from lungdet.detection.engine import EpochProgress


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    """Rewrite the whole metrics file from the history kept in the checkpoint (so resume stays consistent)."""
    columns: list[str] = []
    for row in history:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})
    write_text_atomic(path, buffer.getvalue())


def open_tensorboard(log_dir: Path, enabled: bool) -> Any:
    """A SummaryWriter on ``log_dir`` (``RUN/tensorboard``), or None (disabled, or the package is missing: said once)."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(
            "lungdet train: tensorboard is not installed, so metrics go to metrics.csv only (pip install tensorboard, or tensorboard=false)"
        )
        return None
    return SummaryWriter(str(log_dir))


def epoch_metrics(job: Distributed, progress: EpochProgress) -> dict[str, float]:
    """The epoch's training metrics over every process: losses averaged, images summed, time from the slowest."""
    names = sorted(progress.totals)
    summed = sum_over_ranks(
        job,
        [progress.totals[name] for name in names]
        + [float(progress.batches), float(progress.images), progress.data_seconds],
    )
    totals, (batches, images, data_seconds) = dict(zip(names, summed[: len(names)], strict=True)), summed[len(names) :]
    # Every process trains for the same wall time; throughput is all images over that time.
    combined = EpochProgress(
        batches=int(batches),
        images=int(images),
        seconds=progress.seconds,
        data_seconds=data_seconds / job.world_size,
        stopped_early=progress.stopped_early,
        totals=totals,
    )
    return combined.metrics()


def log_to_tensorboard(writer: Any, row: dict[str, Any]) -> None:
    """Log ``row``'s finite numbers (not ``epoch``) as scalars at step ``row['epoch']``; nothing if ``writer`` is None.

    Each is grouped by the part before its first underscore (``val_map`` -> ``val/map``); the writer is flushed after
    the row.
    """
    if writer is None:
        return
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
            # 'val_map@0.3' -> 'val/map@0.3': TensorBoard groups charts by the part before the slash.
            group, _, name = key.partition("_")
            writer.add_scalar(f"{group}/{name}" if name else key, value, row["epoch"])
    writer.flush()
