"""The bad input corpus: every kind of broken or odd input ``lungdet convert`` meets, built in code.

One folder holds a few normal DICOMs beside files that cannot be read (skipped, each named with
its reason) and files that are read but odd (converted, each named with a note), and a labels
CSV with patients that have no DICOM and boxes outside their image. The conversion must finish,
count every kind in its printed summary, name every file in conversion_report.json, and leave
no half-written output.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pycocotools.coco import COCO
from pydicom.encaps import encapsulate
from pydicom.uid import HTJ2KLossless

from lungdet.cli import main as cli_main
from lungdet.data_tools.conversion_report import ConversionReport, format_report
from lungdet.data_tools.convert_worker import input_notes
from lungdet.data_tools.dicom_io import find_missing_decoder, read_dicom_metadata
from lungdet.data_tools.dicom_meta import DicomMeta

# A normal radiograph size for the synthetic files: above the tiny-image bound, so each file has only its intended oddity.
SIDE = 300
# A transfer syntax UID that no decoder knows, as a vendor's private compression would be.
PRIVATE_SYNTAX = "1.2.3.4.5.6.7.8.9.1"

# Unreadable files: stem -> the kind of DicomReadError. They are labelled, so conversion tries them.
UNREADABLE = {
    "empty": "empty",
    "truncated": "truncated",
    "not-dicom": "not_dicom",
    "no-pixels": "no_pixels",
    "multi-frame": "multi_frame",
    "short-pixel-data": "undecodable",
    "private-syntax": "unsupported_compression",
    # Standard HTJ2K needs pylibjpeg-openjpeg; where it is installed the garbage frame fails to decode instead.
    "htj2k": "unsupported_compression" if find_missing_decoder(HTJ2KLossless) else "undecodable",
    "bad-tag-value": "bad_tag",
}
# Odd files that are converted anyway: stem -> the kind of note.
NOTED = {
    "rgb": "rgb_converted",
    "monochrome1": "monochrome1_inverted",
    "sixteen-bit": "high_bit_depth_rescaled",
    "no-age": "missing_age",
    "age-zero": "age_zero",
    "age-150": "age_implausible",
    "tiny": "tiny_image",
    "huge": "huge_image",
}
# Normal files (twin is also in b/, a duplicate; boxes-outside has two of its three boxes outside).
NORMAL = ("normal-neg", "normal-pos", "twin", "boxes-outside")
CONVERTED = (*NORMAL, *NOTED)
GHOSTS = ("ghost-1", "ghost-2")  # labelled, no DICOM
POSITIVE_ROWS = {
    "normal-pos": [(50, 60, 100, 80)],
    "boxes-outside": [(20, 20, 100, 100), (400, 10, 50, 50), (10, 350, 20, 20)],
    "tiny": [(2, 2, 8, 8)],
    "huge": [(1000, 1000, 2000, 1500)],
    "ghost-1": [(10, 10, 10, 10)],
}
IMAGE_SIZE = 64


def write_with_syntax(path: Path, transfer_syntax: str) -> None:
    """Re-save ``path`` as encapsulated pixel data in ``transfer_syntax``, with a frame no decoder can read."""
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    # Starts like a JPEG 2000 codestream (SOC, SIZ markers), then nothing valid.
    dataset.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    # pydicom cannot infer the encoding of a private syntax; encapsulated syntaxes are explicit VR little endian.
    dataset.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)


def build_corpus(make_dicom, root: Path) -> tuple[Path, Path]:
    """Write the corpus under ``root``; returns (DICOM folder, labels CSV)."""
    dicoms = root / "dicoms"
    normal = {"folder": dicoms, "rows": SIDE, "columns": SIDE}
    for stem in ("normal-neg", "normal-pos", "boxes-outside", "unlabelled"):
        make_dicom(stem, **normal)
    make_dicom("twin", **{**normal, "folder": dicoms / "a"})
    make_dicom("twin", **{**normal, "folder": dicoms / "b"})

    (dicoms / "empty.dcm").write_bytes(b"")
    whole = (dicoms / "normal-pos.dcm").read_bytes()
    (dicoms / "truncated.dcm").write_bytes(
        whole[: len(whole) * 2 // 3]
    )  # cut inside the pixel data, as a broken download is
    (dicoms / "not-dicom.dcm").write_text("patientId,x,y,width,height,Target\n" * 20)
    make_dicom("no-pixels", **normal, with_pixels=False)
    make_dicom("multi-frame", **normal, number_of_frames=3)
    make_dicom("short-pixel-data", **normal, pixel_data=b"garbage!")
    write_with_syntax(make_dicom("private-syntax", **normal), PRIVATE_SYNTAX)
    write_with_syntax(make_dicom("htj2k", **normal), HTJ2KLossless)
    bad_tag = make_dicom("bad-tag-value", **normal, pixel_spacing=(1.234567, 2.345678))
    encoded = bad_tag.read_bytes()
    assert b"1.234567\\2.345678" in encoded
    bad_tag.write_bytes(encoded.replace(b"1.234567\\2.345678", b"abcdefgh\\ijklmnop"))  # same length, not numbers

    make_dicom("rgb", **normal, samples_per_pixel=3)
    make_dicom("monochrome1", **normal, photometric="MONOCHROME1")
    make_dicom("sixteen-bit", **normal, bits=16, window_center=40000, window_width=50000)
    make_dicom("no-age", **normal, patient_age=None)
    make_dicom("age-zero", **normal, patient_age="000Y")
    make_dicom("age-150", **normal, patient_age="150Y")
    make_dicom("tiny", folder=dicoms, rows=16, columns=16)
    # The fixture's default ramp would be built in int64 (134 MB); a uint8 gradient is cheap.
    gradient = np.broadcast_to((np.arange(4100) % 256).astype(np.uint8), (4100, 4100))
    make_dicom("huge", folder=dicoms, rows=4100, columns=4100, pixels=gradient)

    rows = ["patientId,x,y,width,height,Target"]
    for stem in (*UNREADABLE, *CONVERTED, *GHOSTS):
        boxes = POSITIVE_ROWS.get(stem)
        rows.extend([f"{stem},{x},{y},{w},{h},1" for x, y, w, h in boxes] if boxes else [f"{stem},,,,,0"])
    labels_csv = root / "labels.csv"
    labels_csv.write_text("\n".join(rows) + "\n")
    return dicoms, labels_csv


@pytest.fixture
def corpus(make_dicom, tmp_path: Path) -> tuple[Path, Path]:
    return build_corpus(make_dicom, tmp_path / "corpus")


def convert_args(dicoms: Path, labels_csv: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "convert",
        "--dicom-dir",
        str(dicoms),
        "--labels",
        str(labels_csv),
        "--out",
        str(out_dir),
        "--image-size",
        str(IMAGE_SIZE),
        *extra,
    ]


def load_report(out_dir: Path) -> dict:
    return json.loads((out_dir / "conversion_report.json").read_text())


def load_coco(out_dir: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while it loads
        return COCO(str(out_dir / "annotations.json"))


# --- the whole corpus through the CLI --------------------------------------------------------


def test_every_bad_file_is_skipped_and_named_with_its_kind(corpus, tmp_path: Path) -> None:
    dicoms, labels_csv = corpus
    out_dir = tmp_path / "out"
    assert cli_main(convert_args(dicoms, labels_csv, out_dir, "--workers", "1")) == 0
    report = load_report(out_dir)
    assert {Path(bad["file"]).stem: bad["kind"] for bad in report["bad_files"]} == UNREADABLE
    reasons = {Path(bad["file"]).stem: bad["reason"] for bad in report["bad_files"]}
    assert reasons["truncated"].startswith("file is truncated (the file ends inside element (7FE0,0010)")
    assert "1.2.3.4.5.6.7.8.9.1, which no pydicom decoder supports" in reasons["private-syntax"]
    assert reasons["bad-tag-value"].startswith("tag PixelSpacing has an unreadable value")
    assert reasons["multi-frame"].startswith("is multi-frame (3 frames)")
    assert all("\n" not in reason for reason in reasons.values())  # one line per file in the summary


def test_odd_files_are_converted_with_a_note(corpus, tmp_path: Path) -> None:
    dicoms, labels_csv = corpus
    out_dir = tmp_path / "out"
    assert cli_main(convert_args(dicoms, labels_csv, out_dir, "--workers", "1")) == 0
    report = load_report(out_dir)
    # Exactly one note per odd file, none on the normal files.
    assert sorted((Path(note["file"]).stem, note["kind"]) for note in report["notes"]) == sorted(NOTED.items())
    reasons = {Path(note["file"]).stem: note["reason"] for note in report["notes"]}
    assert reasons["sixteen-bit"].startswith("16-bit pixels mapped to 8 bits")
    assert reasons["tiny"].startswith("16 rows x 16 columns, under 256")
    assert reasons["huge"].startswith("4100 rows x 4100 columns, over 4096")
    assert reasons["age-150"].startswith("PatientAge reads as 150 years")


def test_label_side_problems_are_named(corpus, tmp_path: Path) -> None:
    dicoms, labels_csv = corpus
    out_dir = tmp_path / "out"
    assert cli_main(convert_args(dicoms, labels_csv, out_dir, "--workers", "1")) == 0
    report = load_report(out_dir)
    assert report["unlabelled_files"] == [str(dicoms / "unlabelled.dcm")]
    assert report["duplicate_files"] == [str(dicoms / "b" / "twin.dcm")]  # a/ comes first in sorted order and is kept
    assert report["labelled_without_dicom_ids"] == list(GHOSTS)
    assert report["labelled_without_dicom"] == 2
    assert [(dropped["patientId"], dropped["box"]) for dropped in report["dropped_boxes"]] == [
        ("boxes-outside", [400.0, 10.0, 50.0, 50.0]),
        ("boxes-outside", [10.0, 350.0, 20.0, 20.0]),
    ]


def test_summary_counts_each_kind_and_names_the_files(corpus, tmp_path: Path, capsys) -> None:
    dicoms, labels_csv = corpus
    assert cli_main(convert_args(dicoms, labels_csv, tmp_path / "out", "--workers", "1")) == 0
    printed = capsys.readouterr().out
    assert f"converted {len(CONVERTED)} images (4 with opacities, 4 boxes)" in printed
    unreadable_counts = ", ".join(f"{kind}: {count}" for kind, count in sorted(Counter(UNREADABLE.values()).items()))
    assert f"skipped {len(UNREADABLE)} unreadable DICOMs ({unreadable_counts}):" in printed
    note_counts = ", ".join(f"{kind}: 1" for kind in sorted(NOTED.values()))
    assert f"converted with notes ({note_counts}):" in printed
    assert "2 labelled patients have no DICOM in this folder" in printed
    assert "skipped 1 DICOMs the labels do not name" in printed
    assert "skipped 1 DICOMs whose patientId (file name) was already found in another folder" in printed
    assert "dropped 2 boxes outside the image" in printed
    # Every file of the corpus is named (each kind has fewer than SUMMARY_EXAMPLES).
    for stem in (*UNREADABLE, *NOTED):
        assert f"{dicoms / stem}.dcm: " in printed
    for name in (
        str(dicoms / "unlabelled.dcm"),
        str(dicoms / "b" / "twin.dcm"),
        "boxes-outside [400.0, 10.0, 50.0, 50.0]",
    ):
        assert name in printed
    # Labelled patients without a DICOM are usual for a subset: counted on screen, named in the JSON report.
    assert "their patientIds are in conversion_report.json" in printed
    assert all(ghost not in printed for ghost in GHOSTS)


def test_output_is_complete_and_nothing_is_half_written(corpus, tmp_path: Path) -> None:
    dicoms, labels_csv = corpus
    out_dir = tmp_path / "out"
    assert cli_main(convert_args(dicoms, labels_csv, out_dir, "--workers", "1")) == 0
    report = load_report(out_dir)
    coco = load_coco(out_dir)
    pngs = sorted((out_dir / "images").glob("*.png"))
    assert report["converted"] == len(coco.getImgIds()) == len(pngs) == len(CONVERTED)
    assert sorted(path.stem for path in pngs) == sorted(CONVERTED)
    assert sorted(image["patient_id"] for image in coco.dataset["images"]) == sorted(CONVERTED)
    for path in pngs:
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert pixels is not None and pixels.shape == (IMAGE_SIZE, IMAGE_SIZE) and pixels.dtype == np.uint8, path
    # Tiny and huge images get their boxes scaled like any other: 16 -> 64 is x4, 4100 -> 64 is x64/4100.
    image_of = {image["patient_id"]: image for image in coco.dataset["images"]}
    tiny_boxes = [annotation["bbox"] for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_of["tiny"]["id"]))]
    assert tiny_boxes == [[8.0, 8.0, 32.0, 32.0]]
    huge_boxes = [annotation["bbox"] for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_of["huge"]["id"]))]
    np.testing.assert_allclose(
        huge_boxes, [[1000 * 64 / 4100, 1000 * 64 / 4100, 2000 * 64 / 4100, 1500 * 64 / 4100]], atol=1e-3
    )
    assert (image_of["huge"]["original_width"], image_of["huge"]["original_height"]) == (4100, 4100)
    assert image_of["no-age"]["age"] is None and image_of["age-zero"]["age"] == 0
    assert list(tmp_path.rglob("*.tmp")) == []


def test_strict_fails_on_the_corpus_but_still_writes_everything(corpus, tmp_path: Path, capsys) -> None:
    dicoms, labels_csv = corpus
    out_dir = tmp_path / "strict"
    assert cli_main(convert_args(dicoms, labels_csv, out_dir, "--workers", "1", "--strict")) == 1
    assert f"skipped {len(UNREADABLE)} unreadable DICOMs" in capsys.readouterr().out
    assert load_report(out_dir)["converted"] == len(CONVERTED)
    assert list(out_dir.rglob("*.tmp")) == []


def test_a_rerun_reports_the_same_from_its_journal(corpus, tmp_path: Path, capsys) -> None:
    dicoms, labels_csv = corpus
    out_dir = tmp_path / "out"
    assert cli_main(convert_args(dicoms, labels_csv, out_dir, "--workers", "1")) == 0
    first = load_report(out_dir)
    first_printed = capsys.readouterr().out
    assert cli_main(convert_args(dicoms, labels_csv, out_dir, "--workers", "1")) == 0
    again = load_report(out_dir)
    # Every image is reused, not read again; its notes come from the journal entry.
    assert again.pop("reused") == len(CONVERTED)
    assert first.pop("reused") == 0
    assert again == first
    again_printed = capsys.readouterr().out.splitlines()
    reused_line = f"  {len(CONVERTED)} images were already converted with these settings and kept"
    assert [line for line in again_printed if line != reused_line] == first_printed.splitlines()
    assert reused_line in again_printed
    assert list(out_dir.rglob("*.tmp")) == []


def test_two_workers_write_what_one_writes(corpus, tmp_path: Path) -> None:
    dicoms, labels_csv = corpus
    assert cli_main(convert_args(dicoms, labels_csv, tmp_path / "one", "--workers", "1")) == 0
    assert cli_main(convert_args(dicoms, labels_csv, tmp_path / "two", "--workers", "2")) == 0
    assert (tmp_path / "one" / "annotations.json").read_bytes() == (tmp_path / "two" / "annotations.json").read_bytes()
    assert load_report(tmp_path / "one") == load_report(tmp_path / "two")
    for path in sorted((tmp_path / "one" / "images").glob("*.png")):
        assert path.read_bytes() == (tmp_path / "two" / "images" / path.name).read_bytes(), path.name
    assert list(tmp_path.rglob("*.tmp")) == []


# --- the summary stays short at dataset scale ------------------------------------------------


def test_summary_of_a_full_size_dataset_is_a_screenful(tmp_path: Path) -> None:
    files = [f"/data/{index:05d}.dcm" for index in range(26_684)]
    report = ConversionReport(
        converted=26_684,
        bad_files=[{"file": name, "reason": "pixel data cannot be decoded", "kind": "undecodable"} for name in files],
        unlabelled_files=files,
        duplicate_files=files,
        dropped_boxes=[
            {"patientId": name, "box": [0.0, 0.0, 1.0, 1.0], "reason": "outside the image"} for name in files
        ],
        labelled_without_dicom=26_684,
        labelled_without_dicom_ids=files,
        notes=[
            {"file": name, "kind": kind, "reason": "odd"}
            for name in files
            for kind in ("monochrome1_inverted", "missing_age")
        ],
    )
    lines = format_report(report, tmp_path).splitlines()
    assert len(lines) < 60
    assert "  converted with notes (missing_age: 26684, monochrome1_inverted: 26684):" in lines
    assert "    ... and 26679 more in conversion_report.json" in lines


# --- input_notes on metadata values -----------------------------------------------------------


def plain_meta(**changes: object) -> DicomMeta:
    """A 1024 x 1024 8-bit MONOCHROME2 radiograph of a 40-year-old: nothing to note."""
    meta = DicomMeta(
        path=Path("/data/plain.dcm"),
        patient_id="plain",
        patient_id_tag="plain",
        age=40,
        sex="F",
        view_position="PA",
        rows=1024,
        columns=1024,
        pixel_spacing=(0.14, 0.14),
        modality="CR",
        photometric_interpretation="MONOCHROME2",
        bits_stored=8,
        samples_per_pixel=1,
        number_of_frames=1,
        transfer_syntax="1.2.840.10008.1.2.4.50",
    )
    return replace(meta, **changes)


def note_kinds(meta: DicomMeta) -> list[str]:
    return [note["kind"] for note in input_notes(meta)]


def test_a_plain_radiograph_has_no_notes() -> None:
    assert input_notes(plain_meta()) == []


@pytest.mark.parametrize(
    ("changes", "kinds"),
    [
        ({"samples_per_pixel": 3, "photometric_interpretation": "RGB"}, ["rgb_converted"]),
        ({"samples_per_pixel": 3, "photometric_interpretation": "YBR_FULL_422"}, ["rgb_converted"]),
        ({"photometric_interpretation": "MONOCHROME1"}, ["monochrome1_inverted"]),
        ({"photometric_interpretation": "monochrome1"}, ["monochrome1_inverted"]),
        ({"bits_stored": 12}, ["high_bit_depth_rescaled"]),
        ({"bits_stored": 16}, ["high_bit_depth_rescaled"]),
        ({"age": None}, ["missing_age"]),
        ({"age": 0}, ["age_zero"]),
        ({"age": 1}, []),
        ({"age": 120}, []),
        ({"age": 121}, ["age_implausible"]),
        ({"rows": 255}, ["tiny_image"]),
        ({"columns": 16}, ["tiny_image"]),
        ({"rows": 256, "columns": 256}, []),
        ({"rows": 4096, "columns": 4096}, []),
        ({"columns": 4097}, ["huge_image"]),
        ({"rows": 5000, "columns": 100}, ["tiny_image", "huge_image"]),
        (
            {"rows": 16, "columns": 16, "age": None, "bits_stored": 16},
            ["high_bit_depth_rescaled", "missing_age", "tiny_image"],
        ),
    ],
)
def test_input_notes_flag_each_oddity(changes: dict, kinds: list[str]) -> None:
    assert note_kinds(plain_meta(**changes)) == kinds


def test_input_notes_reasons_give_the_values() -> None:
    (deep,) = input_notes(plain_meta(bits_stored=12))
    assert deep == {
        "kind": "high_bit_depth_rescaled",
        "reason": "12-bit pixels mapped to 8 bits (Window Center/Width if present, else the image's own min..max)",
    }
    (colour,) = input_notes(plain_meta(samples_per_pixel=3, photometric_interpretation="RGB"))
    assert colour["reason"] == "colour image (RGB) converted to grey (luma)"
    (small,) = input_notes(plain_meta(rows=16, columns=20))
    assert small["reason"].startswith("16 rows x 20 columns, under 256 on a side")


def test_metadata_records_depth_channels_frames_and_syntax(make_dicom, tmp_path: Path) -> None:
    deep = read_dicom_metadata(make_dicom("deep", bits=16))
    assert (deep.bits_stored, deep.samples_per_pixel, deep.number_of_frames, deep.transfer_syntax) == (
        16,
        1,
        1,
        "1.2.840.10008.1.2.1",
    )
    colour = read_dicom_metadata(make_dicom("colour", samples_per_pixel=3))
    assert (colour.bits_stored, colour.samples_per_pixel) == (8, 3)
    assert read_dicom_metadata(make_dicom("frames", number_of_frames=2)).number_of_frames == 2
    assert (
        read_dicom_metadata(make_dicom("frames", number_of_frames=2)).to_dict()["transfer_syntax"]
        == "1.2.840.10008.1.2.1"
    )
