"""What ``transferkit auto`` tries: candidates (backbone x resolution x strategy x settings), cheapest first.

A candidate is scored by cross-validation on the user's labels. Two kinds:

* ``features``: a frozen backbone; features of every labelled item are extracted once (and cached on disk), then
  each fold fits an L2 logistic regression (the linear probe) in well under a second. Flip test-time augmentation
  (average of the image and its mirror image, also used as training augmentation) is scored in the same pass.
* ``train``: gradient training through the strategy (LP-FT fine-tuning, LoRA, adapters, contrastive) with a fixed
  number of epochs, so no fold spends labels on a validation split; one training run per fold.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from transferkit.errors import TransferkitError

KINDS = ("features", "train")
#: EfficientNet-Lite family: native resolution of each member (timm's pretrained config)
LITE_NATIVE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


@dataclass(frozen=True)
class Candidate:
    """One configuration to score. ``options`` are ``fit`` options (strategy, engine and model settings)."""

    backbone: str
    strategy: str
    image_size: int | None = None
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    kind: str = "features"
    label: str = ""  # short human-readable name, e.g. "probe C=1"

    @property
    def name(self) -> str:
        size = f"@{self.image_size}" if self.image_size else ""
        return f"{self.label or self.strategy} {self.backbone}{size}"

    @property
    def slug(self) -> str:
        """A file-name-safe identifier (leaderboard rows, per-candidate result files)."""
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.name).strip("_")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name}


def image_space(backbones: list[str] | None = None, sizes: list[int] | None = None) -> list[Candidate]:
    """The image search space: probes on every backbone at every resolution, then trained candidates at reduced
    resolution (full-resolution training is listed last; the budget decides whether it runs)."""
    backbones = backbones or list(LITE_NATIVE)
    candidates: list[Candidate] = []

    def resolutions(backbone: str) -> list[int]:
        native = LITE_NATIVE.get(backbone, 224)
        return list(sizes) if sizes else [native, native * 3 // 4]

    if not sizes:  # the cheapest candidate first (a quarter of the pixels): a result early, even on a slow machine
        candidates.append(Candidate(backbones[0], "linear-probe", LITE_NATIVE.get(backbones[0], 224) // 2,
                                    {"probe_c": 1.0}, "features", "probe C=1"))
    # diversity next (every backbone at its first resolution), then other resolutions, then a stronger penalty
    for rank in range(max(len(resolutions(b)) for b in backbones)):
        for backbone in backbones:
            if rank < len(resolutions(backbone)):
                candidates.append(Candidate(backbone, "linear-probe", resolutions(backbone)[rank], {"probe_c": 1.0},
                                            "features", "probe C=1"))
    for backbone in backbones:
        for size in resolutions(backbone):
            candidates.append(Candidate(backbone, "linear-probe", size, {"probe_c": 0.1}, "features", "probe C=0.1"))
    first = backbones[0]
    small = sizes[-1] if sizes else 112
    trained = [Candidate(first, strategy, small, dict(options), "train", label)
               for strategy, label, options in TRAINED_IMAGE]
    for strategy, label, options in TRAINED_IMAGE[:1]:
        trained.append(Candidate(first, strategy, 160, dict(options), "train", label))
        trained.append(Candidate(first, strategy, LITE_NATIVE.get(first, 224), dict(options), "train", label))
    # interleave: a trained candidate after each group of probes, so a short budget still tries one of each kind
    probes_first = len(backbones) + (0 if sizes else 1)
    ordered = candidates[:probes_first]
    rest = candidates[probes_first:]
    group = max(1, len(rest) // max(1, len(trained)))
    for i, candidate in enumerate(trained):
        ordered.append(candidate)
        ordered.extend(rest[i * group:(i + 1) * group])
    ordered.extend(rest[len(trained) * group:])
    return ordered


#: trained image candidates: (strategy, label, options); the few-shot defaults measured in bench/bench_defaults.py
TRAINED_IMAGE: list[tuple[str, str, dict[str, Any]]] = [
    ("finetune", "LP-FT", {"epochs": 12, "optimizer": "sgd", "lr": 0.01, "backbone_lr": 1e-3, "weight_decay": 0.0}),
    ("lora", "LoRA", {"epochs": 12}),
    ("adapter", "adapters", {"epochs": 12}),
]


def text_space(backbones: list[str] | None = None) -> list[Candidate]:
    backbones = backbones or ["minilm"]
    # sentence embeddings are unit vectors: the probe needs a weaker penalty than scikit-learn's default C=1
    candidates = [Candidate(b, "linear-probe", None, {"probe_c": c}, "features", f"probe C={c:g}")
                  for b in backbones for c in (10.0, 100.0, 1.0)]
    first = backbones[0]
    candidates += [
        Candidate(first, "contrastive", None, {"contrastive_epochs": 1}, "train", "contrastive (SetFit-style)"),
        Candidate(first, "finetune", None, {"epochs": 10}, "train", "LP-FT"),
        Candidate(first, "lora", None, {"epochs": 10}, "train", "LoRA"),
    ]
    return candidates


def default_space(modality: str, backbones: list[str] | None = None, sizes: list[int] | None = None,
                  strategies: list[str] | None = None) -> list[Candidate]:
    """The candidates for ``modality``, optionally restricted to ``strategies``."""
    if modality == "image":
        candidates = image_space(backbones, sizes)
    elif modality == "text":
        if sizes:
            raise TransferkitError("--image-sizes does not apply to text data", "remove it from the command")
        candidates = text_space(backbones)
    else:
        raise TransferkitError(f"auto supports image and text data, not {modality}", "use `transferkit fit`")
    if strategies:
        candidates = [c for c in candidates if c.strategy in strategies]
        if not candidates:
            raise TransferkitError(f"no {modality} candidate uses strategies {', '.join(strategies)}",
                                   "choose among linear-probe, finetune, lora, adapter (images) or contrastive (text)")
    seen: set[str] = set()
    unique = []
    for c in candidates:
        if c.slug not in seen:
            seen.add(c.slug)
            unique.append(c)
    return unique
