"""Learning without target labels (the lecture map's unsupervised cells): self-taught clustering (``cluster``) and
self-taught learning (``pretrain``: continued self-supervised pretraining of a backbone on unlabelled data)."""

from __future__ import annotations

from typing import Any

from transferkit.data.base import LabeledData
from transferkit.errors import TransferkitError


def backbone_for(name: str | None, data: LabeledData, source: str,
                 image_size: int | None = None) -> tuple[str, dict[str, Any]]:
    """The backbone name for unlabelled ``data`` (default: the modality's) and its build options; a backbone of
    another modality than the data, or ``--image-size`` on texts, is refused in one line."""
    from transferkit.backbones import backbone_modality, default_backbone

    name = name or default_backbone(data.modality)
    if backbone_modality(name) != data.modality:
        raise TransferkitError(f"backbone '{name}' takes {backbone_modality(name)} input but '{source}' holds "
                               f"{data.modality} data", f"choose a {data.modality} backbone (`transferkit backbones`)")
    options: dict[str, Any] = {}
    if image_size is not None:
        if data.modality != "image":
            raise TransferkitError("--image-size does not apply to text data", "remove it from the command")
        options["image_size"] = image_size
    return name, options
