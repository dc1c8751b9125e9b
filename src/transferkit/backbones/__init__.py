"""Backbone registry: ``create_backbone("efficientnet_lite0")``, ``create_backbone("timm:resnet18")``, ...

Exact names are registered with ``@register_backbone``; prefixed names (``timm:<name>``, ``hf:<name-or-path>``)
with ``@register_prefix``. Modules that register entries are imported lazily on first use. A folder written by
``transferkit pretrain`` (``backbone.json`` + ``weights.safetensors``) is accepted wherever a name is: its base
architecture is built and the self-taught weights loaded (``self_taught_spec``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transferkit.backbones.base import Backbone, BackboneInfo, BackboneSpec, batch_size_of, move_to
from transferkit.errors import TransferkitError
from transferkit.registry import add_entry, import_registering_modules

__all__ = [
    "Backbone",
    "BackboneInfo",
    "BackboneSpec",
    "create_backbone",
    "backbone_from_spec",
    "list_backbones",
    "default_backbone",
    "register_backbone",
    "register_prefix",
    "self_taught_spec",
    "move_to",
    "batch_size_of",
]

# Modules whose import registers backbones. Kept explicit so the registry is predictable.
_BACKBONE_MODULES = [
    "transferkit.backbones.efficientnet",
    "transferkit.backbones.text",
    "transferkit.backbones.timm_backbone",
    "transferkit.backbones.small_cnn",
    "transferkit.backbones.causal_lm",
    "transferkit.sequence.backbones",
]


@dataclass
class _Entry:
    factory: Callable[..., Backbone]
    info: Callable[[], BackboneInfo]


_REGISTRY: dict[str, _Entry] = {}
_PREFIXES: dict[str, _Entry] = {}
_loaded = False


def register_backbone(name: str, info: Callable[[], BackboneInfo]):
    """Decorator: register ``factory(pretrained: bool, **options) -> Backbone`` under ``name``."""

    def wrap(factory: Callable[..., Backbone]) -> Callable[..., Backbone]:
        add_entry(_REGISTRY, name, _Entry(factory, info), "backbone")
        return factory

    return wrap


def register_prefix(prefix: str, info: Callable[[], BackboneInfo]):
    """Decorator: register ``factory(target: str, pretrained: bool, **options)`` for names ``prefix:target``."""

    def wrap(factory: Callable[..., Backbone]) -> Callable[..., Backbone]:
        add_entry(_PREFIXES, prefix, _Entry(factory, info), "backbone prefix")
        return factory

    return wrap


def _load_modules() -> None:
    global _loaded
    if _loaded:
        return
    import_registering_modules(_BACKBONE_MODULES)
    _loaded = True


def self_taught_spec(name: str) -> dict[str, Any] | None:
    """The spec of a ``transferkit pretrain`` folder named by ``name`` (None: ``name`` is not a folder). A folder
    that is not one is refused in one line."""
    from pathlib import Path

    if name in _REGISTRY or not Path(name).expanduser().is_dir():
        return None
    from transferkit.backbones.self_taught import SPEC_FILE, read_backbone_folder

    spec = read_backbone_folder(name)
    if spec is None:
        raise TransferkitError(f"backbone folder '{name}' has no {SPEC_FILE}",
                               "pass a folder written by `transferkit pretrain`, or a registry name")
    return spec


def check_backbone_name(name: str) -> None:
    """Raise the unknown-backbone error early, before any data is loaded."""
    _load_modules()
    if name in _REGISTRY or (":" in name and name.split(":", 1)[0] in _PREFIXES):
        return
    if self_taught_spec(name) is not None:
        return
    known = ", ".join(sorted(_REGISTRY) + [f"{p}:<name>" for p in sorted(_PREFIXES)])
    raise TransferkitError(f"unknown backbone '{name}'", f"choose one of: {known} (see `transferkit backbones`)")


def backbone_info(name: str) -> BackboneInfo:
    """What the registry says about a backbone (its family's entry for ``prefix:target`` names), unbuilt."""
    check_backbone_name(name)
    spec = self_taught_spec(name) if name not in _REGISTRY and ":" not in name else None
    if spec is not None:
        import dataclasses

        info = backbone_info(spec["base"]["name"])
        return dataclasses.replace(info, name=name, weights=f"self-taught: {name}", offline_available=True,
                                   description=f"{spec['base']['name']} after `transferkit pretrain`")
    entry = _REGISTRY.get(name) or _PREFIXES[name.split(":", 1)[0]]
    return entry.info()


def backbone_modality(name: str) -> str:
    """The input modality of a registered backbone, known without building it."""
    return backbone_info(name).modality


def check_backbone_modality(name: str, data_modality: str, modality: str | None = None) -> None:
    """Refuse backbone ``name`` for data of ``data_modality`` when it takes another input (``modality``: the built
    backbone's; default: the registry's, known without building it)."""
    modality = modality or backbone_modality(name)
    if modality != data_modality:
        from transferkit.errors import TransferkitError

        raise TransferkitError(f"backbone '{name}' takes {modality} input but the data is {data_modality}",
                               f"choose {'an' if data_modality[0] in 'aeiou' else 'a'} {data_modality} backbone "
                               "(`transferkit backbones`)")


def create_backbone(name: str, pretrained: bool = True, **options: Any) -> Backbone:
    """Build a backbone by registry name. ``pretrained=False`` builds the architecture only (random weights). The
    option ``frame`` (``fit --frame``) is every backbone's: :meth:`Backbone.set_frame`."""
    from transferkit.config import MAX_IMAGE_SIZE
    from transferkit.errors import check_count

    _load_modules()
    frame = options.pop("frame", "none")
    if options.get("image_size") is not None:  # every image backbone: refused before any tensor is allocated
        options["image_size"] = check_count("image_size", options["image_size"], 1, MAX_IMAGE_SIZE)
    if name in _REGISTRY:
        backbone = _REGISTRY[name].factory(pretrained=pretrained, **options)
    elif ":" in name and name.split(":", 1)[0] in _PREFIXES:
        prefix, target = name.split(":", 1)
        if not target:
            raise TransferkitError(f"backbone '{name}' names no model", f"write it as '{prefix}:<model name or path>'")
        backbone = _PREFIXES[prefix].factory(target, pretrained=pretrained, **options)
    elif (spec := self_taught_spec(name)) is not None:  # a `transferkit pretrain` folder
        from transferkit.backbones.self_taught import load_backbone_folder

        backbone = load_backbone_folder(spec, pretrained=pretrained, **options)  # sets is_pretrained itself
        backbone.set_frame(frame)
        return backbone
    else:
        check_backbone_name(name)
        raise AssertionError("unreachable")
    # True when the weights come from pretraining (a from-scratch architecture never has them).
    backbone.is_pretrained = bool(pretrained and getattr(backbone, "has_pretrained_weights", True))
    backbone.set_frame(frame)
    return backbone


def backbone_from_spec(spec: dict[str, Any] | BackboneSpec, pretrained: bool = False) -> Backbone:
    """Rebuild a backbone from its saved spec (architecture only unless ``pretrained``)."""
    if isinstance(spec, dict):
        spec = BackboneSpec(name=spec["name"], options=dict(spec.get("options", {})))
    return create_backbone(spec.name, pretrained=pretrained, **spec.options)


def list_backbones() -> list[BackboneInfo]:
    """Every registered backbone (prefix entries describe the family), in registration order."""
    _load_modules()
    return [entry.info() for entry in _REGISTRY.values()] + [entry.info() for entry in _PREFIXES.values()]


def default_backbone(modality: str) -> str:
    return {"image": "efficientnet_lite0", "text": "minilm"}.get(modality, "small_cnn")
