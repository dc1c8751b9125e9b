"""How ``cluster --k auto``'s criterion and the clustering defaults were chosen (issue 15): on data other than the
benchmark's 2,000 Fashion-MNIST test images: 2,000 Fashion-MNIST *training* images and 2,000 MNIST digits
(mnist-5k), 200 per class drawn with seed 123, EfficientNet-Lite0 pooled features at 224 px.

For every k in 2..20 (k-means, n_init 3, seed 0, on L2-normalised features) the script prints each candidate
criterion and the k it picks: silhouette (Rousseeuw 1987), Calinski-Harabasz, the knee of the inertia curve
(Kneedle), modularity of the partition on the symmetric 10- / 30-nearest-neighbour graph (Newman 2006), the
eigengap of that graph's normalised Laplacian (von Luxburg 2007), -BIC of a diagonal GMM on 32 PCA components,
and bootstrap stability (mean ARI of two 80% subsamples' k-means on their overlap, 3 pairs; Ben-Hur et al. 2002).
The labels are used only for the reported NMI per k. ``--normalise`` prints the NMI of k-means (k = 10, seeds 0
and 1) on raw, L2, PCA(-whitened)+L2 features, and spectral clustering on the 10- / 30-NN graph.

    python -m bench.k_criteria [--sets fmtrain mnist] [--normalise]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.bench_unlabelled import CACHE

KS = list(range(2, 21))


def features(which: str) -> tuple[np.ndarray, np.ndarray]:
    from transferkit.backbones import create_backbone
    from transferkit.data.base import LabeledData
    from transferkit.data.builtin import builtin_arrays
    from transferkit.engine.features import extract_features

    if which == "tweets":  # 300 tweets of each of the 6 topics (labels: the topic), MiniLM embeddings
        from transferkit.data.builtin import TWEET_TOPICS, _tweets_table

        texts, _, _, topic = _tweets_table()
        rng = np.random.default_rng(123)
        chosen = np.concatenate([rng.choice(np.flatnonzero(topic == t), 300, replace=False)
                                 for t in TWEET_TOPICS if t != "other"])
        data = LabeledData(items=[texts[i] for i in chosen], labels=np.zeros(len(chosen), dtype=np.int64),
                           class_names=["?"], modality="text", ids=[f"tweets/{i}" for i in chosen], name=which)
        x = extract_features(create_backbone("minilm"), data, cache_dir=CACHE / "features", progress=False)
        return x, topic[chosen].astype(str)
    if which == "fmtest":  # the clustering benchmark's 2,000 Fashion-MNIST test images (bench_unlabelled)
        from bench.bench_unlabelled import benchmark_features, truth_of, write_images

        folder, labels_csv = write_images(2000)
        items, truth = truth_of(labels_csv)
        return benchmark_features(folder, items), np.asarray(truth)
    name = {"fmtrain": "fashion-mnist", "mnist": "mnist-5k"}[which]
    images, labels, class_names, test_index = builtin_arrays(name)
    pool = np.arange(len(labels)) if test_index is None else np.setdiff1d(np.arange(len(labels)), test_index)
    rng = np.random.default_rng(123)
    chosen = np.concatenate([rng.choice(pool[labels[pool] == c], 200, replace=False) for c in range(10)])
    data = LabeledData(items=[np.asarray(images[i]) for i in chosen], labels=labels[chosen], class_names=class_names,
                       modality="image", ids=[f"{which}/{i}" for i in chosen], name=which)
    return extract_features(create_backbone("efficientnet_lite0"), data, cache_dir=CACHE / "features",
                            progress=False), labels[chosen]


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def kneedle(values: list[float]) -> dict[int, float]:
    x = (np.array(KS) - KS[0]) / (KS[-1] - KS[0])
    y = np.array(values)
    y = (y - y.min()) / (y.max() - y.min())
    return dict(zip(KS, (1 - x) - y))


def criteria(x: np.ndarray, y: np.ndarray) -> dict[str, dict[int, float]]:
    from scipy.sparse.csgraph import laplacian
    from scipy.sparse.linalg import eigsh
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import (
        adjusted_rand_score,
        calinski_harabasz_score,
        normalized_mutual_info_score,
        silhouette_score,
    )
    from sklearn.mixture import GaussianMixture

    from transferkit.selftaught.cluster import modularity, neighbour_graph

    xl = l2(x)
    models = {k: KMeans(k, n_init=3, random_state=0).fit(xl) for k in KS}
    out = {"silhouette": {k: silhouette_score(xl, m.labels_) for k, m in models.items()},
           "calinski_harabasz": {k: calinski_harabasz_score(xl, m.labels_) for k, m in models.items()},
           "kneedle_inertia": kneedle([models[k].inertia_ for k in KS])}
    for neighbours in (10, 30):
        graph = neighbour_graph(xl, neighbours)
        out[f"modularity_knn{neighbours}"] = {k: modularity(graph, m.labels_) for k, m in models.items()}
        values = np.sort(eigsh(laplacian(graph, normed=True), k=22, which="SM", tol=1e-6,
                               v0=np.random.default_rng(0).normal(size=len(xl)))[0])
        out[f"eigengap_knn{neighbours}"] = {k: values[k] - values[k - 1] for k in KS}
    xp = PCA(64, random_state=0).fit_transform(xl)
    out["bic_diag_pca32"] = {k: -GaussianMixture(k, covariance_type="diag", random_state=0, max_iter=100)
                             .fit(xp[:, :32]).bic(xp[:, :32]) for k in KS}
    rng = np.random.default_rng(0)
    stability = {}
    for k in KS:
        agreements = []
        for b in range(3):
            first, second = (rng.choice(len(xp), int(0.8 * len(xp)), replace=False) for _ in range(2))
            common = np.intersect1d(first, second)
            a = KMeans(k, n_init=1, random_state=b).fit(xp[first])
            c = KMeans(k, n_init=1, random_state=100 + b).fit(xp[second])
            agreements.append(adjusted_rand_score(a.predict(xp[common]), c.predict(xp[common])))
        stability[k] = float(np.mean(agreements))
    out["stability_pca64"] = stability
    out["nmi_vs_truth (report only)"] = {k: normalized_mutual_info_score(y, m.labels_) for k, m in models.items()}
    return out


def normalisations(x: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    from sklearn.cluster import KMeans, SpectralClustering
    from sklearn.decomposition import PCA
    from sklearn.metrics import normalized_mutual_info_score as nmi

    xl = l2(x)
    variants = {"raw": x, "l2": xl, **{f"pca{d}w+l2": l2(PCA(d, whiten=True, random_state=0).fit_transform(xl))
                                       for d in (32, 64, 128)},
                "pca64+l2": l2(PCA(64, random_state=0).fit_transform(xl)), "center+l2": l2(xl - xl.mean(0))}
    result = {name: [nmi(y, KMeans(10, n_init=10, random_state=s).fit(v).labels_) for s in (0, 1)]
              for name, v in variants.items()}
    for neighbours in (10, 30):
        result[f"spectral knn{neighbours}"] = [nmi(y, SpectralClustering(
            10, affinity="nearest_neighbors", n_neighbors=neighbours, random_state=s, n_init=10).fit(xl).labels_)
            for s in (0, 1)]
    return result


def smoothing(x: np.ndarray, y: np.ndarray) -> dict[str, tuple[list[float], list[float]]]:
    """NMI and ARI (seeds 0-2) of k-means (k = the number of classes) on L2-normalised features and after
    `cluster --smooth N` (each embedding averaged with its N nearest neighbours), and of spectral clustering before /
    after."""
    from sklearn.cluster import KMeans, SpectralClustering
    from sklearn.metrics import adjusted_rand_score as ari
    from sklearn.metrics import normalized_mutual_info_score as nmi

    from transferkit.selftaught.cluster import neighbour_graph, smooth_features

    xl, k = l2(x), len(np.unique(y))
    variants = {"raw (bare)": x, "l2": xl, **{f"smooth {n}": smooth_features(xl, n) for n in (5, 10, 20)}}
    result = {}
    for name, v in variants.items():
        labels = [KMeans(k, n_init=10, random_state=s).fit(v).labels_ for s in (0, 1, 2)]
        result[name] = ([nmi(y, p) for p in labels], [ari(y, p) for p in labels])
    for name in ("l2", "smooth 10"):
        p = SpectralClustering(k, affinity="precomputed_nearest_neighbors", random_state=0, n_init=10,
                               assign_labels="kmeans").fit(neighbour_graph(variants[name])).labels_
        result[f"spectral, {name}"] = ([nmi(y, p)], [ari(y, p)])
    return result


def main(argv: list[str] | None = None) -> int:
    from threadpoolctl import threadpool_limits

    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", nargs="+", default=["fmtrain", "mnist"],
                        choices=["fmtest", "fmtrain", "mnist", "tweets"])
    parser.add_argument("--normalise", action="store_true")
    parser.add_argument("--smooth", action="store_true", help="k-means NMI / ARI before and after --smooth N.")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    for which in args.sets:
        x, y = features(which)
        with threadpool_limits(1):
            if args.smooth:
                for name, (nmis, aris) in smoothing(x, y).items():
                    print(f"{which} {name:18s} NMI {np.mean(nmis):.3f} {[round(v, 3) for v in nmis]} "
                          f"ARI {np.mean(aris):.3f}", flush=True)
            elif args.normalise:
                for name, values in normalisations(x, y).items():
                    print(f"{which} {name:14s} NMI {np.mean(values):.4f} {[round(v, 4) for v in values]}", flush=True)
            else:
                for name, scores in criteria(x, y).items():
                    best = max(scores, key=lambda k: (scores[k], -k))
                    print(f"{which} {name:26s} k={best:2d}  " + " ".join(f"{k}:{v:.3g}" for k, v in scores.items()),
                          flush=True)
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
