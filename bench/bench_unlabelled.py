"""Self-taught clustering benchmark (issue 15): 2,000 Fashion-MNIST test images (200 per class, seeded), NMI / ARI
against the true classes of

* ``raw pixels + k-means``: scikit-learn ``KMeans(10, n_init=10)`` on the 784 pixel values / 255;
* ``backbone features + k-means``: the bare pipeline a user would write: EfficientNet-Lite0 pooled features
  (224 px, the same cached features ``cluster`` uses), scikit-learn ``KMeans(10, n_init=10)``, no normalisation;
* ``transferkit cluster --k 10``: the command (EfficientNet-Lite0, L2-normalised features, k-means);
* ``transferkit cluster --k auto``: k chosen by silhouette (reported: the chosen k and its distance from 10).

Each k-means row is run with seeds 0..S-1 on the same features (mean and sample SD shown); the images are written
once to bench/cache/unlabelled/fm-test2000 (PNG files + labels.csv with columns item,label).

    python -m bench.bench_unlabelled [--seeds 3] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import bench_command, cached, write_section

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "unlabelled"
RESULTS = ROOT / "results" / "unlabelled.md"


def write_images(n: int) -> tuple[Path, Path]:
    from PIL import Image

    from transferkit.data.builtin import builtin_arrays

    folder = CACHE / f"fm-test{n}"
    labels_csv = CACHE / f"fm-test{n}-labels.csv"
    if labels_csv.is_file():
        return folder, labels_csv
    images, labels, class_names, test_index = builtin_arrays("fashion-mnist")
    rng = np.random.default_rng(0)
    chosen = np.concatenate([rng.choice(test_index[labels[test_index] == c], n // 10, replace=False)
                             for c in range(10)])
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["item,label"]
    for i in chosen:
        name = f"{int(i - test_index[0]):05d}.png"
        Image.fromarray(np.asarray(images[i])).save(folder / name)
        rows.append(f"{name},{class_names[labels[i]]}")
    labels_csv.write_text("\n".join(rows) + "\n")
    return folder, labels_csv


def truth_of(labels_csv: Path) -> tuple[list[str], list[str]]:
    lines = labels_csv.read_text().splitlines()[1:]
    return [line.split(",")[0] for line in lines], [line.split(",")[1] for line in lines]


def kmeans_nmi(x: np.ndarray, truth: list[str], seed: int) -> dict[str, float]:
    from sklearn.cluster import KMeans

    from transferkit.selftaught.cluster import agreement

    return agreement(truth, KMeans(n_clusters=10, n_init=10, random_state=seed).fit(x).labels_)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    folder, labels_csv = write_images(args.n)
    items, truth = truth_of(labels_csv)
    features_dir = CACHE / "features"

    def cluster_cell(k: str, seed: int) -> dict:
        from transferkit.cli.main import main as cli

        out = CACHE / "runs" / f"k{k}-s{seed}"
        command = ["cluster", "--data", str(folder), "--out", str(out), "--k", k, "--labels", str(labels_csv),
                   "--seed", str(seed), "--cache-dir", str(features_dir), "--overwrite", "--no-progress"]
        begun = time.perf_counter()
        assert cli(command) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        return {"nmi": metrics["nmi"], "ari": metrics["ari"], "k": metrics["k"], "seconds": time.perf_counter() - begun,
                "silhouette_by_k": metrics["silhouette_by_k"]}

    rows: dict[str, list[dict]] = {"transferkit cluster --k 10": [], "raw pixels + k-means": [],
                                   "backbone features + k-means": []}
    for seed in range(args.seeds):
        rows["transferkit cluster --k 10"].append(cached(CACHE, f"cluster-k10-s{seed}", lambda s=seed: cluster_cell("10", s)))
    from transferkit.backbones import create_backbone
    from transferkit.data import load_unlabelled
    from transferkit.engine.features import extract_features

    data = load_unlabelled(folder)
    order = {item: i for i, item in enumerate(data.ids)}
    positions = [order[item] for item in items]
    features = extract_features(create_backbone("efficientnet_lite0"), data, cache_dir=features_dir, progress=False)
    from transferkit.data.images import open_image

    pixels = np.stack([np.asarray(open_image(folder / item), np.float32).reshape(-1) / 255.0 for item in items])
    for seed in range(args.seeds):
        rows["raw pixels + k-means"].append(cached(CACHE, f"pixels-s{seed}", lambda s=seed: kmeans_nmi(pixels, truth, s)))
        rows["backbone features + k-means"].append(
            cached(CACHE, f"features-s{seed}", lambda s=seed: kmeans_nmi(features[positions], truth, s)))
    auto = cached(CACHE, "cluster-kauto-s0", lambda: cluster_cell("auto", 0))

    def summary(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    lines = ["| method | NMI (mean ± SD over seeds) | ARI |", "|---|---|---|"]
    for name, cells in rows.items():
        lines.append(f"| {name} | {summary([c['nmi'] for c in cells])} | {summary([c['ari'] for c in cells])} |")
    lines.append(f"| transferkit cluster --k auto (seed 0) | {auto['nmi']:.3f} | {auto['ari']:.3f} |")
    ours = statistics.mean(c["nmi"] for c in rows["transferkit cluster --k 10"])
    pixels_nmi = statistics.mean(c["nmi"] for c in rows["raw pixels + k-means"])
    bare = statistics.mean(c["nmi"] for c in rows["backbone features + k-means"])
    scores = ", ".join(f"k={k}: {s:.3f}" for k, s in auto["silhouette_by_k"].items())
    body = "\n".join(lines) + (
        f"\n\n{args.n} Fashion-MNIST test images (200 per class), EfficientNet-Lite0 at 224 px, {args.seeds} seeds.\n\n"
        f"- `cluster` vs raw-pixel k-means: {ours - pixels_nmi:+.3f} NMI (target >= +0.10: "
        f"{'met' if ours - pixels_nmi >= 0.10 else 'NOT met'}).\n"
        f"- `cluster` vs k-means on the same backbone features: {ours - bare:+.3f} NMI (target: not below: "
        f"{'met' if ours - bare >= 0 else 'NOT met'}).\n"
        f"- `--k auto` chose k = {auto['k']} ({auto['k'] - 10:+d} from the 10 classes); silhouette per k: {scores}.\n")
    write_section(RESULTS, "Self-taught clustering (Fashion-MNIST)", bench_command("bench.bench_unlabelled", argv),
                  started, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
