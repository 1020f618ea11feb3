"""Running a model written by ``lungdet export``: ONNX through onnxruntime, TorchScript through ``torch.jit``.

An export is self-describing: its metadata (ONNX ``metadata_props`` key ``lungdet``, or the
TorchScript extra file ``lungdet.json``; the same JSON document) says how to prepare an image,
what comes out, and which cut-offs were tuned. :func:`load_exported` reads that and returns an
:class:`ExportedModel`, which answers like a checkpoint loaded for ``lungdet predict``.

Nothing here imports lungdet's training code, and the ONNX path does not import torch at all:
numpy, OpenCV and onnxruntime run it. The TorchScript path needs torch and torchvision (the
graph calls torchvision's NMS and RoI Align operators), still not lungdet's model code.

The batch size is fixed at export (the tracing exporter unrolls torchvision's per-image loops),
so :meth:`ExportedModel.predict_prepared` runs any number of images in chunks of that size,
padding the last one with blank images whose outputs are dropped.
"""

from __future__ import annotations

import contextlib
import json
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungdet.data_tools.metadata import ImageTags
from lungdet.detection.inference import ImageResult, PreparedInputRunner, ProbabilityMap, image_result
from lungdet.errors import LungdetError

METADATA_KEY = "lungdet"
TORCHSCRIPT_METADATA_FILE = "lungdet.json"
METADATA_FORMAT = "lungdet-export"
METADATA_VERSION = 1
FORMATS = ("onnx", "torchscript")
# The first byte of an ONNX file: ModelProto field 1 (ir_version) as a varint, tag (1 << 3) | 0.
ONNX_FIRST_BYTE = b"\x08"
INSTALL_ONNX = "pip install 'lungdet[onnx]' (or: pip install onnxruntime)"
# What every export's metadata must hold for lungdet to run it.
REQUIRED_METADATA = (
    "format",
    "format_version",
    "architecture",
    "image_size",
    "batch_size",
    "input",
    "output_names",
    "outputs_per_image",
    "preprocessing",
    "score_threshold",
    "image_threshold",
    "source_checkpoint",
)


def export_format(path: Path) -> str | None:
    """'onnx' or 'torchscript' for a file ``lungdet export`` wrote (told by content), None for anything else (a checkpoint)."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            # torch.save checkpoints are zip archives too; a TorchScript export carries our extra file.
            with zipfile.ZipFile(path) as archive:
                return (
                    "torchscript"
                    if any(name.endswith(f"/extra/{TORCHSCRIPT_METADATA_FILE}") for name in archive.namelist())
                    else None
                )
        with open(path, "rb") as stream:
            first = stream.read(1)
    except OSError:
        return None  # the caller's own open reports a missing or unreadable file
    return "onnx" if path.suffix.lower() == ".onnx" or first == ONNX_FIRST_BYTE else None


def check_metadata(metadata: Any, *, source: Path) -> dict[str, Any]:
    """``metadata`` if it is a lungdet export's, else a LungdetError naming the file and what is missing."""
    if not isinstance(metadata, dict) or metadata.get("format") != METADATA_FORMAT:
        raise LungdetError(
            f"{source}: has no lungdet metadata, so lungdet cannot know how to prepare its input; export it with lungdet export"
        )
    if metadata["format_version"] > METADATA_VERSION:
        raise LungdetError(
            f"{source}: export format version {metadata['format_version']} is newer than this lungdet reads ({METADATA_VERSION}); upgrade lungdet"
        )
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise LungdetError(
            f"{source}: lungdet metadata lacks {', '.join(missing)}; export it again with lungdet export"
        )
    return metadata


def read_torchscript_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a TorchScript export, read from its zip archive (no torch needed)."""
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if name.endswith(f"/extra/{TORCHSCRIPT_METADATA_FILE}")]
        if not names:
            raise LungdetError(
                f"{path}: a zip archive without extra/{TORCHSCRIPT_METADATA_FILE}; export it with lungdet export --format torchscript"
            )
        return check_metadata(json.loads(archive.read(names[0])), source=path)


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise LungdetError(
            f"running an ONNX export needs onnxruntime, which is not installed; {INSTALL_ONNX}"
        ) from None
    return onnxruntime


def onnx_providers(device: str, available: Sequence[str]) -> list[Any]:
    """onnxruntime execution providers for ``device`` ('auto', 'cpu', 'cuda' or 'cuda:N'), CPU always last as the fallback."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        return (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if "CUDAExecutionProvider" in available
            else ["CPUExecutionProvider"]
        )
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise LungdetError(f"--device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if "CUDAExecutionProvider" not in available:
        raise LungdetError(
            f"--device {device}: this onnxruntime has no CUDA provider (it has {', '.join(available)}); "
            "pip install onnxruntime-gpu, or use --device cpu"
        )
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]


@dataclass
class ExportedModel(PreparedInputRunner):
    """An export, loaded: ``run`` maps uint8 ``[batch_size, S, S]`` to the graph's outputs, in ``metadata['output_names']`` order."""

    path: Path
    format: str
    metadata: dict[str, Any]
    run: Callable[[np.ndarray], Sequence[Any]]
    device: str

    @property
    def image_size(self) -> int:
        """The square side, in pixels, of the graph's input (fixed at export)."""
        return int(self.metadata["image_size"])

    @property
    def batch_size(self) -> int:
        """The images per forward pass, fixed at export; :meth:`predict_prepared` pads a short chunk to it."""
        return int(self.metadata["batch_size"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What ``lungdet convert`` did to the training images (``image_size``, ``normalization``): a copy."""
        return dict(self.metadata["preprocessing"])

    @property
    def has_image_head(self) -> bool:
        """Whether the graph also outputs the image head's probability (``image_probability_i``)."""
        return "image_probability" in self.metadata["outputs_per_image"]

    @property
    def probability_map(self) -> ProbabilityMap:
        """The image head's metadata term and Platt scaling, applied to the graph's probability outside it (exports before them had neither)."""
        weights, platt = self.metadata.get("image_metadata_weights"), self.metadata.get("image_calibration")
        return ProbabilityMap(
            tuple(float(value) for value in weights) if weights is not None else None,
            tuple(float(value) for value in platt) if platt else None,
        )

    @property
    def metadata_weights(self) -> tuple[float, ...] | None:
        """The image head's metadata weights (one per ``METADATA_FEATURES`` entry); None without them."""
        return self.probability_map.metadata_weights

    def predict_prepared(
        self, batch: Any, shapes: Sequence[tuple[int, int]], tags: Sequence[ImageTags] | None = None
    ) -> list[ImageResult]:
        """Inputs from :meth:`prepare` stacked (uint8 ``[N, S, S]``, numpy or a CPU tensor) and each original ``(rows, columns)``.

        ``tags`` (one per image; None: all unknown) go into an image head with metadata, as for a checkpoint.
        """
        inputs = np.asarray(batch, dtype=np.uint8)
        tags = list(tags) if tags is not None else [ImageTags()] * len(inputs)
        probability_map = self.probability_map
        per_image = list(self.metadata["outputs_per_image"])
        results: list[ImageResult] = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            real = len(chunk)
            if real < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - real, *chunk.shape[1:]), dtype=np.uint8)])
            outputs = dict(zip(self.metadata["output_names"], self.run(np.ascontiguousarray(chunk)), strict=True))
            for index in range(real):
                values = {name: np.asarray(outputs[f"{name}_{index}"]) for name in per_image}
                rows, columns = shapes[start + index]
                probability = (
                    probability_map.apply(float(values["image_probability"]), tags[start + index])
                    if "image_probability" in values
                    else None
                )
                results.append(
                    image_result(
                        values["boxes"],
                        values["scores"],
                        probability,
                        image_size=self.image_size,
                        rows=rows,
                        columns=columns,
                    )
                )
        return results


def load_onnx(path: Path, *, device: str = "auto", threads: int | None = None) -> ExportedModel:
    """An ONNX export in an onnxruntime session on ``device``; ``threads`` caps onnxruntime's intra-op threads (default: all cores)."""
    onnxruntime = _onnxruntime()
    providers = onnx_providers(device, onnxruntime.get_available_providers())
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
        raise LungdetError(
            f"{path}: onnxruntime cannot load it ({str(error).splitlines()[0][:200]}); export it again with lungdet export"
        ) from None
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    metadata = check_metadata(json.loads(raw) if raw else None, source=path)
    input_name = metadata["input"]["name"]
    output_names = list(metadata["output_names"])

    def run(images: np.ndarray) -> list[np.ndarray]:
        return session.run(output_names, {input_name: images})

    used = session.get_providers()[0]
    return ExportedModel(Path(path), "onnx", metadata, run, "cuda" if used == "CUDAExecutionProvider" else "cpu")


def without_torchscript_deprecation() -> contextlib.AbstractContextManager:
    """torch 2.14 warns that TorchScript is deprecated in favour of torch.export on every save and load.

    torch.export cannot take these detectors (see detection/export.py), and a user can do
    nothing about the warning, so it is silenced around our own calls only.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\..* is deprecated")
    return stack


def load_torchscript(path: Path, *, device: str = "auto") -> ExportedModel:
    """A TorchScript export on the device it was traced on (a trace records the device of the tensors it makes)."""
    metadata = read_torchscript_metadata(path)
    import torch
    import torchvision  # noqa: F401  registers torchvision::nms and roi_align, which the graph calls

    traced_on = str(metadata.get("traced_on", "cpu"))
    wanted = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if wanted.split(":")[0] != traced_on.split(":")[0]:
        if device == "auto":
            wanted = traced_on
        else:
            raise LungdetError(
                f"{path}: traced on {traced_on}, and a TorchScript trace runs where it was traced; "
                f"use --device {traced_on}, or export again with lungdet export --device {wanted.split(':')[0]}"
            )
    with without_torchscript_deprecation():
        module = torch.jit.load(str(path), map_location=wanted).eval()

    @torch.no_grad()
    def run(images: np.ndarray) -> list[np.ndarray]:
        outputs = module(torch.from_numpy(images).to(wanted))
        return [output.cpu().numpy() for output in outputs]

    return ExportedModel(Path(path), "torchscript", metadata, run, wanted)


def load_exported(path: Path, *, device: str = "auto", threads: int | None = None) -> ExportedModel:
    """Load an export by its content: ONNX (onnxruntime) or TorchScript; a LungdetError for anything else."""
    kind = export_format(path)
    if kind == "onnx":
        return load_onnx(path, device=device, threads=threads)
    if kind == "torchscript":
        return load_torchscript(path, device=device)
    raise LungdetError(f"{path}: neither an ONNX nor a TorchScript export from lungdet export")
