"""User-facing errors: one line that names the problem and the fix; the CLI turns them into exit code 2.

The CLI's error boundary (``transferkit.cli.main``) also turns the operating system's complaints (``OSError``:
missing path, not a folder, read-only folder, full disk, permission denied) and ``MemoryError`` into such errors
with :func:`from_os_error` / :func:`from_memory_error`. A damaged file is converted where it is read, naming the
file: ``with reading(path, "model config"): ...`` turns the reader's ``ValueError`` / ``RuntimeError`` /
``KeyError`` / ... into a TransferkitError.
"""

from __future__ import annotations

import errno
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def listed(items: list[str], limit: int = 5) -> str:
    """The first ``limit`` of ``items`` for a one-line message: ``"a, b, c and 4 more"``."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def spoken(items: list[str]) -> str:
    """``items`` as a sentence names them: ``"a"``, ``"a and b"``, ``"a, b and c"``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"


def _sentence(text: str) -> str:
    return " ".join(str(text).split()).rstrip(".")


class TransferkitError(Exception):
    """Bad input or configuration. ``problem``: what is wrong; ``fix``: how to put it right. ``str()`` is both as
    a single line."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = _sentence(problem)
        self.fix = _sentence(fix) if fix else ""
        super().__init__(self.problem + "." + (f" {self.fix}." if self.fix else ""))

    def to_json(self) -> dict[str, str]:
        """The ``--json`` form of the error: ``{"error": problem, "fix": fix}``."""
        return {"error": self.problem, "fix": self.fix}


# --- operating-system errors -------------------------------------------------------------------------------------

_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOENT: ("'{path}' does not exist", "check the path"),
    errno.ENOTDIR: ("'{path}' is not a folder (it, or a folder above it, is a file)",
                    "give a folder path, or choose another path"),
    errno.EISDIR: ("'{path}' is a folder where a file was expected", "give a file path"),
    errno.EACCES: ("permission denied for '{path}'", "choose a path you can read and write, or fix its permissions"),
    errno.EPERM: ("operation not permitted on '{path}'", "choose a path you can read and write, or fix its permissions"),
    errno.EROFS: ("'{path}' is on a read-only file system", "choose a writable folder"),
    errno.ENOSPC: ("the disk is full (while writing '{path}')",
                   "free some space or choose a folder on another disk, then run again; finished outputs were not "
                   "changed"),
    errno.EDQUOT: ("the disk quota is exceeded (while writing '{path}')",
                   "free some space or choose a folder on another disk, then run again"),
    errno.EEXIST: ("'{path}' already exists", "choose a new path"),
    errno.ENOTEMPTY: ("'{path}' is not empty", "choose an empty or new folder"),
    errno.ENAMETOOLONG: ("the path '{path}' is too long", "choose a shorter path"),
    errno.ELOOP: ("'{path}' is a symbolic link loop", "fix the link or choose another path"),
    errno.EMFILE: ("too many open files (at '{path}')", "raise the limit (ulimit -n) or use smaller inputs"),
    errno.EIO: ("input/output error reading or writing '{path}'", "check the disk"),
}


def from_os_error(exc: OSError) -> TransferkitError:
    """One line for an ``OSError``: the problem with its path, and the fix."""
    path = exc.filename if exc.filename is not None else ""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    template = _OS_ERRORS.get(exc.errno or -1)
    if template is None:
        reason = exc.strerror or str(exc) or type(exc).__name__
        problem = f"{reason} ({path})" if path else reason
        return TransferkitError(problem, "check the path and the disk, then run again")
    problem, fix = template
    if not path:  # no file name known: drop the quoted path
        problem = problem.replace(" '{path}'", "").replace("(while writing)", "").replace("(at)", "")
    return TransferkitError(problem.format(path=path), fix)


_OS_ERROR_IN_MESSAGE = re.compile(r"os error (\d+)|errno[ =:]*(\d+)", re.IGNORECASE)


def os_error_in(exc: BaseException, path: str | Path | None = None) -> OSError | None:
    """The ``OSError`` hidden in a library's exception (safetensors and faiss report a full disk as
    ``... No space left on device (os error 28)``), or None."""
    text = str(exc)
    found = _OS_ERROR_IN_MESSAGE.search(text)
    code = int(found.group(1) or found.group(2)) if found else next(
        (number for number in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO)
         if os.strerror(number).lower() in text.lower()), None)
    if code is None:
        return None
    return OSError(code, os.strerror(code), None if path is None else str(path))


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Let a library writer's disk errors (full disk, read-only, permission) surface as ``OSError`` naming
    ``path`` (the CLI then prints one line), instead of the library's own exception type."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        hidden = os_error_in(exc, path)
        if hidden is None:
            raise
        raise hidden from None


def from_memory_error(_: MemoryError | None = None) -> TransferkitError:
    return TransferkitError("out of memory", "use a smaller --batch-size, --image-size or dataset subset "
                                             "(e.g. --limit-per-class), or a smaller backbone")


# --- damaged files -----------------------------------------------------------------------------------------------

#: exceptions that file readers (json, safetensors, PIL, faiss, numpy, ...) raise for damaged content
CORRUPT_FILE_ERRORS: tuple[type[BaseException], ...] = (ValueError, RuntimeError, KeyError, IndexError, TypeError,
                                                         AttributeError, EOFError, RecursionError, OverflowError)


def corrupt_file_error(path: str | Path, what: str, detail: object = None, fix: str | None = None) -> TransferkitError:
    """``'<path>' is not a valid <what> (<detail>)`` + the fix (default: write it again)."""
    reason = f" ({first_line(detail)})" if detail is not None and first_line(detail) else ""
    return TransferkitError(f"'{path}' is damaged or not a valid {what}{reason}",
                            fix or "restore the file, or write it again with the transferkit command that made it")


@contextmanager
def reading(path: str | Path, what: str, fix: str | None = None) -> Iterator[None]:
    """Convert a reader's errors about a damaged ``path`` into a TransferkitError naming the file.

    ``OSError`` (missing file, permission) becomes the operating system's one line; TransferkitError passes through.
    """
    try:
        yield
    except TransferkitError:
        raise
    except OSError as exc:
        if exc.filename is None:  # e.g. safetensors / faiss report I/O trouble without a file name
            raise corrupt_file_error(path, what, exc, fix) from None
        raise from_os_error(exc) from None
    except CORRUPT_FILE_ERRORS as exc:
        raise corrupt_file_error(path, what, f"{type(exc).__name__}: {exc}", fix) from None


def first_line(detail: object) -> str:
    """The first line of ``detail`` as text, at most 160 characters (for one-line messages)."""
    text = str(detail).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= 160 else line[:157] + "..."


# --- option values -----------------------------------------------------------------------------------------------


def check_count(flag: str, value: object, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as a whole number in [minimum, maximum] (``flag``: how the user wrote it, e.g. ``--batch-size``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TransferkitError(f"invalid {flag} {value!r}", f"use a whole number >= {minimum}")
    if value < minimum or (maximum is not None and value > maximum):
        limit = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise TransferkitError(f"invalid {flag} {value}", f"use a whole number {limit}")
    return value


def check_number(flag: str, value: object, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite number within the bounds (open or closed), else a TransferkitError naming ``flag``."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    below = low is not None and (number < low or (low_open and number == low))
    above = high is not None and (number > high or (high_open and number == high))
    if not math.isfinite(number) or below or above:
        if low is not None and high is not None:
            where = ("in (" if low_open else "in [") + f"{low:g}, {high:g}" + (")" if high_open else "]")
        elif low is not None:
            where = ("> " if low_open else ">= ") + f"{low:g}"
        elif high is not None:
            where = ("< " if high_open else "<= ") + f"{high:g}"
        else:
            where = "that is finite"
        raise TransferkitError(f"invalid {flag} {value!r}", f"use a number {where}")
    return number


def read_json(path: str | Path, what: str, fix: str | None = None) -> object:
    """The JSON document in ``path``; a damaged or non-UTF-8 file is a TransferkitError naming it."""
    import json

    with reading(path, what, fix):
        return json.loads(Path(path).read_text(encoding="utf-8"))


def read_safetensors(path: str | Path, what: str = "safetensors weights file", fix: str | None = None,
                     shapes_only: bool = False) -> dict:
    """The tensors in a ``.safetensors`` file (never pickle), or with ``shapes_only`` their shapes from the header
    (nothing loaded); a truncated or damaged file is a TransferkitError naming it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise TransferkitError(f"'{path}' does not exist", fix or "write the model again")
    try:
        with reading(path, what, fix):
            if not shapes_only:
                return load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    except SafetensorError as exc:  # not a ValueError subclass in every safetensors version
        raise corrupt_file_error(path, what, exc, fix) from None
