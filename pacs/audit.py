"""The node's audit trail: DICOM audit messages (PS3.15 A.5, the XML of IHE ATNA) to a file and to a syslog collector.

What is recorded, and as which message (event ID and type, from PS3.15 A.5.3 and CID 400-402):

========================================  ==============================================================
node started / stopped                    Application Activity (110100), Application Start/Stop (110120/1)
association accepted                      Security Alert (110113), Session start (110145), outcome 0
association refused (calling AE title)    Security Alert, Access Control Decision (110147), outcome 4
TLS handshake failed (plain TCP, a        Security Alert, Node Authentication (110126), outcome 4
certificate --tls-ca did not sign)
instance received / refused / skipped     DICOM Instances Transferred (110104), action C, this node the
                                          destination; outcome 0, or 4 when refused, with why
result set about to be sent               Begin Transferring DICOM Instances (110102), this node the source
result set stored / refused by receiver   DICOM Instances Transferred, action R; outcome 0, or 4 with why
the DICOMweb poller's QIDO-RS             Query (110112), the query's URL as the participant object
========================================  ==============================================================

Studies and patients are participant objects (Study Instance UID, type 2 role 3; Patient ID, type
1 role 1), as the tables require: the audit trail is where patient and study identifiers belong,
and it is the only place lungdet writes them (the operational log has none). Messages follow
A.5.1.1's element order; ParticipantObjectName is always present because the schema requires a
name or a query in every participant object although the tables mark both optional.

:func:`syslog_frame` wraps a message as RFC 5424 (facility 10, severity 5, MSGID ``IHE+RFC-3881``
as IHE ITI-20 says) with RFC 5425/6587 octet counting, for TCP or TLS. :class:`AuditTrail` writes
each message to ``--audit FILE`` (one line each, fsynced, the file 0600) and hands it to a syslog
thread that reconnects with a growing pause when the collector is down, keeping at most
:data:`SYSLOG_BACKLOG` messages meanwhile (the file keeps everything).
"""

from __future__ import annotations

import base64
import collections
import ipaddress
import logging
import os
import socket
import ssl
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from lungdet.errors import LungdetError

LOG = logging.getLogger("lungdet.pacs")

# (csd-code, codeSystemName, originalText): a coded value as A.5.1.1 writes it.
Code = tuple[str, str, str]
APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
BEGIN_TRANSFERRING: Code = ("110102", "DCM", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
QUERY: Code = ("110112", "DCM", "Query")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
APPLICATION_START: Code = ("110120", "DCM", "Application Start")
APPLICATION_STOP: Code = ("110121", "DCM", "Application Stop")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
SESSION_START: Code = ("110145", "DCM", "Session start")
ACCESS_CONTROL_DECISION: Code = ("110147", "DCM", "Access Control Decision")
ROLE_APPLICATION: Code = ("110150", "DCM", "Application")
ROLE_DESTINATION: Code = ("110152", "DCM", "Destination Role ID")
ROLE_SOURCE: Code = ("110153", "DCM", "Source Role ID")
STUDY_INSTANCE_UID: Code = ("110180", "DCM", "Study Instance UID")
NODE_ID: Code = ("110182", "DCM", "Node ID")
PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")
URI: Code = ("12", "RFC-3881", "URI")

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8
IP_ADDRESS, MACHINE_NAME, URI_ACCESS_POINT = "2", "1", "5"
APPLICATION_SERVER = "4"  # AuditSourceTypeCode: an application server process
SYSLOG_PRI = 10 * 8 + 5  # facility 10 (security/authorization), severity 5 (notice)
SYSLOG_MSGID = "IHE+RFC-3881"
SYSLOG_BACKLOG = 10_000
SYSLOG_MAX_PAUSE_S = 60.0


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: who, from where, in which role, and whether it asked for the event."""

    user_id: str
    requestor: bool
    role: Code | None = None
    alternative_user_id: str | None = None
    user_name: str | None = None
    access_point: str | None = None  # an IP address (type 2) or, with ``access_point_type``, a name or URI
    access_point_type: str = IP_ADDRESS


@dataclass(frozen=True)
class Study:
    """A study the event touched, and its patient (both participant objects); ``patient_name`` falls back to the ID."""

    uid: str
    patient_id: str = ""
    patient_name: str = ""
    sop_classes: Sequence[tuple[str, int]] = ()  # (SOP Class UID, number of instances)


def study_of(dataset: Any) -> Study:
    """A DICOM dataset's study and patient, for the audit trail."""
    return Study(
        str(dataset.get("StudyInstanceUID", "") or ""),
        str(dataset.get("PatientID", "") or ""),
        str(dataset.get("PatientName", "") or ""),
        ((str(dataset.SOPClassUID), 1),) if "SOPClassUID" in dataset else (),
    )


def node_participant(ae_title: str, *, requestor: bool, role: Code | None, address: str | None = None) -> Participant:
    """This node as A.5.2 names a DICOM application: its process ID, ``AETITLES=`` its AE title, and its process name."""
    return Participant(
        str(os.getpid()),
        requestor,
        role,
        alternative_user_id=f"AETITLES={ae_title}",
        user_name="lungdet pacs",
        access_point=address,
        access_point_type=MACHINE_NAME if address and not _is_ip(address) else IP_ADDRESS,
    )


def peer_participant(ae_title: str, address: str, *, requestor: bool, role: Code | None) -> Participant:
    """Another DICOM node: its AE title (A.5.2's ``AETITLES=``) and IP address or host name."""
    return Participant(
        ae_title or "-",
        requestor,
        role,
        alternative_user_id=f"AETITLES={ae_title}" if ae_title and "/" not in ae_title else None,
        access_point=address,
        access_point_type=IP_ADDRESS if _is_ip(address) else MACHINE_NAME,
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _coded(parent: ElementTree.Element, tag: str, code: Code) -> None:
    ElementTree.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1], "originalText": code[2]})


def audit_message(
    event: Code,
    *,
    outcome: int,
    participants: Sequence[Participant],
    source_id: str,
    action: str = "E",
    event_type: Code | None = None,
    description: str | None = None,
    studies: Sequence[Study] = (),
    objects: Sequence[ElementTree.Element] = (),
    when: datetime | None = None,
) -> str:
    """One audit message as XML text (no declaration, one line), its elements in A.5.1.1's order."""
    root = ElementTree.Element("AuditMessage")
    moment = (when or datetime.now().astimezone()).isoformat(timespec="milliseconds")
    identification = ElementTree.SubElement(
        root,
        "EventIdentification",
        {"EventActionCode": action, "EventDateTime": moment, "EventOutcomeIndicator": str(outcome)},
    )
    _coded(identification, "EventID", event)
    if event_type is not None:
        _coded(identification, "EventTypeCode", event_type)
    if description:
        ElementTree.SubElement(identification, "EventOutcomeDescription").text = description
    for participant in participants:
        attributes = {"UserID": participant.user_id, "UserIsRequestor": "true" if participant.requestor else "false"}
        if participant.alternative_user_id:
            attributes["AlternativeUserID"] = participant.alternative_user_id
        if participant.user_name:
            attributes["UserName"] = participant.user_name
        if participant.access_point:
            attributes["NetworkAccessPointID"] = participant.access_point
            attributes["NetworkAccessPointTypeCode"] = participant.access_point_type
        element = ElementTree.SubElement(root, "ActiveParticipant", attributes)
        if participant.role is not None:
            _coded(element, "RoleIDCode", participant.role)
    source = ElementTree.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    ElementTree.SubElement(source, "AuditSourceTypeCode", {"csd-code": APPLICATION_SERVER})
    for study in studies:
        root.extend(_study_objects(study))
    root.extend(objects)
    return ElementTree.tostring(root, encoding="unicode")


def _study_objects(study: Study) -> list[ElementTree.Element]:
    """The study (with its SOP classes) and, when its Patient ID is known, the patient."""
    element = ElementTree.Element(
        "ParticipantObjectIdentification",
        {"ParticipantObjectID": study.uid, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"},
    )
    _coded(element, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
    ElementTree.SubElement(element, "ParticipantObjectName").text = study.uid
    if study.sop_classes:
        description = ElementTree.SubElement(element, "ParticipantObjectDescription")
        for uid, count in study.sop_classes:
            ElementTree.SubElement(description, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})
    if not study.patient_id:
        return [element]
    patient = ElementTree.Element(
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": study.patient_id,
            "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1",
        },
    )
    _coded(patient, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
    ElementTree.SubElement(patient, "ParticipantObjectName").text = study.patient_name or study.patient_id
    return [element, patient]


def alert_subject(identifier: str, *, description: str, kind: Code = NODE_ID) -> ElementTree.Element:
    """A Security Alert's subject (a node's address, or a URI) with its required "Alert Description" detail."""
    element = ElementTree.Element(
        "ParticipantObjectIdentification",
        {"ParticipantObjectID": identifier, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "13"},
    )
    _coded(element, "ParticipantObjectIDTypeCode", kind)
    ElementTree.SubElement(element, "ParticipantObjectName").text = identifier
    ElementTree.SubElement(
        element,
        "ParticipantObjectDetail",
        {"type": "Alert Description", "value": base64.b64encode(description.encode("utf-8")).decode("ascii")},
    )
    return element


def query_object(url: str, query: str) -> ElementTree.Element:
    """A Query's participant object: the QIDO-RS URL it asked, and the query string itself (base64, as A.5.3.10 wants)."""
    element = ElementTree.Element(
        "ParticipantObjectIdentification",
        {"ParticipantObjectID": url, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "24"},
    )
    _coded(element, "ParticipantObjectIDTypeCode", URI)
    ElementTree.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(query.encode("utf-8")).decode(
        "ascii"
    )
    return element


# --- where the messages go --------------------------------------------------------------------------


def syslog_frame(message: str, *, hostname: str, when: datetime | None = None) -> bytes:
    """``message`` as one RFC 5424 syslog message (BOM before the XML) framed by octet counting (RFC 5425 / 6587)."""
    moment = (when or datetime.now().astimezone()).isoformat(timespec="milliseconds")
    header = f"<{SYSLOG_PRI}>1 {moment} {hostname or '-'} lungdet {os.getpid()} {SYSLOG_MSGID} - "
    body = header.encode("ascii") + b"\xef\xbb\xbf" + message.encode("utf-8")
    return str(len(body)).encode("ascii") + b" " + body


def open_audit_file(path: Path) -> int:
    """Open (or create, 0600) ``--audit FILE`` for appending; a file others can read is refused, with the fix."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as error:
        raise LungdetError(f"--audit {path}: cannot be opened for appending ({error.strerror or error})") from None
    mode = stat.S_IMODE(os.fstat(descriptor).st_mode)
    if mode & 0o077:
        os.close(descriptor)
        raise LungdetError(
            f"--audit {path}: others can read it (mode {mode:03o}), and it names patients; chmod 600 {path}"
        )
    return descriptor


class SyslogSender:
    """A thread that sends framed messages to a collector over TCP (or TLS), reconnecting with a growing pause when it is down."""

    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None = None, say: Callable[[str], None]) -> None:
        self.host, self.port, self.tls, self.say = host, port, tls, say
        self.queue: collections.deque[bytes] = collections.deque(maxlen=SYSLOG_BACKLOG)
        self.ready = threading.Condition()
        self.stopping = False
        self.connection: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, name="lungdet-audit-syslog", daemon=True)
        self.thread.start()

    def __str__(self) -> str:
        return f"syslog {self.host}:{self.port}{' over TLS' if self.tls else ''}"

    def put(self, frame: bytes) -> None:
        """Queue one framed message; the oldest is dropped beyond :data:`SYSLOG_BACKLOG` (the file keeps all)."""
        with self.ready:
            self.queue.append(frame)
            self.ready.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, for up to ``timeout`` seconds, then stop."""
        with self.ready:
            self.stopping = True
            self.ready.notify()
        self.thread.join(timeout)
        if self.connection is not None:
            self.connection.close()

    def _connect(self) -> socket.socket:
        raw = socket.create_connection((self.host, self.port), timeout=10)
        return self.tls.wrap_socket(raw, server_hostname=self.host) if self.tls is not None else raw

    def _run(self) -> None:
        pause, down = 1.0, False
        while True:
            with self.ready:
                while not self.queue and not self.stopping:
                    self.ready.wait()
                if not self.queue:
                    return
                frame = self.queue[0]
            try:
                if self.connection is None:
                    self.connection = self._connect()
                self.connection.sendall(frame)
            except OSError as error:
                if self.connection is not None:
                    self.connection.close()
                    self.connection = None
                if not down:
                    self.say(f"the audit collector {self} does not answer ({error}); audit messages wait in memory")
                    down = True
                if self.stopping:
                    return
                with self.ready:
                    self.ready.wait(pause)
                pause = min(pause * 2, SYSLOG_MAX_PAUSE_S)
                continue
            with self.ready:
                self.queue.popleft()
            if down:
                self.say(f"the audit collector {self} answers again")
                pause, down = 1.0, False


class AuditTrail:
    """Where the node's audit messages go: ``--audit FILE`` and/or ``--audit-syslog``; with neither, nowhere (a no-op)."""

    def __init__(
        self,
        *,
        file: Path | None = None,
        syslog: tuple[str, int] | None = None,
        syslog_tls: ssl.SSLContext | None = None,
        say: Callable[[str], None] = LOG.info,
    ) -> None:
        self.hostname = socket.gethostname()
        self.lock = threading.Lock()
        self.descriptor = open_audit_file(file) if file is not None else None
        self.sender = SyslogSender(*syslog, tls=syslog_tls, say=say) if syslog is not None else None

    @property
    def enabled(self) -> bool:
        """Whether any message goes anywhere."""
        return self.descriptor is not None or self.sender is not None

    def record(self, message: str) -> None:
        """Append ``message`` to the file (synced before this returns) and queue it for the collector."""
        if self.descriptor is not None:
            with self.lock:  # one line per message, whole, whichever thread writes
                os.write(self.descriptor, message.encode("utf-8") + b"\n")
                os.fsync(self.descriptor)
        if self.sender is not None:
            self.sender.put(syslog_frame(message, hostname=self.hostname))

    def close(self) -> None:
        """Flush the collector's queue (a few seconds at most) and close the file."""
        if self.sender is not None:
            self.sender.close()
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None


class NodeAudit:
    """The audit messages of one node (AE title ``ae_title``), each built and recorded in one call; a no-op without a trail."""

    def __init__(self, trail: AuditTrail | None, ae_title: str) -> None:
        self.trail, self.ae_title = trail, ae_title

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere (callers skip the work of building what would be dropped)."""
        return self.trail is not None and self.trail.enabled

    def _record(self, event: Code, **fields: object) -> None:
        if self.trail is None or not self.trail.enabled:
            return
        try:
            self.trail.record(audit_message(event, source_id=self.ae_title, **fields))  # type: ignore[arg-type]
        except OSError as error:  # a full disk must not stop the node; the operational log says it once per failure
            LOG.error("could not write an audit message (%s)", error.strerror or error)

    def _node(self, role: Code | None, *, requestor: bool) -> Participant:
        return node_participant(self.ae_title, requestor=requestor, role=role)

    def application(self, *, start: bool) -> None:
        """Application Activity: the node started or stopped."""
        self._record(
            APPLICATION_ACTIVITY,
            outcome=SUCCESS,
            event_type=APPLICATION_START if start else APPLICATION_STOP,
            participants=[self._node(ROLE_APPLICATION, requestor=False)],
        )

    def association(self, calling: str, host: str, *, refused: str | None = None, identity: str | None = None) -> None:
        """Security Alert: an association accepted (Session start, outcome 0) or refused by --allow (Access Control Decision, 4)."""
        shown = f"{calling}@{host}" + (f" (TLS client certificate {identity!r})" if identity else "")
        self._record(
            SECURITY_ALERT,
            outcome=SUCCESS if refused is None else MINOR_FAILURE,
            event_type=SESSION_START if refused is None else ACCESS_CONTROL_DECISION,
            description=refused,
            participants=[
                self._node(None, requestor=False),
                peer_participant(calling, host, requestor=True, role=None),
            ],
            objects=[
                alert_subject(
                    host,
                    description=f"association from {shown} "
                    + ("accepted" if refused is None else f"rejected: {refused}"),
                )
            ],
        )

    def handshake_refused(self, host: str, reason: str) -> None:
        """Security Alert, Node Authentication: a connection that failed the TLS handshake."""
        self._record(
            SECURITY_ALERT,
            outcome=MINOR_FAILURE,
            event_type=NODE_AUTHENTICATION,
            description=reason,
            participants=[self._node(None, requestor=False), peer_participant("", host, requestor=True, role=None)],
            objects=[alert_subject(host, description=f"TLS connection from {host} refused: {reason}")],
        )

    def received(
        self,
        sender: str,
        host: str,
        study: Study | None,
        *,
        note: str | None = None,
        failed: bool = False,
        node_asked: bool = False,
    ) -> None:
        """DICOM Instances Transferred to this node: acknowledged (outcome 0; ``note`` says why no result will come) or refused (4).

        ``sender`` is the calling AE title (or the DICOMweb server the node retrieved from, ``node_asked``).
        """
        self._record(
            INSTANCES_TRANSFERRED,
            action="C",
            outcome=MINOR_FAILURE if failed else SUCCESS,
            description=note,
            participants=[
                peer_participant(sender, host, requestor=not node_asked, role=ROLE_SOURCE),
                self._node(ROLE_DESTINATION, requestor=node_asked),
            ],
            studies=[study] if study is not None else [],
        )

    def sending(self, receiver: str, study: Study, *, done: bool, refused: str | None = None) -> None:
        """Begin Transferring DICOM Instances (``done`` False), then DICOM Instances Transferred (outcome 0, or 4 with why)."""
        self._record(
            INSTANCES_TRANSFERRED if done else BEGIN_TRANSFERRING,
            action="R" if done else "E",
            outcome=SUCCESS if refused is None else MINOR_FAILURE,
            description=refused,
            participants=[
                self._node(ROLE_SOURCE, requestor=True),
                Participant(receiver, False, ROLE_DESTINATION),
            ],
            studies=[study],
        )

    def query(self, server: str, url: str, query: str, *, failed: str | None = None) -> None:
        """Query: the poller's QIDO-RS, this node asking ``server``."""
        self._record(
            QUERY,
            outcome=SUCCESS if failed is None else MINOR_FAILURE,
            description=failed,
            participants=[
                self._node(ROLE_SOURCE, requestor=True),
                Participant(server, False, ROLE_DESTINATION, access_point=server, access_point_type=URI_ACCESS_POINT),
            ],
            objects=[query_object(url, query)],
        )
