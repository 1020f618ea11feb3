"""What ``lungdet convert`` did: the :class:`ConversionReport` (counts, every skipped file and why, notes on odd inputs) and its printed summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lungdet.data_tools.metadata import TAG_COLUMNS

# Where convert writes what the summary names (to_coco.py writes them).
ANNOTATIONS_FILE = "annotations.json"
REPORT_FILE = "conversion_report.json"
FOLDS_FILE = "folds.csv"
# The printed summary names at most this many files per kind; conversion_report.json lists them all.
SUMMARY_EXAMPLES = 5


@dataclass
class ConversionReport:
    """What ``convert_dataset`` did: counts plus every skipped file with its reason.

    ``notes`` lists inputs that were converted but are odd (``{"file", "kind", "reason"}``, see
    :func:`input_notes`); a file can have several.
    """

    converted: int = 0
    positives: int = 0
    boxes: int = 0
    bad_files: list[dict[str, str]] = field(default_factory=list)
    unlabelled_files: list[str] = field(default_factory=list)
    duplicate_files: list[str] = field(default_factory=list)
    dropped_boxes: list[dict[str, object]] = field(default_factory=list)
    labelled_without_dicom: int = 0
    labelled_without_dicom_ids: list[str] = field(
        default_factory=list
    )  # sorted patientIds (with --image-dir: no image file)
    notes: list[dict[str, str]] = field(default_factory=list)
    reused: int = 0  # files whose image from an earlier run with the same settings was kept
    source: str = "dicom"  # one of SOURCES
    label_space: str = "image"  # the labels' pixel space: 'image' (each image's own size) or 'WxH' (--label-space)
    boxes_past_edge: int = 0  # label boxes reaching past their image's edge (clipped or dropped)
    metadata: str | None = None  # the --metadata CSV, when one was given
    metadata_columns: list[str] = field(default_factory=list)  # the tag columns it had
    metadata_problems: list[dict[str, str]] = field(
        default_factory=list
    )  # rows of --metadata that could not be used as given

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict of every field (``dataclasses.asdict``), as ``conversion_report.json`` holds it."""
        return asdict(self)


def _examples(items: list[str]) -> list[str]:
    """Up to ``SUMMARY_EXAMPLES`` of ``items`` as indented lines, then how many more the JSON report has."""
    lines = [f"    {item}" for item in items[:SUMMARY_EXAMPLES]]
    if len(items) > SUMMARY_EXAMPLES:
        lines.append(f"    ... and {len(items) - SUMMARY_EXAMPLES} more in {REPORT_FILE}")
    return lines


def _count_kinds(records: list[dict[str, str]]) -> str:
    return ", ".join(
        f"{kind}: {count}" for kind, count in sorted(Counter(record["kind"] for record in records).items())
    )


def format_report(report: ConversionReport, out_dir: Path) -> str:
    """Human summary of a conversion: counts, then each kind of problem with a few example files.

    The length does not grow with the dataset (at most ``SUMMARY_EXAMPLES`` files per kind), so
    26k files with one systematic problem print a screenful; conversion_report.json has every file.
    """
    files = "DICOMs" if report.source == "dicom" else "images"
    lines = [
        f"converted {report.converted} images ({report.positives} with opacities, {report.boxes} boxes) into {out_dir}",
        f"  COCO: {out_dir / ANNOTATIONS_FILE}   folds: {out_dir / FOLDS_FILE}   report: {out_dir / REPORT_FILE}",
    ]
    if report.source == "picture":
        lines.extend(_picture_lines(report))
    lines.extend(_matching_lines(report, files))
    if report.metadata_problems:
        lines.append(
            f"  {len(report.metadata_problems)} metadata rows not used as given ({_count_kinds(report.metadata_problems)}):"
        )
        for kind in sorted({problem["kind"] for problem in report.metadata_problems}):
            lines.extend(
                _examples(
                    [
                        f"{problem['file']}: {problem['reason']}"
                        for problem in report.metadata_problems
                        if problem["kind"] == kind
                    ]
                )
            )
    if report.dropped_boxes:
        lines.append(f"  dropped {len(report.dropped_boxes)} boxes outside the image:")
        lines.extend(
            _examples(
                [f"{dropped['patientId']} {dropped['box']}: {dropped['reason']}" for dropped in report.dropped_boxes]
            )
        )
    if report.reused:
        lines.append(f"  {report.reused} images were already converted with these settings and kept")
    if report.bad_files:
        lines.append(f"  skipped {len(report.bad_files)} unreadable {files} ({_count_kinds(report.bad_files)}):")
        for kind in sorted({bad["kind"] for bad in report.bad_files}):
            lines.extend(
                _examples([f"{bad['file']}: {bad['reason']}" for bad in report.bad_files if bad["kind"] == kind])
            )
    if report.notes:
        lines.append(f"  converted with notes ({_count_kinds(report.notes)}):")
        for kind in sorted({note["kind"] for note in report.notes}):
            lines.extend(
                _examples([f"{note['file']}: {note['reason']}" for note in report.notes if note["kind"] == kind])
            )
    return "\n".join(lines)


def _picture_lines(report: ConversionReport) -> list[str]:
    """For PNG/JPEG input: the pixel space the labels' boxes were taken to be in, and where the tags came from."""
    lines = []
    if report.label_space == "image":
        lines.append(
            "  boxes: the labels are taken to be in each image's own pixels (the default; --label-space WxH says otherwise)"
        )
    else:
        lines.append(
            f"  boxes: the labels are in {report.label_space} pixels (--label-space), scaled to each image's own size"
        )
    if report.metadata is None:
        lines.append("  no --metadata: age, sex and view position are unknown (EDA, score slices and the page say so)")
    else:
        missing = [column for column in TAG_COLUMNS if column not in report.metadata_columns]
        lines.append(
            f"  tags {', '.join(report.metadata_columns)} from {report.metadata}"
            + (f" (no {', '.join(missing)}: unknown)" if missing else "")
        )
    return lines


def _matching_lines(report: ConversionReport, files: str) -> list[str]:
    """Where the labels and the files did not meet: boxes past an edge, patients without a file, files without labels or twice."""
    lines = []
    if report.boxes_past_edge:
        hint = ""
        if report.source == "picture" and report.label_space == "image":
            hint = "; are the labels in another pixel space than the images? RSNA's are 1024x1024: give --label-space 1024x1024"
        lines.append(
            f"  {report.boxes_past_edge} label boxes reach past their image's edge (clipped to it, dropped when nothing was left){hint}"
        )
    if report.labelled_without_dicom:
        # Usual when converting a subset, so only counted here; the patientIds are in the JSON report.
        lines.append(
            f"  {report.labelled_without_dicom} labelled patients have no {'DICOM' if report.source == 'dicom' else 'image file'} in this folder "
            f"(fine for a subset; their patientIds are in {REPORT_FILE})"
        )
    if report.unlabelled_files:
        lines.append(f"  skipped {len(report.unlabelled_files)} {files} the labels do not name (truth unknown):")
        lines.extend(_examples(report.unlabelled_files))
    if report.duplicate_files:
        lines.append(
            f"  skipped {len(report.duplicate_files)} {files} whose patientId (file name) was already found in another folder:"
        )
        lines.extend(_examples(report.duplicate_files))
    return lines
