"""Few-labels benchmark (issue 14): a plain folder of K labelled Fashion-MNIST images per class (no split
folders), every model scored on the same separate 1,000 official test images (a fixed stratified subset).

Rows are *cells*: a function ``cell(seed, k) -> {"accuracy", "seconds", ...}`` registered in :data:`CELLS`; every
cell of a seed sees the same folder (K images per class drawn with that seed from the official training set),
and every seed the same test images. Rows here:

* ``timm+sklearn``: the user's ten-line pipeline: timm ``tf_efficientnet_lite0`` with the same ImageNet weights,
  timm's eval transform at 224 px (``resolve_data_config`` + ``create_transform``), pooled features, scikit-learn
  ``LogisticRegression(max_iter=1000)`` (C = 1) on all K x 10 labels.
* ``fit``: ``transferkit fit --data DIR`` with every default (linear probe, ``--protocol auto``: cv here).
* ``fit holdout``: the same with ``--protocol holdout`` (the split used before: 20% test, 15% validation carved
  from the folder; trains on the remaining 65%).
* ``fit probe C=1``: ``--protocol cv`` with the probe's C fixed at 1 (``--probe-c 1`` and no choice): isolates
  what choosing C in the folds adds (implemented as a cell that refits the cv run's head with C = 1).

More rows (other strategies, ``auto``) are added by registering cells. Statistics per row: mean and sample SD
over seeds; for each row against ``timm+sklearn`` the paired differences per seed (same folder, same test
images), their mean and SD; the binomial standard error of one accuracy on 1,000 test items is about 0.013.

    .venv/bin/python -m bench.bench_fewlabels [--seeds 3] [--k 10] [--cells fit,timm+sklearn] [--threshold]

``--threshold`` adds the section that measures the ``auto`` rule's class-size threshold: ``fit`` under cv and
under holdout at K = 10, 20, 50 (and 100 with ``--threshold-k``). Finished cells are cached as JSON under
bench/cache/fewlabels, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import bench_command, cached, write_section

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "fewlabels"
RESULTS = ROOT / "results"
TEST_LIMIT = 1000  # binomial standard error about 0.013 at 80% accuracy
BASELINE = "timm+sklearn"

CELLS: dict[str, Callable[[int, int], dict[str, Any]]] = {}


def cell(name: str):
    """Register ``function(seed, k) -> {"accuracy": ..., "seconds": ...}`` as the row ``name``."""
    def register(function):
        CELLS[name] = function
        return function

    return register


# --- data --------------------------------------------------------------------------------------------------------


def labelled_folder(seed: int, k: int) -> Path:
    """A plain folder ``<class>/<id>.png`` of K Fashion-MNIST training images per class (drawn with ``seed``)."""
    from transferkit.data import load_data

    folder = CACHE / "data" / f"fm{k}-seed{seed}"
    if folder.is_dir():
        return folder
    splits = load_data("fashion-mnist", limit_per_class=k, seed=seed)
    tmp = folder.with_name(folder.name + ".partial")
    for part in (splits.train, splits.val):
        for item, label, item_id in zip(part.items, part.labels, part.ids):
            path = tmp / part.class_names[label].replace("/", "-") / (item_id.replace("/", "_").replace("[", "-")
                                                                      .replace("]", "") + ".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            item.save(path)
    tmp.rename(folder)
    return folder


@functools.lru_cache(maxsize=1)
def test_data():
    """The fixed stratified 1,000-image subset of the official test set (the same for every seed and row)."""
    from transferkit.data import load_data

    return load_data("fashion-mnist", limit_per_class=1, test_limit=TEST_LIMIT).test


def folder_class_names(folder: Path) -> list[str]:
    from transferkit.data.images import read_image_folder

    return list(read_image_folder(folder)["all"].class_names)


def test_labels_for(class_names: list[str]) -> np.ndarray:
    """Test labels re-indexed to a folder's class order (folder class names are sorted; the built-in's are not)."""
    test = test_data()
    index = {name.replace("/", "-"): i for i, name in enumerate(class_names)}
    return np.array([index[test.class_names[y].replace("/", "-")] for y in test.labels])


# --- cells -------------------------------------------------------------------------------------------------------


def run_accuracy(run: Path) -> float:
    """Test accuracy of a run folder: the model's own features of the test images (cached by weights), its head."""
    import torch

    from transferkit.engine.features import extract_features
    from transferkit.model import load_model

    module, _ = load_model(run)
    features = extract_features(module.backbone, test_data(), batch_size=64, cache_dir=CACHE / "features",
                                progress=False)
    with torch.no_grad():
        logits = module.forward_head(torch.as_tensor(features)).logits
    predictions = logits.argmax(-1).cpu().numpy()
    return float((predictions == test_labels_for(list(module.class_names))).mean())


def fit_cell(seed: int, k: int, name: str, **options: Any) -> dict[str, Any]:
    import transferkit

    folder = labelled_folder(seed, k)
    out = CACHE / "runs" / f"{name}-k{k}-seed{seed}"
    started = time.perf_counter()
    if (out / "metrics.json").is_file():  # finished by an interrupted bench run: reuse it
        import json

        metrics = json.loads((out / "metrics.json").read_text())
        seconds = metrics["train_seconds"]
    else:
        metrics = transferkit.fit(str(folder), out=str(out), overwrite=True, progress=False,
                                  cache_dir=str(CACHE / "features"), seed=seed, **options).metrics
        seconds = time.perf_counter() - started
    return {"accuracy": run_accuracy(out), "seconds": round(seconds, 1), "estimate": metrics["accuracy"],
            "estimate_split": metrics["accuracy_split"], "n_train_final": metrics.get("n_train_final",
                                                                                      metrics["dataset_sizes"]["train"]),
            "chosen": metrics.get("cv", {}).get("chosen")}


@cell("fit")
def cell_fit(seed: int, k: int) -> dict[str, Any]:
    return fit_cell(seed, k, "fit")


@cell("fit holdout")
def cell_fit_holdout(seed: int, k: int) -> dict[str, Any]:
    return fit_cell(seed, k, "holdout", protocol="holdout")


@cell("fit cv C=1 fixed")
def cell_fit_c1(seed: int, k: int) -> dict[str, Any]:
    """The cv run's refit with C = 1 instead of the C chosen in the folds (same features, all labels)."""
    import torch

    from transferkit.data.images import read_image_folder
    from transferkit.engine.features import extract_features
    from transferkit.engine.solvers import fit_logistic_regression
    from transferkit.model import load_model

    cached(CACHE, f"fit-k{k}-seed{seed}", lambda: cell_fit(seed, k))
    module, _ = load_model(CACHE / "runs" / f"fit-k{k}-seed{seed}")
    data = read_image_folder(labelled_folder(seed, k))["all"]
    started = time.perf_counter()
    x = extract_features(module.backbone, data, cache_dir=CACHE / "features", progress=False)
    weight, bias = fit_logistic_regression(x, data.labels, data.num_classes, c=1.0)
    test = extract_features(module.backbone, test_data(), cache_dir=CACHE / "features", progress=False)
    predictions = (torch.as_tensor(test) @ weight.T + bias).argmax(-1).numpy()
    return {"accuracy": float((predictions == test_labels_for(list(data.class_names))).mean()),
            "seconds": round(time.perf_counter() - started, 1)}


@cell("fit --strategy lora")
def cell_fit_lora(seed: int, k: int) -> dict[str, Any]:
    """``transferkit fit --data DIR --strategy lora`` with every default (LP-FT head, the strategy's defaults)."""
    return fit_cell(seed, k, "lora", strategy="lora")


#: ``flock`` lock file of the timed auto commands (--lock)
LOCK: list[str] = []


def run_auto_timed(seed: int, k: int) -> tuple[Path, float]:
    """``transferkit auto --data DIR --time-budget 10m`` unless its run folder exists (inside ``flock`` with
    --lock): the run folder and the command's wall time."""
    import json

    from bench.common import timed_command
    from transferkit.rundir import is_output

    out = CACHE / "runs" / f"auto10m-k{k}-seed{seed}"
    wall_file = CACHE / "runs" / f"auto10m-k{k}-seed{seed}.wall.json"
    if not is_output(out, "auto"):
        import shutil

        features = CACHE / "features-auto" / f"k{k}-seed{seed}"  # empty: auto extracts as a new user's run would
        shutil.rmtree(features, ignore_errors=True)
        result, wall = timed_command([sys.executable, "-m", "transferkit", "auto", "--data",
                                      str(labelled_folder(seed, k)), "--time-budget", "10m", "--seed", str(seed),
                                      "--out", str(out), "--overwrite", "--cache-dir", str(features)],
                                     LOCK[0] if LOCK else None, wall_file.with_suffix(".log"))
        if result.returncode != 0:
            raise RuntimeError(f"auto failed: {result.stderr[-2000:]}")
        wall_file.write_text(json.dumps({"wall_seconds": wall}))
    return out, json.loads(wall_file.read_text())["wall_seconds"]


@cell("auto 10m")
def cell_auto(seed: int, k: int) -> dict[str, Any]:
    """``transferkit auto --data DIR --time-budget 10m`` (the whole command's wall time in ``seconds``)."""
    import json

    import transferkit
    from bench.bench_auto import test_probabilities

    out, seconds = run_auto_timed(seed, k)
    model = transferkit.load(out)
    probabilities = test_probabilities(model, test_data(), CACHE / "features")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"accuracy": float((probabilities.argmax(1) == test_labels_for(model.classes_)).mean()),
            "seconds": round(seconds, 1), "estimate": metrics["accuracy"], "estimate_split": "cv",
            "n_train_final": metrics["n_train_final"], "chosen": metrics["strategy"]}


@cell(BASELINE)
def cell_timm_sklearn(seed: int, k: int) -> dict[str, Any]:
    """timm model + timm eval transform + scikit-learn logistic regression on every labelled image."""
    from sklearn.linear_model import LogisticRegression

    from transferkit.data.images import read_image_folder

    started = time.perf_counter()
    data = read_image_folder(labelled_folder(seed, k))["all"]
    x = timm_features(data.items)
    classifier = LogisticRegression(max_iter=1000).fit(x, data.labels)
    seconds = time.perf_counter() - started
    test_x = cached_array("timm-test-features", lambda: timm_features(test_data().items))
    predictions = classifier.predict(test_x)
    return {"accuracy": float((predictions == test_labels_for(list(data.class_names))).mean()),
            "seconds": round(seconds, 1)}


def timm_features(images) -> np.ndarray:
    import timm
    import torch

    from transferkit.backbones.efficientnet import lukemelas_to_timm, weights_path

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(lukemelas_to_timm(torch.load(weights_path(0), map_location="cpu", weights_only=True),
                                            model))
    model.reset_classifier(0)
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            batch = torch.stack([transform(images[i].convert("RGB")) for i in range(start, min(start + 64,
                                                                                                len(images)))])
            chunks.append(model(batch).numpy())
    return np.concatenate(chunks)


def cached_array(name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    path = CACHE / f"{name}.npy"
    if path.is_file():
        return np.load(path)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), value)
    path.with_suffix(".tmp.npy").replace(path)
    return value


# --- statistics and the report -----------------------------------------------------------------------------------


def cell_key(name: str, seed: int, k: int) -> str:
    return f"{name.replace(' ', '_').replace(',', '').replace('=', '')}-k{k}-seed{seed}"


def run_cells(names: list[str], seeds: int, k: int) -> dict[str, dict[int, dict[str, Any]]]:
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for seed in range(seeds):  # seed-major: every row has seed 0 before any row gets seed 1
        for name in names:
            results.setdefault(name, {})[seed] = cached(CACHE, cell_key(name, seed, k),
                                                        lambda n=name, s=seed: CELLS[n](s, k))
            logging.getLogger("bench").info("%s seed %d: %s", name, seed, results[name][seed])
    return results


def finished_cells(names: list[str], seeds: int, k: int) -> dict[str, dict[int, dict[str, Any]]]:
    """The seeds of ``names`` that are already in the cache (rows too slow to finish for every seed)."""
    import json

    found = {name: {seed: json.loads((CACHE / f"{cell_key(name, seed, k)}.json").read_text())
                    for seed in range(seeds) if (CACHE / f"{cell_key(name, seed, k)}.json").is_file()}
             for name in names}
    return {name: by_seed for name, by_seed in found.items() if by_seed}


def paired(first: dict[int, dict[str, Any]], second: dict[int, dict[str, Any]]) -> tuple[list[float], str]:
    """Per-seed differences ``first - second`` and ``mean (sd)`` text with a paired t p-value when n >= 2."""
    from scipy.stats import t

    seeds = sorted(set(first) & set(second))
    diffs = [first[s]["accuracy"] - second[s]["accuracy"] for s in seeds]
    if len(diffs) < 2:
        return diffs, f"{diffs[0]:+.4f}" if diffs else "-"
    mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    p = float(2 * t.sf(abs(mean) / (sd / math.sqrt(len(diffs))), len(diffs) - 1)) if sd > 0 else float("nan")
    return diffs, f"{mean:+.4f} (sd {sd:.4f}, paired t p = {p:.2g})"


def table(results: dict[str, dict[int, dict[str, Any]]], baseline: str | None) -> str:
    lines = ["| row | mean test accuracy | seed SD | per seed | cv estimate (mean) | train s (mean) | "
             f"paired difference vs {baseline} (per seed; mean) |", "|---|---|---|---|---|---|---|"]
    for name, by_seed in results.items():
        acc = np.array([by_seed[s]["accuracy"] for s in sorted(by_seed)])
        sd = f"{acc.std(ddof=1):.4f}" if len(acc) > 1 else "-"
        estimates = [r["estimate"] for r in by_seed.values() if r.get("estimate_split") == "cv"]
        estimate = f"{np.mean(estimates):.4f}" if estimates else "-"
        diffs, text = paired(by_seed, results[baseline]) if baseline in results and name != baseline else ([], "-")
        seconds = np.mean([r["seconds"] for r in by_seed.values()])
        lines.append(f"| {name} | {acc.mean():.4f} | {sd} | {', '.join(f'{a:.4f}' for a in acc)} | {estimate} | "
                     f"{seconds:.1f} | {', '.join(f'{d:+.4f}' for d in diffs) or '-'}; {text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--k", type=int, default=10, help="Labelled images per class.")
    parser.add_argument("--cells", default=",".join(CELLS), help="Comma-separated rows (default: all registered).")
    parser.add_argument("--cached-cells", default="", help="Comma-separated rows shown with the seeds already "
                        "cached only (never computed here): rows too slow to run for every seed.")
    parser.add_argument("--note", action="append", default=[], help="A line added to the report (repeatable).")
    parser.add_argument("--threshold", action="store_true", help="Also the cv-versus-holdout threshold section.")
    parser.add_argument("--threshold-k", default="10,20,50", help="K values of the threshold section.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on shared, busy cores).")
    parser.add_argument("--lock", help="Run each timed auto command inside `flock LOCK`.")
    parser.add_argument("--timed-only", action="store_true", help="Only run the timed auto commands (at this "
                        "process's priority); score and report later with a niced invocation without this flag.")
    args = parser.parse_args(argv)
    if args.lock:
        LOCK.append(args.lock)
    if args.timed_only:
        for seed in range(args.seeds):
            run_auto_timed(seed, args.k)
        return
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    names = [n.strip() for n in args.cells.split(",") if n.strip()]
    unknown = [n for n in names if n not in CELLS]
    if unknown:
        raise SystemExit(f"unknown cells {unknown}; known: {list(CELLS)}")
    results = run_cells(names, args.seeds, args.k)
    results.update(finished_cells([n.strip() for n in args.cached_cells.split(",") if n.strip()], args.seeds, args.k))
    body = [f"A plain folder of {args.k} labelled Fashion-MNIST images per class (no split folders; drawn per seed "
            f"from the official training set), scored on the same {TEST_LIMIT} official test images (fixed "
            "stratified subset) for every row and seed. EfficientNet-Lite0 at 224 px throughout. The binomial "
            f"standard error of one accuracy on {TEST_LIMIT} items is about "
            f"{math.sqrt(0.8 * 0.2 / TEST_LIMIT):.3f}.", "", table(results, BASELINE)]
    chosen = [r.get("chosen") for r in results.get("fit", {}).values() if r.get("chosen")]
    if chosen:
        body += ["", f"Settings chosen inside the folds by `fit` (per seed): {chosen}"]
    body += [f"\n{note}" for note in args.note]
    if args.threshold:
        body += ["", "### Threshold of `--protocol auto`: cv against holdout by class size", "",
                 "The same two `fit` rows (linear probe) at several K; `auto` switches from cv to holdout at "
                 "K = 50.", ""]
        for k in [int(v) for v in args.threshold_k.split(",")]:
            section = run_cells(["fit", "fit holdout"], args.seeds, k)
            body += [f"K = {k} per class:", "", table(section, "fit holdout"), ""]
    write_section(RESULTS / "fewlabels.md", "Few labels: a plain folder, default fit against timm + scikit-learn",
                  bench_command("bench.bench_fewlabels", argv), started, "\n".join(body))


if __name__ == "__main__":
    main()
