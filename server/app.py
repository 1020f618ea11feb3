"""The FastAPI app behind ``lungdet serve``: a page and a JSON API for one X-ray at a time.

Routes parse and check the request, call :mod:`lungdet.detection.detect` (the code ``lungdet predict
--json`` runs) in the inference thread, and shape the reply:

- ``GET /``: the page (static files beside this module; no CDN, works offline);
- ``POST /api/v1/detect``: multipart ``file`` (+ ``min_confidence`` 0-100, ``include_preview``) -> JSON;
- ``POST /api/v1/annotate``: the same upload -> the X-ray with its boxes drawn, as PNG;
- ``GET /api/v1/health``: model loaded, device, version;
- ``/docs``: FastAPI's OpenAPI page (served from local files).

Uploads are read into memory and never written under the client's name; replies and log lines
name an upload by the first 16 hex digits of its SHA-256, and carry no identifying DICOM tag.
Inference runs off the event loop (decoding in worker threads, the model in one batching thread,
:mod:`lungdet.server.batcher`), so health checks answer while it works.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lungdet import lungdet_version
from lungdet.data_tools.image_io import DEFAULT_MAX_PIXELS
from lungdet.detection.detect import (
    NOTICE,
    Detection,
    annotated_png,
    detect_bytes,
    detection_json,
    preview_jpeg,
    upload_id,
)
from lungdet.detection.detector import Detector
from lungdet.errors import ImageReadError
from lungdet.server.batcher import DEFAULT_MAX_BATCH, Batcher
from lungdet.server.guard import RequestGuard, error_body
from lungdet.server.schemas import DetectReply, ErrorReply, Health

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_MB = 64
LOGGER = logging.getLogger("lungdet.serve")

# What a client should do differs by kind: send something else (415), fix this file (422), send less (413).
STATUS_BY_KIND = {
    "empty": 400,
    "bad_file_name": 400,
    "not_an_image": 415,
    "not_dicom": 415,
    "unsupported_compression": 415,
    "too_many_pixels": 413,
}
UNPROCESSABLE = 422
# The page's own headers: everything from this server, nothing inline, no framing by other sites.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorReply, "description": description}
    for status, description in {
        400: "empty file, a file name with a path or control characters, or a body that is not multipart",
        401: "a token is set and the request did not carry it",
        413: "the upload is over --max-upload-mb, or the image declares more pixels than the limit",
        415: "not DICOM, PNG or JPEG, or a DICOM compression that cannot be decoded here",
        422: "a damaged, truncated, multi-frame or pixel-less DICOM, an image under 32 px, or a wrong min_confidence",
    }.items()
}

# Module level, not inside create_app: with postponed annotations FastAPI resolves these names in the module's globals.
MinConfidence = Annotated[
    float | None,
    Form(
        ge=0, le=100, description="hide boxes below this confidence, percent (default: the checkpoint's tuned cut-off)"
    ),
]
Upload = Annotated[UploadFile, File(description="one chest X-ray: DICOM (any extension or none), PNG or JPEG")]
IncludePreview = Annotated[bool, Form(description="add the X-ray as a JPEG (base64) for drawing the boxes over it")]


class UploadRejected(Exception):
    """A request refused before the model runs, with its status, kind and message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def check_file_name(name: str | None) -> None:
    """Refuse a client file name carrying a path or control characters. The name is never used, but such a name means a confused or hostile client."""
    if not name:
        return
    if (
        any(separator in name for separator in ("/", "\\"))
        or name in (".", "..")
        or any(ord(character) < 32 for character in name)
    ):
        raise UploadRejected(
            400,
            "bad_file_name",
            "the upload's file name contains a path separator, '..' or a control character; send the file under its plain name (e.g. xray.dcm)",
        )


def status_for(error: ImageReadError) -> int:
    """The HTTP status for an upload that could not be read: 400, 413 or 415 by its ``kind``, else 422."""
    return STATUS_BY_KIND.get(error.kind, UNPROCESSABLE)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for error in errors:
        field = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query"))
        if field == "file" and error.get("type") == "missing":
            parts.append(
                "the request has no multipart field 'file'; send the X-ray as form field 'file' (curl -F file=@xray.dcm URL)"
            )
        elif field == "min_confidence":
            parts.append(f"min_confidence must be a number from 0 to 100 (percent), got {error.get('input')!r}")
        else:
            parts.append(f"{field or 'request'}: {error.get('msg', 'invalid')} (got {error.get('input')!r})")
    return "; ".join(parts)


def create_app(
    detector: Detector,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20,
    api_token: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_batch: int = DEFAULT_MAX_BATCH,
    gate: bool = True,
) -> FastAPI:
    """The app for one loaded ``detector``.

    ``max_upload_bytes`` bounds a request body (checked as it streams in), ``api_token`` (if
    given) is required as ``Authorization: Bearer`` on every ``/api/`` route,
    ``max_pixels`` bounds the image an upload may declare, and ``max_batch`` the images of
    concurrent requests that run through the model together (see :mod:`lungdet.server.batcher`).
    ``gate`` refuses, with 422 and kind 'not_frontal_chest', a DICOM whose tags say it is not a frontal chest
    radiograph (:mod:`lungdet.data_tools.gate`); False is ``--allow-any-view``.
    """
    batcher = Batcher(detector, max_batch=max_batch)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        batcher.close()

    app = FastAPIOffline(
        title="lungdet",
        version=lungdet_version(),
        description="Lung-opacity boxes on one chest X-ray at a time (DICOM, PNG or JPEG). " + NOTICE,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(RequestGuard, max_body_bytes=max_upload_bytes, api_token=api_token)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_error_handlers(app)
    _add_page_and_health(app, detector, max_upload_bytes=max_upload_bytes, api_token=api_token)
    _add_detection_routes(app, detector, batcher, max_pixels=max_pixels, gate=gate)
    return app


def _refusal(status: int, kind: str, message: str) -> Response:
    """An error reply: ``{"error": {"status", "kind", "message"}}`` with ``status``."""
    return Response(error_body(status, kind, message), status_code=status, media_type="application/json")


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure as one JSON error reply: a refused upload, an invalid request, an HTTP error, a crash."""

    @app.exception_handler(UploadRejected)
    async def on_rejected(_: Request, error: UploadRejected) -> Response:
        return _refusal(error.status, error.kind, error.message)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, error: RequestValidationError) -> Response:
        return _refusal(UNPROCESSABLE, "invalid_request", _validation_message(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, error: StarletteHTTPException) -> Response:
        message = str(error.detail)
        if error.status_code == 400 and "parsing the body" in message:
            message = "the request body is not valid multipart/form-data; send the X-ray as form field 'file' (curl -F file=@xray.dcm URL)"
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return _refusal(error.status_code, kinds.get(error.status_code, "bad_request"), message)

    @app.exception_handler(Exception)
    async def on_crash(_: Request, error: Exception) -> Response:
        LOGGER.exception("internal error (%s); the server goes on serving", type(error).__name__)
        return _refusal(
            500,
            "internal_error",
            "lungdet hit an internal error on this request; the server goes on serving, and its log has the details",
        )


def _add_page_and_health(app: FastAPI, detector: Detector, *, max_upload_bytes: int, api_token: str | None) -> None:
    """``GET /`` (the page) and ``GET /api/v1/health``."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    @app.get("/api/v1/health", response_model=Health, responses=ERROR_RESPONSES)
    async def health() -> dict[str, Any]:
        """Whether the model is loaded, on which device, and this server's limits."""
        return {
            "status": "ok",
            "model_loaded": True,  # the app is built around a loaded detector
            "device": detector.device,
            "precision": detector.precision_name,
            "version": lungdet_version(),
            "model": detector.info,
            "max_upload_bytes": max_upload_bytes,
            "token_required": api_token is not None,
            "notice": NOTICE,
        }


def _add_detection_routes(
    app: FastAPI, detector: Detector, batcher: Batcher, *, max_pixels: int, gate: bool = True
) -> None:
    """``POST /api/v1/detect`` (JSON) and ``POST /api/v1/annotate`` (PNG): one uploaded X-ray through ``batcher``."""

    async def run_detection(file: UploadFile) -> Detection:
        check_file_name(file.filename)
        data = await file.read()
        try:
            # Decoding in a worker thread and the model in the batcher's: the event loop stays free for health checks.
            return await run_in_threadpool(detect_bytes, batcher, data, max_pixels=max_pixels, gate=gate)
        except ImageReadError as error:
            LOGGER.info("rejected %s: %d %s", upload_id(data), status_for(error), error.kind)
            raise UploadRejected(status_for(error), error.kind, str(error)) from None

    @app.post(
        "/api/v1/detect", response_model=DetectReply, response_model_exclude_unset=True, responses=ERROR_RESPONSES
    )
    async def detect(
        file: Upload, min_confidence: MinConfidence = None, include_preview: IncludePreview = False
    ) -> dict[str, Any]:
        """Lung-opacity boxes for one X-ray, with an image-level verdict and the RSNA PredictionString."""
        detection = await run_detection(file)
        reply = detection_json(
            detection,
            detector_info=detector.info,
            min_confidence=None if min_confidence is None else min_confidence / 100,
        )
        if include_preview:
            # Encoding a 1024 px JPEG takes milliseconds: off the event loop, like the decoding.
            reply["preview"] = await run_in_threadpool(preview_jpeg, detection.image)
        probability = reply["label"]["probability"]
        LOGGER.info(
            "detect %s: %s %dx%d, %d boxes >= %g%%, %s (%s), %.0f ms",
            detection.upload_id,
            detection.image.format,
            detection.image.width,
            detection.image.height,
            len(reply["boxes"]),
            reply["min_confidence"],
            reply["label"]["name"],
            "no image-level probability" if probability is None else f"probability {probability:.2f}%",
            detection.elapsed_ms,
        )
        return reply

    @app.post(
        "/api/v1/annotate",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "the X-ray with its boxes and the notice drawn in"},
            **ERROR_RESPONSES,
        },
    )
    async def annotate(file: Upload, min_confidence: MinConfidence = None) -> Response:
        """The X-ray with the boxes at or above ``min_confidence`` drawn over it, as a PNG to download."""
        detection = await run_detection(file)
        cut_off = detector.score_threshold if min_confidence is None else min_confidence / 100
        png = await run_in_threadpool(annotated_png, detection, min_confidence=cut_off)
        LOGGER.info("annotate %s: %d bytes of PNG", detection.upload_id, len(png))
        return Response(
            png,
            media_type="image/png",
            headers={"Content-Disposition": f'attachment; filename="lungdet-{detection.upload_id}.png"'},
        )
