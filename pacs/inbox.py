"""The C-STORE node's state folder: the bounded inbox, results pending, and the settled journal (no pynetdicom needed).

The layout and the order of its writes, and why a kill -9 loses nothing, are in
:mod:`lungdet.pacs.dimse`'s docstring; this module keeps that folder. ``lungdet pacs`` reads
its defaults from here without importing the network library.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from lungdet.atomic import write_bytes_durable, write_folder_durable
from lungdet.data_tools.dicom_io import dicom_bytes

# C-STORE statuses: the inbox's own refusal (full) and the handler's share them.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATA_SET_MISMATCH = 0xA900  # "Data Set does not match SOP Class": no pixels, several frames, another class
CANNOT_UNDERSTAND = 0xC000  # a well-formed instance this node cannot read or does not analyse

DEFAULT_MAX_INBOX = 1000
DEFAULT_KEEP_DAYS = 30.0
COMPACT_EVERY_S = 3600.0  # while running; and once at every start
DAY_S = 86400.0
MIN_FREE_BYTES = 256 * 1024 * 1024  # below this much free disk beside the inbox, new instances get 0xA700


@dataclass(frozen=True)
class Refusal:
    """An instance the node will not take: the status for its sender, and why (for the log and, cut to 64 characters, Error Comment)."""

    status: int
    reason: str


@dataclass(frozen=True)
class Known:
    """An arriving image that needs no work, and why: it is acknowledged and not written again."""

    reason: str


@dataclass(frozen=True)
class PendingResult:
    """A result waiting in ``pending/NAME/``: its files (report first), the image's study and SOP Instance UID, the report's UID."""

    name: str
    files: tuple[Path, ...]
    study: str
    image: str
    report: str

    @property
    def folder(self) -> Path:
        """``pending/NAME/``, the folder that holds the files."""
        return self.files[0].parent


@dataclass
class Recovery:
    """What start-up found: inputs waiting in the inbox, results waiting to be stored, and the crashes it tidied up after."""

    inbox: int = 0
    pending: int = 0
    temporary_removed: int = 0
    settled_from_pending: int = 0
    inbox_already_settled: int = 0
    forgotten: int = 0  # journal entries older than --keep-days, dropped by the start-up compaction

    def line(self) -> str | None:
        """The log line saying what start-up found; None when it found nothing."""
        if not any(vars(self).values()):
            return None
        tidied = self.temporary_removed + self.settled_from_pending + self.inbox_already_settled
        return (
            f"recovered from the last run: {self.inbox} instance(s) in the inbox, {self.pending} result(s) waiting to be stored"
            + (f" ({tidied} half-done step(s) tidied up)" if tidied else "")
            + (f"; forgot {self.forgotten} image(s) settled longer ago than --keep-days" if self.forgotten else "")
        )


def _sequence(name: str) -> int:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


class DimseState:
    """The node's folder (see the module docstring). Thread-safe: handlers, the worker and the sender share one.

    The inbox is bounded (``max_inbox`` files, counting those being written); :meth:`reserve`
    hands out arrival-ordered names, :meth:`take` gives the worker the oldest, and the settled
    journal makes a re-sent instance known.
    """

    def __init__(
        self,
        folder: Path,
        *,
        max_inbox: int = DEFAULT_MAX_INBOX,
        min_free_bytes: int = MIN_FREE_BYTES,
        keep_days: float = DEFAULT_KEEP_DAYS,
    ) -> None:
        self.folder = Path(folder)
        self.inbox_folder, self.pending_folder, self.failed_folder = (
            self.folder / "inbox",
            self.folder / "pending",
            self.folder / "failed",
        )
        self.journal = self.folder / "settled.jsonl"
        self.max_inbox, self.min_free_bytes, self.keep_days = max_inbox, min_free_bytes, keep_days
        self.last_compaction = 0.0  # time.monotonic() of the last compaction
        self.lock = threading.Condition()
        self.reported: dict[str, str] = {}  # report UID -> the name it was settled under
        self.settled: set[str] = set()  # names reported or skipped
        self.waiting: list[str] = []  # a heap of inbox names ready for the worker
        self.in_inbox: dict[str, str] = {}  # image SOP -> name, for every file in the inbox or being written
        self.next_sequence = 1
        self.recovery = Recovery()

    # --- start-up ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: Path, **options: Any) -> DimseState:
        """Open (or create) the folder and recover from wherever the last run stopped, before anything else touches it."""
        state = cls(folder, **options)
        state._recover()
        state.recovery.forgotten = state.compact()
        return state

    def _recover(self) -> None:
        for sub in (self.inbox_folder, self.pending_folder, self.failed_folder):
            sub.mkdir(parents=True, exist_ok=True)
        recovery = self.recovery
        # Half-written files and folders of a killed run (atomic.py's temporary names): never acknowledged or never complete.
        leftovers = [*self.inbox_folder.glob(".*.tmp"), *self.pending_folder.glob(".*.tmp")]
        for leftover in [*leftovers, *self.folder.glob(f".{self.journal.name}.*.tmp")]:  # a compaction cut short
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            recovery.temporary_removed += 1
        self._end_torn_line()
        sequences = [0]
        for entry in self._read_journal():
            sequences.append(_sequence(entry["name"]))
            if entry["outcome"] in ("reported", "skipped"):
                self.settled.add(entry["name"])
            if entry["outcome"] == "reported" and entry.get("report"):
                self.reported[entry["report"]] = entry["name"]
        pending = {result.name: result for result in self.pending()}
        for path in sorted(self.inbox_folder.glob("*.dcm")):
            name = path.stem
            sequences.append(_sequence(name))
            if name in self.settled:  # crash between steps 3 and 4
                path.unlink()
                recovery.inbox_already_settled += 1
                continue
            if name in pending:  # crash between steps 2 and 3
                self._append_journal(
                    {"name": name, "outcome": "reported", "image": pending[name].image, "report": pending[name].report}
                )
                path.unlink()
                recovery.settled_from_pending += 1
                continue
            image = name.split("-", 1)[1] if "-" in name else name
            self.in_inbox[image] = name
            heapq.heappush(self.waiting, name)
        sequences += [_sequence(name) for name in pending]
        sequences += [_sequence(path.stem) for path in self.failed_folder.glob("*.dcm")]
        self.next_sequence = max(sequences) + 1
        recovery.inbox, recovery.pending = len(self.waiting), len(pending)

    def _end_torn_line(self) -> None:
        # A power cut mid-append leaves a line with no newline; the next append would join it and be lost with it.
        if self.journal.is_file() and self.journal.stat().st_size:
            with open(self.journal, "rb+") as stream:
                stream.seek(-1, os.SEEK_END)
                if stream.read(1) != b"\n":
                    stream.write(b"\n")
                    stream.flush()
                    os.fsync(stream.fileno())

    def _read_journal(self) -> Iterator[dict[str, Any]]:
        if not self.journal.is_file():
            return
        for line in self.journal.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed mid-append (power cut): that step is redone
                continue
            if isinstance(entry, dict) and "name" in entry and "outcome" in entry:
                yield entry

    def _append_journal(self, entry: dict[str, Any]) -> None:
        entry = {**entry, "at": round(time.time())}  # seconds since the epoch: what compaction ages entries by
        with open(self.journal, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(entry, sort_keys=True) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        if entry["outcome"] in ("reported", "skipped"):
            self.settled.add(entry["name"])
        if entry["outcome"] == "reported" and entry.get("report"):
            self.reported[entry["report"]] = entry["name"]

    # --- compaction: the journal keeps --keep-days of history -------------------------------------

    def compact(self, now: float | None = None) -> int:
        """Rewrite ``settled.jsonl`` without the entries older than ``keep_days``; returns how many were dropped.

        Kept whatever its age: an entry whose name still has a file in ``inbox/``, ``pending/`` or
        ``failed/`` (recovery needs it to tell a settled input from a new one), and a last line that
        carries the highest sequence number, so that names are never handed out twice. An entry from
        before entries carried a time is kept and given the time of this compaction. The new journal
        is written to a temporary name, synced, and renamed over the old one, under the lock that
        appends take: a kill -9 leaves the old journal or the new one, whole, and start-up removes the
        temporary file. What is dropped costs only this: an image sent again after ``keep_days`` is
        analysed again, and its result, with the same UIDs, stored again.
        """
        now = time.time() if now is None else now
        with self.lock:
            self.last_compaction = time.monotonic()
            entries = list(self._read_journal())
            on_disk = {path.stem for folder in (self.inbox_folder, self.failed_folder) for path in folder.glob("*.dcm")}
            on_disk |= {path.name for path in self.pending_folder.iterdir() if not path.name.startswith(".")}
            horizon = now - self.keep_days * DAY_S
            kept = [
                {**entry, "at": entry.get("at", round(now))}
                for entry in entries
                if entry.get("at", now) >= horizon or entry["name"] in on_disk
            ]
            dropped = len(entries) - len(kept)
            if not dropped and all("at" in entry for entry in entries):
                return 0
            highest = max(entries, key=lambda entry: _sequence(entry["name"]))
            if dropped and highest["name"] not in {entry["name"] for entry in kept}:
                kept.append({"name": highest["name"], "outcome": "sequence", "at": round(now)})
            text = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in kept)
            write_bytes_durable(self.journal, text.encode("utf-8"))
            self.settled = {entry["name"] for entry in kept if entry["outcome"] in ("reported", "skipped")}
            self.reported = {
                entry["report"]: entry["name"]
                for entry in kept
                if entry["outcome"] == "reported" and entry.get("report")
            }
            return dropped

    def maybe_compact(self) -> int:
        """:meth:`compact` when the last one is :data:`COMPACT_EVERY_S` old (the worker calls this when idle); 0 otherwise."""
        if time.monotonic() - self.last_compaction < COMPACT_EVERY_S:
            return 0
        return self.compact()

    # --- the handler's side ------------------------------------------------------------------------

    def reserve(self, image: str, report: str, size: int) -> str | Refusal | Known:
        """A name in the inbox for an arriving image of ``size`` bytes whose report would be ``report``.

        Or :class:`Known` when it needs no work (this model's report is settled, or it waits in the
        inbox already), or the 0xA700 :class:`Refusal` when the inbox or the disk is full. One lock
        for all three, so that two copies arriving at once become one inbox file.
        """
        with self.lock:
            if report in self.reported:
                return Known("already reported")
            if image in self.in_inbox:
                return Known("already waiting in the inbox")
            count = len(self.in_inbox)
            if count >= self.max_inbox:
                return Refusal(
                    OUT_OF_RESOURCES,
                    f"the inbox is full ({count} instances, --max-inbox {self.max_inbox}); send it again later",
                )
            free = shutil.disk_usage(self.inbox_folder).free
            if free - size < self.min_free_bytes:
                return Refusal(
                    OUT_OF_RESOURCES,
                    f"the disk of {self.folder} is nearly full ({free / 2**20:.0f} MiB free); send it again later",
                )
            name = f"{self.next_sequence:010d}-{image}"
            self.next_sequence += 1
            self.in_inbox[image] = name
            return name

    def admit(self, name: str, data: bytes) -> None:
        """Write the reserved ``name`` to the inbox durably (step 1), then hand it to the worker. Raises OSError (the name is released)."""
        image = name.split("-", 1)[1]
        try:
            write_bytes_durable(self.inbox_folder / f"{name}.dcm", data)
        except BaseException:
            with self.lock:
                self.in_inbox.pop(image, None)
            raise
        with self.lock:
            heapq.heappush(self.waiting, name)
            self.lock.notify_all()

    def inbox_count(self) -> int:
        """The images in the inbox or being written to it: what ``max_inbox`` bounds."""
        with self.lock:
            return len(self.in_inbox)

    # --- the worker's side -------------------------------------------------------------------------

    def take(self, timeout: float) -> str | None:
        """The oldest inbox name, waiting up to ``timeout`` seconds for one; None if none came."""
        with self.lock:
            if not self.waiting:
                self.lock.wait(timeout)
            return heapq.heappop(self.waiting) if self.waiting else None

    def inbox_path(self, name: str) -> Path:
        """``inbox/NAME.dcm``, the inbox file of ``name``."""
        return self.inbox_folder / f"{name}.dcm"

    def keep_pending(self, name: str, study: str, image: str, datasets: Sequence[Dataset]) -> PendingResult:
        """Step 2: the result as ``pending/NAME/`` (``0.dcm`` the report, then the others, and result.json), whole or not at all."""
        files = {f"{index}.dcm": dicom_bytes(dataset) for index, dataset in enumerate(datasets)}
        report = str(datasets[0].SOPInstanceUID)
        files["result.json"] = json.dumps({"study": study, "image": image, "report": report}).encode()
        write_folder_durable(self.pending_folder / name, files)
        folder = self.pending_folder / name
        return PendingResult(
            name, tuple(folder / file for file in files if file.endswith(".dcm")), study, image, report
        )

    def settle(
        self, name: str, *, outcome: str, image: str, report: str | None = None, reason: str | None = None
    ) -> None:
        """Steps 3 and 4: record ``name`` as reported (with its report UID) or skipped, then remove its inbox file."""
        entry = {"name": name, "outcome": outcome, "image": image, "report": report, "reason": reason}
        with (
            self.lock
        ):  # with the journal and the inbox set changed together, a handler sees the image in one or the other
            self._append_journal({key: value for key, value in entry.items() if value is not None})
            self.in_inbox.pop(image, None)
        # Not fsynced: a removal lost to a power cut is redone at start-up, which finds the name settled.
        self.inbox_path(name).unlink(missing_ok=True)

    def set_aside(self, name: str, image: str) -> Path:
        """Move an input the worker keeps failing on to ``failed/`` (not settled: sent again, it is tried again)."""
        target = self.failed_folder / f"{name}.dcm"
        self.inbox_path(name).replace(target)
        with self.lock:
            self.in_inbox.pop(image, None)
        return target

    # --- the sender's side -------------------------------------------------------------------------

    def pending(self) -> list[PendingResult]:
        """Every complete result not yet accepted by the receiver, oldest first."""
        results = []
        for folder in sorted(self.pending_folder.iterdir()):
            if folder.name.startswith(".") or not (folder / "result.json").is_file():
                continue
            facts = json.loads((folder / "result.json").read_text(encoding="utf-8"))
            files = tuple(sorted(folder.glob("*.dcm"), key=lambda path: int(path.stem)))
            results.append(PendingResult(folder.name, files, facts["study"], facts["image"], facts["report"]))
        return results

    def remove_pending(self, result: PendingResult) -> None:
        """Step 5's end: the receiver holds every file. (Not fsynced: a folder back after a power cut is stored again, harmlessly.)"""
        shutil.rmtree(result.folder, ignore_errors=True)
