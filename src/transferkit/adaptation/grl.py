"""Gradient reversal layer (Ganin & Lempitsky 2015, "Unsupervised Domain Adaptation by Backpropagation").

Forward: the identity. Backward: the incoming gradient multiplied by ``-lambda``. Placed between the feature
extractor and the domain classifier, one backward pass trains the classifier to *tell* the domains apart and
the features to make them *indistinguishable*. The coefficient follows the paper's schedule
``lambda_p = 2 / (1 + exp(-gamma p)) - 1`` with ``gamma = 10`` and ``p`` the training progress in [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: torch.Tensor, coefficient: float) -> torch.Tensor:  # type: ignore[override]
        ctx.coefficient = coefficient
        return inputs.view_as(inputs)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.coefficient * grad_output, None


def reverse_gradient(inputs: torch.Tensor, coefficient: float = 1.0) -> torch.Tensor:
    """Identity forward; gradient times ``-coefficient`` backward."""
    return _GradientReversal.apply(inputs, float(coefficient))


def grl_schedule(progress: float, gamma: float = 10.0) -> float:
    """Ganin & Lempitsky's reversal coefficient ``2 / (1 + exp(-gamma p)) - 1`` (0 at p=0, -> 1 as p -> 1)."""
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


class GradientReversal(nn.Module):
    """Module form of :func:`reverse_gradient` with a settable ``coefficient``."""

    def __init__(self, coefficient: float = 1.0) -> None:
        super().__init__()
        self.coefficient = float(coefficient)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return reverse_gradient(inputs, self.coefficient)

    def extra_repr(self) -> str:
        return f"coefficient={self.coefficient:.4f}"
