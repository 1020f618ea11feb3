"""An image-level head: one logit per image for "has any opacity", trained beside the boxes.

The 2018 winners gated their boxes with an image classifier: on an image the classifier calls
clear, every box is a false positive the metric punishes with a 0. :func:`attach_image_head`
adds a small head to any of our detectors (Faster R-CNN, Mask R-CNN, RetinaNet): global average
pooling of the backbone's top feature level, a two-layer MLP, one logit.

It hangs off the detector through forward hooks, so torchvision's forward passes stay as they
are: a hook on the backbone keeps its top level, and a hook on the detector turns it into

- in training, ``loss_image``: binary cross-entropy against "the image has a box", times
  ``loss_weight``, added to the detector's losses (and so to the total the loop minimises);
- in evaluation, ``image_probability`` (a 0-dim tensor) in each image's output dict.

The head's weights are ``image_head.*`` in the state dict: a checkpoint without them is a model
without the head, which loads as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional

IMAGE_LOSS = "loss_image"
IMAGE_PROBABILITY = "image_probability"
HIDDEN_UNITS = 128


class ImageHead(nn.Module):
    """``[N, C, H, W]`` top feature level -> ``[N]`` logits: average pooling, Linear-ReLU-Dropout-Linear."""

    def __init__(self, channels: int, *, hidden: int = HIDDEN_UNITS, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(hidden, 1))
        self.loss_weight = loss_weight

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        # float32: under autocast the pooled features would round to bf16 before a single output.
        pooled = feature.float().mean(dim=(2, 3))
        with torch.autocast(device_type=feature.device.type, enabled=False):
            return self.mlp(pooled).squeeze(1)


def _keep_top_level(backbone: nn.Module, inputs: Any, features: Any) -> None:
    # The backbone returns an OrderedDict of FPN levels, finest first; the last is the coarsest,
    # whose every cell sees most of the chest.
    backbone._lungdet_top_level = next(reversed(features.values())) if isinstance(features, dict) else features


def _add_image_outputs(detector: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    feature = detector.backbone.__dict__.pop("_lungdet_top_level", None)
    if feature is None:  # a forward that never reached the backbone (no images)
        return output
    logits = detector.image_head(feature)
    if detector.training:
        targets = args[1] if len(args) > 1 else kwargs.get("targets")
        if targets:
            labels = torch.tensor([float(target["boxes"].shape[0] > 0) for target in targets], device=logits.device)
            loss = functional.binary_cross_entropy_with_logits(logits, labels)
            output = {**output, IMAGE_LOSS: loss * detector.image_head.loss_weight}
        return output
    probabilities = torch.sigmoid(logits)
    for index, image_output in enumerate(output):
        image_output[IMAGE_PROBABILITY] = probabilities[index]
    return output


def attach_image_head(detector: nn.Module, *, loss_weight: float = 1.0) -> nn.Module:
    """Give ``detector`` (in place) an :class:`ImageHead` on its backbone's top level, and the hooks that use it."""
    detector.image_head = ImageHead(detector.backbone.out_channels, loss_weight=loss_weight)
    detector.backbone.register_forward_hook(_keep_top_level)
    detector.register_forward_hook(_add_image_outputs, with_kwargs=True)
    return detector


def has_image_head(model: nn.Module) -> bool:
    """Whether ``model`` (or the module it wraps, under DDP) has an image-level head."""
    return hasattr(getattr(model, "module", model), "image_head")
