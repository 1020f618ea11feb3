"""Shared scaffolding for the detection tests: one torch thread, a tiny Faster R-CNN, a tiny synthetic COCO folder, DICOMs to predict.

Under ``--import-mode=importlib`` this file cannot be imported by name, so everything is handed
out as fixtures; module-scoped fixtures in the test files request the session-scoped ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lungdet.data_tools.labels import read_labels
from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.data_tools.to_coco import ConvertOptions, convert_dataset

TINY_IMAGE_SIZE = 64
# A small model that still trains: 64 px input, few RPN proposals, small sampling batches.
# No architecture: each module says where (and whether) it adds one.
TINY_MODEL_OVERRIDES = (
    "model.pretrained=none",
    f"model.image_size={TINY_IMAGE_SIZE}",
    "model.rpn_pre_nms_top_n_train=50",
    "model.rpn_post_nms_top_n_train=20",
    "model.rpn_pre_nms_top_n_test=50",
    "model.rpn_post_nms_top_n_test=20",
    "model.rpn_batch_size_per_image=32",
    "model.box_batch_size_per_image=16",
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[int]:
    """Tiny models gain nothing from threads; on a busy 2-core machine, thread contention made them tens of times slower.

    Module-scoped so that module-scoped fixtures that build or train a model, which pytest sets
    up before any function-scoped fixture, run on one thread too. Yields the thread count it replaced.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def all_torch_threads_when_slow(request: pytest.FixtureRequest, one_torch_thread: int) -> Iterator[None]:
    """Tests marked ``slow`` train a real model for minutes: they get every thread back."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    torch.set_num_threads(one_torch_thread)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_overrides() -> tuple[str, ...]:
    """Config overrides for a tiny model (see ``TINY_MODEL_OVERRIDES``); a tuple, so no test can change it for the others."""
    return TINY_MODEL_OVERRIDES


def write_tiny_coco(root: Path, *, count: int = 8, folds: int = 2) -> Path:
    """``count`` synthetic 128 px DICOMs (half positive, with their tags and RSNA classes) under ``root/synth``, converted at 64 px in ``folds`` folds to ``root/coco`` (by default 8 in two folds: 4 train, 4 validate)."""
    synth = write_synthetic_dataset(root / "synth", count=count, seed=3, positive_fraction=0.5, size=(128, 128))
    convert_dataset(
        synth.images_dir,
        read_labels(synth.labels_csv, synth.class_info_csv),
        root / "coco",
        ConvertOptions(image_size=TINY_IMAGE_SIZE, folds=folds, seed=0),
        progress=False,
    )
    return root / "coco"


@pytest.fixture(scope="session")
def make_tiny_dataset() -> Callable[[Path], Path]:
    """Return ``write_tiny_coco(root) -> root / "coco"``, for module-scoped fixtures to call with their own folder."""
    return write_tiny_coco


# Besides the tiny model: one epoch in batches of 2 on the CPU, the same numbers on any machine.
TRAINED_RUN_EXTRAS = ("data.batch_size=2", "optim.epochs=1", "max_minutes=0", "device=cpu")


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
    make_tiny_dataset: Callable[[Path], Path],
    tiny_model_overrides: tuple[str, ...],
) -> dict[str, Any]:
    """A 1-epoch run on 8 synthetic images at 64 px: its config and best checkpoint (trained once per module that asks)."""
    from lungdet.detection.config import load_config
    from lungdet.detection.train import BEST_CHECKPOINT, train

    root = tmp_path_factory.mktemp("predict_run")
    coco = make_tiny_dataset(root)
    config = load_config(
        None, ["model.architecture=fasterrcnn_mobilenet_v3_large_fpn", *tiny_model_overrides, *TRAINED_RUN_EXTRAS]
    )
    train(config, coco, root / "run", progress=False)
    return {"config": config, "checkpoint": root / "run" / BEST_CHECKPOINT}


# The predict tests' folder of DICOMs: not square, so a swapped axis shows.
DICOM_ROWS, DICOM_COLUMNS = 128, 256


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 synthetic 128 x 256 DICOMs and one corrupt .dcm (``corrupt-0000.dcm``)."""
    synth = write_synthetic_dataset(
        tmp_path_factory.mktemp("predict_dicoms"),
        count=3,
        seed=5,
        positive_fraction=0.67,
        size=(DICOM_ROWS, DICOM_COLUMNS),
    )
    (synth.images_dir / "corrupt-0000.dcm").write_bytes(b"this is not a DICOM file" * 10)
    return synth.images_dir


@pytest.fixture(scope="session")
def dicom_shape() -> tuple[int, int]:
    """``(rows, columns)`` of ``dicom_dir``'s readable DICOMs."""
    return DICOM_ROWS, DICOM_COLUMNS


@pytest.fixture(scope="module")
def good_stems(dicom_dir: Path) -> list[str]:
    """The patientIds of ``dicom_dir``'s readable DICOMs, sorted."""
    return sorted(path.stem for path in dicom_dir.glob("*.dcm") if path.stem != "corrupt-0000")


@pytest.fixture(scope="module")
def mirrored_pair(rsna_sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real RSNA image as a lossless PNG, and its mirror image."""
    import cv2

    from lungdet.data_tools.dicom_io import read_dicom

    folder = tmp_path_factory.mktemp("mirror")
    pixels = read_dicom(sorted(rsna_sample_dir.glob("*.dcm"))[0]).pixels
    cv2.imwrite(str(folder / "upright.png"), pixels)
    cv2.imwrite(str(folder / "mirrored.png"), np.ascontiguousarray(pixels[:, ::-1]))
    return folder / "upright.png", folder / "mirrored.png"


# Besides the tiny model: 4 training images in batches of 2, two optimizer steps per epoch; on the CPU even where a GPU is, so runs repeat exactly.
TINY_RUN_EXTRAS = (
    "device=cpu",
    "data.batch_size=2",
    "optim.epochs=1",
    "optim.warmup_iters=1",
    "max_minutes=0",
    "val_score_thresholds=[0.1, 0.5]",
)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_overrides: tuple[str, ...]) -> list[str]:
    """The overrides of a tiny 1-epoch run, architecture left to the config they go on top of."""
    return [*tiny_model_overrides, *TINY_RUN_EXTRAS]


@pytest.fixture(scope="module")
def tiny_train_config(tiny_run: list[str]) -> Callable[..., Any]:
    """Return ``build(*overrides)``: the tiny run's TrainConfig for MobileNetV3-FPN."""
    from lungdet.detection.config import load_config

    def build(*overrides: str) -> Any:
        return load_config(None, ["model.architecture=fasterrcnn_mobilenet_v3_large_fpn", *tiny_run, *overrides])

    return build


@pytest.fixture
def eager_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile traces as it would, without inductor's code generation (a minute per model on this CPU)."""
    import lungdet.detection.run_state as run_state_module

    monkeypatch.setattr(run_state_module, "COMPILE_BACKEND", "eager")


# NIH ChestX-ray14's Data_Entry_2017.csv header, for the pretrain tests' label files.
NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
NIH_PNG_SIZE = 64


@pytest.fixture(scope="session")
def nih_header() -> str:
    """The header line of NIH's Data_Entry_2017.csv (newline included), for label files a test writes."""
    return NIH_HEADER


def write_nih_pngs(folder: Path, count: int, *, seed: int = 0) -> list[Path]:
    """``count`` 64 px grey PNGs named like NIH's (``00000001_000.png``), half of them one folder deeper."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / ("nested" if index % 2 else "") / f"{index + 1:08d}_000.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # A bright disc on noise: something for the views to share.
        rows, columns = np.mgrid[:NIH_PNG_SIZE, :NIH_PNG_SIZE]
        disc = ((rows - 20 - index) ** 2 + (columns - 32) ** 2 < 150) * 120
        Image.fromarray((rng.integers(0, 100, (NIH_PNG_SIZE, NIH_PNG_SIZE)) + disc).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def make_nih_pngs() -> Callable[..., list[Path]]:
    """Return ``write_nih_pngs(folder, count, *, seed=0) -> paths``, for tests and module-scoped fixtures to call."""
    return write_nih_pngs
