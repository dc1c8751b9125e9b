"""Image datasets: folders of image files (``<root>/<class>/*.png`` or ``<root>/{train,val,test}/<class>/...``),
unlabelled folders, and lazily decoded in-memory arrays.

Images are opened only when an item is requested; scanning verifies every file (``PIL.Image.verify``) so that a
corrupt file is reported before training starts, not in the middle of an epoch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transferkit.data.base import ItemSource, LabeledData, sort_class_names
from transferkit.errors import TransferkitError, listed

logger = logging.getLogger(__name__)

#: the image files read everywhere (training folders, --unlabelled, predict, image search): the formats PIL decodes
#: that cameras, scanners and microscopes write (16-bit TIFF included, see ``to_standard_mode``)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IMAGE_FILES = "/".join(IMAGE_EXTENSIONS)  # for messages: ".png/.jpg/..."
# canonical split name -> accepted folder names (matched case-insensitively)
SPLIT_FOLDER_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("val", "valid", "validation"),
    "test": ("test",),
}
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_MAX_LISTED = 5


def to_standard_mode(image: Image.Image) -> Image.Image:
    """Greyscale-like modes become ``"L"``, everything else (palette, RGBA, CMYK, ...) ``"RGB"``."""
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit grey: rescale into 0..255
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        return Image.fromarray(np.round(scaled).astype(np.uint8))
    return image.convert("L" if image.mode in _GREY_MODES else "RGB")


def _decoded(image: Image.Image) -> Image.Image:
    """``image`` (just opened) decoded fully, upright per its EXIF orientation, in mode ``"L"`` or ``"RGB"``."""
    image.load()
    upright = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    standard = to_standard_mode(upright)
    return standard.copy() if standard is image else standard  # closing the file invalidates `image`


def open_image(path: Path) -> Image.Image:
    """Decode one image file fully (the file handle is closed afterwards), upright per its EXIF orientation,
    in mode ``"L"`` or ``"RGB"``."""
    if not Path(path).is_file():
        what = "is a folder, not an image file" if Path(path).is_dir() else "does not exist"
        raise TransferkitError(f"image file '{path}' {what}", "check the path")
    try:
        with Image.open(path) as image:
            return _decoded(image)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise TransferkitError(
            f"image file '{path}' cannot be decoded ({error})", "remove or replace the file"
        ) from error


#: formats accepted from untrusted bytes (``decode_image_bytes``)
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")


def decode_image_bytes(data: bytes, name: str = "image", max_pixels: int = 40_000_000) -> Image.Image:
    """Decode an untrusted image file's bytes like ``open_image``. Decompression bombs are refused before any
    pixel is decoded (width x height from the header must be <= ``max_pixels``: the limit, whatever PIL's own
    ``Image.MAX_IMAGE_PIXELS`` warns about; PIL still refuses twice its own, which ``transferkit serve`` raises to
    ``max_pixels``), only ``UPLOAD_FORMATS`` are parsed, and a truncated file is an error (PIL's
    ``LOAD_TRUNCATED_IMAGES`` is left off)."""
    import io
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is the limit, checked here
            with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise TransferkitError(f"{name} has {width}x{height} pixels, more than the limit of "
                                           f"{max_pixels:,}", "send a smaller image")
                return _decoded(image)
    except TransferkitError:
        raise
    except Exception as error:  # any parser failure on untrusted bytes is the file's fault, never the server's
        detail = str(error).splitlines()[0] if str(error) else error.__class__.__name__
        if isinstance(error, UnidentifiedImageError):  # PIL names the in-memory buffer's repr, not the file
            detail = "not a recognised image format"
        raise TransferkitError(f"{name} cannot be decoded as an image ({detail})",
                               f"send a complete {', '.join(UPLOAD_FORMATS)} file") from None


class _FileImageLoader:
    """Picklable ``i -> PIL image`` for a list of files (DataLoader workers may be spawned processes)."""

    def __init__(self, root: Path, relative_paths: Sequence[str]) -> None:
        self.root = root
        self.relative_paths = list(relative_paths)

    def __call__(self, i: int) -> Image.Image:
        return open_image(self.root / self.relative_paths[i])


class _ConstantBytes:
    """Picklable ``() -> bytes`` returning a precomputed fingerprint."""

    def __init__(self, value: bytes) -> None:
        self.value = value

    def __call__(self) -> bytes:
        return self.value


class _ArrayImageLoader:
    """Picklable ``i -> PIL image`` built on demand from a ``(N, H, W)`` or ``(N, H, W, 3)`` uint8 array."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __call__(self, i: int) -> Image.Image:
        return Image.fromarray(np.array(self.array[i], dtype=np.uint8))  # a copy: images never alias the array


def array_digest(*arrays: np.ndarray) -> bytes:
    """sha256 over dtype, shape and bytes of the arrays (for fingerprints of array-backed datasets)."""
    h = hashlib.sha256()
    for array in arrays:
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.digest()


def images_from_array(
    images: np.ndarray,
    labels: np.ndarray | Sequence[int],
    class_names: list[str],
    *,
    name: str,
    ids: list[str] | None = None,
    digest: bytes | None = None,
) -> LabeledData:
    """A lazy image dataset over a uint8 array ``(N, H, W)`` (mode "L") or ``(N, H, W, 3)`` (mode "RGB").

    No PIL image is built until an item is requested. ``digest`` (e.g. from ``array_digest``) is the content
    fingerprint; it is computed here when not given.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise ValueError(f"expected uint8 images of shape (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    digest = digest if digest is not None else array_digest(images, labels)
    return LabeledData(
        items=ItemSource(len(images), _ArrayImageLoader(images), _ConstantBytes(digest)),
        labels=labels,
        class_names=list(class_names),
        modality="image",
        ids=ids if ids is not None else [f"{name}/{i}" for i in range(len(images))],
        name=name,
        content_key=hashlib.sha256(name.encode() + digest).hexdigest()[:24],
    )


# --- folders ------------------------------------------------------------------------------------------------


def is_hidden(name: str) -> bool:
    """Hidden files and folders (``.ipynb_checkpoints``, macOS' ``._x.jpg`` forks) and the ``__MACOSX`` folder that
    unzipping on macOS leaves: never data."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path.name)


def _visible_subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name))


def is_image_array(value: object) -> bool:
    """An H x W or H x W x C (C = 1, 3 or 4) numeric array: one image (see ``backbones.base.array_image``)."""
    return (isinstance(value, np.ndarray) and value.dtype.kind in "biuf" and value.size > 0
            and (value.ndim == 2 or (value.ndim == 3 and value.shape[-1] in (1, 3, 4))))


def is_one_input(items: object, modality: str) -> bool:
    """True if ``items`` is one input rather than a collection of them: a str, Path or PIL image, or, for an image
    model, one numpy image (a text is never split into characters). The rule of ``api.as_inputs`` (predict),
    shared with ``VectorIndex.search``."""
    return isinstance(items, (str, Path, Image.Image)) or (modality == "image" and is_image_array(items))


def images_under(folder: Path, others: list[Path] | None = None) -> list[Path]:
    """Image files anywhere below ``folder`` (sorted; hidden files and folders skipped; linked folders followed,
    each real folder once, so a link to an ancestor is no loop); the other visible files are appended to
    ``others`` when it is given (so that the caller can say they were ignored)."""
    found, seen = [], set()
    for current, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        folders[:] = sorted(name for name in folders if not is_hidden(name))
        for name in files:
            path = Path(current) / name
            if is_image_file(path):
                found.append(path)
            elif others is not None and not is_hidden(name) and path.is_file():
                others.append(path)
    return sorted(found)


def find_split_folders(root: Path) -> dict[str, Path] | None:
    """``{"train": ..., "val": ..., "test": ...}`` (present ones) when ``root`` uses the split layout, else None."""
    return match_split_names(root, {p.name.lower(): p for p in _visible_subfolders(root)}, ("",), "folder",
                             "add a 'train' folder with one subfolder per class")


def match_split_names(root: Path, entries: dict[str, Path], suffixes: Sequence[str], kind: str,
                      train_fix: str) -> dict[str, Path] | None:
    """The entries of ``root`` (keyed by lower-case name) named like a split, e.g. ``val`` + ``.csv``:
    ``{"train": ..., "val": ..., "test": ...}`` (present ones), None when none is; two spellings of one split or
    splits without a train entry are errors."""
    found: dict[str, Path] = {}
    for split, spellings in SPLIT_FOLDER_NAMES.items():
        matches = [entries[s + ext] for s in spellings for ext in suffixes if s + ext in entries]
        if len(matches) > 1:
            raise TransferkitError(f"'{root}' has several {split} {kind}s ({', '.join(m.name for m in matches)})",
                                   "keep one of them")
        if matches:
            found[split] = matches[0]
    if not found:
        return None
    if "train" not in found:
        raise TransferkitError(f"'{root}' has {', '.join(p.name for p in found.values())} but no train {kind}",
                               train_fix)
    return found


def _verify_images(root: Path, files: list[Path]) -> None:
    """Open every file with ``PIL.Image.verify``; report all unreadable ones in one error."""
    bad = []
    for path in files:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:  # PIL raises many types (SyntaxError for broken PNG chunks, OSError, ...)
            bad.append(path.relative_to(root).as_posix())
    if bad:
        shown = listed(bad, _MAX_LISTED)
        what = "an image file that cannot be opened" if len(bad) == 1 else f"{len(bad)} image files that cannot be opened"
        raise TransferkitError(f"'{root}' contains {what}: {shown}", "remove or replace it" if len(bad) == 1 else "remove or replace them")


def _file_dataset(
    root: Path, files: list[Path], labels: list[int], class_names: list[str], name: str
) -> LabeledData:
    """A lazy dataset over ``files``; ids are paths relative to ``root``; the fingerprint covers
    (relative path, size, mtime_ns) of every file, so editing or replacing a file changes it."""
    _verify_images(root, files)
    relative = [f.relative_to(root).as_posix() for f in files]
    h = hashlib.sha256()
    for rel, path in zip(relative, files):
        stat = path.stat()
        h.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    digest = h.digest()
    return LabeledData(
        items=ItemSource(len(files), _FileImageLoader(root, relative), _ConstantBytes(digest)),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=class_names,
        modality="image",
        ids=relative,
        name=name,
        content_key=hashlib.sha256(b"image-folder\0" + digest).hexdigest()[:24],
    )


def _scan_class_folders(folder: Path) -> dict[str, list[Path]]:
    """``{class name: image files}`` for the class subfolders of ``folder`` (sorted by class name)."""
    loose = [p for p in folder.iterdir() if is_image_file(p)]
    subfolders = _visible_subfolders(folder)
    if not subfolders:
        if loose:
            raise TransferkitError(
                f"'{folder}' holds images but no class subfolders, so there are no labels",
                f"put the images into one subfolder per class ('{folder.name}/<class>/image.png'); "
                "for unlabelled target data use it as an unlabelled folder",
            )
        raise TransferkitError(f"no images found in '{folder}'", f"add one subfolder per class holding {IMAGE_FILES} files")
    if loose:
        logger.warning("%d image(s) directly in '%s' are ignored: only images inside class subfolders count", len(loose), folder)
    by_name = {sub.name: sub for sub in subfolders}
    others: list[Path] = []
    by_class = {c: images_under(by_name[c], others) for c in sort_class_names(by_name)}
    if others:
        logger.warning("%d file(s) in the class folders of '%s' are not %s images and are ignored (%s)",
                       len(others), folder, IMAGE_FILES,
                       listed(sorted(p.relative_to(folder).as_posix() for p in others), 3))
    if not any(by_class.values()):
        raise TransferkitError(
            f"no images found in the class folders of '{folder}'", f"add {IMAGE_FILES} files to the class folders"
        )
    return by_class


def _check_classes(folder: Path, by_class: dict[str, list[Path]], min_classes: int = 2) -> None:
    empty = [name for name, files in by_class.items() if not files]
    if empty:
        raise TransferkitError(
            f"class folder{'s' if len(empty) > 1 else ''} {', '.join(repr(e) for e in empty)} in '{folder}' "
            f"hold{'' if len(empty) > 1 else 's'} no images",
            "add images or remove the empty folder",
        )
    if len(by_class) < min_classes:
        only = next(iter(by_class))
        raise TransferkitError(
            f"'{folder}' has a single class ('{only}'); a classifier needs at least two",
            "add a subfolder per further class",
        )


def read_image_folder(root: Path, name: str | None = None, min_classes: int = 2) -> dict[str, LabeledData]:
    """Read a labelled image folder (of at least ``min_classes`` classes: 2 to train, 1 to evaluate on).

    Returns ``{"all": data}`` for ``<root>/<class>/...`` or ``{"train": ..., "val": ..., "test": ...}`` (the
    folders present) for ``<root>/{train,val,test}/<class>/...``; class names come from ``train`` and
    are the folder names in ``sort_class_names`` order (numeric names by value, else alphabetical). A class
    found only in val/test is an error.
    """
    root = Path(root)
    name = name or root.resolve().name
    splits = find_split_folders(root)
    if splits is None:
        by_class = _scan_class_folders(root)
        _check_classes(root, by_class, min_classes)
        class_names = list(by_class)
        files = [f for c in class_names for f in by_class[c]]
        labels = [i for i, c in enumerate(class_names) for _ in by_class[c]]
        return {"all": _file_dataset(root, files, labels, class_names, name)}

    extra = [p.name for p in _visible_subfolders(root) if p not in splits.values()]
    if extra:
        logger.warning("folders %s in '%s' are ignored (split layout: train/val/test)", extra, root)
    train_by_class = _scan_class_folders(splits["train"])
    _check_classes(splits["train"], train_by_class)
    class_names = list(train_by_class)
    index = {c: i for i, c in enumerate(class_names)}
    result = {}
    for split, folder in splits.items():
        by_class = train_by_class if split == "train" else _scan_class_folders(folder)
        unknown = [c for c in by_class if c not in index]
        if unknown:
            raise TransferkitError(
                f"'{folder}' has class folder(s) {unknown} that 'train' does not have",
                "add training images for these classes or remove the folders",
            )
        files = [f for c in by_class for f in by_class[c]]
        labels = [index[c] for c in by_class for _ in by_class[c]]
        result[split] = _file_dataset(root, files, labels, class_names, f"{name}/{split}")
    return result


def read_unlabelled_images(root: Path, name: str | None = None) -> LabeledData:
    """Every image below ``root`` (any folder structure; class folders, if any, are ignored) with label -1."""
    root = Path(root)
    files = images_under(root)
    if not files:
        raise TransferkitError(f"no images found in '{root}'", f"add {IMAGE_FILES} files")
    return _file_dataset(root, files, [-1] * len(files), [], name or root.resolve().name)
