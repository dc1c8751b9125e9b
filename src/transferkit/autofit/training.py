"""Train one candidate on some labelled items and predict others: the unit of work of ``transferkit auto``.

Used inside cross-validation folds (train on k-1 folds, predict the held-out fold) and for the final refit on every
labelled item. Nothing here holds out labels: trained candidates run a fixed number of epochs and keep the last
weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.autofit.space import Candidate
from transferkit.data.base import DataSplits, LabeledData

logger = logging.getLogger(__name__)

FEATURE_CHUNK = 16
#: fit options that shape the model (the rest are engine or strategy options)
MODEL_OPTIONS = ("head_dropout", "label_smoothing", "augment")


class Mirrored(Sequence):
    """The horizontal mirror image of every item of an image sequence (lazy)."""

    def __init__(self, items: Sequence) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):  # type: ignore[override]
        from PIL import ImageOps

        return ImageOps.mirror(self.items[i])


def mirrored(data: LabeledData) -> LabeledData:
    """``data`` with every image mirrored left-right (flip test-time augmentation)."""
    return LabeledData(Mirrored(data.items), data.labels, list(data.class_names), data.modality,
                       [f"{i}#mirror" for i in data.ids], name=f"{data.name}#mirror")


def create_candidate_backbone(candidate: Candidate, seed: int, device: str | torch.device | None = None):
    """``candidate``'s pretrained backbone (seeded), placed on ``device`` (None: left on the CPU)."""
    from transferkit.backbones import create_backbone
    from transferkit.engine.placement import place
    from transferkit.engine.trainer import seed_everything

    options: dict[str, Any] = {}
    if candidate.image_size:
        options["image_size"] = candidate.image_size
    if candidate.options.get("augment") is not None:
        options["augment"] = bool(candidate.options["augment"])
    if candidate.options.get("pool_stages"):
        options["pool_stages"] = list(candidate.options["pool_stages"])
    if candidate.options.get("pool_grid"):
        options["pool_grid"] = list(candidate.options["pool_grid"])
    seed_everything(seed)
    backbone = create_backbone(candidate.backbone, pretrained=True, **options)
    place(backbone, device)
    return backbone


# --- features candidates -----------------------------------------------------------------------------------------


class FeatureTable:
    """Features of every labelled item (and of its mirror image, for images) under one frozen backbone."""

    def __init__(self, candidate: Candidate, data: LabeledData, cache_dir: Path | None, seed: int,
                 check_time: Callable[[float], None] | None = None, host: FeatureTable | None = None,
                 device: str | torch.device | None = None) -> None:
        """Features are extracted on ``device`` (auto's ``--device``). With ``host`` (a table of the same items), ``candidate``'s features are read from its last columns without a
        forward pass: a final-layer probe's features are the last columns of the multi-stage probe's of the same
        backbone (``pool_stages`` puts the pooled earlier stages first; autofit.ensemble.shares_features relies on
        the same)."""
        self.backbone = create_candidate_backbone(candidate, seed, device)
        self.computed = 0  # items extracted now (not read from the cache): what ``seconds`` measures
        started = time.perf_counter()  # extraction only: the speed measurement that calibrates cost estimates
        if host is not None:
            width = self.backbone.feature_dim
            features = [host.x[:, -width:]] + ([] if host.x_mirror is None else [host.x_mirror[:, -width:]])
        else:
            views = [data, mirrored(data)] if data.modality == "image" else [data]
            features = self._extract(views, cache_dir, check_time)
        self.x, self.x_mirror = features[0], (features[1] if len(features) > 1 else None)
        self.seconds = time.perf_counter() - started
        self.position = {item_id: i for i, item_id in enumerate(data.ids)}
        self.label_x: np.ndarray | None = None  # features of the class-name sentences, when a candidate uses them

    def _extract(self, views: list[LabeledData], cache_dir: Path | None,
                 check_time: Callable[[float], None] | None) -> list[np.ndarray]:
        """Features of every view in chunks of ``FEATURE_CHUNK`` items (each cached). Between chunks
        ``check_time(projected seconds still needed)`` may stop the search as soon as the extraction clearly cannot
        finish in time, instead of after a long extraction."""
        from transferkit.engine.features import extract_features

        chunks = [(v, start) for v, view in enumerate(views) for start in range(0, len(view), FEATURE_CHUNK)]
        parts: list[list[np.ndarray]] = [[] for _ in views]
        started, total = time.perf_counter(), sum(len(view) for view in views)
        for done, (v, start) in enumerate(chunks):
            if check_time is not None:
                rate = (time.perf_counter() - started) / self.computed if self.computed else 0.0
                check_time(rate * (total - done * FEATURE_CHUNK))
            view = views[v]
            chunk = view.subset(np.arange(start, min(start + FEATURE_CHUNK, len(view))))
            chunk_started = time.perf_counter()
            parts[v].append(extract_features(self.backbone, chunk, cache_dir=cache_dir, progress=False))
            if time.perf_counter() - chunk_started > 0.05:  # computed, not read from the cache (a file load: ~1 ms)
                self.computed += len(chunk)
        return [np.concatenate(p) for p in parts]

    def rows(self, data: LabeledData) -> np.ndarray:
        return np.asarray([self.position[i] for i in data.ids], dtype=np.int64)

    def with_label_examples(self, rows: np.ndarray, labels: np.ndarray, class_names: list[str],
                            copies: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of ``rows`` followed by ``copies`` templated class-name sentences per class
        (:mod:`transferkit.data.label_examples`; their features are extracted once)."""
        x = self.x[rows]
        if not copies:
            return x, labels
        if self.label_x is None:
            from transferkit.data.label_examples import with_label_examples
            from transferkit.engine.features import extract_features

            names = with_label_examples(LabeledData([], np.zeros(0), list(class_names), "text", []), 1)
            self.label_x = extract_features(self.backbone, names, progress=False)
        extra = np.tile(np.arange(len(class_names)), copies)
        return np.concatenate([x, self.label_x[extra]]), np.concatenate([labels, extra])


def fit_probe_head(x: np.ndarray, labels: np.ndarray, num_classes: int, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    from transferkit.engine.solvers import fit_logistic_regression

    return fit_logistic_regression(x, labels, num_classes, c=c, max_iter=100)  # scikit-learn's default


def probe_probabilities(weight: torch.Tensor, bias: torch.Tensor, x: np.ndarray) -> np.ndarray:
    logits = torch.as_tensor(x, dtype=torch.float64) @ weight.double().T + bias.double()
    return torch.softmax(logits, dim=-1).cpu().numpy()


def probe_fold(table: FeatureTable, train: LabeledData, val: LabeledData, c: float,
               label_examples: int = 0) -> dict[str, np.ndarray]:
    """Plain and flip-TTA probabilities of a probe trained on ``train``'s rows of the table (and ``label_examples``
    class-name sentences per class, text only)."""
    tr, va = table.rows(train), table.rows(val)
    k = train.num_classes
    w, b = fit_probe_head(*table.with_label_examples(tr, train.labels, train.class_names, label_examples), k, c)
    out = {"plain": probe_probabilities(w, b, table.x[va])}
    if table.x_mirror is not None:
        x = np.concatenate([table.x[tr], table.x_mirror[tr]])
        w2, b2 = fit_probe_head(x, np.concatenate([train.labels, train.labels]), k, c)
        out["tta"] = 0.5 * (probe_probabilities(w2, b2, table.x[va]) + probe_probabilities(w2, b2, table.x_mirror[va]))
    return out


def probe_model(candidate: Candidate, table: FeatureTable, data: LabeledData, tta: bool):
    """The final linear-probe TransferModel on every labelled item (with mirrored copies when ``tta``)."""
    from transferkit.engine.placement import module_device, place
    from transferkit.model import TaskSpec, TransferModel
    from transferkit.strategies import create_strategy
    from transferkit.strategies.linear_probe import set_linear_head

    rows = table.rows(data)
    x, y = table.with_label_examples(rows, data.labels, data.class_names, int(candidate.options.get("label_examples", 0)))
    if tta and table.x_mirror is not None:
        x, y = np.concatenate([x, table.x_mirror[rows]]), np.concatenate([y, y])
    weight, bias = fit_probe_head(x, y, data.num_classes, float(candidate.options.get("probe_c", 1.0)))
    model = TransferModel(table.backbone, [TaskSpec("label", "classify", list(data.class_names))])
    strategy = create_strategy("linear-probe", {"probe_c": float(candidate.options.get("probe_c", 1.0))})
    strategy.prepare(model)
    place(model, module_device(table.backbone))  # the new head joins the backbone on its device
    set_linear_head(model, weight.float(), bias.float())
    return model.eval(), strategy


# --- trained candidates ------------------------------------------------------------------------------------------


def split_options(candidate: Candidate, seed: int, device: str = "auto") -> tuple[Any, Any, dict[str, Any]]:
    """(TrainConfig, Strategy, model options) of a trained candidate: fixed epochs, no early stopping, trained on
    ``device``."""
    from transferkit.config import build
    from transferkit.engine.trainer import TrainConfig
    from transferkit.strategies import strategy_class

    cls = strategy_class(candidate.strategy)
    merged = {**candidate.options, "seed": seed, "early_stopping": 0, "device": device}
    model_options = {k: merged.pop(k) for k in MODEL_OPTIONS if k in merged}
    train_cfg = build(TrainConfig, merged)
    strategy = cls(build(cls.config_class, merged))
    merged.pop("probe_c", None)
    merged.pop("label_examples", None)  # a data option (train_candidate)
    if merged:
        raise ValueError(f"unused candidate options {sorted(merged)}")
    train_cfg.validate()
    return train_cfg, strategy, model_options


def train_candidate(candidate: Candidate, train: LabeledData, *, seed: int, cache_dir: Path | None,
                    epoch_callback: Callable[[dict[str, Any]], None] | None = None, device: str = "auto"):
    """Train ``candidate`` on every item of ``train`` (plus its class-name sentences, with the option
    ``label_examples``) for its fixed number of epochs on ``device``; returns the model."""
    from transferkit.engine.context import RunContext
    from transferkit.model import TaskSpec, TransferModel

    train_cfg, strategy, model_options = split_options(candidate, seed, device)
    if candidate.options.get("label_examples"):
        from transferkit.data.label_examples import with_label_examples

        train = with_label_examples(train, int(candidate.options["label_examples"]))
    backbone = create_candidate_backbone(candidate, seed, device)  # LP-FT's probe features on the device too
    model = TransferModel(backbone, [TaskSpec("label", "classify", list(train.class_names))],
                          head_dropout=float(model_options.get("head_dropout", 0.0)))
    strategy.prepare(model)
    splits = DataSplits(train=train, val=train.subset(np.arange(0)), test=None)
    context = RunContext(splits=splits, train=train_cfg, label_smoothing=float(model_options.get("label_smoothing", 0.0)),
                         cache_dir=cache_dir, progress=False, epoch_callback=epoch_callback)
    strategy.train(model, context)
    return model.eval(), strategy


def predict_plain_and_flipped(model, data: LabeledData) -> dict[str, np.ndarray]:
    """{"plain": probabilities, "tta": flip-TTA probabilities} (images) with one pass per view."""
    from transferkit.api import predict_proba_model

    plain = predict_proba_model(model, data, batch_size=64)
    if data.modality != "image":
        return {"plain": plain}
    return {"plain": plain, "tta": 0.5 * (plain + predict_proba_model(model, mirrored(data), batch_size=64))}


def trained_depth(candidate: Candidate) -> str:
    """How deep a trained candidate back-propagates: its ``unfreeze`` (fine-tuning of the top groups), else "all"
    (fine-tuning, LoRA and adapters all need gradients through the whole network)."""
    return str(candidate.options.get("unfreeze", "all")) if candidate.strategy == "finetune" else "all"


def seconds_per_item(candidate: Candidate, data: LabeledData, seed: int,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """(training seconds per item and epoch, inference seconds per item) of gradient training on ``candidate``'s
    backbone and resolution, back-propagating as deep as the candidate does (:func:`trained_depth`), measured on two
    small batches on ``device`` (where the candidate will train): the cost estimate that decides whether a trained
    candidate fits the remaining budget."""
    from transferkit.data.loader import make_loader
    from transferkit.engine.placement import place, synchronize, to_device
    from transferkit.model import TaskSpec, TransferModel
    from transferkit.strategies import create_strategy

    strategy = create_strategy("finetune", {"unfreeze": trained_depth(candidate)})

    backbone = create_candidate_backbone(candidate, seed)
    model = TransferModel(backbone, [TaskSpec("label", "classify", list(data.class_names))])
    strategy.prepare(model)
    target = place(model, device)
    n = min(len(data), 8)
    sample = data.subset(np.arange(n))
    batch = to_device(next(iter(make_loader(sample, backbone, batch_size=n, train=True, seed=seed))), target)
    params = [p for p in model.parameters() if p.requires_grad]
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        model.train()
        logits = model(batch["inputs"]).logits
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        torch.autograd.grad(loss, params, allow_unused=True)
        synchronize(target)  # a GPU runs asynchronously: time the work, not its queueing
        timings.append(time.perf_counter() - started)
    with torch.no_grad():
        model.eval()
        started = time.perf_counter()
        model(batch["inputs"])
        synchronize(target)
        infer = time.perf_counter() - started
    return min(timings) / n, infer / n
