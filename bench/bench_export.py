"""ONNX export benchmark (issue 16): parity of ``transferkit export --format onnx`` with PyTorch, and the
onnxruntime / PyTorch CPU latency ratio.

Models, trained here once (small and fast; the run folders are cached): Fashion-MNIST, 20 labels per class, test
subset of 2,000 images, EfficientNet-Lite0 at 112 px with ``linear-probe``, ``finetune`` (3 epochs) and ``lora``
(r = 8, 3 epochs; merged into the base weights at export); and a MiniLM ``linear-probe`` on the tweets corpus (20
labels per class, 2,000 test tweets). Each is exported with ``transferkit.export.onnx.export_onnx``.

1. Parity (``--part parity``, run under nice: not timed): on the 2,000 test items, (a) the raw logits of the PyTorch
   network and of the ONNX graph on the same preprocessed arrays (max absolute difference, target <= 1e-4), and
   (b) the predicted classes of ``transferkit.load(run)`` against ``transferkit.load(export)``, each with its own
   preprocessing path (target: identical), with both accuracies.
2. Latency (``--part latency``, TIMED: run inside ``flock /work/wt/bench.lock``): PyTorch ``module(batch)`` under
   ``torch.no_grad`` against ``InferenceSession.run`` on the same preprocessed batch of 1 and of 32 items, the same
   thread count on both sides (``torch.set_num_threads`` / ``intra_op_num_threads``, inter-op 1), repetitions
   interleaved (torch, onnxruntime, torch, ...), medians. The probe, fine-tuned and merged LoRA graphs have the same
   architecture (EfficientNet-Lite0 + a linear head), so the image latency is measured on the probe.

    nice -n 19 env OMP_NUM_THREADS=1 python -m bench.bench_export --part parity
    flock /work/wt/bench.lock python -m bench.bench_export --part latency --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import bench_command, cached, write_section

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "export"
RESULTS = ROOT / "results"
TEST_ITEMS = 2000
LIMIT_PER_CLASS = 20
IMAGE_SIZE = 112
MODELS = {  # name -> (data, fit options)
    "probe": ("fashion-mnist", {"backbone": "efficientnet_lite0", "image_size": IMAGE_SIZE,
                                "strategy": "linear-probe"}),
    "finetune": ("fashion-mnist", {"backbone": "efficientnet_lite0", "image_size": IMAGE_SIZE, "strategy": "finetune",
                                   "epochs": 3, "batch_size": 16}),
    "lora": ("fashion-mnist", {"backbone": "efficientnet_lite0", "image_size": IMAGE_SIZE, "strategy": "lora",
                               "lora_r": 8, "epochs": 3, "batch_size": 16}),
    "minilm": ("tweets", {"backbone": "minilm", "strategy": "linear-probe"}),
}
LABELS = {"probe": "EfficientNet-Lite0 probe, 112 px", "finetune": "EfficientNet-Lite0 finetune (3 epochs), 112 px",
          "lora": "EfficientNet-Lite0 LoRA r=8 (3 epochs, merged), 112 px", "minilm": "MiniLM probe (tweets)"}


def prepare(name: str) -> tuple[Path, Path]:
    """(run folder, ONNX export folder) of model ``name``, trained and exported once."""
    import transferkit
    from transferkit.export.onnx import export_onnx
    from transferkit.rundir import is_output

    data, options = MODELS[name]
    run, export = CACHE / "runs" / name, CACHE / "onnx" / name
    if not is_output(run, "run"):
        transferkit.fit(data, limit_per_class=LIMIT_PER_CLASS, test_limit=200, out=str(run), progress=False,
                        overwrite=True, seed=0, **options)
    if not is_output(export, "export"):
        export_onnx(run, export, overwrite=True)
    return run, export


def test_items(name: str) -> tuple[list[Any], np.ndarray, list[str]]:
    """The 2,000 test items of the model's data (a fixed stratified subset), their labels and class names."""
    from transferkit.data import load_data

    data = MODELS[name][0]
    splits = load_data(data, limit_per_class=LIMIT_PER_CLASS, seed=0, test_limit=TEST_ITEMS)
    test = splits.test
    return [test.items[i] for i in range(len(test))], np.asarray(test.labels), list(test.class_names)


def parity(name: str) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    import transferkit
    from transferkit.export.onnx import GRAPH_FILE

    run, export = prepare(name)
    items, labels, classes = test_items(name)
    torch_model, onnx_model = transferkit.load(run, device="cpu"), transferkit.load(export)
    assert onnx_model.classes_ == torch_model.classes_ == classes
    from transferkit.strategies.lora import merge_lora

    module = torch_model.module.eval()
    if torch_model.config.get("strategy", {}).get("name") == "lora":
        merge_lora(module.backbone)  # the graph holds the merged weights: compare like with like
    session = ort.InferenceSession(str(export / GRAPH_FILE), providers=["CPUExecutionProvider"])
    inputs = onnx_model.config["inputs"]
    max_diff, graph_agree = 0.0, 0
    for start in range(0, len(items), 64):
        arrays = onnx_model.preprocessor(items[start:start + 64])
        batch = torch.from_numpy(arrays["pixels"]) if inputs == ["pixels"] else \
            {k: torch.from_numpy(arrays[k]) for k in inputs}
        with torch.no_grad():
            reference = module(batch).logits.float().numpy()
        got = session.run([onnx_model.config["outputs"][0]], {k: arrays[k] for k in inputs})[0]
        max_diff = max(max_diff, float(np.abs(reference - got).max()))
        graph_agree += int((reference.argmax(1) == got.argmax(1)).sum())
    torch_pred = transferkit.load(run, device="cpu").predict_proba(items).argmax(1)  # LoRA unmerged: as users run it
    onnx_pred = onnx_model.predict_proba(items).argmax(1)
    return {"n": len(items), "max_abs_logit_diff": max_diff, "graph_agreement": graph_agree / len(items),
            "identical_predictions": int((torch_pred == onnx_pred).sum()),
            "accuracy_torch": float((torch_pred == labels).mean()), "accuracy_onnx": float((onnx_pred == labels).mean()),
            "export_parity": __import__("json").loads((export / "parity.json").read_text())["max_abs_logit_diff"]}


def latency(name: str, threads: int, repeats: int) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    import transferkit
    from transferkit.export.onnx import GRAPH_FILE

    torch.set_num_threads(threads)
    run, export = prepare(name)
    items, _, _ = test_items(name)
    module = transferkit.load(run, device="cpu").module.eval()
    onnx_model = transferkit.load(export)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(export / GRAPH_FILE), options, providers=["CPUExecutionProvider"])
    inputs = onnx_model.config["inputs"]
    out: dict[str, Any] = {"threads": threads, "repeats": repeats}
    for size in (1, 32):
        arrays = onnx_model.preprocessor(items[:size])
        feed = {k: arrays[k] for k in inputs}
        batch = torch.from_numpy(arrays["pixels"]) if inputs == ["pixels"] else \
            {k: torch.from_numpy(arrays[k]) for k in inputs}
        timings: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        with torch.no_grad():
            for _ in range(3):  # warm-up
                module(batch)
                session.run(None, feed)
            for _ in range(repeats):  # interleaved
                started = time.perf_counter()
                module(batch)
                timings["torch"].append(time.perf_counter() - started)
                started = time.perf_counter()
                session.run(None, feed)
                timings["onnxruntime"].append(time.perf_counter() - started)
        medians = {k: statistics.median(v) for k, v in timings.items()}
        quartiles = {k: statistics.quantiles(v, n=4) for k, v in timings.items()}
        out[f"batch{size}"] = {"torch_ms": 1000 * medians["torch"], "onnx_ms": 1000 * medians["onnxruntime"],
                               "ratio": medians["onnxruntime"] / medians["torch"],
                               "torch_iqr_ms": [1000 * q for q in (quartiles["torch"][0], quartiles["torch"][2])],
                               "onnx_iqr_ms": [1000 * q for q in (quartiles["onnxruntime"][0],
                                                                  quartiles["onnxruntime"][2])]}
    out["load_average"] = os.getloadavg()
    return out


def report(parities: dict[str, Any], latencies: dict[tuple[str, int], Any], parity_command: str, latency_command: str) -> str:
    from importlib.metadata import version

    lines = [f"Models: Fashion-MNIST (20 labels per class, seed 0) at {IMAGE_SIZE} px on EfficientNet-Lite0, and a "
             "MiniLM probe on the tweets corpus (20 labels per class); evaluated on a fixed stratified subset of "
             f"{TEST_ITEMS:,} test items. onnxruntime {version('onnxruntime')}, torch {version('torch')}, opset 18. "
             "Training settings (`transferkit.fit`, seed 0, `limit_per_class=20`, other options at their defaults): "
             + "; ".join(f"{name}: `{options}`" for name, (_, options) in MODELS.items()) + ".",
             "", f"### Parity (`{parity_command}`, under nice)", "",
             "| model | max abs logit difference (same arrays) | identical predicted classes (each with its own "
             "preprocessing) | accuracy PyTorch | accuracy ONNX | parity.json at export |",
             "|---|---|---|---|---|---|"]
    for name, p in parities.items():
        lines.append(f"| {LABELS[name]} | {p['max_abs_logit_diff']:.2e} | {p['identical_predictions']}/{p['n']} | "
                     f"{p['accuracy_torch']:.4f} | {p['accuracy_onnx']:.4f} | {p['export_parity']:.2e} |")
    lines += ["", "Targets: identical predicted classes on 2,000 test images and max abs logit difference <= 1e-4."]
    if latencies:
        lines += ["", f"### CPU latency, onnxruntime vs PyTorch (`{latency_command}`, TIMED, under "
                  "`flock /work/wt/bench.lock`)", "",
                  "Same preprocessed batch on both sides, preprocessing not timed; medians of interleaved "
                  "repetitions (interquartile range in brackets).", "",
                  "| model | threads | batch | PyTorch ms | onnxruntime ms | ratio (onnxruntime / PyTorch) |",
                  "|---|---|---|---|---|---|"]
        for (name, _), lat in sorted(latencies.items()):
            for size in (1, 32):
                row = lat[f"batch{size}"]
                lines.append(f"| {LABELS[name]} | {lat['threads']} | {size} | {row['torch_ms']:.1f} "
                             f"[{row['torch_iqr_ms'][0]:.1f}-{row['torch_iqr_ms'][1]:.1f}] | {row['onnx_ms']:.1f} "
                             f"[{row['onnx_iqr_ms'][0]:.1f}-{row['onnx_iqr_ms'][1]:.1f}] | **{row['ratio']:.2f}** |")
        loads = ", ".join(f"{name} ({threads} threads): {lat['load_average'][0]:.1f}"
                          for (name, threads), lat in sorted(latencies.items()))
        lines += ["", f"1-minute load average at the end of each measurement: {loads} (2 cores; other engineers' "
                  "jobs run niced beside it)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("parity", "latency", "report"), default="parity")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--threads", type=int, default=2, help="threads on both sides (latency)")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved repetitions per batch size (latency)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFERKIT_PROGRESS", "0")
    started = time.perf_counter()
    names = [n for n in args.models.split(",") if n]
    command = bench_command("bench.bench_export", argv)
    if args.part == "parity":
        for name in names:
            cached(CACHE, f"parity-{name}", lambda name=name: parity(name))
    elif args.part == "latency":
        for name in names:
            cached(CACHE, f"latency-{name}-t{args.threads}", lambda name=name: latency(name, args.threads,
                                                                                        args.repeats))
        (CACHE / f"latency-command-t{args.threads}.txt").write_text(command)
    if args.part == "parity":
        (CACHE / "parity-command.txt").write_text(command)
    import json

    parities = {n: json.loads((CACHE / f"parity-{n}.json").read_text()) for n in MODELS
                if (CACHE / f"parity-{n}.json").is_file()}
    latencies = {(n, int(p.stem.rsplit("-t", 1)[1])): json.loads(p.read_text()) for n in MODELS
                 for p in sorted(CACHE.glob(f"latency-{n}-t*.json"))}
    read = lambda f: (CACHE / f).read_text() if (CACHE / f).is_file() else "-"  # noqa: E731
    write_section(RESULTS / "export.md", "ONNX export: parity and latency", command, started,
                  report(parities, latencies, read("parity-command.txt"),
                         "`, `".join(p.read_text() for p in sorted(CACHE.glob("latency-command-t*.txt")))))


if __name__ == "__main__":
    main()
