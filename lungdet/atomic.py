"""Crash-safe file writes: write to a temporary name in the same folder, then ``os.replace``.

A crash or a kill mid-write leaves the old file (or nothing) in place, never half a file,
because ``os.replace`` within one filesystem is atomic.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` if the block succeeds.

    The temporary file is removed if the block raises, so nothing half-written is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary_name)
    # mkstemp creates files readable by the owner only; give the result the usual permissions.
    os.chmod(temporary, 0o666 & ~_current_umask())
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs: object) -> Iterator[IO]:
    """``open()`` a temporary file beside ``path`` and move it into place when the block succeeds."""
    with atomic_path(path) as temporary:
        with open(temporary, mode, **kwargs) as stream:  # type: ignore[call-overload]
            yield stream


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as stream:
        stream.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as stream:
        stream.write(text)
