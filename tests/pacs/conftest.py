"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the PACS tests, on a free loopback port with its own storage.

Missing, the tests that need it skip saying how to install it; under CI (``CI`` set) they fail,
since ``.ci/run`` installs it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

SERVE_FOLDERS = "libServeFolders.so"  # Debian's orthanc package ships it beside the DICOMweb plugin's folder
PLUGIN_FOLDERS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")
START_TIMEOUT_S = 30
INSTALL = "apt-get install orthanc orthanc-dicomweb"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _dot_free(uri: str, path: Path) -> Path:
    if "." in str(path):
        raise ValueError(
            f"ServeFolders would serve {uri} from {path}, whose path has a dot: the plugin would take what follows it as every file's extension. "
            "Serve a link to it from a folder without dots (pytest's tmp_path)"
        )
    return path


class Orthanc:
    """One Orthanc process: ``start()``, ``stop()`` (its storage stays, as on a real restart), REST and DICOMweb URLs."""

    def __init__(
        self,
        binary: str,
        plugin: str,
        folder: Path,
        *,
        users: dict[str, str] | None = None,
        serve: dict[str, Path] | None = None,
    ) -> None:
        """``serve`` maps URIs to folders for Debian's ServeFolders plugin (``{"/ohif": build}``), loaded only when given."""
        self.binary, self.folder = binary, folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.users = users or {}
        config = {
            "Name": "lungdet-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        if serve:
            config["Plugins"].append(str(Path(plugin).with_name(SERVE_FOLDERS)))
            config["ServeFolders"] = {
                # The plugin takes a file's extension from the last dot of its whole path and sends
                # files it does not know as application/octet-stream. The extension "" (no dot
                # anywhere in the path) as HTML lets a web app's route (OHIF's /viewer) be a file.
                "Extensions": {"": "text/html"},
                # Let the browser keep what it fetched: one browser opens several studies, and
                # each load would otherwise fetch the viewer's scripts again (17 MB for its main bundle alone).
                "AllowCache": True,
                "Folders": {uri: str(_dot_free(uri, path)) for uri, path in serve.items()},
            }
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "orthanc.log", "a")
        self.process = subprocess.Popen(
            [self.binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.process.returncode}:\n{(self.folder / 'orthanc.log').read_text()[-2000:]}"
                )
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
            tags.append(
                {
                    key: str(simplified.get(key, ""))
                    for key in ("SOPInstanceUID", "StudyInstanceUID", "Modality", "SeriesDescription", "SOPClassUID")
                }
            )
        return tags

    def file(self, sop_instance_uid: str) -> bytes:
        [match] = [
            i for i in self.get("/instances?expand") if i["MainDicomTags"].get("SOPInstanceUID") == sop_instance_uid
        ]
        return self._request(f"/instances/{match['ID']}/file")


def _orthanc_parts() -> tuple[str, str]:
    binary = shutil.which("Orthanc")
    plugin = next(
        (
            str(Path(folder) / "libOrthancDicomWeb.so")
            for folder in PLUGIN_FOLDERS
            if (Path(folder) / "libOrthancDicomWeb.so").is_file()
        ),
        None,
    )
    if binary is None or plugin is None:
        skip_or_fail(f"Orthanc with its DICOMweb plugin is not installed: {INSTALL}")
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


@pytest.fixture(scope="session")
def ohif_build() -> Path:
    """The OHIF viewer build re-rooted at /ohif (tests/pacs/ohif.py), prepared once into ~/.cache/lungdet."""
    from tests.pacs.ohif import ohif_tarball, prepare_ohif

    return prepare_ohif(ohif_tarball())


@pytest.fixture(scope="module")
def orthanc_with_ohif(tmp_path_factory: pytest.TempPathFactory, ohif_build: Path) -> Iterator[Orthanc]:
    """An Orthanc that also serves the OHIF viewer at ``{url}/ohif`` (``{url}/ohif/viewer?StudyInstanceUIDs=...``).

    One per module: a new port is a new origin, whose cold browser cache costs OHIF seconds.
    """
    tmp_path = tmp_path_factory.mktemp("orthanc-ohif")
    binary, plugin = _orthanc_parts()
    if not Path(plugin).with_name(SERVE_FOLDERS).is_file():
        skip_or_fail(f"Orthanc's ServeFolders plugin is not beside {plugin}: apt-get install orthanc")
    (tmp_path / "orthanc_ohif").mkdir()
    # The build's cache path has a dot (~/.cache); ServeFolders needs one without (Orthanc._dot_free).
    served = tmp_path / "ohif"
    served.symlink_to(ohif_build, target_is_directory=True)
    server = Orthanc(binary, plugin, tmp_path / "orthanc_ohif", serve={"/ohif": served})
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)


# --- Orthanc's DICOM side, for tests/pacs/test_dimse.py (the C-STORE node): a separate block, the class above unchanged ---

from collections.abc import Callable  # noqa: E402  (kept in this block, apart from the imports above)


class OrthancWithDicom(Orthanc):
    """An Orthanc that also speaks DICOM: a Storage SCP as AE ``ORTHANC`` on ``dicom_port``, and an SCU to its ``modalities``.

    ``modalities`` is Orthanc's ``DicomModalities``: name -> (AE title, host, port).
    """

    AE_TITLE = "ORTHANC"

    def __init__(self, binary: str, plugin: str, folder: Path, *, modalities: dict[str, tuple[str, str, int]]) -> None:
        super().__init__(binary, plugin, folder)
        self.dicom_port = free_port()
        config = json.loads(self.config.read_text())
        config.update(
            {
                "DicomServerEnabled": True,
                "DicomAet": self.AE_TITLE,
                "DicomPort": self.dicom_port,
                "DicomModalities": {name: list(entry) for name, entry in modalities.items()},
            }
        )
        self.config.write_text(json.dumps(config))

    def store_to_modality(self, modality: str, instance_ids: list[str]) -> dict:
        """C-STORE instances to one of ``modalities`` (REST ``POST /modalities/{name}/store``; Orthanc answers when the store is done)."""
        return json.loads(self._request(f"/modalities/{modality}/store", json.dumps(instance_ids).encode()))


@pytest.fixture
def orthanc_dicom(tmp_path: Path) -> Iterator[Callable[..., OrthancWithDicom]]:
    """``start(modalities) -> OrthancWithDicom``, started; every one is stopped afterwards, whatever happens."""
    started: list[OrthancWithDicom] = []

    def start(modalities: dict[str, tuple[str, str, int]]) -> OrthancWithDicom:
        folder = tmp_path / f"orthanc_dicom_{len(started)}"
        folder.mkdir()
        server = OrthancWithDicom(*_orthanc_parts(), folder, modalities=modalities)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop(kill=True)
