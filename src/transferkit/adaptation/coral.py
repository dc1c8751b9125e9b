"""CORrelation ALignment: match the second-order statistics of source and target features.

* :func:`deep_coral_loss` (Sun & Saenko 2016, "Deep CORAL"): ``||C_s - C_t||_F^2 / (4 d^2)`` with ``C`` the
  (unbiased) feature covariances of a source and a target mini-batch; added to the task loss.
* :func:`coral_transform` / :class:`CoralMap` (Sun, Feng & Saenko 2016, "Return of Frustratingly Easy Domain
  Adaptation"): whiten the source features with ``(C_s + I)^(-1/2)`` and re-colour them with
  ``(C_t + I)^(1/2)`` (and move their mean onto the target's); a classifier trained on the transformed source
  features is applied to the target features unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from transferkit.adaptation.base import AdaptationMethod, FeatureAlignment, register_adaptation
from transferkit.engine.objectives import Objective

if TYPE_CHECKING:
    from transferkit.data.base import LabeledData
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainResult
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy


def covariance(features: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance ``(X - mean)^T (X - mean) / (n - 1)`` of a ``(n, d)`` batch."""
    centred = features - features.mean(dim=0, keepdim=True)
    return centred.T @ centred / max(1, features.shape[0] - 1)


def deep_coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL loss ``||C_s - C_t||_F^2 / (4 d^2)`` between two feature batches of width ``d``."""
    d = source.shape[1]
    diff = covariance(source.float()) - covariance(target.float())
    return (diff * diff).sum() / (4.0 * d * d)


def _symmetric_power(matrix: np.ndarray, power: float) -> np.ndarray:
    """``matrix ** power`` of a symmetric positive-definite matrix through its eigendecomposition."""
    values, vectors = np.linalg.eigh(matrix)
    values = np.clip(values, 1e-12, None)
    return (vectors * values**power) @ vectors.T


def coral_matrix(source: np.ndarray, target: np.ndarray, regularisation: float = 1.0,
                 relative: bool = False) -> np.ndarray:
    """The CORAL map ``A = (C_s + r_s I)^(-1/2) (C_t + r_t I)^(1/2)`` (``x_s -> x_s A``).

    ``relative=False``: ``r_s = r_t = regularisation`` (the paper's ``+I``, r = 1). ``relative=True``: each
    domain's ``r`` is ``regularisation`` times that domain's mean feature variance ``tr(C)/d``, i.e. the paper's
    ``+I`` on features scaled to unit mean variance; it equals SKADA's ``CORALAdapter(reg=rho)`` (shrinkage
    ``(1-rho) C + rho tr(C)/d I``) for ``regularisation = rho / (1 - rho)``, since scalar factors cancel in ``A``.
    """
    eye = np.eye(source.shape[1])
    c_s, c_t = np.cov(source, rowvar=False), np.cov(target, rowvar=False)
    r_s, r_t = ((regularisation * np.trace(c_s) / len(eye), regularisation * np.trace(c_t) / len(eye))
                if relative else (regularisation, regularisation))
    return _symmetric_power(c_s + r_s * eye, -0.5) @ _symmetric_power(c_t + r_t * eye, 0.5)


class CoralMap:
    """The fitted CORAL map ``x -> (x - mu_s) A + mu_t`` of source features, ``A = coral_matrix(...)``.

    Sun et al.'s Algorithm 1 maps ``D_s A`` and leaves the means alone; moving the source mean onto the target
    mean as well aligns first-order statistics too (as SKADA's ``CORALAdapter``, which centres both domains),
    and a classifier trained on mapped source features then applies to raw target features unchanged.
    """

    def __init__(self, source: np.ndarray, target: np.ndarray, regularisation: float = 1.0,
                 relative: bool = False) -> None:
        source = np.asarray(source, dtype=np.float64)
        target = np.asarray(target, dtype=np.float64)
        self.matrix = coral_matrix(source, target, regularisation, relative)
        self.source_mean = source.mean(axis=0)
        self.target_mean = target.mean(axis=0)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        mapped = (np.asarray(features, dtype=np.float64) - self.source_mean) @ self.matrix + self.target_mean
        return mapped.astype(np.float32)


def coral_transform(source: np.ndarray, target: np.ndarray, regularisation: float = 1.0,
                    relative: bool = False) -> np.ndarray:
    """Source features with the target's covariance (up to the ``r I`` regularisation) and mean."""
    return CoralMap(source, target, regularisation, relative)(source)


class DeepCoralObjective(Objective):
    """Deep CORAL between the source batch's features and the auxiliary ``target`` batch's features."""

    name = "deep_coral"

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        from transferkit.adaptation.dann import target_features

        return deep_coral_loss(outputs.features, target_features(model, batch))


@register_adaptation
class DeepCoral(FeatureAlignment):
    """``--adapt deep-coral``: the CORAL loss between source and target batch features, trained end to end."""

    name = "deep-coral"
    description = "Deep CORAL (Sun & Saenko 2016)"

    def objective(self, model: nn.Module) -> Objective:
        return DeepCoralObjective(self.config.adapt_weight)


@register_adaptation
class Coral(AdaptationMethod):
    """``--adapt coral``: the head is fitted on re-coloured source features and applied to raw target features."""

    name = "coral"
    description = "CORAL on frozen features (Sun et al. 2016)"
    backbone = "frozen"

    def train(self, strategy: Strategy, model: TransferModel, context: RunContext,
              target: LabeledData | None) -> TrainResult:
        assert target is not None
        source_parts = (context.splits.train, context.splits.val)
        # r relative to each domain's feature scale: the paper's +I on features scaled to unit mean variance
        mapping = CoralMap(context.features(model.backbone, context.splits.train),
                           context.features(model.backbone, target), self.config.coral_reg, relative=True)

        def recolour(data: LabeledData, features: np.ndarray) -> np.ndarray:
            return mapping(features) if any(data is part for part in source_parts) else features

        context.notes.append("CORAL: source features whitened with (C_s + r_s I)^-1/2, re-coloured with "
                             f"(C_t + r_t I)^1/2 and moved to the target mean; r = {self.config.coral_reg} x each "
                             "domain's mean feature variance")
        return strategy.train(model, replace(context, feature_transform=recolour))
