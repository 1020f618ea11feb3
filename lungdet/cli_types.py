"""argparse ``type=`` callables shared by every subcommand, so a range error reads the same everywhere.

argparse prefixes the message with the flag (``argument --count: ...``), so messages here give
only the valid range and the value received.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable


def fraction(text: str) -> float:
    """A number in [0, 1] (a probability or a confidence)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def int_in_range(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A whole number >= ``minimum`` (and <= ``maximum`` when given)."""
    allowed = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number {allowed}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    return parse


def cpu_share(text: str) -> float:
    """A number of CPUs for a Ray actor: 1 or more, fractions allowed (1.5: one and a half)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of CPUs like 1 or 1.5, got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def positive_seconds(text: str) -> float:
    """A duration in seconds, more than 0 (NaN and infinity refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def image_dimensions(text: str) -> tuple[int, int]:
    """``'800x1200'`` or ``'1024'`` -> ``(width, height)`` in pixels, each at least 1: the one parser of every size flag.

    Width first, as in image tools and DICOM viewers (columns x rows); each flag's help says so.
    """
    parts = text.lower().replace(" ", "").split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels like 1024x1024, got {text!r}")
    return values[0], values[1]


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_name(text: str) -> str:
    """A device flag's value: 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.

    Not a ``choices=`` list because cuda:N is open-ended; checked here so that a typo fails
    when the command line is read, before a model loads.
    """
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N (N a GPU index), got {text!r}")
    return text
