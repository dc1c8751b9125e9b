"""``transferkit export --format onnx``: parity with PyTorch for an image and a text model (and LoRA, merged),
and ``predict`` / ``evaluate`` running the export on onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import transferkit
from tests.conftest import ANIMALS, MUSIC
from transferkit.cli.main import main

pytest.importorskip("onnxruntime")



pytestmark = pytest.mark.usefixtures("isolated_cache")  # tests/conftest.py


def test_image_run_exports_to_onnx_with_parity_and_runs_on_onnxruntime(tmp_path, capsys):
    for cls in ("horizontal", "vertical"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(10):
            image = np.random.default_rng(i).integers(0, 60, (28, 28)).astype(np.uint8)
            image[:: 3 + i % 3, :] = 255
            Image.fromarray(image if cls == "horizontal" else image.T).save(tmp_path / "data" / cls / f"{i}.png")
    run = transferkit.fit(str(tmp_path / "data"), backbone="small_cnn", strategy="finetune", epochs=2, batch_size=8,
                          lr=0.01, out=str(tmp_path / "run"), progress=False, seed=0)
    assert main(["export", "--model", str(run.path), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    export = tmp_path / "onnx"
    parity = json.loads((export / "parity.json").read_text())
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["agreement"] == 1.0
    preprocess = json.loads((export / "preprocess.json").read_text())
    assert preprocess["mode"] == "L" and preprocess["size"] == 28 and preprocess["mean"] == [0.5]

    onnx_model, torch_model = transferkit.load(export), transferkit.load(run.path)
    assert type(onnx_model).__name__ == "OnnxModel" and onnx_model.classes_ == torch_model.classes_
    files = sorted(str(p) for p in (tmp_path / "data").rglob("*.png"))
    np.testing.assert_allclose(onnx_model.predict_proba(files, batch_size=7), torch_model.predict_proba(files),
                               atol=1e-5)
    assert main(["predict", "--model", str(export), "--json", *files[:3]]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert [r["prediction"] for r in rows] == torch_model.predict(files[:3])
    onnx_report = transferkit.evaluate(export, str(tmp_path / "data"), progress=False)
    assert onnx_report["accuracy"] == transferkit.evaluate(run.path, str(tmp_path / "data"), progress=False)["accuracy"]
    from tests.test_serve import Client, running_server, stop_cleanly

    with running_server(["--model", export, "--name", "onnx"]) as (port, process):  # serve runs the export too
        status, answer = Client(port).upload("/predict", [(Path(f).name, Path(f).read_bytes()) for f in files[:3]])
        assert status == 200 and [r["prediction"] for r in answer["predictions"]] == [r["prediction"] for r in rows]
        stop_cleanly(process)
    # over an existing export without --overwrite: refused in one line
    assert main(["export", "--model", str(run.path), "--format", "onnx", "--out", str(export)]) == 2
    assert "already holds" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["linear-probe", "lora"])
def test_text_run_exports_to_onnx_with_its_tokenizer(strategy, tiny_bert_dir, tmp_path):
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for i in range(24):
        words, label = (ANIMALS, "animals") if i % 2 == 0 else (MUSIC, "music")
        rows.append(f"{' '.join(rng.choice(words, 2 + i % 5))},{label}")
    (tmp_path / "texts.csv").write_text("\n".join(rows) + "\n")
    options = {"lora_r": 2, "epochs": 2, "lr": 0.01} if strategy == "lora" else {}
    run = transferkit.fit(str(tmp_path / "texts.csv"), backbone=f"hf:{tiny_bert_dir}", strategy=strategy,
                          out=str(tmp_path / "run"), progress=False, seed=0, max_length=16, **options)
    from transferkit.export.onnx import export_onnx

    export = export_onnx(run.path, tmp_path / "onnx")
    assert (export / "tokenizer").is_dir()
    parity = json.loads((export / "parity.json").read_text())
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["agreement"] == 1.0
    texts = ["cat", "guitar plays market today playing cat dog", "the dog sat on the mat today", "fell"]
    onnx_model, torch_model = transferkit.load(export), transferkit.load(run.path)
    np.testing.assert_allclose(onnx_model.predict_proba(texts, batch_size=3), torch_model.predict_proba(texts),
                               atol=1e-5)
    assert onnx_model.predict(texts) == torch_model.predict(texts)
