"""The folder format of a self-taught backbone (``transferkit pretrain --out``): ``weights.safetensors`` (the
backbone's state dict) + ``backbone.json`` (``format``, the base backbone's spec ``base``, ``modality``,
``feature_dim`` and ``provenance``). ``create_backbone(FOLDER)`` builds the base architecture and loads the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferkit.errors import TransferkitError

SPEC_FILE = "backbone.json"
WEIGHTS_FILE = "weights.safetensors"
SPEC_FORMAT = "transferkit-backbone"
_PRETRAIN_AGAIN = "re-run `transferkit pretrain ... --out FOLDER` to write the backbone folder again"


def write_backbone_folder(folder: str | Path, backbone: Any, spec: dict[str, Any]) -> None:
    """Write ``backbone``'s weights and ``spec`` into ``folder`` (a staging folder: published by the caller)."""
    from transferkit.rundir import write_json, write_safetensors

    state = {k: v.detach().cpu().clone().contiguous() for k, v in backbone.state_dict().items()}
    write_safetensors(Path(folder) / WEIGHTS_FILE, state)
    write_json(Path(folder) / SPEC_FILE, spec)


def read_backbone_folder(path: str | Path) -> dict[str, Any] | None:
    """The ``backbone.json`` of a pretrain folder (checked), or None when ``path`` is not one."""
    from transferkit.errors import read_json

    path = Path(path).expanduser()
    spec_path = path / SPEC_FILE
    if not spec_path.is_file():
        return None
    spec = read_json(spec_path, "backbone spec", _PRETRAIN_AGAIN)
    base = spec.get("base") if isinstance(spec, dict) else None
    if not isinstance(base, dict) or spec.get("format") != SPEC_FORMAT or not isinstance(base.get("name"), str):
        raise TransferkitError(f"'{spec_path}' is not a transferkit backbone spec", _PRETRAIN_AGAIN)
    if not (path / WEIGHTS_FILE).is_file():
        raise TransferkitError(f"backbone folder '{path}' has no {WEIGHTS_FILE}", _PRETRAIN_AGAIN)
    spec["_folder"] = str(path)
    return spec


def load_backbone_folder(spec: dict[str, Any], pretrained: bool = True, **options: Any) -> Any:
    """Build the base architecture and load the self-taught weights (``pretrained=False``: architecture only)."""
    from transferkit.backbones import create_backbone
    from transferkit.errors import read_safetensors

    base = spec["base"]
    merged = {**dict(base.get("options", {})), **options}
    backbone = create_backbone(base["name"], pretrained=False, **merged)
    if pretrained:
        weights = Path(spec["_folder"]) / WEIGHTS_FILE
        state = read_safetensors(weights, "self-taught backbone weights file", _PRETRAIN_AGAIN)
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).splitlines()[0][:200]
            raise TransferkitError(f"the weights in '{weights}' do not fit backbone '{base['name']}' ({first})",
                                   _PRETRAIN_AGAIN) from error
        backbone.self_taught_from = spec["_folder"]
    backbone.is_pretrained = bool(pretrained)
    return backbone
