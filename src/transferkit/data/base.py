"""Datasets as raw items plus labels; splits; the bridge to torch DataLoaders through a backbone.

Raw items are what a user has: PIL images (loaded lazily from files or arrays) or strings. A backbone turns
them into tensors (``Backbone.preprocess`` / ``Backbone.collate``), so one dataset serves every backbone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ItemSource(Sequence):
    """A lazy sequence of raw items: ``source[i]`` loads item i (e.g. opens an image file)."""

    def __init__(self, n: int, load: Callable[[int], Any], fingerprint_parts: Callable[[], bytes]) -> None:
        self._n = n
        self._load = load
        self._fingerprint_parts = fingerprint_parts

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._load(j) for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._load(i)

    def content_bytes(self) -> bytes:
        return self._fingerprint_parts()


class SubsetSource(Sequence):
    """Items ``indices`` of another sequence, without copying."""

    def __init__(self, base: Sequence, indices: np.ndarray) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.base[int(j)] for j in self.indices[i]]
        return self.base[int(self.indices[i])]


@dataclass
class LabeledData:
    """Raw items with integer labels in ``range(len(class_names))`` (``-1`` marks an unlabelled item).

    ``ids`` are stable, human-readable identifiers (a file's path relative to the dataset root, or
    ``name[row]``); ``columns`` holds further per-item values (e.g. a ``domain`` column, extra targets).
    """

    items: Sequence[Any]
    labels: np.ndarray
    class_names: list[str]
    modality: str  # "image" | "text" | "sequence"
    ids: list[str]
    name: str = "data"
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    content_key: str | None = None  # precomputed fingerprint of the full dataset, if cheap to know

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not (len(self.items) == len(self.labels) == len(self.ids)):
            raise ValueError("items, labels and ids must have the same length")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> LabeledData:
        """Items ``indices`` (positions in this dataset) without copying; subsets of subsets stay one level
        deep so that ``fingerprint`` can always reach the underlying ``ItemSource``."""
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.items, SubsetSource):
            items = SubsetSource(self.items.base, self.items.indices[idx])
        else:
            items = SubsetSource(self.items, idx)
        return LabeledData(
            items=items,
            labels=self.labels[idx],
            class_names=list(self.class_names),
            modality=self.modality,
            ids=[self.ids[i] for i in idx],
            name=name or self.name,
            columns={k: np.asarray(v)[idx] for k, v in self.columns.items()},
            content_key=None,
        )

    def class_counts(self) -> np.ndarray:
        labelled = self.labels[self.labels >= 0]
        return np.bincount(labelled, minlength=self.num_classes)

    def fingerprint(self) -> str:
        """A hash of the content (items, labels, order): keys the on-disk feature cache."""
        h = hashlib.sha256()
        h.update(self.modality.encode())
        h.update(self.labels.tobytes())
        h.update("\0".join(self.ids).encode())
        base = self.items
        if isinstance(base, SubsetSource):
            h.update(base.indices.tobytes())
            base = base.base
        if isinstance(base, ItemSource):
            h.update(base.content_bytes())
        elif self.modality == "text":
            h.update("\0".join(map(str, self.items)).encode())
        else:  # in-memory items (small datasets only): hash their pixels / values, else their repr
            for item in self.items:
                h.update(item_bytes(item))
        return h.hexdigest()[:24]

    def without_labels(self, name: str | None = None) -> LabeledData:
        """The same items marked unlabelled (labels ``-1``, no class names), e.g. a domain-adaptation target."""
        return LabeledData(
            items=self.items,
            labels=np.full(len(self), -1, dtype=np.int64),
            class_names=[],
            modality=self.modality,
            ids=list(self.ids),
            name=name or self.name,
            columns=dict(self.columns),
            content_key=None,
        )


class ItemPositions:
    """Where each item of a pool sits, by id, so that arrays computed once over the pool (features, lower-layer
    maps) serve any subset of it (cross-validation folds, the refit)."""

    def __init__(self, pool: LabeledData) -> None:
        self.index = {item_id: i for i, item_id in enumerate(pool.ids)}
        self.unique = len(self.index) == len(pool)

    def of(self, data: LabeledData) -> np.ndarray | None:
        """The pool positions of ``data``'s items, in order; None when one is not in the pool (or its ids repeat)."""
        positions = [self.index.get(item_id) for item_id in data.ids]
        if not self.unique or any(p is None for p in positions):
            return None
        return np.asarray(positions, dtype=np.int64)


def sort_class_names(names: Iterable[str]) -> list[str]:
    """Class names in label order: by numeric value when every name is a number (so "2" < "10" and class
    "k" gets index k for names 0..K-1), else alphabetically. Used for class folders and label columns alike."""
    unique = set(names)

    def number(name: str) -> float | None:
        try:
            return float(name)
        except ValueError:
            return None

    if unique and all(number(n) is not None for n in unique):
        return sorted(unique, key=lambda n: (number(n), n))
    return sorted(unique)


def item_bytes(item: Any) -> bytes:
    """Deterministic bytes for one in-memory item: a PIL image's mode, size and pixels, an array's bytes."""
    if hasattr(item, "mode") and hasattr(item, "size") and hasattr(item, "tobytes"):  # PIL.Image
        return f"{item.mode}{item.size}".encode() + item.tobytes()
    if isinstance(item, np.ndarray):
        return f"{item.dtype}{item.shape}".encode() + np.ascontiguousarray(item).tobytes()
    if hasattr(item, "detach"):  # torch.Tensor
        array = item.detach().cpu().numpy()
        return f"{array.dtype}{array.shape}".encode() + np.ascontiguousarray(array).tobytes()
    return repr(item).encode() + b"\0"


@dataclass
class DataSplits:
    """Train / validation / optional test; ``notes`` are human-readable remarks made while splitting."""

    train: LabeledData
    val: LabeledData
    test: LabeledData | None
    notes: list[str] = field(default_factory=list)
    source: str = ""  # what --data pointed at
    given: tuple[str, ...] = ()  # the splits the data itself provides ("val", "test"), as opposed to carved ones
    protocol: str = "holdout"  # "cv": train holds every labelled item, val is empty (fit --protocol cv)

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    @property
    def modality(self) -> str:
        return self.train.modality

    def has_test(self) -> bool:
        """True when there is a test split with at least one item."""
        return self.scoring_split()[0] == "test"

    def scoring_split(self) -> tuple[str, LabeledData]:
        """(name, data) of the split a model is scored on: the test split when it has items, else validation."""
        if self.test is not None and len(self.test):
            return "test", self.test
        return "val", self.val

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test) if self.test else 0}

    def fingerprint(self) -> str:
        """SHA-256 (24 hex digits) of which item is in which split with which label and class names: what an
        interrupted run's checkpoint relies on (``--resume`` refuses data that changed meanwhile)."""
        h = hashlib.sha256("\0".join(self.class_names).encode())
        for name, part in (("train", self.train), ("val", self.val), ("test", self.test)):
            if part is None:
                continue
            ids = part.ids if part.ids is not None else range(len(part))
            h.update(f"\n{name}\n".encode())
            h.update("".join(f"{i}\0{label}\n" for i, label in zip(ids, part.labels.tolist())).encode())
        return h.hexdigest()[:24]
