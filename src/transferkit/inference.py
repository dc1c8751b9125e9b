"""Prediction and evaluation of a trained ``TransferModel``, on whatever device the model was placed on
(see ``transferkit.engine.placement``). ``transferkit.api`` re-exports these names."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from transferkit.engine.placement import predict_batches


def predict_proba_model(model, data, batch_size: int = 64, progress: bool = False,
                        temperature: float = 1.0) -> np.ndarray:
    """Class probabilities ``softmax(logits / temperature)`` of the first task for every item of a LabeledData."""
    from transferkit.data.loader import make_loader
    from transferkit.progress import progress as progress_bar

    loader = make_loader(data, model.backbone, batch_size=batch_size, train=False)
    probabilities = predict_batches(
        model, (batch["inputs"] for batch in progress_bar(loader, "predicting", enabled=progress)),
        lambda inputs: torch.softmax(model(inputs).logits.float() / temperature, dim=-1))
    return probabilities if probabilities is not None else np.zeros((0, len(model.class_names)))


def evaluate_features(model, features: np.ndarray, data) -> dict[str, Any]:
    """The report of a model whose backbone is frozen, computed from that backbone's features of ``data``."""
    from transferkit.evaluation.metrics import classification_report

    probabilities = predict_batches(model, [torch.as_tensor(features, dtype=torch.float32)],
                                    lambda x: torch.softmax(model.forward_head(x).logits.float(), dim=-1))
    keep = data.labels >= 0
    return classification_report(data.labels[keep], probabilities[keep], model.class_names)


def evaluate_model(model, data, batch_size: int = 64, progress: bool = False) -> dict[str, Any]:
    """Accuracy, macro-F1, top-5, confusion matrix and per-class scores of the first task on labelled ``data``."""
    from transferkit.evaluation.metrics import classification_report

    probabilities = predict_proba_model(model, data, batch_size, progress)
    keep = data.labels >= 0
    return classification_report(data.labels[keep], probabilities[keep], model.class_names)


__all__ = ["evaluate_features", "evaluate_model", "predict_proba_model"]
