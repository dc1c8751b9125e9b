"""Transferability estimates: how well will a pretrained backbone's features serve *these* labels, before any
training? All three scores need one forward pass over the labelled data (features are cached on disk).

* LogME (You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning"): for each
  class k, a Bayesian linear regression ``y_k = F w + e`` with prior ``w ~ N(0, alpha^-1 I)`` and noise
  ``e ~ N(0, beta^-1 I)``; the log evidence ``log p(y_k | F, alpha, beta)`` maximised over (alpha, beta) by
  MacKay's fixed-point iteration, divided by n and averaged over classes. Higher is better.
* LEEP (Nguyen et al. 2020, "LEEP: A New Measure to Evaluate Transferability of Learned Representations"): with
  the source model's class probabilities theta(x) over source classes z, the empirical conditional
  ``P(y | z) = sum_i theta_z(x_i) [y_i = y] / sum_i theta_z(x_i)`` and
  ``LEEP = 1/n sum_i log sum_z P(y_i | z) theta_z(x_i)``. Needs a source classifier (e.g. ImageNet's head).
* H-score (Bao et al. 2019, "An Information-theoretic Approach to Transferability in Task Transfer Learning"):
  ``H(f) = tr(cov(f)^-1 cov(E[f | y]))``; cov(f) with Ledoit-Wolf shrinkage by default (Ibrahim et al. 2022),
  because with fewer items than dimensions the plain score saturates at (classes - 1) for every backbone.

``rank_backbones`` scores several candidates (``name`` or ``name@pixels``) on one labelled dataset.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)

_LOGME_MAX_ITER = 100
_LOGME_TOL = 1e-5


# --- scores ------------------------------------------------------------------------------------------------


def _one_hot(labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    k = int(num_classes if num_classes is not None else labels.max() + 1)
    out = np.zeros((len(labels), k))
    out[np.arange(len(labels)), labels] = 1.0
    return out


def evidence_fixed_point(features: np.ndarray, target: np.ndarray, max_iter: int = _LOGME_MAX_ITER,
                         tol: float = _LOGME_TOL) -> tuple[float, float, float]:
    """Maximise the Bayesian linear-regression evidence of one target column; returns (log evidence / n,
    alpha, beta).

    With ``F = U S V^T`` (thin SVD), ``sigma_i = s_i^2`` and ``z = U^T y``, MacKay's updates are
    ``gamma = sum beta sigma_i / (alpha + beta sigma_i)``, ``m = V diag(beta s_i / (alpha + beta sigma_i)) z``,
    ``alpha = gamma / m^T m``, ``beta = (n - gamma) / ||y - F m||^2``; the evidence is
    ``n/2 log beta + D/2 log alpha - n/2 log 2pi - beta/2 ||y - F m||^2 - alpha/2 m^T m
    - 1/2 sum_{i<=D} log(alpha + beta sigma_i)`` (sigma_i = 0 beyond the rank).
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    z = u.T @ y
    y_sq = float(y @ y)
    outside = max(y_sq - float(z @ z), 0.0)  # part of y orthogonal to the column space of F
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        denom = alpha + beta * sigma
        gamma = float((beta * sigma / denom).sum())
        m_sq = float(((beta * s * z / denom) ** 2).sum())
        residual = float(((alpha * z / denom) ** 2).sum()) + outside
        new_alpha = gamma / max(m_sq, 1e-12)
        new_beta = (n - gamma) / max(residual, 1e-12)
        converged = abs(new_alpha - alpha) / alpha < tol and abs(new_beta - beta) / beta < tol
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    denom = alpha + beta * sigma
    m_sq = float(((beta * s * z / denom) ** 2).sum())
    residual = float(((alpha * z / denom) ** 2).sum()) + outside
    log_det = float(np.log(denom).sum()) + (d - len(sigma)) * math.log(alpha)
    evidence = (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
                - beta / 2 * residual - alpha / 2 * m_sq - log_det / 2)
    return evidence / n, alpha, beta


def log_evidence(features: np.ndarray, target: np.ndarray, alpha: float, beta: float) -> float:
    """Exact ``log N(y; 0, beta^-1 I + alpha^-1 F F^T) / n`` (a direct check of the fixed point; O(n^3))."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    n = len(y)
    cov = np.eye(n) / beta + f @ f.T / alpha
    sign, log_det = np.linalg.slogdet(cov)
    quad = float(y @ np.linalg.solve(cov, y))
    return float(-0.5 * (n * math.log(2 * math.pi) + log_det + quad) / n)


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of features for classification labels: mean over classes of the maximised evidence per item."""
    labels = np.asarray(labels, dtype=np.int64)
    _check(features, labels)
    targets = _one_hot(labels)
    return float(np.mean([evidence_fixed_point(features, targets[:, k])[0] for k in range(targets.shape[1])]))


def leep(source_probabilities: np.ndarray, labels: np.ndarray) -> float:
    """LEEP from the source model's class probabilities ``(n, Z)`` (rows sum to 1) and target labels."""
    theta = np.asarray(source_probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    _check(theta, labels)
    joint = _one_hot(labels).T @ theta / len(labels)  # P(y, z)
    conditional = joint / np.maximum(joint.sum(axis=0, keepdims=True), 1e-300)  # P(y | z)
    eep = (theta * conditional[labels]).sum(axis=1)  # sum_z P(y_i | z) theta_z(x_i)
    return float(np.mean(np.log(np.maximum(eep, 1e-300))))


def h_score(features: np.ndarray, labels: np.ndarray, shrinkage: bool = True) -> float:
    """H-score ``tr(cov(f)^-1 cov(E[f | y]))`` (covariances with 1/n).

    With fewer items than feature dimensions the sample covariance is singular and the plain score (with a
    pseudo-inverse) saturates at ``rank(cov(E[f|y])) = classes - 1`` for every backbone, so by default cov(f)
    is the Ledoit-Wolf shrinkage estimate, ``(1 - a) S + a tr(S)/d I`` (the shrinkage H-score of Ibrahim et al.
    2022, "Newer is not always better: rethinking transferability metrics"). ``shrinkage=False``: Bao et al.'s
    original with a pseudo-inverse.
    """
    f = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    _check(f, labels)
    f = f - f.mean(axis=0)
    if shrinkage:
        from sklearn.covariance import ledoit_wolf

        cov_f = ledoit_wolf(f, assume_centered=True)[0]
    else:
        cov_f = f.T @ f / len(f)
    class_means = np.zeros_like(f)
    for c in np.unique(labels):
        class_means[labels == c] = f[labels == c].mean(axis=0)
    cov_g = class_means.T @ class_means / len(f)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-10, hermitian=True) @ cov_g))


def _check(values: np.ndarray, labels: np.ndarray) -> None:
    if values.ndim != 2 or len(values) != len(labels):
        raise TransferkitError(f"need one row per label, got {values.shape} for {len(labels)} labels",
                               "pass an (n, d) array and n labels")
    if len(labels) < 2 or (labels < 0).any():
        raise TransferkitError("transferability needs at least two labelled items", "pass labelled data")


def kendall_tau(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> float:
    """Kendall's tau-b rank correlation (ties handled), as scipy.stats.kendalltau."""
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).statistic)


# --- ranking backbones -------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A backbone to score: ``NAME[@PIXELS][#STAGE]``, e.g. ``efficientnet_lite1@96`` (image_size 96) or
    ``efficientnet_lite0@128#3`` (embedding = pooled output of feature stage 3 instead of the final layer)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        size, stage = self.options.get("image_size"), self.options.get("feature_stage")
        return self.name + (f"@{size}" if size else "") + (f"#{stage}" if stage is not None else "")

    @classmethod
    def parse(cls, text: str) -> Candidate:
        rest, _, stage = text.strip().partition("#")
        name, _, size = rest.partition("@")
        if not name:
            raise TransferkitError(f"empty backbone in '{text}'", "write e.g. efficientnet_lite0 or efficientnet_lite0@96")
        options: dict[str, Any] = {}
        if size:
            if not size.isdigit() or int(size) < 8:
                raise TransferkitError(f"invalid resolution in '{text}'", "write NAME@PIXELS, e.g. efficientnet_lite0@96")
            options["image_size"] = int(size)
        if stage:
            if not stage.isdigit():
                raise TransferkitError(f"invalid feature stage in '{text}'", "write NAME#STAGE, e.g. efficientnet_lite0#3")
            options["feature_stage"] = int(stage)
        return cls(name, options)


def score_features(features: np.ndarray, labels: np.ndarray,
                   source_probabilities: np.ndarray | None = None) -> dict[str, float | None]:
    """LogME, H-score and (when a source classifier exists) LEEP of one candidate's features."""
    return {
        "logme": logme(features, labels),
        "h_score": h_score(features, labels),
        "leep": leep(source_probabilities, labels) if source_probabilities is not None else None,
    }


def source_probabilities(backbone: Any, features: np.ndarray) -> np.ndarray | None:
    """Softmax of the backbone's pretrained classifier on its pooled features (None without such a head)."""
    import torch

    from transferkit.engine.placement import predict_batches
    from transferkit.evaluation.calibration import softmax

    head = backbone.pretrained_head()
    if head is None:
        return None
    return softmax(predict_batches(head, [torch.as_tensor(features, dtype=torch.float32)], head))


def labelled_pool(splits: Any) -> Any:
    """Train and validation items as one LabeledData (the labels a user has; never the test split).

    Subsets of one source stay a lazy subset of it, so the feature cache key is stable and cheap."""
    from transferkit.data.base import LabeledData, SubsetSource

    train, val = splits.train, splits.val
    if not len(val):
        return train
    name = f"{train.name}+val"
    labels = np.concatenate([train.labels, val.labels])
    ids = list(train.ids) + list(val.ids)
    if isinstance(train.items, SubsetSource) and isinstance(val.items, SubsetSource) \
            and train.items.base is val.items.base:
        items: Any = SubsetSource(train.items.base, np.concatenate([train.items.indices, val.items.indices]))
    else:
        items = [train.items[i] for i in range(len(train))] + [val.items[i] for i in range(len(val))]
    return LabeledData(items, labels, list(train.class_names), train.modality, ids, name=name)


def rank_backbones(data: Any, candidates: list[str | Candidate], *, cache_dir: Any = None, pretrained: bool = True,
                   batch_size: int = 64, progress: bool = False) -> list[dict[str, Any]]:
    """Score each candidate on the labelled items of ``data`` (a LabeledData), best LogME first.

    One forward pass per candidate (through the feature cache); LEEP reuses the same pooled features through
    the backbone's pretrained head.
    """
    import time

    from transferkit.backbones import create_backbone
    from transferkit.engine.features import default_cache_dir, extract_features

    keep = data.labels >= 0
    labelled = data.subset(np.flatnonzero(keep)) if not keep.all() else data
    rows = []
    for candidate in candidates:
        cand = Candidate.parse(candidate) if isinstance(candidate, str) else candidate
        options = dict(cand.options)
        started = time.perf_counter()
        backbone = create_backbone(cand.name, pretrained=pretrained, **options)
        if backbone.modality != labelled.modality:
            raise TransferkitError(f"backbone '{cand.name}' takes {backbone.modality} input but the data is "
                                   f"{labelled.modality}", f"choose {labelled.modality} backbones")
        features = extract_features(backbone, labelled, batch_size=batch_size,
                                    cache_dir=cache_dir or default_cache_dir(), progress=progress)
        scores = score_features(features, labelled.labels, source_probabilities(backbone, features))
        rows.append({"backbone": cand.label, "name": cand.name, "options": options, **scores,
                     "feature_dim": int(features.shape[1]), "n": int(len(labelled)),
                     "seconds": round(time.perf_counter() - started, 2)})
        logger.info("%s: LogME %.4f, H-score %.3f%s", cand.label, scores["logme"], scores["h_score"],
                    f", LEEP {scores['leep']:.4f}" if scores["leep"] is not None else "")
    rows.sort(key=lambda r: -r["logme"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows
