"""Heads for non-classification tasks; outputs are in the target's own units.

The linear layer works on a standardised scale (``y = mean + std * z``), so a freshly initialised head
predicts about the training mean and the optimiser sees gradients of a sensible size whatever the units.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RegressionHead(nn.Module):
    """``dropout -> Linear(d, 1)``, rescaled to target units; output shape ``(B,)``."""

    def __init__(self, in_features: int, mean: float = 0.0, std: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, 1)
        self.mean, self.std = float(mean), float(std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * self.linear(self.dropout(features)).squeeze(-1)


class QuantileHead(nn.Module):
    """Crossing-free quantiles: ``q_1 = b``, ``q_k = b + sum_{j=2..k} softplus(d_j)``; shape ``(B, Q)``.

    The increments are positive, so ``q_1 <= q_2 <= ... <= q_Q`` for every input by construction (a monotone
    head, cf. the non-crossing constraint of Chernozhukov et al. 2010), not by a penalty that may be violated.
    """

    def __init__(self, in_features: int, quantiles: Sequence[float], mean: float = 0.0, std: float = 1.0,
                 dropout: float = 0.0, interval_offset: float = 0.0) -> None:
        super().__init__()
        self.quantiles = [float(q) for q in quantiles]
        self.interval_offset = float(interval_offset)  # conformal correction, see ``calibrated``
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, len(self.quantiles))
        self.mean, self.std = float(mean), float(std)
        with torch.no_grad():  # start with the quantiles of a standard normal spread around the mean
            spread = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(self.quantiles).clamp(1e-3, 1 - 1e-3))
            gaps = (spread[1:] - spread[:-1]).clamp_min(1e-3)
            self.linear.bias[0] = spread[0]
            self.linear.bias[1:] = torch.log(torch.expm1(gaps))  # softplus^-1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        raw = self.linear(self.dropout(features))
        base, increments = raw[:, :1], F.softplus(raw[:, 1:])
        standardised = torch.cat([base, base + torch.cumsum(increments, dim=1)], dim=1)
        return self.calibrated(self.mean + self.std * standardised)

    def calibrated(self, quantiles: torch.Tensor) -> torch.Tensor:
        """The outermost quantiles moved out (offset > 0) or in (< 0) by ``interval_offset`` target units
        (conformalised quantile regression, Romano et al. 2019), never past their inner neighbours."""
        if self.interval_offset == 0.0 or quantiles.shape[1] < 2:
            return quantiles
        if quantiles.shape[1] > 2:
            inner_low, inner_high = quantiles[:, 1:2], quantiles[:, -2:-1]
        else:
            inner_low = inner_high = quantiles.mean(dim=1, keepdim=True)
        low = torch.minimum(quantiles[:, :1] - self.interval_offset, inner_low)
        high = torch.maximum(quantiles[:, -1:] + self.interval_offset, inner_high)
        return torch.cat([low, quantiles[:, 1:-1], high], dim=1)
