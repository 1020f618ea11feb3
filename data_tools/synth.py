"""Synthetic RSNA-like data: chest-X-ray-looking DICOMs plus labels CSVs in the RSNA format.

For tests, the demo and volume benchmarks when the real 3.5 GB dataset is not at hand. The files
are shaped like the real ones (JPEG Baseline 8-bit, Secondary Capture, Modality CR, the same tag
set, ``PatientAge`` as a plain integer string) and the labels follow the statistics of the real
``stage_2_train_labels.csv``, embedded below so that nothing real is needed at run time. The
images are drawings, not radiographs: never use them to judge a model's clinical performance. The
drawing itself is :mod:`lungdet.data_tools.synth_chest`; this module decides what to draw and
writes the files.

Run::

    lungdet synth --out /tmp/synth --count 200 --seed 0

which writes ``/tmp/synth/stage_2_train_images/{patientId}.dcm``,
``/tmp/synth/stage_2_train_labels.csv`` and ``/tmp/synth/stage_2_detailed_class_info.csv``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from tqdm import tqdm

from lungdet.atomic import write_bytes_atomic, write_text_atomic
from lungdet.boxes import as_box_array, iou_matrix_xywh
from lungdet.cli_types import fraction, image_dimensions, int_in_range
from lungdet.data_tools.labels import NORMAL_CLASS, NOT_NORMAL_CLASS, POSITIVE_CLASS, format_labels_csv
from lungdet.data_tools.synth_chest import (
    draw_opacities,
    draw_side_marker,
    lung_region_xyxy,
    render_chest,
    sample_anatomy,
)
from lungdet.errors import LungdetError

# ---------------------------------------------------------------------------------------------
# Statistics of the real data.
# Derived once with pandas from the real stage_2_train_labels.csv (the full
# RSNA stage 2 training labels: 26,684 patients, 9,555 boxes, 1024x1024 pixel space) and
# stage_2_detailed_class_info.csv, unless a comment says otherwise.
# ---------------------------------------------------------------------------------------------

# 6,012 of 26,684 patients have at least one box.
REAL_POSITIVE_FRACTION = 0.2253
# Boxes per positive image: 2,614 have 1, 3,266 have 2, 119 have 3, 13 have 4.
BOXES_PER_POSITIVE_PROBABILITIES = {1: 0.4348, 2: 0.5432, 3: 0.0198, 4: 0.0022}
# Median box width and height in 1024 pixels over all 9,555 boxes (tests compare against these).
REAL_BOX_WIDTH_MEDIAN_1024 = 217.0
REAL_BOX_HEIGHT_MEDIAN_1024 = 298.0
# Median (width, height) by the number of boxes in the image: single boxes are smaller, and
# pairs (one per lung) are tall.
BOX_MEDIAN_WIDTH_HEIGHT_BY_COUNT_1024 = {1: (201.0, 230.0), 2: (225.0, 352.0), 3: (171.0, 203.0), 4: (163.5, 171.5)}
# Spread of log(width), log(height) and their correlation (a log-normal fit).
BOX_LOG_WIDTH_STD = 0.291
BOX_LOG_HEIGHT_STD = 0.514
BOX_LOG_WIDTH_HEIGHT_CORRELATION = 0.611
# Box centres as fractions of the image: centre x median 319 px for boxes in the image's left
# half (patient's right lung), 714 px in the right half, IQR about 79 px on each side (std 58 px);
# centre y median 530 px with IQR 451..608 (std 116 px) on both sides.
BOX_CENTER_X_MEDIAN_BY_SIDE = {"left": 319.0 / 1024, "right": 714.0 / 1024}
BOX_CENTER_X_STD = 58.0 / 1024
BOX_CENTER_Y_MEDIAN = 530.0 / 1024
BOX_CENTER_Y_STD = 116.0 / 1024
# 62% of single boxes are in the image's left half; 97.9% of two-box images have one box per side.
SINGLE_BOX_LEFT_FRACTION = 0.619
TWO_BOXES_BOTH_SIDES_FRACTION = 0.979
# Negatives by class: 8,851 'Normal' vs 11,821 'No Lung Opacity / Not Normal'.
NORMAL_FRACTION_OF_NEGATIVES = 0.428
# PixelSpacing (mm) of the 13 real sample DICOMs: 0.139 x2, 0.143 x5, 0.168 x3, 0.171 x1, 0.194311 x2.
PIXEL_SPACING_CHOICES_MM = (0.139, 0.143, 0.168, 0.171, 0.194311)
PIXEL_SPACING_WEIGHTS = (2, 5, 3, 1, 2)
# The tags below are not in the labels CSVs and 13 sample files are too few to estimate them, so
# these are approximate published figures, marked as such:
# - 46% AP / 54% PA over the 26,684 training images (Hosch et al., RoFo 2020, doi:10.1055/a-1183-5227);
# - about two in three positives are AP (portable films of sicker patients; public Kaggle EDA);
# - about 57% male, age mean about 47 years, std about 17 (public Kaggle EDA); the 13 samples
#   (7 M / 6 F, mean age 45.7, 6 AP / 7 PA) agree.
AP_FRACTION_OVERALL = 0.46
AP_FRACTION_OF_POSITIVES = 0.67
MALE_FRACTION = 0.57
AGE_MEAN_YEARS = 47.0
AGE_STD_YEARS = 17.0
AGE_RANGE_YEARS = (1, 92)

CLASS_OPACITY, CLASS_NORMAL, CLASS_NOT_NORMAL = POSITIVE_CLASS, NORMAL_CLASS, NOT_NORMAL_CLASS

# Tuning (not real statistics).
# Same-side boxes may overlap at most this much (IoU); the real labels rarely overlap.
_MAX_BOX_IOU = 0.05
# 90 gives files of 100..200 kB at 1024^2, like the real ones (70..190 kB).
_DEFAULT_JPEG_QUALITY = 90
IMAGES_FOLDER = "stage_2_train_images"
LABELS_FILE = "stage_2_train_labels.csv"
CLASS_INFO_FILE = "stage_2_detailed_class_info.csv"


class SynthError(LungdetError, ValueError):
    """A synthetic-data request cannot be carried out as asked."""


@dataclass(frozen=True)
class SynthCase:
    """One synthetic image with its truth.

    ``pixels`` is uint8 ``[rows, columns]`` (MONOCHROME2: bright = dense). ``boxes`` is float64
    ``[N, 4]`` XYWH_ABS in this image's pixels (N = 0 for negatives); each box is the extent of a
    drawn opacity patch. ``pixel_spacing`` is (row, column) in mm.
    """

    patient_id: str
    pixels: np.ndarray
    boxes: np.ndarray
    class_name: str
    sex: str
    age: int
    view_position: str
    pixel_spacing: tuple[float, float]

    @property
    def target(self) -> int:
        """1 when the image has at least one opacity box, else 0 (the RSNA ``Target``)."""
        return int(len(self.boxes) > 0)


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`write_synthetic_dataset` wrote."""

    out_dir: Path
    images_dir: Path
    labels_csv: Path
    class_info_csv: Path
    count: int
    positive_count: int
    box_count: int


def _plan_box(
    rng: np.random.Generator,
    *,
    side: str,
    box_count: int,
    rows: int,
    columns: int,
    region: tuple[float, float, float, float],
) -> np.ndarray:
    """One planned opacity box ``[4]`` XYWH_ABS (pixels of a rows x columns image), inside ``region`` (XYXY_ABS)."""
    median_width, median_height = BOX_MEDIAN_WIDTH_HEIGHT_BY_COUNT_1024[box_count]
    covariance = [
        [BOX_LOG_WIDTH_STD**2, BOX_LOG_WIDTH_HEIGHT_CORRELATION * BOX_LOG_WIDTH_STD * BOX_LOG_HEIGHT_STD],
        [BOX_LOG_WIDTH_HEIGHT_CORRELATION * BOX_LOG_WIDTH_STD * BOX_LOG_HEIGHT_STD, BOX_LOG_HEIGHT_STD**2],
    ]
    log_width, log_height = rng.multivariate_normal([np.log(median_width), np.log(median_height)], covariance)
    # Sizes are drawn at 1024 and scaled per axis, so boxes stretch with a non-square image.
    width = float(np.exp(log_width)) * columns / 1024
    height = float(np.exp(log_height)) * rows / 1024
    center_x = rng.normal(BOX_CENTER_X_MEDIAN_BY_SIDE[side], BOX_CENTER_X_STD) * columns
    center_y = rng.normal(BOX_CENTER_Y_MEDIAN, BOX_CENTER_Y_STD) * rows
    x1, y1, x2, y2 = region
    width = min(max(width, 0.03 * columns), x2 - x1)
    height = min(max(height, 0.03 * rows), y2 - y1)
    left = float(np.clip(center_x - width / 2, x1, x2 - width))
    top = float(np.clip(center_y - height / 2, y1, y2 - height))
    return np.array([left, top, width, height])


def _plan_sides(rng: np.random.Generator, box_count: int) -> list[str]:
    if box_count == 1:
        return ["left" if rng.random() < SINGLE_BOX_LEFT_FRACTION else "right"]
    if box_count == 2:
        if rng.random() < TWO_BOXES_BOTH_SIDES_FRACTION:
            return ["left", "right"]
        side = str(rng.choice(["left", "right"]))
        return [side, side]
    return ["left", "right"] + [str(rng.choice(["left", "right"])) for _ in range(box_count - 2)]


def _random_patient_id(rng: np.random.Generator) -> str:
    # RSNA patientIds are UUID4 strings; drawing the bytes from rng keeps them reproducible.
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def generate_case(
    rng: np.random.Generator,
    *,
    size: tuple[int, int] = (1024, 1024),
    positive: bool,
    view_position: str | None = None,
) -> SynthCase:
    """Draw one synthetic chest image and its truth.

    Parameters
    ----------
    rng
        Source of all randomness: the same generator state gives the same case.
    size
        ``(rows, columns)`` in pixels; anatomy and boxes scale with each axis.
    positive
        Whether to draw 1..4 opacities (count drawn from the real distribution).
    view_position
        'AP' or 'PA'; None draws it with the real AP/PA mix for this target.

    Returns
    -------
    SynthCase
        ``pixels`` uint8 ``[rows, columns]``, ``boxes`` ``[N, 4]`` XYWH_ABS in those pixels.
    """
    rows, columns = validate_size(size)
    patient_id = _random_patient_id(rng)
    if view_position is None:
        ap_fraction = AP_FRACTION_OF_POSITIVES if positive else _ap_fraction_of_negatives()
        view_position = "AP" if rng.random() < ap_fraction else "PA"
    if view_position not in ("AP", "PA"):
        raise ValueError(f"view_position must be 'AP' or 'PA', got {view_position!r}")
    if positive:
        class_name = CLASS_OPACITY
    else:
        class_name = CLASS_NORMAL if rng.random() < NORMAL_FRACTION_OF_NEGATIVES else CLASS_NOT_NORMAL
    sex = "M" if rng.random() < MALE_FRACTION else "F"
    age = int(np.clip(round(rng.normal(AGE_MEAN_YEARS, AGE_STD_YEARS)), *AGE_RANGE_YEARS))
    base_spacing = float(
        rng.choice(PIXEL_SPACING_CHOICES_MM, p=np.divide(PIXEL_SPACING_WEIGHTS, sum(PIXEL_SPACING_WEIGHTS)))
    )
    # Keep the field of view of a real 1024^2 film whatever the pixel count.
    pixel_spacing = (round(base_spacing * 1024 / rows, 6), round(base_spacing * 1024 / columns, 6))

    anatomy = sample_anatomy(rng, view_position=view_position, class_name=class_name)
    image = render_chest(rng, anatomy, rows=rows, columns=columns)

    planned: list[np.ndarray] = []
    if positive:
        box_count = int(
            rng.choice(list(BOXES_PER_POSITIVE_PROBABILITIES), p=list(BOXES_PER_POSITIVE_PROBABILITIES.values()))
        )
        for side in _plan_sides(rng, box_count):
            lung = anatomy.lungs[0 if side == "left" else 1]
            region = lung_region_xyxy(lung, rows=rows, columns=columns)
            for _attempt in range(20):
                box = _plan_box(rng, side=side, box_count=box_count, rows=rows, columns=columns, region=region)
                if not planned or iou_matrix_xywh(box[None], np.array(planned)).max() <= _MAX_BOX_IOU:
                    planned.append(box)
                    break
            # A box that cannot be placed without overlapping is dropped: fewer boxes, never a wrong one.
    boxes = draw_opacities(rng, image, planned, rows=rows, columns=columns) if planned else as_box_array([])

    image = anatomy.contrast * (image - 128.0) + 128.0
    image = 255.0 * (image.clip(0, 255) / 255.0) ** anatomy.gamma
    image += rng.standard_normal((rows, columns), dtype=np.float32) * anatomy.noise_std
    pixels = np.rint(image.clip(0, 255)).astype(np.uint8)
    if rng.random() < 0.5:
        draw_side_marker(pixels, rng)
    return SynthCase(
        patient_id=patient_id,
        pixels=pixels,
        boxes=boxes,
        class_name=class_name,
        sex=sex,
        age=age,
        view_position=view_position,
        pixel_spacing=pixel_spacing,
    )


def _ap_fraction_of_negatives() -> float:
    # Chosen so that the overall AP share stays AP_FRACTION_OVERALL at the real positive rate.
    return (AP_FRACTION_OVERALL - REAL_POSITIVE_FRACTION * AP_FRACTION_OF_POSITIVES) / (1.0 - REAL_POSITIVE_FRACTION)


def validate_size(size: Sequence[int]) -> tuple[int, int]:
    """Return ``size`` as ``(rows, columns)`` after checking each is an int in 64..8192."""
    if len(size) != 2:
        raise ValueError(f"size must be (rows, columns), got {size!r}")
    rows, columns = int(size[0]), int(size[1])
    for name, value in (("rows", rows), ("columns", columns)):
        if not 64 <= value <= 8192:
            raise ValueError(f"image {name} must be between 64 and 8192 pixels, got {value}")
    return rows, columns


def _uid(patient_id: str, role: str) -> str:
    # Hashing the patientId makes every UID reproducible from the seed, and unique per image.
    return generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["lungdet-synth", patient_id, role])


def encode_dicom(case: SynthCase, *, jpeg_quality: int = _DEFAULT_JPEG_QUALITY) -> bytes:
    """The bytes of a DICOM file for ``case``, with the tag set of a real RSNA training file.

    Pixels are a baseline 8-bit grey JPEG encapsulated as a single fragment with an empty basic
    offset table, as in the real files.
    """
    ok, jpeg = cv2.imencode(".jpg", case.pixels, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    if not ok:
        raise SynthError(f"{case.patient_id}: OpenCV could not JPEG-encode a {case.pixels.shape} image")
    sop_instance_uid = _uid(case.patient_id, "instance")

    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    file_meta.ImplementationVersionName = "LUNGDET_SYNTH"

    dataset = Dataset()
    dataset.file_meta = file_meta
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = sop_instance_uid
    # The RSNA files were de-identified to these fixed placeholder values.
    dataset.StudyDate = "19010101"
    dataset.StudyTime = "000000.00"
    dataset.AccessionNumber = ""
    dataset.Modality = "CR"
    dataset.ConversionType = "WSD"
    dataset.ReferringPhysicianName = ""
    dataset.SeriesDescription = f"view: {case.view_position}"
    dataset.PatientName = case.patient_id
    dataset.PatientID = case.patient_id
    dataset.PatientBirthDate = ""
    dataset.PatientSex = case.sex
    # A plain integer, not the standard 'nnnY': that is how the RSNA files store it. pydicom would
    # warn that it is invalid AS on every file, so the element is built with validation off.
    dataset.add(DataElement(0x00101010, "AS", str(case.age), validation_mode=pydicom.config.IGNORE))
    dataset.BodyPartExamined = "CHEST"
    dataset.ViewPosition = case.view_position
    dataset.StudyInstanceUID = _uid(case.patient_id, "study")
    dataset.SeriesInstanceUID = _uid(case.patient_id, "series")
    dataset.StudyID = ""
    dataset.SeriesNumber = "1"
    dataset.InstanceNumber = "1"
    dataset.PatientOrientation = ""
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.Rows, dataset.Columns = case.pixels.shape
    dataset.PixelSpacing = [f"{case.pixel_spacing[0]:g}", f"{case.pixel_spacing[1]:g}"]
    dataset.BitsAllocated = 8
    dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.LossyImageCompression = "01"
    dataset.LossyImageCompressionMethod = "ISO_10918_1"
    dataset.PixelData = encapsulate([jpeg.tobytes()], has_bot=False)
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def format_class_info_csv(cases: Sequence[SynthCase]) -> str:
    """``stage_2_detailed_class_info.csv`` text, row for row beside :func:`lungdet.data_tools.labels.format_labels_csv`."""
    lines = ["patientId,class"]
    for case in cases:
        for _row in range(max(1, len(case.boxes))):
            lines.append(f"{case.patient_id},{case.class_name}")
    return "\n".join(lines) + "\n"


def plan_positives(*, count: int, seed: int, positive_fraction: float) -> np.ndarray:
    """Boolean ``[count]``: exactly ``round(count * positive_fraction)`` positives in a seeded order."""
    positives = np.zeros(count, dtype=bool)
    positives[: round(count * positive_fraction)] = True
    return np.random.default_rng(np.random.SeedSequence([seed, 0])).permutation(positives)


def write_synthetic_dataset(
    out_dir: Path,
    *,
    count: int,
    seed: int = 0,
    positive_fraction: float = REAL_POSITIVE_FRACTION,
    size: tuple[int, int] = (1024, 1024),
    jpeg_quality: int = _DEFAULT_JPEG_QUALITY,
    overwrite: bool = False,
    progress: bool = False,
) -> SynthSummary:
    """Write ``count`` synthetic DICOMs and their RSNA-format labels under ``out_dir``.

    Writes ``out_dir/stage_2_train_images/{patientId}.dcm``, ``out_dir/stage_2_train_labels.csv``
    and ``out_dir/stage_2_detailed_class_info.csv`` (boxes XYWH_ABS in each image's pixels),
    every file atomically. The same arguments give byte-identical files.

    Raises
    ------
    ValueError
        An argument is out of range.
    SynthError
        The images folder already holds .dcm files and ``overwrite`` is False.
    """
    if not 1 <= count <= 1_000_000:
        raise ValueError(f"count must be between 1 and 1000000, got {count}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be between 0 and 1, got {positive_fraction}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be between 1 and 100, got {jpeg_quality}")
    size = validate_size(size)
    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGES_FOLDER
    existing = sorted(images_dir.glob("*.dcm")) if images_dir.is_dir() else []
    if existing and not overwrite:
        raise SynthError(
            f"{images_dir}: already holds {len(existing)} .dcm files, which the new labels would not describe; "
            "choose an empty --out folder or pass --overwrite to delete them first"
        )
    for stale in existing:
        stale.unlink()
    images_dir.mkdir(parents=True, exist_ok=True)

    positives = plan_positives(count=count, seed=seed, positive_fraction=positive_fraction)
    cases = []
    for index in tqdm(range(count), desc="synth", unit="img", disable=None if progress else True):
        # One independent stream per image: image i does not depend on how many came before.
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1, index]))
        case = generate_case(rng, size=size, positive=bool(positives[index]))
        write_bytes_atomic(images_dir / f"{case.patient_id}.dcm", encode_dicom(case, jpeg_quality=jpeg_quality))
        # Keep only what the CSVs need, not the pixels, so a large count stays small in memory.
        cases.append(dataclasses.replace(case, pixels=np.zeros((0, 0), dtype=np.uint8)))
    labels_csv = out_dir / LABELS_FILE
    class_info_csv = out_dir / CLASS_INFO_FILE
    write_text_atomic(labels_csv, format_labels_csv({case.patient_id: case.boxes for case in cases}))
    write_text_atomic(class_info_csv, format_class_info_csv(cases))
    return SynthSummary(
        out_dir=out_dir,
        images_dir=images_dir,
        labels_csv=labels_csv,
        class_info_csv=class_info_csv,
        count=count,
        positive_count=sum(case.target for case in cases),
        box_count=sum(len(case.boxes) for case in cases),
    )


def parse_size(text: str) -> tuple[int, int]:
    """``--size`` as every size flag takes it, WIDTHxHEIGHT (:func:`~lungdet.cli_types.image_dimensions`): ``'800x1200'`` -> (1200, 800) as (rows, columns)."""
    width, height = image_dimensions(text)
    try:
        return validate_size((height, width))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--size: {error}") from None


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Arguments of ``lungdet synth``."""
    parser = argparse.ArgumentParser(
        prog="lungdet synth",
        description="Write synthetic chest-X-ray-like DICOMs and RSNA-format labels (for tests, demos and benchmarks; not radiographs).",
        epilog="example: lungdet synth --out /tmp/synth --count 200 --seed 0 --size 1024",
        add_help=add_help,
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder to write stage_2_train_images/ and the two labels CSVs into"
    )
    parser.add_argument(
        "--count", type=int_in_range(1, 1_000_000), default=200, help="number of images, 1..1000000 (default: 200)"
    )
    parser.add_argument(
        "--seed",
        type=int_in_range(0),
        default=0,
        help="random seed >= 0; the same seed writes byte-identical files (default: 0)",
    )
    parser.add_argument(
        "--positive-fraction",
        type=fraction,
        default=REAL_POSITIVE_FRACTION,
        help=f"fraction of images with opacities, 0..1 (default: {REAL_POSITIVE_FRACTION}, as in the real training set)",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=(1024, 1024),
        help="image size as WIDTHxHEIGHT in pixels, like 800x1200 (800 wide, 1200 tall), or 1024 for a square (default: 1024)",
    )
    parser.add_argument(
        "--jpeg-quality",
        type=int_in_range(1, 100),
        default=_DEFAULT_JPEG_QUALITY,
        help=f"JPEG quality 1..100 (default: {_DEFAULT_JPEG_QUALITY})",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete .dcm files already in OUT/stage_2_train_images before writing"
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet synth``; returns the exit status."""
    started = time.perf_counter()
    summary = write_synthetic_dataset(
        args.out,
        count=args.count,
        seed=args.seed,
        positive_fraction=args.positive_fraction,
        size=args.size,
        jpeg_quality=args.jpeg_quality,
        overwrite=args.overwrite,
        progress=True,
    )
    elapsed = time.perf_counter() - started
    rows, columns = args.size
    print(f"wrote {summary.count} synthetic DICOMs ({columns}x{rows}, seed {args.seed}) in {elapsed:.1f} s")
    print(f"  images:     {summary.images_dir}")
    print(f"  labels:     {summary.labels_csv}")
    print(f"  class info: {summary.class_info_csv}")
    boxes = f"{summary.box_count} box" + ("" if summary.box_count == 1 else "es")
    print(f"  {summary.positive_count} positive ({boxes}), {summary.count - summary.positive_count} negative")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
