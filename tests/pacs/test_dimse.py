"""Tests for pacs/dimse.py and ``lungdet pacs --listen``: a C-STORE node driven by real programs.

Orthanc sends to the node and takes its results, DCMTK's echoscu/storescu send and storescp
receives, pynetdicom plays the misbehaving sender; ``lungdet pacs --listen`` itself is killed
with SIGKILL and restarted. The crash points of the state folder are also built by hand, one by one.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from lungdet import lungdet_version
from lungdet.data_tools.dicom_io import dicom_bytes, read_dicom
from lungdet.errors import LungdetError
from lungdet.pacs.addresses import AEAddress, AllowedCaller, ae_address, allowed_caller, listen_address
from lungdet.pacs.arrivals import Arrival, check_instance
from lungdet.pacs.dimse import DimseNode
from lungdet.pacs.inbox import CANNOT_UNDERSTAND, DATA_SET_MISMATCH, OUT_OF_RESOURCES, DimseState, Refusal
from lungdet.pacs.receivers import CStoreReceiver, DicomwebReceiver, status_accepted
from lungdet.show.dicom_derived import model_identity, report_uid
from lungdet.show.dicom_sr import read_report
from lungdet.submission.prediction_string import keep_confident
from tests.conftest import require_program

pynetdicom = pytest.importorskip("pynetdicom")
from pynetdicom.pdu_primitives import P_DATA  # noqa: E402
from pynetdicom.sop_class import BasicTextSRStorage, EncapsulatedPDFStorage, Verification  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CUT_OFF = 0.3  # the serving checkpoint's own


def dcmtk(tool: str) -> str:
    return require_program(tool, "dcmtk")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(
    condition: Callable[[], object], *, what: str, timeout: float = 30.0, on_timeout: Callable[[], str] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:g} s for {what}{on_timeout() if on_timeout else ''}")
        time.sleep(0.05)


def fresh_copy(path: Path) -> Dataset:
    """A real sample under new Study/Series/SOP UIDs (its pixel data as it is): a new image to the node."""
    dataset = pydicom.dcmread(path)
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    return dataset


def synthetic(**changes: object) -> Dataset:
    """A 4 x 6 Explicit VR CR Secondary Capture built here, with ``changes`` applied (``pixel_data`` replaces the pixels)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.Modality, dataset.PatientID = "CR", "synthetic"
    dataset.Rows, dataset.Columns, dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 4, 6, 1, "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit, dataset.PixelRepresentation = 7, 0
    pixel_data = changes.pop("pixel_data", None)
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    frames = int(dataset.get("NumberOfFrames", 1))
    dataset.PixelData = (
        pixel_data if pixel_data is not None else (np.arange(24 * frames) % 256).astype(np.uint8).tobytes()
    )
    dataset["PixelData"].VR = "OB"
    return dataset


STILL_ARRIVING_SECONDS = 5.0


class StoreScp:
    """DCMTK's storescp as the results' receiver: every instance it takes lands as its own file (+uf), so a second copy would show."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> AEAddress:
        return AEAddress("STORESCP", "127.0.0.1", self.port)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [dcmtk("storescp"), "-aet", "STORESCP", "-od", str(self.folder), "+uf", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, what="storescp to listen", timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def received(self) -> list[Dataset]:
        """Every instance storescp has written in full.

        storescp writes each file under its final name as the data arrives, so a poll can meet one
        half written: a file that does not parse yet and changed in the last few seconds is still
        arriving and is left for the next poll. An older one that does not parse is an error.
        """
        datasets = []
        for path in sorted(self.folder.iterdir()):
            if not path.is_file():
                continue
            try:
                datasets.append(pydicom.dcmread(path))
            except (InvalidDicomError, EOFError):
                if time.time() - path.stat().st_mtime > STILL_ARRIVING_SECONDS:
                    raise
        return datasets


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreScp]:
    """A StoreScp, started, and stopped afterwards."""
    receiver = StoreScp(tmp_path / "received")
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


# The node's callers when a test does not say: any calling AE titled SCU, from anywhere.
ANY_SCU = (AllowedCaller("SCU"),)


def nowhere() -> CStoreReceiver:
    """A receiver on a port nothing listens on: results stay pending."""
    return CStoreReceiver(AEAddress("NOWHERE", "127.0.0.1", free_port()), ae_title="LUNGDET", timeout=5)


@pytest.fixture
def start_node(tmp_path: Path, serving_detector) -> Iterator[Callable[..., DimseNode]]:
    """``start(receiver, allowed=[...] | None, port=0, detector=..., max_inbox=..., overlay=..., gsps=...) -> DimseNode`` in this process, its lines in ``node.lines``."""
    nodes: list[DimseNode] = []

    def start(
        receiver,
        *,
        allowed=ANY_SCU,
        port: int = 0,
        detector=None,
        max_inbox: int = 100,
        overlay: bool = False,
        gsps: bool = False,
    ) -> DimseNode:
        detector = detector or serving_detector
        model = model_identity(lungdet_version(), [detector.architecture], [detector.checkpoint_sha256], CUT_OFF)
        lines: list[str] = []
        state = DimseState.open(tmp_path / f"state{len(nodes)}", max_inbox=max_inbox)
        node = DimseNode(
            AEAddress("LUNGDET", "127.0.0.1", port),
            state,
            detector,
            model,
            receiver,
            None if allowed is None else list(allowed),
            CUT_OFF,
            overlay=overlay,
            gsps=gsps,
            say=lines.append,
        )
        node.lines = lines  # type: ignore[attr-defined]
        nodes.append(node)
        node.start()
        return node

    try:
        yield start
    finally:
        for node in nodes:
            node.stop(timeout=10)


def associate(
    port: int, datasets: list[Dataset] = (), *, calling: str = "SCU", called: str = "LUNGDET", echo: bool = False
):
    ae = pynetdicom.AE(calling)
    for dataset in datasets:
        ae.add_requested_context(dataset.SOPClassUID, [str(dataset.file_meta.TransferSyntaxUID)])
    if echo or not datasets:
        ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called)


def store(port: int, datasets: list[Dataset], **options) -> list[Dataset]:
    """C-STORE ``datasets`` in one association; their statuses."""
    association = associate(port, datasets, **options)
    assert association.is_established, "the node refused the association"
    try:
        return [association.send_c_store(dataset) for dataset in datasets]
    finally:
        association.release()


def inbox_files(node: DimseNode) -> list[str]:
    """Everything in the inbox folder, temporaries included."""
    return sorted(path.name for path in node.state.inbox_folder.iterdir())


def lines_with(node: DimseNode, text: str) -> list[str]:
    return [line for line in node.lines if text in line]


# --- addresses and the command line -----------------------------------------------------------------


def test_addresses_parse_and_explain_bad_input() -> None:
    import argparse

    assert ae_address("ORTHANC@127.0.0.1:4242") == AEAddress("ORTHANC", "127.0.0.1", 4242)
    assert (
        ae_address("PACS@[::1]:104") == AEAddress("PACS", "::1", 104)
        and str(ae_address("PACS@[::1]:104")) == "PACS@[::1]:104"
    )
    assert listen_address("0.0.0.0:11112") == (None, "0.0.0.0", 11112) and listen_address("LUNGDET@127.0.0.1:0") == (
        "LUNGDET",
        "127.0.0.1",
        0,
    )
    assert allowed_caller("ORTHANC") == AllowedCaller("ORTHANC") and allowed_caller(
        "ORTHANC@10.0.0.5"
    ) == AllowedCaller("ORTHANC", "10.0.0.5")
    assert AllowedCaller("ORTHANC", "127.0.0.1").addresses() == {"127.0.0.1", "::ffff:127.0.0.1"}
    for text, message in [
        ("127.0.0.1:4242", r"expected AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242; '127.0.0.1:4242' has no '@'"),
        ("ORTHANC@127.0.0.1", r"expected AE@HOST:PORT"),
        ("ORTHANC@127.0.0.1:dicom", r"port 'dicom' in 'ORTHANC@127.0.0.1:dicom' is not a number"),
        ("ORTHANC@127.0.0.1:70000", r"port 70000 .* out of range; TCP ports are 1 to 65535"),
        ("ORTHANC@127.0.0.1:0", r"port 0 in .*: give the port the other node listens on"),
        ("A_TITLE_OF_17_CHR@h:104", r"AE title 'A_TITLE_OF_17_CHR' has 17 characters; DICOM allows at most 16"),
        ("BAD\\AE@h:104", r"printable ASCII characters other than backslash"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            ae_address(text)
    with pytest.raises(
        ValueError, match=r"--allow X@no-such-host.invalid: host 'no-such-host.invalid' cannot be resolved"
    ):
        AllowedCaller("X", "no-such-host.invalid").addresses()


def test_command_line_modes_are_exclusive_and_complete(capsys) -> None:
    from lungdet.pacs.cli import DEFAULT_MAX_INBOX, check_mode, get_args_parser
    from lungdet.pacs.inbox import DEFAULT_MAX_INBOX as NODE_DEFAULT

    assert DEFAULT_MAX_INBOX is NODE_DEFAULT  # one constant: the state folder's module, which needs no pynetdicom
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, lungdet.pacs.cli, lungdet.pacs.inbox; print('pynetdicom' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.stdout.strip() == "False", loaded.stderr
    parser = get_args_parser()
    for argv, message in [
        ([], "one of the arguments --url --listen is required"),
        (["--url", "http://x/dicom-web", "--listen", "L@0.0.0.0:104"], "not allowed with argument"),
    ]:
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--checkpoint", "c.pt"])
        assert message in capsys.readouterr().err
    listen = ["--listen", "LUNGDET@0.0.0.0:11112", "--checkpoint", "c.pt"]
    for argv, message in [
        (
            listen + ["--allow", "ORTHANC"],
            r"--listen needs one place for the results: --send-to AE@HOST:PORT \(C-STORE\) or --dicomweb-url URL",
        ),
        (
            listen + ["--allow", "ORTHANC", "--send-to", "O@h:104", "--dicomweb-url", "http://h/dicom-web"],
            "--listen needs one place",
        ),
        (listen + ["--send-to", "O@h:104"], r"--listen needs --allow AE\[@HOST\] for each sender"),
        (listen + ["--send-to", "O@h:104", "--allow", "O", "--allow-any"], "not both"),
        (listen + ["--send-to", "O@h:104", "--allow", "O", "--once"], r"--once: only with --url"),
        (
            ["--url", "http://h/dicom-web", "--checkpoint", "c.pt", "--send-to", "O@h:104", "--max-inbox", "5"],
            r"--send-to, --max-inbox: only with --listen",
        ),
        (
            ["--url", "http://h/dicom-web", "--checkpoint", "c.pt", "--keep-days", "7", "--send-tls"],
            r"--keep-days, --send-tls: only with --listen",
        ),
        (
            listen + ["--send-to", "O@h:104", "--allow", "O", "--tls-cert", "c.pem"],
            "give --tls-cert CERT and --tls-key KEY together",
        ),
        (
            listen
            + [
                "--send-to",
                "O@h:104",
                "--allow",
                "O",
                "--tls-cert",
                "c",
                "--tls-key",
                "k",
                "--tls-require-client-cert",
            ],
            r"--tls-require-client-cert needs --tls-cert/--tls-key \(TLS on\) and --tls-ca",
        ),
        (
            listen + ["--dicomweb-url", "http://h/", "--allow", "O", "--send-tls"],
            "--send-tls needs --send-to AE@HOST:PORT and --tls-ca",
        ),
        (
            listen + ["--send-to", "O@h:104", "--allow", "O", "--audit-syslog-tls"],
            "--audit-syslog-tls needs --audit-syslog HOST:PORT and --tls-ca",
        ),
    ]:
        with pytest.raises(LungdetError, match=message):
            check_mode(parser.parse_args(argv))
    check_mode(parser.parse_args(listen + ["--send-to", "O@h:104", "--allow", "O@10.0.0.5", "--allow", "GATEWAY"]))


# --- the pure core: what the handler decides, and every crash point of the state folder ----------------


def test_check_instance_decides_by_class_tags_and_pixels(rsna_sample_dir: Path) -> None:
    sample = pydicom.dcmread(sorted(rsna_sample_dir.glob("*.dcm"))[0])
    good = check_instance(dicom_bytes(sample), sop_class=sample.SOPClassUID)
    assert good == Arrival(sample.SOPInstanceUID, sample.StudyInstanceUID)
    # Who the image is of goes to the audit trail, and never into a repr that a log could show.
    assert (good.patient_id, good.sop_class) == (sample.PatientID, sample.SOPClassUID)
    assert sample.PatientID not in repr(good)
    assert check_instance(dicom_bytes(sample), sop_class="1.2.840.10008.5.1.4.1.1.1") == Refusal(
        DATA_SET_MISMATCH, f"its SOP Class UID {sample.SOPClassUID} is not the request's 1.2.840.10008.5.1.4.1.1.1"
    )
    # The gate's verdicts: acknowledged (an Arrival), with why no result will come; off, the image is analysed.
    ct, lateral = synthetic(Modality="CT"), synthetic(ViewPosition="LL")
    assert check_instance(dicom_bytes(ct), sop_class=ct.SOPClassUID).not_frontal_chest == (
        "not a frontal chest radiograph: Modality CT (lungdet's models were made for CR, DX or DR chest radiographs)"
    )
    assert check_instance(dicom_bytes(lateral), sop_class=lateral.SOPClassUID) == Arrival(
        lateral.SOPInstanceUID,
        lateral.StudyInstanceUID,
        not_frontal_chest="not a frontal chest radiograph: ViewPosition LL (only AP and PA views are frontal)",
    )
    assert check_instance(dicom_bytes(lateral), sop_class=lateral.SOPClassUID, gate=False) == Arrival(
        lateral.SOPInstanceUID, lateral.StudyInstanceUID
    )
    own = synthetic(SeriesDescription="lungdet overlay - Research use only, not for diagnosis")
    assert check_instance(dicom_bytes(own), sop_class=own.SOPClassUID).own_result
    cut = check_instance(
        dicom_bytes(sample)[:3000], sop_class=sample.SOPClassUID
    )  # a dataset cut short in its pixel data
    assert cut == Refusal(
        CANNOT_UNDERSTAND, "the data set is truncated (End of file reached before delimiter (FFFE,E0DD) found)"
    )
    assert [
        code
        for code in (0x0000, 0xB000, 0xB007, 0x0107, 0x0111, 0xA700, 0xA900, 0xC000, 0x0122)
        if status_accepted(code)
    ] == [0x0000, 0xB000, 0xB007, 0x0107, 0x0111]


def result_for(image: str, study: str) -> list[Dataset]:
    """A stand-in result (one tiny dataset with a report UID of its own), enough for the state folder."""
    report = synthetic(StudyInstanceUID=study)
    report.SOPInstanceUID = f"2.25.{abs(hash(image)) % 10**20}"
    return [report]


CRASH_POINTS = [
    "mid-write of the inbox file",
    "acknowledged, not processed",
    "mid-write of the result",
    "result written, not recorded",
    "recorded, inbox file not removed",
    "stored, pending not removed",
]


@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_restart_after_each_crash_point_keeps_one_result(tmp_path: Path, crash: str) -> None:
    """Build the folder as a kill at ``crash`` leaves it, reopen it, and check nothing is lost, repeated or left half-done."""
    image, study = generate_uid(), generate_uid()
    state = DimseState.open(tmp_path)
    name = state.reserve(image, "2.25.1", 100)
    data = dicom_bytes(synthetic(SOPInstanceUID=image, StudyInstanceUID=study))
    if crash == "mid-write of the inbox file":
        (state.inbox_folder / f".{name}.dcm.x1y2.tmp").write_bytes(
            data[:50]
        )  # atomic.py's temporary name, never acknowledged
    else:
        state.admit(name, data)
        assert state.take(timeout=0) == name
    if crash in ("mid-write of the result",):
        (state.pending_folder / f".{name}.a1b2.tmp").mkdir()
        (state.pending_folder / f".{name}.a1b2.tmp" / "0.dcm").write_bytes(b"half")
    if crash in ("result written, not recorded", "recorded, inbox file not removed", "stored, pending not removed"):
        result = state.keep_pending(name, study, image, result_for(image, study))
    if crash == "recorded, inbox file not removed":
        state._append_journal({"name": name, "outcome": "reported", "image": image, "report": result.report})
    if crash == "stored, pending not removed":
        state.settle(name, outcome="reported", image=image, report=result.report)
    with open(state.journal, "a") as journal:  # and a line torn by a power cut, which must not stop the restart
        journal.write('{"name": "00000')

    again = DimseState.open(tmp_path)
    leftovers = [
        path.name
        for folder in (again.inbox_folder, again.pending_folder)
        for path in folder.iterdir()
        if path.name.startswith(".")
    ]
    assert leftovers == []
    waiting = [again.take(timeout=0)] if again.waiting else []
    pending = again.pending()
    if crash == "mid-write of the inbox file":  # never acknowledged: the sender still has it and sends again
        assert (waiting, pending, again.settled) == ([], [], set())
    elif crash in (
        "acknowledged, not processed",
        "mid-write of the result",
    ):  # processed from the inbox after the restart
        assert (waiting, pending, again.settled) == ([name], [], set())
        assert again.reserve(image, "2.25.1", 100).reason == "already waiting in the inbox"
    else:  # the result waits to be stored (again, for the last one: the same UIDs, so the receiver keeps one)
        assert waiting == [] and [result.name for result in pending] == [name] and again.settled == {name}
        assert list(again.inbox_folder.iterdir()) == []
        assert again.reserve(image, pending[0].report, 100).reason == "already reported"
    # A new image never reuses a name the journal or the folders hold (a temporary file held none).
    assert again.next_sequence == (1 if crash == "mid-write of the inbox file" else 2)


# --- real senders and receivers ---------------------------------------------------------------------


def test_orthanc_sends_to_the_node_and_takes_its_results(
    orthanc_dicom, start_node, rsna_sample_dir: Path, serving_detector
) -> None:
    port = free_port()  # the node's, known before Orthanc's DicomModalities is written
    orthanc = orthanc_dicom({"lungdet": ("LUNGDET", "127.0.0.1", port)})
    node = start_node(
        CStoreReceiver(AEAddress("ORTHANC", "127.0.0.1", orthanc.dicom_port), ae_title="LUNGDET"),
        allowed=[AllowedCaller("ORTHANC", "127.0.0.1")],
        port=port,
        overlay=True,
    )
    samples = sorted(rsna_sample_dir.glob("*.dcm"))[:3]
    ids = [orthanc.upload(path.read_bytes()) for path in samples]
    orthanc.store_to_modality("lungdet", ids)  # Orthanc's answer comes once the node acknowledged all three

    def results() -> list[dict[str, str]]:
        return [tags for tags in orthanc.instance_tags() if tags["SeriesDescription"].startswith("lungdet")]

    wait_for(lambda: len(results()) == 6, what="three reports and three overlays in Orthanc")
    for path in samples:
        source = pydicom.dcmread(path, stop_before_pixels=True)
        in_study = [tags for tags in results() if tags["StudyInstanceUID"] == source.StudyInstanceUID]
        [report] = [tags for tags in in_study if tags["Modality"] == "SR"]
        assert len(in_study) == 2, in_study  # the report and the overlay, in the image's own study
        contents = read_report(pydicom.dcmread(io.BytesIO(orthanc.file(report["SOPInstanceUID"]))))
        expected = keep_confident(serving_detector.predict(read_dicom(path).pixels).prediction, min_confidence=CUT_OFF)
        assert contents.source_sop_instance_uid == source.SOPInstanceUID
        np.testing.assert_allclose(contents.prediction.scores, expected.scores, atol=1e-6)
    assert len(lines_with(node, "received ")) == 3 and len(lines_with(node, "from ORTHANC@127.0.0.1")) == 3
    wait_for(lambda: len(lines_with(node, "stored ")) == 3, what="three 'stored' lines (said after Orthanc answers)")
    assert "research use only, not a diagnostic device" in node.lines[0]

    orthanc.store_to_modality("lungdet", ids)  # routed again: acknowledged, not processed or stored again
    wait_for(lambda: len(lines_with(node, "again: already reported")) == 3, what="three 'already reported' lines")
    assert node.idle() and len(results()) == 6 and len(lines_with(node, "reported 1.")) == 3


def test_dcmtk_echoscu_and_storescu_get_a_result(
    start_node, storescp: StoreScp, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    node = start_node(
        CStoreReceiver(storescp.address, ae_title="LUNGDET"), allowed=[AllowedCaller("STORESCU")], gsps=True
    )
    echo = subprocess.run(
        [dcmtk("echoscu"), "-aet", "STORESCU", "-aec", "LUNGDET", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr
    assert lines_with(node, "echo from STORESCU@127.0.0.1")
    sample = sorted(rsna_sample_dir.glob("*.dcm"))[1]
    # -xy proposes JPEG Baseline, the file's own syntax (storescu proposes only uncompressed ones otherwise, and cannot convert).
    sent = subprocess.run(
        [dcmtk("storescu"), "-xy", "-aet", "STORESCU", "-aec", "LUNGDET", "127.0.0.1", str(node.port), str(sample)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: len(storescp.received()) == 2, what="the report and the GSPS at storescp")
    received = {dataset.SOPClassUID.name: dataset for dataset in storescp.received()}
    assert sorted(received) == ["Comprehensive 3D SR Storage", "Grayscale Softcopy Presentation State Storage"]
    report, gsps = received["Comprehensive 3D SR Storage"], received["Grayscale Softcopy Presentation State Storage"]
    source = pydicom.dcmread(sample, stop_before_pixels=True)
    assert report.StudyInstanceUID == gsps.StudyInstanceUID == source.StudyInstanceUID
    assert read_report(report).source_sop_instance_uid == source.SOPInstanceUID and report.SOPInstanceUID == report_uid(
        source, node.model
    )
    assert gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # The node says "stored" after storescp has answered, so the line may trail the datasets by a moment.
    stored = f"stored {source.SOPInstanceUID}'s result (2 instance(s)) in STORESCP@127.0.0.1:{storescp.port} (C-STORE)"
    wait_for(lambda: lines_with(node, stored), what="the node's 'stored' line")


def test_dicomweb_receiver_down_then_up(orthanc, start_node, rsna_sample_dir: Path) -> None:
    from lungdet.pacs.cli import get_args_parser, make_client

    args = get_args_parser().parse_args(["--url", orthanc.dicomweb, "--checkpoint", "unused.pt", "--timeout", "10"])
    node = start_node(DicomwebReceiver(make_client(args), orthanc.dicomweb))
    orthanc.stop()
    dataset = fresh_copy(sorted(rsna_sample_dir.glob("*.dcm"))[2])
    assert [status.Status for status in store(node.port, [dataset])] == [0]
    wait_for(lambda: lines_with(node, "does not answer"), what="the receiver-down line")
    assert len(node.state.pending()) == 1
    orthanc.start()
    wait_for(lambda: node.idle() and lines_with(node, "answers again"), what="the result stored once Orthanc is back")
    [report] = [tags for tags in orthanc.instance_tags() if tags["Modality"] == "SR"]
    assert report["StudyInstanceUID"] == dataset.StudyInstanceUID
    assert (
        len(lines_with(node, "does not answer")) == 1
        and f"stored {dataset.SOPInstanceUID}'s result (1 instance(s)) in {orthanc.dicomweb} (STOW-RS)" in node.lines
    )


# --- bad input: a failure status, and nothing written ---------------------------------------------


def pdf() -> Dataset:
    dataset = synthetic()
    for keyword in (
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelData",
    ):
        delattr(dataset, keyword)
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    dataset.Modality, dataset.MIMETypeOfEncapsulatedDocument, dataset.EncapsulatedDocument = (
        "DOC",
        "application/pdf",
        b"%PDF-1.4\n%%EOF\n",
    )
    return dataset


def text_sr() -> Dataset:
    dataset = pdf()
    del dataset.MIMETypeOfEncapsulatedDocument, dataset.EncapsulatedDocument
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    dataset.Modality, dataset.ValueType = "SR", "CONTAINER"
    return dataset


@pytest.mark.parametrize("build", [pdf, text_sr], ids=["encapsulated PDF", "Basic Text SR"])
def test_a_non_image_sop_class_is_refused_at_association(start_node, build) -> None:
    node = start_node(nowhere())
    dataset = build()
    association = associate(node.port, [dataset], echo=True)
    try:
        assert association.is_established  # the association stands (C-ECHO is offered too); the class does not
        assert [context.abstract_syntax for context in association.rejected_contexts] == [dataset.SOPClassUID]
        with pytest.raises(ValueError, match="No presentation context"):
            association.send_c_store(dataset)
    finally:
        association.release()
    assert inbox_files(node) == [] and not lines_with(node, "received")


def test_a_multi_frame_image_gets_a900_and_nothing_is_written(start_node) -> None:
    node = start_node(nowhere())
    dataset = synthetic(NumberOfFrames=2)
    [status] = store(node.port, [dataset])
    assert status.Status == DATA_SET_MISMATCH and status.ErrorComment == "is multi-frame (2 frames)"
    assert inbox_files(node) == [] and lines_with(
        node, f"refused {dataset.SOPInstanceUID} from SCU@127.0.0.1: is multi-frame (2 frames) (status 0xA900)"
    )


def test_a_lateral_or_abdomen_film_is_acknowledged_skipped_and_gets_no_result(start_node) -> None:
    node = start_node(nowhere())
    lateral, abdomen = synthetic(ViewPosition="LL"), synthetic(BodyPartExamined="ABDOMEN")
    statuses = store(node.port, [lateral, abdomen])
    assert [status.Status for status in statuses] == [0x0000, 0x0000]  # the archive must not send them again
    # Nothing written: no inbox file for the worker, no pending result for the sender.
    assert inbox_files(node) == [] and node.state.pending() == [] and node.state.settled == set()
    assert lines_with(
        node,
        f"skipped {lateral.SOPInstanceUID} from SCU@127.0.0.1: not a frontal chest radiograph: ViewPosition LL "
        "(only AP and PA views are frontal); acknowledged, no result",
    )
    assert lines_with(
        node,
        f"skipped {abdomen.SOPInstanceUID} from SCU@127.0.0.1: not a frontal chest radiograph: BodyPartExamined ABDOMEN",
    )


def test_an_undecodable_frame_gets_c000_and_nothing_is_written(start_node, rsna_sample_dir: Path) -> None:
    node = start_node(nowhere())
    truncated = synthetic(pixel_data=bytes(10))  # 24 pixels declared, 10 bytes sent
    jpeg = fresh_copy(sorted(rsna_sample_dir.glob("*.dcm"))[0])
    frame = next(generate_frames(jpeg.PixelData, number_of_frames=1))
    jpeg.PixelData = encapsulate([frame[: len(frame) // 2]])  # a JPEG cut in half: no End Of Image
    statuses = store(node.port, [truncated, jpeg])
    assert [status.Status for status in statuses] == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND]
    assert all(status.ErrorComment.startswith("pixel data cannot be decoded") for status in statuses)
    assert inbox_files(node) == [] and len(lines_with(node, "pixel data cannot be decoded (transfer syntax")) == 2
    assert lines_with(node, "JPEG Baseline (Process 1): the frame has no end marker, it was cut short) (status 0xC000)")
    assert jpeg.file_meta.TransferSyntaxUID == JPEGBaseline8Bit


def test_an_unknown_calling_ae_is_rejected_unless_any_is_allowed(start_node) -> None:
    node = start_node(nowhere(), allowed=[AllowedCaller("SCU"), AllowedCaller("ROUTER", "10.9.9.9")])
    for calling, called, diagnostic, line in [
        (
            "STRANGER",
            "LUNGDET",
            3,
            "calling AE title 'STRANGER' is not in --allow (add --allow STRANGER@127.0.0.1, or --allow-any)",
        ),
        ("ROUTER", "LUNGDET", 3, "calling AE title 'ROUTER' is allowed only from 10.9.9.9"),
        ("SCU", "SOMEONE", 7, "it called AE title 'SOMEONE'; this node is 'LUNGDET'"),
    ]:
        association = associate(node.port, calling=calling, called=called)
        assert association.is_rejected, calling
        rejection = association.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, diagnostic)
        assert lines_with(node, f"rejected an association from {calling}@127.0.0.1: {line}")
    assert associate(node.port, calling="SCU", echo=True).send_c_echo().Status == 0
    anyone = start_node(nowhere(), allowed=None)
    association = associate(anyone.port, calling="STRANGER", echo=True)
    assert association.is_established and association.send_c_echo().Status == 0
    association.release()


def test_an_association_aborted_mid_transfer_leaves_nothing(start_node, rsna_sample_dir: Path) -> None:
    node = start_node(nowhere())
    dataset = fresh_copy(sorted(rsna_sample_dir.glob("*.dcm"))[3])
    association = associate(node.port, [dataset])
    send, fragments = association.dul.send_pdu, []

    class Cut(Exception):
        pass

    def send_until_cut(
        primitive,
    ) -> None:  # the command and the first piece of the dataset go out, then the sender aborts
        if isinstance(primitive, P_DATA):
            fragments.append(primitive)
            if len(fragments) == 3:
                raise Cut
        send(primitive)

    association.dul.send_pdu = send_until_cut
    with pytest.raises(Cut):
        association.send_c_store(dataset)
    association.abort()
    wait_for(lambda: lines_with(node, "aborted"), what="the abort line")
    assert inbox_files(node) == [] and not lines_with(node, "received")
    assert [status.Status for status in store(node.port, [dataset])] == [0]  # and the node takes the next one whole


class Held:
    """The serving detector, held at its first image until ``release`` is set: a busy worker."""

    def __init__(self, detector) -> None:
        self.detector, self.release, self.started = detector, threading.Event(), threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.detector, name)

    def predict(self, pixels, tags=None):
        self.started.set()
        self.release.wait(30)
        return self.detector.predict(pixels, tags)


def test_a_full_inbox_answers_a700(start_node, storescp: StoreScp, serving_detector) -> None:
    held = Held(serving_detector)
    node = start_node(CStoreReceiver(storescp.address, ae_title="LUNGDET"), detector=held, max_inbox=1)
    first, second = synthetic(), synthetic()
    assert [status.Status for status in store(node.port, [first])] == [0]
    wait_for(held.started.is_set, what="the worker to take the first image")
    [status] = store(node.port, [second])
    assert status.Status == OUT_OF_RESOURCES and status.ErrorComment.startswith(
        "the inbox is full (1 instances, --max-inbox 1)"
    )
    assert len(inbox_files(node)) == 1
    held.release.set()
    wait_for(
        lambda: len(storescp.received()) == 1 and node.idle(),
        what="the first image's result",
        on_timeout=lambda: "\n" + "\n".join(node.lines),
    )
    assert [status.Status for status in store(node.port, [second])] == [0]  # room again


# --- kill -9 ------------------------------------------------------------------------------------------


def listen_arguments(checkpoint: Path, state: Path, receiver: StoreScp) -> list[str]:
    """``lungdet pacs`` arguments for a node on a free loopback port that sends its results to ``receiver``."""
    return [
        "--listen",
        "LUNGDET@127.0.0.1:0",
        "--allow",
        "SCU",
        "--send-to",
        str(receiver.address),
        "--checkpoint",
        str(checkpoint),
        "--state-dir",
        str(state),
        "--device",
        "cpu",
        "--amp",
        "none",
        "--timeout",
        "5",
    ]


def start_command(checkpoint: Path, state: Path, receiver: StoreScp, log: Path) -> tuple[subprocess.Popen, int]:
    """``lungdet pacs --listen`` as a process of its own on a free port; (process, port) once it listens."""
    command = [sys.executable, "-m", "lungdet", "pacs", *listen_arguments(checkpoint, state, receiver)]
    with open(log, "w") as stream:
        process = subprocess.Popen(
            command, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    found: list[int] = []

    def listening() -> bool:
        if process.poll() is not None:
            pytest.fail(f"lungdet pacs exited with {process.returncode}:\n{log.read_text()}")
        found[:] = [int(port) for port in re.findall(r"listening as LUNGDET on 127\.0\.0\.1:(\d+)", log.read_text())]
        return bool(found)

    wait_for(listening, what="lungdet pacs to listen", timeout=90)
    return process, found[0]


def restart_in_process(
    checkpoint: Path, state: Path, receiver: StoreScp, *, done: Callable[[], bool], capsys
) -> tuple[int, str]:
    """``lungdet pacs --listen`` again through the command's own entry point, in this process (a second subprocess would spend
    seconds importing torch), stopped with SIGTERM, as a service stop would, once ``done()``; (exit status, log)."""
    from lungdet.cli import main

    def stop_when_done() -> None:
        deadline = time.monotonic() + 60
        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # anything sent twice would arrive now
        while (
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):  # the node's own handler, not the default that would end pytest
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    capsys.readouterr()
    threading.Thread(target=stop_when_done, daemon=True).start()
    status = main(["pacs", *listen_arguments(checkpoint, state, receiver)])
    return status, capsys.readouterr().err


def test_kill_9_loses_nothing_and_repeats_nothing(
    serving_checkpoint: Path, rsna_sample_dir: Path, tmp_path: Path, capsys
) -> None:
    receiver = StoreScp(tmp_path / "received")  # not started yet: every result has to wait on disk
    state, log = tmp_path / "state", tmp_path / "first.log"
    process, port = start_command(serving_checkpoint, state, receiver, log)
    datasets = [fresh_copy(path) for path in sorted(rsna_sample_dir.glob("*.dcm"))[:8]]
    try:
        assert [status.Status for status in store(port, datasets)] == [0] * len(datasets)
        wait_for(lambda: "does not answer" in log.read_text(), what="a result to be pending")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    acknowledged = {dataset.SOPInstanceUID for dataset in datasets}
    inbox = {path.stem.split("-", 1)[1] for path in (state / "inbox").glob("*.dcm")}
    pending = {path.name.split("-", 1)[1] for path in (state / "pending").iterdir() if not path.name.startswith(".")}
    assert pending and inbox | pending == acknowledged, (
        inbox,
        pending,
    )  # killed with results pending: each image in one place or both

    receiver.start()
    try:
        status, second = restart_in_process(
            serving_checkpoint,
            state,
            receiver,
            capsys=capsys,
            done=lambda: (
                len(list(receiver.folder.iterdir())) >= len(datasets)
                and not any((state / "pending").iterdir())
                and not any((state / "inbox").iterdir())
            ),
        )
    finally:
        receiver.stop()
    assert status == 0, second
    reports = receiver.received()
    assert sorted(read_report(report).source_sop_instance_uid for report in reports) == sorted(
        acknowledged
    )  # exactly one each
    by_study = {dataset.SOPInstanceUID: dataset.StudyInstanceUID for dataset in datasets}
    assert all(report.StudyInstanceUID == by_study[read_report(report).source_sop_instance_uid] for report in reports)
    assert (
        f"recovered from the last run: {len(inbox - pending)} instance(s) in the inbox, {len(pending)} result(s) waiting to be stored"
        in second
    )
    assert "stopped; 0 instance(s)" in second and "research use only, not a diagnostic device" in second
