"""How close ``lungdet convert`` comes to the decoding floor (a benchmark, not a test).

On the same synthetic RSNA-shaped DICOMs (1024x1024 JPEG Baseline) it times, in one run:
(a) the floor: a bare ``pydicom.dcmread(f).pixel_array`` loop in one process;
(b) ``convert`` with one worker at the original size;
(c) ``convert`` with all cores.
and prints the ratios against the targets (b <= 1.25 x a; c >= 0.8 x cores faster than b).
Each is run ``--repeats`` times (every convert into a fresh folder) and the fastest run counts,
as timeit does: on a shared machine the slower runs measure the neighbours, not the code.

Run: ``.venv/bin/python benchmarks/convert_speed.py [--count 1000] [--image-size N] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import pydicom

from lungdet.data_tools.convert_worker import keep_freed_memory
from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.labels import read_labels
from lungdet.data_tools.synth import write_synthetic_dataset
from lungdet.data_tools.to_coco import ConvertOptions, convert_dataset


def seconds_of(function, *args, **kwargs) -> float:
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


def fastest_convert(root: Path, name: str, repeats: int, *args, **kwargs) -> float:
    return min(seconds_of(convert_dataset, *args, root / f"{name}{run}", **kwargs) for run in range(repeats))


def decode_all(paths: list[Path]) -> None:
    for path in paths:
        _ = pydicom.dcmread(path).pixel_array


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="synthetic DICOMs (default 1000)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each measurement; the fastest counts (default 3)"
    )
    parser.add_argument("--image-size", type=int, default=None, help="convert to N x N (default: original 1024)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    keep_freed_memory()  # as `lungdet convert` does, since (b) converts in this process
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        synth = write_synthetic_dataset(root / "synth", count=args.count, seed=0)
        labels = read_labels(synth.labels_csv)
        paths = find_dicoms(synth.images_dir)
        decode_all(paths[:10])  # warm the decoder and the page cache
        floor = min(seconds_of(decode_all, paths) for _ in range(args.repeats))
        one = fastest_convert(
            root,
            "one",
            args.repeats,
            synth.images_dir,
            labels,
            options=ConvertOptions(image_size=args.image_size),
            workers=1,
            progress=False,
        )
        many = fastest_convert(
            root,
            "many",
            args.repeats,
            synth.images_dir,
            labels,
            options=ConvertOptions(image_size=args.image_size),
            workers=cores,
            progress=False,
        )
    size = f"{args.image_size} px" if args.image_size else "original size"
    print(
        f"\n{datetime.date.today()} | {platform.machine()} | {cores} cores | {args.count} files, {size}, fastest of {args.repeats}\n"
    )
    print("| run | seconds | files/s |\n| --- | --- | --- |")
    for name, seconds in (
        ("(a) floor: dcmread().pixel_array, 1 process", floor),
        ("(b) convert, 1 worker", one),
        (f"(c) convert, {cores} workers", many),
    ):
        print(f"| {name} | {seconds:.2f} | {args.count / seconds:.1f} |")
    print(f"\n(b)/(a) = {one / floor:.2f} (target <= 1.25)   (b)/(c) = {one / many:.2f} (target >= {0.8 * cores:.1f})")


if __name__ == "__main__":
    main()
