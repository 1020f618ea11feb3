"""Tests for detection/image_head.py and its path through training, prediction and the serve reply."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional

from lungdet.data_tools.metadata import METADATA_FEATURES, ImageTags, metadata_features
from lungdet.detection.config import load_config
from lungdet.detection.image_head import IMAGE_CLASS_LOSS, IMAGE_LOSS, IMAGE_PROBABILITY, class_index, has_image_head
from lungdet.detection.model import build_model
from lungdet.errors import ConfigError, LungdetError

IMAGES = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(seed)) for seed in range(2)]


def targets(*, masks: bool = False) -> list[dict[str, torch.Tensor]]:
    """One image with a box, one without."""
    positive = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])}
    negative = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    if masks:
        positive["masks"], negative["masks"] = (
            torch.zeros(1, 64, 64, dtype=torch.uint8),
            torch.zeros(0, 64, 64, dtype=torch.uint8),
        )
    return [positive, negative]


def model_with_head(
    architecture: str, *, loss_weight: float = 1.0, extra: tuple[str, ...] = (), class_loss_weight: float = 0.1
) -> torch.nn.Module:
    torch.manual_seed(0)
    config = load_config(
        None,
        [
            f"model.architecture={architecture}",
            "model.pretrained=none",
            "model.image_size=64",
            "model.image_head=true",
            *extra,
        ],
    )
    return build_model(config.model, image_loss_weight=loss_weight, image_class_loss_weight=class_loss_weight)


def with_image_targets(
    items: list[dict[str, torch.Tensor]], tags: list[ImageTags | None], classes: list[str | None]
) -> list[dict[str, torch.Tensor]]:
    """``items`` with the ``metadata`` and ``class_index`` that detection/data.py puts in every target."""
    return [
        {
            **item,
            "metadata": torch.from_numpy(metadata_features(image_tags)),
            "class_index": torch.tensor(class_index(name)),
        }
        for item, image_tags, name in zip(items, tags, classes, strict=True)
    ]


@pytest.mark.parametrize(
    "architecture", ["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn"]
)
def test_every_family_gets_the_image_loss_and_probability(architecture: str) -> None:
    model = model_with_head(architecture, loss_weight=2.0).train()
    captured = {}
    model.image_head.register_forward_hook(
        lambda module, args, output: captured.update(logits=output["logits"].detach())
    )
    losses = model(IMAGES, targets(masks=architecture.startswith("mask")))
    expected = 2.0 * functional.binary_cross_entropy_with_logits(captured["logits"], torch.tensor([1.0, 0.0]))
    assert losses[IMAGE_LOSS].item() == pytest.approx(expected.item(), rel=1e-6)
    assert len(losses) > 1  # the detector's own losses are still there
    model.eval()
    with torch.no_grad():
        outputs = model(IMAGES)
    probabilities = [float(output[IMAGE_PROBABILITY]) for output in outputs]
    assert all(0.0 < value < 1.0 for value in probabilities)
    assert "boxes" in outputs[0] and "scores" in outputs[0]


def test_the_head_learns_which_image_has_a_box() -> None:
    # In training mode: an untrained backbone's eval-mode batch norm shrinks every feature to nothing.
    model = model_with_head("fasterrcnn_mobilenet_v3_large_fpn").train()
    logits = {}
    model.image_head.register_forward_hook(lambda module, args, output: logits.update(last=output["logits"].detach()))
    optimizer = torch.optim.SGD(model.image_head.parameters(), lr=0.5)
    first = None
    for _ in range(30):
        loss = model(IMAGES, targets())[IMAGE_LOSS]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 2
    positive, negative = logits["last"].tolist()
    assert positive > 0 > negative  # probability above 0.5 for the image with a box, below for the other


def test_a_copy_predicts_with_its_own_head() -> None:
    """The EMA is a deep copy: its hooks must read its own backbone's features, not the original's."""
    model = model_with_head("fasterrcnn_mobilenet_v3_large_fpn").eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.image_head.mlp[3].bias.fill_(10.0)  # the copy now calls everything positive
        original = [float(output[IMAGE_PROBABILITY]) for output in model(IMAGES)]
        copied = [float(output[IMAGE_PROBABILITY]) for output in twin(IMAGES)]
    assert all(value > 0.99 for value in copied) and all(value < 0.99 for value in original)
    assert "_lungdet_top_level" not in model.backbone.__dict__  # nothing left behind after a forward


def test_state_dict_with_and_without_the_head() -> None:
    with_head = model_with_head("fasterrcnn_mobilenet_v3_large_fpn")
    config = load_config(
        None, ["model.architecture=fasterrcnn_mobilenet_v3_large_fpn", "model.pretrained=none", "model.image_size=64"]
    )
    plain = build_model(config.model)
    head_keys = {key for key in with_head.state_dict() if key.startswith("image_head.")}
    assert head_keys == {
        "image_head.mlp.0.weight",
        "image_head.mlp.0.bias",
        "image_head.mlp.3.weight",
        "image_head.mlp.3.bias",
    }
    assert set(with_head.state_dict()) - head_keys == set(plain.state_dict())
    assert has_image_head(with_head) and not has_image_head(plain)
    both = model_with_head(
        "fasterrcnn_mobilenet_v3_large_fpn", extra=("model.image_metadata=true", "model.image_class_info=true")
    )
    added = {key for key in both.state_dict() if key.startswith("image_head.")} - head_keys
    assert added == {"image_head.metadata.weight", "image_head.classes.weight", "image_head.classes.bias"}
    assert both.state_dict()["image_head.metadata.weight"].shape == (1, len(METADATA_FEATURES))
    assert not both.state_dict()["image_head.metadata.weight"].any()  # zero at the start: the pixels learn first


# --- metadata and the three classes ------------------------------------------------------------------

WEIGHT_VALUES = [
    1.5,
    -1.0,
    0.0,
    0.3,
    -0.2,
    0.0,
    0.4,
    0.0,
    0.1,
    0.7,
    0.0,
]  # as tests/conftest.py's SERVING_METADATA_WEIGHTS
WEIGHTS = torch.tensor([WEIGHT_VALUES])


def test_the_metadata_term_enters_the_loss_with_its_weights() -> None:
    model = model_with_head("fasterrcnn_mobilenet_v3_large_fpn", extra=("model.image_metadata=true",)).train()
    with torch.no_grad():
        model.image_head.metadata.weight.copy_(WEIGHTS)
    captured = {}
    model.image_head.register_forward_hook(
        lambda module, args, output: captured.update(logits=output["logits"].detach())
    )
    tags = [ImageTags(age=70, sex="M", view_position="AP"), None]
    losses = model(IMAGES, with_image_targets(targets(), tags, [None, None]))
    # AP 1.5 + M 0.3 + 60+ 0.7 = 2.5 on the first image; every 'unknown' weight is 0 on the second.
    expected = functional.binary_cross_entropy_with_logits(
        captured["logits"] + torch.tensor([2.5, 0.0]), torch.tensor([1.0, 0.0])
    )
    assert losses[IMAGE_LOSS].item() == pytest.approx(expected.item(), rel=1e-6)
    assert IMAGE_CLASS_LOSS not in losses
    losses[IMAGE_LOSS].backward()
    gradient = model.image_head.metadata.weight.grad[0]
    # The entries on in either image learn (AP, M, 60+ and the three unknowns); PA, F and the other age bands, off in both, do not.
    assert gradient[[0, 3, 9, 2, 5, 10]].abs().min() > 0 and not gradient[[1, 4, 6, 7, 8]].any()


def test_the_three_class_loss_is_cross_entropy_on_the_known_classes_times_its_weight() -> None:
    model = model_with_head(
        "fasterrcnn_mobilenet_v3_large_fpn", extra=("model.image_class_info=true",), class_loss_weight=0.25
    ).train()
    captured = {}
    model.image_head.register_forward_hook(
        lambda module, args, output: captured.update(classes=output["class_logits"].detach())
    )
    losses = model(IMAGES, with_image_targets(targets(), [None, None], ["Lung Opacity", "Normal"]))
    expected = 0.25 * functional.cross_entropy(captured["classes"], torch.tensor([0, 2]))
    assert losses[IMAGE_CLASS_LOSS].item() == pytest.approx(expected.item(), rel=1e-6)
    # One image without a class: only the other counts.
    losses = model(IMAGES, with_image_targets(targets(), [None, None], [None, "No Lung Opacity / Not Normal"]))
    expected = 0.25 * functional.cross_entropy(captured["classes"][1:], torch.tensor([1]))
    assert losses[IMAGE_CLASS_LOSS].item() == pytest.approx(expected.item(), rel=1e-6)
    # None with a class: a zero that still backpropagates.
    losses = model(IMAGES, with_image_targets(targets(), [None, None], [None, None]))
    assert losses[IMAGE_CLASS_LOSS].item() == 0.0 and losses[IMAGE_CLASS_LOSS].requires_grad


def test_class_index_follows_rsnas_class_names() -> None:
    assert [
        class_index(name) for name in ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal", None, "normal")
    ] == [0, 1, 2, -1, -1]


def test_with_metadata_adds_the_term_to_the_logit() -> None:
    from lungdet.detection.inference import with_metadata

    weights = WEIGHT_VALUES
    assert with_metadata(0.5, ImageTags(view_position="AP"), weights) == pytest.approx(
        1 / (1 + np.exp(-1.5)), abs=1e-12
    )
    assert with_metadata(0.2, ImageTags(age=10, sex="F", view_position="PA"), weights) == pytest.approx(
        1 / (1 + np.exp(-(np.log(0.2 / 0.8) - 1.0 - 0.2 + 0.4))), abs=1e-12
    )
    assert with_metadata(0.2, None, weights) == pytest.approx(0.2, abs=1e-12)  # every unknown weight is 0 here
    assert with_metadata(0.2, ImageTags(view_position="AP"), None) == 0.2  # a head without metadata: as it is
    assert with_metadata(None, ImageTags(view_position="AP"), weights) is None
    assert 0.0 < with_metadata(1.0, ImageTags(view_position="PA"), weights) < 1.0  # a saturated probability still moves


def test_the_runner_adds_each_images_tags(serving_checkpoint_writer: Callable[..., Path], tmp_path: Path) -> None:
    from lungdet.detection.detector import load_detector
    from lungdet.detection.inference import with_metadata

    checkpoint = serving_checkpoint_writer(tmp_path / "best.pt", image_head=True, image_metadata=True)
    detector = load_detector(checkpoint, device="cpu", amp="none")
    assert detector.uses_metadata and detector.runner.metadata_weights == pytest.approx(WEIGHTS[0].tolist())
    images = [np.random.default_rng(seed).integers(0, 255, (100, 120), dtype=np.uint8) for seed in range(3)]
    tags = [ImageTags(view_position="AP", age=70), ImageTags(view_position="PA", sex="F"), ImageTags()]
    bare = detector.predict_batch(images)
    tagged = detector.predict_batch(images, tags)
    for plain, with_tags, image_tags in zip(bare, tagged, tags, strict=True):
        assert with_tags.probability == pytest.approx(
            with_metadata(plain.probability, image_tags, detector.runner.metadata_weights), abs=1e-9
        )
        assert (
            with_tags.prediction.scores.tolist() == plain.prediction.scores.tolist()
        )  # the boxes do not depend on the tags
    assert tagged[0].probability > bare[0].probability and tagged[1].probability < bare[1].probability
    assert detector.predict(images[0], tags[0]).probability == pytest.approx(tagged[0].probability, abs=1e-9)


def test_metadata_or_classes_need_the_head() -> None:
    for key in ("image_metadata", "image_class_info"):
        with pytest.raises(
            ConfigError, match=rf"model.{key}=true feeds the image-level head, which is off; set model.image_head=true"
        ):
            load_config(None, [f"model.{key}=true"])


def test_data_without_tags_or_classes_is_refused_with_the_fix(tmp_path: Path) -> None:
    from lungdet.detection.data import ImageRecord, check_image_targets

    config = load_config(
        None, ["model.image_head=true", "model.image_metadata=true", "model.image_class_info=true"]
    ).model
    bare = [ImageRecord(1, "p1", tmp_path / "p1.png", 64, 64, 64, 64, 0, np.zeros((0, 4)))]
    with pytest.raises(
        LungdetError,
        match=r"annotations.json: no image has a view position, sex or age.*--metadata CSV.*model.image_metadata=false",
    ):
        check_image_targets(bare, config, data_dir=tmp_path)
    tagged = [
        ImageRecord(
            1, "p1", tmp_path / "p1.png", 64, 64, 64, 64, 0, np.zeros((0, 4)), tags=ImageTags(view_position="AP")
        )
    ]
    with pytest.raises(
        LungdetError,
        match=r"no image has an RSNA class.*--class-info stage_2_detailed_class_info.csv.*model.image_class_info=false",
    ):
        check_image_targets(tagged, config, data_dir=tmp_path)
    check_image_targets(
        [dataclasses.replace(tagged[0], class_name="Normal")], config, data_dir=tmp_path
    )  # both present: no error


# --- through training, predict and the serve reply ----------------------------------------------


@pytest.fixture(scope="module")
def head_run(
    tmp_path_factory: pytest.TempPathFactory,
    make_tiny_dataset: Callable[[Path], Path],
    tiny_model_overrides: tuple[str, ...],
) -> dict[str, Any]:
    from lungdet.detection.train import BEST_CHECKPOINT, train

    root = tmp_path_factory.mktemp("head")
    coco = make_tiny_dataset(root)
    overrides = [
        "model.architecture=fasterrcnn_mobilenet_v3_large_fpn",
        *tiny_model_overrides,
        "model.image_head=true",
        "optim.image_loss_weight=0.5",
        # With the view, sex and age and the three classes, which the tiny synthetic set carries.
        "model.image_metadata=true",
        "model.image_class_info=true",
        "data.batch_size=2",
        "optim.epochs=1",
        "max_minutes=0",
        "device=cpu",
    ]
    train(load_config(None, overrides), coco, root / "run", progress=False)
    return {"root": root, "checkpoint": root / "run" / BEST_CHECKPOINT}


def test_training_reports_the_auc_and_stores_the_cut_off(head_run: dict[str, Any]) -> None:
    metrics = (head_run["checkpoint"].parent / "metrics.csv").read_text().splitlines()
    header, row = metrics[0].split(","), metrics[1].split(",")
    values = dict(zip(header, row, strict=True))
    assert (
        "loss_image" in values
        and "loss_image_class" in values
        and "val_auc" in values
        and "val_image_threshold" in values
    )
    checkpoint = torch.load(head_run["checkpoint"], weights_only=True)
    assert checkpoint["image_threshold"] == pytest.approx(float(values["val_image_threshold"]))
    assert checkpoint["model"]["image_head.metadata.weight"].abs().sum() > 0  # it started at zero and learned
    assert checkpoint["image_calibration"] == pytest.approx(
        [float(values["val_platt_slope"]), float(values["val_platt_intercept"])], rel=1e-5
    )


def test_the_detector_reports_the_probability_with_metadata_then_platt(
    head_run: dict[str, Any], rsna_sample_dir: Path
) -> None:
    from lungdet.data_tools.image_io import read_xray_file
    from lungdet.detection.detector import load_detector
    from lungdet.detection.inference import with_metadata
    from lungdet.submission.platt import apply_platt

    detector = load_detector(head_run["checkpoint"], device="cpu", amp="none")
    image = read_xray_file(next(rsna_sample_dir.glob("*.dcm")))
    model = detector.runner.model
    with torch.no_grad():
        raw = float(
            model([torch.from_numpy(detector.runner.prepare(image.pixels)).float().div(255).expand(3, -1, -1)])[0][
                IMAGE_PROBABILITY
            ]
        )
    checkpoint = torch.load(head_run["checkpoint"], weights_only=True)
    expected = apply_platt(
        with_metadata(raw, image.tags, checkpoint["model"]["image_head.metadata.weight"][0].tolist()),
        checkpoint["image_calibration"],
    )
    assert detector.predict(image.pixels, image.tags).probability == pytest.approx(expected, abs=1e-6)


def test_predict_writes_probabilities_and_raw_rows_carry_them(
    head_run: dict[str, Any], rsna_sample_dir: Path, tmp_path: Path
) -> None:
    from lungdet.detection.predict import get_args_parser, main
    from lungdet.submission.raw_predictions import read_raw_predictions

    inputs = [str(path) for path in sorted(rsna_sample_dir.glob("*.dcm"))[:3]]
    args = [
        "--checkpoint",
        str(head_run["checkpoint"]),
        "--input",
        *inputs,
        "--device",
        "cpu",
        "--no-progress",
        "--tta",
        "hflip",
    ]
    assert (
        main(
            get_args_parser().parse_args(
                [*args, "--probabilities", str(tmp_path / "p.csv"), "--raw", str(tmp_path / "raw.csv")]
            )
        )
        == 0
    )
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "patientId,probability" and len(lines) == 4
    raw = read_raw_predictions(tmp_path / "raw.csv")
    assert all(row.probability is not None for row in raw)
    by_patient: dict[str, list[float]] = {}
    for row in raw:
        by_patient.setdefault(row.patient_id, []).append(row.probability)
    for line in lines[1:]:
        patient, value = line.split(",")
        assert float(value) == pytest.approx(np.mean(by_patient[patient]), abs=1e-5)  # the mean over both passes


def test_probabilities_from_a_checkpoint_without_a_head_are_refused(
    serving_checkpoint: Path, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    from lungdet.detection.predict import get_args_parser, main
    from lungdet.errors import LungdetError

    args = get_args_parser().parse_args(
        [
            "--checkpoint",
            str(serving_checkpoint),
            "--input",
            str(next(rsna_sample_dir.glob("*.dcm"))),
            "--probabilities",
            str(tmp_path / "p.csv"),
            "--device",
            "cpu",
        ]
    )
    with pytest.raises(LungdetError, match=r"no image-level head \(trained without model.image_head: true\)"):
        main(args)
    assert not (tmp_path / "p.csv").exists()


def test_the_serve_reply_takes_its_verdict_from_the_head(head_run: dict[str, Any], rsna_sample_dir: Path) -> None:
    from lungdet.detection.detect import detect_bytes, detection_json
    from lungdet.detection.detector import load_detector
    from lungdet.server.schemas import DetectReply

    detector = load_detector(head_run["checkpoint"], device="cpu")
    assert detector.image_threshold is not None
    detection = detect_bytes(detector, next(rsna_sample_dir.glob("*.dcm")).read_bytes())
    reply = detection_json(detection, detector_info=detector.info)
    DetectReply.model_validate(reply)
    assert reply["label"]["source"] == "image_head"
    positive = detection.probability >= detector.image_threshold
    assert reply["label"]["name"] == ("Lung Opacity" if positive else "No Lung Opacity")
    assert reply["label"]["confidence"] == pytest.approx(
        round(100 * (detection.probability if positive else 1 - detection.probability), 2)
    )
    assert reply["model"]["image_threshold"] == detector.image_threshold


def test_predict_reads_the_tags_of_pngs_from_metadata(
    serving_checkpoint_writer: Callable[..., Path], rsna_sample_dir: Path, tmp_path: Path
) -> None:
    """--metadata gives PNGs the view, sex and age an image head with metadata reads; a DICOM's own tags are read from the file."""
    import cv2

    from lungdet.data_tools.image_io import read_xray_file
    from lungdet.detection.detector import load_detector
    from lungdet.detection.inference import with_metadata
    from lungdet.detection.predict import get_args_parser, main
    from lungdet.submission.score import read_probabilities

    checkpoint = serving_checkpoint_writer(tmp_path / "best.pt", image_head=True, image_metadata=True)
    dicoms = sorted(rsna_sample_dir.glob("*.dcm"))[:2]
    pngs = []
    for dicom in dicoms:
        pngs.append(tmp_path / f"{dicom.stem}.png")
        cv2.imwrite(str(pngs[-1]), read_xray_file(dicom).pixels)
    (tmp_path / "meta.csv").write_text(
        f"patientId,PatientAge,PatientSex,ViewPosition\n{dicoms[0].stem},70,M,AP\n", encoding="utf-8"
    )
    base = ["--checkpoint", str(checkpoint), "--device", "cpu", "--amp", "none", "--no-progress", "--workers", "0"]
    main(
        get_args_parser().parse_args([*base, "--input", *map(str, pngs), "--probabilities", str(tmp_path / "bare.csv")])
    )
    main(
        get_args_parser().parse_args(
            [
                *base,
                "--input",
                *map(str, pngs),
                "--metadata",
                str(tmp_path / "meta.csv"),
                "--probabilities",
                str(tmp_path / "meta.csv.out"),
            ]
        )
    )
    main(
        get_args_parser().parse_args(
            [*base, "--input", *map(str, dicoms), "--probabilities", str(tmp_path / "dicom.csv")]
        )
    )
    bare, given, from_dicom = (
        read_probabilities(tmp_path / name) for name in ("bare.csv", "meta.csv.out", "dicom.csv")
    )
    weights = load_detector(checkpoint, device="cpu").runner.metadata_weights
    first, second = dicoms[0].stem, dicoms[1].stem
    assert given[first] == pytest.approx(
        with_metadata(bare[first], ImageTags(age=70, sex="M", view_position="AP"), weights), abs=2e-6
    )
    assert given[first] > bare[first] + 0.01 and given[second] == bare[second]  # no row: unknown, as without the file
    dicom_tags = read_xray_file(dicoms[1]).tags
    assert from_dicom[second] == pytest.approx(with_metadata(bare[second], dicom_tags, weights), abs=2e-6)
