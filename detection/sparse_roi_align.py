"""RoI Align on the CPU as one sparse matrix product, for every level and image at once.

Profiling a CPU training step showed torchvision's RoI Align taking more of it than the
convolutions: 40% of a MobileNetV3 step at 256 px (fasterrcnn_mobilenet_cpu) and over half of a
ResNet-50 step at 512 px, mostly in its backward pass, which runs on one core and redoes the
bilinear weights for every channel (docs/benchmarks.md).

Yet RoI Align is linear in the feature maps: each output value is a fixed weighted sum of at most
``4 * sampling_ratio**2`` feature pixels of one channel, and the weights are the same for every
channel. So all of it is one sparse matrix ``M`` (a row per RoI bin, a column per feature pixel of
any level and image) times the feature maps laid out as ``[pixels, channels]``, which is the
memory order of channels_last maps (a view of them; the only copy is the cast to float32 and the
joining of the levels). Its gradient is ``M^T``
times the output's gradient: another sparse product, with no scattered additions. torch runs both
with MKL's sparse routines on all cores.

The weights are torchvision's own (``roi_align`` with ``aligned=False``, as
``MultiScaleRoIAlign`` calls it): the same sample points, the same bilinear weights, the same
clamping at the borders, the same level for each box. Only the order of the additions differs,
so results agree to float rounding (tests/detection/test_sparse_roi_align.py).
"""

from __future__ import annotations

import warnings

import torch
import torchvision
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _setup_scales

# Where the sparse product replaces torchvision's kernels. On CUDA, torchvision's kernels are
# parallel already and the sparse form is unmeasured, so they stay.
SPARSE_DEVICE_TYPES = ("cpu",)


def _axis_taps(start: Tensor, length: Tensor, bins: int, sampling_ratio: int, size: Tensor) -> tuple[Tensor, Tensor]:
    """Feature-pixel indices and bilinear weights along one axis: ``[R, bins, 2 * sampling_ratio]`` each.

    For each RoI, bin and sample point, the two pixels around the point and their weights,
    following torchvision's ``roi_align`` (aligned=False): points more than one pixel outside the
    map weigh nothing; points just outside are moved onto the border; a point on or past the last
    pixel takes all of its weight from that pixel.
    """
    rois = start.shape[0]
    # Point k of bin b at start + b * bin + (k + 0.5) * bin / S, in torchvision's order of operations.
    bin_size = (length / bins)[:, None]
    bin_index = torch.arange(bins, dtype=torch.float32, device=start.device).repeat_interleave(sampling_ratio)
    point_index = torch.arange(sampling_ratio, dtype=torch.float32, device=start.device).repeat(bins) + 0.5
    points = start[:, None] + bin_index * bin_size + point_index * bin_size / sampling_ratio  # [R, bins * S]
    size = size[:, None]
    inside = (points >= -1.0) & (points <= size)  # False for NaN too
    points = points.clamp_min(0.0)
    # Clamped at both ends so that no index can point outside its map, whatever the box (NaN
    # included): with invariant checks off, the sparse product would read out of bounds.
    low = points.floor().to(torch.int64).clamp(min=torch.zeros_like(size), max=size - 1)
    at_last = low >= size - 1
    high = torch.where(at_last, low, low + 1)
    fraction = torch.where(at_last, 0.0, points - low)
    weights = torch.where(inside[..., None], torch.stack([1.0 - fraction, fraction], dim=-1), 0.0)
    indices = torch.stack([low, high], dim=-1)
    return indices.view(rois, bins, 2 * sampling_ratio), weights.view(rois, bins, 2 * sampling_ratio)


def roi_align_matrix(
    boxes: Tensor,
    image_index: Tensor,
    levels: Tensor,
    *,
    level_shapes: list[tuple[int, int]],
    scales: list[float],
    images: int,
    output_size: tuple[int, int],
    sampling_ratio: int,
) -> Tensor:
    """The sparse matrix that RoI-aligns every box from its level's feature map.

    Parameters
    ----------
    boxes : FloatTensor[R, 4]
        XYXY_ABS boxes in input-image pixels.
    image_index, levels : LongTensor[R]
        Which image and which feature level each box is pooled from.
    level_shapes, scales : one per level
        Each level's feature map ``(height, width)`` and its size relative to the input image.
    images : int
        Images in the batch.
    output_size : (height, width)
        Bins per RoI.
    sampling_ratio : int
        Sample points per bin along each axis (> 0).

    Returns
    -------
    sparse CSR FloatTensor[R * out_h * out_w, sum over levels of images * height * width]
        Row ``(r, i, j)`` holds the weights of bin ``(i, j)`` of box ``r``; the columns are the
        levels' pixels one after another, each level image by image in row-major order: the
        rows of ``feature.permute(0, 2, 3, 1).reshape(-1, channels)`` concatenated over levels.
    """
    device = boxes.device
    heights = torch.tensor([h for h, _ in level_shapes], device=device)
    widths = torch.tensor([w for _, w in level_shapes], device=device)
    pixels = [images * h * w for h, w in level_shapes]
    level_start = torch.tensor([0, *pixels[:-1]], device=device).cumsum(0)
    height, width = heights[levels], widths[levels]
    scaled = boxes.to(torch.float32) * torch.tensor(scales, dtype=torch.float32, device=device)[levels][:, None]
    # torchvision stretches RoIs smaller than a feature pixel to one pixel.
    rows_at, row_weights = _axis_taps(
        scaled[:, 1], (scaled[:, 3] - scaled[:, 1]).clamp_min(1.0), output_size[0], sampling_ratio, height
    )
    cols_at, col_weights = _axis_taps(
        scaled[:, 0], (scaled[:, 2] - scaled[:, 0]).clamp_min(1.0), output_size[1], sampling_ratio, width
    )
    # [R, out_h, out_w, 2S, 2S]: every (row tap, column tap) pair of a bin, averaged over its S * S points.
    weights = row_weights[:, :, None, :, None] * col_weights[:, None, :, None, :] / sampling_ratio**2
    base = level_start[levels] + image_index * height * width
    columns = (
        base[:, None, None, None, None]
        + rows_at[:, :, None, :, None] * width[:, None, None, None, None]
        + cols_at[:, None, :, None, :]
    )
    taps = (2 * sampling_ratio) ** 2
    rows = boxes.shape[0] * output_size[0] * output_size[1]
    row_starts = torch.arange(0, rows * taps + 1, taps, device=device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(
            row_starts, columns.reshape(-1), weights.reshape(-1), size=(rows, sum(pixels)), check_invariants=False
        )


def sparse_multiscale_roi_align(
    features: list[Tensor],
    boxes: list[Tensor],
    levels: Tensor,
    *,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
) -> Tensor:
    """``MultiScaleRoIAlign``'s result, ``[R, channels, out_h, out_w]`` in the features' dtype, as one sparse product.

    ``boxes`` holds each image's boxes (XYXY_ABS, input-image pixels) and ``levels`` the level of
    each box in their concatenation. Computed in float32 whatever the features' dtype, as
    torchvision's kernel does under autocast.
    """
    images, channels = features[0].shape[:2]
    dtype = features[0].dtype
    counts = torch.tensor([len(b) for b in boxes], device=levels.device)
    all_boxes = torch.cat(boxes)
    if all_boxes.shape[0] == 0:
        return features[0].new_zeros((0, channels, *output_size))
    matrix = roi_align_matrix(
        all_boxes,
        torch.repeat_interleave(torch.arange(images, device=levels.device), counts),
        levels,
        level_shapes=[tuple(f.shape[-2:]) for f in features],
        scales=scales,
        images=images,
        output_size=output_size,
        sampling_ratio=sampling_ratio,
    )
    # [pixels, channels]: a view of channels_last maps, a copy of contiguous ones.
    pixels = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, channels) for f in features]).to(torch.float32)
    with torch.autocast(
        pixels.device.type, enabled=False
    ):  # MKL's sparse product is float32 only; autocast would pick bf16
        pooled = torch.sparse.mm(matrix, pixels)
    # Cast and reorder in one copy: the box head flattens each RoI's [channels, out_h, out_w].
    return (
        pooled.view(all_boxes.shape[0], *output_size, channels)
        .permute(0, 3, 1, 2)
        .to(dtype=dtype, memory_format=torch.contiguous_format)
    )


class SparseMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` computed by :func:`sparse_multiscale_roi_align` on a CPU.

    Elsewhere (CUDA), with an adaptive sampling ratio (``sampling_ratio <= 0``, a different
    number of points per box) or while tracing, torchvision's own code runs.
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pooled features ``[R, channels, out_h, out_w]`` for every box of the batch, as one sparse product.

        ``x`` are the FPN's maps by name (only ``featmap_names`` are used), ``boxes`` each image's XYXY ``[R_i, 4]`` in
        input-image pixels, ``image_shapes`` the input sizes that set each level's scale. On CUDA, with an adaptive
        ``sampling_ratio`` or while tracing, torchvision's ``forward`` runs.
        """
        features = [feature for name, feature in x.items() if name in self.featmap_names]  # as torchvision filters them
        if features[0].device.type not in SPARSE_DEVICE_TYPES or self.sampling_ratio <= 0 or torchvision._is_tracing():
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        if len(features) == 1:
            levels = torch.zeros(sum(len(b) for b in boxes), dtype=torch.int64, device=features[0].device)
        else:
            levels = self.map_levels(boxes).clamp(0, len(features) - 1)  # a NaN box's level is garbage
        return sparse_multiscale_roi_align(
            features,
            boxes,
            levels,
            scales=self.scales,
            output_size=tuple(self.output_size),
            sampling_ratio=self.sampling_ratio,
        )
