"""Feature matching on paired recordings (de Vos et al., "Feature matching as improved transfer learning
technique for wearable EEG").

Two pipelines see the same events: the *source* pipeline (backbone + head trained on labelled source data)
and a *target* pipeline (a copy of the source backbone) for the target sensor. On pairs ``(x_s, x_t)`` of the
same event the target backbone is trained to reproduce the frozen source pipeline's latent features,
``min ||f_t(x_t) - f_s(x_s)||^2``; the source head is then shared. No target labels are needed, only pairs.

Paired demo data (``python -m transferkit.adaptation.feature_matching OUT``): Fashion-MNIST beside a
degraded-sensor copy of the same images (Gaussian blur radius 1, contrast halved, Gaussian noise sigma 25
grey levels), written as ``OUT/source/<class>/`` (clean, labelled), ``OUT/pairs/{source,target}/`` plus
``OUT/pairs.csv`` (clean, degraded; disjoint from the labelled source images), ``OUT/target_test/<class>/``
(degraded copies of the official test images, labelled: for ``evaluate``) and ``OUT/target_train/<class>/``
(degraded copies of the labelled source images: the labelled target set of a target-only baseline). All images
are 28x28 in both domains, so no resizing or framing is needed (``--frame none``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.adaptation.base import AdaptationMethod, register_adaptation
from transferkit.data.base import ItemSource, LabeledData
from transferkit.engine.objectives import Objective
from transferkit.errors import TransferkitError

if TYPE_CHECKING:
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainResult
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy

logger = logging.getLogger(__name__)


class _ImageFiles:
    """Picklable ``i -> PIL image`` over absolute paths."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __call__(self, i: int) -> Any:
        from transferkit.data.images import open_image

        return open_image(self.paths[i])


class _Digest:
    def __init__(self, value: bytes) -> None:
        self.value = value

    def __call__(self) -> bytes:
        return self.value


def _files_as_data(paths: list[Path], name: str) -> LabeledData:
    h = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return LabeledData(items=ItemSource(len(paths), _ImageFiles(paths), _Digest(h.digest())),
                       labels=np.full(len(paths), -1), class_names=[], modality="image",
                       ids=[str(p) for p in paths], name=name)


def read_pairs(csv_path: str | Path) -> tuple[LabeledData, LabeledData]:
    """(source items, target items) of a ``source path,target path`` CSV (a header row is allowed; paths are
    relative to the CSV's folder). Framed, under ``--frame``, by the backbone that reads them."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise TransferkitError(f"pairs file '{csv_path}' does not exist", "pass a CSV of source path,target path")
    with open(csv_path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(cell.strip() for cell in r)]
    if rows and not (csv_path.parent / rows[0][0].strip()).is_file():
        rows = rows[1:]  # header
    if not rows:
        raise TransferkitError(f"pairs file '{csv_path}' holds no pairs", "write one 'source,target' row per pair")
    source, target = [], []
    for number, row in enumerate(rows, 1):
        if len(row) < 2:
            raise TransferkitError(f"row {number} of '{csv_path}' has {len(row)} column(s)",
                                   "write two paths per row: source,target")
        for path, out in ((csv_path.parent / row[0].strip(), source), (csv_path.parent / row[1].strip(), target)):
            if not path.is_file():
                raise TransferkitError(f"'{path}' (row {number} of '{csv_path}') does not exist", "fix the pairs file")
            out.append(path)
    return _files_as_data(source, "pairs/source"), _files_as_data(target, "pairs/target")


class FeatureMatchingObjective(Objective):
    """``mean ||f_t(x_t) - f_s(x_s)||^2`` with the source features precomputed (looked up by batch index)."""

    name = "feature_matching"

    def __init__(self, source_features: np.ndarray, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.register_buffer("source_features", torch.as_tensor(source_features, dtype=torch.float32),
                             persistent=False)

    def forward(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        reference = self.source_features.to(outputs.features.device)[batch["index"]]
        return F.mse_loss(outputs.features, reference)


def match_features(model: TransferModel, pairs: tuple[LabeledData, LabeledData],
                   context: RunContext) -> list[dict[str, Any]]:
    """Train ``model.backbone`` (in place) so that its features of the target items match the features the
    current (source) backbone gives the paired source items; heads stay fixed. Returns the history rows."""
    from transferkit.engine.features import extract_features
    from transferkit.engine.trainer import Trainer

    source_items, target_items = pairs
    reference = extract_features(model.backbone, source_items, batch_size=max(32, context.train.batch_size),
                                 cache_dir=None, progress=context.progress)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    frozen_norm = model.freeze_norm_stats
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    for p in model.heads.parameters():
        p.requires_grad_(False)
    model.freeze_norm_stats = False  # the target pipeline learns its own normalisation statistics
    try:
        config = dataclasses.replace(context.train, early_stopping=0)
        trainer = Trainer(model, [FeatureMatchingObjective(reference)], config,
                          param_groups=[{"params": list(model.backbone.parameters()), "lr": config.lr,
                                         "name": "target_backbone"}],
                          progress=context.progress)
        result = trainer.fit(context.loader(target_items, model.backbone, train=False))
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.freeze_norm_stats = frozen_norm
    return [{**row, "stage": "feature-matching"} for row in result.history]


# --- paired demo data ------------------------------------------------------------------------------------------


@register_adaptation
class FeatureMatching(AdaptationMethod):
    """de Vos et al.: the trained source pipeline stays the reference; a copy becomes the target pipeline."""

    name = "feature-matching"
    description = "feature matching on paired source/target images (de Vos et al.)"
    needs = "pairs"

    def train(self, strategy: Strategy, model: TransferModel, context: RunContext,
              target: LabeledData | None) -> TrainResult:
        assert self.config.pairs is not None
        result = strategy.train(model, context)
        pairs = read_pairs(self.config.pairs)
        history = match_features(model, pairs, context)
        context.notes.append(f"feature matching on {len(pairs[0])} source/target pairs: the target pipeline "
                             "(backbone copy) was trained to reproduce the source pipeline's features; head shared")
        result.history.extend(history)
        return result


def degrade(image: np.ndarray, rng: np.random.Generator, blur: float = 1.0, contrast: float = 0.5,
            noise: float = 25.0) -> np.ndarray:
    """A degraded-sensor copy of a grey uint8 image: Gaussian blur, contrast loss around mid-grey, noise."""
    from PIL import Image, ImageFilter

    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    dimmed = 128.0 + contrast * (blurred - 128.0)
    return np.clip(dimmed + rng.normal(0.0, noise, size=image.shape), 0, 255).astype(np.uint8)


def make_fashion_pairs(out: str | Path, n_source: int = 2000, n_pairs: int = 2000, n_test: int = 2000,
                       seed: int = 0) -> Path:
    """Write the paired Fashion-MNIST / degraded-sensor dataset described in the module docstring."""
    from PIL import Image

    from transferkit.data.builtin import builtin_arrays

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TransferkitError(f"'{out}' exists and is not empty", "choose a new folder")
    images, labels, class_names, test_index = builtin_arrays("fashion-mnist")
    rng = np.random.default_rng(seed)
    train_index = np.setdiff1d(np.arange(len(labels)), test_index)
    chosen = rng.permutation(train_index)[: n_source + n_pairs]
    folders = [name.replace("/", "-") for name in class_names]
    for i in chosen[:n_source]:
        for part, image in (("source", images[i]), ("target_train", degrade(images[i], rng))):
            path = out / part / folders[labels[i]] / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    (out / "pairs" / "source").mkdir(parents=True, exist_ok=True)
    (out / "pairs" / "target").mkdir(parents=True, exist_ok=True)
    with open(out / "pairs.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "target"])
        for i in chosen[n_source:]:
            Image.fromarray(images[i]).save(out / "pairs" / "source" / f"{i}.png")
            Image.fromarray(degrade(images[i], rng)).save(out / "pairs" / "target" / f"{i}.png")
            writer.writerow([f"pairs/source/{i}.png", f"pairs/target/{i}.png"])
    for i in np.random.default_rng(seed + 1).permutation(test_index)[:n_test]:
        path = out / "target_test" / folders[labels[i]] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(degrade(images[i], rng)).save(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the paired Fashion-MNIST / degraded-sensor dataset.")
    parser.add_argument("out")
    parser.add_argument("--n-source", type=int, default=2000)
    parser.add_argument("--n-pairs", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    path = make_fashion_pairs(args.out, args.n_source, args.n_pairs, args.n_test, args.seed)
    logger.info("paired dataset written to %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
