"""The run-folder lifecycle: the --overwrite rule, the marker, staging, abandon, and a fault-injected publish."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.cli.main import main
from transferkit.errors import TransferkitError
from transferkit.rundir import (
    MARKER,
    OutputFolder,
    atomic_path,
    is_output,
    json_default,
    jsonable,
    output_kind,
    staging_dir,
    write_json,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("isolated_cache")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-images")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


FIT = ["--backbone", "small_cnn", "--epochs", "1", "--batch-size", "4"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes (the marker's creation time aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def publish_output(out: Path, kind: str, content: str, overwrite: bool = False) -> None:
    folder = OutputFolder(out, kind, overwrite=overwrite, options={"content": content})
    folder.begin()
    (folder.stage / "model").mkdir()
    (folder.stage / "model" / "weights.bin").write_text(content)
    write_json(folder.stage / "metrics.json", {"content": content})
    folder.publish()


# --- the --overwrite rule ---------------------------------------------------------------------------------------


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "features.npy"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".npy" and tmp != target  # same format, beside it
        np.save(tmp, np.arange(3))
        assert not target.exists()  # nothing visible before the block ends
    assert np.load(target).tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        np.save(tmp, np.arange(5))
        raise RuntimeError("interrupted")
    assert np.load(target).tolist() == [0, 1, 2]  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npy"]  # no temporary file left


def test_overwrite_of_a_folder_that_is_not_a_run_keeps_its_files(tiny_images, tmp_path, monkeypatch, capsys):
    """Regression (issue 13, data loss): `fit --out imp --overwrite` used to delete imp/t.txt."""
    monkeypatch.chdir(tmp_path)
    Path("imp").mkdir()
    Path("imp/t.txt").write_text("x\n")
    code = main(["fit", "--data", str(tiny_images), *FIT, "--out", "imp", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a transferkit output" in err
    assert Path("imp/t.txt").read_text() == "x\n" and sorted(os.listdir("imp")) == ["t.txt"]
    assert not Path(".imp.partial").exists()


@pytest.mark.parametrize("target", ["file", ".", "..", "cwd-absolute"])
def test_out_that_is_a_file_or_the_working_folder_exits_2(target, tiny_images, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    out = {"file": "keep.txt", ".": ".", "..": "..", "cwd-absolute": str(work)}[target]
    code = main(["fit", "--data", str(tiny_images), *FIT, "--out", out, "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (work / "keep.txt").read_text() == "mine" and sorted(os.listdir(work)) == ["keep.txt"]


def test_overwrite_replaces_only_an_output_of_the_same_kind(tmp_path):
    out = tmp_path / "out"
    publish_output(out, "seq2seq", "old")
    before = snapshot(out)
    for overwrite in (False, True):
        with pytest.raises(TransferkitError, match="holds a transferkit seq2seq output, not a run"):
            OutputFolder(out, "run", overwrite=overwrite).begin()
    with pytest.raises(TransferkitError, match="already holds a finished seq2seq.*--overwrite"):
        OutputFolder(out, "seq2seq").begin()
    assert snapshot(out) == before and not staging_dir(out).exists()
    publish_output(out, "seq2seq", "new", overwrite=True)
    assert (out / "model" / "weights.bin").read_text() == "new" and output_kind(out) == "seq2seq"
    assert not list(tmp_path.glob(".out.*"))  # neither the stage nor the old output is left behind


def test_overwrite_refuses_a_finished_output_holding_a_file_transferkit_did_not_write(tmp_path, capsys):
    """A user's notes.txt in a finished run folder: --overwrite refuses (exit 2, one line naming the file) and
    deletes nothing; files transferkit adds to a published run later (report.html, the attack figure) are its own."""
    from transferkit.rundir import record_file

    out = tmp_path / "out"
    publish_output(out, "run", "old")
    assert json.loads((out / MARKER).read_text())["files"] == ["metrics.json", "model/weights.bin", "run_config.json"]
    (out / "report.html").write_text("<html/>")  # ours, recorded in the marker: replaced by --overwrite
    record_file(out, out / "report.html")
    (out / "notes").mkdir()
    (out / "notes" / "mine.txt").write_text("my notes")
    before = snapshot(out)
    with pytest.raises(TransferkitError, match=r"notes/mine\.txt.*nothing was deleted"):
        OutputFolder(out, "run", overwrite=True).begin()
    assert snapshot(out) == before and not staging_dir(out).exists()
    (out / "notes" / "mine.txt").unlink()
    (out / "notes").rmdir()
    publish_output(out, "run", "new", overwrite=True)
    assert (out / "model" / "weights.bin").read_text() == "new" and not (out / "report.html").exists()


def test_marker_says_what_the_folder_is(tmp_path):
    out = tmp_path / "r"
    publish_output(out, "run", "x")
    marker = json.loads((out / MARKER).read_text())
    from transferkit import __version__

    assert marker["kind"] == "run" and marker["format_version"] == 1 and marker["transferkit_version"] == __version__
    assert "created" in marker and "state" not in marker
    assert is_output(out, "run") and not is_output(out, "index") and not is_output(tmp_path)


def test_runs_written_before_the_marker_count_as_runs(tmp_path):
    legacy = tmp_path / "legacy"
    (legacy / "model").mkdir(parents=True)
    (legacy / "model" / "config.json").write_text(json.dumps({"format": "transferkit-model"}))
    (legacy / "metrics.json").write_text("{}")
    seq = tmp_path / "legacy-seq"
    shutil.copytree(legacy, seq)
    (seq / "model" / "config.json").write_text(json.dumps({"format": "transferkit-seq2seq"}))
    assert output_kind(legacy) == "run" and output_kind(seq) == "seq2seq"
    with pytest.raises(TransferkitError, match="already holds a finished run"):
        OutputFolder(legacy, "run").check()
    publish_output(legacy, "run", "new", overwrite=True)
    assert (legacy / "model" / "weights.bin").read_text() == "new" and is_output(legacy, "run")


def test_empty_folder_is_accepted_and_a_stage_in_the_way_is_not_deleted(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    publish_output(empty, "run", "x")
    assert is_output(empty, "run")
    foreign = tmp_path / ".other.partial"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(TransferkitError, match="not written by transferkit"):
        OutputFolder(tmp_path / "other", "run", overwrite=True).begin()
    assert (foreign / "notes.txt").read_text() == "mine"


OPTIONS = {"a": 1, "train": {"lr": 0.1, "threads": 1}}


def test_abandon_removes_a_stage_without_checkpoint_and_keeps_a_resumable_one(tmp_path):
    out = tmp_path / "out"
    folder = OutputFolder(out, "run", options=OPTIONS)
    folder.begin()
    (folder.stage / "half-written.json").write_text("{")
    folder.abandon()
    assert not folder.stage.exists()
    assert OutputFolder(out, "run", options=OPTIONS).begin() is False  # no trap for the next valid run

    resumable = OutputFolder(out, "run", resume=True, options=OPTIONS)
    assert resumable.begin() is True
    (resumable.stage / "checkpoint").mkdir()
    (resumable.stage / "checkpoint" / "trainer.safetensors").write_bytes(b"x")
    with pytest.raises(RuntimeError), resumable:
        raise RuntimeError("killed")
    assert (resumable.stage / "checkpoint" / "trainer.safetensors").is_file()
    with pytest.raises(TransferkitError, match="--resume"):
        OutputFolder(out, "run", options=OPTIONS).begin()
    with pytest.raises(TransferkitError, match="other options"):
        OutputFolder(out, "run", resume=True, options={**OPTIONS, "a": 2}).begin()
    # keys that do not change the result (device, threads, progress, ...) may differ on --resume
    assert OutputFolder(out, "run", resume=True, options={"a": 1, "train": {"lr": 0.1, "threads": 4}}).begin() is True


def test_rejected_charlm_input_leaves_no_stage_that_blocks_the_next_run(tmp_path, capsys):
    """Issue 13: rejected input to `charlm train` used to leave a staging folder that blocked the next run."""
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = tmp_path / "lm"
    args = ["charlm", "train", "--out", str(out), "--epochs", "1", "--hidden-size", "8", "--embedding-dim", "4",
            "--num-layers", "1", "--no-progress"]
    assert main([*args, str(short)]) == 2
    assert "characters" in capsys.readouterr().err and not staging_dir(out).exists() and not out.exists()
    good = tmp_path / "good.txt"
    good.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert main([*args, "--bptt", "16", "--batch-size", "4", str(good)]) == 0
    assert is_output(out, "charlm") and not staging_dir(out).exists()


def test_json_default_handles_numpy_and_paths(tmp_path):
    value = {"i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True), "a": np.arange(2), "p": tmp_path}
    assert json.loads(json.dumps(value, default=json_default)) == {"i": 3, "f": 0.5, "b": True, "a": [0, 1],
                                                                    "p": str(tmp_path)}


def refuse_non_finite(constant: str) -> None:
    """``json.loads(..., parse_constant=...)``: a strict parser (JavaScript's JSON.parse) refuses NaN / Infinity."""
    raise ValueError(f"not strict JSON: {constant}")


def test_json_files_hold_null_for_nan_and_infinity(tmp_path, capsys):
    """Every JSON file transferkit writes (write_json, write_jsonl) and every --json document is strict JSON: a
    NaN or infinite number, NumPy's included, becomes null."""
    from transferkit.cli.options import print_json

    document = {"nan": float("nan"), "inf": [float("inf"), -np.inf], "numpy": np.float32("nan"),
                "array": np.array([0.5, np.nan]), "nested": {"pair": (1.5, np.float64("-inf"))}, "ok": 0.25}
    expected = {"nan": None, "inf": [None, None], "numpy": None, "array": [0.5, None], "nested": {"pair": [1.5, None]},
                "ok": 0.25}
    write_json(tmp_path / "metrics.json", document)
    assert json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse_non_finite) == expected
    write_jsonl(tmp_path / "history.jsonl", [document, {"train_loss": float("nan"), "epoch": 1}])
    rows = [json.loads(line, parse_constant=refuse_non_finite)
            for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert rows == [expected, {"train_loss": None, "epoch": 1}]
    assert jsonable(document) == expected  # as the file reads back
    print_json(document)
    assert json.loads(capsys.readouterr().out, parse_constant=refuse_non_finite) == expected


# --- fault injection: every file operation of publish fails in turn ---------------------------------------------


class Crash(Exception):
    pass


class FaultInjector:
    """Counts the file operations of publish (os.replace, shutil.rmtree, opening a file for writing, fsync) and
    fails operation number ``fail_at``; ``kill``: every later operation fails too (the process is gone)."""

    def __init__(self, monkeypatch, fail_at: int, kill: bool) -> None:
        import transferkit.rundir as rundir

        self.count, self.fail_at, self.kill, self.failed = 0, fail_at, kill, False
        for module, name in ((rundir.os, "replace"), (rundir.os, "fsync"), (rundir.shutil, "rmtree")):
            monkeypatch.setattr(module, name, self.wrap(getattr(module, name)))
        monkeypatch.setattr(rundir, "open", self.wrap(open), raising=False)

    def wrap(self, operation):
        def faulty(*args, **kwargs):
            if self.failed and self.kill or self.count == self.fail_at:
                self.failed = True
                raise Crash(f"injected failure of {operation.__name__} #{self.count}")
            self.count += 1
            return operation(*args, **kwargs)

        return faulty


@pytest.mark.parametrize("kill", [False, True], ids=["error", "kill"])
def test_publish_leaves_the_old_or_the_new_output_whatever_operation_fails(kill, tmp_path, monkeypatch):
    failures = 0
    for fail_at in range(40):
        base = tmp_path / str(fail_at)
        base.mkdir()
        out = base / "out"
        publish_output(out, "run", "old")
        old = snapshot(out)
        folder = OutputFolder(out, "run", overwrite=True, options={"content": "new"})
        folder.begin()
        (folder.stage / "model").mkdir()
        (folder.stage / "model" / "weights.bin").write_text("new")
        (folder.stage / "checkpoint").mkdir()
        (folder.stage / "checkpoint" / "state.json").write_text("{}")
        write_json(folder.stage / "metrics.json", {"content": "new"})
        new = {k: v for k, v in snapshot(folder.stage).items() if not k.startswith("checkpoint")}
        with monkeypatch.context() as patch:
            injector = FaultInjector(patch, fail_at, kill)
            with contextlib.suppress(Crash):
                folder.publish()
        if not injector.failed:
            assert snapshot(out) == new and is_output(out, "run")
            break
        failures += 1
        OutputFolder(out, "run", overwrite=True).check()  # the next run: repairs an interrupted publish, if any
        assert snapshot(out) in (old, new), f"operation {fail_at} failed: neither the old nor the new output"
        assert is_output(out, "run")
        # and the next valid run is not blocked: it replaces whatever is there
        publish_output(out, "run", "next", overwrite=True)
        assert (out / "model" / "weights.bin").read_text() == "next"
        assert not [p for p in base.iterdir() if p.name != "out"], "stage or old output left behind"
    else:
        pytest.fail("publish never succeeded")
    assert failures >= 5  # every operation of publish was made to fail once (rmtree, writes, fsync, 2 renames)


# --- review findings: the writer's lock, a failed publish, foreign folders, the baseline, Ctrl-C --------------------


def begin_with_checkpoint(out: Path, **kwargs) -> OutputFolder:
    folder = OutputFolder(out, "run", options=OPTIONS, **kwargs)
    folder.begin()
    (folder.stage / "checkpoint").mkdir(exist_ok=True)
    (folder.stage / "checkpoint" / "trainer.safetensors").write_bytes(b"x")
    return folder


def test_a_second_writer_of_the_same_out_is_refused_and_deletes_nothing(tmp_path):
    """Review item 1: `fit --out x --overwrite` (or `--resume`) while `fit --out x` trains deleted (shared) its stage."""
    import subprocess
    import sys

    out = tmp_path / "out"
    live = begin_with_checkpoint(out)
    before = snapshot(live.stage)
    for options in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(TransferkitError, match=rf"another transferkit process is writing .*\(pid {os.getpid()}\)"):
            OutputFolder(out, "run", options=OPTIONS, **options).begin()
    other = ("import sys; from transferkit.rundir import OutputFolder; from transferkit.errors import TransferkitError\n"
             "try:\n    OutputFolder(sys.argv[1], 'run', overwrite=True).begin()\n"
             "except TransferkitError as exc:\n    print(exc); sys.exit(2)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", other, str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "another transferkit process is writing" in done.stdout
    assert len(done.stdout.strip().splitlines()) == 1
    assert snapshot(live.stage) == before  # the live run's stage and checkpoint are untouched
    (live.stage / "metrics.json").write_text("{}")
    live.publish()
    assert is_output(out, "run") and not (out / "checkpoint").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no stale lock file
    publish_output(out, "run", "next", overwrite=True)  # the lock is free again
    # a process that died while writing holds no lock: its stage is resumable
    subprocess.run([sys.executable, "-c", "import sys; from transferkit.rundir import OutputFolder; "
                    "OutputFolder(sys.argv[1], 'run', overwrite=True).begin(); import os; os._exit(1)", str(out)],
                   env=env, timeout=60, check=False)
    assert OutputFolder(out, "run", overwrite=True, resume=True).begin() is True


def test_a_failed_publish_keeps_the_stage_and_its_checkpoint(tmp_path, monkeypatch):
    """Review item 2: the error said the new output stays in the stage, but abandon() then deleted it."""
    out = tmp_path / "out"
    with pytest.raises(TransferkitError, match="stays in"), begin_with_checkpoint(out) as folder:
        write_json(folder.stage / "metrics.json", {"done": True})
        out.mkdir()
        (out / "NOTES.md").write_text("mine")  # something appeared at --out during the run
        folder.publish()
    assert (out / "NOTES.md").read_text() == "mine" and sorted(os.listdir(out)) == ["NOTES.md"]
    assert (folder.stage / "metrics.json").is_file() and (folder.stage / "checkpoint" / "trainer.safetensors").is_file()
    shutil.rmtree(out)

    import transferkit.rundir as rundir

    real_replace = rundir.os.replace

    def failing_replace(src, dst):
        if Path(src) == folder.stage:
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)

    with pytest.raises(OSError), begin_with_checkpoint(out, resume=True) as folder:
        monkeypatch.setattr(rundir.os, "replace", failing_replace)
        folder.publish()
    monkeypatch.undo()
    assert (folder.stage / "metrics.json").is_file() and (folder.stage / "checkpoint" / "trainer.safetensors").is_file()
    assert OutputFolder(out, "run", resume=True, options=OPTIONS).begin() is True


def test_overwrite_refuses_a_folder_with_metrics_and_a_model_that_is_not_ours(tmp_path):
    """Review item 3: any metrics.json + model/ (a Keras or DVC project) counted as a run and was deleted."""
    project = tmp_path / "project"
    (project / "model").mkdir(parents=True)
    (project / "model" / "weights.h5").write_bytes(b"keras")
    (project / "metrics.json").write_text("{}")
    (project / "NOTES.md").write_text("mine")
    before = snapshot(project)
    assert output_kind(project) is None and not is_output(project)
    with pytest.raises(TransferkitError, match="not a transferkit output"):
        OutputFolder(project, "run", overwrite=True).begin()
    (project / "model" / "config.json").write_text(json.dumps({"format": "keras"}))
    with pytest.raises(TransferkitError, match="not a transferkit output"):
        OutputFolder(project, "run", overwrite=True).begin()
    (project / "model" / "config.json").unlink()
    assert snapshot(project) == before and not staging_dir(project).exists()


@pytest.mark.parametrize("progress", ["checkpoint", "model"])
def test_an_interrupted_adaptation_run_keeps_its_source_only_baseline(progress, tmp_path):
    """Review item 4: Ctrl-C before the main training's first checkpoint removed the finished baseline."""
    from transferkit.rundir import kept_for_resume

    out = tmp_path / "out"
    folder = OutputFolder(out, "run", options=OPTIONS)
    folder.begin()
    baseline = folder.stage / "source_only" / progress
    baseline.mkdir(parents=True)
    (baseline / ("trainer.safetensors" if progress == "checkpoint" else "config.json")).write_text("{}")
    with pytest.raises(KeyboardInterrupt) as caught, folder:
        raise KeyboardInterrupt
    assert baseline.is_dir() and kept_for_resume(caught.value)
    assert OutputFolder(out, "run", resume=True, options=OPTIONS).begin() is True


def test_ctrl_c_suggests_resume_only_when_a_checkpoint_is_kept(tmp_path, capsys):
    """Review item 5: every Ctrl-C said "a checkpoint is kept; ... --resume", also with nothing to resume."""
    import argparse

    from transferkit.cli.main import run_command

    def stop_before_a_checkpoint(_args):
        with OutputFolder(tmp_path / "a", "run") as folder:
            folder.begin()
            raise KeyboardInterrupt

    def stop_after_a_checkpoint(_args):
        with begin_with_checkpoint(tmp_path / "b"):
            raise KeyboardInterrupt

    def stop_a_command_without_output(_args):
        raise KeyboardInterrupt

    for func, resumable, discarded in ((stop_before_a_checkpoint, False, True), (stop_after_a_checkpoint, True, False),
                                       (stop_a_command_without_output, False, False)):
        assert run_command(argparse.Namespace(func=func, json=False, verbose=0)) == 130
        err = capsys.readouterr().err
        assert err.startswith("interrupted") and len(err.strip().splitlines()) == 1
        assert ("--resume" in err) is resumable, (func.__name__, err)
        # stopped before the first checkpoint (an epoch, or a cross-validation fold): it says nothing was kept
        assert ("nothing was kept" in err and "first checkpoint" in err) is discarded, (func.__name__, err)
    assert not staging_dir(tmp_path / "a").exists() and staging_dir(tmp_path / "b").is_dir()


def test_resume_with_nothing_to_resume_says_it_starts_a_new_run(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="transferkit"):
        assert OutputFolder(tmp_path / "new", "run", resume=True, options=OPTIONS).begin() is False
    assert "nothing to resume" in caplog.text and "starting a new run" in caplog.text


def test_resume_with_other_options_names_the_options_that_differ(tmp_path):
    folder = begin_with_checkpoint(tmp_path / "r")
    folder.abandon(KeyboardInterrupt())
    changed = {"a": 2, "train": {"lr": 0.01, "threads": 4}}  # threads may change on --resume, lr and a may not
    with pytest.raises(TransferkitError, match=r"used other options \(a: 1 -> 2, train\.lr: 0\.1 -> 0\.01\)"):
        OutputFolder(tmp_path / "r", "run", resume=True, options=changed).begin()
    assert OutputFolder(tmp_path / "r", "run", resume=True, options={**OPTIONS, "train": {"lr": 0.1, "threads": 2}}
                        ).begin() is True


def test_recording_a_file_in_the_marker_waits_for_no_writer_and_clobbers_nothing(tmp_path):
    """record_file rewrites the marker (shared state) under the folder's writer lock: while another process
    writes the folder (a fit --overwrite of it), it refuses in one line and the marker stays as it was."""
    from transferkit.rundir import acquire_writer_lock, record_file, release_writer_lock

    out = tmp_path / "out"
    publish_output(out, "run", "x")
    (out / "report.html").write_text("<html/>")
    before = (out / MARKER).read_text()
    held = acquire_writer_lock(out)
    try:
        with pytest.raises(TransferkitError, match="another transferkit process is writing"):
            record_file(out, out / "report.html")
    finally:
        release_writer_lock(out, held)
    assert (out / MARKER).read_text() == before
    record_file(out, out / "report.html")
    assert "report.html" in json.loads((out / MARKER).read_text())["files"]


def test_an_output_inside_the_data_folder_is_refused_and_the_default_name_is_the_folders(tmp_path, monkeypatch,
                                                                                          capsys):
    """`cd photos && transferkit fit --data .` wrote runs/.-linear-probe (hidden) inside the data, and the next
    fit read 'runs' as an empty class and advised removing it: an --out inside a data folder is refused in one line
    (fit, auto, compare), and the default name comes from the folder's real name."""
    from tests.conftest import stripes
    from transferkit.cli.main import main
    from transferkit.config import FitConfig
    from transferkit.fitting import default_out

    photos = tmp_path / "photos"
    for cls, direction in (("h", "h"), ("v", "v")):
        (photos / cls).mkdir(parents=True)
        for i in range(4):
            stripes(direction, i).save(photos / cls / f"{i}.png")
    monkeypatch.chdir(photos)
    assert default_out(FitConfig(data=".", strategy="linear-probe")) == Path("runs/photos-linear-probe")
    assert default_out(FitConfig(data="./", strategy="finetune")) == Path("runs/photos-finetune")
    before = snapshot(photos)
    for argv in (["fit", "--data", "."], ["fit", "--data", str(photos), "--out", "h/run"],
                 ["auto", "--data", ".", "--out", "runs/auto", "--time-budget", "60"],
                 ["compare", "--data", ".", "--strategies", "linear-probe", "--out", "cmp"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "is inside the data folder" in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert snapshot(photos) == before and sorted(p.name for p in photos.iterdir()) == ["h", "v"]


def test_written_files_get_the_umask_default_mode_weights_included(tmp_path):
    """safetensors writes its files owner-only (0600): a run shared with a team or served by another user could
    not load its weights. Every atomic write and every weights file gets the mode a plain open() would give."""
    import torch

    from transferkit.rundir import write_json, write_safetensors

    old = os.umask(0o022)
    try:
        write_safetensors(tmp_path / "w.safetensors", {"x": torch.zeros(2)})
        write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"w.safetensors": 0o644,
                                                                             "m.json": 0o644}
