"""Unsupervised model-selection signals on unlabelled target data (target labels are never used).

* ``entropy``: mean prediction entropy ``-sum_k p_k log p_k`` on target items (lower = more confident;
  Morerio et al. 2018 select by it). Can be fooled by confident collapse, hence reported next to the others.
* ``snd``: soft neighbourhood density (Saito et al. 2021, "Tune it the right way"): L2-normalised target
  probability vectors, cosine similarities with the diagonal removed, a softmax per row at temperature
  ``tau = 0.05``, and the mean entropy of those rows (higher = denser clusters = better).
* ``source-val``: the source validation accuracy (the usual, adaptation-blind choice).

:func:`selection_evaluate_fn` builds an engine ``evaluate_fn`` that reports source validation loss/accuracy
and the target signals each epoch, so ``monitor`` can early-stop and select the epoch on any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from transferkit.engine.objectives import primary_logits
from transferkit.engine.placement import module_device, to_device
from transferkit.engine.trainer import classification_metrics

if TYPE_CHECKING:
    from transferkit.data.base import LabeledData
    from transferkit.engine.context import RunContext
    from transferkit.model import TransferModel

SIGNALS = ("snd", "entropy", "source-val")
SELECTION_SUBSET = 512  # unlabelled target items scored each epoch for the selection signal
#: the engine's monitored metric name and direction for each signal
MONITORS: dict[str, tuple[str, str]] = {
    "snd": ("target_snd", "max"),
    "entropy": ("target_entropy", "min"),
    "source-val": ("accuracy", "max"),
}


def prediction_entropy(probabilities: torch.Tensor) -> float:
    """Mean Shannon entropy (nats) of the rows of a probability matrix."""
    p = probabilities.clamp_min(1e-12)
    return float(-(p * p.log()).sum(dim=1).mean())


def soft_neighbourhood_density(probabilities: torch.Tensor, temperature: float = 0.05) -> float:
    """SND of Saito et al. (2021) on ``(n, k)`` target probabilities (needs n >= 2)."""
    normalised = F.normalize(probabilities.float(), dim=1)
    similarity = normalised @ normalised.T
    similarity.fill_diagonal_(float("-inf"))
    neighbours = torch.softmax(similarity / temperature, dim=1)
    return prediction_entropy(neighbours)


@torch.no_grad()
def target_probabilities(model: Any, loader: DataLoader, forward_fn: Callable) -> torch.Tensor:
    device = module_device(model)
    chunks = []
    for batch in loader:
        batch = to_device(batch, device)
        chunks.append(torch.softmax(primary_logits(forward_fn(model, batch)).float(), dim=-1).cpu())
    return torch.cat(chunks)


def target_signals(probabilities: torch.Tensor) -> dict[str, float]:
    return {"target_entropy": prediction_entropy(probabilities),
            "target_snd": soft_neighbourhood_density(probabilities)}


def selection_evaluate_fn(target_loader: DataLoader) -> Callable:
    """An engine ``evaluate_fn``: source validation metrics plus ``target_entropy`` and ``target_snd``."""

    def evaluate(model: Any, loader: DataLoader, accelerator: Any, forward_fn: Callable) -> dict[str, float]:
        metrics = classification_metrics(model, loader, accelerator, forward_fn) if loader is not None else {}
        metrics.update(target_signals(target_probabilities(model, target_loader, forward_fn)))
        return metrics

    return evaluate


def label_free_selection(context: RunContext, model: TransferModel, target: LabeledData, signal: str) -> RunContext:
    """``context`` monitoring ``signal`` (on a seeded subset of the unlabelled target, or source validation) for
    early stopping and the epoch choice: no target labels are used."""
    rng = np.random.default_rng(context.train.seed)
    subset = target if len(target) <= SELECTION_SUBSET else \
        target.subset(np.sort(rng.choice(len(target), SELECTION_SUBSET, replace=False)))
    monitor = MONITORS[signal]
    context.notes.append(f"epoch selection and early stopping on '{signal}' ({monitor[0]}, {monitor[1]}); no target "
                         "labels used")
    return replace(context, evaluate_fn=selection_evaluate_fn(context.loader(subset, model.backbone, train=False)),
                   monitor=monitor)
