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
    #: k of the cross-validation that scores this candidate (None: the search's k). Trained candidates use fewer
    #: folds than the probes: each fold is a full training run, and k=3 costs 3 runs on 2/3 of the items instead of
    #: 5 runs on 4/5 of them; their out-of-fold predictions still cover every item once (ensembles stay valid)
    folds: int | None = None
    #: preference measured on benchmarks (higher: preferred) that decides between candidates whose cross-validated
    #: accuracies are within one paired standard error of the best (autofit.ensemble.preferred_start); 0 = none
    prior: int = 0
    #: member of the committee (autofit.ensemble.committee): the candidates averaged with equal weights, without
    #: selection, unless the best candidate beats their average by more than the winner's curse explains
    committee: bool = False

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


#: EfficientNet stages whose pooled outputs the multi-stage probe adds to the final features (stride 16 and 32, 112 +
#: 320 channels on Lite0; Evci et al. 2022, "Head2Toe"). On Fashion-MNIST 20/class at 224 px its test accuracy was
#: +0.9 to +1.55 points over the final-layer probe on each of 3 label seeds (bench/results/auto_fashion.md)
POOL_STAGES = (3, 4)
#: the committee's probes average each map over a grid of cells (backbones.timm_backbone.grid_pool) instead of
#: globally: the multi-stage probe stage 3's map (14 x 14 at 224 px) over 7 x 7 cells, stage 4's and the final map
#: (7 x 7) over 3 x 3; the final-layer probe the final map over 3 x 3 (the multi-stage features' last columns, so the
#: two still share a pass). Where a feature is in the image matters on catalogue-like images: on 2,000 held-out
#: Fashion-MNIST training images, 20 labels per class, the Lite0 pair scored 0.844 against 0.806 with global averages
#: (bench/results/probe_variants.md, "grid" study)
POOL_GRID = (7, 3, 3)
#: the resolution of the trained image candidates other than LP-FT of the top blocks when --image-sizes is not
#: given: back-propagating through the whole network costs about 3.5 times inference per item and epoch, so at the
#: native 224-260 px a cross-validated run does not fit a 15-minute budget on 2 CPU cores
TRAIN_SIZE = 112
#: folds of trained candidates (see Candidate.folds)
TRAIN_FOLDS = 3


def image_space(backbones: list[str] | None = None, sizes: list[int] | None = None) -> list[Candidate]:
    """The image search space, in the order it is tried: the cheapest probe (a result early, even on a slow machine),
    the probes of every backbone at its own resolution (the strongest cheap candidates), the first trained candidate
    (LP-FT), the probes at 3/4 resolution, then the other trained candidates. Each EfficientNet gets a multi-stage
    probe at its own resolution (:data:`POOL_STAGES`) before its final-layer probe, which reads the last columns of
    the multi-stage features (one forward pass for both). The final-layer and multi-stage probes at each backbone's
    own resolution form the committee (``Candidate.committee``). The probe's C is fixed at 1 (cross-validated C in
    {0.1, 1, 10} gained nothing on Fashion-MNIST 20/class: bench/results/auto_fashion.md)."""
    backbones = backbones or list(LITE_NATIVE)

    def resolutions(backbone: str) -> list[int]:
        native = LITE_NATIVE.get(backbone, 224)
        return list(sizes) if sizes else [native, native * 3 // 4]

    def probe(backbone: str, size: int) -> Candidate:
        committee = size == resolutions(backbone)[0]
        if committee and backbone in LITE_NATIVE:
            return Candidate(backbone, "linear-probe", size, {"probe_c": 1.0, "pool_grid": [POOL_GRID[-1]]},
                             "features", "grid probe C=1", committee=True)
        return Candidate(backbone, "linear-probe", size, {"probe_c": 1.0}, "features", "probe C=1",
                         committee=committee)

    def multi_stage_probe(backbone: str, size: int) -> Candidate:
        return Candidate(backbone, "linear-probe", size, {"probe_c": 1.0, "pool_stages": list(POOL_STAGES),
                                                          "pool_grid": list(POOL_GRID)},
                         "features", "multi-stage grid probe C=1", committee=True)

    first = backbones[0]
    ordered: list[Candidate] = []
    if not sizes:
        ordered.append(probe(first, LITE_NATIVE.get(first, 224) // 2))
    for b in backbones:  # the multi-stage probe first: the final-layer probe reads its last columns, no extra pass
        native = resolutions(b)[0]
        ordered += [multi_stage_probe(b, native), probe(b, native)] if b in LITE_NATIVE else [probe(b, native)]
    # LP-FT of the top blocks at the backbone's own resolution: the frozen lower blocks cost one forward pass per
    # item and epoch and no backward pass, which makes native-resolution training affordable
    strategy, label, options = TRAINED_TOP
    ordered.append(Candidate(first, strategy, resolutions(first)[0], dict(options), "train", label, TRAIN_FOLDS))
    ordered += [probe(b, size) for b in backbones for size in resolutions(b)[1:]]
    small = sizes[-1] if sizes else TRAIN_SIZE
    ordered += [Candidate(first, strategy, small, dict(options), "train", label, TRAIN_FOLDS)
                for strategy, label, options in TRAINED_IMAGE]
    return ordered


#: LP-FT of the top layer groups (the last two stages and the head convolution of EfficientNet-Lite)
TRAINED_TOP: tuple[str, str, dict[str, Any]] = (
    "finetune", "LP-FT top 3", {"epochs": 8, "optimizer": "sgd", "lr": 0.01, "backbone_lr": 3e-3, "weight_decay": 0.0,
                                "unfreeze": "3"})
#: the other trained image candidates: (strategy, label, options); the few-shot defaults of bench/bench_defaults.py
TRAINED_IMAGE: list[tuple[str, str, dict[str, Any]]] = [
    ("finetune", "LP-FT", {"epochs": 12, "optimizer": "sgd", "lr": 0.01, "backbone_lr": 1e-3, "weight_decay": 0.0}),
    ("lora", "LoRA", {"epochs": 12}),
    ("adapter", "adapters", {"epochs": 12}),
]


#: copies of each class-name sentence added to the training side by the text candidates that use them (SetFit's
#: templated examples; 8 as in SetFit's zero-shot guide). Tweets 8/class, 3 label seeds: +2.1 points for the probe,
#: +4.4 for contrastive training, +5.2 for LP-FT, on every seed (bench/results/auto_tweets.md)
LABEL_EXAMPLES = 8


def text_space(backbones: list[str] | None = None, class_names: list[str] | None = None) -> list[Candidate]:
    """The text search space: probes first (seconds), then trained candidates. When the class names are words
    (:func:`transferkit.data.label_examples.names_are_words`), candidates that also learn from class-name sentences
    come first and carry the strongest priors: with a few dozen texts cross-validation cannot separate the
    candidates, and these measured best (contrastive with class names 0.656, SetFit 0.613, the probe 0.575 on tweets
    8/class)."""
    from transferkit.data.label_examples import names_are_words

    backbones = backbones or ["minilm"]
    # sentence embeddings are unit vectors: the probe needs a weaker penalty than scikit-learn's default C=1
    candidates = [Candidate(b, "linear-probe", None, {"probe_c": c}, "features", f"probe C={c:g}")
                  for b in backbones for c in (10.0, 100.0, 1.0)]
    first = backbones[0]
    named = names_are_words(class_names) if class_names else False
    if named:
        candidates += [Candidate(b, "linear-probe", None, {"probe_c": 1.0, "label_examples": LABEL_EXAMPLES},
                                 "features", "probe C=1 + class names") for b in backbones]
        candidates += [
            Candidate(first, "contrastive", None, {"contrastive_epochs": 1, "probe_c": 10.0,
                                                   "label_examples": LABEL_EXAMPLES}, "train",
                      "contrastive + class names C=10", TRAIN_FOLDS, prior=3),
            Candidate(first, "finetune", None, {"epochs": 10, "label_examples": LABEL_EXAMPLES}, "train",
                      "LP-FT + class names", TRAIN_FOLDS, prior=2),
        ]
    # a small encoder on a few dozen sentences trains in seconds: several contrastive schedules fit a 10-minute budget.
    # Their head takes the probe's weaker penalty (C=10); SetFit's own head (C=1) is a later variant
    candidates += [
        Candidate(first, "contrastive", None, {"contrastive_epochs": 1, "probe_c": 10.0}, "train",
                  "contrastive (SetFit-style) C=10", TRAIN_FOLDS, prior=1),
        Candidate(first, "finetune", None, {"epochs": 10}, "train", "LP-FT", TRAIN_FOLDS),
        Candidate(first, "contrastive", None, {"contrastive_epochs": 1, "probe_c": 1.0}, "train",
                  "contrastive (SetFit-style) C=1", TRAIN_FOLDS),
        Candidate(first, "lora", None, {"epochs": 10}, "train", "LoRA", TRAIN_FOLDS),
        Candidate(first, "contrastive", None, {"contrastive_epochs": 4, "probe_c": 10.0}, "train",
                  "contrastive 4 epochs C=10", TRAIN_FOLDS),
    ]
    return candidates


def default_space(modality: str, backbones: list[str] | None = None, sizes: list[int] | None = None,
                  strategies: list[str] | None = None, class_names: list[str] | None = None) -> list[Candidate]:
    """The candidates for ``modality``, optionally restricted to ``strategies`` (``class_names``: the data's, which
    decide whether text candidates may learn from class-name sentences)."""
    if modality == "image":
        candidates = image_space(backbones, sizes)
    elif modality == "text":
        if sizes:
            raise TransferkitError("--image-sizes does not apply to text data", "remove it from the command")
        candidates = text_space(backbones, class_names)
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
