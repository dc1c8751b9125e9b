"""Self-taught learning: `pretrain` writes a backbone folder that loads like a name, changes the embeddings, resumes
to the same weights, and refuses bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.cli.main import main


def _images(root, n: int = 12) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.clip(40 * (i % 3) + 60 + rng.normal(0, 20, (16, 16)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.png")


def _base_small_cnn():
    from transferkit.backbones import create_backbone
    from transferkit.engine.trainer import seed_everything

    seed_everything(0)
    return create_backbone("small_cnn", image_size=16)


def _embed(backbone, folder):
    from transferkit.data import load_unlabelled
    from transferkit.engine.features import extract_features

    return extract_features(backbone, load_unlabelled(folder), progress=False)


def _pretrain(tmp_path, out, **extra):
    from transferkit.selftaught.pretrain import pretrain

    return pretrain(data=str(tmp_path / "pool"), backbone="small_cnn", out=str(out), epochs=2, batch_size=6,
                    lr=1e-2, image_size=16, progress=False, **extra)


def test_pretrain_output_loads_as_backbone_and_changes_embeddings(tmp_path, capsys):
    from transferkit.backbones import backbone_info, create_backbone

    _images(tmp_path / "pool")
    result = _pretrain(tmp_path, tmp_path / "bb")
    spec = json.loads((result.path / "backbone.json").read_text())
    assert spec["base"]["name"] == "small_cnn" and spec["provenance"]["epochs"] == 2
    assert spec["provenance"]["objective"].startswith("SimCLR") and len(spec["provenance"]["losses"]) == 2
    assert json.loads((result.path / "transferkit-output.json").read_text())["kind"] == "pretrain"
    assert not (result.path / "checkpoint").exists()
    loaded = create_backbone(str(result.path))
    assert loaded.is_pretrained and backbone_info(str(result.path)).modality == "image"
    base = _base_small_cnn()
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, loaded.state_dict()[k])]
    assert changed  # the weights moved ...
    before, after = _embed(base, tmp_path / "pool"), _embed(loaded, tmp_path / "pool")
    assert before.shape == after.shape and not np.allclose(before, after, atol=1e-4)  # ... and so did the embeddings
    # cluster accepts the folder like a name
    assert main(["cluster", "--data", str(tmp_path / "pool"), "--out", str(tmp_path / "c"), "--k", "3",
                 "--backbone", str(result.path), "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["backbone"] == str(result.path)


def test_pretrain_resume_after_interruption_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from transferkit.engine.trainer import Trainer

    _images(tmp_path / "pool")
    straight = _pretrain(tmp_path, tmp_path / "straight")
    original = Trainer._train_epoch
    calls = {"n": 0}

    def interrupted(self, loop, callbacks):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, loop, callbacks)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _pretrain(tmp_path, tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    resumed = _pretrain(tmp_path, tmp_path / "resumed", resume=True)
    spec = json.loads((resumed.path / "backbone.json").read_text())
    assert spec["provenance"]["resumed_from_epoch"] == 1
    a, b = load_file(str(straight.path / "weights.safetensors")), load_file(str(resumed.path / "weights.safetensors"))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_fit_accepts_a_pretrain_folder_as_backbone(tmp_path):
    import transferkit

    _images(tmp_path / "pool")
    result = _pretrain(tmp_path, tmp_path / "bb")
    labelled = tmp_path / "labelled"
    rng = np.random.default_rng(1)
    for c, level in (("dark", 40), ("light", 210)):
        (labelled / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.clip(level + rng.normal(0, 10, (16, 16)), 0, 255).astype(np.uint8)).save(
                labelled / c / f"{i}.png")
    run = transferkit.fit(str(labelled), backbone=str(result.path), out=str(tmp_path / "run"), progress=False,
                          protocol="holdout", val_fraction=0.3, test_fraction=0.3)
    assert run.metrics["backbone"] == str(result.path)
    model = transferkit.load(run.path)  # rebuilt from the base spec + the run's own weights
    assert model.predict([str(labelled / "dark" / "0.png")]) == ["dark"]


@pytest.mark.parametrize("case", ["empty", "modality", "not_a_backbone_folder"])
def test_pretrain_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    _images(tmp_path / "pool", n=4)
    args = ["--backbone", "small_cnn", "--data", str(tmp_path / "pool")]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        args[3] = str(tmp_path / "empty")
    elif case == "modality":
        (tmp_path / "texts.csv").write_text("text\nhello there\ngood day\n")
        args[3] = str(tmp_path / "texts.csv")
    else:
        (tmp_path / "junk").mkdir()
        args[1] = str(tmp_path / "junk")
    out = tmp_path / "bb"
    assert main(["pretrain", *args, "--out", str(out), "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not out.exists() and not (tmp_path / ".bb.partial").exists()


def test_text_pretrain_masked_lm_changes_the_encoder(tmp_path, tiny_bert_dir):
    from transferkit.backbones import create_backbone
    from transferkit.selftaught.pretrain import pretrain

    texts = tmp_path / "texts.csv"
    words = ["the cat sat on the mat", "a dog plays guitar", "someone fell today", "the man is playing"]
    texts.write_text("text\n" + "".join(f"{words[i % 4]}\n" for i in range(16)))
    result = pretrain(data=str(texts), backbone=f"hf:{tiny_bert_dir}", out=str(tmp_path / "bb"), epochs=2,
                      batch_size=8, lr=1e-3, progress=False)
    spec = json.loads((result.path / "backbone.json").read_text())
    assert spec["provenance"]["objective"].startswith("masked-LM") and spec["modality"] == "text"
    base, loaded = create_backbone(f"hf:{tiny_bert_dir}"), create_backbone(str(result.path))
    a = base.encode(words)
    b = loaded.encode(words)
    assert a.shape == b.shape and not np.allclose(a, b, atol=1e-4)
    assert np.isfinite(result.summary["final_loss"])
