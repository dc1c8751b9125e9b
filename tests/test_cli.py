"""End-to-end: fit / evaluate / predict through the CLI and the Python API, run folders, bad input, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transferkit
from tests.conftest import ANIMALS, MUSIC, stripes
from transferkit.cli.main import main
from transferkit.errors import TransferkitError

SMALL = ["--backbone", "small_cnn", "--epochs", "3", "--batch-size", "8", "--lr", "0.01"]



@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stripes")
    for cls, direction in (("horizontal", "h"), ("vertical", "v")):
        (root / cls).mkdir()
        for i in range(14):
            stripes(direction, i).save(root / cls / f"{i:02d}.png")
    return root


pytestmark = pytest.mark.usefixtures("isolated_cache")  # tests/conftest.py


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_run(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "stripes"
    os.environ["TRANSFERKIT_PROGRESS"] = "0"
    # holdout: these tests read the carved test split (the cv protocol has its own tests in test_crossfit.py)
    assert main(["fit", "--data", str(image_folder), "--strategy", "finetune", *SMALL, "--protocol", "holdout",
                 "--out", str(out)]) == 0
    return out


def test_fit_writes_a_complete_run(trained_run):
    assert (trained_run / "model" / "model.safetensors").is_file()
    assert (trained_run / "model" / "config.json").is_file()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "trainable_params", "total_params", "train_seconds", "peak_memory_mb",
                "dataset_sizes", "config", "accuracy_split"):
        assert key in metrics
    assert 0 <= metrics["accuracy"] <= 1 and metrics["accuracy_split"] == "test"
    assert metrics["accuracy"] >= 0.75  # stripes are easy
    assert metrics["config"]["strategy"]["name"] == "finetune"
    history = [json.loads(line) for line in (trained_run / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == list(range(1, len(history) + 1))
    assert not list(trained_run.parent.glob(".stripes.partial"))  # staging folder moved into place


def test_evaluate_json_is_one_document(trained_run, image_folder, capsys):
    code, out, err = run_cli(["evaluate", "--model", trained_run, "--data", image_folder, "--json"], capsys)
    assert code == 0
    report = json.loads(out)  # exactly one JSON document on stdout
    assert set(report) >= {"accuracy", "macro_f1", "n", "labels", "confusion_matrix", "per_class"}
    assert report["n"] == 28 and report["labels"] == ["horizontal", "vertical"]
    assert sum(map(sum, report["confusion_matrix"])) == 28


def test_evaluate_table(trained_run, image_folder, capsys):
    code, out, _ = run_cli(["evaluate", "--model", trained_run, "--data", image_folder], capsys)
    assert code == 0 and "accuracy" in out and "confusion matrix" in out


def test_predict_folder_writes_csv(trained_run, image_folder, tmp_path, capsys):
    csv_path = tmp_path / "preds.csv"
    code, out, _ = run_cli(["predict", "--model", trained_run, image_folder, "--csv", csv_path, "--json"], capsys)
    assert code == 0
    rows = json.loads(out)["predictions"]
    assert len(rows) == 28 and all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "input,prediction,p(horizontal),p(vertical)" and len(lines) == 29


def test_predict_on_a_folder_decodes_one_batch_at_a_time(trained_run, image_folder, tmp_path, capsys,
                                                         opened_images, monkeypatch):
    """predict decoded every image of a folder before its first batch (2.7 GB for 200 photos, whatever
    --batch-size): now each forward pass finds only its own and earlier batches decoded, and the rows are those of
    the file-backed data that evaluate reads lazily (same order, same probabilities)."""
    from transferkit.data.images import read_unlabelled_images
    from transferkit.model import TransferModel

    forward, passes = TransferModel.forward, []

    def counting(self, inputs):
        passes.append((len(opened_images), len(inputs)))
        return forward(self, inputs)

    monkeypatch.setattr(TransferModel, "forward", counting)
    code, out, err = run_cli(["predict", "--model", trained_run, image_folder, "--batch-size", "8", "--csv",
                              tmp_path / "p.csv", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)["predictions"]
    assert len(rows) == len(opened_images) == 28 and [n for _, n in passes] == [8, 8, 8, 4]
    assert [decoded for decoded, _ in passes] == [8, 16, 24, 28]
    data = read_unlabelled_images(image_folder)
    expected = transferkit.load(trained_run).predict_proba_data(data, batch_size=8)
    assert [Path(row["input"]) for row in rows] == [image_folder / i for i in data.ids]
    np.testing.assert_allclose([list(row["probabilities"].values()) for row in rows], expected, atol=1e-6)


def test_python_predict_takes_one_path_or_image_as_one_input(trained_run, image_folder):
    """transferkit.predict(model, "x.png") iterated the string (one character at a time; "/" walked the whole file
    system), a Path or a PIL image was a TypeError and so was [PIL image]: each is one input, as for model.predict;
    one folder stands for its images."""
    model = transferkit.load(trained_run)
    file = image_folder / "vertical" / "03.png"
    expected = model.predict_proba([str(file)])[0]
    image = Image.open(file)
    for one in (file, str(file), image, [image], [np.asarray(image)]):
        rows = transferkit.predict(model, one)
        assert len(rows) == 1 and rows[0]["prediction"] == "vertical"
        np.testing.assert_allclose(list(rows[0]["probabilities"].values()), expected, atol=1e-6)
    assert [row["input"] for row in transferkit.predict(model, [file, image])] == [str(file), "item[1]"]
    assert len(transferkit.predict(model, str(image_folder / "vertical"))) == 14


def test_python_api_refuses_what_is_no_image_in_one_line(trained_run, image_folder):
    """model.predict([array]), (None), ([3]) on an image model were TypeErrors from pathlib, batch_size=0 torch's
    ValueError and a folder "does not exist": numpy images are images now (one H x W (x C) array, a batch N x H x W,
    or a list), the rest is one line naming the problem and the fix."""
    model = transferkit.load(trained_run)
    file = image_folder / "horizontal" / "00.png"
    pixels = np.asarray(Image.open(file))
    np.testing.assert_allclose(model.predict_proba([pixels]), model.predict_proba(file), atol=1e-6)
    np.testing.assert_allclose(model.predict_proba(pixels / 255.0), model.predict_proba(file), atol=1e-6)
    np.testing.assert_allclose(model.predict_proba(np.stack([pixels, pixels.T])),
                               model.predict_proba([file, pixels.T]), atol=1e-6)
    cases = [(None, "cannot predict None"), ([3], "input 0 (int 3)"), ([file, np.zeros(5)], "input 1 (a float64 "),
             (object(), "cannot predict object"), ({"a": file}, "cannot predict dict"),
             (image_folder / "vertical", "is a folder"), ([image_folder / "none.png"], "does not exist")]
    for bad, message in cases:
        with pytest.raises(TransferkitError) as info:
            model.predict(bad)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert "transferkit.predict(model, [folder])" in str(pytest.raises(TransferkitError, model.predict,
                                                                        str(image_folder)).value)
    for batch_size in (0, -1, 2.5):
        with pytest.raises(TransferkitError, match="invalid batch_size"):
            model.predict([file], batch_size=batch_size)


@pytest.fixture(scope="module")
def text_run(tiny_bert_dir, tmp_path_factory) -> Path:
    """A linear probe on a tiny BERT: texts about animals or music."""
    folder = tmp_path_factory.mktemp("text-run")
    rng = np.random.default_rng(0)
    rows = ["text,label"] + [f"{' '.join(rng.choice(ANIMALS if i % 2 else MUSIC, 2 + i % 4))},"
                             f"{'animals' if i % 2 else 'music'}" for i in range(16)]
    (folder / "texts.csv").write_text("\n".join(rows) + "\n")
    return transferkit.fit(str(folder / "texts.csv"), backbone=f"hf:{tiny_bert_dir}", strategy="linear-probe",
                           out=str(folder / "run"), progress=False, seed=0, max_length=16).path


def test_python_predict_on_a_text_model_takes_one_text_and_refuses_non_texts(text_run):
    """transferkit.predict(model, "a text") predicted every character; model.predict(None) or ([1, 2]) predicted the
    strings "None", "1", "2". A str is one text, anything but str is refused in one line."""
    model = transferkit.load(text_run)
    rows = transferkit.predict(model, "the cat sat on the mat")
    assert [row["input"] for row in rows] == ["the cat sat on the mat"]
    assert rows[0]["prediction"] == model.predict("the cat sat on the mat")[0]
    assert model.predict_proba("the cat sat on the mat").shape == (1, 2)
    for bad in (None, [1, 2], ["the cat", None], 3, [Path("the cat")], b"the cat"):
        with pytest.raises(TransferkitError, match="a text model takes texts") as info:
            model.predict(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(TransferkitError, match="a text model takes texts"):
        transferkit.predict(model, [1, 2])
    with pytest.raises(TransferkitError, match="invalid batch_size"):
        model.predict_proba(["the cat"], batch_size=0)


def test_predict_a_text_file_predicts_every_text_of_it(tiny_bert_dir, trained_run, tmp_path, capsys, monkeypatch):
    """A .csv / .tsv / .jsonl / .txt file given to a text model was refused as 'a file': it stands for its texts
    (the column the run was trained with, or --text-column; a .txt: one text per non-empty line), in file order,
    and like a folder of images writes predictions.csv (never over an existing one without --overwrite)."""
    rng = np.random.default_rng(0)
    rows = ["body,topic"] + [f"{' '.join(rng.choice(ANIMALS if i % 2 else MUSIC, 3))},{'animals' if i % 2 else 'music'}"
                             for i in range(16)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    run = transferkit.fit(str(tmp_path / "train.csv"), backbone=f"hf:{tiny_bert_dir}", strategy="linear-probe",
                          out=str(tmp_path / "run"), progress=False, seed=0, max_length=16, text_column="body",
                          label_column="topic").path
    texts = ["the cat sat on the mat", "guitar playing today", "a dog fell"]
    expected = transferkit.load(run).predict_proba(texts)
    monkeypatch.chdir(tmp_path)
    # 'body' is no default text column and 'title' is another text column: the trained column decides
    (tmp_path / "new.csv").write_text("id,title,body\n" + "".join(f'{i},"t{i}","{t}"\n' for i, t in enumerate(texts)))
    code, out, err = run_cli(["predict", "--model", run, "new.csv"], capsys)
    assert code == 0, err
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[0] == "input,prediction,p(animals),p(music)" and [line.split(",")[0] for line in lines[1:]] == texts
    assert "predictions written to predictions.csv" in out
    probabilities = [[float(v) for v in line.split(",")[2:]] for line in lines[1:]]
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    code, _, err = run_cli(["predict", "--model", run, "new.csv"], capsys)  # an existing predictions.csv stays
    assert code == 2 and "predictions.csv' exists" in err and "--overwrite" in err
    # --text-column; a .jsonl and a literal text together; --json alone writes no file
    (tmp_path / "new.jsonl").write_text("".join(json.dumps({"sentence": t, "label": "x"}) + "\n" for t in texts[:2]))
    code, out, err = run_cli(["predict", "--model", run, "new.jsonl", texts[2], "--text-column", "sentence",
                              "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)["predictions"]
    assert [r["input"] for r in rows] == texts and "csv" not in json.loads(out)
    np.testing.assert_allclose([list(r["probabilities"].values()) for r in rows], expected, atol=1e-5)
    # a .txt: one text per non-empty line (UTF-16 with its BOM too)
    (tmp_path / "new.txt").write_text("\n".join(texts[:1] + ["", "  "] + texts[1:]) + "\n", encoding="utf-16")
    code, out, err = run_cli(["predict", "--model", run, "new.txt", "--csv", "txt.csv", "--json"], capsys)
    assert code == 0, err
    assert [r["input"] for r in json.loads(out)["predictions"]] == texts
    assert len((tmp_path / "txt.csv").read_text().splitlines()) == 4
    assert [r["input"] for r in transferkit.predict(run, Path("new.txt"))] == texts  # Python: a Path too
    # bad input: one line, exit 2, nothing written
    for args, message in ((["new.csv", "--text-column", "nope", "--csv", "a.csv"], "has no column 'nope'"),
                          (["notes.pdf", "--csv", "a.csv"], "is a file, but this is a text model")):
        (tmp_path / "notes.pdf").write_bytes(b"%PDF")
        code, out, err = run_cli(["predict", "--model", run, *args], capsys)
        assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "a.csv").exists() and not out
    code, _, err = run_cli(["predict", "--model", trained_run, "x.png", "--text-column", "body"], capsys)
    assert code == 2 and "--text-column" in err and "image model" in err


def test_predict_folder_reads_the_images_training_reads(trained_run, image_folder, tmp_path, capsys):
    """A folder given to predict is read with training's rule: TIFF images count, while macOS' '._name.png'
    resource forks and hidden folders (.ipynb_checkpoints copies) are not images and are skipped."""
    folder = tmp_path / "new"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    for name in ("00.png", "01.png"):
        (folder / name).write_bytes((image_folder / "vertical" / name).read_bytes())
    Image.open(image_folder / "horizontal" / "00.png").save(folder / "scan.tif")
    (folder / "._00.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / ".ipynb_checkpoints" / "01.png").write_bytes((folder / "01.png").read_bytes())
    code, out, err = run_cli(["predict", "--model", trained_run, str(folder), "--csv", tmp_path / "p.csv", "--json"],
                             capsys)
    assert code == 0, err
    assert sorted(Path(r["input"]).name for r in json.loads(out)["predictions"]) == ["00.png", "01.png", "scan.tif"]


def test_predict_decodes_a_file_as_training_and_evaluate_do(trained_run, tmp_path):
    """A phone photo stores its rotation in EXIF: training and evaluate see it upright (open_image), so predict must
    too. A horizontal-stripes image stored rotated (vertical stripes) with EXIF orientation 6 is horizontal; 16-bit
    grey is rescaled the same way."""
    import transferkit
    from transferkit.data.images import open_image

    upright = stripes("h", 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    upright.rotate(90, expand=True).save(tmp_path / "phone.png", exif=exif)
    wide = (np.asarray(stripes("v", 4), dtype=np.uint16) * 200).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "scan.tif")
    model = transferkit.load(trained_run)
    for name in ("phone.png", "scan.tif"):
        row = transferkit.predict(model, tmp_path / name)[0]
        expected = model.predict_proba([open_image(tmp_path / name)])[0]
        assert np.allclose(list(row["probabilities"].values()), expected, atol=1e-6), name
    assert transferkit.predict(model, tmp_path / "phone.png")[0]["prediction"] == "horizontal"


def test_predict_json_on_a_folder_writes_no_default_csv(trained_run, image_folder, tmp_path, capsys, monkeypatch):
    """--json prints every row on stdout: the folder's default predictions.csv is not written as a side effect
    (nor refused when one exists); an explicit --csv still is."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "predictions.csv").write_text("my own table\n")
    code, out, err = run_cli(["predict", "--model", trained_run, image_folder, "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["predictions"]) == 28 and "csv" not in json.loads(out)
    assert (tmp_path / "predictions.csv").read_text() == "my own table\n"


def test_predict_never_replaces_an_existing_csv_without_overwrite(trained_run, image_folder, tmp_path, capsys,
                                                                  monkeypatch):
    """A folder writes predictions.csv in the working folder: an existing one (or an existing --csv) is refused in
    one line before anything is predicted and stays as it was; --overwrite replaces it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "predictions.csv").write_text("my own table\n")
    code, _, err = run_cli(["predict", "--model", trained_run, image_folder], capsys)
    assert code == 2 and "predictions.csv' exists" in err and "--overwrite" in err and "Traceback" not in err
    assert (tmp_path / "predictions.csv").read_text() == "my own table\n"
    code, _, err = run_cli(["predict", "--model", trained_run, image_folder, "--csv", "mine.csv"], capsys)
    assert code == 0 and len((tmp_path / "mine.csv").read_text().splitlines()) == 29
    code, _, err = run_cli(["predict", "--model", trained_run, image_folder, "--csv", "mine.csv"], capsys)
    assert code == 2 and "mine.csv' exists" in err
    code, _, err = run_cli(["predict", "--model", trained_run, image_folder, "--overwrite"], capsys)
    assert code == 0 and (tmp_path / "predictions.csv").read_text().startswith("input,prediction,")


def test_python_api_mirrors_cli(trained_run, image_folder):
    model = transferkit.load(trained_run)
    files = sorted(str(p) for p in (image_folder / "vertical").glob("*.png"))[:3]
    assert model.classes_ == ["horizontal", "vertical"]
    probabilities = model.predict_proba(files)
    assert probabilities.shape == (3, 2)
    assert model.predict(files) == [model.classes_[i] for i in probabilities.argmax(1)]
    # the saved model reproduces the fitted one exactly: evaluating the test split gives the stored accuracy
    from transferkit.data import load_data

    metrics = json.loads((trained_run / "metrics.json").read_text())
    fit_options = metrics["config"]["fit"]
    splits = load_data(str(image_folder), limit_per_class=fit_options["limit_per_class"],
                       seed=metrics["config"]["train"]["seed"], val_fraction=fit_options["val_fraction"],
                       test_fraction=fit_options["test_fraction"], test_limit=fit_options["test_limit"])
    assert len(splits.test) == metrics["evaluation"]["n"] == metrics["dataset_sizes"]["test"]
    report = transferkit.api.evaluate_model(model.module, splits.test)
    assert report["accuracy"] == pytest.approx(metrics["accuracy"])
    assert report["confusion_matrix"] == metrics["evaluation"]["confusion_matrix"]
    assert transferkit.evaluate(model, str(image_folder))["n"] == 28  # the whole folder


def test_finished_run_is_not_overwritten(trained_run, image_folder, capsys):
    before = (trained_run / "metrics.json").read_text()
    code, _, err = run_cli(["fit", "--data", image_folder, *SMALL, "--out", trained_run], capsys)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (trained_run / "metrics.json").read_text() == before


def test_linear_probe_feature_cache(image_folder, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="transferkit")
    # holdout: under cv one fit already re-reads the features it extracted for the folds
    first = transferkit.fit(str(image_folder), backbone="small_cnn", out=str(tmp_path / "a"), progress=False,
                            protocol="holdout")
    assert not any("from the cache" in r.message for r in caplog.records)
    caplog.clear()
    second = transferkit.fit(str(image_folder), backbone="small_cnn", out=str(tmp_path / "b"), progress=False,
                             protocol="holdout")
    assert any("from the cache" in r.message for r in caplog.records)
    assert first.metrics["accuracy"] == second.metrics["accuracy"]
    assert first.metrics["trainable_params"] == 2 * 128 + 2  # only the head: feature_dim x classes + bias


def test_config_file_and_flags(image_folder, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("strategy: finetune\nepochs: 1\nbackbone: small_cnn\nbatch-size: 8\n")
    out = tmp_path / "cfg"
    code, stdout, err = run_cli(["fit", "--config", config, "--data", image_folder, "--epochs", "2", "--out", out,
                                 "--protocol", "holdout", "--json"], capsys)
    assert code == 0, err
    metrics = json.loads(stdout)
    assert metrics["config"]["train"]["epochs"] == 2  # the flag wins over the file
    assert metrics["config"]["train"]["batch_size"] == 8 and metrics["strategy"] == "finetune"


def test_list_options_are_coerced_to_their_element_type(image_folder, tmp_path, capsys):
    from transferkit.config import FitConfig, build
    from transferkit.errors import TransferkitError

    assert build(FitConfig, {"pool_stages": ["3", 4]}).pool_stages == [3, 4]  # flags arrive as text
    with pytest.raises(TransferkitError, match="'--pool-stages' expects int"):
        build(FitConfig, {"pool_stages": ["x"]})
    code, _, err = run_cli(["fit", "--data", image_folder, "--pool-stages", "x", "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "expects int" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def corrupt_folder(tmp_path: Path) -> Path:
    root = tmp_path / "corrupt"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            stripes("h", i).save(root / cls / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"not an image at all")
    return root


def empty_class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "empty"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(3):
        stripes("h", i).save(root / "a" / f"{i}.png")
    return root


def single_class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "single"
    (root / "a").mkdir(parents=True)
    for i in range(4):
        stripes("h", i).save(root / "a" / f"{i}.png")
    return root


def text_file(tmp_path: Path, label: str = "label", nan: bool = False) -> Path:
    path = tmp_path / "texts.csv"
    rows = ["text,label"] + [f"good day number {i},pos" for i in range(6)] + [f"bad day {i},neg" for i in range(6)]
    if nan:
        rows.append("missing label row,")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda t: ["fit", "--data", t / "nope"], "no such"),
        (lambda t: ["fit", "--data", corrupt_folder(t), *SMALL], "broken.png"),
        (lambda t: ["fit", "--data", empty_class_folder(t), *SMALL], "'b'"),
        (lambda t: ["fit", "--data", single_class_folder(t), *SMALL], "class"),
        (lambda t: ["fit", "--data", text_file(t), "--label-column", "stars"], "stars"),
        (lambda t: ["fit", "--data", text_file(t, nan=True)], "label"),
        (lambda t: ["fit", "--data", "digits", "--backbone", "resnet9000"], "unknown backbone"),
        (lambda t: ["fit", "--data", "digits", "--strategy", "magic"], "unknown strategy"),
        (lambda t: ["fit", "--data", "digits", "--backbone", "minilm"], "text"),
        (lambda t: ["fit", "--data", "digits", "--epochs", "0"], "--epochs"),
        (lambda t: ["fit", "--data", "digits", "--strategy", "linear-probe", "--unfreeze", "2"], "--unfreeze"),
        (lambda t: ["evaluate", "--model", t / "missing-run", "--data", "digits"], "does not exist"),
        (lambda t: ["predict", "--model", t / "missing-run", "x.png"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(make_args, expected, tmp_path, capsys):
    out_dir = tmp_path / "out"
    args = [str(a) for a in make_args(tmp_path)]
    if args[0] == "fit":
        args += ["--out", str(out_dir)]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    errors = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err  # one error line, the last
    assert expected.lower() in errors[0].lower()
    assert "Traceback" not in err
    assert not out_dir.exists() and not (tmp_path / ".out.partial").exists()


def test_incompatible_checkpoint(trained_run, tmp_path, image_folder, capsys):
    import shutil

    broken = tmp_path / "broken-run"
    shutil.copytree(trained_run, broken)
    config_path = broken / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["backbone"]["options"]["width"] = 16  # a different architecture than the weights
    config_path.write_text(json.dumps(config))
    code, _, err = run_cli(["evaluate", "--model", broken, "--data", image_folder], capsys)
    assert code == 2 and "do not fit backbone" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    env = dict(os.environ, TRANSFERKIT_CACHE=str(tmp_path / "cache"), TRANSFERKIT_PROGRESS="0",
               OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "transferkit", "fit", "--data", "digits", "--backbone", "small_cnn", "--strategy",
            "finetune", "--epochs", "5", "--early-stopping", "0", "--lr", "0.003", "--threads", "1"]
    reference = subprocess.run([*args, "--out", str(tmp_path / "ref")], env=env, capture_output=True, text=True,
                               timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "run"
    proc = subprocess.Popen([*args, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / ".run.partial" / "checkpoint" / "trainer.safetensors"
    deadline = time.time() + 300
    while time.time() < deadline:
        if checkpoint.exists():
            from transferkit.engine.checkpoint import load_checkpoint

            if load_checkpoint(checkpoint)[1]["state"]["epoch"] >= 2:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "an interrupted run must not appear as finished"
    assert checkpoint.exists()

    refused = subprocess.run([*args, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run([*args, "--out", str(out), "--resume"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref_metrics = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] is not None and metrics["resumed_from_epoch"] >= 2
    assert metrics["accuracy"] == ref_metrics["accuracy"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _text_csv(path: Path, header: str, texts: dict[str, list[str]]) -> Path:
    """A CSV of quoted texts and their class (then, when ``header`` has a third column, a/b alternating)."""
    extra = header.count(",") > 1
    rows = [header] + [f'"{t}",{name}' + (f',{"ab"[i % 2]}' if extra else "")
                       for name, items in texts.items() for i, t in enumerate(items)]
    path.write_text("\n".join(rows) + "\n")
    return path


REVIEWS = {"positive": ["great product, works perfectly", "I love it, excellent quality", "fantastic, highly recommend",
                        "wonderful experience, very happy", "superb value and great service",
                        "really good, would buy again"],
           "negative": ["terrible, broke after a day", "awful quality, very disappointed", "worst purchase ever, avoid",
                        "horrible service and a bad product", "poor, do not buy this", "really bad, I want a refund"]}


def test_text_csv_fit_and_predict(tmp_path, capsys):
    path = _text_csv(tmp_path / "reviews.csv", "review,sentiment", REVIEWS)
    out = tmp_path / "text-run"
    code, _, err = run_cli(["fit", "--data", path, "--out", out, "--test-fraction", "0"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backbone"] == "minilm" and metrics["strategy"] == "linear-probe"  # defaults for text
    code, stdout, _ = run_cli(["predict", "--model", out, "an excellent, lovely product",
                               "a dreadful waste of money", "--json"], capsys)
    assert code == 0
    predictions = [row["prediction"] for row in json.loads(stdout)["predictions"]]
    assert predictions == ["positive", "negative"]
    # a path given to a text model is a mistake, not a sentence: one line, exit 2
    (tmp_path / "photo.png").write_bytes(b"")
    for wrong in (tmp_path / "photo.png", "cat.jpg", tmp_path):
        code, stdout, err = run_cli(["predict", "--model", out, "a lovely product", str(wrong)], capsys)
        assert code == 2 and "text model" in err and str(wrong) in err and not stdout
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_fit_task_causal_lm_trains_lora_and_reports_perplexity(tiny_llama_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    passages = [" ".join(["the cat sat on the mat ."] * 4 + [str(rng.choice(["good", "bad"]))]) for _ in range(30)]
    (tmp_path / "notes.txt").write_text("\n\n".join(passages))
    out = tmp_path / "lm"
    code, _, err = run_cli(["fit", "--data", tmp_path / "notes.txt", "--task", "causal-lm", "--backbone",
                            f"hf-causal:{tiny_llama_dir}", "--strategy", "lora", "--lora-r", "4", "--epochs", "3",
                            "--batch-size", "6", "--lr", "0.02", "--max-length", "40", "--val-fraction", "0.2",
                            "--out", out], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "causal-lm" and metrics["strategy"] == "lora"
    assert metrics["perplexity_after"] < metrics["perplexity_before"]
    assert metrics["heldout_passages"] == 6 and metrics["train_passages"] == 24
    assert metrics["trainable_params"] == 2 * (4 * (32 + 32) + 4 * (32 + 16))  # r(d + k) for q_proj, v_proj x 2
    assert (out / "history.jsonl").read_text().strip() and not (tmp_path / ".lm.partial").exists()

    code, text, err = run_cli(["evaluate", "--model", out, "--data", tmp_path / "notes.txt", "--json"], capsys)
    assert code == 0, err
    report = json.loads(text)
    assert report["passages"] == 30 and 1 < report["perplexity"] < metrics["perplexity_before"]
    code, text, _ = run_cli(["generate", "--model", out, "the cat", "--max-new-tokens", "3"], capsys)
    assert code == 0  # (a 3-epoch tiny model may emit only special tokens: the text can be empty)
    code, _, err = run_cli(["predict", "--model", out, "the cat"], capsys)
    assert code == 2 and "language model" in err
    code, _, err = run_cli(["report", out], capsys)
    page = (out / "report.html").read_text()
    assert code == 0 and "held-out perplexity before" in page and "Learning curves" in page


def test_fit_task_causal_lm_rejects_other_tasks_and_missing_file(tmp_path, capsys):
    code, _, err = run_cli(["fit", "--data", tmp_path / "none.txt", "--task", "causal-lm", "--task", "x:regress",
                            "--strategy", "lora", "--out", tmp_path / "a"], capsys)
    assert code == 2 and "cannot be combined" in err and "Traceback" not in err
    code, _, err = run_cli(["fit", "--data", tmp_path / "none.txt", "--task", "causal-lm", "--strategy", "lora",
                            "--out", tmp_path / "b"], capsys)
    assert code == 2 and "does not exist" in err and not (tmp_path / "b").exists()


def test_fit_task_causal_lm_resume_refuses_an_edited_text_file(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """A causal-lm run records its passages' fingerprint: --resume on an edited file is refused naming it."""
    import transferkit.tasks.causal_lm as causal_lm

    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"passage {i}: the cat sat on the mat and looked out." for i in range(12)))

    def interrupted(data, backbone, strategy, train, stage, *args, **kwargs):
        (stage / "checkpoint").mkdir()
        (stage / "checkpoint" / "trainer.safetensors").write_bytes(b"0")  # as after an epoch
        raise KeyboardInterrupt

    monkeypatch.setattr(causal_lm, "run_causal_lm", interrupted)
    args = ["fit", "--data", notes, "--task", "causal-lm", "--backbone", f"hf-causal:{tiny_llama_dir}",
            "--strategy", "lora", "--epochs", "1", "--out", tmp_path / "lm"]
    assert run_cli(args, capsys)[0] == 130 and (tmp_path / ".lm.partial" / "checkpoint").is_dir()
    notes.write_text(notes.read_text().replace("passage 3:", "passage three:"))
    code, _, err = run_cli([*args, "--resume"], capsys)
    assert code == 2 and "the data changed" in err and "notes.txt' differs" in err and "Traceback" not in err


def test_generate_refuses_an_empty_prompt_and_names_a_sequence_run(tiny_llama_dir, tmp_path, capsys):
    """An empty or blank prompt (SmolLM2's tokenizer makes it 0 tokens: an internal reshape error) is refused in
    one line, in the CLI and in generate_text; a charlm run given to generate is named as one."""
    from transferkit.backbones import create_backbone
    from transferkit.errors import TransferkitError
    from transferkit.tasks.causal_lm import generate_text

    for prompt, chat in (("", []), ("  \n", []), ("", ["--chat"])):
        code, out, err = run_cli(["generate", "--backbone", f"hf-causal:{tiny_llama_dir}", prompt, *chat], capsys)
        assert code == 2 and "the prompt is empty" in err and not out and len(err.strip().splitlines()) == 1
    backbone = create_backbone(f"hf-causal:{tiny_llama_dir}")
    for chat in (False, True):
        with pytest.raises(TransferkitError, match="the prompt is empty"):
            generate_text(backbone, " ", 3, chat=chat)

    text = tmp_path / "book.txt"
    text.write_text("the cat sat on the mat. " * 40)
    assert main(["charlm", "train", str(text), "--out", str(tmp_path / "lm"), "--epochs", "1", "--hidden-size",
                 "8", "--embedding-dim", "4", "--num-layers", "1", "--bptt", "10", "--batch-size", "4",
                 "--no-progress"]) == 0
    capsys.readouterr()
    code, _, err = run_cli(["generate", "--model", tmp_path / "lm", "the"], capsys)
    assert code == 2 and "character language model run" in err and "charlm sample" in err
    code, _, err = run_cli(["charlm", "train", tmp_path, "--out", tmp_path / "lm2"], capsys)
    assert code == 2 and "is a folder" in err and "does not exist" not in err


def test_modality_specific_options_on_the_wrong_data_exit_2(image_folder, tmp_path, capsys):
    code, _, err = run_cli(["fit", "--data", image_folder, *SMALL, "--max-length", "32", "--out", tmp_path / "r"],
                           capsys)
    assert code == 2 and "--max-length does not apply to image data" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists() and not (tmp_path / ".r.partial").exists()


def test_evaluate_reads_the_columns_the_model_was_trained_on(tmp_path, capsys):
    """A model trained with --label-column topic was refused on the same CSV by evaluate, which read 'label'."""
    path = _text_csv(tmp_path / "notes.csv", "body,topic,label", REVIEWS)  # 'label' is not the class here
    out = tmp_path / "run"
    code, _, err = run_cli(["fit", "--data", path, "--text-column", "body", "--label-column", "topic", "--out", out,
                            "--test-fraction", "0"], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["evaluate", "--model", out, "--data", path, "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["labels"] == ["negative", "positive"] and report["n"] == 12
