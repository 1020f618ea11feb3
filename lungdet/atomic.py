"""Crash-safe file writes: write to a temporary name in the same folder, then ``os.replace``.

A crash or a kill mid-write leaves the old file (or nothing) in place, never half a file,
because ``os.replace`` within one filesystem is atomic.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# os.umask can only be read by setting it: two threads doing that at once could leave the
# process with umask 0 (the C-STORE node writes from one thread per association).
_UMASK_LOCK = threading.Lock()


def _current_umask() -> int:
    with _UMASK_LOCK:
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


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries to disk, so that a file created, renamed or removed in it stays so after a power cut.

    ``os.fsync`` of a file saves its bytes, not its name: the name lives in the folder.
    """
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def write_bytes_durable(path: Path, data: bytes) -> None:
    """:func:`write_bytes_atomic`, and on disk when it returns: the bytes and the new name are fsynced.

    For a write that something outside is told about (a DICOM C-STORE acknowledged to its sender):
    a crash, a kill or a power cut after this returns cannot lose the file.
    """
    path = Path(path)
    with atomic_path(path) as temporary:
        _write_synced(temporary, data)
    fsync_folder(path.parent)


def write_folder_durable(folder: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> bytes) as the folder ``folder``, whole or not at all, and on disk when it returns.

    The files go into a temporary folder beside it, which is renamed into place (a rename is atomic
    for a folder too); an existing ``folder`` is replaced. A leftover temporary folder (a crash
    mid-write) starts with ``.`` and ends with ``.tmp``, for the caller's start-up to remove.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for name, data in files.items():
            _write_synced(temporary / name, data)
        os.chmod(temporary, 0o777 & ~_current_umask())  # mkdtemp makes it owner-only
        fsync_folder(temporary)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(temporary, folder)
        fsync_folder(folder.parent)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
