"""Drawing one synthetic chest film: the anatomy, the film, the opacity patches and the side marker.

:func:`sample_anatomy` draws a randomised chest, :func:`render_chest` paints it as grey levels
without findings, :func:`draw_opacities` brightens soft textured patches and measures each label
box from the patch as drawn, and :func:`draw_side_marker` adds the lead 'L'/'R' of real films.
What to draw (how many boxes, where, which view) follows the real labels' statistics in
:mod:`lungdet.data_tools.synth`, which also writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from lungdet.boxes import as_box_array
from lungdet.data_tools.labels import NOT_NORMAL_CLASS

# Tuning of the drawing (not real statistics).
# The label box is where the patch's strength is at least this fraction of full strength.
_EXTENT_THRESHOLD = 0.15
# The patch is drawn this much larger than the planned box so that its measured extent (above
# _EXTENT_THRESHOLD) comes out near the planned size and the box-size statistics survive.
_PATCH_PADDING = 1.19


@dataclass(frozen=True)
class Lung:
    """One lung field as an ellipse in fractions of the image (u = x / width, v = y / height)."""

    center_u: float
    center_v: float
    half_width: float
    half_height: float


@dataclass(frozen=True)
class Anatomy:
    """Randomised anatomy of one synthetic chest, in fractions of the image size."""

    body_center_u: float
    body_half_width: float
    background_level: float
    tissue_level: float
    lungs: tuple[Lung, Lung]  # image-left (patient's right) first
    lung_darkness: float
    heart_center_u: float
    heart_center_v: float
    heart_half_width: float
    heart_half_height: float
    spine_half_width: float
    spine_brightness: float
    rib_count: float
    rib_brightness: float
    rib_phase: float
    contrast: float
    gamma: float
    noise_std: float


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], *, cells: tuple[int, int]) -> np.ndarray:
    """Smooth noise in [0, 1] of ``shape``, made from ``cells`` random values upscaled bicubically."""
    coarse = rng.random((max(2, cells[0]), max(2, cells[1])), dtype=np.float32)
    fine = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    low, high = float(fine.min()), float(fine.max())
    return (fine - low) / max(high - low, 1e-6)


def sample_anatomy(rng: np.random.Generator, *, view_position: str, class_name: str) -> Anatomy:
    """Draw the anatomy of one chest. AP films get lower contrast and a wider heart, as real ones do."""
    body_center_u = 0.5 + rng.normal(0.0, 0.012)
    lung_center_v = rng.uniform(0.45, 0.49)
    lung_offset = rng.uniform(0.19, 0.215)
    lungs = tuple(
        Lung(
            center_u=body_center_u + side * (lung_offset + rng.normal(0.0, 0.006)),
            center_v=lung_center_v + rng.normal(0.0, 0.008),
            half_width=rng.uniform(0.15, 0.17),
            half_height=rng.uniform(0.31, 0.35),
        )
        for side in (-1, 1)
    )
    is_ap = view_position == "AP"
    # 'Not Normal' negatives get an enlarged heart and hazier lungs: abnormal, but no opacity box.
    not_normal = class_name == NOT_NORMAL_CLASS
    heart_half_width = rng.uniform(0.12, 0.145) + (0.015 if is_ap else 0.0) + (0.03 if not_normal else 0.0)
    return Anatomy(
        body_center_u=body_center_u,
        body_half_width=rng.uniform(0.46, 0.56),
        background_level=rng.uniform(4.0, 30.0),
        tissue_level=rng.uniform(150.0, 180.0),
        lungs=lungs,  # type: ignore[arg-type]
        lung_darkness=rng.uniform(85.0, 115.0) * (0.85 if not_normal else 1.0),
        heart_center_u=body_center_u + rng.uniform(0.03, 0.06),
        # Low enough that the heart sits on the diaphragm: no lung shows below it.
        heart_center_v=lung_center_v + rng.uniform(0.2, 0.24),
        heart_half_width=heart_half_width,
        heart_half_height=rng.uniform(0.19, 0.22),
        spine_half_width=rng.uniform(0.035, 0.05),
        spine_brightness=rng.uniform(15.0, 30.0),
        rib_count=rng.uniform(9.5, 12.0),
        rib_brightness=rng.uniform(12.0, 22.0),
        rib_phase=rng.uniform(0.0, 1.0),
        contrast=rng.uniform(0.78, 0.92) if is_ap else rng.uniform(0.92, 1.08),
        gamma=rng.uniform(0.9, 1.15),
        noise_std=rng.uniform(2.0, 4.0),
    )


def lung_region_xyxy(lung: Lung, *, rows: int, columns: int) -> tuple[float, float, float, float]:
    """The region an opacity box in ``lung`` must stay inside, XYXY_ABS in pixels of a rows x columns image.

    A little wider than the lung field laterally and reaching below the dome, as real boxes do
    (the 95th percentile box is 317 x 623 px at 1024, which fits), but kept off the mediastinum,
    where a patch would hardly show.
    """
    lateral_reach, medial_reach = 1.3 * lung.half_width, 1.0 * lung.half_width
    if lung.center_u < 0.5:  # image-left lung: the mediastinum is to its right
        x1, x2 = (lung.center_u - lateral_reach) * columns, (lung.center_u + medial_reach) * columns
    else:
        x1, x2 = (lung.center_u - medial_reach) * columns, (lung.center_u + lateral_reach) * columns
    y1 = (lung.center_v - 1.02 * lung.half_height) * rows
    y2 = (lung.center_v + 1.2 * lung.half_height) * rows
    return max(0.0, x1), max(0.0, y1), min(float(columns), x2), min(float(rows), y2)


def render_chest(rng: np.random.Generator, anatomy: Anatomy, *, rows: int, columns: int) -> np.ndarray:
    """Float32 ``[rows, columns]`` grey levels of the chest without opacities or noise.

    Everything smooth is built on a grid about 8x smaller and upscaled, and the fine lung markings
    on a grid 2x smaller, which keeps a 1024^2 image at a few milliseconds.
    """
    small_rows = min(rows, max(96, rows // 8))
    small_columns = min(columns, max(96, columns // 8))
    v, u = np.meshgrid(
        (np.arange(small_rows, dtype=np.float32) + 0.5) / small_rows,
        (np.arange(small_columns, dtype=np.float32) + 0.5) / small_columns,
        indexing="ij",
    )
    du_body = np.abs(u - anatomy.body_center_u)
    # Neck at the top, shoulders widening below it.
    half_width = anatomy.body_half_width * (0.38 + 0.62 * _smoothstep(0.0, 0.17, v) - 0.08 * _smoothstep(0.45, 1.0, v))
    body = 1.0 - _smoothstep(0.92, 1.04, du_body / half_width)
    tissue = anatomy.tissue_level + 35.0 * _smoothstep(0.6, 1.0, v) - 15.0 * _smoothstep(0.5, 1.0, du_body / half_width)
    image = anatomy.background_level + body * (tissue - anatomy.background_level)

    heart_r = np.hypot(
        (u - anatomy.heart_center_u) / anatomy.heart_half_width,
        (v - anatomy.heart_center_v) / anatomy.heart_half_height,
    )
    heart = 1.0 - _smoothstep(0.75, 1.0, heart_r)

    lung_field = np.zeros_like(u)
    ribs = np.zeros_like(u)
    for side, lung in zip((-1.0, 1.0), anatomy.lungs, strict=True):
        lateral = side * (u - lung.center_u) / lung.half_width
        # The dome of the diaphragm is higher medially, the costophrenic angle low laterally.
        dv = (v - lung.center_v + 0.045 * lateral) / lung.half_height
        # Rounded narrow apex (an ellipse), broad squarish base (a superellipse).
        taper = 0.62 + 0.38 * _smoothstep(-1.0, -0.2, dv)
        du = (u - lung.center_u) / (lung.half_width * taper)
        exponent = 2.0 + 1.5 * _smoothstep(-0.2, 0.6, dv)
        radius = (np.abs(du) ** exponent + np.abs(dv) ** exponent) ** (1.0 / exponent)
        field = 1.0 - _smoothstep(0.88, 1.0, radius)
        lung_field = np.maximum(lung_field, field)
        # Posterior ribs: bands sloping down towards the side of the chest.
        phase = anatomy.rib_count * (v + 0.05 * lateral + 0.035 * lateral**2) + anatomy.rib_phase
        ribs = np.maximum(ribs, field * (0.5 + 0.5 * np.cos(2.0 * np.pi * phase)) ** 6)
    aerated = lung_field * (1.0 - 0.9 * heart)
    # Lungs are darker laterally and at the top, lighter near the hilum.
    hilum = np.exp(-(((du_body - 0.1) / 0.07) ** 2) - ((v - 0.45) / 0.12) ** 2)
    image = image - anatomy.lung_darkness * aerated * (1.0 - 0.3 * hilum)
    # Ribs fade where the heart lies over them, as they do on a film.
    image = image + anatomy.rib_brightness * ribs * (1.0 - 0.7 * heart)
    mottling = _smooth_noise(rng, (small_rows, small_columns), cells=(small_rows // 6, small_columns // 6))
    image = image + 12.0 * aerated * (mottling - 0.5)
    # Spine behind the mediastinum, and the clavicles (medial ends low, lateral ends high).
    spine = np.exp(-((du_body / anatomy.spine_half_width) ** 2)) * body
    image = image + anatomy.spine_brightness * spine * (1.0 - 0.5 * _smoothstep(0.3, 0.9, v))
    clavicle_v = 0.2 - 0.08 * du_body / 0.3
    clavicles = (
        np.exp(-(((v - clavicle_v) / 0.016) ** 2))
        * _smoothstep(0.03, 0.06, du_body)
        * (1.0 - _smoothstep(0.3, 0.36, du_body))
    )
    image = image + 25.0 * clavicles * body
    image = cv2.resize(image.astype(np.float32), (columns, rows), interpolation=cv2.INTER_CUBIC)

    # Fine branching lung markings: ridges of a smooth noise field, only inside aerated lung.
    half_shape = (max(2, rows // 2), max(2, columns // 2))
    field = _smooth_noise(rng, half_shape, cells=(max(4, rows // 28), max(4, columns // 28)))
    markings = (1.0 - np.abs(2.0 * field - 1.0)) ** 16
    markings = cv2.resize(markings, (columns, rows), interpolation=cv2.INTER_LINEAR)
    aerated_full = cv2.resize(aerated.astype(np.float32), (columns, rows), interpolation=cv2.INTER_LINEAR)
    image += 11.0 * markings * aerated_full
    return image


def draw_opacities(
    rng: np.random.Generator, image: np.ndarray, planned: list[np.ndarray], *, rows: int, columns: int
) -> np.ndarray:
    """Brighten ``image`` (float32, in place) with one soft textured patch per planned box.

    Returns ``[N, 4]`` XYWH_ABS boxes measured from the drawn patches: the tight extent of
    pixels whose patch strength is at least ``_EXTENT_THRESHOLD``. Measuring, rather than
    trusting the plan, is what makes the label the patch's actual extent.
    """
    strength = np.zeros((rows, columns), dtype=np.float32)
    measured = []
    for left, top, width, height in planned:
        center_x, center_y = left + width / 2, top + height / 2
        half_w, half_h = width * _PATCH_PADDING / 2, height * _PATCH_PADDING / 2
        x1, x2 = max(0, int(np.floor(center_x - half_w))), min(columns, int(np.ceil(center_x + half_w)))
        y1, y2 = max(0, int(np.floor(center_y - half_h))), min(rows, int(np.ceil(center_y + half_h)))
        if x2 - x1 < 2 or y2 - y1 < 2:
            continue
        ys = ((np.arange(y1, y2, dtype=np.float32) + 0.5 - center_y) / half_h)[:, None]
        xs = ((np.arange(x1, x2, dtype=np.float32) + 0.5 - center_x) / half_w)[None, :]
        exponent = rng.uniform(2.2, 3.5)  # 2 = ellipse, larger = squarer: consolidations are blobby
        radius = (np.abs(xs) ** exponent + np.abs(ys) ** exponent) ** (1.0 / exponent)
        shape = (y2 - y1, x2 - x1)
        # A lobulated edge and patchy inside, like an airspace opacity rather than a clean ellipse.
        edge = 0.35 + 0.15 * _smooth_noise(rng, shape, cells=(5, 5))
        patch = 1.0 - _smoothstep(edge, 1.0, radius)
        texture = _smooth_noise(rng, shape, cells=(max(3, shape[0] // 24), max(3, shape[1] // 24)))
        patch = patch * (0.6 + 0.4 * texture) * rng.uniform(0.85, 1.0)
        inside_rows = np.flatnonzero((patch >= _EXTENT_THRESHOLD).any(axis=1))
        inside_columns = np.flatnonzero((patch >= _EXTENT_THRESHOLD).any(axis=0))
        if len(inside_rows) == 0:
            continue
        strength[y1:y2, x1:x2] = np.maximum(strength[y1:y2, x1:x2], patch)
        measured.append(
            [
                x1 + inside_columns[0],
                y1 + inside_rows[0],
                inside_columns[-1] - inside_columns[0] + 1,
                inside_rows[-1] - inside_rows[0] + 1,
            ]
        )
    # Blend towards a bright level: strong over dark lung, less over already dense tissue, but
    # never less than a floor, so that a patch over the heart still shows (we lean to learnable).
    target_level = rng.uniform(195.0, 220.0)
    opacity = rng.uniform(0.6, 0.8)
    image += strength * opacity * (target_level - image).clip(min=40.0)
    return as_box_array(np.array(measured, dtype=np.float64))


def draw_side_marker(pixels: np.ndarray, rng: np.random.Generator) -> None:
    """Draw a bright lead 'L' or 'R' in a top corner of ``pixels`` (uint8 ``[rows, columns]``, in place).

    Real films carry such a marker; a detector must learn to ignore it.
    """
    rows, columns = pixels.shape
    scale = min(rows, columns) / 700
    thickness = max(1, round(min(rows, columns) / 300))
    x = int(columns * rng.uniform(0.82, 0.9))
    y = int(rows * rng.uniform(0.05, 0.09))
    cv2.putText(
        pixels, str(rng.choice(["L", "R"])), (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 235, thickness, cv2.LINE_AA
    )
