"""Tests for pacs/audit.py: each message checked against PS3.15 A.5.3's tables, the file's permissions, syslog to a local collector.

The tables' requirements are written out here (event ID, action, type code, participants' roles
and requestor flags, participant objects' type, role and ID type), and A.5.1.1's element order and
required attributes. (The messages were also validated once against the A.5.1.1 RELAX NG schema
with jing; that schema is NEMA's text and is not in this repository: see docs/dicom_and_pacs.md.)
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import threading
import time
from datetime import datetime
from pathlib import Path
from xml.etree import ElementTree

import pytest

from lungdet.errors import LungdetError
from lungdet.pacs.audit import AuditTrail, NodeAudit, Study, syslog_frame
from lungdet.tls import client_context, server_context
from tests.tls_certs import make_pki

STUDY = Study("1.2.3.4", "PID-7", "Doe^Jane", (("1.2.840.10008.5.1.4.1.1.7", 1),))
ROOT_ORDER = [
    "EventIdentification",
    "ActiveParticipant",
    "AuditSourceIdentification",
    "ParticipantObjectIdentification",
]


def messages(tmp_path: Path, record) -> list[ElementTree.Element]:
    """What ``record(NodeAudit)`` writes to an audit file, parsed, one element per line."""
    trail = AuditTrail(file=tmp_path / "audit.log")
    record(NodeAudit(trail, "LUNGDET"))
    trail.close()
    return [ElementTree.fromstring(line) for line in (tmp_path / "audit.log").read_text().splitlines()]


def code(element: ElementTree.Element | None) -> tuple[str, str, str]:
    assert element is not None
    return (element.get("csd-code"), element.get("codeSystemName"), element.get("originalText"))


def check_structure(message: ElementTree.Element) -> None:
    """A.5.1.1: the root's children in order, one audit source, required attributes, coded values whole, a time zone."""
    tags = [child.tag for child in message]
    assert tags == sorted(tags, key=ROOT_ORDER.index) and tags.count("AuditSourceIdentification") == 1
    event = message.find("EventIdentification")
    assert event.get("EventOutcomeIndicator") in ("0", "4", "8", "12")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", event.get("EventDateTime"))
    for participant in message.iter("ActiveParticipant"):
        assert participant.get("UserID") and participant.get("UserIsRequestor") in ("true", "false")
    assert sum(participant.get("UserIsRequestor") == "true" for participant in message.iter("ActiveParticipant")) <= 1
    for coded in [*message.iter("EventID"), *message.iter("EventTypeCode"), *message.iter("RoleIDCode")]:
        assert all(code(coded))
    for item in message.iter("ParticipantObjectIdentification"):
        children = [child.tag for child in item]
        assert children[0] == "ParticipantObjectIDTypeCode" and all(code(item[0]))
        # The schema wants exactly one of a name or a query.
        assert (children[1] in ("ParticipantObjectName", "ParticipantObjectQuery")) and len(
            {"ParticipantObjectName", "ParticipantObjectQuery"} & set(children)
        ) == 1


def roles(message: ElementTree.Element) -> list[tuple[str, str | None, str]]:
    """(UserID, role code, requestor) of each ActiveParticipant."""
    return [
        (
            participant.get("UserID"),
            None if participant.find("RoleIDCode") is None else participant.find("RoleIDCode").get("csd-code"),
            participant.get("UserIsRequestor"),
        )
        for participant in message.iter("ActiveParticipant")
    ]


def objects(message: ElementTree.Element) -> list[tuple[str, str, str, str]]:
    """(ID, type code, role, ID type code) of each ParticipantObjectIdentification."""
    return [
        (
            item.get("ParticipantObjectID"),
            item.get("ParticipantObjectTypeCode"),
            item.get("ParticipantObjectTypeCodeRole"),
            item.find("ParticipantObjectIDTypeCode").get("csd-code"),
        )
        for item in message.iter("ParticipantObjectIdentification")
    ]


def test_application_activity_a_5_3_1(tmp_path: Path) -> None:
    start, stop = messages(tmp_path, lambda audit: (audit.application(start=True), audit.application(start=False)))
    for message, event_type in ((start, "110120"), (stop, "110121")):
        check_structure(message)
        event = message.find("EventIdentification")
        assert code(event.find("EventID")) == ("110100", "DCM", "Application Activity")
        assert event.get("EventActionCode") == "E" and event.find("EventTypeCode").get("csd-code") == event_type
        [application] = message.iter("ActiveParticipant")
        assert application.get("AlternativeUserID") == "AETITLES=LUNGDET" and application.get("UserID").isdigit()
        assert application.find("RoleIDCode").get("csd-code") == "110150" and objects(message) == []
    assert message.find("AuditSourceIdentification").get("AuditSourceID") == "LUNGDET"


def test_instances_received_a_5_3_7_name_the_study_and_the_patient(tmp_path: Path) -> None:
    received, refused = messages(
        tmp_path,
        lambda audit: (
            audit.received("ORTHANC", "10.0.0.5", STUDY),
            audit.received("ORTHANC", "10.0.0.5", None, note="refused 1.2: truncated (status 0xC000)", failed=True),
        ),
    )
    check_structure(received)
    event = received.find("EventIdentification")
    assert code(event.find("EventID")) == ("110104", "DCM", "DICOM Instances Transferred")
    assert (event.get("EventActionCode"), event.get("EventOutcomeIndicator")) == ("C", "0")
    # The sender (source, the requestor, at its IP address) and this node (destination).
    sender = next(received.iter("ActiveParticipant"))
    assert (sender.get("NetworkAccessPointID"), sender.get("NetworkAccessPointTypeCode")) == ("10.0.0.5", "2")
    assert roles(received)[0] == ("ORTHANC", "110153", "true") and roles(received)[1][1:] == ("110152", "false")
    assert objects(received) == [("1.2.3.4", "2", "3", "110180"), ("PID-7", "1", "1", "2")]
    assert received.find(".//SOPClass").attrib == {"UID": "1.2.840.10008.5.1.4.1.1.7", "NumberOfInstances": "1"}
    assert [name.text for name in received.iter("ParticipantObjectName")] == ["1.2.3.4", "Doe^Jane"]
    refusal = refused.find("EventIdentification")
    assert refusal.get("EventOutcomeIndicator") == "4"
    assert refusal.find("EventOutcomeDescription").text == "refused 1.2: truncated (status 0xC000)"


def test_results_sent_a_5_3_3_and_a_5_3_7(tmp_path: Path) -> None:
    begin, done = messages(
        tmp_path,
        lambda audit: (
            audit.sending("ORTHANC@10.0.0.5:4242 (C-STORE)", STUDY, done=False),
            audit.sending("ORTHANC@10.0.0.5:4242 (C-STORE)", STUDY, done=True),
        ),
    )
    for message, event_id, action in ((begin, "110102", "E"), (done, "110104", "R")):
        check_structure(message)
        assert message.find("EventIdentification/EventID").get("csd-code") == event_id
        assert message.find("EventIdentification").get("EventActionCode") == action
        assert [role[1:] for role in roles(message)] == [("110153", "true"), ("110152", "false")]
        assert objects(message) == [("1.2.3.4", "2", "3", "110180"), ("PID-7", "1", "1", "2")]


def test_security_alerts_a_5_3_11_carry_an_alert_description(tmp_path: Path) -> None:
    accepted, refused, handshake = messages(
        tmp_path,
        lambda audit: (
            audit.association("ORTHANC", "10.0.0.5", identity="orthanc.example"),
            audit.association("STRANGER", "10.0.0.9", refused="calling AE title 'STRANGER' is not in --allow"),
            audit.handshake_refused("10.0.0.9", "not a TLS connection"),
        ),
    )
    expected = [
        (
            accepted,
            "110145",
            "0",
            "association from ORTHANC@10.0.0.5 (TLS client certificate 'orthanc.example') accepted",
        ),
        (
            refused,
            "110147",
            "4",
            "association from STRANGER@10.0.0.9 rejected: calling AE title 'STRANGER' is not in --allow",
        ),
        (handshake, "110126", "4", "TLS connection from 10.0.0.9 refused: not a TLS connection"),
    ]
    for message, event_type, outcome, description in expected:
        check_structure(message)
        event = message.find("EventIdentification")
        assert code(event.find("EventID")) == ("110113", "DCM", "Security Alert")
        assert (event.find("EventTypeCode").get("csd-code"), event.get("EventOutcomeIndicator")) == (
            event_type,
            outcome,
        )
        [subject] = message.iter("ParticipantObjectIdentification")
        assert subject.find("ParticipantObjectIDTypeCode").get("csd-code") == "110182"  # Node ID
        detail = subject.find("ParticipantObjectDetail")
        assert detail.get("type") == "Alert Description"
        assert base64.b64decode(detail.get("value")).decode() == description


def test_query_a_5_3_10_holds_the_query_in_base64(tmp_path: Path) -> None:
    [query] = messages(
        tmp_path, lambda audit: audit.query("http://pacs/dicom-web", "http://pacs/dicom-web/instances", "limit=500")
    )
    check_structure(query)
    assert query.find("EventIdentification/EventID").get("csd-code") == "110112"
    [item] = query.iter("ParticipantObjectIdentification")
    assert (item.get("ParticipantObjectTypeCodeRole"), item.find("ParticipantObjectIDTypeCode").get("csd-code")) == (
        "24",
        "12",
    )
    assert base64.b64decode(item.find("ParticipantObjectQuery").text).decode() == "limit=500"


def test_the_audit_file_is_0600_and_a_readable_one_is_refused(tmp_path: Path) -> None:
    messages(tmp_path, lambda audit: audit.application(start=True))
    assert (tmp_path / "audit.log").stat().st_mode & 0o777 == 0o600
    loose = tmp_path / "loose.log"
    loose.touch(mode=0o644)
    loose.chmod(0o644)
    with pytest.raises(
        LungdetError, match=r"--audit .*loose.log: others can read it \(mode 644\), and it names patients; chmod 600"
    ):
        AuditTrail(file=loose)


class Collector:
    """A syslog collector on loopback, TCP or TLS, that reads octet-counted frames (RFC 6587 / 5425) into ``frames``."""

    def __init__(self, port: int = 0, *, tls: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port, self.tls, self.frames = self.listener.getsockname()[1], tls, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            if self.tls is not None:
                connection = self.tls.wrap_socket(connection, server_side=True)
            buffer = b""
            while chunk := connection.recv(65536):
                buffer += chunk
                while b" " in buffer:
                    length, _, rest = buffer.partition(b" ")
                    if len(rest) < int(length):
                        break
                    self.frames.append(rest[: int(length)])
                    buffer = rest[int(length) :]

    def close(self) -> None:
        self.listener.close()


def wait_for_frames(collector: Collector, count: int) -> None:
    deadline = time.monotonic() + 15
    while len(collector.frames) < count:
        assert time.monotonic() < deadline, f"{len(collector.frames)} of {count} frames arrived"
        time.sleep(0.05)


def test_syslog_frames_follow_rfc_5424_and_survive_a_collector_that_starts_late(tmp_path: Path) -> None:
    frame = syslog_frame(
        "<AuditMessage/>", hostname="node1", when=datetime.fromisoformat("2026-12-05T01:02:03.004+01:00")
    )
    length, _, body = frame.partition(b" ")
    assert int(length) == len(body)
    assert re.fullmatch(
        rb"<85>1 2026-12-05T01:02:03\.004\+01:00 node1 lungdet \d+ IHE\+RFC-3881 - \xef\xbb\xbf<AuditMessage/>", body
    )

    with socket.socket() as probe:  # a port with no collector yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    lines: list[str] = []
    trail = AuditTrail(syslog=("127.0.0.1", port), say=lines.append)
    audit = NodeAudit(trail, "LUNGDET")
    audit.application(start=True)
    deadline = time.monotonic() + 10
    while not lines and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines == [
        f"the audit collector syslog 127.0.0.1:{port} does not answer ([Errno 111] Connection refused); audit messages wait in memory"
    ]
    collector = Collector(port)
    try:
        audit.received("ORTHANC", "10.0.0.5", STUDY)
        wait_for_frames(collector, 2)  # the one kept while it was down, then the new one
        trail.close()
        events = [
            ElementTree.fromstring(frame.split(b"\xef\xbb\xbf", 1)[1])
            .find("EventIdentification/EventID")
            .get("csd-code")
            for frame in collector.frames
        ]
        assert (
            events == ["110100", "110104"] and lines[-1] == f"the audit collector syslog 127.0.0.1:{port} answers again"
        )
    finally:
        collector.close()


def test_syslog_over_tls_checks_the_collectors_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ("collector",))
    collector = Collector(tls=server_context(pki.cert("collector"), pki.key("collector")))
    trail = AuditTrail(syslog=("127.0.0.1", collector.port), syslog_tls=client_context(pki.ca))
    try:
        NodeAudit(trail, "LUNGDET").application(start=True)
        wait_for_frames(collector, 1)
        assert b"Application Activity" in collector.frames[0]
    finally:
        trail.close()
        collector.close()
