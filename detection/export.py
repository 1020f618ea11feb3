"""``lungdet export``: a trained checkpoint as one self-describing ONNX or TorchScript file, checked against the checkpoint.

Sites that run a detector beside their archive run an exported graph, not a training
environment. The file holds the graph and, as metadata (see :mod:`lungdet.detection.exported`), how to
prepare an image, what comes out, the tuned cut-offs, the architecture, the source checkpoint's
sha256 and the lungdet version. ``lungdet predict`` and ``lungdet serve`` take it in place of a
checkpoint.

The graph takes uint8 ``[batch, S, S]`` (the prepared grey image, see
:func:`~lungdet.detection.inference.prepare_input`) and does the rest inside: scaling to [0, 1], the
three channels, torchvision's normalisation, the network, NMS. It gives per image ``boxes_i``
(XYXY at S pixels, float32 ``[n, 4]``), ``scores_i``, ``labels_i`` (1 = lung opacity) and, with an
image head, ``image_probability_i``. Every box down to the model's floor is kept; the tuned
cut-off is in the metadata, applied outside, as for a checkpoint.

The model is exported as torchvision builds it: lungdet's batched training heads and the CPU
sparse RoI pooling are training-speed replacements that compute the same thing, so the export
is rebuilt without them. Mask R-CNN is exported as its box detector: lungdet's outputs are
boxes, and the mask branch (which trained the shared features) is left out of the graph.

Exporter: both formats come from ``torch.jit.trace`` of that model (for ONNX, through
``torch.onnx.export(dynamo=False)``, opset 17). The newer ``dynamo=True`` exporter goes through
``torch.export``, which stops at torchvision's NMS: the number of boxes it keeps depends on the
data ("Could not guard on data-dependent expression ... _batched_nms_coordinate_trick", torch
2.14). Tracing keeps data-dependent box counts (torchvision scripts those functions when traced)
but unrolls the per-image loops, so the batch size is fixed at export (``--batch-size``);
lungdet's runtime pads a short last batch. The image size is fixed too: the model's input is
always ``S x S``.

Run: ``lungdet export --checkpoint runs/r50/best.pt --format onnx --out r50.onnx``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from lungdet import lungdet_version
from lungdet.atomic import atomic_path
from lungdet.cli_types import device_name, int_in_range
from lungdet.data_tools.image_io import read_xray_file
from lungdet.data_tools.metadata import METADATA_FEATURES
from lungdet.data_tools.synth import generate_case
from lungdet.detection.config import MODEL_ARCHITECTURES, config_from_dict
from lungdet.detection.detector import (
    ModelRunner,
    file_sha256,
    model_from_checkpoint,
    probability_map_of,
    read_trained_checkpoint,
)
from lungdet.detection.exported import (
    FORMATS,
    INSTALL_ONNX,
    METADATA_FORMAT,
    METADATA_KEY,
    METADATA_VERSION,
    TORCHSCRIPT_METADATA_FILE,
    load_exported,
    without_torchscript_deprecation,
)
from lungdet.detection.image_head import IMAGE_PROBABILITY, has_image_head
from lungdet.detection.inference import ImageResult, prepare_input
from lungdet.detection.runtime import resolve_device
from lungdet.errors import ImageReadError, LungdetError

ONNX_OPSET = 17
INPUT_NAME = "images"
# Parity the self-check demands of an export against its checkpoint (and tests/detection/test_export.py): a pixel
# of box and a thousandth of confidence change no RSNA match and no cut-off decision; exports measure far tighter.
MAX_BOX_DIFFERENCE_PX = 1.0
MAX_SCORE_DIFFERENCE = 1e-3
# Synthetic chest X-rays the self-check runs when no --check files are given: positives, so there are boxes to compare.
SELF_CHECK_IMAGES = 4
SELF_CHECK_SIZE = (1024, 1024)
LABEL_NAMES = {"1": "lung_opacity"}
DICOM_CONVERSION = (
    "lungdet's DICOM reading (data_tools.dicom_io): the first frame, rescale slope/intercept, the VOI window "
    "(WindowCenter/Width, else the 0.5th-99.5th percentiles) to 8 bits, MONOCHROME1 inverted, colour to grey"
)


class ExportGraph(nn.Module):
    """uint8 ``[batch, S, S]`` -> per image the detector's outputs, flattened to a tuple (see the module docstring)."""

    def __init__(self, detector: nn.Module, outputs_per_image: Sequence[str]) -> None:
        super().__init__()
        self.detector = detector
        self.outputs_per_image = tuple(outputs_per_image)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 ``[batch, S, S]`` -> each image's ``outputs_per_image`` in turn, as one flat tuple.

        Boxes are XYXY float32 ``[n, 4]`` at S pixels, scores ``[n]``, labels ``[n]`` and, with an image head, its
        probability ``[]``.
        """
        # The same arithmetic as ModelRunner.predict_prepared, so eager and exported runs see the same floats.
        inputs = images.float().div(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
        outputs = self.detector(list(inputs.unbind(0)))
        return tuple(output[name] for output in outputs for name in self.outputs_per_image)


def exportable_detector(checkpoint: dict[str, Any]) -> nn.Module:
    """The checkpoint's model as torchvision builds it (no batched heads, no sparse RoI pooling, no mask branch), in eval mode on the CPU."""
    model, _ = model_from_checkpoint(checkpoint, batched_heads=False)
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None and roi_heads.has_mask():
        roi_heads.mask_roi_pool = roi_heads.mask_head = roi_heads.mask_predictor = None
    return model.eval()


def example_batch(image_size: int, batch_size: int, preprocessing: dict[str, Any], *, seed: int = 0) -> np.ndarray:
    """Synthetic chest X-rays with opacities, prepared as the model's input: what the trace runs."""
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            prepare_input(
                generate_case(rng, size=SELF_CHECK_SIZE, positive=True).pixels,
                image_size=image_size,
                preprocessing=preprocessing,
            )
            for _ in range(batch_size)
        ]
    )


def metadata_weights_of(checkpoint: dict[str, Any]) -> list[float] | None:
    """The image head's metadata weights as stored in a checkpoint's state dict, None without them."""
    weights = checkpoint["model"].get("image_head.metadata.weight")
    return None if weights is None else [float(value) for value in weights.float().reshape(-1)]


def build_metadata(
    checkpoint: dict[str, Any],
    *,
    checkpoint_path: Path,
    checkpoint_sha256: str,
    fmt: str,
    batch_size: int,
    outputs_per_image: Sequence[str],
    traced_on: str,
) -> dict[str, Any]:
    """The JSON document every export carries: enough to prepare an image, read the outputs and apply the tuned cut-offs."""
    config = config_from_dict(checkpoint["config"])
    image_size = config.model.image_size
    output_names = [f"{name}_{index}" for index in range(batch_size) for name in outputs_per_image]
    return {
        "format": METADATA_FORMAT,
        "format_version": METADATA_VERSION,
        "lungdet_version": lungdet_version(),
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "exporter": f"torch {torch.__version__}, torchvision {torchvision.__version__}: "
        + (f"torch.onnx.export(dynamo=False), opset {ONNX_OPSET}" if fmt == "onnx" else "torch.jit.trace"),
        "architecture": config.model.architecture,
        "image_size": image_size,
        "batch_size": batch_size,
        "traced_on": traced_on,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": [batch_size, image_size, image_size],
            "meaning": "grey X-rays prepared as 'preprocessing' says; the graph scales to [0, 1], repeats the channel and normalises",
        },
        "output_names": output_names,
        "outputs_per_image": list(outputs_per_image),
        "outputs": {
            "boxes": f"float32 [n, 4], x1 y1 x2 y2 at {image_size} px; scale x by columns/{image_size} and y by rows/{image_size} for original pixels",
            "scores": "float32 [n], descending, down to box_score_floor",
            "labels": "int64 [n]; see 'labels'",
            IMAGE_PROBABILITY: "float32 [], the image-level head's probability that the image has an opacity",
        },
        "labels": LABEL_NAMES,
        "preprocessing": dict(checkpoint.get("preprocessing") or {}),
        "preprocessing_steps": [
            "decode to 8-bit grey [rows, columns]: " + DICOM_CONVERSION,
            "if preprocessing.image_size: resize to it, square, cv2.INTER_AREA (what lungdet convert wrote)",
            "apply preprocessing.normalization: none | clahe (clip 2, 8x8 tiles) | equalize (cv2.equalizeHist)",
            f"resize to image_size ({image_size}) square with cv2.INTER_AREA if not already",
        ],
        "score_threshold": float(checkpoint.get("score_threshold", 0.5)),
        "image_threshold": float(checkpoint.get("image_threshold", 0.5))
        if IMAGE_PROBABILITY in outputs_per_image
        else None,
        # An image head trained with the view, sex and age: its term is added to the graph's probability
        # outside the graph, so the export keeps one image input (see lungdet.detection.inference.with_metadata).
        "image_metadata_weights": metadata_weights_of(checkpoint) if IMAGE_PROBABILITY in outputs_per_image else None,
        "image_metadata_features": list(METADATA_FEATURES),
        # Platt scaling fitted on validation, applied after the metadata term (see lungdet.submission.platt).
        "image_calibration": list(checkpoint["image_calibration"])
        if checkpoint.get("image_calibration") and IMAGE_PROBABILITY in outputs_per_image
        else None,
        "box_score_floor": config.model.box_score_thresh,
        "source_checkpoint": {"file": checkpoint_path.name, "sha256": checkpoint_sha256},
        "notice": "research use only; not a diagnostic device",
    }


def trace_quietly() -> contextlib.AbstractContextManager:
    """Tracing torchvision's detectors prints dozens of TracerWarnings about Python values it records as constants.

    They are expected here (image sizes, the fixed batch): the self-check, not the warnings,
    tells whether the export is right.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def write_onnx(graph: ExportGraph, example: torch.Tensor, metadata: dict[str, Any], out: Path) -> None:
    """Trace ``graph`` on ``example`` (uint8 ``[batch, S, S]``) into an ONNX file at ``out``, written atomically.

    Opset 17, outputs named by ``metadata['output_names']``; ``metadata`` goes in as JSON under the ``lungdet`` key.
    Without the onnx package, a LungdetError that says how to install it.
    """
    try:
        import onnx
    except ImportError:
        raise LungdetError(f"--format onnx needs the onnx package, which is not installed; {INSTALL_ONNX}") from None
    with atomic_path(out) as temporary:
        with trace_quietly():
            torch.onnx.export(
                graph,
                (example,),
                str(temporary),
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=[INPUT_NAME],
                output_names=metadata["output_names"],
            )
        model = onnx.load(str(temporary))
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata, indent=1)
        model.producer_name, model.producer_version = "lungdet", metadata["lungdet_version"]
        model.doc_string = "lungdet lung-opacity detector; research use only, not a diagnostic device. Metadata key 'lungdet' says how to run it."
        onnx.save(model, str(temporary))


def write_torchscript(graph: ExportGraph, example: torch.Tensor, metadata: dict[str, Any], out: Path) -> None:
    """Trace ``graph`` on ``example`` (uint8 ``[batch, S, S]``) into a TorchScript file at ``out``, written atomically.

    ``metadata`` goes in as the extra file ``lungdet.json``. The trace records the device of ``example``: the file runs
    there only.
    """
    with trace_quietly():
        traced = torch.jit.trace(graph, (example,), check_trace=False)
    with atomic_path(out) as temporary, without_torchscript_deprecation():
        torch.jit.save(traced, str(temporary), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(metadata, indent=1)})


@dataclass(frozen=True)
class Parity:
    """How an export's answers differ from the checkpoint's on the same images."""

    images: int
    boxes: int  # boxes above the cut-off, counted on the checkpoint's side
    count_mismatches: int  # images whose number of boxes above the cut-off differs
    max_box_px: float  # largest coordinate difference between matched boxes, original pixels
    max_score: float  # largest confidence difference between matched boxes
    max_probability: float | None  # largest image-probability difference; None without an image head

    @property
    def ok(self) -> bool:
        """Whether the export agrees: the same box counts, boxes within 1 px, scores within 1e-3.

        The image probability's difference is reported, not checked.
        """
        return (
            self.count_mismatches == 0
            and self.max_box_px <= MAX_BOX_DIFFERENCE_PX
            and self.max_score <= MAX_SCORE_DIFFERENCE
        )

    def describe(self) -> str:
        """One line for the user: images and boxes compared, box-count mismatches, and the largest differences."""
        probability = "" if self.max_probability is None else f", image probability within {self.max_probability:.1e}"
        return (
            f"{self.images} images, {self.boxes} boxes above the cut-off: {self.count_mismatches} images with another box count, "
            f"boxes within {self.max_box_px:.2g} px, scores within {self.max_score:.1e}{probability}"
        )


def compare_results(reference: Sequence[ImageResult], candidate: Sequence[ImageResult], *, cut_off: float) -> Parity:
    """Compare two models' answers image by image: box counts above ``cut_off``, and each reference box against its nearest candidate box.

    Boxes are paired by nearest coordinates rather than by rank, so two boxes whose confidences
    tie to within rounding (and so may swap places) still pair with themselves.
    """
    mismatches, boxes, max_box, max_score, max_probability = 0, 0, 0.0, 0.0, None
    for ours, theirs in zip(reference, candidate, strict=True):
        keep_ours = ours.prediction.scores >= cut_off
        keep_theirs = theirs.prediction.scores >= cut_off
        mismatches += int(keep_ours.sum() != keep_theirs.sum())
        boxes += int(keep_ours.sum())
        unmatched = list(range(len(theirs.prediction.scores)))
        for box, score in zip(ours.prediction.boxes[keep_ours], ours.prediction.scores[keep_ours], strict=True):
            if not unmatched:
                break
            distances = [float(np.abs(theirs.prediction.boxes[index] - box).max()) for index in unmatched]
            nearest = unmatched.pop(int(np.argmin(distances)))
            max_box = max(max_box, min(distances))
            max_score = max(max_score, abs(float(theirs.prediction.scores[nearest]) - float(score)))
        if ours.probability is not None and theirs.probability is not None:
            max_probability = max(max_probability or 0.0, abs(ours.probability - theirs.probability))
    return Parity(len(reference), boxes, mismatches, max_box, max_score, max_probability)


def check_images(paths: Sequence[Path], *, seed: int = 1) -> list[np.ndarray]:
    """The self-check's images: the decoded ``paths`` (DICOM, PNG or JPEG), else synthetic chest X-rays with opacities."""
    if not paths:
        rng = np.random.default_rng(seed)
        return [generate_case(rng, size=SELF_CHECK_SIZE, positive=True).pixels for _ in range(SELF_CHECK_IMAGES)]
    images = []
    for path in paths:
        try:
            images.append(read_xray_file(path).pixels)
        except ImageReadError as error:
            raise LungdetError(f"--check {path}: {error.reason}") from None
    return images


def export_checkpoint(
    checkpoint_path: Path,
    out: Path,
    *,
    fmt: str,
    batch_size: int = 1,
    device: str = "cpu",
    check: Sequence[Path] = (),
    say: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], Parity]:
    """Export ``checkpoint_path`` to ``out`` as ``fmt`` ('onnx' or 'torchscript'), then check it against the checkpoint.

    Returns the metadata written and the parity measured on ``check`` (or synthetic X-rays). An
    export that disagrees beyond the tolerances is removed and a LungdetError says by how much.
    ``say`` hears one line as each stage starts (tracing a ResNet-50 at 1024 px takes a while).
    """
    say = say or (lambda line: None)
    if fmt not in FORMATS:
        raise LungdetError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    checkpoint_path, out = Path(checkpoint_path), Path(out)
    if out.resolve() == checkpoint_path.resolve():
        raise LungdetError(f"--out {out} is the checkpoint itself; give the export another name")
    images = check_images(check)  # a bad --check file fails before any work
    checkpoint = read_trained_checkpoint(checkpoint_path)
    torch_device = resolve_device(device)
    if fmt == "onnx" and torch_device.type != "cpu":
        raise LungdetError(
            "--device: an ONNX graph does not depend on where it was traced; export it on the CPU (drop --device) and run it anywhere"
        )
    model = exportable_detector(checkpoint)
    outputs_per_image = ["boxes", "scores", "labels"] + ([IMAGE_PROBABILITY] if has_image_head(model) else [])
    metadata = build_metadata(
        checkpoint,
        checkpoint_path=checkpoint_path,
        checkpoint_sha256=file_sha256(checkpoint_path),
        fmt=fmt,
        batch_size=batch_size,
        outputs_per_image=outputs_per_image,
        traced_on=torch_device.type,
    )
    graph = ExportGraph(model, outputs_per_image).to(torch_device).eval()
    example = torch.from_numpy(example_batch(metadata["image_size"], batch_size, metadata["preprocessing"])).to(
        torch_device
    )
    say(
        f"tracing {metadata['architecture']} at {metadata['image_size']} px, batch {batch_size}, on {torch_device.type} ..."
    )
    try:
        with torch.no_grad():
            (write_onnx if fmt == "onnx" else write_torchscript)(graph, example, metadata, out)
    except LungdetError:
        raise
    except Exception as error:  # the exporters raise many types; the user needs the first line and what does export
        raise LungdetError(
            f"{checkpoint_path}: {metadata['architecture']} could not be exported to {fmt} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
            f"lungdet's tests export every architecture it trains ({', '.join(MODEL_ARCHITECTURES)}), so this is a bug worth reporting"
        ) from None
    say(
        f"checking {out.name} against {checkpoint_path.name} on {len(images)} {'given' if check else 'synthetic'} images ..."
    )
    parity = check_export(checkpoint, out, device=str(torch_device), images=images, cut_off=metadata["score_threshold"])
    if not parity.ok:
        out.unlink(missing_ok=True)
        raise LungdetError(
            f"{out}: the export disagrees with {checkpoint_path} ({parity.describe()}; allowed: equal counts, "
            f"{MAX_BOX_DIFFERENCE_PX:g} px, {MAX_SCORE_DIFFERENCE:g}); it was removed"
        )
    return metadata, parity


def check_export(
    checkpoint: dict[str, Any], out: Path, *, device: str, images: Sequence[np.ndarray], cut_off: float
) -> Parity:
    """Run ``images`` through the checkpoint's model (fp32, as built, on the export's device) and through the export."""
    model, config = model_from_checkpoint(checkpoint)
    torch_device = torch.device(device)
    runner = ModelRunner(
        model.to(torch_device).eval(),
        config.model.image_size,
        torch_device,
        dict(checkpoint.get("preprocessing") or {}),
        None,
        probability_map_of(model, checkpoint),
    )
    exported = load_exported(out, device=device)
    return compare_results(runner.predict_batch(list(images)), exported.predict_batch(list(images)), cut_off=cut_off)


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``lungdet export``."""
    parser = argparse.ArgumentParser(
        prog="lungdet export",
        description="Export a trained checkpoint to ONNX (for onnxruntime) or TorchScript, as one file that carries its preprocessing, "
        "tuned cut-offs, architecture, the checkpoint's sha256 and the lungdet version. The export is then run beside the checkpoint "
        "and must agree with it (same boxes above the cut-off, within 1 px and 1e-3), or it is removed. lungdet predict and "
        "lungdet serve take the file in place of a checkpoint.",
        epilog="examples:\n"
        "  lungdet export --checkpoint runs/r50/best.pt --format onnx --out r50.onnx\n"
        "  lungdet export --checkpoint runs/r50/best.pt --format torchscript --out r50.ts --batch-size 8 --check sample/*.dcm\n"
        "  lungdet predict --checkpoint r50.onnx --dicom-dir stage_2_test_images --out submission.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint from lungdet train (RUN/best.pt)")
    parser.add_argument(
        "--format", choices=FORMATS, required=True, help="onnx (needs pip install 'lungdet[onnx]') or torchscript"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="the file to write (model.onnx, model.ts); written whole or not at all"
    )
    parser.add_argument(
        "--batch-size",
        type=int_in_range(1),
        default=1,
        help="images per forward pass, fixed in the graph by the tracing exporter (default 1); lungdet pads a short last batch",
    )
    parser.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="TorchScript only: the device the trace will run on ('cpu', 'cuda'); a trace records it. ONNX runs anywhere (default cpu)",
    )
    parser.add_argument(
        "--check",
        type=Path,
        nargs="+",
        default=[],
        metavar="FILE",
        help=f"X-rays (DICOM, PNG, JPEG) to compare the export and the checkpoint on (default: {SELF_CHECK_IMAGES} synthetic ones)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet export`` with parsed arguments; returns the exit status (0 on success).

    Progress goes to stderr, the written file and its measured parity to stdout; an export that disagrees with the
    checkpoint is removed and raises LungdetError (see :func:`export_checkpoint`).
    """
    metadata, parity = export_checkpoint(
        args.checkpoint,
        args.out,
        fmt=args.format,
        batch_size=args.batch_size,
        device=args.device,
        check=args.check,
        say=lambda line: print(f"lungdet export: {line}", file=sys.stderr, flush=True),
    )
    size_mb = args.out.stat().st_size / 2**20
    print(
        f"wrote {args.out}: {metadata['architecture']} as {args.format}, {size_mb:.1f} MiB, input uint8 "
        f"[{metadata['batch_size']}, {metadata['image_size']}, {metadata['image_size']}], cut-off {metadata['score_threshold']:g}"
        + ("" if metadata["image_threshold"] is None else f", image head (cut-off {metadata['image_threshold']:g})")
    )
    print(f"  checked against {args.checkpoint}: {parity.describe()}")
    return 0
