"""What a node's death costs ``lungdet predict --ray``: the whole non-head node SIGKILLed mid-run (a measurement, not a test).

Starts the tests' two-node loopback cluster (tests/ray_cluster.py: a network namespace with only
loopback, so it needs root), runs ``lungdet predict --ray`` over 15 synthetic DICOMs, a corrupt one
and 4 real RSNA JPEGs, and once 3 files are stored kills the worker node's process group (its
raylet and every Ray worker on it, the model actor too when it runs there). Ray notices the node
is gone after its health check, starts the lost actor and tasks on the head, and the run finishes;
this prints where the actor was, the seconds from the kill to the end, and the rows: one per input,
none twice.

Run (as root): ``.venv/bin/python benchmarks/ray_node_kill.py``
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lungdet.data_tools.synth import write_synthetic_dataset  # noqa: E402
from tests.conftest import SHARED_DATA, write_serving_checkpoint  # noqa: E402  the tests' small model with varied boxes
from tests.ray_cluster import LoopbackCluster, command_line, descendants  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from ray_predict import predict_command  # noqa: E402  the command the throughput benchmark runs

REAL_IMAGES = SHARED_DATA / "rsna_real" / "images"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ray_node_kill") as temporary:
        work = Path(temporary)
        checkpoint = write_serving_checkpoint(work / "serving.pt")
        synth = write_synthetic_dataset(work / "synth", count=15, seed=3, positive_fraction=0.4, size=(256, 256))
        (synth.images_dir / "corrupt.dcm").write_bytes(b"DICM" * 40)
        files = sorted(synth.images_dir.glob("*.dcm")) + sorted(REAL_IMAGES.glob("*.jpg"))[:4]
        listing = work / "files.txt"
        listing.write_text("".join(f"{path}\n" for path in files))
        out, journal = work / "out.csv", work / "out.csv.ray-results.jsonl"
        cluster = LoopbackCluster.start()
        try:
            command = predict_command(
                checkpoint,
                listing,
                out,
                "--device",
                "cpu",
                "--amp",
                "none",
                "--batch-size",
                "1",
                "--ray",
                cluster.address,
            )
            started = time.monotonic()
            driver = subprocess.Popen(
                cluster.command(command), env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            while driver.poll() is None and (len(journal.read_text().splitlines()) if journal.exists() else 0) < 4:
                time.sleep(0.05)
            on_worker = [command_line(pid).split()[0] for pid in descendants(cluster.worker.pid)]
            actor_there = any("ModelWorker" in name for name in on_worker)
            os.killpg(cluster.worker.pid, signal.SIGKILL)
            killed = time.monotonic()
            _, err = driver.communicate(timeout=600)
            ended = time.monotonic()
        finally:
            cluster.stop()
        if driver.returncode != 0:
            raise SystemExit(f"predict failed:\n{err[-3000:]}")
        rows = [row[0] for row in list(csv.reader(out.open()))[1:]]
    print(
        f"worker node killed {killed - started:.1f} s into the run; the model actor was {'' if actor_there else 'not '}on it"
    )
    print(
        f"the run ended {ended - killed:.1f} s after the kill; {len(rows)} rows for {len(files)} inputs, {len(set(rows))} distinct"
    )
    print(err.strip().splitlines()[0])


if __name__ == "__main__":
    main()
