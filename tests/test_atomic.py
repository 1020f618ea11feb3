"""Tests for lungdet/atomic.py: the file appears whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungdet.atomic import atomic_open, atomic_path, write_bytes_atomic, write_text_atomic


def test_success_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_open(target, "w", encoding="utf-8") as stream:
        stream.write("new")
        assert target.read_text() == "old", "the new content must not be visible before the block ends"
    assert target.read_text() == "new"
    assert [path.name for path in tmp_path.iterdir()] == ["out.txt"]


def test_exception_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_open(target, "w", encoding="utf-8") as stream:
            stream.write("half of the new")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["out.txt"]


def test_exception_before_the_first_write_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.bin"
    with pytest.raises(KeyError):
        with atomic_path(target) as temporary:
            assert temporary.parent == tmp_path and temporary.name.endswith(".tmp")
            raise KeyError("stop")
    assert list(tmp_path.iterdir()) == []


def test_write_helpers_create_parent_folders(tmp_path: Path) -> None:
    write_bytes_atomic(tmp_path / "a" / "b" / "data.bin", b"\x00\xff")
    write_text_atomic(tmp_path / "a" / "note.txt", "é\n")
    assert (tmp_path / "a" / "b" / "data.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "a" / "note.txt").read_bytes() == "é\n".encode()


def test_durable_writes_leave_the_file_or_folder_whole(tmp_path: Path) -> None:
    from lungdet.atomic import write_bytes_durable, write_folder_durable

    write_bytes_durable(tmp_path / "inbox" / "a.dcm", b"DICM")
    assert (tmp_path / "inbox" / "a.dcm").read_bytes() == b"DICM" and [
        path.name for path in (tmp_path / "inbox").iterdir()
    ] == ["a.dcm"]
    write_folder_durable(tmp_path / "pending" / "a", {"0.dcm": b"report", "result.json": b"{}"})
    write_folder_durable(tmp_path / "pending" / "a", {"0.dcm": b"report again"})  # replaces the folder as a whole
    assert sorted(path.name for path in (tmp_path / "pending").iterdir()) == ["a"]
    assert sorted(path.name for path in (tmp_path / "pending" / "a").iterdir()) == ["0.dcm"]
    assert (tmp_path / "pending" / "a" / "0.dcm").read_bytes() == b"report again"


def test_a_failed_folder_write_leaves_nothing(tmp_path: Path) -> None:
    from lungdet.atomic import write_folder_durable

    with pytest.raises(TypeError):
        write_folder_durable(tmp_path / "a", {"0.dcm": b"fine", "1.dcm": "not bytes"})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []
