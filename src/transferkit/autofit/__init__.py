"""Automatic model search for small labelled datasets (``transferkit auto``): candidates scored by
cross-validation within a time budget, the best one or an ensemble refit on every label."""

from __future__ import annotations

from typing import Any


def auto(data: str, *, out: str, time_budget: str | float = "10m", **options: Any):
    """``transferkit.auto("photos/", out="runs/auto", time_budget="10m")``: see ``transferkit auto --help``.

    Options take the CLI's values: ``backbones="a,b"`` or ``["a", "b"]``, ``folds="3"`` or ``3``; None is the
    default (as in ``transferkit.fit``)."""
    from transferkit.autofit.auto_search import AutoConfig, run_auto
    from transferkit.config import build
    from transferkit.tracking import tracking_options

    tracking = tracking_options(options)  # track=, track_uri=, track_experiment=: checked before any work
    merged = {**{k: v for k, v in options.items() if v is not None}, "data": data, "out": out,
              "time_budget": time_budget}
    config = build(AutoConfig, merged)  # coerced like the CLI's values; consumes the options it knows
    if merged:
        from transferkit.errors import TransferkitError

        raise TransferkitError(f"unknown auto option(s): {', '.join(sorted(merged))}", "see `transferkit auto --help`")
    return run_auto(config, tracking=tracking)


__all__ = ["auto"]
