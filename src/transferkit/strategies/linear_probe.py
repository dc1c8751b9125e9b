"""Linear probe: the backbone stays frozen; only a new linear head is fitted on its (cached) embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from transferkit.engine.solvers import fit_logistic_regression
from transferkit.engine.trainer import TrainResult
from transferkit.errors import TransferkitError
from transferkit.strategies import register_strategy
from transferkit.strategies.base import OPTIMISER_OPTIONS, Strategy, StrategyConfig

if TYPE_CHECKING:
    from transferkit.engine.context import RunContext
    from transferkit.model import TransferModel

SOLVERS = ("lbfgs", "sgd")


@dataclass
class LinearProbeConfig(StrategyConfig):
    solver: str = field(
        default="lbfgs",
        metadata={"help": "lbfgs: exact L2-regularised multinomial logistic regression on the cached features "
                  "(scikit-learn's LogisticRegression objective); sgd: the training engine's mini-batch "
                  "optimiser on the cached features (uses --epochs, --lr, early stopping)."},
    )
    probe_c: float = field(default=1.0, metadata={"help": "lbfgs: inverse L2 strength C (larger = weaker)."})
    probe_max_iter: int = field(default=1000, metadata={"help": "lbfgs: maximum iterations."})

    def validate(self) -> None:
        if self.solver not in SOLVERS:
            raise TransferkitError(f"invalid --solver '{self.solver}'", f"choose one of {', '.join(SOLVERS)}")
        if not self.probe_c > 0:
            raise TransferkitError(f"invalid --probe-c {self.probe_c}", "use a number above 0")


def set_linear_head(model: TransferModel, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy (W, b) into the first task's final linear layer."""
    linear = model.heads[model.tasks[0].name][-1]
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)


def fit_probe(model: TransferModel, context: RunContext, c: float, max_iter: int) -> dict[str, float]:
    """Fit the first task's head by logistic regression on cached features; returns validation metrics."""
    train, val = context.splits.train, context.splits.val
    x = context.features(model.backbone, train, shard=True)  # every process fits: split the extraction
    keep = train.labels >= 0
    weight, bias = fit_logistic_regression(x[keep], train.labels[keep], train.num_classes, c=c, max_iter=max_iter)
    set_linear_head(model, weight, bias)
    metrics: dict[str, float] = {}
    if len(val):
        xv = torch.as_tensor(context.features(model.backbone, val, shard=True))
        logits = xv @ weight.T + bias
        labels = torch.as_tensor(val.labels)
        metrics = {
            "val_loss": float(torch.nn.functional.cross_entropy(logits, labels)),
            "val_accuracy": float((logits.argmax(-1) == labels).float().mean()),
        }
    return metrics


def start_from_probe(model: TransferModel, context: RunContext) -> None:
    """LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"): before any backbone weight moves,
    fit the head by logistic regression on the frozen features, so training starts where the linear probe ends
    instead of from a random head whose large early gradients distort the pretrained features. Skipped on a resumed
    run (the checkpoint has the head), when the heads were copied from another run (``--init-from``) and when the
    first task is not a classification."""
    if not context.checkpoint_is_fresh() or context.heads_from is not None or model.tasks[0].kind != "classify":
        return
    metrics = fit_probe(model, context, c=1.0, max_iter=1000)
    context.notes.append(f"head initialised from the linear probe (validation accuracy "
                         f"{metrics.get('val_accuracy', float('nan')):.3f})")


@register_strategy
class LinearProbe(Strategy):
    name = "linear-probe"
    config_class = LinearProbeConfig
    description = "frozen backbone, new linear head on cached features"
    frozen_backbone = True
    task_kinds = ("label",)
    config: LinearProbeConfig

    def trains_with_engine(self) -> bool:
        return self.config.solver == "sgd"

    def unused_train_options(self) -> tuple[tuple[str, ...], str]:
        if self.config.solver == "sgd":
            return (), ""
        return OPTIMISER_OPTIONS, ("its lbfgs solver fits the head exactly (--probe-c, --probe-max-iter); "
                                   "--solver sgd trains it with the engine's options")

    def train(self, model: TransferModel, context: RunContext) -> TrainResult:
        if self.config.solver == "sgd":
            return context.train_head_on_features(model, self)
        import time

        start = time.perf_counter()
        metrics = fit_probe(model, context, self.config.probe_c, self.config.probe_max_iter)
        row = {"epoch": 1, "solver": "lbfgs", **metrics, "seconds": round(time.perf_counter() - start, 3)}
        return TrainResult([row], 1, metrics.get("val_accuracy"), False, time.perf_counter() - start)


