"""In-context classification with a causal LM (Brown et al. 2020, "Language Models are Few-Shot Learners").

A prompt holds an instruction, ``shots`` labelled examples per class (0 = zero-shot, 1 = one-shot, ...) and
the query; the predicted label is the candidate ``y`` with the highest log-likelihood

    score(y) = sum_t log p(y_t | prompt, y_<t)          (optionally divided by the number of label tokens)

so no text is generated and every answer is one of the labels. The LM is ``smollm2-135m`` (offline) or any
causal LM folder ``hf:<path>``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from transferkit.engine.placement import inference
from transferkit.errors import TransferkitError

if TYPE_CHECKING:
    from transferkit.backbones.causal_lm import CausalLMBackbone

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Classify each text into one of these labels: {labels}."
DEFAULT_EXAMPLE_FORMAT = "Text: {text}\nLabel: {label}"


def load_causal_lm(name: str = "smollm2-135m", pretrained: bool = True) -> CausalLMBackbone:
    """``smollm2-135m`` from the registry, or ``hf:<folder-or-hub-name>`` loaded as a causal LM."""
    from transferkit.backbones import create_backbone
    from transferkit.backbones.causal_lm import CausalLMBackbone
    from transferkit.backbones.text import build_hf_text_backbone

    if name.startswith("hf:"):
        backbone = build_hf_text_backbone(name[3:], name, pretrained, backbone_class=CausalLMBackbone)
    else:
        backbone = create_backbone(name, pretrained=pretrained)
    if not isinstance(backbone, CausalLMBackbone):
        raise TransferkitError(f"'{name}' is not a causal language model",
                               "use --lm smollm2-135m or --lm hf:<folder of a causal LM>")
    return backbone


@dataclass
class PromptBuilder:
    """Zero-, one- and few-shot prompts: instruction, ``Text: ... / Label: ...`` examples, then the query."""

    labels: list[str]
    instruction: str = DEFAULT_INSTRUCTION
    example_format: str = DEFAULT_EXAMPLE_FORMAT

    def example(self, text: str, label: str | None) -> str:
        """One formatted example; with ``label=None`` it stops right after ``Label:`` (the query)."""
        formatted = self.example_format.format(text=text.strip(), label="\x00")
        return formatted.split("\x00")[0].rstrip(" ") if label is None else formatted.replace("\x00", label)

    def build(self, query: str, examples: Sequence[tuple[str, str]] = ()) -> str:
        parts = [self.instruction.format(labels=", ".join(self.labels))] if self.instruction else []
        parts += [self.example(text, label) for text, label in examples]
        parts.append(self.example(query, None))
        return "\n\n".join(parts)


def pick_examples(texts: Sequence[str], labels: Sequence[int], class_names: Sequence[str], shots: int,
                  seed: int = 0) -> list[tuple[str, str]]:
    """``shots`` examples per class drawn at random, interleaved class by class (a, b, c, a, b, c, ...)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    per_class = []
    for c in range(len(class_names)):
        pool = np.flatnonzero(labels == c)
        if len(pool) < shots:
            raise TransferkitError(f"class '{class_names[c]}' has {len(pool)} labelled examples, fewer than "
                                   f"--shots {shots}", "lower --shots or label more examples")
        per_class.append(rng.choice(pool, size=shots, replace=False))
    return [(texts[int(per_class[c][i])], class_names[c]) for i in range(shots) for c in range(len(class_names))]


def label_log_likelihoods(lm: CausalLMBackbone, prompt: str, labels: Sequence[str],
                          length_normalise: bool = False) -> np.ndarray:
    """``log p(" " + label | prompt)`` summed over the label's tokens (mean when ``length_normalise``).

    The prompt is run once; its key/value cache is reused for every label continuation.
    """
    tokenizer, model = lm.tokenizer, lm.model
    with inference(lm) as device:
        prompt_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"].to(device)
        out = model(input_ids=prompt_ids, use_cache=True)
        first_logprobs = out.logits[0, -1].log_softmax(-1)
        scores = []
        for label in labels:
            full = tokenizer(prompt + " " + label, add_special_tokens=True)["input_ids"]
            label_ids = full[prompt_ids.shape[1]:] if full[:prompt_ids.shape[1]] == prompt_ids[0].tolist() else \
                tokenizer(" " + label, add_special_tokens=False)["input_ids"]
            if not label_ids:
                raise TransferkitError(f"label '{label}' has no tokens", "use non-empty label names")
            total = float(first_logprobs[label_ids[0]])
            if len(label_ids) > 1:
                cache = _copy_cache(out.past_key_values)
                rest = torch.tensor([label_ids[:-1]], device=device)
                logits = model(input_ids=rest, past_key_values=cache, use_cache=True).logits[0].log_softmax(-1)
                total += float(logits[torch.arange(len(label_ids) - 1, device=device), torch.tensor(label_ids[1:], device=device)].sum())
            scores.append(total / len(label_ids) if length_normalise else total)
    return np.asarray(scores, dtype=np.float64)


def _copy_cache(cache: Any) -> Any:
    """An independent copy of a key/value cache (a forward pass extends the cache it is given)."""
    import copy

    return copy.deepcopy(cache)


@dataclass
class InContextClassifier:
    """Classify texts by the LM's likelihood of each label after a zero-/few-shot prompt."""

    lm: Any
    builder: PromptBuilder
    examples: list[tuple[str, str]]
    length_normalise: bool = False

    def scores(self, text: str) -> np.ndarray:
        return label_log_likelihoods(self.lm, self.builder.build(text, self.examples), self.builder.labels,
                                     self.length_normalise)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Softmax over the label log-likelihoods, one row per text."""
        from transferkit.evaluation.calibration import softmax

        rows = [self.scores(t) for t in texts]
        return softmax(np.stack(rows)) if rows else np.zeros((0, len(self.builder.labels)))

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.builder.labels[i] for i in self.predict_proba(texts).argmax(-1)]


def evaluate_prompting(lm: Any, builder: PromptBuilder, train: Any, texts: Sequence[str],
                       shots_list: Sequence[int], seed: int = 0, labels: Sequence[int] | None = None,
                       show_prompt: Any = None) -> list[dict[str, Any]]:
    """Classify ``texts`` with prompts of each number of ``shots`` per class (examples drawn from the labelled
    ``train`` data): per entry ``{"shots", "predictions"}``, plus ``accuracy`` and ``n`` when the true ``labels``
    of the texts are given. ``show_prompt(prompt)`` receives the prompt of the first text at each shot count."""
    if min(shots_list, default=0) < 0:
        raise TransferkitError("--shots must be 0 or more", "e.g. --shots 0 --shots 1 --shots 4")
    results = []
    for shots in shots_list:
        examples = pick_examples(train.items, train.labels, builder.labels, shots, seed) if shots else []
        if show_prompt is not None and texts:
            show_prompt(builder.build(texts[0], examples))
        predicted = InContextClassifier(lm, builder, examples).predict_proba(texts).argmax(-1)
        entry: dict[str, Any] = {"shots": shots, "predictions": [builder.labels[int(i)] for i in predicted]}
        if labels is not None:
            entry["accuracy"] = float(np.mean(predicted == np.asarray(labels[: len(texts)])))
            entry["n"] = len(texts)
        results.append(entry)
    return results
