"""Fine-tuning: unfreeze the top K layer groups (or all), with layer-wise learning-rate decay.

Layer-wise (discriminative) learning rates (Howard & Ruder 2018; Clark et al. 2020): the group at depth ``d``
below the top gets ``backbone_lr * layer_decay**d``; the head trains at ``--lr``. With ``head_init=probe`` the
head starts from the linear probe's solution (LP-FT, Kumar et al. 2022), which protects the pretrained features
from the large early gradients of a random head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transferkit.errors import TransferkitError
from transferkit.strategies import register_strategy
from transferkit.strategies.base import Strategy, StrategyConfig, freeze, unfreeze
from transferkit.strategies.linear_probe import start_from_probe

if TYPE_CHECKING:
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainConfig, TrainResult
    from transferkit.model import TransferModel

HEAD_INITS = ("auto", "probe", "random")


@dataclass
class FinetuneConfig(StrategyConfig):
    unfreeze: str = field(
        default="all", metadata={"help": "How many layer groups to train, counted from the top, or 'all'."}
    )
    layer_decay: float = field(
        default=1.0, metadata={"help": "Learning-rate factor per layer group going down (1.0: no decay)."}
    )
    backbone_lr: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the top backbone group (default: --lr / 10 for pretrained weights, "
                  "--lr for a randomly initialised backbone)."},
    )
    freeze_bn: bool | None = field(
        default=None,
        metadata={"help": "Keep batch-norm statistics frozen (default: yes for pretrained weights, where few labels "
                  "would corrupt them; no for a randomly initialised backbone, which needs them)."},
    )
    head_init: str = field(
        default="auto",
        metadata={"help": "probe: start the head from the linear-probe solution (LP-FT); random: a new head; "
                  "auto: probe for pretrained weights, random otherwise."},
    )

    def validate(self) -> None:
        if self.unfreeze != "all":
            try:
                k = int(self.unfreeze)
            except (TypeError, ValueError):
                k = -1
            if k < 0:
                raise TransferkitError(f"invalid --unfreeze '{self.unfreeze}'", "use 'all' or a whole number >= 0")
        if not 0 < self.layer_decay <= 1:
            raise TransferkitError(f"invalid --layer-decay {self.layer_decay}", "use a number in (0, 1]")
        if self.backbone_lr is not None and not self.backbone_lr > 0:
            raise TransferkitError(f"invalid --backbone-lr {self.backbone_lr}", "use a number above 0")
        if self.head_init not in HEAD_INITS:
            raise TransferkitError(f"invalid --head-init '{self.head_init}'", f"choose {' or '.join(HEAD_INITS)}")


def trained_groups(model: TransferModel, unfreeze_spec: str) -> list:
    groups = model.backbone.layer_groups()
    k = len(groups) if unfreeze_spec == "all" else min(int(unfreeze_spec), len(groups))
    return groups[len(groups) - k:] if k else []


@register_strategy
class Finetune(Strategy):
    name = "finetune"
    config_class = FinetuneConfig
    description = "train the top K layer groups (or all) with layer-wise learning rates"
    task_kinds = ("label", "classify", "regress", "quantile", "causal_lm")
    config: FinetuneConfig

    def prepare(self, model: TransferModel, for_loading: bool = False) -> None:
        freeze(model.backbone)
        for group in trained_groups(model, self.config.unfreeze):
            unfreeze(group)
        unfreeze(model.heads)
        freeze_bn = self.config.freeze_bn
        model.freeze_norm_stats = model.backbone.is_pretrained if freeze_bn is None else freeze_bn

    def param_groups(self, model: TransferModel, train: TrainConfig) -> list[dict[str, Any]]:
        default_lr = train.lr / 10 if model.backbone.is_pretrained else train.lr
        backbone_lr = self.config.backbone_lr or default_lr
        groups: list[dict[str, Any]] = [{"params": list(model.heads.parameters()), "lr": train.lr, "name": "head"}]
        trained = trained_groups(model, self.config.unfreeze)
        for depth, group in enumerate(reversed(trained)):
            params = [p for p in group.parameters() if p.requires_grad]
            if params:
                lr = backbone_lr * self.config.layer_decay**depth
                groups.append({"params": params, "lr": lr, "name": f"backbone[-{depth + 1}]"})
        return groups

    def train(self, model: TransferModel, context: RunContext) -> TrainResult:
        head_init = self.config.head_init
        if head_init == "auto":
            head_init = "probe" if model.backbone.is_pretrained else "random"
        if model.tasks[0].kind != "classify":  # e.g. a causal LM: its output layer is the pretrained one
            head_init = "random"
        if head_init == "probe" and context.heads_from is not None:  # auto: keep the head copied by --init-from
            head_init = "random"
        if head_init == "probe":
            start_from_probe(model, context)
        return context.train_with_engine(model, self)
