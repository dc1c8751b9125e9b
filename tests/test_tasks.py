"""Multi-task learning: losses against hand-computed values, crossing-free quantiles, learned loss weights,
the --task extension and a quick multi-task fit on the stars dataset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from transferkit.errors import TransferkitError
from transferkit.model import TaskSpec, TransferModel, make_head
from transferkit.tasks import QuantileHead, parse_task
from transferkit.tasks.extension import TasksConfig
from transferkit.tasks.losses import classification_loss, pinball_loss, regression_loss
from transferkit.tasks.multitask import (
    MultiTaskObjective,
    conformal_guaranteed,
    conformal_offset,
    task_metrics,
)


def test_parse_task() -> None:
    assert parse_task("size:regress") == ("size", "regress")
    assert parse_task("classify") == (None, "classify")
    assert parse_task("a:b:quantile") == ("a:b", "quantile")
    for bad in ("size:cluster", ":regress", "regression"):
        with pytest.raises(TransferkitError):
            parse_task(bad)


def test_cross_entropy_and_hinge_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.5, 0.0]])
    target = torch.tensor([0, 2])
    ce = [-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))), -math.log(1 / (2 + math.exp(0.5)))]
    assert classification_loss(logits, target).item() == pytest.approx(sum(ce) / 2, rel=1e-6)
    # hinge: sum_{j != y} max(0, 1 - z_y + z_j) / C; row 1: (0 + 0)/3, row 2: (1 + 1.5)/3
    assert classification_loss(logits, target, "hinge").item() == pytest.approx((0 + 2.5 / 3) / 2, rel=1e-6)
    # a missing label (-1) is ignored
    assert classification_loss(logits, torch.tensor([0, -1])).item() == pytest.approx(ce[0], rel=1e-6)


def test_regression_losses_by_hand() -> None:
    prediction = torch.tensor([1.0, 2.0, 4.0, 0.0])
    target = torch.tensor([1.5, 0.0, 4.0, float("nan")])
    # residuals 0.5, -2, 0 (NaN target ignored)
    assert regression_loss(prediction, target).item() == pytest.approx((0.25 + 4 + 0) / 3)
    # smooth L1 (beta 1): 0.5 * 0.25, 2 - 0.5, 0
    assert regression_loss(prediction, target, "smooth_l1").item() == pytest.approx((0.125 + 1.5) / 3)
    # scaled residuals: (r / 2)^2
    assert regression_loss(prediction, target, scale=2.0).item() == pytest.approx((0.0625 + 1 + 0) / 3)


def test_pinball_loss_by_hand_with_several_quantiles() -> None:
    q = torch.tensor([[1.0, 2.0, 3.0]])
    taus = [0.1, 0.5, 0.9]
    # y = 2.5: residuals 1.5, 0.5, -0.5 -> 0.1*1.5, 0.5*0.5, 0.1*0.5
    assert pinball_loss(q, torch.tensor([2.5]), taus).item() == pytest.approx((0.15 + 0.25 + 0.05) / 3)
    # y = 0: residuals -1, -2, -3 -> 0.9*1, 0.5*2, 0.1*3
    assert pinball_loss(q, torch.tensor([0.0]), taus).item() == pytest.approx((0.9 + 1.0 + 0.3) / 3)


def test_quantile_head_never_crosses_even_after_training() -> None:
    torch.manual_seed(0)
    head = QuantileHead(8, [0.05, 0.25, 0.5, 0.75, 0.95], mean=10.0, std=3.0)
    x = torch.randn(256, 8) * 5
    assert (torch.diff(head(x), dim=1) >= 0).all()
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    y = 10 + 3 * x[:, 0] + torch.randn(256) * torch.exp(x[:, 1] / 5)  # heteroscedastic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead on a shared machine
    try:
        for _ in range(200):
            optimizer.zero_grad()
            pinball_loss(head(x), y, head.quantiles, scale=3.0).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    predictions = head(torch.randn(1000, 8) * 10)
    assert (torch.diff(predictions, dim=1) >= 0).all()
    coverage = ((y >= head(x)[:, 0]) & (y <= head(x)[:, -1])).float().mean().item()
    assert 0.75 < coverage < 0.99  # a 90% interval fitted on the training data


def test_task_metrics_interval_coverage() -> None:
    task = TaskSpec("size", "quantile", [], 3, {"quantiles": [0.1, 0.5, 0.9]})
    predictions = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [5.0, 6.0, 7.0], [1.0, 1.0, 1.0]])
    targets = np.array([1.5, 3.0, 6.0, np.nan])
    m = task_metrics(task, predictions, targets)
    assert m["n"] == 3 and m["coverage"] == pytest.approx(2 / 3) and m["mae"] == pytest.approx((0.5 + 2 + 0) / 3)
    assert m["nominal_coverage"] == pytest.approx(0.8) and m["crossings"] == 0


def test_conformal_offset_by_hand_and_calibrated_head_never_crosses() -> None:
    # interval [0, 2] for every item; scores max(0 - y, y - 2) = -0.5, -1, 0.5, 1.5, 3 (sorted)
    predictions = np.tile([0.0, 1.0, 2.0], (6, 1))
    targets = np.array([1.5, 1.0, 2.5, 3.5, 5.0, np.nan])
    # n = 5, coverage 0.5: rank ceil(6 * 0.5) = 3 -> 0.5; coverage 0.9: rank min(5, 6) = 5 -> 3
    assert conformal_offset(predictions, targets, 0.5) == pytest.approx(0.5)
    assert conformal_offset(predictions, targets, 0.9) == pytest.approx(3.0)
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    for quantiles in ([0.1, 0.5, 0.9], [0.1, 0.9]):
        trained = QuantileHead(4, quantiles)
        raw = trained(x)
        for offset in (0.7, -0.2, -50.0):  # wider, narrower, collapsed onto the inner quantiles
            q = QuantileHead(4, quantiles, interval_offset=offset)
            q.load_state_dict(trained.state_dict())
            out = q(x)
            assert (torch.diff(out, dim=1) >= 0).all()
            if offset == 0.7:
                assert torch.allclose(out[:, 0], raw[:, 0] - 0.7) and torch.allclose(out[:, -1], raw[:, -1] + 0.7)


def test_conformal_offset_warns_when_the_calibration_set_is_too_small(caplog) -> None:
    # coverage 0.8 needs ceil((n + 1) * 0.8) <= n, i.e. n >= 4; with n = 3 the rank (4) is clamped to 3
    assert not conformal_guaranteed(3, 0.8) and conformal_guaranteed(4, 0.8)
    assert not conformal_guaranteed(18, 0.95) and conformal_guaranteed(19, 0.95)
    predictions = np.tile([0.0, 1.0, 2.0], (3, 1))
    with caplog.at_level("WARNING", logger="transferkit.tasks.multitask"):
        assert conformal_offset(predictions, np.array([1.0, 3.0, 5.0]), 0.8) == pytest.approx(3.0)
    assert "too few for coverage 0.8" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="transferkit.tasks.multitask"):
        conformal_offset(np.tile([0.0, 1.0, 2.0], (4, 1)), np.array([1.0, 3.0, 5.0, 0.5]), 0.8)
    assert "too few" not in caplog.text


class _Trunk(nn.Module):
    feature_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


def _toy_tasks() -> list[TaskSpec]:
    return [TaskSpec("label", "classify", ["a", "b"], 2, {"column": None, "loss": "cross_entropy"}),
            TaskSpec("y", "regress", [], 1, {"column": "y", "loss": "mse", "target_mean": 0.0, "target_std": 1.0})]


def _toy_batches(n_batches: int = 30) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n_batches):
        x = torch.randn(32, 2, generator=g)
        batches.append({"inputs": x, "labels": (x[:, 0] > 0).long(), "target:y": 3 * x[:, 1] + torch.randn(32, generator=g),
                        "index": torch.arange(32) + 32 * i})
    return batches


def _toy_model() -> TransferModel:
    """A hand-made TransferModel (the small _Trunk and one head per toy task), seeded."""
    torch.manual_seed(0)
    tasks = _toy_tasks()
    model = TransferModel.__new__(TransferModel)
    nn.Module.__init__(model)
    model.backbone, model.tasks, model.head_dropout, model.freeze_norm_stats = _Trunk(), tasks, 0.0, False
    model.heads = nn.ModuleDict({t.name: make_head(4, t) for t in tasks})
    return model


def _train_toy(weighting: str, steps: int = 30) -> MultiTaskObjective:
    """A hand-made TransferModel-like module trained through the engine with the multi-task objective."""
    from transferkit.engine import TrainConfig, Trainer

    model = _toy_model()
    tasks = model.tasks
    objective = MultiTaskObjective(tasks, weighting)
    config = TrainConfig(epochs=1, lr=0.05, schedule="constant", early_stopping=0, device="cpu", threads=1)
    Trainer(model, [objective], config, progress=False).fit(_toy_batches(steps))
    return objective


def test_validation_loss_leaves_out_tasks_of_weight_zero() -> None:
    from transferkit.engine.trainer import default_forward
    from transferkit.tasks.multitask import multitask_evaluate_fn

    model = _toy_model()
    tasks = model.tasks
    batches = _toy_batches(2)
    both = multitask_evaluate_fn(tasks)(model, batches, None, default_forward)
    size_only = multitask_evaluate_fn(tasks, [0.0, 1.0])(model, batches, None, default_forward)
    assert size_only["loss"] < both["loss"] and "label_accuracy" in size_only  # still measured, not selected on
    y = torch.cat([b["target:y"] for b in batches])
    with torch.no_grad():
        predictions = torch.cat([model(b["inputs"]).outputs["y"] for b in batches])
    assert size_only["loss"] == pytest.approx(float(((predictions - y) ** 2).mean()), rel=1e-5)


def test_uncertainty_weights_are_learned() -> None:
    objective = _train_toy("uncertainty")
    log_variances = objective.log_variances.detach()
    assert log_variances.abs().min() > 0.05  # moved away from the initial 0
    # the noisy regression task (noise variance 1 on top of MSE) keeps a larger variance than the easy classifier
    assert log_variances[1] > log_variances[0]


def test_uncertainty_weights_reach_their_optimum_at_fine_tuning_learning_rates() -> None:
    # with fixed losses L_i, sum c_i exp(-s_i) L_i + s_i / 2 is minimal at s_i = log(2 c_i L_i)
    objective = MultiTaskObjective(_toy_tasks(), "uncertainty")
    losses = torch.tensor([0.05, 0.5])
    objective.task_losses = lambda batch, outputs: losses
    optimizer = torch.optim.Adam(objective.parameters(), lr=3e-3)
    for _ in range(400):
        optimizer.zero_grad()
        objective(None, {}, None).backward()
        optimizer.step()
    expected = torch.log(2 * torch.tensor([1.0, 0.5]) * losses)
    torch.testing.assert_close(objective.log_variances.detach(), expected, atol=0.15, rtol=0)


def test_gradnorm_weights_move_and_stay_normalised() -> None:
    objective = _train_toy("gradnorm")
    objective.on_step(0, 1)
    weights = objective.task_weights.detach()
    assert weights.sum().item() == pytest.approx(2.0, rel=1e-5)
    assert (weights - 1).abs().max() > 0.01


def test_tasks_config_rejects_bad_input() -> None:
    with pytest.raises(TransferkitError):
        TasksConfig(task=["size:regress", "size:quantile"]).validate()
    with pytest.raises(TransferkitError):
        TasksConfig(task=["classify"], quantiles="0.9,0.1").validate()
    with pytest.raises(TransferkitError):
        TasksConfig(task=["classify", "size:regress"], task_weights="1").validate()
    with pytest.raises(TransferkitError):
        TasksConfig(task=["classify"], loss_weighting="magic").validate()


def test_stars_dataset_has_both_labels() -> None:
    from transferkit.data.stars import make_stars

    data = make_stars(count=60, image_size=32, seed=1)
    assert len(data) == 60 and data.class_names == ["3", "4", "5", "6", "7", "8"]
    assert np.array_equal(data.columns["count"] - 3, data.labels)
    assert np.asarray(data.items[0]).shape == (32, 32)
    assert data.columns["size"].min() >= 6.0
    again = make_stars.__wrapped__(count=60, image_size=32, seed=1)
    assert np.array_equal(np.asarray(again.items[5]), np.asarray(data.items[5]))


def test_multitask_fit_on_stars_writes_per_task_metrics_and_reloads(tmp_path) -> None:
    import transferkit

    run = transferkit.fit("stars", backbone="small_cnn", strategy="finetune", head_init="random", freeze_bn=False,
                          task=["count:classify", "size:quantile"], loss_weighting="uncertainty", limit_per_class=6,
                          epochs=1, batch_size=16, image_size=16, test_limit=24, out=str(tmp_path / "run"),
                          progress=False, device="cpu")
    tasks = run.metrics["tasks"]
    assert set(tasks) == {"count", "size"}
    assert tasks["size"]["n"] == 24 and tasks["size"]["crossings"] == 0 and 0 <= tasks["size"]["coverage"] <= 1
    assert run.metrics["accuracy"] == pytest.approx(tasks["count"]["accuracy"])
    calibration = tasks["size"]["calibration"]  # conformal interval correction from the validation split
    assert calibration["n"] > 0 and "coverage_uncalibrated" in calibration
    loaded = transferkit.load(run.path)
    assert loaded.module.heads["size"].interval_offset == pytest.approx(calibration["interval_offset"])
    assert [t.kind for t in loaded.module.tasks] == ["classify", "quantile"]
    x = torch.randn(3, 1, 16, 16)
    out = loaded.module(x).outputs
    assert out["size"].shape == (3, 3) and (torch.diff(out["size"], dim=1) >= 0).all()
    report = transferkit.evaluate(loaded, "stars", progress=False)  # every head scored, not only the first
    assert set(report["tasks"]) == {"count", "size"}
    assert report["tasks"]["count"]["accuracy"] == pytest.approx(report["accuracy"])
    assert report["tasks"]["size"]["n"] == report["n"] and 0 <= report["size_coverage"] <= 1
    assert report["tasks"]["size"]["mae"] > 0 and report["tasks"]["size"]["crossings"] == 0


def test_too_small_calibration_split_is_flagged_in_metrics_json(tmp_path) -> None:
    """Six validation items cannot give a 98% conformal guarantee (rank ceil(7 * 0.98) = 7 > 6; it needs 49): the
    run says so in metrics.json (flag, warning, note) instead of silently clamping the rank."""
    import transferkit

    run = transferkit.fit("stars", backbone="small_cnn", strategy="finetune", head_init="random",
                          task=["size:quantile"], quantiles="0.01,0.5,0.99", limit_per_class=2, epochs=1,
                          batch_size=16, image_size=16, test_limit=6, out=str(tmp_path / "run"), progress=False,
                          device="cpu")
    metrics = json.loads((run.path / "metrics.json").read_text())
    calibration = metrics["tasks"]["size"]["calibration"]
    assert calibration["n"] == metrics["dataset_sizes"]["val"] < 49
    assert calibration["coverage_guaranteed"] is False and "too few" in calibration["warning"]
    assert any("too few for the 98% coverage guarantee" in note for note in metrics["notes"])


def test_multitask_rejects_frozen_feature_strategies_and_unknown_columns(tmp_path) -> None:
    """(A regression first is allowed: see test_regression_first_task_lists_fit_evaluate_and_predict.)"""
    import transferkit

    with pytest.raises(TransferkitError, match="strategy"):
        transferkit.fit("stars", backbone="small_cnn", strategy="linear-probe", task=["classify", "size:regress"],
                        out=str(tmp_path / "a"), progress=False)
    with pytest.raises(TransferkitError, match="no column"):
        transferkit.fit("stars", backbone="small_cnn", strategy="finetune", head_init="random",
                        task=["classify", "weight:regress"], limit_per_class=3, out=str(tmp_path / "b"),
                        progress=False, epochs=1, image_size=16)


def test_cli_task_flag_is_repeatable() -> None:
    from transferkit.cli.main import build_parser

    args = build_parser().parse_args(["fit", "--data", "stars", "--task", "count:classify", "--task", "size:quantile",
                                      "--quantiles", "0.1,0.5,0.9", "--loss-weighting", "gradnorm"])
    assert args.task == ["count:classify", "size:quantile"] and args.loss_weighting == "gradnorm"


def test_regression_first_task_lists_fit_evaluate_and_predict(tmp_path, capsys):
    """``--task size:quantile --task count:classify`` and a lone ``--task size:regress``: no label classifier first."""
    from PIL import Image

    import transferkit
    from transferkit.cli.main import main
    from transferkit.evaluation.metrics import format_report

    common = dict(backbone="small_cnn", strategy="finetune", freeze_bn=False, limit_per_class=6, epochs=1,
                  batch_size=16, image_size=16, test_limit=24, progress=False, device="cpu")
    transferkit.fit("stars", task=["size:quantile", "count:classify"], out=str(tmp_path / "a"), **common)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert "accuracy" not in metrics and "coverage" in metrics
    assert metrics["mae"] == pytest.approx(metrics["tasks"]["size"]["mae"])
    report = transferkit.evaluate(str(tmp_path / "a"), "stars", progress=False)
    assert set(report["tasks"]) == {"size", "count"} and report["mae"] > 0
    single = transferkit.fit("stars", task=["size:regress"], out=str(tmp_path / "b"), **common)
    assert set(single.metrics["tasks"]) == {"size"} and single.metrics["mae"] > 0
    Image.fromarray(np.full((16, 16), 128, dtype=np.uint8)).save(tmp_path / "x.png")
    assert isinstance(transferkit.predict(str(tmp_path / "b"), [str(tmp_path / "x.png")])[0]["prediction"], float)
    row = transferkit.predict(str(tmp_path / "a"), [str(tmp_path / "x.png")])[0]
    assert set(row["prediction"]) == {"0.1", "0.5", "0.9"} and row["tasks"]["count"] in [str(i) for i in range(3, 9)]
    assert "size mae" in format_report(transferkit.evaluate(str(tmp_path / "b"), "stars", progress=False))
    assert main(["predict", "--model", str(tmp_path / "b"), str(tmp_path / "x.png")]) == 0
    assert "x.png" in capsys.readouterr().out


def test_label_column_name_means_the_datasets_own_label() -> None:
    """``--task label:classify`` (the README's multi-task example) classifies the dataset's label when the data
    has no column called ``label``: before, it stopped with "the data has no column 'label'"."""
    from transferkit.data.base import DataSplits
    from transferkit.data.stars import make_stars
    from transferkit.tasks.extension import build_tasks

    data = make_stars(count=24, image_size=32, seed=2)
    splits = DataSplits(train=data, val=data, test=None)
    tasks, _ = build_tasks(splits, TasksConfig(task=["label:classify", "size:quantile"], quantiles="0.1,0.5,0.9"))
    assert [t.name for t in tasks] == ["label", "size"]
    assert tasks[0].options["column"] is None and tasks[0].class_names == data.class_names
    with pytest.raises(TransferkitError, match="no column 'weight'"):
        build_tasks(splits, TasksConfig(task=["label:classify", "weight:regress"]))


def test_an_infinite_regression_target_is_refused_and_a_blank_is_missing() -> None:
    from transferkit.data.base import DataSplits
    from transferkit.data.stars import make_stars
    from transferkit.tasks.extension import build_tasks

    data = make_stars(count=12, image_size=32, seed=3)
    size = data.columns["size"].astype(object)
    size[4], size[5] = "", float("nan")  # blank and NaN cells: missing targets, left out of that task's loss
    data.columns["size"] = size
    tasks, splits = build_tasks(DataSplits(train=data, val=data, test=None), TasksConfig(task=["classify", "size:regress"]))
    assert np.isnan(splits.train.columns["target:size"][[4, 5]]).all()
    size[7] = "inf"
    with pytest.raises(TransferkitError, match=r"column 'size' has an infinite value"):
        build_tasks(DataSplits(train=data, val=data, test=None), TasksConfig(task=["classify", "size:regress"]))
