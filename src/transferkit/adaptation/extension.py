"""``fit --adapt METHOD``: domain adaptation as a fit extension (objectives, auxiliary target data, head fitting).

Every adapted run first trains the **source-only baseline** with the same strategy, options and budget (and the
same initial weights) and saves it as ``<run>/source_only/model``, so ``transferkit evaluate`` on labelled
target data prints both accuracies side by side. The extension takes over training through the
``FitExtension.train`` hook: baseline first, then ``strategy.train`` on the adapted context.

Valid combinations (anything else exits with code 2 and the reason):

============================  ==================================  =========================================
method                        needs                               strategy
============================  ==================================  =========================================
``dann``                      ``--target-data`` (unlabelled)      one that trains the backbone (finetune,...)
``deep-coral``                ``--target-data``                   one that trains the backbone
``coral``                     ``--target-data``                   frozen features (linear-probe)
``importance-weighting``      ``--target-data``                   any
``feature-augmentation``      ``--target-labelled`` (a few)       frozen features (linear-probe)
``feature-matching``          ``--pairs`` (CSV source,target)     any (the backbone is copied and trained)
============================  ==================================  =========================================

Model selection and early stopping never use target labels: the engine monitors ``--adapt-selection``
(``snd``, ``entropy`` on unlabelled target data, or ``source-val``), reported per epoch in history.jsonl.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.adaptation.framing import FRAMES, framed
from transferkit.adaptation.selection import MONITORS, SIGNALS, selection_evaluate_fn
from transferkit.errors import TransferkitError
from transferkit.extensions import ExtensionConfig, FitExtension, register_extension

if TYPE_CHECKING:
    from transferkit.config import FitConfig
    from transferkit.data.base import LabeledData
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainResult
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy

logger = logging.getLogger(__name__)

METHODS = ("dann", "deep-coral", "coral", "importance-weighting", "feature-augmentation", "feature-matching")
#: which of --target-data / --target-labelled / --pairs each method needs (and is the only one it accepts)
NEEDS = {"dann": "target_data", "deep-coral": "target_data", "coral": "target_data",
         "importance-weighting": "target_data", "feature-augmentation": "target_labelled",
         "feature-matching": "pairs"}
TRAINS_BACKBONE = ("dann", "deep-coral")
FROZEN_FEATURES = ("coral", "feature-augmentation")
BASELINE_DIR = "source_only"
SELECTION_SUBSET = 512  # unlabelled target items scored each epoch for the selection signal


@dataclass
class AdaptationConfig(ExtensionConfig):
    adapt: str | None = field(default=None, metadata={"help": "Domain adaptation method: " + ", ".join(METHODS)
                                                      + " (also trains the source-only baseline)."})
    target_data: str | None = field(default=None, metadata={"help": "Unlabelled target-domain data (folder, "
                                                            "text file or built-in; labels are ignored)."})
    target_labelled: str | None = field(default=None, metadata={"help": "A few labelled target examples "
                                                                "(feature-augmentation)."})
    target_limit_per_class: int | None = field(default=None, metadata={"help": "Use only K labelled target "
                                                                       "examples per class from --target-labelled."})
    pairs: str | None = field(default=None, metadata={"help": "feature-matching: CSV of 'source path,target "
                                                      "path' rows (paths relative to the CSV)."})
    adapt_weight: float = field(default=1.0, metadata={"help": "Weight of the adaptation loss (DANN domain "
                                                       "loss, Deep CORAL loss)."})
    domain_hidden: int = field(default=256, metadata={"help": "DANN: hidden units of the domain classifier."})
    grl_gamma: float = field(default=10.0, metadata={"help": "DANN: gamma of the reversal schedule "
                                                     "2/(1+exp(-gamma p))-1 (0: constant coefficient 1)."})
    adapt_selection: str = field(default="entropy", metadata={"help": "Epoch selection / early stopping signal "
                                                              "without target labels: entropy, snd or "
                                                              "source-val."})
    frame: str = field(default="none", metadata={"help": "Image framing of source and target: none, or mnist "
                                                 "(crop to the ink, fit a 20x20 box in 28x28, centre by mass)."})
    coral_reg: float = field(default=1.0, metadata={"help": "CORAL: the r of (C + r I), in units of each "
                                                    "domain's mean feature variance (1: the paper's +I on "
                                                    "features scaled to unit variance; SKADA's reg=0.5)."})
    importance_clip: float = field(default=10.0, metadata={"help": "importance-weighting: clip weights to "
                                                           "[1/clip, clip]."})
    adapt_baseline: bool = field(default=True, metadata={"help": "Also train and save the source-only "
                                                         "baseline (same strategy and budget) in source_only/."})
    adapt_plot: bool = field(default=False, metadata={"help": "Write adaptation_tsne.png: t-SNE of source and "
                                                      "target features, source-only vs adapted."})

    def validate(self) -> None:
        if self.adapt is not None and self.adapt not in METHODS:
            raise TransferkitError(f"unknown --adapt '{self.adapt}'", f"choose one of: {', '.join(METHODS)}")
        if self.adapt_selection not in SIGNALS:
            raise TransferkitError(f"invalid --adapt-selection '{self.adapt_selection}'",
                                   f"choose one of: {', '.join(SIGNALS)}")
        if self.frame not in FRAMES:
            raise TransferkitError(f"invalid --frame '{self.frame}'", f"choose one of: {', '.join(FRAMES)}")
        for name in ("adapt_weight", "coral_reg", "grl_gamma"):
            if not getattr(self, name) >= 0:
                raise TransferkitError(f"invalid --{name.replace('_', '-')} {getattr(self, name)}",
                                       "use a number >= 0")
        if self.importance_clip < 1:
            raise TransferkitError(f"invalid --importance-clip {self.importance_clip}", "use a number >= 1")
        if self.domain_hidden < 1:
            raise TransferkitError(f"invalid --domain-hidden {self.domain_hidden}", "use a whole number >= 1")
        if self.target_limit_per_class is not None and self.target_limit_per_class < 1:
            raise TransferkitError(f"invalid --target-limit-per-class {self.target_limit_per_class}",
                                   "use a whole number >= 1")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@register_extension
class AdaptationExtension(FitExtension):
    name = "adaptation"
    config_class = AdaptationConfig
    config: AdaptationConfig

    def __init__(self, config: AdaptationConfig) -> None:
        super().__init__(config)
        self.fit: FitConfig | None = None
        self.baseline: TransferModel | None = None
        self.target: LabeledData | None = None
        self.summary: dict[str, Any] = {}

    def active(self) -> bool:
        c = self.config
        return any(v is not None for v in (c.adapt, c.target_data, c.target_labelled, c.pairs)) or c.frame != "none"

    # --- validity ------------------------------------------------------------------------------------------
    def check(self, fit: FitConfig, strategy: Strategy) -> None:
        c = self.config
        given = [n for n in ("target_data", "target_labelled", "pairs") if getattr(c, n) is not None]
        if c.adapt is None:
            if given:
                raise TransferkitError(f"{_flag(given[0])} is given without --adapt",
                                       f"add --adapt METHOD ({', '.join(METHODS)}) or remove {_flag(given[0])}")
            return
        needed = NEEDS[c.adapt]
        if getattr(c, needed) is None:
            raise TransferkitError(f"--adapt {c.adapt} needs {_flag(needed)}",
                                   f"pass {_flag(needed)} " + ("FILE (a CSV of source path,target path)"
                                                               if needed == "pairs" else "DATA"))
        extra = [n for n in given if n != needed]
        if extra:
            raise TransferkitError(f"--adapt {c.adapt} does not use {_flag(extra[0])}",
                                   f"remove it (the method takes {_flag(needed)})")
        if c.target_limit_per_class is not None and c.target_labelled is None:
            raise TransferkitError("--target-limit-per-class needs --target-labelled", "pass both or neither")
        if c.adapt in TRAINS_BACKBONE and strategy.frozen_backbone:
            raise TransferkitError(f"--adapt {c.adapt} aligns features by training the backbone, but strategy "
                                   f"'{strategy.name}' keeps it frozen",
                                   "use --strategy finetune (or another strategy that trains the backbone)")
        if c.adapt in FROZEN_FEATURES and not strategy.frozen_backbone:
            raise TransferkitError(f"--adapt {c.adapt} works on frozen features, but strategy '{strategy.name}' "
                                   "trains the backbone", "use --strategy linear-probe")
        if c.adapt == "feature-matching" and not Path(c.pairs).is_file():
            raise TransferkitError(f"pairs file '{c.pairs}' does not exist", "pass a CSV of source path,target path")

    # --- configuration -------------------------------------------------------------------------------------
    def configure(self, context: RunContext, model: TransferModel, fit: FitConfig) -> None:
        c = self.config
        self.fit = fit
        splits = context.splits
        if c.frame != "none":
            splits.train, splits.val = framed(splits.train, c.frame), framed(splits.val, c.frame)
            if splits.test is not None:
                splits.test = framed(splits.test, c.frame)
            context.notes.append(f"images framed '{c.frame}' (source and target alike)")
        if c.adapt is None:
            return
        if c.target_data is not None:
            from transferkit.data import load_unlabelled

            self.target = self._check_modality(framed(load_unlabelled(c.target_data, text_column=fit.text_column),
                                                      c.frame), splits.modality, "--target-data")
            context.notes.append(f"adaptation: {c.adapt}, unlabelled target '{c.target_data}' "
                                 f"({len(self.target)} items)")

    def train(self, context: RunContext, model: TransferModel, strategy: Strategy) -> TrainResult | None:
        """The source-only baseline first (same strategy, budget and initial weights), then the adapted run."""
        if self.config.adapt is None:
            return None
        self._train_baseline(strategy, model, context)
        return self._train_adapted(strategy, model, context)

    @staticmethod
    def _check_modality(data: LabeledData, modality: str, flag: str) -> LabeledData:
        if data.modality != modality:
            raise TransferkitError(f"{flag} holds {data.modality} data but the source data is {modality}",
                                   "give target data of the same kind as --data")
        return data

    # --- the source-only baseline --------------------------------------------------------------------------
    def _train_baseline(self, strategy: Strategy, model: TransferModel, context: RunContext) -> None:
        """Same strategy, options, budget and initial weights as the adapted run, without adaptation."""
        from transferkit.api import evaluate_model
        from transferkit.model import load_model, save_model

        assert context.run_dir is not None
        if not self.config.adapt_baseline:
            return
        folder = context.run_dir / BASELINE_DIR
        if (folder / "model" / "config.json").is_file():  # a resumed run: keep the finished baseline
            self.baseline, _ = load_model(folder / "model")
            return
        baseline = copy.deepcopy(model)
        baseline_context = dataclasses.replace(context, objectives=list(context.objectives), aux_data={},
                                               checkpoint_dir=folder / "checkpoint", notes=[])
        logger.info("training the source-only baseline (same strategy and budget, no adaptation)")
        started = time.perf_counter()
        result = strategy.train(baseline, baseline_context)
        save_model(baseline, folder / "model", strategy.to_dict(), extra={"data": context.splits.source,
                                                                              "role": "source-only baseline"})
        test = context.splits.test if context.splits.test is not None and len(context.splits.test) else None
        report = evaluate_model(baseline, test, batch_size=max(32, context.train.batch_size)) if test else {}
        info = {"source_test_accuracy": report.get("accuracy"), "best_epoch": result.best_epoch,
                "train_seconds": round(time.perf_counter() - started, 3), "notes": baseline_context.notes}
        (folder / "metrics.json").write_text(json.dumps(info, indent=2, default=str))
        import shutil

        shutil.rmtree(folder / "checkpoint", ignore_errors=True)
        self.baseline = baseline
        self.summary["source_only_source_test_accuracy"] = report.get("accuracy")

    # --- the adapted run -----------------------------------------------------------------------------------
    def _train_adapted(self, strategy: Strategy, model: TransferModel, context: RunContext) -> TrainResult:
        c = self.config
        if c.adapt in TRAINS_BACKBONE:
            return self._train_aligned(strategy, model, context)
        if c.adapt == "coral":
            return self._train_coral(strategy, model, context)
        if c.adapt == "importance-weighting":
            return self._train_weighted(strategy, model, context)
        if c.adapt == "feature-augmentation":
            return self._train_augmented(strategy, model, context)
        return self._train_matched(strategy, model, context)

    def _train_aligned(self, strategy: Strategy, model: TransferModel, context: RunContext) -> TrainResult:
        """DANN / Deep CORAL: an objective on (source batch, target batch) added to the engine's loss."""
        from transferkit.adaptation.coral import DeepCoralObjective
        from transferkit.adaptation.dann import DANNObjective

        c = self.config
        assert self.target is not None
        dim = model.backbone.feature_dim
        objective = DANNObjective(dim, c.adapt_weight, c.domain_hidden, c.grl_gamma, schedule=c.grl_gamma > 0) \
            if c.adapt == "dann" else DeepCoralObjective(c.adapt_weight)
        context.objectives.append(objective)
        context.aux_data["target"] = self.target
        self._select_without_labels(model, context)
        return strategy.train(model, context)

    def _select_without_labels(self, model: TransferModel, context: RunContext) -> None:
        """Monitor an unlabelled-target signal (or source validation) for early stopping and epoch choice."""
        assert self.target is not None
        rng = np.random.default_rng(context.train.seed)
        subset = self.target if len(self.target) <= SELECTION_SUBSET else \
            self.target.subset(np.sort(rng.choice(len(self.target), SELECTION_SUBSET, replace=False)))
        context.evaluate_fn = selection_evaluate_fn(context.loader(subset, model.backbone, train=False))
        context.monitor = MONITORS[self.config.adapt_selection]
        context.notes.append(f"epoch selection and early stopping on '{self.config.adapt_selection}' "
                             f"({context.monitor[0]}, {context.monitor[1]}); no target labels used")

    def _train_coral(self, strategy: Strategy, model: TransferModel, context: RunContext) -> TrainResult:
        """Classical CORAL: the head is fitted on re-coloured source features, applied to raw target features."""
        from transferkit.adaptation.coral import CoralMap

        assert self.target is not None
        source_parts = (context.splits.train, context.splits.val)
        plain_features = context.features
        source = plain_features(model.backbone, context.splits.train)
        target = plain_features(model.backbone, self.target)
        # r relative to each domain's feature scale: the paper's +I on features scaled to unit mean variance
        mapping = CoralMap(source, target, self.config.coral_reg, relative=True)

        def coral_features(backbone: Any, data: LabeledData) -> np.ndarray:
            features = plain_features(backbone, data)
            return mapping(features) if any(data is part for part in source_parts) else features

        context.features = coral_features  # type: ignore[method-assign]
        context.notes.append("CORAL: source features whitened with (C_s + r_s I)^-1/2, re-coloured with "
                             f"(C_t + r_t I)^1/2 and moved to the target mean; r = {self.config.coral_reg} x each "
                             "domain's mean feature variance")
        try:
            return strategy.train(model, context)
        finally:
            context.features = plain_features  # type: ignore[method-assign]

    def _train_weighted(self, strategy: Strategy, model: TransferModel, context: RunContext) -> TrainResult:
        """Importance weighting: each source example's loss times the domain classifier's density ratio."""
        from transferkit.adaptation.importance import (
            WeightedCrossEntropy,
            density_ratio_weights,
            effective_sample_size,
        )

        assert self.target is not None
        train = context.splits.train
        weights = density_ratio_weights(context.features(model.backbone, train),
                                        context.features(model.backbone, self.target),
                                        clip=self.config.importance_clip, seed=context.train.seed)
        ess = effective_sample_size(weights)
        self.summary.update({"importance_weight_max": float(weights.max()), "effective_sample_size": ess})
        context.notes.append(f"importance weights from a domain classifier on the initial features: effective "
                             f"sample size {ess:.0f} of {len(weights)}")
        options: Any = strategy.config
        if getattr(options, "solver", None) == "lbfgs":
            from transferkit.engine.solvers import fit_logistic_regression

            return self._fit_head(model, context, lambda x, y: fit_logistic_regression(
                x, y, train.num_classes, c=options.probe_c, max_iter=options.probe_max_iter, sample_weight=weights))
        context.task_objectives = [WeightedCrossEntropy(weights, label_smoothing=context.label_smoothing)]
        return strategy.train(model, context)

    def _train_augmented(self, strategy: Strategy, model: TransferModel, context: RunContext) -> TrainResult:
        """Daumé's feature augmentation on frozen features with a few labelled target examples."""
        from transferkit.adaptation.feature_augmentation import fit_augmented_head
        from transferkit.data import load_data

        c = self.config
        assert c.target_labelled is not None and self.fit is not None
        fit = self.fit
        target_splits = load_data(c.target_labelled, text_column=fit.text_column, label_column=fit.label_column,
                                  limit_per_class=c.target_limit_per_class, seed=context.train.seed)
        target = framed(target_splits.train, c.frame)
        self._check_modality(target, context.splits.modality, "--target-labelled")
        if list(target.class_names) != list(context.splits.class_names):
            raise TransferkitError(f"--target-labelled has classes {target.class_names} but the source has "
                                   f"{context.splits.class_names}", "use the same class names in both domains")
        context.notes.append(f"feature augmentation with {len(target)} labelled target examples (their test "
                             "split is left untouched)")
        target_x = context.features(model.backbone, target)
        options = strategy.config
        return self._fit_head(model, context, lambda x, y: fit_augmented_head(
            x, y, target_x, target.labels, len(context.splits.class_names), c=getattr(options, "probe_c", 1.0),
            max_iter=getattr(options, "probe_max_iter", 1000)))

    def _fit_head(self, model: TransferModel, context: RunContext, solve: Any) -> TrainResult:
        """Fit the first head in closed form on cached source features; validation metrics on source val."""
        import torch

        from transferkit.engine.trainer import TrainResult
        from transferkit.strategies.linear_probe import set_linear_head

        started = time.perf_counter()
        train, val = context.splits.train, context.splits.val
        x = context.features(model.backbone, train)
        keep = train.labels >= 0
        weight, bias = solve(x[keep], train.labels[keep])
        set_linear_head(model, weight, bias)
        row: dict[str, Any] = {"epoch": 1, "solver": "lbfgs"}
        if len(val):
            logits = torch.as_tensor(context.features(model.backbone, val)) @ weight.T + bias
            row["val_accuracy"] = float((logits.argmax(-1) == torch.as_tensor(val.labels)).float().mean())
        row["seconds"] = round(time.perf_counter() - started, 3)
        return TrainResult([row], 1, row.get("val_accuracy"), False, time.perf_counter() - started)

    def _train_matched(self, strategy: Strategy, model: TransferModel, context: RunContext) -> TrainResult:
        """de Vos et al.: the trained source pipeline stays the reference; a copy becomes the target pipeline."""
        from transferkit.adaptation.feature_matching import match_features, read_pairs

        assert self.config.pairs is not None
        result = strategy.train(model, context)
        pairs = read_pairs(self.config.pairs, self.config.frame)
        history = match_features(model, pairs, context)
        context.notes.append(f"feature matching on {len(pairs[0])} source/target pairs: the target pipeline "
                             "(backbone copy) was trained to reproduce the source pipeline's features; head shared")
        result.history.extend(history)
        return result

    # --- after training ------------------------------------------------------------------------------------
    def metrics(self, context: RunContext, model: TransferModel) -> dict[str, Any]:
        c = self.config
        if c.adapt is None:
            return {"adaptation": {"frame": c.frame}}
        info: dict[str, Any] = {"method": c.adapt, "frame": c.frame, "baseline": f"{BASELINE_DIR}/model",
                                **self.summary}
        if c.adapt in TRAINS_BACKBONE:
            info["selection"] = c.adapt_selection
        if c.adapt_plot and self.baseline is not None and context.run_dir is not None:
            from transferkit.adaptation.tsne import plot_feature_map

            target = self.target if self.target is not None else None
            if target is not None:
                info["plot"] = plot_feature_map(self.baseline, model, context.splits.train, target,
                                                context.run_dir / "adaptation_tsne.png", seed=context.train.seed)
        return {"adaptation": info}
