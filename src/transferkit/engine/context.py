"""RunContext: what a strategy needs to train (data splits, engine settings, extra objectives, caches).

Strategies call ``train_with_engine`` (the one engine on raw inputs), ``train_head_on_features`` (the same
engine on cached embeddings) or ``features`` (cached extraction). Regularisers and domain-adaptation methods
enter as ``objectives``, ``aux_data``, a ``task_weight`` or a ``feature_transform`` without any strategy knowing
about them. Fit extensions never patch a context: they return a ``dataclasses.replace``d one (``notes`` is the
run's log, shared by the contexts derived from it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from transferkit.data.base import DataSplits, LabeledData
from transferkit.engine.callbacks import Callback
from transferkit.engine.features import extract_features
from transferkit.engine.objectives import CrossEntropyObjective, Objective, ScaledObjective
from transferkit.engine.sampling import EpochShuffleSampler
from transferkit.engine.trainer import TrainConfig, Trainer, TrainResult, default_forward

if TYPE_CHECKING:
    from transferkit.backbones import Backbone
    from transferkit.engine.lower_maps import LowerMapPool
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy


@dataclass
class RunContext:
    splits: DataSplits
    train: TrainConfig
    #: loss terms added to every engine run (anchoring regularisers, domain alignment, ...)
    objectives: list[Objective] = field(default_factory=list)
    #: the task loss; default cross-entropy with ``label_smoothing``
    task_objectives: list[Objective] | None = None
    label_smoothing: float = 0.0
    #: unlabelled / auxiliary datasets fed next to every training batch under their name (e.g. "target")
    aux_data: dict[str, LabeledData] = field(default_factory=dict)
    #: auxiliary loaders that need their own batching (e.g. weak and strong views of unlabelled items for
    #: consistency training): ``{name: factory(backbone) -> DataLoader}``, fed next to every batch like ``aux_data``
    aux_loaders: dict[str, Callable[[Any], DataLoader]] = field(default_factory=dict)
    checkpoint_dir: Path | None = None
    #: the run's staging folder (files written here end up in the finished run folder)
    run_dir: Path | None = None
    cache_dir: Path | None = None
    progress: bool = True
    forward_fn: Callable = default_forward
    evaluate_fn: Callable | None = None
    monitor: tuple[str, str] = ("accuracy", "max")
    notes: list[str] = field(default_factory=list)
    #: called with each epoch's history row (e.g. ``transferkit auto`` stops a candidate when its time is up)
    epoch_callback: Callable[[dict[str, Any]], None] | None = None
    #: further engine callbacks (their state tensors are saved in every checkpoint, e.g. a cross-validation
    #: fold's per-epoch validation probabilities)
    callbacks: list[Callback] = field(default_factory=list)
    #: under ``--protocol cv`` the CVResult (evaluation/protocol.py): its out-of-fold predictions on every labelled
    #: item stand in for the (empty) validation split, e.g. for temperature scaling
    cv: Any = None
    #: factor of the task loss (KL anchoring's ``1 - A``)
    task_weight: float = 1.0
    #: ``(data, features) -> features`` applied to every extraction (CORAL re-colours the source splits)
    feature_transform: Callable[[LabeledData, np.ndarray], np.ndarray] | None = None
    #: where the heads were initialised from (``--init-from``); strategies keep them instead of a probe start
    heads_from: str | None = None
    #: train on cached lower-layer maps (engine/lower_maps.py): the top this-many layer groups are all that
    #: trains, the layers below run once per item, and augmentation happens on the maps; None: raw inputs
    below_groups: int | None = None
    #: with ``below_groups``: the labelled items' maps, computed once for the folds and the final run
    map_pool: LowerMapPool | None = None

    def scored_out_of_fold(self) -> bool:
        """True when the run's ``accuracy`` is the cross-validation out-of-fold estimate: ``--protocol cv`` ran and
        there is no test split to score the final model on."""
        return self.cv is not None and not self.splits.has_test()

    def checkpoint_is_fresh(self) -> bool:
        """True unless an engine checkpoint exists (a resumed run must not redo one-off initialisations)."""
        from transferkit.engine.checkpoint import has_checkpoint

        return not has_checkpoint(self.checkpoint_dir)

    # --- features ------------------------------------------------------------------------------------------
    def features(self, backbone: Backbone, data: LabeledData, shard: bool = False) -> np.ndarray:
        """Frozen-backbone features of ``data`` (cached); ``shard``: split across ``torchrun`` processes (every
        process must call it then)."""
        features = extract_features(backbone, data, batch_size=max(32, self.train.batch_size),
                                    cache_dir=self.cache_dir, progress=self.progress, shard=shard)
        return features if self.feature_transform is None else self.feature_transform(data, features)

    # --- loaders -------------------------------------------------------------------------------------------
    def loader(self, data: LabeledData, backbone: Backbone, train: bool) -> DataLoader:
        from transferkit.data.loader import make_loader

        return make_loader(data, backbone, batch_size=self.train.batch_size, train=train, seed=self.train.seed)

    def map_loader(self, data: LabeledData, backbone: Backbone, train: bool) -> DataLoader:
        """Batches of ``data``'s cached lower-layer maps (``below_groups``; weak map views when ``train``)."""
        from transferkit.engine.lower_maps import lower_maps, map_loader

        assert self.below_groups is not None
        maps = (self.map_pool.maps(data) if self.map_pool is not None
                else lower_maps(backbone, data, self.below_groups, self.progress))
        return map_loader(maps, data.labels, self.below_groups, self.train.batch_size, train, self.train.seed)

    def all_objectives(self, model: TransferModel, strategy: Strategy) -> list[Objective]:
        task = self.task_objectives or [CrossEntropyObjective(label_smoothing=self.label_smoothing)]
        if self.task_weight != 1.0:
            task = [ScaledObjective(objective, self.task_weight) for objective in task]
        return [*task, *strategy.objectives(model), *self.objectives]

    def _trainer(self, model: torch.nn.Module, objectives: list[Objective], groups: list[dict[str, Any]],
                 forward_fn: Callable) -> Trainer:
        kwargs: dict[str, Any] = {}
        if self.epoch_callback is not None:
            kwargs["epoch_callback"] = self.epoch_callback
        if self.evaluate_fn is not None:
            kwargs["evaluate_fn"] = self.evaluate_fn
        if self.callbacks:
            kwargs["callbacks"] = list(self.callbacks)
        return Trainer(model, objectives, self.train, param_groups=groups, forward_fn=forward_fn,
                       monitor=self.monitor, checkpoint_dir=self.checkpoint_dir, progress=self.progress, **kwargs)

    # --- training ------------------------------------------------------------------------------------------
    def train_with_engine(self, model: TransferModel, strategy: Strategy) -> TrainResult:
        """End-to-end training on raw inputs (augmentation on) through the one engine; with ``below_groups`` on the
        cached lower-layer maps of the labelled items instead (map views as augmentation)."""
        backbone = model.backbone
        split_loader = self.loader if self.below_groups is None else self.map_loader
        train_loader = split_loader(self.splits.train, backbone, train=True)
        val_loader = split_loader(self.splits.val, backbone, train=False) if len(self.splits.val) else None
        aux = {name: self.loader(data, backbone, train=True) for name, data in self.aux_data.items()}
        aux.update({name: factory(backbone) for name, factory in self.aux_loaders.items()})
        trainer = self._trainer(model, self.all_objectives(model, strategy),
                                strategy.param_groups(model, self.train), self.forward_fn)
        return trainer.fit(train_loader, val_loader, aux)

    def train_head_on_features(self, model: TransferModel, strategy: Strategy) -> TrainResult:
        """Train only the heads on cached embeddings through the one engine (inputs are feature vectors)."""
        loaders = []
        for i, data in enumerate((self.splits.train, self.splits.val)):
            x = torch.as_tensor(self.features(model.backbone, data))
            y = torch.as_tensor(data.labels)
            dataset = _IndexedTensors(x, y)
            sampler = EpochShuffleSampler(len(dataset), self.train.seed) if i == 0 else None
            loaders.append(DataLoader(dataset, batch_size=self.train.batch_size, sampler=sampler,
                                      collate_fn=_collate_features) if len(dataset) else None)
        trainer = self._trainer(model, self.all_objectives(model, strategy), strategy.param_groups(model, self.train),
                                _head_forward)
        return trainer.fit(loaders[0], loaders[1])


class _IndexedTensors(TensorDataset):
    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x, y, i


def _collate_features(rows: list) -> dict[str, torch.Tensor]:
    xs, ys, idx = zip(*rows)
    return {"inputs": torch.stack(xs), "labels": torch.stack(ys), "index": torch.tensor(idx)}


def _head_forward(model: TransferModel, batch: dict[str, Any]):
    return model.forward_head(batch["inputs"])
