"""Tests for detection/pretrain.py: NIH labels, the SimSiam stop-gradient, and backbone files that model.pretrained loads (or refuses)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import FrozenBatchNorm2d

from lungdet.cli import main as cli_main
from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.detection.config import ModelConfig, load_config
from lungdet.detection.model import PRETRAIN_MARKER, build_model, load_pretrained_state, uses_frozen_recipe
from lungdet.detection.pretrain import (
    BODY_PREFIX,
    PretrainOptions,
    SimSiam,
    build_encoder,
    build_optimizer,
    find_radiographs,
    get_args_parser,
    pair_with_labels,
    pretrain,
    read_finding_labels,
    save_backbone,
    simsiam_loss,
)
from lungdet.errors import ConfigError, LabelError, LungdetError

MOBILENET = "fasterrcnn_mobilenet_v3_large_fpn"
RESNET50 = "fasterrcnn_resnet50_fpn"
SIZE = 64
NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
# A tensor of the first convolution and one batch-norm running statistic: both must come from the file.
CHECKED_KEYS = ("backbone.body.0.0.weight", "backbone.body.0.1.running_var")


def write_pngs(folder: Path, count: int, *, seed: int = 0) -> list[Path]:
    """``count`` 64 px grey PNGs named like NIH's (``00000001_000.png``), half of them one folder deeper."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / ("nested" if index % 2 else "") / f"{index + 1:08d}_000.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # A bright disc on noise: something for the views to share.
        rows, columns = np.mgrid[:SIZE, :SIZE]
        disc = ((rows - 20 - index) ** 2 + (columns - 32) ** 2 < 150) * 120
        Image.fromarray((rng.integers(0, 100, (SIZE, SIZE)) + disc).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def tiny_detector_config(tiny_model_overrides: tuple[str, ...], *overrides: str) -> ModelConfig:
    return load_config(None, [*tiny_model_overrides, f"model.architecture={MOBILENET}", *overrides]).model


@pytest.fixture(scope="module")
def backbone_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One SimSiam and one supervised ``lungdet pretrain`` run (2 steps each at 64 px), on 6 PNGs and 2 DICOMs."""
    root = tmp_path_factory.mktemp("pretrain")
    images = root / "images"
    write_pngs(images, 6)
    synth = write_synthetic_dataset(root / "synth", count=2, seed=0, size=(128, 128))
    for dicom in synth.images_dir.glob("*.dcm"):
        (images / "dicom").mkdir(exist_ok=True)
        dicom.rename(images / "dicom" / dicom.name)
    labels = root / "Data_Entry_2017.csv"
    rows = [
        f"{index:08d}_000.png,{'Cardiomegaly|Emphysema' if index % 2 else 'No Finding'},0,{index},58,M,PA\n"
        for index in range(1, 7)
    ]
    labels.write_text(NIH_HEADER + "".join(rows) + "00000099_000.png,Effusion,0,99,40,F,AP\n")  # the last names no file
    outputs = {}
    common = ["--image-size", str(SIZE), "--batch-size", "3", "--architecture", MOBILENET, "--no-progress"]
    assert cli_main(["pretrain", "--image-dir", str(images), "--out", str(root / "simsiam.pth"), *common]) == 0
    outputs["simsiam"] = root / "simsiam.pth"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert (
            cli_main(
                [
                    "pretrain",
                    "--image-dir",
                    str(images),
                    "--labels",
                    str(labels),
                    "--out",
                    str(root / "supervised.pth"),
                    *common,
                ]
            )
            == 0
        )
    outputs["supervised"] = root / "supervised.pth"
    return {"files": outputs, "images": images, "labels": labels, "supervised_printed": printed.getvalue()}


# --- finding images and labels -------------------------------------------------------------------


def test_find_radiographs_takes_pictures_and_dicoms_at_any_depth(tmp_path: Path) -> None:
    for name in ("a.png", "deep/er/b.JPG", "c.jpeg", "d/e.dcm", "notes.txt", "f.dcm.bak"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [path.relative_to(tmp_path).as_posix() for path in find_radiographs(tmp_path)] == [
        "a.png",
        "c.jpeg",
        "d/e.dcm",
        "deep/er/b.JPG",
    ]


def test_nih_findings_become_label_vectors(tmp_path: Path) -> None:
    csv_path = tmp_path / "Data_Entry_2017.csv"
    csv_path.write_text(
        NIH_HEADER
        + "00000001_000.png,Cardiomegaly|Emphysema,0,1,58,M,PA\n"
        + "00000002_000.png,No Finding,0,2,81,F,PA\n"
        + "00000003_000.png,Effusion,1,3,74,F,AP\n"
    )
    labels = read_finding_labels(csv_path)
    assert labels.names == (
        "Cardiomegaly",
        "Effusion",
        "Emphysema",
    )  # the union of findings, sorted; No Finding is none of them
    assert {name: vector.tolist() for name, vector in labels.by_file.items()} == {
        "00000001_000.png": [1.0, 0.0, 1.0],
        "00000002_000.png": [0.0, 0.0, 0.0],
        "00000003_000.png": [0.0, 1.0, 0.0],
    }


def test_a_csv_without_the_findings_column_is_a_label_error_naming_the_fix(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("Image Index,Labels\n00000001_000.png,Effusion\n")
    with pytest.raises(
        LabelError,
        match=re.escape(
            f"{csv_path}: no 'Finding Labels' column (it has: Image Index, Labels); pass NIH's Data_Entry_2017.csv"
        ),
    ):
        read_finding_labels(csv_path)


def test_rows_without_a_file_and_files_without_a_row_are_counted(tmp_path: Path) -> None:
    paths = write_pngs(tmp_path / "images", 3)
    csv_path = tmp_path / "Data_Entry_2017.csv"
    csv_path.write_text(
        NIH_HEADER
        + "00000001_000.png,Mass,0,1,1,M,PA\n00000002_000.png,No Finding,0,2,1,M,PA\n00000077_000.png,Mass,0,7,1,M,PA\n"
    )
    kept, targets, missing_rows, unlabelled = pair_with_labels(paths, read_finding_labels(csv_path))
    assert [path.name for path in kept] == ["00000001_000.png", "00000002_000.png"]
    assert targets.tolist() == [[1.0], [0.0]]
    assert (missing_rows, unlabelled) == (1, 1)


# --- SimSiam -------------------------------------------------------------------------------------


def test_simsiam_targets_are_stop_gradient_and_a_few_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = SimSiam(build_encoder(MOBILENET, SIZE))
    views = torch.randint(0, 256, (4, 2, 1, SIZE, SIZE), dtype=torch.uint8)
    predictions, targets = model(views[:, 0], views[:, 1])
    assert all(prediction.requires_grad for prediction in predictions)
    # The stop-gradient: without it both branches chase each other and collapse to a constant.
    assert all(target.grad_fn is None and not target.requires_grad for target in targets)
    assert predictions[0].shape == targets[0].shape == (4, 512)

    # 6.4 per 256 images is 0.1 a step at batch 4. On one repeated batch SimSiam's loss wanders near 0 for
    # a few steps while momentum builds, then falls towards -1 (-0.8 by step 25).
    optimizer = build_optimizer(model, lr=6.4, batch_size=4)
    losses = []
    for _ in range(10):
        loss = model.loss(views, torch.zeros(4, 0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(-1.0 <= loss <= 1.0 for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02, losses


def test_simsiam_loss_is_minus_one_when_predictions_match_their_targets() -> None:
    first, second = torch.randn(3, 8), torch.randn(3, 8)
    assert simsiam_loss((first * 2, second), (first, second * 5)).item() == pytest.approx(-1.0)
    assert simsiam_loss((first, second), (-first, -second)).item() == pytest.approx(1.0)


@pytest.mark.parametrize("architecture", [MOBILENET, RESNET50])
def test_the_pretrained_body_has_the_detector_backbone_names_and_shapes(architecture: str) -> None:
    encoder = build_encoder(architecture, SIZE)
    detector = build_model(ModelConfig(architecture=architecture, image_size=SIZE, pretrained="none")).state_dict()
    body = {BODY_PREFIX + name: tensor.shape for name, tensor in encoder.body.state_dict().items()}
    assert body and all(detector[name].shape == shape for name, shape in body.items())
    assert encoder.channels == {MOBILENET: 960, RESNET50: 2048}[architecture]


# --- the backbone file ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["simsiam", "supervised"])
def test_the_backbone_file_is_what_model_pretrained_loads(
    backbone_files: dict[str, Any], tiny_model_overrides: tuple[str, ...], method: str
) -> None:
    path = backbone_files["files"][method]
    contents = torch.load(path, map_location="cpu", weights_only=True)
    marker = contents[PRETRAIN_MARKER]
    assert {key: marker[key] for key in ("architecture", "image_size", "method", "images_seen")} == {
        "architecture": MOBILENET,
        "image_size": SIZE,
        "method": method,
        "images_seen": 6,  # two steps of 3
    }
    # Every finding the CSV names, even Effusion, whose one row has no file.
    assert marker["labels"] == (["Cardiomegaly", "Effusion", "Emphysema"] if method == "supervised" else [])
    assert marker["images"] == (6 if method == "supervised" else 8)  # the DICOMs have no NIH row
    assert marker["unreadable"] == 0
    assert all(key.startswith(BODY_PREFIX) for key in contents if key != PRETRAIN_MARKER)

    config = tiny_detector_config(tiny_model_overrides, f"model.pretrained={path}")
    state, notice = load_pretrained_state(config)
    assert notice.startswith(f"initialised from {path}: a lungdet pretrain backbone ({method}, 6 images seen at 64 px)")
    assert not uses_frozen_recipe(state)
    torch.manual_seed(0)
    fresh = build_model(tiny_detector_config(tiny_model_overrides, "model.pretrained=none"))
    torch.manual_seed(0)
    loaded = build_model(config, pretrained_state=state)
    for key in CHECKED_KEYS:
        torch.testing.assert_close(loaded.state_dict()[key], contents[key], rtol=0, atol=0)
        assert not torch.equal(fresh.state_dict()[key], contents[key])
    # Learnt on radiographs with ordinary batch norm: every layer trains, and no statistic is frozen.
    assert not any(isinstance(module, FrozenBatchNorm2d) for module in loaded.modules())
    assert all(parameter.requires_grad for parameter in loaded.parameters())


def test_the_supervised_run_says_how_many_rows_had_no_file(backbone_files: dict[str, Any]) -> None:
    assert backbone_files["supervised_printed"].splitlines()[0] == (
        f"lungdet pretrain: 1 of 7 rows of {backbone_files['labels']} name a file not under {backbone_files['images']}, "
        "and 2 files there are in no row; both are left out, 6 labelled images remain"
    )


def test_a_file_for_another_architecture_is_refused_naming_both(
    tmp_path: Path, tiny_model_overrides: tuple[str, ...]
) -> None:
    path = tmp_path / "r50_backbone.pth"
    save_backbone(
        path,
        {
            "backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7),
            PRETRAIN_MARKER: {"architecture": RESNET50, "method": "simsiam"},
        },
    )
    config = tiny_detector_config(tiny_model_overrides, f"model.pretrained={path}")
    with pytest.raises(
        ConfigError,
        match=re.escape(f"a lungdet pretrain backbone for {RESNET50}, but model.architecture is {MOBILENET}"),
    ):
        load_pretrained_state(config)


def test_other_pretrained_files_keep_the_torchvision_recipe() -> None:
    assert uses_frozen_recipe({"backbone.body.0.0.weight": torch.zeros(1)})
    assert not uses_frozen_recipe(None)


def test_fewer_images_than_one_batch_is_refused_before_any_work(tmp_path: Path) -> None:
    paths = write_pngs(tmp_path, 3)
    with pytest.raises(
        LungdetError, match=re.escape("3 images, fewer than one batch (--batch-size 4); lower --batch-size")
    ):
        pretrain(paths, PretrainOptions(batch_size=4, image_size=SIZE))


def test_an_interrupted_run_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_pngs(tmp_path / "images", 4)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("lungdet.detection.pretrain.pretrain_one_epoch", interrupted)
    out = tmp_path / "out" / "backbone.pth"
    assert (
        cli_main(
            [
                "pretrain",
                "--image-dir",
                str(tmp_path / "images"),
                "--out",
                str(out),
                "--image-size",
                str(SIZE),
                "--batch-size",
                "2",
            ]
        )
        == 130
    )
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_the_epilog_example_parses() -> None:
    parser = get_args_parser()
    example = parser.epilog.removeprefix("example: lungdet pretrain ").split()
    args = parser.parse_args(example)
    assert (args.image_dir, args.labels, args.architecture, args.image_size) == (
        Path("nih/images"),
        Path("nih/Data_Entry_2017.csv"),
        MOBILENET,
        256,
    )
