"""Classification metrics as fractions in [0, 1]: accuracy, macro-F1, top-k, confusion matrix, per class."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = number of items of true class i predicted as j."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def top_k_accuracy(labels: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Fraction of items whose true class is among the k highest scores."""
    k = min(k, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0


def per_class_scores(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per class (0 where undefined, as scikit-learn's zero_division=0)."""
    tp = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    support = matrix.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def classification_report(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """All metrics of one evaluation. Macro-F1 averages over the classes present in ``labels``."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(class_names)
    predictions = probabilities.argmax(axis=1)
    matrix = confusion_matrix(labels, predictions, num_classes)
    precision, recall, f1, support = per_class_scores(matrix)
    present = support > 0
    report: dict[str, Any] = {
        "n": int(len(labels)),
        "accuracy": float((predictions == labels).mean()) if len(labels) else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }
    if num_classes > 5:
        report["top5_accuracy"] = top_k_accuracy(labels, probabilities, 5)
    report["labels"] = list(class_names)
    report["confusion_matrix"] = matrix.tolist()
    report["per_class"] = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    return report


def format_report(report: dict[str, Any]) -> str:
    """A readable table of an evaluation (the CLI's non-JSON output)."""
    if "accuracy" not in report:  # a regression-first multi-task model: one line per task metric
        return "\n".join([f"items: {report['n']}"] + [
            f"{name} {key.replace('_', ' ')}: {value:.4f}" for name, scores in report.get("tasks", {}).items()
            for key, value in scores.items() if isinstance(value, float)])
    lines = [f"items: {report['n']}", f"accuracy: {report['accuracy']:.4f}", f"macro F1: {report['macro_f1']:.4f}"]
    if "top5_accuracy" in report:
        lines.append(f"top-5 accuracy: {report['top5_accuracy']:.4f}")
    standard = {"n", "accuracy", "macro_f1", "top5_accuracy", "labels", "confusion_matrix", "per_class"}
    for key, value in report.items():  # scalar entries added by evaluation hooks (calibration, attacks, ...)
        if key not in standard and isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"{key.replace('_', ' ')}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
        elif key not in standard and isinstance(value, str):
            lines.append(f"{key.replace('_', ' ')}: {value}")
    width = max([len(n) for n in report["labels"]] + [5])
    lines.append("")
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for name, row in report["per_class"].items():
        lines.append(f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  "
                     f"{row['support']:7d}")
    lines.append("")
    lines.append("confusion matrix (rows: true class, columns: predicted)")
    matrix = report["confusion_matrix"]
    cell = max(4, max((len(str(v)) for row in matrix for v in row), default=1) + 1)
    lines.append(" " * width + "".join(f"{i:>{cell}d}" for i in range(len(matrix))))
    for i, row in enumerate(matrix):
        lines.append(f"{report['labels'][i]:<{width}}" + "".join(f"{v:>{cell}d}" for v in row) + f"   ({i})")
    return "\n".join(lines)
