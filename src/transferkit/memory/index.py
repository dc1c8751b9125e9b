"""A persistent vector index (FAISS) over text chunks or images, with its metadata, for semantic search.

Vectors are L2-normalised embeddings, so the inner product is the cosine similarity. Index kinds:

* ``flat`` (default): exact search, ``IndexFlatIP`` (brute force, every stored vector is scored);
* ``hnsw``: approximate, a hierarchical navigable small-world graph (Malkov & Yashunin 2018), ``hnsw_m``
  links per node, ``ef_search`` candidates explored per query;
* ``ivf``: approximate, an inverted file (Jégou et al. 2011): k-means into ``ivf_nlist`` cells, ``nprobe``
  nearest cells scanned per query (trained on the first vectors added).

Every vector has a stable integer id (``IndexIDMap2`` / IVF ids) pointing to a record (source, text, offsets),
so documents can be added and removed incrementally. A version of the index holds ``index.faiss``,
``records.jsonl``, ``meta.json`` (encoder spec + preprocessing signature, kind, dimension, chunking) and, for
text, ``lexical/`` (BM25 over the same chunks, :mod:`transferkit.memory.lexical`); :mod:`transferkit.memory.storage`
commits versions atomically under a writer lock. With ``store="milvus:..."`` the vectors live in a Milvus
collection instead of ``index.faiss`` (:mod:`transferkit.memory.stores`: what holds when a write is interrupted). A query must be embedded by the same encoder with the same
preprocessing as the index, else the scores mean nothing: this is checked. Search is dense, lexical or hybrid
(:mod:`transferkit.memory.retrieval`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.backbones import Backbone, BackboneSpec, backbone_from_spec, create_backbone
from transferkit.engine.placement import predict_batches
from transferkit.engine.sharding import is_main_process, launched_processes, sharded
from transferkit.errors import TransferkitError, listed, spoken
from transferkit.memory import storage
from transferkit.memory.chunking import (
    BUILTIN_CORPORA,
    Chunk,
    Document,
    check_chunking,
    chunk_document,
    read_documents,
)
from transferkit.memory.lexical import CONFIG_FILE, IDS_FILE, LexicalIndex
from transferkit.memory.lexical import FOLDER as LEXICAL_FOLDER
from transferkit.memory.retrieval import RetrievalConfig, fuse, ranking, rerank_scores
from transferkit.memory.stores import MilvusStore, StoreSpec, collection_name
from transferkit.progress import progress as progress_bar
from transferkit.rundir import OutputFolder, refuse_out_inside_data

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw", "ivf")
INDEX_FORMAT = "transferkit-index"
INDEX_VERSION = 2  # 2: vectors in a Milvus collection (meta.extra["store"]); FAISS indexes are still written as 1
_SETUP_FIELDS = ("encoder", "preprocess_signature", "modality", "dim", "chunk_size", "chunk_overlap", "chunk_unit")


@dataclass
class IndexMeta:
    """What ``meta.json`` records about an index."""

    encoder: dict[str, Any]  # BackboneSpec.to_dict() of the encoder
    preprocess_signature: str
    modality: str  # "text" or "image"
    dim: int
    kind: str = "flat"
    chunk_size: int = 500  # characters: about 120 tokens, within MiniLM's 128-token window
    chunk_overlap: int = 100
    chunk_unit: str = "chars"
    hnsw_m: int = 32
    ef_search: int = 64
    ivf_nlist: int = 100
    nprobe: int = 8
    next_id: int = 0
    format: str = INDEX_FORMAT
    format_version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SearchHit:
    """One search result: the chunk (or image) and its cosine similarity to the query."""

    rank: int
    score: float
    source: str
    text: str
    start: int | None
    end: int | None
    id: int = -1
    record: int = 0
    ranks: dict[str, int | None] | None = None  # per retrieval ("dense", "lexical", "rerank"); None = dense only
    scores: dict[str, float | None] | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``search --json`` fields: ``score`` is the score the hits are ordered by (cosine similarity, BM25,
        fused or re-ranker score), ``ranks`` / ``scores`` those of each retrieval (null: not among its candidates)."""
        ranks = self.ranks if self.ranks is not None else {"dense": self.rank}
        scores = self.scores if self.scores is not None else {"dense": self.score}
        return {"rank": self.rank, "score": round(self.score, 6), "source": self.source, "text": self.text,
                "start": self.start, "end": self.end, "ranks": ranks,
                "scores": {k: None if v is None else round(v, 6) for k, v in scores.items()}}


# --- embedding --------------------------------------------------------------------------------------------
def embed(backbone: Backbone, items: Sequence[Any], batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """L2-normalised float32 embeddings ``(len(items), dim)`` in eval mode (any backbone, any modality), computed
    where the backbone is placed."""
    starts = range(0, len(items), batch_size)
    batches = (backbone.collate([backbone.preprocess(x, train=False) for x in items[start:start + batch_size]])
               for start in progress_bar(starts, "embedding", enabled=progress and len(items) > batch_size))
    vectors = predict_batches(backbone, batches, lambda batch: torch.nn.functional.normalize(
        backbone.forward_features(batch).float(), dim=-1))
    return vectors if vectors is not None else np.zeros((0, backbone.feature_dim), np.float32)


def encoder_identity(backbone: Backbone) -> str:
    return f"{backbone.spec.name} ({backbone.preprocess_signature()})"


# --- the index --------------------------------------------------------------------------------------------
class VectorIndex:
    """FAISS vectors + records keyed by id. Build with :meth:`create`, reopen with :meth:`load`."""

    def __init__(self, meta: IndexMeta, faiss_index: Any, records: dict[int, dict[str, Any]],
                 folder: Path | None = None, lexical: LexicalIndex | None = None,
                 store: MilvusStore | None = None) -> None:
        self.meta = meta
        self.faiss_index = faiss_index  # None when the vectors live in ``store``
        self.store = store
        self._retired: list[int] = []  # ids removed from the records, deleted from ``store`` after the commit
        self.records = records
        self.folder = folder
        self._encoder: Backbone | None = None
        self._lexical = lexical  # None: (re)built from the records on first use
        self._lexical_stored = lexical is not None

    # construction ---------------------------------------------------------------------------------------
    @classmethod
    def create(cls, encoder: Backbone, kind: str = "flat", store: StoreSpec | None = None,
               **options: Any) -> VectorIndex:
        """An empty index for ``encoder``'s embeddings (``options``: IndexMeta fields, e.g. ``hnsw_m``) whose
        vectors go to FAISS (default) or to ``store`` (then call :meth:`open_store` before adding)."""
        if kind not in INDEX_KINDS:
            raise TransferkitError(f"unknown index kind '{kind}'", f"choose one of {', '.join(INDEX_KINDS)}")
        if encoder.modality not in ("text", "image"):
            raise TransferkitError(f"encoder '{encoder.spec.name}' embeds {encoder.modality} data",
                                   "use a text encoder (minilm) or an image backbone (efficientnet_lite0)")
        meta = IndexMeta(encoder=encoder.spec.to_dict(), preprocess_signature=encoder.preprocess_signature(),
                         modality=encoder.modality, dim=int(encoder.feature_dim), kind=kind, **options)
        check_chunking(meta.chunk_size, meta.chunk_overlap, meta.chunk_unit)
        if store is not None and store.scheme != "faiss":
            meta.extra["store"] = store.to_dict()
            meta.format_version = 2
            index = cls(meta, None, {}, store=_milvus_store(meta))
        else:
            index = cls(meta, _new_faiss_index(meta), {})
        index._encoder = encoder
        return index

    def open_store(self) -> None:
        """Create the new, empty Milvus collection of a new index (never an existing one). Under ``torchrun``
        only the main process writes to the store."""
        if self.store is not None and is_main_process():
            self.store.create(self.meta.kind, {"hnsw_m": self.meta.hnsw_m, "ivf_nlist": self.meta.ivf_nlist})

    @classmethod
    def load(cls, folder: str | Path) -> VectorIndex:
        """The index's current version (a consistent snapshot, even while a writer commits a new one). Damaged
        files (truncated, edited, inconsistent with each other) raise a TransferkitError naming the file."""
        folder = Path(folder)
        if not folder.is_dir():
            raise TransferkitError(f"'{folder}' is not a transferkit index (no such folder)",
                                   "build one with `transferkit index build --docs ... --out FOLDER`")
        index = storage.read_consistent(folder, _read_version)
        index.folder = folder
        return index

    @classmethod
    @contextlib.contextmanager
    def updating(cls, folder: str | Path, lock_timeout: float = storage.DEFAULT_LOCK_TIMEOUT) -> Iterator[VectorIndex]:
        """Load-modify-save under the folder's writer lock: ``with VectorIndex.updating(f) as index: ...``
        commits the changes when the block ends without an exception (and nothing otherwise)."""
        with storage.writer(folder, lock_timeout):
            index = cls.load(folder)
            index._clean_store()
            yield index
            index.save(folder)

    def save(self, folder: str | Path | None = None, lock_timeout: float = storage.DEFAULT_LOCK_TIMEOUT) -> Path:
        """Commit every file (vectors, records, metadata, lexical side) as a new version of ``folder`` (atomic,
        under the writer lock) and return the folder. Nothing of a folder that is not an index is replaced."""
        target = Path(folder) if folder is not None else self.folder
        if target is None:
            raise ValueError("no folder to save the index to")
        clashing = storage.clashing_names(target)
        if clashing:
            raise TransferkitError(f"'{target}' is not an index but holds '{clashing[0]}'",
                                   "save the index to a new or empty folder")
        target.mkdir(parents=True, exist_ok=True)
        lexical = self.lexical if self.meta.modality == "text" else None
        retired = sorted(self._retired)
        if self.store is not None:
            self.meta.extra["store_retired"] = retired  # deleted after the commit, again by the next writer
        with storage.WriterLock(target, lock_timeout):
            storage.commit(target, lambda version: self._write_files(version, lexical))
            if retired:
                try:
                    self.store.remove(retired)  # type: ignore[union-attr]
                    self._retired = []
                except TransferkitError as error:  # committed: the next writer deletes them
                    logger.warning("index '%s': superseded vectors stay in the store until the next write (%s)",
                                   target, error.problem if hasattr(error, "problem") else error)
        self.folder = target
        self._lexical_stored = lexical is not None
        return target

    def _clean_store(self) -> None:
        """Delete what an interrupted writer left in the store: uncommitted inserts (ids >= next_id) and the ids
        the committed version retired (the writer's own step 3); called under the writer lock."""
        if self.store is None:
            return
        self.store.remove_from(self.meta.next_id)
        retired = self.meta.extra.pop("store_retired", [])
        if retired:
            self.store.remove(retired)

    def _write_files(self, version: Path, lexical: LexicalIndex | None) -> None:
        import faiss

        if self.store is None:
            with open(version / "index.faiss", "wb") as fh:  # Python writes: a full disk is an OSError naming it
                fh.write(faiss.serialize_index(self.faiss_index).tobytes())
        with open(version / "records.jsonl", "w", encoding="utf-8") as fh:
            for record_id in sorted(self.records):
                fh.write(json.dumps({"id": record_id, **self.records[record_id]}, ensure_ascii=False) + "\n")
        with open(version / "meta.json", "w", encoding="utf-8") as fh:
            json.dump(asdict(self.meta), fh, indent=2)
        if lexical is not None:
            lexical.save(version)

    def same_setup(self, other: VectorIndex) -> bool:
        """Same encoder, preprocessing, modality, dimension and chunking (vectors of one fit the other)."""
        return all(getattr(self.meta, name) == getattr(other.meta, name) for name in _SETUP_FIELDS)

    # lexical side ---------------------------------------------------------------------------------------------
    @property
    def lexical(self) -> LexicalIndex:
        """BM25 over the chunk texts, in step with the vectors (rebuilt from the records after a change)."""
        if self.meta.modality != "text":
            raise TransferkitError("lexical and hybrid retrieval need a text index",
                                   "search an image index with --retrieval dense")
        if self._lexical is None:
            start = time.perf_counter()
            self._lexical = LexicalIndex.build(self.records)
            if self.folder is not None and not self._lexical_stored:
                logger.info("index '%s' has no lexical side yet (written before hybrid retrieval): built BM25 over "
                            "its %d chunks in %.1f s; the next `index add` / `index remove` stores it", self.folder,
                            len(self.records), time.perf_counter() - start)
        return self._lexical

    # encoder ----------------------------------------------------------------------------------------------
    @property
    def encoder(self) -> Backbone:
        """The index's encoder (pretrained weights), built on first use from the stored spec."""
        if self._encoder is None:
            self._encoder = backbone_from_spec(self.meta.encoder, pretrained=True)
            self.check_encoder(self._encoder)
        return self._encoder

    def check_encoder(self, encoder: Backbone) -> None:
        """Raise when ``encoder`` is not the one (name, options, preprocessing) that built the index."""
        same = (encoder.spec.to_dict() == BackboneSpec(**self.meta.encoder).to_dict()
                and encoder.preprocess_signature() == self.meta.preprocess_signature)
        if not same:
            raise TransferkitError(
                f"the query encoder {encoder_identity(encoder)} differs from the index's encoder "
                f"{self.meta.encoder['name']} ({self.meta.preprocess_signature})",
                f"query with --encoder {self.meta.encoder['name']} (or omit --encoder), or rebuild the index")
        self._encoder = encoder

    # contents ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records) if self.store is not None else int(self.faiss_index.ntotal)

    def sources(self) -> list[str]:
        return sorted({r["source"] for r in self.records.values()})

    def add_vectors(self, vectors: np.ndarray, records: list[dict[str, Any]]) -> np.ndarray:
        """Store ``vectors`` (already normalised, one per record); returns their new ids."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.meta.dim or len(vectors) != len(records):
            raise ValueError(f"expected {len(records)} vectors of dimension {self.meta.dim}, got {vectors.shape}")
        if not len(vectors):
            return np.zeros(0, np.int64)
        ids = np.arange(self.meta.next_id, self.meta.next_id + len(vectors), dtype=np.int64)
        self._store_vectors(vectors, ids)
        self.records.update({int(i): r for i, r in zip(ids, records)})
        self.meta.next_id += len(vectors)
        self._lexical = None
        return ids

    def _store_vectors(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if self.store is not None:
            if is_main_process():  # under torchrun every process holds all vectors, the main one writes
                self.store.add(vectors, ids)
            return
        if self.meta.kind == "ivf" and not self.faiss_index.is_trained:
            self._train_ivf(vectors)
        self.faiss_index.add_with_ids(vectors, ids)

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of ``ids`` (``(len(ids), dim)``, in that order), from FAISS or the store."""
        import faiss

        ids = [int(i) for i in ids]
        if self.store is not None:
            return self.store.vectors(ids)
        if self.meta.kind == "ivf":
            faiss.extract_index_ivf(self.faiss_index).set_direct_map_type(faiss.DirectMap.Hashtable)
        return np.stack([self.faiss_index.reconstruct(i) for i in ids]) if ids else np.zeros((0, self.meta.dim),
                                                                                              np.float32)

    def _train_ivf(self, vectors: np.ndarray) -> None:
        import faiss

        nlist = max(1, min(self.meta.ivf_nlist, len(vectors) // 39))  # faiss wants >= 39 points per centroid
        if nlist != self.meta.ivf_nlist:
            logger.warning("ivf: %d vectors train only %d cells (asked for %d)", len(vectors), nlist,
                           self.meta.ivf_nlist)
            self.meta.ivf_nlist = nlist
            self.faiss_index = _new_faiss_index(self.meta)
        inner = faiss.extract_index_ivf(self.faiss_index)
        inner.train(vectors)

    def remove_ids(self, ids: Sequence[int]) -> int:
        import faiss

        ids = np.asarray(sorted(set(int(i) for i in ids) & set(self.records)), dtype=np.int64)
        if not len(ids):
            return 0
        if self.store is not None:
            self._retired.extend(ids.tolist())
        elif self.meta.kind == "hnsw":  # HNSW graphs cannot delete: rebuild from the kept vectors
            keep = np.asarray(sorted(set(self.records) - set(ids.tolist())), dtype=np.int64)
            vectors = np.stack([self.faiss_index.reconstruct(int(i)) for i in keep]) if len(keep) else None
            self.faiss_index = _new_faiss_index(self.meta)
            if vectors is not None:
                self.faiss_index.add_with_ids(vectors, keep)
        else:
            self.faiss_index.remove_ids(faiss.IDSelectorArray(ids))
        for i in ids:
            del self.records[int(i)]
        self._lexical = None
        return len(ids)

    def remove_sources(self, sources: Sequence[str]) -> int:
        """Remove every vector of these sources (exact relative paths, or folder prefixes ending in ``/``)."""
        wanted = [s.replace(os.sep, "/") for s in sources]
        known = set(r["source"] for r in self.records.values())
        for source in wanted:
            if source not in known and not any(k.startswith(source.rstrip("/") + "/") for k in known):
                raise TransferkitError(f"the index holds no source '{source}'",
                                       "see its sources with `transferkit index info FOLDER`")

        def matches(src: str) -> bool:
            return any(src == w or src.startswith(w.rstrip("/") + "/") for w in wanted)

        return self.remove_ids([i for i, r in self.records.items() if matches(r["source"])])

    # search -----------------------------------------------------------------------------------------------
    def search_ids(self, queries: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` arrays ``(n_queries, k)`` of the most similar stored vectors (id -1: none), best first;
        scores equal to 1e-6 are ordered by id, so every store (FAISS, Milvus) returns the same order even for
        duplicate passages, whose identical vectors tie (:func:`canonical_order`)."""
        if k < 1:
            raise TransferkitError(f"invalid -k {k}", "use a whole number of at least 1")
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.meta.dim)
        if not len(self):
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        k = min(k, len(self))
        depth = min(k + _TIE_MARGIN, len(self))  # a tie at the k-th place is decided by id, not by the store
        if self.store is None:
            scores, ids = self.faiss_index.search(queries, depth)
            return canonical_order(scores, ids, k)
        stale = len(self._retired) + len(self.meta.extra.get("store_retired", []))  # not yet deleted from the store
        scores, ids = self.store.search(queries, depth + stale, self.meta.next_id, _milvus_search_params(self.meta))
        if stale:
            kept_scores = np.full((len(ids), depth), -np.inf, np.float32)
            kept_ids = np.full((len(ids), depth), -1, np.int64)
            for row in range(len(ids)):  # the first ids this version's records reference
                columns = [j for j, i in enumerate(ids[row].tolist()) if i in self.records][:depth]
                kept_scores[row, :len(columns)], kept_ids[row, :len(columns)] = scores[row, columns], ids[row, columns]
            scores, ids = kept_scores, kept_ids
        return canonical_order(scores, ids, k)

    def search_vectors(self, queries: np.ndarray, k: int = 5) -> list[list[SearchHit]]:
        """The ``k`` stored vectors most similar (inner product) to each query, best first, with records.

        One Python object per hit costs a few microseconds on top of FAISS; for bulk search use :meth:`search_ids`
        and read ``records[id]`` only for the hits you need."""
        scores, ids = self.search_ids(queries, k)
        records = self.records
        results = []
        for row_scores, row_ids in zip(scores.tolist(), ids.tolist()):  # Python floats/ints: no numpy scalars
            hits = []
            for score, record_id in zip(row_scores, row_ids):
                if record_id < 0:
                    continue
                r = records[record_id]
                hits.append(SearchHit(len(hits) + 1, score, r["source"], r.get("text", ""), r.get("start"),
                                      r.get("end"), record_id, r.get("record", 0)))
            results.append(hits)
        return results

    def search(self, queries: Sequence[Any] | str, k: int = 5, encoder: Backbone | None = None,
               retrieval: RetrievalConfig | str | None = None) -> list[list[SearchHit]]:
        """The ``k`` best chunks (or images) for each query: ``dense`` embeds the queries (texts, or PIL images
        for an image index) with the index's encoder, ``lexical`` scores chunks by BM25, ``hybrid`` fuses both
        (:mod:`transferkit.memory.retrieval`); a ``RetrievalConfig`` also chooses the fusion and a re-ranker.
        ``None``: the default retrieval for the index's modality. One query (a str, or one image) is a list of
        one query, as for ``predict`` (:func:`transferkit.data.images.is_one_input`): the result is then
        ``[hits]``."""
        from transferkit.data.images import is_one_input

        queries = [queries] if is_one_input(queries, self.meta.modality) else list(queries)
        wrong = next((i for i, q in enumerate(queries) if not isinstance(q, str)), None)
        if self.meta.modality == "text" and wrong is not None:
            raise TransferkitError(f"cannot search query {wrong} ({type(queries[wrong]).__name__}): a text index "
                                   "takes texts (str)", "pass one text or a list of texts")
        config = RetrievalConfig(retrieval) if isinstance(retrieval, str) or retrieval is None else retrieval
        config = config.resolved(self.meta.modality)
        config.check()
        if k < 1:
            raise TransferkitError(f"invalid -k {k}", "use a whole number of at least 1")
        if encoder is not None:
            self.check_encoder(encoder)
        if config.retrieval == "dense" and config.rerank is None:
            return self.search_vectors(embed(self.encoder, queries), k)
        if self.meta.modality != "text":
            raise TransferkitError(f"{config.retrieval} retrieval and re-ranking need a text index",
                                   "search an image index with --retrieval dense and no --rerank")
        depth = max(k, config.depth)
        rankings: list[dict[str, dict[int, tuple[int, float]]]] = [{} for _ in queries]
        if config.retrieval in ("dense", "hybrid"):
            for row, scores, ids in zip(rankings, *self.search_ids(embed(self.encoder, queries), depth)):
                row["dense"] = ranking(scores, ids)
        if config.retrieval in ("lexical", "hybrid"):
            for row, scores, ids in zip(rankings, *self.lexical.search(queries, depth)):
                row["lexical"] = ranking(scores, ids)
        return [self._ranked_hits(query, row, k, config) for query, row in zip(queries, rankings)]

    def _ranked_hits(self, query: str, rankings: dict[str, dict[int, tuple[int, float]]], k: int,
                     config: RetrievalConfig) -> list[SearchHit]:
        """Fuse (hybrid) or take the one ranking, optionally re-rank, and keep the first ``k`` as hits."""
        if config.retrieval == "hybrid":
            order = fuse(rankings, config)
        else:
            order = [(i, score) for i, (_, score) in rankings[config.retrieval].items()]
        if config.rerank is not None:
            candidates = order[:config.depth]
            scores = rerank_scores(config.rerank, query, [self.records[i].get("text", "") for i, _ in candidates])
            order = [(candidates[j][0], float(scores[j])) for j in np.argsort(-scores, kind="stable")]
            rankings = {**rankings, "rerank": {i: (r, s) for r, (i, s) in enumerate(order, 1)}}
        hits = []
        for rank, (record_id, score) in enumerate(order[:k], 1):
            r = self.records[record_id]
            found = {name: ranked.get(record_id, (None, None)) for name, ranked in rankings.items()}
            hits.append(SearchHit(rank, float(score), r["source"], r.get("text", ""), r.get("start"), r.get("end"),
                                  record_id, r.get("record", 0), ranks={n: v[0] for n, v in found.items()},
                                  scores={n: v[1] for n, v in found.items()}))
        return hits

    # documents and images -----------------------------------------------------------------------------------
    def chunks_of(self, documents: Sequence[Document]) -> list[Chunk]:
        tokenizer = getattr(self.encoder, "tokenizer", None)
        return [c for d in documents for c in chunk_document(d, self.meta.chunk_size, self.meta.chunk_overlap,
                                                             self.meta.chunk_unit, tokenizer)]

    def embed_documents(self, documents: Sequence[Document], batch_size: int = 32,
                        progress: bool = True) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
        """``(sources, vectors, records)`` of the documents' chunks, not yet added (see :meth:`replace_sources`)."""
        if self.meta.modality != "text":
            raise TransferkitError("this index holds images", "add images with --images, or build a text index")
        chunks = self.chunks_of(documents)
        vectors = sharded(lambda texts: embed(self.encoder, texts, batch_size, progress), [c.text for c in chunks])
        return sorted({d.source for d in documents}), vectors, [c.to_dict() for c in chunks]

    def embed_images(self, paths: Sequence[Path], root: Path, batch_size: int = 32,
                     progress: bool = True) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
        """``(sources, vectors, records)`` of image files (``source`` relative to ``root``), not yet added."""
        from transferkit.data.images import open_image

        if self.meta.modality != "image":
            raise TransferkitError("this index holds text", "add documents with --docs, or build an image index")
        sources = image_sources(paths, root)

        def embed_files(files: Sequence[Path]) -> np.ndarray:
            vectors = [np.zeros((0, self.meta.dim), np.float32)]
            for start in range(0, len(files), 256):  # bounded memory: decode 256 images at a time
                vectors.append(embed(self.encoder, [open_image(p) for p in files[start:start + 256]], batch_size,
                                     progress))
            return np.concatenate(vectors)

        vectors = sharded(embed_files, list(paths))
        records = [{"source": s, "text": "", "start": None, "end": None} for s in sources]
        return sources, vectors, records

    def check_origin(self, sources: Sequence[str], origin: str) -> None:
        """Refuse ``sources`` of the folder ``origin`` (:func:`source_folder`) that the index holds from another
        folder: adding them would replace different files of the same relative name. (Records without an origin,
        of an index built before origins were recorded, are replaced as before.)"""
        wanted = set(sources)
        clashes = {r["source"]: r["origin"] for r in self.records.values()
                   if r["source"] in wanted and r.get("origin", origin) != origin}
        if clashes:
            names, folders = sorted(clashes), sorted({f"'{f}'" for f in clashes.values()})
            raise TransferkitError(f"the index already holds {listed(names)} from another folder "
                                   f"({spoken(folders)}); adding '{origin}' would replace them",
                                   f"rename them, or remove the indexed ones first (`transferkit index remove INDEX "
                                   f"--source {names[0]}`)")

    def replace_sources(self, sources: Sequence[str], vectors: np.ndarray, records: list[dict[str, Any]],
                        origin: str | None = None) -> int:
        """Remove what the index holds of ``sources``, then add ``vectors`` / ``records``; returns vectors added.
        With ``origin`` (the folder the sources are relative to) each record keeps it, and a source the index holds
        from another folder is refused (:meth:`check_origin`)."""
        if origin is not None:
            self.check_origin(sources, origin)
            for record in records:
                record["origin"] = origin
        replaced = sorted(set(sources) & set(self.sources()))
        if replaced:
            logger.info("replacing %d sources already in the index", len(replaced))
            self.remove_sources(replaced)
        return len(self.add_vectors(vectors, records))

    def add_documents(self, documents: Sequence[Document], batch_size: int = 32, progress: bool = True,
                      origin: str | None = None) -> int:
        """Chunk, embed and add documents; a source already in the index is replaced (``origin``: see
        :meth:`replace_sources`). Returns chunks added."""
        return self.replace_sources(*self.embed_documents(documents, batch_size, progress), origin=origin)

    def add_images(self, paths: Sequence[Path], root: Path, batch_size: int = 32, progress: bool = True) -> int:
        """Embed and add image files (``source`` relative to ``root``, their origin); a source already present
        from ``root`` is replaced, one from another folder refused (:meth:`replace_sources`)."""
        return self.replace_sources(*self.embed_images(paths, root, batch_size, progress),
                                    origin=source_folder(root))


# --- reading a version ------------------------------------------------------------------------------------
_META_TYPES = {f.name: f.type for f in fields(IndexMeta)}


def _parse_meta(path: Path, data: bytes) -> IndexMeta:
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise storage.corrupt(path, "not valid JSON") from None
    if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
        raise storage.corrupt(path, "not a transferkit index's metadata")
    if not isinstance(raw.get("format_version"), int) or raw["format_version"] > INDEX_VERSION:
        raise TransferkitError(f"'{path}' was written by a newer transferkit (format version "
                               f"{raw.get('format_version')})", "upgrade transferkit to read it")
    unknown = sorted(set(raw) - set(_META_TYPES))
    if unknown:
        raise storage.corrupt(path, f"unknown field '{unknown[0]}'")
    for name, value in raw.items():
        expected = {"int": int, "str": str}.get(_META_TYPES[name], dict)
        if not isinstance(value, expected) or isinstance(value, bool) or (expected is int and value < 0):
            raise storage.corrupt(path, f"field '{name}' is {value!r}")
    try:
        meta = IndexMeta(**raw)
    except TypeError as error:  # a required field is missing
        raise storage.corrupt(path, str(error).split(") ", 1)[-1]) from None
    if (meta.kind not in INDEX_KINDS or meta.modality not in ("text", "image") or meta.dim < 1
            or not isinstance(meta.encoder.get("name"), str)):
        raise storage.corrupt(path, "its kind, modality, dimension or encoder is invalid")
    return meta


def _parse_records(path: Path, data: bytes) -> dict[int, dict[str, Any]]:
    records: dict[int, dict[str, Any]] = {}
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise storage.corrupt(path, "not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            record_id = row.pop("id")
            valid = (isinstance(record_id, int) and not isinstance(record_id, bool) and record_id >= 0
                     and isinstance(row.get("source"), str) and isinstance(row.get("text", ""), str))
        except (ValueError, AttributeError, KeyError, TypeError):
            valid = False
        if not valid or record_id in records:
            raise storage.corrupt(path, f"line {number} is not a record")
        records[record_id] = row
    return records


def _read_version(version: Path, sha256: dict[str, str]) -> VectorIndex:
    """One version's files, each checked against its recorded SHA-256 (a flat-layout index has none)."""
    import faiss

    def data(name: str) -> bytes:
        if sha256 and name not in sha256:
            raise storage.corrupt(version.parent / storage.POINTER, f"it lists no {name}")
        return storage.check_file(version / name, sha256.get(name) if sha256 else None)

    meta = _parse_meta(version / "meta.json", data("meta.json"))
    records = _parse_records(version / "records.jsonl", data("records.jsonl"))
    if "store" in meta.extra:  # vectors in a Milvus collection: connected on first search
        index = VectorIndex(meta, None, records, lexical=_read_lexical(version, sha256, records, data),
                            store=_milvus_store(meta, version / "meta.json"))
        if records and max(records) >= meta.next_id:
            raise storage.corrupt(version / "meta.json", f"next_id {meta.next_id} is not above the largest id")
        return index
    faiss_path = version / "index.faiss"
    try:
        faiss_index = faiss.deserialize_index(np.frombuffer(data("index.faiss"), dtype=np.uint8))
    except RuntimeError:
        raise storage.corrupt(faiss_path, "FAISS cannot read it") from None
    if faiss_index.d != meta.dim:
        raise storage.corrupt(faiss_path, f"vectors of dimension {faiss_index.d}, meta.json says {meta.dim}")
    if faiss_index.ntotal != len(records):
        raise storage.corrupt(faiss_path, f"{faiss_index.ntotal} vectors for {len(records)} records")
    if hasattr(faiss_index, "id_map") and set(faiss.vector_to_array(faiss_index.id_map).tolist()) != set(records):
        raise storage.corrupt(faiss_path, "its vector ids differ from the records' ids")
    if records and max(records) >= meta.next_id:
        raise storage.corrupt(version / "meta.json", f"next_id {meta.next_id} is not above the largest id")
    index = VectorIndex(meta, faiss_index, records, lexical=_read_lexical(version, sha256, records, data))
    _apply_search_params(index.faiss_index, meta)
    return index


def _read_lexical(version: Path, sha256: dict[str, str], records: dict[int, dict[str, Any]],
                  data: Callable[[str], bytes]) -> LexicalIndex | None:
    lexical = None
    if LexicalIndex.present(version) or any(n.startswith(LEXICAL_FOLDER + "/") for n in sha256):
        names = sorted(n for n in sha256 if n.startswith(LEXICAL_FOLDER + "/")) or [
            f"{LEXICAL_FOLDER}/{CONFIG_FILE}", f"{LEXICAL_FOLDER}/{IDS_FILE}"]
        files = {name.split("/", 1)[1]: data(name) for name in names}
        try:
            lexical = LexicalIndex.load(version, files)
            same = set(lexical.ids.tolist()) == set(records)
        except FileNotFoundError:
            raise
        except (ValueError, KeyError, TypeError, EOFError, OSError):
            same = False
        if not same:
            raise storage.corrupt(version / LEXICAL_FOLDER, "its BM25 index does not match the records")
    return lexical


#: extra candidates fetched beyond k, so that a tie at the k-th place is broken by id (see canonical_order)
_TIE_MARGIN = 8


def canonical_order(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` columns of ``(scores, ids)`` rows re-sorted by score (best first, rounded to 1e-6) and then by
    id: one deterministic order whatever store produced them (missing results, id -1, stay last)."""
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    rounded = np.where(ids < 0, np.inf, -np.round(scores.astype(np.float64), 6))
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), rounded), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=-1), np.take_along_axis(ids, order, axis=-1)


def encoder_tag(meta: IndexMeta) -> str:
    """What a Milvus collection records about the encoder of its vectors (checked when it is opened)."""
    return json.dumps({"name": meta.encoder.get("name"), "encoder": meta.encoder,
                       "preprocess_signature": meta.preprocess_signature, "dim": meta.dim}, sort_keys=True)


def _milvus_store(meta: IndexMeta, meta_path: Path | None = None) -> MilvusStore:
    raw = meta.extra.get("store")
    if isinstance(raw, dict) and "collection" not in raw and meta_path is not None:  # the rule before it was recorded
        raw = {**raw, "collection": collection_name(f"transferkit_{meta_path.parent.parent.name}")}
    valid = (isinstance(raw, dict) and raw.get("scheme") == "milvus" and isinstance(raw.get("uri"), str)
             and isinstance(raw.get("collection"), str) and raw["uri"] and raw["collection"])
    if not valid and meta_path is not None:
        raise storage.corrupt(meta_path, "its vector store entry is invalid")
    return MilvusStore(StoreSpec(**raw), encoder_tag(meta), meta.dim)


def _milvus_search_params(meta: IndexMeta) -> dict[str, Any]:
    return {"ef": max(meta.ef_search, 1)} if meta.kind == "hnsw" else {"nprobe": meta.nprobe} if meta.kind == "ivf" else {}


def _new_faiss_index(meta: IndexMeta) -> Any:
    import faiss

    if meta.kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(meta.dim))
    elif meta.kind == "hnsw":
        index = faiss.IndexIDMap2(faiss.IndexHNSWFlat(meta.dim, meta.hnsw_m, faiss.METRIC_INNER_PRODUCT))
    else:
        quantizer = faiss.IndexFlatIP(meta.dim)
        index = faiss.IndexIVFFlat(quantizer, meta.dim, meta.ivf_nlist, faiss.METRIC_INNER_PRODUCT)
    _apply_search_params(index, meta)
    return index


def _apply_search_params(index: Any, meta: IndexMeta) -> None:
    import faiss

    if meta.kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = meta.ef_search
    elif meta.kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = meta.nprobe


# --- high-level helpers (used by the CLI) -------------------------------------------------------------------
def source_folder(path: str | Path) -> str:
    """The origin of the sources of ``path`` given to ``index build`` / ``add``: the absolute folder they are
    relative to (a file's parent), or a built-in corpus' name."""
    if str(path) in BUILTIN_CORPORA:
        return str(path)
    root = Path(path).resolve()
    return (root.parent if root.is_file() else root).as_posix()


def image_sources(paths: Sequence[Path], root: Path) -> list[str]:
    """The sources of image files: their paths relative to ``root`` (a file's name when it is ``root``)."""
    return [p.relative_to(root).as_posix() if p != root else p.name for p in paths]


def image_files(path: str | Path) -> tuple[list[Path], Path]:
    """Image files under a folder (or one file) and the root their sources are relative to."""
    from transferkit.data.images import IMAGE_FILES, images_under, is_image_file

    root = Path(path)
    if root.is_file():
        if not is_image_file(root):
            raise TransferkitError(f"'{path}' is not an image file", "give a folder of images or an image file")
        return [root], root.parent
    if not root.is_dir():
        raise TransferkitError(f"'{path}' does not exist", "give a folder of images")
    files = images_under(root)
    if not files:
        raise TransferkitError(f"no image files under '{path}'", f"give a folder holding {IMAGE_FILES} files")
    return files, root


def build_index(out: str | Path, *, docs: str | Path | None = None, images: str | Path | None = None,
                encoder: str | None = None, kind: str = "flat", batch_size: int = 32, progress: bool = True,
                overwrite: bool = False, store: str | None = None, **options: Any) -> VectorIndex:
    """Build an index of ``docs`` (folder/file/``pydoc-topics``) or ``images`` (folder) and publish it as ``out``
    with the run-folder lifecycle (:class:`transferkit.rundir.OutputFolder`, kind ``index``: staged beside ``out``,
    moved into place with its marker; ``overwrite`` replaces an index only). ``store``: ``faiss`` (default) or
    ``milvus:PATH_OR_URI[#COLLECTION]`` (:mod:`transferkit.memory.stores`; collection
    ``transferkit_<out name>_<random>``, recorded in meta.json)."""
    if (docs is None) == (images is None):
        raise TransferkitError("give exactly one of --docs and --images", "e.g. --docs ./notes")
    out = Path(out)
    refuse_out_inside_data(out, docs if docs is not None else images)  # it would index its own records
    spec = _target_spec(store, out)
    if storage.is_index_folder(out) and not overwrite:
        raise TransferkitError(f"'{out}' already holds an index",
                               "add to it with `transferkit index add`, or pass --overwrite")
    name = encoder or ("minilm" if docs is not None else "efficientnet_lite0")
    backbone = create_backbone(name, pretrained=True)
    index = VectorIndex.create(backbone, kind, store=spec, **options)
    with _new_store(index, out, overwrite):
        if docs is not None:
            index.add_documents(read_documents(docs), batch_size, progress, origin=source_folder(docs))
        else:
            files, root = image_files(images)  # type: ignore[arg-type]
            index.add_images(files, root, batch_size, progress)
        index.meta.extra["built_from"] = str(docs if docs is not None else images)
    logger.info("index of %d vectors (%d sources) written to %s", len(index), len(index.sources()), out)
    return index


def _target_spec(store: str | None, out: Path) -> StoreSpec:
    """The parsed ``--store`` of a new index in ``out``; without ``#COLLECTION`` the collection gets a unique
    name (``transferkit_<out name>_<random>``), so indexes in folders of the same name never share one."""
    spec = StoreSpec.parse(store, f"transferkit_{out.name}")
    return spec.renamed() if spec.scheme == "milvus" and "#" not in (store or "") else spec


def _replaced_store(out: Path) -> MilvusStore | None:
    """The Milvus store of the index in ``out`` that an ``--overwrite`` replaces (None: FAISS, no or unreadable index)."""
    def read(version: Path, sha256: dict[str, str]) -> MilvusStore | None:
        meta = _parse_meta(version / "meta.json", storage.check_file(version / "meta.json", sha256.get("meta.json")))
        return _milvus_store(meta, version / "meta.json") if "store" in meta.extra else None

    if not storage.is_index_folder(out):
        return None
    with contextlib.suppress(TransferkitError, OSError):
        return storage.read_consistent(out, read)
    return None


@contextlib.contextmanager
def _new_store(index: VectorIndex, out: Path, overwrite: bool) -> Iterator[OutputFolder]:
    """Stage ``out`` (kind ``index``) and create the index's Milvus collection, if any; the block fills ``index``,
    then it is saved and published. The collection is always a new one: when it would be the one of the index
    being replaced, it gets a unique name, and the replaced index's collection is dropped only once the new
    index is published. On failure the stage and the collection this call created are removed."""
    replaced = _replaced_store(out) if overwrite else None
    if index.store is not None and is_main_process():
        # an unreachable store, another encoder's or another index's collection: nothing written
        index.store.prepare(replaced.spec if replaced is not None else None)
        index.meta.extra["store"] = index.store.spec.to_dict()
    folder = OutputFolder(out, "index", overwrite=overwrite, owned=storage.written_by_index)
    folder.begin()
    created = False
    try:
        index.open_store()
        created = index.store is not None
        yield folder
        main = folder.is_main_process  # under torchrun every process embeds its share, the main one writes
        if main:
            index.save(folder.stage)
        with storage.WriterLock(out) if main and storage.is_index_folder(out) else contextlib.nullcontext():
            folder.publish()  # an index being replaced is not in the middle of another writer's commit
    except BaseException as exc:
        folder.abandon(exc)
        if created and is_main_process():
            with contextlib.suppress(TransferkitError):
                index.store.drop()  # type: ignore[union-attr]
        raise
    index.folder = out
    if replaced is not None and is_main_process() and (index.store is None or replaced.spec != index.store.spec):
        try:
            replaced.drop()  # published: the replaced index's vectors are no longer referenced
        except TransferkitError as error:
            logger.warning("the replaced index's Milvus collection '%s' could not be dropped (%s)",
                           replaced.spec, error)


def migrate_index(source: str | Path, out: str | Path, store: str | None = None, overwrite: bool = False,
                  batch: int = 10000) -> VectorIndex:
    """Copy the index ``source`` into a new index folder ``out`` whose vectors live in ``store`` (``faiss`` or
    ``milvus:PATH_OR_URI[#COLLECTION]``): same ids, records, metadata and lexical side; the vectors are copied,
    not re-embedded (no encoder needed). ``source`` is only read."""
    out = Path(out)
    spec = _target_spec(store, out)
    src = VectorIndex.load(source)
    if Path(source).resolve() == out.resolve():
        raise TransferkitError("index migrate needs a new folder for the copy", "give --out another folder")
    if storage.is_index_folder(out) and not overwrite:
        raise TransferkitError(f"'{out}' already holds an index", "pass --overwrite or give another --out")
    meta = IndexMeta(**{**asdict(src.meta), "extra": {k: v for k, v in src.meta.extra.items()
                                                      if k not in ("store", "store_retired")}})
    meta.format_version = 1
    if spec.scheme == "milvus":
        meta.extra["store"], meta.format_version = spec.to_dict(), 2
        index = VectorIndex(meta, None, dict(src.records), store=_milvus_store(meta))
        index.store.check_source_differs(src.store)  # type: ignore[union-attr]
    else:
        index = VectorIndex(meta, _new_faiss_index(meta), dict(src.records))
    if src.meta.modality == "text" and src._lexical_stored:
        index._lexical = src.lexical  # same ids and texts: the BM25 side is copied as it is
    ids = sorted(src.records)
    with _new_store(index, out, overwrite):
        if index.store is None and meta.kind == "ivf" and ids:  # train the cells on the same vectors as FAISS did
            index._train_ivf(src.vectors(ids[:max(meta.ivf_nlist * 39, 10000)]))
        for start in range(0, len(ids), batch):
            part = np.asarray(ids[start:start + batch], np.int64)
            index._store_vectors(src.vectors(part), part)
    logger.info("index '%s' (%s) copied to '%s' (%s): %d vectors", source,
                src.store.spec if src.store else "faiss", out, spec, len(index))
    return index


def add_to_index(folder: str | Path, path: str | Path, batch_size: int = 32, progress: bool = True,
                 lock_timeout: float = storage.DEFAULT_LOCK_TIMEOUT) -> int:
    """Add (or replace) the documents / images of ``path``; returns the number of vectors added. The items are
    embedded first (split across processes under ``torchrun``), then the index is re-read, changed and committed
    under its writer lock by one process, so concurrent adds all land."""
    snapshot = VectorIndex.load(folder)
    origin = source_folder(path)
    if snapshot.meta.modality == "text":
        documents = read_documents(path)
        snapshot.check_origin([d.source for d in documents], origin)  # refused before anything is embedded
        prepared = snapshot.embed_documents(documents, batch_size, progress)
    else:
        files, root = image_files(path)
        snapshot.check_origin(image_sources(files, root), origin)
        prepared = snapshot.embed_images(files, root, batch_size, progress)
    state = launched_processes()
    if state is not None and not state.is_main_process:  # under torchrun: embedded its share, the main one writes
        state.wait_for_everyone()
        return len(prepared[2])
    try:
        with VectorIndex.updating(folder, lock_timeout) as index:
            if not index.same_setup(snapshot):
                raise TransferkitError(f"index '{folder}' was rebuilt with another encoder or chunking while adding",
                                       "run the add again")
            return index.replace_sources(*prepared, origin=origin)
    finally:
        if state is not None:
            state.wait_for_everyone()


def remove_from_index(folder: str | Path, sources: Sequence[str],
                      lock_timeout: float = storage.DEFAULT_LOCK_TIMEOUT) -> tuple[int, int]:
    """Remove every vector of ``sources`` under the writer lock; returns ``(removed, left)``."""
    with VectorIndex.updating(folder, lock_timeout) as index:
        removed = index.remove_sources(sources)
    return removed, len(index)
