"""Closed-form-like solvers for heads on fixed features."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def fit_logistic_regression(
    features: np.ndarray, labels: np.ndarray, num_classes: int, c: float = 1.0, max_iter: int = 1000,
    tol: float = 1e-6, sample_weight: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with an L2 penalty, solved with L-BFGS on the full batch.

    Minimises ``0.5 ||W||^2 + C * sum_i CE(W x_i + b, y_i)`` (scikit-learn's ``LogisticRegression`` objective;
    the intercept is not penalised), scaled by ``1 / (C n)`` for conditioning. Returns ``(W, b)`` with shapes
    ``(num_classes, d)`` and ``(num_classes,)``. ``sample_weight`` (optional, mean 1 recommended) weights each
    example's cross-entropy, as scikit-learn's ``fit(..., sample_weight=)``.
    """
    x = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    n, d = x.shape
    weight = torch.zeros(num_classes, d, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")
    penalty = 1.0 / (2.0 * c * n)
    w = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float64)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weight.T + bias
        data_term = F.cross_entropy(logits, y) if w is None else \
            (w * F.cross_entropy(logits, y, reduction="none")).mean()
        loss = data_term + penalty * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()
