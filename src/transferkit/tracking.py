"""Experiment tracking: ``fit --track mlflow|tensorboard`` logs a finished run to a tracker.

Logged once the run folder is published: the options as parameters (``fit.data``, ``train.lr``,
``strategy.name``, ...), every numeric column of ``history.jsonl`` per epoch, the final numeric metrics of
``metrics.json`` (``accuracy``, ``macro_f1``, ``cv.mean``, ...), and for MLflow the run folder itself as an
artefact (``run/``). MLflow logs to ``--track-uri``, else ``$MLFLOW_TRACKING_URI``, else a local SQLite store
``sqlite:///mlflow.db`` (recent MLflow refuses the plain file store unless told otherwise), whose artefacts go to
``mlartifacts/`` beside the database; TensorBoard writes
event files under ``--track-uri`` (default ``runs/tensorboard``) in a folder named after the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferkit.errors import TransferkitError
from transferkit.extensions import ExtensionConfig, FitExtension, register_extension

logger = logging.getLogger(__name__)

TRACKERS = ("mlflow", "tensorboard")
DEFAULT_MLFLOW_URI = "sqlite:///mlflow.db"
DEFAULT_TENSORBOARD_DIR = "runs/tensorboard"


@dataclass
class TrackingConfig(ExtensionConfig):
    track: str | None = field(default=None, metadata={
        "help": "Log the finished run (options, per-epoch metrics, final metrics, the run folder) to mlflow or "
                "tensorboard (needs the 'track' extra)."})
    track_uri: str | None = field(default=None, metadata={
        "help": f"mlflow: tracking URI (default $MLFLOW_TRACKING_URI or {DEFAULT_MLFLOW_URI}); tensorboard: log "
                f"folder (default {DEFAULT_TENSORBOARD_DIR})."})
    track_experiment: str = field(default="transferkit", metadata={"help": "mlflow experiment name."})

    def validate(self) -> None:
        if self.track is not None and self.track not in TRACKERS:
            raise TransferkitError(f"unknown --track '{self.track}'", f"use one of: {', '.join(TRACKERS)}")


def require_tracker(name: str) -> None:
    """A one-line error when the tracker's library is not installed."""
    module = {"mlflow": "mlflow", "tensorboard": "tensorboard"}[name]
    try:
        __import__(module)
    except ModuleNotFoundError:
        raise TransferkitError(f"--track {name} needs the 'track' extra ({module} is missing)",
                               "pip install 'transferkit[track]'") from None


def flat_params(options: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested options as ``section.name`` -> text (None and empty values left out)."""
    flat: dict[str, str] = {}
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, name + "."))
        elif value is not None and value != [] and value != "":
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def numeric_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numeric entries of ``metrics`` (nested dicts as ``a.b``; booleans, lists and config left out)."""
    found: dict[str, float] = {}
    for key, value in metrics.items():
        if key in ("config", "evaluation", "class_names", "notes"):
            continue
        if isinstance(value, dict):
            found.update(numeric_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[f"{prefix}{key}"] = float(value)
    return found


def epoch_rows(history: list[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """(step, numeric values) per row of ``history.jsonl``; the step is the row's epoch (or its position)."""
    rows = []
    for i, row in enumerate(history):
        step = int(row.get("epoch", i)) if isinstance(row.get("epoch", i), (int, float)) else i
        values = {k: float(v) for k, v in row.items()
                  if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        rows.append((step, values))
    return rows


def log_to_mlflow(run_dir: Path, options: dict[str, Any], metrics: dict[str, Any], history: list[dict[str, Any]],
                  uri: str | None = None, experiment: str = "transferkit") -> str:
    """One MLflow run: parameters, per-epoch metrics, final metrics, the run folder as artefact ``run/``;
    returns the MLflow run id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:  # a SQLite store keeps its artefacts beside the database, not in the working directory
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri() \
            if uri.startswith("sqlite:///") else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    run = client.create_run(experiment_id, run_name=run_dir.name, tags={"transferkit.run_dir": str(run_dir)})
    run_id = run.info.run_id
    try:
        now = int(1000 * time.time())
        params = [Param(k, v[:6000]) for k, v in flat_params(options).items()]
        series = [Metric(k, v, now, step) for step, values in epoch_rows(history) for k, v in values.items()]
        series += [Metric(k, v, now, 0) for k, v in numeric_metrics(metrics).items()]
        for start in range(0, len(params), 100):  # MLflow's batch limits: 100 parameters, 1000 metrics
            client.log_batch(run_id, params=params[start:start + 100])
        for start in range(0, len(series), 1000):
            client.log_batch(run_id, metrics=series[start:start + 1000])
        client.log_artifacts(run_id, str(run_dir), artifact_path="run")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def log_to_tensorboard(run_dir: Path, options: dict[str, Any], metrics: dict[str, Any],
                       history: list[dict[str, Any]], logdir: str | None = None) -> Path:
    """Event files under ``logdir/<run name>``: per-epoch scalars, final metrics (``final/...``), the options as
    text; returns the folder written."""
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(logdir or DEFAULT_TENSORBOARD_DIR) / run_dir.name
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for step, values in epoch_rows(history):
            for key, value in values.items():
                writer.add_scalar(key, value, step)
        last = max((step for step, _ in epoch_rows(history)), default=0)
        for key, value in numeric_metrics(metrics).items():
            writer.add_scalar(f"final/{key}", value, last)
        writer.add_text("options", "\n".join(f"    {k} = {v}" for k, v in flat_params(options).items()))
        writer.add_text("run_dir", str(run_dir.resolve()))
    finally:
        writer.close()
    return folder


@register_extension
class Tracking(FitExtension):
    """``--track``: log the published run to MLflow or TensorBoard (checked before training, logged after)."""

    name = "tracking"
    config_class = TrackingConfig
    config: TrackingConfig

    def active(self) -> bool:
        return self.config.track is not None

    def describe(self) -> str:
        return f"--track {self.config.track}"

    @classmethod
    def modes(cls) -> dict[str, dict[str, Any]]:
        from transferkit.extensions import NEEDS_PATH

        return {"track tensorboard": {"track": "tensorboard", "track_uri": NEEDS_PATH}}  # mlflow: the same hook

    def check(self, fit: Any, strategy: Any) -> None:
        require_tracker(self.config.track)

    def published(self, run_dir: Path, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        options = metrics.get("config") or {}
        if self.config.track == "mlflow":
            run_id = log_to_mlflow(run_dir, options, metrics, history, self.config.track_uri,
                                   self.config.track_experiment)
            logger.info("logged to MLflow run %s (%s)", run_id, self.config.track_uri or
                        os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI)
        else:
            logger.info("logged to TensorBoard in %s", log_to_tensorboard(run_dir, options, metrics, history,
                                                                         self.config.track_uri))
