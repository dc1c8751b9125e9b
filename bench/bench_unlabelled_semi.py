"""Semi-supervised transfer benchmark (issue 15, item 1): ``fit --unlabelled`` on Fashion-MNIST.

``--part fm`` (the main target): 20 labelled training images per class + a pool of 5,000 other (unlabelled)
training images, scored on 2,000 test images (200 per class, fixed). Rows, each one ``transferkit fit`` run in a
subprocess (wall time measured around it), all with ``--protocol cv`` on the labelled images:

* ``supervised finetune``: the same strategy without unlabelled data;
* ``finetune + self-training`` / ``finetune + consistency``: ``--unlabelled POOL --semi ...``;
* ``linear-probe + self-training``: the frozen-backbone case (only the head learns from pseudo-labels);
* ``scikit-learn SelfTrainingClassifier``: the baseline a user would write: ``SelfTrainingClassifier(
  LogisticRegression(max_iter=1000))`` on frozen EfficientNet-Lite0 224 px features of the labelled + unlabelled
  images, and ``LogisticRegression`` on the labelled images alone for reference.

``--part small`` (defaults): a plain folder of 10 labelled images per class and a folder of 2,000 unlabelled ones,
``transferkit fit --data DIR --unlabelled DIR2`` with nothing else, then ``transferkit evaluate`` on the 2,000 test
images; against scikit-learn ``LogisticRegression`` on EfficientNet-Lite0 224 px features of the labelled images.

Pseudo-label accuracy comes from ``--unlabelled-labels`` (the pool's true labels, used only for reporting). Data
per seed are written once as PNG folders under bench/cache/semi/. Results: bench/results/unlabelled.md.

    python -m bench.bench_unlabelled_semi --part fm [--seeds 1] [--image-size 112] [--pool 5000]
    python -m bench.bench_unlabelled_semi --part small [--seeds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import bench_command, cached, note_lines, write_section

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "semi"
RESULTS = ROOT / "results" / "unlabelled.md"
FEATURES = CACHE / "features"  # EfficientNet-Lite0 feature cache of the frozen baselines and our runs
TEST_PER_CLASS = 200


def write_data(seed: int, labelled_per_class: int, pool: int, split_layout: bool) -> dict[str, Path]:
    """PNG folders for one seed: labelled images (``data/train/<class>`` + ``data/test/<class>`` with the split
    layout, else ``labelled/<class>``), a flat ``unlabelled`` folder with its labels CSV, and the test images."""
    from PIL import Image

    from transferkit.data.builtin import builtin_arrays

    name = f"fm-l{labelled_per_class}-u{pool}-s{seed}" + ("" if split_layout else "-plain")
    root = CACHE / name
    paths = {"root": root, "data": root / "data" if split_layout else root / "labelled",
             "unlabelled": root / "unlabelled", "labels": root / "unlabelled-labels.csv",
             "test": root / "data" / "test" if split_layout else root / "test"}
    if (root / "done").is_file():
        return paths
    images, labels, class_names, test_index = builtin_arrays("fashion-mnist")
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_index] = True
    train_index = np.flatnonzero(~is_test)
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(train_index[labels[train_index] == c], labelled_per_class, replace=False)
                             for c in range(len(class_names))])
    rest = np.setdiff1d(train_index, chosen)
    unlabelled = rng.choice(rest, pool, replace=False)
    test_rng = np.random.default_rng(0)  # the same test images for every seed
    test = np.concatenate([test_rng.choice(test_index[labels[test_index] == c], TEST_PER_CLASS, replace=False)
                           for c in range(len(class_names))])
    train_folder = paths["data"] / "train" if split_layout else paths["data"]

    def save(folder: Path, index: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(images[index])).save(folder / f"{index:05d}.png")

    for i in chosen:
        save(train_folder / class_names[labels[i]], int(i))
    for i in test:
        save(paths["test"] / class_names[labels[i]], int(i))
    rows = ["item,label"]
    for i in unlabelled:
        save(paths["unlabelled"], int(i))
        rows.append(f"{int(i):05d}.png,{class_names[labels[i]]}")
    paths["labels"].write_text("\n".join(rows) + "\n")
    (root / "done").write_text("ok\n")
    return paths


def run_cli(args: list[str], timed: bool = False) -> float:
    """``transferkit ARGS`` in a subprocess of this tree; returns its wall time (seconds). ``timed``: inside
    ``flock /work/wt/bench.lock`` (one timed benchmark at a time on the shared machine; the wait is not counted)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT.parent / 'src'}:{ROOT.parent}"}
    command = [sys.executable, "-m", "transferkit", *args]
    if timed:  # the time is taken inside the lock: python -c wrapper measures from when the lock is held
        command = ["flock", LOCK, sys.executable, "-c", TIMER, *command]
        output = subprocess.run(command, check=True, env=env, stdout=subprocess.PIPE, text=True).stdout
        return float(output.strip().splitlines()[-1])
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - started


LOCK = "/work/wt/bench.lock"
#: runs argv[1:] and prints its wall time last (the command's own stdout goes to stderr)
TIMER = ("import subprocess, sys, time; t = time.perf_counter(); "
         "subprocess.run(sys.argv[1:], check=True, stdout=sys.stderr); print(time.perf_counter() - t)")


def fit_cell(paths: dict[str, Path], out: Path, options: list[str], timed: bool = False) -> dict:
    load_before = os.getloadavg()[0]
    seconds = run_cli(["fit", "--data", str(paths["data"]), "--out", str(out), "--overwrite", "--no-progress",
                       *options], timed)
    metrics = json.loads((out / "metrics.json").read_text())
    semi = metrics.get("semi", {})
    return {"accuracy": metrics["accuracy"], "split": metrics["accuracy_split"], "wall_seconds": round(seconds, 1),
            "load": [round(load_before, 2), round(os.getloadavg()[0], 2)], "semi": semi, "timed": timed,
            "epochs": metrics["config"]["train"]["epochs"], "command": "transferkit fit --data DATA " + " ".join(
                o if not o.startswith(str(CACHE)) else Path(o).name.upper() for o in options)}


def frozen_baselines(paths: dict[str, Path], cache_dir: Path, with_self_training: bool) -> dict:
    """scikit-learn on EfficientNet-Lite0 224 px features: LogisticRegression on the labelled images and
    SelfTrainingClassifier(LogisticRegression) on labelled + unlabelled."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.semi_supervised import SelfTrainingClassifier

    from transferkit.backbones import create_backbone
    from transferkit.data import load_data, load_unlabelled
    from transferkit.engine.features import extract_features

    backbone = create_backbone("efficientnet_lite0")
    splits = load_data(str(paths["data"]), seed=0, test_fraction=0.0, val_fraction=0.5)
    labelled = [d for d in (splits.train, splits.val) if len(d)]
    x = np.concatenate([extract_features(backbone, d, cache_dir=cache_dir, progress=False) for d in labelled])
    y = np.concatenate([d.labels for d in labelled])
    test = load_data(str(paths["test"]), seed=0, test_fraction=0.0, val_fraction=0.5)
    test_parts = [d for d in (test.train, test.val) if len(d)]
    xt = np.concatenate([extract_features(backbone, d, cache_dir=cache_dir, progress=False) for d in test_parts])
    # the test folder's class order is the same (same class folder names)
    yt = np.concatenate([d.labels for d in test_parts])
    assert list(test.train.class_names) == list(splits.train.class_names)
    out = {"logistic_regression": float(LogisticRegression(max_iter=1000).fit(x, y).score(xt, yt))}
    if with_self_training:
        unlabelled = load_unlabelled(str(paths["unlabelled"]))
        xu = extract_features(backbone, unlabelled, cache_dir=cache_dir, progress=False)
        started = time.perf_counter()
        model = SelfTrainingClassifier(LogisticRegression(max_iter=1000)).fit(
            np.concatenate([x, xu]), np.concatenate([y, np.full(len(xu), -1)]))
        out["self_training_classifier"] = float(model.score(xt, yt))
        out["self_training_seconds"] = round(time.perf_counter() - started, 1)
    return out


def frozen_baselines_112(paths: dict[str, Path], image_size: int) -> dict:
    """The scikit-learn rows on the features our rows start from: Lite0 at ``image_size`` px, the labelled pool of
    ``--protocol cv``, the run's test split and the unlabelled folder (the run's own cached features)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.semi_supervised import SelfTrainingClassifier

    from transferkit.backbones import create_backbone
    from transferkit.config import FitConfig
    from transferkit.data import load_unlabelled
    from transferkit.engine.features import extract_features
    from transferkit.evaluation.crossfit import plan_protocol

    splits = plan_protocol(FitConfig(data=str(paths["data"]), protocol="cv", image_size=image_size), 0)
    backbone = create_backbone("efficientnet_lite0", image_size=image_size)
    x, xt, xu = (extract_features(backbone, d, cache_dir=FEATURES, progress=False)
                 for d in (splits.train, splits.test, load_unlabelled(str(paths["unlabelled"]))))
    y, yt = splits.train.labels, splits.test.labels
    model = SelfTrainingClassifier(LogisticRegression(max_iter=1000)).fit(np.concatenate([x, xu]),
                                                                           np.concatenate([y, np.full(len(xu), -1)]))
    return {"logistic_regression_112": float(LogisticRegression(max_iter=1000).fit(x, y).score(xt, yt)),
            "self_training_classifier_112": float(model.score(xt, yt))}


def summary(values: list[float], form: str = ".4f") -> str:
    if len(values) == 1:
        return f"{values[0]:{form}}"
    return f"{statistics.mean(values):{form}} ± {statistics.stdev(values):{form}}"


def points(values: list[float]) -> str:
    """Paired differences in accuracy points (mean ± SD over seeds)."""
    return summary([100 * v for v in values], "+.1f") + " pts"


def pseudo_accuracy(row: dict) -> str:
    """", pseudo acc 0.900" where the unlabelled items' labels were given (--unlabelled-labels), else nothing."""
    value = row.get("pseudo_label_accuracy")
    return f", pseudo acc {value:.3f}" if value is not None else ""


def fewer_seeds(count: int, most: int) -> str:
    """" (first 2 seeds only)" for a row measured on fewer seeds than the table's fullest row, else nothing."""
    return f" (first {count} seed{'s' if count > 1 else ''} only)" if count < most else ""


def semi_text(cell: dict) -> str:
    rounds = cell["semi"].get("rounds") or []
    if not rounds:
        return ""
    teacher = cell["semi"].get("teacher_test_accuracy")
    prefix = f"teacher (same strategy, labels only) {teacher:.4f}; " if teacher is not None else ""
    if "round" in rounds[0]:
        parts = [f"r{r['round']}: {r['acceptance_rate']:.0%} accepted{pseudo_accuracy(r)}" for r in rounds]
    else:
        last = rounds[-1]
        parts = [f"tau {cell['semi'].get('tau')}", f"last epoch {last['acceptance_rate']:.0%} accepted"
                 f"{pseudo_accuracy(last)}"]
    return prefix + "; ".join(parts)


def part_fm(args: argparse.Namespace, argv: list[str] | None, started: float) -> None:
    size = ["--image-size", str(args.image_size)] if args.image_size else []
    common = ["--protocol", "cv", "--seed"]
    methods = {name: options for name, options in FM_METHODS.items() if wanted(args, name)}
    cells: dict[str, list[dict]] = {name: [] for name in methods}
    frozen: list[dict] = []  # filled as cells finish; the section is rendered from every cached cell
    tag = f"fm-u{args.pool}-px{args.image_size or 224}"
    if args.render:  # the section from the cells computed so far; the command is the one that computes them all
        command = ["--part", "fm", "--pool", str(args.pool), "--image-size", str(args.image_size), "--seeds",
                   str(args.seeds), "--timed"]
        render_fm(args, command, started, *finished_cells(tag, args.seeds, args.pool))
        return
    for seed in range(args.seeds):
        paths = write_data(seed, 20, args.pool, split_layout=True)
        frozen_key = f"frozen-fm-u{args.pool}-s{seed}"
        if wanted(args, "frozen"):
            frozen.append(cached(CACHE / "cells", frozen_key, lambda p=paths: frozen_baselines(p, FEATURES, True)))
        if wanted(args, "frozen-112") and seed == 0:
            cached(CACHE / "cells", f"frozen112-fm-u{args.pool}-s0",
                   lambda p=paths: frozen_baselines_112(p, args.image_size))
        for name, options in methods.items():
            extra = [] if "supervised" in name else ["--unlabelled", str(paths["unlabelled"]),
                                                     "--unlabelled-labels", str(paths["labels"])]
            key = cell_key(tag, name, seed)
            cells[name].append(cached(CACHE / "cells", key, lambda o=options, e=extra, s=seed, k=key, p=paths: fit_cell(
                p, CACHE / "runs" / k, [*common, str(s), *size, "--cache-dir", str(FEATURES), *o, *e], args.timed)))
            render_fm(args, argv, started, *finished_cells(tag, args.seeds, args.pool))
    render_fm(args, argv, started, *finished_cells(tag, args.seeds, args.pool))


def cell_key(tag: str, name: str, seed: int) -> str:
    return f"{tag}-{name.split(' (')[0].replace(' + ', '-').replace(' ', '-')}-s{seed}"


def finished_cells(tag: str, seeds: int, pool: int) -> tuple[dict[str, list[dict]], list[dict]]:
    """Every finished cell of this setting, also those another invocation (other --only rows) computed, so the
    section always shows every row measured so far."""
    def read(key: str) -> dict | None:
        path = CACHE / "cells" / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    cells = {name: [c for s in range(seeds) if (c := read(cell_key(tag, name, s))) is not None]
             for name in FM_METHODS}
    frozen = [c for s in range(seeds) if (c := read(f"frozen-fm-u{pool}-s{s}")) is not None]
    return cells, frozen


FM_METHODS = {
    "supervised finetune (no unlabelled data)": ["--strategy", "finetune"],
    "finetune + self-training": ["--strategy", "finetune", "--semi", "self-training"],
    "linear-probe + self-training": ["--strategy", "linear-probe", "--semi", "self-training"],
    "finetune + consistency": ["--strategy", "finetune", "--semi", "consistency"],
    "finetune + consistency, 4 passes": ["--strategy", "finetune", "--semi", "consistency", "--semi-epochs", "4"],
}


def wanted(args: argparse.Namespace, name: str) -> bool:
    """``--only``: a row's full name selects that row alone; other text selects every row whose name contains it."""
    return not args.only or any(o == name if o in FM_METHODS else o in name for o in args.only)


def render_fm(args: argparse.Namespace, argv: list[str] | None, started: float, cells: dict[str, list[dict]],
              frozen: list[dict]) -> None:
    """The results section from the cells finished so far (rewritten after every cell)."""
    cells = {name: runs for name, runs in cells.items() if runs}
    supervised = cells.get("supervised finetune (no unlabelled data)", [])
    lines = ["| method | test accuracy | vs supervised finetune (paired) | wall per run (s) | pseudo-labels |",
             "|---|---|---|---|---|"]
    for key, label in (("logistic_regression", "scikit-learn LogisticRegression, labelled only (Lite0 224 px)"),
                       ("self_training_classifier", "scikit-learn SelfTrainingClassifier (Lite0 224 px features)")):
        if not frozen or any(key not in f for f in frozen):
            continue
        values = [f[key] for f in frozen]
        diff = points([v - s["accuracy"] for v, s in zip(values, supervised)]) if supervised else ""
        lines.append(f"| {label}{fewer_seeds(len(values), len(supervised))} | {summary(values)} | {diff} | | |")
    extra = CACHE / "cells" / "frozen112-fm-u5000-s0.json"  # the same baselines on our rows' 112 px features
    if extra.is_file() and supervised:
        row = json.loads(extra.read_text())
        for key, label in (("logistic_regression_112", "scikit-learn LogisticRegression, labelled only (Lite0 112 px)"),
                           ("self_training_classifier_112", "scikit-learn SelfTrainingClassifier (Lite0 112 px "
                            "features, seed 0)")):
            lines.append(f"| {label} | {row[key]:.4f} | {points([row[key] - supervised[0]['accuracy']])} | | |")
    most = max(len(runs) for runs in cells.values()) if cells else 0
    for name, runs in cells.items():
        values = [r["accuracy"] for r in runs]
        diff = points([r["accuracy"] - s["accuracy"] for r, s in zip(runs, supervised)]) if supervised else ""
        wall = summary([r["wall_seconds"] for r in runs], ".0f")
        lines.append(f"| {name}{fewer_seeds(len(runs), most)} | {summary(values)} | {'' if 'supervised' in name else diff} | {wall} | "
                     f"{semi_text(runs[0])} |")
    commands = "\n".join(f"- {name}: `{runs[0]['command']}`" for name, runs in cells.items())
    loads = "; ".join(f"{name}: {runs[0]['load']}" for name, runs in cells.items())
    best = max((n for n in cells if "supervised" not in n and len(cells[n]) == most),  # same seeds: comparable means
               key=lambda n: statistics.mean(r["accuracy"] for r in cells[n]),
               default=None)
    verdict = ""
    if best and supervised:
        gain = statistics.mean(r["accuracy"] - s["accuracy"] for r, s in zip(cells[best], supervised))
        acc = statistics.mean(r["accuracy"] for r in cells[best])
        wall = max(r["wall_seconds"] for r in cells[best])
        verdict = (f"- Best semi-supervised row: **{best}**, {gain * 100:+.1f} points over supervised finetune "
                   f"(target >= +4: {'met' if gain >= 0.04 else 'NOT met'}), accuracy {acc:.4f} (target >= 0.86: "
                   f"{'met' if acc >= 0.86 else 'NOT met'}), slowest run {wall / 60:.1f} min wall (target <= 30: "
                   f"{'met' if wall <= 1800 else 'NOT met'}"
                   f"{'' if all(r.get('timed') for r in cells[best]) else '; NOT a timed run: niced, under load'}).\n")
    missing = [name for name in FM_METHODS if name not in cells] + (
        [] if frozen else ["scikit-learn LogisticRegression on Lite0 224 px features"]) + (
        [] if frozen and all("self_training_classifier" in f for f in frozen) else
        ["scikit-learn SelfTrainingClassifier on Lite0 224 px features (the 5,000 unlabelled images' 224 px features "
         "were not extracted in time)"])
    if not (CACHE / "cells" / "small-defaults-s0.json").is_file():
        missing.append("the small defaults case (`--part small`: 10 labels per class + 2,000 unlabelled, `fit --data "
                       "DIR --unlabelled DIR2` at 224 px against logistic regression)")
    if missing:
        verdict += f"- Not measured yet (no machine time before the deadline): {'; '.join(missing)}.\n"
    if frozen and cells.get("finetune + consistency"):
        pairs = list(zip(cells["finetune + consistency"], frozen))  # the seeds both have
        lr = statistics.mean(f["logistic_regression"] for _, f in pairs)
        ours = statistics.mean(r["accuracy"] for r, _ in pairs)
        verdict += (f"- finetune + consistency at 112 px vs the frozen 224 px logistic regression on the labels: "
                    f"{(ours - lr) * 100:+.1f} points on the {len(pairs)} seed(s) both were run on (supervised finetune "
                    "at 112 px is below that probe).\n")
    body = "\n".join(lines) + (
        f"\n\nFashion-MNIST: 20 labelled training images per class (seeded), {args.pool} other training images as "
        f"`--unlabelled` (their labels only in `--unlabelled-labels`, for the pseudo-label accuracy), 2,000 test "
        f"images (200 per class, fixed); EfficientNet-Lite0 at {args.image_size or 224} px for our rows, "
        f"`--protocol cv` (settings chosen in the supervised folds, one semi-supervised run on every label); "
        f"{len(supervised) or 1} seed(s){', mean ± SD' if len(supervised) > 1 else ''}. Our runs' wall times "
        f"{'were measured under `flock /work/wt/bench.lock` at normal priority' if args.timed else 'are NOT timed runs (nice 19, shared machine)'}."
        f"\n\n{verdict}"
        f"- Commands (DATA = the labelled folder with train/ and test/, UNLABELLED its pool):\n{commands}\n"
        f"- 1-minute load average before / after each run (seed 0): {loads}.\n" + notes(args))
    write_section(RESULTS, f"Semi-supervised fit --unlabelled (Fashion-MNIST, 20 labels per class + {args.pool} "
                  "unlabelled)", bench_command("bench.bench_unlabelled_semi", argv), started, body)


#: --part fm-cached: only the top 2 layer groups train at the backbone's 224 px, so the layers below run once per item
#: and consistency training reads their cached maps (engine/lower_maps.py)
CACHED_METHODS = {
    "supervised finetune, top 2 groups (no unlabelled data)": ["--strategy", "finetune", "--unfreeze", "2"],
    "finetune top 2 groups + consistency on cached maps": ["--strategy", "finetune", "--unfreeze", "2", "--semi",
                                                           "consistency"],
}


#: --part fm-grid: the frozen multi-stage grid features of auto's committee (Lite0 224 px: stage 3 over 7 x 7 cells,
#: stage 4 and the last map over 3 x 3), a linear probe with and without self-training on the unlabelled pool
GRID_OPTIONS = ["--strategy", "linear-probe", "--pool-stages", "3", "--pool-stages", "4", "--pool-grid", "7",
                "--pool-grid", "3", "--pool-grid", "3"]
GRID_METHODS = {
    "supervised linear probe, multi-stage grid features (no unlabelled data)": GRID_OPTIONS,
    "linear probe, multi-stage grid features + self-training": [*GRID_OPTIONS, "--semi", "self-training"],
}


def part_fm_cached(args: argparse.Namespace, argv: list[str] | None, started: float) -> None:
    """The 5,000-image benchmark at 224 px with the top two groups training (consistency on cached maps), against
    the same strategy without unlabelled data and scikit-learn's logistic regression on the same 224 px features."""
    part_fm_224(args, argv, started, CACHED_METHODS, "fmc", "top 2 groups on cached maps",
                "only the top 2 layer groups train (`--unfreeze 2`), so consistency training computes the layers below "
                "once per item and makes its weak / strong views on their maps")


def part_fm_grid(args: argparse.Namespace, argv: list[str] | None, started: float) -> None:
    """The 5,000-image benchmark at 224 px on auto's frozen multi-stage grid features: linear probe with and without
    self-training, against scikit-learn's logistic regression on the globally pooled 224 px features."""
    part_fm_224(args, argv, started, GRID_METHODS, "fmg", "frozen multi-stage grid features",
                "the backbone stays frozen; the probe reads stage 3 averaged over 7 x 7 cells, stage 4 and the last "
                "map over 3 x 3 (auto's committee features); self-training refits it on the labels plus accepted "
                "pseudo-labels (2 rounds)")


def part_fm_224(args: argparse.Namespace, argv: list[str] | None, started: float, all_methods: dict[str, list[str]],
                tag: str, title: str, description: str) -> None:
    """Rows ``all_methods`` (one named "supervised ..." is the baseline of the paired column) on the 5,000-image
    benchmark at the backbone's 224 px, with scikit-learn's logistic regression on the same 224 px features."""
    methods = {name: options for name, options in all_methods.items() if wanted(args, name)}
    cells: dict[str, list[dict]] = {name: [] for name in all_methods}
    frozen: list[dict] = []
    for seed in range(args.seeds):
        paths = write_data(seed, 20, args.pool, split_layout=True)
        frozen.append(cached(CACHE / "cells", f"frozen-lr224-fm-u{args.pool}-s{seed}",
                             lambda p=paths: frozen_baselines(p, FEATURES, False)))
        for name, options in all_methods.items():
            key = cell_key(f"{tag}-u{args.pool}", name, seed)
            if name not in methods and not (CACHE / "cells" / f"{key}.json").is_file():
                continue
            extra = [] if "supervised" in name else ["--unlabelled", str(paths["unlabelled"]),
                                                     "--unlabelled-labels", str(paths["labels"])]
            cells[name].append(cached(CACHE / "cells", key, lambda o=options, e=extra, s=seed, k=key, p=paths: fit_cell(
                p, CACHE / "runs" / k, ["--protocol", "cv", "--seed", str(s), "--cache-dir", str(FEATURES), *o, *e],
                args.timed)))
    cells = {name: runs for name, runs in cells.items() if runs}
    supervised = next((runs for name, runs in cells.items() if name.startswith("supervised")), [])
    lr = [f["logistic_regression"] for f in frozen]
    lines = ["| method | test accuracy | vs supervised, paired (points) | vs logistic regression, paired (points) | "
             "wall per run (s) | pseudo-labels |", "|---|---|---|---|---|---|",
             f"| scikit-learn LogisticRegression, labelled only (Lite0 224 px features) | {summary(lr)} | | | | |"]
    for name, runs in cells.items():
        values = [r["accuracy"] for r in runs]
        vs_sup = "" if "supervised" in name or not supervised else points(
            [r["accuracy"] - s["accuracy"] for r, s in zip(runs, supervised)])
        lines.append(f"| {name} | {summary(values)} | {vs_sup} | {points([v - b for v, b in zip(values, lr)])} | "
                     f"{summary([r['wall_seconds'] for r in runs], '.0f')} | {semi_text(runs[0])} |")
    per_seed = "\n".join(f"- {name} per seed: {', '.join(format(r['accuracy'], '.4f') for r in runs)}; command: "
                          f"`{runs[0]['command']}`" for name, runs in cells.items())
    body = "\n".join(lines) + (
        f"\n\nFashion-MNIST: the same labelled images (20 per class, seeded), {args.pool} unlabelled and 2,000 test "
        f"images as the 112 px section; EfficientNet-Lite0 at its own 224 px; {description}; "
        "`--protocol cv` (settings chosen in the supervised folds, one semi-supervised "
        f"run on every label); {len(frozen)} seed(s). Wall times: the whole `fit` command"
        f"{', timed under `flock /work/wt/bench.lock` at normal priority' if args.timed else ' (NOT timed runs)'}."
        f"\n\n{per_seed}\n" + notes(args))
    write_section(RESULTS, f"Semi-supervised fit --unlabelled at 224 px, {title} (Fashion-MNIST, "
                  f"20 labels per class + {args.pool} unlabelled)", bench_command("bench.bench_unlabelled_semi", argv),
                  started, body)


def notes(args: argparse.Namespace) -> str:
    """The ``--note`` lines (what the cached cells cannot say: the conditions they ran under)."""
    return note_lines(args.note)


def part_small(args: argparse.Namespace, argv: list[str] | None, started: float) -> None:
    rows = []
    for seed in range(args.seeds):
        paths = write_data(seed, 10, 2000, split_layout=False)
        frozen = cached(CACHE / "cells", f"small-frozen-s{seed}", lambda p=paths: frozen_baselines(p, FEATURES, True))

        def ours(p: dict[str, Path] = paths, s: int = seed) -> dict:
            out = CACHE / "runs" / f"small-defaults-s{s}"
            seconds = run_cli(["fit", "--data", str(p["data"]), "--unlabelled", str(p["unlabelled"]), "--out",
                               str(out), "--overwrite", "--no-progress", "--seed", str(s)], args.timed)
            proc = subprocess.run([sys.executable, "-m", "transferkit", "evaluate", "--model", str(out), "--data",
                                   str(p["test"]), "--json"], check=True, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": f"{ROOT.parent / 'src'}:{ROOT.parent}"})
            metrics = json.loads((out / "metrics.json").read_text())
            return {"accuracy": json.loads(proc.stdout)["accuracy"], "wall_seconds": round(seconds, 1),
                    "semi": metrics.get("semi", {}), "strategy": metrics["strategy"]}

        rows.append({"frozen": frozen, "ours": cached(CACHE / "cells", f"small-defaults-s{seed}", ours)})
    lr = [r["frozen"]["logistic_regression"] for r in rows]
    st = [r["frozen"]["self_training_classifier"] for r in rows]
    ours_acc = [r["ours"]["accuracy"] for r in rows]
    gain = [o - b for o, b in zip(ours_acc, lr)]
    body = "\n".join([
        "| method | test accuracy | vs logistic regression (paired) | wall (s) | pseudo-labels |", "|---|---|---|---|---|",
        f"| timm + scikit-learn LogisticRegression, labelled only (Lite0 224 px) | {summary(lr)} | | | |",
        f"| scikit-learn SelfTrainingClassifier (same features + unlabelled) | {summary(st)} | "
        f"{points([s - b for s, b in zip(st, lr)])} | | |",
        f"| `transferkit fit --data DIR --unlabelled DIR2` (defaults: {rows[0]['ours']['strategy']} + "
        f"{rows[0]['ours']['semi'].get('method')}) | {summary(ours_acc)} | {points(gain)} | "
        f"{summary([r['ours']['wall_seconds'] for r in rows], '.0f')} | {semi_text(rows[0]['ours'])} |",
    ]) + (f"\n\nA plain folder of 10 labelled Fashion-MNIST images per class + a folder of 2,000 unlabelled ones; "
          f"scored with `transferkit evaluate` on the 2,000 test images; {args.seeds} seed(s).\n\n"
          f"- Gain over logistic regression: {statistics.mean(gain) * 100:+.1f} points (target >= +3: "
          f"{'met' if statistics.mean(gain) >= 0.03 else 'NOT met'}).\n" + notes(args))
    write_section(RESULTS, "Semi-supervised fit --unlabelled with defaults (10 labels per class + 2,000 unlabelled)",
                  bench_command("bench.bench_unlabelled_semi", argv), started, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("fm", "fm-cached", "fm-grid", "small"), default="fm")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--pool", type=int, default=5000)
    parser.add_argument("--image-size", type=int, default=112, help="Our rows' resolution (0: the backbone's 224).")
    parser.add_argument("--only", action="append", help="Run only this row (its full name), or the rows whose name "
                        "contains this ('frozen': the scikit-learn rows).")
    parser.add_argument("--timed", action="store_true", help="Run each fit inside flock /work/wt/bench.lock (run "
                        "this process at normal priority: its wall times are claims).")
    parser.add_argument("--render", action="store_true", help="Only rewrite the section from the cached cells.")
    parser.add_argument("--note", action="append", default=[], help="A line added to the section (repeatable).")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    {"fm": part_fm, "fm-cached": part_fm_cached, "fm-grid": part_fm_grid, "small": part_small}[args.part](args, argv, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
