"""Calibration: does a predicted confidence of 0.8 mean 80% correct?

* Expected calibration error (Guo et al. 2017, "On Calibration of Modern Neural Networks"; Naeini et al. 2015):
  the confidences ``max_k p_k`` are put into 15 equal-width bins over [0, 1];
  ``ECE = sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|``. The per-bin accuracy, confidence and
  count are the reliability diagram.
* Temperature scaling (Guo et al. 2017): one scalar T > 0 divides the logits, ``softmax(z / T)``; T is fitted by
  minimising the negative log-likelihood on the *validation* split (never the test split). It leaves every
  argmax, hence accuracy, unchanged.

Where the temperature lives: ``fit --temperature-scale`` (the :class:`TemperatureScaling` fit extension) fits T
on the validation split right after training and writes ``calibration.json`` (``{"temperature": T, ...}``) into
the run folder, next to ``model/``. ``transferkit.load`` reads it, so ``predict_proba`` and ``transferkit predict``
return the calibrated probabilities; ``evaluate`` reports the raw model's ECE and, with ``--temperature-scale``,
the ECE after T beside it. Every evaluation reports ``ece`` and ``reliability`` (the evaluation hook below).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.errors import TransferkitError
from transferkit.extensions import ExtensionConfig, FitExtension, register_extension
from transferkit.rundir import write_json

logger = logging.getLogger(__name__)

NUM_BINS = 15
CALIBRATION_FILE = "calibration.json"


def reliability_diagram(probabilities: np.ndarray, labels: np.ndarray, bins: int = NUM_BINS) -> dict[str, Any]:
    """Per-bin ``count``, ``accuracy`` and ``confidence`` (None for empty bins) and the ECE."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 goes to the first bin
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    acc_sum = np.bincount(index, weights=correct.astype(float), minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    n = max(len(labels), 1)
    ece = float(np.abs(acc_sum - conf_sum).sum() / n)
    return {
        "bins": bins,
        "edges": edges.tolist(),
        "count": counts.tolist(),
        "accuracy": [float(a / c) if c else None for a, c in zip(acc_sum, counts)],
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, counts)],
        "ece": ece,
    }


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = NUM_BINS) -> float:
    return reliability_diagram(probabilities, labels, bins)["ece"]


def fit_temperature(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, max_iter: int = 200) -> float:
    """T minimising ``NLL(softmax(logits / T), labels)`` (L-BFGS on log T, so T stays positive)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(y) == 0:
        raise TransferkitError("temperature scaling needs labelled validation data", "use a validation split")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.detach().exp().clamp(1e-3, 1e3))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def model_logits(module: Any, data: Any, batch_size: int = 64) -> np.ndarray:
    """First-task logits of a TransferModel for every item of a LabeledData."""
    from transferkit.data.loader import make_loader
    from transferkit.engine.placement import predict_batches

    loader = make_loader(data, module.backbone, batch_size=batch_size, train=False)
    logits = predict_batches(module, (batch["inputs"] for batch in loader), lambda x: module(x).logits.float())
    return logits if logits is not None else np.zeros((0, len(module.class_names)))


def run_folder_of(model_path: str | Path) -> Path:
    """The run folder of a LoadedModel's path (which may be the run folder or its ``model/``)."""
    path = Path(model_path)
    return path.parent if path.name == "model" and not (path / "model").is_dir() else path


def copy_calibration(model_path: str | Path, destination: str | Path) -> bool:
    """Copy the run's fitted softmax temperature (``calibration.json``) next to an exported model, so the export
    predicts the same calibrated probabilities; False when the run has none."""
    import shutil

    source = run_folder_of(model_path) / CALIBRATION_FILE
    if not source.is_file():
        return False
    shutil.copyfile(source, Path(destination) / CALIBRATION_FILE)
    return True


def read_temperature(model_path: str | Path) -> float | None:
    from transferkit.errors import check_number, read_json, reading

    file = run_folder_of(model_path) / CALIBRATION_FILE
    if not file.is_file():
        return None
    with reading(file, "calibration file", "delete it, or fit again with --temperature-scale"):
        return check_number("temperature", read_json(file, "calibration file")["temperature"], 0, low_open=True)


# --- fit extension: --temperature-scale ----------------------------------------------------------------------


@dataclass
class TemperatureConfig(ExtensionConfig):
    temperature_scale: bool = field(default=False, metadata={
        "help": "Fit a softmax temperature on the validation split after training (Guo et al. 2017); stored "
                "in the run's calibration.json and used by `evaluate --temperature-scale`."})


@register_extension
class TemperatureScaling(FitExtension):
    name = "calibration"
    config_class = TemperatureConfig
    config: TemperatureConfig

    def active(self) -> bool:
        return self.config.temperature_scale

    def describe(self) -> str:
        return "--temperature-scale"

    @classmethod
    def modes(cls) -> dict[str, dict[str, Any]]:
        return {"temperature-scale": {"temperature_scale": True}}

    def supports(self, strategy: Any, task_kind: str) -> bool | str:
        if task_kind not in ("label", "classify"):
            return "the temperature scales the label classifier's probabilities, and the first task does not classify"
        return super().supports(strategy, task_kind)

    def metrics(self, context: Any, model: Any) -> dict[str, Any]:
        if context.cv is not None:  # --protocol cv: fitted on the out-of-fold predictions of every labelled item
            from transferkit.evaluation.crossfit import fit_cv_temperature

            record = fit_cv_temperature(context.cv, context.splits.train.labels)
            return self._record(context, record)
        val = context.splits.val
        keep = val.labels >= 0
        if not keep.any():
            context.notes.append("temperature scaling skipped: no labelled validation data")
            return {}
        val = val.subset(np.flatnonzero(keep)) if not keep.all() else val
        logits = model_logits(model, val)
        temperature = fit_temperature(logits, val.labels)
        before = expected_calibration_error(softmax(logits), val.labels)
        after = expected_calibration_error(softmax(logits, temperature), val.labels)
        return self._record(context, {"temperature": temperature, "fitted_on": "validation split", "n": int(len(val)),
                                      "val_ece_before": before, "val_ece_after": after})

    @staticmethod
    def _record(context: Any, record: dict[str, Any]) -> dict[str, Any]:
        if context.run_dir is not None:
            write_json(Path(context.run_dir) / CALIBRATION_FILE, record)
        logger.info("temperature %.3f fitted on %d items of the %s (ECE %.4f -> %.4f)", record["temperature"],
                    record["n"], record["fitted_on"], record["val_ece_before"], record["val_ece_after"])
        return {"temperature": record["temperature"], "val_ece_before_temperature": record["val_ece_before"],
                "val_ece_after_temperature": record["val_ece_after"]}


# --- evaluation hook ---------------------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    parser.add_argument("--temperature-scale", action="store_true",
                        help="Also report the ECE after the temperature fitted at training time (fit "
                             "--temperature-scale; read from the run's calibration.json).")


def evaluate_hook(model: Any, data: Any, report: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """ECE + reliability diagram in every evaluation; the temperature-scaled ECE on request."""
    keep = data.labels >= 0
    if not keep.any():
        return {}
    labelled = data.subset(np.flatnonzero(keep)) if not keep.all() else data
    logits = model_logits(model.module, labelled)
    diagram = reliability_diagram(softmax(logits), labelled.labels)
    extra: dict[str, Any] = {"ece": diagram["ece"], "reliability": diagram}
    if options.get("temperature_scale"):
        temperature = read_temperature(model.path)
        if temperature is None:
            raise TransferkitError(f"the run '{run_folder_of(model.path)}' has no fitted temperature "
                                   f"({CALIBRATION_FILE} is missing)", "re-run fit with --temperature-scale")
        scaled = reliability_diagram(softmax(logits, temperature), labelled.labels)
        extra.update(temperature=temperature, ece_temperature_scaled=scaled["ece"], reliability_temperature_scaled=scaled)
    return extra
