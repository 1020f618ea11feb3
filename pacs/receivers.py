"""Where the C-STORE node's results are stored: another DICOM node by C-STORE, or a DICOMweb server by STOW-RS."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from pydicom.dataset import Dataset

from lungdet.data_tools.dicom_io import read_dataset
from lungdet.pacs.addresses import AEAddress
from lungdet.pacs.inbox import PendingResult

try:
    import pynetdicom
    from pynetdicom.status import code_to_category
except ImportError as error:  # the dicom extra; the command turns this into a one-line message
    raise ImportError(f"lungdet pacs --listen needs pynetdicom ({error}); pip install 'lungdet[dicom]'") from error

DUPLICATE_SOP_INSTANCE = 0x0111  # a receiver that already has a result: it has it, which is what was wanted
NETWORK_TIMEOUT_S = 30.0
SEND_BATCH = 100  # results stored per association before the pending folder is listed again


def status_accepted(code: int) -> bool:
    """True when a C-STORE status means the receiver holds the instance: success, any warning, or a duplicate."""
    return code == DUPLICATE_SOP_INSTANCE or code_to_category(code) in ("Success", "Warning")


def first_line(error: BaseException) -> str:
    """An error as one short line for the log: its type, and the first line of its message."""
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class ReceiverDown(Exception):
    """The receiver could not be reached, rejected the association or went away; the round stops and is retried after a pause."""


class Receiver(Protocol):
    """Where the node's results go: ``str()`` names it in the log, :meth:`send` stores a batch."""

    def __str__(self) -> str: ...

    def send(self, results: Sequence[PendingResult]) -> Iterator[tuple[PendingResult, str | None]]:
        """Store each result; yield it with None when the receiver holds all its files, or why it refused. Raises ReceiverDown."""
        ...


class CStoreReceiver:
    """Results by C-STORE to ``address``, one association per round, calling as ``ae_title``."""

    def __init__(
        self,
        address: AEAddress,
        *,
        ae_title: str,
        timeout: float = NETWORK_TIMEOUT_S,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        # ``tls`` (--send-tls): the receiver's certificate is checked against --tls-ca, its host name included.
        self.address, self.ae_title, self.timeout, self.tls = address, ae_title, timeout, tls

    def __str__(self) -> str:
        return f"{self.address} (C-STORE{' over TLS' if self.tls else ''})"

    def send(self, results: Sequence[PendingResult]) -> Iterator[tuple[PendingResult, str | None]]:
        """Store ``results`` over one association, file by file; yield each with None when the receiver holds them all.

        Otherwise with why one file was refused (its status, or a SOP class the receiver does not take); that result's
        later files are not sent. Raises ReceiverDown when the association fails or a C-STORE gets no answer.
        """
        # Propose exactly what is to be sent: each file's SOP class in its own transfer syntax, and both
        # uncompressed ones, which pynetdicom converts between (every receiver takes Implicit VR).
        contexts: dict[str, set[str]] = {}
        for result in results:
            for path in result.files:
                meta = read_dataset(path, headers_only=True)
                syntaxes = contexts.setdefault(str(meta.SOPClassUID), {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"})
                syntaxes.add(str(meta.file_meta.TransferSyntaxUID))
        ae = pynetdicom.AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, sorted(syntaxes))
        try:
            with transport_errors() as errors:
                association = ae.associate(
                    self.address.host,
                    self.address.port,
                    ae_title=self.address.ae_title,
                    tls_args=None if self.tls is None else (self.tls, self.address.host),
                )
        except Exception as error:  # a host name that does not resolve, for one
            raise ReceiverDown(first_line(error)) from None
        if not association.is_established:
            failure = _association_failure(association)
            tls_failure = errors[0] if errors else None
            if self.tls is not None and tls_failure is not None:
                # pynetdicom logs the handshake's error and reports only that the association went nowhere.
                failure = f"TLS handshake failed ({tls_failure}); check that {self.address.host} speaks DICOM TLS on port {self.address.port} with a certificate --tls-ca signed for that name"
            raise ReceiverDown(failure)
        try:
            for result in results:
                refusal = None
                for path in result.files:
                    try:
                        status = association.send_c_store(path)
                    except ValueError as error:  # no accepted presentation context for this SOP class
                        refusal = f"it does not take {path.name} ({first_line(error)})"
                        break
                    if "Status" not in status:
                        raise ReceiverDown("no answer to C-STORE (timed out or aborted)")
                    if not status_accepted(int(status.Status)):
                        comment = f": {status.ErrorComment}" if status.get("ErrorComment") else ""
                        refusal = f"status 0x{int(status.Status):04X}{comment}"
                        break
                yield result, refusal
        finally:
            if association.is_established:
                association.release()


@contextlib.contextmanager
def transport_errors() -> Iterator[list[str]]:
    """The TLS errors pynetdicom's transport logs meanwhile, from whichever of its threads, a line each.

    The node has one sender, and its listener does its own handshakes (:mod:`lungdet.pacs.tls_server`),
    so the TLS errors logged meanwhile are this association's.
    """
    caught: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR and "SSL" in record.getMessage():
                caught.append(record.getMessage().splitlines()[0][:200])

    handler = Catch()
    transport_log = logging.getLogger("pynetdicom.transport")
    transport_log.addHandler(handler)
    try:
        yield caught
    finally:
        transport_log.removeHandler(handler)


def _association_failure(association: Any) -> str:
    if association.is_rejected:
        rejection = association.acceptor.primitive
        reasons = {
            (1, 3): "our calling AE title is not recognised (register it there, or pass --ae-title)",
            (1, 7): "called AE title not recognised (check --send-to)",
        }
        reason = reasons.get(
            (rejection.result_source, rejection.diagnostic),
            f"source {rejection.result_source}, reason {rejection.diagnostic}",
        )
        return f"association rejected: {reason}"
    if association.is_aborted:
        return "association aborted"
    return "no connection"


class DicomwebReceiver:
    """Results by STOW-RS into their studies, through a dicomweb-client (see :func:`lungdet.pacs.cli.make_client`)."""

    def __init__(self, client: Any, url: str) -> None:
        self.client, self.url = client, url

    def __str__(self) -> str:
        return f"{self.url} (STOW-RS)"

    def send(self, results: Sequence[PendingResult]) -> Iterator[tuple[PendingResult, str | None]]:
        """Store each result into its study by STOW-RS, one request each; yield it with None when stored, or why not.

        Why not: the HTTP status, or how many instances failed and the first one's reason. Raises ReceiverDown when the
        server does not answer.
        """
        import requests

        for result in results:
            datasets = [read_dataset(path) for path in result.files]
            try:
                response = self.client.store_instances(datasets, study_instance_uid=result.study)
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
                raise ReceiverDown(str(error).splitlines()[0][:200]) from None
            except requests.exceptions.HTTPError as error:
                status = error.response.status_code if error.response is not None else "?"
                yield result, f"HTTP {status}"
                continue
            failed = [
                item
                for item in (response or Dataset()).get("FailedSOPSequence", [])
                if not status_accepted(int(item.get("FailureReason", 0xC000)))
            ]
            yield (
                result,
                (
                    f"{len(failed)} instance(s) failed (reason 0x{int(failed[0].get('FailureReason', 0xC000)):04X})"
                    if failed
                    else None
                ),
            )
