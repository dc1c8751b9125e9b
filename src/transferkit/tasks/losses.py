"""Per-task losses on one batch. Every loss ignores missing targets (class ``-1``, regression ``NaN``).

* cross-entropy: ``-log softmax(z)_y`` (optionally label-smoothed, Szegedy et al. 2016);
* multi-class hinge (Weston & Watkins 1999, torch's ``multi_margin_loss``):
  ``sum_{j != y} max(0, 1 - z_y + z_j) / C``;
* MSE: ``(y_hat - y)^2``; smooth L1 (Huber, Girshick 2015): ``0.5 r^2 / beta`` if ``|r| < beta`` else
  ``|r| - 0.5 beta``;
* pinball (quantile) loss (Koenker & Bassett 1978), averaged over the quantiles ``tau``:
  ``max(tau * r, (tau - 1) * r)`` with ``r = y - q_tau``; its minimiser is the ``tau``-quantile of ``y | x``.

Regression residuals are divided by the training targets' standard deviation (``scale``) so that tasks in
different units give losses of comparable size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CLASSIFICATION_LOSSES = ("cross_entropy", "hinge")
REGRESSION_LOSSES = ("mse", "smooth_l1")


def _masked_mean(values: torch.Tensor, keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Mean of ``values[keep]``; an all-missing batch gives 0 still attached to the graph of ``like``."""
    if not bool(keep.any()):
        return like.sum() * 0.0
    return values[keep].mean()


def classification_loss(logits: torch.Tensor, target: torch.Tensor, loss: str = "cross_entropy",
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy or multi-class hinge over items whose class is not ``-1``."""
    target = target.long()
    keep = target >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    if loss == "hinge":
        return F.multi_margin_loss(logits[keep], target[keep], margin=1.0)
    return F.cross_entropy(logits[keep], target[keep], label_smoothing=label_smoothing)


def regression_loss(prediction: torch.Tensor, target: torch.Tensor, loss: str = "mse", scale: float = 1.0,
                    beta: float = 1.0) -> torch.Tensor:
    """Mean MSE or smooth-L1 of ``(prediction - target) / scale`` over finite targets."""
    keep = torch.isfinite(target)
    residual = (prediction - torch.where(keep, target, prediction.detach())) / scale
    if loss == "smooth_l1":
        values = F.smooth_l1_loss(residual, torch.zeros_like(residual), reduction="none", beta=beta)
    else:
        values = residual**2
    return _masked_mean(values, keep, prediction)


def pinball_loss(quantile_predictions: torch.Tensor, target: torch.Tensor, quantiles: Sequence[float],
                 scale: float = 1.0) -> torch.Tensor:
    """Mean pinball loss of ``(B, Q)`` predictions for the quantile levels ``quantiles`` (length Q)."""
    keep = torch.isfinite(target)
    tau = torch.as_tensor(list(quantiles), dtype=quantile_predictions.dtype, device=quantile_predictions.device)
    safe_target = torch.where(keep, target, quantile_predictions[:, 0].detach())
    residual = (safe_target[:, None] - quantile_predictions) / scale
    values = torch.maximum(tau * residual, (tau - 1) * residual).mean(dim=1)
    return _masked_mean(values, keep, quantile_predictions)
