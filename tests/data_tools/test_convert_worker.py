"""data_tools/convert_worker.py: one file's typed result, and the journal line it is stored as."""

from __future__ import annotations

import json
from pathlib import Path

from lungdet.data_tools.convert_worker import ConvertTask, FileResult, Refusal, convert_file, load_journal


def test_a_dicoms_result_is_typed_and_its_journal_line_keeps_the_old_layout(
    rsna_sample_dir: Path, tmp_path: Path
) -> None:
    path = sorted(rsna_sample_dir.glob("*.dcm"))[0]
    result = convert_file(ConvertTask(str(path), [1, 2], str(tmp_path), 256, "none", "dicom"))
    assert result.refusal is None and result.image is not None
    assert (result.image.patient_id, result.image.width, result.image.height) == (path.stem, 256, 256)
    assert (result.image.original_width, result.image.original_height) == (1024, 1024)
    assert (tmp_path / result.image.file_name).is_file()
    line = result.to_journal()
    assert list(line) == ["file", "signature", "image", "notes"]
    assert list(line["image"])[:4] == ["patient_id", "file_name", "width", "height"]
    assert FileResult.from_journal(json.loads(json.dumps(line))) == result


def test_a_refusal_round_trips_and_a_cut_journal_line_is_skipped(tmp_path: Path) -> None:
    bad = tmp_path / "notes.dcm"
    bad.write_text("not a dicom")
    result = convert_file(ConvertTask(str(bad), [1, 2], str(tmp_path), None, "none", "dicom"))
    assert result.image is None and result.refusal == Refusal(result.refusal.reason, "not_dicom")
    assert result.to_journal() == {
        "file": str(bad),
        "signature": [1, 2],
        "bad": {"reason": result.refusal.reason, "kind": "not_dicom"},
    }
    journal = tmp_path / "journal.jsonl"
    settings = {"image_size": None}
    journal.write_text(
        json.dumps({"settings": settings}) + "\n" + json.dumps(result.to_journal()) + "\n" + '{"file": "cut'
    )
    assert load_journal(journal, settings) == {str(bad): result}
    assert load_journal(journal, {"image_size": 512}) == {}  # other settings: nothing reused
