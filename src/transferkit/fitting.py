"""One ``fit`` run from checked options to a published run folder.

    check --out -> load data -> build backbone and model -> run context -> train -> score -> write -> publish

:func:`fit_run` reads top to bottom as those steps; each is a small function here. ``transferkit.api.fit``
(and so ``transferkit fit``) resolves the options and calls it. The run folder's lifecycle (staging, resume,
the --overwrite rule, atomic publish) is :class:`transferkit.rundir.OutputFolder`'s.
"""

from __future__ import annotations

import logging
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from transferkit.config import FitConfig
from transferkit.errors import TransferkitError, spoken
from transferkit.rundir import DATA_SECTION, OutputFolder, data_section, write_json, write_jsonl

if TYPE_CHECKING:
    from transferkit.api import LoadedModel
    from transferkit.backbones import Backbone
    from transferkit.data.base import DataSplits
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainConfig, TrainResult
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """A finished run folder: ``model/``, ``metrics.json``, ``history.jsonl``."""

    path: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    def load(self) -> LoadedModel:
        from transferkit.api import load

        return load(self.path)

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])


def default_out(fit: FitConfig) -> Path:
    """``runs/<data name>-<strategy>`` when no ``--out`` is given."""
    data = Path(fit.data)
    name = data.resolve().name if data.is_dir() else data.name  # `--data .` is the working folder's name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name or str(fit.data)).strip("-.") or "run"
    return Path("runs") / f"{stem}-{fit.strategy}"


def peak_memory_mb(device: str | torch.device = "auto") -> float:
    """Peak memory of the run: the CUDA allocator's peak when it ran on a CUDA device, else the process's peak
    resident size (``--device cpu`` on a GPU machine measures the CPU, and starts no CUDA context)."""
    from transferkit.engine.placement import resolve_device

    target = resolve_device(device)
    if target.type == "cuda":
        return torch.cuda.max_memory_allocated(target) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_options(fit: FitConfig, train: TrainConfig, strategy: Strategy, extensions: list) -> dict[str, Any]:
    """Every setting that reproduces the run (``run_config.json``, ``metrics.json["config"]``)."""
    return {"fit": asdict(fit), "train": train.to_dict(), "strategy": strategy.to_dict(),
            "extensions": {e.name: asdict(e.config) for e in extensions}}


# --- the run ----------------------------------------------------------------------------------------------------


def fit_run(fit: FitConfig, train: TrainConfig, strategy: Strategy, extensions: list) -> Run:
    """Train ``strategy`` as configured and write the run folder (resolved options: ``api.resolve_options``)."""
    from accelerate import PartialState

    from transferkit.backbones import check_backbone_name, default_backbone
    from transferkit.engine.placement import accelerator_kwargs
    from transferkit.tasks import causal_lm_requested

    options = run_options(fit, train, strategy, extensions)
    state = PartialState(**accelerator_kwargs(train.device))
    folder = OutputFolder(fit.out or default_out(fit), "run", overwrite=fit.overwrite, resume=fit.resume,
                          options=options, data=fit.data)
    folder.check()  # a bad --out is refused before any work; nothing is written until every input is checked
    if fit.backbone:
        check_backbone_name(fit.backbone)
    tasks_extension = next((e for e in extensions if e.name == "tasks"), None)
    if tasks_extension is not None and causal_lm_requested(tasks_extension.config.task):
        return fit_causal_lm_run(fit, train, strategy, tasks_extension.config.parsed()[0][0], folder, options,
                                 state)
    started = time.perf_counter()
    splits = load_splits(fit, train, extensions, state.num_processes)
    data_print = splits.fingerprint()  # of the data as read (api.data_fingerprint): before any extension's change
    backbone_name = fit.backbone or default_backbone(splits.modality)
    backbone = build_backbone(backbone_name, fit, train, splits)
    model = build_model(fit, train, backbone, splits, strategy)
    context = build_context(fit, train, splits, folder)
    for ext in extensions:
        context = ext.configure(context, model, fit)
    splits = context.splits  # an extension may return transformed splits (framing, task targets)
    logger.info("training %s on %s (%s) with %s: %d train / %d val / %d test items, %d classes",
                backbone_name, fit.data, splits.modality, strategy.name, len(splits.train), len(splits.val),
                len(splits.test) if splits.test else 0, len(splits.class_names))
    warn_unused_train_options(strategy, train)
    folder.options = {**(folder.options or {}), DATA_SECTION: {"fingerprint": data_print}}  # for --resume
    folder.begin()  # every input is checked: only now does anything get written
    with folder:  # a failure removes the staging folder unless it holds a checkpoint to resume from
        if splits.protocol == "cv":  # settings chosen in the folds; train_model is then the refit on every label
            from transferkit.evaluation.crossfit import cross_validate_fit

            cross_validate_fit(model, strategy, context, extensions, fit)
        result = train_model(model, strategy, extensions, context)
        train_seconds = folder.seconds_before + time.perf_counter() - started  # interrupted attempts included
        if not state.is_main_process:
            folder.publish()  # waits for the main process
            return Run(folder.out, {}, result.history)
        eval_split, report = score_model(model, strategy, splits, context, fit, train)
        metrics = run_metrics(model, backbone_name, strategy, extensions, context, splits, result, report,
                              eval_split, train_seconds, options)
        write_run(folder, model, strategy, fit, metrics, result.history, backbone_name)
    for ext in extensions:  # e.g. --track: log the published run
        ext.published(folder.out, metrics, result.history)
    logger.info("%s %s; run written to %s", eval_split, ", ".join(f"{k} {metrics[k]:.4f}" for k in
                ("accuracy", "macro_f1", "mae", "coverage") if isinstance(metrics.get(k), float)), folder.out)
    return Run(folder.out, metrics, result.history)


def warn_unused_train_options(strategy: Strategy, train: TrainConfig) -> None:
    """One warning naming the training options set away from their defaults that ``strategy`` never reads. A
    warning, not a refusal like another strategy's options: ``--epochs`` / ``--lr`` are shared settings that a
    config file passes to every strategy. Given once every input is checked, so a refused command stays one line."""
    defaults = type(train)()
    unused, why = strategy.unused_train_options()
    flags = ["--" + name.replace("_", "-") for name in unused if getattr(train, name) != getattr(defaults, name)]
    if flags:
        logger.warning("%s %s not used by --strategy %s: %s", spoken(flags), "is" if len(flags) == 1 else "are",
                       strategy.name, why)


def load_splits(fit: FitConfig, train: TrainConfig, extensions: list = (), processes: int = 1) -> DataSplits:
    """The splits of ``--data`` under ``--protocol`` (seeded), with their notes logged: train / val / test for
    holdout; under cv every labelled item in train (val empty, test only when the data gives one)."""
    splits = split_data(fit, train, extensions, processes)
    for note in splits.notes:
        logger.info("data: %s", note)
    return splits


def split_data(fit: FitConfig, train: TrainConfig, extensions: list = (), processes: int = 1) -> DataSplits:
    """:func:`load_splits` without logging its notes."""
    from transferkit.evaluation.crossfit import plan_protocol

    return plan_protocol(fit, train.seed, extensions=extensions, processes=processes)


def build_backbone(name: str, fit: FitConfig, train: TrainConfig, splits: DataSplits) -> Backbone:
    """Backbone ``name`` with the options that apply to the data's modality (seeded)."""
    from transferkit.backbones import check_backbone_modality, create_backbone
    from transferkit.engine.trainer import seed_everything

    check_backbone_modality(name, splits.modality)
    misplaced = [flag for flag, value, modality in (("--image-size", fit.image_size, "image"),
                                                     ("--feature-stage", fit.feature_stage, "image"),
                                                     ("--pool-stages", fit.pool_stages, "image"),
                                                     ("--pool-grid", fit.pool_grid, "image"),
                                                     ("--max-length", fit.max_length, "text"))
                 if value is not None and splits.modality != modality]
    if misplaced:
        raise TransferkitError(f"{', '.join(misplaced)} does not apply to {splits.modality} data",
                               "remove it from the command")
    options: dict[str, Any] = {}
    if splits.modality == "image":
        options["augment"] = fit.augment
        if fit.image_size:
            options["image_size"] = fit.image_size
        if fit.feature_stage is not None:
            options["feature_stage"] = fit.feature_stage
        if fit.pool_stages:
            options["pool_stages"] = fit.pool_stages
        if fit.pool_grid is not None:
            options["pool_grid"] = fit.pool_grid
    elif fit.max_length:
        options["max_length"] = fit.max_length
    seed_everything(train.seed)
    backbone = create_backbone(name, pretrained=fit.pretrained, **options)
    check_backbone_modality(name, splits.modality, backbone.modality)
    return backbone


def build_model(fit: FitConfig, train: TrainConfig, backbone: Backbone, splits: DataSplits,
                strategy: Strategy) -> TransferModel:
    """Backbone + a (seeded) classification head over the data's classes, prepared by the strategy and placed on
    ``--device`` (features, extensions' set-up and evaluation run where training does)."""
    from transferkit.engine.placement import place
    from transferkit.engine.trainer import seed_everything
    from transferkit.model import TaskSpec, TransferModel

    seed_everything(train.seed)
    model = TransferModel(backbone, [TaskSpec("label", "classify", list(splits.class_names))],
                          head_dropout=fit.head_dropout)
    strategy.prepare(model)
    place(model, train.device)
    return model


def build_context(fit: FitConfig, train: TrainConfig, splits: DataSplits, folder: OutputFolder) -> RunContext:
    """What the strategy trains with; the engine checkpoints into the staging folder."""
    from transferkit.engine.context import RunContext
    from transferkit.engine.features import default_cache_dir

    return RunContext(splits=splits, train=train, label_smoothing=fit.label_smoothing,
                      checkpoint_dir=folder.stage / "checkpoint", run_dir=folder.stage,
                      cache_dir=Path(fit.cache_dir) if fit.cache_dir else default_cache_dir(),
                      progress=fit.progress, notes=list(splits.notes))


def train_model(model: TransferModel, strategy: Strategy, extensions: list, context: RunContext) -> TrainResult:
    """The first extension that takes over training (``FitExtension.train``), else the strategy."""
    result = next((r for ext in extensions if (r := ext.train(context, model, strategy)) is not None), None)
    return result if result is not None else strategy.train(model, context)


def score_model(model: TransferModel, strategy: Strategy, splits: DataSplits, context: RunContext, fit: FitConfig,
                train: TrainConfig) -> tuple[str, dict[str, Any]]:
    """(split name, report) on the test split, or the validation split when there is no test split."""
    from transferkit.inference import evaluate_features, evaluate_model

    if context.scored_out_of_fold():  # on every labelled item
        from transferkit.evaluation.crossfit import cv_report

        return "cv", cv_report(context.cv, splits.train)
    eval_split, data = splits.scoring_split()
    batch_size = max(32, train.batch_size)
    if model.tasks[0].kind != "classify":  # regression first (--task size:regress ...): scored by the task metrics
        from transferkit.tasks.extension import first_task_report

        return eval_split, first_task_report(model, data, batch_size=batch_size)
    if strategy.frozen_backbone:  # the backbone is unchanged: score from (cached) features, not raw inputs
        return eval_split, evaluate_features(model, context.features(model.backbone, data), data)
    return eval_split, evaluate_model(model, data, batch_size=batch_size, progress=fit.progress)


def run_metrics(model: TransferModel, backbone_name: str, strategy: Strategy, extensions: list, context: RunContext, splits: DataSplits,
                result: TrainResult, report: dict[str, Any], eval_split: str, train_seconds: float,
                options: dict[str, Any]) -> dict[str, Any]:
    """The content of ``metrics.json``."""
    from transferkit.engine.placement import module_device

    trainable, total = model.count_parameters()
    metrics: dict[str, Any] = {
        **{k: report[k] for k in ("accuracy", "macro_f1") if k in report},
        **({"top5_accuracy": report["top5_accuracy"]} if "top5_accuracy" in report else {}),
        "accuracy_split": eval_split if eval_split in ("test", "cv") or strategy.frozen_backbone
        else "val (also used for early stopping: no test split)",
        "protocol": splits.protocol,
        "n_eval": report["n"],
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": round(train_seconds, 3),
        "peak_memory_mb": round(peak_memory_mb(module_device(model)), 1),
        "dataset_sizes": splits.sizes(),
        "num_classes": len(splits.class_names),
        "class_names": list(splits.class_names),
        "backbone": backbone_name,
        "strategy": strategy.name,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "notes": context.notes,
        "evaluation": report,
        "config": options,
    }
    if context.cv is not None:
        metrics.update(cv=context.cv.summary(), n_train_final=len(splits.train))
    if hasattr(strategy, "metrics"):  # strategy-specific counts (e.g. FISH's mask size)
        metrics.update(strategy.metrics(model))
    for ext in extensions:
        extra = ext.metrics(context, model)
        caveats = metrics.get("caveats", []) + extra.pop("caveats", [])
        metrics.update(extra, **({"caveats": caveats} if caveats else {}))
    return metrics


def write_run(folder: OutputFolder, model: TransferModel, strategy: Strategy, fit: FitConfig,
              metrics: dict[str, Any], history: list[dict[str, Any]], backbone_name: str) -> None:
    """``model/``, ``metrics.json``, ``history.jsonl`` and the model card into the stage, then publish it."""
    from transferkit.evaluation.model_card import fit_command, write_model_card
    from transferkit.model import save_model

    save_model(model, folder.stage / "model", strategy.to_dict(), extra={"data": fit.data})
    write_json(folder.stage / "metrics.json", metrics)
    write_jsonl(folder.stage / "history.jsonl", history)
    write_model_card(folder.stage, metrics, command=fit_command(metrics["config"], backbone_name),
                     name=folder.out.name)
    folder.publish()


# --- --task causal-lm -------------------------------------------------------------------------------------------


def fit_causal_lm_run(fit: FitConfig, train: TrainConfig, strategy: Strategy, column: str | None,
                      folder: OutputFolder, options: dict[str, Any], state: Any) -> Run:
    """``--task causal-lm``: next-token training of a causal LM on a text file (see ``tasks.causal_lm``)."""
    import json

    from transferkit.engine.features import default_cache_dir
    from transferkit.evaluation.model_card import fit_command, write_model_card
    from transferkit.tasks.causal_lm import CausalLMOptions, check_lm_strategy, read_passages, run_causal_lm

    check_lm_strategy(strategy)
    lm_options = CausalLMOptions(text_column=column or fit.text_column, heldout_fraction=fit.val_fraction,
                                 max_length=fit.max_length or 128)
    passages = read_passages(fit.data, lm_options.text_column, lm_options.words_per_passage)  # checked first
    folder.options = {**(folder.options or {}), DATA_SECTION: data_section(fit.data, *passages)}  # for --resume
    folder.begin()
    with folder:
        metrics = run_causal_lm(fit.data, fit.backbone or "smollm2-135m", strategy, train, folder.stage, lm_options,
                                fit.pretrained, progress=fit.progress,
                                cache_dir=Path(fit.cache_dir) if fit.cache_dir else default_cache_dir(),
                                passages=passages)
        if not state.is_main_process:
            folder.publish()
            return Run(folder.out, {})
        metrics.update({"peak_memory_mb": round(peak_memory_mb(train.device), 1), "config": options})
        write_json(folder.stage / "metrics.json", metrics)
        history = [json.loads(line) for line in (folder.stage / "history.jsonl").read_text().splitlines()
                   if line.strip()]
        write_model_card(folder.stage, metrics, command=fit_command(options, fit.backbone or "smollm2-135m"),
                         name=folder.out.name)
        folder.publish()
    logger.info("held-out perplexity %.2f -> %.2f; run written to %s", metrics["perplexity_before"],
                metrics["perplexity_after"], folder.out)
    return Run(folder.out, metrics, history)
