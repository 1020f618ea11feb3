"""``lungdet predict``: run a trained checkpoint on DICOMs and write a Kaggle ``submission.csv``.

One row per DICOM (``patientId`` = file stem), rows sorted by patientId; PredictionString groups
``confidence x y width height`` in the DICOM's *original* pixels (boxes are predicted at
``model.image_size`` and scaled back per axis), empty when nothing passes the cut-off.
Run: ``lungdet predict --checkpoint runs/r50/best.pt --dicom-dir stage_2_test_images --out submission.csv``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lungdet.boxes import scale_xywh
from lungdet.cli_types import cpu_share, device_name, fraction, image_dimensions, int_in_range
from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.gate import ALLOW_ANY_VIEW_WARNING, is_refusal
from lungdet.data_tools.image_io import find_images, read_input_list
from lungdet.data_tools.metadata import ImageTags, MetadataTable, read_metadata_csv
from lungdet.detection.config import AMP_MODES
from lungdet.detection.detector import Detector, load_detector
from lungdet.detection.ensemble import predict_raw
from lungdet.detection.prepared_images import default_workers, input_reader
from lungdet.detection.ray_cluster import add_ray_arguments
from lungdet.detection.tta import TTA_EXAMPLE, parse_tta, tta_argument
from lungdet.errors import ImageReadError, LungdetError
from lungdet.submission.postprocess import (
    FAR_FROM_EXPECTED_FACTOR,
    PostprocessConfig,
    PostprocessResult,
    apply_postprocess,
    load_postprocess,
    mean_probability,
)
from lungdet.submission.prediction_string import Prediction, write_submission
from lungdet.submission.raw_predictions import RawPrediction, group_by_patient, write_raw_predictions
from lungdet.submission.score import write_probabilities


def check_unique_patient_ids(paths: Sequence[Path]) -> None:
    """A submission has one row per patientId (the file stem); two files with one stem would be ambiguous."""
    first_seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in first_seen:
            raise LungdetError(
                f"{first_seen[path.stem]} and {path} have the same patientId '{path.stem}'; "
                "a submission needs one row per patient, so keep one of them (or predict the folders separately)"
            )
        first_seen[path.stem] = path


def model_names(paths: Sequence[Path]) -> list[str]:
    """A short, distinct name per checkpoint for raw predictions: its run folder ('fold0'), else the whole path."""
    folders = [Path(path).parent.name or Path(path).stem for path in paths]
    return folders if len(set(folders)) == len(folders) else [str(path) for path in paths]


def read_file_bytes(path: Path) -> bytes:
    """The bytes of an input file; a file that cannot be read is an ``ImageReadError`` (kind 'missing'), like an unreadable image."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ImageReadError(
            path, f"cannot be read ({error.strerror or error}); check the path", kind="missing"
        ) from None


def to_label_space(row: RawPrediction, label_space: tuple[int, int]) -> RawPrediction:
    """``row`` with its boxes scaled from the image's own pixels to ``label_space`` ``(width, height)``, which becomes its size."""
    width, height = label_space
    boxes = scale_xywh(row.prediction.boxes, scale_x=width / row.width, scale_y=height / row.height)
    return replace(row, width=width, height=height, prediction=Prediction(row.prediction.scores, boxes))


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
    parser.add_argument(
        "--allow-any-view",
        action="store_true",
        help="turn off the check that refuses DICOMs whose tags say they are not frontal chest radiographs (CT, MR, a lateral "
        "view, another body part): for sites whose tags are wrong; the boxes on such images mean nothing",
    )


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


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot work, before any model is loaded."""
    if args.json and (args.out or args.raw):
        raise LungdetError("--json prints to the screen; drop --out/--raw, or drop --json to write files")
    if not (args.json or args.out or args.raw or args.probabilities or args.dicom_out):
        raise LungdetError(
            "nothing to write: give --out submission.csv, --raw raw.csv, --probabilities probs.csv, --dicom-out DIR, or --json"
        )
    if args.label_space is not None and (args.json or args.dicom_out):
        raise LungdetError(
            "--label-space rescales the boxes of a submission or raw predictions; --json and --dicom-out keep each image's own pixels"
        )
    if args.dicom_out_overlay and args.dicom_out is None:
        raise LungdetError("--dicom-out-overlay adds overlays to --dicom-out DIR; give --dicom-out too")
    if args.dicom_out_gsps and args.dicom_out is None:
        raise LungdetError("--dicom-out-gsps adds presentation states to --dicom-out DIR; give --dicom-out too")
    if args.json and args.dicom_out:
        raise LungdetError("--json prints to the screen; drop --dicom-out, or drop --json to write files")
    if args.dicom_out is not None:
        try:
            import lungdet.show.dicom_results  # noqa: F401  fails now, not after the models have run
        except ImportError as error:
            raise LungdetError(f"--dicom-out: {error}") from None
    if args.json and args.probabilities:
        raise LungdetError(
            "--json already gives each image's verdict; drop --probabilities, or drop --json to write files"
        )
    if args.batch_calibration and args.score_threshold is not None:
        raise LungdetError(
            "--batch-calibration would replace your --score-threshold with a cut-off derived from the batch; drop one of them"
        )
    if args.batch_calibration and args.postprocess is None:
        raise LungdetError(
            "--batch-calibration re-derives the settings of a --postprocess file from lungdet tune (it needs the operating point tune wrote); give --postprocess"
        )
    if args.ray is not None and args.json:
        raise LungdetError(
            "--json answers one file at a time, as lungdet serve does; drop --ray, or write files (--out)"
        )
    if (args.ray_actors is not None or args.ray_actor_cpus is not None or args.verbose) and args.ray is None:
        raise LungdetError("--ray-actors, --ray-actor-cpus and --verbose set how --ray runs; give --ray too")
    if args.json and (len(args.checkpoint) > 1 or len(parse_tta(args.tta)) > 1):
        raise LungdetError(
            "--json answers as lungdet serve does, with one checkpoint and no --tta; write a submission (--out) to fuse several"
        )


def predict_json(args: argparse.Namespace, paths: Sequence[Path]) -> int:
    """``--json``: one file at a time through :mod:`lungdet.detection.detect`, the code ``lungdet serve`` runs."""
    # Imported here: detect pulls in the image readers and drawing code that a folder submission does not need.
    from lungdet.detection.detect import detect_bytes, detection_json, error_json

    detector = load_detector(args.checkpoint[0], device=args.device, amp=args.amp)
    given_tags = read_given_tags(args.metadata, paths)
    failed: list[tuple[Path, str]] = []
    for path in tqdm(paths, desc="predict", unit="file", disable=None if not args.no_progress else True):
        try:
            detection = detect_bytes(
                detector,
                read_file_bytes(path),
                name=str(path),
                tags=(given_tags or {}).get(Path(path).stem),
                gate=not args.allow_any_view,
            )
        except ImageReadError as error:
            failed.append((path, error.reason))
            print(json.dumps(error_json(error)), flush=True)
            continue
        print(
            json.dumps(detection_json(detection, detector_info=detector.info, min_confidence=args.score_threshold)),
            flush=True,
        )
    say_bad_inputs(failed, written_empty=False)
    return 2 if failed else 0


def write_dicom_out(
    args: argparse.Namespace,
    paths: Sequence[Path],
    bad: Sequence[tuple[Path, str]],
    predictions: Mapping[str, Prediction],
    groups: Mapping[str, Sequence[RawPrediction]],
    detectors: Sequence[Detector],
    cut_off: float,
) -> None:
    """``--dicom-out``: a report (and overlay) per readable input DICOM, with the boxes the submission has."""
    from lungdet import lungdet_version
    from lungdet.show.dicom_derived import model_identity
    from lungdet.show.dicom_results import write_results_for_files

    unreadable = {Path(path) for path, _ in bad}
    model = model_identity(
        lungdet_version(), [d.architecture for d in detectors], [d.checkpoint_sha256 for d in detectors], cut_off
    )
    results = [
        (
            Path(path),
            predictions.get(Path(path).stem, Prediction.empty()),
            mean_probability(groups.get(Path(path).stem, [])),
        )
        for path in paths
        if Path(path) not in unreadable
    ]
    written, skipped = write_results_for_files(
        args.dicom_out,
        results,
        model,
        overlay=args.dicom_out_overlay,
        gsps=args.dicom_out_gsps,
        progress=not args.no_progress,
    )
    counts = {
        suffix: sum(path.name.endswith(f"_{suffix}.dcm") for path in written) for suffix in ("sr", "overlay", "gsps")
    }
    extras = [f"{counts['overlay']} overlay(s)"] * args.dicom_out_overlay + [
        f"{counts['gsps']} presentation state(s)"
    ] * args.dicom_out_gsps
    print(
        f"wrote {counts['sr']} DICOM report(s){''.join(f' and {extra}' for extra in extras)} to {args.dicom_out} (research use only)"
    )
    for path, reason in skipped:
        print(f"  no DICOM report for {path}: {reason}", file=sys.stderr)


def read_given_tags(path: Path | None, paths: Sequence[Path]) -> dict[str, ImageTags] | None:
    """``--metadata``'s tags by patientId, with one line on how many inputs it does not cover and on rows it could not read."""
    if path is None:
        return None
    table: MetadataTable = read_metadata_csv(path)
    uncovered = sum(Path(item).stem not in table.tags for item in paths)
    if uncovered:
        print(
            f"note: {path} has no row for {uncovered} of {len(paths)} input(s); their view, sex and age are what the file says (unknown for PNG/JPEG)"
        )
    for problem in table.problems[:5]:
        print(f"  {problem['file']}: {problem['reason']}", file=sys.stderr)
    return table.tags


def report_operating_point(result: PostprocessResult) -> None:
    """Say what calibration did, and the boxes per image beside what tuning expected; warn in one line when they are far apart."""
    if result.note:
        print(result.note)
    line = result.expectation_line()
    if line:
        print(line)
    if result.far_from_expected():
        print(
            f"warning: {result.boxes_per_image:.3f} boxes per image is more than {FAR_FROM_EXPECTED_FACTOR:g}x from tuning's {result.applied.tuning.expected_boxes_per_image:.3f}: "
            "these images or models are unlike the ones the post-processing was tuned on",
            file=sys.stderr,
        )


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet predict`` with parsed arguments; returns the exit status (0 on success).

    With ``--json`` it returns :func:`predict_json`'s status, 2 when a file could not be read. Otherwise an unreadable
    file is listed on stderr and, in the submission, gets a row with no boxes.
    """
    check_outputs(args)
    paths = _input_paths(args)
    if args.allow_any_view:
        print(ALLOW_ANY_VIEW_WARNING, file=sys.stderr)
    if args.json:
        return predict_json(args, paths)
    check_unique_patient_ids(paths)
    # Read before the models load, so a bad file fails in a second.
    postprocess_file = _read_postprocess_file(args)
    given_tags = read_given_tags(args.metadata, paths)
    detectors = _load_detectors(args)
    postprocess_config = _postprocess_config(args, postprocess_file, detectors)
    journal = None
    if args.ray is not None:
        rows, bad, journal = _predict_on_ray(args, detectors, paths, given_tags)
    else:
        rows, bad = predict_raw(
            detectors,
            model_names(args.checkpoint),
            paths,
            read=input_reader(_reader_kind(args), gate=not args.allow_any_view),
            tags=given_tags,
            tta=args.tta,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            workers=default_workers() if args.workers is None else args.workers,
        )
    if args.label_space is not None:
        rows = [to_label_space(row, args.label_space) for row in rows]
    _write_raw_outputs(args, rows, detectors)
    if args.out is not None or args.dicom_out is not None:
        result = apply_postprocess(rows, postprocess_config)
        predictions, postprocess_config = result.predictions, result.applied
        report_operating_point(result)
    if args.dicom_out is not None:
        write_dicom_out(
            args, paths, bad, predictions, group_by_patient(rows), detectors, postprocess_config.score_threshold
        )
    if args.out is not None:
        _write_submission_file(args, predictions, bad, detectors, postprocess_config)
    say_bad_inputs(bad, written_empty=args.out is not None)
    if journal is not None:
        journal.remove()  # every output is written: the per-file results have served
    return 0


def _reader_kind(args: argparse.Namespace) -> str:
    """'dicom' for ``--dicom-dir``, else 'any' (DICOM, PNG or JPEG told apart by content)."""
    return "dicom" if args.dicom_dir is not None else "any"


def bad_input_counts(bad: Sequence[tuple[Path, str]]) -> str:
    """'; N refused (not frontal chest radiographs), M unreadable' for the summary line; '' when every input was read."""
    refused = sum(is_refusal(reason) for _, reason in bad)
    parts = [f"{refused} refused (not frontal chest radiographs)"] * bool(refused) + [
        f"{len(bad) - refused} unreadable"
    ] * bool(len(bad) - refused)
    return f"; {', '.join(parts)}" if parts else ""


def say_bad_inputs(bad: Sequence[tuple[Path, str]], *, written_empty: bool) -> None:
    """One stderr line per input that was refused by the frontal-chest gate or could not be read, with why."""
    note = ", written with no boxes" if written_empty else ""
    for path, reason in bad:
        print(f"  {'refused' if is_refusal(reason) else 'unreadable'}{note}: {path}: {reason}", file=sys.stderr)


def _predict_on_ray(
    args: argparse.Namespace,
    detectors: Sequence[Detector],
    paths: Sequence[Path],
    given_tags: Mapping[str, ImageTags] | None,
) -> tuple[list[RawPrediction], list[tuple[Path, str]], Any]:
    """``--ray``: the raw predictions from a Ray cluster, with the journal that holds them until the outputs are written."""
    from lungdet.detection.ray_predict import RayRun, predict_raw_on_ray, results_path  # Ray only when asked for

    run = RayRun(
        address=args.ray or None,
        checkpoints=list(args.checkpoint),
        names=model_names(args.checkpoint),
        reader=_reader_kind(args),
        gate=not args.allow_any_view,
        passes=parse_tta(args.tta),
        device=args.device,
        amp=args.amp,
        batch_size=args.batch_size,
        actors=args.ray_actors,
        actor_cpus=args.ray_actor_cpus,
        journal=results_path([args.out, args.raw, args.probabilities, args.dicom_out]),
        verbose=args.verbose,
        progress=not args.no_progress,
    )
    return predict_raw_on_ray(run, detectors, paths, tags=given_tags)


def _input_paths(args: argparse.Namespace) -> list[Path]:
    """The files to predict: ``--input`` as given, else the images or DICOMs found under the folder (none is an error)."""
    if args.input is not None:
        return list(args.input)
    if args.input_list is not None:
        return read_input_list(args.input_list)
    if args.image_dir is not None:
        paths = find_images(args.image_dir)
        if not paths:
            raise LungdetError(f"{args.image_dir}: no .png or .jpg files found")
        return paths
    paths = find_dicoms(args.dicom_dir)
    if not paths:
        raise LungdetError(f"{args.dicom_dir}: no .dcm files found")
    return paths


def _read_postprocess_file(args: argparse.Namespace) -> PostprocessConfig | None:
    """``--postprocess``'s settings, or None; a file asking for batch calibration beside ``--score-threshold`` is refused."""
    postprocess_config = load_postprocess(args.postprocess) if args.postprocess is not None else None
    if (
        postprocess_config is not None
        and postprocess_config.calibration == "batch"
        and args.score_threshold is not None
    ):
        raise LungdetError(
            f"{args.postprocess} says calibration: batch, which would replace your --score-threshold with a cut-off derived from the batch; "
            "drop --score-threshold, or set calibration: off in the file"
        )
    return postprocess_config


def _load_detectors(args: argparse.Namespace) -> list[Detector]:
    """Every ``--checkpoint``, loaded; ``--probabilities`` needs at least one with an image-level head.

    With ``--ray`` the actors run the models where ``--device`` says; the driver only reads what the
    models say of themselves (input size, cut-offs, identity), so it loads them on its CPU in fp32 and
    needs no GPU of its own (a CPU-only head node drives GPU workers).
    """
    on_driver_only = args.ray is not None
    device, amp = ("cpu", "none") if on_driver_only else (args.device, args.amp)
    detectors = [load_detector(path, device=device, amp=amp) for path in args.checkpoint]
    if args.probabilities is not None and all(detector.image_threshold is None for detector in detectors):
        raise LungdetError(
            f"{', '.join(map(str, args.checkpoint))}: no image-level head (trained without model.image_head: true), so there are no probabilities "
            "to write; train with model.image_head=true, or drop --probabilities"
        )
    return detectors


def _postprocess_config(
    args: argparse.Namespace, postprocess_config: PostprocessConfig | None, detectors: Sequence[Detector]
) -> PostprocessConfig:
    """The post-processing to apply: the file's (else the checkpoints' mean cut-off), then the command line's overrides."""
    if postprocess_config is None:
        postprocess_config = PostprocessConfig(
            score_threshold=float(np.mean([detector.score_threshold for detector in detectors]))
        )
    if args.score_threshold is not None:
        postprocess_config.score_threshold = args.score_threshold
    if args.batch_calibration:
        postprocess_config.calibration = "batch"
    return postprocess_config


def _write_raw_outputs(args: argparse.Namespace, rows: Sequence[RawPrediction], detectors: Sequence[Detector]) -> None:
    """``--raw`` (every box of every model and pass) and ``--probabilities`` (the mean per image), where asked for."""
    if args.raw is not None:
        written = write_raw_predictions(args.raw, rows)
        print(
            f"wrote {args.raw}: {written} raw rows ({len(detectors)} model(s) x {len(parse_tta(args.tta))} pass(es) per image)"
        )
    if args.probabilities is not None:
        groups = group_by_patient(rows)
        write_probabilities(
            args.probabilities, {patient: mean_probability(groups[patient]) for patient in sorted(groups)}
        )
        print(f"wrote {args.probabilities}: {len(groups)} image probabilities")


def _write_submission_file(
    args: argparse.Namespace,
    predictions: dict[str, Prediction],
    bad: Sequence[tuple[Path, str]],
    detectors: Sequence[Detector],
    postprocess_config: PostprocessConfig,
) -> None:
    """``--out``: the submission, a row per input (an unreadable one with no boxes), sorted, and a line saying what it holds."""
    for path, _ in bad:  # Kaggle wants a row per image
        predictions[Path(path).stem] = Prediction.empty()
    write_submission(args.out, {patient_id: predictions[patient_id] for patient_id in sorted(predictions)})
    with_boxes = sum(prediction.boxes.shape[0] > 0 for prediction in predictions.values())
    fused = f", {len(detectors)} models fused" if len(detectors) > 1 else ""
    # Under --ray the driver's copies ran nothing: say where the actors were told to run.
    ran_on = (
        f"Ray actors, --device {args.device} --amp {args.amp}"
        if args.ray is not None
        else f"{detectors[0].device}, {detectors[0].precision_name}"
    )
    extra = [tta_pass.name for tta_pass in parse_tta(args.tta)[1:]]
    tta = f", TTA {'+'.join(extra)}" if extra else ""
    print(
        f"wrote {args.out}: {len(predictions)} rows, {with_boxes} with boxes "
        f"(confidence >= {postprocess_config.score_threshold:g}{fused}{tta}; {ran_on}){bad_input_counts(bad)}"
    )
