"""``transferkit seq2seq`` and ``transferkit charlm``: sequence models trained from scratch through the engine.

    transferkit seq2seq train --task binary-to-decimal --attention bahdanau --out runs/b2d
    transferkit seq2seq predict --model runs/b2d 111101001010
    transferkit charlm train book.txt --out runs/lm
    transferkit charlm sample --model runs/lm --prime "The " --length 300 --temperature 0.8

Each ``train`` writes a run folder like ``fit`` does (``model/``, ``metrics.json``, ``history.jsonl``), built in a
staging folder next to ``--out`` and moved into place only when finished.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transferkit.cli.options import add_dataclass_options, format_table, print_json
from transferkit.errors import TransferkitError

SEQ2SEQ_TASKS = ("binary-to-decimal",)
#: engine defaults that suit these small from-scratch models (any flag overrides them). seq2seq: strong decoupled
#: weight decay makes the encoder-decoder learn the rule instead of storing the pairs (binary-to-decimal: 0.992-0.998
#: exact match on unseen numbers over 5 seeds with attention, 0.55-0.96 without weight decay; bench/results/sequence.md)
SEQ2SEQ_TRAIN_DEFAULTS = {"epochs": 120, "batch_size": 128, "lr": 1e-2, "weight_decay": 1.0, "warmup_steps": 100,
                          "early_stopping": 0, "threads": 1}
CHARLM_TRAIN_DEFAULTS = {"epochs": 20, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.0, "early_stopping": 3,
                         "threads": 1}
_COMMON = ("func", "command", "action", "json", "verbose", "quiet", "out", "overwrite", "resume", "no_progress")


def register(subparsers) -> None:
    from transferkit.sequence.charlm import CharLMConfig
    from transferkit.sequence.seq2seq import Seq2SeqConfig

    seq = subparsers.add_parser("seq2seq", help="Encoder-decoder models for n-to-m sequence tasks.")
    seq_actions = seq.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = seq_actions.add_parser("train", help="Train on a built-in task or a tab-separated file of pairs.",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", choices=SEQ2SEQ_TASKS, help="A built-in task.")
    source.add_argument("--pairs", help="A text file of 'source<TAB>target' lines.")
    train.add_argument("--bits", type=int, default=12, help="binary-to-decimal: number width in bits.")
    train.add_argument("--train-fraction", type=float, default=0.7,
                       help="Share of the pairs seen in training (train + validation); the rest is the test.")
    train.add_argument("--val-fraction", type=float, default=0.1, help="Share of the pairs used for validation.")
    _add_train_options(train, Seq2SeqConfig, SEQ2SEQ_TRAIN_DEFAULTS, run_seq2seq_train)
    predict = seq_actions.add_parser("predict", help="Decode input sequences with a trained model.")
    predict.add_argument("--model", required=True, help="Run folder written by `seq2seq train`.")
    predict.add_argument("inputs", nargs="+", help="Source sequences.")
    predict.add_argument("--beam-size", type=int, default=1, help="Beam width (1: greedy).")
    predict.add_argument("--json", action="store_true", help="Print JSON.")
    predict.set_defaults(func=run_seq2seq_predict)

    lm = subparsers.add_parser("charlm", help="Character-level language model: train on a text file, sample.")
    lm_actions = lm.add_subparsers(dest="action", metavar="ACTION", required=True)
    lm_train = lm_actions.add_parser("train", help="Train on a UTF-8 text file.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    lm_train.add_argument("file", help="A UTF-8 text file.")
    _add_train_options(lm_train, CharLMConfig, CHARLM_TRAIN_DEFAULTS, run_charlm_train)
    lm_sample = lm_actions.add_parser("sample", help="Generate text from a trained model.")
    lm_sample.add_argument("--model", required=True, help="Run folder written by `charlm train`.")
    lm_sample.add_argument("--length", type=int, default=300, help="Characters to generate.")
    lm_sample.add_argument("--prime", default="", help="Text to start from.")
    lm_sample.add_argument("--temperature", type=float, default=0.8, help="Softmax temperature (lower: safer).")
    lm_sample.add_argument("--top-k", type=int, default=0, help="Sample among the k most likely characters (0: all).")
    lm_sample.add_argument("--seed", type=int, default=0, help="Random seed.")
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


def _options(args: argparse.Namespace, defaults: dict[str, Any], skip: tuple[str, ...]) -> dict[str, Any]:
    given = {k: v for k, v in vars(args).items() if k not in _COMMON + skip}
    return {**defaults, **given}


def _build_configs(options: dict[str, Any], model_class: type) -> tuple[Any, Any]:
    from transferkit.config import build
    from transferkit.engine.trainer import TrainConfig

    model_config = build(model_class, options)
    model_config.validate()
    train = build(TrainConfig, options)
    train.validate()
    if options:
        raise TransferkitError(f"unknown option(s): {', '.join(sorted(options))}", "see --help")
    return model_config, train


def _output_folder(args: argparse.Namespace, kind: str, run_options: dict[str, Any]):
    """The run folder of ``--out`` (``run_options`` go to ``run_config.json``; ``--resume`` must repeat them)."""
    from transferkit.rundir import OutputFolder

    return OutputFolder(args.out, kind, overwrite=args.overwrite, resume=args.resume, options=run_options)


def _finish(folder, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
    from transferkit.rundir import write_json, write_jsonl

    write_json(folder.stage / "metrics.json", metrics)
    write_jsonl(folder.stage / "history.jsonl", history)
    folder.publish()


def _report(metrics: dict[str, Any], keys: list[str], out: Path, as_json: bool) -> None:
    if as_json:
        print_json(metrics)
        return
    print(format_table([{k: metrics[k] for k in keys if k in metrics}], [k for k in keys if k in metrics]))
    print(f"run written to {out}")


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise TransferkitError(f"pairs file '{path}' does not exist", "pass a text file of 'source<TAB>target' lines")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TransferkitError(f"{path}:{number} is not 'source<TAB>target'", "separate the two by one tab")
        pairs.append((parts[0], parts[1]))
    if len(pairs) < 10:
        raise TransferkitError(f"'{path}' holds only {len(pairs)} pairs", "give at least 10")
    return pairs


def run_seq2seq_train(args: argparse.Namespace) -> int:
    from transferkit.sequence.seq2seq import (
        Seq2SeqConfig,
        binary_to_decimal_pairs,
        save_seq2seq,
        split_pairs,
        train_seq2seq,
    )

    options = _options(args, SEQ2SEQ_TRAIN_DEFAULTS, ("task", "pairs", "bits", "train_fraction", "val_fraction"))
    config, train = _build_configs(options, Seq2SeqConfig)
    if args.task == "binary-to-decimal":
        if not 1 <= args.bits <= 20:
            raise TransferkitError(f"invalid --bits {args.bits}", "use 1..20")
        pairs = binary_to_decimal_pairs(args.bits)
    else:
        pairs = read_pairs(args.pairs)
    splits = split_pairs(pairs, args.train_fraction, args.val_fraction, seed=0)
    data = {"task": args.task, "bits": args.bits} if args.task else {"pairs": str(args.pairs)}
    data.update({"train_fraction": args.train_fraction, "val_fraction": args.val_fraction})
    folder = _output_folder(args, "seq2seq", {"data": data, "model": asdict(config), "train": train.to_dict()})
    out = folder.out
    folder.begin()
    with folder:
        run = train_seq2seq(splits, config, train, checkpoint_dir=folder.stage / "checkpoint",
                            progress=not args.no_progress)
        save_seq2seq(run, folder.stage / "model", extra={"data": data})
        metrics = {**run.metrics, "data": data, "config": {"model": asdict(config), "train": train.to_dict()}}
        _finish(folder, metrics, run.history)
    _report(metrics, ["test_exact_match", "test_token_accuracy", "val_exact_match", "n_train", "n_test",
                      "train_seconds"], out, args.json)
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
    from transferkit.sequence.charlm import CharLMConfig, save_charlm, train_charlm

    options = _options(args, CHARLM_TRAIN_DEFAULTS, ("file",))
    config, train = _build_configs(options, CharLMConfig)
    path = Path(args.file)
    if not path.is_file():
        raise TransferkitError(f"text file '{path}' does not exist", "pass a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TransferkitError(f"'{path}' is not UTF-8 text", "convert it to UTF-8") from None
    folder = _output_folder(args, "charlm", {"data": str(path), "model": asdict(config), "train": train.to_dict()})
    out = folder.out
    folder.begin()
    with folder:
        run = train_charlm(text, config, train, checkpoint_dir=folder.stage / "checkpoint",
                           progress=not args.no_progress)
        save_charlm(run, folder.stage / "model")
        metrics = {**run.metrics, "data": str(path), "config": {"model": asdict(config), "train": train.to_dict()}}
        _finish(folder, metrics, run.history)
    _report(metrics, ["val_bits_per_character", "val_accuracy", "train_characters", "best_epoch", "train_seconds"],
            out, args.json)
    return 0


def run_charlm_sample(args: argparse.Namespace) -> int:
    from transferkit.sequence.charlm import load_charlm, sample

    if args.length < 1:
        raise TransferkitError(f"invalid --length {args.length}", "use 1 or more")
    model, vocab = load_charlm(args.model)
    print(sample(model, vocab, args.length, args.prime, args.temperature, args.top_k, args.seed))
    return 0
