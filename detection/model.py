"""Build torchvision detectors from a :class:`~lungdet.detection.config.ModelConfig`.

``MODELS`` maps an architecture name to how it is built: a backbone (with FPN) and a detector
family (Faster R-CNN, its v2 recipe, RetinaNet or Mask R-CNN) that adds the anchors and heads.
:func:`build_model` puts them together, then loads pretrained weights when they can be had:
torchvision's COCO weights (from the local cache, or downloaded), or a local ``.pth`` file.
With neither it trains from scratch and says so in one line. It never fails because a
download is impossible: this tool must run on machines without internet.

Every detector takes ``(images, targets)`` in training and returns a dict of losses; in eval it
returns one dict per image with ``boxes`` (XYXY_ABS, input pixels), ``scores`` and ``labels``
(Mask R-CNN adds ``masks``, FloatTensor[N, 1, H, W]). Targets carry ``masks`` when
:func:`needs_masks` says so (see :func:`lungdet.detection.masks.box_masks`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import WeightsEnum, mobilenet_v3_large, resnet50
from torchvision.models.detection import (
    FasterRCNN,
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    FasterRCNN_ResNet50_FPN_V2_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_Weights,
    RetinaNet,
    RetinaNet_ResNet50_FPN_Weights,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from lungdet.data_tools.metadata import METADATA_FEATURES
from lungdet.detection.batched_heads import BatchedRetinaNetLoss, use_batched_heads
from lungdet.detection.config import MODEL_ARCHITECTURES, ModelConfig
from lungdet.detection.image_head import attach_image_head
from lungdet.errors import ConfigError

# RetinaNet puts three anchor scales an octave apart on each FPN level (the paper, and torchvision).
RETINANET_ANCHOR_SCALES = (1.0, 2.0 ** (1.0 / 3.0), 2.0 ** (2.0 / 3.0))


# --- backbones: (norm layer, trainable stages) -> backbone with FPN ------------------------------


def _resnet50_fpn(norm_layer: Callable[..., nn.Module], trainable_layers: int) -> nn.Module:
    return _resnet_fpn_extractor(resnet50(weights=None, norm_layer=norm_layer), trainable_layers)


def _resnet50_fpn_v2(norm_layer: Callable[..., nn.Module], trainable_layers: int) -> nn.Module:
    # The v2 recipe normalises the FPN too, always with trainable batch norm.
    return _resnet_fpn_extractor(
        resnet50(weights=None, norm_layer=norm_layer), trainable_layers, norm_layer=nn.BatchNorm2d
    )


def _resnet50_fpn_p3_p7(norm_layer: Callable[..., nn.Module], trainable_layers: int) -> nn.Module:
    # RetinaNet skips P2 (too many anchors, says the paper) and adds P6, P7 computed from P5.
    return _resnet_fpn_extractor(
        resnet50(weights=None, norm_layer=norm_layer),
        trainable_layers,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )


def _mobilenet_v3_large_fpn(norm_layer: Callable[..., nn.Module], trainable_layers: int) -> nn.Module:
    return _mobilenet_extractor(mobilenet_v3_large(weights=None, norm_layer=norm_layer), True, trainable_layers)


# --- detector families: (backbone, config, anchors) -> detector ----------------------------------


def _rcnn_options(config: ModelConfig, anchors: AnchorGenerator) -> dict[str, object]:
    """The keyword arguments Faster R-CNN and Mask R-CNN share."""
    return {
        "num_classes": config.num_classes,
        "min_size": config.image_size,
        "max_size": config.image_size,
        "rpn_anchor_generator": anchors,
        "rpn_pre_nms_top_n_train": config.rpn_pre_nms_top_n_train,
        "rpn_post_nms_top_n_train": config.rpn_post_nms_top_n_train,
        "rpn_pre_nms_top_n_test": config.rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_test": config.rpn_post_nms_top_n_test,
        "rpn_batch_size_per_image": config.rpn_batch_size_per_image,
        "box_batch_size_per_image": config.box_batch_size_per_image,
        "box_detections_per_img": config.box_detections_per_img,
        "box_score_thresh": config.box_score_thresh,
        "box_nms_thresh": config.box_nms_thresh,
    }


def _faster_rcnn(backbone: nn.Module, config: ModelConfig, anchors: AnchorGenerator) -> nn.Module:
    return FasterRCNN(backbone, **_rcnn_options(config, anchors))


def _faster_rcnn_v2(backbone: nn.Module, config: ModelConfig, anchors: AnchorGenerator) -> nn.Module:
    # torchvision's fasterrcnn_resnet50_fpn_v2: a two-conv RPN head and a four-conv box head with batch norm.
    rpn_head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2)
    box_head = FastRCNNConvFCHead(
        (backbone.out_channels, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d
    )
    return FasterRCNN(backbone, rpn_head=rpn_head, box_head=box_head, **_rcnn_options(config, anchors))


def _mask_rcnn(backbone: nn.Module, config: ModelConfig, anchors: AnchorGenerator) -> nn.Module:
    return MaskRCNN(backbone, **_rcnn_options(config, anchors))


class ForegroundRetinaNet(RetinaNet):
    """torchvision RetinaNet with one classification output per foreground class, and no background output.

    RetinaNet classifies with a sigmoid per class (focal loss), not a softmax over classes plus
    background: a target label ``k`` simply switches on output ``k``. Built with our
    ``num_classes`` (which counts the background, as Faster R-CNN's does), output 0 would never
    be a target: a wasted channel that, untrained, still scores around its 0.01 prior and so
    emits label-0 boxes above a low ``box_score_thresh``, and the rest of the pipeline reads
    every box as an opacity. So the head gets ``num_classes - 1`` outputs and labels are shifted
    at the edges: ``label - 1`` into the loss, ``output + 1`` out of the detections. Outside the
    model, labels mean the same for every architecture (1 = lung_opacity).
    """

    def compute_loss(
        self, targets: list[dict[str, torch.Tensor]], head_outputs: dict[str, torch.Tensor], anchors: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """torchvision's RetinaNet losses, each target label ``k`` shifted to train output ``k - 1``.

        Raises ValueError, naming the target, for a label outside ``1..num_classes`` (0, the background, included).
        """
        num_classes = self.head.classification_head.num_classes
        every_label = torch.cat([target["labels"] for target in targets])
        # After the shift, a label outside 1..num_classes would index a wrong output, or wrap around
        # to the last, silently. One check for the whole batch, since every check waits for the GPU.
        if every_label.numel() and bool(((every_label < 1) | (every_label > num_classes)).any()):
            for index, target in enumerate(targets):
                labels = target["labels"]
                if bool(((labels < 1) | (labels > num_classes)).any()):
                    raise ValueError(
                        f"RetinaNet target {index}: labels {labels.tolist()} outside 1..{num_classes}; "
                        f"0 is the background and is never a target, and model.num_classes={num_classes + 1} counts it"
                    )
        shifted = [{**target, "labels": target["labels"] - 1} for target in targets]
        return super().compute_loss(shifted, head_outputs, anchors)

    def postprocess_detections(
        self,
        head_outputs: dict[str, list[torch.Tensor]],
        anchors: list[list[torch.Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """torchvision's detections with the labels shifted up by one: 1 = lung_opacity, as for the other detectors.

        One dict per image: ``boxes`` XYXY in model-input pixels, ``scores`` in [0, 1], ``labels``.
        """
        detections = super().postprocess_detections(head_outputs, anchors, image_shapes)
        return [{**detection, "labels": detection["labels"] + 1} for detection in detections]


class BatchedForegroundRetinaNet(ForegroundRetinaNet, BatchedRetinaNetLoss):
    """:class:`ForegroundRetinaNet` whose loss is computed for the whole batch at once (``model.batched_heads``).

    The label shift runs first, then its ``super().compute_loss`` reaches the batched loss.
    """


def _retinanet(backbone: nn.Module, config: ModelConfig, anchors: AnchorGenerator) -> nn.Module:
    # The rpn_* and box_batch_size_per_image settings have no RetinaNet counterpart: it has no
    # proposals and scores every anchor (the focal loss copes with the imbalance).
    detector = BatchedForegroundRetinaNet if config.batched_heads else ForegroundRetinaNet
    return detector(
        backbone,
        num_classes=config.num_classes - 1,
        min_size=config.image_size,
        max_size=config.image_size,
        anchor_generator=anchors,
        score_thresh=config.box_score_thresh,
        nms_thresh=config.box_nms_thresh,
        detections_per_img=config.box_detections_per_img,
    )


@dataclass(frozen=True)
class Architecture:
    """How to build one detector and where its COCO weights come from."""

    build_backbone: Callable[
        [Callable[..., nn.Module], int], nn.Module
    ]  # (norm layer, trainable stages) -> backbone with FPN
    build_detector: Callable[
        [nn.Module, ModelConfig, AnchorGenerator], nn.Module
    ]  # (backbone, config, anchors) -> detector with its heads
    feature_maps: int  # FPN outputs the anchors go on; decides how anchor sizes are spread
    all_layers: int  # trainable-stage count meaning "train everything" (from scratch)
    coco_weights: WeightsEnum  # torchvision weights enum member
    # backbone norm with pretrained weights (torchvision's recipe)
    pretrained_norm_layer: Callable[..., nn.Module] = FrozenBatchNorm2d
    anchor_scales: tuple[float, ...] = (1.0,)  # each anchor size is repeated at these multiples on its feature map
    masks: bool = False  # training targets need 'masks' (see detection.masks.box_masks)


MODELS: dict[str, Architecture] = {
    "fasterrcnn_resnet50_fpn": Architecture(
        _resnet50_fpn, _faster_rcnn, feature_maps=5, all_layers=5, coco_weights=FasterRCNN_ResNet50_FPN_Weights.COCO_V1
    ),
    # torchvision trains v2 with ordinary batch norm even from pretrained weights; only the early stages freeze.
    "fasterrcnn_resnet50_fpn_v2": Architecture(
        _resnet50_fpn_v2,
        _faster_rcnn_v2,
        feature_maps=5,
        all_layers=5,
        coco_weights=FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
        pretrained_norm_layer=nn.BatchNorm2d,
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": Architecture(
        _mobilenet_v3_large_fpn,
        _faster_rcnn,
        feature_maps=3,
        all_layers=6,
        coco_weights=FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
    ),
    "retinanet_resnet50_fpn": Architecture(
        _resnet50_fpn_p3_p7,
        _retinanet,
        feature_maps=5,
        all_layers=5,
        coco_weights=RetinaNet_ResNet50_FPN_Weights.COCO_V1,
        anchor_scales=RETINANET_ANCHOR_SCALES,
    ),
    "maskrcnn_resnet50_fpn": Architecture(
        _resnet50_fpn,
        _mask_rcnn,
        feature_maps=5,
        all_layers=5,
        coco_weights=MaskRCNN_ResNet50_FPN_Weights.COCO_V1,
        masks=True,
    ),
}


def _architecture(name: str) -> Architecture:
    if name not in MODELS:
        raise ConfigError(f"model.architecture={name!r}: unknown; use one of {', '.join(MODEL_ARCHITECTURES)}")
    return MODELS[name]


def needs_masks(architecture: str) -> bool:
    """Whether ``architecture`` trains with ``masks`` in its targets (Mask R-CNN); raises ConfigError for an unknown name."""
    return _architecture(architecture).masks


# The entry that marks a ``lungdet pretrain`` backbone file (detection/pretrain.py): a dict saying how
# it was made (architecture, image_size, method, images_seen, date, ...), beside the backbone's tensors.
PRETRAIN_MARKER = "lungdet_pretrain"


def uses_frozen_recipe(pretrained_state: dict[str, torch.Tensor] | None) -> bool:
    """Whether ``pretrained_state`` trains with torchvision's recipe: frozen batch norm, only the last stages trainable.

    That suits ImageNet and COCO weights, learnt on millions of images. A ``lungdet pretrain``
    backbone (it carries :data:`PRETRAIN_MARKER`) was learnt on radiographs with ordinary batch
    norm, perhaps only a few hundred: it trains whole, as from scratch, with its running statistics loaded.
    """
    return pretrained_state is not None and PRETRAIN_MARKER not in pretrained_state


def load_pretrained_state(config: ModelConfig) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The pretrained state dict named by ``config.pretrained`` (or None) and a one-line notice.

    ``'auto'`` asks torchvision, which reads its cache (``$TORCH_HOME``) or downloads; any
    failure (offline, proxy, corrupt cache) falls back to training from scratch. A ``lungdet
    pretrain`` file keeps its :data:`PRETRAIN_MARKER` entry (see :func:`uses_frozen_recipe`) and
    is refused, with a ConfigError, when it was made for another architecture.
    """
    if config.pretrained == "none":
        return None, "training from scratch (model.pretrained: none)"
    if config.pretrained == "auto":
        weights = _architecture(config.architecture).coco_weights
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
        raise ConfigError(
            f"model.pretrained={config.pretrained!r}: no such file; use 'auto', 'none' or the path of a .pth state dict"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"model.pretrained={path}: cannot be loaded as a torch state dict ({error})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a lungdet checkpoint: take its model weights
    if isinstance(state, dict) and isinstance(state.get(PRETRAIN_MARKER), dict):
        made = state[PRETRAIN_MARKER]
        if made.get("architecture") != config.architecture:
            raise ConfigError(
                f"model.pretrained={path}: a lungdet pretrain backbone for {made.get('architecture')}, but model.architecture is "
                f"{config.architecture}; pretrain one with 'lungdet pretrain --architecture {config.architecture}' or set model.architecture={made.get('architecture')}"
            )
        return state, (
            f"initialised from {path}: a lungdet pretrain backbone ({made.get('method')}, {made.get('images_seen')} images seen "
            f"at {made.get('image_size')} px); every layer trains, with ordinary batch norm"
        )
    return state, f"initialised from {path}"


def anchor_generator(config: ModelConfig, feature_maps: int, *, scales: tuple[float, ...] = (1.0,)) -> AnchorGenerator:
    """Anchors for ``feature_maps`` FPN levels from ``config.anchor_sizes`` and ``config.anchor_aspect_ratios``.

    One anchor size per feature map when the counts match (the FPN convention), else every size
    on every map. Each size is repeated at ``scales`` (pixels truncated to int, as torchvision
    does), so a map gets ``sizes x scales x ratios`` anchors per location.
    """
    sizes = tuple(int(size) for size in config.anchor_sizes)
    scaled = [tuple(int(size * scale) for scale in scales) for size in sizes]
    per_map = (
        tuple(scaled)
        if len(sizes) == feature_maps
        else (tuple(size for group in scaled for size in group),) * feature_maps
    )
    ratios = (tuple(float(r) for r in config.anchor_aspect_ratios),) * feature_maps
    return AnchorGenerator(per_map, ratios)


def in_memory_layout(model: nn.Module, *, channels_last: bool) -> nn.Module:
    """``model`` (moved in place) in the layout its convolutions run in: channels_last (NHWC), which
    tensor cores and oneDNN's CPU kernels are fastest with, or as built (NCHW)."""
    return model.to(memory_format=torch.channels_last) if channels_last else model


def build_model(
    config: ModelConfig,
    *,
    pretrained_state: dict[str, torch.Tensor] | None = None,
    frozen_batch_norm: bool | None = None,
    image_loss_weight: float = 1.0,
    image_class_loss_weight: float = 0.1,
) -> nn.Module:
    """The detector for ``config``; ``pretrained_state`` (from :func:`load_pretrained_state`) is loaded where shapes match.

    With pretrained weights the backbone follows the torchvision recipe: it trains only its last
    ``trainable_backbone_layers`` stages, with frozen batch norm (ordinary batch norm for
    ``fasterrcnn_resnet50_fpn_v2``, as torchvision does). From scratch every layer trains with
    ordinary batch norm, since frozen random statistics would never be corrected; so does a
    ``lungdet pretrain`` backbone (see :func:`uses_frozen_recipe`).
    ``frozen_batch_norm`` forces the choice of recipe, so a checkpoint is rebuilt with the layers it was saved from.
    With ``config.image_head`` the detector gets an image-level head (see :mod:`lungdet.detection.image_head`)
    whose loss counts ``image_loss_weight`` times (its three-class loss, with ``config.image_class_info``,
    ``image_class_loss_weight`` times).
    """
    architecture = _architecture(config.architecture)
    if frozen_batch_norm is None:
        frozen_batch_norm = uses_frozen_recipe(pretrained_state)
    if frozen_batch_norm:
        backbone = architecture.build_backbone(
            architecture.pretrained_norm_layer, min(config.trainable_backbone_layers, architecture.all_layers)
        )
    else:
        backbone = architecture.build_backbone(nn.BatchNorm2d, architecture.all_layers)
    anchors = anchor_generator(config, architecture.feature_maps, scales=architecture.anchor_scales)
    model = architecture.build_detector(backbone, config, anchors)
    if config.multiscale_train:
        use_training_sizes(model, training_sizes(config))
    if config.batched_heads:
        use_batched_heads(model)
    if config.image_head:
        attach_image_head(
            model,
            loss_weight=image_loss_weight,
            metadata_features=len(METADATA_FEATURES) if config.image_metadata else 0,
            class_info=config.image_class_info,
            class_loss_weight=image_class_loss_weight,
        )
    if pretrained_state is not None:
        load_matching_weights(model, {key: value for key, value in pretrained_state.items() if key != PRETRAIN_MARKER})
    return model


# Multi-scale sizes step by the FPN's coarsest stride, so that every size pads to itself.
MULTISCALE_STEP = 32


def training_sizes(config: ModelConfig) -> tuple[int, ...]:
    """The square sides multi-scale training draws from: ``multiscale_train``'s range in steps of 32, with ``image_size``, which comes last."""
    low, high = config.multiscale_train
    sizes = set(range(low, high + 1, MULTISCALE_STEP)) | {config.image_size}
    return tuple(sorted(sizes - {config.image_size})) + (config.image_size,)


def use_training_sizes(model: nn.Module, sizes: tuple[int, ...]) -> None:
    """Make torchvision's own resize draw each training image's size from ``sizes``; in eval it takes the last, ``image_size``.

    GeneralizedRCNNTransform picks ``random.choice(min_size)`` per image in training and
    ``min_size[-1]`` in eval; the images are square, so the side is that size (``max_size`` caps it).
    """
    model.transform.min_size = sizes
    model.transform.max_size = max(sizes)


def load_matching_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Load every tensor whose name and shape match; return ``(loaded, skipped)``.

    ``loaded`` counts the model's tensors that received a value; ``skipped`` the state's tensors
    that did not fit (shape differs) or have no place in the model. COCO weights have 91-class
    heads (box classifier and regressor, mask predictor, RetinaNet classification outputs), so
    those layers are skipped and start fresh.

    Matching happens inside ``load_state_dict``, not on the raw names: the COCO_V1 files predate
    torchvision's current layer names (``rpn.head.conv.weight``, ``fpn.inner_blocks.0.weight``,
    ``mask_head.mask_fcn1.weight``, RetinaNet's ``conv.2.weight``) and torchvision renames them
    as it loads; a name filter beforehand would silently drop those layers.
    """
    mismatched: list[str] = []

    def drop_mismatched(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
        # Runs as each module loads, after torchvision's renames and before the copy that would
        # fail on a shape difference; sees only the module's own tensors.
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key = prefix + name
            if key in state_dict and state_dict[key].shape != tensor.shape:
                del state_dict[key]
                mismatched.append(key)

    handles = [module.register_load_state_dict_pre_hook(drop_mismatched) for module in model.modules()]
    try:
        result = model.load_state_dict(state, strict=False)  # works on a copy: ``state`` is not changed
    finally:
        for handle in handles:
            handle.remove()
    return len(model.state_dict()) - len(result.missing_keys), len(mismatched) + len(result.unexpected_keys)
