"""Ensembles chosen on out-of-fold predictions, and the model folder that holds one.

Selection is Caruana et al. 2004 ("Ensemble Selection from Libraries of Models"): start from the best single
candidate, then repeatedly add (with replacement, so weights are multiples of 1/m) the candidate whose addition most
lowers the cross-entropy of the averaged out-of-fold probabilities; stop when nothing lowers it or at ``max_members``.
The ensemble is kept only if its out-of-fold accuracy is at least the best single candidate's.

Selection overfits when the labels are few: on Fashion-MNIST with 10-20 labels per class the out-of-fold accuracy of
auto's selected model was 2.2-4.7 points above its test accuracy. A committee fixed in advance (:func:`committee`:
the probes of every backbone at its own resolution, averaged with equal weights) involves no selection and is
preferred unless the best candidate beats it by more than the winner's curse explains (``sqrt(2 ln m)`` paired
standard errors for the best of ``m``).

On disk an ensemble is a model folder whose ``config.json`` has ``"ensemble": {"members": [...], "weights": [...]}``
and one ordinary model folder per member under ``members/``; :func:`transferkit.load` returns an
:class:`EnsembleModel` that averages the members' probabilities (each with its own preprocessing and test-time
augmentation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ENSEMBLE_KEY = "ensemble"
MEMBERS_FOLDER = "members"
TTA_KEY = "tta"  # in a model's config.json: "hflip" = average over the image and its mirror image


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    p = np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0)
    return float(-np.log(p).mean())


def accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float((probabilities.argmax(1) == labels).mean())


def select_ensemble(oof: dict[str, np.ndarray], labels: np.ndarray, max_members: int = 5,
                    start: str | None = None) -> dict[str, float]:
    """Weights (summing to 1) of the members chosen greedily on out-of-fold probabilities (see module doc), starting
    from ``start`` (default: the candidate with the best out-of-fold accuracy)."""
    if not oof:
        return {}
    names = list(oof)
    best = start or max(names, key=lambda n: (accuracy(labels, oof[n]), -log_loss(labels, oof[n])))
    chosen = [best]
    total = oof[best].copy()
    current = log_loss(labels, total)
    while len(chosen) < max_members:
        scores = {n: log_loss(labels, (total + oof[n]) / (len(chosen) + 1)) for n in names}
        candidate = min(scores, key=lambda n: scores[n])
        if scores[candidate] >= current - 1e-9:
            break
        chosen.append(candidate)
        total = total + oof[candidate]
        current = scores[candidate]
    if accuracy(labels, total / len(chosen)) < accuracy(labels, oof[best]):
        return {best: 1.0}
    weights: dict[str, float] = {}
    for name in chosen:
        weights[name] = weights.get(name, 0.0) + 1.0 / len(chosen)
    return weights


def paired_standard_error(labels: np.ndarray, first: np.ndarray, second: np.ndarray) -> float:
    """Standard error of the difference in accuracy of two classifiers on the same items: the sd of the per-item
    differences of correctness (-1, 0, 1) over sqrt(n) (the paired, McNemar-style error)."""
    d = (first.argmax(1) == labels).astype(float) - (second.argmax(1) == labels).astype(float)
    return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")


def within_errors(labels: np.ndarray, best: np.ndarray, other: np.ndarray, errors: float = 1.0) -> bool:
    """True when ``best``'s accuracy exceeds ``other``'s by at most ``errors`` paired standard errors
    (:func:`paired_standard_error`); a gap of exactly that many is within (floating point must not decide)."""
    gap = accuracy(labels, best) - accuracy(labels, other)
    return gap <= errors * paired_standard_error(labels, best, other) + 1e-12


def preferred_start(oof: dict[str, np.ndarray], labels: np.ndarray, prior: dict[str, int]) -> tuple[str, str]:
    """(the candidate to build the final model on, the one with the best out-of-fold accuracy). The first is the
    second, unless candidates with a stronger ``prior`` (a preference measured on benchmarks) are within one paired
    standard error of it; then the one with the strongest prior among those (ties: the better accuracy). With a few
    dozen labels, cross-validation cannot tell most candidates apart and its maximum is mostly noise; a measured prior
    is the better guess there, while a difference that cross-validation does resolve still decides."""
    def rank(n: str) -> tuple[float, float]:
        return accuracy(labels, oof[n]), -log_loss(labels, oof[n])

    best = max(oof, key=rank)
    tied = [n for n in oof if within_errors(labels, oof[best], oof[n])]
    return max(tied, key=lambda n: (prior.get(n, 0), *rank(n))), best


def committee(oof: dict[str, np.ndarray], labels: np.ndarray, members: list[str], best: str,
              max_members: int) -> dict[str, float]:
    """Equal weights over ``members`` (at most ``max_members``: those with the best out-of-fold accuracy) unless
    ``best`` beats their averaged out-of-fold probabilities by more than ``sqrt(2 ln m)`` paired standard errors,
    ``m`` = the number of candidates ``best`` is the maximum of (``len(oof)``, at least one error); ``{}`` then, or
    when fewer than two members finished.

    The committee's out-of-fold accuracy involves no choice; ``best``'s is the maximum over ``m`` noisy scores, and
    the expected maximum of ``m`` independent standard normal errors is at most ``sqrt(2 ln m)`` (2.4 for 20
    variants, 2.6 for 28): a lead smaller than that is what the winner's curse alone produces when the candidates
    are equally good. Measured before building (Fashion-MNIST, 3 label seeds, test images): the six flip-TTA probes
    of EfficientNet-Lite0/1/2 (final-layer and multi-stage) averaged scored 0.813 at 10 labels per class (auto's
    selection then: 0.802; timm + scikit-learn: 0.784) and 0.826 at 20 (selection 0.813, one probe 0.795); per seed
    -0.1 to +3.5 points against the selection (bench/results/fewlabels.md, bench/results/auto_fashion.md)."""
    ranked = sorted((m for m in members if m in oof), key=lambda m: -accuracy(labels, oof[m]))[:max_members]
    if len(ranked) < 2:
        return {}
    average = sum(oof[m] for m in ranked) / len(ranked)
    if not within_errors(labels, oof[best], average, max(1.0, math.sqrt(2 * math.log(len(oof))))):
        return {}
    return {m: 1.0 / len(ranked) for m in ranked}


def combine(oof: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    return sum(w * oof[n] for n, w in weights.items())  # type: ignore[return-value]


def save_ensemble(folder: Path, members: list[tuple[Any, dict[str, Any], dict[str, Any]]], weights: list[float],
                  extra: dict[str, Any] | None = None) -> None:
    """Write ``members`` (``(TransferModel, strategy dict, extra config)``) and the ensemble's ``config.json``."""
    from transferkit.model import FORMAT, FORMAT_VERSION, save_model

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (model, strategy, member_extra) in enumerate(members):
        path = f"{MEMBERS_FOLDER}/{i}"
        save_model(model, folder / path, strategy, extra=member_extra)
        paths.append(path)
    first = members[0][0]
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "modality": first.backbone.modality,
              "tasks": [t.to_dict() for t in first.tasks], ENSEMBLE_KEY: {"members": paths, "weights": weights},
              **(extra or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


# --- prediction: members that can share one forward pass ---------------------------------------------------------

#: backbone options that only change which features are returned, not how the final embedding is computed
_PREFIX_OPTIONS = ("pool_stages",)


def shares_features(host: Any, other: Any) -> bool:
    """True when ``other``'s features are the last columns of ``host``'s for every input (both loaded models): the
    same architecture, preprocessing, weights, test-time augmentation and pooling of the final map (``pool_grid``),
    ``host`` at most adding the pooled earlier stages of a multi-stage probe (``pool_stages``, placed before the
    final embedding). Then one forward pass of ``host``'s backbone serves both heads: auto's committee holds a
    final-layer and a multi-stage probe of each backbone, so sharing halves its passes at prediction."""
    import torch

    a, b = host.module.backbone, other.module.backbone
    if type(a) is not type(b) or a.spec.name != b.spec.name or host.config.get("tta") != other.config.get("tta"):
        return False
    if a.feature_dim < b.feature_dim:
        return False
    if getattr(a, "stage_grids", ())[-1:] != getattr(b, "stage_grids", ())[-1:]:  # the final map's pooling grid
        return False
    mine, theirs = dict(a.spec.options), dict(b.spec.options)
    mine.pop("pool_grid", None), theirs.pop("pool_grid", None)  # compared above: the final map's grid is what counts
    if mine != theirs:  # only the host may add pooled stages, and then the other must return the final embedding
        if any(theirs.get(k) for k in _PREFIX_OPTIONS) or theirs.get("feature_stage") is not None:
            return False
        if {k: v for k, v in mine.items() if k not in _PREFIX_OPTIONS} != theirs:
            return False
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(
        state_a[k].shape == state_b[k].shape and torch.equal(state_a[k].cpu(), state_b[k].cpu()) for k in state_a)


def shared_feature_groups(members: list[Any]) -> list[list[int]]:
    """Member indices grouped so that the first of each group (the widest features) serves the others
    (:func:`shares_features`); every member is in exactly one group."""
    order = sorted(range(len(members)), key=lambda i: (-members[i].module.backbone.feature_dim, i))
    groups: list[list[int]] = []
    for i in order:
        group = next((g for g in groups if shares_features(members[g[0]], members[i])), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    return groups


def group_probabilities(members: list[Any], data: Any, batch_size: int, progress: bool,
                        features_of: Callable[[Any, Any], np.ndarray] | None = None) -> list[np.ndarray]:
    """Class probabilities of each of ``members`` (one group of :func:`shared_feature_groups`, host first) from one
    pass of the host's backbone per test-time view; each member's head reads its last columns of the features.
    ``features_of(backbone, view)`` replaces that pass (e.g. features read from a cache)."""
    import torch

    from transferkit.engine.features import embed_items
    from transferkit.engine.placement import predict_batches

    host = members[0]
    if not len(data):  # as a member alone answers: no rows
        return [np.zeros((0, len(member.classes_))) for member in members]
    backbone = host.module.backbone
    if features_of is None:
        def features_of(backbone: Any, view: Any) -> np.ndarray:
            return embed_items(backbone, view, backbone.forward_features, progress=progress, batch_size=batch_size,
                               description="predicting")
    features = [features_of(backbone, view) for view in host.test_views(data)]
    out = []
    for member in members:
        model, width = member.module, member.module.backbone.feature_dim
        total = 0.0
        for x in features:
            total = total + predict_batches(model, [torch.as_tensor(x[:, -width:])], lambda f, m=model, t=member:
                                            torch.softmax(m.forward_head(f).logits.float() / t.temperature, dim=-1))
        out.append(total / len(features))
    return out
