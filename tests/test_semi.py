"""``fit --unlabelled`` (issue 15, item 1): semi-supervised self-training and consistency training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import stripes
from transferkit.cli.main import main

FAST = ["--backbone", "small_cnn", "--epochs", "2", "--batch-size", "8", "--threads", "1", "--no-progress"]


def _labelled(root: Path, n: int, offset: int = 0) -> Path:
    for direction in ("h", "v"):
        (root / direction).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            stripes(direction, offset + i).save(root / direction / f"{direction}{offset + i}.png")
    return root


def _unlabelled(root: Path, n: int, offset: int = 100) -> tuple[Path, Path]:
    """A flat folder of stripes images and a labels CSV (item,label) for pseudo-label accuracy."""
    root.mkdir(parents=True, exist_ok=True)
    rows = ["item,label"]
    for i in range(n):
        direction = "hv"[i % 2]
        stripes(direction, offset + i).save(root / f"u{i}.png")
        rows.append(f"u{i}.png,{direction}")
    labels = root.parent / f"{root.name}-labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return root, labels


def _count_items(monkeypatch, cls: type, method: str) -> list[tuple[int, tuple]]:
    """Patch ``cls.method(self, inputs, *args)`` to record ``(len(inputs), args)`` of every call."""
    calls: list[tuple[int, tuple]] = []
    original = getattr(cls, method)

    def counted(self, inputs, *args):
        calls.append((len(inputs), args))
        return original(self, inputs, *args)

    monkeypatch.setattr(cls, method, counted)
    return calls


def _top_groups_consistency(tmp_path: Path, per_class: int, unlabelled_items: int, options: list[str]
                            ) -> tuple[Path, dict]:
    """``fit --strategy finetune --unfreeze 2 --semi consistency`` on EfficientNet-Lite0 at 32 px: (run, metrics)."""
    data = _labelled(tmp_path / "data", per_class)
    unlabelled, labels = _unlabelled(tmp_path / "u", unlabelled_items)
    out = tmp_path / "run"
    assert main(["fit", "--data", str(data), "--unlabelled", str(unlabelled), "--unlabelled-labels", str(labels),
                 "--strategy", "finetune", "--unfreeze", "2", "--semi", "consistency", "--backbone",
                 "efficientnet_lite0", "--image-size", "32", "--batch-size", "8", "--threads", "1", "--no-progress",
                 "--out", str(out), *options]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def _pseudo_ids(run: Path) -> set[str]:
    with open(run / "pseudo_labels.csv", newline="") as fh:
        return {row["id"] for row in csv.DictReader(fh)}


def test_pseudo_labels_exclude_validation_and_test_ids(tmp_path, isolated_cache):
    from transferkit.data import load_data

    data = _labelled(tmp_path / "data", 12)
    extra = _labelled(tmp_path / "data_more", 6, offset=50)
    pool = tmp_path / "pool"  # the labelled items (same ids as --data) plus 12 new ones
    for source in (data, extra):
        for file in source.rglob("*.png"):
            (pool / file.parent.name).mkdir(parents=True, exist_ok=True)
            (pool / file.parent.name / file.name).write_bytes(file.read_bytes())
    out = tmp_path / "run"
    code = main(["fit", "--data", str(data), "--unlabelled", str(pool), "--strategy", "linear-probe",
                 "--protocol", "holdout", "--semi-rounds", "2", "--out", str(out), *FAST])
    assert code == 0
    splits = load_data(str(data), seed=0)
    held_out = set(splits.val.ids) | set(splits.test.ids)
    assert held_out
    pseudo = _pseudo_ids(out)
    assert pseudo and not pseudo & held_out and not pseudo & set(splits.train.ids)
    assert pseudo == {f"{d}/{d}{i}.png" for d in "hv" for i in range(50, 56)}
    semi = json.loads((out / "metrics.json").read_text())["semi"]
    assert semi["dropped_as_labelled_val_or_test"] == 24 and semi["unlabelled_items_used"] == 12
    assert semi["learns_from_pseudo_labels"].startswith("head only")


def _semi_fit(tmp_path: Path, unlabelled_items: int, *options: str) -> Path:
    """``fit --unlabelled`` (finetune, with the unlabelled items' labels for the pseudo-label accuracy) on 10
    labelled items per class; returns the run folder after checking the command succeeded."""
    data = _labelled(tmp_path / "data", 10)
    unlabelled, labels = _unlabelled(tmp_path / "u", unlabelled_items)
    out = tmp_path / "run"
    code = main(["fit", "--data", str(data), "--unlabelled", str(unlabelled), "--unlabelled-labels", str(labels),
                 "--strategy", "finetune", *options, "--out", str(out), *FAST])
    assert code == 0
    return out


def test_self_training_round_accepts_items_and_records_the_rate(tmp_path, isolated_cache):
    out = _semi_fit(tmp_path, 20, "--semi", "self-training", "--semi-rounds", "2", "--semi-epochs", "1",
                    "--protocol", "holdout")
    metrics = json.loads((out / "metrics.json").read_text())
    assert "caveats" not in metrics  # holdout: the accuracy is the semi-supervised model's own
    semi = metrics["semi"]
    assert semi["method"] == "self-training" and semi["unlabelled_items_used"] == 20
    assert 0 <= semi["teacher_test_accuracy"] <= 1  # the supervised-only baseline of the same run
    rounds = semi["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["accepted"] > 0 and r["acceptance_rate"] == pytest.approx(r["accepted"] / 20) for r in rounds)
    assert rounds[1]["accepted"] >= rounds[0]["accepted"]  # the curriculum accepts more every round
    assert all(0 <= r["pseudo_label_accuracy"] <= 1 for r in rounds)


def test_consistency_loss_is_zero_on_identical_views_and_has_fixmatch_gradient():
    from transferkit.selftaught.consistency import consistency_loss

    torch.manual_seed(0)
    logits = torch.randn(6, 3) * 4
    loss, mask, _ = consistency_loss(logits, logits.clone().requires_grad_(True), tau=0.5)
    assert mask.any() and float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    strong = torch.randn(6, 3, requires_grad=True)
    loss, mask, pseudo = consistency_loss(logits, strong, tau=0.5)
    loss.backward()
    fixmatch = strong.detach().clone().requires_grad_(True)
    (mask.float() * torch.nn.functional.cross_entropy(fixmatch, pseudo, reduction="none")).mean().backward()
    assert torch.allclose(strong.grad, fixmatch.grad) and float(loss) > 0


def test_consistency_schedule_has_a_step_floor_capped_by_passes():
    from transferkit.selftaught.consistency import MIN_STEPS, consistency_epochs

    # 100 labels, batch 32 (4 steps an epoch), 2,000 unlabelled, 64 a step: 2 passes would be 16 epochs (64 steps);
    # the default raises it towards MIN_STEPS but stops at 4 passes (32 epochs, 128 steps).
    assert consistency_epochs(100, 2000, 32, 2, passes=2) == 16
    assert consistency_epochs(100, 2000, 32, 2) == 32
    # 200 labels (7 steps an epoch) and 5,000 unlabelled: 2 passes are already >= MIN_STEPS, left as they were.
    assert consistency_epochs(200, 5000, 32, 2) == consistency_epochs(200, 5000, 32, 2, passes=2) == 23
    assert MIN_STEPS <= 23 * 7
    # a big pool needs no floor; a tiny one is capped by passes, so small runs stay small
    assert consistency_epochs(100, 20000, 32, 2) == consistency_epochs(100, 20000, 32, 2, passes=2)
    assert consistency_epochs(16, 20, 8, 2) == consistency_epochs(16, 20, 8, 2, passes=4) == 3


def test_consistency_run_records_acceptance_per_epoch(tmp_path, isolated_cache, capsys):
    out = _semi_fit(tmp_path, 16, "--semi", "consistency", "--semi-threshold", "0.5", "--semi-epochs", "1")
    metrics = json.loads((out / "metrics.json").read_text())
    # cv without a test split: the accuracy is the supervised folds' estimate, and the run says so
    from transferkit.selftaught.semi import CV_CAVEAT

    assert metrics["accuracy_split"] == "cv" and metrics["caveats"] == [CV_CAVEAT]
    assert f"note: {CV_CAVEAT}" in capsys.readouterr().out
    assert CV_CAVEAT in (out / "README.md").read_text()
    semi = metrics["semi"]
    assert semi["method"] == "consistency" and semi["tau"] == 0.5
    assert semi["rounds"] and all(r["seen"] > 0 for r in semi["rounds"])
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert all("train_consistency" in row for row in history)


def test_no_strategy_with_unlabelled_uses_the_measured_default(tmp_path, isolated_cache):
    from transferkit.api import resolve_options
    from transferkit.selftaught.semi import DEFAULT_STRATEGY

    _, _, strategy, active = resolve_options({"data": "x", "unlabelled": "y"})
    assert strategy.name == DEFAULT_STRATEGY and any(e.name == "semi" for e in active)
    _, _, strategy, _ = resolve_options({"data": "x"})
    assert strategy.name == "linear-probe"


@pytest.mark.parametrize("case", ["empty", "text-for-images", "consistency-probe", "semi-alone"])
def test_bad_unlabelled_input_exits_2_with_one_line(case, tmp_path, capsys, isolated_cache):
    data = _labelled(tmp_path / "data", 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts.csv"
    texts.write_text("text\na cat sat\nthe dog fell\n")
    extra = {"empty": ["--unlabelled", str(empty)], "text-for-images": ["--unlabelled", str(texts)],
             "consistency-probe": ["--unlabelled", str(empty), "--semi", "consistency", "--strategy",
                                   "linear-probe"],
             "semi-alone": ["--semi", "self-training"]}[case]
    out = tmp_path / "run"
    assert main(["fit", "--data", str(data), "--out", str(out), *FAST, *extra]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert {"empty": "no images found", "text-for-images": "holds text data but --data is image data",
            "consistency-probe": "consistency training needs the engine on raw inputs",
            "semi-alone": "--semi is given without --unlabelled"}[case] in errors[0]
    assert not out.exists()


def test_accept_per_class_takes_each_class_share():
    from transferkit.selftaught.semi import accept_per_class, confidence_level

    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.3, 0.7], [0.99, 0.01]])
    accepted, pseudo, thresholds = accept_per_class(p, 0.5)
    assert list(pseudo) == [0, 0, 1, 1, 1, 0]
    assert list(accepted) == [True, False, True, False, True, True]  # ceil(0.5 * 3) = 2 per class
    assert thresholds == {0: 0.9, 1: 0.7}
    tau, share = confidence_level(p, np.array([0, 1, 1, 1, 1, 0]), 0.9)
    assert tau == 0.7 and share == pytest.approx(4 / 6)


def test_no_pseudo_label_is_accepted_when_no_held_out_confidence_reaches_the_precision():
    """When even the most confident held-out prediction is wrong, no share of the unlabelled items is trustworthy:
    nothing is accepted (no 'at least one per class' floor)."""
    from transferkit.selftaught.semi import accept_per_class, confidence_level, student_epochs

    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    tau, share = confidence_level(p, np.array([1, 0, 0, 1]), 0.9)  # the most confident is wrong
    assert share == 0.0 and tau == 1.0
    accepted, _, thresholds = accept_per_class(p, share)
    assert not accepted.any() and thresholds == {}
    # a student with nothing accepted trains like its teacher, not for the unlabelled pool's passes
    assert student_epochs(2.0, 5000, 200, 0, 7) == 7
    assert student_epochs(2.0, 5000, 200, 100, 7) == 50


# --- consistency on cached lower-layer maps ------------------------------------------------------------------


def test_map_views_flip_and_shift_weakly_and_cut_and_drop_channels_strongly():
    from transferkit.engine.lower_maps import map_views

    maps = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) + 1
    generator = torch.Generator().manual_seed(0)
    weak = [map_views(maps, False, generator, shift=0) for _ in range(32)]
    # without a shift a weak view is the map or its mirror image, and both occur
    assert all(torch.equal(w[i], maps[i]) or torch.equal(w[i], maps[i].flip(-1)) for w in weak for i in range(2))
    assert {torch.equal(w[0], maps[0]) for w in weak} == {True, False}
    shifted = map_views(maps, False, torch.Generator().manual_seed(1), shift=1)
    assert shifted.shape == maps.shape
    strong = map_views(maps, True, torch.Generator().manual_seed(2), shift=0, cut=0.5, channel_drop=0.0)
    zeros = (strong == 0).all(1)  # a zeroed 2 x 2 square in every item, across all channels
    assert [int(z.sum()) for z in zeros] == [4, 4]
    dropped = map_views(maps.repeat(1, 100, 1, 1), True, torch.Generator().manual_seed(3), shift=0, cut=0.0,
                        channel_drop=0.2)
    zero_channels = float((dropped == 0).all(-1).all(-1).float().mean())
    assert 0.1 < zero_channels < 0.3
    # the kept channels are rescaled by 1 / (1 - p)
    assert float(dropped.abs().max()) == pytest.approx(float(maps.max()) * 1.25)


def test_cached_maps_through_the_top_groups_equal_the_whole_forward_pass():
    from transferkit.backbones import create_backbone
    from transferkit.engine.lower_maps import BelowInputs, trained_top_groups
    from transferkit.model import TaskSpec, TransferModel
    from transferkit.strategies.finetune import Finetune, FinetuneConfig

    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0", pretrained=False, image_size=32)
    model = TransferModel(backbone, [TaskSpec("label", "classify", ["a", "b"])]).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        whole = model(x).logits
        cached = model(BelowInputs(backbone.forward_below(x, 2), 2)).logits
    assert torch.allclose(whole, cached, atol=1e-5)
    Finetune(FinetuneConfig(unfreeze="2")).prepare(model)
    assert trained_top_groups(backbone) == 2
    Finetune(FinetuneConfig(unfreeze="all")).prepare(model)
    assert trained_top_groups(backbone) is None  # everything trains: nothing to cache
    small = create_backbone("small_cnn", pretrained=False, image_size=32)
    assert trained_top_groups(small) is None  # no split between groups
    # a grid over the final map pools after the top groups, so it trains on cached maps too; earlier stages do not
    grid = create_backbone("efficientnet_lite0", pretrained=False, image_size=64, pool_grid=2)
    grid_model = TransferModel(grid, [TaskSpec("label", "classify", ["a", "b"])]).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        whole = grid_model(x).logits
        cached = grid_model(BelowInputs(grid.forward_below(x, 2), 2)).logits
    assert grid.feature_dim == 4 * 1280 and torch.allclose(whole, cached, atol=1e-5)
    Finetune(FinetuneConfig(unfreeze="2")).prepare(grid_model)
    assert trained_top_groups(grid) == 2
    staged = create_backbone("efficientnet_lite0", pretrained=False, image_size=64, pool_grid=2, pool_stages=[3])
    Finetune(FinetuneConfig(unfreeze="2")).prepare(TransferModel(staged, [TaskSpec("label", "classify", ["a", "b"])]))
    assert trained_top_groups(staged) is None  # its embedding reads stage 3's map, below the top groups


def test_accelerate_and_placement_move_cached_map_batches_to_the_device():
    from accelerate.utils import send_to_device

    from transferkit.engine.lower_maps import BelowInputs
    from transferkit.engine.placement import to_device

    batch = {"inputs": BelowInputs(torch.ones(2, 3, 4, 4), 2), "labels": torch.zeros(2)}
    for moved in (send_to_device(batch, torch.device("meta")), to_device(batch, torch.device("meta"))):
        assert moved["inputs"].maps.device.type == "meta" and moved["inputs"].groups == 2


def test_consistency_with_the_top_groups_training_reads_cached_maps_once(tmp_path, isolated_cache, monkeypatch):
    from transferkit.backbones.efficientnet import EfficientNetLite
    from transferkit.engine import lower_maps as lower_maps_module
    from transferkit.model import load_model

    below = _count_items(monkeypatch, EfficientNetLite, "forward_below")
    scratch: list = []
    original = lower_maps_module.lower_maps

    def recorded(*args, out=None, **kwargs):
        maps = original(*args, out=out, **kwargs)
        if out is not None:
            scratch.append((Path(out), isinstance(maps, np.memmap)))
        return maps

    monkeypatch.setattr(lower_maps_module, "lower_maps", recorded)
    out, metrics = _top_groups_consistency(tmp_path, 10, 16, ["--semi-threshold", "0.5", "--semi-epochs", "3",
                                                              "--protocol", "holdout", "--epochs", "1"])
    # the unlabelled maps were memory-mapped from a scratch file in the stage folder, which was not published
    assert len(scratch) == 1 and scratch[0][1] and scratch[0][0].name.startswith("unlabelled-maps.")
    assert not scratch[0][0].exists() and not list(out.glob("unlabelled-maps.*"))
    semi = metrics["semi"]
    assert semi["views"].startswith("views of cached maps below the top 2 layer groups")
    assert sum(r["seen"] for r in semi["rounds"]) > 16  # three passes over the 16 unlabelled items
    train_and_val = metrics["dataset_sizes"]["train"] + metrics["dataset_sizes"]["val"]
    # the lower layers ran once per labelled, validation and unlabelled item, never during the epochs
    assert {args[0] for _, args in below} == {2} and sum(n for n, _ in below) == train_and_val + 16
    trained, _ = load_model(out)
    from transferkit.backbones import create_backbone

    base = create_backbone("efficientnet_lite0", image_size=32)
    state, after = base.state_dict(), trained.backbone.state_dict()
    groups = base.layer_groups()
    names = {id(p): n for n, p in base.named_parameters()}
    assert all(torch.equal(state[names[id(p)]], after[names[id(p)]]) for g in groups[:-2] for p in g.parameters())
    assert not torch.equal(state["model.conv_head.weight"], after["model.conv_head.weight"])


def test_cv_folds_of_consistency_with_the_top_groups_training_share_the_labelled_maps(tmp_path, isolated_cache,
                                                                                       monkeypatch):
    from transferkit.backbones.efficientnet import EfficientNetLite

    below = _count_items(monkeypatch, EfficientNetLite, "forward_below")
    whole = _count_items(monkeypatch, EfficientNetLite, "forward_features")
    _, metrics = _top_groups_consistency(tmp_path, 6, 10, ["--semi-epochs", "2", "--protocol", "cv", "--epochs", "2",
                                                           "--batch-size", "4"])
    assert metrics["accuracy_split"] == "cv" and len(metrics["cv"]["fold_accuracies"]) == metrics["cv"]["k"] >= 2
    assert metrics["semi"]["views"].startswith("views of cached maps below the top 2 layer groups")
    # the k folds and the final run read the 12 labelled items' maps, computed once; the unlabelled items once
    assert sum(n for n, _ in below) == 12 + 10
    # the whole network ran only for the probe start's features of the 12 labelled items: no fold trained on raw inputs
    assert sum(n for n, _ in whole) == 12


def test_the_views_are_described_per_modality():
    """metrics.json["semi"]["views"] said "RandAugment + cutout" for a text run, which uses word dropout."""
    from transferkit.selftaught.consistency import view_description

    assert "RandAugment" in view_description("image") and "RandAugment" not in view_description("text")
    assert "word dropout" in view_description("text")
