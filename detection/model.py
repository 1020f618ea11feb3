"""Build torchvision detectors from a :class:`~detection.config.ModelConfig`.

``MODELS`` maps an architecture name to a backbone builder; :func:`build_model` adds the anchor
generator and the Faster R-CNN heads, then loads pretrained weights when they can be had:
torchvision's COCO weights (from the local cache, or downloaded), or a local ``.pth`` file.
With neither it trains from scratch and says so in one line. It never fails because a
download is impossible: this tool must run on machines without internet.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models.detection import (
    FasterRCNN,
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from data_tools.errors import ConfigError
from detection.config import ModelConfig


@dataclass(frozen=True)
class Architecture:
    """How to build one backbone and where its COCO weights come from."""

    build_backbone: Callable[[Callable[..., nn.Module], int], nn.Module]  # (norm layer, trainable layers) -> backbone with FPN
    feature_maps: int  # FPN outputs the RPN sees; decides how anchor sizes are spread
    all_layers: int  # trainable-layer count meaning "train everything" (from scratch)
    coco_weights: object  # torchvision weights enum member


def _resnet50_fpn(norm_layer: Callable[..., nn.Module], trainable_layers: int) -> nn.Module:
    return _resnet_fpn_extractor(resnet50(weights=None, norm_layer=norm_layer), trainable_layers)


def _mobilenet_v3_large_fpn(norm_layer: Callable[..., nn.Module], trainable_layers: int) -> nn.Module:
    return _mobilenet_extractor(mobilenet_v3_large(weights=None, norm_layer=norm_layer), True, trainable_layers)


MODELS: dict[str, Architecture] = {
    "fasterrcnn_resnet50_fpn": Architecture(_resnet50_fpn, feature_maps=5, all_layers=5, coco_weights=FasterRCNN_ResNet50_FPN_Weights.COCO_V1),
    "fasterrcnn_mobilenet_v3_large_fpn": Architecture(
        _mobilenet_v3_large_fpn, feature_maps=3, all_layers=6, coco_weights=FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1
    ),
}


def load_pretrained_state(config: ModelConfig) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The pretrained state dict named by ``config.pretrained`` (or None) and a one-line notice.

    ``'auto'`` asks torchvision, which reads its cache (``$TORCH_HOME``) or downloads; any
    failure (offline, proxy, corrupt cache) falls back to training from scratch.
    """
    if config.pretrained == "none":
        return None, "training from scratch (model.pretrained: none)"
    if config.pretrained == "auto":
        weights = MODELS[config.architecture].coco_weights
        try:
            # torch.hub announces every download attempt ('Downloading: ...', on stdout since torch
            # 2.x, on stderr before); offline that line is noise before our own one-line notice,
            # so both streams are captured.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = weights.get_state_dict(progress=False, check_hash=True)
            return state, f"initialised from torchvision {weights}"
        except Exception as error:  # network, hash and IO errors all mean "not available here"
            reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            return None, f"torchvision {weights} weights unavailable ({reason}); training from scratch"
    path = Path(config.pretrained)
    if not path.is_file():
        raise ConfigError(f"model.pretrained={config.pretrained!r}: no such file; use 'auto', 'none' or the path of a .pth state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"model.pretrained={path}: cannot be loaded as a torch state dict ({error})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a lungdet checkpoint: take its model weights
    return state, f"initialised from {path}"


def anchor_generator(config: ModelConfig, feature_maps: int) -> AnchorGenerator:
    """One anchor size per feature map when the counts match (the FPN convention), else every size on every map."""
    sizes = tuple(int(size) for size in config.anchor_sizes)
    per_map = tuple((size,) for size in sizes) if len(sizes) == feature_maps else (sizes,) * feature_maps
    ratios = (tuple(float(r) for r in config.anchor_aspect_ratios),) * feature_maps
    return AnchorGenerator(per_map, ratios)


def build_model(
    config: ModelConfig, *, pretrained_state: dict[str, torch.Tensor] | None = None, frozen_batch_norm: bool | None = None
) -> FasterRCNN:
    """Faster R-CNN for ``config``; ``pretrained_state`` (from :func:`load_pretrained_state`) is loaded where shapes match.

    With pretrained weights the backbone uses frozen batch norm and trains its last
    ``trainable_backbone_layers`` stages (the torchvision recipe); from scratch every layer trains
    with ordinary batch norm, since frozen random statistics would never be corrected.
    ``frozen_batch_norm`` forces the choice, so a checkpoint is rebuilt with the layers it was saved from.
    """
    architecture = MODELS[config.architecture]
    if frozen_batch_norm is None:
        frozen_batch_norm = pretrained_state is not None
    if frozen_batch_norm:
        backbone = architecture.build_backbone(FrozenBatchNorm2d, min(config.trainable_backbone_layers, architecture.all_layers))
    else:
        backbone = architecture.build_backbone(nn.BatchNorm2d, architecture.all_layers)
    model = FasterRCNN(
        backbone,
        num_classes=config.num_classes,
        min_size=config.image_size,
        max_size=config.image_size,
        rpn_anchor_generator=anchor_generator(config, architecture.feature_maps),
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=config.rpn_batch_size_per_image,
        box_batch_size_per_image=config.box_batch_size_per_image,
        box_detections_per_img=config.box_detections_per_img,
        box_score_thresh=config.box_score_thresh,
        box_nms_thresh=config.box_nms_thresh,
    )
    if pretrained_state is not None:
        load_matching_weights(model, pretrained_state)
    return model


def load_matching_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Load every tensor whose name and shape match; return ``(loaded, skipped)``.

    COCO weights have a 91-class head, so the class-specific layers are skipped and start fresh.
    """
    own = model.state_dict()
    matching = {key: value for key, value in state.items() if key in own and own[key].shape == value.shape}
    model.load_state_dict(matching, strict=False)
    return len(matching), len(state) - len(matching)
