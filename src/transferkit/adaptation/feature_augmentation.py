"""Daumé III (2007), "Frustratingly Easy Domain Adaptation": augment the feature space per domain.

Source ``x -> (x, x, 0)``, target ``x -> (x, 0, x)``; a linear classifier on the union learns shared weights
``w_c`` and domain-specific ones ``w_s``, ``w_t``. A target example scores ``w_c.x + w_t.x``, so the deployed
head is the ordinary linear head ``W_c + W_t`` on unaugmented target features. Needs a few labelled target
examples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from transferkit.adaptation.base import AdaptationMethod, fit_head_in_closed_form, register_adaptation
from transferkit.engine.solvers import fit_logistic_regression
from transferkit.errors import TransferkitError

if TYPE_CHECKING:
    from transferkit.data.base import LabeledData
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainResult
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy

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


@register_adaptation
class FeatureAugmentation(AdaptationMethod):
    """``--adapt feature-augmentation``: Daumé's augmented features with a few labelled target examples."""

    name = "feature-augmentation"
    description = "frustratingly easy domain adaptation (Daumé 2007) on frozen features"
    needs = "target_labelled"
    backbone = "frozen"

    def supports(self, strategy: Strategy, task_kind: str) -> bool | str:
        if getattr(strategy.config, "solver", None) != "lbfgs":
            return "feature augmentation fits its own logistic-regression head (use --strategy linear-probe " \
                   "--solver lbfgs)"
        return super().supports(strategy, task_kind)

    def train(self, strategy: Strategy, model: TransferModel, context: RunContext,
              target: LabeledData | None) -> TrainResult:
        from transferkit.data import load_data

        c, fit = self.config, self.fit
        assert c.target_labelled is not None and fit is not None
        target_splits = load_data(c.target_labelled, text_column=fit.text_column, label_column=fit.label_column,
                                  limit_per_class=c.target_limit_per_class, seed=context.train.seed)
        labelled = target_splits.train  # framed under --frame by the backbone, as the source is
        if labelled.modality != context.splits.modality:
            raise TransferkitError(f"--target-labelled holds {labelled.modality} data but the source data is "
                                   f"{context.splits.modality}", "give target data of the same kind as --data")
        if list(labelled.class_names) != list(context.splits.class_names):
            raise TransferkitError(f"--target-labelled has classes {labelled.class_names} but the source has "
                                   f"{context.splits.class_names}", "use the same class names in both domains")
        context.notes.append(f"feature augmentation with {len(labelled)} labelled target examples (their test "
                             "split is left untouched)")
        target_x = context.features(model.backbone, labelled)
        options = strategy.config
        return fit_head_in_closed_form(model, context, lambda x, y: fit_augmented_head(
            x, y, target_x, labelled.labels, len(context.splits.class_names), c=getattr(options, "probe_c", 1.0),
            max_iter=getattr(options, "probe_max_iter", 1000)))
