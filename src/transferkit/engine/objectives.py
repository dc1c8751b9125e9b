"""Training objectives: small loss terms the one engine sums, ``L = sum_i w_i * L_i``.

An objective is an ``nn.Module`` so that any trainable part it owns (a domain classifier, learned loss weights)
is optimised, synchronised across processes and checkpointed with the model. Methods that change *what* is
trained (LoRA, adapters, masks) are strategies; methods that change *what is minimised* (anchoring, domain
alignment, multi-task weighting) are objectives.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Objective(nn.Module):
    """One loss term. Subclasses implement ``forward(model, batch, outputs) -> scalar tensor``.

    ``model`` is the unwrapped :class:`~transferkit.model.TransferModel` (call it for extra forward passes,
    e.g. on a target-domain batch), ``batch`` the dict from the data loader (``inputs``, ``labels``, ``index``,
    and ``<name>`` batches of auxiliary loaders such as ``target``), ``outputs`` the model's output on
    ``batch["inputs"]``.
    """

    name: str = "objective"

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def setup(self, model: nn.Module, train_loader: Any | None = None) -> None:
        """Called once before training (snapshot pretrained weights, estimate statistics, ...)."""

    def on_step(self, step: int, total_steps: int) -> None:
        """Called before every optimisation step (e.g. to follow a coefficient schedule)."""

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def primary_logits(outputs: Any) -> torch.Tensor:
    """The classification logits of a model output (a tensor, or an object/dict with ``logits``)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        return outputs["logits"]
    return outputs.logits


class CrossEntropyObjective(Objective):
    """Cross-entropy on the labelled examples, with optional label smoothing (Szegedy et al. 2016).

    Items labelled ``-1`` (unlabelled) are ignored.
    """

    name = "cross_entropy"

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__(weight)
        self.label_smoothing = float(label_smoothing)

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        logits = primary_logits(outputs)
        labels = batch["labels"]
        return F.cross_entropy(logits, labels, ignore_index=-1, label_smoothing=self.label_smoothing)


class ScaledObjective(Objective):
    """``factor * inner``: e.g. the task loss's ``1 - A`` under KL anchoring, without changing ``inner`` (its
    parameters, ``setup`` and ``on_step`` stay its own)."""

    def __init__(self, inner: Objective, factor: float) -> None:
        nn.Module.__init__(self)
        self.inner = inner
        self.factor = float(factor)
        self.name = inner.name

    @property
    def weight(self) -> float:  # type: ignore[override]
        return self.factor * self.inner.weight

    def setup(self, model: nn.Module, train_loader: Any | None = None) -> None:
        self.inner.setup(model, train_loader)

    def on_step(self, step: int, total_steps: int) -> None:
        self.inner.on_step(step, total_steps)

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        return self.inner(model, batch, outputs)


class ContrastiveObjective(Objective):
    """NT-Xent, the two-view contrastive loss of SimCLR (Chen et al. 2020): for ``2N`` projected, L2-normalised
    views ``z``, ``L = -1/2N sum_i log( exp(z_i . z_j(i) / t) / sum_{k != i} exp(z_i . z_k / t) )`` where ``j(i)``
    is the other view of the same item. ``outputs`` is the pair ``(z1, z2)`` of the two views' projections."""

    name = "nt_xent"

    def __init__(self, weight: float = 1.0, temperature: float = 0.2) -> None:
        super().__init__(weight)
        self.temperature = float(temperature)

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        z1, z2 = outputs
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        n = len(z1)
        similarity = z @ z.T / self.temperature
        similarity = similarity.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(similarity, targets)


class NeighbourConsistencyObjective(Objective):
    """SCAN's clustering loss (Van Gansbeke et al. 2020, eq. 2): for the cluster probabilities ``p = softmax(logits)``
    of a batch of items and of one mined nearest neighbour of each, ``L = -1/B sum_i log <p_i, p_j(i)> +
    w * sum_c pbar_c log pbar_c`` with ``pbar`` the batch's mean assignment of the items. The first term makes
    neighbours agree and be confident; the second (the negative entropy of ``pbar``, weight ``w``) keeps every
    cluster in use, so the trivial one-cluster solution is excluded. ``outputs`` is the pair (items' logits,
    neighbours' logits), each ``(B, clusters)`` or ``(B, heads, clusters)`` for several heads trained together (as
    SCAN trains them): then ``L`` is the mean of the heads' losses."""

    name = "scan"

    def __init__(self, weight: float = 1.0, entropy_weight: float = 2.0) -> None:
        super().__init__(weight)
        self.entropy_weight = float(entropy_weight)

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        items, neighbours = (F.softmax(logits.float(), dim=-1) for logits in outputs)
        if items.dim() == 2:
            items, neighbours = items.unsqueeze(1), neighbours.unsqueeze(1)
        consistency = -torch.log((items * neighbours).sum(-1).clamp_min(1e-8)).mean()  # over items and heads
        mean = items.mean(0)  # (heads, clusters)
        return consistency + self.entropy_weight * (mean * torch.log(mean.clamp_min(1e-8))).sum(-1).mean()


class ModelLossObjective(Objective):
    """The loss a library model computes itself (``outputs.loss``, e.g. masked-LM in transformers)."""

    name = "model_loss"

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        return outputs["loss"] if isinstance(outputs, dict) else outputs.loss
