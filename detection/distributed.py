"""Multi-process training under ``torchrun``: who this process is, and the few collectives training needs.

``torchrun --nproc_per_node=N`` starts N copies of ``lungdet train`` with ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` in their environment. Each process trains on its own shard of every epoch
(see :class:`lungdet.detection.data.EpochSampler`) inside DistributedDataParallel, which averages the
gradients; validation predictions are gathered on rank 0, which alone scores them and writes
files. Without those variables everything here is a no-op for one process, so the same code
path serves a laptop and an 8-GPU node.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lungdet.errors import LungdetError

T = TypeVar("T")
# A rank that dies mid-epoch would leave the others waiting in a collective for NCCL's default
# 10 minutes, or for ever with gloo; half an hour covers the longest validation of a real run.
_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# NCCL refuses two ranks on one GPU; gloo allows it, which is how one GPU hosts a 2-process smoke
# test. Real multi-GPU runs leave this unset and get NCCL.
BACKEND_VARIABLE = "LUNGDET_DIST_BACKEND"
BACKENDS = ("nccl", "gloo")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: ``rank`` of ``world_size``; ``local_rank`` picks its GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether the job has more than one process; with one, the collectives here do nothing."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, scores and writes; the others only train."""
        return self.rank == 0


def from_environment(environ: dict[str, str] | None = None) -> Distributed:
    """The job described by torchrun's variables, or a single process when they are absent."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return Distributed()
    try:
        job = Distributed(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", environ["RANK"])),
        )
    except (KeyError, ValueError) as error:
        raise LungdetError(
            f"torchrun environment is incomplete or malformed ({error}); start multi-process training with torchrun --nproc_per_node=N"
        ) from None
    if not 0 <= job.rank < job.world_size:
        raise LungdetError(
            f"RANK={job.rank} is outside WORLD_SIZE={job.world_size}; start multi-process training with torchrun"
        )
    return job


def choose_backend(device_type: str, environ: dict[str, str] | None = None) -> str:
    """NCCL between GPUs, gloo on CPU, unless ``LUNGDET_DIST_BACKEND`` names one of them."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(BACKEND_VARIABLE, "").strip().lower()
    if not chosen:
        return "nccl" if device_type == "cuda" else "gloo"
    if chosen not in BACKENDS:
        raise LungdetError(
            f"{BACKEND_VARIABLE}={environ[BACKEND_VARIABLE]!r} is not a backend; use one of {', '.join(BACKENDS)} or leave it unset"
        )
    if chosen == "nccl" and device_type != "cuda":
        raise LungdetError(
            f"{BACKEND_VARIABLE}=nccl needs CUDA GPUs but this run is on {device_type}; unset it or use gloo"
        )
    return chosen


def cuda_device_for(job: Distributed, gpu_count: int, backend: str) -> torch.device:
    """This rank's GPU: ``cuda:LOCAL_RANK``; with gloo, ranks beyond the GPU count share them round-robin."""
    if job.local_rank < gpu_count:
        return torch.device("cuda", job.local_rank)
    if backend == "gloo":
        return torch.device("cuda", job.local_rank % gpu_count)
    raise LungdetError(
        f"LOCAL_RANK={job.local_rank} but this machine has {gpu_count} CUDA GPU{'s' if gpu_count != 1 else ''}: "
        f"start torchrun with --nproc_per_node={gpu_count} or fewer (NCCL needs one GPU per process; "
        f"{BACKEND_VARIABLE}=gloo lets processes share a GPU, for smoke tests)"
    )


def start(job: Distributed, device: torch.device) -> bool:
    """Join the process group with :func:`choose_backend`'s backend; False when there is none to join or it is joined already.

    A caller that got True owns the group and leaves it with :func:`stop`; ``lungdet cv`` joins
    once and trains every fold inside it.
    """
    if not job.enabled or dist.is_initialized():
        return False
    backend = choose_backend(device.type)
    kwargs: dict[str, Any] = {"backend": backend, "timeout": _COLLECTIVE_TIMEOUT}
    if backend == "nccl":
        kwargs["device_id"] = device  # binds NCCL to this rank's GPU up front
    dist.init_process_group(**kwargs)
    return True


def stop(job: Distributed) -> None:
    """Leave the process group joined by :func:`start`; nothing for a single process or when no group is joined."""
    if job.enabled and dist.is_initialized():
        dist.destroy_process_group()


def gather_to_main(job: Distributed, value: T) -> list[T] | None:
    """Every rank's ``value`` (any picklable object) on rank 0, in rank order; None on the other ranks."""
    if not job.enabled:
        return [value]
    gathered: list[Any] = [None] * job.world_size if job.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def share_from_main(job: Distributed, value: T) -> T:
    """Rank 0's ``value`` on every rank (so every rank takes the same decisions, e.g. "stop now")."""
    if not job.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(job: Distributed, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` across ranks (image counts, loss totals)."""
    if not job.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()
