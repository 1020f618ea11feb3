"""What inference and training share (``detection/runtime.py``), and that inference loads nothing of training."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lungdet.detection import runtime
from lungdet.detection.runtime import (
    load_checkpoint,
    resolve_device,
    resolve_precision,
    save_checkpoint,
    to_model_input,
)
from lungdet.errors import LungdetError
from tests.test_layers import TRAINING_MODULES as LAYER_TEST_TRAINING_MODULES

CPU = torch.device("cpu")
# What a Detector must not pull in: the training modules the layer test follows statically, and the augmentation library.
TRAINING_MODULES = (*LAYER_TEST_TRAINING_MODULES, "albumentations")


def test_loading_a_detector_imports_nothing_of_training(serving_checkpoint: Path) -> None:
    """In a fresh interpreter, as ``lungdet serve`` and ``lungdet pacs`` start."""
    script = f"""
import sys
from lungdet.detection.detector import load_detector
detector = load_detector({str(serving_checkpoint)!r}, device="cpu", amp="none")
assert detector.format == "checkpoint" and detector.architecture
print(sorted(name for name in {TRAINING_MODULES!r} if name in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_checkpoint_round_trips_and_a_missing_one_says_how_to_make_it(tmp_path: Path) -> None:
    path = tmp_path / "run" / "best.pt"
    path.parent.mkdir()
    save_checkpoint(path, {"model": {"weight": torch.arange(3.0)}, "epoch": 2})
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["weight"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temporary left behind
    with pytest.raises(
        LungdetError,
        match=re.escape(
            f"{tmp_path / 'nothing.pt'}: checkpoint not found; was this run folder trained with 'lungdet train"
        ),
    ):
        load_checkpoint(tmp_path / "nothing.pt")


class Executable:
    """Stands for an arbitrary pickled object: a checkpoint holding one must not be unpickled."""


def test_a_checkpoint_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "object.pt"
    torch.save({"model": Executable()}, path)
    with pytest.raises(LungdetError, match=re.escape(f"{path}: not a readable checkpoint (")):
        load_checkpoint(path)


# --- devices ------------------------------------------------------------------------------------


def test_resolve_device_auto_and_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_resolve_device_cuda_without_cuda_is_an_error(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        LungdetError,
        match=re.escape(f"device='{name}' but this machine has no CUDA GPU; use device=cpu or device=auto"),
    ):
        resolve_device(name)


def test_resolve_device_rejects_a_name_torch_does_not_know() -> None:
    with pytest.raises(
        LungdetError, match=re.escape("device='gpu' is not a device name; use device=auto, cpu, cuda or cuda:N")
    ):
        resolve_device("gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resolve_device_picks_cuda_when_present() -> None:
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize(
    ("native", "amp", "expected"),
    [
        (True, "auto", torch.bfloat16),
        (True, "bf16", torch.bfloat16),
        (True, "none", None),
        (False, "auto", None),
        (False, "none", None),
    ],
)
def test_cpu_precision_is_bf16_only_where_the_cpu_has_bfloat16_instructions(
    monkeypatch, native: bool, amp: str, expected: torch.dtype | None
) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    precision = resolve_precision(amp, CPU)
    assert (precision.device_type, precision.dtype) == ("cpu", expected)
    with precision.autocast():
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == (expected or torch.float32)


@pytest.mark.parametrize(
    ("native", "amp", "message"),
    [
        (True, "fp16", "amp=fp16 needs a CUDA GPU, but this run is on cpu; use amp=auto, amp=bf16 or amp=none"),
        (False, "fp16", "amp=fp16 needs a CUDA GPU, but this run is on cpu; use amp=auto or amp=none"),
        (
            False,
            "bf16",
            "amp=bf16 on cpu, but this CPU has no bfloat16 instructions (AVX512-BF16 or AMX); use amp=auto or amp=none",
        ),
    ],
)
def test_cpu_precision_rejects_what_the_cpu_cannot_do(monkeypatch, native: bool, amp: str, message: str) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    with pytest.raises(LungdetError, match=re.escape(message)):
        resolve_precision(amp, CPU)


def test_to_model_input_repeats_grey_into_three_channels_in_unit_range() -> None:
    tensor = to_model_input(np.array([[0, 51, 255]], dtype=np.uint8))
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 1, 3)
    torch.testing.assert_close(tensor, torch.tensor([[[0.0, 0.2, 1.0]]] * 3))
