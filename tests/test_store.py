"""The Milvus vector store (issue 17, item 2), in Milvus Lite: build / add / remove / search give what FAISS gives
on the same corpus, ``index migrate`` copies both ways, an interrupted write leaves a consistent index, and bad
stores (unknown scheme, unreachable server, another encoder's collection) exit 2 with one line, writing nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from transferkit.cli.main import main  # noqa: E402
from transferkit.errors import TransferkitError  # noqa: E402
from transferkit.memory.chunking import read_documents  # noqa: E402
from transferkit.memory.index import VectorIndex, add_to_index, build_index, migrate_index, remove_from_index  # noqa: E402
from transferkit.memory.stores import StoreSpec  # noqa: E402

DOCS = {"a.md": "the cat sat on the mat", "b.txt": "the dog plays guitar today " * 3,
        "c.md": "a man fell on the market today", "d.md": "someone is playing the guitar on a mat"}
MORE = {"e.md": "the cat is playing today", "a.md": "a dog sat on the market"}  # added to docs: a.md is replaced
QUERIES = ["cat on a mat", "guitar", "market today", "dog", "someone fell"]


@pytest.fixture(scope="module")
def tiny_encoder(tiny_bert_dir) -> str:
    return f"hf:{tiny_bert_dir}"


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("milvus") / "vectors.db")


def write_docs(folder: Path, docs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text)
    return folder


def results(index: VectorIndex, retrieval: str = "dense", k: int = 4) -> list[list[tuple[int, str, float]]]:
    return [[(h.id, h.source, round(h.score, 4)) for h in hits]
            for hits in index.search(QUERIES, k, retrieval=retrieval)]


def in_rank_order(rows: list[list[tuple[int, str, float]]]) -> list[list[tuple[int, str, float]]]:
    """Each query's hits by score, exact (4-decimal) ties by id: the two stores may return exact ties in either
    order (seen on another CPU: two chunks at 0.8774 swapped); every other hit keeps its place."""
    return [sorted(row, key=lambda hit: (-hit[2], hit[0])) for row in rows]


def one_line(err: str) -> bool:
    """One error line and no traceback (model-loading progress bars aside)."""
    return "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error")]) == 1


def stored_ids(index: VectorIndex) -> list[int]:
    """Every id the Milvus collection holds (committed or not)."""
    rows = index.store.client.query(index.store.spec.collection, filter="id >= 0", output_fields=["id"])
    return sorted(int(r["id"]) for r in rows)


def test_store_spec_parsing(tmp_path):
    assert StoreSpec.parse(None).scheme == "faiss" and StoreSpec.parse("faiss").scheme == "faiss"
    spec = StoreSpec.parse(f"milvus:{tmp_path}/v.db#my-docs", "x")
    assert (spec.uri, spec.collection, spec.is_remote) == (f"{tmp_path}/v.db", "my_docs", False)
    remote = StoreSpec.parse("milvus:http://milvus.example:19530", "transferkit_idx")
    assert (remote.uri, remote.collection, remote.is_remote) == ("http://milvus.example:19530", "transferkit_idx", True)
    for bad in ("qdrant:./q", "faiss:x", "milvus:", "milvus:./vectors"):
        with pytest.raises(TransferkitError):
            StoreSpec.parse(bad)


def test_milvus_build_add_remove_search_equal_faiss(tiny_encoder, db, tmp_path):
    docs = write_docs(tmp_path / "docs", DOCS)
    options = {"encoder": tiny_encoder, "progress": False, "chunk_size": 30, "chunk_overlap": 5}
    faiss_index = build_index(tmp_path / "f", docs=docs, **options)
    milvus_index = build_index(tmp_path / "m", docs=docs, store=f"milvus:{db}#parity", **options)
    assert json.loads((tmp_path / "m" / "v000001" / "meta.json").read_text())["extra"]["store"]["collection"] == "parity"
    assert not (tmp_path / "m" / "v000001" / "index.faiss").exists()  # the vectors are in the collection
    for step in ("build", "add", "remove"):
        if step == "add":
            more = write_docs(docs, MORE)  # the folder again (a source of another folder is refused)
            assert add_to_index(tmp_path / "f", more, progress=False) == add_to_index(tmp_path / "m", more,
                                                                                      progress=False)
        elif step == "remove":
            assert remove_from_index(tmp_path / "f", ["b.txt"]) == remove_from_index(tmp_path / "m", ["b.txt"])
        faiss_index, milvus_index = VectorIndex.load(tmp_path / "f"), VectorIndex.load(tmp_path / "m")
        assert milvus_index.records == faiss_index.records and len(milvus_index) == len(faiss_index)
        for retrieval in ("dense", "hybrid", "lexical"):
            got, expected = results(milvus_index, retrieval), results(faiss_index, retrieval)
            got, expected = in_rank_order(got), in_rank_order(expected)
            assert [[i for i, _, _ in row] for row in got] == [[i for i, _, _ in row] for row in expected], step
            assert np.allclose([s for row in got for *_, s in row], [s for row in expected for *_, s in row],
                               atol=1e-3)
        ids = sorted(milvus_index.records)
        assert np.abs(milvus_index.vectors(ids) - faiss_index.vectors(ids)).max() <= 1e-6
        assert stored_ids(milvus_index) == ids  # replaced and removed vectors were deleted from the collection
    assert "b.txt" not in milvus_index.sources() and "e.md" in milvus_index.sources()
    # another process (or a restarted server) finds the collection released: opening the index loads it again
    milvus_index.store.client.release_collection("parity")
    assert in_rank_order(results(VectorIndex.load(tmp_path / "m"))) == in_rank_order(results(faiss_index))


def test_migrate_both_ways_keeps_ids_vectors_and_results(tiny_encoder, db, tmp_path, capsys):
    docs = write_docs(tmp_path / "docs", DOCS)
    build_index(tmp_path / "f", docs=docs, encoder=tiny_encoder, progress=False, chunk_size=30, chunk_overlap=5)
    assert main(["index", "migrate", str(tmp_path / "f"), "--store", f"milvus:{db}#migrated",
                 "--out", str(tmp_path / "m")]) == 0
    assert main(["index", "migrate", str(tmp_path / "m"), "--out", str(tmp_path / "back")]) == 0
    assert "copied" in capsys.readouterr().out
    indexes = [VectorIndex.load(tmp_path / name) for name in ("f", "m", "back")]
    assert indexes[1].store is not None and indexes[2].store is None
    ids = sorted(indexes[0].records)
    for index in indexes[1:]:
        assert index.records == indexes[0].records and index.meta.next_id == indexes[0].meta.next_id
        assert np.abs(index.vectors(ids) - indexes[0].vectors(ids)).max() <= 1e-6
        assert in_rank_order(results(index, "hybrid")) == in_rank_order(results(indexes[0], "hybrid"))
    # the copy is an ordinary index: it can be searched from the CLI and changed
    assert main(["search", str(tmp_path / "m"), QUERIES[0], "--json", "-k", "4", "--retrieval", "dense"]) == 0
    assert [h["source"] for h in json.loads(capsys.readouterr().out)["results"]] == [
        source for _, source, _ in results(indexes[0])[0]]


def test_interrupted_writes_leave_a_consistent_index_cleaned_by_the_next_writer(tiny_encoder, db, tmp_path,
                                                                                  monkeypatch):
    docs, more = write_docs(tmp_path / "docs", DOCS), write_docs(tmp_path / "more", MORE)
    folder = tmp_path / "m"
    build_index(folder, docs=docs, encoder=tiny_encoder, progress=False, chunk_size=30, chunk_overlap=5,
                store=f"milvus:{db}#crash")
    before = VectorIndex.load(folder)
    expected = results(before)
    # 1. the writer dies after inserting its vectors, before committing the folder: readers never see them
    index = VectorIndex.load(folder)
    assert index.add_documents(read_documents(more), progress=False) > 0  # inserted, never saved
    assert max(stored_ids(index)) >= before.meta.next_id
    assert results(VectorIndex.load(folder)) == expected
    # 2. the writer dies between the commit and deleting the superseded vectors: they are never returned
    from transferkit.memory.stores import MilvusStore

    def dying(self, ids):
        raise TransferkitError("store down", "retry")

    with monkeypatch.context() as patch:
        patch.setattr(MilvusStore, "remove", dying)
        patch.setattr(MilvusStore, "remove_from", lambda self, first: None)
        removed, _ = remove_from_index(folder, ["b.txt"])
    after = VectorIndex.load(folder)
    retired = after.meta.extra["store_retired"]
    assert removed == len(retired) > 0 and set(retired) <= set(stored_ids(after))  # still in the collection
    for hits in after.search(["guitar today"] * 2, 20, retrieval="dense"):
        assert {h.id for h in hits}.isdisjoint(retired) and len(hits) == len(after)
    # the next writer deletes both leftovers before changing anything
    add_to_index(folder, write_docs(docs, MORE), progress=False)  # the folder again: a.md replaced
    final = VectorIndex.load(folder)
    assert stored_ids(final) == sorted(final.records)  # leftovers of both crashes and this add's own are gone
    assert not set(retired) & set(final.meta.extra["store_retired"])  # the list holds only this add's replaced ids


def test_bad_stores_exit_2_with_one_line_and_write_nothing(tiny_encoder, db, tmp_path, capsys):
    docs = write_docs(tmp_path / "docs", DOCS)
    base = ["index", "build", "--docs", str(docs), "--encoder", tiny_encoder, "--chunk-size", "30",
            "--chunk-overlap", "5"]
    cases = {"qdrant:./q.db": "unknown vector store", "milvus:http://127.0.0.1:9": "cannot reach the Milvus store",
             f"milvus:{tmp_path}/nofolder/v.db": "its folder does not exist"}
    for store, message in cases.items():
        assert main([*base, "--out", str(tmp_path / "out"), "--store", store]) == 2
        err = capsys.readouterr().err
        assert message in err and one_line(err), err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]  # no --out, no staging, no database
    # a collection holding another encoder's vectors is refused (build and migrate), nothing is written
    assert main([*base, "--out", str(tmp_path / "one"), "--store", f"milvus:{db}#shared"]) == 0
    other = shutil.copytree(tiny_encoder[3:], tmp_path / "other-bert")  # same weights, another encoder spec
    assert main(["index", "build", "--docs", str(docs), "--encoder", f"hf:{other}", "--chunk-size", "30", "--chunk-overlap", "5",
                 "--out", str(tmp_path / "two"), "--store", f"milvus:{db}#shared"]) == 2
    err = capsys.readouterr().err
    assert "was built with another encoder" in err and one_line(err)
    assert not (tmp_path / "two").exists()
    build_index(tmp_path / "plain", docs=docs, encoder=f"hf:{other}", progress=False, chunk_size=30, chunk_overlap=5)
    with pytest.raises(TransferkitError, match="another encoder"):
        migrate_index(tmp_path / "plain", tmp_path / "three", store=f"milvus:{db}#shared")
    assert not (tmp_path / "three").exists()
    # the same collection name again without --overwrite is refused; the first index still answers
    assert main([*base, "--out", str(tmp_path / "four"), "--store", f"milvus:{db}#shared"]) == 2
    assert "exists" in capsys.readouterr().err and not (tmp_path / "four").exists()
    one = VectorIndex.load(tmp_path / "one")
    assert stored_ids(one) == sorted(one.records) and len(one.search(["cat"], 3, retrieval="dense")[0]) == 3


def test_missing_milvus_extra_is_one_clear_error(tiny_encoder, tmp_path, monkeypatch, capsys):
    import sys

    from transferkit.memory import stores

    monkeypatch.setitem(sys.modules, "pymilvus", None)  # import pymilvus -> ImportError
    monkeypatch.setattr(stores, "_CLIENTS", {})
    docs = write_docs(tmp_path / "docs", DOCS)
    assert main(["index", "build", "--docs", str(docs), "--encoder", tiny_encoder, "--chunk-size", "30",
                 "--chunk-overlap", "5", "--out", str(tmp_path / "out"), "--store", f"milvus:{tmp_path}/v.db"]) == 2
    err = capsys.readouterr().err
    assert "needs the 'milvus' extra" in err and "pip install 'transferkit[milvus]'" in err and one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


# --- --overwrite never loses the old index's vectors (review, item 1) ----------------------------------------------
def collections(index: VectorIndex) -> set[str]:
    return set(index.store.client.list_collections())


def test_failed_rebuild_keeps_the_old_collection_and_a_published_one_drops_only_it(tiny_encoder, db, tmp_path):
    docs = write_docs(tmp_path / "docs", DOCS)
    base = ["index", "build", "--encoder", tiny_encoder, "--chunk-size", "30", "--chunk-overlap", "5",
            "--store", f"milvus:{db}", "--out", str(tmp_path / "idx")]
    assert main([*base, "--docs", str(docs)]) == 0
    old = VectorIndex.load(tmp_path / "idx")
    expected, old_name = results(old), old.store.spec.collection
    # the rebuild fails after it created its collection: the old index and its vectors are intact
    assert main([*base, "--docs", str(tmp_path / "missing"), "--overwrite"]) == 2
    assert old_name in collections(old) and results(VectorIndex.load(tmp_path / "idx")) == expected
    # a rebuild that is published builds into a new collection, then drops the replaced one (and only it)
    assert main([*base, "--docs", str(docs), "--overwrite"]) == 0
    new = VectorIndex.load(tmp_path / "idx")
    assert new.store.spec.collection != old_name and new.store.spec.collection in collections(new)
    assert old_name not in collections(new)
    assert in_rank_order(results(new)) == in_rank_order(expected) and stored_ids(new) == sorted(new.records)


def test_indexes_in_folders_of_the_same_name_get_their_own_collections(tiny_encoder, db, tmp_path):
    docs = write_docs(tmp_path / "docs", DOCS)
    options = {"docs": docs, "encoder": tiny_encoder, "progress": False, "chunk_size": 30, "chunk_overlap": 5,
               "store": f"milvus:{db}"}
    first = build_index(tmp_path / "a" / "idx", **options)
    expected = results(first)
    second = build_index(tmp_path / "b" / "idx", **options)
    assert first.store.spec.collection != second.store.spec.collection
    assert json.loads((tmp_path / "b" / "idx" / "v000001" / "meta.json").read_text())["extra"]["store"][
        "collection"] == second.store.spec.collection
    build_index(tmp_path / "b" / "idx", overwrite=True, **options)  # replaces b's collection, never a's
    assert results(VectorIndex.load(tmp_path / "a" / "idx")) == expected


def test_an_index_whose_meta_names_no_collection_uses_the_old_default(tmp_path):
    from transferkit.memory.index import IndexMeta, _milvus_store

    meta = IndexMeta(encoder={"name": "minilm"}, preprocess_signature="x", modality="text", dim=4,
                     extra={"store": {"scheme": "milvus", "uri": str(tmp_path / "v.db")}})
    store = _milvus_store(meta, tmp_path / "my-idx" / "v000001" / "meta.json")
    assert store.spec.collection == "transferkit_my_idx"


def test_overwrite_of_a_named_collection_builds_beside_it_and_refuses_another_index_s(tiny_encoder, db, tmp_path):
    docs = write_docs(tmp_path / "docs", DOCS)
    options = {"docs": docs, "encoder": tiny_encoder, "progress": False, "chunk_size": 30, "chunk_overlap": 5,
               "store": f"milvus:{db}#named"}
    build_index(tmp_path / "one", **options)
    with pytest.raises(TransferkitError, match="exists"):  # another index's collection: never replaced
        build_index(tmp_path / "two", overwrite=True, **options)
    assert not (tmp_path / "two").exists()
    rebuilt = build_index(tmp_path / "one", overwrite=True, **options)  # its own: a new one beside it, then dropped
    assert rebuilt.store.spec.collection.startswith("named_") and "named" not in collections(rebuilt)
    assert stored_ids(VectorIndex.load(tmp_path / "one")) == sorted(rebuilt.records)
