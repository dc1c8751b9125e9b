"""The one run-folder lifecycle: check ``--out``, stage the output beside it, publish it atomically.

Every command that writes an output folder (``fit``, ``seq2seq train``, ``charlm train``, ``export``, indexes,
...) goes through :class:`OutputFolder`::

    folder = OutputFolder(out, "run", overwrite=..., resume=..., options=all_options)
    folder.check()              # optional, early: refuse a bad --out before any work is done
    resuming = folder.begin()   # checks again, creates (or keeps, --resume) the staging folder .NAME.partial
    try:
        ... write into folder.stage ...
        folder.publish()        # marker file + atomic move into place
    except BaseException as exc:
        folder.abandon(exc)     # removes the stage unless it holds a checkpoint (then --resume continues it)
        raise

Rules:

* A finished output holds a marker file ``transferkit-output.json`` (kind, format version, transferkit version,
  creation time). Runs written before the marker existed (``metrics.json`` + ``model/``) count as finished
  outputs of kind ``run`` (``seq2seq`` / ``charlm`` by their model's format), old indexes as ``index`` and old
  LoRA exports as ``export``.
* ``--overwrite`` replaces only a finished output of the same kind, or an empty folder. A non-empty folder that
  is not ours, an output of another kind, an output holding a file we did not write (the marker lists ours), an
  existing file, ``.`` or a parent of the working directory is refused (TransferkitError: one line, exit 2);
  nothing is deleted.
* The output is built in ``.NAME.partial`` next to ``out``. Publishing moves the old output aside, the new one
  into place and only then deletes the old one; if the second move fails the old one is moved back, and a
  crash between the two moves is repaired by the next ``check()`` of that folder.
* One writer per ``out``: ``begin()`` takes an exclusive lock on ``.NAME.partial.lock`` (beside the stage) and
  ``publish()`` / ``abandon()`` release it; a second process (``--overwrite``, ``--resume``) is refused and
  deletes nothing. A failed publish keeps the stage whole. ``compare --out``, which writes its folder in place,
  holds the same lock through :func:`writer_lock`.
* Under ``torchrun`` / ``accelerate launch`` only the main process writes (and locks); the others wait for it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from transferkit.errors import TransferkitError, listed

logger = logging.getLogger(__name__)

MARKER = "transferkit-output.json"
MARKER_FORMAT = "transferkit-output"
MARKER_VERSION = 1
RUN_CONFIG = "run_config.json"
#: wall seconds the interrupted attempts of a stage worked (in its checkpoint folder: never part of an output)
ELAPSED_FILE = "elapsed.json"
CHECKPOINT_DIR = "checkpoint"
#: a domain-adaptation run's source-only baseline inside the stage (its own checkpoint / model count as progress)
BASELINE_DIR = "source_only"
#: the formats of the models that transferkit saves (``model/config.json``): ``fit``, ``seq2seq``, ``charlm``
MODEL_KINDS = {"transferkit-model": "run", "transferkit-seq2seq": "seq2seq", "transferkit-charlm": "charlm"}
KINDS = ("run", "seq2seq", "charlm", "index", "export", "auto", "cluster", "pretrain", "compare", "dataset")
#: the options section that describes the data a run was trained on (``{"fingerprint": ...}``, and ``"file"`` when
#: the data is one file: :func:`data_section`): known only once the data is read, so an early ``check()`` compares
#: the rest, and a data change has its own message
DATA_SECTION = "data"
#: option keys that may differ between an interrupted run and its ``--resume`` (they do not change the result)
RESUME_FREE_KEYS = frozenset({"resume", "overwrite", "progress", "no_progress", "device", "threads", "out"})


# --- JSON -------------------------------------------------------------------------------------------------------


def json_default(value: Any) -> Any:
    """``json.dumps(..., default=json_default)``: NumPy scalars and arrays, paths, sets; anything else as text
    (non-finite numbers as None, see :func:`finite`)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        np = None
    if np is not None:
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return finite(float(value))
        if isinstance(value, np.ndarray):
            return finite(value.tolist())
    if isinstance(value, (set, frozenset)):
        return finite(sorted(value, key=str))
    return str(value)  # Path and everything else


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts, lists and tuples) as None: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def json_text(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON, which every parser reads: NaN and infinity as null (:func:`finite`), NumPy values and
    paths by :func:`json_default`; ``allow_nan=False`` makes a non-finite number that slipped through fail loudly."""
    return json.dumps(finite(obj), indent=indent, default=json_default, allow_nan=False)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` with the same suffix (so writers that pick the format from the
    name, ``np.save`` / ``savefig`` / PIL, keep it); when the block ends normally the file is flushed to disk and
    ``os.replace``-d onto ``path`` (readers see the old file or the new one, never half of one); when it raises,
    the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_file_mode())  # some writers (safetensors) create owner-only files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _default_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file atomically, readable like any other file of the run (safetensors
    itself creates it owner-only)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON (:func:`json_text`: NaN as null) atomically (temporary file +
    ``os.replace``): readers see old or new."""
    _atomic_write_text(Path(path), json_text(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """One strict JSON document per line (e.g. ``history.jsonl``; :func:`json_text`), written atomically."""
    _atomic_write_text(Path(path), "".join(json_text(row) + "\n" for row in rows))


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (e.g. a run's model card ``README.md``)."""
    _atomic_write_text(Path(path), text)


def jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, paths strings, ...)."""
    return json.loads(json_text(obj))


# --- what a folder is -------------------------------------------------------------------------------------------


@contextmanager
def scratch_files(folder: Path, pattern: str) -> Iterator[None]:
    """Delete ``folder``'s files matching ``pattern`` when the block ends, however it ends (they are ours: written
    into our own stage folder, e.g. memory-mapped caches that must not be published)."""
    try:
        yield
    finally:
        for path in Path(folder).glob(pattern):
            path.unlink(missing_ok=True)


def staging_dir(out: str | Path) -> Path:
    """Where the output for ``out`` is built: ``.NAME.partial`` beside it."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.partial"


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The marker of a finished output folder, or None (no marker, or not one of ours)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or not isinstance(marker.get("kind"), str):
        return None
    return marker


def _legacy_kind(path: Path) -> str | None:
    """The kind of an output written before the marker existed (None: not recognisably ours)."""
    if (path / "metrics.json").is_file() and (path / "model").is_dir():
        try:
            model_format = json.loads((path / "model" / "config.json").read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            model_format = None
        return MODEL_KINDS.get(model_format)  # a model/ we did not save (Keras, DVC, ...) is not ours
    if all((path / name).is_file() for name in ("index.faiss", "records.jsonl", "meta.json")):
        return "index"
    if (path / "CURRENT").is_file() and any(path.glob("v0*/meta.json")):  # an old index upgraded by `index add`
        return "index"
    try:
        if "lora_export" in json.loads((path / "config.json").read_text()):  # `transferkit export`
            return "export"
    except (OSError, ValueError, TypeError):
        pass
    return None


def output_kind(path: str | Path) -> str | None:
    """The kind of finished transferkit output in ``path`` (its marker, or the layout of an older one)."""
    path = Path(path)
    if not path.is_dir():
        return None
    marker = read_marker(path)
    if marker is not None and marker.get("state") == "staging":  # a staging folder, not a finished output
        return None
    return marker["kind"] if marker else _legacy_kind(path)


def is_output(path: str | Path, kind: str | None = None) -> bool:
    """True if ``path`` is a finished transferkit output (of ``kind``, when given)."""
    found = output_kind(path)
    return found is not None and (kind is None or found == kind)


def output_files(folder: str | Path) -> list[str]:
    """Every file below ``folder`` as a sorted relative POSIX path (the marker and the training checkpoint
    aside): what a published marker lists as written by transferkit."""
    folder = Path(folder)
    found = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(p.as_posix() for p in found if p.as_posix() != MARKER and p.parts[0] != CHECKPOINT_DIR)


def foreign_files(folder: str | Path, owned: Callable[[str], bool] | None = None) -> list[str]:
    """Files in a finished output that transferkit did not write: neither listed in its marker (written at
    publish, extended by :func:`record_file`) nor ``owned`` (a kind whose folder changes after publishing, an
    index's versions). An output whose marker lists no files (older versions) has none."""
    marker = read_marker(folder)
    if marker is None or not isinstance(marker.get("files"), list):
        return []
    listed = set(marker["files"])
    return [f for f in output_files(folder) if f not in listed and not (owned is not None and owned(f))]


def record_file(folder: str | Path, path: str | Path) -> None:
    """Add ``path`` (a file transferkit just wrote into the finished output ``folder``, e.g. ``report.html``) to
    the marker's list, so that ``--overwrite`` replaces it like the rest; nothing happens outside an output. The
    marker is shared state: it is re-read and rewritten under the folder's writer lock (:func:`busy_error` while a
    fit or index writes the folder)."""
    folder = Path(folder)
    try:
        relative = Path(os.path.abspath(path)).relative_to(os.path.abspath(folder)).as_posix()
    except ValueError:
        return

    def missing(marker: dict[str, Any] | None) -> bool:
        return marker is not None and isinstance(marker.get("files"), list) and relative not in marker["files"]

    if not missing(read_marker(folder)):
        return
    with writer_lock(folder):
        marker = read_marker(folder)
        if missing(marker):
            assert marker is not None
            write_json(folder / MARKER, {**marker, "files": sorted([*marker["files"], relative])})


def read_options(folder: str | Path) -> Any:
    """The options a run folder (or its stage) recorded in ``run_config.json``; None when missing or unreadable."""
    try:
        return json.loads((Path(folder) / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return None


def _has_checkpoint(stage: Path) -> bool:
    """True if the stage holds work that ``--resume`` continues: a checkpoint, or a domain-adaptation run's
    source-only baseline (its checkpoint or its finished model)."""
    def holds_files(folder: Path) -> bool:
        return folder.is_dir() and any(f.is_file() for f in folder.rglob("*"))

    baseline = stage / BASELINE_DIR
    return (holds_files(stage / CHECKPOINT_DIR) or holds_files(baseline / CHECKPOINT_DIR)
            or (baseline / "model" / "config.json").is_file())


def _is_our_stage(stage: Path) -> bool:
    """A staging folder we wrote: it holds our marker (``begin``) or a ``run_config.json`` (older versions)."""
    return stage.is_dir() and (read_marker(stage) is not None or (stage / RUN_CONFIG).is_file())


def _resume_relevant(options: Any) -> Any:
    """``options`` without the keys that may change on ``--resume`` (RESUME_FREE_KEYS, one level down)."""
    if not isinstance(options, dict):
        return options
    return {k: ({kk: vv for kk, vv in v.items() if kk not in RESUME_FREE_KEYS} if isinstance(v, dict) else v)
            for k, v in options.items() if k not in RESUME_FREE_KEYS}


def comparable_options(options: Any) -> str:
    """``options`` without the keys that may change on ``--resume``, as canonical JSON."""
    return json.dumps(_resume_relevant(options), sort_keys=True, default=json_default)


def differing_options(previous: Any, current: Any) -> list[str]:
    """The options (``section.name`` one level down) whose values differ between two option dicts, the
    resume-free keys aside, each as ``"name: old -> new"`` (values as JSON, shortened)."""
    def flat(options: Any) -> dict[str, str]:
        relevant = _resume_relevant(options)
        if not isinstance(relevant, dict):
            return {}
        pairs = [(f"{k}.{kk}", vv) for k, v in relevant.items() if isinstance(v, dict) for kk, vv in v.items()]
        pairs += [(k, v) for k, v in relevant.items() if not isinstance(v, dict)]
        return {name: json.dumps(value, sort_keys=True, default=json_default) for name, value in pairs}

    def shown(value: str | None) -> str:
        return "(none)" if value is None else value if len(value) <= 30 else value[:27] + "..."

    before, after = flat(previous), flat(current)
    return [f"{k}: {shown(before.get(k))} -> {shown(after.get(k))}"
            for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]


def data_section(file: str | Path, *texts: str, **described: Any) -> dict[str, Any]:
    """The :data:`DATA_SECTION` of a run trained on the one ``file`` whose content is ``texts`` (a character LM's
    text, seq2seq pairs): its path, the ``described`` settings and a fingerprint of the content (SHA-256, 24 hex
    digits, as ``DataSplits.fingerprint``), so that ``--resume`` refuses an edited file naming it."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return {"file": str(file), **described, "fingerprint": digest.hexdigest()[:24]}


def _data_change(current: Any, differing: list[str]) -> str:
    """What changed in the data section (``differing``: :func:`differing_options`), for the resume refusal."""
    named = [name for name in differing if name.startswith(DATA_SECTION + ".")
             and not name.startswith(f"{DATA_SECTION}.fingerprint:")]
    if named:
        return listed(named)
    section = current.get(DATA_SECTION) if isinstance(current, dict) else None
    file = section.get("file") if isinstance(section, dict) else None
    if file:
        return f"the content of '{file}' differs: its checkpoint trained on the old content"
    return "items added, removed or relabelled: its checkpoint trained on the old splits"


def _process_state():
    """Accelerate's process state under a multi-process launch (``WORLD_SIZE`` > 1), else None (one process).

    Commands that train create it first with their ``--device`` (``placement.accelerator_kwargs``); the state is
    shared, so this call then only returns it."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    from accelerate import PartialState

    from transferkit.engine.placement import accelerator_kwargs

    return PartialState(**accelerator_kwargs("auto"))


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not publishing while it checks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def lock_path(out: str | Path) -> Path:
    """The lock file of ``out``'s writer: ``.NAME.partial.lock`` beside the stage (deleting the stage keeps it)."""
    stage = staging_dir(out)
    return stage.with_name(stage.name + ".lock")


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _try_lock(path: Path):
    """Open and exclusively lock ``path`` without waiting: the open file, or None if another process holds it.

    The file may be deleted by its holder on release; a lock on a file no longer at ``path`` is retried."""
    while True:
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        except BaseException:
            fh.close()
            raise
        try:
            same = os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fh
        fh.close()  # released and deleted by its holder meanwhile: lock the new file


def refuse_out_inside_data(out: str | Path, data: str | Path | None) -> None:
    """Refuse an ``out`` inside the folder ``data`` (when it is one): the next run would read the output as data
    (a class folder named ``runs`` holding no images)."""
    if data is None or not Path(data).is_dir():
        return
    folder = Path(data).resolve()
    target = Path(os.path.abspath(out)).resolve()
    if target == folder or folder in target.parents:
        raise TransferkitError(f"--out '{out}' is inside the data folder '{data}': the next run would read it as "
                               "data", "choose an --out outside the data folder, e.g. ../runs/NAME")


def busy_error(out: str | Path, path: Path) -> TransferkitError:
    return TransferkitError(f"another transferkit process is writing '{out}'{_lock_holder(path)}",
                            "wait for it to finish or choose another --out")


def acquire_writer_lock(out: str | Path) -> IO[str]:
    """Take ``out``'s writer lock (:func:`lock_path`) without waiting: the open, locked file holding this process's
    pid. Raises :func:`busy_error` if another process holds it. Release with :func:`release_writer_lock`."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = _try_lock(path)
    if fh is None:
        raise busy_error(out, path)
    fh.truncate(0)
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def release_writer_lock(out: str | Path, fh: IO[str]) -> None:
    """Delete the lock file while still holding it, then unlock (a writer that opened it meanwhile sees that it is
    gone and locks a new one: see ``_try_lock``)."""
    with contextlib.suppress(OSError):
        os.unlink(lock_path(out))
    fh.close()


@contextlib.contextmanager
def writer_lock(out: str | Path) -> Iterator[None]:
    """Hold ``out``'s writer lock for the block: for commands that write into ``out`` in place (``compare --out``)
    rather than through an :class:`OutputFolder`; the two exclude each other on the same folder."""
    fh = acquire_writer_lock(out)
    try:
        yield
    finally:
        release_writer_lock(out, fh)


def discarded_before_a_checkpoint(error: BaseException) -> bool:
    """True if an OutputFolder removed its stage because ``error`` (Ctrl-C) came before the first checkpoint."""
    return bool(getattr(error, "transferkit_discarded", False))


def kept_for_resume(error: BaseException) -> bool:
    """True if an OutputFolder kept its stage with a checkpoint when ``error`` ended the run (``--resume`` continues
    it)."""
    return bool(getattr(error, "transferkit_resumable", False))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- the lifecycle ----------------------------------------------------------------------------------------------


class OutputFolder:
    """One output folder's lifecycle: check --out, stage, publish atomically (marker + overwrite rule).

    Args:
        out: the folder to write.
        kind: what it will hold (one of :data:`KINDS`); ``--overwrite`` replaces only an output of this kind.
        overwrite: replace a finished output of the same kind / discard an interrupted one.
        resume: continue an interrupted run (its ``run_config.json`` must equal ``options``).
        options: the settings that reproduce the output; written to ``run_config.json`` in the stage.
        owned: for a kind whose folder changes after publishing (an index's versions): True for a relative
            file path that kind writes, so that ``--overwrite`` does not count it as a user's file.
        data: the input the output is made from (``--data``); an ``out`` inside that folder is refused
            (:func:`refuse_out_inside_data`).
    """

    def __init__(self, out: str | Path, kind: str, *, overwrite: bool = False, resume: bool = False,
                 options: dict | None = None, owned: Callable[[str], bool] | None = None,
                 data: str | Path | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown output kind {kind!r}; one of {', '.join(KINDS)}")
        self.out = Path(out)
        self.stage = staging_dir(self.out)
        self.kind = kind
        self.overwrite = overwrite
        self.resume = resume
        self.options = jsonable(options) if options is not None else None
        self.owned = owned
        self.data = data
        self._begun = False
        self._resuming = False
        self._begun_at = 0.0
        #: wall seconds the interrupted attempts that a ``--resume`` continues had worked (0 for a new output)
        self.seconds_before = 0.0
        self._lock = None  # the open, locked lock file while this (main) process writes the output
        self._state = _process_state()

    # --- processes ---------------------------------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        return self._state is None or self._state.is_main_process

    def _wait(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    # --- the writer's lock -------------------------------------------------------------------------------
    def _check_unlocked(self) -> None:
        """Refuse early if another process holds ``out``'s lock (nothing is locked here)."""
        path = lock_path(self.out)
        if self._lock is not None or not path.is_file():
            return
        fh = _try_lock(path)
        if fh is None:
            raise busy_error(self.out, path)
        fh.close()

    def _acquire(self) -> None:
        """Lock ``out`` for this process until :meth:`_release` (main process only; before anything is deleted).

        Under torchrun / accelerate a refusal here ends the main process, and the launcher then stops the others."""
        if self._lock is None:
            self._lock = acquire_writer_lock(self.out)

    def _release(self) -> None:
        fh, self._lock = self._lock, None
        if fh is not None:
            release_writer_lock(self.out, fh)

    def __del__(self) -> None:
        fh = getattr(self, "_lock", None)
        if fh is not None:  # dropped without publish/abandon: unlock, so this process can write ``out`` again
            fh.close()

    # --- checks ------------------------------------------------------------------------------------------
    def check(self) -> bool:
        """Refuse an ``out`` that may not be written (nothing is written or deleted here, except repairing an
        output left aside by an interrupted publish). Returns True if an interrupted run will be resumed."""
        out = Path(os.path.abspath(self.out))
        cwd = Path.cwd().resolve()
        if out.resolve() == cwd or out.resolve() in cwd.parents:
            raise TransferkitError(f"--out '{self.out}' is the working folder or one of its parents",
                                   "choose a new folder for the output, e.g. runs/NAME")
        if self.out.exists() and not self.out.is_dir():
            raise TransferkitError(f"--out '{self.out}' is an existing file", "choose a folder path that is new")
        refuse_out_inside_data(self.out, self.data)
        if self.is_main_process:
            self._check_unlocked()
            self._repair_interrupted_publish()
        if self.out.is_dir() and any(self.out.iterdir()):
            found = output_kind(self.out)
            if found is None:
                raise TransferkitError(f"'{self.out}' exists and is not a transferkit output (nothing was deleted)",
                                       "choose an empty or new --out folder")
            if found != self.kind:
                raise TransferkitError(f"'{self.out}' holds a transferkit {found} output, not a {self.kind}",
                                       "choose another --out folder")
            if not self.overwrite:
                raise TransferkitError(f"'{self.out}' already holds a finished {self.kind}",
                                       "pass --overwrite to replace it or choose another --out")
            foreign = foreign_files(self.out, self.owned)
            if foreign:
                raise TransferkitError(f"'{self.out}' holds file(s) transferkit did not write ({listed(foreign)}); nothing "
                                       "was deleted", "move them out of the folder, or choose another --out")
        return self._check_stage()

    def _check_stage(self) -> bool:
        stage = self.stage
        if not stage.exists() and not stage.is_symlink():
            if self.resume and self.is_main_process:
                logger.warning("nothing to resume for '%s' (no interrupted run in '%s'): starting a new run",
                               self.out, stage)
            return False
        if not _is_our_stage(stage) or stage.is_symlink():
            raise TransferkitError(f"'{stage}' is in the way of the staging folder and was not written by "
                                   "transferkit", "move or rename it")
        if self.resume:
            previous = read_options(stage)
            current = self.options
            if isinstance(previous, dict) and isinstance(current, dict) and not (
                    DATA_SECTION in previous and DATA_SECTION in current):  # data not read yet (or an older run)
                previous, current = ({k: v for k, v in o.items() if k != DATA_SECTION} for o in (previous, current))
            if current is None or comparable_options(previous) == comparable_options(current):
                return True
            differing = differing_options(previous, current)
            if any(name.startswith(DATA_SECTION + ".") for name in differing):
                raise TransferkitError(f"the data changed since the run in '{stage}' was interrupted "
                                       f"({_data_change(current, differing)})",
                                       "resume with the data as it was, or pass --overwrite to start again")
            named = f" ({listed(differing)})" if differing else ""
            raise TransferkitError(f"the interrupted run in '{stage}' used other options{named}",
                                   "resume with the same options, or pass --overwrite to start again")
        if self.overwrite:
            return False
        raise TransferkitError(f"an interrupted run for '{self.out}' exists in '{stage}'",
                               "pass --resume to continue it or --overwrite to start again")

    def _repair_interrupted_publish(self) -> None:
        """After a publish that was killed: if ``out`` is missing, move the old output (set aside as
        ``.NAME.old-PID``) back; if ``out`` is in place, delete such leftovers of finished publishes and the
        training checkpoint that the publish had not yet removed from it."""
        if is_output(self.out) and read_marker(self.out) is not None:  # not a run of older versions: keep theirs
            shutil.rmtree(self.out / CHECKPOINT_DIR, ignore_errors=True)
        parent = self.out.parent
        leftovers = sorted(parent.glob(f".{self.out.name}.old-*")) if parent.is_dir() else []
        for trash in leftovers:
            pid = trash.name.rsplit("-", 1)[-1]
            if not trash.is_dir() or not is_output(trash) or (pid.isdigit() and _process_alive(int(pid))):
                continue  # not ours, or another process is publishing right now
            if not self.out.exists():
                os.replace(trash, self.out)
            else:
                shutil.rmtree(trash, ignore_errors=True)

    # --- lifecycle ---------------------------------------------------------------------------------------
    def begin(self) -> bool:
        """Check ``out`` and create the staging folder (or keep it: ``--resume``). True = resuming."""
        refuse_out_inside_data(self.out, self.data)  # before the lock creates out's parent folder
        if self.is_main_process:
            self._acquire()  # before check(): nothing is repaired or deleted while another process writes
        try:
            resuming = self.check()
            self._wait()  # every process has checked before the main one creates the stage
            if self.is_main_process:
                self._create_stage(resuming)
        except BaseException:
            self._release()
            raise
        self._wait()
        self._begun = True
        self._resuming = resuming
        self._begun_at = time.monotonic()
        self.seconds_before = self._read_elapsed() if resuming else 0.0
        return resuming

    def _read_elapsed(self) -> float:
        try:
            return float(json.loads((self.stage / CHECKPOINT_DIR / ELAPSED_FILE).read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    def _create_stage(self, resuming: bool) -> None:
        """Create the staging folder with its marker and ``run_config.json`` (keep it when ``resuming``)."""
        if not resuming and self.stage.exists():  # --overwrite of an interrupted run (checked to be ours)
            shutil.rmtree(self.stage)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.stage.mkdir(exist_ok=resuming)
        except FileExistsError:
            raise TransferkitError(f"another transferkit process is writing '{self.out}' ('{self.stage}' "
                                   "appeared meanwhile)", "wait for it to finish, or choose another --out") from None
        write_json(self.stage / MARKER, {"format": MARKER_FORMAT, "format_version": MARKER_VERSION,
                                         "kind": self.kind, "state": "staging", "pid": os.getpid()})
        if self.options is not None:
            write_json(self.stage / RUN_CONFIG, self.options)

    def publish(self) -> Path:
        """Write the marker and move the stage into place atomically; returns ``out``.

        If publishing fails, the stage is kept whole (checkpoint included) and :meth:`abandon` leaves it alone."""
        if not self._begun:
            raise RuntimeError("OutputFolder.publish() before begin()")
        if self.is_main_process:
            try:
                if self.out.is_dir() and any(self.out.iterdir()) and not is_output(self.out, self.kind):
                    raise TransferkitError(f"'{self.out}' changed while the {self.kind} was being written and is "
                                           f"no longer a {self.kind} output; the new one stays in '{self.stage}'",
                                           "move it into place by hand or choose another --out")
                from transferkit import __version__

                write_json(self.stage / MARKER, {"format": MARKER_FORMAT, "format_version": MARKER_VERSION,
                                                 "kind": self.kind, "transferkit_version": __version__,
                                                 "created": _now(), "files": output_files(self.stage)})
                self._move_into_place()
            except BaseException:
                self._begun = False  # the finished work stays in the stage: abandon() must not remove it
                self._release()
                raise
            try:
                shutil.rmtree(self.out / CHECKPOINT_DIR, ignore_errors=True)  # never part of a finished output
            finally:
                self._release()
        self._wait()
        self._begun = False
        return self.out

    def _move_into_place(self) -> None:
        if not self.out.exists():
            os.replace(self.stage, self.out)
            return
        trash = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        os.replace(self.out, trash)
        try:
            os.replace(self.stage, self.out)
        except BaseException:
            os.replace(trash, self.out)  # put the old output back; the new one stays in the stage
            raise
        shutil.rmtree(trash, ignore_errors=True)

    def abandon(self, error: BaseException | None = None) -> None:
        """After a failure: remove the staging folder unless it holds a checkpoint (``--resume`` continues it).

        A run this command started that was refused (``error`` a TransferkitError: bad input, a NaN loss) is
        removed even with a checkpoint: resuming it with the same options would fail the same way, and its
        staging folder would only block the next run. A resumed run's stage is kept (it holds earlier work)."""
        if not self._begun:
            return
        self._begun = False
        refused = isinstance(error, TransferkitError) and not self._resuming
        try:
            if self.is_main_process and self.stage.is_dir():
                if refused or not _has_checkpoint(self.stage):
                    shutil.rmtree(self.stage, ignore_errors=True)
                    if isinstance(error, KeyboardInterrupt):
                        error.transferkit_discarded = True  # the CLI says that nothing was kept
                else:  # kept for --resume: with the seconds worked so far (a resumed run's total counts them)
                    (self.stage / CHECKPOINT_DIR).mkdir(exist_ok=True)
                    write_json(self.stage / CHECKPOINT_DIR / ELAPSED_FILE,
                               {"seconds": round(self.seconds_before + time.monotonic() - self._begun_at, 3)})
                    if error is not None:
                        error.transferkit_resumable = True  # the CLI then suggests --resume (see kept_for_resume)
        finally:
            self._release()

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abandon(exc)


__all__ = ["KINDS", "MARKER", "OutputFolder", "finite", "is_output", "json_default", "json_text", "kept_for_resume",
           "output_kind", "read_marker", "staging_dir", "write_json", "write_jsonl"]
