"""Automatic model search for small labelled datasets (``transferkit auto``): candidates scored by
cross-validation within a time budget, the best one or an ensemble refit on every label."""

from __future__ import annotations

from typing import Any


def auto(data: str, *, out: str, time_budget: str | float = "10m", **options: Any):
    """``transferkit.auto("photos/", out="runs/auto", time_budget="10m")``: see ``transferkit auto --help``."""
    from transferkit.autofit.auto_search import AutoConfig, run_auto
    from transferkit.tracking import tracking_options

    tracking = tracking_options(options)  # track=, track_uri=, track_experiment=: checked before any work
    unknown = sorted(set(options) - set(AutoConfig.__dataclass_fields__))
    if unknown:
        from transferkit.errors import TransferkitError

        raise TransferkitError(f"unknown auto option(s): {', '.join(unknown)}", "see `transferkit auto --help`")
    return run_auto(AutoConfig(data=str(data), out=str(out), time_budget=str(time_budget), **options), tracking=tracking)


__all__ = ["auto"]
