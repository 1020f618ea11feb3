"""COCO assembly: converted files and their labels -> image and annotation records, spooled to disk, then one ``annotations.json``.

Records wait in spool files until every image is known (folds need all of them), so memory does
not grow with the number of files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from lungdet.atomic import atomic_open
from lungdet.boxes import clip_xywh, scale_xywh
from lungdet.data_tools.conversion_report import ConversionReport
from lungdet.data_tools.convert_worker import FileResult, age_notes
from lungdet.data_tools.labels import PatientLabels
from lungdet.data_tools.metadata import ImageTags

CATEGORY = {"id": 1, "name": "lung_opacity", "supercategory": "lung"}
# A box clipped to the image that keeps less than this many pixels of width or height is no box.
MIN_BOX_SIDE = 1.0
# A box that reaches further than this past its image's edge (in the labels' pixels) hints that the
# labels are in another pixel space than the image (RSNA's 1024x1024 labels on a 256 px derivative).
PAST_EDGE_TOLERANCE = 1.0


def assemble_coco(
    entries: Iterable[FileResult],
    labels: Mapping[str, PatientLabels],
    report: ConversionReport,
    *,
    image_spool: IO[str],
    annotation_spool: IO[str],
    label_space: tuple[int, int] | None = None,
    tags: Mapping[str, ImageTags] | None = None,
) -> dict[str, int]:
    """COCO image and annotation records from the converted files' results (in file order) and the labels.

    Each record is written as one JSON line to its spool (images without their fold, which is
    known only at the end); returns ``{patientId: boxes kept}`` in file order. Boxes are scaled
    from the labels' pixels (the DICOM's, the image's own, or ``label_space`` ``(width, height)``,
    which then becomes the record's ``original_width``/``original_height``) to the written image's
    pixels per axis and clipped to it; a box left thinner than ``MIN_BOX_SIDE`` is dropped and
    reported. ``tags`` (from a metadata CSV) fill a PNG/JPEG's age, sex, view and spacing. Bad
    files and the notes on converted files go to the report.
    """
    boxes_per_patient: dict[str, int] = {}
    annotation_count = 0
    for entry in entries:
        if entry.refusal is not None:
            report.bad_files.append({"file": entry.file, "reason": entry.refusal.reason, "kind": entry.refusal.kind})
            continue
        report.notes.extend({"file": entry.file, **note} for note in entry.notes)
        image = asdict(entry.image)
        patient_id, width, height = image["patient_id"], image["width"], image["height"]
        if label_space is not None:
            image["original_width"], image["original_height"] = label_space
        if tags is not None:
            image.update(_tag_fields(entry.file, tags.get(patient_id), report))
        truth = labels[patient_id]
        if len(truth.boxes):
            ends = truth.boxes[:, :2] + truth.boxes[:, 2:]
            report.boxes_past_edge += int(
                (
                    (ends[:, 0] > image["original_width"] + PAST_EDGE_TOLERANCE)
                    | (ends[:, 1] > image["original_height"] + PAST_EDGE_TOLERANCE)
                ).sum()
            )
        scaled = scale_xywh(
            truth.boxes, scale_x=width / image["original_width"], scale_y=height / image["original_height"]
        )
        clipped = clip_xywh(scaled, width=width, height=height)
        image_id = len(boxes_per_patient) + 1
        kept = 0
        for original, box in zip(truth.boxes.tolist(), clipped.tolist(), strict=True):
            if box[2] < MIN_BOX_SIDE or box[3] < MIN_BOX_SIDE:
                report.dropped_boxes.append({"patientId": patient_id, "box": original, "reason": "outside the image"})
                continue
            kept += 1
            annotation_count += 1
            annotation = {
                # Ids start at 1: pycocotools treats id 0 as "no match" in its evaluation.
                "id": annotation_count,
                "image_id": image_id,
                "category_id": CATEGORY["id"],
                "bbox": [round(value, 3) for value in box],
                "area": round(box[2] * box[3], 3),
                "iscrowd": 0,
            }
            annotation_spool.write(json.dumps(annotation) + "\n")
        record = {
            "id": image_id,
            **image,
            "target": truth.target,
            "class_name": truth.class_name,
            "n_boxes": kept,
        }
        image_spool.write(json.dumps(record) + "\n")
        boxes_per_patient[patient_id] = kept
        report.converted += 1
        report.positives += int(kept > 0)
        report.boxes += kept
    return boxes_per_patient


def _tag_fields(file: str, tags: ImageTags | None, report: ConversionReport) -> dict[str, Any]:
    """The image record's tag fields from a metadata row (empty, with a note, when the patient has none)."""
    if tags is None:
        report.notes.append(
            {
                "file": file,
                "kind": "no_metadata",
                "reason": "the metadata CSV has no row for this patient; age, sex and view left unknown",
            }
        )
        tags = ImageTags()
    report.notes.extend({"file": file, **note} for note in age_notes(tags.age))
    return {
        "age": tags.age,
        "sex": tags.sex,
        "view_position": tags.view_position,
        "pixel_spacing": list(tags.pixel_spacing) if tags.pixel_spacing else None,
    }


def spooled_images_with_folds(image_spool: IO[str], fold_of: Mapping[str, int]) -> Iterator[dict[str, Any]]:
    """Image records back from their spool, each with its fold added; can be read any number of times."""
    image_spool.seek(0)
    for line in image_spool:
        record = json.loads(line)
        record["fold"] = fold_of[record["patient_id"]]
        yield record


def write_coco_json(
    path: Path, info: dict[str, Any], images: Iterable[dict[str, Any]], annotation_spool: IO[str]
) -> None:
    """Write the COCO file one record at a time (atomically), the same text ``json.dumps`` would give."""
    annotation_spool.seek(0)
    with atomic_open(path, "w", encoding="utf-8") as stream:
        stream.write(f'{{"info": {json.dumps(info)}, "images": [')
        for index, record in enumerate(images):
            stream.write((", " if index else "") + json.dumps(record))
        stream.write('], "annotations": [')
        for index, line in enumerate(annotation_spool):
            stream.write((", " if index else "") + line.rstrip("\n"))
        stream.write(f'], "categories": {json.dumps([CATEGORY])}}}')
