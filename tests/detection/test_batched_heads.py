"""Tests for detection/batched_heads.py: every batched part against torchvision's own per-image method on the same inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou
from torchvision.ops import boxes as box_ops

from lungdet.detection.batched_heads import (
    BatchedRegionProposalNetwork,
    BatchedRoIHeads,
    BatchedTransform,
    Float32BoxCoder,
    SharedAnchorGenerator,
    balanced_sample,
    batched_box_iou,
    batched_match,
    nms_within_levels,
    pad_boxes,
    sampled_mask,
    use_batched_heads,
)
from lungdet.detection.config import load_config
from lungdet.detection.masks import box_masks
from lungdet.detection.model import build_model
from lungdet.detection.sparse_roi_align import SparseMultiScaleRoIAlign

SIZE = 128
# Boxes per image, positives and negatives mixed, including an image with none (RSNA's 77% negatives).
GT_BOXES = [
    [[10.0, 20.0, 50.0, 90.0], [70.0, 15.0, 110.0, 100.0]],
    [],
    [[30.0, 30.0, 31.0, 95.0]],  # a thin box: only low-quality anchor matches
    [[0.0, 0.0, 128.0, 128.0], [60.0, 60.0, 90.0, 90.0], [5.0, 70.0, 40.0, 120.0]],
]


def targets(device: str = "cpu", *, masks: bool = False) -> list[dict[str, torch.Tensor]]:
    result = []
    for boxes in GT_BOXES:
        tensor = torch.tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4)
        target = {"boxes": tensor, "labels": torch.ones(len(boxes), dtype=torch.int64, device=device)}
        if masks:
            target["masks"] = box_masks(tensor, height=SIZE, width=SIZE, shape="ellipse")
        result.append(target)
    return result


def model_for(architecture: str, *overrides: str) -> torch.nn.Module:
    config = load_config(
        "fasterrcnn_mobilenet_cpu",
        [
            f"model.architecture={architecture}",
            "model.pretrained=none",
            f"model.image_size={SIZE}",
            "model.batched_heads=false",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    return build_model(config.model)


@pytest.fixture(scope="module")
def untouched_model() -> torch.nn.Module:
    # Every anchor and every proposal sampled, so the losses do not depend on the random draw.
    return model_for(
        "fasterrcnn_mobilenet_v3_large_fpn",
        "model.rpn_batch_size_per_image=1000000",
        "model.box_batch_size_per_image=1000000",
    )


@pytest.fixture
def stock_model(untouched_model: torch.nn.Module) -> torch.nn.Module:
    """A copy for each test: a forward pass in training mode moves the batch-norm statistics."""
    return copy.deepcopy(untouched_model)


@pytest.fixture
def batched_model(untouched_model: torch.nn.Module) -> torch.nn.Module:
    return use_batched_heads(copy.deepcopy(untouched_model))


def random_images(count: int = len(GT_BOXES), size: int = SIZE) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(3, size, size, generator=generator) for _ in range(count)]


# --- the building blocks ---------------------------------------------------------------------


def test_pad_boxes_pads_with_zeros_and_marks_real_rows() -> None:
    boxes = [
        torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
        torch.zeros((0, 4)),
        torch.tensor([[5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 10.0, 10.0]]),
    ]
    padded, valid = pad_boxes(boxes)
    assert padded.shape == (3, 2, 4)
    assert padded[0].tolist() == [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]
    assert padded[2].tolist() == [[5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 10.0, 10.0]]
    assert valid.tolist() == [[True, False], [False, False], [True, True]]
    # All images empty: still one (invalid) row when asked, so gathers have something to read.
    padded, valid = pad_boxes([torch.zeros((0, 4))] * 2, min_length=1)
    assert padded.shape == (2, 1, 4) and valid.tolist() == [[False], [False]]


def test_batched_box_iou_equals_torchvision_box_iou_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(3, 7, 2, generator=generator) * 100
    boxes1 = torch.cat([corners, corners + torch.rand(3, 7, 2, generator=generator) * 50], dim=2)
    corners = torch.rand(3, 11, 2, generator=generator) * 100
    boxes2 = torch.cat([corners, corners + torch.rand(3, 11, 2, generator=generator) * 50], dim=2)
    result = batched_box_iou(boxes1, boxes2)
    for image in range(3):
        assert torch.equal(result[image], box_iou(boxes1[image], boxes2[image]))
    # Shared second boxes (the anchors) broadcast over the images.
    assert torch.equal(batched_box_iou(boxes1, boxes2[:1])[2], box_iou(boxes1[2], boxes2[0]))


@pytest.mark.parametrize(
    "matcher", [Matcher(0.7, 0.3, allow_low_quality_matches=True), Matcher(0.5, 0.5)], ids=["rpn", "roi"]
)
def test_batched_match_equals_torchvision_matcher_per_image(matcher: Matcher) -> None:
    anchors = AnchorGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),))
    grid = anchors.grid_anchors([[8, 8]], [[torch.tensor(16), torch.tensor(16)]])[0]
    gt, valid = pad_boxes([t["boxes"] for t in targets()], min_length=1)
    matches = batched_match(batched_box_iou(gt, grid[None]), valid, matcher)
    for image, target in enumerate(targets()):
        if len(target["boxes"]) == 0:
            expected = torch.full(
                (len(grid),), matcher.BELOW_LOW_THRESHOLD
            )  # how the RPN and box heads treat an empty image
        else:
            expected = matcher(box_iou(target["boxes"], grid))
        assert torch.equal(matches[image], expected), image
    assert (matches >= 0).any() and (matches == matcher.BELOW_LOW_THRESHOLD).any()


def test_balanced_sample_draws_torchvision_counts_without_repeats() -> None:
    torch.manual_seed(0)
    # Image 0: plenty of both; image 1: 3 positives, few negatives; image 2: no positives; ignored (-1) and padding (-2) never drawn.
    labels = torch.tensor(
        [
            [1] * 40 + [0] * 50 + [-1] * 10,
            [1] * 3 + [0] * 5 + [-1] * 80 + [-2] * 12,
            [0] * 100,
        ]
    )
    pos_index, pos_valid, neg_index, neg_valid = balanced_sample(
        labels, batch_size_per_image=32, positive_fraction=0.25
    )
    assert pos_valid.sum(1).tolist() == [8, 3, 0]
    assert neg_valid.sum(1).tolist() == [24, 5, 32]
    for image in range(3):
        positives = pos_index[image][pos_valid[image]]
        negatives = neg_index[image][neg_valid[image]]
        assert (labels[image, positives] == 1).all() and (labels[image, negatives] == 0).all()
        assert len(set(positives.tolist())) == len(positives) and len(set(negatives.tolist())) == len(negatives)
    mask = sampled_mask(labels.shape, (pos_index, pos_valid), (neg_index, neg_valid))
    assert mask.sum(1).tolist() == [32, 8, 32]
    assert not mask[1, 8:].any()  # only image 1's eight candidates, never its ignored or padding slots


def test_balanced_sample_is_uniform_over_the_candidates() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([[1] * 10 + [0] * 10])
    hits = torch.zeros(20)
    draws = 2000
    for _ in range(draws):
        pos_index, pos_valid, neg_index, neg_valid = balanced_sample(
            labels, batch_size_per_image=8, positive_fraction=0.25
        )
        hits += sampled_mask(labels.shape, (pos_index, pos_valid), (neg_index, neg_valid))[0].float()
    # 2 of 10 positives and 6 of 10 negatives each time: 0.2 and 0.6 per candidate (3 sd is about 0.03).
    assert torch.allclose(hits[:10] / draws, torch.full((10,), 0.2), atol=0.04)
    assert torch.allclose(hits[10:] / draws, torch.full((10,), 0.6), atol=0.04)


def test_sampled_mask_ignores_invalid_slots_pointing_at_sampled_candidates() -> None:
    index = torch.tensor([[0, 1]])
    mask = sampled_mask(
        torch.Size([1, 3]),
        (index, torch.tensor([[True, False]])),
        (torch.tensor([[0, 2]]), torch.tensor([[False, True]])),
    )
    assert mask.tolist() == [[True, False, True]]


# --- the detector parts, against torchvision's methods on the same instance -----------------------


def boxes_in_level_runs(level_counts: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random overlapping boxes, level after level in runs of ``level_counts``, with distinct scores (no ties to order)."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(level_counts)
    corners = torch.rand(total, 2, generator=generator) * 200
    boxes = torch.cat([corners, corners + 8 + torch.rand(total, 2, generator=generator) * 60], dim=1)
    scores = torch.randperm(total, generator=generator).float() / total
    levels = torch.cat([torch.full((count,), level) for level, count in enumerate(level_counts)])
    return boxes, scores, levels


@pytest.mark.parametrize(
    "level_counts", [[300, 0, 200, 50], [900, 700, 0, 600, 12]]
)  # torchvision's one-call path, then its per-level one
def test_nms_within_levels_equals_torchvision_batched_nms(level_counts: list[int]) -> None:
    boxes, scores, levels = boxes_in_level_runs(level_counts)
    kept = nms_within_levels(boxes, scores, levels, level_counts, 0.5)
    expected = box_ops.batched_nms(boxes, scores, levels, 0.5)
    assert torch.equal(kept, expected)
    assert 0 < len(kept) < len(boxes)  # NMS did suppress, and kept some of every non-empty level
    assert set(levels[kept].tolist()) == {level for level, count in enumerate(level_counts) if count}


def test_nms_within_levels_waits_only_in_the_nms_calls() -> None:
    level_counts = [900, 700, 0, 600, 12]
    boxes, scores, levels = boxes_in_level_runs(level_counts)
    calls: dict[str, int] = {}
    for function in (nms_within_levels, lambda b, s, lv, _counts, t: box_ops.batched_nms(b, s, lv, t)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            function(boxes, scores, levels, level_counts, 0.5)
        names = [event.name for event in profile.events()]
        calls[function.__name__] = (
            names.count("torchvision::nms"),
            names.count("aten::nonzero") + names.count("aten::_unique2"),
        )
    # One NMS per non-empty level both ways; torchvision also finds each level with where() and unique().
    assert calls["nms_within_levels"] == (4, 0)
    assert calls["<lambda>"][0] == 4 and calls["<lambda>"][1] >= 5


def test_shared_anchors_equal_torchvision_anchors(stock_model: torch.nn.Module, batched_model: torch.nn.Module) -> None:
    images = torch.rand(4, 3, SIZE, SIZE)
    image_list = ImageList(images, [(SIZE, SIZE)] * 4)
    features = list(stock_model.backbone(images).values())
    expected = stock_model.rpn.anchor_generator(image_list, features)
    shared = batched_model.rpn.anchor_generator(image_list, features)
    assert len(shared) == 4 and all(torch.equal(a, b) for a, b in zip(shared, expected, strict=True))
    assert batched_model.rpn.anchor_generator(image_list, features)[0] is shared[0]  # computed once


def test_transform_equals_torchvision_for_images_at_model_size(
    stock_model: torch.nn.Module, batched_model: torch.nn.Module
) -> None:
    for training in (True, False):
        stock_model.transform.train(training)
        batched_model.transform.train(training)
        expected_list, expected_targets = stock_model.transform(random_images(), targets(masks=True))
        image_list, batched_targets = batched_model.transform(random_images(), targets(masks=True))
        assert torch.equal(image_list.tensors, expected_list.tensors)
        assert image_list.image_sizes == expected_list.image_sizes
        for got, expected in zip(batched_targets, expected_targets, strict=True):
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[key], expected[key]) and got[key].dtype == expected[key].dtype for key in got)


def test_transform_pads_to_the_size_divisor_like_torchvision() -> None:
    stock = GeneralizedRCNNTransform(100, 100, [0.5] * 3, [0.25] * 3)
    batched = copy.deepcopy(stock)
    batched.__class__ = BatchedTransform
    images = random_images(2, size=100)
    expected, _ = stock(images)
    got, _ = batched(images)
    assert got.tensors.shape == (2, 3, 128, 128) and torch.equal(got.tensors, expected.tensors)


def test_transform_falls_back_to_torchvision_when_it_must_resize(batched_model: torch.nn.Module) -> None:
    images = [torch.rand(3, 100, 80), torch.rand(3, 64, 64)]
    image_list, _ = batched_model.transform(images)
    expected, _ = GeneralizedRCNNTransform.forward(batched_model.transform, images)
    assert torch.equal(image_list.tensors, expected.tensors) and image_list.image_sizes == expected.image_sizes


def rpn_inputs(model: torch.nn.Module) -> tuple:
    """The RPN's inputs for the fixed images: the image list and feature maps."""
    model.eval()
    image_list, _ = model.transform(random_images())
    features = model.backbone(image_list.tensors)
    return image_list, features


def test_rpn_anchor_targets_equal_torchvision(batched_model: torch.nn.Module) -> None:
    rpn = batched_model.rpn
    image_list, features = rpn_inputs(batched_model)
    anchors = rpn.anchor_generator(image_list, list(features.values()))
    labels, matched = rpn.assign_targets_to_anchors(anchors, targets())
    expected_labels, expected_matched = RegionProposalNetwork.assign_targets_to_anchors(rpn, anchors, targets())
    for got, expected in zip(labels, expected_labels, strict=True):
        assert torch.equal(got, expected) and got.dtype == expected.dtype
    for got, expected in zip(matched, expected_matched, strict=True):
        assert torch.equal(got, expected) and got.dtype == expected.dtype
    assert {-1.0, 0.0, 1.0} <= set(torch.cat(labels).unique().tolist())


@pytest.mark.parametrize(
    "overrides",
    [
        (
            "model.architecture=fasterrcnn_mobilenet_v3_large_fpn",
        ),  # ~340 candidates per image: torchvision's one-NMS path
        (
            "model.architecture=fasterrcnn_resnet50_fpn",
            "model.rpn_pre_nms_top_n_test=2000",
            "model.rpn_post_nms_top_n_test=2000",
        ),  # ~1,800 in 5 levels: its NMS per level
    ],
)
def test_rpn_proposals_equal_torchvision(overrides: tuple[str, ...]) -> None:
    batched_model = use_batched_heads(model_for("fasterrcnn_mobilenet_v3_large_fpn", *overrides))
    rpn = batched_model.rpn
    image_list, features = rpn_inputs(batched_model)
    feature_list = list(features.values())
    objectness, deltas = rpn.head(feature_list)
    anchors = rpn.anchor_generator(image_list, feature_list)
    per_level = [o[0].numel() for o in objectness]
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    boxes, scores = rpn.filter_proposals(proposals, objectness, image_list.image_sizes, per_level)
    expected_boxes, expected_scores = RegionProposalNetwork.filter_proposals(
        rpn, proposals, objectness, image_list.image_sizes, per_level
    )
    assert [len(b) for b in boxes] == [len(b) for b in expected_boxes] and all(len(b) for b in boxes)
    assert all(torch.equal(a, b) for a, b in zip(boxes, expected_boxes, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(scores, expected_scores, strict=True))


def test_rpn_losses_equal_torchvision_when_every_anchor_is_sampled(batched_model: torch.nn.Module) -> None:
    rpn = batched_model.rpn
    image_list, features = rpn_inputs(batched_model)
    rpn.train()
    _, losses = rpn(image_list, features, targets())
    rpn.__class__ = RegionProposalNetwork
    try:
        _, expected = rpn(image_list, features, targets())
    finally:
        rpn.__class__ = BatchedRegionProposalNetwork
    assert losses.keys() == expected.keys() == {"loss_objectness", "loss_rpn_box_reg"}
    for key in expected:
        assert torch.allclose(losses[key], expected[key], rtol=1e-5), key
        assert losses[key] > 0


def test_rpn_loss_is_finite_when_few_anchors_are_sampled(batched_model: torch.nn.Module) -> None:
    # The dummy target of an image without boxes encodes to infinity; unsampled slots must not leak it.
    rpn = batched_model.rpn
    rpn.fg_bg_sampler.batch_size_per_image = 8
    image_list, features = rpn_inputs(batched_model)
    rpn.train()
    _, losses = rpn(
        image_list, features, [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}] * 4
    )
    assert torch.isfinite(losses["loss_objectness"]) and losses["loss_rpn_box_reg"] == 0


def test_box_head_training_samples_equal_torchvision_when_every_proposal_is_sampled(
    batched_model: torch.nn.Module,
) -> None:
    heads = batched_model.roi_heads
    generator = torch.Generator().manual_seed(3)
    proposals = []
    for count in (30, 25, 0, 40):  # different counts per image, one image without proposals
        corners = torch.rand(count, 2, generator=generator) * 100
        proposals.append(torch.cat([corners, corners + 5 + torch.rand(count, 2, generator=generator) * 40], dim=1))
    got = heads.select_training_samples(proposals, targets())
    expected = RoIHeads.select_training_samples(heads, proposals, targets())
    for got_part, expected_part in zip(got, expected, strict=True):
        for a, b in zip(got_part, expected_part, strict=True):
            assert torch.equal(a, b) and a.dtype == b.dtype
    assert (torch.cat(got[2]) == 1).any() and (torch.cat(got[2]) == 0).any()


def test_box_head_sampling_draws_torchvision_counts(batched_model: torch.nn.Module) -> None:
    heads = batched_model.roi_heads
    heads.fg_bg_sampler.batch_size_per_image = 16  # 4 positives at most
    proposals = [
        t["boxes"].repeat(10, 1) if len(t["boxes"]) else torch.tensor([[1.0, 1.0, 20.0, 20.0]]).repeat(30, 1)
        for t in targets()
    ]
    proposals = [torch.cat([p, torch.tensor([[100.0, 0.0, 120.0, 10.0]]).repeat(20, 1)]) for p in proposals]
    _, _, labels, _ = heads.select_training_samples(proposals, targets())
    positives = [int((image_labels > 0).sum()) for image_labels in labels]
    assert positives == [4, 0, 4, 4] and [len(image_labels) for image_labels in labels] == [16, 16, 16, 16]


# --- the whole detector --------------------------------------------------------------------------


def test_detections_equal_torchvision(stock_model: torch.nn.Module, batched_model: torch.nn.Module) -> None:
    stock_model.eval()
    batched_model.eval()
    with torch.no_grad():
        expected = stock_model(random_images())
        got = batched_model(random_images())
    assert sum(len(d["boxes"]) for d in got) > 0
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("architecture", ["fasterrcnn_mobilenet_v3_large_fpn", "maskrcnn_resnet50_fpn"])
def test_training_losses_equal_torchvision_when_everything_is_sampled(architecture: str) -> None:
    stock = model_for(
        architecture, "model.rpn_batch_size_per_image=1000000", "model.box_batch_size_per_image=1000000"
    ).train()
    batched = use_batched_heads(copy.deepcopy(stock))
    masks = architecture.startswith("mask")
    expected = stock(random_images(), targets(masks=masks))
    got = batched(random_images(), targets(masks=masks))
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.allclose(got[key], expected[key], rtol=1e-4), (key, got[key], expected[key])
    sum(got.values()).backward()  # and gradients flow through the gathers
    assert batched.rpn.head.cls_logits.weight.grad.abs().sum() > 0


def test_batched_heads_config_switches_classes_and_keeps_the_state_dict() -> None:
    stock = model_for("fasterrcnn_mobilenet_v3_large_fpn")
    batched = model_for("fasterrcnn_mobilenet_v3_large_fpn", "model.batched_heads=true")
    assert type(batched.rpn) is BatchedRegionProposalNetwork and type(batched.roi_heads) is BatchedRoIHeads
    assert type(batched.transform) is BatchedTransform and type(batched.rpn.anchor_generator) is SharedAnchorGenerator
    assert type(stock.rpn) is RegionProposalNetwork
    assert stock.state_dict().keys() == batched.state_dict().keys()
    assert type(batched.roi_heads.box_roi_pool) is SparseMultiScaleRoIAlign
    mask_rcnn = model_for("maskrcnn_resnet50_fpn", "model.batched_heads=true")
    assert type(mask_rcnn.roi_heads.mask_roi_pool) is SparseMultiScaleRoIAlign
    retinanet = model_for("retinanet_resnet50_fpn", "model.batched_heads=true")
    assert type(retinanet.transform) is BatchedTransform and type(retinanet.anchor_generator) is SharedAnchorGenerator


@pytest.mark.parametrize("loss_type", ["l1", "smooth_l1", "giou"])
def test_retinanet_losses_equal_torchvision(loss_type: str) -> None:
    stock = model_for("retinanet_resnet50_fpn").train()
    batched = model_for("retinanet_resnet50_fpn", "model.batched_heads=true").train()
    assert type(batched).__name__ == "BatchedForegroundRetinaNet" and type(stock).__name__ == "ForegroundRetinaNet"
    batched.load_state_dict(stock.state_dict())
    for model in (stock, batched):
        model.head.regression_head._loss_type = loss_type  # giou has no batched form: torchvision's code runs
        # Scores of 0.5 rather than the 0.01 prior, so that wrongly counting an ignored anchor shows in the loss.
        torch.nn.init.zeros_(model.head.classification_head.cls_logits.bias)
    expected = stock(random_images(), targets())
    got = batched(random_images(), targets())
    assert got.keys() == expected.keys() == {"classification", "bbox_regression"}
    for key in got:
        assert torch.allclose(got[key], expected[key], rtol=1e-5), (key, got[key], expected[key])
        assert got[key] > 0
    sum(got.values()).backward()
    assert batched.head.regression_head.bbox_reg.weight.grad.abs().sum() > 0


def test_retinanet_scores_stay_float32_under_bf16_autocast() -> None:
    model = model_for("retinanet_resnet50_fpn", "model.batched_heads=true").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model(random_images(2))
    scores = torch.cat([d["scores"] for d in detections])
    assert scores.dtype == torch.float32 and len(scores)
    assert bool((scores != scores.to(torch.bfloat16).float()).any())


def test_retinanet_loss_of_a_batch_without_boxes_is_finite() -> None:
    model = model_for("retinanet_resnet50_fpn", "model.batched_heads=true").train()
    empty = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = model(random_images(2), empty)
    assert torch.isfinite(losses["classification"]) and losses["classification"] > 0
    assert losses["bbox_regression"] == 0


def test_box_coordinates_stay_float32_under_bf16_autocast(untouched_model: torch.nn.Module) -> None:
    stock = copy.deepcopy(untouched_model).eval()
    batched = use_batched_heads(copy.deepcopy(untouched_model)).eval()
    assert type(batched.rpn.box_coder) is Float32BoxCoder and type(batched.roi_heads.box_coder) is Float32BoxCoder
    seen: dict[str, torch.dtype] = {}

    def record(model: torch.nn.Module, name: str) -> None:
        original = model.rpn.filter_proposals

        def filter_proposals(proposals: torch.Tensor, *args: object) -> object:
            seen[name] = proposals.dtype
            return original(proposals, *args)

        model.rpn.filter_proposals = filter_proposals

    record(stock, "stock")
    record(batched, "batched")
    images = random_images(2, size=SIZE)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        stock_detections, batched_detections = stock(images), batched(images)
    stock_boxes = torch.cat([d["boxes"] for d in stock_detections])
    batched_boxes = torch.cat([d["boxes"] for d in batched_detections])
    # Scores too: torchvision's come out in bf16, ours in float32 with more than bf16's 8 bits.
    stock_scores, batched_scores = (
        torch.cat([d["scores"] for d in detections]) for detections in (stock_detections, batched_detections)
    )
    assert stock_scores.dtype == torch.bfloat16 and batched_scores.dtype == torch.float32
    assert bool((batched_scores != batched_scores.to(torch.bfloat16).float()).any())
    # torchvision rounds proposals and detections to bf16 (8 significant bits: a 1-pixel grid
    # above 64 px here); ours keep float32 corners, off that grid.
    assert seen == {"stock": torch.bfloat16, "batched": torch.float32}
    assert stock_boxes.dtype == torch.bfloat16 and batched_boxes.dtype == torch.float32
    assert len(batched_boxes) and bool((batched_boxes != batched_boxes.round()).any())
    image_list, _ = batched.transform(images)
    features = [torch.zeros(2, 8, 4, 4, dtype=torch.bfloat16)]
    assert SharedAnchorGenerator(((32,),), ((1.0,),))(image_list, features)[0].dtype == torch.float32
