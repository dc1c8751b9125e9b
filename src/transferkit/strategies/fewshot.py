"""Few-shot strategies: ``prototypes`` and ``knn`` (no gradient training) and ``contrastive`` (SetFit).

* ``prototypes`` (Snell et al. 2017, with cosine similarity): each class is the mean ``mu_c`` of the
  L2-normalised embeddings of its examples; ``logit_c(x) = cos(x, mu_c) / T``. Stored as a linear layer
  ``W_c = mu_c / (||mu_c|| T)`` after an L2-normalisation layer, so a saved model is an ordinary state dict.
* ``knn``: the ``knn_k`` labelled embeddings most similar to ``x`` (cosine) vote; ``p(c|x)`` is the share of
  votes for ``c`` (ties broken by the summed similarity). The labelled embeddings are buffers of the head.
* ``contrastive`` (Tunstall et al. 2022, "Efficient Few-Shot Learning Without Prompts", SetFit): pairs of
  labelled texts (same class -> target 1, different classes -> target 0; every negative pair, positives
  oversampled to as many) fine-tune the sentence encoder with the cosine-similarity loss
  ``(cos(e_a, e_b) - target)^2`` through the training engine; then a logistic-regression head is fitted on the
  tuned embeddings.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferkit.engine.objectives import Objective
from transferkit.engine.placement import inference, module_device, place, to_numpy
from transferkit.engine.solvers import fit_logistic_regression
from transferkit.engine.trainer import Trainer, TrainResult
from transferkit.errors import TransferkitError
from transferkit.strategies import register_strategy
from transferkit.strategies.base import OPTIMISER_OPTIONS, Strategy, StrategyConfig, freeze, unfreeze
from transferkit.strategies.linear_probe import set_linear_head

if TYPE_CHECKING:
    from transferkit.engine.context import RunContext
    from transferkit.model import TransferModel

logger = logging.getLogger(__name__)


# --- heads --------------------------------------------------------------------------------------------------
class L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2, dim=-1)


class KNNHead(nn.Module):
    """Majority vote of the ``k`` most cosine-similar stored embeddings; outputs log vote shares."""

    def __init__(self, feature_dim: int, bank_size: int, num_classes: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.num_classes = num_classes
        self.register_buffer("bank", torch.zeros(bank_size, feature_dim))
        self.register_buffer("bank_labels", torch.zeros(bank_size, dtype=torch.long))

    def resize_from_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take the bank size from saved tensors (it is learned: the number of stored examples)."""
        if "bank" in state and "bank_labels" in state:
            self.bank = torch.zeros_like(state["bank"], device=self.bank.device)
            self.bank_labels = torch.zeros_like(state["bank_labels"], device=self.bank_labels.device)

    def store(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.bank.copy_(F.normalize(features.float(), dim=-1))
        self.bank_labels.copy_(labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        similarity = F.normalize(x.float(), dim=-1) @ self.bank.T
        top_sim, top_idx = similarity.topk(min(self.k, self.bank.shape[0]), dim=-1)
        one_hot = F.one_hot(self.bank_labels[top_idx], self.num_classes).float()  # (B, k, C)
        votes = one_hot.sum(1) + 1e-3 * (one_hot * top_sim.unsqueeze(-1)).sum(1)  # similarity breaks ties
        shares = (votes.clamp(min=0) + 1e-4) / (votes.clamp(min=0) + 1e-4).sum(-1, keepdim=True)
        return shares.log()


def _labelled_features(model: TransferModel, context: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    train = context.splits.train
    keep = train.labels >= 0
    if not keep.any():
        raise TransferkitError("the training data has no labelled example", "label at least one per class")
    features = torch.as_tensor(context.features(model.backbone, train))[torch.as_tensor(keep)]
    return features, torch.as_tensor(train.labels[keep], dtype=torch.long)


def _validation_metrics(model: TransferModel, context: RunContext) -> dict[str, float]:
    val = context.splits.val
    keep = val.labels >= 0
    if not len(val) or not keep.any():
        return {}
    features = torch.as_tensor(context.features(model.backbone, val))[torch.as_tensor(keep)]
    labels = torch.as_tensor(val.labels[keep], dtype=torch.long)
    with inference(model) as device:
        logits = model.forward_head(features.to(device)).logits.float()
        labels = labels.to(device)
        return {"val_loss": float(F.cross_entropy(logits, labels)),
                "val_accuracy": float((logits.argmax(-1) == labels).float().mean())}


def _result(metrics: dict[str, float], started: float, **extra: Any) -> TrainResult:
    row = {"epoch": 1, **extra, **metrics, "seconds": round(time.perf_counter() - started, 3)}
    return TrainResult([row], 1, metrics.get("val_accuracy"), False, time.perf_counter() - started)


# --- prototypes ---------------------------------------------------------------------------------------------
@dataclass
class PrototypesConfig(StrategyConfig):
    prototype_temperature: float = field(
        default=0.05, metadata={"help": "prototypes: logits are cosine similarities divided by this."})

    def validate(self) -> None:
        if not self.prototype_temperature > 0:
            raise TransferkitError(f"invalid --prototype-temperature {self.prototype_temperature}",
                                   "use a number above 0")


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, d)`` unit-length means of the L2-normalised embeddings of each class."""
    unit = F.normalize(features.float(), dim=-1)
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise TransferkitError(f"{int((counts == 0).sum())} classes have no labelled example",
                               "give at least one example per class")
    sums = torch.zeros(num_classes, unit.shape[1]).index_add_(0, labels, unit)
    return F.normalize(sums / counts.unsqueeze(1), dim=-1)


class EmbeddingStrategy(Strategy):
    """A strategy without gradient training: the frozen backbone's embeddings of the labelled items set the head."""

    frozen_backbone = True
    task_kinds = ("label",)

    def trains_with_engine(self) -> bool:
        return False

    def unused_train_options(self) -> tuple[tuple[str, ...], str]:
        return OPTIMISER_OPTIONS, "it has no gradient training"


@register_strategy
class Prototypes(EmbeddingStrategy):
    name = "prototypes"
    config_class = PrototypesConfig
    description = "class means of normalised embeddings, cosine similarity (no gradient training)"
    config: PrototypesConfig

    def prepare(self, model: TransferModel, for_loading: bool = False) -> None:
        freeze(model.backbone)
        task = model.tasks[0]
        model.heads[task.name] = nn.Sequential(L2Normalize(), nn.Linear(model.backbone.feature_dim,
                                                                        task.num_outputs))

    def train(self, model: TransferModel, context: RunContext) -> TrainResult:
        started = time.perf_counter()
        features, labels = _labelled_features(model, context)
        prototypes = class_prototypes(features, labels, model.tasks[0].num_outputs)
        set_linear_head(model, prototypes / self.config.prototype_temperature, torch.zeros(len(prototypes)))
        return _result(_validation_metrics(model, context), started, solver="prototypes")


# --- kNN ----------------------------------------------------------------------------------------------------
@dataclass
class KNNConfig(StrategyConfig):
    knn_k: int = field(default=5, metadata={"help": "knn: number of nearest labelled examples that vote."})

    def validate(self) -> None:
        if self.knn_k < 1:
            raise TransferkitError(f"invalid --knn-k {self.knn_k}", "use a whole number of at least 1")


@register_strategy
class KNearestNeighbours(EmbeddingStrategy):
    name = "knn"
    config_class = KNNConfig
    description = "k nearest labelled embeddings vote (cosine; no gradient training)"
    config: KNNConfig

    def __init__(self, config: StrategyConfig | None = None) -> None:
        super().__init__(config)
        self._warned: set[str] = set()  # the --knn-k warnings given in this run (see _warn_about_k)

    def prepare(self, model: TransferModel, for_loading: bool = False) -> None:
        freeze(model.backbone)
        task = model.tasks[0]  # the bank's size is learned: training fills it, loading resizes it to the saved one
        model.heads[task.name] = KNNHead(model.backbone.feature_dim, 1, task.num_outputs, self.config.knn_k)

    def train(self, model: TransferModel, context: RunContext) -> TrainResult:
        started = time.perf_counter()
        features, labels = _labelled_features(model, context)
        task = model.tasks[0]
        self._warn_about_k(labels, task.class_names)
        head = KNNHead(model.backbone.feature_dim, len(features), task.num_outputs, self.config.knn_k)
        head.store(features, labels)
        place(head, module_device(model))
        model.heads[task.name] = head
        return _result(_validation_metrics(model, context), started, solver="knn")

    def _warn_about_k(self, labels: torch.Tensor, class_names: list[str]) -> None:
        """Warn (once per run: cross-validation trains fold after fold) when ``--knn-k`` exceeds the labelled
        examples (all of them vote: every prediction is the most frequent class) or the smallest class (its
        examples can never fill the neighbourhood, so it can be outvoted)."""
        k = self.config.knn_k
        counts = torch.bincount(labels, minlength=len(class_names)).tolist()
        present = [(n, name) for n, name in zip(counts, class_names) if n]
        smallest, name = min(present) if present else (0, "")
        if k > len(labels):
            kind, message = "examples", (
                f"--knn-k {k} is more than the {len(labels)} labelled examples it trains on (under --protocol cv: "
                f"those of a fold): using k = {len(labels)}, "
                "every example votes, so every prediction is the most frequent class; choose a smaller --knn-k "
                f"(at most {smallest}, the smallest class)")
        elif k > smallest:
            kind, message = "class", (
                f"--knn-k {k} is more than the {smallest} labelled examples of class '{name}' it trains on (under "
                f"--protocol cv: in a fold): its examples can "
                f"never fill the {k} nearest, so larger classes can outvote it; consider --knn-k {smallest} or fewer")
        else:
            return
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(message)


# --- contrastive (SetFit) -------------------------------------------------------------------------------------
@dataclass
class ContrastiveConfig(StrategyConfig):
    contrastive_epochs: int = field(default=1, metadata={"help": "contrastive: passes over the sentence pairs."})
    contrastive_lr: float = field(default=2e-5, metadata={"help": "contrastive: encoder learning rate."})
    pair_batch_size: int = field(default=16, metadata={"help": "contrastive: sentence pairs per step."})
    max_pairs: int = field(default=0, metadata={"help": "contrastive: cap on the number of pairs (0: no cap)."})
    probe_c: float = field(default=1.0, metadata={"help": "lbfgs: inverse L2 strength C (larger = weaker)."})

    def validate(self) -> None:
        if self.contrastive_epochs < 1 or self.pair_batch_size < 1 or self.max_pairs < 0:
            raise TransferkitError("invalid contrastive options",
                                   "use --contrastive-epochs/--pair-batch-size >= 1 and --max-pairs >= 0")
        if not self.contrastive_lr > 0 or not self.probe_c > 0:
            raise TransferkitError("invalid --contrastive-lr or --probe-c", "use numbers above 0")


def contrastive_pairs(labels: np.ndarray, seed: int = 0, max_pairs: int = 0) -> list[tuple[int, int, float]]:
    """SetFit's "oversampling" pairs: every pair of examples from different classes (target 0), and as many
    pairs from the same class (target 1), the unique positive pairs cycled in random order; shuffled."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    positives = [(i, j) for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j]]
    negatives = [(i, j) for i in range(n) for j in range(i + 1, n) if labels[i] != labels[j]]
    if not positives or not negatives:
        raise TransferkitError("contrastive pairs need two classes with at least two examples in one",
                               "label more examples")
    count = max(len(positives), len(negatives))
    pos = [positives[int(k)] for k in np.concatenate([rng.permutation(len(positives))
                                                      for _ in range(-(-count // len(positives)))])[:count]]
    neg = [negatives[int(k)] for k in np.concatenate([rng.permutation(len(negatives))
                                                      for _ in range(-(-count // len(negatives)))])[:count]]
    pairs = [(i, j, 1.0) for i, j in pos] + [(i, j, 0.0) for i, j in neg]
    order = rng.permutation(len(pairs))
    pairs = [pairs[int(k)] for k in order]
    return pairs[:max_pairs] if max_pairs else pairs


class _PairDataset(Dataset):
    def __init__(self, items: list[Any], pairs: list[tuple[int, int, float]]) -> None:
        self.items, self.pairs = items, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> tuple[Any, Any, float, int]:
        i, j, target = self.pairs[k]
        return self.items[i], self.items[j], target, k


class CosinePairObjective(Objective):
    """SetFit's ``CosineSimilarityLoss``: mean of ``(cos(e_a, e_b) - target)^2``."""

    name = "cosine_pairs"

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        first, second = outputs
        return F.mse_loss(F.cosine_similarity(first, second, dim=-1), batch["labels"].to(first.dtype))


def _pair_forward(model: TransferModel, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return model.backbone.forward_features(batch["inputs"]), model.backbone.forward_features(batch["inputs_b"])


def _pair_loader(model: TransferModel, items: list[Any], pairs: list[tuple[int, int, float]], batch_size: int,
                 seed: int) -> DataLoader:
    backbone = model.backbone

    def collate(rows: list) -> dict[str, Any]:
        first, second, targets, index = zip(*rows)
        return {"inputs": backbone.collate([backbone.preprocess(x, train=True) for x in first]),
                "inputs_b": backbone.collate([backbone.preprocess(x, train=True) for x in second]),
                "labels": torch.tensor(targets), "index": torch.tensor(index)}

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(_PairDataset(items, pairs), batch_size=batch_size, shuffle=True, generator=generator,
                      collate_fn=collate)


@register_strategy
class Contrastive(Strategy):
    name = "contrastive"
    config_class = ContrastiveConfig
    description = "SetFit: contrastive fine-tuning of the encoder on label pairs, then a logistic-regression head"
    task_kinds = ("label",)
    config: ContrastiveConfig

    def trains_with_engine(self) -> bool:
        return False  # its own pair loss, then a closed-form head: the run's objectives never enter

    def unused_train_options(self) -> tuple[tuple[str, ...], str]:
        return (("epochs", "lr", "schedule", "warmup_steps", "early_stopping"),
                "its pair stage trains with --contrastive-epochs and --contrastive-lr on a warm-up + cosine "
                "schedule, then solves the head in closed form")

    def supports(self, task_kind: str) -> bool | str:
        return True if task_kind in self.task_kinds else "it pairs and classifies the label only"

    def prepare(self, model: TransferModel, for_loading: bool = False) -> None:
        unfreeze(model.backbone)
        for p in model.heads.parameters():
            p.requires_grad_(False)  # the head is solved in closed form after the pair stage

    def train(self, model: TransferModel, context: RunContext) -> TrainResult:
        started = time.perf_counter()
        train = context.splits.train
        keep = np.flatnonzero(train.labels >= 0)
        items = [train.items[int(i)] for i in keep]
        pairs = contrastive_pairs(train.labels[keep], context.train.seed, self.config.max_pairs)
        steps = -(-len(pairs) // self.config.pair_batch_size) * self.config.contrastive_epochs
        config = dataclasses.replace(context.train, epochs=self.config.contrastive_epochs,
                                     lr=self.config.contrastive_lr, batch_size=self.config.pair_batch_size,
                                     early_stopping=0, schedule="cosine", warmup_steps=max(1, steps // 10))
        logger.info("contrastive stage: %d pairs, %d steps", len(pairs), steps)
        groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad],
                   "lr": config.lr, "name": "encoder"}]
        trainer = Trainer(model, [CosinePairObjective()], config, param_groups=groups, forward_fn=_pair_forward,
                          progress=context.progress)
        result = trainer.fit(_pair_loader(model, items, pairs, config.batch_size, config.seed))
        freeze(model.backbone)
        features, labels = _labelled_features(model, context)
        weight, bias = fit_logistic_regression(to_numpy(features), to_numpy(labels), model.tasks[0].num_outputs,
                                               c=self.config.probe_c)
        set_linear_head(model, weight, bias)
        metrics = _validation_metrics(model, context)
        history = [*result.history, {"epoch": len(result.history) + 1, "solver": "lbfgs-head", **metrics}]
        return TrainResult(history, len(history), metrics.get("val_accuracy"), False,
                           time.perf_counter() - started)

    def metrics(self, model: TransferModel) -> dict[str, Any]:
        """The honest trainable count for metrics.json: the whole encoder (tuned on the pairs) and the head (solved
        in closed form). Both are frozen by the time the run counts ``requires_grad``, which would report 0."""
        return {"trainable_params": model.backbone.num_parameters()
                + sum(p.numel() for p in model.head_parameters())}
