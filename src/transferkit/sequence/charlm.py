"""A character-level language model (the "hello" example scaled up): trains on any text file, then samples.

The model reads characters ``x_1..x_t`` and predicts ``x_{t+1}`` (``p(x_{t+1} | x_{<=t}) = softmax(W h_t)``) with
a multi-layer LSTM / GRU / Elman RNN. Training minimises the cross-entropy in nats per character (reported also
as bits per character, ``/ ln 2``).

Truncated back-propagation through time (Williams & Peng 1990): the text is cut into ``batch_size`` parallel
streams, each read in consecutive windows of ``bptt`` characters; the recurrent state is carried from one
window to the next (so the model sees long context) but detached (so gradients flow back at most ``bptt``
steps). Use one process: the windows must stay in order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferkit.engine.placement import inference, to_device
from transferkit.errors import TransferkitError, read_safetensors, reading
from transferkit.sequence.seq2seq import Vocabulary, read_saved_config

FORMAT = "transferkit-charlm"
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class CharLanguageModel(nn.Module):
    """Embedding -> recurrent layers -> linear layer over the vocabulary."""

    def __init__(self, vocab_size: int, embedding_dim: int = 64, hidden_size: int = 256, num_layers: int = 2,
                 dropout: float = 0.2, cell: str = "lstm") -> None:
        super().__init__()
        if cell not in CELLS:
            raise TransferkitError(f"unknown cell '{cell}'", f"choose one of {', '.join(CELLS)}")
        self.config = {"vocab_size": vocab_size, "embedding_dim": embedding_dim, "hidden_size": hidden_size,
                       "num_layers": num_layers, "dropout": dropout, "cell": cell}
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.rnn = CELLS[cell](embedding_dim, hidden_size, num_layers, batch_first=True,
                               dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """``logits (B, T, V)`` and the final recurrent state."""
        out, state = self.rnn(self.dropout(self.embedding(x)), state)
        return self.output(self.dropout(out)), state


def detach_state(state: Any) -> Any:
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


class StreamWindows(Dataset):
    """``ids`` cut into ``streams`` parallel rows; item ``i`` is window ``i`` of ``bptt`` steps of every row."""

    def __init__(self, ids: torch.Tensor, streams: int, bptt: int) -> None:
        per_stream = (len(ids) - 1) // streams
        if per_stream < 2:
            raise TransferkitError(f"the text ({len(ids)} characters) is too short for {streams} streams",
                                   "use a longer text or a smaller --batch-size")
        self.inputs = ids[: streams * per_stream].view(streams, per_stream)
        self.targets = ids[1: streams * per_stream + 1].view(streams, per_stream)
        self.bptt = bptt

    def __len__(self) -> int:
        return math.ceil(self.inputs.shape[1] / self.bptt)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = slice(i * self.bptt, (i + 1) * self.bptt)
        return {"inputs": self.inputs[:, window], "targets": self.targets[:, window], "index": torch.tensor([i])}


def _single(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return rows[0]


def window_loader(ids: torch.Tensor, streams: int, bptt: int) -> DataLoader:
    """Windows in order (never shuffled: the carried state needs the previous window)."""
    return DataLoader(StreamWindows(ids, streams, bptt), batch_size=1, shuffle=False, collate_fn=_single)


class TruncatedBPTT:
    """An engine ``forward_fn`` that carries the recurrent state across windows, detached at each boundary."""

    def __init__(self) -> None:
        self.state: Any = None

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if int(batch["index"][0]) == 0:  # a new epoch starts from an empty state
            self.state = None
        logits, state = model(batch["inputs"], self.state)
        self.state = detach_state(state)
        return logits


def language_model_metrics(model: nn.Module, loader: Any) -> dict[str, float]:
    """Cross-entropy ``loss`` (nats / character), ``bits_per_character`` and next-character ``accuracy``, computed
    where the model is placed."""
    state, total, correct, count = None, 0.0, 0, 0
    with inference(model) as device:
        for raw in loader:
            batch = to_device(raw, device)
            logits, state = model(batch["inputs"], state)
            targets = batch["targets"]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
    loss = total / max(1, count)
    return {"loss": loss, "bits_per_character": loss / math.log(2), "accuracy": correct / max(1, count)}


@dataclass
class CharLMConfig:
    """Options of ``transferkit charlm train`` (besides the engine's TrainConfig; --batch-size = streams)."""

    cell: str = field(default="lstm", metadata={"help": "lstm, gru or rnn (Elman)."})
    embedding_dim: int = field(default=64, metadata={"help": "Character embedding size."})
    hidden_size: int = field(default=256, metadata={"help": "Recurrent state size."})
    num_layers: int = field(default=2, metadata={"help": "Stacked recurrent layers."})
    dropout: float = field(default=0.2, metadata={"help": "Dropout between layers."})
    bptt: int = field(default=100, metadata={"help": "Truncated BPTT window: gradient flows back this many steps."})
    val_fraction: float = field(default=0.1, metadata={"help": "The text's last share held out for validation."})

    def validate(self) -> None:
        if self.cell not in CELLS:
            raise TransferkitError(f"invalid --cell '{self.cell}'", f"choose one of {', '.join(CELLS)}")
        if self.bptt < 2 or self.hidden_size < 1 or self.num_layers < 1 or self.embedding_dim < 1:
            raise TransferkitError("--bptt must be >= 2 and sizes >= 1", "fix the values")
        if not 0 < self.val_fraction < 0.5 or not 0 <= self.dropout < 1:
            raise TransferkitError("--val-fraction must lie in (0, 0.5) and --dropout in [0, 1)", "e.g. 0.1 and 0.2")


@dataclass
class CharLMRun:
    model: CharLanguageModel
    vocab: Vocabulary
    history: list[dict[str, Any]]
    metrics: dict[str, Any]


@dataclass
class CharLMData:
    """A text cut for training: its vocabulary, the train / validation windows and the split point."""

    vocab: Vocabulary
    ids: torch.Tensor
    split: int
    train_loader: DataLoader
    val_loader: DataLoader


def prepare_charlm_data(text: str, config: CharLMConfig, batch_size: int) -> CharLMData:
    """Check ``text`` and the options and cut it into windows; raises (before anything is written) when the
    text is too short for them."""
    config.validate()
    if len(text) < 200:
        raise TransferkitError(f"the text has only {len(text)} characters", "train on at least a few thousand")
    vocab = Vocabulary.from_texts([text])
    ids = torch.as_tensor(vocab.encode(text), dtype=torch.long)
    split = int(len(ids) * (1 - config.val_fraction))
    val_streams = max(1, min(batch_size, (len(ids) - split) // (2 * config.bptt)))
    return CharLMData(vocab, ids, split, window_loader(ids[:split], batch_size, config.bptt),
                      window_loader(ids[split:], val_streams, config.bptt))


def train_charlm(text: str, config: CharLMConfig, train: Any, checkpoint_dir: str | Path | None = None,
                 progress: bool = True, data: CharLMData | None = None) -> CharLMRun:
    """Train on the first ``1 - val_fraction`` of ``text``; validate (and select the epoch) on the rest
    (``data``: ``prepare_charlm_data(text, config, train.batch_size)`` when already done)."""
    from transferkit.engine import Trainer, seed_everything
    from transferkit.sequence.training import SequenceCrossEntropy

    data = data or prepare_charlm_data(text, config, train.batch_size)
    vocab, ids, split, train_loader, val_loader = data.vocab, data.ids, data.split, data.train_loader, data.val_loader
    seed_everything(train.seed)
    model = CharLanguageModel(len(vocab), config.embedding_dim, config.hidden_size, config.num_layers,
                              config.dropout, config.cell)

    def evaluate(m: nn.Module, loader: Any, accelerator: Any, forward_fn: Any) -> dict[str, float]:
        return language_model_metrics(m, loader)

    trainer = Trainer(model, [SequenceCrossEntropy("targets")], train, forward_fn=TruncatedBPTT(),
                      evaluate_fn=evaluate, monitor=("loss", "min"), checkpoint_dir=checkpoint_dir, progress=progress)
    result = trainer.fit(train_loader, val_loader)
    scores = language_model_metrics(model, val_loader)
    metrics = {**{f"val_{k}": v for k, v in scores.items()}, "best_epoch": result.best_epoch,
               "train_characters": split, "val_characters": len(ids) - split, "vocabulary_size": len(vocab.symbols),
               "train_seconds": round(result.train_seconds, 2), "parameters": sum(p.numel() for p in model.parameters())}
    return CharLMRun(model, vocab, result.history, metrics)


def sample(model: CharLanguageModel, vocab: Vocabulary, length: int = 200, prime: str = "",
           temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> str:
    """Generate ``length`` characters after ``prime``: draw from ``softmax(logits / temperature)``, optionally
    restricted to the ``top_k`` most likely characters."""
    if temperature <= 0:
        raise TransferkitError(f"invalid temperature {temperature}", "use a number above 0 (e.g. 0.8)")
    generator = torch.Generator().manual_seed(seed)  # a CPU generator: the draw is the same on every device
    prime_ids = vocab.encode(prime) if prime else [Vocabulary.RESERVED + int(torch.randint(len(vocab.symbols), (1,),
                                                                                             generator=generator))]
    out = []
    with inference(model) as device:
        logits, state = model(torch.as_tensor([prime_ids], device=device), None)
        for _ in range(length):
            scores = logits[0, -1].float().cpu() / temperature
            scores[: Vocabulary.RESERVED] = float("-inf")
            if top_k > 0:
                threshold = scores.topk(min(top_k, len(vocab.symbols))).values[-1]
                scores = scores.masked_fill(scores < threshold, float("-inf"))
            symbol = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))
            out.append(symbol)
            logits, state = model(torch.as_tensor([[symbol]], device=device), state)
    return (prime if prime else vocab.decode(prime_ids)) + vocab.decode(out)


def save_charlm(run: CharLMRun, folder: str | Path) -> None:
    from transferkit.rundir import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "model": run.model.config, "symbols": run.vocab.symbols}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(folder / "model.safetensors", {k: v.contiguous() for k, v in run.model.state_dict().items()})


def load_charlm(folder: str | Path) -> tuple[CharLanguageModel, Vocabulary]:
    folder, config = read_saved_config(folder, FORMAT, "character language model",
                                       "pass the --out folder of `transferkit charlm train`")
    again = "train it again with `transferkit charlm train`"
    with reading(folder / "config.json", "character language model config", again):
        model = CharLanguageModel(**config["model"])
        vocabulary = Vocabulary(config["symbols"])
    weights = folder / "model.safetensors"
    with reading(weights, "character language model weights", again):
        model.load_state_dict(read_safetensors(weights))
    return model.eval(), vocabulary
