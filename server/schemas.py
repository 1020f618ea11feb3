"""The shapes of every reply, as Pydantic models, so that ``/docs`` shows them and a reply that drifts fails validation.

The replies themselves are built by :func:`lungdet.detection.detect.detection_json` (shared with
``lungdet predict --json``); these models check them on the way out. ``extra="forbid"``
makes a field added there and not here an error in the tests rather than a silent difference.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Label(_Strict):
    """The image-level verdict: whether the X-ray has a lung opacity, and how sure the model is."""

    name: Literal["Lung Opacity", "No Lung Opacity"]
    confidence: float | None = Field(
        ge=0,
        le=100,
        description="with an image head: confidence in the named label, percent; null without one (no percentage is claimed)",
    )
    probability: float | None = Field(
        ge=0,
        le=100,
        description="with an image head: the probability that the image has an opacity, percent; null without one",
    )
    calibrated: bool = Field(
        description="whether that probability is Platt-scaled on validation images (checkpoints trained since lungdet computed it)"
    )
    source: Literal["image_head", "max_box"] = Field(
        description="'image_head': the model's image-level output; 'max_box': whether a box reached the cut-off (checkpoints without an image head)"
    )


class BoundingBox(_Strict):
    """A box as fractions of the image's width and height, measured from its top-left corner."""

    left: float = Field(description="fraction of the image width")
    top: float = Field(description="fraction of the image height")
    width: float = Field(description="fraction of the image width")
    height: float = Field(description="fraction of the image height")


class Geometry(_Strict):
    """Where a custom label lies in the image."""

    bounding_box: BoundingBox


class CustomLabel(_Strict):
    """One box in the cloud custom-labels shape: confidence in percent, geometry in fractions of the image."""

    name: Literal["Lung Opacity"]
    confidence: float = Field(ge=0, le=100, description="percent")
    geometry: Geometry


class Box(_Strict):
    """One lung-opacity box in the original image's pixels, with its confidence in [0, 1]."""

    x: float = Field(description="left edge, original image pixels")
    y: float = Field(description="top edge, original image pixels")
    width: float = Field(ge=0, description="original image pixels")
    height: float = Field(ge=0, description="original image pixels")
    confidence: float = Field(ge=0, le=1)


class Note(_Strict):
    """One change made to the image before the model read it, and why."""

    kind: str = Field(
        description="'rgb_converted', 'monochrome1_inverted', 'high_bit_depth_rescaled' or 'exif_rotated', as convert reports them"
    )
    reason: str


class ImageInfo(_Strict):
    """The uploaded image: format, size in pixels, DICOM view position, sex and age, and what was done to it."""

    format: Literal["dicom", "png", "jpeg"]
    width: int
    height: int
    view_position: str | None = Field(description="DICOM ViewPosition ('AP'/'PA'); null for PNG/JPEG or when absent")
    sex: str | None = Field(description="DICOM PatientSex; null for PNG/JPEG or when absent")
    age: int | None = Field(description="DICOM PatientAge in years; null for PNG/JPEG or when absent")
    notes: list[Note] = Field(
        description="what was done to the image on the way, e.g. a colour image converted to grey"
    )


class ModelInfo(_Strict):
    """The loaded model: its architecture, format, checkpoint SHA-256 and the cut-offs tuned on validation."""

    architecture: str
    format: Literal["checkpoint", "onnx", "torchscript"] = Field(
        description="what was loaded: a lungdet checkpoint, or an export from lungdet export"
    )
    image_size: int = Field(description="the model's square input side, pixels")
    checkpoint_sha256: str
    score_threshold: float = Field(
        ge=0, le=1, description="the box cut-off tuned on validation; without an image head the verdict uses it"
    )
    image_threshold: float | None = Field(
        ge=0,
        le=1,
        description="with an image head: its probability cut-off tuned on validation, which the verdict uses; null without one",
    )
    image_metadata: bool = Field(
        description="whether the image-level probability uses the file's view position, sex and age (model.image_metadata)"
    )
    image_calibrated: bool = Field(
        description="whether the image-level probability is Platt-scaled on validation images"
    )


class Preview(_Strict):
    """The X-ray as the model read it, as a base64 JPEG for drawing the boxes over."""

    media_type: Literal["image/jpeg"]
    width: int
    height: int
    data: str = Field(description="base64; stretch it over image.width x image.height to overlay the boxes")


class DetectReply(_Strict):
    """The reply to ``POST /api/v1/detect``: the boxes and the image-level verdict for one X-ray."""

    id: str = Field(description="first 16 hex digits of the upload's SHA-256")
    label: Label
    custom_labels: list[CustomLabel] = Field(description="one per box, in the cloud custom-labels shape")
    boxes: list[Box] = Field(description="most confident first; the same boxes as prediction_string")
    prediction_string: str = Field(description="RSNA/Kaggle groups 'confidence x y width height', original pixels")
    image: ImageInfo
    model: ModelInfo
    min_confidence: float = Field(ge=0, le=100, description="the box cut-off applied, percent")
    elapsed_ms: float
    notice: str
    preview: Preview | None = Field(default=None, description="only with include_preview=true")


class Health(_Strict):
    """The reply to ``GET /api/v1/health``: the loaded model, its device and precision, and this server's limits."""

    status: Literal["ok"]
    model_loaded: bool
    device: str
    precision: str
    version: str
    model: ModelInfo
    max_upload_bytes: int
    token_required: bool
    notice: str


class ErrorDetail(_Strict):
    """Why a request was refused: its HTTP status, a short kind and a message for a person."""

    status: int
    kind: str = Field(
        description="a short category: 'empty', 'not_an_image', 'multi_frame', 'too_large', 'unauthorized', ..."
    )
    message: str = Field(description="what is wrong and what to do")


class ErrorReply(_Strict):
    """The reply to every refused request, whatever its status."""

    error: ErrorDetail
