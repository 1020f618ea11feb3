"""Tests for detection/sparse_roi_align.py: the sparse product against torchvision's MultiScaleRoIAlign, values and gradients."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

import lungdet.detection.sparse_roi_align as sparse_module
from lungdet.detection.sparse_roi_align import SparseMultiScaleRoIAlign, roi_align_matrix

IMAGE = 512  # the smallest input whose boxes reach level 3 (sqrt(area) >= 448 px)
NAMES = ["0", "1", "2", "3"]  # strides 4, 8, 16, 32, as in a ResNet-50 FPN


def feature_maps(images: int = 3, channels: int = 8, *, channels_last: bool = False) -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    maps = OrderedDict()
    for level, name in enumerate(NAMES):
        size = IMAGE // 4 >> level
        feature = torch.randn(images, channels, size, size, generator=generator)
        maps[name] = feature.contiguous(memory_format=torch.channels_last) if channels_last else feature
    maps["pool"] = torch.randn(images, channels, 2, 2, generator=generator)  # an FPN's extra level, not pooled from
    return maps


def awkward_boxes() -> list[torch.Tensor]:
    """Boxes for every level and every border case, in 3 images (the middle one with none)."""
    generator = torch.Generator().manual_seed(1)
    corners = torch.rand(40, 2, generator=generator) * 400
    sizes = torch.rand(40, 2, generator=generator) ** 2 * 500 + 1  # 1..501 px: small boxes (level 0) to large (level 3)
    random_boxes = torch.cat([corners, corners + sizes], dim=1)
    special = torch.tensor(
        [
            [0.0, 0.0, 512.0, 512.0],  # the whole image: level 3
            [500.0, 100.0, 512.0, 512.0],  # on the far border: points on the last pixel
            [-30.0, -30.0, -10.0, -5.0],  # wholly outside: points more than a pixel out weigh nothing
            [-3.0, 10.0, 20.0, 40.0],  # partly outside: points just out are moved onto the border
            [40.0, 40.0, 40.5, 40.2],  # smaller than a feature pixel: stretched to one
            [100.0, 50.0, 100.0, 50.0],  # empty
        ]
    )
    return [torch.cat([special, random_boxes[:10]]), torch.zeros(0, 4), random_boxes[10:]]


def pool_both(output_size, maps, boxes, sampling_ratio: int = 2) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """torchvision's and our result for the same maps and boxes, and each one's gradients for the same output gradient."""
    results, gradients = [], []
    for pooler_class in (MultiScaleRoIAlign, SparseMultiScaleRoIAlign):
        pooler = pooler_class([name for name in maps if name != "pool"], output_size, sampling_ratio)
        inputs = OrderedDict((name, feature.detach().clone().requires_grad_()) for name, feature in maps.items())
        result = pooler(inputs, boxes, [(IMAGE, IMAGE)] * len(boxes))
        result.backward(torch.linspace(-1, 1, result.numel()).view_as(result))
        results.append(result)
        gradients.append([inputs[name].grad for name in maps if name != "pool"])
    return results[0], results[1], gradients[0], gradients[1]


def test_sparse_roi_align_equals_torchvision_on_every_level_and_border_case() -> None:
    boxes = awkward_boxes()
    levels = MultiScaleRoIAlign(NAMES, 7, 2)
    levels(feature_maps(), boxes, [(IMAGE, IMAGE)] * 3)  # sets its level mapper up
    assert set(levels.map_levels(boxes).tolist()) == {0, 1, 2, 3}, "the boxes must exercise every level"

    expected, got, expected_grads, got_grads = pool_both((7, 5), feature_maps(), boxes)
    assert got.shape == expected.shape == (sum(len(b) for b in boxes), 8, 7, 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert got[2].abs().sum() == 0  # the wholly outside box
    for got_grad, expected_grad in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-5)
        assert expected_grad.abs().sum() > 0


def test_sparse_roi_align_equals_torchvision_with_one_level() -> None:
    maps = OrderedDict(list(feature_maps().items())[:1])
    expected, got, expected_grads, got_grads = pool_both(14, maps, awkward_boxes())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # Gradients here sum over many overlapping 14 x 14 bins (values up to ~40), in another order than
    # torchvision's: float32 rounding then scales with the value, so the bound is relative too (a
    # Xeon measured 8.8e-5 absolute, 2.2e-6 relative, on 50 of 393,216 elements).
    torch.testing.assert_close(got_grads[0], expected_grads[0], rtol=1e-5, atol=1e-5)


def test_channels_last_maps_give_the_same_result_and_gradient_layout() -> None:
    pooler = SparseMultiScaleRoIAlign(NAMES, 7, 2)
    plain = pooler(feature_maps(), awkward_boxes(), [(IMAGE, IMAGE)] * 3)
    maps = feature_maps(channels_last=True)
    for feature in maps.values():
        feature.requires_grad_()
    result = pooler(maps, awkward_boxes(), [(IMAGE, IMAGE)] * 3)
    torch.testing.assert_close(result, plain, rtol=0, atol=1e-6)
    assert result.is_contiguous()  # the box head flattens it
    result.sum().backward()
    assert maps["0"].grad.shape == maps["0"].shape and maps["0"].grad.abs().sum() > 0


def test_sparse_roi_align_keeps_bf16_maps_bf16_under_autocast() -> None:
    maps = OrderedDict((name, feature.to(torch.bfloat16)) for name, feature in feature_maps().items())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = SparseMultiScaleRoIAlign(NAMES, 7, 2)(maps, awkward_boxes(), [(IMAGE, IMAGE)] * 3)
        expected = MultiScaleRoIAlign(NAMES, 7, 2)(maps, awkward_boxes(), [(IMAGE, IMAGE)] * 3)
    assert result.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-2)  # one bf16 rounding of values up to ~4


def test_the_backward_pass_keeps_no_float32_copy_of_the_maps() -> None:
    """Only the sparse matrix is needed for the gradient; keeping the [pixels, channels] float32 operand would cost 700 MB a batch at 1024 px."""
    maps = OrderedDict((name, feature.to(torch.bfloat16).requires_grad_()) for name, feature in feature_maps().items())
    saved_shapes = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda tensor: saved_shapes.append(tuple(tensor.shape)) or tensor, lambda tensor: tensor
    ):
        result = SparseMultiScaleRoIAlign(NAMES, 7, 2)(maps, awkward_boxes(), [(IMAGE, IMAGE)] * 3)
    pixels = sum(
        feature.shape[0] * feature.shape[2] * feature.shape[3] for name, feature in maps.items() if name != "pool"
    )
    assert (pixels, 8) not in saved_shapes
    result.float().sum().backward()
    assert maps["0"].grad.dtype == torch.bfloat16 and maps["0"].grad.abs().sum() > 0


def test_no_boxes_at_all_pool_to_an_empty_batch() -> None:
    result = SparseMultiScaleRoIAlign(NAMES, 7, 2)(feature_maps(), [torch.zeros(0, 4)] * 3, [(IMAGE, IMAGE)] * 3)
    assert result.shape == (0, 8, 7, 7)


def test_a_nan_box_pools_to_zeros_instead_of_reading_outside_the_maps() -> None:
    boxes = [
        torch.tensor([[float("nan"), 10.0, 50.0, 60.0], [10.0, 10.0, 50.0, 60.0]]),
        torch.zeros(0, 4),
        torch.zeros(0, 4),
    ]
    result = SparseMultiScaleRoIAlign(NAMES, 7, 2)(feature_maps(), boxes, [(IMAGE, IMAGE)] * 3)
    assert torch.equal(result[0], torch.zeros_like(result[0])) and result[1].abs().sum() > 0


def test_adaptive_sampling_ratio_runs_torchvision_code(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the sparse product cannot take a per-box number of sample points")

    monkeypatch.setattr(sparse_module, "sparse_multiscale_roi_align", refuse)
    boxes = awkward_boxes()
    expected = MultiScaleRoIAlign(NAMES, 7, 0)(feature_maps(), boxes, [(IMAGE, IMAGE)] * 3)
    assert torch.equal(SparseMultiScaleRoIAlign(NAMES, 7, 0)(feature_maps(), boxes, [(IMAGE, IMAGE)] * 3), expected)


def test_matrix_rows_average_their_sample_points() -> None:
    """Inside the map each bin's weights sum to 1 (an average of bilinear samples); a box far outside has none."""
    boxes = torch.tensor([[8.0, 8.0, 40.0, 56.0], [-40.0, -40.0, -20.0, -20.0]])
    matrix = roi_align_matrix(
        boxes,
        torch.tensor([1, 0]),
        torch.tensor([0, 0]),
        level_shapes=[(16, 16)],
        scales=[0.25],
        images=2,
        output_size=(7, 7),
        sampling_ratio=2,
    )
    assert matrix.shape == (2 * 49, 2 * 16 * 16)
    row_sums = matrix.to_dense().sum(dim=1)
    torch.testing.assert_close(row_sums[:49], torch.ones(49))
    assert torch.equal(row_sums[49:], torch.zeros(49))
    # The first box is image 1's: all its weight lies in image 1's columns.
    assert matrix.to_dense()[:49, : 16 * 16].abs().sum() == 0


def test_the_same_inputs_give_bit_identical_results_and_gradients() -> None:
    """Training is deterministic with a seed on a CPU: the sparse products must be too."""
    runs = [pool_both(7, feature_maps(), awkward_boxes())[1:4:2] for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
