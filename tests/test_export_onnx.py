"""``transferkit export --format onnx``: parity with PyTorch for an image and a text model (and LoRA, merged),
and ``predict`` / ``evaluate`` running the export on onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import transferkit
from tests.conftest import ANIMALS, MUSIC, stripes
from transferkit.cli.main import main

pytest.importorskip("onnxruntime")



pytestmark = pytest.mark.usefixtures("isolated_cache")  # tests/conftest.py


def write_striped_folder(root: Path, per_class: int) -> None:
    """``root/horizontal`` and ``root/vertical``: 28 x 28 grey noise with bright stripes in that direction."""
    for cls in ("horizontal", "vertical"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            image = np.random.default_rng(i).integers(0, 60, (28, 28)).astype(np.uint8)
            image[:: 3 + i % 3, :] = 255
            Image.fromarray(image if cls == "horizontal" else image.T).save(root / cls / f"{i}.png")


def test_image_run_exports_to_onnx_with_parity_and_runs_on_onnxruntime(tmp_path, capsys):
    write_striped_folder(tmp_path / "data", 10)
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
    import torch

    from transferkit.serving.app import ServeConfig, load_service

    torch_threads = torch.get_num_threads()  # load_service sets torch's threads too: restored for the other tests
    try:
        served = load_service(ServeConfig(model=str(export), threads=1)).loaded  # serve --threads reaches onnxruntime
    finally:
        torch.set_num_threads(torch_threads)
    assert served.session.get_session_options().intra_op_num_threads == 1
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
        status, metadata = Client(port).json("GET", "/v2/models/onnx")  # KServe V2: the runtime that serves it
        assert status == 200 and metadata["platform"] == "onnxruntime_onnx"
        stop_cleanly(process)
    # over an existing export without --overwrite: refused in one line
    assert main(["export", "--model", str(run.path), "--format", "onnx", "--out", str(export)]) == 2
    assert "already holds" in capsys.readouterr().err


def test_multi_stage_probe_exports_to_onnx_with_parity(tmp_path):
    """``--pool-stages`` with ``--pool-grid`` (pooled earlier stages + final features, each over a grid of cells, as
    auto's multi-stage probe) traces into the graph."""
    write_striped_folder(tmp_path / "data", 6)
    run = transferkit.fit(str(tmp_path / "data"), backbone="efficientnet_lite0", pretrained=False, image_size=64,
                          pool_stages=[3, 4], pool_grid=[4, 2, 2], out=str(tmp_path / "run"), progress=False, seed=0,
                          protocol="holdout")
    options = json.loads((run.path / "model" / "config.json").read_text())["backbone"]["options"]
    assert options["pool_stages"] == [3, 4] and options["pool_grid"] == [4, 2, 2]
    assert main(["export", "--model", str(run.path), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    parity = json.loads((tmp_path / "onnx" / "parity.json").read_text())
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["agreement"] == 1.0


def test_grid_that_does_not_divide_the_map_exports_the_same_cells(tmp_path):
    """auto's committee grids (stage 3 over 7 x 7, stage 4 and the final map over 3 x 3) at 112 px pool 4 x 4 maps
    over 3 x 3 overlapping cells. The cell ends are traced from the map's shape, and ONNX divides integers by
    truncation: a ceiling written as -(-a // b) became a floor there (cells [0, 1) instead of [0, 2)), so the graph
    differed from PyTorch (max |logit difference| 0.077 reported on an auto run, 0.64 here)."""
    import torch

    from transferkit.backbones import create_backbone
    from transferkit.backbones.timm_backbone import grid_pool
    from transferkit.export.onnx import export_onnx
    from transferkit.model import TaskSpec, TransferModel, save_model

    class Pool(torch.nn.Module):
        def forward(self, x):
            return grid_pool(x, 3)

    maps = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    torch.onnx.export(Pool(), (maps,), str(tmp_path / "pool.onnx"), input_names=["x"], dynamic_axes={"x": {0: "b"}},
                      opset_version=18, dynamo=False)
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "pool.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": maps.numpy()})[0]
    np.testing.assert_array_equal(got, Pool()(maps).numpy())  # cell (0, 0) = rows 0-1, columns 0-1: 2.5

    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0", pretrained=False, image_size=112, pool_stages=[3, 4],
                               pool_grid=[7, 3, 3])
    assert backbone.stage_grids == (7, 3, 3)
    model = TransferModel(backbone, [TaskSpec("label", "classify", ["h", "v"])]).eval()
    save_model(model, tmp_path / "run", {"name": "linear-probe", "options": {}})
    parity = json.loads((export_onnx(tmp_path / "run", tmp_path / "onnx", samples=4) / "parity.json").read_text())
    assert parity["max_abs_logit_diff"] <= 1e-4


def test_onnx_export_reads_images_one_batch_at_a_time_and_evaluates_like_a_run(tmp_path, monkeypatch,
                                                                              opened_images):
    """An ONNX export decoded every input before its first batch and transferkit.evaluate(export) the whole folder
    up front; OnnxModel had no evaluate() (LoadedModel has) and batch_size=0 was a raw ValueError from range()."""
    from transferkit.data import images
    from transferkit.errors import TransferkitError
    from transferkit.export.onnx import export_onnx

    write_striped_folder(tmp_path / "data", 6)
    run = transferkit.fit(str(tmp_path / "data"), backbone="small_cnn", strategy="finetune", epochs=1, batch_size=4,
                          out=str(tmp_path / "run"), progress=False, seed=0)
    onnx_model = transferkit.load(export_onnx(run.path, tmp_path / "onnx", samples=4))
    files = sorted(str(p) for p in (tmp_path / "data").rglob("*.png"))
    batches, preprocess, decoded = [], onnx_model.preprocessor, [opened_images]  # decoded[0]: the images so far
    onnx_model.preprocessor = lambda items: batches.append((len(decoded[0]), len(items))) or preprocess(items)
    opened_images.clear()
    probabilities = onnx_model.predict_proba(files, batch_size=5)
    assert batches == [(5, 5), (10, 5), (12, 2)]
    np.testing.assert_allclose(probabilities, transferkit.load(run.path).predict_proba(files), atol=1e-5)
    decoded[0], open_image = [], images.open_image  # evaluate opens every file to verify it: count decodes
    monkeypatch.setattr(images, "open_image", lambda path: decoded[0].append(path) or open_image(path))
    batches.clear()
    report = onnx_model.evaluate(str(tmp_path / "data"), batch_size=5)
    assert batches == [(5, 5), (10, 5), (12, 2)]
    assert report["accuracy"] == transferkit.evaluate(run.path, str(tmp_path / "data"), progress=False)["accuracy"]
    with pytest.raises(TransferkitError, match="invalid batch_size 0"):
        onnx_model.predict(files, batch_size=0)
    with pytest.raises(TransferkitError, match="is a folder"):
        onnx_model.predict(str(tmp_path / "data"))


def test_framed_run_exports_its_frame_and_predicts_like_the_run_on_unframed_images(tmp_path):
    """``fit --frame mnist``: the frame is a PIL step before resizing, so it stays outside the graph, but the export's
    preprocessing runs it (the run frames every input): unframed images get the run's probabilities."""
    from tests.test_adaptation import write_bar_digits
    from transferkit.data.framing import frame_image
    from transferkit.export.onnx import export_onnx

    data = write_bar_digits(tmp_path / "data", 6, 0, 40, (8, 2))
    run = transferkit.fit(str(data), backbone="small_cnn", strategy="finetune", frame="mnist", epochs=1,
                          batch_size=4, out=str(tmp_path / "run"), progress=False, seed=0)
    export = export_onnx(run.path, tmp_path / "onnx", samples=4)
    assert json.loads((export / "preprocess.json").read_text())["frame"] == "mnist"
    assert json.loads((export / "config.json").read_text())["format_version"] == 3  # older readers would not frame
    assert "frame it MNIST-style" in (export / "README.md").read_text()
    files = sorted(str(p) for p in data.rglob("*.png"))
    onnx_model, torch_model = transferkit.load(export), transferkit.load(run.path)
    expected = torch_model.predict_proba(files)
    np.testing.assert_allclose(onnx_model.predict_proba(files), expected, atol=1e-5)
    framed = [frame_image(Image.open(f)) for f in files]
    np.testing.assert_allclose(onnx_model.predict_proba(framed), expected, atol=1e-5)


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


def test_auto_ensemble_exports_to_one_onnx_graph_and_to_a_plain_model_folder(tmp_path, capsys):
    """Members with different backbones, image modes, resolutions, strategies (one LoRA, merged) and flip TTA: one
    graph averaging their probabilities, equal to the PyTorch ensemble; `--format safetensors` writes a plain
    ensemble folder."""
    from transferkit.api import EnsembleModel
    from transferkit.autofit.ensemble import save_ensemble

    data = tmp_path / "data"
    for cls in ("horizontal", "vertical"):
        (data / cls).mkdir(parents=True)
        for i in range(8):
            image = np.random.default_rng(i).integers(0, 60, (28, 28 + 6 * (i % 2))).astype(np.uint8)  # some wide
            image[:: 3 + i % 3, :] = 255
            Image.fromarray(image if cls == "horizontal" else image.T).save(data / cls / f"{i}.png")
    common = {"progress": False, "seed": 0}
    cnn = transferkit.fit(str(data), backbone="small_cnn", strategy="finetune", epochs=2, batch_size=8, lr=0.01,
                          out=str(tmp_path / "cnn"), **common)
    lite = transferkit.fit(str(data), backbone="efficientnet_lite0", image_size=32, pretrained=False,
                           strategy="lora", lora_r=2, epochs=1, batch_size=8, out=str(tmp_path / "lite"), **common)
    members = [transferkit.load(cnn.path, device="cpu"), transferkit.load(lite.path, device="cpu")]
    save_ensemble(tmp_path / "auto" / "model", [(members[0].module, members[0].config["strategy"], {}),
                                                (members[1].module, members[1].config["strategy"], {"tta": "hflip"})],
                  [0.3, 0.7])
    ensemble = transferkit.load(tmp_path / "auto", device="cpu")
    assert isinstance(ensemble, EnsembleModel)

    export = tmp_path / "onnx"
    assert main(["export", "--model", str(tmp_path / "auto"), "--format", "onnx", "--out", str(export)]) == 0
    assert "ensemble probabilities vs PyTorch" in capsys.readouterr().out
    parity = json.loads((export / "parity.json").read_text())
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["agreement"] == 1.0
    assert parity["ensemble"]["max_abs_probability_diff"] <= 1e-5 and parity["ensemble"]["agreement"] == 1.0
    views = json.loads((export / "preprocess.json").read_text())["views"]
    assert [(v["mode"], v["size"], v["mirror"]) for v in views] == [("L", 28, False), ("RGB", 32, False),
                                                                   ("RGB", 32, True)]
    import onnx

    graph = onnx.load(str(export / "model.onnx")).graph  # ONE graph: every view in, the averaged probabilities out
    assert [i.name for i in graph.input] == ["pixels_0", "pixels_1", "pixels_2"]
    assert graph.output[0].name == "probabilities"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch

    files = sorted(str(p) for p in data.rglob("*.png"))
    onnx_model = transferkit.load(export)
    assert type(onnx_model).__name__ == "OnnxModel" and onnx_model.classes_ == ensemble.classes_
    expected = ensemble.predict_proba(files)
    np.testing.assert_allclose(onnx_model.predict_proba(files, batch_size=5), expected, atol=1e-5)
    # the weights and the TTA are in the graph: a member alone gives other probabilities
    assert np.abs(members[1].predict_proba(files) - expected).max() > 1e-3
    assert main(["predict", "--model", str(export), "--json", *files[:4]]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert [r["prediction"] for r in rows] == ensemble.predict(files[:4])
    report = transferkit.evaluate(export, str(data), progress=False)
    assert report["accuracy"] == transferkit.evaluate(tmp_path / "auto", str(data), progress=False)["accuracy"]
    from tests.test_serve import Client, running_server, stop_cleanly

    with running_server(["--model", export, "--name", "ens"]) as (port, process):
        status, answer = Client(port).upload("/predict", [(Path(f).name, Path(f).read_bytes()) for f in files[:4]])
        assert status == 200 and [r["prediction"] for r in answer["predictions"]] == [r["prediction"] for r in rows]
        stop_cleanly(process)

    # one model with flip TTA (auto's single choice): exported as a one-member ensemble, mirror view included
    from transferkit.export.onnx import export_onnx
    from transferkit.model import save_model

    save_model(members[1].module, tmp_path / "tta", members[1].config["strategy"], extra={"tta": "hflip"})
    tta = export_onnx(tmp_path / "tta", tmp_path / "tta-onnx")
    assert [v["mirror"] for v in json.loads((tta / "preprocess.json").read_text())["views"]] == [False, True]
    np.testing.assert_allclose(transferkit.load(tta).predict_proba(files),
                               transferkit.load(tmp_path / "tta", device="cpu").predict_proba(files), atol=1e-5)

    # --format safetensors (the default): a plain ensemble folder that loads as the same model
    assert main(["export", "--model", str(tmp_path / "auto"), "--out", str(tmp_path / "plain")]) == 0
    plain = transferkit.load(tmp_path / "plain", device="cpu")
    assert isinstance(plain, EnsembleModel) and plain.weights == [0.3, 0.7]
    assert plain.members[1].config["strategy"]["options"]["_merged"]  # the LoRA member merged: no peft needed
    assert sorted(p.name for p in (tmp_path / "plain" / "members" / "0").iterdir()) == ["config.json",
                                                                                       "model.safetensors"]
    np.testing.assert_allclose(plain.predict_proba(files), expected, atol=1e-5)  # LoRA merged: rounding only


def test_probes_of_one_backbone_share_it_in_the_exported_graph(tmp_path):
    """auto's committee pairs a final-layer and a multi-stage probe of each backbone: the graph runs that backbone
    once per view (two inputs, the image and its mirror image; the file about one backbone's size, not two) and
    still gives the PyTorch ensemble's probabilities."""
    import torch

    from transferkit.autofit.ensemble import save_ensemble
    from transferkit.backbones import create_backbone
    from transferkit.export.onnx import export_onnx
    from transferkit.model import TaskSpec, TransferModel, save_model

    def probe(seed: int, **options) -> TransferModel:
        torch.manual_seed(seed)
        return TransferModel(create_backbone("efficientnet_lite0", pretrained=True, image_size=32, **options),
                             [TaskSpec("label", "classify", ["h", "v"])]).eval()

    strategy = {"name": "linear-probe", "options": {}}
    final, stages = probe(0), probe(1, pool_stages=[3, 4])
    save_ensemble(tmp_path / "auto", [(final, strategy, {"tta": "hflip"}), (stages, strategy, {"tta": "hflip"})],
                  [0.5, 0.5])
    save_model(final, tmp_path / "one", strategy, extra={"tta": "hflip"})
    shared, one = export_onnx(tmp_path / "auto", tmp_path / "auto-onnx"), export_onnx(tmp_path / "one", tmp_path / "one-onnx")
    import onnx

    assert [i.name for i in onnx.load(str(shared / "model.onnx")).graph.input] == ["pixels_0", "pixels_1"]
    assert (shared / "model.onnx").stat().st_size < 1.1 * (one / "model.onnx").stat().st_size
    write_striped_folder(tmp_path / "data", 3)
    files = sorted(str(p) for p in (tmp_path / "data").rglob("*.png"))
    np.testing.assert_allclose(transferkit.load(shared).predict_proba(files),
                               transferkit.load(tmp_path / "auto", device="cpu").predict_proba(files), atol=1e-5)


def test_safetensors_export_of_a_plain_run_keeps_its_weights(tmp_path):
    for cls in ("h", "v"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(6):
            stripes(cls, i).save(tmp_path / "data" / cls / f"{i}.png")
    run = transferkit.fit(str(tmp_path / "data"), backbone="small_cnn", strategy="finetune", epochs=1, batch_size=4,
                          out=str(tmp_path / "run"), progress=False, seed=0)
    assert main(["export", "--model", str(run.path), "--out", str(tmp_path / "plain")]) == 0
    files = sorted(str(p) for p in (tmp_path / "data").rglob("*.png"))
    np.testing.assert_allclose(transferkit.load(tmp_path / "plain").predict_proba(files),
                               transferkit.load(run.path).predict_proba(files), atol=1e-7)
    assert main(["export", "--model", str(run.path), "--out", str(tmp_path / "merged"), "--merge"]) == 2  # not LoRA


def test_text_ensemble_exports_one_graph_with_a_tokenizer_per_view(tiny_bert_dir, tmp_path):
    from transferkit.autofit.ensemble import save_ensemble

    rng = np.random.default_rng(0)
    rows = ["text,label"] + [f"{' '.join(rng.choice(ANIMALS if i % 2 == 0 else MUSIC, 2 + i % 5))},"
                             f"{'animals' if i % 2 == 0 else 'music'}" for i in range(24)]
    (tmp_path / "texts.csv").write_text("\n".join(rows) + "\n")
    runs = [transferkit.fit(str(tmp_path / "texts.csv"), backbone=f"hf:{tiny_bert_dir}", strategy="linear-probe",
                            out=str(tmp_path / f"run{n}"), progress=False, seed=n, max_length=n) for n in (6, 16)]
    loaded = [transferkit.load(r.path, device="cpu") for r in runs]
    save_ensemble(tmp_path / "ens" / "model", [(m.module, m.config["strategy"], {}) for m in loaded], [0.5, 0.5])
    from transferkit.export.onnx import export_onnx

    export = export_onnx(tmp_path / "ens", tmp_path / "onnx")
    parity = json.loads((export / "parity.json").read_text())
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["ensemble"]["max_abs_probability_diff"] <= 1e-5
    views = json.loads((export / "preprocess.json").read_text())["views"]
    assert [v["max_length"] for v in views] == [6, 16] and all((export / v["tokenizer"]).is_dir() for v in views)
    texts = ["cat dog mat sat fell guitar plays market", "guitar", "the dog sat on the mat today with a cat"]
    np.testing.assert_allclose(transferkit.load(export).predict_proba(texts),
                               transferkit.load(tmp_path / "ens", device="cpu").predict_proba(texts), atol=1e-5)


def test_multitask_run_exports_every_head_as_a_graph_output_with_parity(tmp_path):
    """A shared trunk with a classification head and a quantile head: one ONNX graph whose outputs are both
    heads (named after their tasks), each equal to PyTorch's; the export classifies like the run."""
    import onnxruntime
    import torch

    run = transferkit.fit("stars", backbone="small_cnn", strategy="finetune", head_init="random", freeze_bn=False,
                          task=["count:classify", "size:quantile"], limit_per_class=6, epochs=1, batch_size=16,
                          image_size=16, test_limit=12, out=str(tmp_path / "run"), progress=False, device="cpu")
    assert main(["export", "--model", str(run.path), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    parity = json.loads((tmp_path / "onnx" / "parity.json").read_text())
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["agreement"] == 1.0
    session = onnxruntime.InferenceSession(str(next((tmp_path / "onnx").glob("*.onnx"))))
    assert [o.name for o in session.get_outputs()][:2] == ["count", "size"]
    x = np.random.default_rng(0).normal(size=(5, 1, 16, 16)).astype(np.float32)  # a batch size never exported
    count, size = session.run(["count", "size"], {session.get_inputs()[0].name: x})
    torch_model = transferkit.load(run.path)
    with torch.no_grad():
        reference = torch_model.module(torch.from_numpy(x)).outputs
    np.testing.assert_allclose(count, reference["count"].numpy(), atol=1e-4)
    np.testing.assert_allclose(size, reference["size"].numpy(), atol=1e-4)
    export = transferkit.load(tmp_path / "onnx")
    assert export.classes_ == torch_model.classes_
    # predict and evaluate give every task, as the run does
    images = [np.random.default_rng(i).integers(0, 255, (16, 16), dtype=np.uint8) for i in range(3)]
    Image.fromarray(images[0]).save(tmp_path / "star.png")
    images[0] = str(tmp_path / "star.png")  # a file, as the CLI passes it
    got, expected = transferkit.predict(export, images), transferkit.predict(torch_model, images)
    for row, reference_row in zip(got, expected):
        assert row["tasks"]["count"] == reference_row["tasks"]["count"] == row["prediction"]
        assert row["tasks"]["size"] == pytest.approx(reference_row["tasks"]["size"], abs=1e-4)
    scored = transferkit.evaluate(export, "stars", progress=False, batch_size=256)
    reference_report = transferkit.evaluate(torch_model, "stars", progress=False, batch_size=256)
    size, reference_size = scored["tasks"]["size"], reference_report["tasks"]["size"]
    assert size.keys() == reference_size.keys() and size["interval"] == reference_size["interval"]
    assert {k: size[k] for k in ("mae", "coverage", "mean_interval_width", "n")} == pytest.approx(
        {k: reference_size[k] for k in ("mae", "coverage", "mean_interval_width", "n")}, abs=1e-4)
    assert scored["size_coverage"] == pytest.approx(reference_report["size_coverage"], abs=1e-4)
    readme = (tmp_path / "onnx" / "README.md").read_text()
    size_line = next(line for line in readme.splitlines() if line.startswith("- `size`"))
    assert "quantiles" in size_line and "softmax" not in size_line, readme


def test_damaged_onnx_export_exits_2_with_one_line_naming_the_file(tmp_path, capsys):
    write_striped_folder(tmp_path / "data", 4)
    run = transferkit.fit(str(tmp_path / "data"), backbone="small_cnn", strategy="linear-probe", epochs=1,
                          batch_size=8, out=str(tmp_path / "run"), progress=False, seed=0)
    export = tmp_path / "onnx"
    assert main(["export", "--model", str(run.path), "--format", "onnx", "--out", str(export)]) == 0
    config, preprocess = (export / "config.json").read_text(), (export / "preprocess.json").read_text()
    image = str(next((tmp_path / "data").rglob("*.png")))
    text_spec = {"kind": "text", "inputs": ["input_ids"], "max_length": 8}  # valid JSON without "tokenizer"
    cases = [("preprocess.json", "{not json"), ("preprocess.json", json.dumps(text_spec)),
             ("preprocess.json", "[1]"), ("config.json", json.dumps({**json.loads(config), "tasks": []})),
             ("config.json", json.dumps({k: v for k, v in json.loads(config).items() if k != "modality"}))]
    for name, damaged in cases:
        (export / "config.json").write_text(config)
        (export / "preprocess.json").write_text(preprocess)
        (export / name).write_text(damaged)
        capsys.readouterr()
        assert main(["predict", "--model", str(export), image]) == 2, (name, damaged)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(export / name) in err[0] and "export the run again" in err[0], (damaged, err)


def test_onnx_evaluate_refuses_hook_options_it_cannot_apply(tmp_path, capsys):
    """evaluate on an ONNX export returned the plain report and silently ignored --attack, --temperature-scale and
    the other evaluation hooks' options (they need the PyTorch model): each set one is named in one line, exit 2."""
    from transferkit.errors import TransferkitError
    from transferkit.export.onnx import export_onnx

    write_striped_folder(tmp_path / "data", 6)
    run = transferkit.fit(str(tmp_path / "data"), backbone="small_cnn", strategy="finetune", epochs=1, batch_size=4,
                          out=str(tmp_path / "run"), progress=False, seed=0)
    export = export_onnx(run.path, tmp_path / "onnx", samples=4)
    data = str(tmp_path / "data")
    assert main(["evaluate", "--model", str(export), "--data", data, "--json"]) == 0  # the defaults: the report
    assert "accuracy" in json.loads(capsys.readouterr().out)
    for flags, named in ((["--attack", "fgsm"], "--attack"), (["--temperature-scale"], "--temperature-scale"),
                         (["--attack", "fgsm", "--epsilon", "0.1"], "--attack and --epsilon")):
        assert main(["evaluate", "--model", str(export), "--data", data, *flags]) == 2
        out, err = capsys.readouterr()
        assert f"{named} cannot be used with an ONNX export" in err and "run folder" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and not out
    with pytest.raises(TransferkitError, match="--attack cannot be used with an ONNX export"):
        transferkit.load(export).evaluate(data, attack="fgsm")
