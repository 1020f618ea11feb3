"""Shared scaffolding for the server tests: the app in process, a real ``lungdet serve`` process, and upload files built in code.

The process is started on a free loopback port with a temporary folder, polled until it
answers, and stopped in the fixture's teardown even when a test fails. Its stdout and stderr
(the server's whole log) go to a file that tests read.
"""

from __future__ import annotations

import io
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

UPLOAD_LIMIT_MB = 1
START_TIMEOUT_S = 120
# Fake identifying values: none of them may appear in a reply, on the page or in the log.
FAKE_PHI = {
    "PatientName": "Doe^Janet^Phi",
    "PatientID": "PHI-PID-424242",
    "PatientBirthDate": "19520317",
    "AccessionNumber": "ACCPHI7777",
    "InstitutionName": "Phi General Hospital",
    "ReferringPhysicianName": "Referrer^Phi",
    "OtherPatientIDs": "PHI-OTHER-1313",
    "PatientAddress": "12 Phi Street",
    "StudyID": "PHISTUDY9",
}
PHI_FILE_NAME = "Doe_Janet_Phi.dcm"


@pytest.fixture(scope="session")
def upload_limit_bytes() -> int:
    return UPLOAD_LIMIT_MB * 2**20


@pytest.fixture(scope="session")
def phi_strings() -> list[str]:
    """Every fake identifying value in ``phi_dicom``, its parts, and its file name: what a reply or log must never contain."""
    strings = {PHI_FILE_NAME, PHI_FILE_NAME.removesuffix(".dcm")}
    for value in FAKE_PHI.values():
        strings.add(value)
        strings.update(part for part in value.replace("^", " ").split() if len(part) > 3)
    return sorted(strings)


@pytest.fixture(scope="session")
def phi_dicom(rsna_sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real RSNA DICOM given fake identifying tags (``FAKE_PHI``), saved under a patient's name."""
    dataset = pydicom.dcmread(sorted(rsna_sample_dir.glob("*.dcm"))[0])
    for keyword, value in FAKE_PHI.items():
        setattr(dataset, keyword, value)
    path = tmp_path_factory.mktemp("phi") / PHI_FILE_NAME
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    path.write_bytes(buffer.getvalue())
    return path


@dataclass
class ServeProcess:
    """A running ``lungdet serve``: its base URL (ending in '/'), the file its output goes to, and the process."""

    url: str
    log_path: Path
    process: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def start_serve(
    checkpoint: Path, folder: Path, *extra: str, env: dict[str, str] | None = None, trust: ssl.SSLContext | None = None
) -> ServeProcess:
    """Start ``lungdet serve`` on a free loopback port (``--port 0``) and wait until its health check answers (over HTTPS, trusting ``trust``)."""
    log_path = folder / "serve.log"
    log = open(log_path, "w", encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "lungdet",
        "serve",
        "--checkpoint",
        str(checkpoint),
        "--port",
        "0",
        "--device",
        "cpu",
        *extra,
    ]
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"lungdet serve exited with {process.returncode}:\n{log_path.read_text()}")
        for line in log_path.read_text().splitlines():
            if line.startswith("lungdet serve: open "):
                url = line.split()[3]
        if url is not None:
            try:
                with urllib.request.urlopen(f"{url}static/style.css", timeout=5, context=trust) as response:
                    if response.status == 200:
                        return ServeProcess(url=url, log_path=log_path, process=process)
            except (urllib.error.URLError, ConnectionError):
                pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"lungdet serve did not answer within {START_TIMEOUT_S} s:\n{log_path.read_text()}")


def stop_serve(server: ServeProcess) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def serve_process(serving_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One ``lungdet serve`` for the process and browser tests, uploads limited to 1 MiB (a real RSNA DICOM is about 150 KB)."""
    server = start_serve(
        serving_checkpoint, tmp_path_factory.mktemp("serve"), "--max-upload-mb", str(UPLOAD_LIMIT_MB), "--amp", "none"
    )
    try:
        yield server
    finally:
        stop_serve(server)


@pytest.fixture
def serve_starter() -> Iterator[Callable[..., ServeProcess]]:
    """``start(checkpoint, folder, *options, env=...)`` for a test's own ``lungdet serve``; every one started is stopped afterwards."""
    started: list[ServeProcess] = []

    def start(
        checkpoint: Path,
        folder: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        trust: ssl.SSLContext | None = None,
    ) -> ServeProcess:
        started.append(start_serve(checkpoint, folder, *extra, env=env, trust=trust))
        return started[-1]

    yield start
    for server in started:
        stop_serve(server)
