"""The bridge from raw items to torch batches through a backbone's ``preprocess`` / ``collate``.

Batches are dicts ``{"inputs": backbone.collate(...), "labels": LongTensor, "index": LongTensor, <column>: tensor}``
where ``index`` is each example's position in the ``LabeledData`` (to map predictions back to ``ids``) and
every numeric column of ``data.columns`` is added under its own name (floats as float32, integers as int64).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.data.base import LabeledData

logger = logging.getLogger(__name__)

RESERVED_KEYS = ("inputs", "labels", "index")


class TorchDataset(Dataset):
    """``dataset[i] = (backbone.preprocess(item_i, train), label_i, i)``."""

    def __init__(self, data: LabeledData, backbone: Any, train: bool) -> None:
        self.data = data
        self.backbone = backbone
        self.train = train

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        return self.backbone.preprocess(self.data.items[i], self.train), int(self.data.labels[i]), i


def numeric_columns(data: LabeledData) -> dict[str, np.ndarray]:
    """The columns that become batch tensors: numeric or boolean ones whose names are not reserved."""
    chosen = {}
    for name, values in data.columns.items():
        array = np.asarray(values)
        if array.dtype.kind not in "biuf":
            continue
        if name in RESERVED_KEYS:
            logger.warning("column '%s' is not added to batches: the name is reserved", name)
            continue
        chosen[name] = array.astype(np.float32) if array.dtype.kind == "f" else array.astype(np.int64)
    return chosen


class BatchCollator:
    """Picklable collate function (DataLoader workers may be spawned processes)."""

    def __init__(self, backbone: Any, columns: dict[str, np.ndarray]) -> None:
        self.backbone = backbone
        self.columns = columns

    def __call__(self, samples: list[tuple[Any, int, int]]) -> dict[str, Any]:
        inputs, labels, indices = zip(*samples)
        index = torch.as_tensor(indices, dtype=torch.long)
        batch: dict[str, Any] = {
            "inputs": self.backbone.collate(list(inputs)),
            "labels": torch.as_tensor(labels, dtype=torch.long),
            "index": index,
        }
        for name, values in self.columns.items():
            batch[name] = torch.from_numpy(values[np.asarray(indices, dtype=np.int64)])
        return batch


def _seed_worker(worker_id: int) -> None:
    """Give numpy and ``random`` in each worker a seed derived from torch's per-worker seed (which the
    loader's generator determines), so augmentation is reproducible with ``num_workers > 0``."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    data: LabeledData, backbone: Any, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0
) -> DataLoader:
    """A DataLoader of batch dicts; shuffled when ``train`` by an order that depends only on ``(seed, epoch)``
    (``EpochShuffleSampler``: a resumed run sees the same batches), in dataset order otherwise. The last,
    smaller batch is kept (nothing is dropped). Worker seeds derive from torch's global RNG, which the engine
    seeds and checkpoints."""
    from transferkit.engine.sampling import EpochShuffleSampler

    dataset = TorchDataset(data, backbone, train)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed) if train else None,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=BatchCollator(backbone, numeric_columns(data)),
        worker_init_fn=_seed_worker if num_workers > 0 else None,
    )
