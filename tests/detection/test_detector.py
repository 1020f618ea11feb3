"""Tests for detection/detector.py: rebuilding a trained model, its input, mapping its boxes back to DICOM pixels, file hashes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.detection.config import config_to_dict
from lungdet.detection.detector import file_sha256, load_trained_model, to_original_space
from lungdet.errors import LungdetError

CPU = torch.device("cpu")


# --- the model ----------------------------------------------------------------------------------


def test_load_trained_model_rebuilds_the_saved_model(trained: dict[str, Any]) -> None:
    model, config, checkpoint = load_trained_model(trained["checkpoint"], device=CPU)
    assert not model.training
    assert config == trained["config"]
    assert checkpoint["config"] == config_to_dict(trained["config"])
    state = model.state_dict()
    assert set(state) == set(checkpoint["model"])
    for key, value in checkpoint["model"].items():
        assert torch.equal(state[key], value), key


def test_load_trained_model_uses_the_layout_it_trained_in(trained: dict[str, Any]) -> None:
    model, config, _ = load_trained_model(trained["checkpoint"], device=CPU)
    assert config.channels_last
    convolution_weights = [
        parameter for parameter in model.parameters() if parameter.dim() == 4 and parameter.shape[-1] > 1
    ]
    assert convolution_weights and all(
        weight.is_contiguous(memory_format=torch.channels_last) for weight in convolution_weights
    )
    assert not all(weight.is_contiguous() for weight in convolution_weights)


def test_a_checkpoint_without_config_is_refused(trained: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "weights_only.pt"
    torch.save({"model": torch.load(trained["checkpoint"], weights_only=True)["model"]}, path)
    with pytest.raises(
        LungdetError, match=re.escape(f"{path}: has no 'config' entry; is it a lungdet checkpoint (RUN/best.pt)?")
    ):
        load_trained_model(path, device=CPU)


def test_a_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LungdetError, match=re.escape(f"{tmp_path / 'best.pt'}: checkpoint not found")):
        load_trained_model(tmp_path / "best.pt", device=CPU)


# --- boxes back to DICOM pixels -----------------------------------------------------------------


def test_to_original_space_scales_each_axis_and_filters_by_score() -> None:
    # XYXY [8, 8, 24, 40] at 64 px is XYWH [8, 8, 16, 32]; a 128-row x 256-column DICOM scales
    # x by 256 / 64 = 4 and y by 128 / 64 = 2: [32, 16, 64, 64]. The 0.3 box is below the cut-off.
    output = {
        "boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0], [0.0, 0.0, 32.0, 32.0]]),
        "scores": torch.tensor([0.9, 0.3]),
        "labels": torch.tensor([1, 1]),
    }
    prediction = to_original_space(output, image_size=64, rows=128, columns=256, score_threshold=0.5)
    np.testing.assert_allclose(prediction.scores, [0.9], rtol=1e-6)
    np.testing.assert_allclose(prediction.boxes, [[32.0, 16.0, 64.0, 64.0]])


def test_to_original_space_keeps_a_score_equal_to_the_threshold() -> None:
    output = {
        "boxes": torch.tensor([[0.0, 0.0, 32.0, 16.0]]),
        "scores": torch.tensor([0.25]),
        "labels": torch.tensor([1]),
    }
    prediction = to_original_space(output, image_size=64, rows=128, columns=256, score_threshold=0.25)
    np.testing.assert_allclose(prediction.boxes, [[0.0, 0.0, 128.0, 32.0]])
    assert to_original_space(output, image_size=64, rows=128, columns=256, score_threshold=0.26).boxes.shape == (0, 4)


def test_to_original_space_takes_bf16_outputs() -> None:
    """Under bf16 autocast the heads may return bf16 scores, which numpy cannot hold."""
    output = {
        "boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0]], dtype=torch.bfloat16),
        "scores": torch.tensor([0.75], dtype=torch.bfloat16),
        "labels": torch.tensor([1]),
    }
    prediction = to_original_space(output, image_size=64, rows=128, columns=256, score_threshold=0.5)
    np.testing.assert_allclose(prediction.scores, [0.75])
    np.testing.assert_allclose(prediction.boxes, [[32.0, 16.0, 64.0, 64.0]])


def test_model_input_repeats_the_conversion_then_resizes_to_the_model(tmp_path: Path) -> None:
    """A dataset converted at 128 px with histogram equalisation: predict must equalise at 128 px, then shrink to 64."""
    import cv2

    from lungdet.data_tools.dicom_io import find_dicoms, read_dicom
    from lungdet.data_tools.pixels import prepare_pixels
    from lungdet.detection.detector import model_input_for
    from lungdet.detection.runtime import to_model_input

    synth = write_synthetic_dataset(tmp_path / "synth", count=1, seed=4, positive_fraction=1.0, size=(200, 300))
    image = read_dicom(find_dicoms(synth.images_dir)[0])
    tensor = model_input_for(
        image.pixels, image_size=64, preprocessing={"image_size": 128, "normalization": "equalize"}
    )
    equalised_at_128 = cv2.equalizeHist(cv2.resize(image.pixels, (128, 128), interpolation=cv2.INTER_AREA))
    expected = to_model_input(cv2.resize(equalised_at_128, (64, 64), interpolation=cv2.INTER_AREA))
    assert torch.equal(tensor, expected)
    # Without normalisation the input differs, so the test would notice a predict that skipped it.
    plain = model_input_for(image.pixels, image_size=64, preprocessing={"image_size": 128, "normalization": "none"})
    assert not torch.equal(plain, expected)
    assert torch.equal(
        plain,
        to_model_input(
            cv2.resize(
                prepare_pixels(image.pixels, image_size=128, normalization="none"),
                (64, 64),
                interpolation=cv2.INTER_AREA,
            )
        ),
    )


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"x" * (3 << 20) + b"tail")  # over the 1 MiB read size
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
