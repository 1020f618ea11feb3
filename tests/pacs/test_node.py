"""Tests for pacs/node.py and ``lungdet pacs`` against a real Orthanc: one report per good image, bad instances left alone, nothing twice, nothing lost."""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from lungdet import lungdet_version
from lungdet.data_tools.dicom_io import read_dicom
from lungdet.pacs.node import NodeState, PacsNode
from lungdet.show.dicom_sr import read_report
from lungdet.submission.prediction_string import keep_confident


def dicom_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def bad_instances(sample: Path) -> dict[str, bytes]:
    """Five instances the node must skip, each in a study of its own, built from a real RSNA file."""
    source = pydicom.dcmread(sample)
    pixels = source.pixel_array

    def variant(**tags: object) -> pydicom.Dataset:
        dataset = pydicom.dcmread(sample)
        dataset.decompress()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID = (
            generate_uid(),
            generate_uid(),
            generate_uid(),
        )
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        for keyword, value in tags.items():
            setattr(dataset, keyword, value)
        return dataset

    ct = variant(Modality="CT")
    lateral = variant(ViewPosition="LL")
    frames = variant(NumberOfFrames=2)
    frames.PixelData = np.stack([pixels, pixels]).tobytes()
    no_pixels = variant()
    del no_pixels.PixelData
    truncated = variant()
    truncated.PixelData = pixels.tobytes()[: pixels.size // 3]
    return {
        "ct": dicom_bytes(ct),
        "lateral": dicom_bytes(lateral),
        "frames": dicom_bytes(frames),
        "no_pixels": dicom_bytes(no_pixels),
        "truncated": dicom_bytes(truncated),
    }


def run_node(orthanc, checkpoint: Path, state: Path, *extra: str, capsys) -> tuple[int, str]:
    """``lungdet pacs ...`` through the command's own entry point (in this process: a subprocess would spend seconds importing torch)."""
    from lungdet.cli import main

    capsys.readouterr()
    status = main(
        [
            "pacs",
            "--url",
            orthanc.dicomweb,
            "--checkpoint",
            str(checkpoint),
            "--state-dir",
            str(state),
            "--device",
            "cpu",
            "--amp",
            "none",
            *extra,
        ]
    )
    return status, capsys.readouterr().err


def reports_by_study(orthanc) -> dict[str, list[dict[str, str]]]:
    found: dict[str, list[dict[str, str]]] = {}
    for tags in orthanc.instance_tags():
        if tags["Modality"] == "SR":
            found.setdefault(tags["StudyInstanceUID"], []).append(tags)
    return found


def test_round_trip_through_orthanc(
    orthanc, serving_checkpoint: Path, serving_detector, rsna_sample_dir: Path, tmp_path: Path, capsys
) -> None:
    samples = sorted(rsna_sample_dir.glob("*.dcm"))
    for path in samples:
        orthanc.upload(path.read_bytes())
    bad = bad_instances(samples[0])
    bad_uids = {}
    for name, data in bad.items():
        orthanc.upload(data)
        bad_uids[name] = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    before = len(orthanc.instance_tags())

    audit = tmp_path / "audit.log"
    status, log = run_node(
        orthanc, serving_checkpoint, tmp_path / "state", "--once", "--gsps", "--audit", str(audit), capsys=capsys
    )
    assert status == 0, log
    # The audit trail: the QIDO query, each image retrieved and each result set stored, naming the patient.
    events = [
        ElementTree.fromstring(line).find("EventIdentification/EventID").get("originalText")
        for line in audit.read_text().splitlines()
    ]
    assert events[0] == events[-1] == "Application Activity" and events.count("Query") == 1
    assert (
        events.count("Begin Transferring DICOM Instances") == 13
        and events.count("DICOM Instances Transferred") == 2 * 13
    )
    first = pydicom.dcmread(samples[0], stop_before_pixels=True)
    assert f'ParticipantObjectID="{first.PatientID}"' in audit.read_text() and str(first.PatientID) not in log
    assert "poll 1: 18 instance(s) listed, 13 reported" in log and "5 skipped" in log and "research use only" in log
    for name, reason in (
        ("ct", "modality CT, not a chest radiograph"),
        ("lateral", "not a frontal chest radiograph: ViewPosition LL (only AP and PA views are frontal)"),
        ("frames", "2 frames"),
        ("no_pixels", "has no pixel data (7FE0,0010), so there is no image to read"),
        ("truncated", "pixel data cannot be decoded"),
    ):
        line = f"skipped instance {bad_uids[name].SOPInstanceUID}: {reason}"
        assert line in log, (name, log)

    reports = reports_by_study(orthanc)
    assert len(orthanc.instance_tags()) == before + 2 * 13  # a report and a presentation state per good image
    presentation_states = {tags["StudyInstanceUID"] for tags in orthanc.instance_tags() if tags["Modality"] == "PR"}
    assert presentation_states == {pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID for path in samples}
    for path in samples:  # exactly one report per good image, in its study, with the boxes the detector gives
        source = pydicom.dcmread(path, stop_before_pixels=True)
        [report] = reports[source.StudyInstanceUID]
        assert report["SeriesDescription"] == "lungdet boxes - Research use only, not for diagnosis"
        contents = read_report(pydicom.dcmread(io.BytesIO(orthanc.file(report["SOPInstanceUID"]))))
        assert contents.source_sop_instance_uid == source.SOPInstanceUID
        expected = keep_confident(serving_detector.predict(read_dicom(path).pixels).prediction, min_confidence=0.3)
        np.testing.assert_allclose(contents.prediction.scores, expected.scores, atol=1e-6)
        np.testing.assert_allclose(contents.prediction.boxes, expected.boxes, atol=1e-3)
    for dataset in bad_uids.values():  # the bad instances are untouched: nothing was added to their studies
        assert dataset.StudyInstanceUID not in reports

    # Run again, in process (the command line was checked above): nothing new, nothing logged twice.
    node, lines = make_node(orthanc, serving_detector, tmp_path / "state", cut_off=0.3)
    second = node.poll()
    assert (second.listed, second.reported) == (
        0,
        0,
    ) and lines == []  # each bad instance was reported once, not every poll
    # A restarted node that lost its memory asks the server, which has the reports already.
    node, _ = make_node(orthanc, serving_detector, tmp_path / "other_state", cut_off=0.3)
    fresh = node.poll()
    assert (fresh.reported, fresh.already, fresh.skipped) == (0, 13, 5)
    assert len(orthanc.instance_tags()) == before + 2 * 13


class StopsTheServer:
    """A dicomweb client that stops Orthanc just before its ``when``-th store: the server going down mid-run."""

    def __init__(self, client, orthanc, *, when: int) -> None:
        self.client, self.orthanc, self.when, self.stores = client, orthanc, when, 0

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    def store_instances(self, *args, **kwargs):
        self.stores += 1
        if self.stores == self.when:
            self.orthanc.stop()
        return self.client.store_instances(*args, **kwargs)


def node_args(url: str, **options: object) -> argparse.Namespace:
    """``lungdet pacs`` options as its parser gives them, for :func:`lungdet.pacs.cli.make_client`."""
    from lungdet.pacs.cli import get_args_parser

    args = get_args_parser().parse_args(["--url", url, "--checkpoint", "unused.pt"])
    return argparse.Namespace(**{**vars(args), **options})


def test_amp_takes_the_modes_predict_and_serve_take(capsys: pytest.CaptureFixture[str]) -> None:
    from lungdet.pacs.cli import get_args_parser

    assert node_args("http://127.0.0.1:1/dicom-web").amp == "auto"
    assert get_args_parser().parse_args(["--url", "http://x", "--checkpoint", "m.pt", "--amp", "bf16"]).amp == "bf16"
    with pytest.raises(SystemExit) as exit_info:
        get_args_parser().parse_args(["--url", "http://x", "--checkpoint", "m.pt", "--amp", "bf32"])
    assert exit_info.value.code == 2
    assert "argument --amp: invalid choice: 'bf32'" in capsys.readouterr().err


def make_node(
    orthanc, detector, state: Path, *, client=None, overlay: bool = False, cut_off: float | None = None, **options
) -> tuple[PacsNode, list[str]]:
    """A node as ``lungdet pacs`` builds it (same client setup), in this process, its log lines collected."""
    from lungdet.pacs.cli import make_client
    from lungdet.show.dicom_derived import model_identity

    lines: list[str] = []
    cut_off = detector.score_threshold if cut_off is None else cut_off
    model = model_identity(lungdet_version(), [detector.architecture], [detector.checkpoint_sha256], cut_off)
    client = client or make_client(node_args(orthanc.dicomweb, timeout=10.0, **options))
    node = PacsNode(client, detector, model, NodeState.load(state), cut_off=cut_off, overlay=overlay, say=lines.append)
    return node, lines


def test_a_server_stopped_mid_run_and_restarted_loses_nothing(
    orthanc, serving_detector, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    from lungdet.pacs.cli import make_client

    samples = sorted(rsna_sample_dir.glob("*.dcm"))[:5]
    for path in samples:
        orthanc.upload(path.read_bytes())
    client = StopsTheServer(make_client(node_args(orthanc.dicomweb, timeout=10.0)), orthanc, when=3)
    node, lines = make_node(orthanc, serving_detector, tmp_path / "state", client=client, overlay=True)
    restarts = []

    def sleep(seconds: float) -> None:  # the pause between retries: the server comes back
        if not restarts:
            restarts.append(seconds)
            orthanc.start()

    assert node.run(poll_seconds=1, once=True, retry_seconds=30, sleep=sleep) == 0
    assert restarts, "the node should have waited for the server"
    assert any("the server does not answer" in line for line in lines) and any(
        "answers again" in line for line in lines
    )
    assert sum("does not answer" in line for line in lines) == 1  # said once, not on every retry
    reports = reports_by_study(orthanc)
    overlays = [tags for tags in orthanc.instance_tags() if tags["SeriesDescription"].startswith("lungdet overlay")]
    for path in samples:
        assert len(reports[pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID]) == 1
    assert len(overlays) == 5 and list(node.state.pending()) == []
    assert (
        "2 instance(s) listed, 2 reported" in lines[-1] and ", 1 stored from disk" in lines[-1]
    )  # the result kept while the server was down, then the rest


class RefusesFirstStores:
    """A client whose server refuses the first two stores (HTTP 409), then takes them."""

    def __init__(self, client) -> None:
        self.client, self.refused = client, 0

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    def store_instances(self, *args, **kwargs):
        if self.refused < 2:
            self.refused += 1
            response = requests.Response()
            response.status_code = 409
            raise requests.exceptions.HTTPError("409 Conflict", response=response)
        return self.client.store_instances(*args, **kwargs)


def test_a_refused_store_is_kept_on_disk_and_stored_next_poll(
    orthanc, serving_detector, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    from lungdet.pacs.cli import make_client

    sample = sorted(rsna_sample_dir.glob("*.dcm"))[0]
    orthanc.upload(sample.read_bytes())
    detector = FailsOnce(serving_detector)
    detector.calls = 1  # counts the passes only; never fails
    node, lines = make_node(
        orthanc,
        detector,
        tmp_path / "state",
        client=RefusesFirstStores(make_client(node_args(orthanc.dicomweb, timeout=10.0))),
    )
    first = node.poll()
    assert (first.reported, first.pending) == (0, 1) and reports_by_study(orthanc) == {}
    assert any("refused to store" in line and "HTTP 409" in line for line in lines)
    [(image, _, files)] = list(node.state.pending())
    assert image == pydicom.dcmread(sample, stop_before_pixels=True).SOPInstanceUID and files
    second = node.poll()  # refused again: the result still waits, and the image is not run through the model again
    assert (second.listed, second.stored_from_disk, second.pending, detector.calls) == (0, 0, 1, 2)
    third = node.poll()
    assert (third.stored_from_disk, third.pending) == (1, 0)
    assert len(reports_by_study(orthanc)) == 1


def test_once_against_a_server_that_never_answers_gives_up_cleanly(serving_detector, tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    class Nowhere:
        dicomweb = f"http://127.0.0.1:{port}/dicom-web"

    node, lines = make_node(Nowhere, serving_detector, tmp_path / "state")
    pauses: list[float] = []
    assert (
        node.run(
            poll_seconds=1,
            once=True,
            retry_seconds=0.5,
            sleep=lambda seconds: pauses.append(seconds) or time.sleep(0.2),
        )
        == 1
    )
    assert sum("the server does not answer" in line for line in lines) == 1
    assert lines[-1].startswith("giving up after 0.5 s; 0 result(s) kept in")
    assert pauses and pauses == [2.0**index for index in range(len(pauses))]  # a pause doubling from 1 s


def test_basic_authentication(
    orthanc_with_users, serving_detector, rsna_sample_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    orthanc_with_users.upload(sorted(rsna_sample_dir.glob("*.dcm"))[0].read_bytes())
    monkeypatch.setenv("LUNGDET_PACS_PASSWORD", "wrong")
    node, lines = make_node(orthanc_with_users, serving_detector, tmp_path / "state", username="lungdet")
    assert node.run(poll_seconds=1, once=True, retry_seconds=0.0, sleep=lambda seconds: None) == 1
    assert "HTTP 401" in lines[0] and "check --username and $LUNGDET_PACS_PASSWORD, or --token" in lines[0]
    monkeypatch.setenv("LUNGDET_PACS_PASSWORD", "node-secret")
    node, lines = make_node(orthanc_with_users, serving_detector, tmp_path / "state", username="lungdet")
    assert node.run(poll_seconds=1, once=True, retry_seconds=0.0, sleep=lambda seconds: None) == 0
    assert " 1 reported" in lines[-1]


def test_client_authentication_options(monkeypatch) -> None:
    from lungdet.errors import LungdetError
    from lungdet.pacs.cli import make_client

    monkeypatch.delenv("LUNGDET_PACS_PASSWORD", raising=False)
    monkeypatch.delenv("LUNGDET_PACS_TOKEN", raising=False)
    bearer = make_client(node_args("http://127.0.0.1:1/dicom-web", token="t0ken"))
    assert bearer._session.headers["Authorization"] == "Bearer t0ken" and bearer._session.auth is None
    with pytest.raises(LungdetError, match=r"--username lungdet: set the password in \$LUNGDET_PACS_PASSWORD"):
        make_client(node_args("http://127.0.0.1:1/dicom-web", username="lungdet"))
    with pytest.raises(LungdetError, match="not both"):
        make_client(node_args("http://127.0.0.1:1/dicom-web", username="lungdet", token="t0ken"))


class FailsOnce:
    """A detector that fails on its first image: a fault of ours, which must cost that image one poll and nothing else."""

    def __init__(self, detector) -> None:
        self.detector, self.calls = detector, 0

    def __getattr__(self, name: str):
        return getattr(self.detector, name)

    def predict(self, pixels, tags=None):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("out of memory, say")
        return self.detector.predict(pixels, tags)


def test_a_failure_on_one_image_does_not_stop_the_node(
    orthanc, serving_detector, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    for path in sorted(rsna_sample_dir.glob("*.dcm"))[:2]:
        orthanc.upload(path.read_bytes())
    node, lines = make_node(orthanc, FailsOnce(serving_detector), tmp_path / "state")
    first = node.poll()
    assert (first.reported, first.failed) == (1, 1) and "1 failed (tried again next poll)" in first.line(1)
    assert any("could not process instance" in line and "RuntimeError: out of memory, say" in line for line in lines)
    second = node.poll()
    assert (second.listed, second.reported, second.failed) == (1, 1, 0)
    assert len(reports_by_study(orthanc)) == 2
