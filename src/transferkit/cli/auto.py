"""``transferkit auto``: the best model for a folder of labelled items within a time budget."""

from __future__ import annotations

import argparse

from transferkit.cli.options import add_dataclass_options, print_json


def register(subparsers) -> None:
    from transferkit.autofit.auto_search import AutoConfig

    parser = subparsers.add_parser(
        "auto", help="Search backbones, resolutions and strategies by cross-validation within a time budget; "
                     "write the best model (or an ensemble) refit on all labels.",
        description="Every candidate (linear probes on cached features first, then LP-FT, LoRA, adapters; "
                    "MiniLM probes and contrastive training for text) is scored by stratified k-fold "
                    "cross-validation on your labels only; candidates that would not fit the remaining budget are "
                    "skipped and clearly worse ones stopped early. The final model is refit on every labelled item. "
                    "--out is an ordinary run folder (evaluate, predict, report) plus leaderboard.json / .md.")
    from transferkit.tracking import TrackingConfig

    seen: set[str] = set()
    add_dataclass_options(parser, AutoConfig, seen)
    add_dataclass_options(parser, TrackingConfig, seen, "experiment tracking (a parent run, a child per candidate)")
    parser.add_argument("--json", action="store_true", help="Print metrics.json on stdout.")
    parser.set_defaults(func=run_auto_command)


def run_auto_command(args: argparse.Namespace) -> int:
    from transferkit.autofit.auto_search import AutoConfig, process_start_time, run_auto
    from transferkit.config import build
    from transferkit.tracking import tracking_options

    options = {k: v for k, v in vars(args).items() if k not in {"func", "command", "verbose", "quiet", "json"}}
    tracking = tracking_options(options)  # --track: its library checked before the search starts
    config = build(AutoConfig, options)
    run = run_auto(config, started=process_start_time(), tracking=tracking)  # the budget covers the whole command
    if args.json:
        print_json(run.metrics)
    else:
        print(f"cross-validated accuracy {run.metrics['accuracy']:.4f} ({run.metrics['strategy']}); "
              f"run written to {run.path}; leaderboard in {run.path}/leaderboard.md")
    return 0
