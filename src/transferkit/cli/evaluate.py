"""``transferkit evaluate``: score a trained model on labelled data."""

from __future__ import annotations

import argparse

from transferkit.cli.options import add_device_argument, count, print_json
from transferkit.evaluation.hooks import add_hook_arguments

_BASE_ARGS = {"model", "data", "text_column", "label_column", "batch_size", "device", "json", "func", "command",
              "verbose", "quiet"}


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="Accuracy, macro-F1, top-5 and confusion matrix on labelled data.")
    parser.add_argument("--model", required=True, help="Run folder written by `transferkit fit`.")
    parser.add_argument("--data", required=True, help="Labelled data: folder, .csv/.jsonl, or built-in name.")
    parser.add_argument("--text-column")
    parser.add_argument("--label-column")
    parser.add_argument("--batch-size", type=count(1), default=64)
    add_device_argument(parser)
    parser.add_argument("--json", action="store_true", help="Print exactly one JSON document on stdout.")
    add_hook_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transferkit.api import evaluate
    from transferkit.evaluation.metrics import format_report

    report = evaluate(args.model, args.data, text_column=args.text_column, label_column=args.label_column,
                      batch_size=args.batch_size, progress=not args.json, device=args.device,
                      **{k: v for k, v in vars(args).items() if k not in _BASE_ARGS})
    if args.json:
        print_json(report)
    elif report.get("task") == "causal-lm":
        print(f"perplexity {report['perplexity']:.2f} (mean token NLL {report['mean_token_nll']:.4f}) over "
              f"{report['passages']} passages, {report['tokens']} tokens")
    else:
        print(format_report(report))
    return 0
