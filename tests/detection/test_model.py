"""Tests for detection/model.py: both architectures at a tiny size, anchors, pretrained weights (offline, local, missing)."""

from __future__ import annotations

import re
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.hub
from torchvision.models.detection import FasterRCNN_MobileNet_V3_Large_FPN_Weights
from torchvision.ops import FrozenBatchNorm2d

from data_tools.errors import ConfigError
from detection.config import MODEL_ARCHITECTURES, ModelConfig, load_config
from detection.model import MODELS, anchor_generator, build_model, load_matching_weights, load_pretrained_state

IMAGE_SIZE = 64
MOBILENET = "fasterrcnn_mobilenet_v3_large_fpn"
TORCHVISION_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


@pytest.fixture(scope="module")
def tiny_config(tiny_model_overrides: tuple[str, ...]) -> Callable[..., ModelConfig]:
    """Return ``build(*overrides, architecture=MOBILENET)``: the model section of a tiny config."""

    def build(*overrides: str, architecture: str = MOBILENET) -> ModelConfig:
        return load_config(None, [*tiny_model_overrides, f"model.architecture={architecture}", *overrides]).model

    return build


def tiny_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A positive and a negative 64 px image; boxes XYXY_ABS in those pixels."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


# --- building and running -----------------------------------------------------------------------


def test_every_configurable_architecture_has_a_builder() -> None:
    assert set(MODELS) == set(MODEL_ARCHITECTURES)


@pytest.mark.parametrize("architecture", MODEL_ARCHITECTURES)
def test_model_trains_and_predicts_at_a_tiny_size(tiny_config: Callable[..., ModelConfig], architecture: str) -> None:
    torch.manual_seed(0)
    config = tiny_config("model.box_detections_per_img=5", architecture=architecture)
    model = build_model(config)
    images, targets = tiny_batch()

    model.train()
    losses = model(images, targets)
    assert set(losses) == TORCHVISION_LOSSES
    assert all(bool(torch.isfinite(value)) for value in losses.values())
    sum(losses.values()).backward()

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for output in outputs:
        count = output["boxes"].shape[0]
        assert count <= 5
        assert output["boxes"].shape == (count, 4) and output["scores"].shape == (count,) and output["labels"].shape == (count,)
        assert bool(((output["boxes"] >= 0) & (output["boxes"] <= IMAGE_SIZE)).all())
        assert bool((output["scores"] >= config.box_score_thresh).all())
        assert set(output["labels"].tolist()) <= {1}


def test_from_scratch_every_layer_trains_with_ordinary_batch_norm(tiny_config: Callable[..., ModelConfig]) -> None:
    model = build_model(tiny_config())
    assert not any(isinstance(module, FrozenBatchNorm2d) for module in model.modules())
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_with_pretrained_weights_batch_norm_is_frozen_and_early_stages_do_not_train(tiny_config: Callable[..., ModelConfig]) -> None:
    config = tiny_config("model.trainable_backbone_layers=0")
    model = build_model(config, frozen_batch_norm=True)
    assert any(isinstance(module, FrozenBatchNorm2d) for module in model.modules())
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    assert not any(parameter.requires_grad for parameter in model.backbone.body.parameters())
    assert all(parameter.requires_grad for parameter in model.roi_heads.parameters())


# --- anchors ------------------------------------------------------------------------------------


def test_anchor_sizes_are_spread_one_per_feature_map_when_the_counts_match(tiny_config: Callable[..., ModelConfig]) -> None:
    generator = anchor_generator(tiny_config("model.anchor_sizes=[16, 32, 64]", "model.anchor_aspect_ratios=[1.0, 1.5]"), 3)
    assert generator.sizes == ((16,), (32,), (64,))
    assert generator.aspect_ratios == ((1.0, 1.5),) * 3
    assert generator.num_anchors_per_location() == [2, 2, 2]


def test_every_anchor_size_goes_on_every_map_when_the_counts_differ(tiny_config: Callable[..., ModelConfig]) -> None:
    generator = anchor_generator(tiny_config("model.anchor_sizes=[16, 32, 64]", "model.anchor_aspect_ratios=[1.0, 1.5]"), 5)
    assert generator.sizes == ((16, 32, 64),) * 5
    assert generator.aspect_ratios == ((1.0, 1.5),) * 5
    assert generator.num_anchors_per_location() == [6] * 5


def test_build_model_uses_the_architecture_feature_map_count_for_anchors(tiny_config: Callable[..., ModelConfig]) -> None:
    sizes = "model.anchor_sizes=[32, 64, 128, 256, 512]"
    assert build_model(tiny_config(sizes, architecture="fasterrcnn_resnet50_fpn")).rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert build_model(tiny_config(sizes, architecture=MOBILENET)).rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),) * 3


# --- pretrained weights -------------------------------------------------------------------------


def test_pretrained_none_trains_from_scratch(tiny_config: Callable[..., ModelConfig]) -> None:
    state, notice = load_pretrained_state(tiny_config("model.pretrained=none"))
    assert state is None
    assert notice == "training from scratch (model.pretrained: none)"


def test_pretrained_auto_offline_falls_back_to_scratch_quietly(tiny_config: Callable[..., ModelConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # An empty torch cache and no network, whatever the machine running the test has.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    state, notice = load_pretrained_state(tiny_config("model.pretrained=auto"))
    assert state is None
    assert "\n" not in notice
    assert re.fullmatch(r"torchvision FasterRCNN_MobileNet_V3_Large_FPN_Weights\.COCO_V1 weights unavailable \(.*Name or service not known.*\); training from scratch", notice)
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")


def test_pretrained_auto_uses_torchvision_weights_when_available(tiny_config: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    fake_state = {"roi_heads.box_head.fc6.bias": torch.zeros(1024)}
    monkeypatch.setattr(FasterRCNN_MobileNet_V3_Large_FPN_Weights, "get_state_dict", lambda self, **kwargs: fake_state)
    state, notice = load_pretrained_state(tiny_config("model.pretrained=auto"))
    assert state is fake_state
    assert notice == "initialised from torchvision FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1"


@pytest.mark.parametrize("as_checkpoint", [False, True], ids=["state_dict", "lungdet_checkpoint"])
def test_pretrained_local_file_is_loaded_into_the_model(tiny_config: Callable[..., ModelConfig], tmp_path: Path, as_checkpoint: bool) -> None:
    torch.manual_seed(1)
    source = build_model(tiny_config())
    path = tmp_path / "weights.pth"
    torch.save({"model": source.state_dict(), "epoch": 3} if as_checkpoint else source.state_dict(), path)

    config = tiny_config(f"model.pretrained={path}")
    state, notice = load_pretrained_state(config)
    assert notice == f"initialised from {path}"
    torch.manual_seed(2)
    loaded = build_model(config, pretrained_state=state)
    torch.manual_seed(2)
    fresh = build_model(config)
    for key in ("backbone.body.0.0.weight", "roi_heads.box_predictor.cls_score.weight", "rpn.head.cls_logits.weight"):
        torch.testing.assert_close(loaded.state_dict()[key], source.state_dict()[key])
        assert not torch.equal(fresh.state_dict()[key], source.state_dict()[key])


def test_pretrained_missing_file_is_a_config_error(tiny_config: Callable[..., ModelConfig], tmp_path: Path) -> None:
    missing = tmp_path / "missing.pth"
    with pytest.raises(ConfigError, match=re.escape(f"model.pretrained='{missing}': no such file; use 'auto', 'none' or the path of a .pth state dict")):
        load_pretrained_state(tiny_config(f"model.pretrained={missing}"))


def test_pretrained_file_that_is_not_a_state_dict_is_a_config_error(tiny_config: Callable[..., ModelConfig], tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not torch")
    with pytest.raises(ConfigError, match=re.escape(f"model.pretrained={path}: cannot be loaded as a torch state dict")):
        load_pretrained_state(tiny_config(f"model.pretrained={path}"))


def test_load_matching_weights_skips_shape_mismatches_and_counts_them(tiny_config: Callable[..., ModelConfig]) -> None:
    torch.manual_seed(3)
    three_classes = build_model(tiny_config("model.num_classes=3"))
    two_classes = build_model(tiny_config("model.num_classes=2"))
    before = {key: value.clone() for key, value in two_classes.state_dict().items()}
    state = {**three_classes.state_dict(), "not.in.the.model": torch.zeros(1)}

    loaded, skipped = load_matching_weights(two_classes, state)

    # cls_score weight+bias ([3, .] vs [2, .]) and bbox_pred weight+bias ([12, .] vs [8, .]), plus the unknown key.
    assert (loaded, skipped) == (len(state) - 5, 5)
    after = two_classes.state_dict()
    for key in ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.bbox_pred.bias"):
        torch.testing.assert_close(after[key], before[key])
    torch.testing.assert_close(after["roi_heads.box_head.fc6.weight"], three_classes.state_dict()["roi_heads.box_head.fc6.weight"])
