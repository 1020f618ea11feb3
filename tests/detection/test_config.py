"""Tests for detection/config.py: defaults, the shipped YAML files, unknown keys, types, ranges, overrides, round trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lungdet.detection.config import (
    CONFIGS_DIR,
    MODEL_ARCHITECTURES,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    resolve_config_path,
    save_config,
    validate_config,
)
from lungdet.errors import ConfigError

SHIPPED_CONFIGS = ("fasterrcnn_mobilenet_cpu", "fasterrcnn_mobilenet_real_cpu", "fasterrcnn_resnet50_fpn")


def write_yaml(folder: Path, text: str, name: str = "custom.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and shipped files -----------------------------------------------------------------


def test_defaults_validate_and_equal_an_empty_config() -> None:
    validate_config(TrainConfig())
    assert config_from_dict({}) == TrainConfig()
    assert load_config(None) == TrainConfig()


def test_the_shipped_configs_are_the_ones_these_tests_know() -> None:
    assert sorted(path.stem for path in CONFIGS_DIR.glob("*.yaml")) == sorted(SHIPPED_CONFIGS)


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_every_shipped_config_loads_by_bare_name(name: str) -> None:
    config = load_config(name)
    assert config.model.architecture in MODEL_ARCHITECTURES
    assert config == load_config(CONFIGS_DIR / f"{name}.yaml")


def test_the_cpu_config_takes_its_values_from_the_file() -> None:
    config = load_config("fasterrcnn_mobilenet_cpu")
    assert config.model.architecture == "fasterrcnn_mobilenet_v3_large_fpn"
    assert config.model.image_size == 256
    assert config.model.anchor_sizes == [32, 64, 128]
    assert config.model.anchor_aspect_ratios == [1.0, 1.5, 2.0]
    assert config.optim.optimizer == "adamw"
    assert (
        config.optim.epochs == 7 and config.max_minutes == 0.0
    )  # fixed steps, so results do not depend on machine load
    # Keys the file leaves out keep their defaults.
    assert config.augment.hflip == TrainConfig().augment.hflip


def test_an_empty_yaml_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path, "# nothing here\n")) == TrainConfig()


# --- unknown keys -------------------------------------------------------------------------------


def test_unknown_key_names_the_dotted_key_and_the_closest_valid_one() -> None:
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'optim.lrr'. Did you mean 'optim.lr'?")):
        load_config(None, ["optim.lrr=0.1"])


def test_unknown_section_suggests_the_closest_section() -> None:
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'modle'. Did you mean 'model'?")):
        load_config(None, ["modle.image_size=128"])


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "data:\n  batchsize: 2\n")
    with pytest.raises(
        ConfigError, match=re.escape(f"{path}: unknown config key 'data.batchsize'. Did you mean 'data.batch_size'?")
    ):
        load_config(path)


def test_unknown_key_without_a_close_match_lists_the_valid_keys() -> None:
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "unknown config key 'optim.zzzzzz'. Valid keys here: optim.optimizer, optim.lr, optim.momentum"
        ),
    ):
        load_config(None, ["optim.zzzzzz=1"])


# --- types --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.image_size=big", "model.image_size: expected int, got 'big' (str)"),
        ("model.image_size=128.5", "model.image_size: expected int, got 128.5 (float)"),
        ("data.batch_size=true", "data.batch_size: expected int, got True (bool)"),
        ("optim.lr=fast", "optim.lr: expected float, got 'fast' (str)"),
        ("model.pretrained=", "model.pretrained: expected str, got None (NoneType)"),
        ("model.anchor_sizes=32", "model.anchor_sizes: expected a list, got 32"),
        ("model.anchor_sizes=[32, big]", "model.anchor_sizes[1]: expected int, got 'big' (str)"),
        ("model=3", "model: expected a mapping of keys, got 3"),
    ],
)
def test_wrong_type_is_an_error_naming_key_and_value(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_an_int_is_accepted_where_a_float_is_expected() -> None:
    config = load_config(None, ["optim.lr=1", "model.anchor_aspect_ratios=[1, 2]"])
    assert config.optim.lr == 1.0 and type(config.optim.lr) is float
    assert config.model.anchor_aspect_ratios == [1.0, 2.0]
    assert all(type(ratio) is float for ratio in config.model.anchor_aspect_ratios)


# --- ranges -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=3", "config optim.lr=3.0 is out of range: must be in (0, 1]"),
        ("optim.lr=0", "config optim.lr=0.0 is out of range: must be in (0, 1]"),
        ("augment.hflip=1.5", "config augment.hflip=1.5 is out of range: must be a probability in [0, 1]"),
        (
            "augment.shift_scale_rotate=-0.1",
            "config augment.shift_scale_rotate=-0.1 is out of range: must be a probability in [0, 1]",
        ),
        (
            "model.architecture=fasterrcnn_resnet50",
            "config model.architecture='fasterrcnn_resnet50' is out of range: must be one of fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2, "
            "fasterrcnn_mobilenet_v3_large_fpn, retinanet_resnet50_fpn, maskrcnn_resnet50_fpn",
        ),
        ("model.image_size=32", "config model.image_size=32 is out of range: must be between 64 and 2048"),
        ("model.num_classes=1", "config model.num_classes=1 is out of range: must be >= 2"),
        (
            "model.anchor_sizes=[]",
            "config model.anchor_sizes=[] is out of range: must be a non-empty list of positive sizes",
        ),
        ("optim.optimizer=adam", "config optim.optimizer='adam' is out of range: must be 'sgd' or 'adamw'"),
        ("optim.epochs=0", "config optim.epochs=0 is out of range: must be >= 1"),
        (
            "val_score_thresholds=[0.5, 1.5]",
            "config val_score_thresholds=[0.5, 1.5] is out of range: must be a non-empty list of values in [0, 1]",
        ),
    ],
)
def test_out_of_range_value_is_an_error_giving_the_valid_range(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_range_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "augment:\n  hflip: 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: config augment.hflip=2.0 is out of range")):
        load_config(path)


# --- overrides ----------------------------------------------------------------------------------


def test_overrides_apply_on_top_of_the_file_including_lists_and_nested_keys() -> None:
    config = load_config(
        "fasterrcnn_mobilenet_cpu",
        [
            "optim.lr=0.005",
            "model.anchor_sizes=[16, 32]",
            "val_score_thresholds=[0.3, 0.5]",
            "augment.hflip=0",
            "seed=7",
        ],
    )
    assert config.optim.lr == 0.005
    assert config.model.anchor_sizes == [16, 32]
    assert config.val_score_thresholds == [0.3, 0.5]
    assert config.augment.hflip == 0.0
    assert config.seed == 7
    # Untouched file values survive.
    assert config.model.image_size == 256
    assert config.optim.optimizer == "adamw"


def test_apply_overrides_builds_nested_dicts_and_parses_values_as_yaml() -> None:
    values = apply_overrides({"optim": {"lr": 0.1}}, ["optim.epochs=3", "a.b.c=[1, 2]", "flag=true", "name=x=y"])
    assert values == {"optim": {"lr": 0.1, "epochs": 3}, "a": {"b": {"c": [1, 2]}}, "flag": True, "name": "x=y"}


def test_override_below_a_value_that_is_not_a_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match=re.escape("override 'optim.lr.x=1': 'lr' is not a section")):
        apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr.x=1"])


def test_override_without_equals_sign_is_an_error() -> None:
    with pytest.raises(ConfigError, match=re.escape("override 'optim.lr': expected key=value, e.g. optim.lr=0.005")):
        load_config(None, ["optim.lr"])


# --- files --------------------------------------------------------------------------------------


def test_save_then_load_gives_the_same_config(tmp_path: Path) -> None:
    config = load_config(
        "fasterrcnn_mobilenet_cpu", ["optim.lr=0.005", "model.anchor_aspect_ratios=[0.5, 1.25]", "data.fold=3"]
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert load_config(str(path)) == config
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left behind


def test_resolve_config_path_finds_bare_names_and_keeps_real_paths(tmp_path: Path) -> None:
    expected = CONFIGS_DIR / "fasterrcnn_resnet50_fpn.yaml"
    assert resolve_config_path("fasterrcnn_resnet50_fpn") == expected
    assert resolve_config_path("fasterrcnn_resnet50_fpn.yaml") == expected
    own = write_yaml(tmp_path, "seed: 1\n", name="fasterrcnn_resnet50_fpn.yaml")
    assert resolve_config_path(own) == own


def test_unknown_config_name_lists_the_known_ones() -> None:
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "config nosuch: no such file. Known configs: fasterrcnn_mobilenet_cpu, fasterrcnn_mobilenet_real_cpu, fasterrcnn_resnet50_fpn"
        ),
    ):
        resolve_config_path("nosuch")


def test_a_missing_path_does_not_fall_back_to_a_shipped_config_of_the_same_name(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "fasterrcnn_resnet50_fpn.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"config {missing}: no such file")):
        load_config(missing)


def test_invalid_yaml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model: [\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not valid YAML")):
        load_config(path)


def test_a_yaml_file_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "- model\n- data\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: the top level must be a mapping of sections")):
        load_config(path)


def test_configs_stored_before_augment_had_its_own_section_still_load() -> None:
    stored = {"data": {"batch_size": 2, "hflip": 0.1, "shift_scale_rotate": 0.0}}
    config = config_from_dict(stored)
    assert (config.augment.hflip, config.augment.shift_scale_rotate, config.data.batch_size) == (0.1, 0.0, 2)
    assert stored == {
        "data": {"batch_size": 2, "hflip": 0.1, "shift_scale_rotate": 0.0}
    }  # the caller's dict is untouched
