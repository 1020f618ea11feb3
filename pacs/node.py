"""``lungdet pacs``: a DICOM node that finds new chest X-rays on a DICOMweb server, runs the detector, and stores the report back.

Each poll:

1. finds instances on the server (QIDO-RS, paged) that this node has not settled yet;
2. skips, with one log line each and nothing else, the ones that are not chest radiographs it
   can read: another modality than CR or DX, several frames, no pixels, a file that cannot be
   decoded (the node's own reports, overlays and presentation states are passed over silently);
3. asks the server whether the image already has this model's report (the report's UID is derived
   from the image and the model, see :mod:`lungdet.show.dicom_derived`), and if not fetches it (WADO-RS),
   runs the detector, and stores the report, and the overlay and GSPS if asked, into the image's study (STOW-RS).

Nothing is lost: a result is written to ``STATE/pending/`` before it is stored and removed only
once the server has accepted it; pending results are stored first on every poll. An unreachable
server is retried with a growing pause (said once, and once again when it answers). The node
never stops on one bad instance or one failed request. ``STATE/state.json`` remembers what is
settled, so a restarted node neither repeats work nor logs a skipped instance again; the server
check makes that hold even with a fresh state folder.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import requests

from lungdet.atomic import write_bytes_atomic, write_text_atomic
from lungdet.data_tools.dicom_io import dicom_bytes, image_from_dataset, read_dataset
from lungdet.data_tools.gate import not_frontal_chest
from lungdet.data_tools.image_io import DEFAULT_MAX_PIXELS
from lungdet.data_tools.metadata import dicom_tags
from lungdet.errors import ImageReadError
from lungdet.pacs.audit import AuditTrail, NodeAudit, study_of
from lungdet.show.dicom_derived import (
    GSPS_SERIES_DESCRIPTION,
    OVERLAY_SERIES_DESCRIPTION,
    REPORT_SERIES_DESCRIPTION,
    ModelIdentity,
    report_uid,
)
from lungdet.show.dicom_results import result_datasets
from lungdet.submission.prediction_string import keep_confident

LOG = logging.getLogger("lungdet.pacs")
CHEST_MODALITIES = ("CR", "DX")
PAGE = 500
PROGRESS_EVERY = 100  # a progress line every so many instances in a long poll
# QIDO fields the node decides by (the server adds the study, series and instance UIDs).
FIELDS = ("Modality", "NumberOfFrames", "SeriesDescription", "SOPClassUID")
OWN_SERIES = (REPORT_SERIES_DESCRIPTION, OVERLAY_SERIES_DESCRIPTION, GSPS_SERIES_DESCRIPTION)
MAX_PAUSE_S = 60.0
# What a failed request looks like: the server down or restarting, a proxy in between, a timeout.
UNREACHABLE = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)


class Unreachable(Exception):
    """The server did not answer, or refused a query (a wrong password, a server error); the poll stops here and is retried."""


def _value(instance: dict[str, Any], tag: str) -> Any:
    values = instance.get(tag, {}).get("Value") or [None]
    return values[0]


@dataclass(frozen=True)
class Candidate:
    """One instance the server listed: its UIDs and what the node decides by."""

    study: str
    series: str
    sop: str
    modality: str
    frames: int
    series_description: str

    @classmethod
    def from_qido(cls, instance: dict[str, Any]) -> Candidate:
        """From one instance of a QIDO-RS reply (DICOM JSON, keyed by tag); no NumberOfFrames counts as one frame."""
        return cls(
            study=str(_value(instance, "0020000D")),
            series=str(_value(instance, "0020000E")),
            sop=str(_value(instance, "00080018")),
            modality=str(_value(instance, "00080060") or ""),
            frames=int(_value(instance, "00280008") or 1),
            series_description=str(_value(instance, "0008103E") or ""),
        )

    def skip_reason(self) -> str | None:
        """Why the node will not read this instance, from what the server listed; None when it will."""
        if self.modality not in CHEST_MODALITIES:
            return f"modality {self.modality or '(none)'}, not a chest radiograph ({' or '.join(CHEST_MODALITIES)})"
        if self.frames > 1:
            return f"{self.frames} frames; lungdet reads single-frame radiographs"
        return None


@dataclass
class NodeState:
    """What is settled (``done``: image -> its report UID; ``skipped``: image -> why) and the results waiting to be stored."""

    folder: Path
    done: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def pending_folder(self) -> Path:
        """``STATE/pending/``: one folder per result not yet accepted by the server."""
        return self.folder / "pending"

    @classmethod
    def load(cls, folder: Path) -> NodeState:
        """The state saved in ``folder/state.json``; an empty one when there is no such file."""
        path = Path(folder) / "state.json"
        if not path.is_file():
            return cls(Path(folder))
        document = json.loads(path.read_text(encoding="utf-8"))
        return cls(Path(folder), dict(document.get("done", {})), dict(document.get("skipped", {})))

    def save(self) -> None:
        """Write ``done`` and ``skipped`` to ``state.json`` atomically."""
        write_text_atomic(
            self.folder / "state.json",
            json.dumps({"done": self.done, "skipped": self.skipped}, indent=1, sort_keys=True),
        )

    def settled(self, sop: str) -> bool:
        """Whether the image with SOP Instance UID ``sop`` is done or skipped."""
        return sop in self.done or sop in self.skipped

    def keep_pending(self, image_sop: str, study: str, datasets: list[pydicom.Dataset]) -> Path:
        """Write a result's files under ``pending/{image}/`` before anything is sent: from here on a crash loses nothing."""
        folder = self.pending_folder / image_sop
        for index, dataset in enumerate(datasets):
            write_bytes_atomic(folder / f"{index}.dcm", dicom_bytes(dataset))
        write_text_atomic(folder / "study.txt", study)
        return folder

    def pending(self) -> Iterator[tuple[str, str, list[Path]]]:
        """``(image SOP UID, study UID, files)`` of every result not yet accepted by the server."""
        if not self.pending_folder.is_dir():
            return
        for folder in sorted(self.pending_folder.iterdir()):
            files = sorted(folder.glob("*.dcm"))
            if files and (folder / "study.txt").is_file():
                yield folder.name, (folder / "study.txt").read_text(encoding="utf-8").strip(), files


@dataclass
class PollSummary:
    """What one poll did: instances counted by outcome, and how long it took, in seconds."""

    listed: int = 0
    reported: int = 0
    with_boxes: int = 0
    already: int = 0
    skipped: int = 0
    stored_from_disk: int = 0
    pending: int = 0
    failed: int = 0
    seconds: float = 0.0

    def line(self, number: int) -> str:
        """The log line for poll ``number``."""
        return (
            f"poll {number}: {self.listed} instance(s) listed, {self.reported} reported ({self.with_boxes} with boxes), "
            f"{self.already} already reported, {self.skipped} skipped, {self.stored_from_disk} stored from disk, "
            f"{self.pending} waiting on disk{f', {self.failed} failed (tried again next poll)' if self.failed else ''}; {self.seconds:.1f} s"
        )


class PacsNode:
    """The node's work on one server with one detector; :meth:`poll` is one round, :meth:`run` the loop."""

    def __init__(
        self,
        client: Any,
        detector: Any,
        model: ModelIdentity,
        state: NodeState,
        *,
        cut_off: float,
        overlay: bool = False,
        gsps: bool = False,
        gate: bool = True,
        audit: AuditTrail | None = None,
        say: Callable[[str], None] = LOG.info,
    ) -> None:
        self.client, self.detector, self.model, self.state = client, detector, model, state
        self.cut_off, self.overlay, self.gsps, self.gate, self.say = cut_off, overlay, gsps, gate, say
        self.audited = NodeAudit(audit, "LUNGDET")
        self.server = str(getattr(client, "base_url", "") or "the DICOMweb server")

    # --- talking to the server: every failure to answer becomes Unreachable ---------------------

    def _ask(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except UNREACHABLE as error:
            raise Unreachable(str(error).splitlines()[0][:200]) from None
        except requests.exceptions.HTTPError as error:
            if call == self.client.store_instances:
                raise  # a refused result: store() keeps it on disk
            status = error.response.status_code if error.response is not None else "?"
            hint = "; check --username and $LUNGDET_PACS_PASSWORD, or --token" if status in (401, 403) else ""
            raise Unreachable(f"HTTP {status} from {getattr(call, '__name__', 'the server')}{hint}") from None

    def list_instances(self) -> list[Candidate]:
        """Every instance on the server (QIDO-RS, in pages of :data:`PAGE`). Raises Unreachable."""
        found: list[Candidate] = []
        while True:
            query = f"includefield={','.join(FIELDS)}&limit={PAGE}&offset={len(found)}"
            try:
                page = self._ask(self.client.search_for_instances, fields=list(FIELDS), limit=PAGE, offset=len(found))
            except Unreachable as error:
                self.audited.query(self.server, f"{self.server}/instances", query, failed=str(error))
                raise
            self.audited.query(self.server, f"{self.server}/instances", query)
            found += [Candidate.from_qido(instance) for instance in page]
            if len(page) < PAGE:
                return found

    def has_report(self, candidate: Candidate, uid: str) -> bool:
        """Whether the candidate's study on the server has instance ``uid``, this model's report. Raises Unreachable."""
        return bool(
            self._ask(
                self.client.search_for_instances,
                study_instance_uid=candidate.study,
                search_filters={"SOPInstanceUID": uid},
            )
        )

    def store(self, study: str, files: list[Path]) -> bool:
        """STOW the files; True when the server took them, False (and one log line) when it refused."""
        datasets = [read_dataset(path) for path in files]
        audit_study = study_of(datasets[0])
        self.audited.sending(self.server, audit_study, done=False)
        try:
            self._ask(self.client.store_instances, datasets, study_instance_uid=study)
        except requests.exceptions.HTTPError as error:
            status = error.response.status_code if error.response is not None else "?"
            self.say(
                f"the server refused to store {files[0].parent.name}'s result (HTTP {status}); kept on disk, retried next poll"
            )
            self.audited.sending(self.server, audit_study, done=True, refused=f"HTTP {status}")
            return False
        self.audited.sending(self.server, audit_study, done=True)
        return True

    # --- one poll --------------------------------------------------------------------------------

    def poll(self) -> PollSummary:
        """One round: store the results waiting on disk, then settle every instance not settled yet.

        An instance that fails is logged, counted in ``failed`` and tried again next poll. Raises Unreachable when the
        server stops answering.
        """
        started = time.monotonic()
        summary = PollSummary()
        for image, study, files in list(self.state.pending()):
            if self.store(study, files):
                self._settle(image, files[0].parent)
                summary.stored_from_disk += 1
        # An image whose result still waits on disk is not worked on again: its result only needs storing.
        waiting = {image for image, _, _ in self.state.pending()}
        candidates = [
            candidate
            for candidate in self.list_instances()
            if not self.state.settled(candidate.sop) and candidate.sop not in waiting
        ]
        own = [candidate for candidate in candidates if candidate.series_description in OWN_SERIES]
        if own:  # the node's own reports and overlays: settled without a word, so they are not listed again
            self.state.skipped.update({candidate.sop: "a lungdet result" for candidate in own})
            self.state.save()
            candidates = [candidate for candidate in candidates if candidate.series_description not in OWN_SERIES]
        summary.listed = len(candidates)
        for done, candidate in enumerate(candidates, start=1):
            try:
                outcome, boxes = self.process(candidate)
            except Unreachable:
                raise
            except (
                Exception
            ) as error:  # a fault of ours on one image must not stop the node; the image is tried again next poll
                self.say(
                    f"could not process instance {candidate.sop} ({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}); tried again next poll"
                )
                summary.failed += 1
                continue
            if outcome == "reported":
                summary.reported += 1
                summary.with_boxes += boxes > 0
            elif outcome in ("already", "skipped"):
                setattr(summary, outcome, getattr(summary, outcome) + 1)
            if done % PROGRESS_EVERY == 0 and done < len(candidates):
                self.say(f"  {done} of {len(candidates)} instances settled ({time.monotonic() - started:.0f} s)")
        summary.pending = sum(1 for _ in self.state.pending())
        summary.seconds = time.monotonic() - started
        return summary

    def process(self, candidate: Candidate) -> tuple[str, int]:
        """Settle one instance: ('reported' | 'already' | 'skipped' | 'pending', boxes in the report).

        'pending': the result waits on disk for the next poll. Raises Unreachable when the server stops answering.
        """
        reason = candidate.skip_reason()
        if reason is None:
            try:
                dataset = self._ask(self.client.retrieve_instance, candidate.study, candidate.series, candidate.sop)
                # The client has parsed the body already: read its image, not a re-encoded copy of it.
                image = image_from_dataset(dataset, name=f"instance {candidate.sop}", max_pixels=DEFAULT_MAX_PIXELS)
                reason = not_frontal_chest(image.meta) if self.gate else None
            except Unreachable:
                raise
            except ImageReadError as error:
                # What is wrong only: the reader's advice ("remove it from the folder") is for files, not an archive.
                reason = error.reason.split("; ")[0]
            except Exception as error:  # a body pydicom cannot parse: the server holds a damaged file
                reason = (
                    f"cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})"
                )
        if reason is not None:
            self.say(f"skipped instance {candidate.sop}: {reason}")
            self.state.skipped[candidate.sop] = reason
            self.state.save()
            return "skipped", 0
        self.audited.received(self.server, "", study_of(dataset), node_asked=True)
        uid = report_uid(dataset, self.model)
        if self.has_report(candidate, uid):
            self.state.done[candidate.sop] = uid
            self.state.save()
            return "already", 0
        result = self.detector.predict(image.pixels, dicom_tags(image.meta))
        prediction = keep_confident(result.prediction, min_confidence=self.cut_off)
        datasets = result_datasets(
            dataset, image.pixels, prediction, result.probability, self.model, overlay=self.overlay, gsps=self.gsps
        )
        folder = self.state.keep_pending(candidate.sop, candidate.study, datasets)
        if not self.store(candidate.study, sorted(folder.glob("*.dcm"))):
            return "pending", len(prediction.scores)
        self._settle(candidate.sop, folder, uid)
        return "reported", len(prediction.scores)

    def _settle(self, image_sop: str, folder: Path, uid: str | None = None) -> None:
        self.state.done[image_sop] = (
            uid or read_dataset(sorted(folder.glob("*.dcm"))[0], headers_only=True).SOPInstanceUID
        )
        self.state.save()
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()

    # --- the loop --------------------------------------------------------------------------------

    def run(
        self, *, poll_seconds: float, once: bool, retry_seconds: float, sleep: Callable[[float], None] = time.sleep
    ) -> int:
        """Poll until stopped (or once). Returns 0, or 1 when ``once`` ends with results still waiting on disk or the server never answered."""
        self.audited.application(start=True)
        try:
            return self._loop(poll_seconds=poll_seconds, once=once, retry_seconds=retry_seconds, sleep=sleep)
        finally:
            self.audited.application(start=False)

    def _loop(self, *, poll_seconds: float, once: bool, retry_seconds: float, sleep: Callable[[float], None]) -> int:
        number, pause, down_since = 0, 1.0, None
        while True:
            try:
                summary = self.poll()
            except Unreachable as error:
                if down_since is None:
                    down_since = time.monotonic()
                    self.say(
                        f"the server does not answer ({error}); retrying with a growing pause, up to {MAX_PAUSE_S:g} s"
                    )
                if once and time.monotonic() - down_since >= retry_seconds:
                    waiting = sum(1 for _ in self.state.pending())
                    self.say(
                        f"giving up after {retry_seconds:g} s; {waiting} result(s) kept in {self.state.pending_folder}, stored by the next run"
                    )
                    return 1
                sleep(pause)
                pause = min(pause * 2, MAX_PAUSE_S)
                continue
            if down_since is not None:
                self.say(f"the server answers again after {time.monotonic() - down_since:.0f} s")
                down_since, pause = None, 1.0
            number += 1
            self.say(summary.line(number))
            if once:
                return 1 if summary.pending or summary.failed else 0
            sleep(poll_seconds)
