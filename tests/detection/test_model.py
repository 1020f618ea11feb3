"""Tests for detection/model.py: every architecture at a tiny size, anchors, pretrained weights (offline, local, missing, COCO layout)."""

from __future__ import annotations

import copy
import re
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.hub
from torch import nn
from torchvision.models import detection as torchvision_detection
from torchvision.models.detection import FasterRCNN_MobileNet_V3_Large_FPN_Weights
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import FrozenBatchNorm2d

from lungdet.detection.config import MODEL_ARCHITECTURES, ModelConfig, load_config
from lungdet.detection.masks import box_masks
from lungdet.detection.model import (
    MODELS,
    RETINANET_ANCHOR_SCALES,
    anchor_generator,
    build_model,
    in_memory_layout,
    load_matching_weights,
    load_pretrained_state,
    needs_masks,
)
from lungdet.errors import ConfigError

IMAGE_SIZE = 64
MOBILENET = "fasterrcnn_mobilenet_v3_large_fpn"
RCNN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
EXPECTED_LOSSES = {
    "fasterrcnn_resnet50_fpn": RCNN_LOSSES,
    "fasterrcnn_resnet50_fpn_v2": RCNN_LOSSES,
    MOBILENET: RCNN_LOSSES,
    "retinanet_resnet50_fpn": {"classification", "bbox_regression"},
    "maskrcnn_resnet50_fpn": RCNN_LOSSES | {"loss_mask"},
}
EXPECTED_OUTPUTS = {architecture: {"boxes", "scores", "labels"} for architecture in MODEL_ARCHITECTURES} | {
    "maskrcnn_resnet50_fpn": {"boxes", "scores", "labels", "masks"}
}
# The class-specific tensors, whose shapes depend on num_classes: what COCO's 91-class weights cannot fill.
CLASS_SPECIFIC = {
    "fasterrcnn_resnet50_fpn": {
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.bbox_pred.bias",
    },
    "retinanet_resnet50_fpn": {
        "head.classification_head.cls_logits.weight",
        "head.classification_head.cls_logits.bias",
    },
}
CLASS_SPECIFIC["fasterrcnn_resnet50_fpn_v2"] = CLASS_SPECIFIC[MOBILENET] = CLASS_SPECIFIC["fasterrcnn_resnet50_fpn"]
CLASS_SPECIFIC["maskrcnn_resnet50_fpn"] = CLASS_SPECIFIC["fasterrcnn_resnet50_fpn"] | {
    "roi_heads.mask_predictor.mask_fcn_logits.weight",
    "roi_heads.mask_predictor.mask_fcn_logits.bias",
}
# Small enough to run fast, low enough that even an untrained model reports boxes to check.
RUN_OVERRIDES = ("model.box_detections_per_img=5", "model.box_score_thresh=0.001")


@pytest.fixture(scope="module")
def tiny_config(tiny_model_overrides: tuple[str, ...]) -> Callable[..., ModelConfig]:
    """Return ``build(*overrides, architecture=MOBILENET)``: the model section of a tiny config."""

    def build(*overrides: str, architecture: str = MOBILENET) -> ModelConfig:
        return load_config(None, [*tiny_model_overrides, f"model.architecture={architecture}", *overrides]).model

    return build


@pytest.fixture(scope="module")
def tiny_model(tiny_config: Callable[..., ModelConfig]) -> Callable[[str], nn.Module]:
    """Return ``get(architecture)``: one from-scratch model per architecture with ``RUN_OVERRIDES``, built on first use.

    Shared by this module's tests, because resnet50 builds are slow; a test that changes the
    weights takes a ``copy.deepcopy``. Training steps change batch-norm statistics, so no test
    may depend on the exact weights of a shared model.
    """
    models: dict[str, nn.Module] = {}

    def get(architecture: str) -> nn.Module:
        if architecture not in models:
            torch.manual_seed(0)
            models[architecture] = build_model(tiny_config(*RUN_OVERRIDES, architecture=architecture))
        return models[architecture]

    return get


def tiny_batch(*, mask_shape: str | None = None) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A positive and a negative 64 px image; boxes XYXY_ABS in those pixels, with ``masks`` drawn from them when ``mask_shape`` is set."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    if mask_shape is not None:
        for target in targets:
            target["masks"] = box_masks(target["boxes"], height=IMAGE_SIZE, width=IMAGE_SIZE, shape=mask_shape)
    return images, targets


# --- building and running -----------------------------------------------------------------------


def test_every_configurable_architecture_has_a_builder() -> None:
    assert set(MODELS) == set(MODEL_ARCHITECTURES)


def test_in_memory_layout_moves_the_convolutions_to_channels_last_only_when_asked(
    tiny_model: Callable[[str], nn.Module],
) -> None:
    model = copy.deepcopy(tiny_model(MOBILENET))
    # Kernels wider than 1x1 over more than one input channel: the others are laid out alike either way.
    spatial_weights = lambda: [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]  # noqa: E731
    assert spatial_weights() and all(weight.is_contiguous() for weight in spatial_weights())
    assert in_memory_layout(model, channels_last=False) is model
    assert all(weight.is_contiguous() for weight in spatial_weights())
    assert in_memory_layout(model, channels_last=True) is model
    assert all(
        weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        for weight in spatial_weights()
    )


def test_only_mask_rcnn_needs_masks() -> None:
    assert {architecture for architecture in MODEL_ARCHITECTURES if needs_masks(architecture)} == {
        "maskrcnn_resnet50_fpn"
    }


def test_an_unknown_architecture_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(
        ConfigError,
        match=r"model.architecture='yolo': unknown; use one of fasterrcnn_resnet50_fpn, .*maskrcnn_resnet50_fpn",
    ):
        needs_masks("yolo")
    with pytest.raises(ConfigError, match=r"model.architecture='yolo': unknown"):
        build_model(ModelConfig(architecture="yolo"))


@pytest.mark.parametrize("architecture", MODEL_ARCHITECTURES)
def test_model_trains_and_predicts_at_a_tiny_size(
    tiny_config: Callable[..., ModelConfig], tiny_model: Callable[[str], nn.Module], architecture: str
) -> None:
    config = tiny_config(*RUN_OVERRIDES, architecture=architecture)
    model = tiny_model(architecture)
    images, targets = tiny_batch(mask_shape=config.mask_shape if needs_masks(architecture) else None)

    torch.manual_seed(0)
    model.train()
    model.zero_grad()
    losses = model(images, targets)
    assert set(losses) == EXPECTED_LOSSES[architecture]
    assert all(bool(torch.isfinite(value)) for value in losses.values())
    sum(losses.values()).backward()
    gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    assert gradients and all(bool(torch.isfinite(gradient).all()) for gradient in gradients)

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for output in outputs:
        assert set(output) == EXPECTED_OUTPUTS[architecture]
        count = output["boxes"].shape[0]
        assert 1 <= count <= 5
        assert (
            output["boxes"].shape == (count, 4)
            and output["scores"].shape == (count,)
            and output["labels"].shape == (count,)
        )
        assert bool(((output["boxes"] >= 0) & (output["boxes"] <= IMAGE_SIZE)).all())
        assert bool((output["scores"] >= config.box_score_thresh).all())
        # Label 1 is lung_opacity for every architecture; a 0 would be a background box (see ForegroundRetinaNet).
        assert set(output["labels"].tolist()) == {1}
        if "masks" in output:
            assert output["masks"].shape == (count, 1, IMAGE_SIZE, IMAGE_SIZE)
            assert bool(((output["masks"] >= 0) & (output["masks"] <= 1)).all())


def test_retinanet_has_one_classification_output_per_foreground_class(tiny_model: Callable[[str], nn.Module]) -> None:
    head = tiny_model("retinanet_resnet50_fpn").head.classification_head
    assert head.num_classes == 1  # model.num_classes=2 counts the background, which RetinaNet does not score
    assert head.cls_logits.out_channels == 9  # 3 scales x 3 ratios, one class


def test_retinanet_rejects_a_background_label_in_the_targets(tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model("retinanet_resnet50_fpn")
    images, targets = tiny_batch()
    targets[0]["labels"] = torch.tensor([0])
    model.train()
    with pytest.raises(ValueError, match=re.escape("RetinaNet target 0: labels [0] outside 1..1; 0 is the background")):
        model(images, targets)


def test_fasterrcnn_v2_follows_the_torchvision_recipe(tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model("fasterrcnn_resnet50_fpn_v2")
    assert len(model.rpn.head.conv) == 2
    assert isinstance(model.roi_heads.box_head, FastRCNNConvFCHead)
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.backbone.fpn.modules())
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.roi_heads.box_head.modules())


@pytest.mark.parametrize("architecture", MODEL_ARCHITECTURES)
def test_state_dict_matches_torchvision_so_coco_weights_load_except_the_class_layers(
    tiny_model: Callable[[str], nn.Module], architecture: str
) -> None:
    # torchvision's own builder with COCO's 91 classes, random weights: the layout the COCO_V1 file has.
    torch.manual_seed(4)
    reference = getattr(torchvision_detection, architecture)(
        weights=None, weights_backbone=None, num_classes=91
    ).state_dict()
    model = copy.deepcopy(tiny_model(architecture))
    own = model.state_dict()
    assert set(own) == set(reference)
    assert {key for key in own if own[key].shape != reference[key].shape} == CLASS_SPECIFIC[architecture]

    loaded, skipped = load_matching_weights(model, reference)

    assert (loaded, skipped) == (len(own) - len(CLASS_SPECIFIC[architecture]), len(CLASS_SPECIFIC[architecture]))
    after = model.state_dict()
    shared = [key for key in own if key not in CLASS_SPECIFIC[architecture] and key.endswith("weight")]
    for key in shared[:: max(1, len(shared) // 10)] + shared[-3:]:
        torch.testing.assert_close(after[key], reference[key])
    for key in CLASS_SPECIFIC[architecture]:
        torch.testing.assert_close(after[key], own[key])


def legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the layer names torchvision used before 0.13, which the COCO_V1 files of the older models still have."""
    rules = [
        (r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.", r"backbone.fpn.\1_blocks.\2."),
        (r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv."),
        (r"^roi_heads\.mask_head\.(\d+)\.0\.", lambda match: f"roi_heads.mask_head.mask_fcn{int(match[1]) + 1}."),
        (
            r"^head\.(classification|regression)_head\.conv\.(\d+)\.0\.",
            lambda match: f"head.{match[1]}_head.conv.{2 * int(match[2])}.",
        ),
    ]
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


@pytest.mark.parametrize(
    "architecture", ["fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn", MOBILENET]
)
def test_coco_weights_with_legacy_layer_names_load_completely(
    tiny_model: Callable[[str], nn.Module], architecture: str
) -> None:
    torch.manual_seed(5)
    reference = getattr(torchvision_detection, architecture)(
        weights=None, weights_backbone=None, num_classes=91
    ).state_dict()
    legacy = legacy_names(reference)
    assert (
        "rpn.head.conv.weight" in legacy or "head.regression_head.conv.6.weight" in legacy
    )  # the renaming did something
    model = copy.deepcopy(tiny_model(architecture))

    loaded, skipped = load_matching_weights(model, legacy)

    assert (loaded, skipped) == (
        len(model.state_dict()) - len(CLASS_SPECIFIC[architecture]),
        len(CLASS_SPECIFIC[architecture]),
    )
    after = model.state_dict()
    for key in (
        "backbone.fpn.inner_blocks.0.0.weight",
        "backbone.fpn.layer_blocks.2.0.bias",
        "rpn.head.conv.0.0.weight",
        "roi_heads.mask_head.3.0.weight",
        "head.classification_head.conv.3.0.weight",
        "head.regression_head.conv.0.0.bias",
    ):
        if key in reference:
            torch.testing.assert_close(after[key], reference[key])


@pytest.mark.parametrize("architecture", MODEL_ARCHITECTURES)
def test_from_scratch_every_layer_trains_with_ordinary_batch_norm(
    tiny_model: Callable[[str], nn.Module], architecture: str
) -> None:
    model = tiny_model(architecture)
    assert not any(isinstance(module, FrozenBatchNorm2d) for module in model.modules())
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.backbone.body.modules())
    assert all(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.parametrize("architecture", [a for a in MODEL_ARCHITECTURES if a != "fasterrcnn_resnet50_fpn_v2"])
def test_with_pretrained_weights_batch_norm_is_frozen_and_early_stages_do_not_train(
    tiny_config: Callable[..., ModelConfig], architecture: str
) -> None:
    config = tiny_config("model.trainable_backbone_layers=0", architecture=architecture)
    model = build_model(config, frozen_batch_norm=True)
    assert any(isinstance(module, FrozenBatchNorm2d) for module in model.modules())
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    assert not any(parameter.requires_grad for parameter in model.backbone.body.parameters())
    assert all(
        parameter.requires_grad for name, parameter in model.named_parameters() if not name.startswith("backbone.body.")
    )


def test_fasterrcnn_v2_with_pretrained_weights_keeps_ordinary_batch_norm_like_torchvision(
    tiny_config: Callable[..., ModelConfig],
) -> None:
    config = tiny_config("model.trainable_backbone_layers=2", architecture="fasterrcnn_resnet50_fpn_v2")
    model = build_model(config, frozen_batch_norm=True)
    assert not any(isinstance(module, FrozenBatchNorm2d) for module in model.modules())
    assert isinstance(model.backbone.body.bn1, nn.BatchNorm2d)
    trainable = {
        name.split(".")[0] for name, parameter in model.backbone.body.named_parameters() if parameter.requires_grad
    }
    assert trainable == {"layer3", "layer4"}  # the last 2 stages
    assert all(
        parameter.requires_grad for name, parameter in model.named_parameters() if not name.startswith("backbone.body.")
    )


# --- anchors ------------------------------------------------------------------------------------


def test_anchor_sizes_are_spread_one_per_feature_map_when_the_counts_match(
    tiny_config: Callable[..., ModelConfig],
) -> None:
    generator = anchor_generator(
        tiny_config("model.anchor_sizes=[16, 32, 64]", "model.anchor_aspect_ratios=[1.0, 1.5]"), 3
    )
    assert generator.sizes == ((16,), (32,), (64,))
    assert generator.aspect_ratios == ((1.0, 1.5),) * 3
    assert generator.num_anchors_per_location() == [2, 2, 2]


def test_every_anchor_size_goes_on_every_map_when_the_counts_differ(tiny_config: Callable[..., ModelConfig]) -> None:
    generator = anchor_generator(
        tiny_config("model.anchor_sizes=[16, 32, 64]", "model.anchor_aspect_ratios=[1.0, 1.5]"), 5
    )
    assert generator.sizes == ((16, 32, 64),) * 5
    assert generator.aspect_ratios == ((1.0, 1.5),) * 5
    assert generator.num_anchors_per_location() == [6] * 5


def test_build_model_uses_the_architecture_feature_map_count_for_anchors(
    tiny_config: Callable[..., ModelConfig],
) -> None:
    sizes = "model.anchor_sizes=[32, 64, 128, 256, 512]"
    assert build_model(tiny_config(sizes, architecture="fasterrcnn_resnet50_fpn")).rpn.anchor_generator.sizes == (
        (32,),
        (64,),
        (128,),
        (256,),
        (512,),
    )
    assert (
        build_model(tiny_config(sizes, architecture=MOBILENET)).rpn.anchor_generator.sizes
        == ((32, 64, 128, 256, 512),) * 3
    )


def test_retinanet_anchors_put_three_octave_scales_of_one_size_on_each_of_five_levels(
    tiny_config: Callable[..., ModelConfig], tiny_model: Callable[[str], nn.Module]
) -> None:
    config = tiny_config(
        "model.anchor_sizes=[32, 64, 128, 256, 512]",
        "model.anchor_aspect_ratios=[0.5, 1.0, 2.0]",
        architecture="retinanet_resnet50_fpn",
    )
    generator = anchor_generator(config, 5, scales=RETINANET_ANCHOR_SCALES)
    # 32 x 2^(1/3) = 40.3 and 32 x 2^(2/3) = 50.8, truncated as torchvision does; and so on per level.
    assert generator.sizes == ((32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406), (512, 645, 812))
    assert generator.num_anchors_per_location() == [9] * 5
    model = tiny_model("retinanet_resnet50_fpn")
    assert model.anchor_generator.sizes == generator.sizes
    with torch.no_grad():
        assert len(model.backbone(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))) == 5  # P3..P7


def test_retinanet_anchors_spread_every_scaled_size_on_every_level_when_the_counts_differ(
    tiny_config: Callable[..., ModelConfig],
) -> None:
    config = tiny_config(
        "model.anchor_sizes=[16, 64]", "model.anchor_aspect_ratios=[1.0, 1.5]", architecture="retinanet_resnet50_fpn"
    )
    generator = anchor_generator(config, 5, scales=RETINANET_ANCHOR_SCALES)
    assert generator.sizes == ((16, 20, 25, 64, 80, 101),) * 5
    assert generator.num_anchors_per_location() == [12] * 5


# --- pretrained weights -------------------------------------------------------------------------


def test_pretrained_none_trains_from_scratch(tiny_config: Callable[..., ModelConfig]) -> None:
    state, notice = load_pretrained_state(tiny_config("model.pretrained=none"))
    assert state is None
    assert notice == "training from scratch (model.pretrained: none)"


COCO_WEIGHTS = {
    "fasterrcnn_resnet50_fpn": "FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
    "fasterrcnn_resnet50_fpn_v2": "FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1",
    MOBILENET: "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",
    "retinanet_resnet50_fpn": "RetinaNet_ResNet50_FPN_Weights.COCO_V1",
    "maskrcnn_resnet50_fpn": "MaskRCNN_ResNet50_FPN_Weights.COCO_V1",
}


@pytest.mark.parametrize("architecture", MODEL_ARCHITECTURES)
def test_pretrained_auto_offline_falls_back_to_scratch_quietly(
    tiny_config: Callable[..., ModelConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    architecture: str,
) -> None:
    # An empty torch cache and no network, whatever the machine running the test has.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    state, notice = load_pretrained_state(tiny_config("model.pretrained=auto", architecture=architecture))
    assert state is None
    assert "\n" not in notice
    assert re.fullmatch(
        rf"torchvision {re.escape(COCO_WEIGHTS[architecture])} weights unavailable \(.*Name or service not known.*\); training from scratch",
        notice,
    )
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")


def test_pretrained_auto_uses_torchvision_weights_when_available(
    tiny_config: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_state = {"roi_heads.box_head.fc6.bias": torch.zeros(1024)}
    monkeypatch.setattr(FasterRCNN_MobileNet_V3_Large_FPN_Weights, "get_state_dict", lambda self, **kwargs: fake_state)
    state, notice = load_pretrained_state(tiny_config("model.pretrained=auto"))
    assert state is fake_state
    assert notice == "initialised from torchvision FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1"


@pytest.mark.parametrize("as_checkpoint", [False, True], ids=["state_dict", "lungdet_checkpoint"])
def test_pretrained_local_file_is_loaded_into_the_model(
    tiny_config: Callable[..., ModelConfig], tmp_path: Path, as_checkpoint: bool
) -> None:
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
    with pytest.raises(
        ConfigError,
        match=re.escape(
            f"model.pretrained='{missing}': no such file; use 'auto', 'none' or the path of a .pth state dict"
        ),
    ):
        load_pretrained_state(tiny_config(f"model.pretrained={missing}"))


def test_pretrained_file_that_is_not_a_state_dict_is_a_config_error(
    tiny_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not torch")
    with pytest.raises(
        ConfigError, match=re.escape(f"model.pretrained={path}: cannot be loaded as a torch state dict")
    ):
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
    torch.testing.assert_close(
        after["roi_heads.box_head.fc6.weight"], three_classes.state_dict()["roi_heads.box_head.fc6.weight"]
    )
