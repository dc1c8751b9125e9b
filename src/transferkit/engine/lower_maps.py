"""Training the top layer groups on the frozen lower layers' outputs, computed once.

When only the top ``k`` layer groups of a backbone train (e.g. ``finetune --unfreeze k``) and the backbone splits
its forward pass between groups (``Backbone.splits_into_groups``: ``forward_top(forward_below(x, k), k) ==
forward_features(x)``), everything below those groups is the same function at every step. Each item's lower-layer
output (its clean, eval-mode input) is then computed once (float16) and training reads these feature maps: at
224 px an EfficientNet-Lite0 pass over 5,000 images costs ~35 s with ``k = 2`` instead of ~6 minutes.

Input-space augmentation cannot be applied to cached maps, so views are made on the maps themselves (per batch,
seeded through Python's ``random``, which the engine seeds and checkpoints):

* weak: a horizontal flip of each map with probability 1/2, and a shift of the batch by up to ``shift`` cells in
  each direction (edges replicated);
* strong: the weak view, then cutout (a zeroed square of ``cut`` times the map's side per item) and channel dropout
  (each channel zeroed with probability ``channel_drop``, the rest rescaled by ``1 / (1 - channel_drop)``).

The model reads cached maps through :class:`BelowInputs`: ``TransferModel.forward`` runs ``backbone.forward_top``
on them, so the engine, its objectives and a distributed wrapper call the model exactly as on raw inputs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferkit.data.base import ItemPositions, LabeledData

#: the measured views (Fashion-MNIST, 20 labels per class + 5,000 unlabelled images, EfficientNet-Lite0 224 px,
#: top 2 groups): bench/results/unlabelled.md
SHIFT, CUT, CHANNEL_DROP = 1, 0.5, 0.2


@dataclass
class BelowInputs:
    """A batch of cached lower-layer maps that enter the backbone's top ``groups`` layer groups."""

    maps: torch.Tensor
    groups: int

    def to(self, device: Any, non_blocking: bool = False) -> BelowInputs:
        return BelowInputs(self.maps.to(device, non_blocking=non_blocking), self.groups)


def trained_top_groups(backbone: nn.Module) -> int | None:
    """``k`` when every trainable backbone weight lies in the top ``k`` of its layer groups (``0 < k <`` all) and
    the backbone can run its layers below them on their own; None otherwise (nothing to cache)."""
    splits = getattr(backbone, "splits_into_groups", None)
    if splits is None or not splits():
        return None
    groups = backbone.layer_groups()
    trained = [i for i, group in enumerate(groups) if any(p.requires_grad for p in group.parameters())]
    grouped = {id(p) for group in groups for p in group.parameters()}
    if any(p.requires_grad and id(p) not in grouped for p in backbone.parameters()):
        return None  # trainable weights outside the groups (e.g. an adapter): the whole pass must run
    if not trained:
        return None
    k = len(groups) - trained[0]
    return k if k < len(groups) else None


def lower_maps(backbone: Any, data: LabeledData, groups: int, progress: bool = True, device: Any = None,
               out: Path | None = None) -> np.ndarray:
    """The output of every layer below the top ``groups`` groups on the eval-mode inputs of ``data``, in order,
    as float16, computed on ``device`` (None: where the backbone is); ``out``: written to that ``.npy`` file and
    returned memory-mapped (pools larger than the memory)."""
    from transferkit.engine.features import embed_items

    maps = embed_items(backbone, data, lambda inputs: backbone.forward_below(inputs, groups), device, progress,
                       description=f"layers below the top {groups} group(s)", dtype=torch.float16, out=out)
    if maps is None:
        raise ValueError(f"no items in '{data.name}' to compute lower-layer maps of")
    return maps


class LowerMapPool:
    """The lower-layer maps of a pool of items (every labelled item), computed on first use and shared by the runs
    that train on its subsets: the cross-validation folds and the final run read rows by item id. Valid because the
    layers below the top ``groups`` never train (:func:`trained_top_groups`); items outside the pool are computed
    on their own."""

    def __init__(self, backbone: Any, pool: LabeledData, groups: int, progress: bool = True) -> None:
        self.backbone, self.pool, self.groups, self.progress = backbone, pool, groups, progress
        self.positions = ItemPositions(pool)
        self._maps: np.ndarray | None = None

    def maps(self, data: LabeledData) -> np.ndarray:
        positions = self.positions.of(data)
        if positions is None:
            return lower_maps(self.backbone, data, self.groups, self.progress)
        if self._maps is None:
            self._maps = lower_maps(self.backbone, self.pool, self.groups, self.progress)
        return self._maps[positions]


def map_views(maps: torch.Tensor, strong: bool, generator: torch.Generator, shift: int = SHIFT, cut: float = CUT,
              channel_drop: float = CHANNEL_DROP) -> torch.Tensor:
    """A weak (flip, shift) or strong (also cutout and channel dropout) view of a batch ``(B, C, H, W)`` of maps."""
    b, c, h, w = maps.shape
    flip = torch.rand(b, generator=generator) < 0.5
    views = torch.where(flip[:, None, None, None], maps.flip(-1), maps)
    if shift > 0:
        padded = F.pad(views, (shift, shift, shift, shift), mode="replicate")
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
        views = padded[:, :, dy:dy + h, dx:dx + w]
    if not strong:
        return views
    if cut > 0:
        size_h, size_w = max(1, round(h * cut)), max(1, round(w * cut))
        top = torch.randint(0, h - size_h + 1, (b,), generator=generator)
        left = torch.randint(0, w - size_w + 1, (b,), generator=generator)
        rows, cols = torch.arange(h), torch.arange(w)
        inside_h = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + size_h)
        inside_w = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + size_w)
        views = views * (~(inside_h[:, :, None] & inside_w[:, None, :]))[:, None].to(views.dtype)
    if channel_drop > 0:
        keep = (torch.rand(b, c, 1, 1, generator=generator) >= channel_drop).to(views.dtype)
        views = views * keep / (1 - channel_drop)
    return views


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(random.getrandbits(63))


class _Rows(Dataset):
    def __init__(self, maps: np.ndarray) -> None:
        self.maps = maps

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.asarray(self.maps[i], dtype=np.float32)), i


class MapCollator:
    """Labelled batches of cached maps in the engine's batch format, weak views when ``train``."""

    def __init__(self, labels: np.ndarray, groups: int, train: bool) -> None:
        self.labels, self.groups, self.train = labels, groups, train

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> dict[str, Any]:
        rows, index = zip(*samples)
        maps = torch.stack(rows)
        if self.train:
            maps = map_views(maps, False, _generator())
        idx = np.asarray(index, dtype=np.int64)
        return {"inputs": BelowInputs(maps, self.groups), "labels": torch.as_tensor(self.labels[idx]),
                "index": torch.as_tensor(idx)}


class MapViewCollator:
    """Unlabelled batches: a weak and a strong view of each map (consistency training), with the items' labels
    where known (-1 otherwise)."""

    def __init__(self, truth: np.ndarray, groups: int) -> None:
        self.truth, self.groups = truth, groups

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> dict[str, Any]:
        rows, index = zip(*samples)
        maps = torch.stack(rows)
        generator = _generator()
        idx = np.asarray(index, dtype=np.int64)
        return {"weak": BelowInputs(map_views(maps, False, generator), self.groups),
                "strong": BelowInputs(map_views(maps, True, generator), self.groups),
                "index": torch.as_tensor(idx), "truth": torch.as_tensor(self.truth[idx])}


def map_loader(maps: np.ndarray, labels: np.ndarray, groups: int, batch_size: int, train: bool, seed: int
               ) -> DataLoader:
    """Batches of labelled maps: shuffled by ``(seed, epoch)`` with weak views when ``train``, in order otherwise."""
    from transferkit.engine.sampling import EpochShuffleSampler

    return DataLoader(_Rows(maps), batch_size=batch_size, sampler=EpochShuffleSampler(len(maps), seed) if train
                      else None, collate_fn=MapCollator(np.asarray(labels, dtype=np.int64), groups, train))


def map_view_loader(maps: np.ndarray, groups: int, batch_size: int, seed: int, truth: np.ndarray | None = None
                    ) -> DataLoader:
    """Shuffled batches of weak / strong views of unlabelled maps (the consistency objective's auxiliary batch)."""
    from transferkit.engine.sampling import EpochShuffleSampler

    known = truth if truth is not None else np.full(len(maps), -1, dtype=np.int64)
    return DataLoader(_Rows(maps), batch_size=min(batch_size, len(maps)),
                      sampler=EpochShuffleSampler(len(maps), seed), drop_last=len(maps) > batch_size,
                      collate_fn=MapViewCollator(known, groups))
