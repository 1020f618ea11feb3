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
from lungdet.typed_config import RangeRule, apply_overrides, build_dataclass, check_ranges, read_yaml_mapping

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
    architecture: str = "fasterrcnn_resnet50_fpn"  # one of MODEL_ARCHITECTURES
    num_classes: int = 2  # background + lung_opacity
    image_size: int = 512  # images are resized to this square side for training and prediction (pixels)
    multiscale_train: list[int] = field(
        default_factory=list
    )  # [low, high] pixels: the model resizes each training image to a random size in this range (steps of 32, image_size included); validation and prediction use image_size; [] = off
    pretrained: str = "auto"  # 'auto': torchvision COCO weights if cached or downloadable, else from scratch; 'none'; or a path to a .pth state dict (a 'lungdet pretrain' backbone file trains every layer with ordinary batch norm)
    # with pretrained weights: how many backbone stages train (0..5 resnet, 0..6 mobilenet)
    trainable_backbone_layers: int = 3
    anchor_sizes: list[int] = field(
        default_factory=lambda: [32, 64, 128, 256, 512]
    )  # anchor side lengths (pixels at image_size)
    anchor_aspect_ratios: list[float] = field(
        default_factory=lambda: [0.5, 1.0, 2.0]
    )  # height/width; RSNA boxes are tall (median ~1.4)
    rpn_pre_nms_top_n_train: int = 2000  # proposals kept before NMS per FPN level, training
    rpn_post_nms_top_n_train: int = 2000  # proposals kept after NMS, training
    rpn_pre_nms_top_n_test: int = 1000  # same at inference
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    box_batch_size_per_image: int = 512  # proposals sampled per image for the box-head loss
    box_detections_per_img: int = 10  # RSNA images have at most 4 boxes; a few spares help recall
    box_score_thresh: float = 0.01  # the model drops detections below this; the submission threshold is tuned later
    mask_shape: str = "ellipse"  # maskrcnn only: the training mask drawn from each box, 'ellipse' (inscribed; opacities are rounded) or 'rectangle' (filled box)
    box_nms_thresh: float = 0.2  # IoU above which overlapping detections are merged; RSNA boxes rarely overlap, and every duplicate is a false positive (0.5 -> 0.2 lifted held-out synthetic mAP 0.34 -> 0.46)
    image_head: bool = False  # add a small image-level head (one logit: "has any opacity"), trained jointly; its probability gates boxes in post-processing and gives the serve API's verdict
    image_metadata: bool = False  # with image_head: the view position, sex and age band (DICOM tags, or convert --metadata) add a learned term to its logit; a missing value is its own category
    image_class_info: bool = False  # with image_head: also learn RSNA's three classes (Lung Opacity / No Lung Opacity - Not Normal / Normal) as an auxiliary target; needs convert --class-info
    batched_heads: bool = True  # match, sample and filter for the whole batch at once (detection/batched_heads.py): torchvision's results with far fewer GPU waits, and RoI pooling as one sparse product on a CPU (detection/sparse_roi_align.py); false = torchvision's per-image loops and kernels


@dataclass
class DataConfig:
    fold: int = 0  # which fold of folds.csv validates; the others train (-1: every image trains and none validates, for a final model; the cut-offs then come from elsewhere, see lungdet cv --final)
    batch_size: int = 4  # images per optimizer step
    num_workers: int = 0  # DataLoader worker processes (0 = load in the main process)
    pin_memory: bool = True  # page-locked batches for faster host-to-GPU copies (CUDA only)
    positive_fraction: float = 0.0  # share of each epoch's samples taken from images with boxes (0 = as in the data, ~23% for RSNA); positives are repeated and negatives left out to make it, so an epoch keeps its length
    max_train_images: int = 0  # use only the first N training images (0 = all); for quick runs
    max_val_images: int = 0  # likewise for validation (0 = all)


@dataclass
class AugmentConfig:
    """Training-time augmentation (albumentations); each transform's probability, 0 = off. Boxes follow every geometric change."""

    hflip: float = 0.5  # horizontal flip (lungs are roughly mirror images)
    shift_scale_rotate: float = 0.3  # small affine jitter; boxes follow and are clipped to the image
    shift_limit: float = 0.05  # largest shift, as a fraction of the image side
    scale_limit: float = 0.1  # largest zoom in or out, as a fraction (0.1 = 0.9x..1.1x)
    rotate_limit: float = 7.0  # largest rotation in degrees (patients are positioned upright)
    brightness_contrast: float = 0.3  # random brightness and contrast change
    brightness_limit: float = 0.15  # largest brightness change, as a fraction of the range
    contrast_limit: float = 0.15  # largest contrast change, as a fraction
    gamma: float = 0.0  # random gamma (exposure differs between machines)
    gamma_limit: list[float] = field(default_factory=lambda: [80.0, 120.0])  # gamma range in percent (100 = unchanged)
    blur: float = 0.0  # Gaussian blur (detectors and reconstruction kernels differ in sharpness)
    blur_limit: int = 5  # largest blur kernel in pixels (odd, >= 3)
    noise: float = 0.0  # Gaussian noise
    noise_std: float = 0.03  # noise standard deviation as a fraction of the 0..255 range
    clahe: float = 0.0  # local contrast equalisation (CLAHE)
    min_visibility: float = 0.3  # a box keeping less than this fraction of its area after augmentation is dropped
    min_box_side: float = 2.0  # a box left thinner than this (pixels) after augmentation is dropped


@dataclass
class OptimConfig:
    optimizer: str = "sgd"  # 'sgd' or 'adamw'
    lr: float = 0.01  # peak learning rate
    momentum: float = 0.9  # SGD momentum (ignored by adamw)
    weight_decay: float = 1e-4  # L2 penalty
    epochs: int = 12  # passes over the training images
    warmup_iters: int = 200  # linear warm-up (optimizer steps) from lr/100 to lr, then the schedule
    # 'cosine' (decay to 0 at the last step) or 'step' (multiply by step_gamma at each milestone)
    schedule: str = "cosine"
    step_milestones: list[int] = field(
        default_factory=lambda: [8, 11]
    )  # 'step' schedule: epochs after which the lr drops
    step_gamma: float = 0.1  # 'step' schedule: the factor at each milestone
    grad_clip_norm: float = 10.0  # clip the global gradient norm (0 = off); scratch training spikes early
    # batches whose gradients are summed per optimizer step (effective batch = batch_size x this x GPUs)
    accumulate_steps: int = 1
    # exponential moving average of the weights, validated and saved for predict (0 = off; 0.999 is usual)
    ema_decay: float = 0.0
    image_loss_weight: float = 1.0  # with model.image_head: the weight of its binary cross-entropy in the total loss
    # with model.image_class_info: the weight of the three-class cross-entropy (the 2018 2nd place used 0.1)
    image_class_loss_weight: float = 0.1


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0  # seeds torch, numpy and augmentation
    device: str = "auto"  # 'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'; under torchrun each process takes cuda:LOCAL_RANK
    amp: str = "auto"  # mixed precision: 'auto' (CUDA: bf16 where supported, else fp16; CPU: bf16 where it has bfloat16 instructions, else fp32), 'bf16', 'fp16' (CUDA only) or 'none'
    channels_last: bool = True  # NHWC memory layout for the convolutions: what tensor cores and oneDNN's CPU kernels want (1.1-1.25x faster fp32 steps on a CPU)
    compile: bool = False  # torch.compile the fixed-shape parts (backbone, RPN or RetinaNet head) of the trained model: fewer, fused kernels for a host-bound GPU step; compiling takes a minute or more at the start and at the first validation
    # also write last.pt every N optimizer steps, so a kill loses at most N steps (0 = at epoch ends only)
    checkpoint_every_steps: int = 0
    tensorboard: bool = True  # also log metrics to RUN/tensorboard (when the tensorboard package is installed)
    max_minutes: float = 0.0  # stop training after this wall time and validate (0 = no limit)
    val_score_thresholds: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    )  # confidence cut-offs tried at validation; the best is stored for predict


# (dotted key, check, message) for every range rule; checked after loading and overrides.
_RANGE_RULES: list[RangeRule] = [
    ("model.architecture", lambda v: v in MODEL_ARCHITECTURES, f"one of {', '.join(MODEL_ARCHITECTURES)}"),
    ("model.num_classes", lambda v: v >= 2, ">= 2 (background + at least one class)"),
    ("model.image_size", lambda v: 64 <= v <= 2048, "between 64 and 2048"),
    (
        "model.multiscale_train",
        lambda v: len(v) == 0 or (len(v) == 2 and 64 <= v[0] <= v[1] <= 2048),
        "[] (off) or [low, high] pixels with 64 <= low <= high <= 2048",
    ),
    ("model.trainable_backbone_layers", lambda v: 0 <= v <= 6, "between 0 and 6"),
    ("model.anchor_sizes", lambda v: len(v) > 0 and all(s > 0 for s in v), "a non-empty list of positive sizes"),
    (
        "model.anchor_aspect_ratios",
        lambda v: len(v) > 0 and all(r > 0 for r in v),
        "a non-empty list of positive ratios",
    ),
    ("model.rpn_pre_nms_top_n_train", lambda v: v >= 1, ">= 1"),
    ("model.rpn_post_nms_top_n_train", lambda v: v >= 1, ">= 1"),
    ("model.rpn_pre_nms_top_n_test", lambda v: v >= 1, ">= 1"),
    ("model.rpn_post_nms_top_n_test", lambda v: v >= 1, ">= 1"),
    ("model.rpn_batch_size_per_image", lambda v: v >= 1, ">= 1"),
    ("model.box_batch_size_per_image", lambda v: v >= 1, ">= 1"),
    ("model.box_detections_per_img", lambda v: v >= 1, ">= 1"),
    ("model.box_score_thresh", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("model.box_nms_thresh", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    ("model.mask_shape", lambda v: v in MASK_SHAPES, f"one of {', '.join(MASK_SHAPES)}"),
    ("data.fold", lambda v: v >= -1, ">= 0, or -1 for every image and no validation"),
    ("data.batch_size", lambda v: v >= 1, ">= 1"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    *(
        (f"augment.{name}", lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]")
        for name in (
            "hflip",
            "shift_scale_rotate",
            "brightness_contrast",
            "gamma",
            "blur",
            "noise",
            "clahe",
            "min_visibility",
        )
    ),
    ("augment.shift_limit", lambda v: 0.0 <= v <= 0.5, "in [0, 0.5]"),
    ("augment.scale_limit", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("augment.rotate_limit", lambda v: 0.0 <= v <= 45.0, "in [0, 45] degrees"),
    ("augment.brightness_limit", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ("augment.contrast_limit", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ("augment.gamma_limit", lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[low, high] percent with 0 < low <= high"),
    ("augment.blur_limit", lambda v: v >= 3 and v % 2 == 1, "an odd number >= 3"),
    ("augment.noise_std", lambda v: 0.0 <= v <= 0.5, "in [0, 0.5]"),
    ("augment.min_box_side", lambda v: v >= 0.0, ">= 0"),
    ("data.positive_fraction", lambda v: 0.0 <= v <= 0.9, "in [0, 0.9] (0 = as in the data)"),
    ("data.max_train_images", lambda v: v >= 0, ">= 0"),
    ("data.max_val_images", lambda v: v >= 0, ">= 0"),
    ("optim.optimizer", lambda v: v in ("sgd", "adamw"), "'sgd' or 'adamw'"),
    ("optim.lr", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    ("optim.momentum", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0.0, ">= 0"),
    ("optim.epochs", lambda v: v >= 1, ">= 1"),
    ("optim.warmup_iters", lambda v: v >= 0, ">= 0"),
    ("optim.schedule", lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
    (
        "optim.step_milestones",
        lambda v: all(m >= 1 for m in v) and list(v) == sorted(set(v)),
        "increasing epoch numbers >= 1",
    ),
    ("optim.step_gamma", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    ("optim.grad_clip_norm", lambda v: v >= 0.0, ">= 0 (0 = off)"),
    ("optim.accumulate_steps", lambda v: v >= 1, ">= 1"),
    ("optim.ema_decay", lambda v: v == 0.0 or 0.5 <= v < 1.0, "0 (off) or in [0.5, 1)"),
    ("optim.image_loss_weight", lambda v: v >= 0.0, ">= 0"),
    ("optim.image_class_loss_weight", lambda v: v >= 0.0, ">= 0"),
    ("seed", lambda v: v >= 0, ">= 0"),
    ("max_minutes", lambda v: v >= 0.0, ">= 0 (0 = no limit)"),
    ("amp", lambda v: v in AMP_MODES, f"one of {', '.join(AMP_MODES)}"),
    ("checkpoint_every_steps", lambda v: v >= 0, ">= 0 (0 = at epoch ends only)"),
    (
        "val_score_thresholds",
        lambda v: len(v) > 0 and all(0.0 <= t <= 1.0 for t in v),
        "a non-empty list of values in [0, 1]",
    ),
]


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
    check_ranges(config, _RANGE_RULES)
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
    return dataclasses.asdict(config)


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
