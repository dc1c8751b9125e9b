"""Self-taught learning: `pretrain` writes a backbone folder that loads like a name, changes the embeddings, resumes
to the same weights, and refuses bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_simclr_views_of_a_grey_image_stay_grey_differ_and_have_the_backbone_size():
    from types import SimpleNamespace

    from transferkit.selftaught.pretrain import TwoViews, view_transform

    backbone = SimpleNamespace(image_size=24, image_mode="RGB", normalization={
        "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 0.875})
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8))
    data = SimpleNamespace(items=[grey], __len__=lambda: 1)
    torch.manual_seed(0)
    first, second, index = TwoViews(data, backbone, crop_scale=0.3)[0]
    assert first.shape == second.shape == (3, 24, 24) and index == 0
    assert not torch.allclose(first, second)  # two different random views ...
    for view in (first, second):  # ... and no colour invented on a grey image (jitter acts on brightness/contrast)
        assert torch.allclose(view[0], view[1], atol=1e-5) and torch.allclose(view[1], view[2], atol=1e-5)
    assert view_transform(SimpleNamespace(), 0.3) is None  # no timm normalisation: the backbone's own augmentation


def test_train_groups_freezes_the_lower_groups_and_trains_the_top(tmp_path):
    from safetensors.torch import load_file

    _images(tmp_path / "pool")
    result = _pretrain(tmp_path, tmp_path / "bb", train_groups=1)
    assert json.loads((result.path / "backbone.json").read_text())["provenance"]["trained_layer_groups"] == 1
    base = _base_small_cnn()
    trained = load_file(str(result.path / "weights.safetensors"))
    groups = base.layer_groups()
    names = {id(p): n for n, p in base.named_parameters()}
    lower = [names[id(p)] for g in groups[:-1] for p in g.parameters()]
    top = [names[id(p)] for p in groups[-1].parameters()]
    state = base.state_dict()
    assert lower and all(torch.equal(state[n], trained[n]) for n in lower)
    assert any(not torch.equal(state[n], trained[n]) for n in top)


def test_batch_norm_statistics_stay_frozen_by_default_and_adapt_with_batch_norm_train(tmp_path):
    from safetensors.torch import load_file

    _images(tmp_path / "pool")
    state = _base_small_cnn().state_dict()
    statistics = [n for n in state if n.endswith(("running_mean", "running_var"))]
    assert statistics
    frozen = load_file(str(_pretrain(tmp_path, tmp_path / "frozen").path / "weights.safetensors"))
    assert all(torch.equal(state[n], frozen[n]) for n in statistics)
    assert any(not torch.equal(state[n], frozen[n]) for n in state if n.endswith(".weight"))  # the weights learned
    adapted = load_file(str(_pretrain(tmp_path, tmp_path / "train", batch_norm="train").path / "weights.safetensors"))
    assert any(not torch.equal(state[n], adapted[n]) for n in statistics)


def test_text_pretrain_keeps_mean_pooling_for_the_probe(tmp_path, tiny_bert_dir):
    """After masked-LM the backbone folder still embeds with the base's pooling (mean over real tokens + L2 norm),
    from the trained encoder: what a probe reads."""
    from transferkit.backbones import create_backbone
    from transferkit.selftaught.pretrain import pretrain

    texts = tmp_path / "texts.csv"
    words = ["the cat sat on the mat", "a dog plays guitar", "someone fell today"]
    texts.write_text("text\n" + "".join(f"{words[i % 3]}\n" for i in range(12)))
    result = pretrain(data=str(texts), backbone=f"hf:{tiny_bert_dir}", out=str(tmp_path / "bb"), epochs=1,
                      batch_size=6, lr=1e-3, progress=False)
    loaded = create_backbone(str(result.path))
    assert loaded.pooling == "mean" and loaded.normalize
    batch = loaded.collate(words)
    loaded.eval()
    with torch.no_grad():
        hidden = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    manual = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert np.allclose(loaded.encode(words), manual, atol=1e-5)


# --- --objective scan (SCAN: neighbour-consistency clustering, for `cluster`) -------------------------------------


def test_neighbour_consistency_loss_prefers_agreeing_confident_neighbours_and_all_clusters_in_use():
    from transferkit.engine.objectives import NeighbourConsistencyObjective

    objective = NeighbourConsistencyObjective(entropy_weight=1.0)
    confident = 20 * torch.eye(4)  # four items, each sure of its own cluster: the mean assignment is uniform
    agree = objective(None, {}, (confident, confident))
    disagree = objective(None, {}, (confident, confident.roll(1, dims=0)))
    collapsed = objective(None, {}, (20 * torch.eye(4)[[0, 0, 0, 0]], 20 * torch.eye(4)[[0, 0, 0, 0]]))
    assert agree < disagree  # neighbours in different clusters cost
    assert agree < collapsed  # one cluster for everything costs the entropy term
    assert abs(float(agree) + np.log(4.0)) < 1e-3  # consistency ~0, minus the entropy log 4


def test_several_clustering_heads_train_together_with_the_mean_of_their_losses():
    from transferkit.backbones import create_backbone
    from transferkit.engine.objectives import NeighbourConsistencyObjective
    from transferkit.selftaught.pretrain import ClusteringModel

    objective = NeighbourConsistencyObjective(entropy_weight=2.0)
    generator = torch.Generator().manual_seed(0)
    items, neighbours = torch.randn(6, 3, 4, generator=generator), torch.randn(6, 3, 4, generator=generator)
    single = [objective(None, {}, (items[:, h], neighbours[:, h])) for h in range(3)]
    assert torch.allclose(objective(None, {}, (items, neighbours)), torch.stack(single).mean())
    assert not torch.allclose(single[0], single[1])  # the heads' losses differ: the mean is not one of them
    backbone = create_backbone("efficientnet_lite0", pretrained=False, image_size=32)
    model = ClusteringModel(backbone, clusters=4, heads=3)
    x = torch.randn(2, 3, 32, 32)
    first, second = model({"inputs": x, "view2": x.flip(-1)})
    assert first.shape == second.shape == (2, 3, 4)
    weights = model.head.weight.view(3, 4, -1)
    assert not torch.allclose(weights[0], weights[1])  # independently initialised heads


def test_neighbour_pair_sampler_pairs_each_item_with_one_of_its_partners_repeatably():
    from transferkit.engine.sampling import NeighbourPairSampler

    partners = np.array([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]])
    sampler = NeighbourPairSampler(partners, seed=3)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(6))  # every item once per epoch
    assert all(j in partners[i] for i, j in first)  # its partner from its own row only
    assert list(sampler) == first  # the same epoch, the same pairs (resume)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_efficientnet_splits_at_its_head_convolution():
    from transferkit.backbones import create_backbone

    backbone = create_backbone("efficientnet_lite0", pretrained=False, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = backbone.forward_features(x)
        assert backbone.forward_below(x, 1).shape == (2, 320, 2, 2)  # the head convolution's input
        assert backbone.forward_below(x, 2).shape == (2, 192, 2, 2)  # the last stage's input
        for top in range(1, len(backbone.layer_groups())):
            assert torch.allclose(backbone.forward_top(backbone.forward_below(x, top), top), features, atol=1e-5)
    assert set(backbone.model.conv_head.parameters()) <= set(backbone.layer_groups()[-1].parameters())
    assert backbone.splits_into_groups()
    staged = create_backbone("efficientnet_lite0", pretrained=False, image_size=64, pool_stages=[3])
    assert not staged.splits_into_groups()  # its embedding also reads an earlier stage


def test_scan_pretrain_trains_only_the_top_group_from_cached_lower_layers(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from transferkit.backbones import create_backbone
    from transferkit.backbones.efficientnet import EfficientNetLite
    from transferkit.selftaught import pretrain as pretrain_module
    from transferkit.selftaught.pretrain import pretrain

    _images(tmp_path / "pool")
    calls = {"below": 0}
    original = EfficientNetLite.forward_below

    def counted(self, inputs, top_groups=1):
        calls["below"] += 1
        return original(self, inputs, top_groups)

    monkeypatch.setattr(EfficientNetLite, "forward_below", counted)
    caches = []
    original_pairs = pretrain_module.NeighbourPairs.__init__

    def recorded(self, data, backbone, cached=None):
        caches.append((type(cached), Path(cached.filename), cached.shape))
        original_pairs(self, data, backbone, cached)

    monkeypatch.setattr(pretrain_module.NeighbourPairs, "__init__", recorded)
    result = pretrain(data=str(tmp_path / "pool"), backbone="efficientnet_lite0", out=str(tmp_path / "bb"),
                      objective="scan", clusters="3", neighbours=2, batch_size=4, image_size=32, progress=False)
    assert calls["below"] == 1  # 12 images, one batch: the lower layers ran once, never in the 10 epochs
    (kind, path, shape), = caches  # memory-mapped from a scratch file in the stage, deleted before publishing
    assert kind is np.memmap and path.parent.name.startswith(".bb") and shape[0] == 12
    assert not path.exists() and not list(tmp_path.rglob("scan-inputs*"))
    provenance = json.loads((result.path / "backbone.json").read_text())["provenance"]
    assert provenance["objective"].startswith("SCAN") and "cached" in provenance["objective"]
    assert "5 head(s) of 3 clusters" in provenance["objective"]  # the default heads
    assert provenance["epochs"] == 10 and provenance["lr"] == 3e-3 and provenance["trained_layer_groups"] == 1
    base = create_backbone("efficientnet_lite0", image_size=32)
    trained = load_file(str(result.path / "weights.safetensors"))
    names = {id(p): n for n, p in base.named_parameters()}
    groups = base.layer_groups()
    state = base.state_dict()
    assert all(torch.equal(state[names[id(p)]], trained[names[id(p)]]) for g in groups[:-1] for p in g.parameters())
    assert not torch.equal(state["model.conv_head.weight"], trained["model.conv_head.weight"])
    assert torch.equal(state["model.bn2.running_mean"], trained["model.bn2.running_mean"])  # statistics frozen


def test_scan_pretrain_without_a_split_runs_the_whole_backbone_and_picks_k(tmp_path):
    _images(tmp_path / "pool")
    result = _pretrain(tmp_path, tmp_path / "bb", objective="scan", neighbours=3, train_groups=2)
    objective = json.loads((result.path / "backbone.json").read_text())["provenance"]["objective"]
    assert "cached" not in objective and "chosen as `cluster --k auto`" in objective
    assert np.isfinite(result.summary["final_loss"])


@pytest.mark.parametrize("case", ["scan_on_text", "bad_clusters", "too_many_clusters", "unknown_objective"])
def test_objective_options_are_checked_at_the_boundary(tmp_path, capsys, case):
    _images(tmp_path / "pool", n=4)
    (tmp_path / "texts.csv").write_text("text\nhello there\ngood day\n")
    data, extra = {"scan_on_text": (tmp_path / "texts.csv", ["--objective", "scan"]),
                   "bad_clusters": (tmp_path / "pool", ["--objective", "scan", "--clusters", "1"]),
                   "too_many_clusters": (tmp_path / "pool", ["--objective", "scan", "--clusters", "9"]),
                   "unknown_objective": (tmp_path / "pool", ["--objective", "byol"])}[case]
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "bb"), *extra, "--epochs", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and ("objective" in err[0] or "clusters" in err[0])
    assert not (tmp_path / "bb").exists()


@pytest.mark.parametrize("damage", ["truncated_weights", "spec_not_an_object"])
def test_damaged_backbone_folder_exits_2_with_one_line(tmp_path, capsys, damage):
    from transferkit.backbones.self_taught import SPEC_FORMAT, write_backbone_folder

    _images(tmp_path / "pool", n=6)
    folder = tmp_path / "bb"
    folder.mkdir()
    write_backbone_folder(folder, _base_small_cnn(), {"format": SPEC_FORMAT, "modality": "image",
                                                      "base": {"name": "small_cnn", "options": {"image_size": 16}}})
    target = folder / ("weights.safetensors" if damage == "truncated_weights" else "backbone.json")
    if damage == "truncated_weights":
        target.write_bytes(target.read_bytes()[:5])
    else:
        target.write_text("[1, 2]")
    capsys.readouterr()
    out = tmp_path / "c"
    assert main(["cluster", "--data", str(tmp_path / "pool"), "--out", str(out), "--k", "2",
                 "--backbone", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(target) in err[0] and "pretrain" in err[0], err
    assert not out.exists() and not (tmp_path / ".c.partial").exists()
