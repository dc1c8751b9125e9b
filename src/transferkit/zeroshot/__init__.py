"""Zero-shot and in-context classification: labels given by name (text similarity, ConSE, CLIP) or by a few
examples inside a causal LM's prompt."""

from transferkit.zeroshot.classifiers import ClipZeroShot, ConSEZeroShot, TextZeroShot, parse_labels
from transferkit.zeroshot.incontext import (
           InContextClassifier,
           PromptBuilder,
           label_log_likelihoods,
           load_causal_lm,
)

__all__ = ["ClipZeroShot", "ConSEZeroShot", "InContextClassifier", "PromptBuilder", "TextZeroShot",
           "label_log_likelihoods", "load_causal_lm", "parse_labels"]
