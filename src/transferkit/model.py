"""TransferModel: a backbone's embedding followed by one head per task, and its on-disk format.

A saved model is a folder ``model/`` with ``config.json`` (backbone spec, tasks, strategy and its options) and
``model.safetensors`` (the full state dict). Loading rebuilds the backbone's architecture without pretrained
weights, re-applies the strategy's structural changes (LoRA wrappers, adapters) and loads the state dict, so
``load(save(m))`` predicts exactly like ``m``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.backbones import Backbone, backbone_from_spec
from transferkit.errors import TransferkitError

FORMAT = "transferkit-model"
FORMAT_VERSION = 1


@dataclass
class TaskSpec:
    """One prediction target. ``kind`` is ``classify`` here; other kinds are added by the tasks package."""

    name: str = "label"
    kind: str = "classify"
    class_names: list[str] = field(default_factory=list)
    num_outputs: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind == "classify" and not self.num_outputs:
            self.num_outputs = len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelOutput:
    """``features``: the backbone embedding; ``outputs``: raw head outputs by task; ``logits``: the first task's."""

    features: torch.Tensor
    outputs: dict[str, torch.Tensor]

    @property
    def logits(self) -> torch.Tensor:
        return next(iter(self.outputs.values()))


def make_head(in_features: int, task: TaskSpec, dropout: float = 0.0) -> nn.Module:
    """A linear head (with optional dropout) producing ``task.num_outputs`` values."""
    if task.kind != "classify":  # regression / quantile heads live in the tasks package
        from transferkit.tasks import build_head

        return build_head(in_features, task, dropout)
    linear = nn.Linear(in_features, task.num_outputs)
    return nn.Sequential(nn.Dropout(dropout), linear) if dropout > 0 else nn.Sequential(linear)


class TransferModel(nn.Module):
    """``backbone.forward_features`` -> one head per task. ``freeze_norm_stats`` keeps batch-norm in eval mode."""

    def __init__(self, backbone: Backbone, tasks: list[TaskSpec], head_dropout: float = 0.0) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a TransferModel needs at least one task")
        self.backbone = backbone
        self.tasks = list(tasks)
        self.head_dropout = head_dropout
        self.heads = nn.ModuleDict({t.name: make_head(backbone.feature_dim, t, head_dropout) for t in tasks})
        self.freeze_norm_stats = False

    @property
    def class_names(self) -> list[str]:
        return self.tasks[0].class_names

    def forward_head(self, features: torch.Tensor) -> ModelOutput:
        return ModelOutput(features, {name: head(features) for name, head in self.heads.items()})

    def forward(self, inputs: Any) -> ModelOutput:
        return self.forward_head(self.backbone.forward_features(inputs))

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        if mode and self.freeze_norm_stats:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def count_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, total


def save_model(model: TransferModel, folder: str | Path, strategy: dict[str, Any], extra: dict | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": model.backbone.spec.to_dict(),
        "modality": model.backbone.modality,
        "tasks": [t.to_dict() for t in model.tasks],
        "head_dropout": model.head_dropout,
        "strategy": strategy,
        "preprocess_signature": model.backbone.preprocess_signature(),
        **(extra or {}),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # Cloned so that tensors sharing storage (tied weights, wrappers) are written independently.
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))


def read_model_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if (folder / "model").is_dir():  # a run folder
        folder = folder / "model"
    path = folder / "config.json"
    if not path.is_file():
        raise TransferkitError(f"'{folder}' holds no transferkit model (no config.json)",
                               "pass the folder that `transferkit fit --out` wrote")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TransferkitError(f"'{path}' is not valid JSON ({exc.msg})", "re-run `transferkit fit`") from None
    if config.get("format") != FORMAT:
        raise TransferkitError(f"'{path}' is not a transferkit model config", "pass a run folder written by fit")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise TransferkitError(f"the model in '{folder}' was written by a newer transferkit",
                               "upgrade transferkit")
    config["_folder"] = str(folder)
    return config


def load_model(folder: str | Path) -> tuple[TransferModel, dict[str, Any]]:
    """Rebuild a saved TransferModel exactly; errors clearly on incompatible checkpoints."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from transferkit.strategies import create_strategy

    config = read_model_config(folder)
    folder = Path(config["_folder"])
    backbone = backbone_from_spec(config["backbone"], pretrained=False)
    tasks = [TaskSpec(**t) for t in config["tasks"]]
    model = TransferModel(backbone, tasks, head_dropout=config.get("head_dropout", 0.0))
    strategy_cfg = config.get("strategy", {})
    strategy = create_strategy(strategy_cfg.get("name", "linear-probe"), strategy_cfg.get("options", {}))
    strategy.prepare(model, for_loading=True)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise TransferkitError(f"'{folder}' has no model.safetensors", "re-run `transferkit fit` to write the model")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise TransferkitError(f"cannot read '{weights}' ({exc})", "the file is damaged; re-run `transferkit fit`") \
            from None
    _take_learned_sizes(model, state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        detail = (missing or unexpected or mismatched)[0]
        raise TransferkitError(
            f"the weights in '{weights}' do not fit backbone '{config['backbone']['name']}' "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} wrong-shaped tensors, "
            f"e.g. '{detail}')",
            "load it with the backbone and strategy it was trained with, or re-run `transferkit fit`",
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, config


def _take_learned_sizes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Modules whose buffer sizes are learned (a kNN head's example bank) take them from the saved tensors
    through their ``resize_from_state(own_state)`` before the shapes are checked."""
    for name, module in model.named_modules():
        resize = getattr(module, "resize_from_state", None)
        if callable(resize):
            prefix = f"{name}." if name else ""
            resize({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
