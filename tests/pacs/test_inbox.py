"""Tests for pacs/inbox.py's compaction of settled.jsonl: what it keeps, its crash points, and kill -9 in the middle of it.

(The inbox's other crash points are in test_dimse.py, with the node that writes them.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from lungdet.pacs.inbox import DAY_S, DimseState

NOW = time.time()
OLD = NOW - 40 * DAY_S


def entry(sequence: int, *, at: float | None, outcome: str = "reported") -> dict:
    name = f"{sequence:010d}-1.2.{sequence}"
    line = {"name": name, "outcome": outcome, "image": f"1.2.{sequence}", "report": f"2.25.{sequence}"}
    return line if at is None else {**line, "at": round(at)}


def write_journal(folder: Path, entries: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settled.jsonl").write_text("".join(json.dumps(line) + "\n" for line in entries))


def journal_names(folder: Path) -> list[str]:
    return [json.loads(line)["name"] for line in (folder / "settled.jsonl").read_text().splitlines() if line.strip()]


def test_compaction_drops_old_entries_and_keeps_what_recovery_and_names_need(tmp_path: Path) -> None:
    # 1-3 old, 4 old but its inbox file is still there (killed between settling and removing it), 5-6 recent.
    write_journal(
        tmp_path,
        [entry(1, at=OLD), entry(2, at=OLD), entry(3, at=OLD), entry(4, at=OLD), entry(5, at=NOW), entry(6, at=NOW)],
    )
    state = DimseState(tmp_path, keep_days=30)
    state._recover()
    (state.inbox_folder / "0000000004-1.2.4.dcm").write_bytes(b"acknowledged")
    assert state.compact(now=NOW) == 3
    assert journal_names(tmp_path) == [entry(n, at=None)["name"] for n in (4, 5, 6)]
    # A forgotten image is new again (analysed again, with the same result UIDs); a remembered one is known.
    assert isinstance(state.reserve("1.2.1", "2.25.1", 10), str)
    assert state.reserve("1.2.5", "2.25.5", 10).reason == "already reported"
    assert state.compact(now=NOW) == 0 and len(journal_names(tmp_path)) == 3  # nothing more to drop: not rewritten

    # Drop the newest too: a line keeps the highest sequence, so names are never handed out twice.
    write_journal(tmp_path / "b", [entry(1, at=OLD), entry(9, at=OLD)])
    again = DimseState.open(tmp_path / "b", keep_days=30)
    assert again.recovery.forgotten == 2 and again.settled == set()
    assert [json.loads(line)["outcome"] for line in (tmp_path / "b" / "settled.jsonl").read_text().splitlines()] == [
        "sequence"
    ]
    assert DimseState.open(tmp_path / "b").next_sequence == 10


def test_entries_written_before_compaction_existed_are_stamped_not_dropped(tmp_path: Path) -> None:
    write_journal(tmp_path, [entry(1, at=None), entry(2, at=None)])
    state = DimseState.open(tmp_path, keep_days=30)
    stamped = [json.loads(line) for line in (tmp_path / "settled.jsonl").read_text().splitlines()]
    assert [line["name"] for line in stamped] == journal_names(tmp_path) and all("at" in line for line in stamped)
    assert state.settled == {entry(1, at=None)["name"], entry(2, at=None)["name"]}


def test_a_compaction_killed_before_its_rename_leaves_the_old_journal_whole(tmp_path: Path) -> None:
    entries = [entry(1, at=OLD), entry(2, at=NOW)]
    write_journal(tmp_path, entries)
    # atomic.py's temporary name, half written, as a kill mid-compaction leaves it.
    (tmp_path / ".settled.jsonl.k3j4.tmp").write_text(json.dumps(entries[1])[:20])
    state = DimseState(tmp_path, keep_days=30)
    state._recover()
    assert not list(tmp_path.glob(".*.tmp")) and state.settled == {entry(1, at=None)["name"], entry(2, at=None)["name"]}


def test_a_line_torn_by_a_power_cut_does_not_swallow_the_next_one(tmp_path: Path) -> None:
    write_journal(tmp_path, [entry(1, at=NOW)])
    with open(tmp_path / "settled.jsonl", "a") as journal:
        journal.write('{"name": "00000')
    state = DimseState.open(tmp_path)
    state.settle("0000000002-1.2.2", outcome="reported", image="1.2.2", report="2.25.2")
    assert DimseState.open(tmp_path).settled == {entry(1, at=None)["name"], "0000000002-1.2.2"}


CHILD = """
import json, sys
from pathlib import Path
from lungdet.pacs.inbox import DAY_S, DimseState
folder, start = Path(sys.argv[1]), int(sys.argv[2])
state = DimseState.open(folder, keep_days=30)
print("ready", flush=True)
old = __import__("time").time() - 40 * DAY_S
sequence = start
while True:  # old entries in, compaction out, as fast as it goes
    with open(folder / "settled.jsonl", "a") as journal:
        for _ in range(300):
            sequence += 1
            journal.write(json.dumps({"name": f"{sequence:010d}-9.{sequence}", "outcome": "skipped", "image": f"9.{sequence}", "at": round(old)}) + "\\n")
    state.compact()
"""


def test_kill_9_during_compaction_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """A child compacts a journal over and over and is killed with SIGKILL at random moments; the recent entries survive each kill once."""
    recent = [entry(n, at=time.time()) for n in range(1, 5001)]
    write_journal(tmp_path, recent)
    expected = sorted(line["name"] for line in recent)
    generator = random.Random(5)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for attempt in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(100_000 * (attempt + 1))],
            stdout=subprocess.PIPE,
            text=True,
            env=environment,
        )
        assert child.stdout.readline().strip() == "ready"
        time.sleep(generator.uniform(0.05, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        names = journal_names(tmp_path)
        kept = sorted(name for name in names if not name.split("-", 1)[1].startswith("9."))
        assert kept == expected, f"attempt {attempt}: recent entries lost or repeated"
        assert len(names) == len(set(names))
    state = DimseState.open(tmp_path)
    assert not list(tmp_path.glob(".*.tmp")) and {
        name for name in state.settled if not name.split("-")[1].startswith("9.")
    } == set(expected)
