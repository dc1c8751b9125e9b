"""Any timm image model as a backbone: ``timm:<model_name>`` (R. Wightman, PyTorch Image Models).

The model is built with ``num_classes=0`` so ``forward_head(forward_features(x), pre_logits=True)`` is the
pooled embedding. Layer groups come from timm's own ``group_matcher(coarse=True)`` (the stem, then each stage;
the same grouping timm uses for layer-wise learning-rate decay); preprocessing from
``timm.data.resolve_data_config`` with the input size replaced by the ``image_size`` option.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.models._manipulate import group_with_matcher
from torch import nn
from torchvision import transforms

from transferkit.backbones import register_prefix
from transferkit.backbones.base import (
    Backbone,
    BackboneInfo,
    BackboneSpec,
    group_from_parameter_names,
)
from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)


def image_transform(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    interpolation: str,
    crop_pct: float,
    train: bool,
) -> Callable[[Any], torch.Tensor]:
    """Eval: timm's resize to ``floor(image_size / crop_pct)`` + centre crop + normalise.

    Train: light augmentation for small datasets: random resized crop (scale 0.7-1), horizontal flip, mild
    colour jitter (brightness/contrast/saturation 0.2), then the same normalisation.
    """
    if not train:
        return create_transform(
            input_size=(len(mean), image_size, image_size),
            interpolation=interpolation,
            mean=mean,
            std=std,
            crop_pct=crop_pct,
        )
    mode = transforms.InterpolationMode(interpolation)
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.7, 1.0), interpolation=mode),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def grid_pool(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """``feature_map`` (N, C, H, W) averaged over ``grid`` x ``grid`` cells (the cells of ``adaptive_avg_pool2d``:
    rows floor(i H / grid) to ceil((i + 1) H / grid), overlapping when ``grid`` does not divide H), flattened to
    (N, grid * grid * C) with the channels of one cell together. Static slices, so ONNX export traces it.

    The ceiling is ``(a + grid - 1) // grid``, not ``-(-a // grid)``: the ONNX exporter traces the cell bounds from
    the map's shape and divides integers by truncation (``floordiv`` becomes ``Div``), which rounds a negative
    quotient up, so the graph's cells ended one row / column short whenever ``grid`` does not divide the map
    (auto's 3 x 3 grids on 4 x 4 or 7 x 7 maps). With non-negative operands floor and truncation agree."""
    if grid == 1:
        return feature_map.mean(dim=(2, 3))
    height, width = feature_map.shape[-2:]
    rows = [(i * height // grid, ((i + 1) * height + grid - 1) // grid) for i in range(grid)]
    cols = [(j * width // grid, ((j + 1) * width + grid - 1) // grid) for j in range(grid)]
    return torch.cat([feature_map[:, :, r0:r1, c0:c1].mean(dim=(2, 3)) for r0, r1 in rows for c0, c1 in cols], dim=1)


class TimmBackbone(Backbone):
    """A timm model without classifier; the embedding is its pooled pre-logits features."""

    modality = "image"

    def __init__(
        self,
        model: nn.Module,
        spec: BackboneSpec,
        image_size: int | None,
        augment: bool,
        in_chans: int = 3,
        feature_stage: int | None = None,
        pool_stages: Sequence[int] | None = None,
        pool_grid: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        self.feature_stage = None
        self.pool_stages: tuple[int, ...] = ()
        if feature_stage is not None:  # embeddings from an earlier depth: pooled output of that feature stage
            self.feature_stage = self._stage_index(feature_stage, "feature_stage")
            self.feature_dim = self._stage_channels()[self.feature_stage]
            spec.options["feature_stage"] = self.feature_stage
        if pool_stages:  # Head2Toe-style: pooled earlier stages concatenated to the final embedding
            if feature_stage is not None:
                raise TransferkitError("feature_stage and pool_stages cannot be combined", "drop one of them")
            self.pool_stages = tuple(sorted({self._stage_index(int(s), "pool_stages") for s in pool_stages}))
            self.feature_dim += sum(self._stage_channels()[s] for s in self.pool_stages)
            spec.options["pool_stages"] = list(self.pool_stages)
        config = resolve_data_config({}, model=model)
        if in_chans not in (1, 3):
            raise TransferkitError(
                f"backbone '{spec.name}' expects {in_chans} input channels", "use in_chans=1 or in_chans=3"
            )
        self.image_size = int(image_size or config["input_size"][-1])
        self.pool_grid: tuple[int, ...] = ()  # empty: global averages
        self.stage_grids: tuple[int, ...] = ()  # with pool_grid: the grid of each pooled stage, then of the final map
        grids = [pool_grid] if isinstance(pool_grid, int) else list(pool_grid or [])
        if any(int(g) != 1 for g in grids):
            self._set_pool_grid([int(g) for g in grids], in_chans)
            spec.options["pool_grid"] = list(self.pool_grid)
        mean, std = tuple(config["mean"]), tuple(config["std"])
        if len(mean) != in_chans:  # grey input to an RGB-normalised model: average the statistics
            mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
        self.image_mode = "L" if in_chans == 1 else "RGB"
        self.augment = augment
        self.normalization = {
            "mean": mean,
            "std": std,
            "interpolation": config["interpolation"],
            "crop_pct": float(config["crop_pct"]),
        }
        self._eval_transform = image_transform(self.image_size, train=False, **self.normalization)
        self._train_transform = image_transform(self.image_size, train=augment, **self.normalization)

    def _set_pool_grid(self, grids: list[int], in_chans: int) -> None:
        """Average each pooled map over a grid of cells instead of globally (one level of a spatial pyramid; Lazebnik
        et al. 2006), so that a probe sees where in the image a feature is: ``grids`` is one grid for every map, or
        one per map (the ``pool_stages`` in order, then the final map), each capped at its map's size. The cells'
        averages are concatenated, the channels of one cell together."""
        maps_count = len(self.pool_stages) + 1
        if any(g < 1 for g in grids) or len(grids) not in (1, maps_count):
            raise TransferkitError(f"pool_grid {grids} does not fit {maps_count} pooled map(s)",
                                   f"give one grid (>= 1) for every map, or {maps_count}: the pooled stages in order, "
                                   "then the final map")
        if self.feature_stage is not None:
            raise TransferkitError("feature_stage and pool_grid cannot be combined", "drop one of them")
        self.pool_grid = tuple(grids)
        was_training = self.model.training
        self.model.eval()  # the one probe pass must not move batch-norm statistics
        with torch.no_grad():
            final, maps = self._final_and_stage_maps(torch.zeros(1, in_chans, self.image_size, self.image_size))
        self.model.train(was_training)
        if final.dim() != 4 or any(m.dim() != 4 for m in maps):
            raise TransferkitError(f"pool_grid needs feature maps, and '{self.spec.name}' returns tokens",
                                   "drop pool_grid (it applies to convolutional backbones such as EfficientNet)")
        wanted = grids * maps_count if len(grids) == 1 else grids
        self.stage_grids = tuple(min(g, m.shape[-1]) for g, m in zip(wanted, [*maps, final]))
        channels = [m.shape[1] for m in maps] + [final.shape[1]]
        self.feature_dim = sum(c * g * g for c, g in zip(channels, self.stage_grids))

    def _final_and_stage_maps(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final feature map and the maps of ``pool_stages``, from one pass."""
        if self.pool_stages:
            final, maps = self.model.forward_intermediates(inputs, indices=list(self.pool_stages))
            return final, list(maps)
        return self.model.forward_features(inputs), []

    def _stage_channels(self) -> list[int]:
        return [int(info["num_chs"]) for info in getattr(self.model, "feature_info", [])]

    def _stage_index(self, stage: int, option: str) -> int:
        """``stage`` (negative counts from the end) as an index into timm's feature stages, validated."""
        stages = self._stage_channels()
        if not stages or not hasattr(self.model, "forward_intermediates"):
            raise TransferkitError(f"backbone '{self.spec.name}' cannot take features from an earlier stage",
                                   f"drop {option}")
        if not -len(stages) <= stage < len(stages):
            raise TransferkitError(f"{option} {stage} is out of range for '{self.spec.name}'",
                                   f"use 0..{len(stages) - 1} (channels per stage: {stages})")
        return stage % len(stages)

    def forward_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """The pooled pre-logits embedding; with ``feature_stage`` the global average of that stage's feature map
        instead; with ``pool_stages`` the global averages of those stages followed by the final embedding, from one
        pass (Evci et al. 2022, "Head2Toe": intermediate representations are often more transferable to a domain far
        from the pretraining data than the last layer)."""
        if self.feature_stage is not None:
            (feature_map,) = self.model.forward_intermediates(inputs, indices=[self.feature_stage],
                                                             intermediates_only=True, stop_early=True)
            return feature_map.mean(dim=(2, 3))
        if self.pool_grid:
            final, maps = self._final_and_stage_maps(inputs)
            return torch.cat([grid_pool(m, g) for m, g in zip([*maps, final], self.stage_grids)], dim=1)
        if self.pool_stages:
            final, maps = self.model.forward_intermediates(inputs, indices=list(self.pool_stages))
            pooled = [feature_map.mean(dim=(2, 3)) for feature_map in maps]
            return torch.cat([*pooled, self.model.forward_head(final, pre_logits=True)], dim=1)
        return self.model.forward_head(self.model.forward_features(inputs), pre_logits=True)

    def _groups(self, coarse: bool) -> list[nn.Module]:
        named = list(self.model.named_parameters())
        if hasattr(self.model, "group_matcher"):
            by_group = group_with_matcher(named, self.model.group_matcher(coarse=coarse))
            name_lists = [by_group[k] for k in sorted(by_group)]
        else:  # every top-level child that holds parameters is one group
            name_lists = []
            for child, _ in self.model.named_children():
                names = [n for n, _ in named if n.startswith(child + ".")]
                if names:
                    name_lists.append(names)
        return [group_from_parameter_names(self.model, names) for names in name_lists]

    def layer_groups(self) -> list[nn.Module]:
        return self._groups(coarse=True)

    def blocks(self) -> list[nn.Module]:
        return self._groups(coarse=False)

    def suggested_lora_targets(self) -> list[str]:
        """``qkv`` for vision transformers, else the names of the pointwise (1x1, ungrouped) convolutions, else
        of all ungrouped convolutions (peft LoRA on grouped / depthwise convs needs rank % groups == 0)."""
        modules = {n.rsplit(".", 1)[-1]: m for n, m in self.model.named_modules() if "." in n}
        if isinstance(modules.get("qkv"), nn.Linear):
            return ["qkv"]
        convs = {
            name: m
            for name, m in self.model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and not name.rsplit(".", 1)[-1].isdigit()
        }
        pointwise = {n.rsplit(".", 1)[-1] for n, m in convs.items() if m.kernel_size == (1, 1)}
        return sorted(pointwise or {n.rsplit(".", 1)[-1] for n in convs})

    def preprocess(self, item: Any, train: bool = False) -> torch.Tensor:
        transform = self._train_transform if train else self._eval_transform
        return transform(self.input_image(item, self.image_mode))

    def preprocess_signature(self) -> str:
        norm = self.normalization
        return (
            f"{self.spec.name}|{self.image_mode}|size={self.image_size}|{norm['interpolation']}"
            f"|crop_pct={norm['crop_pct']}|mean={norm['mean']}|std={norm['std']}{self.frame_signature()}"
            + (f"|stage={self.feature_stage}" if self.feature_stage is not None else "")
            + (f"|pool={','.join(map(str, self.pool_stages))}" if self.pool_stages else "")
            + (f"|grid={','.join(map(str, self.stage_grids))}" if self.pool_grid else "")
        )


def _timm_info() -> BackboneInfo:
    return BackboneInfo(
        name="timm:<model_name>",
        modality="image",
        params=None,
        feature_dim=None,
        weights="timm / Hugging Face hub (needs a network), or a local file via checkpoint_path=",
        offline_available=False,
        description="any timm image model; offline with pretrained=False or checkpoint_path=<weights file>",
    )


@register_prefix("timm", _timm_info)
def create_timm_backbone(
    target: str,
    pretrained: bool,
    image_size: int | None = None,
    augment: bool = True,
    checkpoint_path: str | None = None,
    feature_stage: int | None = None,
    pool_stages: Sequence[int] | None = None,
    pool_grid: int | Sequence[int] | None = None,
    **timm_kwargs: Any,
) -> TimmBackbone:
    """``timm.create_model(target, pretrained=..., num_classes=0, **timm_kwargs)``.

    ``checkpoint_path`` loads local weights through timm's pretrained path (so a 1000-class classifier in the
    file is dropped cleanly); it is ignored when ``pretrained`` is False (a saved run rebuilds the architecture
    and loads its own state dict).
    """
    if not timm.is_model(target):
        raise TransferkitError(
            f"timm has no model '{target}'",
            'list the names with python -c "import timm; print(timm.list_models())"',
        )
    kwargs: dict[str, Any] = {"num_classes": 0, **timm_kwargs}
    if pretrained and checkpoint_path is not None:
        if not Path(checkpoint_path).is_file():
            raise TransferkitError(
                f"checkpoint_path '{checkpoint_path}' is not a file", "pass a local weights file"
            )
        kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint_path)}
    try:
        model = timm.create_model(target, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise TransferkitError(
            f"timm model '{target}' rejected an option: {exc}", "remove or rename it"
        ) from exc
    except Exception as exc:  # hub download / file format problems surface here
        if not pretrained:
            raise
        raise TransferkitError(
            f"could not load pretrained weights for timm model '{target}': {exc}",
            "connect to the network, pass checkpoint_path=<local file>, or use pretrained=False",
        ) from exc
    options: dict[str, Any] = {"augment": augment, **timm_kwargs}
    if checkpoint_path is not None:
        options["checkpoint_path"] = str(checkpoint_path)
    in_chans = int(timm_kwargs.get("in_chans", 3))
    backbone = TimmBackbone(model, BackboneSpec(f"timm:{target}", options), image_size, augment, in_chans,
                            feature_stage, pool_stages, pool_grid)
    backbone.spec.options["image_size"] = backbone.image_size
    return backbone
