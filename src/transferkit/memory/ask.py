"""``ask``: answer a question from an index, citing the chunks used (retrieval-augmented generation,
Lewis et al. 2020).

* ``generate``: the top ``k`` chunks go into the causal LM's chat prompt as numbered passages ``[1] ... [k]``
  and the model must answer in a constrained format, ``According to passage [n], <answer>``: the assistant turn
  is pre-filled with ``According to passage [``, the next token is restricted to the passage numbers (so ``n``
  is the model's most likely source, ``argmax_n p(n | passages, question)``), then the answer is generated
  freely. Further ``[m]`` in the answer are read back as extra citations. (A free-form instruction "cite like
  [1]" left SmolLM2-135M citing nothing most of the time.) ``overlap_passage`` scores which passage the
  generated words overlap most, as an independent check of the citation.
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
import torch

from transferkit.engine.placement import inference, to_device
from transferkit.errors import TransferkitError
from transferkit.memory.index import SearchHit, VectorIndex, embed
from transferkit.memory.retrieval import RetrievalConfig

logger = logging.getLogger(__name__)

ASK_MODES = ("generate", "extractive")
_WORD = re.compile(r"[^\W\d_]{2,}")
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+|\n\s*\n")
_ENDS_SENTENCE = re.compile(r"[.!?:]\s*$|\n\s*\n\s*$")  # text that ends where a sentence ends
_CITATION = re.compile(r"\[(\d+)\]")
# the model starts copying the prompt: a passage of the list, or a new "Question:" / the answer instruction
_ECHOED_PROMPT = re.compile(r"\n\s*(?:\[\d+\]\s*\(from |Question:|Answer in one)")
SYSTEM_PROMPT = "You answer questions using only the numbered passages given, citing the passage you use."
CITATION_PREFIX = "According to passage ["


@dataclass
class Answer:
    question: str
    answer: str
    mode: str
    citations: list[SearchHit]  # the chunks the answer uses, most relevant first
    passages: list[SearchHit] = field(default_factory=list)  # every retrieved chunk
    overlap: SearchHit | None = None  # generate mode: the passage the answer's words overlap most

    def to_json(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "mode": self.mode,
                "overlap_source": self.overlap.source if self.overlap else None,
                "citations": [h.to_json() for h in self.citations],
                "passages": [h.to_json() for h in self.passages]}


def sentence_windows(text: str, max_sentences: int = 2, min_words: int = 1, cut_start: bool = False,
                     cut_end: bool = False) -> list[tuple[int, int]]:
    """Character spans of windows of up to ``max_sentences`` consecutive sentences of ``text`` (sentences of
    fewer than ``min_words`` words, such as headings, are skipped). ``cut_start`` / ``cut_end``: ``text`` begins /
    ends inside a sentence of its source (a chunk), so its first piece / its last piece without a sentence end
    is a fragment, never a sentence (see :func:`chunk_cuts`)."""
    bounds, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if text[start:match.start()].strip():
            bounds.append((start, match.start()))
        elif start == 0:
            cut_start = False  # the text begins with a sentence end: its first piece is a whole sentence
        start = match.end()
    if text[start:].strip():
        bounds.append((start, len(text)))
    if cut_start and bounds and bounds[0][0] == 0:
        bounds = bounds[1:]
    if cut_end and bounds and bounds[-1][1] == len(text) and not _ENDS_SENTENCE.search(text):
        bounds = bounds[:-1]
    bounds = [(s, e) for s, e in bounds if len(_WORD.findall(text[s:e])) >= min_words]  # no headings / rules
    windows = []
    for i in range(len(bounds)):
        for width in range(1, max_sentences + 1):
            if i + width <= len(bounds):
                windows.append((bounds[i][0], bounds[i + width - 1][1]))
    return windows


def chunk_cuts(index: VectorIndex, hit: SearchHit) -> tuple[bool, bool]:
    """Whether the chunk ``hit`` begins / ends inside a sentence of its source. The chunks of one document have
    consecutive ids: the previous one holds the text before the chunk (a chunk at offset 0, or right after a
    sentence end, begins a sentence; without it, any other offset counts as a cut), and a next one means the
    chunk stops before the document's end."""
    def neighbour(step: int) -> dict[str, Any] | None:
        record = index.records.get(hit.id + step) if hit.id >= 0 else None
        same = record is not None and record.get("source") == hit.source and record.get("record", 0) == hit.record
        return record if same else None

    begins_cut = False
    if hit.start:
        before = neighbour(-1)
        start = before.get("start") if before else None
        if isinstance(start, int) and start <= hit.start <= start + len(before["text"]):  # type: ignore[index]
            preceding = before["text"][:hit.start - start]  # type: ignore[index]
            begins_cut = bool(preceding.strip()) and not _ENDS_SENTENCE.search(preceding)
        else:
            begins_cut = True
    return begins_cut, neighbour(1) is not None


def extractive_answer(index: VectorIndex, question: str, hits: list[SearchHit],
                      max_sentences: int = 2) -> Answer:
    """The sentence window of the retrieved chunks most similar to the question. A piece of a sentence that the
    chunking cut (:func:`chunk_cuts`) is never offered; a chunk holding no whole sentence is offered whole."""
    candidates: list[tuple[SearchHit, int, int]] = []
    for hit in hits:
        cut_start, cut_end = chunk_cuts(index, hit)
        spans = (sentence_windows(hit.text, max_sentences, 4, cut_start, cut_end)
                 or sentence_windows(hit.text, max_sentences, 1, cut_start, cut_end))
        candidates += [(hit, s, e) for s, e in spans]
    if not candidates:  # no whole sentence in any chunk: the chunks themselves
        candidates = [(hit, 0, len(hit.text)) for hit in hits if hit.text.strip()]
    if not candidates:
        return Answer(question, "", "extractive", [], hits)
    vectors = embed(index.encoder, [hit.text[s:e] for hit, s, e in candidates])
    query = embed(index.encoder, [question])[0]
    best = int(np.argmax(vectors @ query))
    hit, s, e = candidates[best]
    offset = hit.start or 0
    cited = SearchHit(1, float(vectors[best] @ query), hit.source, hit.text[s:e], offset + s, offset + e, hit.id,
                      hit.record)
    return Answer(question, hit.text[s:e].strip(), "extractive", [cited], hits)


def build_rag_prompt(question: str, hits: list[SearchHit], max_chars: int = 500) -> str:
    """Numbered passages (each cut to ``max_chars``) followed by the question and the answer format."""
    passages = "\n\n".join(f"[{h.rank}] (from {h.source}) {h.text[:max_chars].strip()}" for h in hits)
    return (f"Passages:\n{passages}\n\nQuestion: {question}\n"
            f"Answer in one or two sentences using only the passages, in the form "
            f"\"{CITATION_PREFIX}n], ...\" where n is the number of the passage that answers the question.")


def trim_echo(text: str) -> str:
    """``text`` up to where a small model starts echoing the prompt (a listed passage, a new "Question:")."""
    return _ECHOED_PROMPT.split(text, maxsplit=1)[0].strip()


def read_citations(text: str, hits: list[SearchHit]) -> list[SearchHit]:
    """The passages cited as ``[n]`` in ``text``, in order of first mention (numbers out of range ignored)."""
    by_rank = {h.rank: h for h in hits}
    return [by_rank[n] for n in dict.fromkeys(int(m) for m in _CITATION.findall(text)) if n in by_rank]


def overlap_passage(answer: str, hits: list[SearchHit]) -> SearchHit | None:
    """The passage sharing the most distinct words (lower-cased, 3+ letters) with ``answer`` (ties: best rank)."""
    words = {w.lower() for w in _WORD.findall(answer) if len(w) > 2}
    if not words or not hits:
        return None
    overlaps = [len(words & {w.lower() for w in _WORD.findall(h.text)}) for h in hits]
    return hits[int(np.argmax(overlaps))] if max(overlaps) else None


def chat_prefix(lm: Any, prompt: str, system: str | None = SYSTEM_PROMPT) -> str:
    """The chat-template text of ``prompt`` up to the start of the assistant's turn."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def passage_number_tokens(tokenizer: Any, count: int) -> list[int]:
    """The token ids of ``"1"`` ... ``str(count)`` (single tokens, so ``count`` <= 9)."""
    ids = [tokenizer(str(n), add_special_tokens=False)["input_ids"] for n in range(1, count + 1)]
    unknown = getattr(tokenizer, "unk_token_id", None)
    if any(len(i) != 1 or i[0] == unknown for i in ids) or len({i[0] for i in ids}) != count:
        raise TransferkitError("this language model's tokenizer does not spell passage numbers as single tokens",
                               "use --mode extractive, or another --lm")
    return [i[0] for i in ids]


def generate_cited(lm: Any, prompt: str, count: int, max_new_tokens: int = 64) -> tuple[int, str]:
    """Greedy answer after the pre-filled ``According to passage [``, whose first generated token is
    restricted to the numbers ``1..count``. Returns ``(n, full answer text)``."""
    tokenizer, model = lm.tokenizer, lm.model
    allowed = passage_number_tokens(tokenizer, count)
    text = chat_prefix(lm, prompt) + CITATION_PREFIX
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    start = inputs["input_ids"].shape[1]
    everything = list(range(len(tokenizer)))

    def allowed_tokens(batch_id: int, ids: torch.Tensor) -> list[int]:
        return allowed if ids.shape[-1] == start else everything

    with inference(model) as device:
        output = model.generate(**to_device({k: inputs[k] for k in ("input_ids", "attention_mask")}, device),
                                max_new_tokens=max_new_tokens, do_sample=False, prefix_allowed_tokens_fn=allowed_tokens,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new_tokens = output[0, start:].tolist()
    number = allowed.index(new_tokens[0]) + 1
    return number, CITATION_PREFIX + tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def generated_answer(lm: Any, question: str, hits: list[SearchHit], max_new_tokens: int = 64) -> Answer:
    """Retrieval-augmented generation in the constrained ``According to passage [n], ...`` format."""
    cited_hits = hits[:9]  # passage numbers must be single tokens
    number, text = generate_cited(lm, build_rag_prompt(question, cited_hits), len(cited_hits), max_new_tokens)
    text = trim_echo(text)
    first = cited_hits[number - 1]
    cited = [first] + [h for h in read_citations(text, cited_hits) if h is not first]
    answer_part = text.split("]", 1)[1] if "]" in text else text
    return Answer(question, text, "generate", cited, hits, overlap_passage(answer_part, cited_hits))


def ask(index: VectorIndex, question: str, k: int = 3, mode: str = "generate", lm: Any = None,
        lm_name: str = "smollm2-135m", max_new_tokens: int = 64,
        retrieval: RetrievalConfig | str | None = None) -> Answer:
    """Retrieve ``k`` chunks for ``question`` (``retrieval``: dense / lexical / hybrid, see
    :meth:`VectorIndex.search`) and answer from them (see the module docstring for the modes)."""
    if mode not in ASK_MODES:
        raise TransferkitError(f"unknown ask mode '{mode}'", f"choose one of {', '.join(ASK_MODES)}")
    if index.meta.modality != "text":
        raise TransferkitError("`ask` needs a text index", "build one with `transferkit index build --docs ...`")
    hits = index.search([question], k, retrieval=retrieval)[0]
    if not hits:
        raise TransferkitError("the index is empty", "add documents with `transferkit index add`")
    if mode == "extractive":
        return extractive_answer(index, question, hits)
    if lm is None:
        from transferkit.zeroshot.incontext import load_causal_lm

        lm = load_causal_lm(lm_name)
    return generated_answer(lm, question, hits, max_new_tokens)
