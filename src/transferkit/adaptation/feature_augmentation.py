"""Daumé III (2007), "Frustratingly Easy Domain Adaptation": augment the feature space per domain.

Source ``x -> (x, x, 0)``, target ``x -> (x, 0, x)``; a linear classifier on the union learns shared weights
``w_c`` and domain-specific ones ``w_s``, ``w_t``. A target example scores ``w_c.x + w_t.x``, so the deployed
head is the ordinary linear head ``W_c + W_t`` on unaugmented target features. Needs a few labelled target
examples.
"""

from __future__ import annotations

import numpy as np
import torch

from transferkit.engine.solvers import fit_logistic_regression

SOURCE, TARGET = 0, 1


def augment_features(features: np.ndarray, domain: int) -> np.ndarray:
    """``(n, d) -> (n, 3d)``: source ``(x, x, 0)``, target ``(x, 0, x)``."""
    x = np.asarray(features, dtype=np.float32)
    zeros = np.zeros_like(x)
    if domain == SOURCE:
        return np.concatenate([x, x, zeros], axis=1)
    if domain == TARGET:
        return np.concatenate([x, zeros, x], axis=1)
    raise ValueError(f"domain must be {SOURCE} (source) or {TARGET} (target), got {domain}")


def fit_augmented_head(source_x: np.ndarray, source_y: np.ndarray, target_x: np.ndarray, target_y: np.ndarray,
                       num_classes: int, c: float = 1.0, max_iter: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression on the augmented union; returns the target-domain head ``(W_c + W_t, b)``."""
    d = source_x.shape[1]
    x = np.concatenate([augment_features(source_x, SOURCE), augment_features(target_x, TARGET)])
    y = np.concatenate([source_y, target_y])
    weight, bias = fit_logistic_regression(x, y, num_classes, c=c, max_iter=max_iter)
    return weight[:, :d] + weight[:, 2 * d:], bias
