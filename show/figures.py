"""Matplotlib figures as PNG bytes, drawn off-screen (the Agg canvas): what every page and report of lungdet embeds."""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FIGURE_DPI = 100


def new_figure(width_inches: float, height_inches: float) -> Figure:
    """An empty figure of that size in inches (constrained layout) on its own Agg canvas, without pyplot."""
    figure = Figure(figsize=(width_inches, height_inches), layout="constrained")
    # An explicit Agg canvas: no pyplot, so no global figure state and no display is ever needed.
    FigureCanvasAgg(figure)
    return figure


def figure_to_png(figure: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return buffer.getvalue()
