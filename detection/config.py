"""Typed training configs, loaded from YAML in ``configs/``.

A config is a tree of dataclasses. Loading rejects unknown keys (naming the closest valid key),
wrong types and out-of-range values before any work starts; ``key=value`` overrides from the
command line use dotted paths (``optim.lr=0.005``). The resolved config is saved in the run
folder and in every checkpoint, so a checkpoint always says how it was made.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lungdet.atomic import write_text_atomic
from lungdet.errors import ConfigError
from lungdet.typed_config import apply_overrides, build_dataclass, check_ranges, ranged, read_yaml_mapping

MODEL_ARCHITECTURES = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "retinanet_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
)
MASK_SHAPES = ("ellipse", "rectangle")
AMP_MODES = ("auto", "none", "bf16", "fp16")
SCHEDULES = ("cosine", "step")
# configs/ beside the stage folders: the repository's configs/ in a checkout, lungdet/configs/ in a wheel
# (pyproject.toml maps configs/ to lungdet.configs), one level above this file either way.
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelConfig:
    """The ``model:`` section: architecture, input size, weights, anchors, RPN and box-head settings, image head."""

    # one of MODEL_ARCHITECTURES
    architecture: str = ranged(
        "fasterrcnn_resnet50_fpn",
        check=lambda v: v in MODEL_ARCHITECTURES,
        allowed=f"one of {', '.join(MODEL_ARCHITECTURES)}",
    )
    # background + lung_opacity
    num_classes: int = ranged(2, check=lambda v: v >= 2, allowed=">= 2 (background + at least one class)")
    # images are resized to this square side for training and prediction (pixels)
    image_size: int = ranged(512, check=lambda v: 64 <= v <= 2048, allowed="between 64 and 2048")
    # [low, high] pixels: the model resizes each training image to a random size in this range (steps of 32, image_size included); validation and prediction use image_size; [] = off
    multiscale_train: list[int] = ranged(
        default_factory=list,
        check=lambda v: len(v) == 0 or (len(v) == 2 and 64 <= v[0] <= v[1] <= 2048),
        allowed="[] (off) or [low, high] pixels with 64 <= low <= high <= 2048",
    )
    pretrained: str = "auto"  # 'auto': torchvision COCO weights if cached or downloadable, else from scratch; 'none'; or a path to a .pth state dict (a 'lungdet pretrain' backbone file trains every layer with ordinary batch norm)
    # with pretrained weights: how many backbone stages train (0..5 resnet, 0..6 mobilenet)
    trainable_backbone_layers: int = ranged(3, check=lambda v: 0 <= v <= 6, allowed="between 0 and 6")
    # anchor side lengths (pixels at image_size)
    anchor_sizes: list[int] = ranged(
        default_factory=lambda: [32, 64, 128, 256, 512],
        check=lambda v: len(v) > 0 and all(s > 0 for s in v),
        allowed="a non-empty list of positive sizes",
    )
    # height/width; RSNA boxes are tall (median ~1.4)
    anchor_aspect_ratios: list[float] = ranged(
        default_factory=lambda: [0.5, 1.0, 2.0],
        check=lambda v: len(v) > 0 and all(r > 0 for r in v),
        allowed="a non-empty list of positive ratios",
    )
    # proposals kept before NMS per FPN level, training
    rpn_pre_nms_top_n_train: int = ranged(2000, check=lambda v: v >= 1, allowed=">= 1")
    # proposals kept after NMS, training
    rpn_post_nms_top_n_train: int = ranged(2000, check=lambda v: v >= 1, allowed=">= 1")
    # same at inference
    rpn_pre_nms_top_n_test: int = ranged(1000, check=lambda v: v >= 1, allowed=">= 1")
    rpn_post_nms_top_n_test: int = ranged(1000, check=lambda v: v >= 1, allowed=">= 1")
    # anchors sampled per image for the RPN loss
    rpn_batch_size_per_image: int = ranged(256, check=lambda v: v >= 1, allowed=">= 1")
    # proposals sampled per image for the box-head loss
    box_batch_size_per_image: int = ranged(512, check=lambda v: v >= 1, allowed=">= 1")
    # RSNA images have at most 4 boxes; a few spares help recall
    box_detections_per_img: int = ranged(10, check=lambda v: v >= 1, allowed=">= 1")
    # the model drops detections below this; the submission threshold is tuned later
    box_score_thresh: float = ranged(0.01, check=lambda v: 0.0 <= v < 1.0, allowed="in [0, 1)")
    # maskrcnn only: the training mask drawn from each box, 'ellipse' (inscribed; opacities are rounded) or 'rectangle' (filled box)
    mask_shape: str = ranged("ellipse", check=lambda v: v in MASK_SHAPES, allowed=f"one of {', '.join(MASK_SHAPES)}")
    # IoU above which overlapping detections are merged: RSNA boxes rarely overlap, and every duplicate is a false
    # positive, so merge eagerly (0.2 scored well above torchvision's 0.5 on held-out synthetic images)
    box_nms_thresh: float = ranged(0.2, check=lambda v: 0.0 < v <= 1.0, allowed="in (0, 1]")
    image_head: bool = False  # add a small image-level head (one logit: "has any opacity"), trained jointly; its probability gates boxes in post-processing and gives the serve API's verdict
    image_metadata: bool = False  # with image_head: the view position, sex and age band (DICOM tags, or convert --metadata) add a learned term to its logit; a missing value is its own category
    image_class_info: bool = False  # with image_head: also learn RSNA's three classes (Lung Opacity / No Lung Opacity - Not Normal / Normal) as an auxiliary target; needs convert --class-info
    batched_heads: bool = True  # match, sample and filter for the whole batch at once (detection/batched_heads.py): torchvision's results with far fewer GPU waits, and RoI pooling as one sparse product on a CPU (detection/sparse_roi_align.py); false = torchvision's per-image loops and kernels


@dataclass
class DataConfig:
    """The ``data:`` section: validation fold, batch size, loading, share of positives per epoch, quick-run caps."""

    # which fold of folds.csv validates; the others train (-1: every image trains and none validates, for a final model; the cut-offs then come from elsewhere, see lungdet cv --final)
    fold: int = ranged(0, check=lambda v: v >= -1, allowed=">= 0, or -1 for every image and no validation")
    # images per optimizer step
    batch_size: int = ranged(4, check=lambda v: v >= 1, allowed=">= 1")
    # DataLoader worker processes (0 = load in the main process)
    num_workers: int = ranged(0, check=lambda v: v >= 0, allowed=">= 0")
    pin_memory: bool = True  # page-locked batches for faster host-to-GPU copies (CUDA only)
    # share of each epoch's samples taken from images with boxes (0 = as in the data, ~23% for RSNA); positives are repeated and negatives left out to make it, so an epoch keeps its length
    positive_fraction: float = ranged(0.0, check=lambda v: 0.0 <= v <= 0.9, allowed="in [0, 0.9] (0 = as in the data)")
    # use only the first N training images (0 = all); for quick runs
    max_train_images: int = ranged(0, check=lambda v: v >= 0, allowed=">= 0")
    # likewise for validation (0 = all)
    max_val_images: int = ranged(0, check=lambda v: v >= 0, allowed=">= 0")


@dataclass
class AugmentConfig:
    """Training-time augmentation (albumentations); each transform's probability, 0 = off. Boxes follow every geometric change."""

    # horizontal flip (lungs are roughly mirror images)
    hflip: float = ranged(0.5, check=lambda v: 0.0 <= v <= 1.0, allowed="a probability in [0, 1]")
    # small affine jitter; boxes follow and are clipped to the image
    shift_scale_rotate: float = ranged(0.3, check=lambda v: 0.0 <= v <= 1.0, allowed="a probability in [0, 1]")
    # largest shift, as a fraction of the image side
    shift_limit: float = ranged(0.05, check=lambda v: 0.0 <= v <= 0.5, allowed="in [0, 0.5]")
    # largest zoom in or out, as a fraction (0.1 = 0.9x..1.1x)
    scale_limit: float = ranged(0.1, check=lambda v: 0.0 <= v < 1.0, allowed="in [0, 1)")
    # largest rotation in degrees (patients are positioned upright)
    rotate_limit: float = ranged(7.0, check=lambda v: 0.0 <= v <= 45.0, allowed="in [0, 45] degrees")
    # random brightness and contrast change
    brightness_contrast: float = ranged(0.3, check=lambda v: 0.0 <= v <= 1.0, allowed="a probability in [0, 1]")
    # largest brightness change, as a fraction of the range
    brightness_limit: float = ranged(0.15, check=lambda v: 0.0 <= v <= 1.0, allowed="in [0, 1]")
    # largest contrast change, as a fraction
    contrast_limit: float = ranged(0.15, check=lambda v: 0.0 <= v <= 1.0, allowed="in [0, 1]")
    # random gamma (exposure differs between machines)
    gamma: float = ranged(0.0, check=lambda v: 0.0 <= v <= 1.0, allowed="a probability in [0, 1]")
    # gamma range in percent (100 = unchanged)
    gamma_limit: list[float] = ranged(
        default_factory=lambda: [80.0, 120.0],
        check=lambda v: len(v) == 2 and 0 < v[0] <= v[1],
        allowed="[low, high] percent with 0 < low <= high",
    )
    # Gaussian blur (detectors and reconstruction kernels differ in sharpness)
    blur: float = ranged(0.0, check=lambda v: 0.0 <= v <= 1.0, allowed="a probability in [0, 1]")
    # largest blur kernel in pixels (odd, >= 3)
    blur_limit: int = ranged(5, check=lambda v: v >= 3 and v % 2 == 1, allowed="an odd number >= 3")
    # Gaussian noise
    noise: float = ranged(0.0, check=lambda v: 0.0 <= v <= 1.0, allowed="a probability in [0, 1]")
    # noise standard deviation as a fraction of the 0..255 range
    noise_std: float = ranged(0.03, check=lambda v: 0.0 <= v <= 0.5, allowed="in [0, 0.5]")
    # local contrast equalisation (CLAHE)
    clahe: float = ranged(0.0, check=lambda v: 0.0 <= v <= 1.0, allowed="a probability in [0, 1]")
    # a box keeping less than this fraction of its area after augmentation is dropped
    min_visibility: float = ranged(0.3, check=lambda v: 0.0 <= v <= 1.0, allowed="a probability in [0, 1]")
    # a box left thinner than this (pixels) after augmentation is dropped
    min_box_side: float = ranged(2.0, check=lambda v: v >= 0.0, allowed=">= 0")


@dataclass
class OptimConfig:
    """The ``optim:`` section: optimizer, learning-rate schedule, epochs, clipping, accumulation, EMA, loss weights."""

    # 'sgd' or 'adamw'
    optimizer: str = ranged("sgd", check=lambda v: v in ("sgd", "adamw"), allowed="'sgd' or 'adamw'")
    # peak learning rate
    lr: float = ranged(0.01, check=lambda v: 0.0 < v <= 1.0, allowed="in (0, 1]")
    # SGD momentum (ignored by adamw)
    momentum: float = ranged(0.9, check=lambda v: 0.0 <= v < 1.0, allowed="in [0, 1)")
    # L2 penalty
    weight_decay: float = ranged(1e-4, check=lambda v: v >= 0.0, allowed=">= 0")
    # passes over the training images
    epochs: int = ranged(12, check=lambda v: v >= 1, allowed=">= 1")
    # linear warm-up (optimizer steps) from lr/100 to lr, then the schedule
    warmup_iters: int = ranged(200, check=lambda v: v >= 0, allowed=">= 0")
    # 'cosine' (decay to 0 at the last step) or 'step' (multiply by step_gamma at each milestone)
    schedule: str = ranged("cosine", check=lambda v: v in SCHEDULES, allowed=f"one of {', '.join(SCHEDULES)}")
    # 'step' schedule: epochs after which the lr drops
    step_milestones: list[int] = ranged(
        default_factory=lambda: [8, 11],
        check=lambda v: all(m >= 1 for m in v) and list(v) == sorted(set(v)),
        allowed="increasing epoch numbers >= 1",
    )
    # 'step' schedule: the factor at each milestone
    step_gamma: float = ranged(0.1, check=lambda v: 0.0 < v <= 1.0, allowed="in (0, 1]")
    # clip the global gradient norm (0 = off); scratch training spikes early
    grad_clip_norm: float = ranged(10.0, check=lambda v: v >= 0.0, allowed=">= 0 (0 = off)")
    # batches whose gradients are summed per optimizer step (effective batch = batch_size x this x GPUs)
    accumulate_steps: int = ranged(1, check=lambda v: v >= 1, allowed=">= 1")
    # exponential moving average of the weights, validated and saved for predict (0 = off; 0.999 is usual)
    ema_decay: float = ranged(0.0, check=lambda v: v == 0.0 or 0.5 <= v < 1.0, allowed="0 (off) or in [0.5, 1)")
    # with model.image_head: the weight of its binary cross-entropy in the total loss
    image_loss_weight: float = ranged(1.0, check=lambda v: v >= 0.0, allowed=">= 0")
    # with model.image_class_info: the weight of the three-class cross-entropy (the 2018 2nd place used 0.1)
    image_class_loss_weight: float = ranged(0.1, check=lambda v: v >= 0.0, allowed=">= 0")


@dataclass
class TrainConfig:
    """A whole training config: the ``model``, ``data``, ``augment`` and ``optim`` sections and the run-wide settings.

    The run-wide settings: seed, device, mixed precision, memory layout, compilation, checkpointing, TensorBoard, time
    limit and the validation cut-offs tried.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # seeds torch, numpy and augmentation
    seed: int = ranged(0, check=lambda v: v >= 0, allowed=">= 0")
    device: str = "auto"  # 'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'; under torchrun each process takes cuda:LOCAL_RANK
    # mixed precision: 'auto' (CUDA: bf16 where supported, else fp16; CPU: bf16 where it has bfloat16 instructions, else fp32), 'bf16', 'fp16' (CUDA only) or 'none'
    amp: str = ranged("auto", check=lambda v: v in AMP_MODES, allowed=f"one of {', '.join(AMP_MODES)}")
    channels_last: bool = True  # NHWC memory layout for the convolutions: what tensor cores and oneDNN's CPU kernels want (1.1-1.25x faster fp32 steps on a CPU)
    compile: bool = False  # torch.compile the fixed-shape parts (backbone, RPN or RetinaNet head) of the trained model: fewer, fused kernels for a host-bound GPU step; compiling takes a minute or more at the start and at the first validation
    # also write last.pt every N optimizer steps, so a kill loses at most N steps (0 = at epoch ends only)
    checkpoint_every_steps: int = ranged(0, check=lambda v: v >= 0, allowed=">= 0 (0 = at epoch ends only)")
    tensorboard: bool = True  # also log metrics to RUN/tensorboard (when the tensorboard package is installed)
    # stop training after this wall time and validate (0 = no limit)
    max_minutes: float = ranged(0.0, check=lambda v: v >= 0.0, allowed=">= 0 (0 = no limit)")
    # confidence cut-offs tried at validation; the best is stored for predict
    val_score_thresholds: list[float] = ranged(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        check=lambda v: len(v) > 0 and all(0.0 <= t <= 1.0 for t in v),
        allowed="a non-empty list of values in [0, 1]",
    )


# Keys that moved between sections: (old section, new section, names). Configs stored in older
# checkpoints still load, so their runs can be resumed and their models predicted with.
_MOVED_KEYS = [("data", "augment", ("hflip", "brightness_contrast", "shift_scale_rotate"))]


def _migrate(values: dict[str, Any]) -> dict[str, Any]:
    for old, new, names in _MOVED_KEYS:
        section = values.get(old)
        if isinstance(section, dict):
            for name in names:
                if name in section:
                    values.setdefault(new, {}).setdefault(name, section.pop(name))
    return values


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from nested dicts (missing keys take defaults)."""
    config = build_dataclass(TrainConfig, _migrate(copy.deepcopy(values or {})))
    validate_config(config)
    return config


def validate_config(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first out-of-range value and its valid range, or a key that needs another."""
    check_ranges(config)
    for key in ("image_metadata", "image_class_info"):
        if getattr(config.model, key) and not config.model.image_head:
            raise ConfigError(
                f"model.{key}=true feeds the image-level head, which is off; set model.image_head=true too, or model.{key}=false"
            )


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path as given, or a bare name looked up in the repository's ``configs/`` folder."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent != Path("."):
        # A path with a folder that does not exist must not silently fall back to a built-in config of the same name.
        raise ConfigError(f"config {name_or_path}: no such file")
    candidate = CONFIGS_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")) if CONFIGS_DIR.is_dir() else []
    raise ConfigError(f"config {name_or_path}: no such file. Known configs: {', '.join(known) or 'none found'}")


def load_config(name_or_path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (or the defaults when ``None``), apply overrides, validate."""
    values: dict[str, Any] = {}
    if name_or_path is not None:
        values = read_yaml_mapping(resolve_config_path(name_or_path), what="sections (model:, data:, optim:)")
    try:
        return config_from_dict(apply_overrides(values, overrides or []))
    except ConfigError as error:
        where = f"{name_or_path}: " if name_or_path is not None else ""
        raise ConfigError(f"{where}{error}") from None


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """``config`` as nested plain dicts and lists: what ``config.yaml`` and every checkpoint's ``config`` hold."""
    return dataclasses.asdict(config)


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
