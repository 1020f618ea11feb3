"""Tests of show/eda.py: the numbers (hand-made and real labels), metadata-only reads, the page, bad input."""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from lungdet.boxes import clip_xywh
from lungdet.cli import main as cli_main
from lungdet.data_tools import dicom_io
from lungdet.data_tools.dicom_meta import DicomMeta
from lungdet.data_tools.labels import NORMAL_CLASS, NOT_NORMAL_CLASS, POSITIVE_CLASS, read_labels
from lungdet.data_tools.metadata import read_metadata_csv
from lungdet.errors import LabelError
from lungdet.show import eda, eda_figures, eda_stats

# Five patients in the 1024 space: a has two boxes, c one, e one box that runs past the right edge.
TINY_LABELS = """patientId,x,y,width,height,Target
a,0.0,0.0,512.0,256.0,1
a,512.0,512.0,256.0,128.0,1
b,,,,,0
c,100.0,100.0,200.0,300.0,1
d,,,,,0
e,1000.0,0.0,48.0,16.0,1
"""
TINY_CLASS_INFO = f"""patientId,class
a,{POSITIVE_CLASS}
a,{POSITIVE_CLASS}
b,{NORMAL_CLASS}
c,{POSITIVE_CLASS}
d,{NOT_NORMAL_CLASS}
e,{POSITIVE_CLASS}
"""
# Box areas in 16x16 px cells (64 cells over 1024 px): 512*256/256, 256*128/256, 200*300/256, and
# e clipped to x 1000..1024: 24*16/256.
TINY_HEATMAP_SUM = 512 + 128 + 234.375 + 1.5


def write_tiny_labels(folder: Path, *, with_class_info: bool) -> tuple[Path, Path | None]:
    labels_csv = folder / "labels.csv"
    labels_csv.write_text(TINY_LABELS)
    if not with_class_info:
        return labels_csv, None
    class_info_csv = folder / "class_info.csv"
    class_info_csv.write_text(TINY_CLASS_INFO)
    return labels_csv, class_info_csv


def meta(
    patient_id: str,
    *,
    rows: int = 1024,
    columns: int = 1024,
    age: int | None = 40,
    sex: str = "F",
    view: str = "PA",
    spacing=(0.14, 0.14),
) -> DicomMeta:
    return DicomMeta(
        path=Path(f"/data/{patient_id}.dcm"),
        patient_id=patient_id,
        patient_id_tag=patient_id,
        age=age,
        sex=sex,
        view_position=view,
        rows=rows,
        columns=columns,
        pixel_spacing=spacing,
        modality="CR",
        photometric_interpretation="MONOCHROME2",
    )


def png_names_in(index_html: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+\.png)"', index_html.read_text(encoding="utf-8"))


# --- the numbers ---------------------------------------------------------------------------------


def test_stats_of_a_hand_made_labels_file(tmp_path: Path) -> None:
    labels = read_labels(*write_tiny_labels(tmp_path, with_class_info=True))
    stats = eda_stats.compute_stats(labels)

    assert (stats.patient_count, stats.positive_count, stats.negative_count, stats.box_count) == (5, 3, 2, 4)
    assert stats.class_counts == {NORMAL_CLASS: 1, NOT_NORMAL_CLASS: 1, POSITIVE_CLASS: 3}
    assert stats.boxes_per_positive == {"1": 2, "2": 1, "3": 0, "4+": 0}
    # Widths 512, 256, 200, 48 and heights 256, 128, 300, 16: even counts, so medians are midpoints.
    assert stats.median_box_width == 228.0
    assert stats.median_box_height == 192.0
    assert stats.metadata is None
    assert (stats.heatmap_own_size_count, stats.heatmap_assumed_size_count) == (0, 3)

    heatmap = stats.heatmap
    assert heatmap.shape == (64, 64)
    assert heatmap.sum() == pytest.approx(TINY_HEATMAP_SUM)
    assert heatmap[0, 0] == 1.0  # inside a's first box only
    # Cell (6, 6) spans 96..112 px: all of a's first box plus 12/16 x 12/16 of c's box (from 100 px).
    assert heatmap[6, 6] == pytest.approx(1 + 0.75 * 0.75)
    # e covers x 1000..1024: all of the last column, half of the one before it; nothing below 16 px.
    assert heatmap[0, 63] == 1.0 and heatmap[0, 62] == 0.5 and heatmap[1, 63] == 0.0
    assert heatmap[63, 0] == 0.0


def test_stats_without_class_info_count_targets(tmp_path: Path) -> None:
    labels = read_labels(*write_tiny_labels(tmp_path, with_class_info=False))
    stats = eda_stats.compute_stats(labels)
    assert stats.class_counts is None
    assert (stats.positive_count, stats.negative_count) == (3, 2)


def test_heatmap_normalises_each_box_by_its_own_image_size(tmp_path: Path) -> None:
    labels = read_labels(*write_tiny_labels(tmp_path, with_class_info=False))
    # a's image is 2048 rows x 1024 columns: its boxes keep their x extent but shrink to half in y.
    stats = eda_stats.compute_stats(labels, [meta("a", rows=2048, columns=1024)])
    a_area = 512 * 256 / 2 / 256 + 256 * 128 / 2 / 256
    assert stats.heatmap.sum() == pytest.approx(a_area + 234.375 + 1.5)
    assert (stats.heatmap_own_size_count, stats.heatmap_assumed_size_count) == (1, 2)
    # a's first box now ends at y = 128 of 1024 normalised: cell row 7 is covered, row 8 is not.
    assert stats.heatmap[7, 0] == 1.0 and stats.heatmap[8, 0] == 0.0
    # The box widths and heights stay in original pixels.
    assert stats.median_box_width == 228.0


def test_box_coverage_grid_counts_fractions_of_cells() -> None:
    # A box over the middle half of a 4x4 grid in x, and the top quarter plus half a cell in y.
    grid = eda_stats.box_coverage_grid(np.array([[0.25, 0.0, 0.5, 0.375]]), grid_size=4)
    expected = np.zeros((4, 4))
    expected[0, 1:3] = 1.0
    expected[1, 1:3] = 0.5
    np.testing.assert_allclose(grid, expected)
    assert eda_stats.box_coverage_grid(np.zeros((0, 4)), grid_size=4).sum() == 0.0


def test_metadata_stats_join_by_patient_id(tmp_path: Path) -> None:
    labels = read_labels(*write_tiny_labels(tmp_path, with_class_info=False))
    metadata = [
        meta("a", sex="M", view="AP", age=60),
        meta("b", sex="F", view="PA", age=30, spacing=(0.15, 0.16)),
        meta("c", sex="", view="AP", age=None, spacing=None),
        meta("d", sex="F", view="PA", age=150),
        meta("zz-not-labelled"),
        dataclasses.replace(meta("a"), path=Path("/elsewhere/a.dcm")),
    ]
    stats = eda_stats.compute_metadata_stats(labels, metadata)

    assert (stats.file_count, stats.labelled_count) == (6, 4)
    assert stats.unlabelled_paths == [Path("/data/zz-not-labelled.dcm")]
    assert stats.duplicate_paths == [Path("/elsewhere/a.dcm")]
    assert stats.labelled_without_dicom_count == 1  # e
    assert stats.sex_by_target == {
        "F": eda_stats.GroupCounts(negatives=2, positives=0),
        "M": eda_stats.GroupCounts(0, 1),
        "unknown": eda_stats.GroupCounts(0, 1),
    }
    assert stats.view_by_target == {"AP": eda_stats.GroupCounts(0, 2), "PA": eda_stats.GroupCounts(2, 0)}
    assert stats.view_by_target["AP"].positive_rate == 1.0 and stats.view_by_target["PA"].positive_rate == 0.0
    np.testing.assert_array_equal(stats.ages_by_target[0], [30, 150])
    np.testing.assert_array_equal(stats.ages_by_target[1], [60])
    assert (stats.missing_age_count, stats.implausible_age_count) == (1, 1)
    np.testing.assert_array_equal(stats.pixel_spacings_mm, [[0.14, 0.14], [0.15, 0.16], [0.14, 0.14]])
    assert stats.missing_spacing_count == 1


def test_stats_of_the_real_labels_file(rsna_labels_csv: Path, rsna_class_info_csv: Path) -> None:
    labels = read_labels(rsna_labels_csv, rsna_class_info_csv)
    stats = eda_stats.compute_stats(labels)

    assert (stats.patient_count, stats.positive_count, stats.box_count) == (26_684, 6_012, 9_555)
    assert stats.class_counts == {NORMAL_CLASS: 8_851, NOT_NORMAL_CLASS: 11_821, POSITIVE_CLASS: 6_012}
    assert stats.boxes_per_positive == {"1": 2_614, "2": 3_266, "3": 119, "4+": 13}
    assert stats.median_box_width == pytest.approx(217, abs=1)
    assert stats.median_box_height == pytest.approx(298, abs=1)
    boxes = clip_xywh(np.concatenate([patient.boxes for patient in labels.values()]), width=1024, height=1024)
    assert stats.heatmap.sum() == pytest.approx((boxes[:, 2] * boxes[:, 3]).sum() / 16**2)


def test_sample_order_depends_on_seed_only(tmp_path: Path) -> None:
    labels = read_labels(*write_tiny_labels(tmp_path, with_class_info=False))
    first = eda_stats.order_sample_candidates(
        labels, ["a", "b", "c", "d", "e", "not-labelled"], use_classes=False, seed=3
    )
    again = eda_stats.order_sample_candidates(labels, ["e", "d", "c", "b", "a"], use_classes=False, seed=3)
    assert first == again
    assert list(first) == ["Target 0", "Target 1"]
    assert sorted(first["Target 0"]) == ["b", "d"] and sorted(first["Target 1"]) == ["a", "c", "e"]


# --- DICOM metadata ------------------------------------------------------------------------------


def test_metadata_of_the_real_dicoms_matches_their_tags(rsna_sample_dir: Path, rsna_labels_csv: Path) -> None:
    paths = dicom_io.find_dicoms(rsna_sample_dir)
    scan = eda_stats.scan_metadata(paths)
    assert len(scan.records) == 13 and scan.unreadable == []
    stats = eda_stats.compute_stats(read_labels(rsna_labels_csv), scan.records)

    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    views = Counter(str(dataset.ViewPosition) for dataset in datasets)
    sexes = Counter(str(dataset.PatientSex) for dataset in datasets)
    metadata = stats.metadata
    assert {name: counts.total for name, counts in metadata.view_by_target.items()} == dict(views)
    assert {name: counts.total for name, counts in metadata.sex_by_target.items()} == dict(sexes)
    # The four positive samples are named in the data README.
    assert sum(counts.positives for counts in metadata.view_by_target.values()) == 4
    assert sorted(np.concatenate(list(metadata.ages_by_target.values()))) == sorted(
        int(dataset.PatientAge) for dataset in datasets
    )
    assert (stats.heatmap_own_size_count, stats.heatmap_assumed_size_count) == (4, 6_008)


def test_only_the_sample_images_are_decoded(
    monkeypatch, tmp_path: Path, rsna_sample_dir: Path, rsna_labels_csv: Path, rsna_class_info_csv: Path
) -> None:
    opened: list[bool] = []
    decoded: list[Path] = []
    open_dataset, read_xray_file = dicom_io._open_dataset, eda_figures.read_xray_file

    def recording_open(path, *, stop_before_pixels, data=None):
        opened.append(stop_before_pixels)
        return open_dataset(path, stop_before_pixels=stop_before_pixels, data=data)

    def counting_read(path):
        decoded.append(Path(path))
        return read_xray_file(path)

    monkeypatch.setattr(dicom_io, "_open_dataset", recording_open)
    monkeypatch.setattr(eda_figures, "read_xray_file", counting_read)
    labels = read_labels(rsna_labels_csv, rsna_class_info_csv)
    sources = eda.EdaSources(labels_csv=rsna_labels_csv, image_paths=dicom_io.find_dicoms(rsna_sample_dir))
    report = eda.write_eda(tmp_path / "out", labels, sources, samples_per_class=1, seed=0)

    # One sample for each of the three classes, and no other file's pixels touched.
    assert [len(samples) for samples in report.samples.values()] == [1, 1, 1]
    assert len(decoded) == 3
    assert opened.count(False) == 3 and opened.count(True) == 13


# --- the command line ----------------------------------------------------------------------------


def test_cli_writes_a_page_that_shows_every_png(
    tmp_path: Path, rsna_sample_dir: Path, rsna_labels_csv: Path, rsna_class_info_csv: Path, siim_dicom: Path
) -> None:
    dicom_dir = tmp_path / "dicoms"
    shutil.copytree(rsna_sample_dir, dicom_dir)
    shutil.copy(siim_dicom, dicom_dir / siim_dicom.name)  # a DICOM the labels do not name
    (dicom_dir / "broken.dcm").write_bytes(b"not a dicom at all" * 20)
    out = tmp_path / "eda"

    status = cli_main(
        [
            "eda",
            "--labels",
            str(rsna_labels_csv),
            "--class-info",
            str(rsna_class_info_csv),
            "--dicom-dir",
            str(dicom_dir),
            "--out",
            str(out),
            "--samples-per-class",
            "2",
            "--seed",
            "1",
        ]
    )

    assert status == 0
    index = out / "index.html"
    page = index.read_text(encoding="utf-8")
    referenced = png_names_in(index)
    assert sorted(referenced) == sorted(path.name for path in out.glob("*.png"))
    for name in (
        "class_balance.png",
        "boxes_per_image.png",
        "box_sizes.png",
        "box_heatmap.png",
        "age_by_target.png",
        "sex_by_target.png",
        "view_position_by_target.png",
        "pixel_spacing.png",
    ):
        assert name in referenced
    # Two samples for each of the three classes.
    assert len([name for name in referenced if name.startswith("sample_")]) == 6
    for name in referenced:
        image = cv2.imread(str(out / name))
        assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    samples = [cv2.imread(str(out / name)) for name in referenced if name.startswith("sample_")]
    assert all(max(image.shape[:2]) == eda_figures.SAMPLE_MAX_SIZE for image in samples)
    assert not list(out.glob(".*.tmp"))
    assert "lungdet is a research tool, not a diagnostic device" in page
    assert str(rsna_labels_csv) in page and str(dicom_dir) in page
    assert "26,684 patients (6,012 positive, 20,672 negative), 9,555 boxes" in page
    assert "median width 217 px, median height 298 px" in page
    # The broken file and the unlabelled one are listed, not fatal.
    assert "broken.dcm: not a DICOM file" in page
    assert siim_dicom.name in page
    assert "1 not in the labels" in page and "1 unreadable" in page


def test_labels_only_page_says_what_is_missing(tmp_path: Path) -> None:
    labels_csv, _ = write_tiny_labels(tmp_path, with_class_info=False)
    out = tmp_path / "eda"
    args = eda.get_args_parser().parse_args(["--labels", str(labels_csv), "--out", str(out)])
    assert eda.main(args) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    assert sorted(png_names_in(out / "index.html")) == [
        "box_heatmap.png",
        "box_sizes.png",
        "boxes_per_image.png",
        "class_balance.png",
    ]
    assert "assumed 1024x1024 px" in page
    assert "No --dicom-dir given" in page
    assert "Class info</td><td><i>not given" in page


def test_negatives_only_labels_still_give_a_page(tmp_path: Path) -> None:
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("patientId,x,y,width,height,Target\nn1,,,,,0\nn2,,,,,0\n")
    args = eda.get_args_parser().parse_args(["--labels", str(labels_csv), "--out", str(tmp_path / "eda")])
    assert eda.main(args) == 0
    assert "no boxes" in (tmp_path / "eda" / "index.html").read_text(encoding="utf-8")


def test_labels_without_a_column_give_a_label_error(tmp_path: Path) -> None:
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("patientId,x,y,width,height\na,1,2,3,4\n")
    args = eda.get_args_parser().parse_args(["--labels", str(labels_csv), "--out", str(tmp_path / "eda")])
    with pytest.raises(LabelError, match=r"labels\.csv: missing column\(s\) Target"):
        eda.main(args)
    assert not (tmp_path / "eda").exists()


def test_samples_per_class_is_range_checked(capsys) -> None:
    with pytest.raises(SystemExit):
        eda.get_args_parser().parse_args(["--labels", "l.csv", "--out", "o", "--samples-per-class", "51"])
    assert "must be between 0 and 50, got 51" in capsys.readouterr().err


def test_an_image_folder_with_its_metadata_csv_gives_the_tag_figures(tmp_path: Path, rsna_real_dir: Path) -> None:
    """Real JPEGs: sizes from their headers, age/sex/view from the CSV, as the DICOM tags would give them."""
    chosen = sorted((rsna_real_dir / "images").glob("*.jpg"))[:40]
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for path in chosen:
        (image_dir / path.name).symlink_to(path)
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk")
    out = tmp_path / "eda"
    status = cli_main(
        [
            "eda",
            "--labels",
            str(rsna_real_dir / "labels.csv"),
            "--class-info",
            str(rsna_real_dir / "class_info.csv"),
            "--image-dir",
            str(image_dir),
            "--metadata",
            str(rsna_real_dir / "metadata.csv"),
            "--out",
            str(out),
            "--samples-per-class",
            "1",
        ]
    )
    assert status == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    referenced = png_names_in(out / "index.html")
    assert {"age_by_target.png", "sex_by_target.png", "view_position_by_target.png"} <= set(referenced)
    assert len([name for name in referenced if name.startswith("sample_")]) == 3
    assert "41 image files found: 40 in the labels" in page and "broken.png: header cannot be read" in page
    assert "pixel_spacing.png" not in referenced and "None of the 40 labelled images has a PixelSpacing" in page
    assert str(rsna_real_dir / "metadata.csv") in page

    labels = read_labels(rsna_real_dir / "labels.csv")
    tags = read_metadata_csv(rsna_real_dir / "metadata.csv").tags
    scan = eda_stats.scan_pictures(chosen, read_metadata_csv(rsna_real_dir / "metadata.csv"))
    stats = eda_stats.compute_metadata_stats(labels, scan.records)
    expected_views = Counter(tags[path.stem].view_position for path in chosen)
    assert {view: counts.total for view, counts in stats.view_by_target.items()} == dict(expected_views)
    assert all((record.rows, record.columns) == (1024, 1024) for record in scan.records)
    assert sorted(np.concatenate(list(stats.ages_by_target.values()))) == sorted(tags[path.stem].age for path in chosen)


def test_an_image_folder_without_metadata_says_the_tags_are_unknown(tmp_path: Path, rsna_real_dir: Path) -> None:
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for path in sorted((rsna_real_dir / "images").glob("*.jpg"))[:5]:
        (image_dir / path.name).symlink_to(path)
    out = tmp_path / "eda"
    assert (
        cli_main(
            ["eda", "--labels", str(rsna_real_dir / "labels.csv"), "--image-dir", str(image_dir), "--out", str(out)]
        )
        == 0
    )
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "no --metadata CSV was given: age, sex, view position and pixel spacing are unknown" in page


def test_metadata_without_an_image_folder_is_refused(tmp_path: Path, capsys) -> None:
    labels_csv, _ = write_tiny_labels(tmp_path, with_class_info=False)
    status = cli_main(
        ["eda", "--labels", str(labels_csv), "--metadata", str(labels_csv), "--out", str(tmp_path / "eda")]
    )
    assert status == 2
    assert "give their folder with --image-dir" in capsys.readouterr().err
