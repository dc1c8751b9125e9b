"""Few-shot strategies: prototypes and kNN against hand-computed cases (and save/load), SetFit pairs, and the
contrastive stage through the engine on a tiny random text encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from transferkit.backbones import BackboneInfo, BackboneSpec, register_backbone
from transferkit.backbones.base import Backbone
from transferkit.data.base import DataSplits, LabeledData
from transferkit.engine.context import RunContext
from transferkit.engine.trainer import TrainConfig
from transferkit.model import TaskSpec, TransferModel, load_model, save_model
from transferkit.strategies import create_strategy
from transferkit.strategies.fewshot import class_prototypes, contrastive_pairs


class IdentityBackbone(Backbone):
    """Items are 2-d vectors; the embedding is the vector itself (so the expected answers are computable)."""

    modality = "sequence"

    def __init__(self) -> None:
        super().__init__()
        self.spec = BackboneSpec("test-identity-2d", {})
        self.feature_dim = 2
        self.scale = nn.Parameter(torch.ones(1))

    def preprocess(self, item, train: bool = False):
        return torch.as_tensor(item, dtype=torch.float32)

    def forward_features(self, inputs):
        return inputs * self.scale

    def layer_groups(self):
        return [self]


register_backbone("test-identity-2d", lambda: BackboneInfo("test-identity-2d", "sequence", 1, 2, "none", True))(
    lambda pretrained=True, **options: IdentityBackbone()
)

# class 0 points to the right, class 1 upwards; lengths differ so that normalisation matters
TRAIN = [(4.0, 0.0), (3.0, 3.0), (0.0, 1.0), (-1.0, 1.0), (0.0, 5.0)]
TRAIN_LABELS = [0, 0, 1, 1, 1]


def _data(points, labels, name: str) -> LabeledData:
    return LabeledData(items=[np.asarray(p) for p in points], labels=np.asarray(labels), class_names=["right", "up"],
                       modality="sequence", ids=[f"{name}[{i}]" for i in range(len(points))], name=name)


def _fit(strategy_name: str, options: dict, tmp_path, val_points=((1.0, 0.2),), val_labels=(0,)):
    splits = DataSplits(_data(TRAIN, TRAIN_LABELS, "train"), _data(val_points, val_labels, "val"), None)
    model = TransferModel(IdentityBackbone(), [TaskSpec("label", "classify", ["right", "up"])])
    strategy = create_strategy(strategy_name, options)
    strategy.prepare(model)
    context = RunContext(splits=splits, train=TrainConfig(epochs=1), cache_dir=None, progress=False)
    result = strategy.train(model, context)
    return model, strategy, result


def _probabilities(model: TransferModel, points) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(points, dtype=torch.float32)).logits.softmax(-1).numpy()


def test_prototypes_are_normalised_class_means():
    features = torch.tensor(TRAIN)
    protos = class_prototypes(features, torch.tensor(TRAIN_LABELS), 2)
    # class 0: mean of (1, 0) and (1, 1)/sqrt 2; class 1: mean of (0, 1), (-1, 1)/sqrt 2, (0, 1)
    r = 1 / math.sqrt(2)
    expected0 = np.array([(1 + r) / 2, r / 2])
    expected1 = np.array([-r / 3, (2 + r) / 3])
    np.testing.assert_allclose(protos[0], expected0 / np.linalg.norm(expected0), atol=1e-6)
    np.testing.assert_allclose(protos[1], expected1 / np.linalg.norm(expected1), atol=1e-6)


def test_prototypes_strategy_scores_cosine_and_round_trips(tmp_path):
    model, strategy, result = _fit("prototypes", {"prototype_temperature": 0.5}, tmp_path)
    assert result.history[0]["val_accuracy"] == 1.0
    query = [(2.0, 1.0)]
    protos = class_prototypes(torch.tensor(TRAIN), torch.tensor(TRAIN_LABELS), 2).numpy()
    unit = np.array(query[0]) / np.linalg.norm(query[0])
    expected = torch.tensor(unit @ protos.T / 0.5).softmax(-1).numpy()
    np.testing.assert_allclose(_probabilities(model, query)[0], expected, atol=1e-5)
    save_model(model, tmp_path / "model", strategy.to_dict())
    loaded, _ = load_model(tmp_path / "model")
    np.testing.assert_allclose(_probabilities(loaded, query), _probabilities(model, query), atol=1e-6)


def test_knn_votes_of_nearest_neighbours_and_round_trips(tmp_path):
    model, strategy, _ = _fit("knn", {"knn_k": 3}, tmp_path)
    # (1, 0.2): cosines to the 5 examples: 0.98, 0.83, 0.20, -0.55, 0.20 -> top 3 = two "right", one "up"
    # (-1, 2): nearest are (0, 1), (0, 5) [0.894 each] and (-1, 1) [0.949]: three "up" votes
    probs = _probabilities(model, [(1.0, 0.2), (-1.0, 2.0)])
    assert probs[0].argmax() == 0 and probs[1].argmax() == 1
    np.testing.assert_allclose(probs[0], [2 / 3, 1 / 3], atol=2e-3)
    np.testing.assert_allclose(probs[1], [0.0, 1.0], atol=2e-3)
    # the bank's size is learned state: in the model's buffers, not in the options that reproduce the run
    assert strategy.to_dict()["options"] == {"knn_k": 3}
    assert model.heads[model.tasks[0].name].bank.shape[0] == 5
    save_model(model, tmp_path / "model", strategy.to_dict())
    loaded, _ = load_model(tmp_path / "model")
    assert loaded.heads[loaded.tasks[0].name].bank.shape[0] == 5
    np.testing.assert_allclose(_probabilities(loaded, [(1.0, 0.2), (-1.0, 2.0)]), probs, atol=1e-6)


def test_knn_k1_is_nearest_neighbour(tmp_path):
    model, _, _ = _fit("knn", {"knn_k": 1}, tmp_path)
    # (1, 1.2) is closest in angle to (3, 3) (class 0), though most "up" points are nearer by distance
    assert _probabilities(model, [(1.0, 1.2)])[0].argmax() == 0


def test_knn_k_above_the_labelled_examples_or_a_class_size_warns_once_naming_the_k_used(tmp_path, caplog):
    """--knn-k larger than the labelled examples was capped silently (every prediction then the most frequent
    class); larger than the smallest class, that class can be outvoted: one warning each, naming the numbers."""
    import logging

    def warnings() -> list[str]:
        found = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--knn-k" in r.getMessage()]
        caplog.clear()
        return found

    with caplog.at_level(logging.WARNING):
        model, strategy, _ = _fit("knn", {"knn_k": 9}, tmp_path)
        found = warnings()
        assert len(found) == 1 and "--knn-k 9" in found[0] and "5 labelled examples" in found[0] and "k = 5" in found[0]
        strategy.train(model, RunContext(splits=DataSplits(_data(TRAIN, TRAIN_LABELS, "train"),
                                                           _data([(1.0, 0.2)], [0], "val"), None),
                                         train=TrainConfig(epochs=1), cache_dir=None, progress=False))
        assert warnings() == []  # once per run (cv trains a fold after fold)
        _fit("knn", {"knn_k": 3}, tmp_path)  # class 'right' holds 2 examples
        found = warnings()
        assert len(found) == 1 and "--knn-k 3" in found[0] and "'right'" in found[0] and "2 " in found[0]
        _fit("knn", {"knn_k": 2}, tmp_path)
        assert warnings() == []


def test_contrastive_pairs_are_balanced_setfit_pairs():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pairs = contrastive_pairs(labels, seed=0)
    positives = [(i, j) for i, j, t in pairs if t == 1.0]
    negatives = [(i, j) for i, j, t in pairs if t == 0.0]
    assert all(labels[i] == labels[j] for i, j in positives)
    assert all(labels[i] != labels[j] for i, j in negatives)
    # 11 distinct negative pairs; the 4 distinct positive pairs are oversampled to 11
    assert len(set(negatives)) == len(negatives) == 11
    assert len(positives) == 11 and set(positives) == {(0, 1), (0, 2), (1, 2), (3, 4)}
    assert contrastive_pairs(labels, seed=0) == pairs


def test_contrastive_pulls_same_class_together(tiny_text_folder):
    """The pair stage (through the engine) raises same-class cosine relative to different-class cosine."""
    from transferkit.api import fit, load

    run = fit(str(tiny_text_folder["data"]), backbone=f"hf:{tiny_text_folder['model']}", strategy="contrastive",
              contrastive_epochs=2, contrastive_lr=5e-3, out=str(tiny_text_folder["out"]), progress=False,
              val_fraction=0.2, test_fraction=0.25, seed=0)
    assert run.metrics["strategy"] == "contrastive"
    assert run.metrics["accuracy"] >= 0.75  # the two classes use disjoint words
    model = load(run.path)
    assert model.predict(["cat dog mat", "guitar market today"]) == ["animals", "music"]

    from transferkit.backbones import create_backbone
    from transferkit.memory.index import embed

    texts = ["cat dog mat", "sat fell cat", "guitar plays today", "market playing guitar"]
    same, different = [(0, 1), (2, 3)], [(0, 2), (1, 3)]

    def gap(encoder) -> float:
        e = embed(encoder, texts)
        return float(np.mean([e[i] @ e[j] for i, j in same]) - np.mean([e[i] @ e[j] for i, j in different]))

    assert gap(model.module.backbone) > gap(create_backbone(f"hf:{tiny_text_folder['model']}")) + 0.05


@pytest.fixture(scope="module")
def tiny_text_folder(tmp_path_factory):
    """A tiny random BERT (hand-written vocab) and a CSV of two classes with disjoint words."""
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("fewshot")
    words_a = ["cat", "dog", "mat", "sat", "fell"]
    words_b = ["guitar", "plays", "market", "today", "playing"]
    folder = root / "tiny-bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words_a,
                                                 *words_b]) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=15, max_position_embeddings=32, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for i in range(24):
        words, label = (words_a, "animals") if i % 2 == 0 else (words_b, "music")
        rows.append(" ".join(rng.choice(words, size=3)) + f",{label}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return {"data": root / "data.csv", "model": folder, "out": root / "run"}


def test_contrastive_reports_the_tuned_encoder_and_head_as_trained(tmp_path, isolated_cache):
    """The pair stage tunes the whole encoder and the head is solved, but both are frozen when metrics.json counts
    ``requires_grad``: the run (and compare's leaderboard) said ``trainable 0``. Also an image backbone: the
    strategy only needs ``forward_features``, as the support matrix (test_supports) trains it on small_cnn."""
    from tests.conftest import stripes
    from transferkit.api import fit

    for cls, direction in (("horizontal", "h"), ("vertical", "v")):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(6):
            stripes(direction, i).save(tmp_path / "data" / cls / f"{i}.png")
    run = fit(str(tmp_path / "data"), backbone="small_cnn", image_size=16, strategy="contrastive", max_pairs=8,
              pair_batch_size=8, out=str(tmp_path / "run"), progress=False, device="cpu", threads=1,
              protocol="holdout", seed=0)
    metrics = run.metrics
    assert metrics["strategy"] == "contrastive"
    assert metrics["trainable_params"] == metrics["total_params"] > 0  # encoder + closed-form head, nothing frozen
