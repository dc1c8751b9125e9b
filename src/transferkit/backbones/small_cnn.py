"""``small_cnn``: a from-scratch CNN for low-resolution images (digits, Fashion-MNIST): the no-transfer baseline.

Three stages of [conv3x3-BN-ReLU, conv3x3-BN-ReLU, 2x2 max-pool] with widths w, 2w, 4w (a VGG-style
design, Simonyan & Zisserman 2015, with batch norm, Ioffe & Szegedy 2015), then global average pooling,
dropout and a linear projection + ReLU to ``feature_dim``. There are no pretrained weights: ``pretrained=True``
builds the same random initialisation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torchvision import transforms

from transferkit.backbones import register_backbone
from transferkit.backbones.base import (
    Backbone,
    BackboneInfo,
    BackboneSpec,
    reject_unknown_options,
)
from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)

_SHIFT_FRACTION = 0.1  # augmentation: random shift of up to 10% of the side (about 3 px at 28 px)


def _conv_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *conv_bn_relu(in_channels, out_channels), *conv_bn_relu(out_channels, out_channels), nn.MaxPool2d(2)
    )


class SmallCNN(Backbone):
    modality = "image"
    has_pretrained_weights = False

    def __init__(
        self,
        in_chans: int = 1,
        image_size: int = 28,
        width: int = 32,
        feature_dim: int = 128,
        dropout: float = 0.2,
        augment: bool = True,
    ) -> None:
        super().__init__()
        if in_chans not in (1, 3):
            raise TransferkitError(f"small_cnn in_chans={in_chans} is not supported", "use in_chans=1 or 3")
        if image_size < 8:
            raise TransferkitError(f"small_cnn image_size={image_size} is too small", "use image_size >= 8")
        self.spec = BackboneSpec(
            "small_cnn",
            {
                "in_chans": in_chans,
                "image_size": image_size,
                "width": width,
                "feature_dim": feature_dim,
                "dropout": dropout,
                "augment": augment,
            },
        )
        self.feature_dim = feature_dim
        self.image_mode = "L" if in_chans == 1 else "RGB"
        self.image_size = image_size
        widths = [in_chans, width, 2 * width, 4 * width]
        self.stages = nn.ModuleList(_conv_stage(widths[i], widths[i + 1]) for i in range(3))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(widths[-1], feature_dim),
            nn.ReLU(inplace=True),
        )
        normalise = [transforms.ToTensor(), transforms.Normalize([0.5] * in_chans, [0.5] * in_chans)]
        resize = transforms.Resize((image_size, image_size))
        self._eval_transform = transforms.Compose([resize, *normalise])
        shift = transforms.RandomAffine(degrees=0, translate=(_SHIFT_FRACTION, _SHIFT_FRACTION))
        self._train_transform = (
            transforms.Compose([resize, shift, *normalise]) if augment else self._eval_transform
        )

    def forward_features(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def layer_groups(self) -> list[nn.Module]:
        return [*self.stages, self.head]

    def blocks(self) -> list[nn.Module]:
        return list(self.stages)

    def preprocess(self, item: Any, train: bool = False) -> torch.Tensor:
        transform = self._train_transform if train else self._eval_transform
        return transform(self.input_image(item, self.image_mode))

    def preprocess_signature(self) -> str:
        return f"small_cnn|{self.image_mode}|size={self.image_size}|bilinear|mean=0.5|std=0.5{self.frame_signature()}"


def _info() -> BackboneInfo:
    return BackboneInfo(
        name="small_cnn",
        modality="image",
        params=SmallCNN().num_parameters(),
        feature_dim=128,
        weights="none (random init)",
        offline_available=True,
        description="from-scratch 3-stage CNN for small grey images (default 28 px); the no-transfer baseline",
    )


@register_backbone("small_cnn", _info)
def create_small_cnn(pretrained: bool = True, **options: Any) -> SmallCNN:
    """Random initialisation whatever ``pretrained`` says (there are no pretrained weights)."""
    reject_unknown_options(
        "small_cnn", options, ["in_chans", "image_size", "width", "feature_dim", "dropout", "augment"]
    )
    if pretrained:
        logger.info("small_cnn has no pretrained weights; building a random initialisation")
    return SmallCNN(**options)
