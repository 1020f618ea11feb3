"""The networks ``lungdet pretrain`` trains around the detector's backbone body: SimSiam and a multi-label classifier.

Both sit on :class:`PooledBody`, the body as :func:`lungdet.detection.model.build_model` builds it,
so that every weight keeps the name the detector gives it. See :mod:`lungdet.detection.pretrain`
for why SimSiam.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

from lungdet.detection.config import ModelConfig
from lungdet.detection.model import build_model, in_memory_layout

PROJECTION_DIM = 512  # SimSiam's projection width (2048 in the paper, for ImageNet on GPUs)
PREDICTOR_DIM = 128  # the predictor's bottleneck, a quarter of the projection as in the paper


class PooledBody(nn.Module):
    """The detector's backbone body with its input normalisation and global average pooling.

    uint8 ``[N, 1, H, W]`` grey pixels -> float32 ``[N, channels]``. The grey image is repeated to
    three channels and normalised with the detector's own mean and std, as the detector's transform
    does, so the body learns on the inputs it will see in ``lungdet train``.
    """

    def __init__(
        self, body: nn.Module, *, image_mean: Sequence[float], image_std: Sequence[float], channels_last: bool = False
    ) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.channels_last = channels_last
        # The top stage's width (960 for MobileNetV3, 2048 for ResNet-50), from one small image in eval mode.
        training = body.training
        body.eval()
        with torch.no_grad():
            self.channels = int(self(torch.zeros(1, 1, 64, 64, dtype=torch.uint8)).shape[1])
        body.train(training)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 1, H, W]`` grey pixels -> float32 ``[N, channels]``, the deepest stage averaged over space."""
        images = (pixels.float().div(255.0).expand(-1, 3, -1, -1) - self.image_mean) / self.image_std
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # The body returns its stages finest first; the last is the deepest, whose every cell sees most of the chest.
        top = next(reversed(self.body(images).values()))
        return top.float().mean(dim=(2, 3))


class SimSiam(nn.Module):
    """SimSiam on :class:`PooledBody`: encoder ``f`` (body, pooling, projection MLP) and predictor ``h``.

    ``forward(view_a, view_b)`` returns ``(predictions, targets)``: ``(h(f(a)), h(f(b)))`` and
    ``(f(b), f(a))`` detached, each float32 ``[N, projection_dim]``; :func:`simsiam_loss` compares them pairwise.
    """

    def __init__(
        self, encoder: PooledBody, *, projection_dim: int = PROJECTION_DIM, predictor_dim: int = PREDICTOR_DIM
    ) -> None:
        super().__init__()
        self.encoder = encoder
        channels = encoder.channels
        # The paper's projector: three layers, batch norm after each, the last without its affine part.
        self.projector = nn.Sequential(
            nn.Linear(channels, projection_dim, bias=False),
            nn.BatchNorm1d(projection_dim),
            nn.ReLU(inplace=True),
            nn.Linear(projection_dim, projection_dim, bias=False),
            nn.BatchNorm1d(projection_dim),
            nn.ReLU(inplace=True),
            nn.Linear(projection_dim, projection_dim, bias=False),
            nn.BatchNorm1d(projection_dim, affine=False),
        )
        # A bottleneck: the paper found it needed, and batch norm on the predictor's output unstable.
        self.predictor = nn.Sequential(
            nn.Linear(projection_dim, predictor_dim, bias=False),
            nn.BatchNorm1d(predictor_dim),
            nn.ReLU(inplace=True),
            nn.Linear(predictor_dim, projection_dim),
        )

    def forward(
        self, view_a: torch.Tensor, view_b: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``((h(f(a)), h(f(b))), (f(b), f(a)))`` for uint8 views ``[N, 1, H, W]``, each ``[N, projection_dim]``.

        The targets ``f(b), f(a)`` are detached: the stop-gradient.
        """
        projection_a = self.projector(self.encoder(view_a))
        projection_b = self.projector(self.encoder(view_b))
        # The stop-gradient: each view's projection is a constant target for the other's prediction.
        return (self.predictor(projection_a), self.predictor(projection_b)), (
            projection_b.detach(),
            projection_a.detach(),
        )

    def loss(self, views: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Negative cosine similarity for uint8 ``views`` ``[N, 2, 1, H, W]``; ``targets`` (labels) are unused."""
        predictions, projections = self(views[:, 0], views[:, 1])
        return simsiam_loss(predictions, projections)


def simsiam_loss(predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean negative cosine similarity of each ``[N, D]`` prediction with its target: -1 when all agree, in [-1, 1]."""
    similarities = [
        functional.cosine_similarity(prediction.float(), target.float(), dim=1).mean()
        for prediction, target in zip(predictions, targets, strict=True)
    ]
    return -torch.stack(similarities).mean()


class MultiLabelClassifier(nn.Module):
    """A linear layer on :class:`PooledBody`: uint8 ``[N, 1, H, W]`` -> float32 logits ``[N, labels]``."""

    def __init__(self, encoder: PooledBody, labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.channels, labels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 1, H, W]`` grey pixels -> one logit per finding, ``[N, labels]``."""
        return self.head(self.encoder(pixels))

    def loss(self, views: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy with logits over the labels, for ``views`` ``[N, 1, 1, H, W]`` and 0/1 ``targets`` ``[N, labels]``."""
        return functional.binary_cross_entropy_with_logits(self(views[:, 0]), targets.float())


def build_encoder(architecture: str, image_size: int, *, channels_last: bool = False) -> PooledBody:
    """The body of ``architecture``'s backbone, built exactly as ``lungdet train`` builds it from scratch, pooled."""
    detector = build_model(ModelConfig(architecture=architecture, image_size=image_size, pretrained="none"))
    body = detector.backbone.body
    if channels_last:
        in_memory_layout(body, channels_last=True)
    return PooledBody(
        body,
        image_mean=detector.transform.image_mean,
        image_std=detector.transform.image_std,
        channels_last=channels_last,
    )
