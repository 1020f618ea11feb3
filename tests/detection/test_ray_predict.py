"""Tests of detection/ray_predict.py: ``lungdet predict --ray`` gives plain predict's answer, resumes after a SIGKILL, and says what is wrong in one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.detection import ray_predict
from lungdet.detection.predict import read_input_list
from lungdet.errors import LungdetError
from lungdet.submission.prediction_string import read_submission
from lungdet.submission.raw_predictions import read_raw_predictions
from tests.conftest import skip_or_fail


def require_ray() -> None:
    """Skip without Ray Data here; under CI (the test extra installs it) fail instead."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        skip_or_fail("Ray Data is not installed (pip install 'lungdet[ray]')")


HEADER = {"version": 1, "checkpoints": ["/m.pt"], "passes": ["plain"], "amp": "auto", "inputs": 3}


# --- the results journal ----------------------------------------------------------------------------


def test_the_journal_keeps_each_file_once_and_survives_a_torn_last_line(tmp_path: Path) -> None:
    journal = ray_predict.ResultsJournal(tmp_path / "out.csv.ray-results.jsonl", HEADER)
    journal.open()
    first = {"path": "a.dcm", "rows": []}
    assert journal.append([first, {"path": "b.dcm", "error": "not a DICOM"}]) == [
        first,
        {"path": "b.dcm", "error": "not a DICOM"},
    ]
    # A retried batch brings a file back: the first answer stands.
    assert journal.append([{"path": "a.dcm", "rows": [{"model": "other"}]}]) == []
    with journal.path.open("a") as stream:
        stream.write('{"path": "c.dcm", "ro')  # the driver was killed mid-line

    again = ray_predict.ResultsJournal(journal.path, HEADER)
    again.open()
    assert list(again.done) == ["a.dcm", "b.dcm"] and again.done["a.dcm"] == first
    assert again.append([{"path": "c.dcm", "rows": []}]) == [{"path": "c.dcm", "rows": []}]
    lines = journal.path.read_text().splitlines()
    assert json.loads(lines[0]) == HEADER and [json.loads(line)["path"] for line in lines[1:]] == [
        "a.dcm",
        "b.dcm",
        "c.dcm",
    ]
    again.remove()
    assert not journal.path.exists()


def test_a_journal_of_another_command_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "out.csv.ray-results.jsonl"
    ray_predict.ResultsJournal(path, HEADER).open()
    with pytest.raises(
        LungdetError, match=r"out.csv.ray-results.jsonl: results of another predict command .* delete it"
    ):
        ray_predict.ResultsJournal(path, {**HEADER, "passes": ["plain", "hflip"]}).open()


def test_the_journal_lives_beside_the_first_output_given(tmp_path: Path) -> None:
    assert ray_predict.results_path([None, tmp_path / "raw.csv", tmp_path / "p.csv"]) == tmp_path / (
        "raw.csv" + ray_predict.RESULTS_SUFFIX
    )


# --- what goes wrong before any work -----------------------------------------------------------------


def test_input_list_skips_blanks_and_comments_and_refuses_an_empty_one(tmp_path: Path) -> None:
    listing = tmp_path / "files.txt"
    listing.write_text("# the archive\n/data/a.dcm\n\n  /data/b.png  \n")
    assert read_input_list(listing) == [Path("/data/a.dcm"), Path("/data/b.png")]
    listing.write_text("# nothing\n")
    with pytest.raises(LungdetError, match="names no file"):
        read_input_list(listing)


def test_an_address_nothing_answers_on_is_one_line(tmp_path: Path) -> None:
    require_ray()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free, and closed again: nothing listens there
    started = time.monotonic()
    with pytest.raises(LungdetError, match=rf"--ray 127.0.0.1:{port}: no Ray cluster answers there"):
        ray_predict.connect(f"127.0.0.1:{port}", verbose=False)
    assert time.monotonic() - started < 10


def test_without_ray_the_error_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(LungdetError, match=r"install it with: pip install 'lungdet\[ray\]'"):
        ray_predict.import_ray()


def test_plain_predict_does_not_import_ray(tmp_path: Path) -> None:
    code = "import sys, lungdet.detection.predict; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"


# --- on a Ray of its own ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, rsna_real_dir: Path) -> Path:
    """A list of 20 files: 16 synthetic DICOMs (one of them corrupt) and 4 real RSNA JPEGs."""
    root = tmp_path_factory.mktemp("archive")
    summary = write_synthetic_dataset(root / "synth", count=15, seed=3, positive_fraction=0.4, size=(256, 256))
    (summary.images_dir / "corrupt.dcm").write_bytes(b"DICM" * 40)
    files = sorted(summary.images_dir.glob("*.dcm")) + sorted((rsna_real_dir / "images").glob("*.jpg"))[:4]
    listing = root / "files.txt"
    listing.write_text("".join(f"{path}\n" for path in files))
    return listing


def predict_command(checkpoint: Path, listing: Path, out: Path, *extra: str) -> list[str]:
    """``lungdet predict`` over ``listing`` writing ``out`` (submission) and ``out``.raw.csv, fp32 on the CPU."""
    return [
        sys.executable,
        "-m",
        "lungdet",
        "predict",
        "--checkpoint",
        str(checkpoint),
        "--input-list",
        str(listing),
        "--out",
        str(out),
        "--raw",
        str(out.with_suffix(".raw.csv")),
        "--device",
        "cpu",
        "--amp",
        "none",
        "--no-progress",
        *extra,
    ]


def run_predict(command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group (Ray's processes with it), with Ray's usage report off."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def assert_same_predictions(plain: Path, on_ray: Path) -> None:
    """The same rows; scores and boxes equal to float tolerance (the forward pass may batch files differently)."""
    expected, got = read_submission(plain), read_submission(on_ray)
    assert list(got) == list(expected)
    for patient_id, prediction in expected.items():
        np.testing.assert_allclose(got[patient_id].scores, prediction.scores, atol=1e-4)
        np.testing.assert_allclose(got[patient_id].boxes, prediction.boxes, atol=0.05)
    raw_expected = sorted(read_raw_predictions(plain.with_suffix(".raw.csv")), key=lambda row: row.patient_id)
    raw_got = sorted(read_raw_predictions(on_ray.with_suffix(".raw.csv")), key=lambda row: row.patient_id)
    assert [(row.patient_id, row.width, row.height) for row in raw_got] == [
        (row.patient_id, row.width, row.height) for row in raw_expected
    ]


def test_on_ray_the_outputs_equal_plain_predict_and_a_killed_driver_resumes(
    serving_checkpoint: Path, archive: Path, tmp_path: Path
) -> None:
    require_ray()
    plain = tmp_path / "plain.csv"
    done = run_predict(predict_command(serving_checkpoint, archive, plain, "--workers", "0"))
    assert done.returncode == 0, done.stderr

    # A driver killed with SIGKILL once some results are stored; Ray's processes go with its group.
    on_ray = tmp_path / "ray.csv"
    journal = tmp_path / ("ray.csv" + ray_predict.RESULTS_SUFFIX)
    command = predict_command(serving_checkpoint, archive, on_ray, "--ray", "--batch-size", "2")
    driver = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and driver.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 3:  # the header and two files
            break
        time.sleep(0.2)
    assert driver.poll() is None, driver.communicate()
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    stored = len(journal.read_text().splitlines()) - 1
    assert 2 <= stored < 20 and not on_ray.exists()

    done = run_predict(command)
    assert done.returncode == 0, done.stderr
    assert f"files already done in {journal}" in done.stdout
    assert f"lungdet predict: {20 - stored} files on Ray" in done.stderr and "1 refused" in done.stderr
    assert "corrupt.dcm" in done.stderr and "INFO" not in done.stderr
    assert "; Ray actors, --device cpu --amp none)" in done.stdout  # not the driver's own copies, which ran nothing
    assert not journal.exists()
    assert_same_predictions(plain, on_ray)
    assert len(read_submission(on_ray)) == 20  # one row per input, the corrupt file's with no boxes


def test_cuda_on_a_cluster_without_a_gpu_is_one_line_even_from_a_driver_without_one(
    serving_checkpoint: Path, archive: Path, tmp_path: Path
) -> None:
    """The driver loads the models on its CPU only to read them, so it gets as far as asking the cluster."""
    require_ray()
    out = tmp_path / "gpu.csv"
    done = run_predict(predict_command(serving_checkpoint, archive, out, "--ray") + ["--device", "cuda"])
    assert done.returncode == 2
    assert "lungdet predict: error: --device cuda: the Ray cluster has no GPU; use --device cpu or auto" in done.stderr
    assert not out.exists()
