"""``fit --protocol cv|holdout|auto``: folds never leak, the final model is refit on every label, bad input exits 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import transferkit
from tests.conftest import stripes as stripe_image
from transferkit.cli.main import main
from transferkit.engine.context import RunContext

SMALL = {"backbone": "small_cnn", "batch_size": 8, "lr": 0.01, "progress": False, "threads": 1}



def _folder(root: Path, per_class: int, classes=("horizontal", "vertical"), test: int = 0) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            path = root / ("train" if test else "") / name / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            stripe_image("hv"[c % 2], i + 50 * c).save(path)
        for i in range(test):
            path = root / "test" / name / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            stripe_image("hv"[c % 2], 1000 + i).save(path)
    return root


pytestmark = pytest.mark.usefixtures("isolated_cache")  # tests/conftest.py


@pytest.fixture(scope="module")
def stripes(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory.mktemp("cv") / "stripes", 8)


def _all_ids(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.png")}


def _spy_engine(monkeypatch) -> list[tuple[set[str], set[str]]]:
    """Record the (train ids, validation ids) of every engine training run."""
    calls: list[tuple[set[str], set[str]]] = []
    original = RunContext.train_with_engine

    def spy(self, model, strategy):
        calls.append((set(self.splits.train.ids), set(self.splits.val.ids)))
        return original(self, model, strategy)

    monkeypatch.setattr(RunContext, "train_with_engine", spy)
    return calls


def test_cv_folds_never_leak_and_the_final_model_is_refit_on_every_label(stripes, tmp_path, monkeypatch, caplog):
    calls = _spy_engine(monkeypatch)
    with caplog.at_level("INFO", logger="transferkit"):
        run = transferkit.fit(str(stripes), strategy="finetune", epochs=3, out=str(tmp_path / "run"), **SMALL)
    sizes = [r.getMessage() for r in caplog.records if " train / " in r.getMessage()]
    assert len(sizes) == 1 and "16 train / 0 val / 0 test" in sizes[0]  # one split line: the cv one, not holdout's
    every = _all_ids(stripes)
    folds, final = calls[:-1], calls[-1]
    assert len(folds) == 5  # k = min(5, smallest class of 8)
    for train_ids, val_ids in folds:
        assert val_ids and not train_ids & val_ids and train_ids | val_ids == every
    assert set().union(*[v for _, v in folds]) == every  # every item validated once
    assert final == (every, set())  # refit: every labelled item, no validation split
    m = run.metrics
    assert m["accuracy_split"] == "cv" and m["protocol"] == "cv" and m["n_train_final"] == 16
    assert m["cv"]["k"] == 5 and len(m["cv"]["fold_accuracies"]) == 5 and 1 <= m["cv"]["chosen"]["epochs"] <= 3
    assert m["evaluation"]["n"] == 16 and sum(map(sum, m["evaluation"]["confusion_matrix"])) == 16
    history = [json.loads(line) for line in (run.path / "history.jsonl").read_text().splitlines()]
    assert len(history) == m["cv"]["chosen"]["epochs"]  # the refit trains the chosen number of epochs
    with open(run.path / "cv_predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["id"] for r in rows} == every
    oof = np.array([[float(r["p_horizontal"]), float(r["p_vertical"])] for r in rows])
    labels = np.array([r["label"] == "vertical" for r in rows])
    assert m["accuracy"] == pytest.approx(float((oof.argmax(1) == labels).mean()))


def test_default_probe_chooses_c_in_repeated_folds_and_refits_on_all(stripes, tmp_path, monkeypatch):
    from transferkit.strategies import linear_probe

    seen = []
    original = linear_probe.fit_probe

    def spy(model, context, c, max_iter):
        seen.append((set(context.splits.train.ids), len(context.splits.val), c))
        return original(model, context, c, max_iter)

    monkeypatch.setattr(linear_probe, "fit_probe", spy)
    run = transferkit.fit(str(stripes), out=str(tmp_path / "run"), **SMALL)
    m = run.metrics
    assert m["accuracy_split"] == "cv" and m["cv"]["repeats"] == 3 and len(m["cv"]["fold_accuracies"]) == 15
    assert seen == [(_all_ids(stripes), 0, m["cv"]["chosen"]["probe_c"])]  # one refit, every item, chosen C
    assert m["config"]["strategy"]["options"]["probe_c"] == 1.0  # the recorded options are the user's


def test_seeds_reshuffle_the_folds(stripes, tmp_path):
    folds = [transferkit.fit(str(stripes), out=str(tmp_path / f"s{seed}"), seed=seed, **SMALL).metrics["cv"]
             for seed in (0, 1)]
    assert folds[0]["seed"] == 0 and folds[1]["seed"] == 1
    from transferkit.data.images import read_image_folder
    from transferkit.evaluation.protocol import stratified_folds

    labels = read_image_folder(stripes)["all"].labels
    assert [v.tolist() for _, v in stratified_folds(labels, 5, seed=0)] != \
        [v.tolist() for _, v in stratified_folds(labels, 5, seed=1)]


class _Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_cv_resumes_at_the_first_unfinished_fold_with_the_same_result(stripes, tmp_path, monkeypatch):
    from transferkit.evaluation import crossfit

    options = dict(strategy="finetune", epochs=2, seed=1, **SMALL)
    reference = transferkit.fit(str(stripes), out=str(tmp_path / "reference"), **options).metrics
    original, trained = crossfit._train_fold, []

    def interrupt_at_fold_three(*args, **kwargs):
        if len(trained) == 2:
            raise _Interrupt
        trained.append(args[-1].ids)  # the validation items of the fold
        return original(*args, **kwargs)

    monkeypatch.setattr(crossfit, "_train_fold", interrupt_at_fold_three)
    out = tmp_path / "run"
    with pytest.raises(_Interrupt):
        transferkit.fit(str(stripes), out=str(out), **options)
    stage = out.parent / f".{out.name}.partial"
    assert not out.exists() and sorted(p.name for p in (stage / "checkpoint" / "cv").iterdir()) == \
        ["fold-00.safetensors", "fold-01.safetensors"]
    first_two, trained[:] = list(trained), []
    monkeypatch.setattr(crossfit, "_train_fold", lambda *a, **k: (trained.append(a[-1].ids), original(*a, **k))[1])
    resumed = transferkit.fit(str(stripes), out=str(out), resume=True, **options).metrics
    assert len(trained) == 3 and not {tuple(t) for t in trained} & {tuple(t) for t in first_two}
    assert resumed["cv"]["fold_accuracies"] == reference["cv"]["fold_accuracies"]
    assert resumed["accuracy"] == reference["accuracy"] and resumed["cv"]["chosen"] == reference["cv"]["chosen"]
    assert not (out / "checkpoint").exists()  # the fold checkpoints are not part of the finished run


def test_a_fold_interrupted_mid_way_resumes_from_its_last_epoch_with_the_same_result(stripes, tmp_path, monkeypatch,
                                                                                     caplog):
    """Ctrl-C in fold 2 after its epoch 2 of 3: the stage keeps fold 1 and fold 2's epoch checkpoint (with the
    epochs' validation probabilities, the candidates of the epoch choice); --resume trains fold 2's last epoch only
    and ends bit-identical to an uninterrupted run. Before, the fold in progress started again from epoch 1."""
    from transferkit.engine.callbacks import Checkpointing

    options = dict(strategy="finetune", epochs=3, seed=2, **SMALL)
    reference = transferkit.fit(str(stripes), out=str(tmp_path / "reference"), **options).metrics
    original = Checkpointing.on_epoch_end

    def interrupt_fold_two_after_epoch_two(self, loop, row):
        original(self, loop, row)
        if self.folder.name.startswith("fold-01-") and loop.state.epoch == 2:
            raise _Interrupt

    monkeypatch.setattr(Checkpointing, "on_epoch_end", interrupt_fold_two_after_epoch_two)
    out = tmp_path / "run"
    with pytest.raises(_Interrupt):
        transferkit.fit(str(stripes), out=str(out), **options)
    cv = out.parent / f".{out.name}.partial" / "checkpoint" / "cv"
    partial = [p for p in cv.iterdir() if p.name.startswith("fold-01-")]
    assert sorted(p.name for p in cv.glob("*.safetensors")) == ["fold-00.safetensors"] and len(partial) == 1
    assert (partial[0] / "trainer.safetensors").is_file()
    monkeypatch.setattr(Checkpointing, "on_epoch_end", original)
    with caplog.at_level("INFO", logger="transferkit"):
        resumed = transferkit.fit(str(stripes), out=str(out), resume=True, **options).metrics
    assert "resuming from the checkpoint after epoch 2" in caplog.text and "fold 1 restored" in caplog.text
    assert resumed["cv"]["fold_accuracies"] == reference["cv"]["fold_accuracies"]
    assert resumed["cv"]["chosen"] == reference["cv"]["chosen"] and resumed["accuracy"] == reference["accuracy"]
    assert not (out / "checkpoint").exists()


def test_temperature_scaling_under_cv_uses_the_out_of_fold_predictions(stripes, tmp_path):
    run = transferkit.fit(str(stripes), out=str(tmp_path / "run"), temperature_scale=True, **SMALL)
    record = json.loads((run.path / "calibration.json").read_text())
    assert record["fitted_on"].startswith("out-of-fold") and record["n"] == 16
    assert transferkit.load(run.path).temperature == pytest.approx(record["temperature"])


def test_holdout_and_given_test_split_keep_todays_behaviour(stripes, tmp_path):
    holdout = transferkit.fit(str(stripes), out=str(tmp_path / "h"), protocol="holdout", **SMALL).metrics
    assert holdout["accuracy_split"] == "test" and holdout["dataset_sizes"]["test"] > 0 and "cv" not in holdout
    given = _folder(tmp_path / "given", 6, test=3)
    auto = transferkit.fit(str(given), out=str(tmp_path / "g"), **SMALL).metrics
    assert auto["protocol"] == "holdout" and auto["accuracy_split"] == "test" and auto["n_eval"] == 6
    cv = transferkit.fit(str(given), out=str(tmp_path / "gcv"), protocol="cv", **SMALL).metrics
    assert cv["protocol"] == "cv" and cv["accuracy_split"] == "test" and cv["n_train_final"] == 12
    assert cv["dataset_sizes"] == {"train": 12, "val": 0, "test": 6}


def test_auto_threshold_depends_on_whether_the_folds_train_the_backbone(tmp_path):
    """--protocol auto: holdout from 50 items per class for trained strategies, cv up to 99 for the probe."""
    from transferkit.config import FitConfig
    from transferkit.evaluation.crossfit import plan_protocol

    big = _folder(tmp_path / "big", 50)
    metrics = transferkit.fit(str(big), out=str(tmp_path / "r"), strategy="finetune", epochs=1, **SMALL).metrics
    assert metrics["protocol"] == "holdout" and metrics["accuracy_split"] == "test"
    assert plan_protocol(FitConfig(data=str(big)), seed=0).protocol == "cv"  # the probe: cv at 50 per class
    assert plan_protocol(FitConfig(data=str(_folder(tmp_path / "bigger", 100))), seed=0).protocol == "holdout"


@pytest.mark.parametrize("per_class, classes, protocol, expected", [
    (1, ("a", "b"), "cv", "single example"),
    (1, ("a", "b"), "auto", "single example"),
    (6, ("only",), "cv", "class"),
])
def test_data_that_cannot_be_cross_validated_exits_2_with_one_line(per_class, classes, protocol, expected, tmp_path,
                                                                   capsys):
    folder = _folder(tmp_path / "data", per_class, classes)
    out = tmp_path / "out"
    code = main(["fit", "--data", str(folder), "--backbone", "small_cnn", "--protocol", protocol, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert not out.exists()


def test_bad_protocol_value_exits_2(stripes, tmp_path, capsys):
    assert main(["fit", "--data", str(stripes), "--protocol", "kfold", "--out", str(tmp_path / "o")]) == 2
    assert "--protocol" in capsys.readouterr().err


def test_run_report_under_cv_shows_the_out_of_fold_predictions_of_every_item(stripes, tmp_path, monkeypatch):
    from transferkit.evaluation import report

    run = transferkit.fit(str(stripes), out=str(tmp_path / "run"), **SMALL)
    data = report.evaluation_data(run.metrics)
    assert set(data.ids) == _all_ids(stripes)  # every labelled item, not a 20% test split
    shown = []
    from transferkit.evaluation import calibration

    original = calibration.reliability_diagram

    def spy(probabilities, labels, *args):
        shown.append(np.asarray(probabilities))
        return original(probabilities, labels, *args)

    monkeypatch.setattr(calibration, "reliability_diagram", spy)
    text = report.write_report(run.path).read_text()
    assert "labelled items, predicted out of fold" in text and "Feature t-SNE" in text
    oof = np.array(run.metrics["evaluation"]["confusion_matrix"]).sum()
    assert oof == 16 and len(shown) == 1 and shown[0].shape == (16, 2)
    with open(run.path / "cv_predictions.csv") as fh:
        rows = {r["id"]: float(r["p_vertical"]) for r in csv.DictReader(fh)}
    np.testing.assert_allclose(shown[0][:, 1], [rows[i] for i in data.ids], atol=1e-5)


def test_extensions_that_need_a_validation_split_keep_holdout_or_are_refused_under_cv(stripes):
    from transferkit.config import FitConfig
    from transferkit.errors import TransferkitError
    from transferkit.evaluation.crossfit import plan_protocol

    class Adaptation:
        name = "adaptation"

        def describe(self) -> str:
            return "--adapt dann"

    auto = plan_protocol(FitConfig(data=str(stripes)), 0, extensions=[Adaptation()])
    assert auto.protocol == "holdout" and auto.test is not None and any("--adapt dann" in n for n in auto.notes)
    with pytest.raises(TransferkitError, match="--protocol cv does not support --adapt dann"):
        plan_protocol(FitConfig(data=str(stripes), protocol="cv"), 0, extensions=[Adaptation()])
    assert plan_protocol(FitConfig(data=str(stripes)), 0, processes=2).protocol == "holdout"


def _interrupt_at_the_second_fold(monkeypatch, data: Path, out: Path, options: dict, pause: float = 0.0) -> None:
    """Fit ``data`` into ``out`` and press Ctrl-C as the second cv fold starts (the first one takes ``pause`` s
    longer), leaving a stage to resume."""
    import time

    from transferkit.evaluation import crossfit

    original, trained = crossfit._train_fold, []

    def interrupt_at_fold_two(*args, **kwargs):
        if trained:
            raise _Interrupt
        trained.append(1)
        time.sleep(pause)
        return original(*args, **kwargs)

    monkeypatch.setattr(crossfit, "_train_fold", interrupt_at_fold_two)
    with pytest.raises(_Interrupt):
        transferkit.fit(str(data), out=str(out), **options)
    monkeypatch.setattr(crossfit, "_train_fold", original)


def test_resume_refuses_when_the_data_changed_since_the_interruption(stripes, tmp_path, monkeypatch):
    """Images added (or removed, or moved to another class) after Ctrl-C would put items the interrupted folds
    trained on into other folds: --resume names the change in one line and keeps the checkpoint; with the data as
    it was, the run resumes."""
    import shutil

    from transferkit.errors import TransferkitError

    data = tmp_path / "data"
    shutil.copytree(stripes, data)
    options = dict(strategy="finetune", epochs=1, seed=1, **SMALL)
    out = tmp_path / "run"
    _interrupt_at_the_second_fold(monkeypatch, data, out, options)
    stage = out.parent / f".{out.name}.partial"
    kept = sorted(p.name for p in (stage / "checkpoint" / "cv").iterdir())
    new_image = data / "vertical" / "new.png"
    new_image.write_bytes((data / "vertical" / sorted(p.name for p in (data / "vertical").iterdir())[0]).read_bytes())
    with pytest.raises(TransferkitError, match="the data changed since the run in .* was interrupted.*--overwrite"):
        transferkit.fit(str(data), out=str(out), resume=True, **options)
    assert sorted(p.name for p in (stage / "checkpoint" / "cv").iterdir()) == kept and not out.exists()
    new_image.unlink()
    assert transferkit.fit(str(data), out=str(out), resume=True, **options).metrics["accuracy_split"] == "cv"


def test_train_seconds_of_a_resumed_run_include_the_interrupted_part(stripes, tmp_path, monkeypatch):
    """metrics.json's train_seconds (compare's cost) counted only the resumed process: the time before Ctrl-C is
    kept with the checkpoint and added."""
    import time

    options = dict(strategy="finetune", epochs=1, seed=1, **SMALL)
    out = tmp_path / "run"
    # the interrupted part takes clearly longer than anything the resumed one does besides training
    _interrupt_at_the_second_fold(monkeypatch, stripes, out, options, pause=1.5)
    started = time.perf_counter()
    metrics = transferkit.fit(str(stripes), out=str(out), resume=True, **options).metrics
    assert metrics["train_seconds"] > time.perf_counter() - started + 1.0
