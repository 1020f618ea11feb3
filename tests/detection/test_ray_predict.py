"""Tests of detection/ray_predict.py: ``lungdet predict --ray`` on a two-node cluster gives plain predict's answer, loses and repeats no row when a driver or a worker is killed, and says what is wrong in one line."""

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
from lungdet.errors import LungdetError
from lungdet.submission.prediction_string import read_submission
from lungdet.submission.raw_predictions import read_raw_predictions
from tests.conftest import require_ray, skip_or_fail
from tests.ray_cluster import LoopbackCluster, isolated

HEADER = {"version": 1, "checkpoints": ["/m.pt"], "passes": ["plain"], "amp": "auto", "metadata": None, "inputs": 3}


# --- the results journal ----------------------------------------------------------------------------


def test_the_journal_keeps_each_file_once_and_survives_a_torn_last_line(tmp_path: Path) -> None:
    journal = ray_predict.ResultsJournal(tmp_path / "out.csv.ray-results.jsonl", HEADER)
    journal.open()
    assert not journal.path.exists()  # opening only reads: a command refused before any work leaves nothing behind
    journal.start()
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
    again.start()  # rewritten without the torn line
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
    ray_predict.ResultsJournal(path, HEADER).start()
    for other in ({**HEADER, "passes": ["plain", "hflip"]}, {**HEADER, "metadata": "0123456789abcdef"}):
        with pytest.raises(
            LungdetError, match=r"out.csv.ray-results.jsonl: results of another predict command .* delete it"
        ):
            ray_predict.ResultsJournal(path, other).open()


def test_the_journal_lives_beside_the_first_output_given(tmp_path: Path) -> None:
    assert ray_predict.results_path([None, tmp_path / "raw.csv", tmp_path / "p.csv"]) == tmp_path / (
        "raw.csv" + ray_predict.RESULTS_SUFFIX
    )


# --- what goes wrong before any work -----------------------------------------------------------------


def test_plain_predict_and_cv_do_not_import_ray(tmp_path: Path) -> None:
    code = "import sys, lungdet.detection.predict, lungdet.detection.cv; print('ray' in sys.modules)"
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


def run_predict(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` with Ray's usage report off (and ``env``, a cluster's token, where given)."""
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})},
    )


def assert_same_predictions(plain: Path, on_ray: Path) -> None:
    """The same rows; scores and boxes equal to float tolerance.

    The forward pass batches files differently and runs another thread count, so a box edge may sit
    a hair either side of a rounding point of the submission's one decimal: one step of it is allowed.
    """
    expected, got = read_submission(plain), read_submission(on_ray)
    assert list(got) == list(expected)
    for patient_id, prediction in expected.items():
        np.testing.assert_allclose(got[patient_id].scores, prediction.scores, atol=1e-4)
        np.testing.assert_allclose(got[patient_id].boxes, prediction.boxes, atol=0.1 + 1e-6)
    raw_expected = sorted(read_raw_predictions(plain.with_suffix(".raw.csv")), key=lambda row: row.patient_id)
    raw_got = sorted(read_raw_predictions(on_ray.with_suffix(".raw.csv")), key=lambda row: row.patient_id)
    assert [(row.patient_id, row.width, row.height) for row in raw_got] == [
        (row.patient_id, row.width, row.height) for row in raw_expected
    ]


def stored(journal: Path) -> int:
    """Files whose results the journal holds (its lines less the header; a torn last line counts, as it may be)."""
    return len(journal.read_text().splitlines()) - 1 if journal.exists() else 0


def test_on_a_cluster_the_outputs_equal_plain_predict_with_a_driver_and_a_worker_killed(
    ray_cluster: LoopbackCluster, serving_checkpoint: Path, archive: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain.csv"
    done = run_predict(predict_command(serving_checkpoint, archive, plain, "--workers", "0"))
    assert done.returncode == 0, done.stderr

    # 1. The driver killed with SIGKILL once two files are stored.
    on_ray = tmp_path / "ray.csv"
    journal = tmp_path / ("ray.csv" + ray_predict.RESULTS_SUFFIX)
    command = ray_cluster.command(
        predict_command(serving_checkpoint, archive, on_ray, "--ray", ray_cluster.address, "--batch-size", "1")
    )
    driver = start_driver(command, ray_cluster)
    wait_until(lambda: stored(journal) >= 2, driver)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    before = stored(journal)
    assert 2 <= before < 20 and not on_ray.exists()

    # 2. The same command again; two files later, its model actor's process is killed with SIGKILL.
    # (Ray ends the killed driver's actor on its own time: that one is not this run's.)
    earlier = set(ray_cluster.processes("MapBatches(ModelWorker)"))
    driver = start_driver(command, ray_cluster)
    wait_until(lambda: stored(journal) >= before + 2, driver)
    [actor] = [pid for pid in ray_cluster.processes("MapBatches(ModelWorker)") if pid not in earlier]
    os.kill(actor, signal.SIGKILL)
    at_kill = stored(journal)
    assert driver.poll() is None and at_kill < 20  # killed mid-run
    out, err = driver.communicate(timeout=180)
    assert driver.returncode == 0, err
    # Ray's restarted actor goes with the run (once Ray has noticed the driver is gone).
    deadline = time.monotonic() + 30
    while ray_cluster.processes("MapBatches(ModelWorker)") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.processes("MapBatches(ModelWorker)") == []

    assert f"{before} of 20 files already done in {journal}" in out
    assert f"lungdet predict: {20 - before} files on Ray" in err and "1 refused" in err and "corrupt.dcm" in err
    assert "INFO" not in err and "(raylet)" not in out + err  # Ray's own lines went to its log, which is gone
    assert "; Ray actors, --device cpu --amp none)" in out  # not the driver's own copies, which ran nothing
    assert not journal.exists() and not journal.with_name(journal.name + ".ray.log").exists()
    assert_same_predictions(plain, on_ray)
    assert len(read_submission(on_ray)) == 20  # one row per input, the corrupt file's with no boxes
    assert len(read_raw_predictions(on_ray.with_suffix(".raw.csv"))) == 19  # and no file twice


def start_driver(command: list[str], cluster: LoopbackCluster) -> subprocess.Popen:
    """``command`` as a driver of ``cluster``, in a process group of its own (so that a kill takes Ray's driver threads too)."""
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**cluster.env, "RAY_USAGE_STATS_ENABLED": "0"},
        start_new_session=True,
    )


def wait_until(condition, driver: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, "the driver stored too few files in time"
        time.sleep(0.05)


def test_a_node_that_cannot_see_a_checkpoint_is_named_and_the_driver_stays_on_loopback(
    ray_cluster: LoopbackCluster, tmp_path: Path
) -> None:
    """Every node of this cluster shares the disk, so a path nobody has stands in for one a remote node lacks."""
    here = tmp_path / "seen.pt"
    here.write_bytes(b"")
    code = (
        "import sys; from pathlib import Path; "
        "from lungdet.detection.ray_cluster import check_every_node_sees, connect; "
        f"ray = connect({ray_cluster.address!r}, verbose=False); "
        "print('driver at', ray.util.get_node_ip_address(), flush=True); "
        f"check_every_node_sees(ray, {{'input folder': [Path({str(tmp_path)!r})], "
        f"'checkpoint': [Path({str(here)!r}), Path({str(tmp_path / 'gone.pt')!r})]}})"
    )
    done = run_predict(ray_cluster.command([sys.executable, "-c", code]), ray_cluster.env)
    assert done.returncode == 1
    assert "driver at 127.0.0.2" in done.stdout  # joined from the cluster's loopback address, not the interface's
    # The cluster answered there, inside its namespace; from this machine's own network nothing answers on its port.
    host, port = ray_cluster.address.split(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2).close()
    assert (
        f"LungdetError: checkpoint {tmp_path / 'gone.pt'}: not found on the Ray node at 127.0.0.2; put it on a "
        "filesystem every node mounts at the same path (see docs/scale.md)"
    ) in done.stderr


class FakeCluster:
    """What :func:`ray_predict.plan_actors` asks of ``ray``: the cluster's resources and its nodes'."""

    def __init__(self, *node_cpus: float, gpus: int = 0) -> None:
        self.node_cpus, self.gpus = node_cpus, gpus

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": float(sum(self.node_cpus)), **({"GPU": float(self.gpus)} if self.gpus else {})}

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": float(cpus)}} for cpus in self.node_cpus]


def plan_for(cluster: FakeCluster, *, device: str = "auto", actors: int | None = None, actor_cpus: float | None = None):
    run = ray_predict.RayRun(
        address=None,
        checkpoints=[],
        names=[],
        reader="dicom",
        passes=(),
        device=device,
        amp="none",
        batch_size=4,
        actors=actors,
        journal=Path("unused"),
        actor_cpus=actor_cpus,
    )
    return ray_predict.plan_actors(cluster, run)


@pytest.mark.parametrize(
    ("cluster", "options", "expected"),
    [
        # Two CPUs: one actor of 1.5 (torch's two threads), half a CPU left for reading.
        (FakeCluster(2), {}, (1, 1.5, False)),
        # Two one-CPU nodes (the tests' cluster): an actor fits a node, so one CPU.
        (FakeCluster(1, 1), {}, (1, 1.0, False)),
        # 16 CPUs: 8 actors sharing 15.5 CPUs, 1.75 each in quarters.
        (FakeCluster(16), {}, (8, 1.75, False)),
        (FakeCluster(8, 8, gpus=2), {}, (2, 1.0, True)),  # one actor per GPU, with one CPU
        (FakeCluster(8, 8, gpus=2), {"device": "cpu"}, (8, 1.75, False)),  # the GPUs left unused
        (FakeCluster(4), {"actors": 1, "actor_cpus": 3.0}, (1, 3.0, False)),
    ],
)
def test_the_model_actors_fit_the_cluster(cluster: FakeCluster, options: dict, expected: tuple) -> None:
    plan = plan_for(cluster, **options)
    assert (plan.actors, plan.cpus, plan.on_gpu) == expected


@pytest.mark.parametrize(
    ("cluster", "options", "message"),
    [
        (
            FakeCluster(1, 1),
            {"actors": 2},
            "--ray-actors 2 x --ray-actor-cpus 1: the Ray cluster has 2 CPU(s), and the files are read on what the "
            "model actors leave free (at least 0.5); give fewer actors or CPUs each",
        ),
        (
            FakeCluster(2, 2),
            {"actor_cpus": 3.0},
            "--ray-actor-cpus 3: the largest node of the Ray cluster has 2 CPU(s)",
        ),
        (FakeCluster(8), {"device": "cuda"}, "--device cuda: the Ray cluster has no GPU; use --device cpu or auto"),
    ],
)
def test_model_actors_ray_could_never_place_are_one_line(cluster: FakeCluster, options: dict, message: str) -> None:
    """Ray would wait for ever for resources no node has; lungdet says so before any work."""
    with pytest.raises(LungdetError) as raised:
        plan_for(cluster, **options)
    assert str(raised.value) == message


def test_cuda_on_a_local_ray_without_a_gpu_is_one_line_even_from_a_driver_without_one(
    serving_checkpoint: Path, archive: Path, tmp_path: Path
) -> None:
    """``--ray`` alone starts a Ray of its own; the driver loads the models on its CPU only to read them."""
    require_ray()
    if subprocess.run(isolated(["true"]), capture_output=True).returncode != 0:
        skip_or_fail(
            "a local Ray is tested in a network namespace of its own, and this machine refused one; run as root"
        )
    out = tmp_path / "gpu.csv"
    # In a network namespace with only loopback: a local Ray listens on every interface there is.
    done = run_predict(isolated(predict_command(serving_checkpoint, archive, out, "--ray", "--device", "cuda")))
    assert done.returncode == 2
    assert "lungdet predict: error: --device cuda: the Ray cluster has no GPU; use --device cpu or auto" in done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # no journal, no log left behind
