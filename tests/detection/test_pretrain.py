"""Tests for detection/pretrain.py: backbone files that model.pretrained loads (or refuses), and the command line."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from lungdet.cli import main as cli_main
from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.detection.config import ModelConfig, load_config
from lungdet.detection.model import PRETRAIN_MARKER, build_model, load_pretrained_state, uses_frozen_recipe
from lungdet.detection.pretrain import (
    BODY_PREFIX,
    PretrainOptions,
    get_args_parser,
    pretrain,
    save_backbone,
)
from lungdet.errors import ConfigError, LungdetError

MOBILENET = "fasterrcnn_mobilenet_v3_large_fpn"
RESNET50 = "fasterrcnn_resnet50_fpn"
SIZE = 64
# A tensor of the first convolution and one batch-norm running statistic: both must come from the file.
CHECKED_KEYS = ("backbone.body.0.0.weight", "backbone.body.0.1.running_var")


def tiny_detector_config(tiny_model_overrides: tuple[str, ...], *overrides: str) -> ModelConfig:
    return load_config(None, [*tiny_model_overrides, f"model.architecture={MOBILENET}", *overrides]).model


@pytest.fixture(scope="module")
def backbone_files(
    tmp_path_factory: pytest.TempPathFactory, make_nih_pngs: Callable[..., list[Path]], nih_header: str
) -> dict[str, Any]:
    """One SimSiam and one supervised ``lungdet pretrain`` run (2 steps each at 64 px), on 6 PNGs and 2 DICOMs."""
    root = tmp_path_factory.mktemp("pretrain")
    images = root / "images"
    make_nih_pngs(images, 6)
    synth = write_synthetic_dataset(root / "synth", count=2, seed=0, size=(128, 128))
    for dicom in synth.images_dir.glob("*.dcm"):
        (images / "dicom").mkdir(exist_ok=True)
        dicom.rename(images / "dicom" / dicom.name)
    labels = root / "Data_Entry_2017.csv"
    rows = [
        f"{index:08d}_000.png,{'Cardiomegaly|Emphysema' if index % 2 else 'No Finding'},0,{index},58,M,PA\n"
        for index in range(1, 7)
    ]
    labels.write_text(nih_header + "".join(rows) + "00000099_000.png,Effusion,0,99,40,F,AP\n")  # the last names no file
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


def test_fewer_images_than_one_batch_is_refused_before_any_work(
    tmp_path: Path, make_nih_pngs: Callable[..., list[Path]]
) -> None:
    paths = make_nih_pngs(tmp_path, 3)
    with pytest.raises(
        LungdetError, match=re.escape("3 images, fewer than one batch (--batch-size 4); lower --batch-size")
    ):
        pretrain(paths, PretrainOptions(batch_size=4, image_size=SIZE))


def test_an_interrupted_run_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_nih_pngs: Callable[..., list[Path]]
) -> None:
    make_nih_pngs(tmp_path / "images", 4)

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
