"""TransferModel: a backbone's embedding followed by one head per task, and its on-disk format.

A saved model is a folder ``model/`` with ``config.json`` (backbone spec, tasks, strategy and its options, the
SHA-256 of the weights file) and ``model.safetensors`` (the full state dict). Loading checks both (a damaged or
edited folder is refused with one line instead of predicting something else), rebuilds the backbone's
architecture without pretrained weights, re-applies the strategy's structural changes (LoRA wrappers, adapters)
and loads the state dict, so ``load(save(m))`` predicts exactly like ``m``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.backbones import Backbone, backbone_from_spec
from transferkit.backbones.base import keep_batch_norm_statistics
from transferkit.config import MAX_IMAGE_SIZE
from transferkit.errors import (
    TransferkitError,
    check_count,
    corrupt_file_error,
    read_json,
    read_safetensors,
    reading,
    writing,
)

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
        from transferkit.engine.lower_maps import BelowInputs

        if isinstance(inputs, BelowInputs):  # cached lower-layer maps: only the top groups run
            return self.forward_head(self.backbone.forward_top(inputs.maps, inputs.groups))
        return self.forward_head(self.backbone.forward_features(inputs))

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        if mode and self.freeze_norm_stats:
            keep_batch_norm_statistics(self.backbone)
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def count_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, total


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: TransferModel, folder: str | Path, strategy: dict[str, Any], extra: dict | None = None) -> None:
    """Write ``model.safetensors`` + ``config.json`` (with the weights' SHA-256) into ``folder``."""
    from transferkit.rundir import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Cloned so that tensors sharing storage (tied weights, wrappers) are written independently.
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    with writing(folder / "model.safetensors"):
        write_safetensors(folder / "model.safetensors", state)
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
        "weights_sha256": file_sha256(folder / "model.safetensors"),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def read_model_config(folder: str | Path) -> dict[str, Any]:
    """The checked ``config.json`` of a model folder (or of a run folder's ``model/``), with ``_folder`` set."""
    folder = run = Path(folder)
    if (folder / "model").is_dir():  # a run folder
        folder = folder / "model"
    path = folder / "config.json"
    if not path.is_file():
        raise TransferkitError(f"'{folder}' holds no transferkit model (no config.json)",
                               "pass the folder that `transferkit fit --out` wrote")
    config = read_json(path, "model config", _REFIT)
    if isinstance(config, dict) and config.get("format") in _SEQUENCE_RUNS:
        what, command = _SEQUENCE_RUNS[config["format"]]
        raise TransferkitError(f"'{run}' is a {what}, not a model trained by fit",
                               f"use `transferkit {command} --model {run}`")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise TransferkitError(f"'{path}' is not a transferkit model config", "pass a run folder written by fit")
    version = config.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise corrupt_file_error(path, "model config", f"format_version {version!r}", _REFIT)
    if version > FORMAT_VERSION:
        raise TransferkitError(f"the model in '{folder}' was written by a newer transferkit",
                               "upgrade transferkit")
    ensemble = config.get("ensemble")
    if ensemble is None:
        check_model_config(config, path)
    elif not isinstance(ensemble, dict) or not isinstance(ensemble.get("members"), list) \
            or not isinstance(ensemble.get("weights"), list):  # an ensemble (`transferkit auto`): members checked on load
        raise corrupt_file_error(path, "model config", "ensemble without member and weight lists", _REFIT)
    config["_folder"] = str(folder)
    return config


_REFIT = "restore the model folder, or train it again with `transferkit fit`"
#: the model formats of ``seq2seq train`` / ``charlm train`` runs: what they are and the command that uses them
_SEQUENCE_RUNS = {"transferkit-charlm": ("character language model run (charlm train)", "charlm sample"),
                  "transferkit-seq2seq": ("seq2seq run (seq2seq train)", "seq2seq predict")}


def check_model_config(config: dict[str, Any], path: Path) -> None:
    """Refuse a config.json whose backbone, tasks (class list vs head size) or head are not what ``save_model``
    writes: such a model would load and silently predict something else."""
    def bad(detail: str) -> TransferkitError:
        return corrupt_file_error(path, "model config", detail, _REFIT)

    backbone = config.get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("name"), str) or not backbone["name"]:
        raise bad("no backbone name")
    if not isinstance(backbone.get("options", {}), dict):
        raise bad("backbone options are not a mapping")
    size = backbone.get("options", {}).get("image_size")
    if size is not None:
        try:
            check_count("image_size", size, 1, MAX_IMAGE_SIZE)
        except TransferkitError as exc:
            raise bad(exc.problem) from None
    tasks = config.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise bad("no tasks")
    names = set()
    for task in tasks:
        if not isinstance(task, dict) or not isinstance(task.get("name"), str) or task["name"] in names:
            raise bad("a task without a (unique) name")
        names.add(task["name"])
        unknown = set(task) - {f.name for f in fields(TaskSpec)}
        if unknown:
            raise bad(f"task '{task['name']}' has unknown entries {', '.join(sorted(unknown))}")
        classes = task.get("class_names", [])
        outputs = task.get("num_outputs", 0)
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise bad(f"the class list of task '{task['name']}' is not a list of names")
        if not isinstance(outputs, int) or isinstance(outputs, bool) or outputs < 0:
            raise bad(f"task '{task['name']}' has num_outputs {outputs!r}")
        if task.get("kind", "classify") == "classify":
            if len(classes) < 1 or len(set(classes)) != len(classes):
                raise bad(f"task '{task['name']}' needs distinct class names")
            if outputs and outputs != len(classes):
                raise bad(f"task '{task['name']}' lists {len(classes)} classes for a head of {outputs} outputs")
        if not isinstance(task.get("options", {}), dict):
            raise bad(f"the options of task '{task['name']}' are not a mapping")
    dropout = config.get("head_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise bad(f"head_dropout {dropout!r}")
    strategy = config.get("strategy", {})
    if not isinstance(strategy, dict) or not isinstance(strategy.get("options", {}), dict) \
            or not isinstance(strategy.get("name", ""), str):
        raise bad("the strategy entry is not a name with options")


def _build(config: dict[str, Any]) -> TransferModel:
    """The architecture described by a checked config (random weights)."""
    from transferkit.strategies import create_strategy

    backbone = backbone_from_spec(config["backbone"], pretrained=False)
    model = TransferModel(backbone, [TaskSpec(**t) for t in config["tasks"]],
                          head_dropout=config.get("head_dropout", 0.0))
    strategy_cfg = config.get("strategy", {})
    create_strategy(strategy_cfg.get("name", "linear-probe"), strategy_cfg.get("options", {})).prepare(
        model, for_loading=True)
    return model


def _shapes_on_meta(config: dict[str, Any], saved: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]] | None:
    """The state-dict shapes of the described architecture, built on the ``meta`` device (no memory), or None
    when a backbone cannot be built there. Compared with the weights file's ``saved`` shapes before the real
    build, so that an edited config (e.g. a width of 10^9) is refused instead of exhausting memory."""
    try:
        with torch.device("meta"):
            model = _build(config)
            _take_learned_sizes(model, {k: torch.empty(shape) for k, shape in saved.items()})
            return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except TransferkitError:
        raise
    except Exception:  # noqa: BLE001 - a backbone that needs real tensors to build: checked after the real build
        return None


def _check_fit(weights: Path, config: dict[str, Any], expected: dict[str, tuple[int, ...]],
               found: dict[str, tuple[int, ...]]) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        detail = (missing or unexpected or mismatched)[0]
        raise TransferkitError(
            f"the weights in '{weights}' do not fit backbone '{config['backbone']['name']}' "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} wrong-shaped tensors, "
            f"e.g. '{detail}')",
            "load it with the backbone and strategy it was trained with, or re-run `transferkit fit`",
        )


def load_model(folder: str | Path) -> tuple[TransferModel, dict[str, Any]]:
    """Rebuild a saved TransferModel exactly; errors clearly on incompatible or damaged model folders: the config
    is checked, the weights file against its SHA-256, the architecture against the file's tensor shapes (on the
    meta device, before any memory is allocated), then dtypes and finiteness."""
    config = read_model_config(folder)
    folder = Path(config["_folder"])
    if config.get("lora_export") == "adapter":  # `transferkit export` of a LoRA run: peft's adapter + the heads
        from transferkit.strategies.lora import load_lora_export

        return load_lora_export(folder)
    path = folder / "config.json"
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise TransferkitError(f"'{folder}' has no model.safetensors", "re-run `transferkit fit` to write the model")
    expected_digest = config.get("weights_sha256")
    if expected_digest is not None and expected_digest != file_sha256(weights):
        raise corrupt_file_error(weights, "safetensors weights file", "its SHA-256 differs from the one in "
                                 "config.json", _REFIT)
    shapes = read_safetensors(weights, "safetensors weights file", _REFIT, shapes_only=True)
    try:
        with reading(path, "model config", _REFIT):
            on_meta = _shapes_on_meta(config, shapes)
            if on_meta is not None:
                _check_fit(weights, config, on_meta, shapes)
            model = _build(config)
            if model.backbone.modality == "image" and "frame" not in config["backbone"].get("options", {}):
                model.backbone.set_frame(legacy_frame(folder))  # saved before the frame was part of the spec
    except TransferkitError as exc:
        if str(folder) in exc.problem:
            raise
        raise TransferkitError(f"the model in '{folder}' cannot be rebuilt: {exc.problem}", exc.fix) from None
    state = read_safetensors(weights, "safetensors weights file", _REFIT)
    _take_learned_sizes(model, state)
    expected = model.state_dict()
    _check_fit(weights, config, {k: tuple(v.shape) for k, v in expected.items()},
               {k: tuple(v.shape) for k, v in state.items()})
    wrong_dtype = [k for k in expected if state[k].dtype != expected[k].dtype]
    if wrong_dtype:
        k = wrong_dtype[0]
        raise corrupt_file_error(weights, "safetensors weights file", f"tensor '{k}' is {state[k].dtype}, the model "
                                 f"needs {expected[k].dtype}", _REFIT)
    not_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not_finite:
        raise corrupt_file_error(weights, "safetensors weights file", f"tensor '{not_finite[0]}' holds NaN or "
                                 "infinite values", _REFIT)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, config


def legacy_frame(folder: Path) -> str:
    """The ``fit --frame`` of a model saved before the frame was part of its backbone spec: its run's metrics.json
    says it (``adaptation.frame``; the run of a source-only baseline ``<run>/source_only/model`` is ``<run>``).
    "none" when no readable metrics.json says so."""
    from transferkit.data.framing import FRAMES
    from transferkit.rundir import BASELINE_DIR

    run = folder.parent.parent if folder.parent.name == BASELINE_DIR else folder.parent
    try:
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no metrics.json (a model folder on its own) or an unreadable one
        return "none"
    adaptation = metrics.get("adaptation") if isinstance(metrics, dict) else None
    frame = adaptation.get("frame") if isinstance(adaptation, dict) else None
    return frame if frame in FRAMES else "none"


def _take_learned_sizes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Modules whose buffer sizes are learned (a kNN head's example bank) take them from the saved tensors
    through their ``resize_from_state(own_state)`` before the shapes are checked."""
    for name, module in model.named_modules():
        resize = getattr(module, "resize_from_state", None)
        if callable(resize):
            prefix = f"{name}." if name else ""
            resize({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
