"""DICOM TLS on the C-STORE node, against real programs: Orthanc 1.10 with DicomTlsEnabled and DCMTK's storescu +tls.

One CA (made here with openssl, never committed) signs the node's, Orthanc's and storescu's
certificates; a second CA signs an intruder's. The node requires client certificates. Orthanc and
the node start once for the module; every test reads the node's log and its audit file.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pydicom
import pytest
from pydicom.uid import generate_uid

from lungdet import lungdet_version
from lungdet.errors import LungdetError
from lungdet.pacs.addresses import AEAddress, AllowedCaller
from lungdet.pacs.audit import AuditTrail
from lungdet.pacs.inbox import DimseState
from lungdet.show.dicom_derived import model_identity
from lungdet.tls import check_key_file, client_context, server_context
from tests.pacs.conftest import OrthancWithDicom, _orthanc_parts
from tests.pacs.test_dimse import CUT_OFF, dcmtk, free_port, lines_with, wait_for
from tests.tls_certs import Pki, make_pki, orthanc_tls_settings

pynetdicom = pytest.importorskip("pynetdicom")
from lungdet.pacs.dimse import DimseNode  # noqa: E402
from lungdet.pacs.receivers import CStoreReceiver  # noqa: E402


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ("lungdet", "orthanc", "storescu"))


@pytest.fixture(scope="module")
def intruder(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("other_pki"), ("intruder",), ca_name="another CA")


@pytest.fixture(scope="module")
def node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory: pytest.TempPathFactory, pki: Pki, node_port: int) -> Iterator[OrthancWithDicom]:
    """Orthanc speaking DICOM TLS only, both ways, with the keys its configuration takes (docs/dicom_and_pacs.md, Security)."""
    folder = tmp_path_factory.mktemp("tls_orthanc")
    server = OrthancWithDicom(*_orthanc_parts(), folder, modalities={})
    config = json.loads(server.config.read_text())
    config.update(
        {
            **orthanc_tls_settings(pki),
            "DicomModalities": {
                "lungdet": {"AET": "LUNGDET", "Host": "127.0.0.1", "Port": node_port, "UseDicomTls": True}
            },
        }
    )
    server.config.write_text(json.dumps(config))
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)


@pytest.fixture(scope="module")
def tls_node(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, node_port: int, tls_orthanc: OrthancWithDicom, serving_detector
) -> Iterator[DimseNode]:
    """The node: TLS only, client certificates required, results to Orthanc over TLS, an audit file; its lines in ``node.lines``."""
    folder = tmp_path_factory.mktemp("tls_node")
    model = model_identity(
        lungdet_version(), [serving_detector.architecture], [serving_detector.checkpoint_sha256], CUT_OFF
    )
    lines: list[str] = []
    node = DimseNode(
        AEAddress("LUNGDET", "127.0.0.1", node_port),
        DimseState.open(folder / "state"),
        serving_detector,
        model,
        CStoreReceiver(
            AEAddress("ORTHANC", "127.0.0.1", tls_orthanc.dicom_port),
            ae_title="LUNGDET",
            tls=client_context(pki.ca, cert=pki.cert("lungdet"), key=pki.key("lungdet")),
        ),
        [AllowedCaller("ORTHANC"), AllowedCaller("STORESCU")],
        CUT_OFF,
        tls=server_context(pki.cert("lungdet"), pki.key("lungdet"), ca=pki.ca, require_client_cert=True),
        audit=AuditTrail(file=folder / "audit.log"),
        say=lines.append,
    )
    node.lines = lines  # type: ignore[attr-defined]
    node.audit_file = folder / "audit.log"  # type: ignore[attr-defined]
    node.start()
    try:
        yield node
    finally:
        node.stop(timeout=10)


def storescu(pki: Pki, port: int, path: Path, *tls: str) -> subprocess.CompletedProcess:
    """DCMTK's storescu sending ``path`` (JPEG Baseline proposed as is) with the TLS options ``tls``."""
    return subprocess.run(
        [dcmtk("storescu"), *tls, "-xy", "-aet", "STORESCU", "-aec", "LUNGDET", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def fresh_sample(rsna_sample_dir: Path, folder: Path, index: int) -> tuple[Path, pydicom.Dataset]:
    """A real RSNA file under new UIDs, written to ``folder``: an image the node has not seen."""
    dataset = pydicom.dcmread(sorted(rsna_sample_dir.glob("*.dcm"))[index])
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID = (generate_uid() for _ in range(3))
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path)
    return path, dataset


def test_orthanc_sends_over_tls_and_takes_the_results_back_over_tls(
    tls_orthanc: OrthancWithDicom, tls_node: DimseNode, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    path, source = fresh_sample(rsna_sample_dir, tmp_path, 2)
    orthanc_id = tls_orthanc.upload(path.read_bytes())
    tls_orthanc.store_to_modality("lungdet", [orthanc_id])  # Orthanc answers once the node acknowledged it
    assert "(DICOM TLS only)" in tls_node.lines[0]
    assert lines_with(tls_node, f"received {source.SOPInstanceUID} from ORTHANC@127.0.0.1")
    stored = f"stored {source.SOPInstanceUID}'s result (1 instance(s)) in ORTHANC@127.0.0.1:{tls_orthanc.dicom_port} (C-STORE over TLS)"
    wait_for(lambda: lines_with(tls_node, stored), what="the result stored back into Orthanc over TLS", timeout=60)
    in_study = [tags for tags in tls_orthanc.instance_tags() if tags["StudyInstanceUID"] == source.StudyInstanceUID]
    assert sorted(tags["Modality"] for tags in in_study) == ["CR", "SR"]

    # The audit trail names the patient and the study, and Orthanc's certificate; the operational log neither.
    audit = tls_node.audit_file.read_text()
    descriptions = [
        base64.b64decode(detail.get("value")).decode()
        for line in audit.splitlines()
        for detail in ElementTree.fromstring(line).iter("ParticipantObjectDetail")
    ]
    assert "association from ORTHANC@127.0.0.1 (TLS client certificate 'orthanc') accepted" in descriptions
    assert f'ParticipantObjectID="{source.PatientID}"' in audit
    assert f'ParticipantObjectID="{source.StudyInstanceUID}"' in audit
    assert 'originalText="Begin Transferring DICOM Instances"' in audit
    assert str(source.PatientID) not in "\n".join(tls_node.lines)


def test_dcmtk_storescu_over_tls_is_accepted(
    pki: Pki, tls_node: DimseNode, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    path, source = fresh_sample(rsna_sample_dir, tmp_path, 3)
    sent = storescu(
        pki, tls_node.port, path, "+tls", str(pki.key("storescu")), str(pki.cert("storescu")), "+cf", str(pki.ca)
    )
    assert sent.returncode == 0, sent.stderr
    assert lines_with(tls_node, f"received {source.SOPInstanceUID} from STORESCU@127.0.0.1")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("plain TCP", "not a TLS connection (plain TCP to a TLS-only port: turn on TLS at the sender)"),
        ("a certificate from another CA", "its client certificate is not signed by --tls-ca"),
        ("no certificate", "it sent no client certificate, and --tls-require-client-cert is set"),
    ],
)
def test_a_sender_without_a_trusted_tls_client_certificate_is_refused_and_leaves_nothing(
    pki: Pki, intruder: Pki, tls_node: DimseNode, rsna_sample_dir: Path, tmp_path: Path, case: str, reason: str
) -> None:
    path, source = fresh_sample(rsna_sample_dir, tmp_path, 4)
    tls = {
        "plain TCP": (),
        "a certificate from another CA": (
            "+tls",
            str(intruder.key("intruder")),
            str(intruder.cert("intruder")),
            "+cf",
            str(pki.ca),
        ),
        "no certificate": ("+tla", "+cf", str(pki.ca)),
    }[case]
    before = (len(tls_node.lines), tls_node.state.next_sequence)
    sent = storescu(pki, tls_node.port, path, *tls)
    assert sent.returncode != 0
    line = f"refused a connection from 127.0.0.1: {reason}"
    wait_for(lambda: lines_with(tls_node, line), what=f"the line {line!r}")
    new = tls_node.lines[before[0] :]
    assert len([entry for entry in new if entry.startswith("refused a connection")]) == 1  # logged once
    assert not any(source.SOPInstanceUID in entry for entry in new) and tls_node.state.next_sequence == before[1]
    assert 'originalText="Node Authentication"' in tls_node.audit_file.read_text()


def test_a_key_that_others_can_read_is_refused_with_the_fix(pki: Pki, tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki.key("lungdet").read_bytes())
    loose.chmod(0o644)
    with pytest.raises(
        LungdetError,
        match=r"--tls-key .*loose.key: the private key can be read by other users \(mode 644\); .* chmod 600",
    ):
        server_context(pki.cert("lungdet"), loose)
    check_key_file(pki.key("lungdet"))  # 0600 passes
    with pytest.raises(LungdetError, match="not a PEM certificate and its matching private key"):
        server_context(pki.cert("orthanc"), pki.key("lungdet"))  # a certificate with another's key


def test_contexts_refuse_tls_older_than_1_2(pki: Pki) -> None:
    assert server_context(pki.cert("lungdet"), pki.key("lungdet")).minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_context(pki.ca).minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_context(pki.ca).check_hostname and client_context(pki.ca).verify_mode == ssl.CERT_REQUIRED


def test_send_tls_checks_the_receivers_host_name(
    pki: Pki, tls_orthanc: OrthancWithDicom, rsna_sample_dir: Path
) -> None:
    """Orthanc's certificate names 127.0.0.1 and localhost: a receiver reached as another name is refused."""
    from lungdet.pacs.inbox import PendingResult
    from lungdet.pacs.receivers import ReceiverDown

    wrong = CStoreReceiver(
        AEAddress("ORTHANC", "127.0.0.2", tls_orthanc.dicom_port), ae_title="LUNGDET", timeout=5,
        tls=client_context(pki.ca, cert=pki.cert("lungdet"), key=pki.key("lungdet")),
    )  # fmt: skip
    result = PendingResult("1-x", (sorted(rsna_sample_dir.glob("*.dcm"))[0],), "1.2", "1.3", "1.4")
    started = time.monotonic()
    with pytest.raises(
        ReceiverDown, match=r"TLS handshake failed \(.*IP address mismatch, certificate is not valid for '127\.0\.0\.2'"
    ):
        list(wrong.send([result]))
    assert time.monotonic() - started < 10


def test_the_command_line_speaks_tls_both_ways_and_keeps_an_audit_file(
    pki: Pki, tls_orthanc: OrthancWithDicom, serving_checkpoint: Path, rsna_sample_dir: Path, tmp_path: Path, capsys
) -> None:
    """``lungdet pacs --listen`` with every TLS flag and --audit, in this process: storescu +tls in, the result to Orthanc over TLS."""
    import os
    import signal
    import threading

    from lungdet.cli import main

    port, audit = free_port(), tmp_path / "audit.log"
    path, source = fresh_sample(rsna_sample_dir, tmp_path, 5)
    outcome: dict[str, object] = {}

    def send_then_stop() -> None:
        deadline = time.monotonic() + 60
        while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and time.monotonic() < deadline:
            time.sleep(0.05)  # the node's handler is set just before it listens
        # Sent again until the node listens (a refused TCP connection never reaches it, so leaves no trace there).
        tls = ("+tls", str(pki.key("storescu")), str(pki.cert("storescu")), "+cf", str(pki.ca))
        while time.monotonic() < deadline:
            outcome["sent"] = storescu(pki, port, path, *tls)
            if outcome["sent"].returncode == 0 or "Connection refused" not in outcome["sent"].stderr:
                break
            time.sleep(0.2)
        while time.monotonic() < deadline and not any(
            tags["StudyInstanceUID"] == source.StudyInstanceUID and tags["Modality"] == "SR"
            for tags in tls_orthanc.instance_tags()
        ):
            time.sleep(0.2)
        time.sleep(0.5)  # the node says "stored" once Orthanc has answered
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_then_stop, daemon=True).start()
    capsys.readouterr()
    status = main(
        ["pacs", "--listen", f"LUNGDET@127.0.0.1:{port}", "--allow", "STORESCU", "--checkpoint", str(serving_checkpoint),
         "--send-to", f"ORTHANC@127.0.0.1:{tls_orthanc.dicom_port}", "--state-dir", str(tmp_path / "state"),
         "--device", "cpu", "--amp", "none", "--tls-cert", str(pki.cert("lungdet")), "--tls-key", str(pki.key("lungdet")),
         "--tls-ca", str(pki.ca), "--tls-require-client-cert", "--send-tls", "--audit", str(audit)]
    )  # fmt: skip
    log = capsys.readouterr().err
    assert status == 0 and outcome["sent"].returncode == 0, (log, outcome["sent"].stderr)
    assert f"listening as LUNGDET on 127.0.0.1:{port} (DICOM TLS only)" in log
    assert (
        f"stored {source.SOPInstanceUID}'s result (1 instance(s)) in ORTHANC@127.0.0.1:{tls_orthanc.dicom_port} (C-STORE over TLS)"
        in log
    )
    assert audit.stat().st_mode & 0o777 == 0o600
    events = [
        ElementTree.fromstring(line).find("EventIdentification/EventID").get("originalText")
        for line in audit.read_text().splitlines()
    ]
    assert events[0] == events[-1] == "Application Activity" and "DICOM Instances Transferred" in events
    assert str(source.PatientID) not in log and str(source.PatientID) in audit.read_text()


def test_with_url_the_tls_options_apply_to_the_dicomweb_server_s_https(pki: Pki, tmp_path: Path) -> None:
    from lungdet.pacs.cli import check_mode, get_args_parser, make_client

    parser = get_args_parser()
    base = ["--url", "https://pacs.example/dicom-web", "--checkpoint", "c.pt", "--tls-ca", str(pki.ca)]
    args = parser.parse_args([*base, "--tls-cert", str(pki.cert("lungdet")), "--tls-key", str(pki.key("lungdet"))])
    check_mode(args)
    session = make_client(args)._session
    assert session.verify == str(pki.ca) and session.cert == (str(pki.cert("lungdet")), str(pki.key("lungdet")))
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki.key("lungdet").read_bytes())
    loose.chmod(0o644)
    with pytest.raises(LungdetError, match="chmod 600"):
        make_client(parser.parse_args([*base, "--tls-cert", str(pki.cert("lungdet")), "--tls-key", str(loose)]))
    with pytest.raises(LungdetError, match=r"--send-tls: only with --listen"):
        check_mode(parser.parse_args([*base, "--send-tls"]))
