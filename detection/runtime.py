"""What inference and training share: the device, the precision, checkpoint files and the model's input tensor.

``predict``, ``serve``, ``pacs`` and ``export`` need these and nothing of the training loop, so they
live apart from it: loading a :class:`~lungdet.detection.detector.Detector` imports neither
``train``, ``engine``, ``distributed`` nor albumentations (a test keeps it so), as torchvision keeps
such helpers in its references' ``utils.py``, apart from the loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungdet.atomic import atomic_path
from lungdet.errors import LungdetError


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` that ``device=NAME`` means: ``'auto'`` picks CUDA when present.

    An explicit CUDA device without CUDA is an error, not a silent CPU run. Training under
    torchrun picks each process's GPU first (``train.training_device``).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LungdetError(f"device={name!r} is not a device name; use device=auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LungdetError(f"device={name!r} but this machine has no CUDA GPU; use device=cpu or device=auto")
    return device


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: ``dtype`` None is float32; bf16/fp16 run under autocast, fp16 with a gradient scaler."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None

    @property
    def name(self) -> str:
        """``'fp32'``, ``'bf16'`` or ``'fp16'``."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the forward pass runs in: ``torch.autocast`` to ``dtype``, or nothing for float32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX).

    Elsewhere oneDNN emulates bfloat16, and autocast then costs more than it saves.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """The precision ``amp`` ('auto', 'none', 'bf16', 'fp16') means on ``device``.

    'auto' is bf16 on GPUs that have it (Ampere and later: no scaler needed, same range as fp32),
    fp16 on older GPUs, bf16 on CPUs with bfloat16 instructions (a ResNet-50 step takes about half
    the time of fp32's on an AMD EPYC with AVX512-BF16), and fp32 on other CPUs.
    """
    if device.type != "cuda":
        if amp == "fp16":
            choices = "amp=auto, amp=bf16 or amp=none" if cpu_has_native_bf16() else "amp=auto or amp=none"
            raise LungdetError(f"amp=fp16 needs a CUDA GPU, but this run is on {device}; use {choices}")
        if amp == "bf16" and not cpu_has_native_bf16():
            raise LungdetError(
                f"amp=bf16 on {device}, but this CPU has no bfloat16 instructions (AVX512-BF16 or AMX); use amp=auto or amp=none"
            )
        native = amp in ("bf16", "auto") and device.type == "cpu" and cpu_has_native_bf16()
        return Precision(device.type, torch.bfloat16 if native else None)
    if amp == "none":
        return Precision("cuda", None)
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        if not torch.cuda.is_bf16_supported():
            raise LungdetError(
                f"amp=bf16 but {torch.cuda.get_device_name(device)} has no bfloat16; use amp=fp16 or amp=auto"
            )
        return Precision("cuda", torch.bfloat16)
    return Precision("cuda", torch.float16)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary name, then rename: a kill mid-save keeps the previous file intact."""
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a lungdet checkpoint (plain tensors and dicts only: ``weights_only``, nothing executable)."""
    if not Path(path).is_file():
        raise LungdetError(
            f"{path}: checkpoint not found; was this run folder trained with 'lungdet train ... --out RUN'? (RUN/last.pt to resume, RUN/best.pt to predict)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise LungdetError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None


def to_model_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W]`` -> float32 ``[3, H, W]`` in [0, 1]; grey is repeated because the backbones expect RGB."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(255.0)
    return tensor.unsqueeze(0).expand(3, -1, -1).contiguous()
