"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through Hugging Face ``peft``.

Every adapted layer with frozen weight ``W`` (``d x k``) computes ``W x + (alpha / r) B A x`` with ``A`` (``r x k``,
random) and ``B`` (``d x r``, zero at the start), so training begins exactly at the pretrained function and adds
``r (d + k)`` parameters per matrix. For a ``k_h x k_w`` convolution peft's ``A`` is a convolution
``c_in -> r`` with the same kernel and ``B`` a 1x1 convolution ``r -> c_out``: ``r (c_in k_h k_w + c_out)``.

The adapters are injected *in place* into the backbone's inner network (``peft.inject_adapter_in_model``), so
the TransferModel keeps its structure (``backbone.model...``) and ``prepare(model, for_loading=True)`` rebuilds
the same modules before a saved state dict is loaded. Batch-norm statistics stay frozen (the backbone is
frozen), so an adapter-only export plus the pretrained weights reproduces the model exactly.

Exports (``transferkit export``): ``adapter`` writes peft's ``adapter_config.json`` +
``adapter_model.safetensors`` (keys relative to the inner network, so ``peft.set_peft_model_state_dict`` or
``PeftModel.from_pretrained`` on the same base network loads them) plus the transferkit head; ``merged`` folds
``(alpha / r) B A`` into ``W`` with peft's own ``merge()`` and writes an ordinary transferkit model.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from transferkit.errors import TransferkitError, read_safetensors
from transferkit.strategies import register_strategy
from transferkit.strategies.base import Strategy, StrategyConfig, freeze, unfreeze
from transferkit.strategies.linear_probe import start_from_probe

if TYPE_CHECKING:
    from transferkit.backbones import Backbone
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainResult
    from transferkit.model import TransferModel

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
EXPORT_KIND_KEY = "lora_export"  # in an exported folder's config.json: "adapter" or "merged"
HEAD_FILE = "head.safetensors"


@dataclass
class LoraStrategyConfig(StrategyConfig):
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r (parameters per adapted d x k matrix: r(d+k))."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale alpha (the update is alpha/r * B A)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_targets: list[str] | None = field(
        default=None,
        metadata={"help": "Module-name suffixes to adapt (repeat the flag or separate with commas; 're:<regex>' "
                  "matches full module names). Default: the backbone's suggestion (`transferkit inspect`)."},
    )
    #: set by ``transferkit export --merge``: the LoRA update is already folded into the base weights
    _merged: bool = False

    def validate(self) -> None:
        if self.lora_r < 1:
            raise TransferkitError(f"invalid --lora-r {self.lora_r}", "use a whole number >= 1")
        if not self.lora_alpha > 0:
            raise TransferkitError(f"invalid --lora-alpha {self.lora_alpha}", "use a number above 0")
        if not 0 <= self.lora_dropout < 1:
            raise TransferkitError(f"invalid --lora-dropout {self.lora_dropout}", "use a number in [0, 1)")


def inner_network(backbone: Backbone) -> nn.Module:
    """The network that peft adapts: ``backbone.model`` (timm / transformers) or the backbone itself."""
    inner = getattr(backbone, "model", None)
    return inner if isinstance(inner, nn.Module) else backbone


def parse_targets(targets: list[str] | None, backbone: Backbone) -> list[str] | str:
    """peft ``target_modules``: a list of suffixes, or one regex string (``re:<regex>``)."""
    names = [t.strip() for entry in (targets or []) for t in str(entry).split(",") if t.strip()]
    if not names:
        names = list(backbone.suggested_lora_targets())
    if not names:
        raise TransferkitError(
            f"backbone '{backbone.spec.name}' suggests no LoRA target modules",
            "pass --lora-targets NAME (module-name suffixes; see `transferkit inspect BACKBONE`)",
        )
    regexes = [n for n in names if n.startswith("re:")]
    if regexes:
        if len(names) > 1:
            raise TransferkitError("--lora-targets mixes a 're:' pattern with other names",
                                   "give either one 're:<regex>' or a list of module-name suffixes")
        return regexes[0][3:]
    return names


def matched_modules(inner: nn.Module, targets: list[str] | str) -> list[str]:
    """Module names peft will adapt (its matching rule: full-match regex, or name == / endswith '.' + target)."""
    names = [n for n, _ in inner.named_modules() if n]
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def _base_layer(module: nn.Module) -> nn.Module:
    """The wrapped layer of a peft LoRA layer, else the module itself."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def lora_config(config: LoraStrategyConfig, backbone: Backbone):
    from peft import LoraConfig

    inner = inner_network(backbone)
    targets = parse_targets(config.lora_targets, backbone)
    matched = matched_modules(inner, targets)
    if not matched:
        raise TransferkitError(
            f"--lora-targets {targets} match no module of backbone '{backbone.spec.name}'",
            "list the module names with `transferkit inspect BACKBONE`",
        )
    layers = {n: _base_layer(inner.get_submodule(n)) for n in matched}
    unsupported = [n for n, m in layers.items() if not isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding))]
    if unsupported:
        raise TransferkitError(
            f"LoRA target '{unsupported[0]}' is a {type(layers[unsupported[0]]).__name__}",
            "target linear, convolution or embedding layers only (see `transferkit inspect BACKBONE`)",
        )
    grouped = [n for n, m in layers.items() if isinstance(m, nn.Conv2d) and config.lora_r % m.groups]
    if grouped:
        groups = layers[grouped[0]].groups
        raise TransferkitError(
            f"LoRA target '{grouped[0]}' is a grouped (depthwise) convolution with {groups} groups: peft needs the "
            f"rank divisible by the groups", "target the pointwise convolutions (conv_pw, conv_pwl) instead",
        )
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none")


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers inside ``module`` by name."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def merge_lora(backbone: Backbone) -> int:
    """Fold every LoRA update into its base layer (peft's ``merge``) and put the plain base layer back.

    Returns the number of merged layers; afterwards the network has the original, adapter-free structure.
    """
    inner = inner_network(backbone)
    layers = lora_layers(inner)
    for name, layer in layers.items():
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = inner.get_submodule(parent_name) if parent_name else inner
        setattr(parent, child, layer.get_base_layer())
    return len(layers)


def analytic_lora_count(inner: nn.Module, r: int) -> int:
    """``r (d + k)`` per adapted ``d x k`` linear, ``r (c_in k_h k_w / groups + c_out)`` per convolution."""
    total = 0
    for layer in lora_layers(inner).values():
        base = layer.get_base_layer()
        if isinstance(base, nn.Linear):
            total += r * (base.in_features + base.out_features)
        elif isinstance(base, (nn.Conv1d, nn.Conv2d)):
            kernel = int(torch.tensor(base.kernel_size).prod())
            total += r * (base.in_channels * kernel // base.groups + base.out_channels)
        elif isinstance(base, nn.Embedding):
            total += r * (base.num_embeddings + base.embedding_dim)
    return total


@register_strategy
class Lora(Strategy):
    name = "lora"
    config_class = LoraStrategyConfig
    description = "LoRA adapters (peft) on the backbone's suggested or given modules; head trainable"
    task_kinds = ("label", "classify", "regress", "quantile", "causal_lm")
    config: LoraStrategyConfig

    def prepare(self, model: TransferModel, for_loading: bool = False) -> None:
        freeze(model.backbone)
        if not self.config._merged:
            from peft import inject_adapter_in_model

            inner = inner_network(model.backbone)
            if not lora_layers(inner):
                inject_adapter_in_model(lora_config(self.config, model.backbone), inner, adapter_name=ADAPTER_NAME)
            for layer in lora_layers(inner).values():
                for p in layer.lora_A.parameters():
                    p.requires_grad_(True)
                for p in layer.lora_B.parameters():
                    p.requires_grad_(True)
        unfreeze(model.heads)
        model.freeze_norm_stats = True

    def train(self, model: TransferModel, context: RunContext) -> TrainResult:
        if model.backbone.is_pretrained:  # LP-FT: start from the probe's head, as finetune does
            start_from_probe(model, context)
        return context.train_with_engine(model, self)

    def param_groups(self, model: TransferModel, train: Any) -> list[dict[str, Any]]:
        heads = list(model.heads.parameters())
        lora = [p for p in model.backbone.parameters() if p.requires_grad]
        return [{"params": heads, "lr": train.lr, "name": "head"}, {"params": lora, "lr": train.lr, "name": "lora"}]


# --- export / import -------------------------------------------------------------------------------------------


def _lora_options(config: dict[str, Any]) -> dict[str, Any]:
    strategy = config.get("strategy", {})
    if strategy.get("name") != "lora":
        raise TransferkitError(f"the model in '{config['_folder']}' was trained with strategy "
                               f"'{strategy.get('name')}', not lora", "export a run fitted with --strategy lora")
    return dict(strategy.get("options", {}))


def export_lora(model_dir: str | Path, out: str | Path, merge: bool = False, overwrite: bool = False) -> Path:
    """Write a LoRA run either as a small adapter folder (default) or merged into a plain transferkit model.

    Adapter folder: ``adapter_config.json`` and ``adapter_model.safetensors`` (peft's format, keys relative to
    the backbone's inner network), ``head.safetensors`` and a transferkit ``config.json`` marked
    ``"lora_export": "adapter"``; :func:`load_lora_export` rebuilds it on the *pretrained* backbone.
    The folder is written through :class:`~transferkit.rundir.OutputFolder` (kind ``export``): ``overwrite``
    replaces only an earlier export.
    """
    from peft import get_peft_model_state_dict

    from transferkit.evaluation.calibration import copy_calibration, run_folder_of
    from transferkit.model import load_model, read_model_config, save_model
    from transferkit.rundir import OutputFolder, read_options, write_json, write_safetensors

    config = read_model_config(model_dir)
    options = _lora_options(config)
    if options.get("_merged"):
        raise TransferkitError(f"'{model_dir}' is already a merged LoRA export", "export the original run instead")
    fit = (read_options(run_folder_of(config["_folder"])) or {}).get("fit")
    if not merge and isinstance(fit, dict) and fit.get("pretrained") is False:  # the adapter loads on the pretrained base
        raise TransferkitError(f"the LoRA run in '{model_dir}' was trained on randomly initialised weights "
                               "(--no-pretrained), which an adapter export cannot rebuild",
                               "export it with --merge (a plain model)")
    folder = OutputFolder(out, "export", overwrite=overwrite)
    folder.check()
    model, config = load_model(model_dir)
    extra = {k: v for k, v in config.items() if k not in _MODEL_CONFIG_KEYS and not k.startswith("_")}
    folder.begin()
    with folder:
        stage = folder.stage
        copy_calibration(config["_folder"], stage)  # a fitted softmax temperature travels with the export
        if merge:
            merged = merge_lora(model.backbone)
            logger.info("merged %d LoRA layers into the base weights", merged)
            save_model(model, stage, {"name": "lora", "options": {**options, "_merged": True}},
                       extra={**extra, EXPORT_KIND_KEY: "merged"})
            return folder.publish()
        inner = inner_network(model.backbone)
        peft_config = lora_config(Lora(LoraStrategyConfig(**options)).config, model.backbone)
        peft_config.save_pretrained(str(stage))
        adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(
            inner, adapter_name=ADAPTER_NAME).items()}
        write_safetensors(stage / "adapter_model.safetensors", adapter)
        heads = {k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
        write_safetensors(stage / HEAD_FILE, heads)
        saved = json.loads((Path(config["_folder"]) / "config.json").read_text())
        saved[EXPORT_KIND_KEY] = "adapter"
        write_json(stage / "config.json", saved)
        return folder.publish()


_MODEL_CONFIG_KEYS = ("format", "format_version", "backbone", "modality", "tasks", "head_dropout", "strategy",
                      "preprocess_signature")


def load_lora_export(folder: str | Path) -> tuple[TransferModel, dict[str, Any]]:
    """Load what :func:`export_lora` wrote. Adapter folders need the backbone's pretrained weights."""
    from peft import set_peft_model_state_dict

    from transferkit.backbones import backbone_from_spec
    from transferkit.model import TaskSpec, TransferModel, load_model, read_model_config

    config = read_model_config(folder)
    if config.get(EXPORT_KIND_KEY) != "adapter":
        return load_model(folder)
    folder = Path(config["_folder"])
    backbone = backbone_from_spec(config["backbone"], pretrained=True)
    if not backbone.is_pretrained:  # the adapter was trained on weights that cannot be rebuilt
        raise TransferkitError(f"the LoRA adapter export in '{folder}' needs backbone '{config['backbone']['name']}'"
                               "'s pretrained weights, and it has no pretrained weights",
                               "export the run with `transferkit export --merge` (a plain model)")
    model = TransferModel(backbone, [TaskSpec(**t) for t in config["tasks"]], config.get("head_dropout", 0.0))
    Lora(LoraStrategyConfig(**_lora_options(config))).prepare(model, for_loading=True)
    result = set_peft_model_state_dict(inner_network(backbone), read_safetensors(folder / "adapter_model.safetensors"),
                                       adapter_name=ADAPTER_NAME)
    if getattr(result, "unexpected_keys", None):
        raise TransferkitError(f"the adapter in '{folder}' does not fit backbone '{config['backbone']['name']}'",
                               "load it with the backbone it was trained on")
    model.heads.load_state_dict(read_safetensors(folder / HEAD_FILE), strict=True)
    model.eval()
    return model, config
