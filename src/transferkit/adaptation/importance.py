"""Instance re-weighting of source examples by the density ratio ``w(x) = p_t(x) / p_s(x)``.

Under covariate shift the target risk equals the source risk weighted by ``w(x)``. A probabilistic domain
classifier gives the ratio without density estimation (Bickel et al. 2007; Sugiyama et al. 2012):
``p_t(x) / p_s(x) = (n_s / n_t) * p(t | x) / p(s | x)``. Weights are clipped (they have heavy tails) and
normalised to mean 1 over the source examples.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.adaptation.base import AdaptationMethod, fit_head_in_closed_form, register_adaptation
from transferkit.engine.objectives import Objective, primary_logits

if TYPE_CHECKING:
    from transferkit.data.base import LabeledData
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainResult
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy


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


def _closed_form_probe(strategy: Strategy) -> bool:
    """The linear probe's exact logistic regression (``--solver lbfgs``), which takes example weights."""
    return getattr(strategy.config, "solver", None) == "lbfgs"


@register_adaptation
class ImportanceWeighting(AdaptationMethod):
    """``--adapt importance-weighting``: each source example's loss times the domain classifier's density ratio."""

    name = "importance-weighting"
    description = "importance weighting by a domain classifier's density ratio (Shimodaira 2000)"

    def supports(self, strategy: Strategy, task_kind: str) -> bool | str:
        if not (strategy.trains_with_engine() or _closed_form_probe(strategy)):
            return "it does not train with a per-example loss, so the importance weights would be ignored"
        return super().supports(strategy, task_kind)

    def train(self, strategy: Strategy, model: TransferModel, context: RunContext,
              target: LabeledData | None) -> TrainResult:
        from transferkit.engine.solvers import fit_logistic_regression

        assert target is not None
        train = context.splits.train
        weights = density_ratio_weights(context.features(model.backbone, train),
                                        context.features(model.backbone, target),
                                        clip=self.config.importance_clip, seed=context.train.seed)
        ess = effective_sample_size(weights)
        self.summary.update({"importance_weight_max": float(weights.max()), "effective_sample_size": ess})
        context.notes.append(f"importance weights from a domain classifier on the initial features: effective "
                             f"sample size {ess:.0f} of {len(weights)}")
        if _closed_form_probe(strategy):
            options: Any = strategy.config
            return fit_head_in_closed_form(model, context, lambda x, y: fit_logistic_regression(
                x, y, train.num_classes, c=options.probe_c, max_iter=options.probe_max_iter, sample_weight=weights))
        weighted = WeightedCrossEntropy(weights, label_smoothing=context.label_smoothing)
        return strategy.train(model, replace(context, task_objectives=[weighted]))
