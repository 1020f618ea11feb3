"""Tests for detection/cv.py: every fold trained, out-of-fold predictions by the right model in original pixels, resume, then tune."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lungdet.data_tools.labels import read_labels
from lungdet.detection.cv import OOF_FILE, OOF_LABELS_FILE, SUMMARY_FILE, get_args_parser, main
from lungdet.detection.data import load_records
from lungdet.detection.folds import FINAL_DIR, STATE_FILE
from lungdet.detection.runtime import load_checkpoint
from lungdet.detection.train import BEST_CHECKPOINT, LAST_CHECKPOINT
from lungdet.submission.raw_predictions import read_raw_predictions

RUN = [
    "model.architecture=fasterrcnn_mobilenet_v3_large_fpn",
    "data.batch_size=2",
    "optim.epochs=1",
    "max_minutes=0",
    "device=cpu",
    "optim.warmup_iters=1",
]


def run_cv(data: Path, out: Path, overrides: list[str], *extra: str) -> int:
    return main(
        get_args_parser().parse_args(["--data", str(data), "--out", str(out), "--no-progress", *extra, *overrides])
    )


@pytest.fixture(scope="module")
def cv_run(
    tmp_path_factory: pytest.TempPathFactory,
    make_tiny_dataset: Callable[[Path], Path],
    tiny_model_overrides: tuple[str, ...],
) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cv")
    coco = make_tiny_dataset(root)
    overrides = [*tiny_model_overrides, *RUN]
    assert run_cv(coco, root / "cv", overrides, "--tta", "hflip", "--final") == 0
    return {"root": root, "coco": coco, "out": root / "cv", "overrides": overrides}


def test_every_fold_trains_and_predicts_its_own_patients(cv_run: dict[str, Any]) -> None:
    out = cv_run["out"]
    records = load_records(cv_run["coco"])
    assert {record.fold for record in records} == {0, 1}
    for fold in (0, 1):
        assert (out / f"fold{fold}" / BEST_CHECKPOINT).is_file()
        assert load_checkpoint(out / f"fold{fold}" / BEST_CHECKPOINT)["config"]["data"]["fold"] == fold
    rows = read_raw_predictions(out / OOF_FILE)
    fold_of = {record.patient_id: record.fold for record in records}
    assert sorted({row.patient_id for row in rows}) == sorted(fold_of)
    assert len(rows) == 2 * len(records)  # plain and hflip for every patient
    for row in rows:
        assert row.fold == fold_of[row.patient_id] and row.model == f"fold{row.fold}"
        assert (row.width, row.height) == (128, 128)  # the DICOMs' own size, not the 64 px converted one
    assert json.loads((out / STATE_FILE).read_text()) == {"done": [0, 1], "final": True}


def test_the_final_model_trains_on_every_image_with_the_folds_cut_offs(cv_run: dict[str, Any]) -> None:
    out = cv_run["out"]
    final = load_checkpoint(out / FINAL_DIR / BEST_CHECKPOINT)
    folds = [load_checkpoint(out / f"fold{fold}" / BEST_CHECKPOINT) for fold in (0, 1)]
    assert (
        final["config"]["data"]["fold"] == -1 and final["config"]["optim"]["epochs"] == 1 == final["epoch"]
    )  # the folds' best epoch: 1 of 1
    assert final["score_threshold"] == pytest.approx(np.mean([checkpoint["score_threshold"] for checkpoint in folds]))
    assert final["cut_offs_from"] == [str(out / f"fold{fold}" / BEST_CHECKPOINT) for fold in (0, 1)]
    header = (out / FINAL_DIR / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "loss" in header and not any(
        column.startswith("val_") for column in header
    )  # no image was held back to validate on


def test_the_final_epoch_count_is_the_folds_median_best_rounded_up(tmp_path: Path) -> None:
    import torch

    from lungdet.detection.folds import final_epochs

    for fold, epoch in enumerate((3, 8, 5, 9)):
        (tmp_path / f"fold{fold}").mkdir()
        torch.save({"epoch": epoch}, tmp_path / f"fold{fold}" / BEST_CHECKPOINT)
    assert final_epochs(tmp_path, [0, 1, 2, 3]) == 7  # median of 3, 5, 8, 9 is 6.5
    assert final_epochs(tmp_path, [0, 2]) == 4


def test_oof_boxes_and_truth_are_in_original_pixels(cv_run: dict[str, Any]) -> None:
    out, root = cv_run["out"], cv_run["root"]
    truth = read_labels(out / OOF_LABELS_FILE)
    original = read_labels(root / "synth" / "stage_2_train_labels.csv")
    assert sorted(truth) == sorted(original)
    for patient_id, labels in original.items():
        np.testing.assert_allclose(truth[patient_id].boxes, labels.boxes, atol=0.01)
    boxes = np.concatenate([row.prediction.boxes for row in read_raw_predictions(out / OOF_FILE)])
    assert (boxes[:, 0] + boxes[:, 2]).max() > 64  # scaled up from the 64 px model input to the 128 px DICOMs


def test_summary_gives_each_fold_and_the_pooled_score(cv_run: dict[str, Any], capsys) -> None:
    summary = json.loads((cv_run["out"] / SUMMARY_FILE).read_text())
    assert sorted(summary["folds"]) == ["0", "1"]
    maps = [summary["folds"][fold]["map"] for fold in ("0", "1")]
    assert summary["map_mean"] == pytest.approx(np.mean(maps)) and summary["map_sd"] == pytest.approx(
        np.std(maps, ddof=1)
    )
    assert summary["n_images"] == 8 and len(summary["oof_map_interval"]) == 2


def test_a_rerun_skips_finished_folds(cv_run: dict[str, Any], capsys) -> None:
    best = cv_run["out"] / "fold0" / BEST_CHECKPOINT
    written = best.stat().st_mtime_ns
    assert run_cv(cv_run["coco"], cv_run["out"], cv_run["overrides"], "--tta", "hflip", "--final") == 0
    assert best.stat().st_mtime_ns == written
    printed = capsys.readouterr().out
    assert "fold 0 is done" in printed and "fold 1 is done" in printed and "the final model is done" in printed
    assert "next: lungdet tune --oof" in printed


def test_an_interrupted_fold_continues_from_its_last_checkpoint(cv_run: dict[str, Any], tmp_path: Path) -> None:
    from lungdet.detection.config import load_config
    from lungdet.detection.train import train

    out = tmp_path / "cv"
    # As if killed after fold 1's first epoch of two: its last.pt exists, and it is not marked done.
    train(load_config(None, [*cv_run["overrides"], "data.fold=1"]), cv_run["coco"], out / "fold1", progress=False)
    assert run_cv(cv_run["coco"], out, [*cv_run["overrides"], "optim.epochs=2"], "--folds", "1") == 0
    history = load_checkpoint(out / "fold1" / LAST_CHECKPOINT)["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert json.loads((out / STATE_FILE).read_text()) == {"done": [1]}


def test_a_fold_the_dataset_lacks_is_refused(cv_run: dict[str, Any], tmp_path: Path) -> None:
    from lungdet.errors import LungdetError

    with pytest.raises(LungdetError, match=r"has folds \[0, 1\]; there is no fold 3"):
        run_cv(cv_run["coco"], tmp_path / "cv", cv_run["overrides"], "--folds", "0,3")


def test_tune_runs_on_what_cv_wrote(cv_run: dict[str, Any], capsys) -> None:
    from lungdet.submission.postprocess import load_postprocess
    from lungdet.submission.tune import get_args_parser as tune_parser
    from lungdet.submission.tune import main as tune_main

    out = cv_run["out"]
    args = tune_parser().parse_args(
        [
            "--oof",
            str(out / OOF_FILE),
            "--labels",
            str(out / OOF_LABELS_FILE),
            "--out",
            str(out / "pp.yaml"),
            "--no-progress",
        ]
    )
    assert tune_main(args) == 0
    printed = capsys.readouterr().out
    assert "mAP honest" in printed and "wbf_iou_thr" in printed  # two passes per image: fusion is searched
    load_postprocess(out / "pp.yaml")
