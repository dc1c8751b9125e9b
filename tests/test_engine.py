"""The training engine: schedules, optimisation, early stopping, checkpoint/resume, solvers, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferkit.engine import CrossEntropyObjective, EpochShuffleSampler, TrainConfig, Trainer
from transferkit.engine.schedules import inverse_annealing, noam, warmup_cosine
from transferkit.engine.solvers import fit_logistic_regression
from transferkit.errors import TransferkitError
from transferkit.evaluation.metrics import classification_report


class Blobs(Dataset):
    """Gaussian blobs around fixed class centres; ``seed`` draws the points."""

    def __init__(self, n: int = 120, seed: int = 0, dim: int = 5, classes: int = 3) -> None:
        centers = np.random.default_rng(1234).normal(0, 3, (classes, dim))
        rng = np.random.default_rng(seed)
        self.y = rng.integers(0, classes, n)
        self.x = (centers[self.y] + rng.normal(0, 1, (n, dim))).astype(np.float32)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"inputs": torch.tensor(self.x[i]), "labels": torch.tensor(self.y[i]), "index": torch.tensor(i)}


def loaders(seed: int = 0):
    train, val = Blobs(120, seed), Blobs(60, seed + 100)
    return (DataLoader(train, batch_size=16, sampler=EpochShuffleSampler(len(train), seed)),
            DataLoader(val, batch_size=32))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def test_noam_schedule_matches_formula():
    f = noam(d_model=512, warmup_steps=4000)
    for step in (1, 100, 4000, 10000):
        expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
        assert math.isclose(f(step - 1), expected, rel_tol=1e-12)
    assert f(3999) > f(1000) and f(3999) > f(20000)  # rises during warm-up, decays after


def test_warmup_cosine_shape():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=0.02) and f(100) == pytest.approx(0.0, abs=1e-9)


def test_weight_decay_respects_timms_no_weight_decay():
    """A ViT's pos_embed / cls_token (ndim 3) are listed by timm's ``no_weight_decay()`` and must not be decayed,
    also when the ViT sits inside another module (the names are then prefixed)."""
    import timm

    from transferkit.engine.trainer import split_weight_decay

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=16,
                            depth=1, num_heads=2, num_classes=0)
    assert {"pos_embed", "cls_token"} <= set(vit.no_weight_decay())
    model = nn.ModuleDict({"backbone": nn.ModuleDict({"model": vit}), "head": nn.Linear(16, 2)})
    groups = split_weight_decay(model, [{"params": list(model.parameters()), "lr": 0.1}], 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.5 for p in g["params"]}
    assert "backbone.model.pos_embed" not in decayed and "backbone.model.cls_token" not in decayed
    assert {"backbone.model.patch_embed.proj.weight", "head.weight"} <= decayed


def test_dann_annealing_schedule_matches_formula():
    f = inverse_annealing(total_steps=200)
    assert f(0) == 1.0 and f(200) == pytest.approx(11**-0.75)
    assert f(100) == pytest.approx(6**-0.75) and f(50) > f(100) > f(150)
    warm = inverse_annealing(total_steps=200, warmup_steps=10)
    assert warm(0) == pytest.approx(0.1) and warm(100) == pytest.approx(f(100))


def test_weight_decay_shrinks_weight_matrices_but_not_biases():
    from transferkit.engine.trainer import split_weight_decay

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 4), nn.GRU(4, 6, batch_first=True), nn.LayerNorm(6), nn.Linear(6, 3))
    groups = split_weight_decay(model, [{"params": list(model.parameters()), "lr": 0.1}], 1.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 1.0 for p in g["params"]}
    assert decayed == {"0.weight", "1.weight_ih_l0", "1.weight_hh_l0", "3.weight"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(groups)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: only the decoupled decay moves parameters, w <- w (1 - lr * wd)
    for name, p in model.named_parameters():
        expected = before[name] * (0.9 if name in decayed else 1.0)
        torch.testing.assert_close(p.detach(), expected)


def test_trainer_follows_the_annealing_schedule():
    train, val = loaders()
    cfg = TrainConfig(epochs=3, lr=0.1, early_stopping=0, device="cpu", schedule="annealing")
    result = Trainer(make_model(), [CrossEntropyObjective()], cfg, progress=False).fit(train, val)
    lrs = [row["lr"] for row in result.history]
    assert lrs[0] > lrs[1] > lrs[2] and lrs[2] == pytest.approx(0.1 * 11**-0.75, rel=0.1)


def test_trainer_learns_and_restores_best_epoch():
    train, val = loaders()
    model = make_model()
    cfg = TrainConfig(epochs=15, lr=0.05, optimizer="sgd", early_stopping=0, seed=0, device="cpu")
    result = Trainer(model, [CrossEntropyObjective()], cfg, progress=False).fit(train, val)
    accs = [row["val_accuracy"] for row in result.history]
    assert result.best_metric == max(accs) and result.best_metric > 0.9
    assert result.history[0]["train_loss"] > result.history[-1]["train_loss"]
    # the returned model is the best epoch's
    model.eval()
    with torch.no_grad():
        x = torch.tensor(val.dataset.x)
        acc = float((model(x).argmax(-1).numpy() == val.dataset.y).mean())
    assert acc == pytest.approx(result.best_metric)


def test_early_stopping_stops():
    train, val = loaders()
    cfg = TrainConfig(epochs=50, lr=1e-6, early_stopping=2, device="cpu", schedule="constant")
    result = Trainer(make_model(), [CrossEntropyObjective()], cfg, progress=False).fit(train, val)
    assert result.stopped_early and len(result.history) < 50


def test_plateau_schedule_halves_learning_rate():
    train, val = loaders()
    cfg = TrainConfig(epochs=4, lr=1e-7, early_stopping=0, device="cpu", schedule="plateau", plateau_patience=1)
    result = Trainer(make_model(), [CrossEntropyObjective()], cfg, progress=False).fit(train, val)
    lrs = [row["lr"] for row in result.history]
    assert lrs[-1] < lrs[0]
    assert all(b in (a, a / 2) for a, b in zip(lrs, lrs[1:]))


class Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    cfg = TrainConfig(epochs=5, lr=0.05, optimizer="sgd", early_stopping=0, seed=3, device="cpu")
    train, val = loaders(3)
    reference = make_model(3)
    Trainer(reference, [CrossEntropyObjective()], cfg, progress=False).fit(train, val)

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise Interrupt

    interrupted = make_model(3)
    with pytest.raises(Interrupt):
        Trainer(interrupted, [CrossEntropyObjective()], cfg, checkpoint_dir=tmp_path, progress=False,
                epoch_callback=stop_after_two).fit(*loaders(3))
    assert (tmp_path / "trainer.safetensors").exists()
    resumed = make_model(99)  # different init: everything must come from the checkpoint
    result = Trainer(resumed, [CrossEntropyObjective()], cfg, checkpoint_dir=tmp_path, progress=False).fit(*loaders(3))
    assert result.resumed_from_epoch == 2
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_frozen_parameters_stay_identical():
    train, val = loaders()
    model = make_model()
    model[0].weight.requires_grad_(False)
    before = model[0].weight.clone()
    cfg = TrainConfig(epochs=2, lr=0.1, weight_decay=0.5, device="cpu")
    Trainer(model, [CrossEntropyObjective()], cfg, progress=False).fit(train, val)
    assert torch.equal(before, model[0].weight)


def test_invalid_config_is_a_clear_error():
    with pytest.raises(TransferkitError, match="--optimizer"):
        TrainConfig(optimizer="rmsprop").validate()
    with pytest.raises(TransferkitError, match="--lr"):
        TrainConfig(lr=float("nan")).validate()


def test_lbfgs_probe_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    data = Blobs(200, seed=1, dim=8, classes=4)
    w, b = fit_logistic_regression(data.x, data.y, 4, c=0.5)
    ours = (torch.tensor(data.x) @ w.T + b).softmax(-1).numpy()
    sk = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(data.x, data.y).predict_proba(data.x)
    assert np.abs(ours - sk).max() < 1e-3


def test_macro_f1_counts_classes_that_are_only_predicted():
    """scikit-learn's default labels: those in the truth or the predictions. Class 2 is predicted once but never
    true, so its F1 is 0 and macro-F1 = (2/3 + 1 + 0) / 3."""
    probabilities = np.eye(3)[[0, 2, 1, 1]]
    report = classification_report(np.array([0, 0, 1, 1]), probabilities, ["a", "b", "c"])
    assert report["macro_f1"] == pytest.approx(5 / 9) and round(report["macro_f1"], 3) == 0.556
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert classification_report(np.array([], dtype=int), np.zeros((0, 3)), ["a", "b", "c"])["macro_f1"] == 0.0


def test_classification_report_matches_scikit_learn():
    from sklearn.metrics import confusion_matrix, f1_score, top_k_accuracy_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 300)
    probs = rng.dirichlet(np.ones(7), 300)
    probs[np.arange(150), labels[:150]] += 1
    probs /= probs.sum(1, keepdims=True)
    report = classification_report(labels, probs, [f"c{i}" for i in range(7)])
    assert report["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()))
    assert report["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"))
    assert report["top5_accuracy"] == pytest.approx(top_k_accuracy_score(labels, probs, k=5))
    assert report["confusion_matrix"] == confusion_matrix(labels, probs.argmax(1)).tolist()
    assert "top5_accuracy" not in classification_report(labels % 3, probs[:, :3], ["a", "b", "c"])
