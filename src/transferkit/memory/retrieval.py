"""Fusing the dense (embedding) and lexical (BM25) rankings of an index, and optional cross-encoder re-ranking.

* ``rrf``, reciprocal rank fusion (Cormack, Clarke & Büttcher 2009): ``score(d) = sum_r 1 / (c + rank_r(d))``
  over the retrievals ``r`` that returned ``d`` among their ``depth`` candidates, ``c = 60``. Uses ranks only,
  so the two score scales never need to agree.
* ``weighted``: each retrieval's scores are min-max normalised over its own candidates to [0, 1] and combined,
  ``score(d) = w * dense(d) + (1 - w) * lexical(d)`` (0 for a retrieval that did not return ``d``).
* re-ranking (Nogueira & Cho 2019): a cross-encoder reads (query, chunk) pairs of the fused top candidates and
  its score orders them.

Every hit keeps its per-retrieval ranks and scores (``SearchHit.ranks`` / ``.scores``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from transferkit.errors import TransferkitError

RETRIEVALS = ("dense", "lexical", "hybrid")
FUSIONS = ("rrf", "weighted")
RRF_C = 60
DENSE_WEIGHT = 0.5
DEFAULT_DEPTH = 50
# Defaults from bench/results/memory.md (pydoc topics, two question sets): hybrid with weighted fusion met the
# target on both (topic recall@5 1.000 / 1.000, recall@1 0.900 / 0.875 vs dense 0.767 / 0.750); RRF's recall@1
# fell below dense's on set 1 (0.733).
DEFAULT_TEXT_RETRIEVAL = "hybrid"  # image indexes: always dense
DEFAULT_FUSION = "weighted"


@dataclass
class RetrievalConfig:
    """How ``search`` / ``ask`` rank chunks."""

    retrieval: str | None = field(default=None, metadata={
        "help": f"dense (embeddings), lexical (BM25) or hybrid (both, fused). Default: {DEFAULT_TEXT_RETRIEVAL} "
                "for text indexes, dense for image indexes."})
    fusion: str = field(default=DEFAULT_FUSION, metadata={
        "help": "hybrid: rrf (reciprocal rank fusion, 1/(60 + rank) summed) or weighted (min-max normalised "
                "scores, --dense-weight * dense + (1 - --dense-weight) * lexical)."})
    depth: int = field(default=DEFAULT_DEPTH, metadata={
        "help": "Candidates taken from each retrieval before fusion / re-ranking."})
    dense_weight: float = field(default=DENSE_WEIGHT, metadata={"help": "Weighted fusion: weight of the dense scores."})
    rerank: str | None = field(default=None, metadata={
        "help": "Re-rank the fused candidates with a sentence-transformers cross-encoder: hf:<folder or name>."})

    def resolved(self, modality: str) -> RetrievalConfig:
        """This config with the default retrieval of an index of ``modality`` filled in."""
        if self.retrieval is not None:
            return self
        return replace(self, retrieval=DEFAULT_TEXT_RETRIEVAL if modality == "text" else "dense")

    def check(self) -> None:
        if self.retrieval not in RETRIEVALS:
            raise TransferkitError(f"unknown retrieval '{self.retrieval}'", f"choose one of {', '.join(RETRIEVALS)}")
        if self.fusion not in FUSIONS:
            raise TransferkitError(f"unknown fusion '{self.fusion}'", f"choose one of {', '.join(FUSIONS)}")
        if not 0.0 <= self.dense_weight <= 1.0:
            raise TransferkitError(f"invalid dense weight {self.dense_weight}", "use a number from 0 to 1")
        if self.depth < 1:
            raise TransferkitError(f"invalid depth {self.depth}", "use a whole number of at least 1")
        if self.rerank is not None and not self.rerank.startswith("hf:"):
            raise TransferkitError(f"unknown re-ranker '{self.rerank}'",
                                   "give a cross-encoder as --rerank hf:<folder or name>")


Ranking = dict[int, tuple[int, float]]  # id -> (1-based rank, score)


def ranking(scores: np.ndarray, ids: np.ndarray) -> Ranking:
    """One query's result row as ``{id: (rank, score)}`` (ids < 0 = no result, skipped)."""
    out: Ranking = {}
    for score, record_id in zip(scores.tolist(), ids.tolist()):
        if record_id >= 0 and record_id not in out:
            out[record_id] = (len(out) + 1, score)
    return out


def reciprocal_rank_fusion(rankings: dict[str, Ranking], c: int = RRF_C) -> dict[int, float]:
    fused: dict[int, float] = {}
    for ranked in rankings.values():
        for record_id, (rank, _) in ranked.items():
            fused[record_id] = fused.get(record_id, 0.0) + 1.0 / (c + rank)
    return fused


def min_max(ranked: Ranking) -> dict[int, float]:
    """Scores mapped linearly to [0, 1] over this ranking (all 1 when they are equal)."""
    if not ranked:
        return {}
    values = [s for _, s in ranked.values()]
    low, high = min(values), max(values)
    return {i: 1.0 if high == low else (s - low) / (high - low) for i, (_, s) in ranked.items()}


def weighted_fusion(rankings: dict[str, Ranking], weights: dict[str, float]) -> dict[int, float]:
    fused: dict[int, float] = {}
    for name, ranked in rankings.items():
        for record_id, value in min_max(ranked).items():
            fused[record_id] = fused.get(record_id, 0.0) + weights[name] * value
    return fused


def fuse(rankings: dict[str, Ranking], config: RetrievalConfig) -> list[tuple[int, float]]:
    """``(id, fused score)`` best first (ties: the better dense rank, then the smaller id)."""
    if config.fusion == "rrf":
        fused = reciprocal_rank_fusion(rankings)
    else:
        fused = weighted_fusion(rankings, {"dense": config.dense_weight, "lexical": 1.0 - config.dense_weight})
    dense = rankings.get("dense", {})
    return sorted(fused.items(), key=lambda item: (-item[1], dense.get(item[0], (10**9, 0))[0], item[0]))


# --- re-ranking -----------------------------------------------------------------------------------------------
_RERANKERS: dict[str, Any] = {}


def load_reranker(spec: str) -> Any:
    """A sentence-transformers ``CrossEncoder`` from ``hf:<folder or name>`` (cached per process; no download
    when the name is not a folder and not in the local cache: a one-line error instead)."""
    if spec not in _RERANKERS:
        from sentence_transformers import CrossEncoder

        try:
            _RERANKERS[spec] = CrossEncoder(spec[3:], local_files_only=True)
        except (OSError, ValueError) as error:
            raise TransferkitError(f"cannot load the cross-encoder '{spec}' ({str(error).splitlines()[0]})",
                                   "give the folder of a sentence-transformers CrossEncoder (or a model in the "
                                   "local Hugging Face cache) as --rerank hf:<path>") from None
    return _RERANKERS[spec]


def rerank_scores(spec: str, query: str, texts: Sequence[str]) -> np.ndarray:
    """The cross-encoder's relevance score of each (query, text) pair."""
    if not texts:
        return np.zeros(0, np.float32)
    model = load_reranker(spec)
    scores = model.predict([(query, t) for t in texts], show_progress_bar=False, convert_to_numpy=True)
    return np.asarray(scores, dtype=np.float32).reshape(len(texts), -1)[:, -1]
