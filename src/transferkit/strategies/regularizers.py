"""Regularisers that combine with any strategy trained by the engine: KL anchoring, L2-SP, and ``--init-from``.

``--anchor kl`` (Phan et al. 2020, "Personalized automatic sleep staging with single-night data: a pilot study
with Kullback-Leibler divergence regularization"), as the lecture states it::

    E'(theta_p) = -(1 - A) 1/L sum_n sum_c 1[y_n = c] log P_theta_p(c | x_n)
                  - A 1/L sum_n sum_c P_theta(c | x_n) log P_theta_p(c | x_n)  +  lambda/2 ||theta_p||^2

``theta`` is the frozen pretrained model, ``theta_p`` the model being adapted; the second term is the
cross-entropy against the pretrained model's predicted distribution (the KL divergence up to the constant entropy
of ``P_theta``). Sums become batch means here; ``lambda`` is ``--anchor-l2`` (0 by default: the engine's weight
decay already acts). Which distributions are anchored:

* **Same label space (personalisation)**: ``--init-from RUN`` starts from a previously trained transferkit
  model whose class names equal the data's. Its backbone and head are copied into the new model, and the
  frozen copy of that model is ``theta``: the *same head* is anchored (Phan's setting).
* **New label space** (Learning without Forgetting, Li & Hoiem 2016): the frozen pretrained network's *original*
  head is anchored: ``P_theta = softmax(h0(f0(x)))`` against ``P_theta_p = softmax(h0(f_p(x)))`` where ``h0`` is
  ``--init-from``'s head, or else the backbone's ``pretrained_head()`` (e.g. EfficientNet's ImageNet classifier).
  Backbones without either (e.g. minilm) cannot use KL anchoring.

``--anchor l2sp`` (Li, Grandvalet & Davoine 2018, "Explicit inductive bias for transfer learning"):
``beta/2 ||w - w0||^2`` over the trainable backbone weights, ``w0`` their values when training starts (the
pretrained, or ``--init-from``, weights), plus ``--anchor-l2``'s ``lambda/2 ||w_head||^2`` on new heads. Use
``--weight-decay 0`` for pure L2-SP (weight decay pulls towards zero, L2-SP towards ``w0``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from transferkit.engine.objectives import Objective, primary_logits
from transferkit.engine.placement import place
from transferkit.engine.trainer import clone_module
from transferkit.errors import TransferkitError
from transferkit.extensions import ExtensionConfig, FitExtension, register_extension

if TYPE_CHECKING:
    from transferkit.config import FitConfig
    from transferkit.engine.context import RunContext
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy

logger = logging.getLogger(__name__)

ANCHORS = ("kl", "l2sp")


@dataclass
class AnchorConfig(ExtensionConfig):
    anchor: str | None = field(default=None, metadata={
        "help": "kl: KL anchoring to the pretrained model's predictions (Phan et al. 2020); l2sp: L2-SP penalty "
        "towards the pretrained weights; 'kl,l2sp' for both."})
    anchor_alpha: float = field(default=0.5, metadata={
        "help": "kl: weight A in (1-A) CE(labels) + A CE(pretrained predictions)."})
    anchor_beta: float = field(default=0.01, metadata={"help": "l2sp: strength beta of beta/2 ||w - w0||^2."})
    anchor_l2: float = field(default=0.0, metadata={
        "help": "lambda/2 ||w||^2 on trainable weights (kl: every one, as in Phan et al.; l2sp: the heads)."})
    init_from: str | None = field(default=None, metadata={
        "help": "Start from a finished transferkit run (personalisation): copy its backbone, and its head when "
        "the class names match; --anchor kl then anchors that model."})

    def anchors(self) -> list[str]:
        return [a.strip() for a in (self.anchor or "").split(",") if a.strip()]

    def validate(self) -> None:
        unknown = [a for a in self.anchors() if a not in ANCHORS]
        if unknown:
            raise TransferkitError(f"invalid --anchor '{self.anchor}'", "choose kl, l2sp or kl,l2sp")
        if not 0 <= self.anchor_alpha <= 1:
            raise TransferkitError(f"invalid --anchor-alpha {self.anchor_alpha}", "use a number in [0, 1]")
        if self.anchor_beta < 0 or self.anchor_l2 < 0:
            raise TransferkitError("--anchor-beta and --anchor-l2 must be >= 0", "pass e.g. 0.01")


# --- objectives ------------------------------------------------------------------------------------------------


class KLAnchorObjective(Objective):
    """``A * CE(P_ref, P_current)`` per example, averaged; ``P_ref`` from a frozen reference.

    ``reference(inputs)`` gives the reference logits. ``anchored_head`` (frozen) maps the current features to
    the anchored logits; ``None`` anchors the model's own first head. The task loss's ``1 - A`` is the
    RunContext's ``task_weight`` (set by the anchor extension).
    """

    name = "kl_anchor"

    def __init__(self, alpha: float, reference: nn.Module, anchored_head: nn.Module | None) -> None:
        super().__init__(weight=alpha)
        self.alpha = alpha
        # Kept out of the module tree: not optimised, not checkpointed, not wrapped by DDP.
        self.__dict__["reference"] = reference
        self.__dict__["anchored_head"] = anchored_head

    def reference_probabilities(self, inputs: Any, device: torch.device) -> torch.Tensor:
        reference: nn.Module = self.__dict__["reference"]
        place(reference, device)
        reference.eval()
        with torch.no_grad():
            return F.softmax(primary_logits(reference(inputs)).float(), dim=-1)

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        head: nn.Module | None = self.__dict__["anchored_head"]
        if head is None:
            logits = primary_logits(outputs)
        else:
            logits = head.to(outputs.features.device)(outputs.features)
        target = self.reference_probabilities(batch["inputs"], logits.device)
        return kl_anchor_loss(logits, target)


def kl_anchor_loss(logits: torch.Tensor, reference_probabilities: torch.Tensor) -> torch.Tensor:
    """``-1/N sum_n sum_c P_ref(c|x_n) log softmax(logits_n)_c`` (cross-entropy against soft targets)."""
    return -(reference_probabilities * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


class L2SPObjective(Objective):
    """``beta/2 sum ||w - w0||^2`` over the trainable backbone weights + ``l2/2 sum ||w||^2`` over the heads'.

    ``w0`` is snapshotted in :meth:`setup` (start of training: pretrained or ``--init-from`` weights).
    """

    name = "l2sp"

    def __init__(self, beta: float, head_l2: float = 0.0) -> None:
        super().__init__()
        self.beta = beta
        self.head_l2 = head_l2
        self.__dict__["start"] = {}

    def setup(self, model: nn.Module, train_loader: Any | None = None) -> None:
        backbone = model.backbone
        self.__dict__["start"] = {n: p.detach().clone() for n, p in backbone.named_parameters() if p.requires_grad}

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        start: dict[str, torch.Tensor] = self.__dict__["start"]
        total = torch.zeros((), device=primary_logits(outputs).device)
        for name, param in model.backbone.named_parameters():
            if name in start:
                total = total + (param - start[name].to(param.device)).pow(2).sum()
        penalty = 0.5 * self.beta * total
        if self.head_l2:
            penalty = penalty + 0.5 * self.head_l2 * sum(p.pow(2).sum() for p in model.heads.parameters())
        return penalty


class L2Objective(Objective):
    """``lambda/2 ||theta||^2`` over all trainable parameters (Phan et al.'s weight penalty)."""

    name = "l2"

    def __init__(self, l2: float) -> None:
        super().__init__()
        self.l2 = l2

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        return 0.5 * self.l2 * sum(p.pow(2).sum() for p in model.parameters() if p.requires_grad)


# --- --init-from -----------------------------------------------------------------------------------------------


def _strip_wrappers(name: str) -> str:
    """State-dict key without LoRA (``.base_layer``) or adapter (``.block``) wrapper segments."""
    return name.replace(".base_layer.", ".").replace(".block.", ".")


def initialise_from(model: TransferModel, source: TransferModel) -> bool:
    """Copy ``source``'s backbone weights (and heads when the tasks match) into ``model``.

    LoRA in the source is merged first; wrapper modules in ``model`` are matched through their base keys.
    Returns True when the heads were copied too (same label space and head structure).
    """
    from transferkit.strategies.lora import lora_layers, merge_lora

    if lora_layers(source.backbone):
        merge_lora(source.backbone)
    source_state = {k: v for k, v in source.backbone.state_dict().items()}
    target_state = model.backbone.state_dict()
    by_base = {_strip_wrappers(k): k for k in target_state}
    missing = [k for k in source_state if k not in target_state and k not in by_base]
    if missing:
        raise TransferkitError(f"--init-from model has weights this backbone lacks (e.g. '{missing[0]}')",
                               "initialise from a run with the same backbone, trained with finetune, lora or fish")
    with torch.no_grad():
        for key, value in source_state.items():
            target = target_state[key] if key in target_state else target_state[by_base[key]]
            if target.shape != value.shape:
                raise TransferkitError(f"--init-from weight '{key}' has shape {tuple(value.shape)}, this model's "
                                       f"{tuple(target.shape)}", "use the same backbone and options")
            target.copy_(value)
    same_tasks = [(t.name, t.kind, list(t.class_names)) for t in model.tasks] == \
        [(t.name, t.kind, list(t.class_names)) for t in source.tasks]
    shapes = {k: tuple(v.shape) for k, v in model.heads.state_dict().items()}
    same_tasks = same_tasks and shapes == {k: tuple(v.shape) for k, v in source.heads.state_dict().items()}
    if same_tasks:  # same label space and the same kind of head (a knn or prototype head is built by training)
        model.heads.load_state_dict(source.heads.state_dict())
    return same_tasks


def _load_source(path: str, model: TransferModel, fit: FitConfig) -> TransferModel:
    from transferkit.model import load_model, read_model_config

    config = read_model_config(path)
    saved = config["backbone"]
    if saved["name"] != model.backbone.spec.name:
        raise TransferkitError(f"--init-from run uses backbone '{saved['name']}', this run "
                               f"'{model.backbone.spec.name}'", f"pass --backbone {saved['name']}")
    size = saved.get("options", {}).get("image_size")
    if size is not None and model.backbone.spec.options.get("image_size") not in (None, size):
        raise TransferkitError(f"--init-from run used image size {size}, this run "
                               f"{model.backbone.spec.options.get('image_size')}", f"pass --image-size {size}")
    source, _ = load_model(path)
    return source


class _BackboneThenHead(nn.Module):
    """Frozen ``head(backbone(inputs))``: the pretrained network with its original classifier."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.head(self.backbone(inputs))


@register_extension
class AnchorExtension(FitExtension):
    name = "anchor"
    config_class = AnchorConfig
    config: AnchorConfig

    def active(self) -> bool:
        return bool(self.config.anchors() or self.config.init_from)

    def describe(self) -> str:
        parts = [f"--anchor {self.config.anchor}"] if self.config.anchors() else []
        return " ".join(parts + (["--init-from"] if self.config.init_from else []))

    @classmethod
    def modes(cls) -> dict[str, dict[str, Any]]:
        from transferkit.extensions import NEEDS_PATH

        # KL anchoring needs a reference classifier: the --init-from run's (any backbone), or a pretrained head
        return {"anchor kl": {"anchor": "kl", "init_from": NEEDS_PATH}, "anchor l2sp": {"anchor": "l2sp"},
                "init-from": {"init_from": NEEDS_PATH}}

    def supports(self, strategy: Strategy, task_kind: str) -> bool | str:
        anchors = self.config.anchors()
        if anchors and strategy.frozen_backbone:
            return "it keeps the backbone frozen; anchoring regularises a trained backbone"
        if anchors and not strategy.trains_with_engine():
            return "it trains with its own loss, so the anchoring term would never be added"
        if "kl" in anchors and task_kind != "label":
            return "KL anchoring anchors the label classifier alone (use --anchor l2sp with --task heads)"
        return super().supports(strategy, task_kind)

    def check(self, fit: FitConfig, strategy: Strategy) -> None:
        self.strategy = strategy

    def configure(self, context: RunContext, model: TransferModel, fit: FitConfig) -> RunContext:
        config = self.config
        self.mode = None
        source = None
        objectives = list(context.objectives)
        changes: dict[str, Any] = {}
        if config.init_from:
            source = _load_source(config.init_from, model, fit)
            same_head = initialise_from(model, source)
            self.mode = "same head" if same_head else "new label space"
            if same_head:  # learned state: the strategy keeps the loaded head (no probe start); options unchanged
                head_init = getattr(getattr(getattr(self, "strategy", None), "config", None), "head_init", None)
                if head_init == "probe":
                    raise TransferkitError(f"--head-init probe would replace the head that --init-from "
                                           f"{config.init_from} copies (same classes)",
                                           "use --head-init auto (keeps the copied head) or random")
                changes["heads_from"] = config.init_from
            context.notes.append(f"initialised from {config.init_from} (backbone"
                                 f"{' and head' if same_head else ''})")
        anchors = config.anchors()
        if "kl" in anchors:
            if source is not None and self.mode == "same head":
                reference, head, kind = clone_module(model), None, "the same head (personalisation)"
            elif source is not None:
                reference = clone_module(source)
                head, kind = clone_module(source.heads[source.tasks[0].name]), "the --init-from model's head (LwF)"
            elif model.backbone.pretrained_head() is not None:
                original = clone_module(model.backbone.pretrained_head())
                reference = _BackboneThenHead(clone_module(model.backbone), original)
                head, kind = original, "the backbone's original pretrained head (LwF)"
            else:
                raise TransferkitError(
                    f"--anchor kl: backbone '{model.backbone.spec.name}' has no pretrained classifier to anchor",
                    "pass --init-from RUN (a model trained before), or use --anchor l2sp")
            self.mode = kind
            objectives.append(KLAnchorObjective(config.anchor_alpha, reference, head))
            changes["task_weight"] = context.task_weight * (1.0 - config.anchor_alpha)
            if config.anchor_l2:
                objectives.append(L2Objective(config.anchor_l2))
            context.notes.append(f"KL anchoring (alpha {config.anchor_alpha}) to {kind}")
        if "l2sp" in anchors:
            objectives.append(L2SPObjective(config.anchor_beta, config.anchor_l2))
            note = f"L2-SP (beta {config.anchor_beta}) towards the starting backbone weights"
            if context.train.weight_decay:
                note += f"; weight decay {context.train.weight_decay} also acts (pass --weight-decay 0 for pure L2-SP)"
            context.notes.append(note)
        return replace(context, objectives=objectives, **changes)

    def metrics(self, context: RunContext, model: TransferModel) -> dict[str, Any]:
        return {"anchor": {"anchors": self.config.anchors(), "alpha": self.config.anchor_alpha,
                           "beta": self.config.anchor_beta, "l2": self.config.anchor_l2,
                           "init_from": self.config.init_from, "anchored": getattr(self, "mode", None)}}
