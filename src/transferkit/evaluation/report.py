"""One self-contained HTML report per run or comparison (pictures inline as base64 PNG, drawn with matplotlib's
Agg backend; no external files, scripts or network). Never opens a browser.

A run report shows: the summary, learning curves (``history.jsonl``), the confusion matrix, per-class accuracy,
the reliability diagram (calibration), the most confidently wrong test examples (images or texts), a t-SNE map
of the test features (van der Maaten & Hinton 2008) and, for CNNs, the first convolution's filters. A compare
report adds the leaderboard as a table and a chart (mean accuracy with its 95% CI per configuration, accuracy
against training time), the recommendation and the paired test, then the run report of the best cell.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import TransferkitError, reading

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
MAX_EXAMPLE_ITEMS = 600  # test items predicted for the example and t-SNE sections (seeded subset)
MAX_CONFUSED = 12

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; } td, th { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #666; font-size: .9em; }
.rec { background: #eef7ee; border-left: 4px solid #4a4; padding: .6em 1em; }
.examples { display: flex; flex-wrap: wrap; gap: .8em; } .examples figure { margin: 0; width: 150px; }
.examples figcaption { font-size: .8em; }
"""


# --- figures -----------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_to_data_uri(fig: Any) -> str:
    """A matplotlib figure as ``data:image/png;base64,...`` (the figure is closed)."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_to_data_uri(image: Any) -> str:
    """A PIL image (or HxW[xC] array) as an inline PNG."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if max(image.size) < 96:  # small images (28 px digits) are scaled up so they are visible
        factor = max(1, 96 // max(image.size))
        image = image.resize((image.size[0] * factor, image.size[1] * factor), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def learning_curves_figure(history: list[dict[str, Any]]) -> Any | None:
    """Loss and accuracy curves per epoch (every numeric column of history.jsonl)."""
    rows = [r for r in history if "epoch" in r]
    if len(rows) < 2:  # a one-shot fit (closed-form probe) has no curve
        return None
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("epoch", "seconds", "step", "lr") and not k.startswith("lr")})
    losses = [k for k in keys if "loss" in k]
    scores = [k for k in keys if "loss" not in k and ("acc" in k or "f1" in k)]
    panels = [(title, ks) for title, ks in (("loss", losses), ("accuracy / F1", scores)) if ks]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, ks) in zip(axes[0], panels):
        for k in ks:
            xs = [e for e, r in zip(epochs, rows) if isinstance(r.get(k), (int, float))]
            ys = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
            ax.plot(xs, ys, marker="o", label=k)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def confusion_figure(matrix: list[list[int]], labels: list[str]) -> Any:
    plt = _pyplot()
    m = np.asarray(matrix)
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 20:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return fig


def per_class_figure(per_class: dict[str, dict[str, float]]) -> Any:
    plt = _pyplot()
    names = list(per_class)
    recall = [per_class[n]["recall"] for n in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), recall, color="#4a7ab5")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (recall) of the class")
    ax.grid(axis="y", alpha=0.3)
    return fig


def reliability_figure(diagram: dict[str, Any]) -> Any:
    plt = _pyplot()
    edges = np.asarray(diagram["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    acc = [a if a is not None else 0.0 for a in diagram["accuracy"]]
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.bar(centres, acc, width=edges[1] - edges[0], edgecolor="black", color="#4a7ab5", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {diagram['ece']:.3f})")
    ax.legend(fontsize=8)
    return fig


def tsne_figure(features: np.ndarray, labels: np.ndarray, class_names: list[str], seed: int = 0) -> Any | None:
    if len(features) < 5:
        return None
    from sklearn.manifold import TSNE

    plt = _pyplot()
    perplexity = float(min(30.0, (len(features) - 1) / 3))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        np.asarray(features, dtype=np.float64))
    fig, ax = plt.subplots(figsize=(6.5, 5.0))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=10, color=cmap(c % cmap.N), label=name)
    ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("t-SNE of the evaluated items' features (colour: true class)")
    return fig


def first_layer_filters_figure(module: Any) -> Any | None:
    """The first convolution's kernels (RGB when it reads 3 channels, grey for 1); None if there is none."""
    from torch import nn

    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d) and m.in_channels in (1, 3)
                 and m.kernel_size[0] > 1), None)
    if conv is None:
        return None
    plt = _pyplot()
    weights = conv.weight.detach().float().cpu().numpy()[:32]
    cols = 8
    rows = int(np.ceil(len(weights) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, kernel in zip(axes.ravel(), weights):
        k = (kernel - kernel.min()) / max(float(kernel.max() - kernel.min()), 1e-12)
        ax.imshow(k.transpose(1, 2, 0) if k.shape[0] == 3 else k[0], cmap=None if k.shape[0] == 3 else "grey",
                  interpolation="nearest")
    fig.suptitle(f"first convolution: {conv.weight.shape[0]} filters {conv.kernel_size[0]}x{conv.kernel_size[1]}",
                 fontsize=9)
    return fig


def leaderboard_figure(rows: list[dict[str, Any]]) -> Any:
    """Mean accuracy with 95% CI per configuration, and accuracy against training time."""
    plt = _pyplot()
    names = [f"{r['strategy']}\n{r['backbone']}" for r in rows]
    means = np.array([r["accuracy_mean"] for r in rows])
    errors = np.array([[m - r["accuracy_ci"][0], r["accuracy_ci"][1] - m] if r["accuracy_ci"] else [0.0, 0.0]
                       for m, r in zip(means, rows)]).T
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax1.bar(range(len(rows)), means, yerr=errors, capsize=4, color="#4a7ab5")
    ax1.set_xticks(range(len(rows)), names, fontsize=7)
    low = max(0.0, float(np.min(means - errors[0])) - 0.05)
    ax1.set_ylim(low, min(1.0, float(np.max(means + errors[1])) + 0.03))
    ax1.set_ylabel("test accuracy (mean, 95% CI over seeds)")
    ax1.grid(axis="y", alpha=0.3)
    seconds = [r["train_seconds"] for r in rows]
    ax2.errorbar(seconds, means, yerr=errors, fmt="o", capsize=4)
    for x, y, r in zip(seconds, means, rows):
        ax2.annotate(f"{r['strategy']} / {r['backbone']}", (x, y), fontsize=7, xytext=(4, 4),
                     textcoords="offset points")
    ax2.set_xscale("log")
    ax2.set_xlabel("training time per run (s, log scale)")
    ax2.set_ylabel("test accuracy")
    ax2.grid(alpha=0.3)
    return fig


# --- data for the example sections -------------------------------------------------------------------------


def evaluation_data(metrics: dict[str, Any]) -> Any:
    """The split a run was scored on, rebuilt exactly from the run's recorded options (under ``--protocol cv``
    without a test split: every labelled item, each scored out of fold)."""
    from transferkit.data import load_data

    fit = metrics["config"]["fit"]
    if metrics.get("accuracy_split") == "cv":
        from transferkit.config import FitConfig, build
        from transferkit.evaluation.crossfit import plan_protocol

        options = {k: v for k, v in fit.items() if v is not None}
        return plan_protocol(build(FitConfig, {**options, "protocol": "cv"}), metrics["config"]["train"]["seed"]).train
    splits = load_data(fit["data"], text_column=fit.get("text_column"), label_column=fit.get("label_column"),
                       limit_per_class=fit.get("limit_per_class"), seed=metrics["config"]["train"]["seed"],
                       val_fraction=fit.get("val_fraction", 0.15), test_fraction=fit.get("test_fraction", 0.2),
                       test_limit=fit.get("test_limit"))
    return splits.scoring_split()[1]


def _predict_with_features(module: Any, data: Any) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from transferkit.data.loader import make_loader
    from transferkit.engine.placement import predict_batches

    def probabilities_and_features(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        output = module(inputs)
        return torch.softmax(output.logits.float(), -1), output.features.float()

    loader = make_loader(data, module.backbone, batch_size=64, train=False)
    return predict_batches(module, (batch["inputs"] for batch in loader), probabilities_and_features)


def _examples_html(data: Any, probabilities: np.ndarray, class_names: list[str]) -> str:
    predictions = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predictions != data.labels)
    if not len(wrong):
        return "<p>No misclassified example in the sampled test items.</p>"
    order = wrong[np.argsort(-probabilities[wrong, predictions[wrong]])][:MAX_CONFUSED]
    if data.modality == "image":
        figures = []
        for i in order:
            caption = (f"true <b>{html.escape(class_names[data.labels[i]])}</b>, predicted "
                       f"<b>{html.escape(class_names[predictions[i]])}</b> ({probabilities[i, predictions[i]]:.2f})")
            figures.append(f"<figure>{_img(image_to_data_uri(data.items[i]), data.ids[i])}"
                           f"<figcaption>{caption}</figcaption></figure>")
        return f'<div class="examples">{"".join(figures)}</div>'
    rows = "".join(f"<tr><td>{html.escape(str(data.items[i])[:300])}</td><td>{html.escape(class_names[data.labels[i]])}"
                   f"</td><td>{html.escape(class_names[predictions[i]])}</td>"
                   f"<td class='num'>{probabilities[i, predictions[i]]:.2f}</td></tr>" for i in order)
    return f"<table><tr><th>text</th><th>true</th><th>predicted</th><th>p</th></tr>{rows}</table>"


# --- sections ----------------------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = ""
    for row in rows:
        cells = []
        for c in columns:
            v = row[c]
            text = f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) \
                else str(v)
            cells.append(f"<td class='num'>{html.escape(text)}</td>" if isinstance(v, (int, float))
                         else f"<td>{html.escape(text)}</td>")
        body += "<tr>" + "".join(cells) + "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def run_sections(run_dir: Path, with_examples: bool = True) -> list[str]:
    """HTML sections of one run folder."""
    from transferkit.evaluation.calibration import reliability_diagram

    metrics = json.loads((run_dir / "metrics.json").read_text())
    history_file = run_dir / "history.jsonl"
    history = [json.loads(line) for line in history_file.read_text().splitlines() if line.strip()] \
        if history_file.is_file() else []
    evaluation = metrics.get("evaluation", {})
    language_model = metrics.get("task") == "causal-lm"
    scores = {"held-out perplexity before": metrics.get("perplexity_before"),
              "after": metrics.get("perplexity_after")} if language_model else \
        {"accuracy": metrics["accuracy"], "macro F1": metrics.get("macro_f1", float("nan")),
         "split": str(metrics.get("accuracy_split", ""))}
    parts = ["<h2>Summary</h2>", _table([{
        "backbone": metrics.get("backbone", "?"), "strategy": metrics.get("strategy", "?"), **scores,
        "trainable params": metrics.get("trainable_params", 0), "train s": metrics.get("train_seconds", 0.0)}])]
    sizes = metrics.get("dataset_sizes")
    if sizes:
        parts.append(f"<p class='note'>data: {html.escape(json.dumps(sizes))}</p>")
    for note in metrics.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(str(note))}</p>")
    parts += auto_sections(run_dir)
    curves = learning_curves_figure(history)
    parts.append("<h2>Learning curves</h2>")
    parts.append(_img(figure_to_data_uri(curves), "learning curves") if curves else
                 "<p>No per-epoch history to draw (e.g. a closed-form linear probe: one fit, no epochs).</p>")
    if evaluation.get("confusion_matrix"):
        parts += ["<h2>Confusion matrix</h2>",
                  _img(figure_to_data_uri(confusion_figure(evaluation["confusion_matrix"], evaluation["labels"])),
                       "confusion matrix"),
                  "<h2>Per-class accuracy</h2>",
                  _img(figure_to_data_uri(per_class_figure(evaluation["per_class"])), "per-class accuracy")]
    if language_model or not with_examples or not (run_dir / "model").is_dir():  # an LM has no classes to show
        return parts
    if run_dir.joinpath("leaderboard.json").is_file() and not metrics.get("dataset_sizes", {}).get("test (not used)"):
        parts.append("<p class='note'>Examples, calibration and t-SNE are left out: every labelled item trained the "
                     "final model (the scores above are out-of-fold); run `transferkit evaluate` on held-out data."
                     "</p>")
        return parts
    try:
        from transferkit.api import EnsembleModel, load

        loaded = load(run_dir)
        module = loaded.module
        data = evaluation_data(metrics)
    except (TransferkitError, OSError, KeyError) as exc:
        parts.append(f"<p class='note'>Examples, calibration and t-SNE are left out: the model or its data could "
                     f"not be loaded ({html.escape(str(exc))}).</p>")
        return parts
    if len(data) > MAX_EXAMPLE_ITEMS:
        data = data.subset(np.sort(np.random.default_rng(0).choice(len(data), MAX_EXAMPLE_ITEMS, replace=False)))
    if isinstance(loaded, EnsembleModel) or loaded.config.get("tta"):  # several networks / views: no one feature space
        probabilities, features = loaded.predict_proba_data(data), None
    else:
        probabilities, features = _predict_with_features(module, data)
    class_names = list(module.class_names)
    what = "test items"
    if metrics.get("accuracy_split") == "cv":  # the final model saw every item: show the out-of-fold predictions
        from transferkit.evaluation.crossfit import read_predictions

        oof = read_predictions(run_dir, class_names) or {}
        if all(i in oof for i in data.ids):
            probabilities, what = np.stack([oof[i] for i in data.ids]), "labelled items, predicted out of fold"
    diagram = reliability_diagram(probabilities, data.labels)
    sampled = f" ({len(data)} sampled {what})" if len(data) == MAX_EXAMPLE_ITEMS else \
        f" ({what})" if what != "test items" else ""
    parts += [f"<h2>Calibration{sampled}</h2>", _img(figure_to_data_uri(reliability_figure(diagram)), "reliability"),
              f"<h2>Most confidently wrong examples{sampled}</h2>", _examples_html(data, probabilities, class_names)]
    tsne = tsne_figure(features, data.labels, class_names) if features is not None else None
    if tsne is not None:
        parts += [f"<h2>Feature t-SNE{sampled}</h2>", _img(figure_to_data_uri(tsne), "feature t-SNE")]
    filters = first_layer_filters_figure(module.backbone)
    if filters is not None:
        parts += ["<h2>First-layer filters</h2>", _img(figure_to_data_uri(filters), "first-layer filters")]
    return parts


def auto_sections(run_dir: Path) -> list[str]:
    """The leaderboard of a ``transferkit auto`` run folder (nothing for other runs)."""
    from transferkit.autofit.auto_search import LEADERBOARD_JSON

    path = run_dir / LEADERBOARD_JSON
    if not path.is_file():
        return []
    document = json.loads(path.read_text())
    rows = document.get("leaderboard", [])
    if not rows or "cv_mean" not in rows[0]:
        return []
    table = [{"rank": r["rank"], "candidate": r["name"],
              "CV accuracy": r["cv_mean"] if r["cv_mean"] is not None else "-",
              "sd": r["cv_sd"] if r["cv_sd"] is not None else "-", "status": r["status"],
              "seconds": r.get("seconds") if r.get("seconds") is not None else "-",
              "ensemble weight": r.get("ensemble_weight") or ""} for r in rows]
    return [f"<h2>Leaderboard ({document.get('k')}-fold cross-validation, seed {document.get('seed')})</h2>",
            _table(table)]


def compare_sections(folder: Path) -> list[str]:
    from transferkit.evaluation.compare import LEADERBOARD_FILE, RUNS_FOLDER, describe_paired_test

    document = json.loads((folder / LEADERBOARD_FILE).read_text())
    rows = document["leaderboard"]
    parts = [f"<p>data: <b>{html.escape(str(document['data']))}</b>; seeds per configuration: {document['seeds']}; "
             f"options: {html.escape(json.dumps(document.get('fit_options', {})))}</p>"]
    rec = document.get("recommendation")
    if rec:
        parts.append(f"<div class='rec'><b>Recommendation: {html.escape(rec['strategy'])} on "
                     f"{html.escape(rec['backbone'])}</b> ({html.escape(rec['rule'])})<br>{html.escape(rec['reason'])}"
                     "</div>")
    parts += ["<h2>Leaderboard</h2>", _table([{
        "rank": r["rank"], "backbone": r["backbone"], "strategy": r["strategy"], "seeds": r["seeds"],
        "accuracy": r["accuracy_mean"], "sd": r["accuracy_sd"] if r["accuracy_sd"] is not None else "-",
        "95% CI": f"{r['accuracy_ci'][0]:.4f}-{r['accuracy_ci'][1]:.4f}" if r["accuracy_ci"] else "-",
        "trainable params": r["trainable_params"], "train s": r["train_seconds"], "peak MB": r["peak_memory_mb"],
    } for r in rows])]
    parts.append(f"<p>{html.escape(describe_paired_test(document.get('paired_test')))}</p>")
    parts.append(f"<p class='note'>{html.escape(document.get('peak_memory_note', ''))}</p>")
    if rows:
        parts.append(_img(figure_to_data_uri(leaderboard_figure(rows)), "leaderboard chart"))
    problems = [c for c in document["cells"] if c["status"] != "done"]
    if problems:
        parts.append("<h2>Cells not finished</h2>" + _table([{k: c[k] for k in ("backbone", "strategy", "seed",
                                                                                "status", "message")}
                                                             for c in problems]))
    if rows:
        best = rows[0]
        cells = [c for c in document["cells"] if c["status"] == "done" and c["backbone"] == best["backbone"]
                 and c["strategy"] == best["strategy"]]
        if cells:
            path = Path(cells[0]["path"])
            if not path.exists():  # the compare folder was moved or the path was relative to another directory
                path = folder / RUNS_FOLDER / path.name
            if (path / "metrics.json").is_file():
                parts.append(f"<h1>Best configuration, seed {cells[0]['seed']}: {html.escape(best['strategy'])} on "
                             f"{html.escape(best['backbone'])}</h1>")
                parts += run_sections(path)
    return parts


def render_html(title: str, sections: list[str]) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")


def write_report(folder: str | Path, output: str | Path | None = None) -> Path:
    """Write ``report.html`` for a run folder (``metrics.json``) or a compare folder (``leaderboard.json``)."""
    from transferkit.evaluation.compare import LEADERBOARD_FILE
    from transferkit.rundir import record_file, write_text

    folder = Path(folder)
    if not folder.is_dir():
        raise TransferkitError(f"'{folder}' does not exist" if not folder.exists() else f"'{folder}' is a file",
                               "pass the --out folder of `fit` or `compare`")
    if (folder / LEADERBOARD_FILE).is_file() and not (folder / "metrics.json").is_file():
        with reading(folder / LEADERBOARD_FILE, "compare leaderboard", "run the compare again"):
            html_text = render_html(f"transferkit comparison: {folder.name}", compare_sections(folder))
    elif (folder / "metrics.json").is_file():
        with reading(folder / "metrics.json", "run folder (metrics.json, history.jsonl)", "run fit again"):
            html_text = render_html(f"transferkit run: {folder.name}", run_sections(folder))
    else:
        raise TransferkitError(f"'{folder}' is neither a run folder (metrics.json) nor a compare folder "
                               f"({LEADERBOARD_FILE})", "pass the --out folder of `fit` or `compare`")
    path = Path(output) if output else folder / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, html_text)  # atomic: a reader of a published run folder sees the old report or the new one
    record_file(folder, path)  # ours: a later --overwrite of the run replaces it
    logger.debug("report written to %s", path)
    return path
