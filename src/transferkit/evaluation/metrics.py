"""Classification metrics as fractions in [0, 1]: accuracy, macro-F1, top-k, confusion matrix, per class.

Every number is scikit-learn's (``sklearn.metrics``), so a report here agrees with one computed there:
macro-F1 is ``f1_score(average="macro", zero_division=0)`` over the classes present in the truth *or* the
predictions (scikit-learn's default labels), so a prediction of a class absent from the truth counts as an F1 of 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def top_k_accuracy(labels: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Fraction of items whose true class is among the k highest scores (``top_k_accuracy_score``)."""
    from sklearn.metrics import top_k_accuracy_score

    if not len(labels):
        return 0.0
    num_classes = probabilities.shape[1]
    if k >= num_classes:
        return 1.0
    return float(top_k_accuracy_score(labels, probabilities, k=k, labels=np.arange(num_classes)))


def classification_report(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """All metrics of one evaluation: scikit-learn's accuracy, macro-F1 (default labels: those in the truth or
    the predictions), top-5 (more than 5 classes), confusion matrix and per-class precision / recall / F1 over
    every class of ``class_names`` (0 where undefined)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(class_names)
    every = np.arange(num_classes)
    predictions = probabilities.argmax(axis=1)
    if len(labels):
        matrix = confusion_matrix(labels, predictions, labels=every)
        precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, labels=every,
                                                                         zero_division=0)
        accuracy = float(np.trace(matrix) / len(labels))
        # f1_score(average="macro")'s default labels: the classes present in the truth or the predictions
        seen = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0
        macro_f1 = float(f1[seen].mean())
    else:
        matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        precision = recall = f1 = np.zeros(num_classes)
        support = np.zeros(num_classes, dtype=np.int64)
        accuracy = macro_f1 = 0.0
    report: dict[str, Any] = {"n": int(len(labels)), "accuracy": accuracy, "macro_f1": macro_f1}
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
