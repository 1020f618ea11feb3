"""Tests for detection/exported.py: loading and running an export, with nothing of lungdet's training code (and, for ONNX, no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lungdet.detection.detector import load_detector
from lungdet.detection.export import MAX_BOX_DIFFERENCE_PX, MAX_SCORE_DIFFERENCE, compare_results, export_checkpoint
from lungdet.detection.exported import export_format, load_exported, load_torchscript, onnx_providers
from lungdet.errors import LungdetError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exports(serving_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exported")
    paths = {"onnx": folder / "model.onnx", "torchscript": folder / "model.ts"}
    for fmt, path in paths.items():
        export_checkpoint(serving_checkpoint, path, fmt=fmt, batch_size=2)
    return paths


def test_export_format_is_told_by_content(exports: dict[str, Path], serving_checkpoint: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "model_without_suffix"
    renamed.write_bytes(exports["onnx"].read_bytes())
    assert export_format(exports["onnx"]) == "onnx" and export_format(renamed) == "onnx"
    assert export_format(exports["torchscript"]) == "torchscript"
    assert export_format(serving_checkpoint) is None  # a torch.save zip without our extra file
    assert export_format(tmp_path / "missing.onnx") is None


def test_the_onnx_runtime_imports_neither_torch_nor_training_code(
    exports: dict[str, Path], rsna_sample_dir: Path
) -> None:
    dicom = sorted(rsna_sample_dir.glob("*.dcm"))[0]
    script = (
        "import sys\n"
        "from lungdet.data_tools.dicom_io import read_dicom\n"
        "from lungdet.detection.exported import load_exported\n"
        f"model = load_exported({str(exports['onnx'])!r}, device='cpu')\n"
        f"result = model.predict_batch([read_dicom({str(dicom)!r}).pixels])[0]\n"
        "loaded = [name for name in ('torch', 'torchvision', 'lungdet.detection.model', 'lungdet.detection.train', 'lungdet.detection.predict') if name in sys.modules]\n"
        "print(len(result.prediction.scores), loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    count, loaded = done.stdout.split(" ", 1)
    assert int(count) > 0 and loaded.strip() == "[]"


def test_predict_batch_runs_any_number_of_images_on_a_fixed_batch_graph(
    exports: dict[str, Path], serving_checkpoint: Path
) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (200 + 10 * index, 180), dtype=np.uint8) for index in range(5)]
    eager = load_detector(serving_checkpoint, device="cpu", amp="none").predict_batch(images)
    for fmt, path in exports.items():
        model = load_exported(path, device="cpu")
        assert model.metadata["input"]["shape"] == [2, 128, 128] and len(model.metadata["output_names"]) == 6
        results = model.predict_batch(images)
        assert len(results) == 5, fmt  # 2 + 2 + 1 padded with a blank image
        # The claim under test: an image's result does not depend on its batch or its place in it.
        alone = [model.predict_batch([image])[0] for image in images]
        batching = compare_results(alone, results, cut_off=0.0)  # every box, down to the floor
        assert batching.count_mismatches == 0 and batching.boxes >= 5, (fmt, batching)
        assert batching.max_box_px <= 1e-3 and batching.max_score <= 1e-5, (fmt, batching)
        # Against eager torch: noise through an untrained model lands on the runtimes' float
        # differences, which vary with the CPU's kernels (CI measured 1.2e-3 once), so scores get
        # twice the self-check's tolerance here; test_export.py holds the real X-rays to it.
        parity = compare_results(eager, results, cut_off=0.0)
        assert parity.count_mismatches == 0 and parity.max_box_px <= MAX_BOX_DIFFERENCE_PX, (fmt, parity)
        assert parity.max_score <= 2 * MAX_SCORE_DIFFERENCE, (fmt, parity)


def test_without_onnxruntime_an_onnx_export_says_what_to_install(
    exports: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(
        LungdetError,
        match=r"^running an ONNX export needs onnxruntime, which is not installed; pip install 'lungdet\[onnx\]'",
    ):
        load_detector(exports["onnx"], device="cpu")


def test_an_onnx_file_without_lungdet_metadata_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(LungdetError, match=r"foreign.onnx: has no lungdet metadata.*export it with lungdet export"):
        load_exported(path, device="cpu")


def test_a_newer_or_incomplete_metadata_is_refused(exports: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(exports["onnx"]))
    [entry] = [entry for entry in model.metadata_props if entry.key == "lungdet"]
    metadata = json.loads(entry.value)
    for change, message in (({"format_version": 99}, "newer than this lungdet reads"), ({"preprocessing": None}, None)):
        document = {**metadata, **change}
        if message is None:
            del document["preprocessing"]
            message = "lacks preprocessing"
        entry.value = json.dumps(document)
        path = tmp_path / "changed.onnx"
        onnx.save(model, str(path))
        with pytest.raises(LungdetError, match=message):
            load_exported(path, device="cpu")


def test_an_unreadable_onnx_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07 not a protobuf at all")
    with pytest.raises(LungdetError, match=r"broken.onnx: onnxruntime cannot load it"):
        load_exported(path, device="cpu")


def test_onnx_providers_follow_the_device() -> None:
    cpu_only, with_cuda = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("cpu", with_cuda) == ["CPUExecutionProvider"]
    assert onnx_providers("auto", cpu_only) == ["CPUExecutionProvider"]
    assert onnx_providers("auto", with_cuda) == with_cuda
    assert onnx_providers("cuda:1", with_cuda) == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    with pytest.raises(LungdetError, match="this onnxruntime has no CUDA provider.*pip install onnxruntime-gpu"):
        onnx_providers("cuda", cpu_only)
    with pytest.raises(LungdetError, match="use 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        onnx_providers("tpu", with_cuda)


def test_a_torchscript_trace_refuses_another_device(exports: dict[str, Path]) -> None:
    with pytest.raises(
        LungdetError, match=r"traced on cpu.*use --device cpu, or export again with lungdet export --device cuda"
    ):
        load_torchscript(exports["torchscript"], device="cuda")
    assert load_torchscript(exports["torchscript"], device="auto").device == "cpu"


def test_an_export_runs_in_float32_only(exports: dict[str, Path]) -> None:
    with pytest.raises(
        LungdetError, match=r"model.onnx: an onnx export runs in float32 as it was exported; drop --amp bf16"
    ):
        load_detector(exports["onnx"], device="cpu", amp="bf16")
    detector = load_detector(exports["onnx"], device="cpu", amp="none")
    assert (detector.precision_name, detector.device, detector.format, detector.image_threshold) == (
        "fp32",
        "cpu",
        "onnx",
        None,
    )
