"""A data check before training: class balance per split and near-duplicates between training and test data.

Near-duplicates are found in embedding space: every item is embedded (the backbone's features, through the
feature cache; or any ``embed`` function), L2-normalised, and each test item's nearest training/validation item
is found by inner product (FAISS ``IndexFlatIP`` when installed, else numpy). A cosine similarity at or above
``threshold`` (default 0.97) counts as a near-duplicate: a test score on such items measures memory, not
transfer. ``transferkit check --data ...`` runs it; ``fit --check-data`` runs it before training and puts the
result in metrics.json (``data_check``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from transferkit.extensions import ExtensionConfig, FitExtension, register_extension

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.97
IMBALANCE_WARNING = 3.0  # largest / smallest class count
MAX_LISTED = 10


def class_balance(data: Any) -> dict[str, Any]:
    counts = data.class_counts()
    present = counts[counts > 0]
    ratio = float(present.max() / present.min()) if len(present) else None
    return {"n": int(len(data)), "counts": {c: int(n) for c, n in zip(data.class_names, counts)},
            "imbalance_ratio": ratio, "missing_classes": [c for c, n in zip(data.class_names, counts) if n == 0]}


def nearest_neighbours(queries: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity and index of each query's nearest base row."""
    q = _normalise(queries)
    b = _normalise(base)
    try:
        import faiss

        index = faiss.IndexFlatIP(b.shape[1])
        index.add(b)
        similarity, position = index.search(q, 1)
        return similarity[:, 0].astype(np.float64), position[:, 0].astype(np.int64)
    except ImportError:
        sims = q @ b.T
        position = sims.argmax(axis=1)
        return sims[np.arange(len(q)), position].astype(np.float64), position


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def check_data(splits: Any, *, backbone: str | Any | None = None, threshold: float = DEFAULT_THRESHOLD,
               backbone_options: dict[str, Any] | None = None, embed: Callable[[Any], np.ndarray] | None = None,
               cache_dir: Any = None, progress: bool = False) -> dict[str, Any]:
    """Class balance of every split and train/val-vs-test near-duplicates; ``warnings`` lists what to fix.

    ``backbone``: a registry name, a built Backbone, or None (the modality's default); ``embed`` overrides it.
    """
    from transferkit.errors import check_number
    from transferkit.evaluation.transferability import labelled_pool

    check_number("--threshold", threshold, 0, 1, low_open=True)  # cosine similarity: above 1 nothing is found
    result: dict[str, Any] = {"balance": {}, "warnings": []}
    parts = {"train": splits.train, "val": splits.val, **({"test": splits.test} if splits.test is not None else {})}
    for name, part in parts.items():
        balance = class_balance(part)
        result["balance"][name] = balance
        if balance["missing_classes"] and len(part):
            result["warnings"].append(f"{name}: no examples of {', '.join(balance['missing_classes'][:5])}")
        if balance["imbalance_ratio"] and balance["imbalance_ratio"] > IMBALANCE_WARNING:
            result["warnings"].append(f"{name}: classes are imbalanced (largest/smallest = "
                                      f"{balance['imbalance_ratio']:.1f}); accuracy may hide weak classes, "
                                      "look at macro-F1 and per-class scores")
    if splits.test is None or not len(splits.test):
        result["duplicates"] = None
        return result
    pool = labelled_pool(splits)
    if embed is None:
        embed, embedder = _backbone_embedder(splits.modality, backbone, backbone_options or {}, cache_dir, progress)
    else:
        embedder = getattr(embed, "__name__", "custom")
    similarity, position = nearest_neighbours(embed(splits.test), embed(pool))
    hits = np.flatnonzero(similarity >= threshold)
    hits = hits[np.argsort(-similarity[hits])]
    result["duplicates"] = {
        "embedding": embedder,
        "threshold": threshold,
        "test_items": int(len(splits.test)),
        "near_duplicates": int(len(hits)),
        "fraction_of_test": float(len(hits) / len(splits.test)),
        "same_label": int(sum(splits.test.labels[i] == pool.labels[position[i]] for i in hits)),
        "examples": [{"test": splits.test.ids[i], "train": pool.ids[position[i]],
                      "similarity": round(float(similarity[i]), 4)} for i in hits[:MAX_LISTED]],
    }
    if len(hits):
        result["warnings"].append(f"{len(hits)} test item(s) ({len(hits) / len(splits.test):.1%}) have a near-duplicate "
                                  f"in the training data (cosine >= {threshold}); the test score overstates transfer")
    return result


def _backbone_embedder(modality: str, backbone: Any, options: dict[str, Any], cache_dir: Any,
                       progress: bool) -> tuple[Callable[[Any], np.ndarray], str]:
    from transferkit.backbones import Backbone, create_backbone, default_backbone
    from transferkit.engine.features import default_cache_dir, extract_features

    if not isinstance(backbone, Backbone):
        backbone = create_backbone(backbone or default_backbone(modality), pretrained=True, **options)
    cache = cache_dir or default_cache_dir()

    def embed(data: Any) -> np.ndarray:
        return extract_features(backbone, data, cache_dir=cache, progress=progress)

    return embed, backbone.spec.name


def format_check(result: dict[str, Any]) -> str:
    lines = []
    for name, balance in result["balance"].items():
        counts = ", ".join(f"{c}: {n}" for c, n in balance["counts"].items())
        ratio = f"{balance['imbalance_ratio']:.1f}" if balance["imbalance_ratio"] else "-"
        lines.append(f"{name}: {balance['n']} items, largest/smallest class {ratio} ({counts})")
    dup = result.get("duplicates")
    if dup:
        lines.append(f"near-duplicates (test vs train+val, {dup['embedding']} embeddings, cosine >= "
                     f"{dup['threshold']}): {dup['near_duplicates']} of {dup['test_items']} test items")
        lines += [f"  {e['test']} ~ {e['train']} ({e['similarity']:.3f})" for e in dup["examples"]]
    lines += [f"warning: {w}" for w in result["warnings"]] or ["no problems found"]
    return "\n".join(lines)


# --- fit extension: --check-data -------------------------------------------------------------------------------


@dataclass
class DataCheckConfig(ExtensionConfig):
    check_data: bool = field(default=False, metadata={
        "help": "Before training, check class balance and train/test near-duplicates (backbone embeddings, "
                "cosine >= 0.97); the result goes into metrics.json as data_check."})


@register_extension
class DataCheck(FitExtension):
    name = "data check"
    config_class = DataCheckConfig
    config: DataCheckConfig

    def active(self) -> bool:
        return self.config.check_data

    def describe(self) -> str:
        return "--check-data"

    @classmethod
    def modes(cls) -> dict[str, dict[str, Any]]:
        return {"check-data": {"check_data": True}}

    def configure(self, context: Any, model: Any, fit: Any) -> Any:
        self._result = check_data(context.splits, backbone=model.backbone, cache_dir=context.cache_dir,
                                  progress=context.progress)
        context.notes.extend(f"data check: {w}" for w in self._result["warnings"])
        for warning in self._result["warnings"]:
            logger.warning("data check: %s", warning)
        return context

    def metrics(self, context: Any, model: Any) -> dict[str, Any]:
        return {"data_check": getattr(self, "_result", None)}
