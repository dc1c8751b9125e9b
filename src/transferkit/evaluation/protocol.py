"""Cross-validation for small labelled datasets: no label is spent on a fixed validation or test split.

Stratified k-fold (repeated with reshuffled folds): every class is spread over the k folds as evenly as possible,
every item is validated exactly once per repeat, and the model of fold j never sees fold j. The out-of-fold (OOF)
probabilities of all items, averaged over repeats, give the estimate of the accuracy of the procedure "train on
n (k-1)/k labelled items", a slightly pessimistic estimate for the final model, refit on all n items.

``k`` defaults to ``min(5, smallest class size)`` so that every class appears in every validation fold; a class
with fewer than 2 items (or a dataset with a single class) cannot be cross-validated.

Settings that need choosing (the epoch count of gradient training, the probe's C, ...) are chosen *inside* the
folds, on all k validation folds together instead of one tiny validation split. ``train_and_predict`` may return a
:class:`FoldOutput` with ``candidates``: its validation probabilities under each candidate setting (after each
epoch, for each C, ...; the same list of settings in every fold). The chosen candidate is the one whose pooled
out-of-fold predictions are most accurate (ties: lower cross-entropy, then the earlier candidate); the OOF
probabilities and fold accuracies are then those of that candidate. Choosing one of m candidates on the same
folds that score it makes the OOF accuracy slightly optimistic (by about the spread of the candidates' scores;
small for the handful of settings chosen here). A fold may instead (or also) return named ``curves``;
:func:`mean_curves` and :func:`choose_from_curve` then serve a custom ``choose``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from transferkit.errors import TransferkitError

if TYPE_CHECKING:
    from transferkit.data.base import LabeledData

MAX_FOLDS = 5


@dataclass
class FoldOutput:
    """What one fold returns: its validation items' probabilities, or one such array per candidate setting
    (``candidates``, in the same order in every fold), and optionally named validation ``curves``."""

    probabilities: np.ndarray | None = None
    candidates: list[np.ndarray] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=dict)


class FoldStore(Protocol):
    """Where finished folds are kept so that an interrupted cross-validation resumes without re-training them.
    ``key`` identifies the fold's items (a fold is only reused for exactly the same split)."""

    def load(self, index: int, key: str) -> FoldOutput | None: ...

    def start(self, index: int, key: str) -> None:
        """Called before fold ``index`` trains (e.g. to prepare where its epochs are checkpointed)."""

    def save(self, index: int, key: str, output: FoldOutput) -> None: ...


def fold_key(data: LabeledData, train_pos: np.ndarray, val_pos: np.ndarray) -> str:
    """A digest of the fold's training and validation item ids (and their labels)."""
    import hashlib

    digest = hashlib.sha256()
    for part in (train_pos, val_pos):
        for i in part:
            digest.update(f"{data.ids[i]}\t{int(data.labels[i])}\n".encode())
        digest.update(b"|")
    return digest.hexdigest()


@dataclass
class CVResult:
    k: int
    repeats: int
    fold_accuracies: list[float]  # repeat-major: repeat 0 folds 0..k-1, then repeat 1, ...
    mean: float  # mean of the fold accuracies
    sd: float  # their sample standard deviation (0 with a single fold)
    oof_probabilities: np.ndarray  # (n_items, n_classes), averaged over repeats
    oof_accuracy: float  # accuracy of the OOF probabilities averaged over the repeats
    chosen: dict[str, Any]  # settings chosen inside the folds (epochs, C, lr, ...)
    seed: int = 0
    #: positions (into the data) of each fold's validation items, in the order of ``fold_accuracies``
    fold_validation: list[np.ndarray] = field(default_factory=list)
    #: per-fold curves returned by ``train_and_predict`` (empty dicts when it returned bare probabilities)
    fold_curves: list[dict[str, list[float]]] = field(default_factory=list)
    #: with candidates: the pooled OOF ``accuracy`` and ``loss`` (cross-entropy) of each candidate
    candidate_scores: list[dict[str, float]] = field(default_factory=list)

    @property
    def repeat_accuracies(self) -> list[float]:
        """Per repeat, the out-of-fold accuracy of that repeat alone: every item predicted once, by one model that
        did not see it (``oof_accuracy`` scores the repeats' averaged probabilities, a small ensemble)."""
        hits = [float(a) * len(v) for a, v in zip(self.fold_accuracies, self.fold_validation)]
        sizes = [len(v) for v in self.fold_validation]
        return [round(sum(hits[r * self.k:(r + 1) * self.k]) / sum(sizes[r * self.k:(r + 1) * self.k]), 6)
                for r in range(self.repeats)] if len(sizes) == self.k * self.repeats else []

    def summary(self) -> dict[str, Any]:
        """The ``cv`` entry of ``metrics.json``."""
        return {"k": self.k, "repeats": self.repeats, "seed": self.seed,
                "fold_accuracies": [round(a, 6) for a in self.fold_accuracies], "mean": self.mean, "sd": self.sd,
                "oof_accuracy": self.oof_accuracy, "repeat_accuracies": self.repeat_accuracies, "chosen": self.chosen}


def default_k(labels: np.ndarray | Sequence[int], max_k: int = MAX_FOLDS) -> int:
    """``min(max_k, size of the smallest class)``, after checking that the labels can be cross-validated."""
    counts = check_cross_validatable(labels)
    return int(min(max_k, counts[counts > 0].min()))


def check_cross_validatable(labels: np.ndarray | Sequence[int], class_names: Sequence[str] | None = None) -> np.ndarray:
    """Per-class counts; TransferkitError when there is a single class or a class with fewer than 2 items."""
    labels = np.asarray(labels, dtype=np.int64)
    if (labels < 0).any():
        raise TransferkitError("cross-validation needs every item labelled", "drop the unlabelled items")
    counts = np.bincount(labels, minlength=len(class_names) if class_names else 0)

    def name(c: int) -> str:
        return f"'{class_names[c]}'" if class_names else str(c)

    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise TransferkitError(f"the data has a single class ({name(int(present[0])) if len(present) else 'none'}): "
                               "there is nothing to classify", "add examples of at least one other class")
    if class_names is not None and (counts == 0).any():
        raise TransferkitError(f"class {name(int(np.flatnonzero(counts == 0)[0]))} has no examples",
                               "add examples of it or drop the class")
    single = [name(int(c)) for c in np.flatnonzero(counts == 1)]
    if single:
        raise TransferkitError(f"class {', '.join(single)} has a single example: cross-validation needs at least 2 "
                               "per class (one to train on, one to validate with)",
                               "add examples of it or drop the class")
    return counts


def stratified_folds(labels: np.ndarray | Sequence[int], k: int, repeats: int = 1,
                     seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``repeats * k`` pairs ``(train positions, validation positions)``, repeat-major, both sorted.

    Per repeat r, each class's items are shuffled with ``default_rng([seed, r])`` and dealt round-robin into the
    k folds, continuing where the previous class stopped so that fold sizes differ by at most one.
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = check_cross_validatable(labels)
    smallest = int(counts[counts > 0].min())
    if not 2 <= k <= smallest:
        raise TransferkitError(f"cannot make {k} stratified folds: the smallest class has {smallest} items",
                               f"use k between 2 and {smallest}")
    if repeats < 1:
        raise TransferkitError(f"invalid number of repeats {repeats}", "use at least 1")
    folds = []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        fold_of = np.empty(len(labels), dtype=np.int64)
        start = int(rng.integers(k))
        for c in np.flatnonzero(counts):
            members = rng.permutation(np.flatnonzero(labels == c))
            fold_of[members] = (start + np.arange(len(members))) % k
            start = (start + len(members)) % k
        for j in range(k):
            folds.append((np.flatnonzero(fold_of != j), np.flatnonzero(fold_of == j)))
    return folds


def cross_validate(train_and_predict: Callable[[LabeledData, LabeledData], np.ndarray | FoldOutput],
                   data: LabeledData, *, k: int | None = None, repeats: int = 1, seed: int = 0,
                   settings: Callable[[int], dict[str, Any]] | None = None,
                   choose: Callable[[list[dict[str, list[float]]]], dict[str, Any]] | None = None,
                   on_fold: Callable[[int, int, float], None] | None = None,
                   store: FoldStore | None = None) -> CVResult:
    """Stratified k-fold cross-validation of ``train_and_predict(train, val) -> probabilities (len(val), C)``
    (or a :class:`FoldOutput`). ``k=None``: :func:`default_k`. ``settings(i)`` names candidate i's settings
    (e.g. ``{"epochs": i + 1}``) in ``chosen``; ``choose(fold_curves) -> dict`` adds choices made from curves.
    ``on_fold(index, total, accuracy)`` reports progress. With a ``store``, every finished fold is saved and a
    fold found there (same items) is not trained again: an interrupted run resumes at the first unfinished fold."""
    check_cross_validatable(data.labels, data.class_names)
    k = default_k(data.labels) if k is None else k
    folds = stratified_folds(data.labels, k, repeats, seed)
    outputs: list[list[np.ndarray]] = []  # per fold: one probability array per candidate (or the only one)
    curves, validation = [], []
    for index, (train_pos, val_pos) in enumerate(folds):
        train = data.subset(train_pos, name=f"{data.name}/cv-train")
        val = data.subset(val_pos, name=f"{data.name}/cv-val")
        key = fold_key(data, train_pos, val_pos) if store is not None else ""
        output = store.load(index, key) if store is not None else None
        if output is None:
            if store is not None:
                store.start(index, key)
            output = train_and_predict(train, val)
            if not isinstance(output, FoldOutput):
                output = FoldOutput(np.asarray(output))
            if store is not None:
                store.save(index, key, output)
        arrays = list(output.candidates) or [output.probabilities]
        for probabilities in arrays:
            if probabilities is None or np.shape(probabilities) != (len(val_pos), data.num_classes):
                raise ValueError(f"train_and_predict returned shape {np.shape(probabilities)}, expected "
                                 f"{(len(val_pos), data.num_classes)}")
        outputs.append([np.asarray(p, dtype=np.float64) for p in arrays])
        curves.append(dict(output.curves))
        validation.append(val_pos)
        if on_fold is not None:
            on_fold(index + 1, len(folds), float((arrays[-1].argmax(1) == data.labels[val_pos]).mean()))
    n_candidates = min(len(o) for o in outputs)
    scores = [_pooled_scores([o[c] for o in outputs], validation, data.labels, repeats) for c in range(n_candidates)]
    best = min(range(n_candidates), key=lambda c: (-scores[c]["accuracy"], scores[c]["loss"], c))
    chosen: dict[str, Any] = {}
    if n_candidates > 1 or any(len(o) > 1 for o in outputs):
        chosen = {"candidate": best, **(settings(best) if settings is not None else {})}
    if choose is not None:
        chosen.update(choose(curves))
    summed = np.zeros((len(data), data.num_classes))
    accuracies = []
    for arrays, val_pos in zip(outputs, validation):
        summed[val_pos] += arrays[best]
        accuracies.append(float((arrays[best].argmax(1) == data.labels[val_pos]).mean()))
    oof = summed / repeats
    acc = np.asarray(accuracies)
    return CVResult(k=k, repeats=repeats, fold_accuracies=accuracies, mean=float(acc.mean()),
                    sd=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, oof_probabilities=oof,
                    oof_accuracy=float((oof.argmax(1) == data.labels).mean()), chosen=chosen, seed=seed,
                    fold_validation=validation, fold_curves=curves,
                    candidate_scores=scores if n_candidates > 1 else [])


def _pooled_scores(arrays: list[np.ndarray], validation: list[np.ndarray], labels: np.ndarray,
                   repeats: int) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the OOF probabilities (averaged over repeats) of one candidate."""
    summed = np.zeros((len(labels), arrays[0].shape[1]))
    for probabilities, val_pos in zip(arrays, validation):
        summed[val_pos] += probabilities
    oof = summed / repeats
    loss = -np.log(np.clip(oof[np.arange(len(labels)), labels], 1e-12, None)).mean()
    return {"accuracy": float((oof.argmax(1) == labels).mean()), "loss": float(loss)}


def mean_curves(fold_curves: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Each named curve averaged over the folds that report it, truncated to the shortest fold's length."""
    names = {name for curves in fold_curves for name in curves}
    result = {}
    for name in sorted(names):
        series = [list(c[name]) for c in fold_curves if c.get(name)]
        length = min(len(s) for s in series)
        result[name] = [float(np.mean([s[i] for s in series])) for i in range(length)]
    return result


def choose_from_curve(curve: Sequence[float], mode: str = "min", tolerance: float = 0.0) -> int:
    """The 0-based index of the best point of ``curve`` (``mode`` "min" or "max"). With ``tolerance`` > 0, the
    earliest index within ``tolerance`` of the best (fewer epochs / a simpler model when it is as good)."""
    values = np.asarray(curve, dtype=np.float64)
    if not len(values) or not np.isfinite(values).any():
        raise ValueError("empty or non-finite curve")
    values = np.where(np.isfinite(values), values, math.inf if mode == "min" else -math.inf)
    best = float(values.min() if mode == "min" else values.max())
    good = values <= best + tolerance if mode == "min" else values >= best - tolerance
    return int(np.flatnonzero(good)[0])


def fold_ids(data: LabeledData, folds: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[set[str], set[str]]]:
    """The item ids of each fold's training and validation parts (for leakage checks and records)."""
    return [({data.ids[i] for i in tr}, {data.ids[i] for i in va}) for tr, va in folds]
