"""Documents -> overlapping chunks with character offsets (what a vector index stores and a search returns).

A chunk is ``text[start:end]`` of one document, so every search hit can be traced back to the exact span of
its source. Windows are ``size`` units long and consecutive windows share ``overlap`` units; with
``unit="chars"`` a window ends at the last whitespace of its final fifth when there is one (no cut words), with
``unit="tokens"`` windows are counted in tokens of the encoder's tokenizer (its offset mapping gives the
character spans).

Readable documents: ``.txt`` and ``.md`` files (the whole file), ``.jsonl`` files (one document per line: the
``text`` or ``content`` field of each JSON object), and the built-in corpus ``pydoc-topics`` (the 79 Python
documentation topics shipped with CPython in ``pydoc_data.topics``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transferkit.data.text import decode_text
from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)

DOC_SUFFIXES = (".txt", ".md", ".jsonl")
BUILTIN_CORPORA = ("pydoc-topics",)
UNITS = ("chars", "tokens")
_JSONL_TEXT_FIELDS = ("text", "content", "body")


@dataclass
class Document:
    """One text to index. ``source`` is the file path relative to the indexed folder (or the topic name);
    ``record`` is the 1-based line number inside a ``.jsonl`` file (0 for whole files)."""

    source: str
    text: str
    record: int = 0


@dataclass
class Chunk:
    """``text == document.text[start:end]``."""

    source: str
    text: str
    start: int
    end: int
    record: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_chunking(size: int, overlap: int, unit: str) -> None:
    if unit not in UNITS:
        raise TransferkitError(f"unknown chunk unit '{unit}'", f"choose one of {', '.join(UNITS)}")
    if size < 1:
        raise TransferkitError(f"invalid chunk size {size}", "use a whole number of at least 1")
    if not 0 <= overlap < size:
        raise TransferkitError(f"invalid chunk overlap {overlap} for chunk size {size}",
                               "use an overlap of at least 0 and below the chunk size")


def _char_windows(text: str, size: int, overlap: int) -> Iterator[tuple[int, int]]:
    """(start, end) windows of at most ``size`` characters; each later one starts ``overlap`` before the end of
    the previous one. A window that does not reach the end of the text is shortened to its last whitespace
    when that whitespace lies in the window's final fifth."""
    n, start = len(text), 0
    while start < n:
        end = min(start + size, n)
        if end < n:
            cut = text.rfind(" ", start + size - max(1, size // 5), end)
            cut = max(cut, text.rfind("\n", start + size - max(1, size // 5), end))
            if cut > start:
                end = cut + 1
        yield start, end
        if end >= n:
            return
        start = max(end - overlap, start + 1)


def _token_windows(text: str, size: int, overlap: int, tokenizer: Any) -> Iterator[tuple[int, int]]:
    """Windows of ``size`` tokens (stride ``size - overlap``) mapped back to character spans."""
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise TransferkitError("token chunking needs the encoder's fast tokenizer", "use --chunk-unit chars")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if not offsets:
        return
    step = size - overlap
    for first in range(0, len(offsets), step):
        last = min(first + size, len(offsets)) - 1
        yield offsets[first][0], offsets[last][1]
        if last == len(offsets) - 1:
            return


def chunk_document(document: Document, size: int = 500, overlap: int = 100, unit: str = "chars",
                   tokenizer: Any = None) -> list[Chunk]:
    """Split one document into chunks (blank chunks dropped)."""
    check_chunking(size, overlap, unit)
    text = document.text
    windows = _char_windows(text, size, overlap) if unit == "chars" else _token_windows(text, size, overlap,
                                                                                         tokenizer)
    return [Chunk(document.source, text[s:e], s, e, document.record) for s, e in windows if text[s:e].strip()]


def _read_jsonl(path: Path, source: str) -> Iterator[Document]:
    for line_number, line in enumerate(decode_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TransferkitError(f"{source} line {line_number} is not JSON ({exc.msg})",
                                   "write one JSON object per line") from None
        if isinstance(row, str):
            yield Document(source, row, line_number)
            continue
        field = next((f for f in _JSONL_TEXT_FIELDS if isinstance(row, dict) and f in row), None)
        if field is None:
            raise TransferkitError(f"{source} line {line_number} has no text field",
                                   f"give each object one of the fields {', '.join(_JSONL_TEXT_FIELDS)}")
        yield Document(source, str(row[field]), line_number)


def pydoc_topics() -> list[Document]:
    """The Python documentation topics shipped with CPython (``pydoc_data.topics``), one document per topic."""
    from pydoc_data.topics import topics

    return [Document(name, text) for name, text in sorted(topics.items())]


def _outside_indexes(root: Path, files: list[Path]) -> list[Path]:
    """``files`` (below the folder ``root``) without those inside a transferkit index folder below ``root``: an
    index made inside a docs folder holds no documents (its ``records.jsonl`` would be indexed again)."""
    from transferkit.memory.storage import is_index_folder

    folders = {parent for file in files for parent in file.parents if root in parent.parents}
    indexes = sorted(folder for folder in folders if is_index_folder(folder))
    if indexes:
        logger.info("skipping the transferkit index folder(s) in '%s': %s", root,
                    ", ".join(folder.relative_to(root).as_posix() for folder in indexes))
    return [file for file in files if not any(folder in file.parents for folder in indexes)]


def read_documents(path: str | Path) -> list[Document]:
    """Documents of a folder (recursively), of one file, or of a built-in corpus (``pydoc-topics``).

    ``source`` is relative to the folder (to the file's parent for a single file), with ``/`` separators. Files
    are decoded as every text reader decodes them (:func:`transferkit.data.text.decode_text`). Hidden files and
    folders and transferkit index folders inside the folder are skipped.
    """
    if str(path) in BUILTIN_CORPORA:
        return pydoc_topics()
    root = Path(path)
    if root.is_file():
        files, base = [root], root.parent
    elif root.is_dir():
        files = _outside_indexes(root, sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)))
        base = root
    else:
        raise TransferkitError(f"'{path}' does not exist",
                               f"give a folder or a {'/'.join(DOC_SUFFIXES)} file, or one of {BUILTIN_CORPORA}")
    if root.is_file() and root.suffix.lower() not in DOC_SUFFIXES:
        raise TransferkitError(f"'{path}' is not a document", f"give a {'/'.join(DOC_SUFFIXES)} file")
    documents: list[Document] = []
    for file in files:
        source = file.relative_to(base).as_posix()
        if file.suffix.lower() == ".jsonl":
            documents.extend(_read_jsonl(file, source))
        else:
            documents.append(Document(source, decode_text(file)))
    if not documents:
        raise TransferkitError(f"no documents in '{path}'", f"put {'/'.join(DOC_SUFFIXES)} files in it")
    return documents
