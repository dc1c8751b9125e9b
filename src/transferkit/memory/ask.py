"""``ask``: answer a question from an index, citing the chunks used (retrieval-augmented generation,
Lewis et al. 2020).

* ``generate``: the top ``k`` chunks go into the causal LM's prompt as numbered passages ``[1] ... [k]``; the
  model is told to answer from them and to cite the numbers it used. Cited numbers are read back from the
  answer; when the model cites none, the answer is attributed to passage [1] (``cited_by_model`` = False).
* ``extractive``: no generation. The top chunks are cut into sentence windows, each window is embedded with the
  index's encoder, and the window most similar to the question is the answer (cosine similarity); it cites its
  chunk, with character offsets into the source.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.memory.index import SearchHit, VectorIndex, embed

logger = logging.getLogger(__name__)

ASK_MODES = ("generate", "extractive")
_WORD = re.compile(r"[^\W\d_]{2,}")
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+|\n\s*\n")
_CITATION = re.compile(r"\[(\d+)\]")
_ECHOED_PASSAGE = re.compile(r"\n\s*\[\d+\]\s*\(from ")  # the model starts copying the passage list
SYSTEM_PROMPT = "You answer questions using only the numbered passages given. Cite passages like [1]."


@dataclass
class Answer:
    question: str
    answer: str
    mode: str
    citations: list[SearchHit]  # the chunks the answer uses, most relevant first
    passages: list[SearchHit] = field(default_factory=list)  # every retrieved chunk
    cited_by_model: bool = True  # generate mode: False when the model cited no passage number

    def to_json(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "mode": self.mode,
                "cited_by_model": self.cited_by_model,
                "citations": [h.to_json() for h in self.citations],
                "passages": [h.to_json() for h in self.passages]}


def sentence_windows(text: str, max_sentences: int = 2, min_words: int = 1) -> list[tuple[int, int]]:
    """Character spans of windows of up to ``max_sentences`` consecutive sentences of ``text`` (sentences of
    fewer than ``min_words`` words, such as headings, are skipped)."""
    bounds, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if text[start:match.start()].strip():
            bounds.append((start, match.start()))
        start = match.end()
    if text[start:].strip():
        bounds.append((start, len(text)))
    bounds = [(s, e) for s, e in bounds if len(_WORD.findall(text[s:e])) >= min_words]  # no headings / rules
    windows = []
    for i in range(len(bounds)):
        for width in range(1, max_sentences + 1):
            if i + width <= len(bounds):
                windows.append((bounds[i][0], bounds[i + width - 1][1]))
    return windows


def extractive_answer(index: VectorIndex, question: str, hits: list[SearchHit],
                      max_sentences: int = 2) -> Answer:
    """The sentence window of the retrieved chunks most similar to the question."""
    candidates: list[tuple[SearchHit, int, int]] = []
    for hit in hits:
        spans = sentence_windows(hit.text, max_sentences, min_words=4) or sentence_windows(hit.text, max_sentences)
        candidates += [(hit, s, e) for s, e in spans]
    if not candidates:
        return Answer(question, "", "extractive", [], hits, True)
    vectors = embed(index.encoder, [hit.text[s:e] for hit, s, e in candidates])
    query = embed(index.encoder, [question])[0]
    best = int(np.argmax(vectors @ query))
    hit, s, e = candidates[best]
    offset = hit.start or 0
    cited = SearchHit(1, float(vectors[best] @ query), hit.source, hit.text[s:e], offset + s, offset + e, hit.id,
                      hit.record)
    return Answer(question, hit.text[s:e].strip(), "extractive", [cited], hits, True)


def build_rag_prompt(question: str, hits: list[SearchHit], max_chars: int = 500) -> str:
    """Numbered passages (each cut to ``max_chars``) followed by the question and the citation instruction."""
    passages = "\n\n".join(f"[{h.rank}] (from {h.source}) {h.text[:max_chars].strip()}" for h in hits)
    return (f"Passages:\n{passages}\n\nQuestion: {question}\n"
            "Answer in one or two sentences using only the passages, and cite the passage numbers you used, "
            "like [1].")


def generated_answer(lm: Any, question: str, hits: list[SearchHit], max_new_tokens: int = 64) -> Answer:
    """Retrieval-augmented generation: the LM answers from the numbered passages and cites them."""
    text = lm.generate(build_rag_prompt(question, hits), max_new_tokens=max_new_tokens, system=SYSTEM_PROMPT)
    text = _ECHOED_PASSAGE.split(text, maxsplit=1)[0].strip()
    numbers = [int(n) for n in _CITATION.findall(text)]
    by_rank = {h.rank: h for h in hits}
    cited = [by_rank[n] for n in dict.fromkeys(numbers) if n in by_rank]
    if cited:
        return Answer(question, text, "generate", cited, hits, True)
    return Answer(question, text, "generate", hits[:1], hits, False)


def ask(index: VectorIndex, question: str, k: int = 3, mode: str = "generate", lm: Any = None,
        lm_name: str = "smollm2-135m", max_new_tokens: int = 64) -> Answer:
    """Retrieve ``k`` chunks for ``question`` and answer from them (see the module docstring for the modes)."""
    if mode not in ASK_MODES:
        raise TransferkitError(f"unknown ask mode '{mode}'", f"choose one of {', '.join(ASK_MODES)}")
    if index.meta.modality != "text":
        raise TransferkitError("`ask` needs a text index", "build one with `transferkit index build --docs ...`")
    hits = index.search([question], k)[0]
    if not hits:
        raise TransferkitError("the index is empty", "add documents with `transferkit index add`")
    if mode == "extractive":
        return extractive_answer(index, question, hits)
    if lm is None:
        from transferkit.zeroshot.incontext import load_causal_lm

        lm = load_causal_lm(lm_name)
    return generated_answer(lm, question, hits, max_new_tokens)
