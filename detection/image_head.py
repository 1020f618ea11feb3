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

Two optional inputs and targets, as the 2018 winners used them:

- **metadata** (``model.image_metadata``): the view position, sex and age band
  (:func:`lungdet.data_tools.metadata.metadata_features`) add a learned term to the logit,
  ``logit = image(pixels) + w . metadata``. The term is added *outside* the network's forward
  pass, by :func:`lungdet.detection.inference.with_metadata`, from each target's ``metadata`` in
  training and from the file's tags at prediction: so an ONNX or TorchScript export keeps its
  one image input, and every way of running a model adds the same term with the same numpy
  function. The model's own ``image_probability`` is the pixels' part alone.
- **three classes** (``model.image_class_info``): RSNA's ``class_info`` (Lung Opacity / No Lung
  Opacity - Not Normal / Normal) as an auxiliary softmax on the head's hidden layer, trained
  with cross-entropy times ``class_loss_weight`` (``loss_image_class``; images without a class,
  ``class_index`` -1, are left out). It shapes the features only: the decision stays the one logit.

The head's weights are ``image_head.*`` in the state dict: a checkpoint without them is a model
without the head, which loads as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional

IMAGE_LOSS = "loss_image"
IMAGE_CLASS_LOSS = "loss_image_class"
IMAGE_PROBABILITY = "image_probability"
HIDDEN_UNITS = 128
# RSNA's detailed classes, in the order of the auxiliary output; -1 marks an image without one.
IMAGE_CLASSES = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")
NO_CLASS = -1


def class_index(class_name: str | None) -> int:
    """The auxiliary target of an RSNA class name (:data:`IMAGE_CLASSES`), :data:`NO_CLASS` for none or an unknown name."""
    return IMAGE_CLASSES.index(class_name) if class_name in IMAGE_CLASSES else NO_CLASS


class ImageHead(nn.Module):
    """``[N, C, H, W]`` top feature level -> ``[N]`` logits: average pooling, Linear-ReLU-Dropout-Linear.

    With ``metadata_features`` it also holds ``metadata``, a bias-free linear term over the
    metadata vector (zero at the start: the pixels learn first); with ``class_info`` an
    auxiliary three-class output on the hidden layer (see the module docstring).
    """

    def __init__(
        self,
        channels: int,
        *,
        hidden: int = HIDDEN_UNITS,
        loss_weight: float = 1.0,
        metadata_features: int = 0,
        class_info: bool = False,
        class_loss_weight: float = 0.1,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(hidden, 1)
        )
        self.loss_weight = loss_weight
        self.class_loss_weight = class_loss_weight
        self.metadata = nn.Linear(metadata_features, 1, bias=False) if metadata_features else None
        if self.metadata is not None:
            nn.init.zeros_(self.metadata.weight)
        self.classes = nn.Linear(hidden, len(IMAGE_CLASSES)) if class_info else None

    def forward(self, feature: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"logits": [N]}`` (the pixels' logit), and ``"class_logits": [N, 3]`` with the three classes."""
        # float32: under autocast the pooled features would round to bf16 before a single output.
        pooled = feature.float().mean(dim=(2, 3))
        with torch.autocast(device_type=feature.device.type, enabled=False):
            hidden = self.mlp[:3](pooled)
            outputs = {"logits": self.mlp[3](hidden).squeeze(1)}
            if self.classes is not None:
                outputs["class_logits"] = self.classes(hidden)
        return outputs

    def metadata_weights(self) -> list[float] | None:
        """The metadata term's weights (one per :data:`~lungdet.data_tools.metadata.METADATA_FEATURES`), None without metadata."""
        return (
            None
            if self.metadata is None
            else [float(value) for value in self.metadata.weight.detach().float().reshape(-1)]
        )


def _keep_top_level(backbone: nn.Module, inputs: Any, features: Any) -> None:
    # The backbone returns an OrderedDict of FPN levels, finest first; the last is the coarsest,
    # whose every cell sees most of the chest.
    backbone._lungdet_top_level = next(reversed(features.values())) if isinstance(features, dict) else features


def _stacked(targets: list[dict[str, torch.Tensor]], key: str, *, what: str) -> torch.Tensor:
    missing = [index for index, target in enumerate(targets) if key not in target]
    if missing:
        raise ValueError(
            f"targets {missing} have no '{key}'; a head with {what} trains on targets that carry it (detection/data.py adds it)"
        )
    return torch.stack([target[key] for target in targets])


def _add_image_outputs(detector: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    feature = detector.backbone.__dict__.pop("_lungdet_top_level", None)
    if feature is None:  # a forward that never reached the backbone (no images)
        return output
    head: ImageHead = detector.image_head
    head_outputs = head(feature)
    logits = head_outputs["logits"]
    if detector.training:
        targets = args[1] if len(args) > 1 else kwargs.get("targets")
        if targets:
            if head.metadata is not None:
                metadata = _stacked(targets, "metadata", what="metadata").to(logits.device, torch.float32)
                logits = logits + head.metadata(metadata).squeeze(1)
            labels = torch.tensor([float(target["boxes"].shape[0] > 0) for target in targets], device=logits.device)
            loss = functional.binary_cross_entropy_with_logits(logits, labels)
            output = {**output, IMAGE_LOSS: loss * head.loss_weight}
            if head.classes is not None:
                classes = (
                    _stacked(targets, "class_index", what="three classes").to(logits.device, torch.int64).reshape(-1)
                )
                known = classes != NO_CLASS
                class_logits = head_outputs["class_logits"]
                # An all-unknown batch adds a zero that keeps the graph (the loop sums every loss).
                class_loss = (
                    functional.cross_entropy(class_logits[known], classes[known])
                    if bool(known.any())
                    else class_logits.sum() * 0.0
                )
                output[IMAGE_CLASS_LOSS] = class_loss * head.class_loss_weight
        return output
    probabilities = torch.sigmoid(logits)
    for index, image_output in enumerate(output):
        image_output[IMAGE_PROBABILITY] = probabilities[index]
    return output


def attach_image_head(
    detector: nn.Module,
    *,
    loss_weight: float = 1.0,
    metadata_features: int = 0,
    class_info: bool = False,
    class_loss_weight: float = 0.1,
) -> nn.Module:
    """Give ``detector`` (in place) an :class:`ImageHead` on its backbone's top level, and the hooks that use it."""
    detector.image_head = ImageHead(
        detector.backbone.out_channels,
        loss_weight=loss_weight,
        metadata_features=metadata_features,
        class_info=class_info,
        class_loss_weight=class_loss_weight,
    )
    detector.backbone.register_forward_hook(_keep_top_level)
    detector.register_forward_hook(_add_image_outputs, with_kwargs=True)
    return detector


def image_metadata_weights(model: nn.Module) -> list[float] | None:
    """The metadata term's weights of ``model``'s image head (unwrapping DDP), None without a head or without metadata."""
    head = getattr(getattr(model, "module", model), "image_head", None)
    return None if head is None else head.metadata_weights()


def has_image_head(model: nn.Module) -> bool:
    """Whether ``model`` (or the module it wraps, under DDP) has an image-level head."""
    return hasattr(getattr(model, "module", model), "image_head")
