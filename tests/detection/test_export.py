"""Tests for detection/export.py: ``lungdet export`` writes self-describing ONNX and TorchScript files that answer as the checkpoint does.

Parity is measured on the real RSNA sample DICOMs and on synthetic ones: the same number of
boxes above the cut-off, boxes within 1 px in original pixels, scores within 1e-3 (the issue's
tolerances; docs/benchmarks.md gives the differences actually measured).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lungdet.data_tools.image_io import read_xray
from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.detection import export as export_module
from lungdet.detection.detector import file_sha256, load_detector
from lungdet.detection.export import (
    MAX_BOX_DIFFERENCE_PX,
    MAX_SCORE_DIFFERENCE,
    compare_results,
    export_checkpoint,
    get_args_parser,
    main,
)
from lungdet.detection.exported import load_exported
from lungdet.detection.inference import ImageResult
from lungdet.errors import LungdetError
from lungdet.submission.prediction_string import Prediction, read_submission

# Not convert's defaults, so a metadata writer that ignored the checkpoint would be caught.
PREPROCESSING = {"image_size": 200, "normalization": "clahe"}


@pytest.fixture(scope="module")
def head_checkpoint(serving_checkpoint_writer: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MobileNet Faster R-CNN at 128 px with an image head (with a metadata term) and clahe preprocessing; boxes and probabilities vary by image."""
    return serving_checkpoint_writer(
        tmp_path_factory.mktemp("export") / "best.pt", image_head=True, image_metadata=True, preprocessing=PREPROCESSING
    )


@pytest.fixture(scope="module")
def exports(head_checkpoint: Path) -> dict[str, Path]:
    """The checkpoint exported once per format, batch size 1."""
    paths = {"onnx": head_checkpoint.with_name("model.onnx"), "torchscript": head_checkpoint.with_name("model.ts")}
    for fmt, path in paths.items():
        export_checkpoint(head_checkpoint, path, fmt=fmt)
    return paths


@pytest.fixture(scope="module")
def parity_images(rsna_sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """The 13 real RSNA DICOMs (1024 x 1024) and 6 synthetic ones of another shape (320 x 256), decoded."""
    synth = write_synthetic_dataset(
        tmp_path_factory.mktemp("parity"), count=6, seed=11, positive_fraction=0.5, size=(320, 256)
    )
    paths = sorted(rsna_sample_dir.glob("*.dcm")) + sorted(synth.images_dir.glob("*.dcm"))
    return [read_xray(path.read_bytes(), name=path.name).pixels for path in paths]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_metadata_carries_the_checkpoints_preprocessing_cut_offs_and_identity(
    head_checkpoint: Path, exports: dict[str, Path], fmt: str
) -> None:
    checkpoint = torch.load(head_checkpoint, weights_only=True)
    metadata = load_exported(exports[fmt], device="cpu").metadata
    assert metadata["preprocessing"] == checkpoint["preprocessing"] == PREPROCESSING
    assert metadata["image_size"] == checkpoint["config"]["model"]["image_size"] == 128
    assert metadata["architecture"] == "fasterrcnn_mobilenet_v3_large_fpn"
    assert metadata["score_threshold"] == checkpoint["score_threshold"] == 0.3
    assert metadata["image_threshold"] == 0.5
    assert metadata["box_score_floor"] == checkpoint["config"]["model"]["box_score_thresh"]
    assert metadata["source_checkpoint"] == {"file": "best.pt", "sha256": file_sha256(head_checkpoint)}
    assert metadata["lungdet_version"] not in ("", None)
    assert metadata["batch_size"] == 1 and metadata["input"] == {
        **metadata["input"],
        "dtype": "uint8",
        "shape": [1, 128, 128],
    }
    assert metadata["outputs_per_image"] == ["boxes", "scores", "labels", "image_probability"]
    assert metadata["image_metadata_weights"] == pytest.approx(
        checkpoint["model"]["image_head.metadata.weight"][0].tolist()
    )
    assert metadata["image_metadata_features"][:3] == ["view AP", "view PA", "view unknown"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_adds_the_metadata_term_as_the_checkpoint_does(
    head_checkpoint: Path, exports: dict[str, Path], parity_images: list[np.ndarray], fmt: str
) -> None:
    from lungdet.data_tools.metadata import ImageTags

    images = parity_images[:4]
    tags = [
        ImageTags(view_position="AP", age=70),
        ImageTags(view_position="PA", sex="F"),
        ImageTags(sex="M"),
        ImageTags(),
    ]
    eager = load_detector(head_checkpoint, device="cpu", amp="none").predict_batch(images, tags)
    exported = load_exported(exports[fmt], device="cpu")
    parity = compare_results(eager, exported.predict_batch(images, tags), cut_off=0.3)
    assert parity.max_probability is not None and parity.max_probability <= 1e-4
    untagged = exported.predict_batch(images)
    assert (
        abs(exported.predict_batch(images, tags)[0].probability - untagged[0].probability) > 0.05
    )  # the AP term moved it


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_agrees_with_the_checkpoint_on_real_and_synthetic_dicoms(
    head_checkpoint: Path, exports: dict[str, Path], parity_images: list[np.ndarray], fmt: str
) -> None:
    eager = load_detector(head_checkpoint, device="cpu", amp="none").predict_batch(parity_images)
    exported = load_detector(exports[fmt], device="cpu")
    assert exported.format == fmt and exported.info["checkpoint_sha256"] == file_sha256(head_checkpoint)
    parity = compare_results(eager, exported.predict_batch(parity_images), cut_off=0.3)
    assert parity.images == 19 and parity.boxes > 19  # boxes on most images: the comparison has something to compare
    assert parity.count_mismatches == 0
    assert parity.max_box_px <= MAX_BOX_DIFFERENCE_PX
    assert parity.max_score <= MAX_SCORE_DIFFERENCE
    assert parity.max_probability is not None and parity.max_probability <= 1e-4


def test_a_blank_image_gives_the_same_answer_with_or_without_boxes(
    exports: dict[str, Path], head_checkpoint: Path
) -> None:
    # The trace ran on images with boxes; a black and a white image take NMS's other branches.
    images = [np.zeros((300, 300), np.uint8), np.full((300, 300), 255, np.uint8)]
    eager = load_detector(head_checkpoint, device="cpu", amp="none").predict_batch(images)
    for fmt in ("onnx", "torchscript"):
        parity = compare_results(eager, load_exported(exports[fmt], device="cpu").predict_batch(images), cut_off=0.0)
        assert parity.count_mismatches == 0 and parity.max_box_px <= MAX_BOX_DIFFERENCE_PX


@pytest.mark.parametrize("architecture", ["retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn"])
def test_other_families_export_to_onnx_and_agree(
    serving_checkpoint_writer: Callable[..., Path], tmp_path: Path, rsna_sample_dir: Path, architecture: str
) -> None:
    checkpoint = serving_checkpoint_writer(tmp_path / "best.pt", architecture=architecture, image_size=64)
    out = tmp_path / "model.onnx"
    check = sorted(rsna_sample_dir.glob("*.dcm"))[:3]
    metadata, parity = export_checkpoint(checkpoint, out, fmt="onnx", check=check)
    assert metadata["architecture"] == architecture and metadata["outputs_per_image"] == ["boxes", "scores", "labels"]
    assert parity.ok and parity.images == 3 and parity.boxes > 0
    if architecture == "maskrcnn_resnet50_fpn":  # exported as its box detector: no mask output
        assert not any(name.startswith("masks") for name in metadata["output_names"])


def test_compare_results_pairs_swapped_ties_and_counts_mismatches() -> None:
    first = ImageResult(Prediction.from_arrays([0.9, 0.9], [[0, 0, 10, 10], [50, 50, 10, 10]]))
    swapped = ImageResult(Prediction.from_arrays([0.9, 0.9], [[50, 50, 10, 10], [0.5, 0, 10, 10]]))
    parity = compare_results([first], [swapped], cut_off=0.5)
    assert (parity.count_mismatches, parity.boxes, parity.max_box_px, parity.max_score) == (0, 2, 0.5, 0.0)
    fewer = ImageResult(Prediction.from_arrays([0.9, 0.4], [[0, 0, 10, 10], [50, 50, 10, 10]]))
    assert compare_results([first], [fewer], cut_off=0.5).count_mismatches == 1
    assert not compare_results([first], [fewer], cut_off=0.5).ok


def test_an_export_that_disagrees_is_refused_and_removed(
    head_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = export_module.exportable_detector

    def drifted(checkpoint: dict) -> torch.nn.Module:
        model = build(checkpoint)
        with torch.no_grad():
            model.roi_heads.box_predictor.bbox_pred.bias.add_(0.5)  # every box moves by a few pixels
        return model

    monkeypatch.setattr(export_module, "exportable_detector", drifted)
    out = tmp_path / "drifted.onnx"
    with pytest.raises(LungdetError, match=r"drifted.onnx: the export disagrees with .*best.pt .*it was removed"):
        export_checkpoint(head_checkpoint, out, fmt="onnx")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_exporter_failure_is_one_clear_error(
    head_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Unsupported: prim::SomethingNew\nlong trace follows")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(LungdetError) as caught:
        export_checkpoint(head_checkpoint, tmp_path / "model.onnx", fmt="onnx")
    message = str(caught.value)
    assert (
        "fasterrcnn_mobilenet_v3_large_fpn could not be exported to onnx (RuntimeError: Unsupported: prim::SomethingNew)"
        in message
    )
    assert "retinanet_resnet50_fpn" in message and "long trace" not in message
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_onnx_export_without_the_onnx_package_says_what_to_install(
    head_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(
        LungdetError, match=r"needs the onnx package, which is not installed; pip install 'lungdet\[onnx\]'"
    ):
        export_checkpoint(head_checkpoint, tmp_path / "model.onnx", fmt="onnx")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "cuda"], "export it on the CPU"),
        (["--out", "SAME"], "is the checkpoint itself"),
        (["--check", "missing.dcm"], "--check missing.dcm: cannot be read"),
    ],
)
def test_cli_refuses_bad_options(
    head_checkpoint: Path, tmp_path: Path, extra: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        torch.cuda, "is_available", lambda: True
    )  # so --device cuda reaches the format check on a CPU machine
    argv = ["--checkpoint", str(head_checkpoint), "--format", "onnx", "--out", "model.onnx", *extra]
    argv = [str(head_checkpoint) if value == "SAME" else value for value in argv]
    with pytest.raises(LungdetError, match=message):
        main(get_args_parser().parse_args(argv))
    assert not (tmp_path / "model.onnx").exists()


def test_cli_reports_the_export_and_predict_writes_the_same_submission(
    head_checkpoint: Path, rsna_sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cli.onnx"
    assert (
        main(
            get_args_parser().parse_args(["--checkpoint", str(head_checkpoint), "--format", "onnx", "--out", str(out)])
        )
        == 0
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert "lungdet export: tracing fasterrcnn_mobilenet_v3_large_fpn at 128 px, batch 1, on cpu ..." in captured.err
    assert "lungdet export: checking cli.onnx against best.pt on 4 synthetic images ..." in captured.err
    assert f"wrote {out}: fasterrcnn_mobilenet_v3_large_fpn as onnx" in printed
    assert "input uint8 [1, 128, 128], cut-off 0.3, image head (cut-off 0.5)" in printed
    assert "checked against" in printed and "0 images with another box count" in printed

    from lungdet.detection.predict import get_args_parser as predict_parser
    from lungdet.detection.predict import main as predict_main

    submissions = {}
    for name, model in (("checkpoint", head_checkpoint), ("onnx", out)):
        submissions[name] = tmp_path / f"{name}.csv"
        argv = [
            "--checkpoint",
            str(model),
            "--dicom-dir",
            str(rsna_sample_dir),
            "--out",
            str(submissions[name]),
            "--amp",
            "none",
            "--no-progress",
        ]
        assert predict_main(predict_parser().parse_args(argv)) == 0
    assert "cpu, fp32" in capsys.readouterr().out
    eager, exported = read_submission(submissions["checkpoint"]), read_submission(submissions["onnx"])
    assert list(eager) == list(exported) and len(eager) == 13
    for patient_id, prediction in eager.items():
        assert exported[patient_id].boxes.shape == prediction.boxes.shape
        # The CSV rounds boxes to 0.1 px and confidences to 1e-4, so a 1e-4 px difference may show as 0.1.
        np.testing.assert_allclose(exported[patient_id].boxes, prediction.boxes, atol=0.1 + 1e-6)
        np.testing.assert_allclose(exported[patient_id].scores, prediction.scores, atol=1e-4 + 1e-9)


def test_metadata_json_is_readable_from_the_files_alone(exports: dict[str, Path]) -> None:
    # What a deploying site sees without lungdet: the ONNX metadata_props and the TorchScript zip entry.
    import zipfile

    import onnx

    props = {
        entry.key: entry.value for entry in onnx.load(str(exports["onnx"]), load_external_data=False).metadata_props
    }
    with zipfile.ZipFile(exports["torchscript"]) as archive:
        [name] = [name for name in archive.namelist() if name.endswith("extra/lungdet.json")]
        from_zip = json.loads(archive.read(name))
    from_onnx = json.loads(props["lungdet"])
    for document in (from_onnx, from_zip):
        assert document["format"] == "lungdet-export" and document["preprocessing"] == PREPROCESSING
        assert "research use only" in document["notice"]
    assert from_onnx["exporter"].endswith("torch.onnx.export(dynamo=False), opset 17") and from_zip[
        "exporter"
    ].endswith("torch.jit.trace")
