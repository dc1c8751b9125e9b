"""FISH masks (Sung et al. 2021, "Training Neural Networks with Fixed Sparse Masks"): update only the backbone
parameters that carry the most Fisher information.

1. The head starts from the linear probe (so the gradients below come from a sensible classifier).
2. Diagonal empirical Fisher on ``--fish-batches`` training batches, one example at a time (eval mode):
   ``F_j = 1/N sum_i (d log p(y_i | x_i) / d theta_j)^2``.
3. The mask keeps the top ``--fish-keep`` percent of all backbone parameter entries by ``F_j`` (one global
   threshold); the heads stay dense.
4. Training multiplies every masked tensor's gradient by its mask (tensor hooks). Masked tensors get *no*
   weight decay: decoupled decay (AdamW) or L2 in SGD would otherwise shrink the entries outside the mask, which
   must keep their pretrained values. With zero gradients Adam's moments stay zero there, so their update is 0.

The mask is stored as boolean buffers ``fish_mask.<param name with / for .>`` on the model: saved with every
checkpoint (a resumed run replays the same mask) and with the model (``prepare(for_loading=True)`` registers
empty buffers that the state dict fills). Prediction would not need it (masked-out weights equal the
pretrained ones), but continuing training or inspecting the selection does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from transferkit.engine.placement import module_device, to_device
from transferkit.errors import TransferkitError
from transferkit.strategies import register_strategy
from transferkit.strategies.base import Strategy, StrategyConfig, freeze, unfreeze
from transferkit.strategies.linear_probe import fit_probe

if TYPE_CHECKING:
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainConfig, TrainResult
    from transferkit.model import TransferModel

logger = logging.getLogger(__name__)

MASK_MODULE = "fish_mask"


@dataclass
class FishConfig(StrategyConfig):
    fish_keep: float = field(default=0.5, metadata={"help": "Percent of backbone parameters to update (top by "
                                                       "Fisher information)."})
    fish_batches: int = field(default=8, metadata={"help": "Training batches used to estimate the Fisher "
                                                      "information."})

    def validate(self) -> None:
        if not 0 < self.fish_keep <= 100:
            raise TransferkitError(f"invalid --fish-keep {self.fish_keep}", "use a percentage in (0, 100]")
        if self.fish_batches < 1:
            raise TransferkitError(f"invalid --fish-batches {self.fish_batches}", "use a whole number >= 1")


class FishMask(nn.Module):
    """Boolean buffers, one per backbone parameter (``.`` in names replaced by ``/``)."""

    def __init__(self, parameters: dict[str, nn.Parameter]) -> None:
        super().__init__()
        for name, param in parameters.items():
            self.register_buffer(name.replace(".", "/"), torch.zeros_like(param, dtype=torch.bool))

    def mask_of(self, name: str) -> torch.Tensor:
        return self.get_buffer(name.replace(".", "/"))

    def kept(self) -> int:
        return int(sum(int(b.sum()) for b in self.buffers()))

    def total(self) -> int:
        return int(sum(b.numel() for b in self.buffers()))


def _slice(inputs: Any, i: int) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[i : i + 1]
    if isinstance(inputs, dict):
        return {k: _slice(v, i) for k, v in inputs.items()}
    raise TypeError(f"cannot slice inputs of type {type(inputs).__name__}")


def fisher_diagonal(model: TransferModel, loader: Any, batches: int) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of every backbone parameter over the labelled items of ``batches`` batches."""
    params = dict(model.backbone.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    device = module_device(model)
    was_training = model.training
    model.eval()
    count = 0
    try:
        for b, batch in enumerate(loader):
            if b >= batches:
                break
            inputs, labels = to_device((batch["inputs"], batch["labels"]), device)
            for i in range(len(labels)):
                if labels[i] < 0:
                    continue
                model.zero_grad(set_to_none=True)
                log_p = F.log_softmax(model(_slice(inputs, i)).logits, dim=-1)[0, labels[i]]
                log_p.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n] += p.grad.detach() ** 2
                count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    if count == 0:
        raise TransferkitError("FISH found no labelled training example", "give labelled training data")
    return {n: f / count for n, f in fisher.items()}


def top_mask(fisher: dict[str, torch.Tensor], keep_percent: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping exactly ``round(keep_percent% of all entries)`` entries with the largest values."""
    flat = torch.cat([f.flatten() for f in fisher.values()])
    k = max(1, round(flat.numel() * keep_percent / 100))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.topk(flat, k, sorted=False).indices] = True
    masks, start = {}, 0
    for name, f in fisher.items():
        masks[name] = chosen[start : start + f.numel()].view_as(f)
        start += f.numel()
    return masks


@register_strategy
class Fish(Strategy):
    name = "fish"
    config_class = FishConfig
    description = "FISH mask: update only the top p% of backbone weights by Fisher information (+ head)"
    task_kinds = ("label", "classify")
    config: FishConfig

    def supports(self, task_kind: str) -> bool | str:
        if task_kind in self.task_kinds:
            return True
        return "its Fisher information and linear-probe start need a first task that classifies the label"

    def prepare(self, model: TransferModel, for_loading: bool = False) -> None:
        freeze(model.backbone)
        if not hasattr(model, MASK_MODULE):
            model.add_module(MASK_MODULE, FishMask(dict(model.backbone.named_parameters())))
        unfreeze(model.heads)
        model.freeze_norm_stats = True

    def masked_parameters(self, model: TransferModel) -> dict[str, nn.Parameter]:
        """Backbone tensors with at least one entry in the mask."""
        mask: FishMask = getattr(model, MASK_MODULE)
        return {n: p for n, p in model.backbone.named_parameters() if bool(mask.mask_of(n).any())}

    def param_groups(self, model: TransferModel, train: TrainConfig) -> list[dict[str, Any]]:
        heads = list(model.heads.parameters())
        masked = list(self.masked_parameters(model).values())
        return [{"params": heads, "lr": train.lr, "name": "head"},
                {"params": masked, "lr": train.lr, "name": "fish", "weight_decay": 0.0}]

    def train(self, model: TransferModel, context: RunContext) -> TrainResult:
        mask: FishMask = getattr(model, MASK_MODULE)
        if context.checkpoint_is_fresh():  # a resumed run gets its mask back from the checkpoint
            if context.heads_from is None:  # a head copied by --init-from is kept
                fit_probe(model, context, c=1.0, max_iter=1000)
            loader = context.loader(context.splits.train, model.backbone, train=False)
            masks = top_mask(fisher_diagonal(model, loader, self.config.fish_batches), self.config.fish_keep)
            with torch.no_grad():
                for name, value in masks.items():
                    mask.mask_of(name).copy_(value)
        else:  # the parameter groups depend on the mask, so it is needed before the engine loads the checkpoint
            restore_mask(mask, context.checkpoint_dir)
        handles = []
        for name, param in self.masked_parameters(model).items():
            param.requires_grad_(True)
            handles.append(param.register_hook(_MaskGradient(mask, name)))
        context.notes.append(f"FISH mask: {mask.kept():,} of {mask.total():,} backbone parameters "
                             f"({100 * mask.kept() / mask.total():.3f}%) in {len(handles)} tensors")
        try:
            return context.train_with_engine(model, self)
        finally:
            for handle in handles:
                handle.remove()

    def metrics(self, model: TransferModel) -> dict[str, Any]:
        """Mask size, and the honest trainable count (mask entries + heads) for metrics.json."""
        mask: FishMask = getattr(model, MASK_MODULE)
        heads = sum(p.numel() for p in model.heads.parameters())
        return {"fish_mask_size": mask.kept(), "fish_mask_total": mask.total(), "trainable_params": mask.kept() + heads}


def restore_mask(mask: FishMask, checkpoint_dir: Path) -> None:
    """Copy the mask buffers saved in the engine checkpoint in ``checkpoint_dir`` (``model.fish_mask.*`` of the
    loss module; safetensors, no pickle). A checkpoint without the complete mask is refused in one line."""
    from transferkit.engine.checkpoint import checkpoint_file, corrupt, read_section

    state = read_section(checkpoint_dir, "loss_module")
    prefix = f"model.{MASK_MODULE}."
    saved = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    expected = dict(mask.named_buffers())
    if saved.keys() != expected.keys() or any(saved[k].shape != v.shape for k, v in expected.items()):
        raise corrupt(checkpoint_file(checkpoint_dir), "its FISH mask does not match this model")
    with torch.no_grad():
        for name, value in saved.items():
            expected[name].copy_(value)


class _MaskGradient:
    """Tensor hook: ``grad * mask`` (reads the buffer at call time, so a restored checkpoint's mask applies)."""

    def __init__(self, mask: FishMask, name: str) -> None:
        self.mask = mask
        self.name = name

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.mask.mask_of(self.name).to(grad.dtype)
