"""Embedding extraction with an on-disk cache keyed by backbone weights, preprocessing and data content.

A frozen backbone gives the same features every time, so strategies that keep it frozen (linear probe,
prototypes, kNN, classical CORAL, backbone ranking) extract once and reuse: the second fit on the same data
skips the forward passes entirely. With ``shard=True`` under ``torchrun`` the items are split across the
processes (:mod:`transferkit.engine.sharding`: every process gets all features, in order) and the main process
alone writes the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.backbones import Backbone
from transferkit.data.base import LabeledData
from transferkit.engine.placement import iter_predictions, predict_batches
from transferkit.engine.sharding import is_main_process, sharded_slices
from transferkit.progress import progress as progress_bar
from transferkit.rundir import atomic_path

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$TRANSFERKIT_CACHE`` or ``~/.cache/transferkit``."""
    return Path(os.environ.get("TRANSFERKIT_CACHE", Path.home() / ".cache" / "transferkit"))


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def feature_cache_key(backbone: Backbone, data: LabeledData) -> str:
    h = hashlib.sha1()
    h.update(backbone.preprocess_signature().encode())
    h.update(weights_digest(backbone).encode())
    h.update(data.fingerprint().encode())
    return h.hexdigest()[:24]


def extract_features(
    backbone: Backbone,
    data: LabeledData,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    shard: bool = False,
) -> np.ndarray:
    """``(len(data), feature_dim)`` float32 embeddings (eval-mode preprocessing, no augmentation), computed where
    the backbone is (``device``: place it there first). ``shard``: split the items across the processes of a
    ``torchrun`` job; every process must then call this (a collective), and every process gets all rows."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "features" / f"{feature_cache_key(backbone, data)}.npy"
        if path.is_file():
            logger.info("features of %d %s items loaded from the cache", len(data), data.name)
            return np.load(path)

    def compute(start: int, end: int) -> np.ndarray:
        part = data if (start, end) == (0, len(data)) else data.subset(np.arange(start, end))
        return _features(backbone, part, batch_size, progress, device)

    parts = sharded_slices(compute, len(data)) if shard else [compute(0, len(data))]
    features = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if path is not None and is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            np.save(tmp, features)
    return features


def _features(backbone: Backbone, data: LabeledData, batch_size: int, progress: bool,
              device: str | torch.device | None) -> np.ndarray:
    features = embed_items(backbone, data, backbone.forward_features, device, progress, batch_size)
    return features if features is not None else np.zeros((0, backbone.feature_dim), np.float32)


def embed_items(backbone: Backbone, data: LabeledData, forward: Any, device: str | torch.device | None = None,
                progress: bool = True, batch_size: int = 64, description: str = "features",
                dtype: torch.dtype = torch.float32, out: Path | None = None) -> np.ndarray | None:
    """``forward(inputs)`` (e.g. ``backbone.forward_features``) on the eval-mode inputs of every item of ``data``,
    in order, stored as ``dtype``; computed where the backbone is (``device``: place it there first). None for no
    items. ``out``: written batch by batch to that ``.npy`` file instead of memory and returned memory-mapped
    (read-only), for outputs larger than the memory (e.g. feature maps of 100,000 images)."""
    from transferkit.data.loader import make_loader

    loader = make_loader(data, backbone, batch_size=batch_size, train=False)
    batches = (batch["inputs"] for batch in progress_bar(loader, f"{description} ({data.name})", enabled=progress))
    if out is None:
        return predict_batches(backbone, batches, lambda inputs: forward(inputs).to(dtype), device)
    array = None
    row = 0
    for chunk in iter_predictions(backbone, batches, lambda inputs: forward(inputs).to(dtype), device):
        if array is None:
            array = np.lib.format.open_memmap(out, mode="w+", dtype=chunk.dtype, shape=(len(data), *chunk.shape[1:]))
        array[row: row + len(chunk)] = chunk
        row += len(chunk)
    if array is None:
        return None
    array.flush()
    del array
    return np.load(out, mmap_mode="r")
