"""Multi-task benchmark (issue 6): on the built-in ``stars`` images, one shared small CNN with two heads (count the
points: classification; star size: 0.1 / 0.5 / 0.9 quantile regression) against one single-task model per
target, each trained with the same budget (same backbone, epochs, learning rate, data).

    .venv/bin/python -m bench.bench_multitask [--quick] [--epochs 6] [--limit-per-class 200] [--with-fixed]

The size-only model is the same two-head network with the count loss weighted 0 (``--task-weights 0,1``), so
its trunk learns from the size alone. Reported on the same fixed test split: count accuracy, size MAE (median
quantile), and the coverage of the 80% interval [q0.1, q0.9] (nominal 0.80).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cached

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "multitask"
RESULTS = ROOT / "results"


def _cell(name: str, compute):
    return cached(CACHE, name, compute)


MODELS = {
    "multi-task (uncertainty weighting)": {"task": ["count:classify", "size:quantile"],
                                           "loss_weighting": "uncertainty"},
    "multi-task (fixed weights 1, 1)": {"task": ["count:classify", "size:quantile"]},
    "count only": {"task": ["count:classify"]},
    "size only": {"task": ["count:classify", "size:quantile"], "task_weights": "0,1"},
}


def train_cell(options: dict, common: dict) -> dict:
    import transferkit

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        run = transferkit.fit("stars", out=str(Path(folder) / "run"), **common, **options)
        seconds = time.perf_counter() - start
    tasks = run.metrics["tasks"]
    size = tasks.get("size", {})
    return {"count_accuracy": tasks["count"]["accuracy"], "size_mae": size.get("mae"),
            "coverage": size.get("coverage"), "interval_width": size.get("mean_interval_width"),
            "n_test": tasks["count"]["n"], "seconds": seconds, "weights": run.metrics["task_weighting"]}


def run_benchmark(epochs: int, limit: int, image_size: int, quick: bool, with_fixed: bool) -> str:
    common = {"backbone": "small_cnn", "strategy": "finetune", "head_init": "random", "freeze_bn": False,
              "backbone_lr": 3e-3, "lr": 3e-3, "epochs": epochs, "batch_size": 32, "image_size": image_size,
              "limit_per_class": limit, "augment": False, "early_stopping": 0, "quantiles": "0.1,0.5,0.9",
              "threads": 1, "device": "cpu", "progress": False}
    tag = f"q{int(quick)}-e{epochs}-k{limit}-s{image_size}"
    rows = {}
    for label, options in MODELS.items():
        if "fixed" in label and not with_fixed:
            continue
        rows[label] = _cell(f"{tag}-{label.split(' (')[0].replace(' ', '_')}-{options.get('loss_weighting', 'fixed')}",
                            lambda o=options: train_cell(o, common))
    n_test = next(iter(rows.values()))["n_test"]
    lines = [f"stars: {limit} labelled images per class (6 classes: 3..8 points; validation carved from them), "
             f"{n_test} test images, {image_size} px, small_cnn from scratch, {epochs} epochs each, AdamW 3e-3, "
             "batch 32, one seed.", "",
             "| model | count accuracy | size MAE (px) | 80% interval coverage | mean interval width (px) | "
             "train time (s) |", "|---|---|---|---|---|---|"]
    for label, r in rows.items():
        size = "-" if r["size_mae"] is None else f"{r['size_mae']:.3f}"
        coverage = "-" if r["coverage"] is None else f"{r['coverage']:.3f}"
        width = "-" if r["interval_width"] is None else f"{r['interval_width']:.2f}"
        count = "-" if label == "size only" else f"{r['count_accuracy']:.4f}"
        lines.append(f"| {label} | {count} | {size} | {coverage} | {width} | {r['seconds']:.0f} |")
    multi, count_only, size_only = rows["multi-task (uncertainty weighting)"], rows["count only"], rows["size only"]
    single_time = count_only["seconds"] + size_only["seconds"]
    lines += ["",
              f"Multi-task (uncertainty) vs single-task models: count accuracy {multi['count_accuracy']:.4f} vs "
              f"{count_only['count_accuracy']:.4f}; size MAE {multi['size_mae']:.3f} vs {size_only['size_mae']:.3f} "
              f"px; one network instead of two, training time ratio {multi['seconds'] / single_time:.2f}.",
              f"Learned weights (uncertainty): {json.dumps(multi['weights'].get('final_weights', {}))}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 epochs, 30 images per class, 24 px (smoke run)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--limit-per-class", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--with-fixed", action="store_true", help="also train the fixed-weight multi-task model")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFERKIT_PROGRESS", "0")
    epochs, limit, size = (2, 30, 24) if args.quick else (args.epochs, args.limit_per_class, args.image_size)
    start = time.perf_counter()
    body = run_benchmark(epochs, limit, size, args.quick, args.with_fixed or args.quick)
    command = "python -m bench.bench_multitask" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    section = (f"## Multi-task learning: stars (issue 6)\n\nCommand: `{command}` ({platform.machine()}, "
               f"{os.cpu_count()} cores shared; {time.perf_counter() - start:.0f} s this run, cached cells reused)"
               f"\n\n{body}")
    target = RESULTS / "quick" if args.quick else RESULTS
    target.mkdir(parents=True, exist_ok=True)
    (target / "multitask.md").write_text(section + "\n")
    print(section)


if __name__ == "__main__":
    main()
