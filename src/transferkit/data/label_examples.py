"""Training examples made from the class names themselves, for text classification with a handful of labels.

SetFit's ``get_templated_dataset`` (Tunstall et al. 2022): every class contributes ``copies`` synthetic sentences
"This sentence is {class name}". With 8 labelled tweets per class, the class name carries as much information about
a sentiment class as several examples; a sentence encoder places the templated sentence near texts of that meaning.
Only useful when the class names are words (not codes such as "0" / "1"): :func:`names_are_words` says when.
Synthetic items join the training side only, never a validation or test split.
"""

from __future__ import annotations

import re

import numpy as np

from transferkit.data.base import LabeledData
from transferkit.errors import TransferkitError

TEMPLATE = "This sentence is {}"
ID_PREFIX = "label-example:"


def names_are_words(class_names: list[str]) -> bool:
    """True when every class name contains a letter (``negative``, ``billing issue``), not a code (``0``, ``1.5``)."""
    return all(re.search(r"[^\W\d_]", name) for name in class_names)


def with_label_examples(data: LabeledData, copies: int, template: str = TEMPLATE) -> LabeledData:
    """``data`` followed by ``copies`` sentences ``template.format(class name)`` per class (ids
    ``label-example:<class>#<copy>``)."""
    if data.modality != "text":
        raise TransferkitError(f"label examples are sentences: they apply to text data, not {data.modality}",
                               "drop label_examples")
    if copies < 0 or "{}" not in template:
        raise TransferkitError(f"invalid label examples ({copies} copies of {template!r})",
                               "use copies >= 0 and a template with {} for the class name")
    texts = [str(item) for item in data.items]
    labels, ids = list(data.labels), list(data.ids)
    for copy in range(copies):
        for k, name in enumerate(data.class_names):
            texts.append(template.format(name))
            labels.append(k)
            ids.append(f"{ID_PREFIX}{name}#{copy}")
    return LabeledData(texts, np.asarray(labels, dtype=np.int64), list(data.class_names), data.modality, ids,
                       name=f"{data.name}+label-examples")
