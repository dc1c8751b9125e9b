"""``transferkit seq2seq`` and ``transferkit charlm``: sequence models trained from scratch through the engine.

    transferkit seq2seq train --task binary-to-decimal --attention bahdanau --out runs/b2d
    transferkit seq2seq predict --model runs/b2d 111101001010
    transferkit charlm train book.txt --out runs/lm
    transferkit charlm sample --model runs/lm --prime "The " --length 300 --temperature 0.8

Each ``train`` writes a run folder like ``fit`` does (``model/``, ``metrics.json``, ``history.jsonl``), built in a
staging folder next to ``--out`` and moved into place only when finished; the Python API behind them is
:mod:`transferkit.sequence.runs` (``fit_seq2seq``, ``fit_charlm``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from transferkit.cli.options import add_dataclass_options, count, format_table, number, print_json
from transferkit.errors import TransferkitError

_COMMON = ("func", "command", "action", "json", "verbose", "quiet", "out", "overwrite", "resume", "no_progress")


def register(subparsers) -> None:
    from transferkit.sequence.charlm import CharLMConfig
    from transferkit.sequence.runs import CHARLM_TRAIN_DEFAULTS, SEQ2SEQ_TASKS, SEQ2SEQ_TRAIN_DEFAULTS
    from transferkit.sequence.seq2seq import Seq2SeqConfig

    seq = subparsers.add_parser("seq2seq", help="Encoder-decoder models for n-to-m sequence tasks.")
    seq_actions = seq.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = seq_actions.add_parser("train", help="Train on a built-in task or a tab-separated file of pairs.",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", choices=SEQ2SEQ_TASKS, help="A built-in task.")
    source.add_argument("--pairs", help="A text file of 'source<TAB>target' lines.")
    train.add_argument("--bits", type=count(1, 20), default=12, help="binary-to-decimal: number width in bits.")
    train.add_argument("--train-fraction", type=number(0, 1, low_open=True, high_open=True), default=0.7,
                       help="Share of the pairs seen in training (train + validation); the rest is the test.")
    train.add_argument("--val-fraction", type=number(0, 1, high_open=True), default=0.1, help="Share of the pairs used for validation.")
    _add_train_options(train, Seq2SeqConfig, SEQ2SEQ_TRAIN_DEFAULTS, run_seq2seq_train)
    predict = seq_actions.add_parser("predict", help="Decode input sequences with a trained model.")
    predict.add_argument("--model", required=True, help="Run folder written by `seq2seq train`.")
    predict.add_argument("inputs", nargs="+", help="Source sequences.")
    predict.add_argument("--beam-size", type=count(1), default=1, help="Beam width (1: greedy).")
    predict.add_argument("--json", action="store_true", help="Print JSON.")
    predict.set_defaults(func=run_seq2seq_predict)

    lm = subparsers.add_parser("charlm", help="Character-level language model: train on a text file, sample.")
    lm_actions = lm.add_subparsers(dest="action", metavar="ACTION", required=True)
    lm_train = lm_actions.add_parser("train", help="Train on a text file.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    lm_train.add_argument("file", help="A text file (UTF-8, UTF-16 with its BOM, else latin-1).")
    _add_train_options(lm_train, CharLMConfig, CHARLM_TRAIN_DEFAULTS, run_charlm_train)
    lm_sample = lm_actions.add_parser("sample", help="Generate text from a trained model.")
    lm_sample.add_argument("--model", required=True, help="Run folder written by `charlm train`.")
    lm_sample.add_argument("--length", type=count(1), default=300, help="Characters to generate.")
    lm_sample.add_argument("--prime", default="", help="Text to start from.")
    lm_sample.add_argument("--temperature", type=number(0, low_open=True), default=0.8, help="Softmax temperature (lower: safer).")
    lm_sample.add_argument("--top-k", type=count(0), default=0, help="Sample among the k most likely characters (0: all).")
    lm_sample.add_argument("--seed", type=count(0, 2**32 - 1), default=0, help="Random seed.")
    lm_sample.set_defaults(func=run_charlm_sample)


def _add_train_options(parser: argparse.ArgumentParser, model_class: type, defaults: dict[str, Any], func: Any) -> None:
    """Run-folder flags, then the model's and the engine's dataclass options (engine defaults listed in the help)."""
    from transferkit.engine.trainer import TrainConfig

    parser.add_argument("--out", required=True, help="Run folder to write.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace a finished run in --out, or start an interrupted one again.")
    parser.add_argument("--resume", action="store_true",
                        help="Continue an interrupted run of --out from its last epoch (same options).")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    parser.add_argument("--json", action="store_true", help="Print the metrics as JSON.")
    seen: set[str] = set()
    add_dataclass_options(parser, model_class, seen, "model")
    add_dataclass_options(parser, TrainConfig, seen, "training engine", defaults)
    parser.set_defaults(func=func)


def _options(args: argparse.Namespace, skip: tuple[str, ...]) -> dict[str, Any]:
    """The model and engine options typed on the command line (the Python API adds its defaults)."""
    return {k: v for k, v in vars(args).items() if k not in _COMMON + skip}


def _report(metrics: dict[str, Any], keys: list[str], out: Path, as_json: bool) -> None:
    if as_json:
        print_json(metrics)
        return
    print(format_table([{k: metrics[k] for k in keys if k in metrics}], [k for k in keys if k in metrics]))
    print(f"run written to {out}")


def run_seq2seq_train(args: argparse.Namespace) -> int:
    from transferkit.sequence.runs import fit_seq2seq

    run = fit_seq2seq(args.out, task=args.task, pairs=args.pairs, bits=args.bits, train_fraction=args.train_fraction,
                      val_fraction=args.val_fraction, overwrite=args.overwrite, resume=args.resume,
                      progress=not args.no_progress,
                      **_options(args, ("task", "pairs", "bits", "train_fraction", "val_fraction")))
    _report(run.metrics, ["test_exact_match", "test_token_accuracy", "val_exact_match", "n_train", "n_test",
                          "train_seconds"], run.path, args.json)
    return 0


def pad_binary(text: str, bits: int) -> str:
    """``text`` with leading zeros to ``bits`` digits (the width a binary-to-decimal model was trained on)."""
    if len(text) > bits:
        raise TransferkitError(f"'{text}' has {len(text)} digits but the model reads {bits}-bit numbers",
                               f"give at most {bits} binary digits, or train with --bits {len(text)}")
    return text.zfill(bits)


def run_seq2seq_predict(args: argparse.Namespace) -> int:
    from transferkit.sequence.seq2seq import FORMAT, load_seq2seq, read_saved_config, translate

    model, source, target, max_len = load_seq2seq(args.model)
    if args.beam_size < 1:
        raise TransferkitError(f"invalid --beam-size {args.beam_size}", "use 1 or more")
    data = read_saved_config(args.model, FORMAT, "seq2seq model", "")[1].get("data", {})
    inputs = args.inputs
    if data.get("task") == "binary-to-decimal":  # trained on fixed-width numbers: "111" means "000000000111"
        inputs = [pad_binary(text, data["bits"]) for text in inputs]
    outputs = translate(model, source, target, inputs, max_len, args.beam_size)
    if args.json:
        print_json([{"input": i, "output": o} for i, o in zip(args.inputs, outputs)])
    else:
        for i, o in zip(args.inputs, outputs):
            print(f"{i}\t{o}")
    return 0


def run_charlm_train(args: argparse.Namespace) -> int:
    from transferkit.sequence.runs import fit_charlm

    run = fit_charlm(args.out, args.file, overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress,
                     **_options(args, ("file",)))
    _report(run.metrics, ["val_bits_per_character", "val_accuracy", "train_characters", "best_epoch",
                          "train_seconds"], run.path, args.json)
    return 0


def run_charlm_sample(args: argparse.Namespace) -> int:
    from transferkit.sequence.charlm import load_charlm, sample

    if args.length < 1:
        raise TransferkitError(f"invalid --length {args.length}", "use 1 or more")
    model, vocab = load_charlm(args.model)
    print(sample(model, vocab, args.length, args.prime, args.temperature, args.top_k, args.seed))
    return 0
