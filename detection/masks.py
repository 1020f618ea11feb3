"""Training masks drawn from boxes, for Mask R-CNN.

RSNA labels are boxes only, so Mask R-CNN learns from a shape drawn inside each box: the filled
box ('rectangle') or the axis-aligned ellipse inscribed in it ('ellipse'; opacities are rounded).
:func:`box_masks` is called by the data pipeline on the final (resized, augmented) boxes.
"""

from __future__ import annotations

import torch

from lungdet.detection.config import MASK_SHAPES

# Semi-axes are clamped to this (pixels) so a zero-width box divides by something; such a box
# draws nothing anyway, because the ellipse is also cut to its (empty) rectangle.
_MIN_SEMI_AXIS = 1e-6


def _check_boxes(boxes_xyxy: torch.Tensor) -> None:
    if boxes_xyxy.ndim != 2 or boxes_xyxy.shape[1] != 4:
        raise ValueError(
            f"boxes_xyxy: expected shape [N, 4] (x1, y1, x2, y2), got {list(boxes_xyxy.shape)}; use torch.zeros(0, 4) for no boxes"
        )
    inverted = (boxes_xyxy[:, 2] < boxes_xyxy[:, 0]) | (boxes_xyxy[:, 3] < boxes_xyxy[:, 1])
    if bool(inverted.any()):
        index = int(torch.nonzero(inverted)[0, 0])
        raise ValueError(
            f"boxes_xyxy[{index}] = {boxes_xyxy[index].tolist()}: x2 < x1 or y2 < y1; boxes must be XYXY_ABS, not XYWH"
        )


def box_masks(boxes_xyxy: torch.Tensor, *, height: int, width: int, shape: str) -> torch.Tensor:
    """One binary mask per box.

    Parameters
    ----------
    boxes_xyxy : FloatTensor[N, 4]
        ``[x1, y1, x2, y2]`` in pixels of the ``height`` x ``width`` image (XYXY_ABS); fractional
        coordinates are fine, and parts outside the image are cut off.
    height, width : int
        Mask size in pixels.
    shape : str
        One of ``MASK_SHAPES``: ``'rectangle'`` (the filled box) or ``'ellipse'`` (the
        axis-aligned ellipse inscribed in the box).

    Returns
    -------
    UInt8Tensor[N, height, width]
        1 where a pixel's centre lies inside the shape, else 0; ``[0, height, width]`` for no boxes.
        A pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``, so an integer box covers
        exactly the pixels inside it.

    Raises
    ------
    ValueError
        For an unknown ``shape``, a non-positive size, boxes not shaped ``[N, 4]`` or an inverted box.
    """
    if shape not in MASK_SHAPES:
        raise ValueError(f"shape={shape!r}: expected one of {', '.join(MASK_SHAPES)} (model.mask_shape)")
    if height < 1 or width < 1:
        raise ValueError(f"mask size {height}x{width}: height and width must be >= 1 pixel")
    _check_boxes(boxes_xyxy)
    boxes = boxes_xyxy.to(torch.float32)
    x1, y1, x2, y2 = (boxes[:, i].view(-1, 1, 1) for i in range(4))  # each [N, 1, 1]
    # Sampling at pixel centres, half-open on the far side: a box [0, W) fills exactly W columns.
    xs = (torch.arange(width, dtype=torch.float32, device=boxes.device) + 0.5).view(1, 1, width)
    ys = (torch.arange(height, dtype=torch.float32, device=boxes.device) + 0.5).view(1, height, 1)
    inside = ((xs >= x1) & (xs < x2)) & ((ys >= y1) & (ys < y2))  # [N, H, W] by broadcasting
    if shape == "ellipse":
        semi_x = ((x2 - x1) / 2).clamp_min(_MIN_SEMI_AXIS)
        semi_y = ((y2 - y1) / 2).clamp_min(_MIN_SEMI_AXIS)
        inside &= ((xs - (x1 + x2) / 2) / semi_x) ** 2 + ((ys - (y1 + y2) / 2) / semi_y) ** 2 <= 1.0
    return inside.to(torch.uint8)
