"""The training loop's jobs besides optimisation, one small callback each.

The loop (``Trainer.fit``) trains an epoch, validates, appends the epoch's row to the history and then calls
every callback's ``on_epoch_end`` in order: :class:`BestEpoch` (model selection), :class:`PlateauSchedule`
(halve the learning rate when validation stalls), :class:`EarlyStopping`, :class:`EpochLog`, the callbacks a
caller adds (e.g. checkpoint averaging), :class:`Checkpointing` (once the epoch's state is final) and a user's
:class:`EpochFunction`. :class:`Tracing` writes a per-step trace. Callbacks share the mutable
:class:`TrainState`, which is all a checkpoint needs besides the weights, the optimiser, the RNGs and the
tensors a callback keeps (``state_tensors``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transferkit.engine.trainer import TrainLoop

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything about a run's progress that is not a tensor of the model or optimiser."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimisation steps taken
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the last validation gain
    best_state: dict[str, torch.Tensor] | None = None  # the best epoch's weights (of the loss module)
    plateau_scale: float = 1.0  # learning-rate factor of the plateau schedule
    stop: bool = False
    resumed_from: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "history": self.history, "best_metric": self.best_metric,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "plateau_scale": self.plateau_scale}

    def load_json(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        best = state["best_metric"]
        self.best_metric = None if best is None else float(best)
        self.best_epoch, self.bad_epochs = int(state["best_epoch"]), int(state["bad_epochs"])
        self.plateau_scale = float(state["plateau_scale"])


class Callback:
    """Hooks of the training loop (each optional)."""

    def on_train_begin(self, loop: TrainLoop) -> None:
        """After the optimiser is built and a checkpoint (if any) restored."""

    def on_step_end(self, loop: TrainLoop, batch: dict[str, Any]) -> None:
        """After every optimisation step."""

    def on_epoch_end(self, loop: TrainLoop, row: dict[str, Any]) -> None:
        """After an epoch's training and validation; ``row`` is its history entry."""

    def on_train_end(self, loop: TrainLoop) -> None:
        """After the last epoch (not after an exception)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors this callback needs to continue after a resume (saved in every checkpoint); usually none."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned (called before ``on_train_begin`` of a resumed run)."""


class BestEpoch(Callback):
    """Model selection: remember the weights of the epoch with the best validation ``metric`` (``mode`` max or
    min) and restore them at the end. Without validation data every epoch counts as the best so far."""

    def __init__(self, metric: str, mode: str) -> None:
        self.metric, self.mode = metric, mode

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.mode == "max" else value < best)

    def on_epoch_end(self, loop: TrainLoop, row: dict[str, Any]) -> None:
        state = loop.state
        value = row.get(f"val_{self.metric}")
        if value is None or self.better(value, state.best_metric):
            state.best_metric, state.best_epoch, state.bad_epochs = value, row["epoch"], 0
            state.best_state = {k: v.detach().cpu().clone() for k, v in loop.inner.state_dict().items()}
        else:
            state.bad_epochs += 1

    def on_train_end(self, loop: TrainLoop) -> None:
        if loop.state.best_state is not None:
            loop.inner.load_state_dict(loop.state.best_state)


class PlateauSchedule(Callback):
    """Halve the learning rate after every ``patience`` epochs without validation gain (``--schedule plateau``)."""

    def __init__(self, patience: int, metric: str) -> None:
        self.patience, self.metric = max(1, patience), metric

    def on_epoch_end(self, loop: TrainLoop, row: dict[str, Any]) -> None:
        if loop.state.bad_epochs and loop.state.bad_epochs % self.patience == 0:
            loop.state.plateau_scale *= 0.5
            logger.info("validation %s stalled: learning rate halved", self.metric)


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs without validation gain (0: never)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def _due(self, loop: TrainLoop) -> bool:
        return bool(self.patience and loop.state.bad_epochs >= self.patience)

    def on_train_begin(self, loop: TrainLoop) -> None:
        loop.state.stop = self._due(loop)  # a resumed run that had already decided to stop

    def on_epoch_end(self, loop: TrainLoop, row: dict[str, Any]) -> None:
        loop.state.stop = self._due(loop)
        if loop.state.stop and loop.state.epoch < loop.config.epochs:
            logger.info("early stopping: no validation gain for %d epochs", self.patience)


class EpochLog(Callback):
    """One log line per epoch (main process): the training and validation metrics, learning rate, time."""

    def on_epoch_end(self, loop: TrainLoop, row: dict[str, Any]) -> None:
        if not loop.accelerator.is_main_process:
            return
        parts = [f"epoch {row['epoch']}/{loop.config.epochs}"]
        for key in sorted(row):
            if key.startswith(("train_", "val_")) and isinstance(row[key], float):
                parts.append(f"{key.replace('_', ' ', 1)} {row[key]:.4f}")
        parts.append(f"lr {row['lr']:.2e}")
        parts.append(f"{row['seconds']:.1f} s")
        logger.info("  ".join(parts))


class Checkpointing(Callback):
    """A checkpoint after every epoch in ``folder`` (see :mod:`transferkit.engine.checkpoint`), and
    :meth:`restore` to continue from it."""

    def __init__(self, folder: str | Path) -> None:
        from transferkit.engine.checkpoint import checkpoint_file

        self.folder = Path(folder)
        self.path = checkpoint_file(self.folder)

    def restore(self, loop: TrainLoop) -> bool:
        """Load the checkpoint into the loop (True), or find none (False). Refuses unusable files in one line."""
        from transferkit.engine.checkpoint import (
            corrupt,
            join_optimizer_state,
            load_checkpoint,
            refuse_legacy,
        )
        from transferkit.engine.placement import set_rng_states

        refuse_legacy(self.folder)
        if not self.path.exists():
            return False
        sections, saved = load_checkpoint(self.path)
        try:
            loop.inner.load_state_dict(sections["loss_module"])
            loop.optimizer.load_state_dict(join_optimizer_state(saved["optimizer"], sections["optimizer"],
                                                                loop.optimizer.state_dict()))
            loop.state.load_json(saved["state"])
            loop.state.best_state = sections["best_state"] if saved["has_best_state"] else None
            for i, callback in enumerate(loop.callbacks):
                if f"callback{i}" in sections:
                    callback.load_state_tensors(sections[f"callback{i}"])
            set_rng_states(saved["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise corrupt(self.path, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        loop.state.resumed_from = loop.state.epoch
        logger.info("resuming from the checkpoint after epoch %d", loop.state.epoch)
        return True

    def on_epoch_end(self, loop: TrainLoop, row: dict[str, Any]) -> None:
        from transferkit.engine.checkpoint import save_checkpoint, split_optimizer_state
        from transferkit.engine.placement import rng_states

        if loop.accelerator.is_main_process:
            optimizer, optimizer_tensors = split_optimizer_state(loop.optimizer.state_dict())
            state = loop.state
            sections = {"loss_module": loop.inner.state_dict(), "optimizer": optimizer_tensors,
                        "best_state": state.best_state or {},
                        **{f"callback{i}": tensors for i, callback in enumerate(loop.callbacks)
                           if (tensors := callback.state_tensors())}}
            save_checkpoint(self.path, sections, {"state": state.to_json(), "optimizer": optimizer,
                                                  "rng": rng_states(), "has_best_state": state.best_state is not None})
        loop.accelerator.wait_for_everyone()


class EpochFunction(Callback):
    """Call ``function(row)`` after every epoch on the main process (``Trainer(epoch_callback=...)``)."""

    def __init__(self, function: Callable[[dict[str, Any]], None]) -> None:
        self.function = function

    def on_epoch_end(self, loop: TrainLoop, row: dict[str, Any]) -> None:
        if loop.accelerator.is_main_process:
            self.function(row)


def params_digest(module: nn.Module) -> str:
    h = hashlib.sha1()
    for _, p in sorted(module.named_parameters()):
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


class Tracing(Callback):
    """``TRANSFERKIT_TRACE_DIR``: per-process JSONL of batch indices and weight digests after every step."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.file: Any = None

    @classmethod
    def from_environment(cls) -> Tracing | None:
        folder = os.environ.get("TRANSFERKIT_TRACE_DIR")
        return cls(folder) if folder else None

    def on_train_begin(self, loop: TrainLoop) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file = open(self.folder / f"rank{loop.accelerator.process_index}.jsonl", "w")  # noqa: SIM115

    def on_step_end(self, loop: TrainLoop, batch: dict[str, Any]) -> None:
        self.file.write(json.dumps({"rank": loop.accelerator.process_index, "epoch": loop.state.epoch,
                                    "step": loop.state.step, "index": batch["index"].tolist(),
                                    "params": params_digest(loop.inner.model)}) + "\n")

    def on_train_end(self, loop: TrainLoop) -> None:
        self.file.close()
