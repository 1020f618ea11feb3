"""Tests for data_tools/dicom_meta.py: DICOM and RSNA age strings.

The tags read from real and synthetic files are tested through the reader, in test_dicom_io.py.
"""

from __future__ import annotations

import pytest

from lungdet.data_tools.dicom_meta import parse_age


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("51", 51),
        ("6", 6),
        ("051Y", 51),
        ("006M", 0),
        ("018M", 1),
        ("000Y", 0),
        ("104W", 1),
        ("400D", 1),
        ("", None),
        (None, None),
        ("abc", None),
        ("51X", None),
    ],
)
def test_parse_age(text: str | None, years: int | None) -> None:
    assert parse_age(text) == years
