"""Tests for detection/classifier.py: the dedicated image classifier that benchmarks/image_classifier.py weighs against the head."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.nn import functional

from lungdet.data_tools.metadata import METADATA_FEATURES
from lungdet.detection.classifier import (
    ClassifierSettings,
    ImageClassifier,
    classifier_loss,
    recompute_batch_norm,
    train_classifier,
)
from lungdet.detection.runtime import Precision
from lungdet.errors import ConfigError


@pytest.mark.parametrize("architecture", ["resnet18", "efficientnet_b0", "densenet121", "mobilenet_v3_small"])
def test_every_classifier_gives_one_logit_and_three_classes(architecture: str) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(architecture, metadata=True, class_info=True).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        bare = model(images)
        metadata = torch.zeros(2, len(METADATA_FEATURES))
        metadata[0, 0] = 1.0
        model.metadata.weight[0, 0] = 2.0  # view AP
        tagged = model(images, metadata)
    assert bare["logits"].shape == (2,) and bare["class_logits"].shape == (2, 3)
    torch.testing.assert_close(tagged["logits"], bare["logits"] + torch.tensor([2.0, 0.0]))


def test_running_statistics_follow_the_batches_from_scratch() -> None:
    """Trained a few dozen steps from scratch, a classifier must not answer one constant in eval mode."""
    torch.manual_seed(0)
    assert {
        module.momentum
        for module in ImageClassifier("mobilenet_v3_large").modules()
        if isinstance(module, torch.nn.BatchNorm2d)
    } == {0.1}
    model = ImageClassifier("resnet18")
    images = torch.rand(8, 3, 64, 64)
    images[:4] *= 0.2  # two kinds of image
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    labels = torch.tensor([1.0] * 4 + [0.0] * 4)
    for _ in range(30):
        loss = functional.binary_cross_entropy_with_logits(model(images)["logits"], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        lagging = torch.sigmoid(model.eval()(images)["logits"])
    recompute_batch_norm(model, [(images, None)], Precision("cpu", None))
    with torch.no_grad():
        probabilities = torch.sigmoid(model.eval()(images)["logits"])
    assert lagging.std() < 1e-3  # the running statistics lag: eval mode answers one constant
    assert probabilities.std() > 0.05 and probabilities[:4].mean() > probabilities[4:].mean()


def test_the_loss_is_bce_plus_the_weighted_class_loss_on_known_classes() -> None:
    outputs = {"logits": torch.tensor([0.5, -1.0]), "class_logits": torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])}
    labels, classes = torch.tensor([1.0, 0.0]), torch.tensor([0, -1])
    expected = functional.binary_cross_entropy_with_logits(outputs["logits"], labels) + 0.1 * functional.cross_entropy(
        outputs["class_logits"][:1], classes[:1]
    )
    assert classifier_loss(outputs, labels, classes, class_loss_weight=0.1).item() == pytest.approx(expected.item())
    no_classes = classifier_loss(outputs, labels, torch.tensor([-1, -1]), class_loss_weight=0.1)
    assert no_classes.item() == pytest.approx(
        functional.binary_cross_entropy_with_logits(outputs["logits"], labels).item()
    )


def test_an_unknown_classifier_is_named_with_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"classifier 'vgg11': unknown; use one of resnet18, resnet34"):
        ImageClassifier("vgg11")


def test_train_classifier_validates_each_epoch_and_keeps_the_best(
    tmp_path_factory: pytest.TempPathFactory, make_tiny_dataset: Callable[[Path], Path]
) -> None:
    coco = make_tiny_dataset(tmp_path_factory.mktemp("classifier"))
    settings = ClassifierSettings(architecture="mobilenet_v3_small", image_size=64, epochs=2, batch_size=2)
    result = train_classifier(settings, coco, fold=0, say=lambda line: None)
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    assert result["auc"] == max(row["auc"] for row in result["history"]) and result["epoch"] in (1, 2)
    assert len(result["probabilities"]) == 4 and all(
        0.0 < value < 1.0 for value in result["probabilities"].values()
    )  # fold 0's four patients
