"""A persistent vector index (FAISS) over text chunks or images, with its metadata, for semantic search.

Vectors are L2-normalised embeddings, so the inner product is the cosine similarity. Index kinds:

* ``flat`` (default): exact search, ``IndexFlatIP`` (brute force, every stored vector is scored);
* ``hnsw``: approximate, a hierarchical navigable small-world graph (Malkov & Yashunin 2018), ``hnsw_m``
  links per node, ``ef_search`` candidates explored per query;
* ``ivf``: approximate, an inverted file (Jégou et al. 2011): k-means into ``ivf_nlist`` cells, ``nprobe``
  nearest cells scanned per query (trained on the first vectors added).

Every vector has a stable integer id (``IndexIDMap2`` / IVF ids) pointing to a record (source, text, offsets),
so documents can be added and removed incrementally. A folder holds ``index.faiss``, ``records.jsonl`` and
``meta.json`` (encoder spec + preprocessing signature, kind, dimension, chunking). A query must be embedded by
the same encoder with the same preprocessing as the index, else the scores mean nothing: this is checked.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.backbones import Backbone, BackboneSpec, backbone_from_spec, create_backbone
from transferkit.engine.placement import predict_batches
from transferkit.errors import TransferkitError
from transferkit.memory.chunking import Chunk, Document, check_chunking, chunk_document, read_documents
from transferkit.progress import progress as progress_bar

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw", "ivf")
INDEX_FORMAT = "transferkit-index"
INDEX_VERSION = 1
_FILES = ("index.faiss", "records.jsonl", "meta.json")


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
    format_version: int = INDEX_VERSION
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

    def to_json(self) -> dict[str, Any]:
        """The ``search --json`` fields."""
        return {"rank": self.rank, "score": round(self.score, 6), "source": self.source, "text": self.text,
                "start": self.start, "end": self.end}


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
                 folder: Path | None = None) -> None:
        self.meta = meta
        self.faiss_index = faiss_index
        self.records = records
        self.folder = folder
        self._encoder: Backbone | None = None

    # construction ---------------------------------------------------------------------------------------
    @classmethod
    def create(cls, encoder: Backbone, kind: str = "flat", **options: Any) -> VectorIndex:
        """An empty index for ``encoder``'s embeddings (``options``: IndexMeta fields, e.g. ``hnsw_m``)."""
        if kind not in INDEX_KINDS:
            raise TransferkitError(f"unknown index kind '{kind}'", f"choose one of {', '.join(INDEX_KINDS)}")
        if encoder.modality not in ("text", "image"):
            raise TransferkitError(f"encoder '{encoder.spec.name}' embeds {encoder.modality} data",
                                   "use a text encoder (minilm) or an image backbone (efficientnet_lite0)")
        meta = IndexMeta(encoder=encoder.spec.to_dict(), preprocess_signature=encoder.preprocess_signature(),
                         modality=encoder.modality, dim=int(encoder.feature_dim), kind=kind, **options)
        check_chunking(meta.chunk_size, meta.chunk_overlap, meta.chunk_unit)
        index = cls(meta, _new_faiss_index(meta), {})
        index._encoder = encoder
        return index

    @classmethod
    def load(cls, folder: str | Path) -> VectorIndex:
        import faiss

        folder = Path(folder)
        missing = [f for f in _FILES if not (folder / f).is_file()]
        if missing:
            raise TransferkitError(f"'{folder}' is not a transferkit index (no {missing[0]})",
                                   "build one with `transferkit index build --docs ... --out FOLDER`")
        raw = json.loads((folder / "meta.json").read_text())
        if raw.get("format") != INDEX_FORMAT or raw.get("format_version", 0) > INDEX_VERSION:
            raise TransferkitError(f"'{folder}/meta.json' is not a readable transferkit index",
                                   "rebuild the index with this version of transferkit")
        meta = IndexMeta(**raw)
        records = {}
        with open(folder / "records.jsonl", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                records[int(row.pop("id"))] = row
        index = cls(meta, faiss.read_index(str(folder / "index.faiss")), records, folder)
        if index.faiss_index.ntotal != len(records):
            raise TransferkitError(f"'{folder}' is inconsistent ({index.faiss_index.ntotal} vectors, "
                                   f"{len(records)} records)", "rebuild the index")
        _apply_search_params(index.faiss_index, meta)
        return index

    def save(self, folder: str | Path | None = None) -> Path:
        """Write the three files (each to a temporary name, then renamed) and return the folder."""
        import faiss

        target = Path(folder) if folder is not None else self.folder
        if target is None:
            raise ValueError("no folder to save the index to")
        target.mkdir(parents=True, exist_ok=True)
        tmp = {name: target / f".{name}.{os.getpid()}.tmp" for name in _FILES}
        faiss.write_index(self.faiss_index, str(tmp["index.faiss"]))
        with open(tmp["records.jsonl"], "w", encoding="utf-8") as fh:
            for record_id in sorted(self.records):
                fh.write(json.dumps({"id": record_id, **self.records[record_id]}, ensure_ascii=False) + "\n")
        tmp["meta.json"].write_text(json.dumps(asdict(self.meta), indent=2))
        for name in _FILES:  # meta.json last: it marks a complete index
            os.replace(tmp[name], target / name)
        self.folder = target
        return target

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
        return int(self.faiss_index.ntotal)

    def sources(self) -> list[str]:
        return sorted({r["source"] for r in self.records.values()})

    def add_vectors(self, vectors: np.ndarray, records: list[dict[str, Any]]) -> np.ndarray:
        """Store ``vectors`` (already normalised, one per record); returns their new ids."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.meta.dim or len(vectors) != len(records):
            raise ValueError(f"expected {len(records)} vectors of dimension {self.meta.dim}, got {vectors.shape}")
        if not len(vectors):
            return np.zeros(0, np.int64)
        if self.meta.kind == "ivf" and not self.faiss_index.is_trained:
            self._train_ivf(vectors)
        ids = np.arange(self.meta.next_id, self.meta.next_id + len(vectors), dtype=np.int64)
        self.faiss_index.add_with_ids(vectors, ids)
        self.records.update({int(i): r for i, r in zip(ids, records)})
        self.meta.next_id += len(vectors)
        return ids

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
        if self.meta.kind == "hnsw":  # HNSW graphs cannot delete: rebuild from the kept vectors
            keep = np.asarray(sorted(set(self.records) - set(ids.tolist())), dtype=np.int64)
            vectors = np.stack([self.faiss_index.reconstruct(int(i)) for i in keep]) if len(keep) else None
            self.faiss_index = _new_faiss_index(self.meta)
            if vectors is not None:
                self.faiss_index.add_with_ids(vectors, keep)
        else:
            self.faiss_index.remove_ids(faiss.IDSelectorArray(ids))
        for i in ids:
            del self.records[int(i)]
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
        """``(scores, ids)`` arrays ``(n_queries, k)`` of the most similar stored vectors (id -1: none)."""
        if k < 1:
            raise TransferkitError(f"invalid -k {k}", "use a whole number of at least 1")
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.meta.dim)
        if not len(self):
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        return self.faiss_index.search(queries, min(k, len(self)))

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

    def search(self, queries: Sequence[Any], k: int = 5, encoder: Backbone | None = None) -> list[list[SearchHit]]:
        """Embed ``queries`` (texts, or PIL images for an image index) with the index's encoder and search."""
        if encoder is not None:
            self.check_encoder(encoder)
        return self.search_vectors(embed(self.encoder, list(queries)), k)

    # documents and images -----------------------------------------------------------------------------------
    def chunks_of(self, documents: Sequence[Document]) -> list[Chunk]:
        tokenizer = getattr(self.encoder, "tokenizer", None)
        return [c for d in documents for c in chunk_document(d, self.meta.chunk_size, self.meta.chunk_overlap,
                                                             self.meta.chunk_unit, tokenizer)]

    def add_documents(self, documents: Sequence[Document], batch_size: int = 32, progress: bool = True) -> int:
        """Chunk, embed and add documents; a source already in the index is replaced. Returns chunks added."""
        if self.meta.modality != "text":
            raise TransferkitError("this index holds images", "add images with --images, or build a text index")
        replaced = sorted({d.source for d in documents} & set(self.sources()))
        if replaced:
            logger.info("replacing %d sources already in the index", len(replaced))
            self.remove_sources(replaced)
        chunks = self.chunks_of(documents)
        vectors = embed(self.encoder, [c.text for c in chunks], batch_size, progress)
        self.add_vectors(vectors, [c.to_dict() for c in chunks])
        return len(chunks)

    def add_images(self, paths: Sequence[Path], root: Path, batch_size: int = 32, progress: bool = True) -> int:
        """Embed and add image files (``source`` relative to ``root``); a source already present is replaced."""
        from transferkit.data.images import open_image

        if self.meta.modality != "image":
            raise TransferkitError("this index holds text", "add documents with --docs, or build an image index")
        sources = [p.relative_to(root).as_posix() if p != root else p.name for p in paths]
        replaced = sorted(set(sources) & set(self.sources()))
        if replaced:
            self.remove_sources(replaced)
        added = 0
        for start in range(0, len(paths), 256):  # bounded memory: decode 256 images at a time
            batch_paths = paths[start:start + 256]
            vectors = embed(self.encoder, [open_image(p) for p in batch_paths], batch_size, progress)
            records = [{"source": s, "text": "", "start": None, "end": None}
                       for s in sources[start:start + 256]]
            added += len(self.add_vectors(vectors, records))
        return added


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
def image_files(path: str | Path) -> tuple[list[Path], Path]:
    """Image files under a folder (or one file) and the root their sources are relative to."""
    from transferkit.data.images import _images_under, is_image_file

    root = Path(path)
    if root.is_file():
        if not is_image_file(root):
            raise TransferkitError(f"'{path}' is not an image file", "give a folder of images or an image file")
        return [root], root.parent
    if not root.is_dir():
        raise TransferkitError(f"'{path}' does not exist", "give a folder of images")
    files = _images_under(root)
    if not files:
        raise TransferkitError(f"no image files under '{path}'", "give a folder holding .jpg/.png files")
    return files, root


def build_index(out: str | Path, *, docs: str | Path | None = None, images: str | Path | None = None,
                encoder: str | None = None, kind: str = "flat", batch_size: int = 32, progress: bool = True,
                overwrite: bool = False, **options: Any) -> VectorIndex:
    """Build and save an index of ``docs`` (folder/file/``pydoc-topics``) or ``images`` (folder) into ``out``."""
    if (docs is None) == (images is None):
        raise TransferkitError("give exactly one of --docs and --images", "e.g. --docs ./notes")
    out = Path(out)
    if (out / "meta.json").exists() and not overwrite:
        raise TransferkitError(f"'{out}' already holds an index",
                               "add to it with `transferkit index add`, or pass --overwrite")
    name = encoder or ("minilm" if docs is not None else "efficientnet_lite0")
    backbone = create_backbone(name, pretrained=True)
    index = VectorIndex.create(backbone, kind, **options)
    if docs is not None:
        index.add_documents(read_documents(docs), batch_size, progress)
    else:
        files, root = image_files(images)  # type: ignore[arg-type]
        index.add_images(files, root, batch_size, progress)
    index.meta.extra["built_from"] = str(docs if docs is not None else images)
    index.save(out)
    logger.info("index of %d vectors (%d sources) written to %s", len(index), len(index.sources()), out)
    return index


def add_to_index(folder: str | Path, path: str | Path, batch_size: int = 32, progress: bool = True) -> int:
    """Add (or replace) the documents / images of ``path``; returns the number of vectors added."""
    index = VectorIndex.load(folder)
    if index.meta.modality == "text":
        added = index.add_documents(read_documents(path), batch_size, progress)
    else:
        files, root = image_files(path)
        added = index.add_images(files, root, batch_size, progress)
    index.save()
    return added
