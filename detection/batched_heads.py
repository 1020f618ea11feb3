"""Torchvision's detector bookkeeping done for the whole batch at once instead of image by image.

On a GPU, a Faster R-CNN training step appears bound by the host rather than the convolutions:
on an H100, ResNet-50 and MobileNetV3 both trained at about 90 images/s at 512 px
(docs/benchmarks.md). Most of the operations a step launches are torchvision's per-image Python loops around the
network: normalising and "resizing" each image, building each image's anchors, matching anchors
and proposals to the ground truth, sampling them for the losses, filtering proposals. Each loop
turn launches a few dozen tiny kernels and, through ``torch.where`` and boolean indexing, waits
for the GPU several times, so the GPU idles while the host catches up.

The classes here replace those loops with batched tensor operations. They compute what
torchvision computes: the same anchors, matches, labels, regression targets, proposals and
losses (tests/detection/test_batched_heads.py compares them with torchvision's own methods),
except that the random subsets sampled for the losses are drawn differently (as uniformly).
Every one of them falls back to torchvision's code for inputs it does not cover (images of
different sizes, resizing, tracing). One deliberate difference under mixed precision: anchors,
proposals, detections and their scores stay in float32 (:class:`Float32BoxCoder`, the
``postprocess_detections`` overrides), where torchvision rounds them to bf16 or fp16 with the
network's outputs. They add no parameters or buffers, so
checkpoints do not depend on whether they are used (``model.batched_heads``).

Batched layout: ground-truth boxes and proposals are padded to ``[images, most per image, 4]``
with a validity mask; invalid ground-truth rows get IoU -1 so they never win a match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, sigmoid_focal_loss
from torchvision.ops import boxes as box_ops

from lungdet.detection.sparse_roi_align import SparseMultiScaleRoIAlign

# The key a candidate can never be sampled with: torch.rand draws from [0, 1).
_NOT_A_CANDIDATE = 2.0


def pad_boxes(boxes: list[Tensor], *, min_length: int = 0) -> tuple[Tensor, Tensor]:
    """``[n_i, 4]`` per image -> ``[images, max(n_i, min_length), 4]`` zero-padded, and the ``[images, ...]`` mask of real rows."""
    padded = pad_sequence(boxes, batch_first=True)
    # One small fill per image rather than a host list copied to the device, which would wait for the GPU.
    valid = pad_sequence([torch.ones(len(b), dtype=torch.bool, device=b.device) for b in boxes], batch_first=True)
    if padded.shape[1] < min_length:
        padded = F.pad(padded, (0, 0, 0, min_length - padded.shape[1]))
        valid = F.pad(valid, (0, min_length - valid.shape[1]))
    return padded, valid


def pad_labels(targets: list[dict[str, Tensor]], length: int) -> Tensor:
    """Each target's ``labels``, zero-padded to ``[images, length]`` (``length`` from :func:`pad_boxes` of the same targets)."""
    labels = pad_sequence([target["labels"] for target in targets], batch_first=True)
    return F.pad(labels, (0, length - labels.shape[1]))


def anchor_batch(anchors: list[Tensor]) -> Tensor:
    """Per-image anchors as ``[1, A, 4]`` when every image shares one tensor (:class:`SharedAnchorGenerator`), else ``[B, A, 4]``."""
    return anchors[0][None] if all(a is anchors[0] for a in anchors) else torch.stack(anchors)


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of ``[B, N, 4]`` with ``[B or 1, M, 4]`` XYXY boxes: ``[B, N, M]``, with torchvision's ``box_iou`` arithmetic."""
    area1 = box_ops.box_area(boxes1)
    area2 = box_ops.box_area(boxes2)
    lt = torch.max(boxes1[:, :, None, :2], boxes2[:, None, :, :2])
    rb = torch.min(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, :, None] + area2[:, None, :] - inter
    return inter / union


def batched_match(quality: Tensor, gt_valid: Tensor, matcher: Matcher) -> Tensor:
    """torchvision's ``Matcher`` on ``[B, G, N]`` quality: ``[B, N]`` ground-truth index or its negative codes.

    Rows of invalid (padding) ground truth never match; an image without ground truth is all
    ``BELOW_LOW_THRESHOLD``, as the per-image code treats it (background everywhere).
    """
    quality = quality.masked_fill(~gt_valid[:, :, None], -1.0)
    matched_vals, matches = quality.max(dim=1)
    all_matches = matches
    matches = torch.where(matched_vals < matcher.low_threshold, matcher.BELOW_LOW_THRESHOLD, matches)
    between = (matched_vals >= matcher.low_threshold) & (matched_vals < matcher.high_threshold)
    matches = torch.where(between, matcher.BETWEEN_THRESHOLDS, matches)
    if matcher.allow_low_quality_matches:
        # Each ground truth's best candidates (ties included) keep their best match, however poor.
        highest = quality.max(dim=2, keepdim=True).values
        best_for_some_gt = ((quality == highest) & gt_valid[:, :, None]).any(dim=1)
        matches = torch.where(best_for_some_gt, all_matches, matches)
    return matches


def balanced_sample(
    labels: Tensor, batch_size_per_image: int, positive_fraction: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per image, a uniformly random subset as torchvision's ``BalancedPositiveNegativeSampler`` draws it, for ``[B, N]`` labels.

    Positives are labels >= 1, negatives labels == 0, anything else is never drawn. Up to
    ``batch_size_per_image * positive_fraction`` positives, then negatives up to
    ``batch_size_per_image`` in all. Instead of a permutation per image, every candidate gets a
    random key and the smallest keys win: the same distribution, with fixed shapes and no wait
    for the GPU. Returns ``(positive index [B, P], positive valid, negative index [B, Q],
    negative valid)``; invalid slots hold arbitrary indices.
    """
    keys = torch.rand(labels.shape, device=labels.device)
    candidates = labels.shape[1]
    wanted_positives = min(int(batch_size_per_image * positive_fraction), candidates)
    positive_keys, positive_index = torch.where(labels >= 1, keys, _NOT_A_CANDIDATE).topk(
        wanted_positives, dim=1, largest=False
    )
    positive_valid = positive_keys < _NOT_A_CANDIDATE
    wanted_negatives = min(batch_size_per_image, candidates)
    negative_keys, negative_index = torch.where(labels == 0, keys, _NOT_A_CANDIDATE).topk(
        wanted_negatives, dim=1, largest=False
    )
    room = batch_size_per_image - positive_valid.sum(dim=1, keepdim=True)
    rank = torch.arange(
        wanted_negatives, device=labels.device
    )  # topk sorts ascending: slot j holds the j-th smallest key
    negative_valid = (negative_keys < _NOT_A_CANDIDATE) & (rank < room)
    return positive_index, positive_valid, negative_index, negative_valid


def sampled_mask(shape: torch.Size, *index_valid: tuple[Tensor, Tensor]) -> Tensor:
    """``[B, N]`` mask of the valid slots of each ``(index, valid)`` pair from :func:`balanced_sample`."""
    mask = torch.zeros((shape[0], shape[1] + 1), dtype=torch.bool, device=index_valid[0][0].device)
    for index, valid in index_valid:
        # Invalid slots point anywhere, possibly at a sampled candidate: send them to a spare column instead.
        mask.scatter_(1, torch.where(valid, index, shape[1]), True)
    return mask[:, :-1]


# torchvision's batched_nms shifts the classes' boxes apart and runs one NMS for up to this many
# boxes, and one NMS per class above it (one call's overlap mask grows with the square of its
# boxes). nms_within_levels makes the same choice, so it calls the same NMS kernels.
ONE_CALL_NMS_MAX_BOXES = {"cpu": 1000, "cuda": 5000}


def nms_within_levels(
    boxes: Tensor, scores: Tensor, levels: Tensor, level_counts: list[int], iou_threshold: float
) -> Tensor:
    """torchvision's ``batched_nms`` with the FPN levels as classes, for boxes that come level by level in runs of ``level_counts``.

    Returns the kept indices, highest score first, as ``batched_nms`` does. Where it would run one
    NMS per level it first finds each level's boxes with ``unique`` and ``where``, each a wait for
    the GPU; the runs' lengths, known here, make those unnecessary, and only the NMS calls wait.
    """
    if len(boxes) <= ONE_CALL_NMS_MAX_BOXES.get(boxes.device.type, ONE_CALL_NMS_MAX_BOXES["cuda"]):
        return box_ops.batched_nms(boxes, scores, levels, iou_threshold)  # its one-call path
    kept, start = [], 0
    for count in level_counts:
        if count:
            kept.append(
                torchvision.ops.nms(boxes[start : start + count], scores[start : start + count], iou_threshold) + start
            )
        start += count
    keep = torch.cat(kept).sort().values  # in index order, as batched_nms has them before its sort by score
    return keep[scores[keep].sort(descending=True)[1]]


class Float32BoxCoder(BoxCoder):
    """Decodes boxes in float32 even when the network's outputs are bf16 or fp16 (autocast).

    torchvision decodes in the dtype of the predicted offsets, so under bf16 autocast proposals and
    detections are rounded to 8 significant bits: to multiples of 2 pixels between 256 and 512, of
    4 between 512 and 1024; the box heads' training targets are then built from such proposals and
    from ground truth cast to their dtype. In float32 (the CPU) nothing changes.
    """

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """torchvision's ``decode_single`` on float32 copies of its inputs: boxes come out float32 under autocast.

        ``rel_codes`` ``[N, 4 * K]`` offsets are applied to ``boxes`` XYXY ``[N, 4]``; returns XYXY ``[N, 4 * K]``.
        """
        return super().decode_single(rel_codes.float(), boxes.float())


class SharedAnchorGenerator(AnchorGenerator):
    """Anchors computed once per feature-map layout and shared by every image of the batch.

    torchvision concatenates the same anchors again for each image and recomputes them every
    step, although they depend only on the padded batch size and the feature-map sizes.
    """

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """The same anchors for every image: float32 XYXY ``[A, 4]`` in padded-input pixels, every level's in turn.

        The list repeats one tensor object (which :func:`anchor_batch` recognises), cached while the padded input size,
        the feature-map sizes and the device stay the same.
        """
        grid_sizes = tuple(tuple(feature_map.shape[-2:]) for feature_map in feature_maps)
        image_size = tuple(image_list.tensors.shape[-2:])
        # float32 whatever the features' dtype: torchvision follows them, so under bf16 autocast
        # its anchor corners land on a 2-pixel grid above 256 px and a 4-pixel one above 512.
        dtype, device = torch.float32, feature_maps[0].device
        key = (grid_sizes, image_size, device)
        cached = getattr(self, "_shared_anchors", None)
        if cached is None or cached[0] != key:
            strides = [
                [
                    torch.empty((), dtype=torch.int64, device=device).fill_(image_size[0] // g[0]),
                    torch.empty((), dtype=torch.int64, device=device).fill_(image_size[1] // g[1]),
                ]
                for g in grid_sizes
            ]
            self.set_cell_anchors(dtype, device)
            anchors = torch.cat(self.grid_anchors([list(g) for g in grid_sizes], strides))
            cached = (key, anchors)
            self._shared_anchors = cached  # not a buffer: derived, and must stay out of state dicts
        return [cached[1]] * len(image_list.image_sizes)


class BatchedTransform(GeneralizedRCNNTransform):
    """Normalises a batch of same-sized images in one operation when no resizing is needed.

    Our loaders already deliver images at ``model.image_size``, where torchvision's per-image
    resize is an identity (scale 1); anything else goes through torchvision's own code.
    """

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        """Float ``[3, H, W]`` images of one size -> an ``ImageList`` of normalised ``[B, 3, H', W']`` and the targets.

        The batch is stacked and normalised in one operation and zero-padded at the bottom and right to a multiple of
        ``size_divisible``; the image sizes stay ``(H, W)`` and the targets are shallow copies (``masks`` as uint8), as
        torchvision returns them. Images of several sizes or that need resizing, keypoints and tracing go through
        torchvision's ``forward``.
        """
        if not self._is_identity_resize(images, targets):
            return super().forward(images, targets)
        batch = torch.stack(images)
        mean, std = self._mean_std(batch.dtype, batch.device)
        batch = (batch - mean) / std
        height, width = batch.shape[-2:]
        stride = self.size_divisible
        padded_height, padded_width = -(-height // stride) * stride, -(-width // stride) * stride
        if (padded_height, padded_width) != (height, width):
            batch = F.pad(batch, (0, padded_width - width, 0, padded_height - height))
        if targets is not None:
            # A shallow copy, as torchvision makes; its resize turns masks into uint8.
            targets = [
                {key: (value.float().byte() if key == "masks" else value) for key, value in target.items()}
                for target in targets
            ]
        return ImageList(batch, [(height, width)] * len(images)), targets

    def _is_identity_resize(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None) -> bool:
        if torchvision._is_tracing() or torch.jit.is_scripting() or self.fixed_size is not None or not images:
            return False
        shape = images[0].shape
        if (
            len(shape) != 3
            or not images[0].is_floating_point()
            or any(image.shape != shape or image.dtype != images[0].dtype for image in images)
        ):
            return False
        if targets is not None and any("keypoints" in target for target in targets):
            return False
        height, width = shape[-2:]
        sizes = self.min_size if self.training else self.min_size[-1:]
        return all(
            min(float(size) / min(height, width), float(self.max_size) / max(height, width)) == 1.0 for size in sizes
        )

    def _mean_std(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (dtype, device)
        cached = getattr(self, "_cached_mean_std", None)
        if cached is None or cached[0] != key:
            # Made once: a tensor from a Python list on a GPU is a host copy that waits for the device.
            mean = torch.as_tensor(self.image_mean, dtype=dtype, device=device)[:, None, None]
            std = torch.as_tensor(self.image_std, dtype=dtype, device=device)[:, None, None]
            cached = (key, (mean, std))
            self._cached_mean_std = cached
        return cached[1]


class BatchedRegionProposalNetwork(RegionProposalNetwork):
    """The RPN with batched anchor matching, sampling, loss and proposal filtering (NMS stays per image)."""

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's anchor labels and matched boxes, matched for the whole batch at once.

        Returns per image float32 ``[A]`` labels (1 foreground, 0 background, -1 between the thresholds: ignored) and
        the matched ground-truth boxes, float32 XYXY ``[A, 4]``. An image without ground truth gets all 0 and zero
        boxes, as in torchvision.
        """
        batch_anchors = anchor_batch(anchors)
        gt_boxes, gt_valid = pad_boxes([target["boxes"] for target in targets], min_length=1)
        matches = batched_match(batched_box_iou(gt_boxes, batch_anchors), gt_valid, self.proposal_matcher)
        matched_gt_boxes = gt_boxes.gather(1, matches.clamp(min=0)[:, :, None].expand(-1, -1, 4))
        labels = (matches >= 0).to(torch.float32)
        labels = labels.masked_fill(matches == self.proposal_matcher.BETWEEN_THRESHOLDS, -1.0)
        return list(labels.unbind(0)), list(matched_gt_boxes.to(torch.float32).unbind(0))

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """torchvision's RPN losses, sampled and summed for the whole batch at once: ``(objectness loss, box loss)``.

        ``objectness`` ``[B * A, 1]`` logits and ``pred_bbox_deltas`` ``[B * A, 4]``, image after image; ``labels``
        ``[A]`` and ``regression_targets`` ``[A, 4]`` per image, from :meth:`assign_targets_to_anchors`. Binary
        cross-entropy over the sampled anchors and smooth L1 (beta 1/9) over the sampled positives, both divided by the
        number sampled. The sample comes from :func:`balanced_sample`: torchvision's distribution, other draws.
        """
        labels_batch = torch.stack(labels)
        images = labels_batch.shape[0]
        sampler = self.fg_bg_sampler
        positive_index, positive_valid, negative_index, negative_valid = balanced_sample(
            labels_batch, sampler.batch_size_per_image, sampler.positive_fraction
        )
        index = torch.cat([positive_index, negative_index], dim=1)
        valid = torch.cat([positive_valid, negative_valid], dim=1)
        sampled = valid.sum()  # torchvision divides by the number of sampled anchors

        logits = objectness.reshape(images, -1).gather(1, index)
        objectness_loss = F.binary_cross_entropy_with_logits(logits, labels_batch.gather(1, index), reduction="none")
        objectness_loss = torch.where(valid, objectness_loss, 0.0).sum() / sampled

        gather_boxes = positive_index[:, :, None].expand(-1, -1, 4)
        deltas = pred_bbox_deltas.reshape(images, -1, 4).gather(1, gather_boxes)
        # Unsampled slots may hold an image's dummy target, whose encoding is infinite; zero it before the loss.
        targets = torch.where(positive_valid[:, :, None], torch.stack(regression_targets).gather(1, gather_boxes), 0.0)
        box_loss = F.smooth_l1_loss(deltas, targets, beta=1 / 9, reduction="none")
        box_loss = torch.where(positive_valid[:, :, None], box_loss, 0.0).sum() / sampled
        return objectness_loss, box_loss

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's proposal filtering, with top-n, clipping and the size and score filters for the batch at once.

        ``proposals`` ``[B, A, 4]`` decoded XYXY, ``objectness`` logits ``[B * A, 1]``. Returns per image up to
        ``post_nms_top_n`` boxes XYXY ``[K, 4]`` (clipped to the image) and their scores ``[K]`` (sigmoid, in [0, 1]),
        highest first; the NMS within each FPN level still runs image by image. Images of different sizes go through
        torchvision's code.
        """
        if any(shape != image_shapes[0] for shape in image_shapes):
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        images, device = proposals.shape[0], proposals.device
        objectness = objectness.detach().reshape(images, -1)
        levels = torch.cat(
            [torch.full((n,), level, dtype=torch.int64, device=device) for level, n in enumerate(num_anchors_per_level)]
        )
        top_n = self._get_top_n_idx(objectness, num_anchors_per_level)
        rows = torch.arange(images, device=device)[:, None]
        scores = torch.sigmoid(objectness[rows, top_n])
        levels = levels[top_n]
        boxes = box_ops.clip_boxes_to_image(proposals[rows, top_n], image_shapes[0])
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        keep = (widths >= self.min_size) & (heights >= self.min_size) & (scores >= self.score_thresh)
        # The one wait for the GPU besides the NMS calls: how many proposals of each level each
        # image keeps (top_n holds each level's best, level after level).
        per_level = [min(self.pre_nms_top_n(), count) for count in num_anchors_per_level]
        level_counts = torch.stack([part.sum(dim=1) for part in keep.split(per_level, dim=1)], dim=1).tolist()
        counts = [sum(row) for row in level_counts]
        # The kept positions in order without another wait (a boolean index would wait for each
        # tensor it selects from): a stable sort puts the kept ones first, and their number is known.
        kept_positions = torch.argsort(keep.flatten().logical_not().to(torch.int8), stable=True)[: sum(counts)]
        boxes, scores, levels = (
            boxes.flatten(0, 1)[kept_positions],
            scores.flatten()[kept_positions],
            levels.flatten()[kept_positions],
        )
        per_image = zip(boxes.split(counts), scores.split(counts), levels.split(counts), level_counts, strict=True)
        final_boxes, final_scores = [], []
        for image_boxes, image_scores, image_levels, image_level_counts in per_image:
            kept = nms_within_levels(image_boxes, image_scores, image_levels, image_level_counts, self.nms_thresh)[
                : self.post_nms_top_n()
            ]
            final_boxes.append(image_boxes[kept])
            final_scores.append(image_scores[kept])
        return final_boxes, final_scores


# Why detection scores are computed in float32: under bf16 autocast torchvision's softmax or
# sigmoid gives confidences with 8 significant bits (steps of 1/256 near 1), and the RSNA metric,
# which ranks an image's boxes by confidence, then breaks the ties by position.


class BatchedRoIHeads(RoIHeads):
    """Box heads whose training proposals are matched and sampled for the whole batch at once, and whose scores are float32."""

    def postprocess_detections(
        self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """torchvision's ``postprocess_detections`` on float32 inputs: boxes and scores stay float32 under autocast.

        ``class_logits`` ``[N, classes]`` and ``box_regression`` ``[N, 4 * classes]`` for the proposals of all images;
        returns per image boxes XYXY ``[D, 4]`` (model-input pixels), softmax scores ``[D]`` in [0, 1] and labels
        ``[D]``.
        """
        return super().postprocess_detections(class_logits.float(), box_regression.float(), proposals, image_shapes)

    def select_training_samples(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """torchvision's ``select_training_samples``, with proposals matched and sampled for the whole batch at once.

        ``proposals`` are per image XYXY ``[P_i, 4]``, to which the ground-truth boxes are added as torchvision does;
        ``targets`` are required (ValueError without). Returns, per image, for its sampled proposals: the proposals
        ``[S_i, 4]``, their matched ground-truth index ``[S_i]``, int64 labels ``[S_i]`` (0 = background) and regression
        targets ``[S_i, 4]``. The sample comes from :func:`balanced_sample`: torchvision's distribution, other draws.
        """
        self.check_targets(targets)
        if targets is None:
            raise ValueError("targets should not be None")
        dtype = proposals[0].dtype
        gt_boxes = [target["boxes"].to(dtype) for target in targets]
        gt_box_batch, gt_valid = pad_boxes(gt_boxes, min_length=1)
        gt_labels = pad_labels(targets, gt_box_batch.shape[1])
        candidates, candidate_valid = pad_boxes(self.add_gt_proposals(proposals, gt_boxes))

        matches = batched_match(batched_box_iou(gt_box_batch, candidates), gt_valid, self.proposal_matcher)
        matched_idxs = matches.clamp(min=0)
        labels = gt_labels.gather(1, matched_idxs).to(torch.int64)
        labels = labels.masked_fill(matches == self.proposal_matcher.BELOW_LOW_THRESHOLD, 0)
        labels = labels.masked_fill(matches == self.proposal_matcher.BETWEEN_THRESHOLDS, -1)
        labels = labels.masked_fill(~candidate_valid, -2)  # padding: neither positive nor negative, never sampled

        sampler = self.fg_bg_sampler
        positive_index, positive_valid, negative_index, negative_valid = balanced_sample(
            labels, sampler.batch_size_per_image, sampler.positive_fraction
        )
        sampled = sampled_mask(labels.shape, (positive_index, positive_valid), (negative_index, negative_valid))
        # The one wait for the GPU: each image's sample count, to hand torchvision its per-image lists.
        counts = sampled.sum(dim=1).tolist()
        matched_gt_boxes = gt_box_batch.gather(1, matched_idxs[:, :, None].expand(-1, -1, 4))[sampled]
        sampled_proposals = candidates[sampled]
        regression_targets = self.box_coder.encode_single(matched_gt_boxes, sampled_proposals)
        return (
            list(sampled_proposals.split(counts)),
            list(matched_idxs[sampled].split(counts)),
            list(labels[sampled].split(counts)),
            list(regression_targets.split(counts)),
        )


class BatchedRetinaNetLoss(RetinaNet):
    """RetinaNet's anchor matching and losses for the whole batch at once (mixed into our RetinaNet in detection/model.py).

    torchvision matches and scores each image in turn, with boolean indexing that waits for the
    GPU each time; here every anchor of every image is scored and the ones torchvision leaves out
    (ignored anchors for the classification, non-foreground ones for the regression) are masked
    out of the sums. Same losses: each image's sums over its foreground count (at least 1),
    averaged over the images. Box losses other than torchvision's default l1 and smooth_l1 go
    through torchvision's code. Its detection scores are float32 under autocast too.
    """

    def postprocess_detections(
        self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """torchvision's ``postprocess_detections`` on float32 head outputs: float32 boxes and scores under autocast.

        ``head_outputs`` holds ``cls_logits`` and ``bbox_regression`` split by FPN level, ``anchors`` each image's split
        likewise. Returns one dict per image: ``boxes`` XYXY ``[D, 4]`` (model-input pixels), ``scores`` ``[D]`` in
        [0, 1] and ``labels`` ``[D]``.
        """
        # float32 scores, as the box heads' (see above BatchedRoIHeads).
        as_float32 = {name: [level.float() for level in levels] for name, levels in head_outputs.items()}
        return super().postprocess_detections(as_float32, anchors, image_shapes)

    def compute_loss(
        self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor]
    ) -> dict[str, Tensor]:
        """torchvision's RetinaNet losses (``classification``, ``bbox_regression``) for the whole batch at once.

        ``head_outputs`` holds ``cls_logits`` ``[B, A, classes]`` and ``bbox_regression`` ``[B, A, 4]``; ``anchors`` are
        per image XYXY ``[A, 4]``. Sigmoid focal loss over every anchor not between the thresholds, and l1 or smooth l1
        (beta 1) over the foreground ones; each image's sums are divided by its foreground count (at least 1), then
        averaged over the images. Other box losses (ciou, diou, giou) go through torchvision's code.
        """
        loss_type = self.head.regression_head._loss_type
        if loss_type not in ("l1", "smooth_l1"):
            return super().compute_loss(targets, head_outputs, anchors)
        batch_anchors = anchor_batch(anchors)
        gt_boxes, gt_valid = pad_boxes([target["boxes"] for target in targets], min_length=1)
        matches = batched_match(batched_box_iou(gt_boxes, batch_anchors), gt_valid, self.proposal_matcher)
        foreground = matches >= 0
        images = len(targets)
        per_image_foreground = foreground.sum(dim=1).clamp(min=1)  # torchvision's max(1, num_foreground)
        matched = matches.clamp(min=0)

        cls_logits = head_outputs["cls_logits"]
        gt_labels = pad_labels(targets, gt_boxes.shape[1])
        classes = F.one_hot(gt_labels.gather(1, matched), cls_logits.shape[-1]).to(cls_logits.dtype)
        classes = classes * foreground[:, :, None]
        focal = sigmoid_focal_loss(cls_logits, classes, reduction="none")
        scored = (matches != self.head.classification_head.BETWEEN_THRESHOLDS)[:, :, None]
        classification = (torch.where(scored, focal, 0.0).sum(dim=(1, 2)) / per_image_foreground).sum() / images

        regression = head_outputs["bbox_regression"]
        matched_boxes = gt_boxes.gather(1, matched[:, :, None].expand(-1, -1, 4))
        encoded = self.head.regression_head.box_coder.encode_single(
            matched_boxes.reshape(-1, 4), batch_anchors.expand(images, -1, -1).reshape(-1, 4)
        )
        # Anchors matched to nothing encode against a dummy box (infinite); zero them before the loss.
        encoded = torch.where(foreground[:, :, None], encoded.reshape(images, -1, 4), 0.0)
        if loss_type == "l1":
            box_loss = F.l1_loss(regression, encoded, reduction="none")
        else:
            box_loss = F.smooth_l1_loss(regression, encoded, reduction="none", beta=1.0)
        box_regression = (
            torch.where(foreground[:, :, None], box_loss, 0.0).sum(dim=(1, 2)) / per_image_foreground
        ).sum() / max(1, images)
        return {"classification": classification, "bbox_regression": box_regression}


def use_batched_heads(model: nn.Module) -> nn.Module:
    """Switch ``model``'s transform, anchors, RPN and box heads (where it has them) to the batched classes, in place.

    The RoI pooling of the box and mask heads becomes :class:`SparseMultiScaleRoIAlign`, which
    pools every box of the batch in one sparse product on a CPU.

    Its box coders and anchors also move to float32 coordinates (:class:`Float32BoxCoder`), which
    changes nothing in float32 and keeps boxes exact under autocast.

    torchvision's detector constructors build these parts themselves; the batched classes only
    override methods and add no state, so changing an instance's class keeps every weight and
    setting. Parts already switched, or of other classes, are left alone. (RetinaNet's batched
    loss is a class of its own, :class:`BatchedRetinaNetLoss`, chosen when the model is built.)
    """
    for module in model.modules():
        batched = _BATCHED_CLASSES.get(type(module))
        if batched is not None:
            module.__class__ = batched
        if type(getattr(module, "box_coder", None)) is BoxCoder:
            module.box_coder.__class__ = Float32BoxCoder
    return model


# torchvision's class -> ours; exact types only, so subclasses with their own behaviour are left alone.
_BATCHED_CLASSES: dict[type, type] = {
    GeneralizedRCNNTransform: BatchedTransform,
    AnchorGenerator: SharedAnchorGenerator,  # the RPN's or RetinaNet's
    RegionProposalNetwork: BatchedRegionProposalNetwork,
    RoIHeads: BatchedRoIHeads,
    MultiScaleRoIAlign: SparseMultiScaleRoIAlign,  # the box and mask heads' RoI pooling, on a CPU
}
