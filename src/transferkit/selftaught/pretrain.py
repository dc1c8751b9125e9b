"""Self-taught learning: continued self-supervised pretraining of a pretrained backbone on unlabelled in-domain data
(the supervised task is made from the data itself), written as a backbone folder that ``--backbone`` accepts.

* Images: SimCLR (Chen et al. 2020): two views of every item (:func:`view_transform`: random resized crop of
  ``--crop-scale``..1 of the area, flip, colour jitter that on grey images acts on brightness and contrast only),
  a 2-layer MLP projection head (learning rate ``--head-lr-scale`` x ``--lr``: it starts random), NT-Xent loss
  (``engine.objectives.ContrastiveObjective``); the head is discarded afterwards. Batch norm runs in training mode,
  so its statistics move to the unlabelled domain in every layer; ``--train-groups N`` trains only the top N
  layer groups (cheaper steps on CPU, and the lower layers keep their pretrained filters).
* Images, ``--objective scan`` (for clustering): SCAN (Van Gansbeke et al. 2020): every item's nearest
  neighbours are mined once in the starting backbone's embedding, then the backbone and a clustering head
  ``Linear(width, clusters)`` learn to give an item and a random one of its neighbours the same confident cluster,
  with an entropy term that keeps every cluster in use (``engine.objectives.NeighbourConsistencyObjective``). By
  default only the top layer group trains (the head convolution of EfficientNet-Lite), so what lies below it is
  computed once and cached (backbones that split between groups; float16, memory-mapped from a scratch file in
  the output's stage folder, so a pool larger than the memory fits), and an epoch costs a fraction of a forward
  pass. The clustering head and the cache are discarded.
* Text: masked-language modelling (Devlin et al. 2019) through transformers: ``AutoModelForMaskedLM`` around the
  backbone's encoder, masking by ``DataCollatorForLanguageModeling`` (tokenizer-based: no nltk data needed);
  the loss is the model's own (``engine.objectives.ModelLossObjective``). The MLM head is discarded afterwards.

Both run in the one engine (``engine.trainer.Trainer``: seeded, checkpointed every epoch, ``--resume``).
The output folder (kind ``pretrain``) holds ``weights.safetensors`` (the backbone's state dict) and
``backbone.json``: the base backbone's spec and the provenance (data, objective, epochs, seed, losses).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferkit.backbones.base import keep_batch_norm_statistics
from transferkit.data.base import LabeledData
from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)


BATCH_NORM_MODES = ("frozen", "train")
IMAGE_OBJECTIVES = ("simclr", "scan")
TEXT_OBJECTIVES = ("masked-lm",)
#: the defaults of each objective (an unset --lr, --epochs, --head-lr-scale, --train-groups takes these); measured
#: on Fashion-MNIST (simclr: the probe; scan: clustering NMI on held-out images, bench/results/unlabelled.md)
OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "simclr": {"lr": 1e-4, "epochs": 5, "head_lr_scale": 10.0, "train_groups": None},
    "scan": {"lr": 3e-3, "epochs": 10, "head_lr_scale": 1.0, "train_groups": 1},
    "masked-lm": {"lr": 1e-4, "epochs": 5, "head_lr_scale": 10.0, "train_groups": None},
}


@dataclass
class PretrainConfig:
    """What to pretrain on, from which backbone, for how long, and where to write the new backbone."""

    data: str = field(default="", metadata={"help": "Unlabelled in-domain data: a folder of images or a "
                                           ".txt (one text per line) or .csv/.tsv/.jsonl file of texts."})
    backbone: str | None = field(default=None, metadata={"help": "The backbone to continue from (registry name or "
                                 "an earlier pretrain folder); default efficientnet_lite0 / minilm."})
    out: str = field(default="", metadata={"help": "Backbone folder to write (use it as --backbone OUT)."})
    objective: str | None = field(default=None, metadata={"help": "Images: simclr (default; two-view contrastive: "
                                  "a better backbone for the probe) or scan (neighbour-consistency clustering: a "
                                  "better backbone for `cluster`). Text: masked-lm."})
    epochs: int | None = field(default=None, metadata={"help": "Passes over the unlabelled data (default: simclr 5, "
                               "scan 10, masked-lm 5)."})
    batch_size: int = field(default=64, metadata={"help": "Items per step (images: 2 views each; larger batches "
                                                  "give the contrastive loss more negatives)."})
    lr: float | None = field(default=None, metadata={"help": "AdamW learning rate (default: simclr and masked-lm "
                             "1e-4, small: the whole backbone is pretrained; scan 3e-3: only the top group trains)."})
    temperature: float = field(default=0.2, metadata={"help": "Images: NT-Xent temperature."})
    crop_scale: float = field(default=0.3, metadata={"help": "Images: smallest area share of a view's random "
                              "resized crop (SimCLR's views differ mostly by cropping; 1 = no cropping)."})
    head_lr_scale: float | None = field(default=None, metadata={"help": "Images: learning rate of the new projection "
                                        "(simclr) or clustering (scan) head as a multiple of --lr (default: simclr 10, "
                                        "the backbone stays close to its pretrained weights; scan 1)."})
    projection_dim: int = field(default=128, metadata={"help": "Images: output width of the projection head."})
    train_groups: int | None = field(default=None, metadata={"help": "Train only the top N layer groups of the "
                                     "backbone (the rest frozen: cheaper steps, closer to the pretrained weights). "
                                     "Default: simclr and masked-lm all, scan 1 (with 1, what lies below the top "
                                     "group is computed once and cached)."})
    clusters: str = field(default="auto", metadata={"help": "scan: size of the clustering head, or auto: the k "
                          "`cluster --k auto` picks on the starting backbone's embedding of the data."})
    heads: int = field(default=5, metadata={"help": "scan: clustering heads trained together on the backbone (mean "
                       "of their losses; SCAN trains several). More than one makes the new embedding depend less on "
                       "one head's random start: on held-out Fashion-MNIST images 5 heads gave NMI 0.707-0.710 over 3 "
                       "seeds against 0.689-0.701 for 1 (bench/results/unlabelled.md)."})
    neighbours: int = field(default=20, metadata={"help": "scan: nearest neighbours mined per item (in the starting "
                            "backbone's embedding, cosine); each step pairs an item with one of them."})
    entropy_weight: float = field(default=2.0, metadata={"help": "scan: weight of the entropy of the mean cluster "
                                  "assignment (keeps every cluster in use). SCAN's 5 was below 2 on Fashion-MNIST "
                                  "training and test images and MNIST digits (bench/results/unlabelled.md)."})
    batch_norm: str = field(default="frozen", metadata={"help": "Images: 'frozen' keeps every batch-norm layer's "
                            "running statistics (its scale and shift still learn), 'train' re-estimates them on the "
                            "augmented views. Measured on Fashion-MNIST (5,000 images, 1 epoch): train lost 3.7 "
                            "points of probe accuracy, frozen gained 0.8 (5 epochs: 2.1; BENCHMARKS.md)."})
    mask_probability: float = field(default=0.15, metadata={"help": "Text: share of tokens masked."})
    text_column: str | None = field(default=None, metadata={"help": "Text column of a .csv/.jsonl file."})
    image_size: int | None = field(default=None, metadata={"help": "Input resolution (default: the backbone's)."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and augmentation."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted pretrain from its checkpoint."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished pretrain output in --out."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def validate(self) -> None:
        from transferkit.errors import check_count, check_number

        if not self.data:
            raise TransferkitError("no data given", "pass --data FOLDER_OR_TEXT_FILE")
        if not self.out:
            raise TransferkitError("no --out given", "pass --out BACKBONE_DIR")
        if self.objective is not None and self.objective not in (*IMAGE_OBJECTIVES, *TEXT_OBJECTIVES):
            raise TransferkitError(f"invalid --objective '{self.objective}'",
                                   f"choose one of {', '.join((*IMAGE_OBJECTIVES, *TEXT_OBJECTIVES))}")
        if self.epochs is not None:
            check_count("--epochs", self.epochs, 1)
        check_count("--batch-size", self.batch_size, 2)
        check_count("--neighbours", self.neighbours, 1)
        check_count("--heads", self.heads, 1)
        check_number("--entropy-weight", self.entropy_weight, 0, None)
        if self.clusters != "auto":
            try:
                clusters = int(self.clusters)
            except ValueError:
                clusters = 0
            if clusters < 2:
                raise TransferkitError(f"invalid --clusters '{self.clusters}'", "pass an integer >= 2 or auto")
        check_count("--projection-dim", self.projection_dim, 1)
        if self.train_groups is not None:
            check_count("--train-groups", self.train_groups, 1)
        if self.lr is not None:
            check_number("--lr", self.lr, 0, None, low_open=True)
        check_number("--temperature", self.temperature, 0, None, low_open=True)
        check_number("--crop-scale", self.crop_scale, 0, 1, low_open=True)
        if self.head_lr_scale is not None:
            check_number("--head-lr-scale", self.head_lr_scale, 0, None, low_open=True)
        check_number("--mask-probability", self.mask_probability, 0, 1, low_open=True, high_open=True)
        if self.batch_norm not in BATCH_NORM_MODES:
            raise TransferkitError(f"invalid --batch-norm '{self.batch_norm}'",
                                   f"choose one of {', '.join(BATCH_NORM_MODES)}")

    def resolve(self, modality: str, items: int) -> None:
        """Fill the objective (by ``modality``) and its defaults (:data:`OBJECTIVE_DEFAULTS`) where unset; refuse an
        objective of the other modality and more ``--clusters`` than ``items``."""
        allowed = IMAGE_OBJECTIVES if modality == "image" else TEXT_OBJECTIVES
        if self.objective is None:
            self.objective = allowed[0]
        if self.objective not in allowed:
            raise TransferkitError(f"--objective {self.objective} does not apply to {modality} data",
                                   f"use one of {', '.join(allowed)}")
        if self.clusters != "auto" and int(self.clusters) > items:
            raise TransferkitError(f"--clusters {self.clusters} is larger than the number of items ({items})",
                                   f"pass --clusters {items} or less, or auto")
        for key, value in OBJECTIVE_DEFAULTS[self.objective].items():
            if getattr(self, key) is None:
                setattr(self, key, value)


@dataclass
class PretrainResult:
    path: Path
    summary: dict[str, Any]


# --- images: two views, projection head ---------------------------------------------------------------------------


def view_transform(backbone: Any, crop_scale: float) -> Any:
    """SimCLR's view augmentation (Chen et al. 2020, appendix A) in the backbone's own resolution, interpolation and
    normalisation: random resized crop (area ``crop_scale``..1), horizontal flip, colour jitter (brightness,
    contrast, saturation 0.4, hue 0.1; p 0.8) and random greyscale (p 0.2). On grey images saturation, hue and
    greyscale are no-ops, so only brightness and contrast act (no colour signal to be invariant to). No blur: at
    the small resolutions used on CPU it erases the few pixels of a 28 px source. Backbones without timm-style
    ``normalization`` (e.g. ``small_cnn``) use their own training augmentation."""
    normalization = getattr(backbone, "normalization", None)
    if not isinstance(normalization, dict) or not hasattr(backbone, "image_size"):
        return None
    from torchvision import transforms

    mode = transforms.InterpolationMode(normalization["interpolation"])
    return transforms.Compose([
        transforms.RandomResizedCrop(backbone.image_size, scale=(crop_scale, 1.0), interpolation=mode),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.ToTensor(),
        transforms.Normalize(normalization["mean"], normalization["std"]),
    ])


class TwoViews(Dataset):
    """``dataset[i] = (view_1, view_2, i)``: two independent draws of the view augmentation (:func:`view_transform`,
    else the backbone's training augmentation)."""

    def __init__(self, data: LabeledData, backbone: Any, crop_scale: float = 0.3) -> None:
        self.data, self.backbone = data, backbone
        self.transform = view_transform(backbone, crop_scale)

    def __len__(self) -> int:
        return len(self.data)

    def _view(self, item: Any) -> Any:
        if self.transform is None:
            return self.backbone.preprocess(item, True)
        from transferkit.backbones.base import as_pil_image

        return self.transform(as_pil_image(item, getattr(self.backbone, "image_mode", "RGB")))

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        item = self.data.items[i]
        return self._view(item), self._view(item), i


class TwoViewCollator:
    def __init__(self, backbone: Any) -> None:
        self.backbone = backbone

    def __call__(self, samples: list[tuple[Any, Any, int]]) -> dict[str, Any]:
        first, second, index = zip(*samples)
        return {"inputs": self.backbone.collate(list(first)), "view2": self.backbone.collate(list(second)),
                "labels": torch.full((len(index),), -1, dtype=torch.long), "index": torch.as_tensor(index)}


class _PretrainModel(nn.Module):
    """A backbone with a head that is discarded after pretraining. ``freeze_batch_norm``: the backbone's batch-norm
    layers stay in eval mode in training, so their running statistics keep the pretrained values (re-estimating
    them on heavily augmented views shifts the features that a probe on clean images reads)."""

    def __init__(self, backbone: Any, freeze_batch_norm: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.freeze_batch_norm = freeze_batch_norm

    def train(self, mode: bool = True) -> _PretrainModel:
        super().train(mode)
        if mode and self.freeze_batch_norm:
            keep_batch_norm_statistics(self.backbone)
        return self

    def head_parameters(self) -> list[nn.Parameter]:  # pragma: no cover - every subclass has one
        raise NotImplementedError


class ContrastiveModel(_PretrainModel):
    """Backbone + SimCLR projection head ``Linear -> ReLU -> Linear``; ``forward`` returns both views' projections."""

    def __init__(self, backbone: Any, projection_dim: int, freeze_batch_norm: bool = True) -> None:
        super().__init__(backbone, freeze_batch_norm)
        width = backbone.feature_dim
        self.projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, projection_dim))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.projection.parameters())

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.projection(self.backbone.forward_features(batch["inputs"])),
                self.projection(self.backbone.forward_features(batch["view2"])))


class ClusteringModel(_PretrainModel):
    """Backbone + SCAN's clustering heads: ``heads`` independent ``Linear(width, clusters)`` maps (one ``Linear``
    of ``heads x clusters`` outputs); ``forward`` returns the cluster logits ``(B, heads, clusters)`` of the items
    (``inputs``) and of their neighbours (``view2``). ``top_groups``: the inputs are the cached outputs of
    :meth:`~transferkit.backbones.base.Backbone.forward_below` for that many top groups, so only ``forward_top``
    runs (None: the inputs are images)."""

    def __init__(self, backbone: Any, clusters: int, freeze_batch_norm: bool = True,
                 top_groups: int | None = None, heads: int = 1) -> None:
        super().__init__(backbone, freeze_batch_norm)
        self.top_groups = top_groups
        self.clusters, self.heads = clusters, heads
        self.head = nn.Linear(backbone.feature_dim, heads * clusters)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def embed(self, inputs: Any) -> torch.Tensor:
        if self.top_groups is None:
            return self.backbone.forward_features(inputs)
        return self.backbone.forward_top(inputs, self.top_groups)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self.head(self.embed(batch[key])).unflatten(-1, (self.heads, self.clusters))
                     for key in ("inputs", "view2"))


class NeighbourPairs(Dataset):
    """``dataset[(i, j)] = (item i, item j, i)`` for the pairs of a :class:`~transferkit.engine.sampling.
    NeighbourPairSampler`: rows of ``cached`` (float16 outputs of the layers below the top group, an array or a
    memory-mapped file, returned as float32 tensors) or, without a cache, the clean (eval-mode) preprocessed items
    of ``data``."""

    def __init__(self, data: LabeledData, backbone: Any, cached: np.ndarray | None = None) -> None:
        self.data, self.backbone, self.cached = data, backbone, cached

    def __len__(self) -> int:
        return len(self.data)

    def _item(self, i: int) -> Any:
        if self.cached is not None:
            return torch.from_numpy(np.asarray(self.cached[i], dtype=np.float32))
        return self.backbone.preprocess(self.data.items[i], False)

    def __getitem__(self, pair: tuple[int, int]) -> tuple[Any, Any, int]:
        i, j = pair
        return self._item(i), self._item(j), i


def cluster_pairs(backbone: Any, data: LabeledData, config: PretrainConfig, cache_file: Path) -> tuple[
        NeighbourPairs, np.ndarray, int, str]:
    """SCAN's inputs: the dataset (with the layers below the trained groups cached when the backbone splits there:
    float16 in the memory-mapped ``cache_file``, upcast per batch), the mined neighbours, the number of clusters
    and how it was chosen."""
    from transferkit.engine.features import embed_items
    from transferkit.engine.lower_maps import lower_maps
    from transferkit.engine.placement import predict_batches
    from transferkit.selftaught.cluster import choose_k, l2_normalise, nearest_neighbours

    cached = None
    top = config.train_groups
    if top is not None and top < len(backbone.layer_groups()) and backbone.splits_into_groups():
        cached = lower_maps(backbone, data, top, config.progress, config.device, out=cache_file)
        chunks = (torch.from_numpy(np.asarray(cached[i: i + 256], dtype=np.float32)) for i in range(0, len(data), 256))
        embeddings = predict_batches(backbone, chunks, lambda x: backbone.forward_top(x, top), config.device)
    else:
        embeddings = embed_items(backbone, data, backbone.forward_features, config.device, config.progress)
    x = l2_normalise(embeddings)
    partners = nearest_neighbours(x, config.neighbours)  # SCAN's mined neighbours (cosine)
    if config.clusters == "auto":
        clusters, _ = choose_k(x, seed=config.seed)
        how = f"{clusters} clusters (chosen as `cluster --k auto` does, on the starting embedding)"
    else:
        clusters = int(config.clusters)
        how = f"{clusters} clusters"
    return NeighbourPairs(data, backbone, cached), partners, clusters, how


def _two_view_forward(model: nn.Module, batch: dict[str, Any]) -> Any:
    return model(batch)


# --- text: masked-language modelling -------------------------------------------------------------------------------


class MaskedLMModel(nn.Module):
    """``AutoModelForMaskedLM`` of the encoder's config whose encoder *is* the backbone's (shared parameters), so
    training it trains the backbone; the freshly initialised MLM head is tied to the input embeddings."""

    def __init__(self, backbone: Any) -> None:
        super().__init__()
        from transformers import AutoModelForMaskedLM

        encoder = backbone.model
        try:
            mlm = AutoModelForMaskedLM.from_config(encoder.config)
        except ValueError as error:
            raise TransferkitError(f"text backbone '{backbone.spec.name}' has no masked-LM form in transformers "
                                   f"({encoder.config.model_type})", "pretrain a BERT-like encoder") from error
        prefix = mlm.base_model_prefix
        if not hasattr(mlm, prefix):
            raise TransferkitError(f"masked-LM pretraining is not supported for '{backbone.spec.name}'",
                                   "pretrain a BERT-like encoder")
        setattr(mlm, prefix, encoder)
        output = mlm.get_output_embeddings()
        if output is not None and output.weight.shape == encoder.get_input_embeddings().weight.shape:
            output.weight = encoder.get_input_embeddings().weight  # tied as in pretraining
        self.backbone = backbone
        self.mlm = mlm

    def forward(self, batch: dict[str, Any]) -> Any:
        inputs = batch["inputs"]
        return self.mlm(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                        labels=inputs["labels"])


class MaskingCollator:
    """Tokenise with the backbone, then mask with transformers' ``DataCollatorForLanguageModeling``."""

    def __init__(self, backbone: Any, probability: float) -> None:
        from transformers import DataCollatorForLanguageModeling

        self.backbone = backbone
        self.masking = DataCollatorForLanguageModeling(backbone.tokenizer, mlm=True, mlm_probability=probability,
                                                       return_tensors="pt")

    def __call__(self, samples: list[tuple[str, int, int]]) -> dict[str, Any]:
        texts, _, index = zip(*samples)
        encoded = self.backbone.collate(list(texts))
        masked = self.masking([{"input_ids": ids} for ids in encoded["input_ids"]])
        inputs = {"input_ids": masked["input_ids"], "attention_mask": encoded["attention_mask"],
                  "labels": masked["labels"].masked_fill(encoded["attention_mask"] == 0, -100)}
        return {"inputs": inputs, "labels": torch.full((len(index),), -1, dtype=torch.long),
                "index": torch.as_tensor(index)}


# --- the command --------------------------------------------------------------------------------------------------


def _loader(data: LabeledData, backbone: Any, config: PretrainConfig,
            pairs: tuple[NeighbourPairs, np.ndarray] | None = None) -> DataLoader:
    from transferkit.data.loader import TorchDataset
    from transferkit.engine.sampling import EpochShuffleSampler, NeighbourPairSampler

    if pairs is not None:
        dataset, partners = pairs
        return DataLoader(dataset, batch_size=min(config.batch_size, len(data)), sampler=NeighbourPairSampler(
            partners, config.seed), drop_last=len(data) > config.batch_size, collate_fn=TwoViewCollator(backbone))
    if data.modality == "image":
        dataset: Dataset = TwoViews(data, backbone, config.crop_scale)
        collate: Any = TwoViewCollator(backbone)
    else:
        dataset = TorchDataset(data, backbone, train=False)
        collate = MaskingCollator(backbone, config.mask_probability)
    return DataLoader(dataset, batch_size=min(config.batch_size, len(data)), sampler=EpochShuffleSampler(
        len(dataset), config.seed), drop_last=len(data) > config.batch_size, collate_fn=collate)


def freeze_lower_groups(backbone: Any, train_groups: int | None) -> int:
    """Freeze every layer group of ``backbone`` but the top ``train_groups`` (None: train all); returns the number
    of trainable groups."""
    groups = backbone.layer_groups()
    if train_groups is None or train_groups >= len(groups):
        return len(groups)
    for group in groups[: len(groups) - train_groups]:
        for param in group.parameters():
            param.requires_grad_(False)
    return train_groups


def _param_groups(model: nn.Module, config: PretrainConfig) -> list[dict[str, Any]] | None:
    """Images: the backbone at ``--lr``, the new head at ``--lr x --head-lr-scale`` (it starts random and must
    catch up before its gradients are worth following). Text: every parameter at ``--lr`` (engine default)."""
    if not isinstance(model, _PretrainModel):
        return None
    return [{"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": config.lr,
             "name": "backbone"},
            {"params": model.head_parameters(), "lr": config.lr * config.head_lr_scale, "name": "head"}]


def _objective(backbone: Any, data: LabeledData, config: PretrainConfig, cache_file: Path) -> tuple[
        nn.Module, Any, str, tuple[NeighbourPairs, np.ndarray] | None]:
    """The model, objective, its description and (scan) the neighbour pairs for ``config.objective``."""
    from transferkit.engine.objectives import (
        ContrastiveObjective,
        ModelLossObjective,
        NeighbourConsistencyObjective,
    )

    if config.objective == "simclr":
        return (ContrastiveModel(backbone, config.projection_dim, config.batch_norm == "frozen"),
                ContrastiveObjective(temperature=config.temperature),
                f"SimCLR NT-Xent (temperature {config.temperature}, two views: random resized crop "
                f"{config.crop_scale:g}-1, flip, colour jitter; batch-norm statistics {config.batch_norm})", None)
    if config.objective == "scan":
        dataset, partners, clusters, how = cluster_pairs(backbone, data, config, cache_file)
        model = ClusteringModel(backbone, clusters, config.batch_norm == "frozen",
                                config.train_groups if dataset.cached is not None else None, config.heads)
        return (model, NeighbourConsistencyObjective(entropy_weight=config.entropy_weight),
                f"SCAN neighbour consistency ({config.heads} head(s) of {how}, {partners.shape[1]} mined "
                f"neighbours, entropy weight "
                f"{config.entropy_weight:g}; clean images"
                f"{', the layers below the trained groups cached' if dataset.cached is not None else ''}; "
                f"batch-norm statistics {config.batch_norm})", (dataset, partners))
    return (MaskedLMModel(backbone), ModelLossObjective(),
            f"masked-LM (transformers, {config.mask_probability:.0%} of tokens)", None)


def pretrain(**options: Any) -> PretrainResult:
    """Python API of ``transferkit pretrain`` (options as its flags)."""
    from transferkit.config import build

    options = {key.replace("-", "_"): value for key, value in options.items() if value is not None}
    config = build(PretrainConfig, options)
    if options:
        raise TransferkitError(f"unknown option(s): {', '.join(sorted(options))}", "see `transferkit pretrain --help`")
    return run_pretrain(config)


def run_pretrain(config: PretrainConfig) -> PretrainResult:
    from transferkit.backbones import check_backbone_name, create_backbone, self_taught_spec
    from transferkit.backbones.self_taught import SPEC_FORMAT, write_backbone_folder
    from transferkit.data import load_unlabelled
    from transferkit.engine.trainer import TrainConfig, Trainer, seed_everything
    from transferkit.rundir import CHECKPOINT_DIR, OutputFolder, scratch_files
    from transferkit.selftaught import backbone_for

    config.validate()
    options = {k: v for k, v in vars(config).items() if k != "progress"}
    folder = OutputFolder(config.out, "pretrain", overwrite=config.overwrite, resume=config.resume, options=options)
    folder.check()
    if config.backbone:
        check_backbone_name(config.backbone)
    data = load_unlabelled(config.data, text_column=config.text_column)
    if len(data) < 2:
        raise TransferkitError(f"'{config.data}' holds {len(data)} item(s); pretraining needs at least 2",
                               "add more unlabelled items")
    name, backbone_options = backbone_for(config.backbone, data, config.data, config.image_size)
    config.resolve(data.modality, len(data))
    seed_everything(config.seed)
    backbone = create_backbone(name, pretrained=True, **backbone_options)
    if data.modality == "text" and (not hasattr(backbone, "tokenizer") or not hasattr(backbone, "model")):
        raise TransferkitError(f"text backbone '{name}' is not a transformers encoder", "use minilm or hf:<path>")
    trained_groups = freeze_lower_groups(backbone, config.train_groups)
    train = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, weight_decay=0.01,
                        schedule="cosine", early_stopping=0, seed=config.seed, device=config.device)
    resuming = folder.begin()
    with folder:
        with scratch_files(folder.stage, "scan-inputs.*.npy"):
            # scan's cache of the lower layers: memory-mapped in the stage (one file per process), never published
            model, objective, objective_name, pairs = _objective(backbone, data, config,
                                                                 folder.stage / f"scan-inputs.{os.getpid()}.npy")
            trainer = Trainer(model, [objective], train, forward_fn=_two_view_forward, monitor=("loss", "min"),
                              checkpoint_dir=folder.stage / CHECKPOINT_DIR, progress=config.progress,
                              param_groups=_param_groups(model, config))
            result = trainer.fit(_loader(data, backbone, config, pairs))
            del pairs  # the memory map closes before its file is deleted
        losses = [row.get("train_loss") for row in result.history]
        base = self_taught_spec(name)
        spec = {
            "format": SPEC_FORMAT, "format_version": 1,
            "base": base["base"] if base else backbone.spec.to_dict(),
            "modality": backbone.modality, "feature_dim": backbone.feature_dim,
            "provenance": {
                "base_backbone": name, "data": str(config.data), "items": len(data), "objective": objective_name,
                "epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed,
                "trained_layer_groups": trained_groups,
                "train_seconds": round(result.train_seconds, 1), "losses": losses,
                "resumed_from_epoch": result.resumed_from_epoch if resuming else None,
                "earlier": base["provenance"] if base else None,
            },
        }
        write_backbone_folder(folder.stage, backbone, spec)
        import shutil

        shutil.rmtree(folder.stage / CHECKPOINT_DIR, ignore_errors=True)
        folder.publish()
    summary = {"out": str(folder.out), "objective": objective_name, "epochs": config.epochs,
               "final_loss": float(losses[-1]) if losses and losses[-1] is not None else float("nan"),
               "losses": losses, "items": len(data), "base_backbone": name}
    logger.info("self-taught backbone written to %s", folder.out)
    return PretrainResult(folder.out, summary)


__all__ = ["ClusteringModel", "PretrainConfig", "PretrainResult", "pretrain", "run_pretrain"]
