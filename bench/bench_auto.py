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

import numpy as np

from bench.common import bench_command, cached, timed_command, write_section

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "auto"
RESULTS = ROOT / "results"

TASKS = {
    "fashion": {"data": "fashion-mnist", "per_class": 20, "test_limit": 2000, "budget": "15m"},
    "tweets": {"data": "tweets:airline", "per_class": 8, "test_limit": 600, "budget": "10m"},
}


def _test_tag(task: str) -> str:
    default = {"fashion": 2000, "tweets": 600}[task]
    return "" if TASKS[task]["test_limit"] == default else f"-test{TASKS[task]['test_limit']}"


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
    path = write_csv(CACHE / "data" / f"{task}-seed{seed}.csv", labelled)
    return ["--data", str(path), "--text-column", "text", "--label-column", "label"]


def run_timed(task: str, seed: int, budget: str, lock: str | None) -> tuple[Path, Path]:
    """Run ``transferkit auto`` for one seed unless its run folder exists: the timed part, inside ``flock LOCK``
    when ``lock`` is given (one timed benchmark at a time on the machine). The wall time is measured around the
    auto command only (waiting for the lock is not counted). Returns (run folder, wall-time file)."""
    from transferkit.rundir import is_output

    out = CACHE / "runs" / f"{task}-seed{seed}-{budget}"
    wall_file = CACHE / "logs" / f"{task}-seed{seed}-{budget}.wall"
    if not is_output(out, "auto"):
        import shutil

        labelled, _ = splits_for(task, seed)
        features = CACHE / "features-auto" / f"{task}-seed{seed}"  # empty: auto extracts as a new user's run would
        shutil.rmtree(features, ignore_errors=True)
        command = [sys.executable, "-m", "transferkit", "auto", *auto_data(task, seed, labelled), "--seed",
                   str(seed), "--time-budget", budget, "--out", str(out), "--overwrite", "--cache-dir",
                   str(features)]
        result, wall = timed_command(command, lock, wall_file.with_suffix(".log"))
        if result.returncode != 0:
            raise RuntimeError(f"auto failed: {result.stderr[-2000:]}")
        wall_file.write_text(f"{wall:.1f}")
    return out, wall_file


def cell_auto(task: str, seed: int, budget: str, lock: str | None = None) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        import json

        import transferkit

        _, test = splits_for(task, seed)
        out, wall_file = run_timed(task, seed, budget, lock)
        run_metrics = json.loads((out / "metrics.json").read_text())
        # a run finished by an earlier, interrupted invocation of this script: its own clock (process start to
        # the final write), which is what the command's wall time measures
        wall = float(wall_file.read_text()) if wall_file.is_file() else float(run_metrics["train_seconds"])
        model = transferkit.load(out)
        index = [model.classes_.index(name) for name in test.class_names]  # the run's class order may differ
        probabilities = test_probabilities(model, test)[:, index]
        return {"accuracy": float((probabilities.argmax(1) == test.labels).mean()), "wall_seconds": wall,
                "cv_accuracy": run_metrics["accuracy"], "final": run_metrics["strategy"],
                "budget_seconds": run_metrics["time_budget_seconds"]}

    return cached(CACHE, f"{task}-auto-{budget}-seed{seed}{_test_tag(task)}", compute)


def test_probabilities(model, test, cache_dir: Path = CACHE / "features") -> np.ndarray:
    """The model's probabilities on the test items, as the ensemble predicts (autofit.ensemble.group_probabilities:
    a backbone's final-layer and multi-stage probes read one pass of its features), except that linear-probe
    members read their features from a cache (the same numbers as running the network, without recomputing 2,000
    forward passes per seed on a loaded machine)."""
    from transferkit.api import EnsembleModel
    from transferkit.autofit.ensemble import group_probabilities, shared_feature_groups
    from transferkit.engine.features import extract_features

    members = list(zip(model.members, model.weights)) if isinstance(model, EnsembleModel) else [(model, 1.0)]
    total = sum(w for _, w in members)
    out = 0.0
    is_probe = [m.config.get("strategy", {}).get("name") == "linear-probe" for m, _ in members]
    probes = [pair for pair, probe in zip(members, is_probe) if probe]
    for (member, weight), probe in zip(members, is_probe):
        if not probe:
            out = out + weight / total * member.predict_proba_data(test)
    for group in shared_feature_groups([m for m, _ in probes]):
        parts = group_probabilities([probes[i][0] for i in group], test, 64, False, features_of=lambda backbone, view:
                                    extract_features(backbone, view, cache_dir=cache_dir, progress=False))
        out = out + sum(probes[i][1] / total * p for i, p in zip(group, parts))
    return np.asarray(out)


def probe_224(labelled, test) -> dict[str, Any]:
    """EfficientNet-Lite0 at its own 224 px, frozen features (transferkit's extraction = timm's pipeline on the same
    weights, cached) + scikit-learn LogisticRegression (defaults, max_iter 1000) on all labelled items."""
    from sklearn.linear_model import LogisticRegression

    from transferkit.backbones import create_backbone
    from transferkit.engine.features import extract_features

    started = time.perf_counter()
    backbone = create_backbone("efficientnet_lite0", image_size=224)
    x_train = extract_features(backbone, labelled, cache_dir=CACHE / "features", progress=False)
    x_test = extract_features(backbone, test, cache_dir=CACHE / "features", progress=False)
    clf = LogisticRegression(max_iter=1000).fit(x_train, labelled.labels)
    return {"accuracy": float((clf.predict(x_test) == test.labels).mean()), "seconds": time.perf_counter() - started}


def cell_probe(task: str, seed: int) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        from bench.bench_core import sentence_transformers_text_pipeline

        labelled, test = splits_for(task, seed)
        if task == "fashion":
            return probe_224(labelled, test)
        return sentence_transformers_text_pipeline(labelled, test)

    return cached(CACHE, f"{task}-probe-seed{seed}{_test_tag(task)}", compute)


def write_csv(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for text, label in zip(data.items, data.labels):
            writer.writerow([text, data.class_names[label]])
    return path


def write_image_folder(path: Path, data) -> Path:
    """``data``'s images as PNG files in one sub-folder per class (the layout fastai reads)."""
    if (path / ".complete").is_file():
        return path
    for i, (image, label) in enumerate(zip(data.items, data.labels)):
        folder = path / data.class_names[label].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.png")
    (path / ".complete").write_text("")
    return path


def cell_fastai(seed: int, epochs: int) -> dict[str, Any]:
    """fastai's ``fine_tune(epochs)`` on the same labelled images (bench/fastai_direct.py); its wall time is set by
    the epoch count (chosen once so that it matches auto's budget on a quiet machine)."""
    if importlib.util.find_spec("fastai") is None:
        return {"error": "not measured: fastai is not installed in this environment (the bench extra)"}

    def compute() -> dict[str, Any]:
        import json

        labelled, test = splits_for("fashion", seed)
        train_dir = write_image_folder(CACHE / "data" / f"fashion-seed{seed}-images", labelled)
        test_dir = write_image_folder(CACHE / "data" / f"fashion-test{TASKS['fashion']['test_limit']}-images", test)
        result = subprocess.run([sys.executable, str(ROOT / "fastai_direct.py"), "--train", str(train_dir), "--test",
                                 str(test_dir), "--epochs", str(epochs), "--seed", str(seed)],
                                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                    p for p in (str(ROOT.parent / "src"), str(ROOT.parent),
                                                os.environ.get("PYTHONPATH", "")) if p)})
        if result.returncode != 0:
            return {"error": f"fastai failed: {result.stderr.strip().splitlines()[-1] if result.stderr else '?'}"}
        return json.loads(result.stdout.strip().splitlines()[-1])

    return cached(CACHE, f"fashion-fastai-e{epochs}-seed{seed}{_test_tag('fashion')}", compute)


#: class-name sentences per class of the templated SetFit row (the number auto's text candidates use)
TEMPLATED = 8


def cell_peer(task: str, seed: int, peer_python: str | None, fastai_epochs: int | None = None,
              templated: int = 0) -> dict[str, Any]:
    """SetFit (text) through ``--peer-python`` (a Python with setfit installed; bench/setfit_direct.py), with
    ``templated`` class-name sentences per class from SetFit's own ``get_templated_dataset`` when > 0; fastai
    (images) with ``fastai_epochs`` epochs of ``fine_tune``."""
    if task == "fashion":
        if not fastai_epochs:
            return {"error": "not measured: pass --fastai-epochs"}
        return cell_fastai(seed, fastai_epochs)
    if not peer_python:
        return {"error": "not measured: pass --peer-python (a Python with setfit 1.2 installed)"}

    def compute() -> dict[str, Any]:
        import json

        labelled, test = splits_for(task, seed)
        train_csv = write_csv(CACHE / "data" / f"{task}-seed{seed}.csv", labelled)
        test_csv = write_csv(CACHE / "data" / f"{task}-test.csv", test)
        result = subprocess.run([peer_python, str(ROOT / "setfit_direct.py"), "--train", str(train_csv),
                                 "--test", str(test_csv), "--seed", str(seed), "--templated", str(templated)],
                                capture_output=True, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        if result.returncode != 0:
            return {"error": f"SetFit failed: {result.stderr.strip().splitlines()[-1] if result.stderr else '?'}"}
        return json.loads(result.stdout.strip().splitlines()[-1])

    return cached(CACHE, f"{task}-setfit{f'-templated{templated}' if templated else ''}-seed{seed}", compute)


def cpu_seconds(task: str, seed: int, budget: str) -> float | None:
    """CPU seconds the timed auto command got (the ``cpu`` line bench.common.timed_command logs), if recorded."""
    log = CACHE / "logs" / f"{task}-seed{seed}-{budget}.log"
    lines = [line for line in log.read_text().splitlines() if line.startswith("cpu ")] if log.is_file() else []
    return float(lines[-1].split()[1]) if lines else None


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
    parser.add_argument("--peer-python", help="A Python with setfit 1.2 installed (tweets: the SetFit row).")
    parser.add_argument("--test-limit", type=int, help="Fewer fixed test items than the task's (a loaded machine).")
    parser.add_argument("--cached-only", action="store_true", help="Report finished cells only (the others: "
                        "'not finished in this session').")
    parser.add_argument("--lock", help="Run each timed auto command inside `flock LOCK` (one timed benchmark at a "
                        "time on a shared machine).")
    parser.add_argument("--timed-only", action="store_true", help="Only run the timed auto commands (at this "
                        "process's priority); score and report later with a niced invocation without this flag.")
    parser.add_argument("--no-run", action="store_true", help="Never start a timed auto command: score the runs "
                        "that exist (the others: 'not finished in this session').")
    parser.add_argument("--note", action="append", default=[], help="A line added to the report (repeatable).")
    parser.add_argument("--fastai-epochs", type=int, help="fashion: the fastai row's fine_tune epochs.")
    parser.add_argument("--rows", default="auto,probe,peer", help="Rows to compute (the others are read from the "
                        "cache when finished).")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    if args.test_limit:
        TASKS[args.task]["test_limit"] = args.test_limit
    spec = TASKS[args.task]
    budget = args.budget or spec["budget"]
    tag = _test_tag(args.task)

    def run(key: str, compute):
        if args.cached_only and not (CACHE / f"{key}.json").is_file():
            return {"error": "not finished in this session"}
        return compute()

    if args.timed_only:
        for s in args.seeds:
            run_timed(args.task, s, budget, args.lock)
        return
    rows = set(args.rows.split(","))

    def row(name: str, key: str, compute):
        if name not in rows and not (CACHE / f"{key}.json").is_file():
            return {"error": "not finished in this session"}
        return run(key, compute)

    def auto_row(s: int) -> dict[str, Any]:
        from transferkit.rundir import is_output

        if args.no_run and not is_output(CACHE / "runs" / f"{args.task}-seed{s}-{budget}", "auto"):
            return {"error": "not finished in this session"}
        return row("auto", f"{args.task}-auto-{budget}-seed{s}{tag}", lambda: cell_auto(args.task, s, budget, args.lock))

    autos = {s: auto_row(s) for s in args.seeds}
    probes = {s: row("probe", f"{args.task}-probe-seed{s}{tag}", lambda s=s: cell_probe(args.task, s))
              for s in args.seeds}
    peer_key = "{task}-setfit-seed{s}" if args.task == "tweets" else "{task}-fastai-e{e}-seed{s}" + tag
    peers = {s: row("peer", peer_key.format(task=args.task, s=s, e=args.fastai_epochs),
                    lambda s=s: cell_peer(args.task, s, args.peer_python, args.fastai_epochs)) for s in args.seeds}
    probe_name = ("linear probe, EfficientNet-Lite0 at its own 224 px (frozen features as timm's eval pipeline + "
                  "scikit-learn LogisticRegression, all labels)" if args.task == "fashion"
                  else "MiniLM embeddings + scikit-learn LogisticRegression")
    peer_name = (f"fastai vision_learner fine_tune({args.fastai_epochs}), 224 px, its standard recipe (15% of the "
                 "labels as its validation set)" if args.task == "fashion" else "SetFit 1.2 offline")
    table = [(f"transferkit auto --time-budget {budget}", autos), (probe_name, probes), (peer_name, peers)]
    if args.task == "tweets":  # SetFit with its own class-name sentences (what auto's text candidates also use)
        templated = {s: row("peer-templated", f"{args.task}-setfit-templated{TEMPLATED}-seed{s}",
                            lambda s=s: cell_peer(args.task, s, args.peer_python, templated=TEMPLATED))
                     for s in args.seeds}
        table.append((f"SetFit 1.2 offline + get_templated_dataset ({TEMPLATED} 'This sentence is <label>' per class)",
                      templated))
    lines = ["| method | test accuracy (mean ± sd) | per seed | vs probe, paired per seed (points) | "
             "wall seconds per seed |", "|---|---|---|---|---|"]
    for name, cells in table:
        accs = [cells[s]["accuracy"] for s in args.seeds if "accuracy" in cells[s]]
        if not accs:
            lines.append(f"| {name} | {cells[args.seeds[0]].get('error', '-')} | | | |")
            continue
        diffs = [100 * (cells[s]["accuracy"] - probes[s]["accuracy"]) for s in args.seeds
                 if "accuracy" in cells[s] and "accuracy" in probes[s]]
        walls = [cells[s].get("wall_seconds", cells[s].get("seconds")) for s in args.seeds if "accuracy" in cells[s]]
        lines.append(f"| {name} | {_mean_sd(accs)} | {', '.join(f'{a:.4f}' for a in accs)} | "
                     f"{', '.join(f'{d:+.1f}' for d in diffs) if cells is not probes else ''} | "
                     f"{', '.join(f'{w:.0f}' for w in walls if w is not None)} |")
    def cpu_text(s: int) -> str:
        cpu = cpu_seconds(args.task, s, budget)
        return "" if cpu is None else (f", {cpu:.0f} CPU s (on average {cpu / autos[s]['wall_seconds']:.2f} of the "
                                       f"{os.cpu_count()} cores)")

    finals = "\n".join(f"- seed {s}: CV accuracy {autos[s]['cv_accuracy']:.4f}; final model {autos[s]['final']}; "
                       f"wall {autos[s]['wall_seconds']:.0f} s for a {autos[s]['budget_seconds']:.0f} s budget"
                       + cpu_text(s) for s in args.seeds if "accuracy" in autos[s])
    versus = ""
    if args.task == "tweets":
        for name, cells in table[2:]:
            paired = [100 * (autos[s]["accuracy"] - cells[s]["accuracy"]) for s in args.seeds
                      if "accuracy" in autos[s] and "accuracy" in cells[s]]
            if paired:
                versus += (f"\n\nauto - {name}: mean {statistics.mean(paired):+.1f} points (per seed "
                           + ", ".join(f"{g:+.1f}" for g in paired) + ").")
    gains = [100 * (autos[s]["accuracy"] - probes[s]["accuracy"]) for s in args.seeds
             if "accuracy" in autos[s] and "accuracy" in probes[s]] or [float("nan")]
    body = (f"{spec['data']}, {spec['per_class']} labelled items per class (drawn with the seed), "
            f"{spec['test_limit']:,} fixed test items, seeds {args.seeds}. auto's wall time is the whole command "
            f"(start-up, search, refit, writing); the budget allows +10%. Scoring the test items happens afterwards. "
            f"Load average when this file was written: {' / '.join(f'{v:.1f}' for v in os.getloadavg())} on "
            f"{os.cpu_count()} shared cores (a wall-clock budget buys less search on a loaded machine).\n\n"
            + "\n".join(lines) + f"\n\nauto - probe: mean {statistics.mean(gains):+.1f} points (per seed "
            + ", ".join(f"{g:+.1f}" for g in gains) + ")." + versus + "\n\nWhat auto chose:\n\n" + finals
            + "".join(f"\n\n{note}" for note in args.note))
    write_section(RESULTS / f"auto_{args.task}.md", f"transferkit auto: {args.task}",
                  bench_command("bench.bench_auto", argv), started, body)


if __name__ == "__main__":
    main()
