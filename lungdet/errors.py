"""Domain errors shared by every lungdet stage.

Each message names the file or row, says what is wrong and ends with how to fix it, so the
command line can print it as is (``lungdet`` exits with status 2 on any of these).
"""

from __future__ import annotations


class LungdetError(Exception):
    """Base class: an input problem the user can fix. The CLI prints the message without a traceback."""


class ImageReadError(LungdetError, ValueError):
    """An image (DICOM, PNG or JPEG) cannot be read or has no usable pixels.

    ``path`` names the source (a file, or an upload's hash), ``reason`` says what is wrong and
    what to do, ``kind`` is a short category ('empty', 'truncated', 'no_pixels', ...) for
    summaries that count kinds and for the server's status codes.
    """

    def __init__(self, path: object, reason: str, *, kind: str = "unreadable") -> None:
        self.path = path
        self.reason = reason
        self.kind = kind
        super().__init__(f"{path}: {reason}")


class DicomReadError(ImageReadError):
    """A DICOM file cannot be read or has no usable pixels."""


class LabelError(LungdetError, ValueError):
    """An RSNA labels or class-info CSV is malformed."""


class SubmissionError(LungdetError, ValueError):
    """A submission CSV or PredictionString is malformed."""


class ConfigError(LungdetError, ValueError):
    """A training config has an unknown key or an out-of-range value."""
