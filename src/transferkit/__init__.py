"""transferkit: adapt pretrained models to small datasets and measure honestly how well it worked."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "fit", "auto", "cluster", "load", "evaluate", "predict", "TransferkitError"]

from transferkit.errors import TransferkitError


def __getattr__(name: str):
    # Lazy: `import transferkit` stays fast and does not import torch until an API function is used.
    if name in {"fit", "load", "evaluate", "predict"}:
        from transferkit import api

        return getattr(api, name)
    if name == "cluster":
        from transferkit.selftaught.cluster import cluster

        return cluster
    if name == "auto":
        from transferkit.autofit import auto

        return auto
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
