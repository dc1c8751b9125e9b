"""The one training engine: mini-batch optimisation of a sum of objectives on Hugging Face Accelerate.

Everything a method needs plugs in from outside: *which* parameters train (the parameter groups a strategy
returns), *what* is minimised (objectives), *how* a batch is fed to the model (``forward_fn``) and *how* a
model is scored on validation data (``evaluate_fn``). The engine does the rest: SGD with momentum or AdamW,
warm-up + cosine / halve-on-plateau / Transformer (noam) schedules, gradient clipping, early stopping on a
validation metric, seeded determinism, a progress bar, a checkpoint every epoch and resumption after an
interruption, and multi-process data parallelism (``torchrun --nproc_per_node N``: DDP through Accelerate).

``Trainer.fit`` itself is short: prepare, restore or seed, then per epoch train / validate / call the callbacks
(model selection, plateau schedule, early stopping, logging, checkpointing, tracing: ``engine.callbacks``).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.engine.callbacks import (
    BestEpoch,
    Callback,
    Checkpointing,
    EarlyStopping,
    EpochFunction,
    EpochLog,
    PlateauSchedule,
    Tracing,
    TrainState,
)
from transferkit.engine.checkpoint import CHECKPOINT_NAME  # noqa: F401 (re-exported: where the engine checkpoints)
from transferkit.engine.objectives import Objective, primary_logits
from transferkit.engine.placement import accelerator_kwargs, check_device_spec
from transferkit.engine.schedules import SCHEDULES, inverse_annealing, noam, warmup_constant, warmup_cosine
from transferkit.errors import TransferkitError
from transferkit.progress import progress as progress_bar

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd", "adam")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every strategy (the CLI exposes each field as ``--<name>``)."""

    epochs: int = field(default=10, metadata={"help": "Maximum number of passes over the training data."})
    batch_size: int = field(default=32, metadata={"help": "Examples per optimisation step (per process)."})
    optimizer: str = field(default="adamw", metadata={"help": "adamw, adam or sgd (with momentum)."})
    lr: float = field(default=1e-3, metadata={"help": "Base learning rate (strategies scale it per group)."})
    weight_decay: float = field(default=0.01, metadata={"help": "Decoupled weight decay on trainable weights."})
    momentum: float = field(default=0.9, metadata={"help": "Momentum for SGD."})
    schedule: str = field(
        default="cosine",
        metadata={"help": "cosine (warm-up + cosine decay), plateau (halve the LR when validation stalls), "
                  "constant, noam (Transformer warm-up schedule) or annealing (DANN paper: lr / (1 + 10 p)^0.75 "
                  "over the training progress p)."},
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps (noam: its warmup parameter)."})
    plateau_patience: int = field(default=1, metadata={"help": "plateau schedule: epochs without gain before halving."})
    noam_d_model: int = field(default=0, metadata={"help": "noam schedule: model width d (0: 512)."})
    early_stopping: int = field(
        default=5, metadata={"help": "Stop after this many epochs without validation gain (0: never)."}
    )
    grad_clip: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this (0: off)."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order and augmentation."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps (auto: this process's GPU "
                                                           "if there is one, else the CPU)."})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)."})

    def validate(self) -> None:
        def bad(name: str, value: Any, fix: str) -> TransferkitError:
            return TransferkitError(f"invalid --{name.replace('_', '-')} {value!r}", fix)

        if self.epochs < 1:
            raise bad("epochs", self.epochs, "use a whole number of at least 1")
        if self.batch_size < 1:
            raise bad("batch_size", self.batch_size, "use a whole number of at least 1")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", self.optimizer, f"choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"choose one of {', '.join(SCHEDULES)}")
        for name in ("lr", "weight_decay", "momentum", "grad_clip"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise bad(name, value, "use a finite, non-negative number" + (" above 0" if name == "lr" else ""))
        for name in ("warmup_steps", "plateau_patience", "early_stopping", "threads", "noam_d_model"):
            if getattr(self, name) < 0:
                raise bad(name, getattr(self, name), "use a whole number of at least 0")
        if not 0 <= self.seed < 2**32:  # NumPy's seed range
            raise bad("seed", self.seed, "use a whole number from 0 to 4294967295")
        check_device_spec(self.device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_metric: float | None
    stopped_early: bool
    train_seconds: float
    resumed_from_epoch: int | None = None


# --- helpers -------------------------------------------------------------------------------------------------


def make_accelerator(device: str = "auto"):
    """An Accelerator for ``device`` (``cuda:N`` honoured, see ``placement.accelerator_kwargs``); under ``torchrun``
    on a CPU machine it joins the gloo process group.

    ``Accelerator()`` without ``cpu=True`` on a GPU-less machine under torchrun gives separate single-process
    runs, so CPU is requested explicitly (facts in OFFLINE_ASSETS.md).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(**accelerator_kwargs(device), kwargs_handlers=[ddp])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": params, "lr": lr, "name": "all"}] if params else []


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that submodules exclude from weight decay by timm's convention: a module's
    ``no_weight_decay()`` returns names (or fnmatch patterns) relative to it, e.g. a ViT's ``pos_embed`` and
    ``cls_token``, which are embeddings of ndim 3 that the ``ndim <= 1`` rule alone would decay."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            names.update(f"{prefix}.{name}" if prefix else name for name in hook())
    return names


def _no_decay(name: str, param: nn.Parameter, excluded: set[str] | frozenset[str] = frozenset()) -> bool:
    """Biases, normalisation scales and the parameters a module declares (``no_weight_decay``) are not decayed
    (they are not 'weights' in the L2 sense)."""
    if param.ndim <= 1 or name.endswith(".bias") or name in excluded:
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in excluded if any(c in pattern for c in "*?["))


def split_weight_decay(model: nn.Module, groups: list[dict[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """Give every group ``weight_decay`` on weight matrices and 0 on biases / norm parameters / the parameters
    listed by a submodule's ``no_weight_decay()`` (timm)."""
    names = {id(p): n for n, p in model.named_parameters()}
    excluded = no_weight_decay_names(model)
    out: list[dict[str, Any]] = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        decay = [p for p in params if not _no_decay(names.get(id(p), ""), p, excluded)]
        no_decay = [p for p in params if _no_decay(names.get(id(p), ""), p, excluded)]
        base = {k: v for k, v in group.items() if k != "params"}
        wd = group.get("weight_decay", weight_decay)
        if decay:
            out.append({**base, "params": decay, "weight_decay": wd})
        if no_decay:
            out.append({**base, "params": no_decay, "weight_decay": 0.0, "name": f"{base.get('name', '')}/no_decay"})
    return out


def build_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=0.0)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _schedule_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    if config.schedule == "cosine":
        return warmup_cosine(total_steps, config.warmup_steps)
    if config.schedule == "noam":
        return noam(config.noam_d_model or 512, config.warmup_steps or 4000)
    if config.schedule == "annealing":
        return inverse_annealing(total_steps, config.warmup_steps)
    return warmup_constant(config.warmup_steps)


def default_forward(model: nn.Module, batch: dict[str, Any]) -> Any:
    return model(batch["inputs"])


def classification_metrics(model: nn.Module, loader: DataLoader, accelerator: Any, forward_fn: Callable) -> dict:
    """Validation loss (cross-entropy) and accuracy over the labelled items of ``loader``."""
    losses, correct, count = 0.0, 0, 0
    for batch in loader:
        logits = primary_logits(forward_fn(model, batch))
        labels = batch["labels"]
        logits, labels = accelerator.gather_for_metrics((logits.contiguous(), labels.contiguous()))
        keep = labels >= 0
        if keep.any():
            losses += float(nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
            count += int(keep.sum())
    if count == 0:
        return {}
    return {"loss": losses / count, "accuracy": correct / count}


class LossModule(nn.Module):
    """The model plus its objectives, so one DDP wrapper sees every trainable parameter of a step."""

    def __init__(self, model: nn.Module, objectives: list[Objective], forward_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.objectives = nn.ModuleList(objectives)
        self.forward_fn = forward_fn

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        outputs = self.forward_fn(self.model, batch)
        total: torch.Tensor | float = 0.0
        terms: dict[str, float] = {}
        for objective in self.objectives:
            value = objective(self.model, batch, outputs)
            terms[objective.name] = float(value.detach())
            total = total + objective.weight * value
        assert isinstance(total, torch.Tensor), "at least one objective is required"
        return total, terms


def _cycle(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


@dataclass
class TrainLoop:
    """What one ``Trainer.fit`` works on (prepared by Accelerate); callbacks read and change it."""

    config: TrainConfig
    accelerator: Any
    loss_module: nn.Module  # possibly DDP-wrapped
    inner: LossModule  # unwrapped: ``inner.model`` is the user's model
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    val_loader: DataLoader | None
    aux_iters: dict[str, Iterator[Any]]
    sampler: Any
    total_steps: int
    lr_factor: Callable[[int], float]
    base_lrs: list[float]
    state: TrainState = field(default_factory=TrainState)
    callbacks: list[Callback] = field(default_factory=list)

    def set_lr(self) -> None:
        """The schedule's learning rate for the current step, times the plateau factor."""
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.lr_factor(self.state.step) * self.state.plateau_scale


class Trainer:
    """Minimise ``sum(w_i * objective_i)`` over ``model``'s trainable parameters.

    Args:
        model: the network (a ``TransferModel`` or any ``nn.Module``).
        objectives: loss terms; at least one.
        config: optimisation settings.
        param_groups: optimiser groups (``{"params", "lr", "name", ...}``); default: every trainable parameter
            at ``config.lr``. Parameters of objectives (e.g. a domain classifier) are added at ``config.lr``.
        forward_fn: ``forward_fn(model, batch) -> outputs`` (default ``model(batch["inputs"])``).
        evaluate_fn: ``evaluate_fn(model, loader, accelerator, forward_fn) -> {metric: value}`` on validation
            data (default: cross-entropy ``loss`` and ``accuracy``).
        monitor: validation metric for early stopping / model selection; ``("accuracy", "max")`` by default.
        checkpoint_dir: where ``trainer.safetensors`` is written after every epoch; an existing one is resumed.
        epoch_callback: ``f(row)`` after every epoch (main process).
        callbacks: further :class:`~transferkit.engine.callbacks.Callback` objects, called after model selection,
            schedule and early stopping and before the checkpoint (which saves their ``state_tensors``).
    """

    def __init__(
        self,
        model: nn.Module,
        objectives: list[Objective],
        config: TrainConfig,
        *,
        param_groups: list[dict[str, Any]] | None = None,
        forward_fn: Callable = default_forward,
        evaluate_fn: Callable = classification_metrics,
        monitor: tuple[str, str] = ("accuracy", "max"),
        checkpoint_dir: str | Path | None = None,
        progress: bool = True,
        epoch_callback: Callable[[dict[str, Any]], None] | None = None,
        callbacks: list[Callback] | None = None,
    ) -> None:
        if not objectives:
            raise ValueError("Trainer needs at least one objective")
        config.validate()
        self.model = model
        self.objectives = objectives
        self.config = config
        self.param_groups = param_groups
        self.forward_fn = forward_fn
        self.evaluate_fn = evaluate_fn
        self.monitor = monitor
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.progress = progress
        self.epoch_callback = epoch_callback
        self.extra_callbacks = list(callbacks or [])
        self.accelerator = make_accelerator(config.device)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def fit(
        self,
        train_loader: DataLoader,
        val_loader: DataLoader | None = None,
        aux_loaders: dict[str, DataLoader] | None = None,
    ) -> TrainResult:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        started = time.perf_counter()
        loop = self._prepare(train_loader, val_loader, aux_loaders)
        checkpointing = Checkpointing(self.checkpoint_dir) if self.checkpoint_dir else None
        callbacks = loop.callbacks = self._callbacks(checkpointing)
        if checkpointing is None or not checkpointing.restore(loop):
            seed_everything(self.config.seed)  # the same seed in every process
        for callback in callbacks:
            callback.on_train_begin(loop)
        state = loop.state
        while not state.stop and state.epoch < self.config.epochs:
            epoch_start = time.perf_counter()
            row = self._train_epoch(loop, callbacks)
            row.update(self._validate(loop))
            row["seconds"] = round(time.perf_counter() - epoch_start, 3)
            state.history.append(row)
            for callback in callbacks:
                callback.on_epoch_end(loop, row)
        for callback in callbacks:
            callback.on_train_end(loop)
        self.accelerator.wait_for_everyone()
        return TrainResult(state.history, state.best_epoch, state.best_metric,
                           state.stop and state.epoch < self.config.epochs, time.perf_counter() - started,
                           state.resumed_from)

    # --- the parts of fit --------------------------------------------------------------------------------

    def _callbacks(self, checkpointing: Checkpointing | None) -> list[Callback]:
        """The loop's jobs in the order they run after each epoch: the checkpoint once the epoch's state (the
        callbacks' own included) is final, then the user's ``epoch_callback``."""
        cfg = self.config
        callbacks: list[Callback] = [BestEpoch(*self.monitor)]
        if cfg.schedule == "plateau":
            callbacks.append(PlateauSchedule(cfg.plateau_patience, self.monitor[0]))
        callbacks += [EarlyStopping(cfg.early_stopping), EpochLog(), *self.extra_callbacks]
        if checkpointing is not None:
            callbacks.append(checkpointing)
        if self.epoch_callback is not None:
            callbacks.append(EpochFunction(self.epoch_callback))
        tracing = Tracing.from_environment()
        return callbacks + ([tracing] if tracing is not None else [])

    def _prepare(self, train_loader: DataLoader, val_loader: DataLoader | None,
                 aux_loaders: dict[str, DataLoader] | None) -> TrainLoop:
        """Objectives set up, the optimiser over the parameter groups (weight decay split), Accelerate-prepared
        model / optimiser / loaders, and the learning-rate schedule."""
        cfg, acc = self.config, self.accelerator
        for objective in self.objectives:
            objective.setup(self.model, train_loader)
        loss_module = LossModule(self.model, self.objectives, self.forward_fn)
        groups = self.param_groups if self.param_groups is not None else default_param_groups(self.model, cfg.lr)
        objective_params = [p for o in self.objectives for p in o.parameters() if p.requires_grad]
        if objective_params:
            groups = [*groups, {"params": objective_params, "lr": cfg.lr, "name": "objectives"}]
        groups = split_weight_decay(loss_module, groups, cfg.weight_decay)
        if not groups:
            raise TransferkitError("nothing to train: the strategy froze every parameter",
                                   "unfreeze at least one layer group or add a head")
        optimizer = build_optimizer(groups, cfg)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

        sampler = getattr(train_loader, "sampler", None)
        prepared, optimizer, train_loader = acc.prepare(loss_module, optimizer, train_loader)
        if val_loader is not None:
            val_loader = acc.prepare(val_loader)
        aux = {name: _cycle(acc.prepare(loader)) for name, loader in (aux_loaders or {}).items()}
        total_steps = max(1, len(train_loader)) * cfg.epochs
        return TrainLoop(cfg, acc, prepared, acc.unwrap_model(prepared), optimizer, train_loader, val_loader, aux,
                         sampler, total_steps, _schedule_factor(cfg, total_steps),
                         [g["initial_lr"] for g in optimizer.param_groups])

    def _train_epoch(self, loop: TrainLoop, callbacks: list[Callback]) -> dict[str, Any]:
        """One pass over the training data; returns the epoch's row (mean training losses, last learning rate)."""
        cfg, acc, state = self.config, self.accelerator, loop.state
        # The data order depends only on (seed, epoch). Accelerate's loader re-applies its own epoch counter
        # to the sampler at every pass, so it is the loader's counter that must be set (resume-safe).
        if hasattr(loop.train_loader, "set_epoch"):
            loop.train_loader.set_epoch(state.epoch)
        if loop.sampler is not None and hasattr(loop.sampler, "set_epoch"):
            loop.sampler.set_epoch(state.epoch)
        loop.loss_module.train()
        sums: dict[str, float] = {}
        n_batches = 0
        bar = progress_bar(loop.train_loader, f"epoch {state.epoch + 1}/{cfg.epochs}",
                           enabled=self.progress and acc.is_main_process)
        for batch in bar:
            for name, it in loop.aux_iters.items():
                batch[name] = next(it)
            for objective in loop.inner.objectives:
                objective.on_step(state.step, loop.total_steps)
            loop.set_lr()
            loss, terms = loop.loss_module(batch)
            if not torch.isfinite(loss):
                raise TransferkitError(
                    f"the training loss became {float(loss)} at epoch {state.epoch + 1}",
                    "lower --lr, keep --grad-clip on, or check the data for NaN/inf values",
                )
            loop.optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            if cfg.grad_clip > 0:
                acc.clip_grad_norm_([p for g in loop.optimizer.param_groups for p in g["params"]], cfg.grad_clip)
            loop.optimizer.step()
            state.step += 1
            n_batches += 1
            for key, value in (("loss", float(loss.detach())), *terms.items()):
                sums[key] = sums.get(key, 0.0) + value
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            for callback in callbacks:
                callback.on_step_end(loop, batch)
        state.epoch += 1
        row: dict[str, Any] = {"epoch": state.epoch, "step": state.step}
        row.update({f"train_{k}": v / max(1, n_batches) for k, v in sums.items()})
        row["lr"] = loop.optimizer.param_groups[0]["lr"]
        return row

    def _validate(self, loop: TrainLoop) -> dict[str, Any]:
        """``val_<metric>`` of ``evaluate_fn`` on the validation loader ({} without one)."""
        if loop.val_loader is None:
            return {}
        loop.loss_module.eval()
        with torch.no_grad():
            metrics = self.evaluate_fn(loop.inner.model, loop.val_loader, self.accelerator, self.forward_fn)
        return {f"val_{k}": v for k, v in metrics.items()}


def clone_module(module: nn.Module) -> nn.Module:
    """A frozen deep copy (e.g. the pretrained reference for anchoring objectives)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin.eval()
