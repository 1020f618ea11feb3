"""Peak memory of ``lungdet convert`` against the number of files (a benchmark, not a test).

Converts N1 and N2 synthetic DICOMs (small images, so that generating 20,000 takes minutes,
not an hour) in fresh ``lungdet convert`` processes with one worker, and prints each run's
peak resident memory and the ratio. Target: converting 20,000 files peaks within 1.2x of 1,000.

Two comparisons, because the labels file is an input held in memory whatever the number of
files: (1) the same 20,000-patient labels file for both runs, as when a user converts part of
the Kaggle set with the full labels CSV: the growth due to the number of files alone; (2) a
labels file sized to the files (1,000 patients against 20,000): files and labels growing together.

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

from lungdet.data_tools.synth import write_synthetic_dataset


def peak_rss_mib_of_child(command: list[str]) -> tuple[float, float]:
    """Run ``command`` in a new process; return (its peak RSS in MiB, seconds)."""
    start = time.perf_counter()
    # A wrapper process reports only its own child's peak, unaffected by earlier runs.
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    output = subprocess.run(
        [sys.executable, "-c", wrapper, *command], check=True, capture_output=True, text=True
    ).stdout
    return int(output.split()[-1]) / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--size", type=int, default=256, help="synthetic image side in pixels (default 256)")
    args = parser.parse_args()
    lungdet = str(Path(sys.executable).with_name("lungdet"))
    rows = []

    def convert(name: str, dicom_dir: Path, labels_csv: Path, files: int, label_rows: int) -> None:
        command = [
            lungdet,
            "convert",
            "--dicom-dir",
            str(dicom_dir),
            "--labels",
            str(labels_csv),
            "--out",
            str(root / name),
            "--workers",
            "1",
        ]
        rows.append((files, label_rows, *peak_rss_mib_of_child(command)))

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        large = write_synthetic_dataset(
            root / "large", count=args.large, seed=0, size=(args.size, args.size), progress=True
        )
        small = write_synthetic_dataset(
            root / "small", count=args.small, seed=0, size=(args.size, args.size), progress=True
        )
        # The first N of the large set's files, converted against the large labels file.
        subset = root / "subset"
        subset.mkdir()
        for path in sorted(large.images_dir.glob("*.dcm"))[: args.small]:
            (subset / path.name).symlink_to(path)
        convert("out_subset", subset, large.labels_csv, args.small, args.large)
        convert("out_large", large.images_dir, large.labels_csv, args.large, args.large)
        convert("out_small", small.images_dir, small.labels_csv, args.small, args.small)
    print(f"\n{datetime.date.today()} | {args.size}x{args.size} synthetic DICOMs | 1 worker\n")
    print("| files | patients in labels | peak RSS (MiB) | seconds |\n| --- | --- | --- | --- |")
    for files, label_rows, rss, seconds in rows:
        print(f"| {files} | {label_rows} | {rss:.0f} | {seconds:.0f} |")
    print(f"\n(1) same labels file: ratio {rows[1][2] / rows[0][2]:.2f} (target <= 1.2)")
    print(f"(2) labels sized to the files: ratio {rows[1][2] / rows[2][2]:.2f}")


if __name__ == "__main__":
    main()
