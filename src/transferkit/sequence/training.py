"""Training practice for sequence models, plugged into the one engine (``transferkit.engine.Trainer``).

* :class:`SequenceCrossEntropy`: token-level cross-entropy ignoring padding, with label smoothing
  (Szegedy et al. 2016): the target distribution is ``(1 - eps) * onehot + eps / V``.
* Gradient clipping and the noam warm-up schedule ``lr = d^-0.5 min(step^-0.5, step warmup^-1.5)`` are engine
  settings (``TrainConfig(grad_clip=..., schedule="noam", noam_d_model=d, warmup_steps=w, lr=1.0)``).
* :class:`CheckpointAverager`: keeps the weights after each of the last K epochs and averages them (as in
  Vaswani et al. 2017, who averaged the last checkpoints): a cheap ensemble along the training trajectory.
* Truncated back-propagation through time lives in :mod:`transferkit.sequence.charlm`.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transferkit.engine.callbacks import Callback
from transferkit.engine.objectives import Objective

PAD_ID = 0


class SequenceCrossEntropy(Objective):
    """Mean cross-entropy of ``(B, T, V)`` logits against ``batch[target_key]`` ``(B, T)``, padding ignored."""

    name = "token_cross_entropy"

    def __init__(self, target_key: str = "targets", label_smoothing: float = 0.0, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.target_key = target_key
        self.label_smoothing = float(label_smoothing)

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs["logits"]
        targets = batch[self.target_key]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD_ID,
                               label_smoothing=self.label_smoothing)


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors (integer buffers are taken from the last state)."""
    if not states:
        raise ValueError("no states to average")
    averaged = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            averaged[key] = torch.stack([s[key].float() for s in states]).mean(0).to(last.dtype)
        else:
            averaged[key] = last.clone()
    return averaged


class CheckpointAverager(Callback):
    """An engine callback that snapshots ``model`` after every epoch and keeps the last ``k`` (saved with the
    engine's checkpoint, so a resumed run averages the same epochs)."""

    def __init__(self, model: nn.Module, k: int) -> None:
        self.model = model
        self.snapshots: deque[dict[str, torch.Tensor]] = deque(maxlen=max(1, k))

    def on_epoch_end(self, loop: Any, row: dict[str, Any]) -> None:
        self.snapshots.append({k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{i}/{key}": value for i, snapshot in enumerate(self.snapshots) for key, value in snapshot.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        snapshots: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            index, key = name.split("/", 1)
            snapshots.setdefault(int(index), {})[key] = value
        self.snapshots.clear()
        self.snapshots.extend(snapshots[i] for i in sorted(snapshots))

    def averaged(self) -> dict[str, torch.Tensor]:
        return average_state_dicts(list(self.snapshots))
