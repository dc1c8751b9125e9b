"""``fit --track mlflow|tensorboard``: parameters, per-epoch metrics, final metrics and the run folder are logged."""

from __future__ import annotations

import json
import sys

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
