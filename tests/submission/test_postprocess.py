"""Tests for submission/postprocess.py and raw_predictions.py: fusion, gating, shrinking, capping, the typed file, the raw CSV."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lungdet.errors import ConfigError, SubmissionError
from lungdet.submission.postprocess import (
    OperatingPoint,
    PostprocessConfig,
    finish_image,
    fuse_passes,
    load_postprocess,
    mean_probability,
    most_confident,
    postprocess,
    postprocess_from_dict,
    save_postprocess,
    shrink_boxes,
)
from lungdet.submission.prediction_string import Prediction
from lungdet.submission.raw_predictions import RawPrediction, read_raw_predictions, write_raw_predictions

TWO_BOXES = Prediction.from_arrays([0.9, 0.4], [[10, 20, 100, 200], [300, 300, 50, 60]])


def raw(
    patient: str,
    prediction: Prediction,
    *,
    model: str = "m0",
    pass_name: str = "plain",
    probability: float | None = None,
    size: int = 512,
) -> RawPrediction:
    return RawPrediction(patient, model, pass_name, size, size, prediction, probability)


# --- fusion -------------------------------------------------------------------------------------


def test_fusing_two_identical_predictions_gives_the_input() -> None:
    fused = fuse_passes([TWO_BOXES, TWO_BOXES], width=512, height=512, weights=[1, 1], iou_thr=0.55, skip_box_thr=0.0)
    np.testing.assert_allclose(fused.boxes, TWO_BOXES.boxes, atol=1e-4)
    np.testing.assert_allclose(fused.scores, TWO_BOXES.scores, atol=1e-12)


def test_a_box_one_model_missed_keeps_its_finders_confidence_or_its_share() -> None:
    missed = [TWO_BOXES, Prediction.empty()]
    # 'finders' (the default): the confidence of the pass that found it, whatever the other passes did.
    fused = fuse_passes(missed, width=512, height=512, weights=[3, 1], iou_thr=0.55, skip_box_thr=0.0)
    np.testing.assert_allclose(fused.scores, [0.9, 0.4], atol=1e-12)
    np.testing.assert_allclose(fused.boxes, TWO_BOXES.boxes, atol=1e-9)
    # 'avg': its weighted share of it, as ensemble-boxes computes it.
    averaged = fuse_passes(
        missed, width=512, height=512, weights=[3, 1], iou_thr=0.55, skip_box_thr=0.0, conf_type="avg"
    )
    np.testing.assert_allclose(averaged.scores, [0.9 * 3 / 4, 0.4 * 3 / 4], atol=1e-12)
    # Found by 3 / 4 of the weight: kept at min_support 0.75, dropped above.
    assert (
        len(
            fuse_passes(
                missed, width=512, height=512, weights=[3, 1], iou_thr=0.55, skip_box_thr=0.0, min_support=0.75
            ).scores
        )
        == 2
    )
    assert (
        len(
            fuse_passes(
                missed, width=512, height=512, weights=[3, 1], iou_thr=0.55, skip_box_thr=0.0, min_support=0.8
            ).scores
        )
        == 0
    )


def test_overlapping_boxes_fuse_to_their_confidence_weighted_mean() -> None:
    first = Prediction.from_arrays([0.8], [[100, 100, 100, 200]])
    second = Prediction.from_arrays([0.4], [[110, 100, 100, 200]])  # IoU 0.82
    fused = fuse_passes([first, second], width=1000, height=1000, weights=[1, 1], iou_thr=0.5, skip_box_thr=0.0)
    # x1 = (0.8 * 100 + 0.4 * 110) / 1.2, confidence the mean of the two.
    np.testing.assert_allclose(fused.boxes, [[(0.8 * 100 + 0.4 * 110) / 1.2, 100, 100, 200]], atol=1e-3)
    np.testing.assert_allclose(fused.scores, [0.6], atol=1e-6)
    apart = fuse_passes([first, second], width=1000, height=1000, weights=[1, 1], iou_thr=0.9, skip_box_thr=0.0)
    assert len(apart.scores) == 2  # under the IoU threshold they stay two boxes


def test_fusing_nothing_gives_nothing() -> None:
    fused = fuse_passes(
        [Prediction.empty(), Prediction.empty()], width=64, height=64, weights=[1, 1], iou_thr=0.5, skip_box_thr=0.0
    )
    assert fused.boxes.shape == (0, 4)


# --- gate, cut-off, shrink, cap -----------------------------------------------------------------


def test_shrink_of_one_changes_nothing_and_keeps_the_centre_otherwise() -> None:
    assert np.array_equal(shrink_boxes(TWO_BOXES, factor=1.0).boxes, TWO_BOXES.boxes)
    shrunk = shrink_boxes(TWO_BOXES, factor=0.875)
    np.testing.assert_allclose(shrunk.boxes[0], [10 + 100 * 0.0625, 20 + 200 * 0.0625, 87.5, 175.0])
    np.testing.assert_allclose(
        shrunk.boxes[:, :2] + shrunk.boxes[:, 2:] / 2, TWO_BOXES.boxes[:, :2] + TWO_BOXES.boxes[:, 2:] / 2
    )
    assert np.array_equal(shrunk.scores, TWO_BOXES.scores)


def test_gate_at_one_empties_every_image_with_a_probability() -> None:
    config = PostprocessConfig(score_threshold=0.0, gate_threshold=1.0)
    assert finish_image(TWO_BOXES, 0.999, config).boxes.shape == (0, 4)
    assert len(finish_image(TWO_BOXES, 1.0, config).scores) == 2  # a probability of exactly 1 reaches it
    assert len(finish_image(TWO_BOXES, None, config).scores) == 2  # no image head: nothing to gate on


def test_cut_off_then_cap_keep_the_most_confident() -> None:
    many = Prediction.from_arrays([0.3, 0.95, 0.6, 0.6], [[0, 0, 1, 1], [1, 1, 1, 1], [2, 2, 1, 1], [3, 3, 1, 1]])
    assert most_confident(many, max_boxes=2).scores.tolist() == [0.95, 0.6]
    assert most_confident(many, max_boxes=2).boxes[:, 0].tolist() == [1, 2]  # ties: the first given
    assert finish_image(many, None, PostprocessConfig(score_threshold=0.5, max_boxes=0)).scores.tolist() == [
        0.95,
        0.6,
        0.6,
    ]


def test_postprocess_fuses_passes_per_image_and_averages_probabilities() -> None:
    mirror_like = Prediction.from_arrays([0.7], [[12, 22, 98, 196]])
    rows = [
        raw("a", TWO_BOXES, probability=0.2),
        raw("a", mirror_like, pass_name="hflip", probability=0.6),
        raw("b", TWO_BOXES, probability=0.1),
        raw("b", TWO_BOXES, pass_name="hflip", probability=0.3),
    ]
    assert mean_probability(rows[:2]) == pytest.approx(0.4)
    result = postprocess(rows, PostprocessConfig(score_threshold=0.5, gate_threshold=0.3))
    assert list(result) == ["a", "b"]
    assert result["b"].boxes.shape == (0, 4)  # mean probability 0.2 < 0.3
    (score,) = result["a"].scores  # 0.9 and 0.7 fused to 0.8; the lone 0.4 halved to 0.2 and cut
    assert score == pytest.approx(0.8, abs=1e-6)


def test_model_weights_must_match_the_models() -> None:
    rows = [raw("a", TWO_BOXES, model="fold0"), raw("a", TWO_BOXES, model="fold1")]
    with pytest.raises(ConfigError, match=r"model_weights has 3 weights for 2 models \(fold0, fold1\)"):
        postprocess(rows, PostprocessConfig(model_weights=[1.0, 1.0, 2.0]))


# --- the file -----------------------------------------------------------------------------------


def test_postprocess_file_loads_back_equal(tmp_path: Path) -> None:
    config = PostprocessConfig(
        score_threshold=0.35, gate_threshold=0.2, wbf_iou_thr=0.5, model_weights=[1.0, 2.0], shrink=0.875, max_boxes=3
    )
    save_postprocess(config, tmp_path / "postprocess.yaml", comment="tuned on runs/cv/oof.csv\nhonest mAP 0.2")
    text = (tmp_path / "postprocess.yaml").read_text()
    assert text.startswith("# tuned on runs/cv/oof.csv\n# honest mAP 0.2\n")
    assert load_postprocess(tmp_path / "postprocess.yaml") == config


def test_the_tuning_record_is_its_own_type_but_keeps_the_files_flat_layout(tmp_path: Path) -> None:
    config = PostprocessConfig(
        score_threshold=0.4, tuning=OperatingPoint(tuned_models_per_image=1, expected_boxes_per_image=0.3)
    )
    save_postprocess(config, tmp_path / "postprocess.yaml")
    keys = [line.split(":")[0] for line in (tmp_path / "postprocess.yaml").read_text().splitlines()]
    # Every key at the top, in the order files have always had: the settings, then tune's record.
    assert keys[-5:] == [
        "calibration",
        "tuned_models_per_image",
        "tuned_passes_per_model",
        "expected_gated_share",
        "expected_boxes_per_image",
    ]
    assert "tuning" not in keys and keys[0] == "score_threshold"
    assert load_postprocess(tmp_path / "postprocess.yaml") == config
    # A record value out of range is named by its key in the file, not by the section in code.
    with pytest.raises(
        ConfigError, match=re.escape("postprocess expected_gated_share=2.0 is out of range: must be in [0, 1]")
    ):
        postprocess_from_dict({"expected_gated_share": 2.0})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"score_treshold": 0.3}, "unknown config key 'score_treshold'. Did you mean 'score_threshold'?"),
        ({"shrink": 2.0}, "postprocess shrink=2.0 is out of range: must be in [0.5, 1.5]"),
        ({"gate_threshold": -0.1}, "postprocess gate_threshold=-0.1 is out of range: must be in [0, 1]"),
        ({"max_boxes": "3"}, "max_boxes: expected int, got '3'"),
        ({"model_weights": [1.0, 0.0]}, "must be a list of positive weights"),
    ],
)
def test_bad_postprocess_values_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        postprocess_from_dict(values, where="pp.yaml")


def test_postprocess_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "pp.yaml"
    path.write_text("- 0.5\n")
    with pytest.raises(ConfigError, match="pp.yaml: the top level must be a mapping of post-processing settings"):
        load_postprocess(path)


# --- the raw CSV --------------------------------------------------------------------------------


def test_raw_predictions_round_trip(tmp_path: Path) -> None:
    rows = [
        RawPrediction(
            "p1",
            "fold0",
            "plain",
            1024,
            800,
            Prediction.from_arrays([0.91234], [[10.123, 20.456, 30.0, 40.0]]),
            0.25,
            0,
        ),
        RawPrediction("p1", "fold0", "hflip", 1024, 800, Prediction.empty(), None, 0),
        RawPrediction("p2", "fold3", "plain", 512, 512, Prediction.empty(), 0.0, 3),
    ]
    assert write_raw_predictions(tmp_path / "raw.csv", rows) == 3
    back = read_raw_predictions(tmp_path / "raw.csv")
    assert [(r.patient_id, r.model, r.pass_name, r.width, r.height, r.probability, r.fold) for r in back] == [
        ("p1", "fold0", "plain", 1024, 800, 0.25, 0),
        ("p1", "fold0", "hflip", 1024, 800, None, 0),
        ("p2", "fold3", "plain", 512, 512, 0.0, 3),
    ]
    assert back[0].prediction.scores.tolist() == [0.9123]
    assert back[0].prediction.boxes.tolist() == [[10.12, 20.46, 30.0, 40.0]]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("p1,m,mirror,,64,64,,", "pass 'mirror' is not one of plain, hflip"),
        ("p1,m,plain,,0,64,,", "width is 0; an image's size in pixels must be positive"),
        ("p1,m,plain,,64,64,1.5,", r"probability 1.5 is outside \[0, 1\]"),
        ("p1,m,plain,x,64,64,,", "fold 'x' is not a whole number"),
        ("p1,m,plain,,64,64,,0.5 1 2 3", "PredictionString has 4 tokens"),
    ],
)
def test_bad_raw_rows_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "raw.csv"
    path.write_text("patientId,model,pass,fold,width,height,probability,PredictionString\n" + line + "\n")
    with pytest.raises(SubmissionError, match=f"raw.csv line 2.*{message}"):
        read_raw_predictions(path)


def test_a_submission_is_not_taken_for_raw_predictions(tmp_path: Path) -> None:
    path = tmp_path / "submission.csv"
    path.write_text("patientId,PredictionString\np1,\n")
    with pytest.raises(SubmissionError, match="is it a submission\\? Tuning needs raw predictions"):
        read_raw_predictions(path)


def test_one_image_seen_at_two_sizes_is_refused() -> None:
    rows = [raw("a", TWO_BOXES, model="fold0", size=512), raw("a", TWO_BOXES, model="fold1", size=1024)]
    with pytest.raises(
        SubmissionError, match="patientId a: model fold1 saw a 1024 x 1024 image but model fold0 a 512 x 512 one"
    ):
        postprocess(rows, PostprocessConfig())


def test_a_gate_at_one_empties_the_whole_submission() -> None:
    rows = [raw(f"p{index}", TWO_BOXES, probability=index / 10) for index in range(10)]
    assert all(
        prediction.boxes.shape == (0, 4)
        for prediction in postprocess(rows, PostprocessConfig(score_threshold=0.0, gate_threshold=1.0)).values()
    )
    assert (
        sum(
            len(p.scores)
            for p in postprocess(rows, PostprocessConfig(score_threshold=0.0, gate_threshold=0.0)).values()
        )
        == 20
    )
