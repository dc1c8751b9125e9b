"""Seeded, stratified splits and few-shot subsets.

Per class c with n_c examples: ``n_test = round(n_c * test_fraction)`` (at most n_c - 2), then from the
remaining pool of m_c examples ``n_val = max(1, round(m_c * val_fraction / (1 - test_fraction)))`` (at most
m_c - 1), so both fractions are of the whole data and every class keeps one example for training and one
for validation.
The test split is drawn with a fixed seed (``TEST_SPLIT_SEED``), independent of the run's ``seed``: every
seed of an experiment is measured on the same held-out examples, and only train/validation vary with
``seed``. Rounding is half-up (``floor(x + 0.5)``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from transferkit.data.base import DataSplits, LabeledData
from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)

TEST_SPLIT_SEED = 20_240_601  # fixed: the carved test split (and any test subset) is the same for every seed
TINY_CLASS = 5  # classes with fewer examples than this get a note on how they were split


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))  # tolerance: 10 * 0.15 is 1.4999999999999998 in floating point


def _class_indices(data: LabeledData, positions: np.ndarray) -> list[np.ndarray]:
    """For each class, the positions (into ``data``) among ``positions`` with that label, in ascending order."""
    labels = data.labels[positions]
    return [np.sort(positions[labels == c]) for c in range(data.num_classes)]


def check_splittable(data: LabeledData, positions: np.ndarray | None = None, *, what: str = "the data") -> None:
    """Every class needs at least two examples (one to train on, one to validate with)."""
    positions = np.arange(len(data)) if positions is None else positions
    counts = np.bincount(data.labels[positions], minlength=data.num_classes)
    for c, n in enumerate(counts):
        if n == 0:
            raise TransferkitError(
                f"class '{data.class_names[c]}' has no examples in {what}", "add examples of it or drop the class"
            )
        if n == 1:
            raise TransferkitError(
                f"class '{data.class_names[c]}' has a single example in {what}; each class needs at least 2 "
                "(one to train on, one to validate with)",
                "add examples of it or drop the class",
            )


def _take_per_class(
    data: LabeledData, positions: np.ndarray, counts: Sequence[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``counts[c]`` random examples of each class c from ``positions``: ``(taken, rest)``, both sorted."""
    taken, rest = [], []
    for c, members in enumerate(_class_indices(data, positions)):
        shuffled = rng.permutation(members)
        taken.append(shuffled[: counts[c]])
        rest.append(shuffled[counts[c] :])
    return np.sort(np.concatenate(taken)).astype(np.int64), np.sort(np.concatenate(rest)).astype(np.int64)


def carve_test(data: LabeledData, positions: np.ndarray, test_fraction: float, notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Split ``positions`` into (pool, test) with a fixed seed; test is None when it would hold fewer
    examples than there are classes (then everything stays in the pool, with a note)."""
    if test_fraction <= 0:
        return positions, None
    check_splittable(data, positions)
    per_class = np.bincount(data.labels[positions], minlength=data.num_classes)
    n_test = [min(_round_half_up(n * test_fraction), n - 2) for n in per_class]
    n_test = [max(0, k) for k in n_test]
    if sum(n_test) < data.num_classes:
        notes.append(
            f"{len(positions)} examples are too few for a test split ({sum(n_test)} would go to it, fewer than one "
            "per class): no test split, so the validation score is the only estimate and it is optimistic "
            "(add examples or provide a test folder/file)"
        )
        return positions, None
    test, pool = _take_per_class(data, positions, n_test, np.random.default_rng(TEST_SPLIT_SEED))
    return pool, test


def carve_validation(
    data: LabeledData, positions: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``positions`` into (train, val) with ``seed``: ``max(1, round(n_c * val_fraction))`` per class,
    keeping at least one training example per class."""
    check_splittable(data, positions)
    per_class = np.bincount(data.labels[positions], minlength=data.num_classes)
    n_val = [min(max(1, _round_half_up(n * val_fraction)), n - 1) for n in per_class]
    val, train = _take_per_class(data, positions, n_val, np.random.default_rng(seed))
    return train, val


def tiny_class_notes(splits: DataSplits) -> list[str]:
    """One note per class that is small in training or missing from validation/test."""
    notes = []
    train_counts = splits.train.class_counts()
    val_counts = splits.val.class_counts()
    test_counts = splits.test.class_counts() if splits.test is not None else None
    for c, name in enumerate(splits.class_names):
        n_test = int(test_counts[c]) if test_counts is not None else 0
        total = int(train_counts[c] + val_counts[c]) + n_test
        if total >= TINY_CLASS and val_counts[c] > 0 and (test_counts is None or n_test > 0):
            continue
        parts = [f"{train_counts[c]} for training", f"{val_counts[c] or 'none'} for validation"]
        if test_counts is not None:
            parts.append(f"{n_test or 'none'} for test")
        notes.append(f"class '{name}' has {total} example{'s' if total != 1 else ''}: {', '.join(parts)}")
    return notes


def split_data(
    data: LabeledData, *, val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0
) -> DataSplits:
    """Stratified train/validation/test split of one labelled dataset (see the module docstring).

    ``test_fraction=0`` makes no test split. The test split depends only on the data, not on ``seed``.
    """
    notes: list[str] = []
    pool, test = carve_test(data, np.arange(len(data)), test_fraction, notes)
    pool_val_fraction = val_fraction / (1 - test_fraction) if test is not None else val_fraction
    train, val = carve_validation(data, pool, pool_val_fraction, seed)
    base = data.name
    splits = DataSplits(
        train=data.subset(train, name=f"{base}/train"),
        val=data.subset(val, name=f"{base}/val"),
        test=data.subset(test, name=f"{base}/test") if test is not None else None,
        notes=notes,
    )
    splits.notes.extend(tiny_class_notes(splits))
    return splits


def limit_per_class(data: LabeledData, k: int, seed: int, notes: list[str] | None = None) -> LabeledData:
    """A seeded few-shot subset: ``k`` random examples of each class (all of them when a class has fewer,
    with a note appended to ``notes``). Kept in the original order."""
    if k < 1:
        raise TransferkitError(f"limit per class must be at least 1, got {k}", "pass a positive number")
    positions = np.arange(len(data))
    per_class = np.bincount(data.labels[data.labels >= 0], minlength=data.num_classes)
    short = [(data.class_names[c], int(n)) for c, n in enumerate(per_class) if n < k]
    if short:
        message = f"fewer than {k} examples per class, all taken: " + ", ".join(f"'{c}' has {n}" for c, n in short)
        logger.info(message)
        if notes is not None:
            notes.append(message)
    chosen, _ = _take_per_class(data, positions, [min(k, int(n)) for n in per_class], np.random.default_rng(seed))
    return data.subset(chosen, name=data.name)


def stratified_subset(data: LabeledData, n: int, seed: int = TEST_SPLIT_SEED) -> np.ndarray:
    """Positions of a seeded, stratified subset of ``n`` examples: class quotas proportional to the class
    frequencies (largest remainder, so the quotas sum to ``n``), sorted."""
    if n >= len(data):
        return np.arange(len(data))
    counts = np.bincount(data.labels, minlength=data.num_classes)
    exact = counts * (n / len(data))
    quotas = np.floor(exact).astype(int)
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[: n - int(quotas.sum())]] += 1
    chosen, _ = _take_per_class(data, np.arange(len(data)), quotas.tolist(), np.random.default_rng(seed))
    return chosen
