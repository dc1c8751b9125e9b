"""Instance re-weighting of source examples by the density ratio ``w(x) = p_t(x) / p_s(x)``.

Under covariate shift the target risk equals the source risk weighted by ``w(x)``. A probabilistic domain
classifier gives the ratio without density estimation (Bickel et al. 2007; Sugiyama et al. 2012):
``p_t(x) / p_s(x) = (n_s / n_t) * p(t | x) / p(s | x)``. Weights are clipped (they have heavy tails) and
normalised to mean 1 over the source examples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.engine.objectives import Objective, primary_logits


def density_ratio_weights(source: np.ndarray, target: np.ndarray, c: float = 1.0, clip: float = 10.0,
                          seed: int = 0) -> np.ndarray:
    """Importance weights of the ``source`` rows from a logistic-regression domain classifier on standardised
    features; ``(n_s / n_t) p(t|x) / p(s|x)``, clipped to ``[1/clip, clip]`` then scaled to mean 1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([source, target]).astype(np.float64)
    y = np.concatenate([np.zeros(len(source)), np.ones(len(target))])
    scaler = StandardScaler().fit(x)
    classifier = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(scaler.transform(x), y)
    log_odds = classifier.decision_function(scaler.transform(np.asarray(source, dtype=np.float64)))
    weights = np.exp(log_odds) * (len(source) / len(target))
    weights = np.clip(weights, 1.0 / clip, clip)
    return (weights / weights.mean()).astype(np.float32)


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` (n for uniform weights)."""
    w = np.asarray(weights, dtype=np.float64)
    return float(w.sum() ** 2 / (w**2).sum())


class WeightedCrossEntropy(Objective):
    """Cross-entropy with a per-example weight looked up by ``batch["index"]`` (the training-set position)."""

    name = "weighted_cross_entropy"

    def __init__(self, weights: np.ndarray, weight: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__(weight)
        self.register_buffer("example_weights", torch.as_tensor(weights, dtype=torch.float32), persistent=False)
        self.label_smoothing = float(label_smoothing)

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        logits = primary_logits(outputs)
        labels = batch["labels"]
        keep = labels >= 0
        per_example = F.cross_entropy(logits[keep], labels[keep], reduction="none",
                                      label_smoothing=self.label_smoothing)
        weights = self.example_weights.to(logits.device)[batch["index"][keep]]
        return (weights * per_example).sum() / weights.sum().clamp_min(1e-12)
