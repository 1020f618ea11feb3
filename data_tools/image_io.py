"""One X-ray from bytes, whichever format it came in: DICOM, PNG or JPEG.

``lungdet serve`` reads uploads with :func:`read_xray` and ``lungdet predict --input`` reads
files with it, so both see the same pixels and the same errors. The format is told from the
content (the DICOM 'DICM' marker, the PNG and JPEG signatures), never from a file name, and
sizes are checked from the header before anything is decoded, so a small upload cannot
declare a gigapixel image (a decompression bomb). DICOMs go through
:mod:`lungdet.data_tools.dicom_io`, the one DICOM reader. Nothing here writes a file.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from lungdet.data_tools.dicom_frames import over_pixel_limit
from lungdet.data_tools.dicom_io import read_dicom, read_dicom_bytes, window_to_uint8
from lungdet.data_tools.dicom_meta import conversion_notes
from lungdet.data_tools.metadata import ImageTags
from lungdet.errors import ImageReadError, LungdetError

FORMATS = ("dicom", "png", "jpeg")
# File names that find_images takes: the derivatives RSNA data circulates as.
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The largest chest radiographs are about 4,300 x 4,300 (43 cm at 0.1 mm); this leaves room for
# odd exports while bounding what one request may make the server allocate.
DEFAULT_MAX_PIXELS = 40_000_000
# Below this a picture cannot show lungs at all; the model input is 256-1024 px.
MIN_SIDE = 32

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_DICOM_MARKER_OFFSET = 128
# Formats people send by mistake, named so the message can say what was received.
_OTHER_SIGNATURES = {
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"%PDF": "PDF",
    b"PK\x03\x04": "ZIP",
    b"\x1f\x8b": "gzip",
}
# Pillow modes that carry colour (or a palette that may): converted to grey, and said so.
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "P", "PA", "LAB", "HSV"}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class XrayImage:
    """A decoded X-ray: ``pixels`` is uint8 ``[height, width]``, bright = dense (MONOCHROME2 sense).

    ``format`` is one of :data:`FORMATS`. ``view_position`` ('AP'/'PA'), ``sex`` and ``age``
    (years) come from DICOM tags and are None when absent or for PNG/JPEG. ``notes`` lists what
    was done to the image on the way (``{"kind", "reason"}``, as ``convert`` reports them), e.g. a colour image made grey.
    Identifying tags (names, IDs, dates) are never read into this object.
    """

    pixels: np.ndarray
    format: str
    view_position: str | None = None
    sex: str | None = None
    age: int | None = None
    # What the DICOM says the image is, for the frontal-chest gate (lungdet.data_tools.gate); None for PNG/JPEG.
    modality: str | None = None
    body_part_examined: str | None = None
    notes: tuple[dict[str, str], ...] = field(default_factory=tuple)
    # True when the PNG/JPEG file itself decodes to exactly ``pixels`` (8-bit grey, upright):
    # convert may then keep the file's bytes instead of encoding the pixels again.
    file_is_pixels: bool = False

    @property
    def width(self) -> int:
        """Width of the decoded image in pixels (the columns of ``pixels``)."""
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        """Height of the decoded image in pixels (the rows of ``pixels``)."""
        return int(self.pixels.shape[0])

    @property
    def tags(self) -> ImageTags:
        """What the file says of the patient, as an image head with metadata reads it: a DICOM's tags, nothing for a PNG or JPEG."""
        return ImageTags(age=self.age, sex=self.sex or "", view_position=self.view_position or "")

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: format, width, height, view_position, sex, age, notes."""
        return {
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "view_position": self.view_position,
            "sex": self.sex,
            "age": self.age,
            "notes": [dict(note) for note in self.notes],
        }


def find_images(folder: Path) -> list[Path]:
    """All PNG and JPEG files (``.png``, ``.jpg``, ``.jpeg``, any case) under ``folder``, recursive, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LungdetError(f"{folder}: not a folder; pass the folder that holds the {{patientId}}.png or .jpg files")
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in PICTURE_SUFFIXES and path.is_file())


def sniff_format(data: bytes) -> str | None:
    """'dicom', 'png' or 'jpeg' from the first bytes of ``data``; None for anything else."""
    if data[_DICOM_MARKER_OFFSET : _DICOM_MARKER_OFFSET + 4] == b"DICM":
        return "dicom"
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(_JPEG_SIGNATURE):
        return "jpeg"
    return None


def _name_other_format(data: bytes) -> str:
    for signature, name in _OTHER_SIGNATURES.items():
        if data.startswith(signature):
            return f"a {name} file"
    if data[:1] in (b"{", b"[", b"<"):
        return "text (JSON, HTML or XML)"
    return "not a format lungdet knows"


def read_xray(data: bytes, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = MIN_SIDE) -> XrayImage:
    """Decode one X-ray (DICOM, PNG or JPEG) held in memory.

    Parameters
    ----------
    data
        The file's bytes.
    name
        What messages call the source (a file path, or an upload's hash: never trusted as a path).
    max_pixels
        Images declaring more pixels than this in their header are refused before decoding.
    min_side
        Images with a side shorter than this are refused: they cannot hold a radiograph.

    Raises
    ------
    ImageReadError
        With ``kind``: 'empty', 'not_an_image', 'too_many_pixels', 'too_small', 'truncated',
        'undecodable', or any :class:`~lungdet.errors.DicomReadError` kind ('no_pixels',
        'multi_frame', 'unsupported_compression', ...). The reason says what to do.
    """
    if not data:
        raise ImageReadError(name, "the file is empty (0 bytes); choose the X-ray file again", kind="empty")
    image_format = sniff_format(data)
    if image_format is None:
        raise ImageReadError(
            name,
            f"is {_name_other_format(data)}; lungdet reads DICOM (with the 'DICM' marker at byte 128), PNG and JPEG; "
            "export the X-ray in one of those",
            kind="not_an_image",
        )
    if image_format == "dicom":
        image = _read_dicom(data, name=name, max_pixels=max_pixels)
    else:
        image = _read_picture(data, name=name, image_format=image_format, max_pixels=max_pixels)
    if min(image.height, image.width) < min_side:
        raise ImageReadError(
            name,
            f"is {image.width} x {image.height} pixels, too small to show a chest X-ray (each side needs at least {min_side}); "
            "send the full-size image",
            kind="too_small",
        )
    return image


def _read_dicom(data: bytes, *, name: str, max_pixels: int) -> XrayImage:
    dicom = read_dicom_bytes(data, name=name, max_pixels=max_pixels)
    meta = dicom.meta
    return XrayImage(
        pixels=dicom.pixels,
        format="dicom",
        view_position=meta.view_position or None,
        sex=meta.sex or None,
        age=meta.age,
        modality=meta.modality or None,
        body_part_examined=meta.body_part_examined or None,
        notes=tuple(conversion_notes(meta)),
    )


def read_xray_file(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> XrayImage:
    """:func:`read_xray` of the file at ``path``; a file that cannot be opened is an ImageReadError of kind 'missing'."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageReadError(
            path, f"cannot be read ({error.strerror or error}); check the path", kind="missing"
        ) from None
    return read_xray(data, name=str(path), max_pixels=max_pixels)


def read_file_pixels(path: Path) -> np.ndarray:
    """uint8 ``[H, W]`` pixels of one X-ray file: a ``.dcm`` through the DICOM reader (its own messages), anything else by content."""
    if Path(path).suffix.lower() == ".dcm":
        return read_dicom(Path(path)).pixels
    return read_xray_file(path).pixels


def read_picture_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of a PNG or JPEG file from its header alone, upright as its EXIF orientation says; nothing is decoded.

    Raises ImageReadError (kind 'missing', 'empty', 'not_an_image' or 'undecodable') when it is not a readable PNG or JPEG.
    """
    try:
        with open(path, "rb") as stream:
            head = stream.read(len(_PNG_SIGNATURE))
            if not head:
                raise ImageReadError(path, "the file is empty (0 bytes)", kind="empty")
            image_format = (
                "png" if head.startswith(_PNG_SIGNATURE) else "jpeg" if head.startswith(_JPEG_SIGNATURE) else None
            )
            if image_format is None:
                raise ImageReadError(path, f"is {_name_other_format(head)}, not a PNG or JPEG", kind="not_an_image")
            stream.seek(0)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    picture = Image.open(stream, formats=[image_format.upper()])
                    width, height = picture.size
                    orientation = picture.getexif().get(_EXIF_ORIENTATION, 1)
            except Exception as error:  # Pillow raises several types (OSError among them) for a header it cannot parse
                raise ImageReadError(
                    path, f"header cannot be read ({type(error).__name__}: {error})", kind="undecodable"
                ) from None
    except OSError as error:
        raise ImageReadError(path, f"cannot be read ({error.strerror or error})", kind="missing") from None
    # Orientations 5-8 turn the picture a quarter: its upright width is the stored height.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _read_picture(data: bytes, *, name: str, image_format: str, max_pixels: int) -> XrayImage:
    """PNG or JPEG through Pillow: header first (size checked), then decode, orientation and grey."""
    label = image_format.upper()
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb guard warns above 89 MP; the limit here is checked just below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data), formats=[label])
    except Image.DecompressionBombError as error:
        raise ImageReadError(
            name,
            f"{label} declares an image too large to decode ({error}); send a smaller export",
            kind="too_many_pixels",
        ) from None
    except Exception as error:  # Pillow raises several types for a header it cannot parse
        raise ImageReadError(
            name,
            f"{label} header cannot be read ({type(error).__name__}: {error}); the file is damaged, export it again",
            kind="undecodable",
        ) from None
    width, height = picture.size
    if width * height > max_pixels:
        raise over_pixel_limit(
            ImageReadError, name, f"{label} declares {width} x {height} pixels", width * height, max_pixels
        )
    notes: list[dict[str, str]] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture.load()
            orientation = picture.getexif().get(_EXIF_ORIENTATION, 1)
            # Phone photos of films carry an EXIF rotation; boxes must be in the upright image a viewer shows.
            upright = ImageOps.exif_transpose(picture)
    except OSError as error:
        # Pillow says 'image file is truncated' or 'broken data stream' for a file cut short.
        raise ImageReadError(
            name,
            f"{label} data cannot be decoded ({error}); the file is probably truncated, export it again",
            kind="truncated",
        ) from None
    except Exception as error:
        raise ImageReadError(
            name,
            f"{label} data cannot be decoded ({type(error).__name__}: {error}); export it again",
            kind="undecodable",
        ) from None
    if orientation not in (0, 1):
        notes.append({"kind": "exif_rotated", "reason": "turned upright as its EXIF orientation says"})
    pixels = _grey_uint8(upright, notes)
    return XrayImage(
        pixels=pixels,
        format=image_format,
        notes=tuple(notes),
        file_is_pixels=picture.mode == "L" and orientation in (0, 1),
    )


def _grey_uint8(picture: Image.Image, notes: list[dict[str, str]]) -> np.ndarray:
    """Pillow image -> uint8 ``[H, W]``; colour becomes luma (ITU-R 601, as the DICOM reader), 16-bit its own min..max."""
    mode = picture.mode
    if mode == "L":
        return np.asarray(picture, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(picture, dtype=np.float64)
        notes.append(
            {"kind": "high_bit_depth_rescaled", "reason": f"{mode} pixels mapped to 8 bits (the image's own min..max)"}
        )
        return window_to_uint8(values, lower=float(values.min()), upper=float(values.max()))
    if mode in ("1", "LA"):
        return np.asarray(picture.convert("L"), dtype=np.uint8).copy()
    if mode in _COLOUR_MODES:
        notes.append({"kind": "rgb_converted", "reason": f"colour image ({mode}) converted to grey (luma)"})
        return np.asarray(picture.convert("RGB").convert("L"), dtype=np.uint8).copy()
    return np.asarray(picture.convert("L"), dtype=np.uint8).copy()


def read_input_list(path: Path) -> list[Path]:
    """``--input-list``: one file per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise LungdetError(
            f"--input-list {path}: cannot be read ({error}); give a text file with one path per line"
        ) from None
    paths = [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not paths:
        raise LungdetError(f"--input-list {path}: names no file; give one path per line")
    return paths
