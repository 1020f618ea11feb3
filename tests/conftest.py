"""Shared fixtures: where the real sample data lives, and a synthetic DICOM built in code.

The real data (13 RSNA DICOMs, the full label CSVs, 1,000 real RSNA JPEGs with their labels, a SIIM DICOM and its MONOCHROME1 twin) sits in
``shared/data`` beside the clone; set ``LUNGDET_SHARED_DATA`` to point elsewhere. Without it the
tests that need it are skipped, except under CI (``CI`` set), where a skip would hide a broken path.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LUNGDET_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")


def _shared_path(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        skip_or_fail(
            f"real sample data not found at {path}; put shared/data beside the clone or set LUNGDET_SHARED_DATA"
        )
    return path


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the calling test for something missing, saying how to get it; under CI (``CI`` set) fail, since ``.ci/run`` installs everything."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def require_ray() -> None:
    """Skip without Ray Data here; under CI (the test extra installs it) fail instead."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        skip_or_fail("Ray Data is not installed (pip install 'lungdet[ray]')")


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-node Ray cluster on loopback alone (``ray start``, one CPU a node, in a network namespace), once per test session; see tests/ray_cluster.py."""
    require_ray()
    from tests.ray_cluster import LoopbackCluster, NoNamespace

    try:
        cluster = LoopbackCluster.start()
    except NoNamespace as error:
        skip_or_fail(
            f"the Ray cluster of the tests runs in a network namespace of its own, and this machine refused one ({error}); run as root"
        )
    yield cluster
    cluster.stop()


def require_program(name: str, package: str) -> str:
    """A program the test drives, from Debian's ``package``; missing, the test skips (or fails under CI) saying how to install it."""
    found = shutil.which(name)
    if found is None:
        skip_or_fail(f"{name} is not installed: apt-get install {package}")
    return found


# The flags that keep Chromium from reaching out to Google's services, which a closed network refuses.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
)


def start_chromium(
    profile: Path, *, window_size: tuple[int, int], extra_flags: tuple[str, ...] = (), console: bool = False
) -> Any:
    """Debian's headless Chromium under selenium (skips, or fails under CI, without chromium and chromium-driver); ``console`` keeps its log."""
    chromium = require_program("chromium", "chromium")
    chromedriver = require_program("chromedriver", "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        *CHROMIUM_FLAGS,
        *extra_flags,
        f"--window-size={window_size[0]},{window_size[1]}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    if console:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))


@pytest.fixture(scope="session")
def rsna_sample_dir() -> Path:
    """Folder of the 13 real RSNA training DICOMs (JPEG Baseline, 1024x1024, MONOCHROME2)."""
    return _shared_path("rsna_sample/stage_2_train_images")


@pytest.fixture(scope="session")
def rsna_labels_csv() -> Path:
    """The complete stage_2_train_labels.csv (30,227 rows, 26,684 patients)."""
    return _shared_path("rsna_sample/stage_2_train_labels.csv")


@pytest.fixture(scope="session")
def rsna_class_info_csv() -> Path:
    """The complete stage_2_detailed_class_info.csv, same row order as the labels."""
    return _shared_path("rsna_sample/stage_2_detailed_class_info.csv")


@pytest.fixture(scope="session")
def rsna_real_dir() -> Path:
    """The 1,000 real RSNA radiographs as JPEGs: images/, labels.csv, class_info.csv, metadata.csv (never copied into the repo)."""
    return _shared_path("rsna_real")


@pytest.fixture(scope="session")
def siim_dicom() -> Path:
    """A real SIIM chest radiograph (MONOCHROME2) that the RSNA labels do not name."""
    return _shared_path("other/siim_pneumothorax_PA.dcm")


@pytest.fixture(scope="session")
def siim_monochrome1_dicom() -> Path:
    """The same stored pixels as ``siim_dicom`` with PhotometricInterpretation MONOCHROME1."""
    return _shared_path("other/siim_pneumothorax_PA_MONOCHROME1.dcm")


@pytest.fixture
def make_dicom(tmp_path: Path) -> Callable[..., Path]:
    """Return ``build(patient_id, **tags) -> Path`` writing an uncompressed (Explicit VR LE) DICOM.

    ``pixels`` defaults to a ramp ``0, 1, 2, ...`` of shape ``[rows, columns]`` (``[frames, rows,
    columns]`` with ``number_of_frames``, ``[..., 3]`` with ``samples_per_pixel=3``). Optional tags
    passed as None are left out. ``pixel_data`` replaces the encoded pixels with raw bytes (to
    build a file whose pixels cannot be decoded). The file is ``{folder or tmp_path}/{patient_id}.dcm``.
    """

    def build(
        patient_id: str = "synthetic-0001",
        *,
        folder: Path | None = None,
        rows: int = 4,
        columns: int = 6,
        pixels: np.ndarray | None = None,
        bits: int = 8,
        photometric: str | None = None,
        samples_per_pixel: int = 1,
        number_of_frames: int | None = None,
        patient_age: str | None = "045Y",
        patient_sex: str | None = "F",
        view_position: str | None = "PA",
        pixel_spacing: tuple[float, float] | None = (0.168, 0.168),
        window_center: float | None = None,
        window_width: float | None = None,
        rescale_slope: float | None = None,
        rescale_intercept: float | None = None,
        with_pixels: bool = True,
        pixel_data: bytes | None = None,
    ) -> Path:
        if bits not in (8, 16):
            raise ValueError(f"bits must be 8 or 16, got {bits}")
        dtype = np.uint8 if bits == 8 else np.uint16
        shape = (rows, columns) if number_of_frames is None else (number_of_frames, rows, columns)
        if samples_per_pixel == 3:
            shape = (*shape, 3)
        if pixels is None:
            pixels = (np.arange(int(np.prod(shape))) % (2**bits)).reshape(shape)
        pixels = np.asarray(pixels).astype(dtype)
        if pixels.shape != shape:
            raise ValueError(f"pixels have shape {pixels.shape}, expected {shape}")

        file_meta = FileMetaDataset()
        file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[patient_id])
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = file_meta
        ds.SOPClassUID = file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
        ds.Modality = "CR"
        ds.PatientID = patient_id
        optional = {
            "PatientAge": patient_age,
            "PatientSex": patient_sex,
            "ViewPosition": view_position,
            "PixelSpacing": list(pixel_spacing) if pixel_spacing is not None else None,
            "WindowCenter": window_center,
            "WindowWidth": window_width,
            "RescaleSlope": rescale_slope,
            "RescaleIntercept": rescale_intercept,
        }
        for keyword, value in optional.items():
            if value is not None:
                setattr(ds, keyword, value)
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = samples_per_pixel
        ds.PhotometricInterpretation = photometric or ("RGB" if samples_per_pixel == 3 else "MONOCHROME2")
        if samples_per_pixel == 3:
            ds.PlanarConfiguration = 0
        if number_of_frames is not None:
            ds.NumberOfFrames = number_of_frames
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0
        if with_pixels:
            ds.PixelData = pixel_data if pixel_data is not None else pixels.tobytes()
            ds["PixelData"].VR = "OB" if bits == 8 else "OW"

        path = Path(folder or tmp_path) / f"{patient_id}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        return path

    return build


# A from-scratch MobileNetV3-FPN at 128 px. Untrained, its eval-mode batch norm (mean 0, variance 1)
# shrinks the features to ~1e-9, so every box of every image gets the same confidence. Setting the
# batch-norm statistics from a few synthetic X-rays and scaling the classifier gives boxes and
# confidences that differ by image and by box (about 0.04-0.63 on the real sample DICOMs): what
# a page with a confidence slider and an API need to be tested against. The boxes mean nothing.
SERVING_IMAGE_SIZE = 128
SERVING_SCORE_THRESHOLD = 0.3
SERVING_CLASSIFIER_SCALE = 8.0
# A metadata term that moves the probability by view, sex and age band (METADATA_FEATURES' order:
# view AP, PA, unknown; sex M, F, unknown; age 0-17, 18-39, 40-59, 60+, unknown).
SERVING_METADATA_WEIGHTS = (1.5, -1.0, 0.0, 0.3, -0.2, 0.0, 0.4, 0.0, 0.1, 0.7, 0.0)


def write_serving_checkpoint(
    path: Path,
    *,
    architecture: str = "fasterrcnn_mobilenet_v3_large_fpn",
    image_size: int = SERVING_IMAGE_SIZE,
    image_head: bool = False,
    image_metadata: bool = False,
    preprocessing: dict | None = None,
) -> Path:
    """Write the checkpoint described above to ``path`` (a lungdet checkpoint: model, config, preprocessing, score_threshold).

    Other architectures get the same treatment (RetinaNet's classifier is scaled, and its prior
    bias raised so that boxes clear the floor); ``image_head`` adds an untrained image-level head
    (probabilities vary by image) and an ``image_threshold`` of 0.5, ``image_metadata`` (with it)
    a metadata term of :data:`SERVING_METADATA_WEIGHTS`; ``preprocessing`` is stored as convert's
    settings and applied to the calibration images.
    """
    import torch

    from lungdet.data_tools.image_io import read_xray
    from lungdet.data_tools.synth import write_synthetic_dataset
    from lungdet.detection.config import config_to_dict, load_config
    from lungdet.detection.detector import model_input_for
    from lungdet.detection.model import build_model

    preprocessing = preprocessing or {"image_size": None, "normalization": "none"}
    torch.manual_seed(0)
    config = load_config(
        None,
        [
            f"model.architecture={architecture}",
            "model.pretrained=none",
            f"model.image_size={image_size}",
            "model.rpn_pre_nms_top_n_test=50",
            "model.rpn_post_nms_top_n_test=20",
            f"model.image_head={str(image_head).lower()}",
            f"model.image_metadata={str(image_metadata).lower()}",
        ],
    )
    model = build_model(config.model)
    synth = write_synthetic_dataset(
        path.parent / f"{path.stem}_synth", count=8, seed=1, positive_fraction=0.5, size=(256, 256)
    )
    inputs = [
        model_input_for(
            read_xray(dicom.read_bytes(), name=dicom.name).pixels, image_size=image_size, preprocessing=preprocessing
        )
        for dicom in sorted(synth.images_dir.glob("*.dcm"))
    ]
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batch, not a running one
    with torch.no_grad():
        model.backbone.train()
        images, _ = model.transform(inputs)
        model.backbone(images.tensors)
        model.eval()
        if image_metadata:
            model.image_head.metadata.weight.copy_(torch.tensor([SERVING_METADATA_WEIGHTS]))
        if hasattr(model, "roi_heads"):
            model.roi_heads.box_predictor.cls_score.weight.mul_(SERVING_CLASSIFIER_SCALE)
        else:
            classifier = model.head.classification_head.cls_logits
            classifier.weight.mul_(SERVING_CLASSIFIER_SCALE)
            classifier.bias.fill_(-1.0)
    checkpoint = {
        "model": model.state_dict(),
        "config": config_to_dict(config),
        "frozen_batch_norm": False,
        "preprocessing": preprocessing,
        "score_threshold": SERVING_SCORE_THRESHOLD,
    }
    if image_head:
        checkpoint["image_threshold"] = 0.5
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="session")
def serving_checkpoint_writer() -> Callable[..., Path]:
    """``write_serving_checkpoint(path, architecture=..., image_size=..., image_head=..., preprocessing=...)``, for tests that need variants."""
    return write_serving_checkpoint


@pytest.fixture(scope="session")
def serving_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small checkpoint whose boxes and confidences vary by image (see ``write_serving_checkpoint``); cut-off 0.3."""
    return write_serving_checkpoint(tmp_path_factory.mktemp("serving") / "serving.pt")


@pytest.fixture(scope="session")
def serving_detector(serving_checkpoint: Path):
    """``serving_checkpoint`` loaded on the CPU in fp32, so results are the same on every CPU."""
    from lungdet.detection.detector import load_detector

    return load_detector(serving_checkpoint, device="cpu", amp="none")


@pytest.fixture
def annotations_json(tmp_path: Path) -> Path:
    """An annotations.json as lungdet convert writes it, reduced to the tags the score's slices read (three patients)."""
    images = [
        {"id": 1, "patient_id": "pos", "age": 33, "sex": "F", "view_position": "AP"},
        {"id": 2, "patient_id": "neg", "age": 71, "sex": "M", "view_position": "PA"},
        {"id": 3, "patient_id": "empty", "age": None, "sex": "", "view_position": ""},
    ]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return path
