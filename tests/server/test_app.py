"""Tests for server/app.py in process: the API's replies, one test per kind of bad upload, the token, the page's files.

Every bad upload must get a 4xx JSON error that says what is wrong and what to do, never a
500, and the app must go on answering; ``assert_refused`` checks all of that for each.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.encaps import encapsulate

from lungdet.detection.detect import detect_bytes, detection_json
from lungdet.server.app import STATIC_DIR, create_app
from lungdet.server.schemas import DetectReply, ErrorReply, Health

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def client(serving_detector, upload_limit_bytes: int) -> Iterator[TestClient]:
    with TestClient(create_app(serving_detector, max_upload_bytes=upload_limit_bytes)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def token_client(serving_detector, upload_limit_bytes: int) -> Iterator[TestClient]:
    with TestClient(create_app(serving_detector, max_upload_bytes=upload_limit_bytes, api_token=TOKEN)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def real_dicom(rsna_sample_dir: Path) -> Path:
    return sorted(rsna_sample_dir.glob("*.dcm"))[0]


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def detect(client: TestClient, data: bytes, *, name: str = "xray.dcm", **form: str):
    return client.post("/api/v1/detect", files={"file": (name, data, "application/octet-stream")}, data=form)


def assert_refused(client: TestClient, response, status: int, kind: str, message: str) -> None:
    """A refusal: the status, the error JSON with kind and message, and the app still answering afterwards."""
    assert response.status_code == status, response.text
    body = response.json()
    ErrorReply.model_validate(body)
    assert body["error"]["status"] == status
    assert body["error"]["kind"] == kind
    assert re.search(message, body["error"]["message"]), body["error"]["message"]
    assert client.get("/api/v1/health").status_code == 200


# --- replies ------------------------------------------------------------------------------------


def test_health_says_what_is_loaded(client: TestClient, serving_detector) -> None:
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    health = Health.model_validate(response.json())
    assert health.model_loaded and health.device == "cpu" and health.precision == "fp32"
    assert health.model.checkpoint_sha256 == serving_detector.checkpoint_sha256
    assert health.model.score_threshold == 0.3
    assert health.max_upload_bytes == 2**20 and not health.token_required


def test_detect_returns_what_detect_bytes_gives(client: TestClient, serving_detector, real_dicom: Path) -> None:
    data = real_dicom.read_bytes()
    response = detect(client, data)
    assert response.status_code == 200
    reply = response.json()
    DetectReply.model_validate(reply)
    expected = detection_json(detect_bytes(serving_detector, data), detector_info=serving_detector.info)
    assert {**reply, "elapsed_ms": 0} == {**expected, "elapsed_ms": 0}
    assert "preview" not in reply
    assert reply["image"]["format"] == "dicom" and reply["image"]["view_position"] in ("AP", "PA")


def test_min_confidence_is_a_percentage(client: TestClient, real_dicom: Path) -> None:
    everything = detect(client, real_dicom.read_bytes(), min_confidence="0").json()
    assert everything["min_confidence"] == 0.0
    confidences = [box["confidence"] for box in everything["boxes"]]
    assert len(confidences) >= 2 and confidences == sorted(confidences, reverse=True)
    middle = confidences[len(confidences) // 2]
    some = detect(client, real_dicom.read_bytes(), min_confidence=str(100 * middle)).json()
    assert [box["confidence"] for box in some["boxes"]] == [value for value in confidences if value >= middle]
    assert some["label"] == everything["label"]


def test_include_preview_adds_the_image(client: TestClient, real_dicom: Path) -> None:
    reply = detect(client, real_dicom.read_bytes(), include_preview="true").json()
    DetectReply.model_validate(reply)
    assert reply["preview"]["media_type"] == "image/jpeg" and (
        reply["preview"]["width"],
        reply["preview"]["height"],
    ) == (1024, 1024)


def test_annotate_returns_a_png_named_by_the_upload_id(client: TestClient, real_dicom: Path) -> None:
    data = real_dicom.read_bytes()
    response = client.post("/api/v1/annotate", files={"file": ("x.dcm", data)}, data={"min_confidence": "0"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    identifier = detect(client, data).json()["id"]
    assert response.headers["content-disposition"] == f'attachment; filename="lungdet-{identifier}.png"'
    assert Image.open(io.BytesIO(response.content)).size == (1024, 1024)


def test_colour_png_is_converted_and_noted(client: TestClient) -> None:
    rgb = np.zeros((300, 200, 3), dtype=np.uint8)
    rgb[..., 1] = 180
    response = detect(client, png_bytes(rgb), name="photo.png")
    assert response.status_code == 200
    reply = response.json()
    assert reply["image"]["format"] == "png" and (reply["image"]["width"], reply["image"]["height"]) == (200, 300)
    assert reply["image"]["notes"] == [
        {"kind": "rgb_converted", "reason": "colour image (RGB) converted to grey (luma)"}
    ]


def test_a_file_without_extension_is_read_by_its_content(client: TestClient, real_dicom: Path) -> None:
    response = detect(client, real_dicom.read_bytes(), name="IM000001")
    assert response.status_code == 200 and response.json()["image"]["format"] == "dicom"


# --- bad uploads: one test per kind --------------------------------------------------------------


def test_a_lateral_view_gets_the_gate_s_verdict_and_no_boxes(
    client: TestClient, serving_detector, real_dicom: Path, upload_limit_bytes: int
) -> None:
    dataset = pydicom.dcmread(real_dicom)
    dataset.ViewPosition = "LL"
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    lateral = buffer.getvalue()
    assert_refused(
        client,
        detect(client, lateral),
        422,
        "not_frontal_chest",
        r"^upload [0-9a-f]{16}: not a frontal chest radiograph: ViewPosition LL \(only AP and PA views are frontal\)$",
    )
    # --allow-any-view: the same pixels get the same boxes as the frontal film.
    with TestClient(create_app(serving_detector, max_upload_bytes=upload_limit_bytes, gate=False)) as open_client:
        allowed, frontal = detect(open_client, lateral), detect(open_client, real_dicom.read_bytes())
    assert allowed.status_code == 200 and allowed.json()["boxes"] == frontal.json()["boxes"]


def test_empty_file(client: TestClient) -> None:
    assert_refused(client, detect(client, b""), 400, "empty", r"the file is empty \(0 bytes\)")


def test_not_an_image(client: TestClient) -> None:
    assert_refused(
        client,
        detect(client, b"patient notes\n" * 40, name="notes.dcm"),
        415,
        "not_an_image",
        "lungdet reads DICOM.*PNG and JPEG",
    )


def test_truncated_dicom(client: TestClient, real_dicom: Path) -> None:
    data = real_dicom.read_bytes()
    assert_refused(client, detect(client, data[: len(data) // 2]), 422, "truncated", "file is truncated")


def test_dicom_without_pixel_data(client: TestClient, make_dicom: Callable[..., Path]) -> None:
    data = make_dicom("tags-only", rows=64, columns=64, with_pixels=False).read_bytes()
    assert_refused(client, detect(client, data), 422, "no_pixels", r"has no pixel data \(7FE0,0010\)")


def test_multi_frame_dicom(client: TestClient, make_dicom: Callable[..., Path]) -> None:
    data = make_dicom("cine", rows=64, columns=64, number_of_frames=4).read_bytes()
    assert_refused(client, detect(client, data), 422, "multi_frame", r"is multi-frame \(4 frames\)")


def test_unsupported_transfer_syntax(client: TestClient, make_dicom: Callable[..., Path]) -> None:
    dataset = pydicom.dcmread(make_dicom("video", rows=64, columns=64))
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pydicom decoder exists
    dataset.PixelData = encapsulate([bytes(dataset.PixelData)])
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    assert_refused(
        client, detect(client, buffer.getvalue()), 415, "unsupported_compression", "no pydicom decoder supports"
    )


def test_upload_over_the_limit(client: TestClient, upload_limit_bytes: int) -> None:
    # In process the body is sent at once; tests/server/test_serve_process.py checks it is refused while streaming.
    response = detect(client, b"\x00" * (upload_limit_bytes + 1))
    assert_refused(
        client, response, 413, "too_large", r"over this server's limit of 1,048,576 bytes \(1 MB\).*--max-upload-mb"
    )


def test_decompression_bomb_dicom(client: TestClient, make_dicom: Callable[..., Path]) -> None:
    dataset = pydicom.dcmread(make_dicom("bomb", rows=64, columns=64))
    dataset.Rows = dataset.Columns = 40_000
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    assert_refused(
        client,
        detect(client, buffer.getvalue()),
        413,
        "too_many_pixels",
        r"declares 40000 x 40000 pixels \(1600\.0 megapixels\)",
    )


def test_decompression_bomb_png(client: TestClient) -> None:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        )

    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 9001 * 8))
        + chunk(b"IEND", b"")
    )
    assert_refused(
        client,
        detect(client, bomb, name="bomb.png"),
        413,
        "too_many_pixels",
        r"declares 9000 x 9000 pixels \(81\.0 megapixels\), over the limit of 40",
    )


def test_one_pixel_image(client: TestClient) -> None:
    assert_refused(
        client,
        detect(client, png_bytes(np.zeros((1, 1), np.uint8)), name="dot.png"),
        422,
        "too_small",
        "is 1 x 1 pixels, too small",
    )


# A Windows path ('C:\\x\\y.dcm') never reaches the app: python-multipart keeps only its last part, as browsers send it.
@pytest.mark.parametrize("name", ["../../etc/passwd.dcm", "/var/data/xray.dcm", "x\x00.dcm", "x\x1b[31m.dcm", ".."])
def test_file_name_with_a_path_or_nul(client: TestClient, real_dicom: Path, name: str) -> None:
    # Built by hand: HTTP clients rewrite such names, a hostile one sends them as they are.
    boundary = "lungdetboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\nContent-Type: application/dicom\r\n\r\n'.encode(
            "latin-1"
        )
        + real_dicom.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = client.post(
        "/api/v1/detect", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert_refused(client, response, 400, "bad_file_name", "contains a path separator, '..' or a control character")


# An empty field (what an HTML form sends when left blank) means the default, like leaving it out.
@pytest.mark.parametrize("value", ["abc", "-1", "100.5", "nan", "inf"])
def test_wrong_min_confidence(client: TestClient, real_dicom: Path, value: str) -> None:
    response = detect(client, real_dicom.read_bytes(), min_confidence=value)
    assert_refused(client, response, 422, "invalid_request", "min_confidence must be a number from 0 to 100")


def test_missing_file_field(client: TestClient) -> None:
    response = client.post("/api/v1/detect", data={"min_confidence": "10"})
    assert_refused(client, response, 422, "invalid_request", "no multipart field 'file'.*curl -F file=@")


def test_body_that_is_not_multipart(client: TestClient) -> None:
    response = client.post(
        "/api/v1/detect", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert response.status_code in (400, 422)
    assert response.json()["error"]["message"]
    assert client.get("/api/v1/health").status_code == 200


# --- the token ----------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"])
def test_missing_or_wrong_token(token_client: TestClient, real_dicom: Path, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for response in (
        token_client.post("/api/v1/detect", files={"file": ("x.dcm", real_dicom.read_bytes())}, headers=headers),
        token_client.get("/api/v1/health", headers=headers),
    ):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="lungdet"'
        assert response.json()["error"]["kind"] == "unauthorized"
        assert "Authorization: Bearer TOKEN" in response.json()["error"]["message"]


def test_right_token(token_client: TestClient, real_dicom: Path) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert token_client.get("/api/v1/health", headers=headers).json()["token_required"] is True
    assert (
        token_client.post(
            "/api/v1/detect", files={"file": ("x.dcm", real_dicom.read_bytes())}, headers=headers
        ).status_code
        == 200
    )


def test_page_and_static_files_need_no_token(token_client: TestClient) -> None:
    assert token_client.get("/").status_code == 200
    assert token_client.get("/static/app.js").status_code == 200


# --- privacy, CORS, the page --------------------------------------------------------------------


def test_no_cors_headers(client: TestClient, real_dicom: Path) -> None:
    origin = {"Origin": "https://elsewhere.example"}
    responses = [
        client.get("/api/v1/health", headers=origin),
        client.post("/api/v1/detect", files={"file": ("x.dcm", real_dicom.read_bytes())}, headers=origin),
        client.options("/api/v1/detect", headers={**origin, "Access-Control-Request-Method": "POST"}),
    ]
    for response in responses:
        assert not any(header.lower().startswith("access-control-") for header in response.headers)


def test_reply_carries_no_identifying_tag(client: TestClient, phi_dicom: Path, phi_strings: list[str]) -> None:
    data = phi_dicom.read_bytes()
    assert all(
        value.encode() in data for value in ("Doe^Janet^Phi", "PHI-PID-424242", "19520317")
    )  # the file does carry them
    files = {"file": (phi_dicom.name, data, "application/dicom")}
    replies = [
        client.post("/api/v1/detect", files=files, data={"min_confidence": "0", "include_preview": "true"}),
        client.post("/api/v1/annotate", files=files),
        client.post(
            "/api/v1/detect", files={"file": (phi_dicom.name, data[:3000], "application/dicom")}
        ),  # an error reply too
    ]
    assert [reply.status_code for reply in replies] == [200, 200, 422]
    for reply in replies:
        text = reply.content.decode("latin-1") + str(reply.headers)
        for value in phi_strings:
            assert value.lower() not in text.lower(), value
    described = replies[0].json()["image"]
    assert (described["sex"], described["age"]) == ("F", 51)  # what the issue asks to show: not identifying on its own


def test_page_has_the_stable_hooks_and_a_strict_policy(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    page = response.text
    assert 'id="upload"' in page and 'type="file"' in page and "multiple" in page
    for hook in ('class="result"', 'class="verdict"', 'class="min-confidence"'):
        assert hook in page
    script = client.get("/static/app.js").text
    assert '"box"' in script and "data-confidence" in script
    assert "Not a diagnostic device" in page
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"


def test_page_loads_nothing_from_elsewhere() -> None:
    for path in STATIC_DIR.iterdir():
        text = path.read_text(encoding="utf-8")
        # The SVG namespace is a name, not a download.
        addresses = set(re.findall(r"https?://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not addresses, f"{path.name} refers to {addresses}"


def test_docs_page_is_served_from_local_files(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", docs.text)
    assert assets and not any(asset.startswith("http") for asset in assets)
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    schema = client.get("/openapi.json").json()
    detect_operation = schema["paths"]["/api/v1/detect"]["post"]
    assert "multipart/form-data" in detect_operation["requestBody"]["content"]
    assert detect_operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/DetectReply"
    )
    assert set(detect_operation["responses"]) >= {"200", "400", "401", "413", "415", "422"}


def test_an_onnx_export_serves_the_checkpoints_boxes(
    serving_checkpoint: Path,
    serving_detector,
    client: TestClient,
    real_dicom: Path,
    tmp_path: Path,
    upload_limit_bytes: int,
) -> None:
    # What lungdet serve --checkpoint model.onnx builds: the same app around an export.
    from lungdet.detection.detector import load_detector
    from lungdet.detection.export import export_checkpoint

    exported = tmp_path / "serving.onnx"
    export_checkpoint(serving_checkpoint, exported, fmt="onnx")
    with TestClient(
        create_app(load_detector(exported, device="cpu"), max_upload_bytes=upload_limit_bytes)
    ) as onnx_client:
        health = Health.model_validate(onnx_client.get("/api/v1/health").json())
        assert health.model.format == "onnx" and health.precision == "fp32"
        assert health.model.checkpoint_sha256 == serving_detector.checkpoint_sha256
        replies = [detect(each, real_dicom.read_bytes(), min_confidence="0").json() for each in (client, onnx_client)]
    ours, theirs = (reply["boxes"] for reply in replies)
    assert replies[0]["label"]["name"] == replies[1]["label"]["name"] and len(ours) == len(theirs) >= 2
    for box, other in zip(ours, theirs, strict=True):
        assert max(abs(box[key] - other[key]) for key in ("x", "y", "width", "height")) <= 1.0
        assert abs(box["confidence"] - other["confidence"]) <= 1e-3
