"""``lungdet pacs --listen``: a DICOM C-STORE node. Chest X-rays come in by C-STORE, results go out by C-STORE (or STOW-RS).

Run: ``lungdet pacs --listen LUNGDET@0.0.0.0:11112 --allow ORTHANC --send-to ORTHANC@pacs.example:4242 --checkpoint runs/r50/best.pt``

This is how hospitals route images to AI nodes (Orthanc's routing, dcm4chee's export rules, MONAI
Deploy's Informatics Gateway) and take the results back. The node is a Storage SCP for chest
radiographs (CR, DX for presentation and for processing, Secondary Capture) in every transfer
syntax this environment can decode (:func:`accepted_transfer_syntaxes`), and a Verification SCP
(C-ECHO). Associations from calling AE titles not in ``--allow`` are rejected (A-ASSOCIATE-RJ,
"calling AE title not recognised") unless ``--allow-any``.

The C-STORE handler checks and decodes the instance (a few milliseconds for an RSNA JPEG), so
that bad input is refused to its sender, who can alert someone, rather than acknowledged and then
dropped: a multi-frame image or one without pixels gets 0xA900, a frame that does not decode
gets 0xC000, a full inbox or disk 0xA700; none of these writes anything. An image whose tags say
it is not a frontal chest radiograph (:mod:`lungdet.data_tools.gate`: CT, a lateral view, an
abdomen film) is acknowledged, so that the archive does not send it again, logged as skipped with
the reason, and nothing is written or sent for it (``--allow-any-view`` turns that check off). Instances of other SOP classes are refused at association (their presentation context
is rejected). The node's own results coming back (a routing loop) are acknowledged and dropped.
Inference never runs in the handler: one worker thread takes the inbox in arrival order, and a
sender thread stores the results; a file the worker still cannot read is logged and skipped, and
a fault of ours (say, out of memory) is retried twice and then set aside in ``failed/``.

The state folder (``--state-dir``)::

    inbox/{sequence}-{image SOP}.dcm     what was acknowledged and has no result yet
    pending/{sequence}-{image SOP}/      a result (report, overlay, GSPS) waiting to be stored, and result.json
    failed/                              inputs that made the worker fail three times (move back into inbox/ to retry)
    settled.jsonl                        one line per settled input: reported (with its report UID) or skipped,
                                         and when; compacted to --keep-days (DimseState.compact)

**The order of writes, and why kill -9 loses nothing.** Every step below is durable (written to a
temporary name, fsynced, renamed, folder fsynced) before the next starts:

1. The handler writes ``inbox/NAME.dcm`` and only then answers 0x0000. Killed before the rename,
   only a temporary file is left (removed at start-up) and the sender, having no success status,
   sends again. Killed after the rename but before the answer, the image is processed from the
   inbox; if the sender sends it again, it is known (below) and acknowledged without a second copy.
2. The worker writes the whole result as ``pending/NAME/`` (a folder renamed into place, so it is
   there whole or not at all). Killed before, the inbox file is still there and is processed again.
3. It appends ``NAME`` with its report UID to ``settled.jsonl``. Killed between 2 and 3, start-up
   finds ``pending/NAME`` beside ``inbox/NAME.dcm`` and records it then; nothing is recomputed.
4. It removes ``inbox/NAME.dcm``. Killed between 3 and 4, start-up finds ``NAME`` settled and
   removes the inbox file.
5. The sender stores ``pending/NAME`` and removes it only once the receiver accepted every file
   (success, a warning, or "duplicate SOP instance"). Killed in between, it is stored again after
   the restart: the results' UIDs are derived from the image and the model
   (:func:`~lungdet.show.dicom_derived.report_uid`), so a second store is the same instance to the
   receiver and the study still holds one result set.

Start-up does that recovery before it listens; pending results are then stored oldest first, ahead
of anything new. An image whose report (this model's, by UID) is in ``settled.jsonl``, or that waits
in the inbox, is acknowledged when sent again but not processed again.
"""

from __future__ import annotations

import collections
import heapq
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from lungdet.data_tools.dicom_io import (
    DicomImage,
    image_from_dataset,
    read_dataset,
    read_dataset_bytes,
)
from lungdet.data_tools.image_io import DEFAULT_MAX_PIXELS
from lungdet.data_tools.metadata import dicom_tags
from lungdet.errors import DicomReadError, ImageReadError, LungdetError
from lungdet.pacs.addresses import AEAddress, AllowedCaller
from lungdet.pacs.arrivals import CANDIDATE_TRANSFER_SYNTAXES, Arrival, accepted_transfer_syntaxes, check_instance
from lungdet.pacs.audit import AuditTrail, NodeAudit, Study
from lungdet.pacs.inbox import (
    OUT_OF_RESOURCES,
    SUCCESS,
    DimseState,
    Known,
    PendingResult,
    Refusal,
)
from lungdet.pacs.node import MAX_PAUSE_S
from lungdet.pacs.receivers import NETWORK_TIMEOUT_S, SEND_BATCH, Receiver, ReceiverDown, first_line
from lungdet.pacs.tls_server import peer_identity, start_listening
from lungdet.show.dicom_derived import ModelIdentity, report_uid
from lungdet.show.dicom_results import result_datasets
from lungdet.submission.prediction_string import keep_confident

try:
    import pynetdicom
    from pynetdicom import evt
    from pynetdicom.sop_class import (
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
        SecondaryCaptureImageStorage,
        Verification,
    )
except ImportError as error:  # the dicom extra; the command turns this into a one-line message
    raise ImportError(f"lungdet pacs --listen needs pynetdicom ({error}); pip install 'lungdet[dicom]'") from error

LOG = logging.getLogger("lungdet.pacs")

# The storage SOP classes of chest radiographs; RSNA's files are Secondary Captures of CR images.
IMAGE_STORAGE = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
# A-ASSOCIATE-RJ: rejected-permanent (1), by the service user (1), and the reason.
REJECT_PERMANENT, REJECT_BY_USER, CALLING_AE_NOT_RECOGNISED, CALLED_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03, 0x07
ERROR_COMMENT_MAX = 64  # (0000,0902) Error Comment is an LO
WORKER_ATTEMPTS = 3  # tries per image on a fault of ours (not of the image) before it goes to failed/


# --- the worker: an inbox file -> its results ------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    """One inbox file's results, from :func:`analyse`.

    ``datasets`` are the results to store (report first), ``study`` and ``image`` the image's Study and SOP Instance
    UIDs, ``boxes`` the number of boxes kept, ``probability`` the image-level probability in [0, 1] (None without one).
    """

    datasets: list[Dataset]
    study: str
    image: str
    boxes: int
    probability: float | None


def analyse(
    data: bytes, *, name: str, detector: Any, model: ModelIdentity, cut_off: float, overlay: bool, gsps: bool
) -> Analysis:
    """Decode one inbox file, run the detector, and build its results (report first). Raises ImageReadError for a file it cannot read."""
    source = read_dataset_bytes(data, name=name, untrusted=True)
    image: DicomImage = image_from_dataset(source, name=name, max_pixels=DEFAULT_MAX_PIXELS)
    result = detector.predict(image.pixels, dicom_tags(image.meta))
    prediction = keep_confident(result.prediction, min_confidence=cut_off)
    # The one builder of every result kind; the GSPS reads the stored pixels from ``source`` itself.
    datasets = result_datasets(source, image.pixels, prediction, result.probability, model, overlay=overlay, gsps=gsps)
    return Analysis(
        datasets, str(source.StudyInstanceUID), str(source.SOPInstanceUID), len(prediction.scores), result.probability
    )


# --- the node: pynetdicom's server, the worker and the sender ---------------------------------------


@dataclass
class DimseNode:
    """The C-STORE node: :meth:`start` it (it listens, works and sends in threads), :meth:`stop` it.

    ``allowed`` None accepts any calling AE title (``--allow-any``). ``say`` gets every log line.
    """

    listen: AEAddress
    state: DimseState
    detector: Any
    model: ModelIdentity
    receiver: Receiver
    allowed: Sequence[AllowedCaller] | None
    cut_off: float
    overlay: bool = False
    gsps: bool = False
    gate: bool = True  # the frontal-chest check on each arrival's tags (off with --allow-any-view)
    tls: ssl.SSLContext | None = None  # --tls-cert/--tls-key: TLS associations only
    audit: AuditTrail | None = None  # --audit, --audit-syslog
    say: Callable[[str], None] = LOG.info

    def __post_init__(self) -> None:
        self.stopping = threading.Event()
        self.results_ready = threading.Event()
        self.busy = threading.Event()  # the worker holds an image
        self.sending = threading.Event()  # the sender is in a round
        self.threads: list[threading.Thread] = []
        self.server: Any = None
        self.port = self.listen.port
        # --allow hosts are looked up once, here: a name that does not resolve is an error at start-up, not a silent reject.
        self.allowed_addresses = (
            None if self.allowed is None else [(caller, caller.addresses()) for caller in self.allowed]
        )
        self.transfer_syntaxes = accepted_transfer_syntaxes()
        self.audited = NodeAudit(self.audit, self.listen.ae_title)

    # --- life --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender and worker threads, then listen without blocking; returns once the node listens.

        ``port`` becomes the port bound (0 picks a free one). Raises LungdetError, with the threads stopped, when the
        address cannot be listened on.
        """
        ae = pynetdicom.AE(ae_title=self.listen.ae_title)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = NETWORK_TIMEOUT_S
        ae.maximum_associations = 16
        for sop_class in IMAGE_STORAGE:
            ae.add_supported_context(sop_class, self.transfer_syntaxes)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        # The pending results of the last run go first: the sender starts before anything new can arrive.
        self.threads = [
            threading.Thread(target=self._send_loop, name="lungdet-sender", daemon=True),
            threading.Thread(target=self._work_loop, name="lungdet-worker", daemon=True),
        ]
        for thread in self.threads:
            thread.start()
        try:
            self.server = start_listening(
                ae,
                (self.listen.host, self.listen.port),
                evt_handlers=handlers,
                tls=self.tls,
                refused=self._on_handshake_refused,
            )
        except OSError as error:
            self.stop()
            raise LungdetError(
                f"--listen {self.listen}: cannot listen there ({error.strerror}); is another node on that port?"
            ) from None
        self.port = int(self.server.server_address[1])
        recovered = self.state.recovery.line()
        if recovered:
            self.say(recovered)
        syntaxes = ", ".join(CANDIDATE_TRANSFER_SYNTAXES[syntax] for syntax in self.transfer_syntaxes)
        callers = (
            "any calling AE title"
            if self.allowed is None
            else "calling AE " + ", ".join(str(caller) for caller in self.allowed)
        )
        self.audited.application(start=True)
        kinds = "report" + (", overlay" if self.overlay else "") + (", GSPS" if self.gsps else "")
        self.say(
            f"listening as {self.listen.ae_title} on {self.listen.host}:{self.port}{' (DICOM TLS only)' if self.tls else ''} for CR, DX and SC images ({syntaxes}) from {callers}; "
            f"results ({kinds}) to {self.receiver}; {self.detector.architecture} on {self.detector.device}, cut-off {self.cut_off:g}; "
            f"state in {self.state.folder}; research use only, not a diagnostic device"
        )

    def stop(self, *, timeout: float = 30.0) -> None:
        """Stop listening, let the worker finish its image and the sender its file, and return (whatever is left is handled by the next run)."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
            self.audited.application(start=False)
        self.stopping.set()
        self.results_ready.set()
        with self.state.lock:
            self.state.lock.notify_all()
        for thread in self.threads:
            thread.join(timeout)

    def idle(self) -> bool:
        """Nothing in the inbox, nothing pending, no thread mid-work (for tests and benchmarks that wait for the node)."""
        return (
            self.state.inbox_count() == 0
            and not self.busy.is_set()
            and not self.sending.is_set()
            and not self.state.pending()
        )

    # --- pynetdicom handlers (one thread per association) ------------------------------------------

    def _peer(self, event: Any) -> str:
        return f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"

    def _on_requested(self, event: Any) -> None:
        request = event.assoc.requestor.primitive
        calling, called, host = (
            str(request.calling_ae_title).strip(),
            str(request.called_ae_title).strip(),
            event.assoc.requestor.address,
        )
        rejection = self.association_refusal(calling, called, host)
        identity = peer_identity(event.assoc.dul.socket.socket) if self.tls is not None else None
        self.audited.association(calling, host, refused=rejection and rejection[1], identity=identity)
        if rejection is not None:
            diagnostic, reason = rejection
            self.say(f"rejected an association from {calling}@{host}: {reason}")
            event.assoc.acse.send_reject(REJECT_PERMANENT, REJECT_BY_USER, diagnostic)
            # As pynetdicom's own rejections do: wait until the A-ASSOCIATE-RJ is out and the peer has closed.
            event.assoc.kill()

    def association_refusal(self, calling: str, called: str, host: str) -> tuple[int, str] | None:
        """(A-ASSOCIATE-RJ diagnostic, why) for a caller that may not associate; None for one that may."""
        if called != self.listen.ae_title:
            return CALLED_AE_NOT_RECOGNISED, f"it called AE title {called!r}; this node is {self.listen.ae_title!r}"
        if self.allowed_addresses is None:
            return None
        for caller, addresses in self.allowed_addresses:
            if caller.ae_title == calling and (not addresses or host in addresses):
                return None
        known = [caller for caller, _ in self.allowed_addresses if caller.ae_title == calling]
        if known:
            return (
                CALLING_AE_NOT_RECOGNISED,
                f"calling AE title {calling!r} is allowed only from {', '.join(str(caller.host) for caller in known)}",
            )
        return (
            CALLING_AE_NOT_RECOGNISED,
            f"calling AE title {calling!r} is not in --allow (add --allow {calling}@{host}, or --allow-any)",
        )

    def _on_handshake_refused(self, host: str, reason: str) -> None:
        self.say(f"refused a connection from {host}: {reason}")
        self.audited.handshake_refused(host, reason)

    def _on_aborted(self, event: Any) -> None:
        # pynetdicom calls the C-STORE handler only with a whole dataset: a transfer cut short never reaches the inbox.
        self.say(
            f"the association from {self._peer(event)} was aborted; an instance it was sending, if any, was not stored"
        )

    def _on_echo(self, event: Any) -> int:
        self.say(f"echo from {self._peer(event)}")
        return SUCCESS

    def _on_store(self, event: Any) -> int | Dataset:
        calling, host = str(event.assoc.requestor.ae_title).strip(), str(event.assoc.requestor.address)
        sop = str(event.request.AffectedSOPInstanceUID)
        try:
            return self.store(
                event.encoded_dataset(include_meta=True),
                sop_class=str(event.request.AffectedSOPClassUID),
                sop=sop,
                peer=(calling, host),
            )
        except Exception as error:  # a fault of ours must answer the sender, never kill its association thread
            LOG.exception("C-STORE handler failed")
            return self._refuse(
                sop, (calling, host), Refusal(OUT_OF_RESOURCES, f"the node failed to store it ({first_line(error)})")
            )

    def store(self, data: bytes, *, sop_class: str, sop: str, peer: tuple[str, str]) -> int | Dataset:
        """One C-STORE request from ``peer`` (calling AE title, host), ``data`` the instance as a DICOM file: the status to answer, after the inbox file is durable."""
        sender = f"{peer[0]}@{peer[1]}"
        verdict = check_instance(data, sop_class=sop_class, gate=self.gate)
        if isinstance(verdict, Refusal):
            return self._refuse(sop, peer, verdict)
        if verdict.own_result:
            self.say(
                f"ignored {verdict.sop} from {sender}: a lungdet result (a routing rule sends results back to lungdet)"
            )
            self.audited.received(*peer, verdict.audit_study(), note="skipped: a lungdet result")
            return SUCCESS
        if verdict.not_frontal_chest is not None:
            # Acknowledged: the archive would only send it again. Nothing is written, so nothing is sent back.
            self.say(f"skipped {verdict.sop} from {sender}: {verdict.not_frontal_chest}; acknowledged, no result")
            self.audited.received(*peer, verdict.audit_study(), note=f"skipped: {verdict.not_frontal_chest}")
            return SUCCESS
        name = self.state.reserve(verdict.sop, report_uid(_uids(verdict), self.model), len(data))
        if isinstance(name, Known):
            self.say(f"received {verdict.sop} from {sender} again: {name.reason}, not processed again")
            self.audited.received(*peer, verdict.audit_study(), note=f"received again: {name.reason}")
            return SUCCESS
        if isinstance(name, Refusal):
            return self._refuse(sop, peer, name, verdict)
        try:
            self.state.admit(name, data)
        except OSError as error:
            return self._refuse(
                sop, peer, Refusal(OUT_OF_RESOURCES, f"cannot write to the inbox ({error.strerror or error})"), verdict
            )
        self.say(f"received {verdict.sop} from {sender} ({self.state.inbox_count()} in the inbox)")
        self.audited.received(*peer, verdict.audit_study())
        return SUCCESS

    def _refuse(self, sop: str, peer: tuple[str, str], refusal: Refusal, arrival: Arrival | None = None) -> Dataset:
        self.say(f"refused {sop} from {peer[0]}@{peer[1]}: {refusal.reason} (status 0x{refusal.status:04X})")
        self.audited.received(
            *peer,
            arrival.audit_study() if arrival is not None else None,
            note=f"refused {sop}: {refusal.reason} (status 0x{refusal.status:04X})",
            failed=True,
        )
        status = Dataset()
        status.Status = refusal.status
        status.ErrorComment = refusal.reason[:ERROR_COMMENT_MAX]
        return status

    # --- the worker --------------------------------------------------------------------------------

    def _work_loop(self) -> None:
        attempts: dict[str, int] = {}
        while not self.stopping.is_set():
            name = self.state.take(timeout=0.5)
            if name is None:
                dropped = self.state.maybe_compact()
                if dropped:
                    self.say(
                        f"forgot {dropped} image(s) settled more than {self.state.keep_days:g} days ago (--keep-days)"
                    )
                continue
            self.busy.set()
            try:
                if not self.work(name, attempts.get(name, 0) + 1):
                    attempts[name] = attempts.get(name, 0) + 1
                    with self.state.lock:
                        heapq.heappush(self.state.waiting, name)  # tried again first, after a pause
                    self.stopping.wait(attempts[name])
                else:
                    attempts.pop(name, None)
            finally:
                self.busy.clear()

    def work(self, name: str, attempt: int) -> bool:
        """Settle one inbox file (steps 2 to 4); False when a fault of ours leaves it to be tried again."""
        image = name.split("-", 1)[1]
        path = self.state.inbox_path(name)
        try:
            analysis = analyse(
                path.read_bytes(),
                name=f"instance {image}",
                detector=self.detector,
                model=self.model,
                cut_off=self.cut_off,
                overlay=self.overlay,
                gsps=self.gsps,
            )
        except ImageReadError as error:  # checked on arrival, so rare: a decoder that differs between the two reads
            reason = error.reason.split("; ")[0]
            self.state.settle(name, outcome="skipped", image=image, reason=reason)
            self.say(f"skipped {image}: {reason}")
            return True
        except Exception as error:
            if attempt < WORKER_ATTEMPTS:
                self.say(
                    f"could not process {image} ({first_line(error)}); trying again ({attempt} of {WORKER_ATTEMPTS})"
                )
                return False
            target = self.state.set_aside(name, image)
            self.say(
                f"could not process {image} after {WORKER_ATTEMPTS} tries ({first_line(error)}); moved to {target} (move it back into {self.state.inbox_folder} to retry)"
            )
            return True
        result = self.state.keep_pending(name, analysis.study, image, analysis.datasets)
        self.state.settle(name, outcome="reported", image=image, report=result.report)
        probability = f", probability {analysis.probability:.2f}" if analysis.probability is not None else ""
        self.say(
            f"reported {image}: {analysis.boxes} box(es){probability}; {len(result.files)} instance(s) waiting to be stored"
        )
        self.results_ready.set()
        return True

    # --- the sender --------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        pause, down_since = 1.0, None
        told_refused: set[str] = set()
        # Each pending result's study, read from its files once, when its Begin Transferring is audited (once, not on every retry).
        announced: dict[str, Study] = {}
        while not self.stopping.is_set():
            self.results_ready.clear()
            batch = self.state.pending()[:SEND_BATCH]
            if not batch:
                self.results_ready.wait(1.0)
                continue
            self.sending.set()
            refused = 0
            for result in batch:  # before sending: a result's folder is gone once the receiver holds it
                if result.name not in announced:
                    announced[result.name] = self._audit_study(result)
                    self.audited.sending(str(self.receiver), announced[result.name], done=False)
            try:
                for result, refusal in self.receiver.send(batch):
                    if refusal is None:
                        self.state.remove_pending(result)
                        self.say(f"stored {result.image}'s result ({len(result.files)} instance(s)) in {self.receiver}")
                        # Popped once stored: the map holds only results still pending, however long the node runs.
                        self.audited.sending(str(self.receiver), announced.pop(result.name), done=True)
                    else:
                        refused += 1
                        if result.name not in told_refused:  # said once per result, not on every retry
                            told_refused.add(result.name)
                            self.say(
                                f"{self.receiver} refused {result.image}'s result ({refusal}); kept in {result.folder}, tried again"
                            )
                            self.audited.sending(str(self.receiver), announced[result.name], done=True, refused=refusal)
                    if self.stopping.is_set():
                        break
            except ReceiverDown as error:
                if down_since is None:
                    down_since = time.monotonic()
                    waiting = len(self.state.pending())
                    self.say(
                        f"the receiver {self.receiver} does not answer ({error}); {waiting} result(s) wait in {self.state.pending_folder}, retrying with a growing pause, up to {MAX_PAUSE_S:g} s"
                    )
                self.sending.clear()
                self.stopping.wait(pause)
                pause = min(pause * 2, MAX_PAUSE_S)
                continue
            finally:
                self.sending.clear()
            if down_since is not None:
                self.say(f"the receiver {self.receiver} answers again after {time.monotonic() - down_since:.0f} s")
                down_since = None
            if refused:
                self.stopping.wait(pause)
                pause = min(pause * 2, MAX_PAUSE_S)
            else:
                pause = 1.0

    def _audit_study(self, result: PendingResult) -> Study:
        """A result's study and patient, from its report's header, for the audit trail."""
        if not self.audited.enabled:
            return Study(result.study)
        try:
            header = read_dataset(result.files[0], headers_only=True)
            classes = collections.Counter(
                str(read_dataset(path, headers_only=True).SOPClassUID) for path in result.files
            )
        except DicomReadError:  # the sender will say what is wrong with the files; the audit records the study alone
            return Study(result.study)
        return Study(
            result.study,
            str(header.get("PatientID", "") or ""),
            str(header.get("PatientName", "") or ""),
            tuple(classes.items()),
        )

    def serve_forever(self) -> None:
        """Block until :meth:`stop` is called from another thread (or KeyboardInterrupt)."""
        while not self.stopping.wait(1.0):
            pass


def _uids(arrival: Arrival) -> Dataset:
    # report_uid reads the image's SOP Instance UID only; the handler has no need for the whole dataset.
    dataset = Dataset()
    dataset.SOPInstanceUID = arrival.sop
    dataset.StudyInstanceUID = arrival.study
    return dataset
