"""lungdet/typed_config.py: range rules kept beside their fields (``ranged``), checked through nested sections."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from lungdet.errors import ConfigError
from lungdet.typed_config import build_dataclass, check_ranges, flat_section, flattened, nest_flat_keys, ranged


@dataclass
class Inner:
    size: int = ranged(64, check=lambda v: 32 <= v <= 128, allowed="between 32 and 128")
    sizes: list[int] = ranged(default_factory=lambda: [1, 2], check=lambda v: len(v) > 0, allowed="a non-empty list")
    name: str = "free"  # no rule: anything goes


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    rate: float = ranged(0.5, check=lambda v: 0.0 <= v <= 1.0, allowed="in [0, 1]")


def test_defaults_pass_and_each_rule_names_its_dotted_key() -> None:
    check_ranges(Outer())
    assert Outer().inner.sizes == [1, 2] and Outer().inner.sizes is not Outer().inner.sizes
    with pytest.raises(
        ConfigError, match=re.escape("config inner.size=16 is out of range: must be between 32 and 128")
    ):
        check_ranges(build_dataclass(Outer, {"inner": {"size": 16}}))
    with pytest.raises(
        ConfigError, match=re.escape("settings inner.sizes=[] is out of range: must be a non-empty list")
    ):
        check_ranges(build_dataclass(Outer, {"inner": {"sizes": []}}), name="settings")
    with pytest.raises(ConfigError, match=re.escape("config rate=2.0 is out of range: must be in [0, 1]")):
        check_ranges(build_dataclass(Outer, {"rate": 2.0, "inner": {"name": "anything"}}))


def test_the_first_broken_field_in_field_order_is_named() -> None:
    with pytest.raises(ConfigError, match=r"inner\.size=1 "):
        check_ranges(build_dataclass(Outer, {"inner": {"size": 1}, "rate": 9.0}))


@dataclass
class Record:
    count: int = ranged(0, check=lambda v: v >= 0, allowed=">= 0")


@dataclass
class WithRecord:
    rate: float = 0.5
    record: Record = flat_section(Record)


def test_a_flat_section_is_nested_in_code_and_flat_in_the_file() -> None:
    built = build_dataclass(WithRecord, nest_flat_keys(WithRecord, {"rate": 0.25, "count": 3}))
    assert built == WithRecord(rate=0.25, record=Record(count=3))
    assert list(flattened(built).items()) == [("rate", 0.25), ("count", 3)]
    with pytest.raises(ConfigError, match=re.escape("config count=-1 is out of range: must be >= 0")):
        check_ranges(WithRecord(record=Record(count=-1)))
