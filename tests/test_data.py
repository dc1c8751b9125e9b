"""The data layer: image folders, text files, built-ins, splits, few-shot limits, export and the loader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.data import export_dataset, load_data, load_unlabelled
from transferkit.data.base import LabeledData
from transferkit.data.builtin import builtin_arrays, load_builtin, tweet_topic
from transferkit.data.images import read_image_folder
from transferkit.data.loader import make_loader
from transferkit.data.split import limit_per_class, split_data
from transferkit.errors import TransferkitError


def _png(path: Path, value: int, mode: str = "L", size: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)


def _image_folder(root: Path, counts: dict[str, int], mode: str = "L") -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            _png(root / name / f"{i}.png", 20 * c + i, mode)
    return root


# --- image folders ------------------------------------------------------------------------------------------


def test_flat_image_folder_is_split_stratified_with_relative_ids(tmp_path):
    root = _image_folder(tmp_path / "pets", {"cat": 10, "dog": 10})
    splits = load_data(root, seed=0)
    assert splits.class_names == ["cat", "dog"]
    assert splits.sizes() == {"train": 12, "val": 4, "test": 4}  # per class: 2 test, round(1.5)=2 val, 6 train
    all_ids = splits.train.ids + splits.val.ids + splits.test.ids
    assert len(set(all_ids)) == 20 and "cat/0.png" in all_ids
    image = splits.train.items[0]
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (6, 6)
    for part in (splits.train, splits.val, splits.test):
        assert part.modality == "image" and list(part.class_counts()) == [len(part) // 2] * 2


def test_split_layout_with_valid_spelling_keeps_given_splits(tmp_path):
    _image_folder(tmp_path / "d" / "train", {"a": 4, "b": 3}, mode="RGB")
    _image_folder(tmp_path / "d" / "valid", {"a": 1, "b": 1}, mode="RGB")
    _image_folder(tmp_path / "d" / "test", {"a": 2, "b": 2}, mode="RGB")
    splits = load_data(tmp_path / "d")
    assert splits.sizes() == {"train": 7, "val": 2, "test": 4}
    assert splits.test.ids[0] == "test/a/0.png"
    assert splits.val.items[0].mode == "RGB"


def test_split_layout_without_val_carves_validation_from_train(tmp_path):
    _image_folder(tmp_path / "d" / "train", {"a": 6, "b": 6})
    _image_folder(tmp_path / "d" / "test", {"a": 2, "b": 2})
    splits = load_data(tmp_path / "d")
    assert splits.sizes() == {"train": 10, "val": 2, "test": 4}
    assert all(i.startswith("train/") for i in splits.val.ids)


def test_corrupt_image_is_named_with_fix(tmp_path):
    root = _image_folder(tmp_path / "d", {"a": 3, "b": 3})
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(TransferkitError, match=r"b/broken\.png.*remove or replace it"):
        load_data(root)


def test_empty_class_single_class_and_no_images_are_errors(tmp_path):
    root = _image_folder(tmp_path / "empty", {"a": 3, "b": 3})
    (root / "c").mkdir()
    with pytest.raises(TransferkitError, match="'c'.*no images"):
        load_data(root)
    with pytest.raises(TransferkitError, match="single class"):
        load_data(_image_folder(tmp_path / "single", {"a": 3}))
    (tmp_path / "nothing" / "x").mkdir(parents=True)
    with pytest.raises(TransferkitError, match="no images found"):
        load_data(tmp_path / "nothing")


def test_files_in_class_folders_that_are_not_images_are_named_in_a_warning(tmp_path, caplog):
    root = _image_folder(tmp_path / "d", {"a": 3, "b": 3})
    (root / "a" / "notes.txt").write_text("labelling notes")
    (root / "b" / "scan.psd").write_bytes(b"8BPS")
    with caplog.at_level("WARNING", logger="transferkit"):
        data = read_image_folder(root)["all"]
    assert len(data) == 6
    assert "2 file(s) in the class folders" in caplog.text and "a/notes.txt, b/scan.psd" in caplog.text


def test_tiff_and_gif_images_are_read_like_the_other_formats(tmp_path, caplog):
    """Microscopy and scanner images are often TIFF (16-bit grey included); predict already accepted them, so
    training must too, with the same one set of extensions."""
    root = _image_folder(tmp_path / "d", {"a": 2, "b": 2})
    Image.fromarray(np.full((12, 12), 40000, dtype=np.uint16)).save(root / "a" / "scan.tif")
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(root / "b" / "frame.TIFF")
    Image.fromarray(np.zeros((12, 12), dtype=np.uint8)).save(root / "b" / "icon.gif")
    with caplog.at_level("WARNING", logger="transferkit"):
        data = read_image_folder(root)["all"]
    assert len(data) == 7 and "class folders" not in caplog.text


def test_numeric_class_folders_sort_by_value(tmp_path):
    data = read_image_folder(_image_folder(tmp_path / "d", {"10": 2, "2": 2, "1": 2}))["all"]
    assert data.class_names == ["1", "2", "10"]
    assert data.ids[data.labels.tolist().index(2)].startswith("10/")


def test_missing_path_lists_builtins():
    with pytest.raises(TransferkitError, match="no such file or folder 'no/such/place'.*fashion-mnist"):
        load_data("no/such/place")


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    root = _image_folder(tmp_path / "d", {"a": 3, "b": 3})
    before = read_image_folder(root)["all"]
    again = read_image_folder(root)["all"]
    assert before.fingerprint() == again.fingerprint() and before.content_key == again.content_key
    path = root / "a" / "1.png"
    _png(path, 200, size=7)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    after = read_image_folder(root)["all"]
    assert after.fingerprint() != before.fingerprint() and after.content_key != before.content_key
    # subsets of subsets still reach the file fingerprint (no hashing of in-memory images)
    nested = after.subset([0, 1, 2, 3]).subset([1, 2])
    assert nested.fingerprint() == after.subset([1, 2]).fingerprint()


def test_unlabelled_folder(tmp_path):
    for i in range(3):
        _png(tmp_path / "target" / f"{i}.png", i)
    Image.new("RGB", (5, 4), "red").save(tmp_path / "target" / "photo.JPG")
    (tmp_path / "target" / "notes.txt").write_text("not an image")
    data = load_unlabelled(tmp_path / "target")
    assert len(data) == 4 and data.class_names == [] and set(data.labels) == {-1}
    assert data.items[data.ids.index("photo.JPG")].mode == "RGB"


# --- text files ---------------------------------------------------------------------------------------------


def test_csv_defaults_extra_columns_and_numeric_class_order(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["id,review,stars,score"] + [f"r{i},text number {i},{[2, 10][i % 2]},{i / 10}" for i in range(20)]
    path.write_text("\n".join(rows) + "\n")
    splits = load_data(path, label_column="stars", test_fraction=0)
    assert splits.test is None and splits.modality == "text"
    assert splits.class_names == ["2", "10"]  # numeric labels sort by value
    train = splits.train
    assert isinstance(train.items[0], str) and train.items[0].startswith("text number")
    assert train.columns["score"].dtype == np.float64 and "id" in train.columns
    assert train.ids[0].startswith("r")


def test_jsonl_default_columns_and_unknown_column(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"sentence": f"s {i}", "label": ["neg", "pos"][i % 2], "weight": 1.5}) for i in range(12)]
    path.write_text("\n".join(lines))
    splits = load_data(path)
    assert splits.class_names == ["neg", "pos"] and sum(splits.sizes().values()) == 12
    with pytest.raises(TransferkitError, match="no column 'body'.*sentence, label, weight"):
        load_data(path, text_column="body")
    target = load_unlabelled(path)
    assert set(target.labels) == {-1} and "label" not in target.columns and "weight" in target.columns


def test_missing_label_and_empty_text_name_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,x\nb,y\nc,\n")
    with pytest.raises(TransferkitError, match="line 4 .* no label"):
        load_data(path)
    path.write_text("text,label\na,x\n,y\n")
    with pytest.raises(TransferkitError, match="line 3 .* empty text"):
        load_data(path)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n')
    with pytest.raises(TransferkitError, match="line 2 .* no label.*fill in the label or remove the row"):
        load_data(jsonl)



@pytest.mark.parametrize("delimiter, word", [(";", "semicolons"), ("\t", "tabs")])
def test_csv_separated_by_semicolons_or_tabs_is_read_with_that_delimiter(tmp_path, caplog, delimiter, word):
    path = tmp_path / "x.csv"
    rows = [f"text{delimiter}label"] + [f'"a; b, c {i}"{delimiter}{["neg", "pos"][i % 2]}' for i in range(6)]
    path.write_text("\n".join(rows) + "\n")
    with caplog.at_level("INFO", logger="transferkit"):
        splits = load_data(path, test_fraction=0)
    assert splits.class_names == ["neg", "pos"] and splits.train.items[0].startswith("a; b, c")
    assert f"separated by {word}" in caplog.text
    comma = tmp_path / "comma.csv"
    comma.write_text('text,label\n"x;y\tz",a\nw,b\n')
    caplog.clear()
    with caplog.at_level("INFO", logger="transferkit"):
        assert load_unlabelled(comma).items == ["x;y\tz", "w"]
    assert "separated by" not in caplog.text


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_utf16_file_with_a_bom_is_decoded_as_utf16(tmp_path, caplog, encoding):
    path = tmp_path / "x.csv"
    text = "text,label\n" + "".join(f"café {i},{['neg', 'pos'][i % 2]}\n" for i in range(6))
    path.write_bytes(text.encode(encoding) if encoding == "utf-16" else "\ufeff".encode(encoding) + text.encode(encoding))
    with caplog.at_level("WARNING", logger="transferkit"):
        splits = load_data(path, test_fraction=0)
    assert splits.class_names == ["neg", "pos"] and sorted(splits.train.items)[0] == "café 0"
    assert "latin-1" not in caplog.text


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "latin-1"])
def test_causal_lm_passages_are_decoded_as_the_other_text_readers_decode(tmp_path, encoding):
    """read_passages read a .txt as UTF-8 with replacement characters: a UTF-16 file (Windows Notepad's "Unicode")
    became mojibake passages and latin-1 lost its accents; it decodes as every other text reader. A .tsv was read
    as raw text, header and tabs included; it is a table, like .csv and .jsonl."""
    from transferkit.tasks.causal_lm import read_passages

    documents = [f"le café numéro {i} est ouvert tous les jours de la semaine" for i in range(3)]
    (tmp_path / "notes.txt").write_bytes("\n\n".join(documents).encode(encoding))
    assert read_passages(tmp_path / "notes.txt") == documents
    (tmp_path / "notes.tsv").write_text("id\ttext\n" + "".join(f"{i}\t{d}\n" for i, d in enumerate(documents)))
    assert read_passages(tmp_path / "notes.tsv") == documents


def test_labels_that_differ_only_in_case_spacing_or_number_format_are_warned_about_not_merged(tmp_path, caplog):
    path = tmp_path / "x.csv"
    labels = ["negative", "Negative", "very  good", "very good", "0", "0.0", "pos"]
    path.write_text("text,label\n" + "".join(f"t {i},{label}\n" for i, label in enumerate(labels * 2)))
    with caplog.at_level("WARNING", logger="transferkit"):
        splits = load_data(path, test_fraction=0)
    assert len(splits.class_names) == 7
    warnings = [r.getMessage() for r in caplog.records if "separate classes" in r.getMessage()]
    assert len(warnings) == 1
    assert "'Negative' and 'negative' differ only in case" in warnings[0]
    assert "'0' and '0.0' are the same number" in warnings[0]
    assert "'very  good' and 'very good' differ only in spacing" in warnings[0]
    assert "write them identically" in warnings[0]
    caplog.clear()
    path.write_text("text,label\n" + "".join(f"t {i},{['neg', 'Pos', '1', '10'][i % 4]}\n" for i in range(8)))
    with caplog.at_level("WARNING", logger="transferkit"):
        load_data(path, test_fraction=0)
    assert "separate classes" not in caplog.text


def test_unlabelled_txt_file_is_one_text_per_non_empty_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("\ufefffirst note \n\n  second, note\r\n   \nthird".encode())
    data = load_unlabelled(path)
    assert data.items == ["first note", "second, note", "third"] and set(data.labels) == {-1}
    assert data.modality == "text" and data.class_names == []
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(TransferkitError, match="'.*empty.txt' is empty"):
        load_unlabelled(tmp_path / "empty.txt")
    with pytest.raises(TransferkitError, match="not a supported dataset file"):
        load_data(path)


# --- splits -------------------------------------------------------------------------------------------------


def _toy(counts: list[int]) -> LabeledData:
    labels = np.repeat(np.arange(len(counts)), counts)
    return LabeledData(
        items=[f"t{i}" for i in range(len(labels))],
        labels=labels,
        class_names=[f"c{k}" for k in range(len(counts))],
        modality="text",
        ids=[str(i) for i in range(len(labels))],
    )


def test_stratified_split_tiny_classes_and_reproducibility():
    data = _toy([40, 2, 5])
    first = split_data(data, seed=3)
    assert (first.val.class_counts() >= 1).all()
    assert "class 'c1' has 2 examples: 1 for training, 1 for validation, none for test" in first.notes
    again = split_data(data, seed=3)
    other = split_data(data, seed=4)
    assert first.val.ids == again.val.ids
    assert first.test.ids == other.test.ids  # the test split does not depend on the seed
    assert first.val.ids != other.val.ids


def test_single_example_class_and_too_small_for_test():
    with pytest.raises(TransferkitError, match="class 'c1' has a single example.*add examples of it or drop the class"):
        split_data(_toy([5, 1]))
    tiny = split_data(_toy([2, 2]))
    assert tiny.test is None and any("too few for a test split" in n for n in tiny.notes)


def test_limit_per_class_takes_all_of_short_classes():
    notes: list[str] = []
    limited = limit_per_class(_toy([30, 3]), 5, seed=0, notes=notes)
    assert list(limited.class_counts()) == [5, 3] and "'c1' has 3" in notes[0]
    assert limit_per_class(_toy([30, 3]), 5, seed=0).ids == limited.ids
    assert limit_per_class(_toy([30, 3]), 5, seed=1).ids != limited.ids


def test_one_example_per_class_trains_without_validation_and_two_still_carve(tmp_path):
    root = _image_folder(tmp_path / "imgs", {"a": 6, "b": 6})
    one = load_data(root, limit_per_class=1, test_fraction=0.0, seed=3)
    assert list(one.train.class_counts()) == [1, 1] and len(one.val) == 0
    assert any("no validation split" in n for n in one.notes)
    assert one.train.ids != load_data(root, limit_per_class=1, test_fraction=0.0, seed=4).train.ids
    two = load_data(root, limit_per_class=2, test_fraction=0.0, seed=3)
    assert list(two.train.class_counts()) == [1, 1] and list(two.val.class_counts()) == [1, 1]
    with pytest.raises(TransferkitError, match="single example"):
        load_data(_image_folder(tmp_path / "short", {"a": 1, "b": 6}), limit_per_class=2, test_fraction=0.0)


# --- built-ins ----------------------------------------------------------------------------------------------


def test_fashion_mnist_official_split_and_fixed_test_subset():
    full = load_builtin("fashion-mnist")
    assert len(full.data) == 70000 and len(full.test_index) == 10000
    assert full.data.class_names[0] == "T-shirt/top"
    a = load_data("fashion-mnist", limit_per_class=20, test_limit=2000, seed=0)
    b = load_data("fashion-mnist", limit_per_class=20, test_limit=2000, seed=1)
    assert len(a.train) + len(a.val) == 200 and (a.val.class_counts() >= 1).all()
    assert len(a.test) == 2000 and a.test.ids == b.test.ids and list(a.test.class_counts()) == [200] * 10
    assert a.train.ids != b.train.ids
    assert all(i.startswith("fashion-mnist/train/") for i in a.train.ids + a.val.ids)
    image = a.test.items[0]
    assert image.mode == "L" and image.size == (28, 28)
    images, labels, _, test_index = builtin_arrays("fashion-mnist")
    assert images.shape == (70000, 28, 28) and images.dtype == np.uint8 and test_index[0] == 60000
    assert np.array_equal(np.asarray(image), images[int(a.test.ids[0].split("/")[-1]) + 60000])


def test_fashion_mnist_full_sizes():
    splits = load_data("fashion-mnist")
    assert len(splits.train) + len(splits.val) == 60000 and len(splits.test) == 10000


def test_digits_and_mnist_5k():
    images, labels, names, test_index = builtin_arrays("digits")
    assert images.shape == (1797, 8, 8) and images.max() == 255 and test_index is None and names[3] == "3"
    splits = load_data("digits")
    assert sum(splits.sizes().values()) == 1797 and splits.test is not None
    mnist = load_data("mnist-5k")
    assert sum(mnist.sizes().values()) == 5000
    assert np.any(np.diff(mnist.train.labels) < 0)  # not sorted by class
    x, y, _, _ = builtin_arrays("mnist-5k")
    assert x.shape == (5000, 28, 28) and len(set(y[:50].tolist())) >= 5


def test_tweets_topics():
    assert tweet_topic("@united lost my bag") == "airline" and tweet_topic("hello") == "other"
    data = load_builtin("tweets").data
    topics, counts = np.unique(data.columns["topic"].astype(str), return_counts=True)
    by_topic = dict(zip(topics.tolist(), counts.tolist()))
    assert len(data) == 38158 and data.class_names == ["negative", "neutral", "positive"]
    assert by_topic["airline"] > 10000 and by_topic["other"] < 500 and len(by_topic) == 7
    airline = load_data("tweets:airline")
    assert sum(airline.sizes().values()) == by_topic["airline"]
    assert set(airline.train.columns["topic"]) == {"airline"}
    with pytest.raises(TransferkitError, match="no topic 'cats'"):
        load_data("tweets:cats")


# --- export -------------------------------------------------------------------------------------------------


def test_export_round_trip_images_and_refusal(tmp_path):
    out = export_dataset("digits", tmp_path / "digits", limit_per_class=4)
    original = load_data("digits", limit_per_class=4)
    reloaded = load_data(out)
    assert len(reloaded.train) + len(reloaded.val) == 40
    assert len(reloaded.test) == len(original.test) and reloaded.class_names == original.class_names
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # temporary folder renamed
    with pytest.raises(TransferkitError, match="already holds a finished dataset.*--overwrite"):
        export_dataset("digits", out)


def test_export_is_a_run_folder_writer_overwrite_replaces_only_its_own_export(tmp_path, capsys):
    """data export goes through the one output lifecycle: staged, locked, published with a marker; --overwrite
    replaces an earlier export but never a folder of the user's, nor an export holding a file it did not write."""
    from transferkit.cli.main import main
    from transferkit.rundir import acquire_writer_lock, output_kind, release_writer_lock

    out = export_dataset("digits", tmp_path / "d", limit_per_class=2, test_limit=10)
    assert output_kind(out) == "dataset"
    assert main(["data", "export", "digits", str(out), "--limit-per-class", "3", "--test-limit", "10",
                 "--overwrite"]) == 0
    assert len(load_data(out, test_fraction=0).train) + len(load_data(out, test_fraction=0).val) == 30
    (out / "my-notes.txt").write_text("mine")
    assert main(["data", "export", "digits", str(out), "--overwrite"]) == 2
    assert "my-notes.txt" in capsys.readouterr().err and (out / "my-notes.txt").read_text() == "mine"
    mine = tmp_path / "photos"
    (mine / "cats").mkdir(parents=True)
    (mine / "cats" / "a.txt").write_text("x")
    assert main(["data", "export", "digits", str(mine), "--overwrite"]) == 2
    assert (mine / "cats" / "a.txt").read_text() == "x" and "not a transferkit output" in capsys.readouterr().err
    held = acquire_writer_lock(tmp_path / "busy")
    try:
        with pytest.raises(TransferkitError, match="another transferkit process is writing"):
            export_dataset("digits", tmp_path / "busy", limit_per_class=2)
    finally:
        release_writer_lock(tmp_path / "busy", held)
    assert not (tmp_path / "busy").exists()


def test_export_says_what_it_wrote_limits_the_test_split_and_names_dropped_columns(tmp_path, capsys):
    from transferkit.cli.main import main

    assert main(["data", "export", "digits", str(tmp_path / "d"), "--limit-per-class", "3", "--test-limit",
                 "20"]) == 0
    assert "{'train': 30, 'test': 20}" in capsys.readouterr().err  # train holds the validation items: one folder
    reloaded = load_data(tmp_path / "d", test_fraction=0)
    assert len(reloaded.test) == 20 and len(reloaded.train) + len(reloaded.val) == 30
    assert sorted(np.bincount(reloaded.test.labels).tolist()) == [2] * 10  # stratified
    assert main(["data", "export", "stars", str(tmp_path / "s"), "--limit-per-class", "2", "--test-limit", "6"]) == 0
    err = capsys.readouterr().err
    assert "count, rotation, size" in err and "not written" in err


def test_export_round_trip_text(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label,topic\n" + "".join(f"sample {i},{'ab'[i % 2]},t{i % 3}\n" for i in range(30)))
    out = export_dataset(path, tmp_path / "out")
    assert (out / "train.csv").exists() and (out / "test.csv").exists()
    before, after = load_data(path), load_data(out)
    assert after.sizes() == before.sizes() and after.class_names == before.class_names
    assert "topic" in after.train.columns


# --- loader -------------------------------------------------------------------------------------------------


class _DummyBackbone:
    """Turns a PIL image into its mean pixel value; collate stacks them."""

    def preprocess(self, item, train=False):
        return torch.tensor([float(np.asarray(item).mean())])

    def collate(self, items):
        return torch.stack(items)


def test_loader_batches_are_dicts_seeded_and_complete(tmp_path):
    data = read_image_folder(_image_folder(tmp_path / "d", {"a": 4, "b": 3}))["all"]
    data.columns = {"weight": np.arange(7, dtype=np.float64), "note": np.array(list("abcdefg"), dtype=object)}
    batches = list(make_loader(data, _DummyBackbone(), batch_size=3, train=True, seed=5))
    assert [len(b["labels"]) for b in batches] == [3, 3, 1]  # nothing dropped
    first = batches[0]
    assert first["inputs"].shape == (3, 1) and first["labels"].dtype == torch.long
    assert "note" not in first and first["weight"].dtype == torch.float32
    index = torch.cat([b["index"] for b in batches])
    assert sorted(index.tolist()) == list(range(7))
    assert torch.equal(torch.cat([b["weight"] for b in batches]), index.float())
    assert torch.equal(torch.cat([b["labels"] for b in batches]), torch.as_tensor(data.labels)[index])
    again = torch.cat([b["index"] for b in make_loader(data, _DummyBackbone(), 3, train=True, seed=5)])
    assert torch.equal(index, again)
    ordered = torch.cat([b["index"] for b in make_loader(data, _DummyBackbone(), 3, train=False, seed=5)])
    assert ordered.tolist() == list(range(7))


def test_split_layouts_reject_two_spellings_and_a_missing_train_split(tmp_path) -> None:
    from transferkit.data.images import find_split_folders
    from transferkit.data.text import find_split_files
    from transferkit.errors import TransferkitError

    images = tmp_path / "images"
    for name in ("train", "val", "validation"):
        (images / name).mkdir(parents=True)
    with pytest.raises(TransferkitError, match="several val folders"):
        find_split_folders(images)
    (images / "validation").rmdir()
    assert set(find_split_folders(images)) == {"train", "val"}

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "test.csv").write_text("text,label\na,b\n")
    with pytest.raises(TransferkitError, match="no train file"):
        find_split_files(texts)
    (texts / "train.jsonl").write_text('{"text": "a", "label": "b"}\n')
    assert find_split_files(texts) == {"train": texts / "train.jsonl", "test": texts / "test.csv"}
    assert find_split_files(tmp_path) is None


def test_evaluation_data_may_hold_a_single_class_training_data_may_not(tmp_path):
    """"How does my model do on these new Bag photos?": a folder (or a CSV) of one class evaluates; training on it
    is still refused."""
    from transferkit.data.evaluation import load_for_evaluation

    root = _image_folder(tmp_path / "d", {"b": 3})
    data = load_for_evaluation(root, ["a", "b"])
    assert len(data) == 3 and data.labels.tolist() == [1, 1, 1] and data.class_names == ["a", "b"]
    table = tmp_path / "t.csv"
    table.write_text("text,label\nfine,pos\ngreat,pos\n")
    assert load_for_evaluation(table, ["neg", "pos"]).labels.tolist() == [1, 1]
    for single in (root, table):
        with pytest.raises(TransferkitError, match="single class"):
            load_data(single)


def test_a_macos_zip_folder_is_skipped_like_hidden_files(tmp_path):
    """Unzipping on macOS leaves __MACOSX/ (with ._name.png forks): it is no class, at the top or inside a class."""
    root = _image_folder(tmp_path / "d", {"a": 2, "b": 2})
    for junk in (root / "__MACOSX" / "a", root / "a" / "__MACOSX"):
        junk.mkdir(parents=True)
        (junk / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    data = read_image_folder(root)["all"]
    assert data.class_names == ["a", "b"] and len(data) == 4


def test_open_image_says_a_missing_file_or_a_folder_is_one(tmp_path):
    """`search --image nope.png` said the file "cannot be decoded ... remove or replace the file"."""
    from transferkit.data.images import open_image

    with pytest.raises(TransferkitError, match="'.*nope.png' does not exist.*check the path"):
        open_image(tmp_path / "nope.png")
    with pytest.raises(TransferkitError, match="is a folder, not an image file"):
        open_image(tmp_path)


def test_symlinked_subfolders_inside_a_class_are_followed_once(tmp_path):
    """A class folder that links in another folder of its images (a common way to assemble a dataset) counts
    them; a link back to an ancestor is no endless loop."""
    root = _image_folder(tmp_path / "d", {"a": 2, "b": 2})
    extra = _image_folder(tmp_path / "elsewhere", {"more": 3}) / "more"
    (root / "a" / "linked").symlink_to(extra, target_is_directory=True)
    (root / "b" / "loop").symlink_to(root / "b", target_is_directory=True)
    data = read_image_folder(root)["all"]
    assert len(data) == 7 and sum(1 for i in data.ids if i.startswith("a/linked/")) == 3
