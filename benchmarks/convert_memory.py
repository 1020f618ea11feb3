"""Peak memory of ``lungdet convert`` against the number of files (a benchmark, not a test).

Converts N1 and N2 synthetic DICOMs (small images, so that generating 20,000 takes minutes,
not an hour) in fresh ``lungdet convert`` processes with one worker, and prints each run's
peak resident memory and the ratio. Target: converting 20,000 files peaks within 1.2x of 1,000.

Run: ``.venv/bin/python benchmarks/convert_memory.py [--small 1000] [--large 20000] [--size 256]``
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_tools.synth import write_synthetic_dataset


def peak_rss_mib_of_child(command: list[str]) -> tuple[float, float]:
    """Run ``command`` in a new process; return (its peak RSS in MiB, seconds)."""
    start = time.perf_counter()
    # A wrapper process reports only its own child's peak, unaffected by earlier runs.
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    output = subprocess.run([sys.executable, "-c", wrapper, *command], check=True, capture_output=True, text=True).stdout
    return int(output.split()[-1]) / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--size", type=int, default=256, help="synthetic image side in pixels (default 256)")
    args = parser.parse_args()
    lungdet = str(Path(sys.executable).with_name("lungdet"))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for count in (args.small, args.large):
            synth = write_synthetic_dataset(root / f"synth{count}", count=count, seed=0, size=(args.size, args.size), progress=True)
            command = [lungdet, "convert", "--dicom-dir", str(synth.images_dir), "--labels", str(synth.labels_csv),
                       "--out", str(root / f"out{count}"), "--workers", "1"]
            rows.append((count, *peak_rss_mib_of_child(command)))
    print(f"\n{datetime.date.today()} | {args.size}x{args.size} synthetic DICOMs | 1 worker\n")
    print("| files | peak RSS (MiB) | seconds |\n| --- | --- | --- |")
    for count, rss, seconds in rows:
        print(f"| {count} | {rss:.0f} | {seconds:.0f} |")
    print(f"\nratio {rows[1][1] / rows[0][1]:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
