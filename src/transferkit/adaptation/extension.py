"""``fit --adapt METHOD``: domain adaptation as a fit extension (objectives, auxiliary target data, head fitting).

Every adapted run first trains the **source-only baseline** with the same strategy, options and budget (and the
same initial weights) and saves it as ``<run>/source_only/model``, so ``transferkit evaluate`` on labelled
target data prints both accuracies side by side. The extension takes over training through the
``FitExtension.train`` hook: baseline first, then ``strategy.train`` on the adapted context.

The methods are a registry (:mod:`transferkit.adaptation.base`, ``@register_adaptation``): each names the input
it needs (``--target-data``, ``--target-labelled`` or ``--pairs``, the only one it accepts) and the strategies and
task kinds it works with; any other combination exits with code 2 and the reason, before anything is loaded.

Model selection and early stopping never use target labels: the engine monitors ``--adapt-selection``
(``snd``, ``entropy`` on unlabelled target data, or ``source-val``), reported per epoch in history.jsonl.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit.adaptation.base import INPUTS, AdaptationMethod, adaptation_class, list_adaptations
from transferkit.adaptation.selection import SIGNALS
from transferkit.data.framing import FRAMES
from transferkit.errors import TransferkitError
from transferkit.extensions import ExtensionConfig, FitExtension, register_extension
from transferkit.rundir import BASELINE_DIR, write_json

if TYPE_CHECKING:
    from transferkit.config import FitConfig
    from transferkit.data.base import LabeledData
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainResult
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy

logger = logging.getLogger(__name__)


@dataclass
class AdaptationConfig(ExtensionConfig):
    adapt: str | None = field(default=None, metadata={"help": "Domain adaptation method: dann, deep-coral, coral, "
                                                      "importance-weighting, feature-augmentation or "
                                                      "feature-matching (also trains the source-only baseline)."})
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
                                                 "(crop to the ink, fit a 20x20 box in 28x28, centre by mass); "
                                                 "saved with the model: predict, evaluate, serve and ONNX "
                                                 "exports frame their inputs too."})
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
        if self.adapt is not None:
            adaptation_class(self.adapt)  # unknown names: one line listing the registered methods
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
        self.method: AdaptationMethod | None = adaptation_class(config.adapt)(config) if config.adapt else None
        self.baseline: TransferModel | None = None
        self.target: LabeledData | None = None
        self.summary: dict[str, Any] = {}

    def active(self) -> bool:
        c = self.config
        return any(v is not None for v in (c.adapt, c.target_data, c.target_labelled, c.pairs)) or c.frame != "none"

    def describe(self) -> str:
        c = self.config
        return " ".join(([f"--adapt {c.adapt}"] if c.adapt else []) + ([f"--frame {c.frame}"] if c.frame != "none"
                                                                       else [])) or "--target-data"

    @classmethod
    def modes(cls) -> dict[str, dict[str, Any]]:
        from transferkit.extensions import NEEDS_PATH

        return {**{f"adapt {name}": {"adapt": name, method.needs: NEEDS_PATH}
                   for name, method in list_adaptations().items()},
                **{f"frame {frame}": {"frame": frame} for frame in FRAMES if frame != "none"}}

    # --- validity ------------------------------------------------------------------------------------------
    def supports(self, strategy: Strategy, task_kind: str) -> bool | str:
        base = super().supports(strategy, task_kind)
        if base is not True or self.method is None:
            return base
        return self.method.supports(strategy, task_kind)

    def check(self, fit: FitConfig, strategy: Strategy) -> None:
        c = self.config
        given = [n for n in INPUTS if getattr(c, n) is not None]
        if self.method is None:
            if given:
                raise TransferkitError(f"{_flag(given[0])} is given without --adapt",
                                       f"add --adapt METHOD ({', '.join(list_adaptations())}) or remove "
                                       f"{_flag(given[0])}")
            return
        needed = self.method.needs
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
        if needed == "pairs" and not Path(c.pairs).is_file():
            raise TransferkitError(f"pairs file '{c.pairs}' does not exist", "pass a CSV of source path,target path")

    # --- configuration -------------------------------------------------------------------------------------
    def configure(self, context: RunContext, model: TransferModel, fit: FitConfig) -> RunContext:
        c = self.config
        if self.method is not None:
            self.method.fit = fit
        splits = context.splits
        if c.frame != "none" and splits.modality == "image":  # the model's preprocessing: every image framed once
            model.backbone.set_frame(c.frame)
            context.notes.append(f"images framed '{c.frame}' (source and target alike; saved with the model)")
        if c.target_data is not None:
            from transferkit.data import load_unlabelled

            self.target = self._check_modality(load_unlabelled(c.target_data, text_column=fit.text_column),
                                               splits.modality, "--target-data")
            context.notes.append(f"adaptation: {c.adapt}, unlabelled target '{c.target_data}' "
                                 f"({len(self.target)} items)")
        return context

    def train(self, context: RunContext, model: TransferModel, strategy: Strategy) -> TrainResult | None:
        """The source-only baseline first (same strategy, budget and initial weights), then the adapted run."""
        if self.method is None:
            return None
        self._train_baseline(strategy, model, context)
        return self.method.train(strategy, model, context, self.target)

    @staticmethod
    def _check_modality(data: LabeledData, modality: str, flag: str) -> LabeledData:
        if data.modality != modality:
            raise TransferkitError(f"{flag} holds {data.modality} data but the source data is {modality}",
                                   "give target data of the same kind as --data")
        return data

    # --- the source-only baseline --------------------------------------------------------------------------
    def _train_baseline(self, strategy: Strategy, model: TransferModel, context: RunContext) -> None:
        """Same strategy, options, budget and initial weights as the adapted run, without adaptation."""
        import shutil

        from transferkit.inference import evaluate_model
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
        test = context.splits.test if context.splits.has_test() else None
        report = evaluate_model(baseline, test, batch_size=max(32, context.train.batch_size)) if test else {}
        info = {"source_test_accuracy": report.get("accuracy"), "best_epoch": result.best_epoch,
                "train_seconds": round(time.perf_counter() - started, 3), "notes": baseline_context.notes}
        write_json(folder / "metrics.json", info)
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)
        self.baseline = baseline
        self.summary["source_only_source_test_accuracy"] = report.get("accuracy")

    # --- after training ------------------------------------------------------------------------------------
    def metrics(self, context: RunContext, model: TransferModel) -> dict[str, Any]:
        c = self.config
        if self.method is None:
            return {"adaptation": {"frame": c.frame}}
        info: dict[str, Any] = {"method": c.adapt, "frame": c.frame, "baseline": f"{BASELINE_DIR}/model",
                                **self.summary, **self.method.summary}
        if c.adapt_plot and self.baseline is not None and self.target is not None and context.run_dir is not None:
            from transferkit.adaptation.tsne import plot_feature_map

            info["plot"] = plot_feature_map(self.baseline, model, context.splits.train, self.target,
                                            context.run_dir / "adaptation_tsne.png", seed=context.train.seed)
        return {"adaptation": info}
