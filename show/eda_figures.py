"""The figures of ``lungdet eda``, each drawn from :mod:`lungdet.show.eda_stats` as PNG bytes, and the sample images with their boxes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lungdet.boxes import as_box_array
from lungdet.data_tools.image_io import read_xray_file
from lungdet.data_tools.labels import NORMAL_CLASS, NOT_NORMAL_CLASS, POSITIVE_CLASS, PatientLabels
from lungdet.show.draw import draw_overlay, encode_image, fit_for_display
from lungdet.show.eda_stats import MAX_PLAUSIBLE_AGE_YEARS, NO_CLASS, EdaStats, GroupCounts, MetadataStats
from lungdet.show.figures import figure_to_png, new_figure

# Longer side of the sample images on the page, in pixels: enough to see a box, small enough to load fast.
SAMPLE_MAX_SIZE = 384
# Negatives blue, positives orange (they stay apart for red-green colour blindness); the
# "not normal" negatives purple, between the two.
TARGET_COLORS = {0: "#4c72b0", 1: "#dd8452"}
CLASS_COLORS = {NORMAL_CLASS: "#4c72b0", NOT_NORMAL_CLASS: "#8172b3", POSITIVE_CLASS: "#dd8452", NO_CLASS: "#999999"}


def percent(part: int, whole: int) -> str:
    """``part`` of ``whole`` as a percentage for a label, one decimal ("23.4%"; "–" when whole is 0)."""
    return f"{100 * part / whole:.1f}%" if whole else "–"


def _annotate_bars(axes, bars, labels: Sequence[str]) -> None:
    for bar, text in zip(bars, labels, strict=True):
        axes.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )


def plot_class_balance(stats: EdaStats) -> bytes:
    """Bars of patients per class (or per Target without class info)."""
    if stats.class_counts is not None:
        counts = {name: count for name, count in stats.class_counts.items() if count or name != NO_CLASS}
        colors = [CLASS_COLORS.get(name, "#999999") for name in counts]
    else:
        counts = {"Target 0 (no box)": stats.negative_count, "Target 1 (box)": stats.positive_count}
        colors = [TARGET_COLORS[0], TARGET_COLORS[1]]
    figure = new_figure(6, 3.6)
    axes = figure.add_subplot()
    bars = axes.bar(range(len(counts)), list(counts.values()), color=colors)
    axes.set_xticks(range(len(counts)), [name.replace(" / ", " /\n") for name in counts], fontsize=9)
    _annotate_bars(axes, bars, [f"{count:,}\n({percent(count, stats.patient_count)})" for count in counts.values()])
    axes.set_ylabel("patients")
    axes.set_ylim(0, max([*counts.values(), 1]) * 1.25)
    axes.set_title("Patients per class" if stats.class_counts is not None else "Patients per Target")
    return figure_to_png(figure)


def plot_boxes_per_image(stats: EdaStats) -> bytes:
    """Bars of positive patients by their number of boxes."""
    figure = new_figure(5, 3.4)
    axes = figure.add_subplot()
    names, counts = list(stats.boxes_per_positive), list(stats.boxes_per_positive.values())
    bars = axes.bar(names, counts, color=TARGET_COLORS[1])
    _annotate_bars(axes, bars, [f"{count:,} ({percent(count, stats.positive_count)})" for count in counts])
    axes.set_xlabel("boxes in the image")
    axes.set_ylabel("positive patients")
    axes.set_ylim(0, max([*counts, 1]) * 1.2)
    axes.set_title("Boxes per positive image")
    return figure_to_png(figure)


def plot_box_sizes(stats: EdaStats) -> bytes:
    """2-D histogram of box width x height (original pixels) with marginal histograms and median lines."""
    figure = new_figure(6, 6)
    grid = figure.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4))
    main = figure.add_subplot(grid[1, 0])
    top = figure.add_subplot(grid[0, 0], sharex=main)
    right = figure.add_subplot(grid[1, 1], sharey=main)
    widths, heights = stats.box_widths, stats.box_heights
    # One range for both axes, so a square box sits on the diagonal and shapes compare by eye.
    limit = float(max(widths.max(initial=0), heights.max(initial=0), 1)) * 1.02
    edges = np.linspace(0, limit, 41)
    counts, _, _ = np.histogram2d(widths, heights, bins=[edges, edges])
    shown = np.ma.masked_equal(counts.T, 0)  # empty bins stay white instead of the colormap's lowest colour
    image = main.pcolormesh(edges, edges, shown, cmap="viridis")
    figure.colorbar(image, ax=right, label="boxes per bin", location="right")
    top.hist(widths, bins=edges, color=TARGET_COLORS[1])
    right.hist(heights, bins=edges, color=TARGET_COLORS[1], orientation="horizontal")
    if stats.median_box_width is not None:
        for axes in (main, top):
            axes.axvline(stats.median_box_width, color="crimson", linestyle="--", linewidth=1)
        for axes in (main, right):
            axes.axhline(stats.median_box_height, color="crimson", linestyle="--", linewidth=1)
        # In the empty corner, not at the crossing, where it would sit on the densest bins.
        main.text(
            0.97,
            0.03,
            f"dashed: medians\nwidth {stats.median_box_width:.0f} px, height {stats.median_box_height:.0f} px",
            transform=main.transAxes,
            ha="right",
            va="bottom",
            color="crimson",
            fontsize=9,
        )
    main.set_xlim(0, limit)
    main.set_ylim(0, limit)
    main.set_xlabel("box width (px, original image pixels)")
    main.set_ylabel("box height (px, original image pixels)")
    top.set_ylabel("boxes")
    right.set_xlabel("boxes")
    top.tick_params(labelbottom=False)
    right.tick_params(labelleft=False)
    top.set_title(f"Box width and height ({stats.box_count:,} boxes)")
    return figure_to_png(figure)


def plot_box_heatmap(stats: EdaStats) -> bytes:
    """Where boxes fall: boxes covering each grid cell per 100 positive images."""
    figure = new_figure(5.6, 4.8)
    axes = figure.add_subplot()
    per_hundred = stats.heatmap * (100 / stats.positive_count) if stats.positive_count else stats.heatmap
    image = axes.imshow(per_hundred, extent=(0, 1, 1, 0), cmap="magma", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="boxes over the cell per 100 positive images")
    axes.set_xlabel("x / image width  (image left = patient's right)")
    axes.set_ylabel("y / image height")
    grid = stats.heatmap.shape[0]
    axes.set_title(f"Box locations ({grid}x{grid} grid)")
    return figure_to_png(figure)


def plot_age_by_target(metadata: MetadataStats) -> bytes:
    """Histograms of patient age (years) for Target 0 and 1, each scaled to its own total."""
    figure = new_figure(6, 3.6)
    axes = figure.add_subplot()
    edges = np.arange(0, MAX_PLAUSIBLE_AGE_YEARS + 5, 5)
    for target, name in ((0, "Target 0 (no box)"), (1, "Target 1 (box)")):
        ages = metadata.ages_by_target[target]
        ages = ages[ages <= MAX_PLAUSIBLE_AGE_YEARS]
        if len(ages):
            # Each group as a share of itself: positives are a quarter of the data and would look flat.
            axes.hist(
                ages,
                bins=edges,
                weights=np.full(len(ages), 100 / len(ages)),
                histtype="step",
                linewidth=2,
                color=TARGET_COLORS[target],
                label=f"{name}, n={len(ages):,}",
            )
    axes.set_xlabel("age (years, 5-year bins)")
    axes.set_ylabel("% of the group")
    axes.set_xlim(0, 100)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=9, loc="upper right")  # few patients are over 80, so that corner is empty
    axes.set_title("Age by target")
    return figure_to_png(figure)


def plot_groups_by_target(groups: Mapping[str, GroupCounts], *, title: str, xlabel: str) -> bytes:
    """Side-by-side bars of negatives and positives per group, with each group's positive rate above."""
    figure = new_figure(5, 3.6)
    axes = figure.add_subplot()
    names = list(groups)
    positions = np.arange(len(names))
    negatives = [groups[name].negatives for name in names]
    positives = [groups[name].positives for name in names]
    axes.bar(positions - 0.2, negatives, width=0.4, color=TARGET_COLORS[0], label="Target 0")
    axes.bar(positions + 0.2, positives, width=0.4, color=TARGET_COLORS[1], label="Target 1")
    top = max([*negatives, *positives, 1])
    for position, name in zip(positions, names, strict=True):
        rate = groups[name].positive_rate
        text = f"{100 * rate:.1f}% positive" if rate is not None else "–"
        axes.annotate(
            text,
            (position, max(groups[name].negatives, groups[name].positives)),
            ha="center",
            va="bottom",
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=9,
        )
    axes.set_xticks(positions, names)
    axes.set_ylim(0, top * 1.25)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("patients")
    axes.legend(fontsize=9, loc="upper left")
    axes.set_title(title)
    return figure_to_png(figure)


def plot_pixel_spacing(metadata: MetadataStats) -> bytes:
    """Histogram of the row pixel spacing (mm)."""
    figure = new_figure(5, 3.4)
    axes = figure.add_subplot()
    spacing = metadata.pixel_spacings_mm[:, 0]
    if len(spacing):
        low, high = float(spacing.min()), float(spacing.max())
        axes.hist(spacing, bins=np.linspace(low - 0.005, high + 0.005, 31), color="#55a868")
    axes.set_xlabel("pixel spacing (mm per pixel, rows)")
    axes.set_ylabel("DICOMs")
    axes.set_title("Pixel spacing")
    return figure_to_png(figure)


def encode_sample_png(patient: PatientLabels, path: Path) -> tuple[bytes, int]:
    """Read one image's pixels (DICOM, PNG or JPEG) and draw its truth boxes (XYWH_ABS, original pixels) at page size.

    Returns the PNG bytes and the number of boxes drawn. Raises ImageReadError if it cannot be decoded.
    """
    image = read_xray_file(path)
    pixels, truth, _ = fit_for_display(image.pixels, as_box_array(patient.boxes), None, max_size=SAMPLE_MAX_SIZE)
    rgb = draw_overlay(pixels, truth=truth, prediction=None, title=patient.patient_id)
    return encode_image(rgb, ".png", what=f"{path}: the sample image"), len(truth)
