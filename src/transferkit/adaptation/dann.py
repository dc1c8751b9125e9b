"""Domain-adversarial training (Ganin & Lempitsky 2015; Ganin et al. 2016, JMLR "DANN").

Three parts: the feature extractor ``G_f`` (the backbone), the label predictor ``G_y`` (the task head) and a
domain classifier ``G_d`` (here a small MLP owned by this objective). The domain loss is the binary
cross-entropy of ``G_d`` on source (domain 0) and target (domain 1) features passed through a gradient
reversal layer, so minimising ``L_y + w L_d`` trains ``G_d`` to separate the domains while ``G_f`` is pushed
to make them indistinguishable. The reversal coefficient follows ``lambda_p = 2 / (1 + exp(-10 p)) - 1``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transferkit.adaptation.base import FeatureAlignment, register_adaptation
from transferkit.adaptation.grl import GradientReversal, grl_schedule
from transferkit.engine.objectives import Objective


def domain_classifier(feature_dim: int, hidden: int = 256, dropout: float = 0.0) -> nn.Sequential:
    """``feature_dim -> hidden -> hidden -> 1`` MLP with ReLU (one logit: "is target")."""
    return nn.Sequential(
        nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, 1),
    )


def target_features(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Backbone features of the auxiliary ``target`` batch fed next to the source batch."""
    return model.backbone.forward_features(batch["target"]["inputs"])


def domain_loss(classifier: nn.Module, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the domain classifier: source features labelled 0, target features 1."""
    logits = classifier(torch.cat([source, target])).squeeze(-1)
    labels = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(logits)
    return F.binary_cross_entropy_with_logits(logits, labels)


class DANNObjective(Objective):
    """``L_d`` of DANN on (source batch, target batch); the engine adds it to the task loss with ``weight``."""

    name = "domain_adversarial"

    def __init__(self, feature_dim: int, weight: float = 1.0, hidden: int = 256, gamma: float = 10.0,
                 schedule: bool = True) -> None:
        super().__init__(weight)
        self.classifier = domain_classifier(feature_dim, hidden)
        self.reversal = GradientReversal(0.0 if schedule else 1.0)
        self.gamma = float(gamma)
        self.schedule = schedule

    def on_step(self, step: int, total_steps: int) -> None:
        if self.schedule:
            self.reversal.coefficient = grl_schedule(step / max(1, total_steps), self.gamma)

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        source = self.reversal(outputs.features)
        target = self.reversal(target_features(model, batch))
        return domain_loss(self.classifier, source, target)


@register_adaptation
class DANN(FeatureAlignment):
    """``--adapt dann``: a domain classifier behind a gradient-reversal layer on the backbone's features."""

    name = "dann"
    description = "domain-adversarial training (Ganin et al. 2016)"

    def objective(self, model: nn.Module) -> Objective:
        c = self.config
        return DANNObjective(model.backbone.feature_dim, c.adapt_weight, c.domain_hidden, c.grl_gamma,
                             schedule=c.grl_gamma > 0)
