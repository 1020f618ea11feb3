"""Tests of ``lungdet serve`` as a real process and of the app under a real uvicorn: start-up, uploads refused while they
stream in, the log, and health checks answered while a prediction runs."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import urllib.request
import uuid
from pathlib import Path

import pytest

from lungdet.detection.detect import upload_id
from lungdet.errors import LungdetError
from lungdet.server.cli import get_args_parser, main

CHUNK = 64 * 1024


def multipart(data: bytes, *, name: str, fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        for key, value in (fields or {}).items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\nContent-Type: application/dicom\r\n\r\n'.encode()
        + data
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(
    url: str, path: str, data: bytes, *, name: str = "x.dcm", fields: dict[str, str] | None = None
) -> tuple[int, bytes]:
    body, content_type = multipart(data, name=name, fields=fields)
    request = urllib.request.Request(
        f"{url}{path.lstrip('/')}", data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def host_port(url: str) -> tuple[str, int]:
    address = url.removeprefix("http://").rstrip("/")
    host, port = address.rsplit(":", 1)
    return host, int(port)


def read_response(connection: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the one HTTP response on ``connection``, read up to its Content-Length."""
    received = b""
    while b"\r\n\r\n" not in received:
        piece = connection.recv(65536)
        assert piece, f"connection closed before a full response head: {received!r}"
        received += piece
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    )
    while len(body) < length:
        piece = connection.recv(65536)
        assert piece, "connection closed before the whole response body"
        body += piece
    return int(head.split()[1]), json.loads(body[:length])


# --- start-up -----------------------------------------------------------------------------------


def test_startup_prints_the_url_the_model_and_the_notice(serve_process) -> None:
    log = serve_process.log()
    assert (
        f"lungdet serve: open {serve_process.url}   (API: POST {serve_process.url}api/v1/detect, docs: {serve_process.url}docs)"
        in log
    )
    assert (
        "model fasterrcnn_mobilenet_v3_large_fpn at 128 px on cpu (fp32), cut-off 0.3; uploads up to 1 MiB; no token"
        in log
    )
    assert "not a diagnostic device" in log
    assert serve_process.url.startswith("http://127.0.0.1:")  # loopback unless asked otherwise
    assert "warning" not in log.split("Uvicorn")[0].lower()


def test_open_host_without_token_warns(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lungdet",
            "serve",
            "--checkpoint",
            str(tmp_path / "missing.pt"),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        "warning: listening on 0.0.0.0 without --api-token: anyone on the network can use this server" in result.stderr
    )
    assert "missing.pt: checkpoint not found" in result.stderr


def test_busy_port_is_refused_before_loading_the_model(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = get_args_parser().parse_args(
            ["--checkpoint", str(tmp_path / "never-read.pt"), "--port", str(taken.getsockname()[1])]
        )
        with pytest.raises(
            LungdetError,
            match=r"cannot listen on 127\.0\.0\.1:\d+ .*pick another port with --port \(0 for any free one\)",
        ):
            main(args)


def test_missing_server_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    args = get_args_parser().parse_args(["--checkpoint", str(tmp_path / "c.pt")])
    with pytest.raises(
        LungdetError,
        match=r"needs FastAPI and uvicorn, which are not installed \(uvicorn is missing\); .*pip install 'lungdet\[serve\]'",
    ):
        main(args)


# --- uploads over the limit, refused as they stream in ------------------------------------------


def test_declared_oversize_gets_413_before_any_body_is_sent(serve_process) -> None:
    with socket.create_connection(host_port(serve_process.url), timeout=30) as connection:
        head = (
            "POST /api/v1/detect HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {50 * 2**20}\r\n\r\n"
        )
        connection.sendall(head.encode())  # and not one byte of the 50 MiB
        status, body = read_response(connection)
    assert status == 413 and body["error"]["kind"] == "too_large"
    assert "declares 52,428,800 bytes, over this server's limit of 1,048,576 bytes" in body["error"]["message"]


def test_streamed_oversize_gets_413_while_the_upload_is_unfinished(serve_process, upload_limit_bytes: int) -> None:
    """A chunked upload (no Content-Length) that passes the limit, then pauses without ending: the 413 must come now.

    A server that checked the size after reading the whole body would still be waiting for its end.
    """
    with socket.create_connection(host_port(serve_process.url), timeout=30) as connection:
        connection.sendall(
            b"POST /api/v1/detect HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        # A valid start of a multipart upload, so that the server reads on into the file's bytes.
        opening = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.dcm"\r\n\r\n'
        connection.sendall(f"{len(opening):x}\r\n".encode() + opening + b"\r\n")
        chunk = f"{CHUNK:x}\r\n".encode() + b"\x00" * CHUNK + b"\r\n"
        for _ in range(upload_limit_bytes // CHUNK + 2):  # just past the limit; the terminating chunk is never sent
            connection.sendall(chunk)
        status, body = read_response(connection)
    assert status == 413 and "passed 1,048,576 bytes while streaming in" in body["error"]["message"]


def test_a_client_still_uploading_reads_its_413_rather_than_a_reset(serve_process, upload_limit_bytes: int) -> None:
    """An ordinary client sends all of a too-large body before it reads the reply: the server drops the rest instead of resetting."""
    for _ in range(3):
        status, body = post(serve_process.url, "/api/v1/detect", b"\x00" * (upload_limit_bytes * 3 // 2))
        assert status == 413 and json.loads(body)["error"]["kind"] == "too_large"


def test_server_goes_on_after_refusals(serve_process, rsna_sample_dir: Path) -> None:
    status, body = post(serve_process.url, "/api/v1/detect", next(rsna_sample_dir.glob("*.dcm")).read_bytes())
    assert status == 200 and json.loads(body)["image"]["format"] == "dicom"


# --- the log ------------------------------------------------------------------------------------


def test_log_names_uploads_by_hash_and_holds_no_phi(serve_process, phi_dicom: Path, phi_strings: list[str]) -> None:
    data = phi_dicom.read_bytes()
    assert (
        post(serve_process.url, "/api/v1/detect", data, name=phi_dicom.name, fields={"include_preview": "true"})[0]
        == 200
    )
    assert post(serve_process.url, "/api/v1/annotate", data, name=phi_dicom.name)[0] == 200
    assert post(serve_process.url, "/api/v1/detect", data[:5000], name=phi_dicom.name)[0] == 422
    log = serve_process.log()
    assert f"detect {upload_id(data)}: dicom 1024x1024" in log
    assert f"annotate {upload_id(data)}: " in log
    assert f"rejected {upload_id(data[:5000])}: 422 truncated" in log
    for value in phi_strings:
        assert value.lower() not in log.lower(), value


# --- concurrency --------------------------------------------------------------------------------


class GatedDetector:
    """The real detector, except that a prediction waits for ``gate``: a prediction that is running for as long as the test wants."""

    def __init__(self, detector) -> None:
        self.detector = detector
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.detector, name)

    def predict_batch(self, images, tags=None):
        self.entered.set()
        if not self.gate.wait(timeout=60):
            raise TimeoutError("the test never opened the gate")
        return self.detector.predict_batch(images, tags)


def test_health_answers_while_a_prediction_runs(serving_detector, rsna_sample_dir: Path) -> None:
    import uvicorn

    from lungdet.server.app import create_app

    gated = GatedDetector(serving_detector)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        server = uvicorn.Server(uvicorn.Config(create_app(gated), log_level="warning"))
        serving = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        serving.start()
        try:
            replies: list[tuple[int, bytes]] = []
            data = next(rsna_sample_dir.glob("*.dcm")).read_bytes()
            uploading = threading.Thread(target=lambda: replies.append(post(url, "/api/v1/detect", data)))
            for _ in range(600):  # wait for uvicorn to start listening
                try:
                    http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=1).request(
                        "GET", "/static/style.css"
                    )
                    break
                except OSError:
                    threading.Event().wait(0.05)
            uploading.start()
            assert gated.entered.wait(timeout=60), "the prediction never started"
            with urllib.request.urlopen(f"{url}api/v1/health", timeout=30) as response:
                assert response.status == 200 and json.loads(response.read())["model_loaded"] is True
            assert replies == []  # the prediction is still held at the gate
            gated.gate.set()
            uploading.join(timeout=60)
            assert replies and replies[0][0] == 200
        finally:
            gated.gate.set()
            server.should_exit = True
            serving.join(timeout=30)


def test_listening_socket_says_tcp_so_replies_are_not_held_back() -> None:
    """asyncio turns Nagle's algorithm off on accepted connections only when the listening socket's protocol is TCP;
    with the default protocol 0 each reply on a kept-alive connection waited 40 ms for the client's delayed ACK."""
    from lungdet.server.cli import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_https_serves_the_page_and_the_gate_over_tls(serving_checkpoint: Path, serve_starter, tmp_path: Path) -> None:
    """--tls-cert/--tls-key: the page over HTTPS, checked against the test CA; plain HTTP gets no page; a CT slice its verdict."""
    import ssl

    from pydicom.data import get_testdata_file

    from tests.tls_certs import make_pki

    pki = make_pki(tmp_path / "pki", ("serve",))
    trust = ssl.create_default_context(cafile=str(pki.ca))
    server = serve_starter(
        serving_checkpoint,
        tmp_path,
        "--tls-cert",
        str(pki.cert("serve")),
        "--tls-key",
        str(pki.key("serve")),
        trust=trust,
    )
    assert server.url.startswith("https://127.0.0.1:")
    with urllib.request.urlopen(server.url, timeout=30, context=trust) as response:
        assert response.status == 200 and b"Not a diagnostic device" in response.read()
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # the machine's CAs did not sign it
        urllib.request.urlopen(server.url, timeout=30, context=ssl.create_default_context())
    host, port = server.url.removeprefix("https://").rstrip("/").rsplit(":", 1)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        plain = http.client.HTTPConnection(host, int(port), timeout=10)
        plain.request("GET", "/")
        plain.getresponse().read()

    ct = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    body, content_type = multipart(ct, name="ct.dcm")
    request = urllib.request.Request(f"{server.url}api/v1/detect", data=body, headers={"Content-Type": content_type})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60, context=trust)
    error = json.loads(refused.value.read())["error"]
    assert refused.value.code == 422 and error["kind"] == "not_frontal_chest"
    assert error["message"].endswith(
        "not a frontal chest radiograph: Modality CT (lungdet's models were made for CR, DX or DR chest radiographs)"
    )


def test_https_needs_both_files_and_a_private_key(tmp_path: Path) -> None:
    parser = get_args_parser()
    with pytest.raises(LungdetError, match="HTTPS needs both --tls-cert CERT and --tls-key KEY"):
        main(parser.parse_args(["--checkpoint", "x.pt", "--tls-cert", "c.pem"]))
    key = tmp_path / "k.pem"
    key.write_text("secret")
    key.chmod(0o640)
    with pytest.raises(LungdetError, match=r"the private key can be read by other users \(mode 640\)"):
        main(parser.parse_args(["--checkpoint", "x.pt", "--tls-cert", str(key), "--tls-key", str(key)]))
