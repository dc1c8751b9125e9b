"""``fit --track mlflow|tensorboard``: parameters, per-epoch metrics, final metrics and the run folder are logged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import transferkit
from transferkit.errors import TransferkitError

pytestmark = pytest.mark.usefixtures("isolated_cache")  # tests/conftest.py


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking-data")
    for cls in ("horizontal", "vertical"):
        (root / cls).mkdir()
        for i in range(8):
            image = np.random.default_rng(i).integers(0, 60, (28, 28)).astype(np.uint8)
            image[::4, :] = 255
            Image.fromarray(image if cls == "horizontal" else image.T).save(root / cls / f"{i}.png")
    return root


def fit(image_folder, out, **options):
    return transferkit.fit(str(image_folder), backbone="small_cnn", strategy="finetune", epochs=3, batch_size=8,
                           lr=0.01, out=str(out), progress=False, seed=0, early_stopping=0, **options)


def test_mlflow_logs_params_epochs_metrics_and_the_run_folder(image_folder, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = fit(image_folder, tmp_path / "tracked", track="mlflow", track_uri=uri, track_experiment="tests")
    client = MlflowClient(tracking_uri=uri)
    [logged] = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert logged.info.run_name == "tracked" and logged.info.status == "FINISHED"
    assert logged.data.params["strategy.name"] == "finetune" and logged.data.params["train.epochs"] == "3"
    assert logged.data.metrics["accuracy"] == pytest.approx(run.metrics["accuracy"])
    history = [json.loads(line) for line in (run.path / "history.jsonl").read_text().splitlines()]
    numeric = next(k for k, v in history[0].items() if k != "epoch" and isinstance(v, float))
    series = client.get_metric_history(logged.info.run_id, numeric)
    assert [m.value for m in sorted(series, key=lambda m: m.step)] == pytest.approx([row[numeric] for row in history])
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "run")}
    assert {"run/metrics.json", "run/README.md", "run/model"} <= artifacts
    assert (tmp_path / "mlartifacts").is_dir()  # beside the database, not in the working directory


def test_tracking_keeps_the_cv_protocol_and_logs_the_cv_estimate(image_folder, tmp_path):
    """--track changes nothing that is trained: 8 items a class stay cross-validated (auto) and --protocol cv is
    accepted; the logged run has the cv estimate, the final metrics and the refit's training curve."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    plain = fit(image_folder, tmp_path / "plain")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = fit(image_folder, tmp_path / "tracked", track="mlflow", track_uri=uri, track_experiment="cv")
    assert tracked.metrics["protocol"] == plain.metrics["protocol"] == "cv"
    assert tracked.metrics["accuracy"] == plain.metrics["accuracy"]
    assert (tmp_path / "tracked" / "cv_predictions.csv").read_text() == \
        (tmp_path / "plain" / "cv_predictions.csv").read_text()
    client = MlflowClient(tracking_uri=uri)
    [logged] = client.search_runs([client.get_experiment_by_name("cv").experiment_id])
    assert logged.data.metrics["cv.mean"] == pytest.approx(tracked.metrics["cv"]["mean"])
    assert logged.data.metrics["accuracy"] == pytest.approx(tracked.metrics["accuracy"])
    assert len(client.get_metric_history(logged.info.run_id, "train_loss")) == len(tracked.history) > 0
    assert "run/cv_predictions.csv" in {a.path for a in client.list_artifacts(logged.info.run_id, "run")}
    explicit = fit(image_folder, tmp_path / "explicit", protocol="cv", track="tensorboard",
                   track_uri=str(tmp_path / "tb"))
    assert explicit.metrics["protocol"] == "cv" and (tmp_path / "tb" / "explicit").is_dir()


def test_tensorboard_writes_epoch_and_final_scalars(image_folder, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = fit(image_folder, tmp_path / "tb-run", track="tensorboard", track_uri=str(tmp_path / "tb"))
    events = EventAccumulator(str(tmp_path / "tb" / "tb-run"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert events.Scalars("final/accuracy")[0].value == pytest.approx(run.metrics["accuracy"])
    history = [json.loads(line) for line in (run.path / "history.jsonl").read_text().splitlines()]
    epoch_tag = next(k for k, v in history[0].items() if k != "epoch" and isinstance(v, float))
    assert epoch_tag in tags and len(events.Scalars(epoch_tag)) == len(history)


def test_missing_tracker_or_unknown_name_is_refused_before_training(image_folder, tmp_path, monkeypatch):
    with pytest.raises(TransferkitError, match="unknown --track"):
        fit(image_folder, tmp_path / "a", track="wandb")
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(TransferkitError, match="'track' extra"):
        fit(image_folder, tmp_path / "b", track="mlflow")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return client, parents[0], children


def test_auto_logs_a_parent_run_and_a_child_per_candidate(image_folder, tmp_path):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = transferkit.auto(str(image_folder), out=str(tmp_path / "auto"), time_budget="300s",
                           strategies=["linear-probe"], backbones=["efficientnet_lite0"], image_sizes=[32],
                           folds=2, progress=False, track="mlflow", track_uri=uri, track_experiment="auto")
    client, parent, children = _runs(uri, "auto")
    assert parent.info.run_name == "auto" and parent.info.status == "FINISHED"
    assert parent.data.metrics["accuracy"] == pytest.approx(run.metrics["accuracy"])
    assert parent.data.metrics["cv.mean"] == pytest.approx(run.metrics["cv"]["mean"])
    assert parent.data.params["auto.time_budget"] == "300s"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "run")}
    assert {"run/metrics.json", "run/README.md", "run/leaderboard.json", "run/model"} <= artifacts
    rows = json.loads((run.path / "leaderboard.json").read_text())["leaderboard"]
    assert sorted(c.info.run_name for c in children) == sorted(r["name"] for r in rows)
    for child in children:
        row = next(r for r in rows if r["name"] == child.info.run_name)
        assert child.data.params["backbone"] == "efficientnet_lite0" and child.data.params["image_size"] == "32"
        assert child.data.tags["transferkit.status"] == row["status"]
        if row["cv_mean"] is not None:
            assert child.data.metrics["cv_mean"] == pytest.approx(row["cv_mean"])
            assert child.data.metrics["seconds"] == pytest.approx(row["seconds"])
            folds = client.get_metric_history(child.info.run_id, "fold_accuracy")
            assert [m.value for m in sorted(folds, key=lambda m: m.step)] == pytest.approx(row["fold_accuracies"])


def test_compare_logs_a_parent_run_and_a_child_per_cell_to_mlflow_and_tensorboard(image_folder, tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from transferkit.evaluation.compare import CompareConfig, run_compare, track_compare
    from transferkit.tracking import TrackingConfig

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "cmp"
    document = run_compare(CompareConfig(str(image_folder), ["small_cnn"], ["linear-probe", "finetune"], seeds=1,
                                         out=str(out), isolate=False,
                                         fit_options={"epochs": 2, "batch_size": 8, "track": "mlflow",
                                                      "track_uri": uri, "track_experiment": "cmp"}))
    assert "track" not in document["fit_options"]  # the cells did not log themselves as top-level runs
    client, parent, children = _runs(uri, "cmp")
    assert parent.info.run_name == "cmp"
    best = document["leaderboard"][0]
    assert parent.data.metrics["best.accuracy_mean"] == pytest.approx(best["accuracy_mean"])
    assert parent.data.metrics["cells.done"] == 2
    assert parent.data.params["compare.strategies"] == '["linear-probe", "finetune"]'
    assert {"leaderboard.json", "report.html"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert sorted(c.info.run_name for c in children) == sorted(Path(c["path"]).name for c in document["cells"])
    for child in children:
        cell = next(c for c in document["cells"] if Path(c["path"]).name == child.info.run_name)
        assert child.data.metrics["accuracy"] == pytest.approx(cell["accuracy"])
        assert child.data.params["strategy.name"] == cell["strategy"]
        assert "run/metrics.json" in {a.path for a in client.list_artifacts(child.info.run_id, "run")}

    track_compare(TrackingConfig(track="tensorboard", track_uri=str(tmp_path / "tb")), out, document)
    events = EventAccumulator(str(tmp_path / "tb" / "cmp"))
    events.Reload()
    assert events.Scalars("final/best.accuracy_mean")[0].value == pytest.approx(best["accuracy_mean"])
    for cell in document["cells"]:
        child = EventAccumulator(str(tmp_path / "tb" / "cmp" / Path(cell["path"]).name))
        child.Reload()
        assert child.Scalars("final/accuracy")[0].value == pytest.approx(cell["accuracy"])


def test_auto_and_compare_refuse_a_missing_tracker_in_one_line_before_any_work(image_folder, tmp_path, monkeypatch,
                                                                              capsys):
    from transferkit.cli.main import main

    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(TransferkitError, match="'track' extra"):
        transferkit.auto(str(image_folder), out=str(tmp_path / "a"), track="mlflow")
    for command in (["auto", "--data", str(image_folder), "--out", str(tmp_path / "b")],
                    ["compare", "--data", str(image_folder), "--backbones", "small_cnn", "--strategies", "finetune",
                     "--out", str(tmp_path / "c")]):
        assert main([*command, "--track", "mlflow"]) == 2
        error = capsys.readouterr().err.strip()
        assert "'track' extra" in error and len(error.splitlines()) == 1
    assert main(["auto", "--data", str(image_folder), "--out", str(tmp_path / "d"), "--track", "wandb"]) == 2
    assert "unknown --track 'wandb'" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abcd")


def _bad_destinations(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(--track, --track-uri, expected words) the tracker would refuse only after the run is published."""
    (tmp_path / "afile").write_text("not a folder")
    return [("mlflow", str(tmp_path / "mlruns_dir"), "file store"),
            ("mlflow", (tmp_path / "mlruns_uri").as_uri(), "file store"),
            ("mlflow", f"sqlite:///{tmp_path / 'afile' / 'sub' / 'mlflow.db'}", "not a folder"),
            ("tensorboard", str(tmp_path / "afile" / "tb"), "not a folder")]


def test_a_bad_tracking_destination_is_refused_in_one_line_before_any_work(image_folder, tmp_path, monkeypatch,
                                                                          capsys):
    pytest.importorskip("mlflow")
    from transferkit.cli.main import main

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for i, (tracker, uri, expected) in enumerate(_bad_destinations(tmp_path)):
        commands = [["fit", "--data", str(image_folder), "--backbone", "small_cnn", "--epochs", "1"],
                    ["auto", "--data", str(image_folder)],
                    ["compare", "--data", str(image_folder), "--backbones", "small_cnn", "--strategies", "finetune"]]
        for j, command in enumerate(commands):
            out = tmp_path / f"out{i}{j}"
            assert main([*command, "--out", str(out), "--track", tracker, "--track-uri", uri]) == 2, command
            error = capsys.readouterr().err.strip()
            assert "--track-uri" in error and expected in error and len(error.splitlines()) == 1, error
            assert not out.exists()
    assert not (tmp_path / "mlruns_dir").exists() and not (tmp_path / "mlruns_uri").exists()
    from transferkit.tracking import TrackingConfig, check_destination

    for remote in ("databricks", "http://127.0.0.1:5000", f"sqlite:///{tmp_path / 'new' / 'm.db'}"):
        check_destination(TrackingConfig(track="mlflow", track_uri=remote))  # not contacted, not refused
    assert not (tmp_path / "new").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "mlruns_env"))  # the environment's URI is checked too
    assert main(["fit", "--data", str(image_folder), "--out", str(tmp_path / "env"), "--track", "mlflow"]) == 2
    assert "$MLFLOW_TRACKING_URI" in capsys.readouterr().err and not (tmp_path / "env").exists()


def test_a_tracker_failure_after_publishing_is_one_line_naming_the_written_run(image_folder, tmp_path, monkeypatch,
                                                                              capsys):
    mlflow = pytest.importorskip("mlflow")
    from transferkit import tracking
    from transferkit.cli.main import main

    def refuse(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("the server said no\nsecond line")

    monkeypatch.setattr(tracking, "log_to_mlflow", refuse)
    out = tmp_path / "run"
    assert main(["fit", "--data", str(image_folder), "--backbone", "small_cnn", "--epochs", "1", "--out", str(out),
                 "--track", "mlflow", "--track-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # after the log
    assert "the server said no" in error and "second line" not in error
    assert f"written to {out}" in error and (out / "metrics.json").is_file()
    with pytest.raises(TransferkitError, match=f"written to {tmp_path / 'cmp'}"):  # compare's parent has no folder
        tracking.log_runs(tracking.TrackingConfig(track="mlflow"), tracking.TrackedRun("cmp", {}, {}),
                          output=tmp_path / "cmp")
