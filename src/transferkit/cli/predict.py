"""``transferkit predict``: classify images (files or folders) or texts (given, or files of them) with a trained
model."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from transferkit.cli.options import add_device_argument, count, format_table, print_json
from transferkit.errors import TransferkitError
from transferkit.rundir import atomic_path


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="Predict classes for image files, folders, texts or files of texts.")
    parser.add_argument("--model", required=True, help="Run folder written by `transferkit fit`.")
    parser.add_argument("inputs", nargs="+", help="Image files or folders (image models), or texts and "
                                                  ".csv/.tsv/.jsonl/.txt files of them (text models).")
    parser.add_argument("--text-column", help="Column of the texts in a .csv/.tsv/.jsonl input "
                                              "(default: the column the model was trained on).")
    parser.add_argument("--csv", help="Write predictions with class probabilities to this CSV file "
                                      "(default predictions.csv when a folder or a file of texts is given, "
                                      "except with --json).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --csv file.")
    parser.add_argument("--top", type=count(1), default=3, help="Classes shown per input in the table.")
    parser.add_argument("--batch-size", type=count(1), default=64)
    add_device_argument(parser)
    parser.add_argument("--json", action="store_true", help="Print exactly one JSON document on stdout.")
    parser.set_defaults(func=run)


def write_predictions_csv(rows: list[dict], path: Path) -> None:
    """Atomically write input, prediction and one probability column per class."""
    classes = list(rows[0]["probabilities"]) if rows else []
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["input", "prediction", *[f"p({c})" for c in classes]])
        for row in rows:
            writer.writerow([row["input"], row["prediction"], *[f"{row['probabilities'][c]:.6f}" for c in classes]])


def run(args: argparse.Namespace) -> int:
    from transferkit.api import load, predict, stands_for_many
    from transferkit.engine.sharding import is_main_process

    if args.top < 1:
        raise TransferkitError(f"invalid --top {args.top}", "use a whole number >= 1")
    model = load(args.model, args.device)
    many_given = any(stands_for_many(i, model.modality) for i in args.inputs)  # a folder, a file of texts
    csv_path = args.csv or ("predictions.csv" if many_given and not args.json else None)  # --json: all on stdout
    if csv_path and Path(csv_path).exists() and not (args.overwrite and Path(csv_path).is_file()):
        raise TransferkitError(f"'{csv_path}' exists; nothing was predicted or written",
                               "pass --csv NEW_FILE, or --overwrite to replace it" if Path(csv_path).is_file()
                               else "pass --csv with a file name")
    rows = predict(model, args.inputs, batch_size=args.batch_size, text_column=args.text_column)  # under torchrun: split, all rows everywhere
    if not is_main_process():  # the main process alone writes and prints the merged predictions
        return 0
    if csv_path:
        write_predictions_csv(rows, Path(csv_path))
    if args.json:
        print_json({"predictions": rows, **({"csv": str(csv_path)} if csv_path else {})})
        return 0
    table = []
    for row in rows:
        ranked = sorted(row.get("probabilities", {}).items(), key=lambda kv: -kv[1])[: args.top]
        table.append({"input": row["input"], "prediction": row["prediction"],
                      "top classes": ", ".join(f"{c} {p:.3f}" for c, p in ranked)})
    print(format_table(table, ["input", "prediction", "top classes"]))
    if csv_path:
        print(f"predictions written to {csv_path}")
    return 0
