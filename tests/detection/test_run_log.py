"""Tests for detection/run_log.py: the metrics file."""

from __future__ import annotations

from pathlib import Path

from lungdet.detection.run_log import write_metrics_csv
from lungdet.detection.train import METRICS_FILE


def test_metrics_csv_has_the_union_of_columns_in_first_seen_order(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    write_metrics_csv(path, [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25, "val_map": 1 / 3}])
    assert path.read_text(encoding="utf-8") == "epoch,loss,val_map\n1,0.5,\n2,0.25,0.333333\n"
