"""Text datasets from ``.csv`` / ``.tsv`` / ``.jsonl`` files (one example per row) or folders holding
``train`` / ``val`` / ``test`` files of those kinds; unlabelled texts may also be a ``.txt`` file (one per line).

Files are decoded as UTF-8 (a BOM is ignored), UTF-16 when they start with its BOM, else latin-1 (with a warning);
a binary file (NUL or control bytes) is refused.
A ``.csv`` whose header holds no comma but semicolons or tabs is read with that delimiter.

Column choice: ``text_column`` defaults to the first of ``TEXT_COLUMN_CANDIDATES`` present (case-insensitive),
else the only non-numeric column; ``label_column`` to the first of ``LABEL_COLUMN_CANDIDATES``. Every other
column is kept in ``LabeledData.columns`` (numeric columns as int64/float64 arrays, the rest as object arrays).
Empty texts and missing labels are errors naming the line: silently dropping rows would change what is measured.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.data.base import LabeledData, sort_class_names
from transferkit.errors import TransferkitError, listed, spoken

logger = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".csv", ".tsv", ".jsonl")
UNLABELLED_TEXT_EXTENSIONS = TEXT_EXTENSIONS + (".txt",)
TEXT_COLUMN_CANDIDATES = ("text", "sentence", "content", "review", "document")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "class", "category", "sentiment", "target")
_MISSING_STRINGS = {"", "nan", "null"}


@dataclass
class Table:
    """Rows of a text file: ``columns`` in file order, ``values[column][row]``, ``lines[row]`` (1-based)."""

    path: Path
    columns: list[str]
    values: dict[str, list[Any]]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.lines)


#: control characters no text holds (whitespace aside; C1 is what latin-1 makes of binary bytes)
_CONTROL = re.compile(r"[\x01-\x08\x0e-\x1f\x7f-\x9f]")


def decode_text(path: Path) -> str:
    """The text of ``path``: UTF-16 if it starts with a UTF-16 BOM, else UTF-8 (BOM ignored), else latin-1.

    A binary file (a NUL character, or more than a tenth control characters) is refused: it is no text to
    read, and latin-1 would make it one of control characters."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return _refuse_binary(path, raw.decode("utf-16"))
        except UnicodeDecodeError as error:
            raise TransferkitError(
                f"'{path}' starts with a UTF-16 byte-order mark but is not valid UTF-16 ({error.reason})",
                "save it again as UTF-8 (Excel: CSV UTF-8)",
            ) from error
    try:
        return _refuse_binary(path, raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        text = _refuse_binary(path, raw.decode("latin-1"))
        logger.warning("'%s' is not valid UTF-8; reading it as latin-1", path)
        return text


def _refuse_binary(path: Path, text: str) -> str:
    """``text``, unless it is the content of a binary file (see :func:`decode_text`)."""
    sample = text[: 1 << 20]
    if "\0" in text or len(_CONTROL.findall(sample)) > len(sample) / 10:
        raise TransferkitError(f"'{path}' is not a text file (binary content: NUL or control bytes)",
                               "give a text file: UTF-8, or UTF-16 with its byte-order mark")
    return text


def _delimiter(path: Path, content: str) -> str:
    """"\t" for a .tsv; for a .csv "," unless its header holds no comma but ";" or tabs (outside quotes)."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    header = next(csv.reader(io.StringIO(content, newline="")), [])
    if len(header) != 1:
        return ","
    widths = {d: len(next(csv.reader(io.StringIO(content, newline=""), delimiter=d), [])) for d in (";", "\t")}
    delimiter = max(widths, key=lambda d: widths[d])
    if widths[delimiter] < 2:
        return ","
    logger.info("'%s' is separated by %s, not commas: reading it so", path, "semicolons" if delimiter == ";" else "tabs")
    return delimiter


def read_table(path: Path) -> Table:
    """Parse a ``.csv`` / ``.tsv`` (header row required) or ``.jsonl`` (one JSON object per line) file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TEXT_EXTENSIONS:
        raise TransferkitError(
            f"'{path}' is not a supported text file ({suffix or 'no extension'})",
            "use a .csv, .tsv or .jsonl file, or a folder of images",
        )
    content = decode_text(path)
    columns: list[str] = []
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    if suffix == ".jsonl":
        for line_number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise TransferkitError(
                    f"line {line_number} of '{path}' is not valid JSON ({error.msg})", "write one JSON object per line"
                ) from error
            if not isinstance(row, dict):
                raise TransferkitError(f"line {line_number} of '{path}' is not a JSON object", "write one JSON object per line")
            for key in row:
                if key not in columns:
                    columns.append(key)
            rows.append(row)
            lines.append(line_number)
    else:
        csv.field_size_limit(2**31 - 1)  # long documents exceed the default of 131,072 characters
        reader = csv.reader(io.StringIO(content, newline=""), delimiter=_delimiter(path, content))
        header = next(reader, None)
        if header is None:
            raise TransferkitError(f"'{path}' is empty", "add a header row and one row per example")
        columns = [h.strip() for h in header]
        duplicates = sorted({c for c in columns if columns.count(c) > 1})
        if duplicates:
            raise TransferkitError(f"'{path}' has duplicate column names {duplicates}", "rename the columns")
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) != len(columns):
                raise TransferkitError(
                    f"line {reader.line_num} of '{path}' has {len(fields)} fields but the header has {len(columns)}",
                    'quote fields that contain the delimiter or line breaks ("like, this")',
                )
            rows.append(dict(zip(columns, fields)))
            lines.append(reader.line_num)
    if not rows:
        raise TransferkitError(f"'{path}' has no data rows", "add one row per example")
    values = {c: [row.get(c) for row in rows] for c in columns}
    return Table(path=path, columns=columns, values=values, lines=lines)


def is_missing(value: Any) -> bool:
    """Whether a table cell holds no value: None, NaN, or a string in ``_MISSING_STRINGS`` ("", "nan", "null", ...)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING_STRINGS


def _as_number(value: Any) -> float | int | None:
    """The number a cell holds (``int`` if integral text/int), or None if it is not numeric."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def column_array(values: list[Any]) -> np.ndarray:
    """int64 if every present cell is an integer, float64 (NaN = missing) if numeric, else an object array."""
    present = [v for v in values if not is_missing(v)]
    numbers = [_as_number(v) for v in present]
    if present and all(n is not None for n in numbers):
        if all(isinstance(n, int) for n in numbers) and len(present) == len(values):
            return np.asarray([_as_number(v) for v in values], dtype=np.int64)
        return np.asarray([np.nan if is_missing(v) else float(_as_number(v)) for v in values], dtype=np.float64)
    return np.asarray(["" if is_missing(v) else v for v in values], dtype=object)


def _is_numeric_column(values: list[Any]) -> bool:
    return column_array(values).dtype != object


def _find_column(table: Table, wanted: str, option: str) -> str:
    if wanted in table.columns:
        return wanted
    folded = {c.lower(): c for c in table.columns}
    if wanted.lower() in folded:
        return folded[wanted.lower()]
    raise TransferkitError(
        f"'{table.path}' has no column '{wanted}'; its columns are: {', '.join(table.columns)}",
        f"pass one of them with {option}",
    )


def choose_columns(table: Table, text_column: str | None, label_column: str | None, labelled: bool) -> tuple[str, str | None]:
    """Resolve the text and label columns (explicit names, else the documented defaults)."""
    folded = {c.lower(): c for c in table.columns}
    if label_column is not None:
        label = _find_column(table, label_column, "--label-column")
    else:
        label = next((folded[c] for c in LABEL_COLUMN_CANDIDATES if c in folded), None)
        if label is None and labelled:
            raise TransferkitError(
                f"'{table.path}' has no label column (looked for {', '.join(LABEL_COLUMN_CANDIDATES)}); "
                f"its columns are: {', '.join(table.columns)}",
                "name the label column with --label-column",
            )
    if text_column is not None:
        text = _find_column(table, text_column, "--text-column")
    else:
        text = next((folded[c] for c in TEXT_COLUMN_CANDIDATES if c in folded), None)
        if text is None:
            string_columns = [c for c in table.columns if c != label and not _is_numeric_column(table.values[c])]
            if len(string_columns) != 1:
                raise TransferkitError(
                    f"cannot tell which column of '{table.path}' holds the text "
                    f"(looked for {', '.join(TEXT_COLUMN_CANDIDATES)}); its columns are: {', '.join(table.columns)}",
                    "name the text column with --text-column",
                )
            text = string_columns[0]
    if text == label:
        raise TransferkitError(f"the text column and the label column are both '{text}'", "choose two different columns")
    return text, label


def _label_string(value: Any) -> str:
    if isinstance(value, (list, dict)):
        raise ValueError("multi-label")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _texts(table: Table, column: str) -> list[str]:
    texts = []
    for value, line in zip(table.values[column], table.lines):
        if is_missing(value) or (isinstance(value, str) and not value.strip()):
            raise TransferkitError(
                f"line {line} of '{table.path}' has an empty text in column '{column}'", "fill in the text or remove the row"
            )
        if isinstance(value, (list, dict)):
            raise TransferkitError(f"line {line} of '{table.path}': column '{column}' is not a string", "store the text as a string")
        texts.append(str(value))
    return texts


def _label_strings(table: Table, column: str) -> list[str]:
    labels = []
    for value, line in zip(table.values[column], table.lines):
        if is_missing(value):
            raise TransferkitError(
                f"line {line} of '{table.path}' has no label in column '{column}'", "fill in the label or remove the row"
            )
        try:
            labels.append(_label_string(value))
        except ValueError as error:
            raise TransferkitError(
                f"line {line} of '{table.path}' has a list of labels; multi-label data is not supported",
                "give each row a single label",
            ) from error
    _warn_lookalike_labels(table.path, labels)
    return labels


def _warn_lookalike_labels(path: Path, labels: list[str]) -> None:
    """Warn (not merge: trained models rely on class names) about labels that differ only in case or spacing,
    or are the same number written differently ("0" and "0.0")."""
    groups: dict[tuple[str, Any], set[str]] = {}
    for label in set(labels):
        number = _as_number(label)
        key = ("number", float(number)) if number is not None else ("text", " ".join(label.split()).casefold())
        groups.setdefault(key, set()).add(label)
    found = []
    for (kind, _), names in sorted(groups.items(), key=lambda item: sorted(item[1])):
        if len(names) < 2:
            continue
        if kind == "number":
            how = "are the same number"
        elif len({" ".join(n.split()) for n in names}) == 1:
            how = "differ only in spacing"
        else:
            how = "differ only in case" if len({n.casefold() for n in names}) == 1 else "differ only in case and spacing"
        quoted = [f"'{n}'" for n in sorted(names)]
        found.append(f"{spoken(quoted)} {how}")
    if found:
        logger.warning(
            "'%s': labels %s; they are separate classes. If they mean the same class, write them identically in the file",
            path, listed(found, limit=3),
        )


def _ids(table: Table) -> list[str]:
    folded = {c.lower(): c for c in table.columns}
    if "id" in folded:
        ids = [str(v) for v in table.values[folded["id"]]]
        if all(not is_missing(v) for v in table.values[folded["id"]]) and len(set(ids)) == len(ids):
            return ids
        logger.warning("column '%s' of '%s' is not a unique id; using row numbers as ids", folded["id"], table.path)
    return [f"{table.path.name}[{i}]" for i in range(len(table))]


def read_text_file(
    path: Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    labelled: bool = True,
    class_names: list[str] | None = None,
    name: str | None = None,
    min_classes: int = 2,
) -> LabeledData:
    """Read one text file into a ``LabeledData`` (modality "text"); a labelled file without ``class_names`` needs
    ``min_classes`` labels (2 to train, 1 to evaluate on).

    An unlabelled ``.txt`` file is read with :func:`read_text_lines`.
    ``class_names`` fixes the label index (e.g. from the training file); a label outside it is an error.
    With ``labelled=False`` labels are -1 and a label column, if present, is dropped (not kept in ``columns``),
    so target-domain labels cannot leak into training batches.
    """
    if Path(path).suffix.lower() == ".txt" and not labelled:
        return read_text_lines(path, name=name)
    table = read_table(path)
    text, label = choose_columns(table, text_column, label_column, labelled)
    texts = _texts(table, text)
    if labelled:
        assert label is not None
        label_strings = _label_strings(table, label)
        if class_names is None:
            class_names = sort_class_names(set(label_strings))
            if len(class_names) < min_classes:
                raise TransferkitError(
                    f"'{path}' has a single class ('{class_names[0]}') in column '{label}'; a classifier needs at least two",
                    "add examples of other classes or choose another --label-column",
                )
        index = {c: i for i, c in enumerate(class_names)}
        unknown = sorted(set(label_strings) - set(index))
        if unknown:
            raise TransferkitError(
                f"'{path}' has label(s) {unknown} that the training data does not have (classes: {', '.join(class_names)})",
                "add training examples of these classes or remove the rows",
            )
        labels = np.asarray([index[s] for s in label_strings], dtype=np.int64)
    else:
        class_names, labels = [], np.full(len(texts), -1, dtype=np.int64)
    if not labelled and label is not None:
        logger.info("column '%s' of '%s' is ignored: the data is used unlabelled", label, path)
    extra = [c for c in table.columns if c not in (text, label)]
    return LabeledData(
        items=texts,
        labels=labels,
        class_names=list(class_names),
        modality="text",
        ids=_ids(table),
        name=name or Path(path).stem,
        columns={c: column_array(table.values[c]) for c in extra},
    )


def read_text_lines(path: Path, *, name: str | None = None) -> LabeledData:
    """Unlabelled texts of a ``.txt`` file: one per non-empty line, stripped (decoded as :func:`decode_text` does)."""
    path = Path(path)
    texts = [line.strip() for line in decode_text(path).splitlines() if line.strip()]
    if not texts:
        raise TransferkitError(f"'{path}' is empty", "write one text per line")
    return LabeledData(
        items=texts,
        labels=np.full(len(texts), -1, dtype=np.int64),
        class_names=[],
        modality="text",
        ids=[f"{path.name}[{i}]" for i in range(len(texts))],
        name=name or path.stem,
    )


def find_split_files(folder: Path) -> dict[str, Path] | None:
    """``{"train": train.csv, "val": val.jsonl, ...}`` when ``folder`` holds split text files, else None."""
    from transferkit.data.images import match_split_names

    files = {p.name.lower(): p for p in Path(folder).iterdir() if p.is_file()}
    return match_split_names(folder, files, TEXT_EXTENSIONS, "file",
                             "add train.csv (or .tsv/.jsonl) with the training examples")


def read_text_folder(
    folder: Path, *, text_column: str | None = None, label_column: str | None = None, name: str | None = None
) -> dict[str, LabeledData]:
    """Read ``train`` / ``val`` / ``test`` text files of ``folder``; class names come from the train file."""
    files = find_split_files(folder)
    if files is None:
        raise TransferkitError(f"'{folder}' holds no train.csv / train.tsv / train.jsonl", "add one or pass the file itself")
    name = name or Path(folder).resolve().name
    train = read_text_file(files["train"], text_column=text_column, label_column=label_column, name=f"{name}/train")
    result = {"train": train}
    for split in ("val", "test"):
        if split in files:
            result[split] = read_text_file(
                files[split],
                text_column=text_column,
                label_column=label_column,
                class_names=train.class_names,
                name=f"{name}/{split}",
            )
    return result
