"""Several tasks on one shared trunk: combined loss (fixed, uncertainty, GradNorm) and per-task metrics.

Combining ``T`` task losses ``L_i``:

* ``fixed``: ``L = sum_i w_i L_i`` with user-given weights.
* ``uncertainty`` (Kendall, Gal & Cipolla 2018): each task has a learned log-variance ``s_i = log sigma_i^2``
  and ``L = sum_i c_i exp(-s_i) L_i + s_i / 2`` (``c_i = 1/2`` for a Gaussian likelihood, i.e. MSE, else 1):
  noisy tasks get a large ``sigma_i`` and a small weight, and the ``s_i / 2`` term stops ``sigma`` growing
  without bound.
* ``gradnorm`` (Chen et al. 2018): learned weights ``w_i`` (renormalised to sum to T) are moved so that each
  task's gradient norm ``G_i = ||d(w_i L_i)/dz||`` on the shared representation ``z`` approaches
  ``mean(G) * r_i^alpha``, where ``r_i`` is the task's relative inverse training rate
  ``(L_i(t)/L_i(0)) / mean_j(L_j(t)/L_j(0))``. Here ``z`` is the trunk's embedding (the last shared tensor),
  which also works when the trunk is frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.engine.objectives import Objective
from transferkit.engine.placement import module_device, to_device, to_numpy
from transferkit.model import TaskSpec
from transferkit.tasks import task_loss

logger = logging.getLogger(__name__)

WEIGHTINGS = ("fixed", "uncertainty", "gradnorm")
LOG_VARIANCE_RATE = 10.0  # uncertainty weighting: learning-rate multiplier of the log-variances (see __init__)


def target_key(task: TaskSpec) -> str:
    """The batch entry holding a task's targets (``labels`` for the dataset's own label)."""
    return "labels" if task.options.get("column") is None else f"target:{task.name}"


def task_outputs(outputs: Any) -> dict[str, torch.Tensor]:
    return outputs if isinstance(outputs, dict) else outputs.outputs


class MultiTaskObjective(Objective):
    """The combined loss of every task of a TransferModel (see the module docstring for the weightings)."""

    name = "tasks"

    def __init__(self, tasks: Sequence[TaskSpec], weighting: str = "fixed", weights: Sequence[float] | None = None,
                 alpha: float = 1.5) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}")
        self.tasks = list(tasks)
        self.weighting = weighting
        self.alpha = float(alpha)
        count = len(self.tasks)
        self.register_buffer("fixed_weights", torch.tensor(list(weights) if weights else [1.0] * count))
        if weighting == "uncertainty":
            # s_i = LOG_VARIANCE_RATE * raw_i: Adam moves a parameter by about lr per step, so without the factor s
            # would take thousands of steps at fine-tuning learning rates to reach its optimum log(2 c_i L_i)
            # (a small pinball loss wants a weight of 10 or more) and the weights would stay near 1.
            self.log_variance_raw = nn.Parameter(torch.zeros(count))
            self.register_buffer("likelihood_factors", torch.tensor(
                [0.5 if t.kind == "regress" and t.options.get("loss") == "mse" else 1.0 for t in self.tasks]))
        if weighting == "gradnorm":
            self.task_weights = nn.Parameter(torch.ones(count))
            self.register_buffer("initial_losses", torch.zeros(count))

    @property
    def log_variances(self) -> torch.Tensor:
        """The learned ``s_i = log sigma_i^2`` of uncertainty weighting."""
        return LOG_VARIANCE_RATE * self.log_variance_raw

    def task_losses(self, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        """``(T,)`` losses, one per task, on this batch."""
        heads = task_outputs(outputs)
        return torch.stack([task_loss(t, heads[t.name], batch[target_key(t)]) for t in self.tasks])

    def current_weights(self) -> torch.Tensor:
        """The effective weight of each task's loss right now."""
        if self.weighting == "uncertainty":
            return (self.likelihood_factors * torch.exp(-self.log_variances)).detach()
        if self.weighting == "gradnorm":
            return self.task_weights.detach().clone()
        return self.fixed_weights.clone()

    def on_step(self, step: int, total_steps: int) -> None:
        if self.weighting == "gradnorm":  # renormalise after the previous update: sum_i w_i = T
            with torch.no_grad():
                w = self.task_weights.clamp_min(1e-3)
                self.task_weights.copy_(w * len(self.tasks) / w.sum())

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        losses = self.task_losses(batch, outputs)
        if self.weighting == "uncertainty":
            s = self.log_variances
            return (self.likelihood_factors * torch.exp(-s) * losses + 0.5 * s).sum()
        if self.weighting == "gradnorm":
            return (self.task_weights.detach() * losses).sum() + self._gradnorm_term(model, batch, outputs, losses)
        return (self.fixed_weights * losses).sum()

    def _gradnorm_term(self, model: nn.Module, batch: dict[str, Any], outputs: Any,
                       losses: torch.Tensor) -> torch.Tensor:
        """``sum_i |w_i g_i - mean(w g) r_i^alpha|`` with ``g_i = ||dL_i/dz||`` held constant: moves only ``w``."""
        if not self.training:
            return losses.sum() * 0.0
        with torch.no_grad():
            if bool((self.initial_losses == 0).all()):
                self.initial_losses.copy_(losses.detach().clamp_min(1e-8))
        z = outputs.features.detach().requires_grad_(True)
        with torch.enable_grad():
            head_losses = self.task_losses(batch, model.forward_head(z))
            norms = torch.stack([
                torch.autograd.grad(loss, z, retain_graph=True, allow_unused=True)[0].norm()
                if loss.requires_grad else loss.new_zeros(()) for loss in head_losses
            ]).detach()
        grad_norms = self.task_weights * norms
        ratios = losses.detach() / self.initial_losses
        relative = ratios / ratios.mean().clamp_min(1e-12)
        target = (grad_norms.mean() * relative**self.alpha).detach()
        return (grad_norms - target).abs().sum()


# --- metrics ---------------------------------------------------------------------------------------------------


def task_metrics(task: TaskSpec, predictions: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Accuracy (classify), MAE / RMSE (regress), and MAE of the median + interval coverage (quantile)."""
    if task.kind == "classify":
        keep = targets >= 0
        predicted = predictions[keep].argmax(axis=1)
        n = int(keep.sum())
        return {"n": n, "accuracy": float((predicted == targets[keep]).mean()) if n else 0.0}
    keep = np.isfinite(targets)
    y, n = targets[keep], int(keep.sum())
    if task.kind == "regress":
        error = predictions[keep] - y
        return {"n": n, "mae": float(np.abs(error).mean()) if n else 0.0,
                "rmse": float(np.sqrt((error**2).mean())) if n else 0.0}
    quantiles = np.asarray(task.options["quantiles"], dtype=np.float64)
    q = predictions[keep]
    median = q[:, int(np.argmin(np.abs(quantiles - 0.5)))]
    low, high = q[:, 0], q[:, -1]
    residual = y[:, None] - q
    pinball = np.maximum(quantiles * residual, (quantiles - 1) * residual).mean() if n else 0.0
    return {
        "n": n,
        "mae": float(np.abs(median - y).mean()) if n else 0.0,
        "pinball": float(pinball),
        "interval": [float(quantiles[0]), float(quantiles[-1])],
        "coverage": float(((y >= low) & (y <= high)).mean()) if n else 0.0,
        "nominal_coverage": float(quantiles[-1] - quantiles[0]),
        "mean_interval_width": float((high - low).mean()) if n else 0.0,
        "crossings": int((np.diff(q, axis=1) < 0).sum()),
    }


def conformal_rank(n: int, coverage: float) -> int:
    """The rank ``ceil((n + 1) * coverage)`` of split conformal prediction; above ``n`` when ``n`` calibration
    items are too few for the requested coverage (the guarantee then needs an infinite offset)."""
    return int(np.ceil((n + 1) * coverage))


def conformal_guaranteed(n: int, coverage: float) -> bool:
    """True when ``n`` calibration items are enough for the coverage guarantee (``rank <= n``)."""
    return 0 < conformal_rank(n, coverage) <= n


def conformal_offset(quantile_predictions: np.ndarray, targets: np.ndarray, coverage: float) -> float:
    """Split-conformal correction of the interval ``[q_low, q_high]`` (the outermost quantiles), from held-out data
    (conformalised quantile regression, Romano, Patterson & Candes 2019).

    Scores ``E_i = max(q_low(x_i) - y_i, y_i - q_high(x_i))`` (negative inside the interval); the offset is the
    ``ceil((n + 1) * coverage)``-th smallest score, so ``[q_low - offset, q_high + offset]`` covers a new
    exchangeable item with probability at least ``coverage``. Positive widens, negative narrows. When that rank
    exceeds ``n`` (too few calibration items, see :func:`conformal_guaranteed`) the largest score is used and the
    guarantee is lost: a warning says so.
    """
    keep = np.isfinite(targets)
    y, q = targets[keep].astype(np.float64), quantile_predictions[keep].astype(np.float64)
    if len(y) == 0:
        return 0.0
    scores = np.sort(np.maximum(q[:, 0] - y, y - q[:, -1]))
    rank = conformal_rank(len(scores), coverage)
    if rank > len(scores):
        logger.warning("conformal calibration: %d items are too few for coverage %.3g (rank %d > %d); the "
                       "largest score is used and the coverage guarantee does not hold", len(scores), coverage,
                       rank, len(scores))
    return float(scores[min(len(scores), rank) - 1])


def collect(model: nn.Module, loader: Any, tasks: Sequence[TaskSpec], forward_fn: Any,
            accelerator: Any | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task: ``(predictions, targets)`` over a loader (gathered across processes when an accelerator is given)."""
    parts: dict[str, tuple[list, list]] = {t.name: ([], []) for t in tasks}
    device = module_device(model)
    with torch.no_grad():
        for batch in loader:
            batch = to_device(batch, device)  # a no-op for an accelerator's prepared loader
            heads = task_outputs(forward_fn(model, batch))
            for t in tasks:
                prediction, target = heads[t.name].float(), batch[target_key(t)]
                if accelerator is not None:
                    prediction, target = accelerator.gather_for_metrics((prediction.contiguous(), target.contiguous()))
                parts[t.name][0].append(to_numpy(prediction))
                parts[t.name][1].append(to_numpy(target))
    return {name: (np.concatenate(p), np.concatenate(y)) for name, (p, y) in parts.items() if p}


def multitask_evaluate_fn(tasks: Sequence[TaskSpec], weights: Sequence[float] | None = None):
    """An ``evaluate_fn`` for the engine: ``loss`` (sum of task losses times the fixed ``weights``, default 1: a
    task of weight 0 does not steer model selection) and ``<task>_<metric>``."""
    weights = list(weights) if weights else [1.0] * len(tasks)

    def evaluate(model: nn.Module, loader: Any, accelerator: Any, forward_fn: Any) -> dict[str, float]:
        collected = collect(model, loader, tasks, forward_fn, accelerator)
        row: dict[str, float] = {}
        total = 0.0
        for t, weight in zip(tasks, weights):
            if t.name not in collected:
                continue
            predictions, targets = collected[t.name]
            if weight:
                total += weight * float(task_loss(t, torch.as_tensor(predictions), torch.as_tensor(targets)))
            for key, value in task_metrics(t, predictions, targets).items():
                if isinstance(value, float):
                    row[f"{t.name}_{key}"] = value
        row["loss"] = total
        first = tasks[0]
        if first.kind == "classify" and f"{first.name}_accuracy" in row:
            row["accuracy"] = row[f"{first.name}_accuracy"]
        return row

    return evaluate
