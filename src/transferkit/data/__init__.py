"""Datasets: what ``--data`` points at (an image folder, a .csv/.tsv/.jsonl file, a folder of split files, or a
built-in name) becomes train / validation / test splits of raw items.

Honest-measurement rules applied here:
  * the test split is never touched by training choices: it is the official test set, the user's test
    folder/file, or a stratified part carved with a fixed seed (the same for every ``seed``);
  * few-shot limits (``limit_per_class``) draw K examples per class from the training pool only, and the
    validation split is carved out of those K (at least one per class), so no extra labels sneak in;
  * ``test_limit`` takes a fixed, seeded, stratified subset of the test split (e.g. 2,000 of Fashion-MNIST's
    10,000) that is identical across seeds.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np

from transferkit.data import split as splitting
from transferkit.data.base import DataSplits, ItemSource, LabeledData, SubsetSource
from transferkit.data.builtin import BuiltinData, builtin_names, is_builtin, load_builtin
from transferkit.data.images import (
    IMAGE_EXTENSIONS,
    find_split_folders,
    is_hidden,
    read_image_folder,
    read_unlabelled_images,
)
from transferkit.data.split import (
    carve_test,
    carve_validation,
    limit_per_class,
    split_data,
    stratified_subset,
    tiny_class_notes,
)
from transferkit.data.text import (
    TEXT_EXTENSIONS,
    UNLABELLED_TEXT_EXTENSIONS,
    find_split_files,
    read_text_file,
    read_text_folder,
)
from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)

__all__ = [
    "DataSplits",
    "ItemSource",
    "LabeledData",
    "SubsetSource",
    "builtin_names",
    "export_dataset",
    "load_data",
    "load_unlabelled",
    "limit_per_class",
    "read_labelled_parts",
    "split_data",
]


def _not_found(spec: str) -> TransferkitError:
    return TransferkitError(
        f"no such file or folder '{spec}' and no built-in dataset of that name; "
        f"built-ins: {', '.join(builtin_names())}, tweets:<topic>",
        "pass an image folder, a .csv/.tsv/.jsonl file or a built-in name",
    )


def _read_folder(folder: Path, text_column: str | None, label_column: str | None,
                 min_classes: int = 2) -> dict[str, LabeledData]:
    if find_split_folders(folder) is None and find_split_files(folder) is not None:
        return read_text_folder(folder, text_column=text_column, label_column=label_column)
    text_files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TEXT_EXTENSIONS)
    has_subfolders = any(p.is_dir() and not is_hidden(p.name) for p in folder.iterdir())
    if text_files and not has_subfolders:
        raise TransferkitError(
            f"'{folder}' holds text files ({', '.join(text_files[:3])}) but none is named train.csv/.tsv/.jsonl",
            "pass the file itself, or name the files train/val/test",
        )
    return read_image_folder(folder, min_classes=min_classes)


def _read_labelled(
    spec: str | Path, text_column: str | None, label_column: str | None, min_classes: int = 2
) -> tuple[dict[str, LabeledData], str]:
    """The parts of a labelled dataset: ``{"all": data}`` or ``{"train", ["val"], ["test"]}``, and a
    description of where its test split comes from. A folder or file of one class is refused unless
    ``min_classes`` is 1 (data to evaluate on)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        parts = _read_folder(path, text_column, label_column, min_classes)
        return parts, "the test folder/file" if "test" in parts else ""
    if path.is_file():
        if path.suffix.lower() in TEXT_EXTENSIONS:
            return {"all": read_text_file(path, text_column=text_column, label_column=label_column,
                                          min_classes=min_classes)}, ""
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            raise TransferkitError(f"'{path}' is a single image, not a dataset", "pass the folder holding the class subfolders")
        raise TransferkitError(
            f"'{path}' is not a supported dataset file ({path.suffix or 'no extension'})",
            "use a .csv, .tsv or .jsonl file, or a folder of images",
        )
    if is_builtin(str(spec)):
        if text_column or label_column:
            logger.warning("--text-column/--label-column are ignored for the built-in dataset '%s'", spec)
        parts = _builtin_parts(load_builtin(str(spec)))
        return parts, "the official test set" if "test" in parts else ""
    raise _not_found(str(spec))


read_labelled_parts = _read_labelled  # public name (transferkit.data.evaluation reads a dataset's parts)


def _builtin_parts(builtin: BuiltinData) -> dict[str, LabeledData]:
    data = builtin.data
    if builtin.test_index is None:
        return {"all": data}
    is_test = np.zeros(len(data), dtype=bool)
    is_test[builtin.test_index] = True
    return {
        "train": data.subset(np.flatnonzero(~is_test), name=f"{data.name}/train"),
        "test": data.subset(np.flatnonzero(is_test), name=f"{data.name}/test"),
    }


def _check_options(val_fraction: float, test_fraction: float, limit: int | None, test_limit: int | None) -> None:
    if not 0 < val_fraction < 1:
        raise TransferkitError(f"val_fraction must be between 0 and 1, got {val_fraction}", "use e.g. 0.15")
    if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise TransferkitError(
            f"test_fraction must be in [0, 1) with val_fraction + test_fraction < 1, got {test_fraction}", "use e.g. 0.2"
        )
    if limit is not None and limit < 1:
        raise TransferkitError(f"limit per class must be at least 1, got {limit}", "pass a positive number")
    if test_limit is not None and test_limit < 1:
        raise TransferkitError(f"test limit must be at least 1, got {test_limit}", "pass a positive number")


def _dataset_name(spec: str | Path) -> str:
    path = Path(spec).expanduser()
    return path.resolve().name if path.exists() else str(spec).strip().lower()


def load_data(
    spec: str | Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    limit_per_class: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    test_limit: int | None = None,
) -> DataSplits:
    """Load ``spec`` (an existing path first, else a built-in name) as train / validation / test splits.

    * test: the official test set, a ``test`` folder/file, else a stratified ``test_fraction`` carved with a
      fixed seed (none, with a note, when the data is too small); ``test_limit`` N keeps a fixed stratified
      subset of N test examples (the same for every ``seed``).
    * ``limit_per_class`` K: K examples per class drawn (with ``seed``) from the training pool.
    * validation: a ``val`` folder/file, else carved (with ``seed``) per class from the training pool, at
      least one per class: ``val_fraction`` of the whole data when the test was carved from it too, of the
      training pool when the test is given, and of the K examples when ``limit_per_class`` is set.
      With ``limit_per_class`` 1 there is nothing to carve: the validation split is empty (with a note).
    """
    _check_options(val_fraction, test_fraction, limit_per_class, test_limit)
    notes: list[str] = []
    parts, test_origin = _read_labelled(spec, text_column, label_column)
    name = _dataset_name(spec)
    source = parts["all"] if "all" in parts else parts["train"]
    test = parts.get("test")
    pool = source
    pool_val_fraction = val_fraction  # of the training pool; rescaled below when the test is carved from it
    if test is None and test_fraction > 0:
        pool_positions, test_positions = carve_test(source, np.arange(len(source)), test_fraction, notes)
        if test_positions is not None:
            pool, test = source.subset(pool_positions), source.subset(test_positions)
            pool_val_fraction = val_fraction / (1 - test_fraction)  # both fractions are of the whole data
            test_origin = f"a stratified {test_fraction:.0%} of the data (fixed seed, the same for every seed)"
    if limit_per_class is not None:
        pool = splitting.limit_per_class(pool, limit_per_class, seed, notes)
        pool_val_fraction = val_fraction  # few-shot: the validation share is of the K examples per class
        carved = ", validation included" if limit_per_class > 1 and "val" not in parts else ""
        notes.append(f"few-shot: at most {limit_per_class} labelled examples per class (seed {seed}){carved}")
    if "val" in parts:
        train, val = pool, parts["val"]
        if limit_per_class is not None:
            notes.append("the validation folder/file is used as given (the per-class limit applies to training only)")
    elif limit_per_class == 1:
        # one-shot: nothing can be spared for validation; train on all K=1 examples, fixed epochs, last weights
        train, val = pool, pool.subset(np.arange(0))
        notes.append("one labelled example per class: no validation split (fixed epochs, last weights kept)")
    else:
        train_positions, val_positions = carve_validation(pool, np.arange(len(pool)), pool_val_fraction, seed)
        train, val = pool.subset(train_positions), pool.subset(val_positions)
    if test is not None and test_limit is not None and len(test) > test_limit:
        notes.append(
            f"test: a fixed stratified subset of {test_limit} of {len(test)} examples (the same for every seed)"
        )
        test = test.subset(stratified_subset(test, test_limit))
    for split_name, part in (("train", train), ("val", val), ("test", test)):
        if part is not None:
            part.name = f"{name}/{split_name}"
    splits = DataSplits(train=train, val=val, test=test, notes=notes, source=str(spec),
                        given=tuple(part for part in ("val", "test") if part in parts))
    if test is not None and test_origin:
        notes.insert(0, f"test split: {test_origin}")
    notes.extend(tiny_class_notes(splits))
    sizes = splits.sizes()
    # debug: `fit` logs the sizes it trains on once --protocol has decided them (cv merges train and val)
    logger.debug("%s: %d train / %d val / %d test", name, sizes["train"], sizes["val"], sizes["test"])
    return splits


def load_unlabelled(spec: str | Path, *, text_column: str | None = None, test_fraction: float = 0.2) -> LabeledData:
    """Unlabelled data (labels -1, no class names), e.g. the target domain of domain adaptation.

    A folder gives every image below it (class subfolders are ignored; with a train/val/test layout only the
    ``train`` folder); a .csv/.tsv/.jsonl file gives its text column, a .txt file its non-empty lines; a built-in
    gives every example except its test split (official, or the same fixed carve ``load_data`` uses), so target-test labels stay unseen.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        splits = find_split_folders(path)
        if splits is not None:
            logger.info("'%s' has a split layout: using only its '%s' folder as unlabelled data", path, splits["train"].name)
            return read_unlabelled_images(splits["train"], name=f"{path.resolve().name}/train")
        text_files = find_split_files(path)
        if text_files is not None:
            return read_text_file(text_files["train"], text_column=text_column, labelled=False, name=path.resolve().name)
        return read_unlabelled_images(path)
    if path.is_file():
        if path.suffix.lower() not in UNLABELLED_TEXT_EXTENSIONS:
            raise TransferkitError(
                f"'{path}' is not a supported dataset file ({path.suffix or 'no extension'})",
                "use a .txt (one text per line), .csv, .tsv or .jsonl file, or a folder of images",
            )
        return read_text_file(path, text_column=text_column, labelled=False)
    if is_builtin(str(spec)):
        parts = _builtin_parts(load_builtin(str(spec)))
        pool = parts["all"] if "all" in parts else parts["train"]
        if "all" in parts:
            positions, _ = carve_test(pool, np.arange(len(pool)), test_fraction, [])
            pool = pool.subset(positions)
        return pool.without_labels(name=f"{_dataset_name(spec)}/unlabelled")
    raise _not_found(str(spec))


# --- export -------------------------------------------------------------------------------------------------

_UNSAFE_NAME = re.compile(r'[\\/:*?"<>|\x00-\x1f]+')


def _safe_name(text: str) -> str:
    """A file/folder name for ``text``: path separators and characters Windows forbids become '_'."""
    return _UNSAFE_NAME.sub("_", text).strip(" .") or "_"


def _class_folders(class_names: list[str]) -> list[str]:
    folders = [_safe_name(c) for c in class_names]
    if len(set(folders)) != len(folders):
        raise TransferkitError(f"class names {class_names} collide as folder names", "rename the classes")
    renamed = [f"'{c}' -> '{f}'" for c, f in zip(class_names, folders) if c != f]
    if renamed:
        logger.warning("class names changed to be valid folder names: %s", ", ".join(renamed))
    return folders


def _write_images(parts: list[LabeledData], folder: Path, class_folders: list[str]) -> None:
    from tqdm.auto import tqdm

    used: set[str] = set()
    total = sum(len(p) for p in parts)
    with tqdm(total=total, desc=f"export {folder.name}", disable=None, leave=False) as progress:
        for part in parts:
            for i in range(len(part)):
                target_dir = folder / class_folders[int(part.labels[i])]
                stem = _safe_name(str(Path(part.ids[i]).with_suffix("")).replace("/", "_").replace("\\", "_"))
                candidate, n = stem, 1
                while f"{target_dir.name}/{candidate}" in used:
                    n += 1
                    candidate = f"{stem}-{n}"
                used.add(f"{target_dir.name}/{candidate}")
                target_dir.mkdir(parents=True, exist_ok=True)
                part.items[i].save(target_dir / f"{candidate}.png")
                progress.update(1)


def _csv_cell(value: object) -> object:
    if isinstance(value, float) and np.isnan(value):
        return ""
    return value.item() if isinstance(value, np.generic) else value


def _write_texts(parts: list[LabeledData], path: Path) -> None:
    first = parts[0]
    extra = [c for c in first.columns if c not in ("text", "label")]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", *extra])
        for part in parts:
            for i in range(len(part)):
                row = [part.items[i], part.class_names[int(part.labels[i])]]
                writer.writerow(row + [_csv_cell(part.columns[c][i]) for c in extra])


def export_dataset(
    name_or_path: str | Path,
    out_dir: str | Path,
    limit_per_class: int | None = None,
    *,
    seed: int = 0,
    test_limit: int | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a dataset in the on-disk format ``load_data`` reads: images as ``out/train/<class>/<id>.png``
    and ``out/test/<class>/<id>.png``; text as ``out/train.csv`` and ``out/test.csv`` (columns text, label,
    then any extra columns). ``train`` holds the training pool (train + validation of ``load_data``);
    ``test_limit`` N keeps a fixed stratified N of the test split. An image folder holds labels only: other
    columns (e.g. ``stars``' size) are not written, with a warning.

    Written like every output (:class:`transferkit.rundir.OutputFolder`, kind ``dataset``): staged beside
    ``out_dir`` and moved into place at the end under its writer lock, so an interrupted export leaves no
    half-written dataset; ``overwrite`` replaces an earlier export only, never a folder of the user's.
    """
    from transferkit.rundir import OutputFolder

    out = Path(out_dir)
    options = {"data": str(name_or_path), "limit_per_class": limit_per_class, "seed": seed, "test_limit": test_limit,
               "text_column": text_column, "label_column": label_column}
    folder = OutputFolder(out, "dataset", overwrite=overwrite, options=options)
    folder.check()  # a bad folder is refused before the data is read
    splits = load_data(
        name_or_path, limit_per_class=limit_per_class, seed=seed, test_limit=test_limit, text_column=text_column,
        label_column=label_column
    )
    if splits.modality == "image" and splits.train.columns:
        logger.warning("columns %s are not written: an image folder holds the labels only (use '%s' itself for "
                       "--task COLUMN:TYPE)", ", ".join(sorted(splits.train.columns)), name_or_path)
    if splits.modality not in ("image", "text"):
        raise TransferkitError(f"exporting {splits.modality} datasets is not supported", "export image or text data")
    written = {"train": [splits.train, splits.val], "test": [splits.test] if splits.test is not None else []}
    folder.begin()
    with folder:  # an error or Ctrl-C removes the stage
        for split_name, parts in written.items():
            if parts and splits.modality == "image":
                _write_images(parts, folder.stage / split_name, _class_folders(splits.class_names))
            elif parts:
                _write_texts(parts, folder.stage / f"{split_name}.csv")
        folder.publish()
    logger.info("exported %s to %s (%s)", name_or_path, out,
                {name: sum(len(p) for p in parts) for name, parts in written.items() if parts})
    return out
