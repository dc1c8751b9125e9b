"""``transferkit compare``, ``rank-backbones``, ``report`` and ``check``: choosing a transfer for your data."""

from __future__ import annotations

import argparse

from transferkit.cli.options import add_fit_options, count, duration, format_table, number, print_json
from transferkit.config import MAX_IMAGE_SIZE, split_list
from transferkit.errors import TransferkitError

_GLOBAL_ARGS = {"func", "command", "verbose", "quiet"}
_COMPARE_ARGS = {"data", "backbones", "strategies", "seeds", "out", "time_budget", "isolate", "cost_ratio", "json",
                 "refit_best"}


def _split_list(text: str) -> list[str]:
    return split_list(text) or []


def register(subparsers) -> None:
    _register_compare(subparsers)
    _register_rank(subparsers)
    _register_report(subparsers)
    _register_check(subparsers)


# --- compare -----------------------------------------------------------------------------------------------


def _register_compare(subparsers) -> None:
    from transferkit.strategies import list_strategies

    strategies = list_strategies()
    parser = subparsers.add_parser(
        "compare", help="Run every backbone x strategy x seed and rank them (leaderboard + recommendation).",
        description="Runs `fit` for every combination (one run folder per cell under --out; finished cells are "
                    "reused, so an interrupted compare resumes), then prints a leaderboard with t-based 95% "
                    "confidence intervals over seeds, a paired t-test between the top two, and a recommendation. "
                    f"Strategies: {', '.join(strategies)}. Other fit options are passed to every cell.")
    parser.add_argument("--data", required=True, help="Labelled data (folder, .csv/.jsonl file or built-in name).")
    parser.add_argument("--backbones", type=_split_list, default=[],
                        help="Comma-separated backbone names (default: the one `fit` uses for the data: "
                             "efficientnet_lite0 for images, minilm for text).")
    parser.add_argument("--strategies", required=True, type=_split_list, help="Comma-separated strategy names.")
    parser.add_argument("--seeds", type=count(1), default=3, help="Number of seeds (0..N-1) per configuration.")
    parser.add_argument("--out", required=True, help="Folder for leaderboard.json, report.html and runs/.")
    parser.add_argument("--time-budget", type=duration(),
                        help="Start no new cell after this long: seconds (600, 600s), minutes (10m) or hours (1h).")
    parser.add_argument("--refit-best", action="store_true",
                        help="Hand over the recommended configuration as a run folder OUT/best, refit on every "
                             "labelled item (`fit --protocol cv`).")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                        help="Run each cell in a fresh process (per-cell peak memory; default on).")
    parser.add_argument("--cost-ratio", type=number(0, 1), default=0.5,
                        help="A configuration within the best's CI is recommended if it trains in at most this "
                             "fraction of the best's time.")
    parser.add_argument("--json", action="store_true", help="Print leaderboard.json on stdout.")
    add_fit_options(parser, {"data", "backbone", "strategy", "out", "seed", "overwrite", "resume"},
                    "fit options for every cell")
    parser.set_defaults(func=run_compare_command)


def run_compare_command(args: argparse.Namespace) -> int:
    from transferkit.evaluation.compare import CompareConfig, format_leaderboard, run_compare

    fit_options = {k: v for k, v in vars(args).items() if k not in _GLOBAL_ARGS | _COMPARE_ARGS}
    config = CompareConfig(data=args.data, backbones=args.backbones, strategies=args.strategies, seeds=args.seeds,
                           out=args.out, time_budget=args.time_budget, isolate=args.isolate,
                           cost_ratio=args.cost_ratio, fit_options=fit_options, refit_best=args.refit_best)
    document = run_compare(config)
    if args.json:
        print_json(document)
    else:
        print(format_leaderboard(document))
        print(f"\nleaderboard.json and report.html written to {args.out}")
        if "refit" in document:
            refit = document["refit"]
            print(f"best configuration refit on {refit['n_train_final']} labelled items: run folder {refit['path']} "
                  f"({refit['accuracy_split']} accuracy {refit['accuracy']:.4f})")
    return 0


# --- rank-backbones ----------------------------------------------------------------------------------------


def _register_rank(subparsers) -> None:
    parser = subparsers.add_parser(
        "rank-backbones", help="Score backbones for your data before training (LogME, LEEP, H-score).",
        description="One forward pass per backbone over the labelled training data (train + validation split; "
                    "the test split is never used). NAME@PIXELS sets the input resolution.")
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbones", type=_split_list, default=None,
                        help="Comma-separated candidates (default: the offline image or text backbones).")
    parser.add_argument("--limit-per-class", type=count(1), default=None, help="Few-shot subset, as in fit.")
    parser.add_argument("--seed", type=count(0, 2**32 - 1), default=0)
    parser.add_argument("--text-column")
    parser.add_argument("--label-column")
    parser.add_argument("--cache-dir")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run_rank_command)


def _default_candidates(modality: str) -> list[str]:
    from transferkit.backbones import list_backbones

    return [b.name for b in list_backbones() if b.modality == modality and b.offline_available
            and ":" not in b.name and b.name != "small_cnn"]


def run_rank_command(args: argparse.Namespace) -> int:
    from transferkit.data import load_data
    from transferkit.evaluation.transferability import labelled_pool, rank_backbones

    splits = load_data(args.data, text_column=args.text_column, label_column=args.label_column,
                       limit_per_class=args.limit_per_class, seed=args.seed)
    data = labelled_pool(splits)
    candidates = args.backbones or _default_candidates(data.modality)
    if not candidates:
        raise TransferkitError(f"no {data.modality} backbone is available offline", "pass --backbones")
    rows = rank_backbones(data, candidates, cache_dir=args.cache_dir, progress=not args.json)
    if args.json:
        print_json(rows)
        return 0
    table = [{"rank": r["rank"], "backbone": r["backbone"], "LogME": r["logme"], "H-score": r["h_score"],
              "LEEP": r["leep"] if r["leep"] is not None else "-", "seconds": r["seconds"]} for r in rows]
    print(format_table(table, list(table[0])))
    print(f"\n{rows[0]['n']} labelled items; higher is better for every score. LogME is the primary ranking.")
    return 0


# --- report ------------------------------------------------------------------------------------------------


def _register_report(subparsers) -> None:
    parser = subparsers.add_parser("report", help="Write report.html for a run or compare folder (never opens it).")
    parser.add_argument("folder", help="A run folder (fit --out) or a compare folder (compare --out).")
    parser.add_argument("--output", help="Where to write the HTML (default FOLDER/report.html).")
    parser.set_defaults(func=run_report_command)


def run_report_command(args: argparse.Namespace) -> int:
    from transferkit.evaluation.report import write_report

    path = write_report(args.folder, args.output)
    print(f"report written to {path}")
    return 0


# --- check -------------------------------------------------------------------------------------------------


def _register_check(subparsers) -> None:
    parser = subparsers.add_parser("check", help="Check data before training: class balance, train/test "
                                                 "near-duplicates (embedding search).")
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone", help="Embedding backbone (default: the modality's default backbone).")
    parser.add_argument("--threshold", type=number(0, 1, low_open=True), default=0.97,
                        help="Cosine similarity counted as near-duplicate, in (0, 1].")
    parser.add_argument("--limit-per-class", type=count(1), default=None)
    parser.add_argument("--test-limit", type=count(1), default=None)
    parser.add_argument("--image-size", type=count(1, MAX_IMAGE_SIZE), default=None)
    parser.add_argument("--text-column")
    parser.add_argument("--label-column")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run_check_command)


def run_check_command(args: argparse.Namespace) -> int:
    from transferkit.data import load_data
    from transferkit.evaluation.datacheck import check_data, format_check

    splits = load_data(args.data, text_column=args.text_column, label_column=args.label_column,
                       limit_per_class=args.limit_per_class, test_limit=args.test_limit)
    options = {"image_size": args.image_size} if args.image_size else {}
    result = check_data(splits, backbone=args.backbone, threshold=args.threshold, backbone_options=options,
                        progress=not args.json)
    if args.json:
        print_json(result)
    else:
        print(format_check(result))
    return 0
