import argparse

import pytest

from lungdet.cli_types import device_name, fraction, int_in_range, positive_seconds


@pytest.mark.parametrize("text, value", [("0", 0.0), ("1", 1.0), ("0.25", 0.25)])
def test_fraction_accepts_the_closed_unit_interval(text, value):
    assert fraction(text) == value


@pytest.mark.parametrize(
    "text, message",
    [("1.5", r"must be in \[0, 1\], got 1.5"), ("-0.1", "got -0.1"), ("nan", "got nan"), ("half", "expected a number")],
)
def test_fraction_rejects_the_rest_with_the_range(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        fraction(text)


def test_int_in_range_checks_both_bounds_and_type():
    parse = int_in_range(1, 100)
    assert parse("1") == 1 and parse("100") == 100
    with pytest.raises(argparse.ArgumentTypeError, match="must be between 1 and 100, got 101"):
        parse("101")
    with pytest.raises(argparse.ArgumentTypeError, match="expected a whole number between 1 and 100, got '2.5'"):
        parse("2.5")
    with pytest.raises(argparse.ArgumentTypeError, match="must be at least 0, got -1"):
        int_in_range(0)("-1")


@pytest.mark.parametrize(
    "text, message",
    [
        ("0", "must be more than 0 seconds, got 0"),
        ("-2", "got -2"),
        ("inf", "got inf"),
        ("nan", "got nan"),
        ("soon", "expected a number of seconds"),
    ],
)
def test_positive_seconds_rejects_what_is_not_a_wait(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        positive_seconds(text)
    assert positive_seconds("0.5") == 0.5


@pytest.mark.parametrize("text", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_name_accepts_what_resolve_device_knows(text):
    assert device_name(text) == text


@pytest.mark.parametrize("text", ["gpu", "CUDA", "cuda:", "cuda:x", "cpu ", "mps", ""])
def test_device_name_rejects_the_rest_naming_the_forms(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected auto, cpu, cuda or cuda:N \(N a GPU index\), got"):
        device_name(text)
