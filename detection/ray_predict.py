"""``lungdet predict --ray``: the same predictions, with the files read in Ray tasks and the models run in Ray actors.

Ray Data streams the files through two stages: CPU tasks read and prepare each file (what a loader
worker does for plain predict, :class:`~lungdet.detection.prepared_images.PreparedImages`), and a
pool of actors, each holding every model once, runs them (:func:`~lungdet.detection.ensemble.predict_batch`,
the code plain predict runs). The driver keeps the global steps: fusion, calibration and the files.

Each file's raw predictions are appended to a results journal beside the first output as they
arrive, flushed and synced batch by batch; a driver started again with the same command reads it
and sends only the files not in it. Ray retries a task or restarts an actor that dies; a file that
comes back twice is kept once (the first), so the outputs hold exactly one row per input.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from lungdet.data_tools.metadata import ImageTags
from lungdet.detection.ensemble import BatchPredictor, input_specs, predict_batch
from lungdet.detection.prepared_images import PreparedImages, collate_prepared, input_reader
from lungdet.detection.ray_cluster import check_every_node_sees, connect, largest_node_cpus, ray_output_to
from lungdet.detection.tta import TtaPass
from lungdet.errors import LungdetError
from lungdet.submission.prediction_string import Prediction
from lungdet.submission.raw_predictions import RawPrediction

RESULTS_SUFFIX = ".ray-results.jsonl"
JOURNAL_VERSION = 1
READ_CPUS = 0.5


def results_path(outputs: Sequence[Path | None]) -> Path:
    """Where the per-file results live: beside the first output given (``--out``, ``--raw``, ``--probabilities``, ``--dicom-out``)."""
    first = next(Path(path) for path in outputs if path is not None)
    return first.with_name(first.name + RESULTS_SUFFIX)


@dataclass
class ResultsJournal:
    """The per-file results of one ``predict --ray`` command, on disk: a header line, then one JSON line per file.

    A line is ``{"path", "error"}`` for an unreadable file or ``{"path", "rows"}`` with every model's
    every pass (boxes as exact floats). A line cut short by a crash is ignored and the file sent again.
    """

    path: Path
    header: dict[str, Any]
    done: dict[str, dict[str, Any]] = field(default_factory=dict)

    def open(self) -> None:
        """Read what an earlier run of the same command stored; refuse a journal another command wrote. Writes nothing."""
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if header != self.header:
            raise LungdetError(
                f"{self.path}: results of another predict command (other checkpoints, passes, metadata or inputs); "
                "delete it to start over, or run the command that wrote it"
            )
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a killed driver was writing
            self.done.setdefault(record["path"], record)

    def start(self) -> None:
        """Write the header and what :meth:`open` read, without a torn tail, so that new lines start on a line of their own."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_all()

    def _write_all(self) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        with temporary.open("w", encoding="utf-8") as stream:
            stream.write(json.dumps(self.header) + "\n")
            for record in self.done.values():
                stream.write(json.dumps(record) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, self.path)

    def append(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store ``records`` durably (flushed and synced); returns those not already stored (a retried batch's repeats are dropped)."""
        new = [record for record in records if record["path"] not in self.done]
        if not new:
            return new
        with self.path.open("a", encoding="utf-8") as stream:
            for record in new:
                stream.write(json.dumps(record) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        for record in new:
            self.done[record["path"]] = record
        return new

    def remove(self) -> None:
        """Delete the journal once the final outputs are written."""
        self.path.unlink(missing_ok=True)


def _row_record(row: RawPrediction) -> dict[str, Any]:
    return {
        "model": row.model,
        "pass": row.pass_name,
        "width": row.width,
        "height": row.height,
        "scores": row.prediction.scores.tolist(),
        "boxes": row.prediction.boxes.tolist(),
        "probability": row.probability,
    }


def _row_from_record(patient_id: str, record: Mapping[str, Any]) -> RawPrediction:
    prediction = Prediction.from_arrays(record["scores"], np.asarray(record["boxes"], dtype=np.float64).reshape(-1, 4))
    return RawPrediction(
        patient_id,
        record["model"],
        record["pass"],
        record["width"],
        record["height"],
        prediction,
        record["probability"],
    )


def prepare_files(
    batch: dict[str, np.ndarray],
    *,
    reader: str,
    specs: Sequence[Any],
    passes: Sequence[TtaPass],
    tags: Mapping[str, ImageTags] | None,
    gate: bool = True,
) -> dict[str, np.ndarray]:
    """A Ray task's share of the reading: each file read and prepared for every spec and pass, pickled for the actors."""
    images = PreparedImages(
        [Path(path) for path in batch["path"]],
        read=input_reader(reader, gate=gate),
        specs=specs,
        passes=passes,
        tags=tags,
    )
    items = [pickle.dumps(images[index], protocol=pickle.HIGHEST_PROTOCOL) for index in range(len(images))]
    return {"path": batch["path"], "item": np.array(items, dtype=object)}


class ModelWorker:
    """A Ray actor holding every model once: prepared files in, each file's raw predictions out as a JSON record."""

    def __init__(
        self,
        checkpoints: Sequence[str],
        names: Sequence[str],
        *,
        device: str,
        amp: str,
        passes: Sequence[TtaPass],
        threads: int,
    ) -> None:
        import torch

        from lungdet.detection.detector import load_detector  # in the actor, where the models run

        # Ray sets OMP_NUM_THREADS to the actor's whole CPUs; a share like 1.5 rounds up here, as plain predict's
        # forward pass shares its cores with the loader workers.
        torch.set_num_threads(threads)

        self.detectors: list[BatchPredictor] = [
            load_detector(Path(path), device=device, amp=amp) for path in checkpoints
        ]
        self.names, self.passes = list(names), tuple(passes)
        _, self.spec_of = input_specs(self.detectors)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch of prepared files through every model and pass."""
        prepared = collate_prepared([pickle.loads(item) for item in batch["item"]])
        rows = predict_batch(self.detectors, self.names, prepared, spec_of=self.spec_of, passes=self.passes)
        # Stems are unique (predict checks), and predict_batch gives each file's rows in model, then pass order.
        by_stem = {path.stem: {"path": str(path), "rows": []} for path in prepared.paths}
        for row in rows:
            by_stem[row.patient_id]["rows"].append(_row_record(row))
        records = {record["path"]: record for record in by_stem.values()}
        for path, reason in prepared.unreadable:
            records[str(path)] = {"path": str(path), "error": reason}
        return {"record": np.array([json.dumps(records[str(path)]) for path in batch["path"]], dtype=object)}


@dataclass(frozen=True)
class RayRun:
    """How ``predict --ray`` runs: the cluster, the actors and what they load, and the journal's place."""

    address: str | None
    checkpoints: Sequence[Path]
    names: Sequence[str]
    reader: str
    passes: Sequence[TtaPass]
    device: str
    amp: str
    batch_size: int
    actors: int | None
    journal: Path
    actor_cpus: float | None = None
    gate: bool = True  # the frontal-chest check on DICOM tags (off with --allow-any-view)
    verbose: bool = False
    progress: bool = True


def predict_raw_on_ray(
    run: RayRun,
    detectors: Sequence[BatchPredictor],
    paths: Sequence[Path],
    *,
    tags: Mapping[str, ImageTags] | None = None,
) -> tuple[list[RawPrediction], list[tuple[Path, str]], ResultsJournal]:
    """What :func:`~lungdet.detection.ensemble.predict_raw` returns, computed on a Ray cluster, and the journal it kept.

    ``detectors`` are the driver's own copies, for the input specs; the actors load ``run.checkpoints`` themselves.
    Files whose results ``run.journal`` already holds are not sent again.
    """
    header = {
        "version": JOURNAL_VERSION,
        "checkpoints": [str(Path(path).resolve()) for path in run.checkpoints],
        "passes": [tta_pass.name for tta_pass in run.passes],
        "amp": run.amp,
        "metadata": _tags_digest(tags),
        "inputs": len(paths),
        "gate": run.gate,
    }
    journal = ResultsJournal(run.journal, header)
    journal.open()
    todo = [path for path in paths if str(path) not in journal.done]
    if journal.done:
        print(f"lungdet predict: {len(paths) - len(todo)} of {len(paths)} files already done in {run.journal}")
    if todo:
        log = run.journal.with_name(run.journal.name + ".ray.log")
        with ray_output_to(log, command="predict", verbose=run.verbose) as terminal:
            ray = connect(run.address, verbose=run.verbose)
            try:
                if run.address is not None:  # a Ray started here for this command runs on this machine's files
                    check_every_node_sees(
                        ray,
                        # Every input's folder, not every file: an archive's million files would be a million lookups a node.
                        {"checkpoint": run.checkpoints, "input folder": sorted({Path(path).parent for path in todo})},
                    )
                plan = plan_actors(ray, run)
                journal.start()  # only now: a command refused above leaves no journal behind
                _stream(
                    ray,
                    run,
                    plan,
                    detectors,
                    todo,
                    journal,
                    tags=tags,
                    total=len(paths),
                    already=len(paths) - len(todo),
                    terminal=terminal,
                )
            finally:
                ray.shutdown()
    rows: list[RawPrediction] = []
    bad: list[tuple[Path, str]] = []
    for path in paths:
        record = journal.done[str(path)]
        if "error" in record:
            bad.append((Path(path), record["error"]))
        else:
            rows.extend(_row_from_record(Path(path).stem, row) for row in record["rows"])
    return rows, bad, journal


def _tags_digest(tags: Mapping[str, ImageTags] | None) -> str | None:
    """A short fingerprint of ``--metadata``'s tags, so that a journal is not resumed with other tags for the image head."""
    if not tags:
        return None
    text = json.dumps({key: repr(value) for key, value in sorted(tags.items())})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class ActorPlan:
    """The model actors: how many, the CPUs each asks Ray for, and whether each takes a GPU."""

    actors: int
    cpus: float
    on_gpu: bool


def plan_actors(ray: Any, run: RayRun) -> ActorPlan:
    """The model actors for this cluster; a one-line error where the cluster cannot run them.

    Without ``--ray-actor-cpus`` an actor on a CPU-only cluster takes its share of the CPUs that the
    reading leaves (up to what a node has): on two CPUs one actor of 1.5, so that torch runs two
    threads as in plain predict, where Ray's one CPU would give it one.
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if run.device.startswith("cuda") and not gpus:
        raise LungdetError(f"--device {run.device}: the Ray cluster has no GPU; use --device cpu or auto")
    on_gpu = gpus > 0 and run.device != "cpu"
    cpus = resources.get("CPU", 0)
    widest = largest_node_cpus(ray)
    actors = run.actors or (gpus if on_gpu else max(1, int(cpus) // 2))
    actor_cpus = run.actor_cpus
    if actor_cpus is None:
        share = min(widest - READ_CPUS, (cpus - READ_CPUS) / actors)
        actor_cpus = 1.0 if on_gpu else max(1.0, math.floor(share * 4) / 4)  # in quarters, a figure Ray keeps exactly
    if actor_cpus > widest:
        raise LungdetError(
            f"--ray-actor-cpus {actor_cpus:g}: the largest node of the Ray cluster has {widest:g} CPU(s)"
        )
    if not on_gpu and actors * actor_cpus + READ_CPUS > cpus:
        # Actors hold their CPUs for good; with less than a reading task's share left, the files are never
        # read and Ray waits for ever.
        raise LungdetError(
            f"--ray-actors {actors} x --ray-actor-cpus {actor_cpus:g}: the Ray cluster has {cpus:g} CPU(s), and the "
            f"files are read on what the model actors leave free (at least {READ_CPUS:g}); give fewer actors or CPUs each"
        )
    return ActorPlan(actors, actor_cpus, on_gpu)


def _stream(
    ray: Any,
    run: RayRun,
    plan: ActorPlan,
    detectors: Sequence[BatchPredictor],
    todo: Sequence[Path],
    journal: ResultsJournal,
    *,
    tags: Mapping[str, ImageTags] | None,
    total: int,
    already: int,
    terminal: TextIO,
) -> None:
    """Build the two stages, run them, and store each batch of results as it comes back."""
    specs, _ = input_specs(detectors)
    dataset = ray.data.from_items([{"path": str(path)} for path in todo])
    dataset = dataset.map_batches(
        prepare_files,
        batch_size=run.batch_size,
        fn_kwargs={
            "reader": run.reader,
            "specs": specs,
            "passes": tuple(run.passes),
            "tags": dict(tags or {}),
            "gate": run.gate,
        },
        # Half a CPU, not the actors' one: Ray Data fuses two stages that ask for the same resources, and
        # the reading would then run inside the model actors instead of in tasks of its own.
        num_cpus=READ_CPUS,
    )
    dataset = dataset.map_batches(
        ModelWorker,
        batch_size=run.batch_size,
        fn_constructor_kwargs={
            "checkpoints": [str(Path(path).resolve()) for path in run.checkpoints],
            "names": list(run.names),
            "device": run.device,
            "amp": run.amp,
            "passes": tuple(run.passes),
            "threads": math.ceil(plan.cpus),
        },
        # Ray Data restarts an actor whose process dies and sends its batches again (max_restarts and
        # max_task_retries are -1 for an actor pool unless set); tasks are retried as Ray retries any task.
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus,
        num_gpus=1 if plan.on_gpu else 0,
    )
    refused = 0
    started = time.monotonic()
    with tqdm(
        total=total,
        initial=already,
        desc="predict",
        unit="file",
        file=terminal,
        disable=None if run.progress else True,
    ) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            new = journal.append([json.loads(record) for record in batch["record"]])
            refused += sum("error" in record for record in new)
            bar.update(len(new))
    seconds = time.monotonic() - started
    rate = len(todo) / seconds if seconds else float("inf")
    print(
        f"lungdet predict: {len(todo)} files on Ray ({plan.actors} model actor(s) of {plan.cpus:g} CPU(s) each) in {seconds:.1f} s, "
        f"{rate:.1f} files/s, {refused} refused",
        file=terminal,
    )
