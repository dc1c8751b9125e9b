"""``transferkit fit``: train a model and write a run folder."""

from __future__ import annotations

import argparse
import logging

from transferkit.cli.options import add_fit_options, format_table, print_json

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    from transferkit.strategies import list_strategies

    strategies = list_strategies()
    parser = subparsers.add_parser(
        "fit", help="Adapt a pretrained backbone to labelled data and write a run folder.",
        description="Strategies: " + "; ".join(f"{n}: {c.description}" for n, c in strategies.items()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with the same options as the flags (flags win).")
    parser.add_argument("--json", action="store_true", help="Print the metrics as one JSON document on stdout.")
    add_fit_options(parser, set(), "data, backbone and output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transferkit.api import fit

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "json", "verbose",
                                                                 "quiet")}
    result = fit(config=args.config, **options)
    if not result.metrics:  # a non-main process of a data-parallel run
        return 0
    if args.json:
        print_json({k: v for k, v in result.metrics.items() if k != "evaluation"})
        return 0
    m = result.metrics
    if m.get("task") == "causal-lm":
        row = {"perplexity_before": m["perplexity_before"], "perplexity_after": m["perplexity_after"],
               "heldout_passages": m["heldout_passages"], "trainable": m["trainable_params"],
               "total": m["total_params"], "seconds": m["train_seconds"]}
        print(format_table([row], list(row)))
        print(f"run written to {result.path}")
        return 0
    row = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "split": m["accuracy_split"],
           "trainable": m["trainable_params"], "total": m["total_params"], "seconds": m["train_seconds"]}
    if "top5_accuracy" in m:
        row["top5"] = m["top5_accuracy"]
    print(format_table([row], list(row)))
    for caveat in m.get("caveats", []):  # what the accuracy above does not say (metrics.json "caveats")
        print(f"note: {caveat}")
    print(f"run written to {result.path}")
    return 0
