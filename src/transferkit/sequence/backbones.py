"""Sequence backbones: ``rnn`` (Elman), ``lstm``, ``gru`` and ``transformer`` (encoder), trainable from scratch.

Inputs are token-id sequences (``input_type="tokens"``), strings (``"chars"``, with a ``vocab`` string) or
numeric time series (``"numeric"``: arrays ``(T,)`` or ``(T, input_dim)``). ``collate`` pads a batch to
``{"x": (B, T[, D]), "lengths": (B,)}``; padding never influences the result:

* recurrent layers run on packed sequences (``pack_padded_sequence``), so each sequence stops at its own
  length; the embedding is the last layer's final state (both directions concatenated when bidirectional);
* the Transformer encoder (Vaswani et al. 2017) masks padded keys and mean-pools over valid positions; positions
  are sinusoidal, ``PE(t, 2i) = sin(t / 10000^(2i/d))``, ``PE(t, 2i+1) = cos(...)``, or learned embeddings.

Elman RNN: ``h_t = tanh(W x_t + U h_{t-1} + b)``. LSTM (Hochreiter & Schmidhuber 1997): gates
``i, f, o = sigmoid(.)``, ``c_t = f * c_{t-1} + i * tanh(.)``, ``h_t = o * tanh(c_t)`` (see ``numpy_lstm``);
the forget-gate (LSTM) and update-gate (GRU) biases start at 1.
GRU (Cho et al. 2014): ``z, r = sigmoid(.)``, ``h_t = (1 - z) * h_{t-1} + z * tanh(W x_t + U (r * h_{t-1}))``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from transferkit.backbones import register_backbone
from transferkit.backbones.base import Backbone, BackboneInfo, BackboneSpec, reject_unknown_options
from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)

CELLS = ("rnn", "lstm", "gru", "transformer")
INPUT_TYPES = ("tokens", "chars", "numeric")
PAD_ID, UNKNOWN_ID = 0, 1
_OPTIONS = ("input_type", "vocab_size", "vocab", "input_dim", "embedding_dim", "hidden_size", "num_layers",
            "bidirectional", "dropout", "positions", "num_heads", "max_len")
_RECURRENT = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """``(length, dim)`` sinusoidal position encodings of Vaswani et al. (2017)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return table


def init_forget_bias(layer: nn.LSTM | nn.GRU, value: float = 1.0) -> None:
    """Start the gates that keep the old state open (total bias ``value``; Gers et al. 2000, Jozefowicz et al.
    2015): the LSTM forget gate, the GRU update gate ``z`` (torch: ``h_t = (1 - z) n + z h_{t-1}``), so the
    state carries information over long spans from the first step of training."""
    hidden = layer.hidden_size
    with torch.no_grad():
        for name, bias in layer.named_parameters():
            if name.startswith("bias_"):  # gate order: LSTM input, forget, cell, output; GRU reset, update, new
                bias[hidden:2 * hidden] = value if name.startswith("bias_ih") else 0.0


class InputEmbedding(nn.Module):
    """Token / character ids -> ``nn.Embedding`` (id 0 = padding); numeric frames -> a linear projection; plus
    position encodings for the Transformer."""

    def __init__(self, input_type: str, num_embeddings: int, input_dim: int, dim: int, positions: str | None,
                 max_len: int) -> None:
        super().__init__()
        self.input_type = input_type
        if input_type == "numeric":
            self.project: nn.Module = nn.Linear(input_dim, dim)
        else:
            self.project = nn.Embedding(num_embeddings, dim, padding_idx=PAD_ID)
        self.positions = positions
        if positions == "learned":
            self.position_table = nn.Embedding(max_len, dim)
        elif positions == "sinusoidal":
            self.register_buffer("sinusoids", sinusoidal_positions(max_len, dim), persistent=False)
        self.scale = math.sqrt(dim) if positions and input_type != "numeric" else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project(x) * self.scale
        if self.positions == "learned":
            h = h + self.position_table(torch.arange(h.shape[1], device=h.device))[None]
        elif self.positions == "sinusoidal":
            h = h + self.sinusoids[: h.shape[1]][None]
        return h


class SequenceBackbone(Backbone):
    """A recurrent or Transformer encoder mapping a sequence to a ``(B, feature_dim)`` embedding."""

    modality = "sequence"

    def __init__(self, cell: str = "lstm", input_type: str = "tokens", vocab_size: int = 0, vocab: str = "",
                 input_dim: int = 1, embedding_dim: int = 64, hidden_size: int = 128, num_layers: int = 1,
                 bidirectional: bool = False, dropout: float = 0.0, positions: str = "sinusoidal",
                 num_heads: int = 4, max_len: int = 512) -> None:
        super().__init__()
        self._validate(cell, input_type, vocab_size, vocab, num_layers, hidden_size, num_heads, positions)
        self.spec = BackboneSpec(cell, {
            "input_type": input_type, "vocab_size": vocab_size, "vocab": vocab, "input_dim": input_dim,
            "embedding_dim": embedding_dim, "hidden_size": hidden_size, "num_layers": num_layers,
            "bidirectional": bidirectional, "dropout": dropout, "positions": positions, "num_heads": num_heads,
            "max_len": max_len})
        self.cell, self.input_type, self.max_len = cell, input_type, max_len
        self.char_ids = {c: i + 2 for i, c in enumerate(vocab)}
        num_embeddings = len(vocab) + 2 if input_type == "chars" else vocab_size
        transformer = cell == "transformer"
        self.embedding = InputEmbedding(input_type, num_embeddings, input_dim,
                                        hidden_size if transformer else embedding_dim,
                                        positions if transformer else None, max_len)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList()
        if transformer:
            for _ in range(num_layers):
                self.layers.append(nn.TransformerEncoderLayer(hidden_size, num_heads, 4 * hidden_size, dropout,
                                                              batch_first=True))
            self.feature_dim = hidden_size
        else:
            directions = 2 if bidirectional else 1
            width = embedding_dim
            for _ in range(num_layers):
                layer = _RECURRENT[cell](width, hidden_size, batch_first=True, bidirectional=bidirectional)
                if cell in ("lstm", "gru"):
                    init_forget_bias(layer, 1.0)
                self.layers.append(layer)
                width = hidden_size * directions
            self.feature_dim = width

    @staticmethod
    def _validate(cell: str, input_type: str, vocab_size: int, vocab: str, num_layers: int, hidden_size: int,
                  num_heads: int, positions: str) -> None:
        if cell not in CELLS:
            raise TransferkitError(f"unknown sequence cell '{cell}'", f"choose one of {', '.join(CELLS)}")
        if input_type not in INPUT_TYPES:
            raise TransferkitError(f"unknown input_type '{input_type}'", f"choose one of {', '.join(INPUT_TYPES)}")
        if input_type == "tokens" and vocab_size < 2:
            raise TransferkitError("token input needs vocab_size >= 2 (id 0 is padding)", "pass vocab_size=N")
        if input_type == "chars" and not vocab:
            raise TransferkitError("character input needs a vocab string", "pass vocab='abc...'")
        if num_layers < 1 or hidden_size < 1:
            raise TransferkitError("num_layers and hidden_size must be >= 1", "pass positive sizes")
        if cell == "transformer" and (hidden_size % num_heads or positions not in ("sinusoidal", "learned")):
            raise TransferkitError("transformer needs hidden_size divisible by num_heads and positions "
                                   "'sinusoidal' or 'learned'", "e.g. hidden_size=128, num_heads=4")

    # --- inputs ------------------------------------------------------------------------------------------------
    def preprocess(self, item: Any, train: bool = False) -> torch.Tensor:
        if self.input_type == "chars":
            ids = [self.char_ids.get(c, UNKNOWN_ID) for c in str(item)]
            tensor = torch.as_tensor(ids, dtype=torch.long)
        elif self.input_type == "tokens":
            tensor = torch.as_tensor(np.asarray(item), dtype=torch.long)
        else:
            tensor = torch.as_tensor(np.asarray(item, dtype=np.float32))
            tensor = tensor[:, None] if tensor.ndim == 1 else tensor
        if len(tensor) == 0:
            raise TransferkitError("an empty sequence cannot be encoded", "remove empty items from the data")
        return tensor[: self.max_len]

    def collate(self, items: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        lengths = torch.as_tensor([len(t) for t in items], dtype=torch.long)
        return {"x": pad_sequence(list(items), batch_first=True, padding_value=PAD_ID), "lengths": lengths}

    def preprocess_signature(self) -> str:
        return f"{self.spec.name}|{self.input_type}|{self.spec.options.get('vocab', '')}|max_len={self.max_len}"

    # --- forward -----------------------------------------------------------------------------------------------
    def encode(self, embedded: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs (B, T, F), features (B, feature_dim))`` from already embedded inputs ``(B, T, E)``."""
        total = embedded.shape[1]
        mask = torch.arange(total, device=embedded.device)[None] < lengths.to(embedded.device)[:, None]
        h = self.dropout(embedded)
        if self.cell == "transformer":
            for layer in self.layers:
                h = layer(h, src_key_padding_mask=~mask)
            h = h * mask[..., None]
            features = h.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
            return h, features
        final = None
        for i, layer in enumerate(self.layers):
            packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, state = layer(packed)
            h, _ = pad_packed_sequence(out, batch_first=True, total_length=total)
            final = state[0] if isinstance(state, tuple) else state  # (directions, B, H); LSTM: h_n of (h_n, c_n)
            if i < len(self.layers) - 1:
                h = self.dropout(h)
        assert final is not None
        return h, torch.cat(list(final), dim=-1)

    def forward_sequence(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step outputs ``(B, T, F)`` (zero at padding for the Transformer) and the validity mask ``(B, T)``."""
        outputs, _ = self.encode(self.embedding(inputs["x"]), inputs["lengths"])
        total = outputs.shape[1]
        mask = torch.arange(total, device=outputs.device)[None] < inputs["lengths"].to(outputs.device)[:, None]
        return outputs, mask

    def forward_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(self.embedding(inputs["x"]), inputs["lengths"])[1]

    def layer_groups(self) -> list[nn.Module]:
        return [self.embedding, *self.layers]

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)


def _info(cell: str, description: str):
    def info() -> BackboneInfo:
        return BackboneInfo(name=cell, modality="sequence", params=None, feature_dim=None, weights="none (random init)",
                            offline_available=True, description=description)

    return info


def _factory(cell: str):
    def create(pretrained: bool = True, **options: Any) -> SequenceBackbone:
        reject_unknown_options(cell, options, _OPTIONS)
        if pretrained:
            logger.info("%s has no pretrained weights; building a random initialisation", cell)
        return SequenceBackbone(cell, **options)

    return create


for _cell, _text in [
    ("rnn", "Elman RNN over tokens, characters or time series (multi-layer, bidirectional option)"),
    ("lstm", "LSTM over tokens, characters or time series (multi-layer, bidirectional option)"),
    ("gru", "GRU over tokens, characters or time series (multi-layer, bidirectional option)"),
    ("transformer", "Transformer encoder (sinusoidal or learned positions), mean-pooled"),
]:
    register_backbone(_cell, _info(_cell, _text))(_factory(_cell))
