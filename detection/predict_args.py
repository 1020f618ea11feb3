"""The command line of ``lungdet predict`` (:mod:`lungdet.detection.predict`): every option, in four groups."""

from __future__ import annotations

import argparse
from pathlib import Path

from lungdet.cli_types import cpu_share, device_name, fraction, image_dimensions, int_in_range
from lungdet.data_tools.gate import add_allow_any_view_argument
from lungdet.detection.config import AMP_MODES
from lungdet.detection.prepared_images import default_workers
from lungdet.detection.ray_cluster import add_ray_arguments
from lungdet.detection.tta import TTA_EXAMPLE, tta_argument


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``lungdet predict``."""
    parser = argparse.ArgumentParser(
        prog="lungdet predict",
        description="Predict lung-opacity boxes for every DICOM in a folder (or given files) and write a Kaggle submission.csv "
        "(patientId,PredictionString; boxes in original pixels), raw predictions for tuning (--raw), or the JSON that "
        "lungdet serve returns for each file (--json). Several checkpoints are fused into one submission.",
        epilog="examples:\n"
        "  lungdet predict --checkpoint runs/mobilenet/best.pt --dicom-dir stage_2_test_images --out submission.csv\n"
        "  lungdet predict --checkpoint runs/cv/fold*/best.pt --tta hflip --postprocess postprocess.yaml --dicom-dir test --out submission.csv\n"
        "  lungdet predict --checkpoint runs/mobilenet/best.pt --input patient.dcm chest.png --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_input_arguments(parser)
    _add_output_arguments(parser)
    _add_postprocess_arguments(parser)
    _add_runtime_arguments(parser)
    return parser


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The models (--checkpoint) and the X-rays: --dicom-dir, --image-dir or --input, one of them."""
    parser.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        required=True,
        help="one or more checkpoints from lungdet train (RUN/best.pt), or exports from lungdet export (model.onnx runs in onnxruntime, "
        "a TorchScript file in torch.jit); several are fused with weighted boxes fusion",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dicom-dir", type=Path, help="folder with .dcm files (searched recursively)")
    source.add_argument(
        "--image-dir",
        type=Path,
        help="folder with {patientId}.png|.jpg X-rays (searched recursively), instead of DICOMs",
    )
    source.add_argument(
        "--input",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="X-ray files: DICOM (any extension or none), PNG or JPEG, told apart by content; patientId is the file stem",
    )
    source.add_argument(
        "--input-list",
        type=Path,
        metavar="LIST",
        help="a text file naming one X-ray file per line (as --input takes them), for archives too big for a command line",
    )
    add_allow_any_view_argument(parser)


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """What is written: a submission, raw predictions, JSON, DICOM results, probabilities (and the tags and pixel space they use)."""
    parser.add_argument("--out", type=Path, help="submission CSV to write")
    parser.add_argument(
        "--metadata",
        type=Path,
        metavar="CSV",
        help="patientId plus any of PatientAge,PatientSex,ViewPosition (as lungdet convert --metadata): the view, sex and age of PNG/JPEG "
        "X-rays, for a model whose image head uses them (over a DICOM's own tags where both say something)",
    )
    parser.add_argument(
        "--label-space",
        type=image_dimensions,
        default=None,
        metavar="WxH",
        help="write boxes in this pixel space (WIDTHxHEIGHT) instead of each image's own, e.g. 1024x1024 for RSNA-scored predictions on resized "
        "PNG/JPEG copies (as lungdet convert --label-space)",
    )
    parser.add_argument(
        "--raw",
        type=Path,
        help="also (or only) write raw predictions: every box of every model and pass, for lungdet tune (see submission/raw_predictions.py)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per file on its own line, in input order: what lungdet serve's /api/v1/detect returns "
        '(a file that cannot be read gets {"error": {"kind", "message"}} in its place, and the exit status is 2); '
        "one checkpoint, no --tta",
    )
    parser.add_argument(
        "--dicom-out",
        type=Path,
        metavar="DIR",
        help="also write, for every input DICOM, DIR/{stem}_sr.dcm: a DICOM Structured Report (TID 1500) of its boxes in the image's own "
        "study, for a PACS (needs pip install 'lungdet[dicom]'); see show/dicom_results.py for what goes in",
    )
    parser.add_argument(
        "--dicom-out-overlay",
        action="store_true",
        help="with --dicom-out: also DIR/{stem}_overlay.dcm, a Secondary Capture of the X-ray with the boxes and the research-use notice burnt in",
    )
    parser.add_argument(
        "--dicom-out-gsps",
        action="store_true",
        help="with --dicom-out: also DIR/{stem}_gsps.dcm, a Grayscale Softcopy Presentation State that GSPS-capable viewers draw over the "
        "untouched X-ray (boxes, confidences, the research-use notice, lungdet's window)",
    )
    parser.add_argument(
        "--probabilities",
        type=Path,
        help="also write patientId,probability: the image-level probability of checkpoints trained with model.image_head: true (the mean over models and passes)",
    )


def _add_postprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """How the boxes are made and kept: TTA passes, the tuned post-processing, the cut-off, batch calibration."""
    parser.add_argument(
        "--tta",
        type=tta_argument,
        default="none",
        metavar="PASSES",
        help=f"test-time augmentation: a comma-separated list of extra passes, fused with the plain one: 'hflip' (mirrored), 'scaleS' "
        f"(the input at S times the model's size, S in [0.5, 2]), e.g. {TTA_EXAMPLE} (default none)",
    )
    parser.add_argument(
        "--postprocess",
        type=Path,
        help="postprocess.yaml from lungdet tune: fusion, gating, cut-off, shrink, box cap; default: the checkpoints' tuned cut-off "
        "(their mean for several) and nothing else",
    )
    parser.add_argument(
        "--score-threshold",
        type=fraction,
        default=None,
        help="keep boxes with at least this confidence, over --postprocess and the checkpoints' cut-off "
        "(with --json the image's verdict still uses the stored cut-off); never changed by lungdet, so not with --batch-calibration",
    )
    parser.add_argument(
        "--batch-calibration",
        action="store_true",
        help="re-derive --postprocess's gate and cut-off on these images so that they keep the share of gated images and the boxes per "
        "image that tuning saw. This ASSUMES the images have the training set's share of positives (an RSNA test set does; a hospital's "
        "batch, a screening population or a folder of normals does not: there it boxes a fixed share of images whatever they show). "
        "Needs 50 or more images. Default: off, every image on its own",
    )


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how fast it runs: batch size, loader workers, device, precision, progress bar."""
    parser.add_argument("--batch-size", type=int_in_range(1), default=4, help="images per forward pass (default 4)")
    parser.add_argument(
        "--workers",
        type=int_in_range(0),
        default=None,
        help=f"processes that read and prepare images while the model runs (default: the cores, here {default_workers()}; 0: in this process)",
    )
    parser.add_argument(
        "--device", type=device_name, default="auto", help="'auto' (CUDA if available), 'cpu' or 'cuda:N'"
    )
    parser.add_argument(
        "--amp",
        choices=AMP_MODES,
        default="auto",
        help="mixed precision, as train's amp key: 'auto' (default) is bf16 on GPUs and CPUs that have it, fp16 on older GPUs, else fp32",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_arguments(parser, runs="read the files in Ray tasks and run the models in Ray actors")
    parser.add_argument(
        "--ray-actors",
        type=int_in_range(1),
        default=None,
        help="with --ray: model actors, each holding every model (default: one per GPU, else one per two CPUs of the cluster)",
    )
    parser.add_argument(
        "--ray-actor-cpus",
        type=cpu_share,
        default=None,
        help="with --ray: CPUs each model actor asks Ray for, fractions allowed; torch in it runs that many threads, "
        "rounded up (default: 1 with GPUs, else each actor's share of what the reading leaves: 1.5 on 2 CPUs)",
    )
