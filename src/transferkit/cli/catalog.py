"""``transferkit backbones`` and ``transferkit data export``: what is available, and the on-disk data format."""

from __future__ import annotations

import argparse

from transferkit.cli.options import count, format_table, print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser("backbones", help="List backbones: modality, size, weights, offline availability.")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run_backbones)

    data = subparsers.add_parser("data", help="Built-in datasets.")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    export = data_sub.add_parser("export", help="Write a built-in dataset in the on-disk format.")
    export.add_argument("name", help="Built-in dataset name (or a dataset path to re-export).")
    export.add_argument("dir", help="Folder to create (new or empty; an earlier export with --overwrite).")
    export.add_argument("--limit-per-class", type=count(1), help="Export only K training examples per class.")
    export.add_argument("--test-limit", type=count(1),
                        help="Export a fixed stratified N of the test split (default: all of it).")
    export.add_argument("--seed", type=int, default=0, help="Which K examples per class are drawn.")
    export.add_argument("--overwrite", action="store_true", help="Replace an earlier export in DIR (never other files).")
    export.set_defaults(func=run_export)
    data.set_defaults(func=lambda args: data.print_help() or 2)


def run_backbones(args: argparse.Namespace) -> int:
    from transferkit.backbones import list_backbones

    infos = [info.to_dict() for info in list_backbones()]
    if args.json:
        print_json(infos)
        return 0
    rows = [{"name": i["name"], "modality": i["modality"],
             "params": f"{i['params'] / 1e6:.2f}M" if i["params"] else "-",
             "feature dim": i["feature_dim"] or "-", "weights": i["weights"],
             "offline": "yes" if i["offline_available"] else "no"} for i in infos]
    print(format_table(rows, ["name", "modality", "params", "feature dim", "weights", "offline"]))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from transferkit.data import export_dataset

    path = export_dataset(args.name, args.dir, limit_per_class=args.limit_per_class, seed=args.seed,
                          test_limit=args.test_limit, overwrite=args.overwrite)
    print(f"exported '{args.name}' to {path or args.dir}")
    return 0
