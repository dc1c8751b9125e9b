"""An index folder's storage: one writer at a time, atomic commits of every file, readers that never block.

Layout (since the hybrid-retrieval version; the flat layout before it, ``index.faiss`` / ``records.jsonl`` /
``meta.json`` directly in the folder, is still read and is upgraded by its next write)::

    FOLDER/
      CURRENT       {"version": "v000007", "sha256": {"index.faiss": ..., ...}}: the one pointer
      v000007/      every file of the index (index.faiss, records.jsonl, meta.json, lexical/...)
      .lock         held (``flock``) by the one writer, holds its PID

A write (:func:`commit`, under :class:`WriterLock`) is a sequence of steps each of which leaves a loadable index:

1. remove leftovers of a killed writer (``.v*.tmp`` folders, versions CURRENT does not name, ``CURRENT.*.tmp``);
2. write every file into ``.v000008.tmp/`` and ``fsync`` it;
3. rename the folder to ``v000008/`` (not yet referenced: readers still load v000007);
4. write ``CURRENT.<pid>.tmp`` and ``os.replace`` it onto ``CURRENT`` (atomic: readers now load v000008);
5. delete v000007 (and the files of the flat layout).

A reader reads CURRENT, then the files of the version it names, and checks each file against the SHA-256 that
CURRENT records (so a truncated or edited file is refused, never half-used); when a file vanished because a
writer committed meanwhile (step 5), it reads CURRENT again. ``flock`` locks are released by the kernel when
their process dies, so a killed writer never blocks the next one; the PID it left in ``.lock`` is reported as
stale and overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from transferkit.errors import TransferkitError, corrupt_file_error

logger = logging.getLogger(__name__)

POINTER = "CURRENT"
LOCK = ".lock"
FLAT_FILES = ("index.faiss", "records.jsonl", "meta.json")  # the layout before versions
DEFAULT_LOCK_TIMEOUT = 60.0
_VERSION = re.compile(r"^v(\d{6,})$")
_TMP_VERSION = re.compile(r"^\.v\d{6,}\.tmp$")
_TMP_POINTER = re.compile(rf"^{POINTER}\.\d+\.tmp$")
_HELD: dict[Path, WriterLock] = {}  # the locks this process holds, by resolved folder

T = TypeVar("T")


def written_by_index(relative: str) -> bool:
    """True for a file of an index folder that its storage writes after publishing (``index add``): the pointer,
    the lock, a version folder's files, their temporary forms (``OutputFolder(owned=...)``)."""
    top = relative.split("/", 1)[0]
    return top in (POINTER, LOCK, *FLAT_FILES) or any(p.match(top) for p in (_VERSION, _TMP_VERSION, _TMP_POINTER))


# --- the writer lock --------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    """Exclusive writer lock of an index folder: ``flock`` on ``FOLDER/.lock``, waiting up to ``timeout`` seconds.
    A lock won on a file that is no longer ``FOLDER/.lock`` (the folder was rebuilt and renamed away meanwhile)
    is dropped and the new folder's file is locked instead, so two writers never hold different files.

    Re-entrant within a process (a save inside ``VectorIndex.updating`` reuses the lock it holds)."""

    def __init__(self, folder: str | Path, timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.folder = Path(folder)
        self.timeout = timeout
        self._fh: Any = None
        self._outer: WriterLock | None = None

    def __enter__(self) -> WriterLock:
        key = self.folder.resolve()
        if key in _HELD:
            self._outer = _HELD[key]
            return self
        path = self.folder / LOCK
        fh = open(path, "a+")  # noqa: SIM115 - held until __exit__
        deadline = time.monotonic() + max(self.timeout, 0.0)
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _is_file_at(fh, path):
                    break
                # the folder was replaced (a rebuild renamed it away) while we waited: lock the new one's file
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
                fh = _reopen(path, deadline)
                continue
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    fh.close()
                    raise
                if time.monotonic() >= deadline:
                    holder = _read_pid(path)
                    fh.close()
                    raise TransferkitError(
                        f"index '{self.folder}' is being written by PID {holder if holder else '?'}",
                        f"wait until that command ends and run this one again (it waited {self.timeout:g} s; "
                        "--lock-timeout SECONDS waits longer)") from None
                time.sleep(0.05)
        previous = _read_pid(path)
        if previous and previous != os.getpid() and not _pid_alive(previous):
            logger.info("index '%s': stale lock of PID %d (no longer running) cleaned", self.folder, previous)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        _HELD[key] = self
        return self

    def __exit__(self, *exc: object) -> None:
        if self._outer is not None:
            return
        _HELD.pop(self.folder.resolve(), None)
        with contextlib.suppress(OSError):
            self._fh.seek(0)
            self._fh.truncate()
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def _is_file_at(fh: Any, path: Path) -> bool:
    """Whether the open file ``fh`` is still the file at ``path`` (not renamed away or replaced)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fh.fileno())
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


def _reopen(path: Path, deadline: float) -> Any:
    """``path`` opened for locking, waiting (up to ``deadline``) while its folder is between two renames."""
    while True:
        try:
            return open(path, "a+")  # noqa: SIM115 - held by the caller
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def holds_lock(folder: str | Path) -> bool:
    return Path(folder).resolve() in _HELD


# --- reading ------------------------------------------------------------------------------------------------
def is_flat(folder: Path) -> bool:
    """An index written before versioned folders (its files directly in ``folder``)."""
    return not (folder / POINTER).exists() and (folder / "meta.json").is_file()


def is_index_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / POINTER).is_file() or is_flat(folder)


def read_pointer(folder: Path) -> dict[str, Any] | None:
    """CURRENT's content (``None`` for a flat-layout index); a damaged CURRENT is a TransferkitError."""
    path = folder / POINTER
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        pointer = json.loads(raw.decode("utf-8"))
        valid = (isinstance(pointer, dict) and isinstance(pointer.get("version"), str)
                 and _VERSION.match(pointer["version"]) and isinstance(pointer.get("sha256"), dict))
    except (UnicodeDecodeError, ValueError):
        valid = False
    if not valid:
        raise corrupt(path, "it is not the JSON pointer transferkit writes")
    return pointer


def read_consistent(folder: str | Path, reader: Callable[[Path, dict[str, str]], T], attempts: int = 5) -> T:
    """``reader(version_folder, sha256_by_file)`` on the version CURRENT names (``folder`` itself and no
    checksums for a flat-layout index), again on the new version when a writer replaced it meanwhile."""
    folder = Path(folder)
    for attempt in range(attempts):
        pointer = read_pointer(folder)
        if pointer is None and not is_flat(folder):
            raise TransferkitError(f"'{folder}' is not a transferkit index (no {POINTER} or meta.json)",
                                   "build one with `transferkit index build --docs ... --out FOLDER`")
        version = folder if pointer is None else folder / pointer["version"]
        try:
            return reader(version, {} if pointer is None else pointer["sha256"])
        except FileNotFoundError:
            if read_pointer(folder) == pointer or attempt == attempts - 1:
                missing = [n for n in (pointer or {}).get("sha256", FLAT_FILES) if not (version / n).is_file()]
                raise corrupt(version / (missing[0] if missing else ""), "a file of the index is missing") from None
            logger.debug("index '%s' was committed while being read: reading it again", folder)
    raise AssertionError("unreachable")


def check_file(path: Path, expected: str | None) -> bytes:
    """The bytes of ``path``, refused unless their SHA-256 is ``expected`` (no check when ``expected`` is None)."""
    data = path.read_bytes()
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise corrupt(path, "its content differs from the checksum recorded when it was written")
    return data


def corrupt(path: Path, why: str) -> TransferkitError:
    return corrupt_file_error(path, "transferkit index file", why,
                              "restore the index folder from a backup or rebuild it with `transferkit index build "
                              "... --overwrite`")


# --- writing -------------------------------------------------------------------------------------------------
def _fsync_tree(root: Path) -> dict[str, str]:
    """fsync every file under ``root`` and return their SHA-256 by relative POSIX path."""
    sums = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb") as fh:
            sums[path.relative_to(root).as_posix()] = hashlib.sha256(fh.read()).hexdigest()
            os.fsync(fh.fileno())
    return sums


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name))


def clean_leftovers(folder: Path, keep: str | None) -> list[str]:
    """Remove what an interrupted writer left: temporary folders and pointers, versions other than ``keep``,
    and (once CURRENT exists) the flat layout's files. Returns the names removed."""
    removed = []
    for path in sorted(folder.iterdir()):
        name = path.name
        leftover = (_TMP_VERSION.match(name) or _TMP_POINTER.match(name)
                    or (_VERSION.match(name) and path.is_dir() and name != keep)
                    or (keep is not None and name in FLAT_FILES and path.is_file()))
        if leftover:
            shutil.rmtree(path) if path.is_dir() else os.unlink(path)
            removed.append(name)
    return removed


def clashing_names(folder: Path) -> list[str]:
    """Names in a folder that is not an index which a commit would replace or remove (empty: safe to commit)."""
    if not folder.is_dir() or is_index_folder(folder):
        return []
    return sorted(p.name for p in folder.iterdir() if _VERSION.match(p.name) or _TMP_VERSION.match(p.name)
                  or _TMP_POINTER.match(p.name) or p.name in (POINTER, *FLAT_FILES))


def commit(folder: str | Path, write_files: Callable[[Path], None]) -> str:
    """Write a new version of the index in ``folder`` with ``write_files(version_folder)`` and make it current
    (the steps of the module docstring). The caller holds the :class:`WriterLock`. Returns the version name."""
    folder = Path(folder)
    if not holds_lock(folder):
        raise RuntimeError(f"commit to '{folder}' without its writer lock")
    pointer = read_pointer(folder)
    current = pointer["version"] if pointer else None
    leftovers = clean_leftovers(folder, current)
    stale = [n for n in leftovers if n not in FLAT_FILES]
    if stale:
        logger.warning("index '%s': removed %s left by an interrupted write", folder, ", ".join(stale))
    numbers = [int(_VERSION.match(v).group(1)) for v in [*versions(folder), *([current] if current else [])]]
    name = f"v{max(numbers, default=0) + 1:06d}"
    staging = folder / f".{name}.tmp"
    try:
        os.mkdir(staging)
        write_files(staging)
        sums = _fsync_tree(staging)
        os.replace(staging, folder / name)
        tmp_pointer = folder / f"{POINTER}.{os.getpid()}.tmp"
        with open(tmp_pointer, "w", encoding="utf-8") as fh:
            json.dump({"version": name, "sha256": sums}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_pointer, folder / POINTER)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):  # best effort: the next writer removes what is left
            shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        clean_leftovers(folder, name)  # the superseded version(s) and the flat layout's files
    except OSError as error:  # committed all the same: the next writer removes them
        logger.warning("index '%s': could not remove the superseded version (%s)", folder, error)
    return name


@contextlib.contextmanager
def writer(folder: str | Path, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[WriterLock]:
    """The writer lock of an existing index folder."""
    folder = Path(folder)
    if not is_index_folder(folder):
        raise TransferkitError(f"'{folder}' is not a transferkit index",
                               "build one with `transferkit index build --docs ... --out FOLDER`")
    with WriterLock(folder, timeout) as lock:
        yield lock
