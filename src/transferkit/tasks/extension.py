"""``--task [COLUMN:]TYPE`` (repeatable): several prediction heads on one shared trunk.

    transferkit fit --data stars --backbone small_cnn --strategy finetune --head-init random \
        --task count:classify --task size:quantile --quantiles 0.1,0.5,0.9 --loss-weighting uncertainty

The first task must classify the dataset's label (the run's standard evaluation reports it); further tasks
read other columns of the data (``LabeledData.columns``). Per-task test metrics go to ``metrics.json`` under
``tasks``, the first task's also at the top level; ``transferkit evaluate`` reports the same under ``tasks`` (this
module is also an evaluation hook). After training, each quantile task's interval is calibrated on the validation
split by split-conformal quantile regression (``--no-calibrate-intervals``: off); the correction is saved with the
model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from transferkit.engine.placement import module_device, place, predict_batches
from transferkit.engine.trainer import default_forward
from transferkit.errors import TransferkitError
from transferkit.extensions import ExtensionConfig, FitExtension, register_extension
from transferkit.model import TaskSpec, make_head
from transferkit.tasks import TASK_TYPES, parse_task
from transferkit.tasks.multitask import (
    WEIGHTINGS,
    MultiTaskObjective,
    collect,
    conformal_guaranteed,
    conformal_offset,
    conformal_rank,
    multitask_evaluate_fn,
    task_metrics,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transferkit.config import FitConfig
    from transferkit.data.base import DataSplits, LabeledData
    from transferkit.engine.context import RunContext
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy

logger = logging.getLogger(__name__)


def parse_floats(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise TransferkitError(f"invalid --{option} '{text}'", "give comma-separated numbers, e.g. 0.1,0.5,0.9") \
            from None


@dataclass
class TasksConfig(ExtensionConfig):
    task: list[str] | None = field(default=None, metadata={
        "help": "A prediction target as [COLUMN:]TYPE, repeatable (TYPE: " + ", ".join(TASK_TYPES) + "); "
        "e.g. --task count:classify --task size:regress. The first must classify the label."})
    quantiles: str = field(default="0.1,0.5,0.9", metadata={
        "help": "Quantile levels of quantile tasks (increasing, in (0, 1)); the outermost give the interval."})
    task_weights: str | None = field(default=None, metadata={
        "help": "Fixed loss weights, one per --task, comma-separated (default: all 1)."})
    loss_weighting: str = field(default="fixed", metadata={
        "help": "How task losses combine: fixed, uncertainty (Kendall et al. 2018, learned variances) or "
        "gradnorm (Chen et al. 2018)."})
    gradnorm_alpha: float = field(default=1.5, metadata={"help": "gradnorm: strength alpha of the rate balancing."})
    calibrate_intervals: bool = field(default=True, metadata={
        "help": "After training, widen or narrow each quantile task's interval by split-conformal calibration on "
        "the validation split so that it covers its nominal share (--no-calibrate-intervals: off)."})

    def parsed(self) -> list[tuple[str | None, str]]:
        return [parse_task(t) for t in self.task or []]

    def validate(self) -> None:
        tasks = self.parsed()
        names = [column or "label" for column, _ in tasks]
        if len(set(names)) != len(names):
            raise TransferkitError(f"--task names a column twice ({', '.join(names)})", "give each column once")
        quantiles = parse_floats(self.quantiles, "quantiles")
        if len(quantiles) < 2 or any(not 0 < q < 1 for q in quantiles) or quantiles != sorted(set(quantiles)):
            raise TransferkitError(f"invalid --quantiles '{self.quantiles}'",
                                   "give at least two increasing levels in (0, 1), e.g. 0.1,0.5,0.9")
        if self.loss_weighting not in WEIGHTINGS:
            raise TransferkitError(f"invalid --loss-weighting '{self.loss_weighting}'",
                                   f"choose one of {', '.join(WEIGHTINGS)}")
        if self.task_weights is not None:
            weights = parse_floats(self.task_weights, "task-weights")
            if len(weights) != len(tasks) or any(w < 0 for w in weights):
                raise TransferkitError(f"--task-weights has {len(weights)} values for {len(tasks)} tasks",
                                       "give one non-negative weight per --task")
            if self.loss_weighting != "fixed":
                raise TransferkitError("--task-weights only applies to --loss-weighting fixed",
                                       "drop --task-weights or use --loss-weighting fixed")
        if self.gradnorm_alpha < 0:
            raise TransferkitError(f"invalid --gradnorm-alpha {self.gradnorm_alpha}", "use a number >= 0")


def _column(data: LabeledData, column: str | None) -> np.ndarray:
    if column is None:
        return data.labels
    if column not in data.columns:
        available = ", ".join(sorted(data.columns)) or "none"
        raise TransferkitError(f"the data has no column '{column}' (columns: {available})",
                               "name an existing column in --task COLUMN:TYPE ('label', or no COLUMN, is the label)")
    return np.asarray(data.columns[column])


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)) or value == ""


def _class_name(value: Any) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def task_targets(data: LabeledData, column: str | None, kind: str,
                 class_names: list[str] | None = None) -> np.ndarray:
    """A task's targets from ``data``: class indices into ``class_names`` (-1: missing or unknown) for a classify
    task, float32 values (NaN: missing) otherwise; ``column=None`` is the dataset's own label."""
    if kind == "classify":
        if column is None:
            return np.asarray(data.labels, dtype=np.int64)
        lookup = {c: i for i, c in enumerate(class_names or [])}
        return np.asarray([-1 if _is_missing(v) else lookup.get(_class_name(v), -1)
                           for v in _column(data, column).tolist()], dtype=np.int64)
    try:
        values = np.asarray([np.nan if _is_missing(v) else float(v) for v in _column(data, column).tolist()],
                            dtype=np.float32)
    except (TypeError, ValueError):
        raise TransferkitError(f"column '{column}' is not numeric", f"use a number column for a {kind} task") \
            from None
    infinite = np.flatnonzero(np.isinf(values))
    if len(infinite):
        raise TransferkitError(f"column '{column}' has an infinite value ({data.ids[infinite[0]]})",
                               "replace it by a finite number, or leave the cell empty (a missing target)")
    return values


def build_tasks(splits: DataSplits, config: TasksConfig,
                label_smoothing: float = 0.0) -> tuple[list[TaskSpec], DataSplits]:
    """TaskSpecs from ``--task`` options, and the splits with each task's targets as a ``target:<name>`` column
    (new LabeledData: the given splits are left as they are)."""
    splits = replace(splits, **{name: replace(part, columns=dict(part.columns)) for name, part in
                                (("train", splits.train), ("val", splits.val), ("test", splits.test))
                                if part is not None})
    parts = [p for p in (splits.train, splits.val, splits.test) if p is not None]
    quantiles = parse_floats(config.quantiles, "quantiles")
    tasks = []
    for column, task_type in config.parsed():
        if column == "label" and all("label" not in p.columns for p in parts):
            column = None  # "label:classify" names the dataset's own label unless a column is called that
        kind, loss = TASK_TYPES[task_type]
        name = column or "label"
        options: dict[str, Any] = {"column": column, "type": task_type, "loss": loss}
        if kind == "classify":
            if column is None:
                class_names = list(splits.class_names)
            else:
                values = {v for p in parts for v in _column(p, column).tolist() if not _is_missing(v)}
                ordered = sorted(values, key=lambda v: (not isinstance(v, (int, float)), v))
                class_names = [_class_name(v) for v in ordered]
                for p in parts:
                    p.columns[f"target:{name}"] = task_targets(p, column, "classify", class_names)
            options["label_smoothing"] = label_smoothing if loss == "cross_entropy" else 0.0
            tasks.append(TaskSpec(name, "classify", class_names, len(class_names), options))
            continue
        if column is None:
            raise TransferkitError(f"--task {task_type} needs a numeric column",
                                   f"write it as --task COLUMN:{task_type}")
        for p in parts:
            p.columns[f"target:{name}"] = task_targets(p, column, kind)
        train_values = splits.train.columns[f"target:{name}"]
        finite = train_values[np.isfinite(train_values)]
        if len(finite) == 0:
            raise TransferkitError(f"column '{column}' has no values in the training split", "check the data")
        options["target_mean"] = float(finite.mean())
        options["target_std"] = float(finite.std()) or 1.0
        if kind == "quantile":
            options["quantiles"] = quantiles
        tasks.append(TaskSpec(name, kind, [], len(quantiles) if kind == "quantile" else 1, options))
    _check_first_task(tasks[0], splits, parts)
    return tasks, splits


def _check_first_task(task: TaskSpec, splits: DataSplits, parts: list[LabeledData]) -> None:
    """A classifying first task must classify the label (the run's standard evaluation scores it against the
    label); a regression / quantile first task is scored by the task metrics instead."""
    if task.kind != "classify":
        return
    same = task.kind == "classify" and (
        task.options["column"] is None
        or (task.class_names == list(splits.class_names)
            and all(np.array_equal(p.columns[f"target:{task.name}"], p.labels) for p in parts)))
    if not same:
        raise TransferkitError(
            f"the first --task ({task.options['column'] or 'label'}:{task.options['type']}) does not classify the "
            "dataset's label", "put the label's classification or a regression first, e.g. --task classify "
            "--task size:regress")


@register_extension
class TasksExtension(FitExtension):
    name = "tasks"
    config_class = TasksConfig
    config: TasksConfig

    def active(self) -> bool:
        return bool(self.config.task)

    def describe(self) -> str:
        return " ".join(f"--task {t}" for t in self.config.task or [])

    @classmethod
    def modes(cls) -> dict[str, dict[str, Any]]:
        """One ``--task`` per task type (a column named ``size``; a classification of the label gets a second,
        regression head so it is a multi-task run)."""
        return {f"task {t}": {"task": [t, "size:regress"] if kind == "classify" else
                              [t if kind == "causal_lm" else f"size:{t}"]}
                for t, (kind, _) in TASK_TYPES.items()}

    def supports(self, strategy: Strategy, task_kind: str) -> bool | str:
        """The tasks are the run's task kind: whether the strategy trains it is ``Strategy.supports``."""
        return True

    def configure(self, context: RunContext, model: TransferModel, fit: FitConfig) -> RunContext:
        tasks, splits = build_tasks(context.splits, self.config, context.label_smoothing)
        model.tasks = tasks
        heads = nn.ModuleDict({t.name: make_head(model.backbone.feature_dim, t, model.head_dropout) for t in tasks})
        place(heads, module_device(model.backbone))  # the model is already on --device; new heads join it there
        model.heads = heads
        weights = parse_floats(self.config.task_weights, "task-weights") if self.config.task_weights else None
        self.objective = MultiTaskObjective(tasks, self.config.loss_weighting, weights, self.config.gradnorm_alpha)
        described = ", ".join(f"{t.name} ({t.options['type']})" for t in tasks)
        context.notes.append(f"tasks: {described}; "
                             f"losses combined by {self.config.loss_weighting} weighting")
        return replace(context, splits=splits, task_objectives=[self.objective],
                       evaluate_fn=multitask_evaluate_fn(tasks, weights), monitor=("loss", "min"))

    def metrics(self, context: RunContext, model: TransferModel) -> dict[str, Any]:
        """Per-task test metrics. Quantile intervals are first calibrated on the validation split (this runs after
        training and before the model is saved, so the saved heads carry the correction)."""
        splits = context.splits
        split, data = splits.scoring_split()
        batch_size = max(32, context.train.batch_size)
        calibration = {}
        if self.config.calibrate_intervals and any(t.kind == "quantile" for t in model.tasks):
            calibration = calibrate_intervals(model, splits.val, data if split == "test" else None, batch_size)
        per_task = {name: {"split": split, **scores, **calibration.get(name, {})} for name, scores in
                    evaluate_tasks(model, data, batch_size=batch_size).items()}
        context.notes.extend(f"task '{name}': {c['calibration']['warning']}" for name, c in calibration.items()
                             if "warning" in c["calibration"])
        objective = getattr(self, "objective", None)
        weighting: dict[str, Any] = {"method": self.config.loss_weighting}
        if objective is not None:
            weighting["final_weights"] = dict(zip([t.name for t in model.tasks],
                                                  objective.current_weights().tolist()))
            if self.config.loss_weighting == "uncertainty":
                weighting["learned_log_variances"] = dict(zip([t.name for t in model.tasks],
                                                              objective.log_variances.detach().tolist()))
        first = per_task[model.tasks[0].name]
        top = {k: v for k, v in first.items() if k in ("accuracy", "mae", "rmse", "coverage")}
        return {**top, "tasks": per_task, "task_weighting": weighting}


def evaluate_tasks(model: TransferModel, data: LabeledData, batch_size: int = 64) -> dict[str, dict[str, Any]]:
    """Per task of ``model``: its type and :func:`task_metrics` on ``data``, whose columns hold the targets (a
    classify column's values are matched to the task's class names by their text)."""
    return _scored(model.tasks, _collect_on(model, data, batch_size))


def _scored(tasks: list[TaskSpec], collected: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Per task: its type and :func:`task_metrics` of its ``(predictions, targets)`` in ``collected``."""
    return {t.name: {"type": t.options.get("type", t.kind), **task_metrics(t, *collected[t.name])}
            for t in tasks if t.name in collected}


def calibrate_intervals(model: TransferModel, calibration_data: LabeledData | None, test_data: LabeledData | None,
                        batch_size: int = 64) -> dict[str, dict[str, Any]]:
    """Set each quantile head's ``interval_offset`` by :func:`conformal_offset` on ``calibration_data`` (recorded
    in the task's options, so saved models keep it); per task, the offset, the calibration size and, when
    ``test_data`` is given, the coverage the uncalibrated interval had on it."""
    quantile_tasks = [t for t in model.tasks if t.kind == "quantile"]
    if calibration_data is None or not len(calibration_data):
        logger.warning("no validation split: quantile intervals are not calibrated")
        return {}
    for t in quantile_tasks:  # measure the heads as trained
        t.options["interval_offset"] = model.heads[t.name].interval_offset = 0.0
    before = evaluate_tasks(model, test_data, batch_size) if test_data is not None else {}
    collected = _collect_on(model, calibration_data, batch_size)
    result = {}
    for t in quantile_tasks:
        predictions, targets = collected[t.name]
        nominal = float(t.options["quantiles"][-1] - t.options["quantiles"][0])
        offset = conformal_offset(predictions, targets, nominal)
        t.options["interval_offset"] = model.heads[t.name].interval_offset = offset
        n = int(np.isfinite(targets).sum())
        result[t.name] = {"calibration": {"method": "split conformal (CQR) on the validation split",
                                          "interval_offset": offset, "n": n,
                                          "coverage_guaranteed": conformal_guaranteed(n, nominal)}}
        if not conformal_guaranteed(n, nominal):
            result[t.name]["calibration"]["warning"] = (
                f"{n} validation items are too few for the {nominal:.0%} coverage guarantee (rank "
                f"{conformal_rank(n, nominal)} > {n}): the interval may cover less; use a larger validation split")
        if t.name in before:
            result[t.name]["calibration"]["coverage_uncalibrated"] = before[t.name]["coverage"]
            result[t.name]["calibration"]["mean_interval_width_uncalibrated"] = before[t.name]["mean_interval_width"]
    return result


def _collect_on(model: TransferModel, data: LabeledData, batch_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """:func:`collect` over ``data`` with each task's targets attached as ``target:<name>`` columns."""
    from dataclasses import replace

    from transferkit.data.loader import make_loader

    columns = dict(data.columns)
    for t in model.tasks:
        columns[f"target:{t.name}"] = task_targets(data, t.options.get("column"), t.kind, t.class_names)
    loader = make_loader(replace(data, columns=columns), model.backbone, batch_size=batch_size, train=False)
    model.eval()
    return collect(model, loader, model.tasks, default_forward)


# --- evaluation hook (``transferkit evaluate``; listed in transferkit.evaluation.hooks.HOOK_MODULES) -----------


def add_arguments(parser: Any) -> None:
    """No flags: a model with several tasks is always scored on each."""


def evaluate_hook(model: Any, data: LabeledData, report: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``tasks``: every task's metrics (accuracy / MAE / interval coverage), as in ``fit``'s metrics.json, plus
    ``<task>_<metric>`` scalars for the readable report; ``{}`` for a model with the label's head only."""
    module = getattr(model, "module", model)
    tasks = getattr(module, "tasks", [])
    if not scored_per_task(tasks, data):
        return {}
    return _with_flat(evaluate_tasks(module, data, batch_size=int(options.get("batch_size", 64))))


def scored_per_task(tasks: list[TaskSpec], data: LabeledData) -> bool:
    """Whether a model with ``tasks`` is scored on each (not only by the label's classification report); then
    ``data`` must have every task's column."""
    if len(tasks) < 2 and all(t.kind == "classify" and t.options.get("column") is None for t in tasks):
        return False
    missing = sorted({t.options["column"] for t in tasks
                      if t.options.get("column") is not None and t.options["column"] not in data.columns})
    if missing:
        raise TransferkitError(f"the evaluation data has no column(s) {', '.join(missing)} for the model's tasks",
                               "evaluate on data with every task's column")
    return True


def _with_flat(per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``tasks`` plus ``<task>_<metric>`` scalars for the readable report."""
    flat = {f"{name}_{key}": value for name, scores in per_task.items() for key, value in scores.items()
            if key in ("accuracy", "mae", "rmse", "coverage", "mean_interval_width")}
    return {"tasks": per_task, **flat}


def task_report_of_outputs(tasks: list[TaskSpec], outputs: dict[str, np.ndarray], data: LabeledData
                           ) -> dict[str, Any]:
    """:func:`evaluate_hook`'s entries from every task's outputs on ``data`` computed elsewhere (an ONNX export's
    graph outputs, which are the heads' outputs); ``{}`` for a model with the label's head only."""
    if not scored_per_task(tasks, data):
        return {}
    targets = {t.name: (outputs[t.name], task_targets(data, t.options.get("column"), t.kind, t.class_names))
               for t in tasks}
    return _with_flat(_scored(tasks, targets))


def first_task_report(model: TransferModel, data: LabeledData, batch_size: int = 64) -> dict[str, Any]:
    """The evaluation report of a model whose first task is not a classifier: ``n`` and the first task's
    metrics (``mae``, ``rmse`` / ``coverage``, ...) at the top level, every task under ``tasks``."""
    per_task = evaluate_tasks(model, data, batch_size)
    first = per_task[model.tasks[0].name]
    return {**{k: v for k, v in first.items() if k != "type"}, "task": first["type"], "tasks": per_task}


def predict_task_rows(model: TransferModel, data: LabeledData, batch_size: int = 64) -> list[dict[str, Any]]:
    """Per item: every task's prediction (class name, value, or ``{quantile: value}``)."""
    from transferkit.data.loader import make_loader

    loader = make_loader(data, model.backbone, batch_size=batch_size, train=False)
    outputs = predict_batches(model, (batch["inputs"] for batch in loader),
                              lambda inputs: tuple(model(inputs).outputs[t.name].float() for t in model.tasks))
    return task_rows(model.tasks, outputs or [])


def task_rows(tasks: list[TaskSpec], outputs: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    """Per item: every task's prediction from the heads' ``outputs`` (one array per task, in task order)."""
    rows: list[dict[str, Any]] = []
    for i in range(len(outputs[0]) if len(outputs) else 0):
        row = {}
        for t, values in zip(tasks, outputs):
            value = values[i]
            if t.kind == "classify":
                row[t.name] = t.class_names[int(value.argmax())]
            elif t.kind == "quantile":
                row[t.name] = {f"{q:g}": float(v) for q, v in zip(t.options["quantiles"], value.tolist())}
            else:
                row[t.name] = float(np.reshape(value, -1)[0])
        rows.append(row)
    return rows
