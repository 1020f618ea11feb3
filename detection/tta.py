"""Test-time augmentation: which extra passes a model makes over each image, and how their boxes come back.

``--tta`` takes a comma-separated list of passes beside the plain one:

- ``hflip``: the image mirrored left to right; its boxes are mirrored back (:func:`hflip_back`);
- ``scaleS`` (``scale0.8``, ``scale1.2``; S in [0.5, 2]): the image given to the model at S times
  its input size (a 256 px model sees 205 or 307 px), so opacities meet the anchors at other
  sizes; the runner reads boxes at the size it was given, so they come back in the image's pixels.

``none`` is the plain pass alone. Every pass's boxes go into the raw predictions under its name
(``plain``, ``hflip``, ``scale0.8``) and are fused by the post-processing's weighted boxes fusion.
Torch-free: the ONNX runner and the CLI parse the same list.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from lungdet.submission.prediction_string import Prediction
from lungdet.submission.raw_predictions import PLAIN_PASS, SCALE_PREFIX, format_scale_pass

SCALE_RANGE = (0.5, 2.0)
TTA_EXAMPLE = "hflip,scale0.8,scale1.2"


@dataclass(frozen=True)
class TtaPass:
    """One pass over an image: its name in the raw predictions, whether the image is mirrored, and the input-size factor."""

    name: str
    mirror: bool = False
    scale: float = 1.0


PLAIN = TtaPass(PLAIN_PASS)


def parse_tta(text: str) -> tuple[TtaPass, ...]:
    """The passes ``text`` names, the plain pass first: 'none', or a comma-separated list of 'hflip' and 'scaleS'.

    Raises ValueError naming the bad entry and what is allowed.
    """
    names = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    if names in ([], ["none"]):
        return (PLAIN,)
    passes = [PLAIN]
    for name in names:
        if name == "hflip":
            extra = TtaPass("hflip", mirror=True)
        elif name.startswith(SCALE_PREFIX):
            try:
                factor = float(name[len(SCALE_PREFIX) :])
            except ValueError:
                raise ValueError(f"--tta {text!r}: {name!r} is not scaleS with a number S, e.g. scale0.8") from None
            if not SCALE_RANGE[0] <= factor <= SCALE_RANGE[1] or factor == 1.0:
                raise ValueError(
                    f"--tta {text!r}: {name!r}: the scale must be in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}] and not 1 (the plain pass)"
                )
            extra = TtaPass(format_scale_pass(factor), scale=factor)
        else:
            raise ValueError(
                f"--tta {text!r}: unknown pass {name!r}; use 'none' or a comma-separated list of hflip and scaleS, e.g. {TTA_EXAMPLE}"
            )
        if extra.name in {existing.name for existing in passes}:
            raise ValueError(f"--tta {text!r}: {extra.name} is listed twice")
        passes.append(extra)
    return tuple(passes)


def tta_argument(text: str) -> str:
    """argparse ``type`` for ``--tta``: the text as given once it parses (so the help and the run folder show what was asked)."""
    try:
        parse_tta(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def input_size(image_size: int, tta_pass: TtaPass) -> int:
    """The square side, in pixels, that a model of ``image_size`` sees in this pass."""
    return max(32, round(image_size * tta_pass.scale))


def hflip_back(prediction: Prediction, *, width: int) -> Prediction:
    """Boxes predicted on a mirrored image, mapped back: XYWH_ABS ``x`` becomes ``width - x - w``."""
    boxes = prediction.boxes.copy()
    boxes[:, 0] = width - boxes[:, 0] - boxes[:, 2]
    return Prediction(prediction.scores.copy(), boxes)
