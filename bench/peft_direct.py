"""LoRA on EfficientNet-Lite0 with Hugging Face ``peft`` used directly in a plain PyTorch loop (no transferkit
model, strategy or engine): the reference that ``bench.bench_peft`` compares transferkit's ``lora`` strategy with.

It mirrors what a careful user would write, with the same choices the transferkit run makes so that the two
produce the same losses from the same seed, config and data: timm ``tf_efficientnet_lite0`` with the offline
weights, a new linear head, ``peft.get_peft_model`` with LoRA on the pointwise convolutions, batch-norm in eval
mode, AdamW (weight decay on weight tensors, not on biases; groups head / LoRA in that order), a cosine schedule per step, gradient clipping at 1.0,
batches in the order of ``torch.randperm`` seeded with ``seed + epoch``, and a validation pass after every
epoch. Only ``transferkit.backbones.efficientnet``'s weight-file lookup and key mapping are reused (they load
the weights; they do not train).
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(num_classes: int, r: int, alpha: float, seed: int) -> tuple[nn.Module, nn.Module, Any]:
    import timm
    from peft import LoraConfig, get_peft_model

    from transferkit.backbones.efficientnet import lukemelas_to_timm, weights_path

    seed_all(seed)
    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    state = torch.load(weights_path(0), map_location="cpu", weights_only=True)
    body.load_state_dict(lukemelas_to_timm(state, body))
    body.reset_classifier(0)
    seed_all(seed)
    head = nn.Linear(body.num_features, num_classes)
    for p in body.parameters():
        p.requires_grad_(False)
    body = get_peft_model(body, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                           target_modules=["conv_pw", "conv_pwl"], bias="none"))
    from timm.data import create_transform, resolve_data_config

    return body, head, (create_transform, resolve_data_config)


class Images(torch.utils.data.Dataset):
    def __init__(self, items: list[Any], labels: np.ndarray, transform: Any) -> None:
        self.items, self.labels, self.transform = items, labels, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.items[i]
        image = item if isinstance(item, Image.Image) else Image.fromarray(np.asarray(item))
        return self.transform(image.convert("RGB")), int(self.labels[i])


class EpochPermutation(torch.utils.data.Sampler):
    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def run(train_items: list[Any], train_labels: np.ndarray, val_items: list[Any], val_labels: np.ndarray,
        num_classes: int, image_size: int = 112, epochs: int = 2, batch_size: int = 16, lr: float = 1e-3,
        weight_decay: float = 0.01, r: int = 8, alpha: float = 16.0, seed: int = 0) -> dict[str, Any]:
    """Train; returns per-step losses, seconds between consecutive steps, and validation accuracy per epoch."""
    body, head, (create_transform, resolve_data_config) = build_model(num_classes, r, alpha, seed)
    config = resolve_data_config({}, model=body.base_model.model)
    transform = create_transform(input_size=(3, image_size, image_size), interpolation=config["interpolation"],
                                 mean=config["mean"], std=config["std"], crop_pct=config["crop_pct"])
    sampler = EpochPermutation(len(train_items), seed)
    train_loader = DataLoader(Images(train_items, train_labels, transform), batch_size=batch_size, sampler=sampler)
    val_loader = DataLoader(Images(val_items, val_labels, transform), batch_size=batch_size)

    # One optimiser group per (module, decayed or not): head weights, head bias, LoRA matrices. The order matters
    # for equal losses: the global gradient norm that clipping divides by is a float sum over the per-tensor
    # norms in this order, so another order changes its last bits and, from the second AdamW step on (the first
    # step is ~lr * sign(g), blind to a common scale), the losses drift apart by ~1e-4.
    def decayed(name: str, p: torch.Tensor) -> bool:
        return p.ndim > 1 and not name.endswith(".bias")

    head_params = list(head.named_parameters())
    lora_params = [(n, p) for n, p in body.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in head_params if decayed(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in head_params if not decayed(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in lora_params if decayed(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in lora_params if not decayed(n, p)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    trainable = head_params + lora_params
    total_steps = len(train_loader) * epochs

    def cosine(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))

    seed_all(seed)
    losses: list[float] = []
    step_seconds: list[float] = []
    accuracies: list[float] = []
    step = 0
    for epoch in range(epochs):
        sampler.epoch = epoch
        body.train()
        head.train()
        for module in body.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        last = None
        for images, labels in train_loader:
            for group in optimizer.param_groups:
                group["lr"] = lr * cosine(step)
            loss = nn.functional.cross_entropy(head(body(images)), labels)
            now = time.perf_counter()
            if last is not None:
                step_seconds.append(now - last)
            last = now
            losses.append(float(loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            optimizer.step()
            step += 1
        body.eval()
        head.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in val_loader:
                correct += int((head(body(images)).argmax(-1) == labels).sum())
        accuracies.append(correct / len(val_items))
    return {"losses": losses, "step_seconds": step_seconds, "val_accuracy": accuracies,
            "trainable_params": sum(p.numel() for _, p in trainable)}
