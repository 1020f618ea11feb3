"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the PACS tests, on a free loopback port with its own storage.

Missing, the tests that need it skip saying how to install it; under CI (``CI`` set) they fail,
since ``.ci/run`` installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

PLUGIN_FOLDERS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")
START_TIMEOUT_S = 30
INSTALL = "apt-get install orthanc orthanc-dicomweb"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Orthanc:
    """One Orthanc process: ``start()``, ``stop()`` (its storage stays, as on a real restart), REST and DICOMweb URLs."""

    def __init__(self, binary: str, plugin: str, folder: Path, *, users: dict[str, str] | None = None) -> None:
        self.binary, self.folder = binary, folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.users = users or {}
        config = {
            "Name": "lungdet-test", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users), "RegisteredUsers": self.users,
            "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "orthanc.log", "a")
        self.process = subprocess.Popen([self.binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_S} s")

    def stop(self, *, kill: bool = False) -> None:
        """Stop Orthanc as a service stop would (SIGTERM: it closes its database cleanly), or at once with ``kill``."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def _request(self, path: str, data: bytes | None = None) -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", data=data, method="POST" if data is not None else "GET")
        if self.users:
            import base64

            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def get(self, path: str) -> object:
        return json.loads(self._request(path))

    def upload(self, data: bytes) -> str:
        """Store one DICOM file through the REST API; returns Orthanc's instance id."""
        return json.loads(self._request("/instances", data))["ID"]

    def instance_tags(self) -> list[dict[str, str]]:
        """Every stored instance's main tags: SOPInstanceUID, StudyInstanceUID, Modality, SeriesDescription."""
        tags = []
        for instance in self.get("/instances?expand"):
            simplified = self.get(f"/instances/{instance['ID']}/simplified-tags")
            tags.append({key: str(simplified.get(key, "")) for key in ("SOPInstanceUID", "StudyInstanceUID", "Modality", "SeriesDescription", "SOPClassUID")})
        return tags

    def file(self, sop_instance_uid: str) -> bytes:
        [match] = [i for i in self.get("/instances?expand") if i["MainDicomTags"].get("SOPInstanceUID") == sop_instance_uid]
        return self._request(f"/instances/{match['ID']}/file")


def _orthanc_parts() -> tuple[str, str]:
    binary = shutil.which("Orthanc")
    plugin = next((str(Path(folder) / "libOrthancDicomWeb.so") for folder in PLUGIN_FOLDERS if (Path(folder) / "libOrthancDicomWeb.so").is_file()), None)
    if binary is None or plugin is None:
        reason = f"Orthanc with its DICOMweb plugin is not installed: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return binary, plugin


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A fresh, empty Orthanc for one test, stopped afterwards whatever happens."""
    (tmp_path / "orthanc").mkdir()
    server = Orthanc(*_orthanc_parts(), tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)  # a clean stop takes seconds; this storage is thrown away


@pytest.fixture
def orthanc_with_users(tmp_path: Path) -> Iterator[Orthanc]:
    """An Orthanc that wants basic authentication as user 'lungdet', password 'node-secret'."""
    (tmp_path / "orthanc_auth").mkdir()
    server = Orthanc(*_orthanc_parts(), tmp_path / "orthanc_auth", users={"lungdet": "node-secret"})
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)
