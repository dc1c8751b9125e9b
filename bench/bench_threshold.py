"""The class-size threshold of ``--protocol auto`` (cv below it, holdout from it on), measured cheaply with the
linear probe (issue 14).

Fashion-MNIST, EfficientNet-Lite0 at 224 px, frozen features: those bench/bench_auto.py already cached for its 2,000
fixed official test images (so this costs no feature extraction). They are split once, per class, into a pool
(100 per class) and an evaluation half (the other 1,000 images). For K in 10, 20, 50, 100 labelled images per class
and several seeds, K per class are drawn from the pool (with the seed), and the probe is trained as ``fit`` trains
it under each protocol:

* ``cv``: k = min(5, K)-fold stratified cross-validation chooses C in {0.1, 1, 10, 100} (pooled out-of-fold
  accuracy, ties: lower cross-entropy), then the probe is refit on all K x 10 labels with that C;
* ``holdout``: ``fit``'s split of the same labels (20% test, 15% validation, 65% train, stratified); C is chosen on
  the validation split, the probe trains on the 65%.

Both are scored on the same 1,000 evaluation images. Nothing here is chosen on them: the protocols are fixed. The gap
cv - holdout (paired per seed) says what cv buys at each K; for the probe, cv costs nothing but k extra
logistic-regression fits, for trained strategies k training runs.

    python -m bench.bench_threshold [--seeds 5] [--ks 10,20,50,100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.bench_auto import CACHE, RESULTS, splits_for
from bench.common import bench_command, write_section

C_GRID = (0.1, 1.0, 10.0, 100.0)


def features(data) -> np.ndarray:
    from transferkit.backbones import create_backbone
    from transferkit.engine.features import extract_features

    backbone = create_backbone("efficientnet_lite0", image_size=224)
    return extract_features(backbone, data, cache_dir=CACHE / "features", progress=False)


def probe(x: np.ndarray, y: np.ndarray, c: float, num_classes: int):
    from transferkit.engine.solvers import fit_logistic_regression

    weight, bias = fit_logistic_regression(x, y, num_classes, c=c, max_iter=100)
    return lambda z: (z @ weight.double().numpy().T + bias.double().numpy())


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def cv_choice(x: np.ndarray, y: np.ndarray, seed: int, num_classes: int) -> float:
    from transferkit.evaluation.protocol import default_k, stratified_folds

    folds = stratified_folds(y, default_k(y), 1, seed)
    scores = []
    for c in C_GRID:
        oof = np.zeros((len(y), num_classes))
        for train, val in folds:
            oof[val] = softmax(probe(x[train], y[train], c, num_classes)(x[val]))
        loss = -np.mean(np.log(np.clip(oof[np.arange(len(y)), y], 1e-12, None)))
        scores.append((-(oof.argmax(1) == y).mean(), loss))
    return C_GRID[min(range(len(C_GRID)), key=lambda i: scores[i])]


def holdout_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions: per class 20% test (dropped), 15% validation, the rest train; at least one
    item of each class in each part when the class has 3 or more."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(y):
        items = rng.permutation(np.flatnonzero(y == cls))
        n_test = max(1, round(0.2 * len(items)))
        n_val = max(1, round(0.15 * len(items)))
        val += list(items[n_test:n_test + n_val])
        train += list(items[n_test + n_val:])
    return np.asarray(train), np.asarray(val)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ks", default="10,20,50,100")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    ks = [int(k) for k in args.ks.split(",")]
    _, images = splits_for("fashion", 0)
    x_all, y_all = features(images), images.labels
    halves = np.random.default_rng(1000)
    pool_pos, eval_pos = [], []
    for c in range(images.num_classes):
        members = halves.permutation(np.flatnonzero(y_all == c))
        pool_pos += list(members[:len(members) // 2])
        eval_pos += list(members[len(members) // 2:])
    x_pool, pool_labels = x_all[pool_pos], y_all[pool_pos]
    x_test, y_test = x_all[eval_pos], y_all[eval_pos]
    k_classes = images.num_classes
    lines = ["| K per class | cv (mean ± sd) | holdout (mean ± sd) | cv - holdout per seed (points) | mean (points) |",
             "|---|---|---|---|---|"]
    for k in ks:
        cv_acc, ho_acc = [], []
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            chosen = np.concatenate([rng.choice(np.flatnonzero(pool_labels == c), k, replace=False)
                                     for c in range(k_classes)])
            x, y = x_pool[chosen], pool_labels[chosen]
            c = cv_choice(x, y, seed, k_classes)
            cv_acc.append(float((probe(x, y, c, k_classes)(x_test).argmax(1) == y_test).mean()))
            train, val = holdout_split(y, seed)
            best = max(C_GRID, key=lambda c: (probe(x[train], y[train], c, k_classes)(x[val]).argmax(1)
                                              == y[val]).mean())
            ho_acc.append(float((probe(x[train], y[train], best, k_classes)(x_test).argmax(1) == y_test).mean()))
        diffs = [100 * (a - b) for a, b in zip(cv_acc, ho_acc)]
        lines.append(f"| {k} | {np.mean(cv_acc):.4f} ± {np.std(cv_acc, ddof=1):.4f} | {np.mean(ho_acc):.4f} ± "
                     f"{np.std(ho_acc, ddof=1):.4f} | {', '.join(f'{d:+.1f}' for d in diffs)} | "
                     f"{np.mean(diffs):+.1f} (sd {np.std(diffs, ddof=1):.1f}) |")
    body = (f"Linear probe (EfficientNet-Lite0 224 px features, transferkit's L-BFGS logistic regression), "
            f"Fashion-MNIST, K labelled images per class drawn per seed from a fixed pool of "
            f"{len(pool_pos) // k_classes} per class, {args.seeds} seeds, the same {len(eval_pos):,} other images "
            "for every cell (pool and evaluation images: the two halves of bench_auto's 2,000 fixed official test "
            "images).\n\n" + "\n".join(lines))
    write_section(RESULTS / "protocol_threshold.md", "Threshold of --protocol auto: cv against holdout by class size",
                  bench_command("bench.bench_threshold", argv), started, body)


if __name__ == "__main__":
    main()
