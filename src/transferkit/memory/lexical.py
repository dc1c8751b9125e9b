"""The lexical side of an index: BM25 over the chunk texts, through ``bm25s``.

BM25 (Robertson & Zaragoza 2009, Lucene variant): for a query of terms ``t`` and a chunk ``d``,
``score(d) = sum_t idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))``, with
``idf(t) = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))``. Tokens are lower-cased runs of 2+ word characters
(``\\w\\w+``, so identifiers such as ``__exit__`` stay whole) and no stop words are dropped (``with``, ``for``,
``from``, ``not``... are keywords in code documentation; IDF already discounts frequent words).

The BM25 matrix depends on every chunk (IDF, average length), so it is rebuilt from the records whenever the
index changes and stored in the same version folder as the vectors (``lexical/``): both sides always describe the
same chunks. Files are NumPy arrays and JSON, read without pickle.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FOLDER = "lexical"
IDS_FILE = "ids.json"
CONFIG_FILE = "config.json"


@dataclass
class LexicalConfig:
    """How chunks and queries are tokenised and scored."""

    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    token_pattern: str = r"(?u)\b\w\w+\b"
    lower: bool = True


def _tokenize(texts: list[str], config: LexicalConfig, return_ids: bool) -> Any:
    import bm25s

    return bm25s.tokenize(texts, lower=config.lower, token_pattern=config.token_pattern, stopwords=None,
                          return_ids=return_ids, show_progress=False)


class LexicalIndex:
    """BM25 scores of record ids (the vector index's ids) for text queries."""

    def __init__(self, ids: np.ndarray, retriever: Any, config: LexicalConfig) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.retriever = retriever
        self.config = config

    @classmethod
    def build(cls, records: dict[int, dict[str, Any]], config: LexicalConfig | None = None) -> LexicalIndex:
        """Index the ``text`` of every record (ids in increasing order)."""
        import bm25s

        config = config or LexicalConfig()
        ids = np.asarray(sorted(records), dtype=np.int64)
        retriever = None
        if len(ids):
            retriever = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
            tokens = _tokenize([records[int(i)].get("text", "") for i in ids], config, return_ids=True)
            retriever.index(tokens, show_progress=False)
        return cls(ids, retriever, config)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of shape ``(n_queries, min(k, len))``; chunks sharing no term with a query score 0
        and are returned as id -1 (no lexical match)."""
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        tokens = _tokenize(list(queries), self.config, return_ids=False)
        positions, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)
        ids = np.where(scores > 0, self.ids[positions], -1)
        return scores.astype(np.float32), ids.astype(np.int64)

    # persistence ---------------------------------------------------------------------------------------------
    def save(self, version: Path) -> None:
        folder = version / FOLDER
        folder.mkdir()
        with open(folder / CONFIG_FILE, "w", encoding="utf-8") as fh:
            json.dump(asdict(self.config), fh)
        with open(folder / IDS_FILE, "w", encoding="utf-8") as fh:
            json.dump(self.ids.tolist(), fh)
        if self.retriever is not None:
            self.retriever.save(str(folder), allow_pickle=False, show_progress=False)

    @staticmethod
    def present(version: Path) -> bool:
        return (version / FOLDER / IDS_FILE).is_file()

    @classmethod
    def load(cls, version: Path, files: dict[str, bytes]) -> LexicalIndex:
        """Read ``lexical/`` (``files``: its checked JSON files' bytes by name). Raises ValueError / OSError on
        damaged files (the caller names the file)."""
        import bm25s

        config = LexicalConfig(**json.loads(files[CONFIG_FILE]))
        ids = np.asarray(json.loads(files[IDS_FILE]), dtype=np.int64)
        retriever = None
        if len(ids):
            retriever = bm25s.BM25.load(str(version / FOLDER), mmap=False, allow_pickle=False, show_progress=False)
            if retriever.scores["num_docs"] != len(ids):
                raise ValueError(f"{retriever.scores['num_docs']} BM25 documents for {len(ids)} ids")
        return cls(ids, retriever, config)
