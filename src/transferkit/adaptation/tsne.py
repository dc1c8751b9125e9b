"""A picture of domain alignment: t-SNE (van der Maaten & Hinton 2008) of source and target features, for the
source-only model beside the adapted one (the DANN paper's Figure 3 layout), written as PNG (matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from transferkit.data.base import LabeledData


def _sample(data: LabeledData, n: int, rng: np.random.Generator) -> LabeledData:
    return data if len(data) <= n else data.subset(np.sort(rng.choice(len(data), n, replace=False)))


def embed_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of standardised features (perplexity 30, PCA initialisation)."""
    from sklearn.manifold import TSNE

    x = (features - features.mean(0)) / (features.std(0) + 1e-8)
    perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def plot_feature_map(baseline: Any, adapted: Any, source: LabeledData, target: LabeledData, path: str | Path,
                     per_domain: int = 300, seed: int = 0) -> str:
    """Write ``path``: two t-SNE panels (source-only, adapted), source blue / target red. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transferkit.engine.features import extract_features

    rng = np.random.default_rng(seed)
    source, target = _sample(source, per_domain, rng), _sample(target, per_domain, rng)
    figure, axes = plt.subplots(1, 2, figsize=(10, 5))
    for axis, (title, model) in zip(axes, (("source only", baseline), ("adapted", adapted))):
        features = np.concatenate([extract_features(model.backbone, part, progress=False) for part in (source, target)])
        points = embed_2d(features, seed)
        n = len(source)
        axis.scatter(points[:n, 0], points[:n, 1], s=6, c="tab:blue", label="source", alpha=0.7)
        axis.scatter(points[n:, 0], points[n:, 1], s=6, c="tab:red", label="target", alpha=0.7)
        axis.set_title(title)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)
