"""The Python API, mirroring the CLI: ``fit``, ``load``, ``evaluate``, ``predict``.

    run = transferkit.fit("fashion-mnist", strategy="finetune", limit_per_class=20, out="runs/fm")
    model = transferkit.load("runs/fm")
    model.predict(["shoe.png"])
"""

from __future__ import annotations

import json
import logging
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.config import FitConfig, build, load_yaml_config
from transferkit.errors import TransferkitError
from transferkit.rundir import OutputFolder, write_json, write_jsonl

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


# --- runs ------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A finished run folder: ``model/``, ``metrics.json``, ``history.jsonl``."""

    path: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    def load(self) -> LoadedModel:
        return load(self.path)

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])


def _default_out(fit: FitConfig) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(fit.data).name or fit.data).strip("-") or "run"
    return Path("runs") / f"{stem}-{fit.strategy}"


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def resolve_options(options: dict[str, Any], config_file: str | Path | None = None):
    """Split a flat option dict (YAML file < explicit options) into the run's config objects."""
    from transferkit.config import option_fields
    from transferkit.engine.trainer import TrainConfig
    from transferkit.extensions import list_extensions
    from transferkit.strategies import list_strategies, strategy_class

    merged: dict[str, Any] = load_yaml_config(config_file) if config_file else {}
    merged.update({k.replace("-", "_"): v for k, v in options.items() if v is not None})
    fit = build(FitConfig, merged)
    fit.validate()
    train = build(TrainConfig, merged)
    train.validate()
    extensions = []
    for ext_cls in list_extensions().values():
        ext = ext_cls(build(ext_cls.config_class, merged))
        ext.config.validate()
        extensions.append(ext)
    cls = strategy_class(fit.strategy)
    strategy = cls(build(cls.config_class, merged))
    if merged:
        other = {f.name for c in list_strategies().values() for f in option_fields(c.config_class)}
        foreign = sorted(k for k in merged if k in other)
        if foreign:
            raise TransferkitError(
                f"option(s) {', '.join('--' + k.replace('_', '-') for k in foreign)} do not apply to strategy "
                f"'{fit.strategy}'", "remove them or choose the strategy they belong to")
        raise TransferkitError(f"unknown option(s): {', '.join(sorted(merged))}", "see `transferkit fit --help`")
    active = [e for e in extensions if e.active()]
    for ext in active:
        ext.check(fit, strategy)
    return fit, train, strategy, active


def fit(data: str | None = None, *, config: str | Path | None = None, **options: Any) -> Run:
    """Train a model on ``data`` and write a run folder; see ``transferkit fit --help`` for every option."""
    from accelerate import PartialState

    from transferkit.backbones import create_backbone, default_backbone
    from transferkit.data import load_data
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import seed_everything
    from transferkit.model import TaskSpec, TransferModel

    if data is not None:
        options["data"] = data
    fit_cfg, train_cfg, strategy, extensions = resolve_options(options, config)
    out = Path(fit_cfg.out) if fit_cfg.out else _default_out(fit_cfg)
    all_options = {"fit": asdict(fit_cfg), "train": train_cfg.to_dict(), "strategy": strategy.to_dict(),
                   "extensions": {e.name: asdict(e.config) for e in extensions}}

    state = PartialState(cpu=train_cfg.device == "cpu" or not torch.cuda.is_available())
    folder = OutputFolder(out, "run", overwrite=fit_cfg.overwrite, resume=fit_cfg.resume, options=all_options)
    folder.check()  # a bad --out is refused before any work; nothing is written until every input is checked
    from transferkit.backbones import backbone_modality, check_backbone_name
    from transferkit.tasks import causal_lm_requested

    if fit_cfg.backbone:
        check_backbone_name(fit_cfg.backbone)
    tasks_extension = next((e for e in extensions if e.name == "tasks"), None)
    if tasks_extension is not None and causal_lm_requested(tasks_extension.config.task):
        return _fit_causal_lm(fit_cfg, train_cfg, strategy, tasks_extension.config.parsed()[0][0], folder,
                              all_options, state)
    started = time.perf_counter()
    splits = load_data(fit_cfg.data, text_column=fit_cfg.text_column, label_column=fit_cfg.label_column,
                       limit_per_class=fit_cfg.limit_per_class, seed=train_cfg.seed,
                       val_fraction=fit_cfg.val_fraction, test_fraction=fit_cfg.test_fraction,
                       test_limit=fit_cfg.test_limit)
    for note in splits.notes:
        logger.info("data: %s", note)
    backbone_name = fit_cfg.backbone or default_backbone(splits.modality)
    modality = backbone_modality(backbone_name)
    if modality != splits.modality:
        raise TransferkitError(f"backbone '{backbone_name}' takes {modality} input but the data is "
                               f"{splits.modality}", f"choose a {splits.modality} backbone (`transferkit backbones`)")
    misplaced = [flag for flag, value, modality in (("--image-size", fit_cfg.image_size, "image"),
                                                     ("--feature-stage", fit_cfg.feature_stage, "image"),
                                                     ("--max-length", fit_cfg.max_length, "text"))
                 if value is not None and splits.modality != modality]
    if misplaced:
        raise TransferkitError(f"{', '.join(misplaced)} does not apply to {splits.modality} data",
                               "remove it from the command")
    backbone_options: dict[str, Any] = {}
    if splits.modality == "image":
        backbone_options["augment"] = fit_cfg.augment
        if fit_cfg.image_size:
            backbone_options["image_size"] = fit_cfg.image_size
        if fit_cfg.feature_stage is not None:
            backbone_options["feature_stage"] = fit_cfg.feature_stage
    elif fit_cfg.max_length:
        backbone_options["max_length"] = fit_cfg.max_length
    seed_everything(train_cfg.seed)
    backbone = create_backbone(backbone_name, pretrained=fit_cfg.pretrained, **backbone_options)
    if backbone.modality != splits.modality:
        raise TransferkitError(f"backbone '{backbone_name}' takes {backbone.modality} input but the data is "
                               f"{splits.modality}", f"choose a {splits.modality} backbone (`transferkit backbones`)")
    seed_everything(train_cfg.seed)
    model = TransferModel(backbone, [TaskSpec("label", "classify", list(splits.class_names))],
                          head_dropout=fit_cfg.head_dropout)
    strategy.prepare(model)
    cache_dir = Path(fit_cfg.cache_dir) if fit_cfg.cache_dir else None
    if cache_dir is None:
        from transferkit.engine.features import default_cache_dir

        cache_dir = default_cache_dir()
    context = RunContext(splits=splits, train=train_cfg, label_smoothing=fit_cfg.label_smoothing,
                         checkpoint_dir=folder.stage / "checkpoint", run_dir=folder.stage, cache_dir=cache_dir,
                         progress=fit_cfg.progress,
                         notes=list(splits.notes))
    for ext in extensions:
        ext.configure(context, model, fit_cfg)
    logger.info("training %s on %s (%s) with %s: %d train / %d val / %d test items, %d classes",
                backbone_name, fit_cfg.data, splits.modality, strategy.name, len(splits.train), len(splits.val),
                len(splits.test) if splits.test else 0, len(splits.class_names))
    folder.begin()  # every input is checked: only now does anything get written
    with folder:  # a failure removes the staging folder unless it holds a checkpoint to resume from
        return _train_and_write(folder, fit_cfg, train_cfg, strategy, extensions, splits, model, context,
                                backbone_name, all_options, started, state)


def _train_and_write(folder: OutputFolder, fit_cfg: FitConfig, train_cfg, strategy, extensions, splits, model,
                     context, backbone_name: str, all_options: dict[str, Any], started: float, state) -> Run:
    from transferkit.evaluation.model_card import fit_command, write_model_card
    from transferkit.model import save_model

    out, stage = folder.out, folder.stage
    result = next((r for ext in extensions if (r := ext.train(context, model, strategy)) is not None), None)
    if result is None:  # no extension took over training (FitExtension.train)
        result = strategy.train(model, context)
    train_seconds = time.perf_counter() - started

    if not state.is_main_process:
        folder.publish()  # waits for the main process
        return Run(out, {}, result.history)

    eval_split, eval_data = ("test", splits.test) if splits.test is not None and len(splits.test) else \
        ("val", splits.val)
    if model.tasks[0].kind != "classify":  # regression first (--task size:regress ...): scored by the task metrics
        from transferkit.tasks.extension import first_task_report

        report = first_task_report(model, eval_data, batch_size=max(32, train_cfg.batch_size))
    elif strategy.frozen_backbone:  # the backbone is unchanged: score from (cached) features, not raw inputs
        report = evaluate_features(model, context.features(model.backbone, eval_data), eval_data)
    else:
        report = evaluate_model(model, eval_data, batch_size=max(32, train_cfg.batch_size), progress=fit_cfg.progress)
    trainable, total = model.count_parameters()
    metrics: dict[str, Any] = {
        **{k: report[k] for k in ("accuracy", "macro_f1") if k in report},
        **({"top5_accuracy": report["top5_accuracy"]} if "top5_accuracy" in report else {}),
        "accuracy_split": eval_split if eval_split == "test" or strategy.frozen_backbone
        else "val (also used for early stopping: no test split)",
        "n_eval": report["n"],
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": round(train_seconds, 3),
        "peak_memory_mb": round(_peak_memory_mb(), 1),
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
        "config": all_options,
    }
    if hasattr(strategy, "metrics"):  # strategy-specific counts (e.g. FISH's mask size)
        metrics.update(strategy.metrics(model))
    for ext in extensions:
        metrics.update(ext.metrics(context, model))
    save_model(model, stage / "model", strategy.to_dict(), extra={"data": fit_cfg.data})
    write_json(stage / "metrics.json", metrics)
    write_jsonl(stage / "history.jsonl", result.history)
    write_model_card(stage, metrics, command=fit_command(all_options, backbone_name), name=out.name)
    folder.publish()
    for ext in extensions:  # e.g. --track: log the published run
        ext.published(out, metrics, result.history)
    logger.info("%s %s; run written to %s", eval_split, ", ".join(f"{k} {metrics[k]:.4f}" for k in
                ("accuracy", "macro_f1", "mae", "coverage") if isinstance(metrics.get(k), float)), out)
    return Run(out, metrics, result.history)


def _fit_causal_lm(fit_cfg: FitConfig, train_cfg, strategy, column: str | None, folder: OutputFolder,
                   all_options: dict[str, Any], state) -> Run:
    """``--task causal-lm``: next-token training of a causal LM on a text file (see ``tasks.causal_lm``)."""
    from transferkit.engine.features import default_cache_dir
    from transferkit.evaluation.model_card import fit_command, write_model_card
    from transferkit.tasks.causal_lm import CausalLMOptions, check_lm_strategy, read_passages, run_causal_lm

    check_lm_strategy(strategy)
    lm_options = CausalLMOptions(text_column=column or fit_cfg.text_column, heldout_fraction=fit_cfg.val_fraction,
                                 max_length=fit_cfg.max_length or 128)
    # read (and checked) before anything is written
    passages = read_passages(fit_cfg.data, lm_options.text_column, lm_options.words_per_passage)
    out, stage = folder.out, folder.stage
    folder.begin()
    with folder:
        metrics = run_causal_lm(fit_cfg.data, fit_cfg.backbone or "smollm2-135m", strategy, train_cfg, stage,
                                lm_options, fit_cfg.pretrained, progress=fit_cfg.progress,
                                cache_dir=Path(fit_cfg.cache_dir) if fit_cfg.cache_dir else default_cache_dir(),
                                passages=passages)
        if not state.is_main_process:
            folder.publish()
            return Run(out, {})
        metrics.update({"peak_memory_mb": round(_peak_memory_mb(), 1), "config": all_options})
        write_json(stage / "metrics.json", metrics)
        history = [json.loads(line) for line in (stage / "history.jsonl").read_text().splitlines() if line.strip()]
        write_model_card(stage, metrics, command=fit_command(all_options, fit_cfg.backbone or "smollm2-135m"),
                         name=out.name)
        folder.publish()
    logger.info("held-out perplexity %.2f -> %.2f; run written to %s", metrics["perplexity_before"],
                metrics["perplexity_after"], out)
    return Run(out, metrics, history)


# --- prediction and evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def predict_proba_model(model, data, batch_size: int = 64, progress: bool = False,
                        temperature: float = 1.0) -> np.ndarray:
    """Class probabilities ``softmax(logits / temperature)`` of the first task for every item of a LabeledData."""
    from transferkit.backbones import move_to
    from transferkit.data.loader import make_loader
    from transferkit.progress import progress as progress_bar

    model.eval()
    device = next(model.parameters()).device
    loader = make_loader(data, model.backbone, batch_size=batch_size, train=False)
    chunks = []
    for batch in progress_bar(loader, "predicting", enabled=progress):
        logits = model(move_to(batch["inputs"], device)).logits
        chunks.append(torch.softmax(logits.float() / temperature, dim=-1).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, len(model.class_names)))


@torch.no_grad()
def evaluate_features(model, features: np.ndarray, data) -> dict[str, Any]:
    """The report of a model whose backbone is frozen, computed from that backbone's features of ``data``."""
    from transferkit.evaluation.metrics import classification_report

    model.eval()
    device = next(model.parameters()).device
    logits = model.forward_head(torch.as_tensor(features, dtype=torch.float32, device=device)).logits
    probabilities = torch.softmax(logits.float(), dim=-1).numpy()
    keep = data.labels >= 0
    return classification_report(data.labels[keep], probabilities[keep], model.class_names)


def evaluate_model(model, data, batch_size: int = 64, progress: bool = False) -> dict[str, Any]:
    from transferkit.evaluation.metrics import classification_report

    probabilities = predict_proba_model(model, data, batch_size, progress)
    keep = data.labels >= 0
    return classification_report(data.labels[keep], probabilities[keep], model.class_names)


class LoadedModel:
    """A trained model restored from a run folder, with a scikit-learn-like interface."""

    def __init__(self, module, config: dict[str, Any], path: Path) -> None:
        from transferkit.evaluation.calibration import read_temperature

        self.module = module
        self.config = config
        self.path = path
        #: softmax temperature fitted by ``fit --temperature-scale`` (1.0 without): applied by predict_proba
        self.temperature = read_temperature(path) or 1.0

    @property
    def classes_(self) -> list[str]:
        return list(self.module.class_names)

    @property
    def modality(self) -> str:
        return self.module.backbone.modality

    @property
    def tasks(self) -> list:
        return list(self.module.tasks)

    @property
    def is_language_model(self) -> bool:
        """A ``--task causal-lm`` run: it scores perplexity and generates text instead of predicting classes."""
        return self.config.get("task") == "causal-lm"

    def _as_data(self, items: Any):
        from transferkit.data.base import LabeledData

        if isinstance(items, (str, Path)) or not isinstance(items, (list, tuple)):
            items = [items]
        raw, ids = [], []
        for i, item in enumerate(items):
            if self.modality == "image":
                raw.append(_open_image(item))
                ids.append(str(item) if isinstance(item, (str, Path)) else f"item[{i}]")
            else:
                raw.append(str(item))
                ids.append(f"item[{i}]")
        return LabeledData(raw, np.full(len(raw), -1), self.classes_, self.modality, ids, name="inputs")

    def refuse_language_model(self) -> None:
        if self.is_language_model:
            raise TransferkitError(f"'{self.path}' is a language model: it has no classes to predict",
                                   "use `transferkit generate --model RUN \"prompt\"` or evaluate its perplexity")

    def predict_proba(self, items: Any, batch_size: int = 64) -> np.ndarray:
        self.refuse_language_model()
        return predict_proba_model(self.module, self._as_data(items), batch_size, temperature=self.temperature)

    def predict(self, items: Any, batch_size: int = 64) -> list[str]:
        probabilities = self.predict_proba(items, batch_size)
        return [self.classes_[i] for i in probabilities.argmax(axis=1)]

    def evaluate(self, data: str, **options: Any) -> dict[str, Any]:
        return evaluate(self, data, **options)


def _open_image(item: Any):
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return item
    path = Path(item)
    if not path.is_file():
        raise TransferkitError(f"image '{path}' does not exist", "check the path")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise TransferkitError(f"cannot read image '{path}' ({exc.__class__.__name__})",
                               "remove or replace the file") from None


def load(path: str | Path) -> LoadedModel:
    """Restore a model from a run folder (or its ``model/`` subfolder)."""
    from transferkit.model import load_model

    path = Path(path)
    if not path.exists():
        raise TransferkitError(f"model folder '{path}' does not exist", "pass the --out folder of a finished fit")
    from transferkit.export.onnx import OnnxModel, is_onnx_export

    if is_onnx_export(path):  # `export --format onnx`: runs on onnxruntime
        return OnnxModel(path)  # type: ignore[return-value]
    module, config = load_model(path)
    return LoadedModel(module, config, path)


def evaluate(model: str | Path | LoadedModel, data: str, *, text_column: str | None = None,
             label_column: str | None = None, batch_size: int = 64, progress: bool = True,
             **options: Any) -> dict[str, Any]:
    """Accuracy, macro-F1, top-5, confusion matrix and per-class scores of ``model`` on labelled ``data``.

    ``options`` go to the evaluation hooks (see ``transferkit.evaluation.hooks``), e.g. ``attack="fgsm"``.
    """
    from transferkit.data.evaluation import load_for_evaluation
    from transferkit.evaluation.hooks import run_evaluation_hooks

    loaded = load(model) if isinstance(model, (str, Path)) else model  # a LoadedModel or an OnnxModel
    if loaded.is_language_model:
        from transferkit.tasks.causal_lm import evaluate_perplexity

        return evaluate_perplexity(loaded.module, data, text_column, batch_size)
    eval_data = load_for_evaluation(data, loaded.classes_, text_column=text_column, label_column=label_column)
    if eval_data.modality != loaded.modality:
        raise TransferkitError(f"the model takes {loaded.modality} input but '{data}' is {eval_data.modality} data",
                               "evaluate on data of the kind the model was trained on")
    if not isinstance(loaded, LoadedModel):  # an ONNX export: onnxruntime probabilities, the plain report
        from transferkit.evaluation.metrics import classification_report

        keep = eval_data.labels >= 0
        probabilities = loaded.predict_proba([eval_data.items[i] for i in np.flatnonzero(keep)], batch_size)
        return classification_report(eval_data.labels[keep], probabilities, loaded.classes_)
    if loaded.module.tasks[0].kind != "classify":  # regression first: the task metrics are the report
        from transferkit.tasks.extension import first_task_report

        return first_task_report(loaded.module, eval_data, batch_size)  # the hooks measure classifiers
    report = evaluate_model(loaded.module, eval_data, batch_size=batch_size, progress=progress)
    report.update(run_evaluation_hooks(loaded, eval_data, report, options))
    return report


def expand_inputs(inputs: list[str], modality: str) -> list[str]:
    """Image paths, with folders expanded to the images below them (sorted)."""
    if modality != "image":
        return inputs
    expanded: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise TransferkitError(f"folder '{path}' holds no images", "pass image files or a folder of images")
            expanded.extend(str(p) for p in files)
        else:
            expanded.append(item)
    return expanded


def predict(model: str | Path | LoadedModel, inputs: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
    """One row per input: ``{"input", "prediction", "probabilities": {class: p}}``."""
    loaded = load(model) if isinstance(model, (str, Path)) else model  # a LoadedModel or an OnnxModel
    loaded.refuse_language_model()
    items = expand_inputs(list(inputs), loaded.modality)
    return prediction_rows(loaded, items, items, batch_size)


def prediction_rows(loaded: LoadedModel, items: list[Any], names: list[Any],
                    batch_size: int = 64) -> list[dict[str, Any]]:
    """``predict``'s rows for ``items`` (paths, PIL images or texts), each row's ``"input"`` taken from ``names``."""
    if loaded.tasks[0].kind != "classify" or len(loaded.tasks) > 1:  # every task's prediction
        from transferkit.tasks.extension import predict_task_rows

        rows = predict_task_rows(loaded.module, loaded._as_data(items), batch_size)
        first = loaded.module.tasks[0]
        if first.kind != "classify":
            return [{"input": name, "prediction": row[first.name], "tasks": row} for name, row in zip(names, rows)]
        extra = rows
    else:
        extra = [{} for _ in items]
    probabilities = loaded.predict_proba(items, batch_size)
    return [
        {"input": name, "prediction": loaded.classes_[int(p.argmax())],
         "probabilities": {c: float(v) for c, v in zip(loaded.classes_, p)}, **({"tasks": e} if e else {})}
        for name, p, e in zip(names, probabilities, extra)
    ]
