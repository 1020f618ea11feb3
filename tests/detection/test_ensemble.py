"""Tests for detection/ensemble.py: one model over a folder with a bad file (predict_dicoms), and TTA's passes (predict_raw).

Several checkpoints, post-processing and any number of loader workers, through ``lungdet predict``, are in test_predict.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungdet.detection.detector import load_trained_model
from lungdet.detection.ensemble import predict_dicoms, predict_raw
from lungdet.detection.prepared_images import read_any_input
from lungdet.detection.runtime import Precision
from lungdet.detection.tta import hflip_back

CPU = torch.device("cpu")


# --- a folder of DICOMs -------------------------------------------------------------------------


def test_predict_dicoms_gives_every_file_a_row_and_lists_the_bad_one(
    trained: dict[str, Any], dicom_dir: Path, good_stems: list[str], dicom_shape: tuple[int, int]
) -> None:
    model, config, _ = load_trained_model(trained["checkpoint"], device=CPU)
    paths = sorted(dicom_dir.glob("*.dcm"))
    predictions, bad = predict_dicoms(
        model, paths, image_size=config.model.image_size, device=CPU, score_threshold=0.0, batch_size=2, progress=False
    )

    assert sorted(predictions) == sorted(["corrupt-0000", *good_stems])
    assert [path.name for path, _ in bad] == ["corrupt-0000.dcm"]
    assert "not a DICOM file" in bad[0][1]
    assert predictions["corrupt-0000"].boxes.shape == (0, 4)
    rows, columns = dicom_shape
    for stem in good_stems:
        boxes = predictions[stem].boxes
        # torchvision clips boxes to its 64 px input; scaled back, they must lie inside the DICOM.
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 0] + boxes[:, 2] <= columns + 1e-3).all()
        assert (boxes[:, 1] + boxes[:, 3] <= rows + 1e-3).all()


def test_predict_dicoms_runs_the_network_under_the_given_precision(
    trained: dict[str, Any], dicom_dir: Path, good_stems: list[str]
) -> None:
    model, config, _ = load_trained_model(trained["checkpoint"], device=CPU)
    paths = [dicom_dir / f"{stem}.dcm" for stem in good_stems]
    seen: list[torch.dtype] = []
    hook = model.backbone.register_forward_hook(
        lambda _module, _inputs, features: seen.append(next(iter(features.values())).dtype)
    )
    try:
        for precision in (None, Precision("cpu", torch.bfloat16)):
            predictions, _ = predict_dicoms(
                model,
                paths,
                image_size=config.model.image_size,
                device=CPU,
                score_threshold=0.0,
                batch_size=3,
                progress=False,
                precision=precision,
            )
            assert sorted(predictions) == good_stems
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]


# --- TTA ---------------------------------------------------------------------------------------


def test_tta_boxes_of_a_mirrored_image_map_back_to_the_original(
    serving_detector, mirrored_pair: tuple[Path, Path]
) -> None:
    """The hflip pass of an image is the plain pass of its mirror, mapped back; and the other way round."""
    rows, bad = predict_raw(
        [serving_detector], ["m"], list(mirrored_pair), read=read_any_input, tta="hflip", progress=False
    )
    assert bad == []
    passes = {(row.patient_id, row.pass_name): row.prediction for row in rows}
    assert set(passes) == {("upright", "plain"), ("upright", "hflip"), ("mirrored", "plain"), ("mirrored", "hflip")}
    assert len(passes["upright", "plain"].scores) >= 2
    for one, other in (("upright", "mirrored"), ("mirrored", "upright")):
        expected = hflip_back(passes[other, "plain"], width=1024)
        np.testing.assert_allclose(passes[one, "hflip"].boxes, expected.boxes, atol=1e-3)
        np.testing.assert_allclose(passes[one, "hflip"].scores, expected.scores, atol=1e-6)
