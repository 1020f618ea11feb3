"""The folds of ``lungdet cv``: each fold's run folder and state, training it resumably, the final model, and its out-of-fold predictions.

``lungdet cv`` runs these one fold after the other (:mod:`lungdet.detection.cv`); ``cv --ray`` runs
one fold per Ray task (:mod:`lungdet.detection.ray_cv`). Both record finished folds in
``OUT/cv_state.json``, so that a killed run skips them and continues the fold that was training
from its ``last.pt``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from lungdet.atomic import write_text_atomic
from lungdet.boxes import scale_xywh
from lungdet.detection.config import apply_overrides, config_from_dict, load_config
from lungdet.detection.data import ALL_FOLDS, ImageRecord, load_records
from lungdet.detection.detector import ModelRunner, load_trained_model, probability_map_of
from lungdet.detection.distributed import from_environment
from lungdet.detection.ensemble import predict_raw
from lungdet.detection.inference import LoadedImage
from lungdet.detection.runtime import load_checkpoint, resolve_precision, save_checkpoint
from lungdet.detection.train import BEST_CHECKPOINT, LAST_CHECKPOINT, train
from lungdet.errors import LungdetError
from lungdet.submission.prediction_string import Prediction
from lungdet.submission.raw_predictions import RawPrediction

STATE_FILE = "cv_state.json"
# The model trained on every image by --final; 'fold_all' so that the recipe's runs/cv/fold*/best.pt takes it in too.
FINAL_DIR = "fold_all"


def fold_dir(out_dir: Path, fold: int) -> Path:
    """Fold ``fold``'s run folder: ``OUT/fold{fold}``."""
    return Path(out_dir) / f"fold{fold}"


def read_state(out_dir: Path) -> dict[str, Any]:
    """``OUT/cv_state.json``: ``done``, the finished folds, and ``final`` once the final model is trained.

    ``{"done": []}`` when there is no such file yet.
    """
    path = Path(out_dir) / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"done": []}


def read_done(out_dir: Path) -> list[int]:
    """The folds recorded as finished in ``OUT/cv_state.json`` (empty without the file)."""
    return read_state(out_dir)["done"]


def mark_done(out_dir: Path, fold: int | None = None, *, final: bool = False) -> None:
    """Record a finished fold (or, with ``final``, the finished final model) in ``OUT/cv_state.json``."""
    state = read_state(out_dir)
    if fold is not None:
        state["done"] = sorted(set(state["done"]) | {fold})
    if final:
        state["final"] = True
    write_text_atomic(Path(out_dir) / STATE_FILE, json.dumps(state) + "\n")


def train_folds(
    config_name: str | None,
    data_dir: Path,
    out_dir: Path,
    folds: Sequence[int],
    overrides: Sequence[str],
    *,
    progress: bool = True,
) -> None:
    """Train every fold not yet done, resuming one that has a ``last.pt``; mark each done when it finishes."""
    job = from_environment()
    done = read_done(out_dir)
    for fold in folds:
        run_dir = fold_dir(out_dir, fold)
        if fold in done:
            if job.is_main:
                print(f"lungdet cv: fold {fold} is done ({run_dir}); skipped")
            continue
        if job.is_main:
            print(f"lungdet cv: fold {fold} of {', '.join(map(str, folds))} -> {run_dir}")
        train_resumably(config_name, data_dir, run_dir, [*overrides, f"data.fold={fold}"], progress=progress)
        if job.is_main:
            mark_done(out_dir, fold)


def train_resumably(
    config_name: str | None, data_dir: Path, run_dir: Path, overrides: Sequence[str], *, progress: bool
) -> None:
    """Train one run into ``run_dir``, continuing from its ``last.pt`` (with the config stored there) when a kill left one."""
    resume = (run_dir / LAST_CHECKPOINT).is_file()
    if resume:
        config = config_from_dict(apply_overrides(load_checkpoint(run_dir / LAST_CHECKPOINT)["config"], overrides))
        if from_environment().is_main:
            print(f"lungdet cv: continuing from {run_dir / LAST_CHECKPOINT}")
    else:
        config = load_config(config_name, overrides)
    try:
        train(config, data_dir, run_dir, resume=resume, progress=progress)
    except LungdetError as error:
        if not (resume and "nothing to train" in str(error)):  # killed after its last epoch, before it was marked done
            raise


def final_epochs(out_dir: Path, folds: Sequence[int]) -> int:
    """The epoch count for the final model: the median of the folds' best epochs (what their validation chose), rounded up."""
    epochs = [int(load_checkpoint(fold_dir(out_dir, fold) / BEST_CHECKPOINT)["epoch"]) for fold in folds]
    return int(np.ceil(np.median(epochs)))


def carry_fold_cut_offs(final_checkpoint: Path, fold_checkpoints: Sequence[Path]) -> dict[str, Any]:
    """Write into the final model's checkpoint the folds' mean box cut-off, image cut-off and Platt scaling; returns them.

    The final model has no validation images of its own to choose them on; the folds' were
    chosen on images their models never trained on, at the same epoch count give or take.
    """
    folds = [load_checkpoint(path) for path in fold_checkpoints]
    carried: dict[str, Any] = {
        "score_threshold": float(np.mean([checkpoint.get("score_threshold", 0.5) for checkpoint in folds]))
    }
    if all("image_threshold" in checkpoint for checkpoint in folds):
        carried["image_threshold"] = float(np.mean([checkpoint["image_threshold"] for checkpoint in folds]))
    if all(checkpoint.get("image_calibration") for checkpoint in folds):
        carried["image_calibration"] = [
            float(value) for value in np.mean([checkpoint["image_calibration"] for checkpoint in folds], axis=0)
        ]
    checkpoint = load_checkpoint(final_checkpoint)
    checkpoint.update(carried)
    checkpoint["cut_offs_from"] = [str(path) for path in fold_checkpoints]
    save_checkpoint(final_checkpoint, checkpoint)
    return carried


def train_final(
    config_name: str | None,
    data_dir: Path,
    out_dir: Path,
    folds: Sequence[int],
    overrides: Sequence[str],
    *,
    progress: bool = True,
    run: Callable[..., None] = train_resumably,
    say: Callable[[str], None] = print,
) -> None:
    """``--final``: one model on every image, for the folds' median best epoch count, with the folds' cut-offs (``OUT/fold_all/``).

    ``run`` trains it (:func:`train_resumably`'s parameters) and ``say`` prints a line; ``cv --ray``
    passes a ``run`` that trains it on the cluster and a ``say`` that writes past Ray's log.
    """
    job = from_environment()
    run_dir = Path(out_dir) / FINAL_DIR
    if read_state(out_dir).get("final"):
        if job.is_main:
            say(f"lungdet cv: the final model is done ({run_dir}); skipped")
        return
    epochs = final_epochs(out_dir, folds)
    if job.is_main:
        say(f"lungdet cv: the final model on every image, {epochs} epochs (the folds' median best) -> {run_dir}")
    run(
        config_name,
        data_dir,
        run_dir,
        [*overrides, f"data.fold={ALL_FOLDS}", f"optim.epochs={epochs}"],
        progress=progress,
    )
    if job.is_main:
        carried = carry_fold_cut_offs(
            run_dir / BEST_CHECKPOINT, [fold_dir(out_dir, fold) / BEST_CHECKPOINT for fold in folds]
        )
        say(
            f"lungdet cv: the final model takes the folds' mean cut-offs: {', '.join(f'{key} {value}' for key, value in carried.items())}"
        )
        mark_done(out_dir, final=True)


def read_converted(path: Path) -> LoadedImage:
    """A converted image's pixels; its tags come from the dataset's records (see :func:`predict_out_of_fold`)."""
    pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise LungdetError(f"{path}: cannot be read as an image; convert the dataset again")
    return LoadedImage(pixels)


def to_original(record: ImageRecord, boxes: np.ndarray) -> np.ndarray:
    """XYWH_ABS boxes in a converted image's pixels -> the DICOM's original pixels, each axis by its own scale."""
    return scale_xywh(
        boxes, scale_x=record.original_width / record.width, scale_y=record.original_height / record.height
    )


def predict_out_of_fold(
    data_dir: Path,
    out_dir: Path,
    folds: Sequence[int],
    *,
    device: torch.device,
    tta: str = "none",
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[list[RawPrediction], dict[str, np.ndarray], dict[int, float]]:
    """Each fold's best model on its own validation images: (raw rows in original pixels, truth in original pixels, cut-off per fold).

    The converted images are already at the dataset's size and normalised, as the training loader
    reads them, so the model gets them only resized to its input; boxes go back to the DICOM's
    original pixels with each record's own scale. An unreadable converted image stops the run
    (:func:`read_converted` raises): the dataset itself is damaged.
    """
    records = load_records(data_dir)
    rows: list[RawPrediction] = []
    truth: dict[str, np.ndarray] = {}
    thresholds: dict[int, float] = {}
    for fold in folds:
        model, config, checkpoint = load_trained_model(fold_dir(out_dir, fold) / BEST_CHECKPOINT, device=device)
        thresholds[fold] = float(checkpoint.get("score_threshold", 0.5))
        runner = ModelRunner(
            model,
            config.model.image_size,
            device,
            None,
            resolve_precision(config.amp, device),
            probability_map_of(model, checkpoint),
        )
        # predict_raw names a row by its file's stem, which convert makes the patientId.
        by_stem = {record.path.stem: record for record in (record for record in records if record.fold == fold)}
        fold_rows, _ = predict_raw(
            [runner],
            [f"fold{fold}"],
            [record.path for record in by_stem.values()],
            read=read_converted,
            tags={stem: record.tags for stem, record in by_stem.items()},
            tta=tta,
            batch_size=batch_size,
            progress=progress,
        )
        for row in fold_rows:
            record = by_stem[row.patient_id]
            rows.append(
                RawPrediction(
                    record.patient_id,
                    row.model,
                    row.pass_name,
                    record.original_width,
                    record.original_height,
                    Prediction(row.prediction.scores, to_original(record, row.prediction.boxes)),
                    row.probability,
                    fold,
                )
            )
        for record in by_stem.values():
            truth[record.patient_id] = to_original(record, record.boxes)
    return rows, truth, thresholds
