"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"; Rebuffi et al. 2018
for residual adapters in CNNs): a small residual module after (series) or beside (parallel) each block.

``adapter(h) = W_up act(W_down h + b_down) + b_up`` with ``W_down``: ``C -> m`` and ``W_up``: ``m -> C``
(``m = --adapter-dim``, or ``C // --adapter-reduction``); ``W_up`` and ``b_up`` start at zero, so the adapted
network equals the pretrained one at the start of training.

* series:   ``y = f(x) + adapter(f(x))``
* parallel: ``y = f(x) + adapter(x)`` (He et al. 2022, "Towards a Unified View of PETL"); only blocks whose
  input and output have the same shape can take one, the others are left as they are (the run notes how many).

The adapter acts on the channel axis of ``(B, C, H, W)`` outputs (1x1 convolutions) and on the last axis of
``(B, T, C)`` token states (linear layers). Everything else is frozen (batch-norm statistics too); the heads
train. Each adapted block is replaced in its parent by an :class:`AdaptedBlock` holding ``block`` and
``adapter``, so ``prepare(model, for_loading=True)`` rebuilds the same state-dict keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from transferkit.errors import TransferkitError
from transferkit.strategies import register_strategy
from transferkit.strategies.base import Strategy, StrategyConfig, freeze, unfreeze
from transferkit.strategies.linear_probe import start_from_probe

if TYPE_CHECKING:
    from transferkit.backbones import Backbone
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainResult
    from transferkit.model import TransferModel

logger = logging.getLogger(__name__)

MODES = ("series", "parallel")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


@dataclass
class AdapterConfig(StrategyConfig):
    adapter_mode: str = field(default="series", metadata={"help": "series (after each block) or parallel "
                                                             "(beside each shape-preserving block)."})
    adapter_dim: int = field(default=0, metadata={"help": "Bottleneck width m (0: channels // "
                                                      "--adapter-reduction)."})
    adapter_reduction: int = field(default=16, metadata={"help": "Bottleneck reduction factor when "
                                                             "--adapter-dim is 0."})
    adapter_activation: str = field(default="relu", metadata={"help": "relu or gelu."})

    def validate(self) -> None:
        if self.adapter_mode not in MODES:
            raise TransferkitError(f"invalid --adapter-mode '{self.adapter_mode}'", "choose series or parallel")
        if self.adapter_dim < 0 or self.adapter_reduction < 1:
            raise TransferkitError("--adapter-dim must be >= 0 and --adapter-reduction >= 1", "pass e.g. 16")
        if self.adapter_activation not in ACTIVATIONS:
            raise TransferkitError(f"invalid --adapter-activation '{self.adapter_activation}'",
                                   f"choose {' or '.join(ACTIVATIONS)}")


class BottleneckAdapter(nn.Module):
    """``up(act(down(h)))`` on axis ``1`` (``conv=True``: 1x1 convolutions) or on the last axis (linear)."""

    def __init__(self, channels: int, bottleneck: int, conv: bool, activation: str = "relu") -> None:
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.down = layer(channels, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = layer(bottleneck, channels)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


def _main_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class AdaptedBlock(nn.Module):
    """``block`` followed (series) or accompanied (parallel) by a residual bottleneck adapter."""

    def __init__(self, block: nn.Module, adapter: BottleneckAdapter, mode: str) -> None:
        super().__init__()
        self.block = block
        self.adapter = adapter
        self.mode = mode

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.block(*args, **kwargs)
        main = _main_tensor(output)
        if self.mode == "series":
            adapted = main + self.adapter(main)
        else:
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
            adapted = main + self.adapter(x)
        if isinstance(output, tuple):
            return (adapted, *output[1:])
        if isinstance(output, list):
            return [adapted, *output[1:]]
        return adapted


def dummy_input(backbone: Backbone) -> Any:
    """One preprocessed example of the backbone's modality, for probing block shapes."""
    if backbone.modality == "image":
        from PIL import Image

        item: Any = Image.new("RGB", (64, 64), (128, 128, 128))
    elif backbone.modality == "text":
        item = "a short example sentence"
    else:
        raise TransferkitError(f"adapters do not support {backbone.modality} backbones yet",
                               "use --strategy lora or finetune")
    return backbone.collate([backbone.preprocess(item, train=False)])


def block_shapes(backbone: Backbone, blocks: list[nn.Module]) -> list[tuple[torch.Size, torch.Size]]:
    """(input shape, output shape) of each block's main tensor on one dummy example (eval mode, no grad)."""
    shapes: dict[int, tuple[torch.Size, torch.Size]] = {}

    def record(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            shapes.setdefault(index, (x.shape if isinstance(x, torch.Tensor) else torch.Size(),
                                      _main_tensor(output).shape))
        return hook

    handles = [b.register_forward_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone.forward_features(dummy_input(backbone))
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
    missing = [i for i in range(len(blocks)) if i not in shapes]
    if missing:
        raise TransferkitError(f"block {missing[0]} of '{backbone.spec.name}' is not called by its forward pass",
                               "use --strategy lora for this backbone")
    return [shapes[i] for i in range(len(blocks))]


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> bool:
    for module in root.modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return True
    return False


def insert_adapters(backbone: Backbone, config: AdapterConfig) -> int:
    """Wrap the backbone's ``blocks()`` with adapters; returns how many blocks got one (deterministic)."""
    blocks = [b for b in backbone.blocks() if not isinstance(b, AdaptedBlock)]
    in_tree = {id(m) for m in backbone.modules()}
    blocks = [b for b in blocks if id(b) in in_tree]  # ModuleGroup views are not real blocks
    if not blocks:
        raise TransferkitError(f"backbone '{backbone.spec.name}' exposes no blocks for adapters",
                               "use --strategy lora or finetune")
    shapes = block_shapes(backbone, blocks)
    count = 0
    for block, (in_shape, out_shape) in zip(blocks, shapes):
        if config.adapter_mode == "parallel" and in_shape != out_shape:
            continue
        conv = len(out_shape) == 4
        channels = int(out_shape[1] if conv else out_shape[-1])
        width = config.adapter_dim or max(1, channels // config.adapter_reduction)
        wrapped = AdaptedBlock(block, BottleneckAdapter(channels, width, conv, config.adapter_activation),
                               config.adapter_mode)
        if not _replace(backbone, block, wrapped):
            raise TransferkitError(f"cannot place an adapter in '{backbone.spec.name}'", "use --strategy lora")
        count += 1
    if count == 0:
        raise TransferkitError(f"no block of '{backbone.spec.name}' keeps its shape, so no parallel adapter fits",
                               "use --adapter-mode series")
    return count


def adapter_modules(module: nn.Module) -> list[BottleneckAdapter]:
    return [m.adapter for m in module.modules() if isinstance(m, AdaptedBlock)]


def analytic_adapter_count(module: nn.Module) -> int:
    """``2 C m + m + C`` per adapter (down and up projections with biases)."""
    total = 0
    for adapter in adapter_modules(module):
        c, m = adapter.up.weight.shape[0], adapter.down.weight.shape[0]
        total += 2 * c * m + m + c
    return total


@register_strategy
class Adapters(Strategy):
    name = "adapter"
    config_class = AdapterConfig
    description = "bottleneck adapters (series or parallel) after the backbone's blocks; the rest frozen"
    task_kinds = ("label", "classify", "regress", "quantile", "causal_lm")
    config: AdapterConfig

    def prepare(self, model: TransferModel, for_loading: bool = False) -> None:
        freeze(model.backbone)
        if not adapter_modules(model.backbone):
            self.inserted = insert_adapters(model.backbone, self.config)
        for adapter in adapter_modules(model.backbone):
            unfreeze(adapter)
        unfreeze(model.heads)
        model.freeze_norm_stats = True

    def train(self, model: TransferModel, context: RunContext) -> TrainResult:
        blocks = len(adapter_modules(model.backbone))
        context.notes.append(f"{self.config.adapter_mode} bottleneck adapters on {blocks} blocks "
                             f"({analytic_adapter_count(model.backbone):,} parameters)")
        if model.backbone.is_pretrained:  # LP-FT: start from the probe's head, as finetune does
            start_from_probe(model, context)
        return context.train_with_engine(model, self)
