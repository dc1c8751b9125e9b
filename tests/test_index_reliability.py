"""The vector index's storage guarantees (issue 13): a failure injected between every pair of file operations of
a save leaves the old or the new index intact; two concurrent ``index add`` both land; a second writer waits, then
exits 2 naming the PID; a killed writer's leftovers are cleaned; an index of the flat layout opens and is
upgraded; damaged files (random truncations / byte flips, edited metadata) exit 2 with one line."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transferkit.cli.main import main
from transferkit.errors import TransferkitError
from transferkit.memory import storage
from transferkit.memory.index import VectorIndex, add_to_index, build_index
from transferkit.memory.lexical import LexicalIndex

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def tiny_encoder(tiny_bert_dir) -> str:
    return f"hf:{tiny_bert_dir}"


def write_docs(folder: Path, docs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text)
    return folder


OLD_DOCS = {"a.md": "the cat sat on the mat", "b.txt": "the dog plays guitar today"}
NEW_DOCS = {"c.md": "reset the device power", "a.md": "the market today"}  # a.md is replaced


@pytest.fixture(scope="module")
def base_index(tmp_path_factory, tiny_encoder) -> Path:
    root = tmp_path_factory.mktemp("base")
    build_index(root / "idx", docs=write_docs(root / "docs", OLD_DOCS), encoder=tiny_encoder, progress=False,
                chunk_size=40, chunk_overlap=10)
    return root / "idx"


def contents(index: VectorIndex) -> dict[str, list[str]]:
    """source -> chunk texts (what a user would find), checked against both retrieval sides."""
    found: dict[str, list[str]] = {}
    for record in index.records.values():
        found.setdefault(record["source"], []).append(record["text"])
    assert len(index) == len(index.records)
    assert set(index.lexical.ids.tolist()) == set(index.records)
    return {k: sorted(v) for k, v in found.items()}


def error_lines(err: str) -> list[str]:
    """stderr without the Hugging Face weight-loading progress bar."""
    return [line for line in err.strip().splitlines() if "Loading weights" not in line]


def entries(folder: Path) -> set[str]:
    """The folder's files, without the run-folder marker of ``index build``."""
    from transferkit.rundir import MARKER

    return {p.name for p in folder.iterdir()} - {MARKER}


# --- fault injection -------------------------------------------------------------------------------------------
class Injector:
    """Raise OSError at the ``fail_at``-th file operation under ``root`` (writes, renames, deletions, fsync)."""

    def __init__(self, root: Path, fail_at: int) -> None:
        self.root, self.fail_at, self.count, self.fired = str(root), fail_at, 0, False

    def step(self, target: object) -> None:
        if target is not None and not str(target).startswith(self.root):
            return
        self.count += 1
        if self.count == self.fail_at:
            self.fired = True
            raise OSError(5, f"injected failure at file operation {self.count}")

    def install(self, monkeypatch) -> None:
        def wrap(function, path_arg=0, mode_arg=None):
            def wrapped(*args, **kwargs):
                mode = kwargs.get("mode", args[mode_arg] if mode_arg is not None and len(args) > mode_arg else "r")
                if mode_arg is None or any(c in str(mode) for c in "wax+"):
                    self.step(args[path_arg] if isinstance(args[path_arg], str | os.PathLike) else None)
                return function(*args, **kwargs)
            return wrapped

        for name in ("replace", "rename", "mkdir", "unlink", "rmdir"):
            monkeypatch.setattr(os, name, wrap(getattr(os, name)))
        monkeypatch.setattr(os, "fsync", lambda fd, _f=os.fsync: (self.step(None), _f(fd))[1])
        monkeypatch.setattr(shutil, "rmtree", wrap(shutil.rmtree))
        monkeypatch.setattr(builtins, "open", wrap(builtins.open, mode_arg=1))
        monkeypatch.setattr(io, "open", wrap(io.open, mode_arg=1))


def test_failure_between_every_file_operation_of_save_leaves_old_or_new_index(base_index, tmp_path, monkeypatch):
    old = contents(VectorIndex.load(base_index))
    work = tmp_path / "idx"
    shutil.copytree(base_index, work)
    encoder = VectorIndex.load(work).encoder  # built once, before injecting
    from transferkit.memory.chunking import read_documents

    new_docs = read_documents(write_docs(tmp_path / "new", NEW_DOCS))
    outcomes = {"old": 0, "new": 0}
    fail_at = 0
    while True:
        fail_at += 1
        shutil.rmtree(work)
        shutil.copytree(base_index, work)
        index = VectorIndex.load(work)
        index._encoder = encoder
        index.add_documents(new_docs, progress=False)
        new = contents(index)
        injector = Injector(work, fail_at)
        with monkeypatch.context() as patch:
            injector.install(patch)
            try:
                index.save()
            except OSError as error:
                assert "injected" in str(error)
        after = contents(VectorIndex.load(work))  # loads, with both sides in step
        assert after in (old, new), f"failure at operation {fail_at}: neither the old nor the new index"
        outcomes["old" if after == old else "new"] += 1
        # the next write cleans whatever the interrupted one left
        add_to_index(work, write_docs(tmp_path / "more", {"d.md": "the dog"}), progress=False)
        assert entries(work) == {"CURRENT", ".lock", storage.read_pointer(work)["version"]}
        assert "d.md" in VectorIndex.load(work).sources()
        if not injector.fired:
            break
    assert fail_at > 12  # every write, fsync, rename and deletion of a save was a failure point
    assert outcomes["old"] >= 8 and outcomes["new"] >= 2


# --- locking and concurrency ------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_concurrent_index_add_both_land(base_index, tmp_path):
    work = tmp_path / "idx"
    shutil.copytree(base_index, work)
    first = write_docs(tmp_path / "one", {f"one{i}.md": f"the cat plays {i} guitar" for i in range(5)})
    second = write_docs(tmp_path / "two", {f"two{i}.md": f"the dog sat on mat {i}" for i in range(5)})
    logs = [tmp_path / "one.log", tmp_path / "two.log"]  # files, not pipes: a full pipe would block a writer
    handles = [open(log, "w") for log in logs]  # noqa: SIM115
    processes = [subprocess.Popen([sys.executable, "-m", "transferkit", "-q", "index", "add", str(work), str(folder)],
                                  env=_env(), stdout=subprocess.DEVNULL, stderr=handle)
                 for folder, handle in zip((first, second), handles)]
    for process, handle, log in zip(processes, handles, logs):
        code = process.wait(timeout=600)
        handle.close()
        assert code == 0, log.read_text()[-3000:]
    index = VectorIndex.load(work)
    sources = set(index.sources())
    assert {f"one{i}.md" for i in range(5)} | {f"two{i}.md" for i in range(5)} | set(OLD_DOCS) == sources
    texts = {r["text"] for r in index.records.values()}
    assert {f"the cat plays {i} guitar" for i in range(5)} <= texts and {f"the dog sat on mat {i}" for i in range(5)} <= texts
    assert set(index.lexical.ids.tolist()) == set(index.records)
    assert entries(work) == {"CURRENT", ".lock", storage.read_pointer(work)["version"]}


@pytest.mark.slow
def test_second_writer_waits_then_exits_2_naming_the_pid_and_readers_do_not_block(base_index, tmp_path, capsys):
    work = tmp_path / "idx"
    shutil.copytree(base_index, work)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom transferkit.memory.storage import "
                               "WriterLock\nwith WriterLock(sys.argv[1]):\n    print('locked', flush=True)\n"
                               "    time.sleep(60)\n", str(work)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = storage.read_pointer(work)
        more = write_docs(tmp_path / "more", {"d.md": "the dog"})
        assert main(["index", "add", str(work), str(more), "--lock-timeout", "0.3"]) == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and f"index '{work}' is being written by PID {holder.pid}" in err[0]
        assert main(["index", "remove", str(work), "--source", "a.md", "--lock-timeout", "0"]) == 2
        assert main(["search", str(work), "cat", "--json", "--retrieval", "hybrid"]) == 0  # a reader never waits
        assert json.loads(capsys.readouterr().out)["results"]
        assert storage.read_pointer(work) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["index", "add", str(work), str(more)]) == 0  # the kernel released the dead holder's lock


def test_stale_lock_tmp_and_orphan_versions_are_cleaned_by_the_next_write(base_index, tmp_path, capsys):
    work = tmp_path / "idx"
    shutil.copytree(base_index, work)
    current = storage.read_pointer(work)["version"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (work / ".lock").write_text(f"{dead.pid}\n")  # a killed writer's PID
    (work / ".v000042.tmp").mkdir()
    (work / ".v000042.tmp" / "index.faiss").write_bytes(b"half")
    shutil.copytree(work / current, work / "v000041")  # written, never made current
    (work / "CURRENT.12345.tmp").write_text("{")
    assert main(["index", "add", str(work), str(write_docs(tmp_path / "more", {"d.md": "the dog"}))]) == 0
    log = capsys.readouterr().err
    assert f"stale lock of PID {dead.pid}" in log
    assert "removed .v000042.tmp, CURRENT.12345.tmp, v000041 left by an interrupted write" in log
    version = storage.read_pointer(work)["version"]
    assert entries(work) == {"CURRENT", ".lock", version} and version == f"v{int(current[1:]) + 1:06d}"
    assert (work / ".lock").read_text() == ""  # released
    assert "d.md" in VectorIndex.load(work).sources()


def test_full_disk_during_index_add_exits_2_and_leaves_the_index_byte_identical(base_index, tmp_path, monkeypatch,
                                                                                capsys):
    import errno

    work = tmp_path / "idx"
    shutil.copytree(base_index, work)
    before = {p.relative_to(work): p.read_bytes() for p in work.rglob("*") if p.is_file() and p.name != ".lock"}
    real_open = builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and "/.v0" in str(file):  # writes into the new version folder
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk_open)
    assert main(["index", "add", str(work), str(write_docs(tmp_path / "more", {"d.md": "the dog"}))]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "the disk is full (while writing" in err[0]
    after = {p.relative_to(work): p.read_bytes() for p in work.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_save_never_touches_a_folder_that_is_not_an_index(base_index, tmp_path):
    user = tmp_path / "mine"
    (user / "v000001").mkdir(parents=True)
    (user / "v000001" / "thesis.tex").write_text("precious")
    index = VectorIndex.load(base_index)
    with pytest.raises(TransferkitError, match="is not an index but holds 'v000001'"):
        index.save(user)
    assert (user / "v000001" / "thesis.tex").read_text() == "precious"
    assert main(["index", "build", "--docs", str(base_index.parent / "docs"), "--out", str(user),
                 "--overwrite"]) == 2
    assert (user / "v000001" / "thesis.tex").read_text() == "precious"


# --- the flat layout written before versions ---------------------------------------------------------------------
def write_flat(index: VectorIndex, folder: Path) -> None:
    """The three files exactly as the previous save() wrote them."""
    import dataclasses

    import faiss

    folder.mkdir(parents=True)
    faiss.write_index(index.faiss_index, str(folder / "index.faiss"))
    (folder / "records.jsonl").write_text("".join(json.dumps({"id": i, **index.records[i]}) + "\n"
                                                  for i in sorted(index.records)))
    (folder / "meta.json").write_text(json.dumps(dataclasses.asdict(index.meta), indent=2))


def test_flat_layout_index_opens_searches_and_is_upgraded_on_next_write(base_index, tmp_path, capsys):
    flat = tmp_path / "flat"
    original = VectorIndex.load(base_index)
    write_flat(original, flat)
    loaded = VectorIndex.load(flat)
    assert contents(loaded) == contents(original)
    assert main(["search", str(flat), "guitar", "--retrieval", "lexical", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["results"][0]["source"] == "b.txt"
    assert f"index '{flat}' has no lexical side yet" in err
    assert entries(flat) == {"index.faiss", "records.jsonl", "meta.json"}  # a reader writes nothing
    assert main(["index", "add", str(flat), str(write_docs(tmp_path / "more", {"d.md": "the dog"}))]) == 0
    version = storage.read_pointer(flat)["version"]
    assert entries(flat) == {"CURRENT", ".lock", version}
    assert "lexical/ids.json" in storage.read_pointer(flat)["sha256"]
    upgraded = VectorIndex.load(flat)
    assert upgraded._lexical is not None and set(upgraded.sources()) == {"a.md", "b.txt", "d.md"}


# --- damaged files -----------------------------------------------------------------------------------------------
def _search_exit(folder: Path, capsys) -> tuple[int, list[str]]:
    code = main(["search", str(folder), "cat", "-k", "2", "--retrieval", "hybrid"])
    return code, error_lines(capsys.readouterr().err)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_truncations_and_byte_flips_exit_2_with_one_line(data, base_index, tmp_path_factory, capsys):
    work = tmp_path_factory.mktemp("damaged") / "idx"
    shutil.copytree(base_index, work)
    version = work / storage.read_pointer(work)["version"]
    files = sorted(p for p in [work / "CURRENT", *version.rglob("*")] if p.is_file())
    target = data.draw(st.sampled_from(files), label="file")
    content = bytearray(target.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        content = content[:data.draw(st.integers(0, len(content) - 1), label="keep")]
    else:
        for position in data.draw(st.lists(st.integers(0, len(content) - 1), min_size=1, max_size=4), label="at"):
            content[position] ^= data.draw(st.integers(1, 255), label="mask")
    target.write_bytes(bytes(content))
    code, err = _search_exit(work, capsys)
    if bytes(content) == (base_index / target.relative_to(work)).read_bytes():  # flips that cancelled out
        assert code == 0
        return
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert (f"'{work}/" in err[0] and "is damaged or not a valid transferkit index file" in err[0]
            ) or "not a transferkit index" in err[0]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_flat_layout_files_never_give_a_traceback(data, base_index, tmp_path_factory, capsys):
    flat = tmp_path_factory.mktemp("flat") / "idx"
    write_flat(VectorIndex.load(base_index), flat)
    target = flat / data.draw(st.sampled_from(storage.FLAT_FILES), label="file")
    content = bytearray(target.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        content = content[:data.draw(st.integers(0, len(content) - 1), label="keep")]
    else:
        for position in data.draw(st.lists(st.integers(0, len(content) - 1), min_size=1, max_size=3), label="at"):
            content[position] ^= data.draw(st.integers(1, 255), label="mask")
    target.write_bytes(bytes(content))
    code, err = _search_exit(flat, capsys)  # no checksums in the old layout: a harmless flip may still load,
    assert code in (0, 2)                    # an edited encoder name is refused as an unknown backbone
    if code == 2:
        assert len(err) == 1 and "Traceback" not in err[0]


@pytest.mark.parametrize("edit, named, message", [
    (lambda m: {**m, "dim": m["dim"] + 1}, "index.faiss", "vectors of dimension 32, meta.json says 33"),
    (lambda m: {**m, "next_id": 1}, "meta.json", "next_id 1 is not above the largest id"),
    (lambda m: {**m, "kind": "annoy"}, "meta.json", "kind, modality, dimension or encoder is invalid"),
    (lambda m: {**m, "chunk_size": "big"}, "meta.json", "field 'chunk_size' is 'big'"),
    (lambda m: {k: v for k, v in m.items() if k != "dim"}, "meta.json", "missing 1 required positional argument"),
    (lambda m: [m], "meta.json", "not a transferkit index's metadata"),
])
def test_edited_meta_json_is_refused_naming_the_file(edit, named, message, base_index, tmp_path, capsys):
    flat = tmp_path / "flat"
    write_flat(VectorIndex.load(base_index), flat)
    (flat / "meta.json").write_text(json.dumps(edit(json.loads((flat / "meta.json").read_text()))))
    code, err = _search_exit(flat, capsys)
    assert code == 2 and len(err) == 1 and f"'{flat / named}' is damaged or not a valid transferkit index file (" in err[0]
    assert message in err[0]
    # in the versioned layout, any edit is caught by the checksum CURRENT records
    work = tmp_path / "idx"
    shutil.copytree(base_index, work)
    meta = work / storage.read_pointer(work)["version"] / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "chunk_size": 41}, indent=2))
    code, err = _search_exit(work, capsys)
    assert code == 2 and len(err) == 1 and f"'{meta}' is damaged" in err[0] and "differs from the checksum" in err[0]


def test_missing_version_file_and_lexical_mismatch_are_refused(base_index, tmp_path):
    work = tmp_path / "idx"
    shutil.copytree(base_index, work)
    version = work / storage.read_pointer(work)["version"]
    (version / "records.jsonl").unlink()
    with pytest.raises(TransferkitError, match="records.jsonl' is damaged .*a file of the index is missing"):
        VectorIndex.load(work)
    flat = tmp_path / "flat"
    index = VectorIndex.load(base_index)
    write_flat(index, flat)
    LexicalIndex.build({0: {"text": "other"}}).save(flat)  # a lexical side of other chunks
    with pytest.raises(TransferkitError, match="BM25 index does not match the records"):
        VectorIndex.load(flat)
    np.testing.assert_array_equal(index.lexical.ids, sorted(index.records))


def test_a_reader_overtaken_by_a_commit_reads_the_new_version(base_index, tmp_path):
    work = tmp_path / "idx"
    shutil.copytree(base_index, work)
    from transferkit.memory.index import _read_version

    calls = []

    def reader(version: Path, sha256: dict[str, str]) -> VectorIndex:
        calls.append(version.name)
        if len(calls) == 1:  # a writer commits (and deletes this version) after we read CURRENT
            add_to_index(work, write_docs(tmp_path / "more", {"d.md": "the dog"}), progress=False)
            assert not version.exists()
        return _read_version(version, sha256)

    index = storage.read_consistent(work, reader)
    assert calls[0] != calls[1] and "d.md" in index.sources()


# --- sharded embedding (issue 17) ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_build_the_same_index_as_one(base_index, tiny_encoder, tmp_path):
    docs = write_docs(tmp_path / "docs", {f"d{i}.md": "the cat sat on the mat today " * (i + 1) for i in range(6)})
    options = ["--encoder", tiny_encoder, "--chunk-size", "40", "--chunk-overlap", "10"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "transferkit", "index", "build", "--docs", str(docs), "--out", str(tmp_path / "two"),
                          *options], env={**_env(), "TRANSFERKIT_PROGRESS": "0"}, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    single = build_index(tmp_path / "one", docs=docs, encoder=tiny_encoder, progress=False, chunk_size=40,
                         chunk_overlap=10)
    n = len(single)
    assert f"process 0 of 2 embedded items 0-{n // 2} of {n}" in two.stderr  # each process embedded its half
    assert f"process 1 of 2 embedded items {n // 2}-{n} of {n}" in two.stderr
    sharded_index = VectorIndex.load(tmp_path / "two")
    assert sharded_index.records == single.records  # same chunks, same ids, same order
    vectors = [np.stack([index.faiss_index.reconstruct(i) for i in sorted(index.records)])
               for index in (sharded_index, single)]
    assert np.abs(vectors[0] - vectors[1]).max() <= 1e-5
    assert set(sharded_index.lexical.ids.tolist()) == set(single.records)
    assert entries(tmp_path / "two") == {"CURRENT", ".lock", "v000001"}  # written once, by one process


# --- the writer lock across a rebuild (review, item 2) -----------------------------------------------------------
def test_a_writer_waiting_while_the_folder_is_rebuilt_locks_the_new_folder(tmp_path):
    """A writer that opened FOLDER/.lock, then waited while a rebuild renamed FOLDER away and published a new one,
    must end up holding the new folder's lock (not the old, renamed file): else two writers run at once."""
    import fcntl
    import threading
    import time

    folder = tmp_path / "idx"
    folder.mkdir()
    holder = open(folder / storage.LOCK, "a+")  # noqa: SIM115 - the rebuild's lock (own open file: conflicts in this process)
    fcntl.flock(holder, fcntl.LOCK_EX)
    got: dict[str, object] = {}

    def waiter() -> None:
        with storage.WriterLock(folder, timeout=10) as lock:
            got["ino"] = os.fstat(lock._fh.fileno()).st_ino
            with open(folder / storage.LOCK, "a+") as new:  # a later writer of the new folder
                try:
                    fcntl.flock(new, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    got["later_writer_got_in"] = True
                    fcntl.flock(new, fcntl.LOCK_UN)
                except BlockingIOError:
                    got["later_writer_got_in"] = False

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.5)  # the waiter opened the old .lock and polls it
    os.rename(folder, tmp_path / "idx.old")  # the rebuild publishes a new folder in its place
    folder.mkdir()
    (folder / storage.LOCK).write_text("")
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert got["ino"] == os.stat(folder / storage.LOCK).st_ino
    assert got["later_writer_got_in"] is False


def test_overwrite_replaces_an_index_grown_by_index_add_but_never_a_users_file(base_index, tiny_encoder, tmp_path):
    """The index's versions written after publishing (``index add``) are its own: ``index build --overwrite``
    replaces them; a user's file in the folder is refused, naming it, and nothing is deleted."""
    work = tmp_path / "idx"
    shutil.copytree(base_index, work)
    add_to_index(work, write_docs(tmp_path / "more", {"c.md": NEW_DOCS["c.md"]}), progress=False)
    (work / "notes.txt").write_text("mine")
    docs = write_docs(tmp_path / "docs", OLD_DOCS)
    with pytest.raises(TransferkitError, match=r"notes\.txt.*nothing was deleted"):
        build_index(work, docs=docs, encoder=tiny_encoder, progress=False, overwrite=True)
    assert (work / "notes.txt").read_text() == "mine" and "c.md" in VectorIndex.load(work).sources()
    (work / "notes.txt").unlink()
    build_index(work, docs=docs, encoder=tiny_encoder, progress=False, overwrite=True)
    assert set(VectorIndex.load(work).sources()) == set(OLD_DOCS)


def test_index_out_inside_docs_is_refused_and_an_index_inside_docs_is_never_read(base_index, tiny_encoder,
                                                                                  tmp_path, capsys):
    """``index build --docs notes --out notes/idx`` is refused in one line before anything is written; an index
    made elsewhere inside a docs folder is skipped by ``index build`` and ``index add`` (its records.jsonl is no
    document)."""
    docs = write_docs(tmp_path / "notes", OLD_DOCS)
    assert main(["index", "build", "--docs", str(docs), "--out", str(docs / "idx")]) == 2
    err = capsys.readouterr().err
    assert "inside the data folder" in err and len(error_lines(err)) == 1 and "Traceback" not in err
    assert sorted(p.name for p in docs.iterdir()) == sorted(OLD_DOCS)
    with pytest.raises(TransferkitError, match="inside the data folder"):
        build_index(docs / "sub" / "idx", docs=docs, encoder=tiny_encoder, progress=False)
    shutil.copytree(base_index, docs / "idx")  # an index made elsewhere, moved into the docs folder
    index = build_index(tmp_path / "mn2", docs=docs, encoder=tiny_encoder, progress=False)
    assert set(index.sources()) == set(OLD_DOCS)
    add_to_index(tmp_path / "mn2", docs, progress=False)
    assert set(VectorIndex.load(tmp_path / "mn2").sources()) == set(OLD_DOCS)
