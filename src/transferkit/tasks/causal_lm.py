"""``--task causal-lm``: adapt a causal language model (``smollm2-135m``, ``hf-causal:<folder>``) to a text domain
with LoRA (or any strategy) through the one engine, and report held-out perplexity before and after.

Objective: next-token cross-entropy ``-1/T sum_t log p(w_t | w_<t)`` over the non-padding tokens (transformers'
``labels=`` shift); perplexity ``exp`` of the token-weighted mean over the held-out passages. Data: a ``.txt`` file
(passages separated by blank lines; long passages cut into pieces of about ``words_per_passage`` words) or a
``.jsonl`` / ``.csv`` file with a text column (``--text-column``, default ``text``). A seeded
``heldout_fraction`` of passages is never trained on.

``transferkit fit --task causal-lm --data notes.txt --strategy lora`` runs :func:`run_causal_lm` instead of the
classification flow (``api.fit``: same staging folder, resume and publishing); ``--val-fraction`` is the held-out
share, ``--max-length`` the token window (default 128); ``transferkit evaluate`` reports perplexity on a text file
and ``transferkit generate`` samples. :func:`fit_causal_lm` does the whole run from Python.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from transferkit.data.base import DataSplits, LabeledData
from transferkit.engine.objectives import Objective
from transferkit.engine.placement import inference, place, to_device
from transferkit.errors import TransferkitError
from transferkit.rundir import write_jsonl

if TYPE_CHECKING:
    from transferkit.backbones.causal_lm import CausalLMBackbone
    from transferkit.engine.trainer import TrainConfig
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy

logger = logging.getLogger(__name__)

TASK_TYPE = "causal-lm"
TASK_NAME = "lm"
IGNORE_INDEX = -100


# --- data ------------------------------------------------------------------------------------------------------


def read_passages(path: str | Path, text_column: str | None = None, words_per_passage: int = 120) -> list[str]:
    """Passages of a .txt (blank-line separated, cut to about ``words_per_passage`` words) or a table's column
    (.csv, .tsv, .jsonl); files are decoded as every text reader decodes them (:func:`data.text.decode_text`)."""
    path = Path(path)
    if not path.is_file():
        raise TransferkitError(f"text file '{path}' does not exist", "pass a .txt, .csv, .tsv or .jsonl file")
    from transferkit.data.text import TEXT_EXTENSIONS, decode_text, read_table

    if path.suffix.lower() in TEXT_EXTENSIONS:  # .csv, .tsv, .jsonl
        table = read_table(path)
        column = text_column or "text"
        if column not in table.columns:
            raise TransferkitError(f"'{path}' has no column '{column}' (columns: {', '.join(table.columns)})",
                                   "name the text column with --text-column")
        documents = [str(value) for value in table.values[column] if value not in (None, "")]
    else:
        documents = re.split(r"\n\s*\n", decode_text(path))  # UTF-8, UTF-16 with its BOM, else latin-1
    passages = []
    for document in documents:
        words = document.split()
        for start in range(0, len(words), words_per_passage):
            piece = " ".join(words[start : start + words_per_passage])
            if len(piece) >= 20:
                passages.append(piece)
    if len(passages) < 2:
        raise TransferkitError(f"'{path}' holds fewer than 2 passages of text", "give a longer text file")
    return passages


def passage_splits(passages: list[str], heldout_fraction: float, seed: int) -> DataSplits:
    """Seeded train / held-out split of passages (held-out = validation = test: it is never trained on)."""
    order = np.random.default_rng(seed).permutation(len(passages))
    n_heldout = max(1, round(len(passages) * heldout_fraction))
    held, train = sorted(order[:n_heldout].tolist()), sorted(order[n_heldout:].tolist())

    def part(indices: list[int], name: str) -> LabeledData:
        return LabeledData([passages[i] for i in indices], np.full(len(indices), -1), [], "text",
                           [f"passage[{i}]" for i in indices], name=name)

    heldout = part(held, "heldout")
    return DataSplits(part(train, "train"), heldout, heldout,
                      notes=[f"{len(train)} training and {len(held)} held-out passages"])


# --- objective, forward, evaluation ------------------------------------------------------------------------------


def lm_labels(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Targets for transformers' shifted LM loss: the input ids, padding replaced by -100."""
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)


def lm_forward(model: TransferModel, batch: dict[str, Any]) -> Any:
    """The LM's own forward (logits over the vocabulary and the mean next-token loss)."""
    inputs = batch["inputs"]
    return model.backbone.model(**inputs, labels=lm_labels(inputs), use_cache=False)


class CausalLMObjective(Objective):
    """Mean next-token cross-entropy over non-padding tokens (computed by the model from ``labels``)."""

    name = "next_token"

    def forward(self, model: torch.nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        return outputs.loss


def token_nll(model: TransferModel, loader: Any) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, number of predicted tokens) over ``loader``, computed where
    the model is placed."""
    total, count = 0.0, 0
    with inference(model) as device:
        for batch in loader:
            inputs = to_device(batch["inputs"], device)
            logits = model.backbone.model(**inputs, use_cache=False).logits[:, :-1].float()
            targets = lm_labels(inputs)[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                     ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(loss)
            count += int((targets != IGNORE_INDEX).sum())
    return total, count


def perplexity(model: TransferModel, loader: Any) -> float:
    total, count = token_nll(model, loader)
    return math.exp(total / max(1, count))


def lm_evaluate(model: TransferModel, loader: Any, accelerator: Any, forward_fn: Any) -> dict[str, float]:
    """Validation ``loss`` (mean token NLL) and ``perplexity`` for the engine's early stopping."""
    total, count = token_nll(model, loader)
    if accelerator.num_processes > 1:
        summed = accelerator.reduce(torch.tensor([total, float(count)], device=accelerator.device), "sum")
        total, count = float(summed[0]), int(summed[1])
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(loss)}


def evaluate_perplexity(model: TransferModel, data: str, text_column: str | None = None,
                        batch_size: int = 8) -> dict[str, Any]:
    """Perplexity of a language-model run on every passage of a text file (``transferkit evaluate``)."""
    from transferkit.data.loader import make_loader

    passages = read_passages(data, text_column)
    loader = make_loader(LabeledData(passages, np.full(len(passages), -1), [], "text",
                                     [f"passage[{i}]" for i in range(len(passages))]),
                         model.backbone, batch_size=batch_size, train=False)
    total, count = token_nll(model, loader)
    return {"task": TASK_TYPE, "perplexity": math.exp(total / max(1, count)), "mean_token_nll": total / max(1, count),
            "passages": len(passages), "tokens": count, "n": len(passages)}


# --- runs ------------------------------------------------------------------------------------------------------


@dataclass
class CausalLMOptions:
    text_column: str | None = None
    heldout_fraction: float = 0.1
    words_per_passage: int = 120
    max_length: int = 128


def check_lm_strategy(strategy: Strategy) -> None:
    """Strategies that train a causal LM list ``causal_lm`` in their ``task_kinds`` (FISH's Fisher estimate and
    the probes need class labels)."""
    from transferkit.strategies import list_strategies

    if strategy.supports("causal_lm") is not True:
        able = [name for name, cls in list_strategies().items() if "causal_lm" in cls.task_kinds]
        raise TransferkitError(f"--task causal-lm cannot train with --strategy {strategy.name}",
                               f"use one of {', '.join(able)}")


def build_lm_model(backbone_name: str, pretrained: bool, max_length: int, **backbone_options: Any) -> TransferModel:
    from transferkit.backbones import create_backbone
    from transferkit.model import TaskSpec, TransferModel

    backbone = create_backbone(backbone_name, pretrained=pretrained, max_length=max_length, **backbone_options)
    if not hasattr(backbone, "generate") or not hasattr(getattr(backbone, "model", None), "lm_head"):
        raise TransferkitError(f"--task causal-lm needs a causal language model, not '{backbone_name}'",
                               "use --backbone smollm2-135m or hf-causal:<folder>")
    # head-less task: the LM head is the backbone's own, the TransferModel's head slot holds no parameters
    return TransferModel(backbone, [TaskSpec(TASK_NAME, "causal_lm", [], 0, {"type": TASK_TYPE})])


def run_causal_lm(data: str, backbone_name: str, strategy: Strategy, train: TrainConfig, stage: Path,
                  options: CausalLMOptions | None = None, pretrained: bool = True, progress: bool = False,
                  cache_dir: Path | None = None, backbone_options: dict[str, Any] | None = None,
                  passages: list[str] | None = None) -> dict[str, Any]:
    """Train ``strategy`` (e.g. lora) on the passages of the text file ``data`` (``passages``: already read from
    it by :func:`read_passages`); writes ``stage/model``; returns the metrics."""
    from transferkit.data.loader import make_loader
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import seed_everything
    from transferkit.model import save_model

    check_lm_strategy(strategy)
    options = options or CausalLMOptions()
    started = time.perf_counter()
    if passages is None:
        passages = read_passages(data, options.text_column, options.words_per_passage)
    splits = passage_splits(passages, options.heldout_fraction, train.seed)
    seed_everything(train.seed)
    model = build_lm_model(backbone_name, pretrained, options.max_length, **(backbone_options or {}))
    strategy.prepare(model)
    place(model, train.device)  # perplexity before and after is measured where training runs
    heldout_loader = make_loader(splits.val, model.backbone, batch_size=max(8, train.batch_size), train=False)
    before = perplexity(model, heldout_loader)
    logger.info("held-out perplexity before training: %.2f", before)
    context = RunContext(splits=splits, train=train, task_objectives=[CausalLMObjective()],
                         checkpoint_dir=stage / "checkpoint", run_dir=stage, cache_dir=cache_dir, progress=progress,
                         forward_fn=lm_forward, evaluate_fn=lm_evaluate, monitor=("loss", "min"),
                         notes=list(splits.notes))
    result = strategy.train(model, context)
    after = perplexity(model, heldout_loader)
    logger.info("held-out perplexity after training: %.2f (before %.2f)", after, before)
    trainable, total = model.count_parameters()
    metrics: dict[str, Any] = {
        "task": TASK_TYPE, "perplexity_before": before, "perplexity_after": after,
        "perplexity_ratio": after / before, "heldout_passages": len(splits.val),
        "heldout_tokens": token_nll(model, heldout_loader)[1], "train_passages": len(splits.train),
        "trainable_params": trainable, "total_params": total, "backbone": backbone_name, "strategy": strategy.name,
        "train_seconds": round(time.perf_counter() - started, 3), "best_epoch": result.best_epoch,
        "notes": context.notes,
    }
    save_model(model, stage / "model", strategy.to_dict(), extra={"data": str(data), "task": TASK_TYPE})
    write_jsonl(stage / "history.jsonl", result.history)
    return metrics


def fit_causal_lm(data: str, out: str | Path, backbone: str = "smollm2-135m", strategy: str = "lora",
                  strategy_options: dict[str, Any] | None = None, lm_options: CausalLMOptions | None = None,
                  pretrained: bool = True, backbone_options: dict[str, Any] | None = None, progress: bool = False,
                  **train_options: Any) -> dict[str, Any]:
    """Python entry point: ``fit_causal_lm("notes.txt", "runs/lm", epochs=2, lr=2e-4)`` -> metrics (also in
    ``out/metrics.json``). ``out`` must not hold a finished run; it is written like ``fit``'s run folders."""
    from transferkit.engine.trainer import TrainConfig
    from transferkit.rundir import OutputFolder, write_json
    from transferkit.strategies import create_strategy

    train = TrainConfig(**{"early_stopping": 0, "lr": 2e-4, **train_options})
    train.validate()
    chosen = create_strategy(strategy, strategy_options or {})
    folder = OutputFolder(out, "run")
    folder.begin()
    with folder:
        metrics = run_causal_lm(data, backbone, chosen, train, folder.stage, lm_options, pretrained,
                                progress=progress, backbone_options=backbone_options)
        write_json(folder.stage / "metrics.json", metrics)
        folder.publish()
    return metrics


def check_prompt(prompt: str) -> None:
    """Refuse an empty or blank prompt: there is nothing to continue (or answer), and a tokenizer that adds no
    start token makes it a sequence of 0 tokens, which the model cannot take."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise TransferkitError("the prompt is empty", 'give the text to continue, e.g. "Once upon a time"')


def generate_text(backbone: CausalLMBackbone, prompt: str, max_new_tokens: int = 64, chat: bool = False,
                  temperature: float = 0.0, seed: int = 0) -> str:
    """Continue ``prompt`` (``chat``: as a user turn of the tokenizer's chat template). ``temperature`` 0 is
    greedy decoding, above 0 sampling from ``softmax(logits / temperature)`` with a seeded generator. An empty
    or blank prompt is refused (:func:`check_prompt`)."""
    check_prompt(prompt)
    if chat:
        if temperature == 0:
            return backbone.generate(prompt, max_new_tokens=max_new_tokens)
        encoded = backbone.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True, return_tensors="pt",
                                                         return_dict=True)
    else:
        encoded = backbone.tokenizer(prompt, return_tensors="pt")
    # only what a decoder takes (a BERT-style tokenizer also returns token_type_ids, which generate() rejects)
    inputs = {k: v for k, v in dict(encoded).items() if k in ("input_ids", "attention_mask")}
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else \
        {"do_sample": False}
    torch.manual_seed(seed)
    with inference(backbone) as device:
        output = backbone.model.generate(**to_device(inputs, device), max_new_tokens=max_new_tokens,
                                         pad_token_id=backbone.tokenizer.pad_token_id, **sampling)
    return backbone.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
