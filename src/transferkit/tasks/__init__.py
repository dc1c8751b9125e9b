"""Prediction tasks beyond single-label classification: regression, quantiles, and several targets at once.

A task is a :class:`~transferkit.model.TaskSpec` whose ``kind`` picks the head and whose ``options`` hold the
loss and the target's column. ``--task [COLUMN:]TYPE`` names one task; TYPE is one of :data:`TASK_TYPES`:

========== ========= ============================================================
TYPE       kind      loss
========== ========= ============================================================
classify   classify  cross-entropy (``--label-smoothing`` applies)
hinge      classify  multi-class hinge (Weston & Watkins)
regress    regress   mean squared error
smooth-l1  regress   smooth L1 / Huber
quantile   quantile  pinball loss at ``--quantiles`` (crossing-free monotone head)
causal-lm  causal_lm next-token cross-entropy of a causal LM on a text file (a run of
                     its own: see :mod:`transferkit.tasks.causal_lm`)
========== ========= ============================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from transferkit.errors import TransferkitError
from transferkit.tasks.heads import QuantileHead, RegressionHead
from transferkit.tasks.losses import classification_loss, pinball_loss, regression_loss

if TYPE_CHECKING:
    from transferkit.model import TaskSpec

#: TYPE of ``--task`` -> (TaskSpec.kind, loss)
TASK_TYPES: dict[str, tuple[str, str]] = {
    "classify": ("classify", "cross_entropy"),
    "hinge": ("classify", "hinge"),
    "regress": ("regress", "mse"),
    "smooth-l1": ("regress", "smooth_l1"),
    "quantile": ("quantile", "pinball"),
    "causal-lm": ("causal_lm", "next_token"),
}

#: what a run trains, as :func:`run_task_kind` names it: ``label`` (no ``--task``: the dataset's label) or the kind
#: of its first ``--task`` (the strategies and fit extensions declare which of these they support)
RUN_TASK_KINDS: tuple[str, ...] = ("label", *dict.fromkeys(kind for kind, _ in TASK_TYPES.values()))

__all__ = [
    "RUN_TASK_KINDS",
    "TASK_TYPES",
    "QuantileHead",
    "RegressionHead",
    "build_head",
    "causal_lm_requested",
    "classification_loss",
    "parse_task",
    "pinball_loss",
    "regression_loss",
    "run_task_kind",
    "task_loss",
]


def parse_task(text: str) -> tuple[str | None, str]:
    """``"size:regress"`` -> ``("size", "regress")``; ``"classify"`` -> ``(None, "classify")`` (the label)."""
    column, _, kind = text.strip().rpartition(":")
    kind = kind.strip().lower()
    if kind not in TASK_TYPES or (":" in text and not column.strip()):
        raise TransferkitError(f"invalid --task '{text}'",
                               f"write it as [COLUMN:]TYPE with TYPE one of {', '.join(TASK_TYPES)}, "
                               "e.g. --task count:classify --task size:regress")
    return (column.strip() or None), kind


def run_task_kind(tasks: list[str] | None) -> str:
    """``label`` without ``--task``, else the kind of the first one (``classify``, ``regress``, ...)."""
    return TASK_TYPES[parse_task(tasks[0])[1]][0] if tasks else "label"


def causal_lm_requested(tasks: list[str] | None) -> bool:
    """True when ``--task [COLUMN:]causal-lm`` is given; it trains a language model and takes no other task."""
    parsed = [parse_task(t) for t in tasks or []]
    if not any(kind == "causal-lm" for _, kind in parsed):
        return False
    if len(parsed) > 1:
        raise TransferkitError("--task causal-lm cannot be combined with other --task options",
                               "train the language model in a run of its own")
    return True


def build_head(in_features: int, task: TaskSpec, dropout: float = 0.0) -> nn.Module:
    """The head of a ``regress`` or ``quantile`` task (``classify`` heads are built by ``model.make_head``)."""
    mean = float(task.options.get("target_mean", 0.0))
    std = float(task.options.get("target_std", 1.0))
    if task.kind == "regress":
        return RegressionHead(in_features, mean, std, dropout)
    if task.kind == "quantile":
        return QuantileHead(in_features, task.options["quantiles"], mean, std, dropout,
                            float(task.options.get("interval_offset", 0.0)))
    if task.kind == "causal_lm":  # head-less: the language model's own (tied) output layer is in the backbone
        return nn.Identity()
    raise TransferkitError(f"unknown task kind '{task.kind}'", "use classify, regress, quantile or causal_lm")


def task_loss(task: TaskSpec, prediction, target):
    """The loss of one task on one batch (see :mod:`transferkit.tasks.losses`)."""
    options = task.options
    if task.kind == "classify":
        return classification_loss(prediction, target, options.get("loss", "cross_entropy"),
                                   float(options.get("label_smoothing", 0.0)))
    scale = float(options.get("target_std", 1.0))
    if task.kind == "quantile":
        return pinball_loss(prediction, target, options["quantiles"], scale)
    return regression_loss(prediction, target, options.get("loss", "mse"), scale)
