"""The compressed pixel data of a parsed DICOM, looked at before decoding.

:func:`encoded_frame_size` reads the size a JPEG, JPEG-LS or JPEG 2000 frame declares in its own
header; :func:`check_declared_size` refuses an image over a pixel limit (a decompression bomb)
and :func:`check_complete_frame` a JPEG-family frame cut short, both before any decoder runs;
:func:`grey_jpeg_baseline_stream` and :func:`decode_grey_jpeg` are the fast path for the 8-bit
grey JPEG Baseline of every RSNA file (libjpeg-turbo, about four times faster than pylibjpeg).
:mod:`lungdet.data_tools.dicom_io`, the one reader, parses the file and calls these.
"""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, JPEGBaseline8Bit, RLELossless

from lungdet.data_tools.dicom_meta import DicomMeta
from lungdet.errors import DicomReadError, ImageReadError

# JPEG markers (ITU T.81 table B.1, T.87 for JPEG-LS). Frame headers: SOF0-SOF15 less DHT (C4),
# JPG (C8) and DAC (CC), plus JPEG-LS's SOF55 (F7); each is length, precision, rows, columns.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_JPEG_STANDALONE_MARKERS = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # TEM, SOI, RST0-7: no length field
_JPEG_START_OF_SCAN = 0xDA
_JP2_SIGNATURE_BOX = b"\x00\x00\x00\x0cjP  "


def encoded_frame_size(stream: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` that a compressed frame declares in its own header, or None when none can be found.

    Reads the frame header of JPEG (every SOF marker, lossless included), JPEG-LS (SOF55) and
    JPEG 2000 (a raw codestream's SIZ marker, or a JP2 file's ``ihdr`` box) without decoding,
    so an image can be refused for its size before a decoder allocates it.
    """
    if stream.startswith(b"\xff\x4f\xff\x51"):
        # JPEG 2000 codestream: SOC, then SIZ = marker, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz.
        if len(stream) < 24:
            return None
        xsiz, ysiz, x_offset, y_offset = struct.unpack(">IIII", stream[8:24])
        return ysiz - y_offset, xsiz - x_offset
    if stream.startswith(_JP2_SIGNATURE_BOX):
        header = stream.find(b"ihdr")
        if header < 0 or header + 12 > len(stream):
            return None
        height, width = struct.unpack(">II", stream[header + 4 : header + 12])
        return height, width
    if not stream.startswith(b"\xff\xd8"):
        return None
    position = 2
    while position + 4 <= len(stream):
        if stream[position] != 0xFF:
            return None
        marker = stream[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            position += 2
            continue
        if marker == _JPEG_START_OF_SCAN:  # image data before any frame header: not a valid stream
            return None
        if marker in _JPEG_FRAME_MARKERS:
            if position + 9 > len(stream):
                return None
            rows, columns = struct.unpack(">HH", stream[position + 5 : position + 9])
            return rows, columns
        position += 2 + int.from_bytes(stream[position + 2 : position + 4], "big")
    return None


def over_pixel_limit(
    error: type[ImageReadError], source: object, declaration: str, pixels: int, max_pixels: int
) -> ImageReadError:
    """The error for an image whose header declares more than ``max_pixels``: ``declaration``, then the count and the limit in megapixels."""
    return error(
        source,
        f"{declaration} ({pixels / 1e6:.1f} megapixels), over the limit of {max_pixels / 1e6:g}; send a smaller export of the image",
        kind="too_many_pixels",
    )


def check_declared_size(path: Path, dataset: Dataset, meta: DicomMeta, *, max_pixels: int) -> None:
    """Refuse, before any decoding, a DICOM whose image is larger than ``max_pixels`` or whose compressed frame disagrees with Rows/Columns.

    A compressed frame carries its own size, and decoders allocate what the frame says, not what
    Rows/Columns say; an upload could declare a small image in its tags and a huge one in its
    stream (a decompression bomb). RLE frames carry no size: their decoder uses Rows/Columns.
    """
    declared = meta.rows * meta.columns * max(1, meta.number_of_frames)
    if declared > max_pixels:
        frames = f" x {meta.number_of_frames} frames" if meta.number_of_frames > 1 else ""
        raise over_pixel_limit(
            DicomReadError, path, f"declares {meta.rows} x {meta.columns} pixels{frames}", declared, max_pixels
        )
    syntax = UID(meta.transfer_syntax) if meta.transfer_syntax else None
    if syntax is None or not syntax.is_compressed or syntax == RLELossless or "PixelData" not in dataset:
        return
    try:
        frame = next(generate_frames(dataset.PixelData, number_of_frames=max(1, meta.number_of_frames)))
    except Exception:  # damaged encapsulation: the decoder reports it
        return
    size = encoded_frame_size(frame)
    if size is None:
        raise DicomReadError(
            path,
            f"the {syntax.name} frame has no readable header giving its size; the file is damaged, export it again",
            kind="undecodable",
        )
    if size[0] * size[1] > max_pixels:
        raise over_pixel_limit(
            DicomReadError,
            path,
            f"its compressed frame declares {size[0]} x {size[1]} pixels",
            size[0] * size[1],
            max_pixels,
        )
    if size != (meta.rows, meta.columns):
        raise DicomReadError(
            path,
            f"its compressed frame is {size[0]} x {size[1]} pixels but Rows/Columns say {meta.rows} x {meta.columns}; the file is inconsistent",
            kind="bad_shape",
        )


# JPEG, JPEG-LS and JPEG 2000 transfer syntaxes: their streams end with the marker FFD9 (EOI; EOC in JPEG 2000).
JPEG_FAMILY_PREFIX = "1.2.840.10008.1.2.4."


def check_complete_frame(path: Path, dataset: Dataset, meta: DicomMeta) -> None:
    """Refuse a JPEG-family frame that is cut short: no end marker (FFD9) at the end of its stream.

    libjpeg (pylibjpeg) decodes a truncated stream without a word and fills the rest grey, so a file
    cut in transfer would pass for half an X-ray; the error names the syntax and what is wrong.
    """
    if not meta.transfer_syntax.startswith(JPEG_FAMILY_PREFIX) or "PixelData" not in dataset:
        return
    syntax = UID(meta.transfer_syntax).name
    try:
        stream = next(generate_frames(dataset.PixelData, number_of_frames=1))
    except Exception as error:  # damaged encapsulation
        raise DicomReadError(
            path,
            f"pixel data cannot be decoded (transfer syntax {syntax}: {type(error).__name__}: {' '.join(str(error).split())}); the file is damaged, export it again",
            kind="undecodable",
        ) from None
    # Fragments are padded to an even length with a zero byte, which is not part of the stream.
    if not stream.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise DicomReadError(
            path,
            f"pixel data cannot be decoded (transfer syntax {syntax}: the frame has no end marker, it was cut short); the file is truncated, send or export it again",
            kind="undecodable",
        )


def grey_jpeg_baseline_stream(dataset: Dataset, meta: DicomMeta) -> bytes | None:
    """The complete JPEG stream of an 8-bit grey single-frame JPEG Baseline DICOM, or None for any other file.

    None too when the stream is incomplete (no End Of Image marker, as in a file cut short), which
    :func:`check_complete_frame` refuses before any decoding.
    """
    if (
        meta.transfer_syntax != JPEGBaseline8Bit
        or meta.samples_per_pixel != 1
        or meta.bits_stored != 8
        or meta.number_of_frames != 1
        or meta.photometric_interpretation.upper() not in ("MONOCHROME1", "MONOCHROME2")
    ):
        return None
    try:
        stream = next(generate_frames(dataset.PixelData, number_of_frames=1))
    except Exception:  # damaged encapsulation: pydicom's decode reports it properly
        return None
    # Fragments are padded to an even length with a zero byte, which is not part of the stream.
    stream = stream.rstrip(b"\x00")
    return stream if stream.startswith(b"\xff\xd8") and stream.endswith(b"\xff\xd9") else None


def decode_grey_jpeg(stream: bytes, shape: tuple[int, int]) -> np.ndarray | None:
    """A :func:`grey_jpeg_baseline_stream` decoded by libjpeg-turbo, or None (decode failed, or not ``shape``) to leave it to pydicom.

    The real RSNA files are all of this kind, and pylibjpeg (pydicom's decoder for it) takes
    about 11 ms per 1024² image where libjpeg-turbo takes about 2.5 ms. The two IDCTs round
    differently, so about 3% of pixels differ by one grey level; libjpeg-turbo is also what
    Pillow uses.
    """
    # A stream that declares another size would be decoded in full only to be thrown away (or,
    # declaring a huge one, to exhaust memory): its header says so before any decoding.
    if encoded_frame_size(stream) != shape:
        return None
    # libjpeg-turbo would only warn about a damaged stream and fill the rest grey; the End Of
    # Image check of grey_jpeg_baseline_stream catches the common case, a file cut short.
    pixels = cv2.imdecode(np.frombuffer(stream, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    return pixels if pixels is not None and pixels.shape == shape else None
