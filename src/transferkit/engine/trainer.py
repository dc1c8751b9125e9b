"""The one training engine: mini-batch optimisation of a sum of objectives on Hugging Face Accelerate.

Everything a method needs plugs in from outside: *which* parameters train (the parameter groups a strategy
returns), *what* is minimised (objectives), *how* a batch is fed to the model (``forward_fn``) and *how* a
model is scored on validation data (``evaluate_fn``). The engine does the rest: SGD with momentum or AdamW,
warm-up + cosine / halve-on-plateau / Transformer (noam) schedules, gradient clipping, early stopping on a
validation metric, seeded determinism, a progress bar, a checkpoint every epoch and resumption after an
interruption, and multi-process data parallelism (``torchrun --nproc_per_node N``: DDP through Accelerate).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import logging
import math
import os
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

from transferkit.engine.objectives import Objective, primary_logits
from transferkit.engine.placement import accelerator_kwargs, check_device_spec
from transferkit.engine.schedules import SCHEDULES, inverse_annealing, noam, warmup_constant, warmup_cosine
from transferkit.errors import TransferkitError
from transferkit.progress import progress as progress_bar

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd", "adam")
CHECKPOINT_NAME = "checkpoint.pt"


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


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


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


def _params_digest(module: nn.Module) -> str:
    h = hashlib.sha1()
    for _, p in sorted(module.named_parameters()):
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


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
        checkpoint_dir: where ``checkpoint.pt`` is written after every epoch; an existing one is resumed.
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
        self.accelerator = make_accelerator(config.device)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def _better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.monitor[1] == "max" else value < best

    def fit(
        self,
        train_loader: DataLoader,
        val_loader: DataLoader | None = None,
        aux_loaders: dict[str, DataLoader] | None = None,
    ) -> TrainResult:
        cfg, acc = self.config, self.accelerator
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        started = time.perf_counter()

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
        loss_module, optimizer, train_loader = acc.prepare(loss_module, optimizer, train_loader)
        if val_loader is not None:
            val_loader = acc.prepare(val_loader)
        aux = {name: acc.prepare(loader) for name, loader in (aux_loaders or {}).items()}

        steps_per_epoch = max(1, len(train_loader))
        total_steps = steps_per_epoch * cfg.epochs
        factor = _schedule_factor(cfg, total_steps)
        base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        plateau_scale = 1.0

        def set_lr(step: int) -> None:
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor(step) * plateau_scale

        history: list[dict[str, Any]] = []
        start_epoch, step = 0, 0
        best_metric: float | None = None
        best_epoch, bad_epochs = -1, 0
        best_state: dict[str, torch.Tensor] | None = None
        resumed_from = None

        ckpt_path = self.checkpoint_dir / CHECKPOINT_NAME if self.checkpoint_dir else None
        if ckpt_path is not None and ckpt_path.exists():
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            acc.unwrap_model(loss_module).load_state_dict(ckpt["loss_module"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
            best_metric, best_epoch, bad_epochs = ckpt["best_metric"], ckpt["best_epoch"], ckpt["bad_epochs"]
            best_state, history, plateau_scale = ckpt["best_state"], ckpt["history"], ckpt["plateau_scale"]
            _set_rng_state(ckpt["rng"])
            resumed_from = start_epoch
            logger.info("resuming from the checkpoint after epoch %d", start_epoch)
        else:
            seed_everything(cfg.seed)  # the same seed in every process

        trace_file = self._open_trace()
        aux_iters = {name: _cycle(loader) for name, loader in aux.items()}
        inner = acc.unwrap_model(loss_module)
        stopped_early = False
        stop_now = start_epoch >= cfg.epochs or (cfg.early_stopping and bad_epochs >= cfg.early_stopping)

        for epoch in range(start_epoch, cfg.epochs):
            if stop_now:
                stopped_early = True
                break
            epoch_start = time.perf_counter()
            # The data order depends only on (seed, epoch). Accelerate's loader re-applies its own epoch counter
            # to the sampler at every pass, so it is the loader's counter that must be set (resume-safe).
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            loss_module.train()
            sums: dict[str, float] = {}
            n_batches = 0
            bar = progress_bar(train_loader, f"epoch {epoch + 1}/{cfg.epochs}",
                               enabled=self.progress and acc.is_main_process)
            for batch in bar:
                for name, it in aux_iters.items():
                    batch[name] = next(it)
                for objective in inner.objectives:
                    objective.on_step(step, total_steps)
                set_lr(step)
                loss, terms = loss_module(batch)
                if not torch.isfinite(loss):
                    raise TransferkitError(
                        f"the training loss became {float(loss)} at epoch {epoch + 1}",
                        "lower --lr, keep --grad-clip on, or check the data for NaN/inf values",
                    )
                optimizer.zero_grad(set_to_none=True)
                acc.backward(loss)
                if cfg.grad_clip > 0:
                    acc.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
                optimizer.step()
                step += 1
                n_batches += 1
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                if trace_file is not None:
                    trace_file.write(json.dumps({
                        "rank": acc.process_index, "epoch": epoch, "step": step,
                        "index": batch["index"].tolist(), "params": _params_digest(inner.model),
                    }) + "\n")
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step}
            row.update({f"train_{k}": v / max(1, n_batches) for k, v in sums.items()})
            row["lr"] = optimizer.param_groups[0]["lr"]
            if val_loader is not None:
                loss_module.eval()
                with torch.no_grad():
                    metrics = self.evaluate_fn(inner.model, val_loader, acc, self.forward_fn)
                row.update({f"val_{k}": v for k, v in metrics.items()})
            row["seconds"] = round(time.perf_counter() - epoch_start, 3)

            value = row.get(f"val_{self.monitor[0]}")
            if value is None or self._better(value, best_metric):
                best_metric, best_epoch, bad_epochs = value, epoch + 1, 0
                best_state = {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}
            else:
                bad_epochs += 1
                if cfg.schedule == "plateau" and bad_epochs % max(1, cfg.plateau_patience) == 0:
                    plateau_scale *= 0.5
                    logger.info("validation %s stalled: learning rate halved", self.monitor[0])
            history.append(row)
            self._log_epoch(row)
            stop_now = bool(cfg.early_stopping and bad_epochs >= cfg.early_stopping)
            if ckpt_path is not None:
                self._save_checkpoint(ckpt_path, {
                    "loss_module": inner.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "step": step, "best_metric": best_metric, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                    "best_state": best_state, "history": history, "plateau_scale": plateau_scale,
                    "rng": _rng_state(),
                })
            if self.epoch_callback is not None and acc.is_main_process:
                self.epoch_callback(row)
            if stop_now and epoch + 1 < cfg.epochs:
                stopped_early = True
                logger.info("early stopping: no validation gain for %d epochs", cfg.early_stopping)
                break

        if trace_file is not None:
            trace_file.close()
        if best_state is not None:
            inner.load_state_dict(best_state)
        acc.wait_for_everyone()
        return TrainResult(history, best_epoch, best_metric, stopped_early, time.perf_counter() - started,
                           resumed_from)

    # --- internals ---------------------------------------------------------------------------------------

    def _save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)  # atomic: an interruption leaves the previous checkpoint intact
        self.accelerator.wait_for_everyone()

    def _open_trace(self):
        """``TRANSFERKIT_TRACE_DIR``: per-process JSONL of batch indices and weight digests after every step."""
        trace_dir = os.environ.get("TRANSFERKIT_TRACE_DIR")
        if not trace_dir:
            return None
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        return open(Path(trace_dir) / f"rank{self.accelerator.process_index}.jsonl", "w")  # noqa: SIM115

    def _log_epoch(self, row: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        parts = [f"epoch {row['epoch']}/{self.config.epochs}"]
        for key in sorted(row):
            if key.startswith(("train_", "val_")) and isinstance(row[key], float):
                parts.append(f"{key.replace('_', ' ', 1)} {row[key]:.4f}")
        parts.append(f"lr {row['lr']:.2e}")
        parts.append(f"{row['seconds']:.1f} s")
        logger.info("  ".join(parts))


def clone_module(module: nn.Module) -> nn.Module:
    """A frozen deep copy (e.g. the pretrained reference for anchoring objectives)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin.eval()
