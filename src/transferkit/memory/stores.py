"""Where an index's vectors live: FAISS inside the index folder (default), or a Milvus collection.

``--store faiss`` keeps the vectors in ``index.faiss`` in each committed version of the folder
(:mod:`transferkit.memory.storage`). ``--store milvus:PATH_OR_URI[#COLLECTION]`` keeps them in a Milvus collection,
through ``pymilvus``: a local file path runs Milvus Lite in-process (``milvus-lite``, tested here), an
``http(s)://host:port`` URI talks to a Milvus server or cluster (same client, same calls; documented, not tested
offline). Why Milvus: its client is the same for the embedded and the distributed deployment, and on 100,000
vectors its exact (``FLAT``, inner product) search returned FAISS's top-10 (bench/results/memory.md). Qdrant's
local mode was not chosen because it persists its collections with ``pickle``, which transferkit never reads.

The index folder still holds ``meta.json`` (with the store's URI and collection), ``records.jsonl``, the lexical
side and the encoder check, committed atomically under the writer lock like a FAISS index. The collection is not
part of that transaction; the order of operations makes every crash leave a consistent index:

1. new vectors are inserted under ids ``>= meta.next_id`` of the committed version (no committed version
   references them, and every search filters ``id < next_id``: readers never see them);
2. the folder's new version is committed (records + ``next_id`` now reference them; removed ids are listed in
   ``meta.extra["store_retired"]``);
3. the superseded ids are deleted from the collection.

A crash before 2 leaves vectors above the committed ``next_id``; a crash between 2 and 3 leaves retired ids in
the collection. Searches skip both (ids not in the records are dropped, the search asks for that many more), and
the next writer deletes both before it changes anything. A reader holding an older version while a writer
reaches step 3 may get fewer than ``k`` hits for that one query. Milvus itself guarantees each insert / delete is
durable once acknowledged (write-ahead log); the collection is opened with ``Strong`` consistency so a search
sees every acknowledged write. Milvus Lite serves one process per database file.

A build or migration always fills a new collection (without ``#COLLECTION``: ``transferkit_<folder>_<random>``);
``--overwrite`` drops the replaced index's collection only after the new index folder is published, and a failed
build drops only the collection it created.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)

SCHEMES = ("faiss", "milvus")
ENCODER_PROPERTY = "transferkit.encoder"
_MILVUS_INDEX = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}
_NAME = re.compile(r"[^A-Za-z0-9_]")
_CLIENTS: dict[str, Any] = {}  # one client per URI and process (Milvus Lite serves one per file)


@dataclass(frozen=True)
class StoreSpec:
    """A parsed ``--store`` value: ``faiss``, or ``milvus`` with a URI (file path or http(s)) and collection."""

    scheme: str = "faiss"
    uri: str = ""
    collection: str = ""

    @classmethod
    def parse(cls, value: str | None, default_collection: str = "transferkit") -> StoreSpec:
        value = (value or "faiss").strip()
        scheme, _, rest = value.partition(":")
        if scheme not in SCHEMES or (scheme == "faiss" and rest):
            raise TransferkitError(f"unknown vector store '{value}'",
                                   "use --store faiss or --store milvus:PATH_OR_URI (e.g. milvus:./vectors.db)")
        if scheme == "faiss":
            return cls()
        uri, _, collection = rest.partition("#")
        if not uri:
            raise TransferkitError(f"--store '{value}' names no Milvus database",
                                   "give a local file (milvus:./vectors.db) or a server (milvus:http://host:19530)")
        collection = collection_name(collection or default_collection)
        remote = uri.startswith(("http://", "https://", "tcp://", "grpc://"))
        if not remote:
            uri = str(Path(uri).expanduser().resolve())
            if not uri.endswith(".db"):
                raise TransferkitError(f"Milvus Lite database '{uri}' must be a file ending in .db",
                                       "e.g. --store milvus:./vectors.db")
        return cls("milvus", uri, collection)

    def renamed(self) -> StoreSpec:
        """The same store with a new, unique collection name (``NAME_<8 random hex digits>``)."""
        return replace(self, collection=f"{self.collection}_{secrets.token_hex(4)}")

    @property
    def is_remote(self) -> bool:
        return self.scheme == "milvus" and not self.uri.endswith(".db")

    def to_dict(self) -> dict[str, str]:
        return {"scheme": self.scheme, "uri": self.uri, "collection": self.collection}

    def __str__(self) -> str:
        return "faiss" if self.scheme == "faiss" else f"milvus:{self.uri}#{self.collection}"


def collection_name(name: str) -> str:
    """``name`` made a valid Milvus collection name (letters, digits, ``_``; starting with a letter or ``_``)."""
    name = _NAME.sub("_", name)
    return name if name[:1].isalpha() or name[:1] == "_" else "tk_" + name


def _client(uri: str) -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise TransferkitError("the Milvus store needs the 'milvus' extra (pymilvus, milvus-lite)",
                               "pip install 'transferkit[milvus]'") from None
    if uri not in _CLIENTS:
        if uri.endswith(".db") and not Path(uri).parent.is_dir():
            raise TransferkitError(f"cannot open Milvus Lite database '{uri}': its folder does not exist",
                                   "create the folder or give another path")
        try:
            _CLIENTS[uri] = MilvusClient(uri, timeout=5)
        except Exception as error:  # pymilvus raises MilvusException, grpc errors or OSError
            raise TransferkitError(f"cannot reach the Milvus store '{uri}' ({_first_line(error)})",
                                   "check the URI and that the server is running") from None
    return _CLIENTS[uri]


def _first_line(error: BaseException) -> str:
    return (str(getattr(error, "message", "")) or str(error)).splitlines()[0][:200] if str(error) else type(error).__name__


class MilvusStore:
    """The vectors of one index in a Milvus collection (``id`` INT64 primary key, ``vector`` FLOAT_VECTOR,
    inner-product metric), tagged with the encoder that made them."""

    def __init__(self, spec: StoreSpec, encoder_tag: str, dim: int) -> None:
        self.spec = spec
        self.encoder_tag = encoder_tag
        self.dim = dim
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The connected client; the collection must exist and hold this encoder's vectors (checked once)."""
        if self._client is None:
            client = _client(self.spec.uri)
            self._check(client, must_exist=True)
            # a collection opened by another process (or after a restart) is "released": load it into memory
            self._call("load the collection", client.load_collection, self.spec.collection)
            self._client = client
        return self._client

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except TransferkitError:
            raise
        except Exception as error:
            raise TransferkitError(f"Milvus store '{self.spec}' failed to {what} ({_first_line(error)})",
                                   "check the store is reachable and the collection intact") from None

    def _check(self, client: Any, must_exist: bool) -> bool:
        """Whether the collection exists; raises when it holds another encoder's vectors (or is missing)."""
        name = self.spec.collection
        if not self._call("list collections", client.has_collection, name):
            if must_exist:
                raise TransferkitError(f"the Milvus store '{self.spec}' has no collection '{name}'",
                                       "rebuild the index, or migrate it again with `transferkit index migrate`")
            return False
        described = self._call("describe the collection", client.describe_collection, name)
        tag = (described.get("properties") or {}).get(ENCODER_PROPERTY)
        if tag != self.encoder_tag:
            raise TransferkitError(
                f"Milvus collection '{name}' in '{self.spec.uri}' was built with another encoder "
                f"({json.loads(tag).get('name', '?') if tag else 'not by transferkit'})",
                "use another collection (--store milvus:URI#NAME) or the index that built it")
        return True

    def prepare(self, replacing: StoreSpec | None = None) -> None:
        """Check, writing nothing, that the collection can be created: the store answers and the collection is
        new. When it is ``replacing`` (the collection of the index an ``--overwrite`` replaces), this store is
        renamed to a new collection instead: the old one keeps its vectors until the new index is published."""
        client = _client(self.spec.uri)
        if self._check(client, must_exist=False):
            if self.spec != replacing:
                raise TransferkitError(f"Milvus collection '{self.spec.collection}' in '{self.spec.uri}' exists",
                                       "name another collection (--store milvus:URI#NAME)")
            self.spec = self.spec.renamed()
            self.prepare()

    def create(self, kind: str, options: dict[str, int]) -> None:
        """Create the (new) collection; an existing one is never replaced (see :meth:`prepare`)."""
        from pymilvus import DataType, MilvusClient

        client = _client(self.spec.uri)
        self.prepare()
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        params = client.prepare_index_params()
        index_type = _MILVUS_INDEX[kind]
        build = ({"M": options["hnsw_m"], "efConstruction": 2 * options["hnsw_m"]} if kind == "hnsw"
                 else {"nlist": options["ivf_nlist"]} if kind == "ivf" else {})
        params.add_index("vector", index_type=index_type, metric_type="IP", params=build)
        self._call("create the collection", client.create_collection, self.spec.collection, schema=schema,
                   index_params=params, consistency_level="Strong",
                   properties={ENCODER_PROPERTY: self.encoder_tag})
        self._client = client

    def check_source_differs(self, other: MilvusStore | None) -> None:
        if other is not None and other.spec == self.spec:
            raise TransferkitError(f"the index already lives in '{self.spec}'",
                                   "migrate to another store or collection (--store milvus:URI#NAME)")

    def drop(self) -> None:
        """Drop the collection (only one this run created, or the one of an index it replaced, once published)."""
        self._call("drop the collection", self.client.drop_collection, self.spec.collection)

    def add(self, vectors: np.ndarray, ids: np.ndarray, batch: int = 5000) -> None:
        for start in range(0, len(ids), batch):
            rows = [{"id": int(i), "vector": v} for i, v in zip(ids[start:start + batch].tolist(),
                                                                vectors[start:start + batch].tolist())]
            self._call("insert vectors", self.client.insert, self.spec.collection, rows)

    def remove(self, ids: Sequence[int]) -> None:
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 5000):
            self._call("delete vectors", self.client.delete, self.spec.collection, ids=ids[start:start + 5000])

    def remove_from(self, first_id: int) -> None:
        """Delete every vector with id ``>= first_id`` (an interrupted writer's uncommitted inserts)."""
        self._call("delete vectors", self.client.delete, self.spec.collection, filter=f"id >= {int(first_id)}")

    def search(self, queries: np.ndarray, k: int, below_id: int, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` ``(n, k)`` of the best stored vectors with id ``< below_id`` (-1 / -inf: none)."""
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        if not len(queries) or k < 1:
            return scores, ids
        found = self._call("search", self.client.search, self.spec.collection, data=queries.tolist(),
                           limit=min(k, 16384), filter=f"id < {int(below_id)}", output_fields=["id"],
                           search_params={"metric_type": "IP", "params": params})
        for row, hits in enumerate(found):
            for column, hit in enumerate(hits):
                scores[row, column] = hit["distance"]
                ids[row, column] = hit["id"]
        return scores, ids

    def vectors(self, ids: Sequence[int], batch: int = 2000) -> np.ndarray:
        """The stored vectors of ``ids``, in that order."""
        ids = [int(i) for i in ids]
        found: dict[int, list[float]] = {}
        for start in range(0, len(ids), batch):
            rows = self._call("read vectors", self.client.get, self.spec.collection, ids=ids[start:start + batch],
                              output_fields=["vector"])
            found.update({int(r["id"]): r["vector"] for r in rows})
        missing = [i for i in ids if i not in found]
        if missing:
            raise TransferkitError(f"Milvus collection '{self.spec.collection}' lacks the vector of record {missing[0]}",
                                   "rebuild the index (the collection was changed outside transferkit)")
        return np.asarray([found[i] for i in ids], np.float32).reshape(len(ids), self.dim)
