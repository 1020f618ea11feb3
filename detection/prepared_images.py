"""Input files read and prepared in DataLoader workers, for :func:`lungdet.detection.ensemble.predict_raw`.

Each file is decoded once and prepared once per input spec (a model's image size and
preprocessing) and TTA pass, in worker processes that come from a clean fork server, so that
decoding overlaps the forward pass; batches come in file order whatever the worker count.
The readers (:func:`read_dicom_input`, :func:`read_any_input`) are what a worker calls on a path.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.context
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lungdet.data_tools.dicom_io import read_dicom
from lungdet.data_tools.gate import refuse_unless_frontal_chest
from lungdet.data_tools.image_io import read_xray_file
from lungdet.data_tools.metadata import ImageTags, dicom_tags, laid_over
from lungdet.detection.inference import LoadedImage, prepare_input
from lungdet.detection.tta import PLAIN, TtaPass, input_size
from lungdet.errors import ImageReadError


def default_workers() -> int:
    """The cores this process may use: the loader's default worker count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# (model image size, the checkpoint's preprocessing as sorted JSON): what decides a prepared input.
InputSpec = tuple[int, str]


class PreparedImages(Dataset):
    """Each file of ``paths`` read and prepared for every input spec and every TTA pass: what a loader worker does.

    An item is a dict: ``path``, and either ``error`` (why the file cannot be read) or ``shape``
    (original rows, columns), ``tags`` (the file's view, sex and age, with ``tags``' entry for its
    patientId laid over them) and ``inputs``: for each pass's name, one uint8 ``[s, s]`` per spec,
    ``s`` the spec's size times the pass's scale. Mirroring the decoded image before preparing it
    keeps hflip TTA identical to predicting a mirrored file.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        read: Callable[[Path], LoadedImage],
        specs: Sequence[InputSpec],
        passes: Sequence[TtaPass] = (PLAIN,),
        tags: Mapping[str, ImageTags] | None = None,
    ) -> None:
        self.paths, self.read, self.passes, self.tags = list(paths), read, tuple(passes), dict(tags or {})
        # The specs' preprocessing parsed once, not once per image and pass.
        self.specs = [(size, json.loads(preprocessing)) for size, preprocessing in specs]

    def __len__(self) -> int:
        return len(self.paths)

    def _prepare(self, pixels: np.ndarray, tta_pass: TtaPass) -> list[np.ndarray]:
        return [
            prepare_input(pixels, image_size=input_size(size, tta_pass), preprocessing=preprocessing)
            for size, preprocessing in self.specs
        ]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = Path(self.paths[index])
        try:
            pixels, file_tags = self.read(path)
        except ImageReadError as error:
            return {"path": path, "error": error.reason}
        mirrored = np.ascontiguousarray(pixels[:, ::-1]) if any(tta_pass.mirror for tta_pass in self.passes) else None
        return {
            "path": path,
            "shape": tuple(int(side) for side in pixels.shape[:2]),
            "tags": laid_over(file_tags, self.tags.get(path.stem)),
            "inputs": {
                tta_pass.name: self._prepare(mirrored if tta_pass.mirror else pixels, tta_pass)
                for tta_pass in self.passes
            },
        }


@dataclass
class PreparedBatch:
    """A loader batch: the readable files' paths, original shapes, tags and stacked inputs (per pass, uint8 ``[n, s, s]`` per spec), and the unreadable ones."""

    paths: list[Path]
    shapes: list[tuple[int, int]]
    tags: list[ImageTags]
    inputs: dict[str, list[torch.Tensor]]
    unreadable: list[tuple[Path, str]]

    def pin_memory(self) -> PreparedBatch:
        """A copy whose inputs are in page-locked memory; the other fields are shared."""
        # The DataLoader calls this in its pinning thread: page-locked inputs copy to a GPU asynchronously.
        return replace(
            self, inputs={name: [tensor.pin_memory() for tensor in tensors] for name, tensors in self.inputs.items()}
        )


def collate_prepared(items: list[dict[str, Any]]) -> PreparedBatch:
    """:class:`PreparedImages` items -> a :class:`PreparedBatch`: the readable ones stacked per pass and spec, in order.

    The unreadable ones are listed apart, with their reasons.
    """
    readable = [item for item in items if "error" not in item]
    names = list(readable[0]["inputs"]) if readable else []
    return PreparedBatch(
        paths=[item["path"] for item in readable],
        shapes=[item["shape"] for item in readable],
        tags=[item["tags"] for item in readable],
        inputs={
            name: [
                torch.from_numpy(np.stack([item["inputs"][name][spec] for item in readable]))
                for spec in range(len(readable[0]["inputs"][name]))
            ]
            for name in names
        },
        unreadable=[(item["path"], item["error"]) for item in items if "error" in item],
    )


def worker_context() -> multiprocessing.context.BaseContext:
    """Where loader workers come from: a fork server, started once, that has imported this module and nothing else.

    A plain fork would copy this process mid-flight: its OpenCV and OpenMP thread pools, locks
    held by other threads (a server's inference thread, onnxruntime's pool). A worker that
    touched those hung (OpenCV's ``setNumThreads`` waited forever on a pool thread that was not
    copied). The fork server is single-threaded and clean, and forks its workers in milliseconds.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows has spawn only: slower to start, as safe
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _one_thread_per_worker(worker_id: int) -> None:
    # Each worker decodes one image at a time; OpenCV's and torch's own thread pools in every
    # worker would only fight the forward pass for the same cores.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def prepared_loader(
    paths: Sequence[Path],
    *,
    read: Callable[[Path], LoadedImage],
    specs: Sequence[InputSpec],
    passes: Sequence[TtaPass],
    tags: Mapping[str, ImageTags] | None,
    batch_size: int,
    workers: int,
    pin_memory: bool,
) -> DataLoader:
    """A loader over ``paths`` whose batches are :class:`PreparedBatch` in file order, read and prepared in ``workers`` processes (0: in this one).

    ``pin_memory`` puts the inputs in page-locked memory, for a fast copy to a GPU.
    """
    return DataLoader(
        PreparedImages(paths, read=read, specs=specs, passes=passes, tags=tags),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_prepared,
        pin_memory=pin_memory,
        worker_init_fn=_one_thread_per_worker if workers > 0 else None,
        multiprocessing_context=worker_context() if workers > 0 else None,
    )


def read_dicom_input(path: Path, *, gate: bool = True) -> LoadedImage:
    """A DICOM's pixels and its tags (view position, sex, age); with ``gate``, one whose tags say it is not a frontal chest radiograph is refused (ImageReadError)."""
    image = read_dicom(path)
    if gate:
        refuse_unless_frontal_chest(image.meta, name=path)
    return LoadedImage(image.pixels, dicom_tags(image.meta))


def read_any_input(path: Path, *, gate: bool = True) -> LoadedImage:
    """An input file's pixels and tags, told by content (``--input``, ``--image-dir``): a DICOM with any name, PNG or JPEG.

    With ``gate``, a DICOM whose tags say it is not a frontal chest radiograph is refused (ImageReadError); PNG and JPEG carry no such tags.
    """
    image = read_xray_file(path)
    if gate:
        refuse_unless_frontal_chest(image, name=path)
    return LoadedImage(image.pixels, image.tags)


INPUT_READERS = {"dicom": read_dicom_input, "any": read_any_input}


def input_reader(kind: str, *, gate: bool = True) -> Callable[[Path], LoadedImage]:
    """The reader for ``kind`` ('dicom': ``--dicom-dir``; 'any': told by content), with the frontal-chest gate on or off; picklable for loader workers."""
    return partial(INPUT_READERS[kind], gate=gate)
