"""compare: leaderboard statistics, the recommendation rule, the paired test, option routing, and a tiny
end-to-end comparison (small_cnn, linear-probe + finetune, 2 seeds) that resumes and honours a time budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from transferkit.config import parse_duration
from transferkit.errors import TransferkitError
from transferkit.evaluation.compare import (
    CellResult,
    CompareConfig,
    accuracy_interval,
    describe_paired_test,
    format_leaderboard,
    leaderboard_rows,
    options_for_strategy,
    paired_folds_test,
    paired_t_test,
    plan_cells,
    recommend,
    run_compare,
    t_interval,
)


def _cells(strategy: str, accuracies: list[float], seconds: float, params: int, backbone: str = "b") -> list[CellResult]:
    return [CellResult(backbone, strategy, seed, "done", f"/x/{strategy}{seed}", accuracy=a, macro_f1=a,
                       trainable_params=params, total_params=10 * params, train_seconds=seconds, peak_memory_mb=100.0)
            for seed, a in enumerate(accuracies)]


def test_t_interval_matches_scipy():
    values = [0.70, 0.74, 0.72]
    low, high = t_interval(values)
    expected = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert (low, high) == pytest.approx(expected)
    assert t_interval([0.7]) is None


def test_leaderboard_rows_aggregate_over_seeds_and_sort():
    results = (_cells("finetune", [0.80, 0.82, 0.84], 100.0, 1000)
               + _cells("linear-probe", [0.70, 0.71, 0.72], 5.0, 10)
               + [CellResult("b", "lora", 0, "failed", "/x", message="boom")])
    rows = leaderboard_rows(results)
    assert [r["strategy"] for r in rows] == ["finetune", "linear-probe"]  # failed cells are left out
    top = rows[0]
    assert top["rank"] == 1 and top["seeds"] == 3
    assert top["accuracy_mean"] == pytest.approx(0.82)
    assert top["accuracy_sd"] == pytest.approx(0.02)
    assert top["accuracy_by_seed"] == {0: 0.80, 1: 0.82, 2: 0.84}
    assert top["trainable_params"] == 1000 and top["train_seconds"] == pytest.approx(100.0)


def test_recommend_best_accuracy_when_nothing_cheap_is_close():
    rows = leaderboard_rows(_cells("finetune", [0.80, 0.81, 0.82], 100.0, 1000)
                            + _cells("linear-probe", [0.60, 0.61, 0.62], 5.0, 10))
    rec = recommend(rows)
    assert rec["strategy"] == "finetune" and rec["rule"] == "best accuracy"
    assert "highest mean accuracy" in rec["reason"] and "under 0.5x its time" in rec["reason"]
    fastest_best = recommend(leaderboard_rows(_cells("linear-probe", [0.80, 0.81, 0.82], 5.0, 10)
                                              + _cells("finetune", [0.70, 0.71, 0.72], 100.0, 1000)))
    assert fastest_best["strategy"] == "linear-probe" and "also the fastest" in fastest_best["reason"]


def test_recommend_cheaper_configuration_inside_the_confidence_interval():
    rows = leaderboard_rows(_cells("finetune", [0.78, 0.84, 0.81], 100.0, 1000)
                            + _cells("lora", [0.79, 0.81, 0.80], 60.0, 100)  # close but not cheap enough
                            + _cells("linear-probe", [0.79, 0.80, 0.80], 5.0, 10))
    assert rows[0]["strategy"] == "finetune"
    rec = recommend(rows, cost_ratio=0.5)
    assert rec["strategy"] == "linear-probe" and rec["rule"] == "nearly as good, cheaper"
    assert rec["time_ratio"] == pytest.approx(0.05)
    assert "inside the 95% CI" in rec["reason"]
    # with a stricter cost ratio nothing qualifies and the best stays recommended
    assert recommend(rows, cost_ratio=0.01)["strategy"] == "finetune"


def test_recommend_single_seed_says_no_interval():
    rows = leaderboard_rows(_cells("finetune", [0.8], 100.0, 1000) + _cells("linear-probe", [0.79], 1.0, 10))
    rec = recommend(rows)
    assert rec["strategy"] == "finetune" and "single seed" in rec["reason"]
    assert recommend([]) is None


def test_paired_t_test_matches_scipy_and_needs_two_seeds():
    a = {0: 0.80, 1: 0.85, 2: 0.83, 3: 0.90}
    b = {0: 0.78, 1: 0.80, 2: 0.82, 3: 0.84, 7: 0.5}  # seed 7 has no partner and is ignored
    result = paired_t_test(a, b)
    reference = stats.ttest_rel([a[s] for s in range(4)], [b[s] for s in range(4)])
    assert result["n"] == 4 and result["t"] == pytest.approx(reference.statistic)
    assert result["p_value"] == pytest.approx(reference.pvalue)
    single = paired_t_test({0: 0.8}, {0: 0.7})
    assert single["testable"] is False and "at least 2" in single["reason"]
    assert "cannot be tested" in describe_paired_test({"first": "a", "second": "b", **single})
    assert "p = " in describe_paired_test({"first": "a", "second": "b", **result})
    constant = paired_t_test({0: 0.8, 1: 0.9}, {0: 0.7, 1: 0.8})
    assert constant["t"] is None and "identical" in constant["reason"]


def test_intervals_include_the_sampling_error_of_the_evaluated_items():
    # the "95% CI 0.650-0.650" case: two seeds, identical accuracy on the same 20 test items
    rows = leaderboard_rows([CellResult("b", "linear-probe", seed, "done", "/x", accuracy=0.65, macro_f1=0.6,
                                        trainable_params=1, total_params=2, train_seconds=1.0, peak_memory_mb=1.0,
                                        n_eval=20) for seed in (0, 1)])
    low, high = rows[0]["accuracy_ci"]
    assert rows[0]["n_eval"] == 20 and high - low > 0.3  # Wilson 95% on 13/20: 0.433-0.819
    assert (low, high) == pytest.approx((0.4329, 0.8188), abs=1e-3)
    # the seed spread widens it further; more items narrow it
    assert np.diff(accuracy_interval([0.6, 0.7], 20))[0] > high - low
    assert np.diff(accuracy_interval([0.65, 0.65], 2000))[0] < 0.05
    assert accuracy_interval([1.0], 20)[1] == 1.0 and accuracy_interval([1.0], 20)[0] < 0.9  # no false certainty
    assert accuracy_interval([0.7], None) is None


def test_paired_test_adds_the_items_error_to_the_seed_differences():
    a, b = {0: 0.65, 1: 0.66}, {0: 0.60, 1: 0.61}  # identical differences over seeds
    assert paired_t_test(a, b)["t"] is None  # seeds alone: undefined
    with_items = paired_t_test(a, b, n_items=20)
    assert with_items["p_value"] > 0.5 and with_items["ci"][0] < 0 < with_items["ci"][1]  # 20 items: no evidence
    assert paired_t_test(a, b, n_items=100_000)["p_value"] < 0.05  # t with 1 degree of freedom
    assert paired_t_test({0: 0.8}, {0: 0.7}, n_items=50)["testable"] is True  # one seed, items known


def _cv_cells(strategy: str, folds_by_seed: dict[int, list[float]], repeats: int = 1) -> list[CellResult]:
    return [CellResult("b", strategy, seed, "done", "/x", accuracy=float(np.mean(f)), macro_f1=0.0,
                       trainable_params=1, total_params=2, train_seconds=1.0, peak_memory_mb=1.0, n_eval=50,
                       accuracy_split="cv", cv={"k": 5, "repeats": repeats, "seed": seed, "fold_accuracies": f})
            for seed, f in folds_by_seed.items()]


def test_cv_cells_are_paired_fold_by_fold_with_the_nadeau_bengio_correction():
    first = _cv_cells("finetune", {0: [0.9, 0.8, 0.9, 1.0, 0.8], 1: [0.9, 0.9, 0.8, 0.9, 1.0]})
    # the probe ran 3 repeats: only its first repeat shares folds with finetune's single repeat
    second = _cv_cells("linear-probe", {0: [0.8, 0.8, 0.7, 0.9, 0.8] + [0.0] * 10,
                                        1: [0.8, 0.9, 0.7, 0.8, 0.9] + [0.0] * 10}, repeats=3)
    result = paired_folds_test(first, second)
    d = np.array([0.1, 0.0, 0.2, 0.1, 0.0, 0.1, 0.0, 0.1, 0.1, 0.1])
    se = np.sqrt((1 / 10 + 1 / 4) * d.var(ddof=1))
    assert result["folds"] == 10 and result["mean_difference"] == pytest.approx(d.mean())
    assert result["t"] == pytest.approx(d.mean() / se)  # corrected: much smaller than the naive sqrt(10) t
    assert result["p_value"] == pytest.approx(2 * stats.t.sf(d.mean() / se, 9))
    assert paired_folds_test(first, _cells("linear-probe", [0.8, 0.8], 1.0, 1)) is None  # holdout cells: by seed
    text = describe_paired_test({"first": "a", "second": "b", **result})
    assert "10 folds" in text and "Nadeau" in text


@pytest.mark.parametrize("text, seconds", [("600", 600), ("600s", 600), ("10m", 600), ("1h", 3600), ("1.5h", 5400),
                                           (90, 90)])
def test_time_budget_durations(text, seconds):
    assert parse_duration(text) == seconds
    assert CompareConfig("digits", ["small_cnn"], ["finetune"], time_budget=text).validate() is None


@pytest.mark.parametrize("bad", ["0", "-5m", "ten", "5d", "nan", "inf", ""])
def test_bad_time_budgets_are_refused(bad):
    with pytest.raises(TransferkitError, match="time-budget"):
        parse_duration(bad)


def test_plan_is_seed_major_and_options_are_routed_per_strategy():
    cells = plan_cells(["a", "b"], ["linear-probe", "finetune"], 2)
    assert [(c.backbone, c.strategy, c.seed) for c in cells[:4]] == [
        ("a", "linear-probe", 0), ("a", "finetune", 0), ("b", "linear-probe", 0), ("b", "finetune", 0)]
    assert cells[-1].seed == 1 and cells[0].folder_name == "a__linear-probe__seed0"
    options = {"probe_c": 0.5, "unfreeze": "2", "epochs": 3, "batch_size": 8}
    assert options_for_strategy("linear-probe", options) == {"probe_c": 0.5, "batch_size": 8}  # lbfgs: no epochs
    assert options_for_strategy("linear-probe", {**options, "solver": "sgd"}) == {
        "probe_c": 0.5, "solver": "sgd", "epochs": 3, "batch_size": 8}
    assert options_for_strategy("finetune", options) == {"unfreeze": "2", "epochs": 3, "batch_size": 8}


def test_config_validation():
    with pytest.raises(TransferkitError, match="unknown strategy"):
        CompareConfig("digits", ["small_cnn"], ["no-such-strategy"]).validate()
    with pytest.raises(TransferkitError, match="sets seed"):
        CompareConfig("digits", ["small_cnn"], ["finetune"], fit_options={"seed": 3}).validate()


def test_python_config_takes_the_values_the_cli_takes():
    """``CompareConfig`` from Python reads a comma-separated string as the flags do (not its characters) and
    coerces numbers given as text; a bad value is a TransferkitError naming the flag."""
    config = CompareConfig("digits", "small_cnn", "linear-probe, finetune", seeds="2", cost_ratio="0.25",
                           isolate="no")
    config.validate()
    assert config.backbones == ["small_cnn"] and config.strategies == ["linear-probe", "finetune"]
    assert (config.seeds, config.cost_ratio, config.isolate) == (2, 0.25, False)
    for bad, problem in [({"seeds": "x"}, "'--seeds' expects int"), ({"seeds": 0}, "invalid --seeds 0"),
                         ({"cost_ratio": "lots"}, "invalid --cost-ratio 'lots'"), ({"isolate": "maybe"}, "--isolate")]:
        with pytest.raises(TransferkitError, match=problem):
            CompareConfig("digits", ["small_cnn"], ["finetune"], **bad).validate()


def _tiny_image_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, base in (("dark", 40), ("light", 200)):
        (root / label).mkdir(parents=True)
        for i in range(14):
            pixels = np.clip(base + rng.normal(0, 25, (10, 10)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_compare_end_to_end_resumes_and_respects_time_budget(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    data = _tiny_image_folder(tmp_path / "data")
    out = tmp_path / "cmp"
    fit_options = {"epochs": 1, "image_size": 8, "batch_size": 8}
    config = CompareConfig(str(data), ["small_cnn"], ["linear-probe", "finetune"], seeds=2, out=str(out),
                           isolate=False, fit_options=fit_options, refit_best=True)
    document = run_compare(config)
    assert [c["status"] for c in document["cells"]] == ["done"] * 4
    assert {c["accuracy_split"] for c in document["cells"]} == {"cv"}  # 14 per class, no split: cv
    refit = document["refit"]  # the winner handed over as an ordinary run folder, refit on all 28 labels
    assert refit["n_train_final"] == 28 and refit["strategy"] == document["recommendation"]["strategy"]
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["protocol"] == "cv" and best["dataset_sizes"]["train"] == 28 and (out / "best" / "model").is_dir()
    assert not any(c["reused"] for c in document["cells"])
    saved = json.loads((out / "leaderboard.json").read_text())
    assert {r["strategy"] for r in saved["leaderboard"]} == {"linear-probe", "finetune"}
    assert all(r["seeds"] == 2 and r["accuracy_ci"] is not None for r in saved["leaderboard"])
    assert saved["paired_test"]["folds"] == 10  # 2 seeds x 5 shared folds
    assert saved["recommendation"]["strategy"] in ("linear-probe", "finetune")
    assert (out / "report.html").is_file()
    for cell in saved["cells"]:
        assert (tmp_path / "cmp" / "runs" / cell["path"].split("/runs/")[1] / "metrics.json").is_file()
    text = format_leaderboard(saved)
    assert "recommendation:" in text and "paired t-test" in text

    # a second invocation with one more seed reuses the finished cells and, with the budget spent, skips the rest
    again = run_compare(CompareConfig(str(data), ["small_cnn"], ["linear-probe", "finetune"], seeds=3, out=str(out),
                                      isolate=False, time_budget=1e-9, fit_options=fit_options))
    statuses = [(c["seed"], c["status"], c["reused"]) for c in again["cells"]]
    assert statuses[:4] == [(0, "done", True), (0, "done", True), (1, "done", True), (1, "done", True)]
    assert [s[1] for s in statuses[4:]] == ["skipped", "skipped"]
    assert "skipped" in format_leaderboard(again)


def test_auto_protocol_is_resolved_once_for_every_cell(tmp_path):
    """50 items per class: the probe alone is cross-validated, but next to finetune (which cross-validates only
    below 50) every cell runs holdout, so that no leaderboard mixes out-of-fold and test-split accuracies."""
    from tests.test_crossfit import _folder
    from transferkit.evaluation.compare import CompareConfig, shared_protocol

    data = str(_folder(tmp_path / "d", 50))

    def protocol(strategies: list[str], **fit_options) -> str:
        return shared_protocol(CompareConfig(data=data, backbones=["small_cnn"], strategies=strategies,
                                             fit_options=fit_options))

    assert protocol(["linear-probe"]) == "cv"
    assert protocol(["linear-probe", "finetune"]) == "holdout"
    assert protocol(["linear-probe", "finetune"], protocol="cv") == "cv"
    # an extension that trains on a validation split gives holdout, as it does in `fit --protocol auto`
    assert protocol(["linear-probe"], adapt="coral", target_data=data) == "holdout"


@pytest.mark.parametrize("case", ["leaderboard_not_an_object", "foreign_folder", "run_folder"])
def test_compare_refuses_a_bad_out_folder_with_one_line_and_changes_nothing(tmp_path, capsys, case):
    from transferkit.cli.main import main

    data = _tiny_image_folder(tmp_path / "data")
    out = tmp_path / "cmp"
    out.mkdir()
    if case == "leaderboard_not_an_object":
        kept = out / "leaderboard.json"
        kept.write_text("[1, 2, 3]")
    elif case == "foreign_folder":
        kept = out / "notes.txt"
        kept.write_text("my own notes")
    else:  # an ordinary run folder (legacy layout: metrics.json + model/config.json)
        (out / "model").mkdir()
        (out / "model" / "config.json").write_text(json.dumps({"format": "transferkit-model"}))
        kept = out / "metrics.json"
        kept.write_text("{}")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    content = kept.read_text()
    assert main(["compare", "--data", str(data), "--backbones", "small_cnn", "--strategies", "linear-probe",
                 "--seeds", "1", "--out", str(out), "--no-isolate", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(out) in err[0], err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and kept.read_text() == content


def test_a_second_compare_on_the_same_out_is_refused_and_changes_nothing(tmp_path, monkeypatch, capsys):
    """While one compare (or fit) writes a folder, another compare on it exits 2 in one line and writes nothing
    (before, it ran its cells beside the first one's and both rewrote leaderboard.json)."""
    from transferkit.cli.main import main
    from transferkit.rundir import lock_path, writer_lock

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    data = _tiny_image_folder(tmp_path / "data")
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(data), "--backbones", "small_cnn", "--strategies", "linear-probe", "--seeds",
            "1", "--out", str(out), "--no-isolate", "--image-size", "8"]
    with writer_lock(out):  # the running compare (flock: a second open file of this process conflicts too)
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: another transferkit process is writing"), err
        assert not out.exists()
    assert not lock_path(out).exists()  # released and removed by its holder
    assert main(args) == 0 and (out / "leaderboard.json").is_file()  # free again once the first one ends
    assert not lock_path(out).exists()


def test_compare_rewrites_its_leaderboard_atomically(tmp_path, monkeypatch, capsys):
    """A re-run that fails while writing (full disk) keeps the previous leaderboard.json and report.html whole."""
    import os

    from transferkit.cli.main import main

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    data = _tiny_image_folder(tmp_path / "data")
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(data), "--backbones", "small_cnn", "--strategies", "linear-probe", "--seeds",
            "1", "--out", str(out), "--no-isolate", "--image-size", "8"]
    assert main(args) == 0
    before = {name: (out / name).read_bytes() for name in ("leaderboard.json", "report.html")}
    listing = sorted(os.listdir(out))

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    capsys.readouterr()
    assert main(args) == 2  # the finished cell is reused; only the writes fail
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: the disk is full")
    assert {name: (out / name).read_bytes() for name in before} == before and sorted(os.listdir(out)) == listing


def test_backbones_default_to_the_standard_backbone_of_the_datas_modality(tmp_path):
    """The README's ``compare --data DIR --strategies linear-probe,prototypes --seeds 2 --out runs/compare``:
    without --backbones every cell uses the backbone ``fit`` would choose (before, argparse demanded it)."""
    from transferkit.cli.main import build_parser

    args = build_parser().parse_args(["compare", "--data", "d", "--strategies", "linear-probe,prototypes",
                                      "--seeds", "2", "--out", "runs/compare"])
    assert args.backbones == []
    images = _tiny_image_folder(tmp_path / "images")
    texts = tmp_path / "reviews.csv"
    texts.write_text("text,label\n" + "".join(f"good film {i},pos\nbad film {i},neg\n" for i in range(6)))
    for data, expected in ((images, "efficientnet_lite0"), (texts, "minilm")):
        config = CompareConfig(str(data), [], ["prototypes"])
        config.resolve_backbones()
        assert config.backbones == [expected]
    chosen = CompareConfig(str(images), ["small_cnn"], ["prototypes"])
    chosen.resolve_backbones()
    assert chosen.backbones == ["small_cnn"]


def test_compare_reuses_a_finished_cell_only_with_the_same_options_and_data(tmp_path, monkeypatch):
    """A second compare into the same --out with other options (or, interrupted before its leaderboard, other
    data) reused every finished cell and then reported the new options: it is refused in one line naming what
    differs. The same data written another way (./data) is the same data."""
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    data = _tiny_image_folder(tmp_path / "data")
    out = tmp_path / "cmp"
    fit_options = {"epochs": 1, "image_size": 8, "batch_size": 8}

    def compare(data_spec: str, **changes) -> dict:
        return run_compare(CompareConfig(data_spec, ["small_cnn"], ["finetune"], seeds=1, out=str(out),
                                         isolate=False, fit_options={**fit_options, **changes}))

    compare(str(data))
    monkeypatch.chdir(tmp_path)
    assert [c["reused"] for c in compare("./data")["cells"]] == [True]
    with pytest.raises(TransferkitError, match=r"trained with other options \(train\.epochs: 1 -> 3\).*another --out"):
        compare(str(data), epochs=3)
    import shutil

    shutil.copy(data / "dark" / "0.png", data / "dark" / "new.png")  # the same folder, one more image
    with pytest.raises(TransferkitError, match=r"trained on other data.*items added, removed or relabelled"):
        compare(str(data))
    (data / "dark" / "new.png").unlink()
    (out / "leaderboard.json").unlink()  # as after an interruption: the cells are the only record
    other = _tiny_image_folder(tmp_path / "other")
    with pytest.raises(TransferkitError, match=r"fit\.data"):
        compare(str(other))


def test_ctrl_c_in_compare_says_that_the_same_command_continues(tmp_path, monkeypatch, capsys):
    """compare has no --resume (running it again continues); a Ctrl-C inside a cell said '--resume'."""
    from transferkit.cli.main import main
    from transferkit.evaluation import compare as compare_module

    def interrupted_cell(*_args, **_kwargs):
        error = KeyboardInterrupt()
        error.transferkit_resumable = True  # as a cell's fit leaves it after its first checkpoint
        raise error

    monkeypatch.setattr(compare_module, "_compare_cells", interrupted_cell)
    data = _tiny_image_folder(tmp_path / "data")
    assert main(["compare", "--data", str(data), "--backbones", "small_cnn", "--strategies", "linear-probe",
                 "--out", str(tmp_path / "cmp")]) == 130
    err = capsys.readouterr().err
    assert "run the same compare command again" in err and "--resume" not in err
