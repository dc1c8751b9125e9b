"""Labelled data for evaluating a trained model, with labels mapped onto the model's classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferkit.data.base import LabeledData
from transferkit.errors import TransferkitError


def load_for_evaluation(spec: str | Path, class_names: list[str], *, text_column: str | None = None,
                        label_column: str | None = None) -> LabeledData:
    """Everything in ``spec`` (or its test part when it has train/test parts: a ``test`` folder or file, a
    built-in's official or fixed test split), relabelled to ``class_names``' order."""
    from transferkit.data import read_labelled_parts
    from transferkit.data.split import carve_test

    parts, _ = read_labelled_parts(spec, text_column, label_column, min_classes=1)  # new photos of one class
    if "test" in parts:
        data = parts["test"]
    elif "all" in parts and not Path(spec).exists():  # a built-in without official test: its fixed carve
        positions, test_positions = carve_test(parts["all"], np.arange(len(parts["all"])), 0.2, [])
        data = parts["all"].subset(test_positions if test_positions is not None else positions)
    else:
        data = parts["all"] if "all" in parts else parts["train"]
    if not class_names:  # a model without a label classifier (regression first): keep the data's own classes
        class_names = list(data.class_names)
    unknown = sorted(set(data.class_names) - set(class_names))
    if unknown:
        raise TransferkitError(
            f"'{spec}' has class(es) the model does not know: {', '.join(unknown[:5])}",
            f"evaluate on data whose classes are among the model's: {', '.join(class_names[:10])}",
        )
    mapping = np.array([class_names.index(c) for c in data.class_names], dtype=np.int64)
    labels = np.where(data.labels >= 0, mapping[np.clip(data.labels, 0, None)], -1)
    return LabeledData(items=data.items, labels=labels, class_names=list(class_names), modality=data.modality,
                       ids=list(data.ids), name=data.name, columns=dict(data.columns))
