"""Run folders for sequence models: the Python API behind ``transferkit seq2seq train`` / ``charlm train``.

    run = fit_seq2seq("runs/b2d", task="binary-to-decimal", attention="bahdanau", epochs=40)
    run = fit_charlm("runs/lm", "book.txt", hidden_size=128)
    model, vocab = run.load()

Each writes a run folder like ``transferkit.fit`` (``model/``, ``metrics.json``, ``history.jsonl``,
``run_config.json``) through :class:`transferkit.rundir.OutputFolder` (kinds ``seq2seq`` and ``charlm``): built
in a staging folder, published atomically, resumable after an interruption with ``resume=True`` and the same
options. ``options`` are the model's and the engine's settings (``Seq2SeqConfig`` / ``CharLMConfig`` and
``TrainConfig`` fields); the engine defaults below suit these small from-scratch models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transferkit.errors import TransferkitError
from transferkit.fitting import Run
from transferkit.rundir import DATA_SECTION, OutputFolder, data_section, write_json, write_jsonl

SEQ2SEQ_TASKS = ("binary-to-decimal",)
#: engine defaults that suit these small from-scratch models (any option overrides them). seq2seq: strong decoupled
#: weight decay makes the encoder-decoder learn the rule instead of storing the pairs (binary-to-decimal: 0.992-0.998
#: exact match on unseen numbers over 5 seeds with attention, 0.55-0.96 without weight decay; bench/results/sequence.md)
SEQ2SEQ_TRAIN_DEFAULTS = {"epochs": 120, "batch_size": 128, "lr": 1e-2, "weight_decay": 1.0, "warmup_steps": 100,
                          "early_stopping": 0, "threads": 1}
CHARLM_TRAIN_DEFAULTS = {"epochs": 20, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.0, "early_stopping": 3,
                         "threads": 1}


@dataclass
class SequenceRun(Run):
    """A finished seq2seq or charlm run folder; ``load()`` restores its model."""

    kind: str = "seq2seq"

    def load(self) -> Any:
        """``(model, source vocabulary, target vocabulary, max output length)`` for seq2seq, ``(model, vocabulary)``
        for charlm."""
        if self.kind == "charlm":
            from transferkit.sequence.charlm import load_charlm

            return load_charlm(self.path)
        from transferkit.sequence.seq2seq import load_seq2seq

        return load_seq2seq(self.path)

    @property
    def accuracy(self) -> float:
        return float(self.metrics["test_exact_match" if self.kind == "seq2seq" else "val_accuracy"])


def build_configs(options: dict[str, Any], model_class: type, defaults: dict[str, Any]) -> tuple[Any, Any]:
    """(model config, TrainConfig) from ``defaults`` < ``options``; an unknown option is an error."""
    from transferkit.config import build
    from transferkit.engine.trainer import TrainConfig

    merged = {**defaults, **{k.replace("-", "_"): v for k, v in options.items() if v is not None}}
    model_config = build(model_class, merged)
    model_config.validate()
    train = build(TrainConfig, merged)
    train.validate()
    if merged:
        raise TransferkitError(f"unknown option(s): {', '.join(sorted(merged))}", "see --help")
    return model_config, train


def _read_file(path: Path, what: str, fix: str) -> str:
    """The text of the file ``path``, decoded as every text file (:func:`data.text.decode_text`: a binary file is
    refused); a folder or a missing file is refused naming ``what`` it should be."""
    from transferkit.data.text import decode_text

    if path.is_dir():
        raise TransferkitError(f"'{path}' is a folder, not a text file", fix)
    if not path.is_file():
        raise TransferkitError(f"{what} '{path}' does not exist", fix)
    return decode_text(path)


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """The ``source<TAB>target`` lines of a text file (at least 10; decoded as every text file)."""
    path = Path(path)
    pairs = []
    text = _read_file(path, "pairs file", "pass a text file of 'source<TAB>target' lines")
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TransferkitError(f"{path}:{line_number} is not 'source<TAB>target'", "separate the two by one tab")
        pairs.append((parts[0], parts[1]))
    if len(pairs) < 10:
        raise TransferkitError(f"'{path}' holds only {len(pairs)} pairs", "give at least 10")
    return pairs


def read_text(path: str | Path) -> str:
    """The text of a file (decoded as every text file: UTF-8, UTF-16 with its BOM, else latin-1)."""
    return _read_file(Path(path), "text file", "pass one text file, e.g. book.txt")


def _output_folder(out: str | Path, kind: str, train: Any, **kwargs: Any) -> OutputFolder:
    """The run folder; under a multi-process launch the process group is joined first with ``--device``."""
    from accelerate import PartialState

    from transferkit.engine.placement import accelerator_kwargs

    PartialState(**accelerator_kwargs(train.device))  # shared state: the trainer's Accelerator reuses it
    return OutputFolder(out, kind, **kwargs)


def _write(folder: OutputFolder, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
    write_json(folder.stage / "metrics.json", metrics)
    write_jsonl(folder.stage / "history.jsonl", history)
    folder.publish()


def fit_seq2seq(out: str | Path, *, task: str | None = None, pairs: str | Path | None = None, bits: int = 12,
                train_fraction: float = 0.7, val_fraction: float = 0.1, overwrite: bool = False,
                resume: bool = False, progress: bool = True, **options: Any) -> SequenceRun:
    """Train an encoder-decoder on a built-in ``task`` or a ``pairs`` file and write the run folder ``out``."""
    from transferkit.sequence.seq2seq import (
        Seq2SeqConfig,
        binary_to_decimal_pairs,
        save_seq2seq,
        split_pairs,
        train_seq2seq,
    )

    config, train = build_configs(options, Seq2SeqConfig, SEQ2SEQ_TRAIN_DEFAULTS)
    if (task is None) == (pairs is None):
        raise TransferkitError("give either a built-in task or a pairs file", f"tasks: {', '.join(SEQ2SEQ_TASKS)}")
    if task is not None and task not in SEQ2SEQ_TASKS:
        raise TransferkitError(f"unknown seq2seq task '{task}'", f"choose one of {', '.join(SEQ2SEQ_TASKS)}")
    if task == "binary-to-decimal":
        if not 1 <= bits <= 20:
            raise TransferkitError(f"invalid --bits {bits}", "use 1..20")
        examples = binary_to_decimal_pairs(bits)
    else:
        examples = read_pairs(pairs)  # type: ignore[arg-type]
    splits = split_pairs(examples, train_fraction, val_fraction, seed=0)
    fractions = {"train_fraction": train_fraction, "val_fraction": val_fraction}
    # a built-in task's pairs follow from its options; a file's content is fingerprinted (--resume refuses an edit)
    data = ({"task": task, "bits": bits, **fractions} if task else
            data_section(pairs, *(f"{source}\t{target}" for source, target in examples), **fractions))  # type: ignore[arg-type]
    settings = {"model": asdict(config), "train": train.to_dict()}
    folder = _output_folder(out, "seq2seq", train, overwrite=overwrite, resume=resume,
                            options={"data": data, **settings})
    folder.begin()
    with folder:
        run = train_seq2seq(splits, config, train, checkpoint_dir=folder.stage / "checkpoint", progress=progress)
        save_seq2seq(run, folder.stage / "model", extra={"data": data})
        metrics = {**run.metrics, "data": data, "config": settings}
        _write(folder, metrics, run.history)
    return SequenceRun(folder.out, metrics, run.history, "seq2seq")


def fit_charlm(out: str | Path, file: str | Path, *, overwrite: bool = False, resume: bool = False,
               progress: bool = True, **options: Any) -> SequenceRun:
    """Train a character-level language model on the text ``file`` and write the run folder ``out``."""
    from transferkit.sequence.charlm import CharLMConfig, prepare_charlm_data, save_charlm, train_charlm

    config, train = build_configs(options, CharLMConfig, CHARLM_TRAIN_DEFAULTS)
    text = read_text(file)
    data = prepare_charlm_data(text, config, train.batch_size)  # a text too short is refused before --out is touched
    settings = {"model": asdict(config), "train": train.to_dict()}
    folder = _output_folder(out, "charlm", train, overwrite=overwrite, resume=resume,
                            options={DATA_SECTION: data_section(file, text), **settings})  # --resume: same text
    folder.begin()
    with folder:
        run = train_charlm(text, config, train, checkpoint_dir=folder.stage / "checkpoint", progress=progress,
                           data=data)
        save_charlm(run, folder.stage / "model")
        metrics = {**run.metrics, "data": str(file), "config": settings}
        _write(folder, metrics, run.history)
    return SequenceRun(folder.out, metrics, run.history, "charlm")


__all__ = ["CHARLM_TRAIN_DEFAULTS", "SEQ2SEQ_TASKS", "SEQ2SEQ_TRAIN_DEFAULTS", "SequenceRun", "fit_charlm",
           "fit_seq2seq", "read_pairs"]
