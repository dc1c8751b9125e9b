"""`transferkit auto` against the baselines a user would otherwise run (issue 14, targets).

* fashion: Fashion-MNIST, 20 labelled images per class (drawn with the seed), the same fixed 2,000 official test
  images for every row. Rows: ``transferkit auto --time-budget 15m`` (the whole command's wall time is measured,
  start-up included; the test images are scored afterwards, outside the budget), the linear probe at the backbone's
  own resolution (timm EfficientNet-Lite0 at 224 px + scikit-learn logistic regression on all 200 labels), and
  fastai's ``fine_tune`` when fastai is installed (the ``bench`` extra).
* tweets: tweets about airlines, 8 labelled tweets per class (negative / neutral / positive), 600 fixed test tweets.
  The labelled tweets are written to a CSV that ``auto`` reads (so it never sees the test tweets). Rows: ``auto
  --time-budget 10m``, MiniLM embeddings + logistic regression, SetFit when installed.

    OMP_NUM_THREADS=1 nice -n 5 python -m bench.bench_auto --task fashion --seeds 0 1 2 [--budget 15m]

Finished cells are cached under bench/cache/auto/ (an interrupted run resumes); markdown goes to
bench/results/auto_<task>.md.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import bench_command, cached, write_section

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "auto"
RESULTS = ROOT / "results"

TASKS = {
    "fashion": {"data": "fashion-mnist", "per_class": 20, "test_limit": 2000, "budget": "15m"},
    "tweets": {"data": "tweets:airline", "per_class": 8, "test_limit": 600, "budget": "10m"},
}


def splits_for(task: str, seed: int):
    from transferkit.data import load_data
    from transferkit.evaluation.transferability import labelled_pool

    spec = TASKS[task]
    splits = load_data(spec["data"], limit_per_class=spec["per_class"], seed=seed, test_limit=spec["test_limit"])
    return labelled_pool(splits), splits.test


def auto_data(task: str, seed: int, labelled) -> list[str]:
    """``auto --data ...`` arguments that give auto exactly ``labelled`` (and nothing of the test split)."""
    spec = TASKS[task]
    if task == "fashion":  # the built-in's official test split is separate: auto draws the same 20 per class
        return ["--data", spec["data"], "--limit-per-class", str(spec["per_class"])]
    path = CACHE / "data" / f"{task}-seed{seed}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for text, label in zip(labelled.items, labelled.labels):
            writer.writerow([text, labelled.class_names[label]])
    return ["--data", str(path), "--text-column", "text", "--label-column", "label"]


def cell_auto(task: str, seed: int, budget: str) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        import transferkit

        labelled, test = splits_for(task, seed)
        out = CACHE / "runs" / f"{task}-seed{seed}-{budget}"
        command = [sys.executable, "-m", "transferkit", "auto", *auto_data(task, seed, labelled), "--seed", str(seed),
                   "--time-budget", budget, "--out", str(out), "--overwrite", "--cache-dir", str(CACHE / "features")]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"auto failed: {result.stderr[-2000:]}")
        (CACHE / "logs").mkdir(parents=True, exist_ok=True)
        (CACHE / "logs" / f"{task}-seed{seed}-{budget}.log").write_text(result.stderr)
        model = transferkit.load(out)
        classes = model.classes_
        index = [classes.index(name) for name in test.class_names]  # the run's class order may differ
        probabilities = model.predict_proba_data(test)[:, index]
        import json

        run_metrics = json.loads((out / "metrics.json").read_text())
        return {"accuracy": float((probabilities.argmax(1) == test.labels).mean()), "wall_seconds": wall,
                "cv_accuracy": run_metrics["accuracy"], "final": run_metrics["strategy"],
                "budget_seconds": run_metrics["time_budget_seconds"]}

    return cached(CACHE, f"{task}-auto-{budget}-seed{seed}", compute)


def cell_probe(task: str, seed: int) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        from bench.bench_core import sentence_transformers_text_pipeline, timm_sklearn_image_pipeline

        labelled, test = splits_for(task, seed)
        if task == "fashion":
            return timm_sklearn_image_pipeline(labelled, test, 224)
        return sentence_transformers_text_pipeline(labelled, test)

    return cached(CACHE, f"{task}-probe-seed{seed}", compute)


def cell_peer(task: str, seed: int) -> dict[str, Any]:
    """fastai (images) or SetFit (text), when installed; otherwise a row that says so."""
    package = "fastai" if task == "fashion" else "setfit"
    if importlib.util.find_spec(package) is None:
        return {"error": f"{package} is not installed in this environment (not measured)"}
    return {"error": f"{package} is installed but its cell is not implemented in this script yet"}


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", choices=list(TASKS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", help="auto --time-budget (default: the task's target budget)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    spec = TASKS[args.task]
    budget = args.budget or spec["budget"]
    autos = {s: cell_auto(args.task, s, budget) for s in args.seeds}
    probes = {s: cell_probe(args.task, s) for s in args.seeds}
    peers = {s: cell_peer(args.task, s) for s in args.seeds}
    probe_name = ("linear probe, EfficientNet-Lite0 at its own 224 px (timm + scikit-learn LogisticRegression, all "
                  "labels)" if args.task == "fashion" else "MiniLM embeddings + scikit-learn LogisticRegression")
    peer_name = "fastai fine_tune, same wall time" if args.task == "fashion" else "SetFit 1.2 offline"
    lines = ["| method | test accuracy (mean ± sd) | per seed | vs probe, paired per seed (points) | "
             "wall seconds per seed |", "|---|---|---|---|---|"]
    for name, cells in ((f"transferkit auto --time-budget {budget}", autos), (probe_name, probes), (peer_name, peers)):
        accs = [cells[s]["accuracy"] for s in args.seeds if "accuracy" in cells[s]]
        if not accs:
            lines.append(f"| {name} | {cells[args.seeds[0]].get('error', '-')} | | | |")
            continue
        diffs = [100 * (cells[s]["accuracy"] - probes[s]["accuracy"]) for s in args.seeds if "accuracy" in cells[s]]
        walls = [cells[s].get("wall_seconds", cells[s].get("seconds")) for s in args.seeds]
        lines.append(f"| {name} | {_mean_sd(accs)} | {', '.join(f'{a:.4f}' for a in accs)} | "
                     f"{', '.join(f'{d:+.1f}' for d in diffs) if cells is not probes else ''} | "
                     f"{', '.join(f'{w:.0f}' for w in walls if w is not None)} |")
    finals = "\n".join(f"- seed {s}: CV accuracy {autos[s]['cv_accuracy']:.4f}; final model {autos[s]['final']}"
                       for s in args.seeds)
    gains = [100 * (autos[s]["accuracy"] - probes[s]["accuracy"]) for s in args.seeds]
    body = (f"{spec['data']}, {spec['per_class']} labelled items per class (drawn with the seed), "
            f"{spec['test_limit']:,} fixed test items, seeds {args.seeds}. auto's wall time is the whole command "
            f"(start-up, search, refit, writing); the budget allows +10%. Scoring the test items happens afterwards.\n\n"
            + "\n".join(lines) + f"\n\nauto - probe: mean {statistics.mean(gains):+.1f} points (per seed "
            + ", ".join(f"{g:+.1f}" for g in gains) + ").\n\nWhat auto chose:\n\n" + finals)
    write_section(RESULTS / f"auto_{args.task}.md", f"transferkit auto: {args.task}",
                  bench_command("bench.bench_auto", argv), started, body)


if __name__ == "__main__":
    main()
