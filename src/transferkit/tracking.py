"""Experiment tracking: ``fit / auto / compare --track mlflow|tensorboard`` log finished runs to a tracker.

Logged once the run folder is published: the options as parameters (``fit.data``, ``train.lr``,
``strategy.name``, ...), every numeric column of ``history.jsonl`` per epoch, the final numeric metrics of
``metrics.json`` (``accuracy``, ``macro_f1``, ``cv.mean``, ...), and for MLflow the run folder itself as an
artefact (``run/``). Tracking never changes what is trained: a ``--protocol cv`` run (or ``auto`` choosing cv) stays
cross-validated and logs its cv estimate (``cv.mean``, ...) and its refit's history. MLflow logs to ``--track-uri``, else ``$MLFLOW_TRACKING_URI``, else a local SQLite store
``sqlite:///mlflow.db`` (recent MLflow refuses the plain file store unless told otherwise), whose artefacts go to
``mlartifacts/`` beside the database; TensorBoard writes
event files under ``--track-uri`` (default ``runs/tensorboard``) in a folder named after the run.

``auto`` and ``compare`` log one parent run and nested child runs (MLflow's ``mlflow.parentRunId``; TensorBoard
subfolders): ``auto`` a child per leaderboard candidate (its settings, cross-validated score per fold, mean and sd,
cost in seconds, status) under a parent with the final metrics and the run folder; ``compare`` a child per cell (the
cell's run folder logged as ``fit --track`` logs it) under a parent with the leaderboard and the recommendation.
Everything is logged once the command's output is published (:func:`log_runs`); the destination is checked before
any work (:func:`check_destination`), and a tracker failing after publishing is a one-line error naming the output.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from transferkit.errors import TransferkitError, first_line, from_os_error
from transferkit.extensions import ExtensionConfig, FitExtension, register_extension

logger = logging.getLogger(__name__)

TRACKERS = ("mlflow", "tensorboard")
DEFAULT_MLFLOW_URI = "sqlite:///mlflow.db"
DEFAULT_TENSORBOARD_DIR = "runs/tensorboard"


@dataclass
class TrackingConfig(ExtensionConfig):
    track: str | None = field(default=None, metadata={
        "help": "Log the finished run (options, per-epoch metrics, final metrics, the run folder) to mlflow or "
                "tensorboard (needs the 'track' extra); auto and compare log a parent run with a child run per "
                "candidate / per cell."})
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


def mlflow_uri(config: TrackingConfig) -> tuple[str, str]:
    """The MLflow tracking URI that ``config`` logs to, and where it came from (for messages)."""
    if config.track_uri:
        return config.track_uri, "--track-uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI"
    return DEFAULT_MLFLOW_URI, "the default --track-uri"


def _file_store_allowed() -> bool:
    """Whether MLflow accepts its file store (a plain folder); from MLflow 3.x only with ``MLFLOW_ALLOW_FILE_STORE``."""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # an MLflow from before the file store's maintenance mode
        return True
    return bool(MLFLOW_ALLOW_FILE_STORE.get())


def _check_writable(path: Path, source: str, value: str, *, file: bool = False) -> None:
    """Refuse a destination the tracker could not create or write: folder ``path`` (or with ``file`` the database
    file ``path``), named as ``source`` ``'value'`` in the message. Nothing is created."""
    path = Path(os.path.abspath(path))
    found = path if path.exists() else next(p for p in path.parents if p.exists())
    if found == path and file and path.is_dir():
        code = errno.EISDIR
    elif not found.is_dir() and not (found == path and file):
        code = errno.ENOTDIR
    elif not os.access(found, os.W_OK | (0 if found == path and file else os.X_OK)):
        code = errno.EACCES
    else:
        return
    error = from_os_error(OSError(code, os.strerror(code), str(found)))
    raise TransferkitError(f"{source} '{value}': {error.problem}",
                           f"{error.fix} for {'$MLFLOW_TRACKING_URI' if source.startswith('$') else '--track-uri'}")


def check_destination(config: TrackingConfig) -> None:
    """Refuse, before any work, a destination the tracker would refuse only after the run is published: an MLflow
    file store (a plain folder or ``file:`` URI, which MLflow 3 refuses unless ``MLFLOW_ALLOW_FILE_STORE=true``),
    a SQLite database or TensorBoard folder that cannot be created or written. Remote stores are not contacted."""
    if config.track == "tensorboard":
        _check_writable(Path(config.track_uri or DEFAULT_TENSORBOARD_DIR), "--track-uri",
                        config.track_uri or DEFAULT_TENSORBOARD_DIR)
        return
    uri, source = mlflow_uri(config)
    parsed = urlparse(uri)
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow's names of remote stores, not folders
        return
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # a path (a Windows drive letter is no scheme)
        if not _file_store_allowed():
            folder = url2pathname(parsed.path) if parsed.scheme == "file" else uri
            raise TransferkitError(
                f"{source} '{uri}' is a folder, MLflow's file store, which MLflow refuses",
                f"use a database, e.g. --track-uri sqlite:///{Path(folder) / 'mlflow.db'} (an existing store: "
                "`mlflow migrate-filestore`), or set MLFLOW_ALLOW_FILE_STORE=true")
    elif parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and uri[len("sqlite:///"):] not in ("", ":memory:"):
        _check_writable(Path(uri[len("sqlite:///"):]), source, uri, file=True)


def check_tracking(config: TrackingConfig) -> None:
    """Everything ``--track`` needs, checked before any work: the tracker's library and its destination."""
    require_tracker(config.track)
    check_destination(config)


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


@dataclass
class TrackedRun:
    """One run for a tracker: its name, options (logged as parameters), per-step rows (``history.jsonl``-like: each
    row's numeric values at the row's ``epoch``, else its position), final ``metrics``, an optional ``folder``
    logged as artefact ``run/`` and single ``files`` logged at the top, tags and an MLflow status."""

    name: str
    options: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    folder: Path | None = None
    files: list[Path] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    status: str = "FINISHED"  # MLflow: FINISHED, FAILED or KILLED (stopped / skipped)


def _mlflow_experiment(client: Any, uri: str, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    # a SQLite store keeps its artefacts beside the database, not in the working directory
    location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri() \
        if uri.startswith("sqlite:///") else None
    return client.create_experiment(experiment, artifact_location=location)


def _mlflow_key(name: str) -> str:
    """A parameter or metric name as MLflow accepts it (other characters, e.g. brackets, become "_")."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)[:250]


def _mlflow_run(client: Any, experiment_id: str, run: TrackedRun, parent_id: str | None = None) -> str:
    """One MLflow run (nested under ``parent_id`` when given, MLflow's ``mlflow.parentRunId`` tag); its id."""
    from mlflow.entities import Metric, Param

    tags = {**run.tags, **({"transferkit.run_dir": str(run.folder)} if run.folder else {}),
            **({"mlflow.parentRunId": parent_id} if parent_id else {})}
    run_id = client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
    try:
        now = int(1000 * time.time())
        params = [Param(_mlflow_key(k), v[:6000]) for k, v in flat_params(run.options).items()]
        series = [Metric(_mlflow_key(k), v, now, step) for step, values in epoch_rows(run.history)
                  for k, v in values.items()]
        series += [Metric(_mlflow_key(k), v, now, 0) for k, v in numeric_metrics(run.metrics).items()]
        for start in range(0, len(params), 100):  # MLflow's batch limits: 100 parameters, 1000 metrics
            client.log_batch(run_id, params=params[start:start + 100])
        for start in range(0, len(series), 1000):
            client.log_batch(run_id, metrics=series[start:start + 1000])
        if run.folder is not None:
            client.log_artifacts(run_id, str(run.folder), artifact_path="run")
        for file in run.files:
            if file.is_file():
                client.log_artifact(run_id, str(file))
        client.set_terminated(run_id, run.status)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def log_to_mlflow(parent: TrackedRun, children: list[TrackedRun] = (), uri: str | None = None,
                  experiment: str = "transferkit") -> str:
    """``parent`` as an MLflow run and each of ``children`` as a run nested under it; returns the parent's id."""
    from mlflow.tracking import MlflowClient

    uri = uri or mlflow_uri(TrackingConfig(track="mlflow"))[0]
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _mlflow_experiment(client, uri, experiment)
    parent_id = _mlflow_run(client, experiment_id, parent)
    for child in children:
        _mlflow_run(client, experiment_id, child, parent_id)
    return parent_id


def _tensorboard_run(folder: Path, run: TrackedRun) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    try:
        rows = epoch_rows(run.history)
        for step, values in rows:
            for key, value in values.items():
                writer.add_scalar(key, value, step)
        last = max((step for step, _ in rows), default=0)
        for key, value in numeric_metrics(run.metrics).items():
            writer.add_scalar(f"final/{key}", value, last)
        writer.add_text("options", "\n".join(f"    {k} = {v}" for k, v in flat_params(run.options).items()))
        for key, value in {**run.tags, "status": run.status}.items():
            writer.add_text(key, str(value))
        if run.folder is not None:
            writer.add_text("run_dir", str(run.folder.resolve()))
    finally:
        writer.close()


def safe_name(name: str) -> str:
    """A run name as one folder name."""
    return re.sub(r"[^A-Za-z0-9_.@=+-]+", "_", name).strip("_.") or "run"


def log_to_tensorboard(parent: TrackedRun, children: list[TrackedRun] = (), logdir: str | None = None) -> Path:
    """Event files under ``logdir/<parent name>`` (per-step scalars, final metrics as ``final/...``, the options
    as text), each child's in a subfolder of it (TensorBoard shows them as runs ``parent/child``); returns the
    parent's folder."""
    folder = Path(logdir or DEFAULT_TENSORBOARD_DIR) / safe_name(parent.name)
    _tensorboard_run(folder, parent)
    for child in children:
        _tensorboard_run(folder / safe_name(child.name), child)
    return folder


def log_runs(config: TrackingConfig, parent: TrackedRun, children: list[TrackedRun] = (),
             output: Path | None = None) -> str:
    """Log ``parent`` (and its ``children``, nested) to the tracker ``config`` names; returns where (for the log).
    A tracker's failure is a one-line error saying that the command's ``output`` (default: the parent's folder)
    was written all the same."""
    try:
        if config.track == "mlflow":
            uri = mlflow_uri(config)[0]
            where = f"MLflow run {log_to_mlflow(parent, children, uri, config.track_experiment)} ({uri})"
        else:
            where = f"TensorBoard in {log_to_tensorboard(parent, children, config.track_uri)}"
    except Exception as exc:  # MlflowException, a database's or the disk's error: the output is complete
        tracker = "MLflow" if config.track == "mlflow" else "TensorBoard"
        raise TransferkitError(
            f"the output was written to {output or parent.folder}, but logging it to {tracker} failed "
            f"({type(exc).__name__}: {first_line(exc)})",
            "the output is complete; to log it, fix the tracker and run the same command again (fit and auto with "
            "--overwrite; compare reuses its finished cells), or leave out --track") from None
    logger.info("logged %s%s to %s", parent.name, f" and {len(children)} child runs" if children else "", where)
    return where


def tracking_options(options: dict[str, Any]) -> TrackingConfig | None:
    """Take the ``--track`` options out of ``options`` (``track``, ``track_uri``, ``track_experiment``): a checked
    TrackingConfig (its library installed), or None when tracking is off. For commands that log runs of their own
    (``auto``, ``compare``) before they start any work."""
    names = [f for f in TrackingConfig.__dataclass_fields__ if f in options]
    values = {name: options.pop(name) for name in names}
    config = TrackingConfig(**{k: v for k, v in values.items() if v is not None})
    config.validate()
    if config.track is None:
        return None
    check_tracking(config)
    return config


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
        check_tracking(self.config)

    def published(self, run_dir: Path, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        log_runs(self.config, run_record(run_dir, metrics, history))


def run_record(run_dir: Path, metrics: dict[str, Any], history: list[dict[str, Any]] | None = None,
               name: str | None = None) -> TrackedRun:
    """A finished run folder as a TrackedRun: its options (``metrics.json``'s config), ``history.jsonl`` rows (read
    from the folder when not given), final metrics and the folder itself."""
    if history is None:
        file = run_dir / "history.jsonl"
        history = [json.loads(line) for line in file.read_text().splitlines() if line.strip()] \
            if file.is_file() else []
    return TrackedRun(name or run_dir.name, metrics.get("config") or {}, metrics, history, folder=run_dir)
