"""Encoder-decoder (sequence-to-sequence) models for n-to-m tasks, e.g. binary-to-decimal "111101001010" -> "3914".

Encoder: a GRU (optionally bidirectional) over the source symbols; its final states initialise the decoder
(``h_0 = tanh(W [h_fwd; h_bwd])``). Decoder: a GRU cell that at step t reads the previous output symbol and a
context vector ``c_t``, and predicts the next symbol from ``[h_t; c_t; y_{t-1}]``:

* ``attention="none"``: ``c_t`` is the encoder's final summary for every step (the classic fixed-size
  "thought vector", like Keras' ``RepeatVector``);
* ``"bahdanau"`` (additive; Bahdanau, Cho & Bengio 2015): ``e_ts = v^T tanh(W_q h_{t-1} + W_k m_s)``,
  ``alpha_t = softmax(e_t)`` over the valid source positions, ``c_t = sum_s alpha_ts m_s``;
* ``"dot"`` (scaled dot-product; Luong et al. 2015, Vaswani et al. 2017): ``e_ts = h_{t-1} . W_k m_s / sqrt(d)``;
* ``"multihead"`` (Vaswani et al. 2017): ``heads`` scaled dot-product attentions in parallel, head ``j`` scoring
  ``(W_q h_{t-1})_j . (W_k m_s)_j / sqrt(d / heads)`` and reading ``(W_v m_s)_j``; the heads' contexts are
  concatenated, so the decoder sees several source positions at once at every step.

The encoder may stack ``encoder_layers`` GRU layers (each bidirectional if the encoder is). The output layer is
linear in ``[h_t; c_t; y_{t-1}]`` or, with ``output_hidden > 0``, a one-hidden-layer GELU MLP (more room for
non-linear read-outs such as a digit of a number).

Training uses teacher forcing (the true previous symbol is fed, with probability ``teacher_forcing``; otherwise
the model's own prediction), decoding is greedy or beam search (length-normalised log-probability).

:class:`Seq2SeqEnsemble` decodes with N independently trained models (different seeds): at every step the
next symbol maximises the mean of the members' log-probabilities ``(1/N) sum_i log p_i(y_t | y_<t, x)`` (a
renormalised geometric mean of their distributions), and every member is fed that same symbol; averaging
cancels the members' independent, variance-driven errors.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence
from torch.utils.data import DataLoader, Dataset

from transferkit.engine.placement import inference, to_device
from transferkit.errors import TransferkitError, check_count, read_json, read_safetensors, reading

logger = logging.getLogger(__name__)

ATTENTIONS = ("none", "bahdanau", "dot", "multihead")
FORMAT = "transferkit-seq2seq"


class Vocabulary:
    """Symbols with three reserved ids: 0 padding, 1 begin-of-sequence, 2 end-of-sequence."""

    PAD, BOS, EOS = 0, 1, 2
    RESERVED = 3

    def __init__(self, symbols: Sequence[str]) -> None:
        self.symbols = list(dict.fromkeys(symbols))
        self.index = {s: i + self.RESERVED for i, s in enumerate(self.symbols)}

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> Vocabulary:
        return cls(sorted({c for t in texts for c in t}))

    def __len__(self) -> int:
        return len(self.symbols) + self.RESERVED

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self.index})
        if unknown:
            raise TransferkitError(f"symbol(s) {''.join(unknown)!r} in {text!r} were not seen in training",
                                   f"use only: {''.join(self.symbols)}")
        return [self.index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            if i == self.EOS:
                break
            if i >= self.RESERVED:
                out.append(self.symbols[i - self.RESERVED])
        return "".join(out)


class Attention(nn.Module):
    """Additive (Bahdanau), scaled dot-product or multi-head attention of a decoder state over encoder outputs.

    The context has the encoder outputs' size ``key_dim`` (multi-head: ``key_dim`` must divide by ``heads``).
    """

    def __init__(self, kind: str, query_dim: int, key_dim: int, attention_dim: int | None = None,
                 heads: int = 1) -> None:
        super().__init__()
        self.kind = kind
        self.heads = heads if kind == "multihead" else 1
        attention_dim = attention_dim or query_dim
        if kind == "bahdanau":
            self.query = nn.Linear(query_dim, attention_dim, bias=False)
            self.key = nn.Linear(key_dim, attention_dim)
            self.score = nn.Linear(attention_dim, 1, bias=False)
        elif kind == "multihead":
            if key_dim % heads or attention_dim % heads:
                raise TransferkitError(f"{heads} attention heads do not divide the sizes {key_dim} / "
                                       f"{attention_dim}", "choose a number of heads dividing the hidden size")
            self.query = nn.Linear(query_dim, attention_dim, bias=False)
            self.key = nn.Linear(key_dim, attention_dim, bias=False)
            self.value = nn.Linear(key_dim, key_dim, bias=False)
            query_dim = attention_dim // heads
        else:
            self.key = nn.Linear(key_dim, query_dim, bias=False)
        self.scale = 1.0 / math.sqrt(query_dim)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """Projected keys ``(B, S, *)`` (multi-head: keys and values concatenated), once per source sequence."""
        if self.kind == "multihead":
            return torch.cat([self.key(memory), self.value(memory)], dim=-1)
        return self.key(memory)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``context (B, K)`` and ``weights (B, S)`` (zero at padded source positions; multi-head: mean of heads)."""
        if self.kind == "multihead":
            batch, length, heads = keys.shape[0], keys.shape[1], self.heads
            values = keys[..., -memory.shape[-1]:].reshape(batch, length, heads, -1)
            keys = keys[..., :-memory.shape[-1]].reshape(batch, length, heads, -1)
            scores = torch.einsum("bhd,bshd->bhs", self.query(query).reshape(batch, heads, -1), keys) * self.scale
            weights = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), dim=-1)
            context = torch.einsum("bhs,bshd->bhd", weights, values).reshape(batch, -1)
            return context, weights.mean(1)
        if self.kind == "bahdanau":
            scores = self.score(torch.tanh(self.query(query)[:, None] + keys)).squeeze(-1)
        else:
            scores = torch.einsum("bd,bsd->bs", query, keys) * self.scale
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return torch.einsum("bs,bsk->bk", weights, memory), weights


def greedy_decode(next_scores: Callable[[torch.Tensor], torch.Tensor], batch_size: int, max_len: int,
                  device: torch.device) -> torch.Tensor:
    """``(B, <= max_len)`` symbols, each the argmax of ``next_scores(previous symbols) -> (B, V)`` (starting from
    BOS); stops once every sequence has emitted EOS."""
    previous = torch.full((batch_size,), Vocabulary.BOS, dtype=torch.long, device=device)
    outputs, finished = [], torch.zeros(batch_size, dtype=torch.bool, device=device)
    for _ in range(max_len):
        previous = next_scores(previous).argmax(-1)
        outputs.append(previous)
        finished |= previous == Vocabulary.EOS
        if bool(finished.all()):
            break
    return torch.stack(outputs, dim=1)


class EncoderState(NamedTuple):
    memory: torch.Tensor  # (B, S, 2H) encoder outputs
    mask: torch.Tensor  # (B, S) True at real symbols
    summary: torch.Tensor  # (B, 2H) final forward and backward states
    keys: torch.Tensor | None  # projected attention keys

    def repeat(self, k: int) -> EncoderState:
        """Each item repeated ``k`` times (for beam search)."""
        return EncoderState(*(t.repeat_interleave(k, 0) if t is not None else None for t in self))


class Seq2Seq(nn.Module):
    """GRU encoder-decoder with optional attention (see the module docstring)."""

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, embedding_dim: int = 64, hidden_size: int = 128,
                 attention: str = "bahdanau", dropout: float = 0.1, bidirectional: bool = True,
                 max_source_len: int = 0, encoder_layers: int = 1, attention_heads: int = 4,
                 output_hidden: int = 0) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise TransferkitError(f"unknown attention '{attention}'", f"choose one of {', '.join(ATTENTIONS)}")
        self.config = {"src_vocab_size": src_vocab_size, "tgt_vocab_size": tgt_vocab_size,
                       "embedding_dim": embedding_dim, "hidden_size": hidden_size, "attention": attention,
                       "dropout": dropout, "bidirectional": bidirectional, "max_source_len": max_source_len,
                       "encoder_layers": encoder_layers, "attention_heads": attention_heads,
                       "output_hidden": output_hidden}
        context = (2 if bidirectional else 1) * hidden_size
        self.src_embedding = nn.Embedding(src_vocab_size, embedding_dim, padding_idx=Vocabulary.PAD)
        # learned source positions (0: none): tells each symbol where it stands, e.g. which power of 2 a bit is
        self.src_positions = nn.Embedding(max_source_len, embedding_dim) if max_source_len > 0 else None
        self.encoder = nn.GRU(embedding_dim, hidden_size, num_layers=encoder_layers, batch_first=True,
                              bidirectional=bidirectional, dropout=dropout if encoder_layers > 1 else 0.0)
        self.bridge = nn.Linear(context, hidden_size)
        self.tgt_embedding = nn.Embedding(tgt_vocab_size, embedding_dim, padding_idx=Vocabulary.PAD)
        self.decoder = nn.GRUCell(embedding_dim + context, hidden_size)
        self.attention = (Attention(attention, hidden_size, context, heads=attention_heads)
                          if attention != "none" else None)
        readout = hidden_size + context + embedding_dim
        self.output = (nn.Sequential(nn.Linear(readout, output_hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(output_hidden, tgt_vocab_size))
                       if output_hidden > 0 else nn.Linear(readout, tgt_vocab_size))
        self.dropout = nn.Dropout(dropout)

    def encode(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[EncoderState, torch.Tensor]:
        """Encoder outputs and the decoder's initial state ``(B, H)``."""
        embedded = self.src_embedding(src)
        if self.src_positions is not None:
            if src.shape[1] > self.src_positions.num_embeddings:
                raise TransferkitError(f"an input of {src.shape[1]} symbols is longer than the model's "
                                       f"{self.src_positions.num_embeddings} source positions",
                                       "shorten the input")
            embedded = embedded + self.src_positions(torch.arange(src.shape[1], device=src.device))[None]
        embedded = self.dropout(embedded)
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, final = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        summary = torch.cat(list(final[-(2 if self.encoder.bidirectional else 1):]), dim=-1)  # top layer
        mask = torch.arange(src.shape[1], device=src.device)[None] < lengths.to(src.device)[:, None]
        keys = self.attention.keys(memory) if self.attention is not None else None
        return EncoderState(memory, mask, summary, keys), torch.tanh(self.bridge(summary))

    def step(self, previous: torch.Tensor, hidden: torch.Tensor, state: EncoderState
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One decoder step: ``logits (B, V)``, the new hidden state and the attention weights (or None)."""
        embedded = self.dropout(self.tgt_embedding(previous))
        weights = None
        if self.attention is None:
            context = state.summary
        else:
            context, weights = self.attention(hidden, state.keys, state.memory, state.mask)
        hidden = self.decoder(torch.cat([embedded, context], dim=-1), hidden)
        logits = self.output(self.dropout(torch.cat([hidden, context, embedded], dim=-1)))
        return logits, hidden, weights

    def forward(self, src: torch.Tensor, lengths: torch.Tensor, tgt_in: torch.Tensor,
                teacher_forcing: float = 1.0) -> torch.Tensor:
        """Teacher-forced logits ``(B, T, V)`` for decoder inputs ``tgt_in`` (BOS + target)."""
        state, hidden = self.encode(src, lengths)
        previous = tgt_in[:, 0]
        steps = []
        for t in range(tgt_in.shape[1]):
            logits, hidden, _ = self.step(previous, hidden, state)
            steps.append(logits)
            if t + 1 < tgt_in.shape[1]:
                use_truth = teacher_forcing >= 1.0 or random.random() < teacher_forcing
                previous = tgt_in[:, t + 1] if use_truth else logits.argmax(-1)
        return torch.stack(steps, dim=1)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """``(B, <= max_len)`` most likely symbol at each step (stops once every sequence emitted EOS)."""
        state, hidden = self.encode(src, lengths)

        def next_scores(previous: torch.Tensor) -> torch.Tensor:
            nonlocal hidden
            logits, hidden, _ = self.step(previous, hidden, state)
            return logits

        return greedy_decode(next_scores, src.shape[0], max_len, src.device)

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, lengths: torch.Tensor, max_len: int, beam_size: int = 5,
                    length_penalty: float = 1.0) -> list[list[int]]:
        """Per source sequence, the hypothesis with the best ``log p / len^length_penalty`` (EOS excluded)."""
        results = []
        for b in range(src.shape[0]):
            state, hidden = self.encode(src[b:b + 1], lengths[b:b + 1])
            state, hidden = state.repeat(beam_size), hidden.repeat_interleave(beam_size, 0)
            tokens = [[] for _ in range(beam_size)]
            scores = torch.full((beam_size,), float("-inf"), device=src.device)
            scores[0] = 0.0  # start from one live hypothesis
            previous = torch.full((beam_size,), Vocabulary.BOS, dtype=torch.long, device=src.device)
            finished: list[tuple[float, list[int]]] = []
            for t in range(max_len):
                logits, hidden, _ = self.step(previous, hidden, state)
                candidates = (scores[:, None] + torch.log_softmax(logits, -1)).reshape(-1)
                top_scores, top = candidates.topk(2 * beam_size)
                vocab = logits.shape[-1]
                keep_rows, new_tokens, new_scores, new_previous = [], [], [], []
                for score, flat in zip(top_scores.tolist(), top.tolist()):
                    row, symbol = divmod(flat, vocab)
                    if score == float("-inf"):
                        break
                    if symbol == Vocabulary.EOS:
                        finished.append((score / max(1, t) ** length_penalty, tokens[row]))
                    elif len(keep_rows) < beam_size:
                        keep_rows.append(row)
                        new_tokens.append(tokens[row] + [symbol])
                        new_scores.append(score)
                        new_previous.append(symbol)
                    if len(keep_rows) == beam_size:
                        break
                best_live = max(new_scores, default=float("-inf"))
                if not keep_rows or (len(finished) >= beam_size and
                                     max(f[0] for f in finished) >= best_live / max(1, t + 1) ** length_penalty):
                    break
                index = torch.as_tensor(keep_rows, device=src.device)
                pad = beam_size - len(keep_rows)
                hidden = hidden[index]
                state = EncoderState(*(x[: len(keep_rows)] if x is not None else None for x in state))
                if pad:  # keep a fixed beam width: dead rows get -inf
                    hidden = torch.cat([hidden, hidden[:1].expand(pad, -1)])
                    state = EncoderState(*(torch.cat([x, x[:1].expand(pad, *x.shape[1:])]) if x is not None
                                           else None for x in state))
                    new_tokens += [[]] * pad
                    new_scores += [float("-inf")] * pad
                    new_previous += [Vocabulary.EOS] * pad
                tokens = new_tokens
                scores = torch.as_tensor(new_scores, device=src.device)
                previous = torch.as_tensor(new_previous, dtype=torch.long, device=src.device)
            if not finished:
                finished = [(float(scores[0]), tokens[0])]
            results.append(max(finished, key=lambda f: f[0])[1])
        return results


class Seq2SeqEnsemble(nn.Module):
    """N :class:`Seq2Seq` members over the same vocabularies, decoded with their averaged log-probabilities.

    ``forward`` returns the teacher-forced mean log-probabilities ``(B, T, V)`` (usable as logits: their
    log-softmax is the normalised geometric mean), ``greedy`` feeds every member the symbol that maximises the
    mean log-probability at each step. Beam search is not supported.
    """

    def __init__(self, members: Sequence[Seq2Seq]) -> None:
        super().__init__()
        if not members:
            raise TransferkitError("an ensemble needs at least one member", "pass one or more trained models")
        self.members = nn.ModuleList(members)
        self.config = {**members[0].config, "ensemble": len(members)}

    def forward(self, src: torch.Tensor, lengths: torch.Tensor, tgt_in: torch.Tensor,
                teacher_forcing: float = 1.0) -> torch.Tensor:
        return torch.stack([torch.log_softmax(m(src, lengths, tgt_in, teacher_forcing), -1)
                            for m in self.members]).mean(0)

    def step(self, previous: torch.Tensor, hiddens: list[torch.Tensor], states: list[EncoderState]
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean log-probabilities ``(B, V)`` of the next symbol and every member's new hidden state."""
        log_probs, new_hiddens = [], []
        for member, hidden, state in zip(self.members, hiddens, states):
            logits, hidden, _ = member.step(previous, hidden, state)
            log_probs.append(torch.log_softmax(logits, -1))
            new_hiddens.append(hidden)
        return torch.stack(log_probs).mean(0), new_hiddens

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """``(B, <= max_len)`` symbols maximising the mean log-probability at each step."""
        encoded = [m.encode(src, lengths) for m in self.members]
        states, hiddens = [e[0] for e in encoded], [e[1] for e in encoded]

        def next_scores(previous: torch.Tensor) -> torch.Tensor:
            nonlocal hiddens
            log_probs, hiddens = self.step(previous, hiddens, states)
            return log_probs

        return greedy_decode(next_scores, src.shape[0], max_len, src.device)

    def beam_search(self, *args: Any, **kwargs: Any) -> list[list[int]]:
        raise TransferkitError("beam search is not implemented for an ensemble", "use --beam-size 1 (greedy)")


# --- data ------------------------------------------------------------------------------------------------------


def binary_to_decimal_pairs(bits: int = 12) -> list[tuple[str, str]]:
    """Every ``bits``-bit number as (binary with leading zeros, decimal): ``("111101001010", "3914")``."""
    return [(format(n, f"0{bits}b"), str(n)) for n in range(2**bits)]


def split_pairs(pairs: Sequence[tuple[str, str]], train_fraction: float = 0.7, val_fraction: float = 0.1,
                seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """A seeded random split: train + val together hold ``train_fraction``, test the rest (never seen)."""
    if not 0 < val_fraction < train_fraction < 1:
        raise TransferkitError(f"invalid fractions train {train_fraction}, val {val_fraction}",
                               "use 0 < val-fraction < train-fraction < 1")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_seen, n_val = int(round(train_fraction * len(pairs))), int(round(val_fraction * len(pairs)))
    pick = [pairs[i] for i in order]
    splits = {"train": pick[n_val:n_seen], "val": pick[:n_val], "test": pick[n_seen:]}
    check_splits(splits)
    return splits


def check_splits(splits: dict[str, list[tuple[str, str]]]) -> None:
    """Every split holds pairs, and validation / test pairs use only symbols of the training pairs (the
    vocabularies come from them): checked before training, not found at the end of it."""
    empty = [name for name, part in splits.items() if not part]
    if empty:
        raise TransferkitError(f"the {' and '.join(empty)} split(s) hold no pairs "
                               f"({', '.join(f'{k} {len(v)}' for k, v in splits.items())})",
                               "use more pairs, or other --train-fraction / --val-fraction")
    for side, what in ((0, "source"), (1, "target")):
        seen = {symbol for pair in splits["train"] for symbol in pair[side]}
        unseen = sorted({symbol for name in ("val", "test") for pair in splits[name] for symbol in pair[side]} - seen)
        if unseen:
            raise TransferkitError(f"{what} symbol(s) {''.join(unseen)!r} of the validation/test pairs never occur "
                                   "in the training pairs", "use more pairs or a larger --train-fraction")


class PairDataset(Dataset):
    def __init__(self, pairs: Sequence[tuple[str, str]], source: Vocabulary, target: Vocabulary) -> None:
        self.pairs = list(pairs)
        self.encoded = [(source.encode(s), target.encode(t)) for s, t in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[list[int], list[int], int]:
        return (*self.encoded[i], i)


def collate_pairs(rows: list[tuple[list[int], list[int], int]]) -> dict[str, torch.Tensor]:
    """``src``, ``src_lengths``, ``tgt_in`` (BOS + y), ``tgt_out`` (y + EOS), ``index``; padded with 0."""
    src = [torch.as_tensor(s, dtype=torch.long) for s, _, _ in rows]
    tgt_in = [torch.as_tensor([Vocabulary.BOS, *t], dtype=torch.long) for _, t, _ in rows]
    tgt_out = [torch.as_tensor([*t, Vocabulary.EOS], dtype=torch.long) for _, t, _ in rows]
    return {"src": pad_sequence(src, batch_first=True), "src_lengths": torch.as_tensor([len(s) for s in src]),
            "tgt_in": pad_sequence(tgt_in, batch_first=True), "tgt_out": pad_sequence(tgt_out, batch_first=True),
            "index": torch.as_tensor([i for _, _, i in rows])}


def pair_loader(pairs, source: Vocabulary, target: Vocabulary, batch_size: int, train: bool,
                seed: int = 0) -> DataLoader:
    from transferkit.engine.sampling import EpochShuffleSampler

    dataset = PairDataset(pairs, source, target)
    sampler = EpochShuffleSampler(len(dataset), seed) if train else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_pairs)


# --- training and evaluation through the one engine ---------------------------------------------------------


@dataclass
class Seq2SeqConfig:
    """Options of ``transferkit seq2seq train`` (besides the engine's TrainConfig)."""

    attention: str = field(default="bahdanau", metadata={"help": "none, bahdanau (additive), dot (scaled "
                                                         "dot-product) or multihead."})
    embedding_dim: int = field(default=32, metadata={"help": "Symbol embedding size."})
    hidden_size: int = field(default=128, metadata={"help": "GRU state size (encoder: per direction)."})
    encoder_layers: int = field(default=1, metadata={"help": "Stacked GRU layers in the encoder."})
    attention_heads: int = field(default=4, metadata={"help": "Heads of --attention multihead (must divide the "
                                                      "encoder output size)."})
    output_hidden: int = field(default=0, metadata={"help": "Hidden units of an MLP output layer (0: linear "
                                                    "output layer)."})
    bidirectional: bool = field(default=True, metadata={"help": "Bidirectional encoder (--no-bidirectional: "
                                                        "left to right only)."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on embeddings and before the output layer."})
    source_positions: bool = field(default=False, metadata={"help": "Add learned position embeddings to the "
                                                            "source symbols (inputs no longer than the training "
                                                            "ones)."})
    teacher_forcing: float = field(default=1.0, metadata={"help": "Probability of feeding the true previous "
                                                          "symbol during training (else the model's own)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the token cross-entropy."})
    average_last: int = field(default=0, metadata={"help": "Average the weights of the last K epochs "
                                                   "(kept if it validates at least as well; 0: off)."})
    beam_size: int = field(default=1, metadata={"help": "Beam width for the test evaluation (1: greedy)."})
    ensemble: int = field(default=1, metadata={"help": "Train N models (seeds seed..seed+N-1) and decode with the "
                                               "mean of their log-probabilities at each step (1: one model; "
                                               "greedy decoding only)."})

    def validate(self) -> None:
        if self.attention not in ATTENTIONS:
            raise TransferkitError(f"invalid --attention '{self.attention}'", f"choose one of {', '.join(ATTENTIONS)}")
        if not 0 <= self.teacher_forcing <= 1 or not 0 <= self.label_smoothing < 1 or not 0 <= self.dropout < 1:
            raise TransferkitError("--teacher-forcing must lie in [0, 1], --label-smoothing and --dropout in [0, 1)",
                                   "pass e.g. 1.0, 0.1 and 0.1")
        if self.ensemble < 1 or (self.ensemble > 1 and self.beam_size > 1):
            raise TransferkitError(f"invalid --ensemble {self.ensemble} with --beam-size {self.beam_size}",
                                   "use --ensemble >= 1, and --beam-size 1 with an ensemble")
        if (self.average_last < 0 or self.beam_size < 1 or self.hidden_size < 1 or self.embedding_dim < 1
                or self.encoder_layers < 1 or self.attention_heads < 1 or self.output_hidden < 0):
            raise TransferkitError("--average-last must be >= 0 and --beam-size, --encoder-layers, "
                                   "--attention-heads and sizes >= 1", "fix the values")
        if self.attention == "multihead" and self.hidden_size % self.attention_heads:  # see Attention
            raise TransferkitError(f"{self.attention_heads} attention heads do not divide --hidden-size "
                                   f"{self.hidden_size}", "choose a number of heads dividing the hidden size")


def decode_batch(model: Seq2Seq | Seq2SeqEnsemble, batch: dict[str, torch.Tensor], max_len: int, beam_size: int = 1) -> list[list[int]]:
    if beam_size > 1:
        return model.beam_search(batch["src"], batch["src_lengths"], max_len, beam_size)
    return model.greedy(batch["src"], batch["src_lengths"], max_len).tolist()


def _target_ids(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    return [[int(v) for v in row if v not in (Vocabulary.PAD, Vocabulary.EOS)] for row in batch["tgt_out"].tolist()]


def _strip(ids: list[int]) -> list[int]:
    return ids[: ids.index(Vocabulary.EOS)] if Vocabulary.EOS in ids else ids


def seq2seq_metrics(model: Seq2Seq | Seq2SeqEnsemble, loader: Any, max_len: int, beam_size: int = 1,
                    accelerator: Any | None = None) -> dict[str, float]:
    """Teacher-forced ``loss`` / ``token_accuracy`` and decoded ``exact_match`` (whole output right), computed
    where the model is placed (an accelerator's prepared loader is already there)."""
    loss_sum, tokens, correct_tokens, exact, count = 0.0, 0, 0, 0, 0
    with inference(model) as device:
        for raw in loader:
            batch = to_device(raw, device)
            logits = model(batch["src"], batch["src_lengths"], batch["tgt_in"])
            keep = batch["tgt_out"] != Vocabulary.PAD
            loss_sum += float(F.cross_entropy(logits[keep], batch["tgt_out"][keep], reduction="sum"))
            correct_tokens += int((logits.argmax(-1)[keep] == batch["tgt_out"][keep]).sum())
            tokens += int(keep.sum())
            decoded = decode_batch(model, batch, max_len, beam_size)
            exact += sum(_strip(list(d)) == t for d, t in zip(decoded, _target_ids(batch)))
            count += len(decoded)
    stats = torch.tensor([loss_sum, tokens, correct_tokens, exact, count], dtype=torch.float64)
    if accelerator is not None and accelerator.num_processes > 1:
        stats = accelerator.reduce(stats.to(accelerator.device), reduction="sum").cpu()
    loss_sum, tokens, correct_tokens, exact, count = stats.tolist()
    return {"loss": loss_sum / max(1, tokens), "token_accuracy": correct_tokens / max(1, tokens),
            "exact_match": exact / max(1, count)}


@dataclass
class Seq2SeqRun:
    model: Seq2Seq | Seq2SeqEnsemble
    source: Vocabulary
    target: Vocabulary
    max_output_len: int
    history: list[dict[str, Any]]
    metrics: dict[str, Any]


def train_seq2seq(splits: dict[str, list[tuple[str, str]]], config: Seq2SeqConfig, train: Any,
                  checkpoint_dir: str | Path | None = None, progress: bool = True) -> Seq2SeqRun:
    """Train an encoder-decoder on ``splits["train"]`` with the engine (early stopping on validation exact match),
    optionally average the last checkpoints, and score ``splits["test"]``."""
    from transferkit.engine import Trainer, seed_everything

    config.validate()
    if config.ensemble > 1:
        return _train_ensemble(splits, config, train, checkpoint_dir, progress)
    source = Vocabulary.from_texts([s for s, _ in splits["train"]])
    target = Vocabulary.from_texts([t for _, t in splits["train"]])
    max_len = max(len(t) for _, t in splits["train"]) + 2
    seed_everything(train.seed)
    max_source_len = max(len(s) for s, _ in splits["train"]) if config.source_positions else 0
    model = Seq2Seq(len(source), len(target), config.embedding_dim, config.hidden_size, config.attention,
                    config.dropout, config.bidirectional, max_source_len, config.encoder_layers,
                    config.attention_heads, config.output_hidden)
    train_loader = pair_loader(splits["train"], source, target, train.batch_size, True, train.seed)
    val_loader = pair_loader(splits["val"], source, target, 256, False)
    averager = None
    if config.average_last > 1:
        from transferkit.sequence.training import CheckpointAverager

        averager = CheckpointAverager(model, config.average_last)
    from transferkit.sequence.training import SequenceCrossEntropy

    objective = SequenceCrossEntropy("tgt_out", config.label_smoothing)

    def forward(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(batch["src"], batch["src_lengths"], batch["tgt_in"], config.teacher_forcing)

    def evaluate(m: nn.Module, loader: Any, accelerator: Any, forward_fn: Any) -> dict[str, float]:
        return seq2seq_metrics(m, loader, max_len, accelerator=accelerator)

    trainer = Trainer(model, [objective], train, forward_fn=forward, evaluate_fn=evaluate,
                      monitor=("exact_match", "max"), checkpoint_dir=checkpoint_dir, progress=progress,
                      callbacks=[averager] if averager is not None else None)
    result = trainer.fit(train_loader, val_loader)
    metrics: dict[str, Any] = {"best_epoch": result.best_epoch, "train_seconds": round(result.train_seconds, 2)}
    if averager is not None and len(averager.snapshots) > 1:
        best_state = {k: v.clone() for k, v in model.state_dict().items()}
        best = seq2seq_metrics(model, val_loader, max_len)["exact_match"]
        model.load_state_dict(averager.averaged())
        averaged = seq2seq_metrics(model, val_loader, max_len)["exact_match"]
        metrics["checkpoint_averaging"] = {"epochs": len(averager.snapshots), "val_exact_match_best": best,
                                           "val_exact_match_averaged": averaged, "kept": averaged >= best}
        if averaged < best:
            model.load_state_dict(best_state)
    metrics.update(evaluate_splits(model, splits, source, target, max_len, config.beam_size))
    metrics.update({"n_train": len(splits["train"]), "n_val": len(splits["val"]), "n_test": len(splits.get("test", [])),
                    "attention": config.attention, "beam_size": config.beam_size,
                    "parameters": sum(p.numel() for p in model.parameters())})
    return Seq2SeqRun(model, source, target, max_len, result.history, metrics)


def evaluate_splits(model: Seq2Seq | Seq2SeqEnsemble, splits: dict[str, list[tuple[str, str]]], source: Vocabulary,
                    target: Vocabulary, max_len: int, beam_size: int = 1,
                    names: Sequence[str] = ("val", "test")) -> dict[str, float]:
    """``{split}_{loss, token_accuracy, exact_match}`` for each non-empty split in ``names``."""
    model.eval()
    metrics = {}
    for split in names:
        if splits.get(split):
            loader = pair_loader(splits[split], source, target, 256, False)
            scores = seq2seq_metrics(model, loader, max_len, beam_size)
            metrics.update({f"{split}_{k}": v for k, v in scores.items()})
    return metrics


def _train_ensemble(splits: dict[str, list[tuple[str, str]]], config: Seq2SeqConfig, train: Any,
                    checkpoint_dir: str | Path | None, progress: bool) -> Seq2SeqRun:
    """``config.ensemble`` members trained with seeds ``train.seed + i`` on the same split (the test split is
    scored once, for the ensemble)."""
    from dataclasses import replace

    seen = {k: v for k, v in splits.items() if k != "test"}
    runs = [train_seq2seq(seen, replace(config, ensemble=1), replace(train, seed=train.seed + i),
                          Path(checkpoint_dir) / f"member-{i}" if checkpoint_dir is not None else None, progress)
            for i in range(config.ensemble)]
    model = Seq2SeqEnsemble([r.model for r in runs])
    first = runs[0]
    metrics: dict[str, Any] = {
        "train_seconds": round(sum(r.metrics["train_seconds"] for r in runs), 2),
        "members": [{"seed": train.seed + i, "best_epoch": r.metrics["best_epoch"],
                     "val_exact_match": r.metrics["val_exact_match"], "train_seconds": r.metrics["train_seconds"]}
                    for i, r in enumerate(runs)]}
    metrics.update(evaluate_splits(model, splits, first.source, first.target, first.max_output_len))
    metrics.update({"n_train": len(splits["train"]), "n_val": len(splits["val"]),
                    "n_test": len(splits.get("test", [])), "attention": config.attention, "beam_size": 1,
                    "ensemble": config.ensemble, "parameters": sum(p.numel() for p in model.parameters())})
    return Seq2SeqRun(model, first.source, first.target, first.max_output_len, first.history, metrics)


def save_seq2seq(run: Seq2SeqRun, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
    from transferkit.rundir import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "model": run.model.config, "source_symbols": run.source.symbols,
              "target_symbols": run.target.symbols, "max_output_len": run.max_output_len, **(extra or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(folder / "model.safetensors", {k: v.contiguous() for k, v in run.model.state_dict().items()})


def read_saved_config(folder: str | Path, fmt: str, what: str, fix: str) -> tuple[Path, dict[str, Any]]:
    """The ``model/`` folder of a run (or the folder itself) and its config.json, checked to be of format ``fmt``."""
    folder = Path(folder)
    if (folder / "model").is_dir():
        folder = folder / "model"
    path = folder / "config.json"
    config = read_json(path, f"{what} config", "train it again") if path.is_file() else {}
    if not isinstance(config, dict) or config.get("format") != fmt:
        raise TransferkitError(f"'{folder}' holds no {what}", fix)
    return folder, config


def load_seq2seq(folder: str | Path) -> tuple[Seq2Seq | Seq2SeqEnsemble, Vocabulary, Vocabulary, int]:
    folder, config = read_saved_config(folder, FORMAT, "seq2seq model", "pass the --out folder of `seq2seq train`")
    with reading(folder / "config.json", "seq2seq model config", "train it again with `transferkit seq2seq train`"):
        model_config = dict(config["model"])
        members = check_count("ensemble", model_config.pop("ensemble", 1), 1, 64)
        model = (Seq2SeqEnsemble([Seq2Seq(**model_config) for _ in range(members)]) if members > 1
                 else Seq2Seq(**model_config))
        vocabularies = Vocabulary(config["source_symbols"]), Vocabulary(config["target_symbols"])
        max_len = check_count("max_output_len", config["max_output_len"], 1, 100_000)
    weights = folder / "model.safetensors"
    with reading(weights, "seq2seq weights file", "train it again with `transferkit seq2seq train`"):
        model.load_state_dict(read_safetensors(weights))
    model.eval()
    return model, *vocabularies, max_len


def translate(model: Seq2Seq | Seq2SeqEnsemble, source: Vocabulary, target: Vocabulary, texts: Sequence[str], max_len: int,
              beam_size: int = 1) -> list[str]:
    """Decode each input string (on the model's device)."""
    batch = collate_pairs([(source.encode(t), [], i) for i, t in enumerate(texts)])
    with inference(model) as device:
        decoded = decode_batch(model, to_device(batch, device), max_len, beam_size)
    return [target.decode(ids) for ids in decoded]


__all__ = ["Attention", "Seq2Seq", "Seq2SeqConfig", "Seq2SeqEnsemble", "Vocabulary", "binary_to_decimal_pairs", "collate_pairs",
           "load_seq2seq", "save_seq2seq", "split_pairs", "train_seq2seq", "translate"]
