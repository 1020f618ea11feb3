"""One training run's state (:class:`Run`): the model it trains, its EMA copy, optimizer, schedule, scaler and history.

A run is built fresh (from ``model.pretrained``) or from a checkpoint, and turns back into one
with :meth:`Run.state`, so that ``lungdet train --resume`` carries on exactly where it stopped,
mid-epoch included: each process's random state is saved and restored with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lungdet.detection.config import TrainConfig, config_to_dict
from lungdet.detection.distributed import Distributed
from lungdet.detection.engine import EpochProgress
from lungdet.detection.model import build_model, in_memory_layout, load_pretrained_state, uses_frozen_recipe
from lungdet.detection.optim import build_optimizer, build_scheduler, with_implementation_of
from lungdet.detection.runtime import resolve_precision

# torch.compile's backend; the tests swap in "eager", which traces the same way without generating code.
COMPILE_BACKEND = "inductor"


def compile_fixed_shape_parts(model: torch.nn.Module) -> list[str]:
    """Compile, in place, the parts of ``model`` whose input shapes never change within a run; returns their names.

    The backbone with its FPN sees the same padded batch every step, and so do the RPN and
    RetinaNet heads on its feature maps; the box heads see a different number of proposals each
    step and would recompile, so they stay as they are. ``Module.compile`` keeps parameter names,
    so checkpoints are the same as without. A smaller last batch, and eval mode, compile once more.
    """
    modules = dict(model.named_modules())
    names = [name for name in ("backbone", "rpn.head", "head") if name in modules]
    for name in names:
        modules[name].compile(dynamic=False, backend=COMPILE_BACKEND)
    return names


def rng_states(device: torch.device) -> dict[str, Any]:
    """This process's random streams that training draws from (the model samples proposals from torch's)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Set torch's CPU random state, and ``device``'s CUDA one when saved, from a :func:`rng_states` dict."""
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


class Run:
    """One training run's state: what it trains, how far it got, and how to save and restore all of it.

    A checkpoint holds everything needed to carry on exactly where it was written: the weights
    (and their EMA), optimizer, schedule, gradient scaler, completed epochs and metrics history;
    a mid-epoch checkpoint adds each process's progress through the epoch and its random state.
    ``model`` in a checkpoint is always the weights to predict with (the EMA when there is one).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        job: Distributed,
        device: torch.device,
        steps_per_epoch: int,
        checkpoint: dict[str, Any] | None,
        source: Path | None = None,
    ) -> None:
        self.config, self.job, self.device = config, job, device
        if checkpoint is not None:
            self.frozen = bool(checkpoint["frozen_batch_norm"])
            self.model = build_model(
                config.model,
                frozen_batch_norm=self.frozen,
                image_loss_weight=config.optim.image_loss_weight,
                image_class_loss_weight=config.optim.image_class_loss_weight,
            )
            self.model.load_state_dict(checkpoint.get("train_model") or checkpoint["model"])
            if checkpoint.get("epoch_progress") is None:
                where = f"after epoch {checkpoint['epoch']}"
            else:
                where = f"in epoch {checkpoint['epoch'] + 1}, after batch {checkpoint['epoch_progress'][0]['progress']['batches']}"
            self.notice = f"resumed from {source} {where}"
        else:
            pretrained_state, self.notice = load_pretrained_state(config.model)
            self.frozen = uses_frozen_recipe(pretrained_state)
            self.model = build_model(
                config.model,
                pretrained_state=pretrained_state,
                image_loss_weight=config.optim.image_loss_weight,
                image_class_loss_weight=config.optim.image_class_loss_weight,
            )
        self.precision = resolve_precision(config.amp, device)
        in_memory_layout(self.model, channels_last=config.channels_last)
        self.model.to(device)
        self.ema = None
        if config.optim.ema_decay > 0:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model,
                multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.optim.ema_decay),
                use_buffers=True,
            )
        if config.compile:
            # Only the trained model: the EMA copy just validates, and compiling it would cost another minute.
            compile_fixed_shape_parts(self.model)
        # DDP after the EMA copy: the EMA follows the plain module, and the wrapper only adds gradient averaging.
        self.trained = self.model
        if job.enabled:
            device_ids = [device.index] if device.type == "cuda" else None
            self.trained = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, steps_per_epoch=steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.dtype == torch.float16 else None
        self.history: list[dict[str, Any]] = []
        self.completed_epochs = 0
        self.epoch_progress: EpochProgress | None = None
        if checkpoint is not None:
            self._restore(checkpoint)

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights that are validated and saved for predict: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(with_implementation_of(self.optimizer, checkpoint["optimizer"]))
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None:
            if checkpoint.get("ema") is not None:
                self.ema.load_state_dict(checkpoint["ema"])
            else:
                self.ema.module.load_state_dict(self.model.state_dict())  # EMA switched on at resume: it starts here
        self.history = list(checkpoint["history"])
        self.completed_epochs = int(checkpoint["epoch"])
        per_rank = checkpoint.get("epoch_progress")
        if per_rank is not None:
            if len(per_rank) == self.job.world_size:
                mine = per_rank[self.job.rank]
                self.epoch_progress = EpochProgress(**mine["progress"])
                restore_rng_states(mine["rng"], self.device)
            else:
                self.notice += f"; it was saved by {len(per_rank)} processes, not {self.job.world_size}, so epoch {self.completed_epochs + 1} starts again"
                restore_rng_states(checkpoint["rng"], self.device)
        else:
            restore_rng_states(checkpoint["rng"], self.device)

    def state(
        self, *, preprocessing: dict[str, Any], epoch_progress: list[dict[str, Any]] | None, rng: dict[str, Any]
    ) -> dict[str, Any]:
        """The checkpoint written as ``last.pt`` (and copied to ``best.pt``), everything needed to carry on.

        ``model`` holds the weights to predict with (the EMA when there is one, the trained weights then in
        ``train_model``); then the optimizer, scheduler and scaler states, completed epochs, the config,
        ``preprocessing``, the latest epoch's tuned cut-offs (``score_threshold`` 0.5 before any validation) and
        ``val_map``, the history and ``rng``. ``epoch_progress`` is each process's progress and random state mid-epoch,
        None at an epoch's end.
        """
        last = self.history[-1] if self.history else {}
        return {
            "model": self.evaluated.state_dict(),
            "train_model": self.model.state_dict() if self.ema is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.completed_epochs,
            "epoch_progress": epoch_progress,
            "config": config_to_dict(self.config),
            "frozen_batch_norm": self.frozen,
            # How convert prepared the training images; predict repeats it on raw DICOMs.
            "preprocessing": preprocessing,
            "score_threshold": last.get("val_score_threshold", 0.5),
            # With an image head: the probability cut-off of best sensitivity + specificity on validation.
            **({"image_threshold": last["val_image_threshold"]} if "val_image_threshold" in last else {}),
            # With an image head: Platt scaling of its probability, fitted on validation (lungdet.submission.platt); the cut-off above is on the scaled one.
            **(
                {"image_calibration": [last["val_platt_slope"], last["val_platt_intercept"]]}
                if "val_platt_slope" in last
                else {}
            ),
            "val_map": last.get("val_map", -1.0),
            "history": self.history,
            "rng": rng,
        }
