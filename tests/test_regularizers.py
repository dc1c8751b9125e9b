"""KL anchoring (Phan et al. 2020) and L2-SP: losses against hand computations, gradients, the (1 - A) weighting of
the task loss, LwF vs same-head anchoring, and ``--init-from`` personalisation."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from transferkit.backbones import create_backbone
from transferkit.config import FitConfig
from transferkit.data.base import DataSplits, LabeledData
from transferkit.engine.context import RunContext
from transferkit.engine.trainer import TrainConfig
from transferkit.errors import TransferkitError
from transferkit.model import ModelOutput, TaskSpec, TransferModel, save_model
from transferkit.strategies import create_strategy
from transferkit.strategies.regularizers import (
    AnchorConfig,
    AnchorExtension,
    KLAnchorObjective,
    L2SPObjective,
    kl_anchor_loss,
)

CLASSES = ["a", "b", "c"]
SMALL = {"width": 4, "feature_dim": 8, "in_chans": 3, "image_size": 16}


def model_and_data(seed: int = 0, classes: list[str] = CLASSES) -> tuple[TransferModel, LabeledData]:
    torch.manual_seed(seed)
    model = TransferModel(create_backbone("small_cnn", pretrained=False, **SMALL), [TaskSpec("label", "classify",
                                                                                             classes)])
    rng = np.random.default_rng(seed)
    items = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(8)]
    return model, LabeledData(items, np.arange(8) % len(classes), classes, "image", [f"x{i}" for i in range(8)])


def context_for(data: LabeledData) -> RunContext:
    config = TrainConfig(epochs=1, batch_size=4, lr=0.01, weight_decay=0.0, early_stopping=0, device="cpu")
    return RunContext(DataSplits(data, data, None), config, progress=False)


def test_kl_anchor_loss_equals_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    reference = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    hand = 0.0
    for row, target in zip(logits.tolist(), reference.tolist()):
        norm = math.log(sum(math.exp(v) for v in row))
        hand += -sum(p * (v - norm) for p, v in zip(target, row))
    assert float(kl_anchor_loss(logits, reference)) == pytest.approx(hand / 2, rel=1e-6)
    # identical distributions: the loss is the reference's entropy (KL = 0), and its gradient vanishes
    same = torch.log(reference).clone().requires_grad_(True)
    entropy = float(-(reference * reference.log()).sum(-1).mean())
    loss = kl_anchor_loss(same, reference)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(entropy, rel=1e-6)
    assert same.grad.abs().max() < 1e-6


def test_total_loss_is_phan_weighting_of_ce_and_anchor():
    """(1 - A) CE(labels) + A CE(reference predictions), with the task loss weighted through RunContext."""
    model, data = model_and_data()
    source, _ = model_and_data(seed=1)
    context = context_for(data)
    # anchor the same head of a reference model (as --init-from with equal label spaces)
    anchored = replace(context, objectives=[KLAnchorObjective(0.3, source, None)], task_weight=0.7)
    objectives = anchored.all_objectives(model, create_strategy("finetune"))
    for objective in objectives:
        objective.setup(model)
        objective.setup(model)  # the scaling does not compound, however often training (re)starts
    ce, kl = objectives[0], objectives[-1]
    assert ce.weight == pytest.approx(0.7) and kl.weight == pytest.approx(0.3)
    assert context.all_objectives(model, create_strategy("finetune"))[0].weight == 1.0  # the original: unscaled
    weighted = replace(anchored, task_objectives=[type(ce.inner)(weight=2.0)])  # e.g. importance weighting's
    assert weighted.all_objectives(model, create_strategy("finetune"))[0].weight == pytest.approx(1.4)

    model.eval()
    source.eval()
    inputs = torch.stack([model.backbone.preprocess(x) for x in data.items])
    labels = torch.as_tensor(data.labels)
    outputs = model(inputs)
    batch = {"inputs": inputs, "labels": labels}
    total = sum(o.weight * o(model, batch, outputs) for o in objectives)
    p_ref = torch.softmax(source(inputs).logits, -1)
    log_p = torch.log_softmax(outputs.logits, -1)
    hand = 0.7 * -log_p[torch.arange(8), labels].mean() + 0.3 * -(p_ref * log_p).sum(-1).mean()
    torch.testing.assert_close(total, hand)


def test_kl_lwf_anchors_the_original_head_on_current_features():
    model, data = model_and_data()
    original = nn.Linear(8, 5)
    reference = nn.Sequential()  # unused: reference logits are given directly below
    objective = KLAnchorObjective(0.5, reference, original)
    features = torch.randn(4, 8, requires_grad=True)
    outputs = ModelOutput(features, {"label": torch.zeros(4, 3)})
    target = torch.softmax(torch.randn(4, 5), -1)
    objective.reference_probabilities = lambda inputs, device: target  # type: ignore[method-assign]
    loss = objective(model, {"inputs": None}, outputs)
    torch.testing.assert_close(loss, kl_anchor_loss(original(features), target))
    loss.backward()
    assert features.grad is not None and features.grad.abs().sum() > 0  # the backbone is pulled, not the head


def test_l2sp_zero_at_start_and_gradient_is_beta_times_distance():
    model, _ = model_and_data()
    create_strategy("finetune", {"head_init": "random"}).prepare(model)
    objective = L2SPObjective(beta=0.3)
    objective.setup(model)
    outputs = ModelOutput(torch.zeros(1, 8), {"label": torch.zeros(1, 3)})
    assert float(objective(model, {}, outputs).detach()) == 0.0
    start = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))
    model.zero_grad()
    loss = objective(model, {}, outputs)
    loss.backward()
    expected = 0.15 * sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in model.backbone.named_parameters())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    for name, p in model.backbone.named_parameters():
        torch.testing.assert_close(p.grad, 0.3 * (p.detach() - start[name]))
    assert all(p.grad is None for p in model.heads.parameters())  # heads: no L2-SP (no pretrained value)


def test_init_from_copies_backbone_and_same_head_then_anchors_it(tmp_path):
    source, data = model_and_data(seed=1)
    save_model(source, tmp_path / "run" / "model", {"name": "finetune", "options": {}})
    model, _ = model_and_data(seed=2)
    strategy = create_strategy("finetune", {})  # head_init probe would replace the loaded head
    extension = AnchorExtension(AnchorConfig(anchor="kl", anchor_alpha=0.5, init_from=str(tmp_path / "run")))
    extension.check(FitConfig(data="x"), strategy)
    strategy.prepare(model)
    context = extension.configure(context_for(data), model, FitConfig(data="x"))
    # the options that reproduce the run stay as given; the loaded head is learned state the strategy keeps
    assert strategy.config.head_init == "auto" and context.heads_from == str(tmp_path / "run")
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    kl = context.objectives[-1]
    assert isinstance(kl, KLAnchorObjective) and kl.__dict__["anchored_head"] is None
    assert extension.metrics(context, model)["anchor"]["anchored"].startswith("the same head")

    explicit = AnchorExtension(AnchorConfig(init_from=str(tmp_path / "run")))
    explicit.check(FitConfig(data="x"), create_strategy("finetune", {"head_init": "probe"}))
    with pytest.raises(TransferkitError, match="--head-init probe would replace the head"):
        explicit.configure(context_for(data), model_and_data(seed=3)[0], FitConfig(data="x"))

    result = strategy.train(model, context)  # the engine runs with the anchor; the reference stays frozen
    assert result.history and "train_kl_anchor" in result.history[0]
    assert torch.equal(kl.__dict__["reference"].state_dict()["heads.label.0.weight"],
                       source.state_dict()["heads.label.0.weight"])


def test_init_from_new_label_space_uses_lwf_and_kl_without_any_head_fails(tmp_path):
    source, _ = model_and_data(seed=1)
    save_model(source, tmp_path / "run" / "model", {"name": "finetune", "options": {}})
    model, data = model_and_data(seed=2, classes=["x", "y"])
    extension = AnchorExtension(AnchorConfig(anchor="kl", init_from=str(tmp_path / "run")))
    context = extension.configure(context_for(data), model, FitConfig(data="x"))
    assert "LwF" in extension.mode and context.task_weight == pytest.approx(0.5) and context.heads_from is None
    assert not torch.equal(model.heads["label"][0].weight[:2], source.heads["label"][0].weight[:2])

    fresh, data = model_and_data()
    with pytest.raises(TransferkitError, match="no pretrained classifier"):
        AnchorExtension(AnchorConfig(anchor="kl")).configure(context_for(data), fresh, FitConfig(data="x"))
    with pytest.raises(TransferkitError, match="invalid --anchor"):
        AnchorConfig(anchor="l3").validate()
    reason = AnchorExtension(AnchorConfig(anchor="l2sp")).supports(create_strategy("linear-probe"), "label")
    assert "keeps the backbone frozen" in reason


def test_finetune_and_fish_keep_a_head_copied_by_init_from(monkeypatch):
    """With ``heads_from`` set (--init-from, same classes) no linear-probe start replaces the copied head."""
    import transferkit.strategies.finetune as finetune_module
    import transferkit.strategies.fish as fish_module

    def no_probe(*args, **kwargs):
        raise AssertionError("the copied head was replaced by a probe")

    monkeypatch.setattr(finetune_module, "start_from_probe", no_probe)
    monkeypatch.setattr(fish_module, "fit_probe", no_probe)
    for name, options in (("finetune", {"head_init": "auto"}), ("fish", {"fish_batches": 1})):
        model, data = model_and_data()
        strategy = create_strategy(name, options)
        strategy.prepare(model)
        head = model.heads["label"][0].weight.detach().clone()
        model.backbone.is_pretrained = True  # auto would probe a pretrained backbone
        strategy.train(model, replace(context_for(data), heads_from="run", train=replace(context_for(data).train,
                                                                                            lr=1e-12)))
        torch.testing.assert_close(model.heads["label"][0].weight.detach(), head, atol=1e-6, rtol=0)
        with pytest.raises(AssertionError, match="replaced by a probe"):
            strategy.train(model, context_for(data))
