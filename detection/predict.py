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
from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.gate import ALLOW_ANY_VIEW_WARNING, bad_input_counts, bad_input_lines
from lungdet.data_tools.image_io import find_images, read_input_list
from lungdet.data_tools.metadata import ImageTags, MetadataTable, read_metadata_csv
from lungdet.detection.detector import Detector, load_detector
from lungdet.detection.ensemble import predict_raw
from lungdet.detection.predict_args import get_args_parser  # noqa: F401  (lungdet.cli calls predict.get_args_parser)
from lungdet.detection.prepared_images import default_workers, input_reader
from lungdet.detection.tta import parse_tta
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


def say_bad_inputs(bad: Sequence[tuple[Path, str]], *, written_empty: bool) -> None:
    """One stderr line per input the frontal-chest gate refused or that could not be read, with why."""
    for line in bad_input_lines(bad, written_empty=written_empty):
        print(line, file=sys.stderr)


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
