"""Tests for data_tools/dicom_frames.py: frame sizes read from headers, and the fast grey JPEG path.

How the reader refuses a frame cut short or over the pixel limit is tested through it, in test_dicom_io.py.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian

from lungdet.data_tools.dicom_frames import decode_grey_jpeg, encoded_frame_size, grey_jpeg_baseline_stream
from lungdet.data_tools.dicom_io import read_dicom, read_dicom_metadata


def test_fast_jpeg_path_decodes_real_files_and_declines_odd_streams(rsna_sample_dir: Path) -> None:
    path = sorted(rsna_sample_dir.glob("*.dcm"))[0]
    dataset = pydicom.dcmread(path)
    meta = read_dicom_metadata(path)
    stream = grey_jpeg_baseline_stream(dataset, meta)
    assert stream is not None and stream[:2] == b"\xff\xd8" and stream[-2:] == b"\xff\xd9"
    fast = decode_grey_jpeg(stream, (1024, 1024))
    assert fast is not None and fast.std() > 20
    image = read_dicom(path)
    np.testing.assert_array_equal(image.pixels, fast)
    assert image.source_jpeg == stream
    assert decode_grey_jpeg(stream, (512, 512)) is None  # a stream that disagrees with Rows/Columns
    # Any other transfer syntax, bit depth or colour is pydicom's.
    assert grey_jpeg_baseline_stream(dataset, dataclasses.replace(meta, transfer_syntax=ExplicitVRLittleEndian)) is None
    assert grey_jpeg_baseline_stream(dataset, dataclasses.replace(meta, bits_stored=12)) is None
    assert grey_jpeg_baseline_stream(dataset, dataclasses.replace(meta, samples_per_pixel=3)) is None
    # A stream without its End Of Image marker (a file cut short) is not taken (check_complete_frame refuses it).
    dataset.PixelData = encapsulate([stream[:-2000]])
    assert grey_jpeg_baseline_stream(dataset, meta) is None


def test_encoded_frame_size_reads_jpeg_headers_without_decoding() -> None:
    baseline = cv2.imencode(".jpg", np.zeros((37, 53), dtype=np.uint8))[1].tobytes()
    assert encoded_frame_size(baseline) == (37, 53)
    # Progressive (SOF2) and a JPEG-LS frame (SOF55 = FFF7) after an APP segment, built by hand.
    progressive = cv2.imencode(".jpg", np.zeros((20, 30), dtype=np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[
        1
    ].tobytes()
    assert encoded_frame_size(progressive) == (20, 30)
    jpeg_ls = b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + b"\xff\xf7\x00\x0b\x08\x01\x00\x02\x00\x01\x01\x11\x00"
    assert encoded_frame_size(jpeg_ls) == (256, 512)
    # Scan data before any frame header, a cut stream, and something else entirely: no size.
    assert encoded_frame_size(b"\xff\xd8\xff\xda\x00\x02") is None
    assert encoded_frame_size(baseline[:4]) is None
    assert encoded_frame_size(b"not a jpeg") is None


def test_encoded_frame_size_reads_jpeg_2000_codestreams_and_jp2_files() -> None:
    # SOC, SIZ marker, Lsiz, Rsiz, Xsiz=700, Ysiz=500, XOsiz=100, YOsiz=50
    codestream = b"\xff\x4f\xff\x51" + struct.pack(">HHIIII", 47, 0, 700, 500, 100, 50)
    assert encoded_frame_size(codestream) == (450, 600)
    jp2 = (
        b"\x00\x00\x00\x0cjP  \r\n\x87\n"
        + b"\x00\x00\x00\x2djp2h\x00\x00\x00\x16ihdr"
        + struct.pack(">II", 480, 640)
        + b"\x00" * 8
    )
    assert encoded_frame_size(jp2) == (480, 640)
