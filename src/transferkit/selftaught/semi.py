"""``fit --unlabelled PATH --semi self-training|consistency|auto``: semi-supervised transfer as a fit extension.

More data of the *same* domain without labels (a folder of images, flat or nested, or a text file / CSV / JSONL;
``--target-data`` stays the option for another domain) is used in one of two ways:

* **self-training** (pseudo-labelling, Noisy-Student style; Xie et al. 2020, curriculum labelling of
  Cascante-Bonilla et al. 2021): the model trained on the labels (the teacher) predicts every unlabelled item;
  in round ``r`` of ``R`` the most confident ``r/R * accept`` share of the items *of each predicted class* is
  accepted (per-class confidence quantiles, re-estimated every round from the current model, so no class is
  swamped and the threshold follows the model's calibration); a student is trained from the same initial weights
  by the same strategy on the labels plus the accepted pseudo-labels, with the backbone's training augmentation
  as noise, and becomes the next round's teacher.
* **consistency** (FixMatch, Sohn et al. 2020): one training run whose loss adds, on batches of unlabelled
  items, the cross-entropy of a strongly augmented view against the pseudo-label of a weakly augmented view
  where that is more confident than ``tau`` (``selftaught.consistency.ConsistencyObjective``): an objective of
  the one engine like the others, fed by an auxiliary loader of weak / strong views.

Settings are chosen on the labels before any unlabelled item is used: under ``--protocol cv`` the supervised
folds choose the epochs as for any run (when only the top layer groups train, they train on the same cached-map
views as the final consistency run, every labelled item's lower layers computed once for all folds), and their
out-of-fold predictions choose the confidence level (the largest share of the most confident items, and the lowest
confidence, whose out-of-fold accuracy reaches ``--semi-precision``); under holdout the teacher's validation
predictions do. Then *one* semi-supervised run uses every label. Unlabelled items that are also labelled,
validation or test items (same id, or the same content) are dropped before anything is pseudo-labelled, so
pseudo-labels never touch validation or test items.

``metrics.json["semi"]`` records the unlabelled items used, the acceptance rate per round (self-training) or per
epoch (consistency) and, where the unlabelled items' labels are known (``--unlabelled-labels CSV`` with columns
``item,label``; benchmarks only, never used in training), the pseudo-label accuracy; ``pseudo_labels.csv`` lists
every pseudo-label of every round.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.errors import TransferkitError, check_count, check_number
from transferkit.extensions import ExtensionConfig, FitExtension, register_extension

if TYPE_CHECKING:
    from transferkit.config import FitConfig
    from transferkit.data.base import LabeledData
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainResult
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy

logger = logging.getLogger(__name__)

METHODS = ("self-training", "consistency", "auto")
#: self-training: passes over the unlabelled items per student when --semi-epochs is not given.
SELF_TRAINING_PASSES = 2.0
#: what ``fit --unlabelled`` uses without ``--strategy`` / ``--semi``: the pair that measured best in
#: bench/results/unlabelled.md (Fashion-MNIST, 20 labels per class + 5,000 unlabelled images, EfficientNet-Lite0 at
#: 112 px, --protocol cv, seed 0, 2026-11-29, timed runs): finetune + consistency 0.8195 (+6.7 points over
#: supervised finetune 0.7530, 13 min wall) against finetune + self-training 0.7735 (+2.0 points, 21 min): with few
#: labels the self-training teacher's pseudo-labels (0.84-0.89 accurate where accepted) mostly re-teach its own
#: errors, while consistency keeps learning from the augmentation invariance. A frozen backbone cannot take the
#: consistency objective (no raw-input training), so ``auto`` is self-training there (the issue's note: self-training
#: on frozen features gains ~0).
DEFAULT_STRATEGY = "finetune"
AUTO_METHOD = "consistency"
PSEUDO_LABELS_FILE = "pseudo_labels.csv"
#: consistency on cached maps: the unlabelled items' maps, one scratch file per process in the stage folder
UNLABELLED_MAPS = "unlabelled-maps.*.npy"
#: consistency on cached lower-layer maps (only the top groups train, e.g. ``--unfreeze 2``): passes over the
#: unlabelled pool when --semi-epochs is not given. A pass there costs a fraction of a full forward pass; measured on
#: 1,800 held-out Fashion-MNIST training images (20 labels per class + the 5,000-image pool, EfficientNet-Lite0 224 px,
#: top 2 groups, seed 0): 5 passes 0.831, 15 passes 0.842, against 0.799 for the probe it starts from
#: (bench/results/unlabelled.md, the cached-maps section's notes)
CACHED_PASSES = 15.0
DEFAULT_TAU = 0.95  # FixMatch's threshold, used when there is no held-out prediction to choose one from
DEFAULT_ACCEPT = 0.8  # self-training: the last round's accepted share when there is nothing to choose it from
#: under cv without a test split, ``accuracy`` is the supervised folds' estimate: the one semi-supervised run on every
#: label is not cross-validated (k semi-supervised runs would cost k times the longest step)
CV_CAVEAT = ("accuracy is the supervised cross-validation estimate (labels only); the semi-supervised final model "
             "was trained once on every label and has no estimate of its own: score it with `transferkit evaluate "
             "--model RUN --data HELD_OUT`")


@dataclass
class SemiConfig(ExtensionConfig):
    unlabelled: str | None = field(default=None, metadata={"help": "More data of the same domain without labels: "
                                   "a folder of images (flat or nested), a .txt file (one text per line) or a "
                                   ".csv/.tsv/.jsonl file of texts; semi-supervised training (--semi)."})
    semi: str | None = field(default=None, metadata={"help": "With --unlabelled: self-training (pseudo-labels, "
                             "several rounds), consistency (FixMatch objective) or auto (default: the measured "
                             "best for the strategy)."})
    semi_rounds: int = field(default=2, metadata={"help": "self-training: pseudo-labelling rounds."})
    semi_epochs: float | None = field(default=None, metadata={"help": "Passes over the unlabelled data: per "
                                      "student (self-training, default 2) or in the whole run (consistency; default "
                                      "2, raised up to 4 so that training takes at least 160 optimiser steps)."})
    semi_precision: float = field(default=0.9, metadata={"help": "Confidence level: accept pseudo-labels only as "
                                  "far as the held-out (cv out-of-fold or validation) accuracy of items that "
                                  "confident reaches this."})
    semi_threshold: float | None = field(default=None, metadata={"help": "consistency: fixed confidence threshold "
                                         "tau (default: chosen by --semi-precision on held-out predictions)."})
    semi_weight: float = field(default=1.0, metadata={"help": "consistency: weight of the unlabelled loss."})
    semi_ratio: int = field(default=2, metadata={"help": "consistency: unlabelled items per labelled item in a "
                            "step."})
    unlabelled_limit: int | None = field(default=None, metadata={"help": "Use a seeded subset of this many "
                                         "unlabelled items."})
    unlabelled_labels: str | None = field(default=None, metadata={"help": "Benchmarks: CSV 'item,label' of the "
                                          "unlabelled items' true labels, only to report pseudo-label accuracy."})

    def validate(self) -> None:
        if self.semi is not None and self.semi not in METHODS:
            raise TransferkitError(f"invalid --semi '{self.semi}'", f"choose one of: {', '.join(METHODS)}")
        check_count("--semi-rounds", self.semi_rounds, 1)
        check_count("--semi-ratio", self.semi_ratio, 1)
        if self.semi_epochs is not None:
            check_number("--semi-epochs", self.semi_epochs, 0, None, low_open=True)
        check_number("--semi-precision", self.semi_precision, 0, 1, low_open=True)
        check_number("--semi-weight", self.semi_weight, 0, None)
        if self.semi_threshold is not None:
            check_number("--semi-threshold", self.semi_threshold, 0, 1, high_open=True)
        if self.unlabelled_limit is not None:
            check_count("--unlabelled-limit", self.unlabelled_limit, 1)


# --- data ----------------------------------------------------------------------------------------------------


def item_digest(item: Any) -> str:
    from transferkit.data.base import item_bytes

    return hashlib.sha1(item.encode() if isinstance(item, str) else item_bytes(item)).hexdigest()


def drop_known_items(unlabelled: LabeledData, parts: Sequence[LabeledData]) -> tuple[LabeledData, int]:
    """``unlabelled`` without the items that are also in ``parts`` (labelled, validation, test): same id or the
    same content. Returns the rest and how many were dropped."""
    ids: set[str] = set()
    digests: set[str] = set()
    for part in parts:
        if part is None:
            continue
        ids.update(part.ids)
        digests.update(item_digest(part.items[i]) for i in range(len(part)))
    keep = [i for i in range(len(unlabelled))
            if unlabelled.ids[i] not in ids and item_digest(unlabelled.items[i]) not in digests]
    return (unlabelled if len(keep) == len(unlabelled) else unlabelled.subset(keep)), len(unlabelled) - len(keep)


def known_labels(path: str | None, data: LabeledData, class_names: list[str]) -> np.ndarray:
    """The unlabelled items' true labels from a CSV ``item,label`` (-1 where not listed); benchmarks only."""
    truth = np.full(len(data), -1, dtype=np.int64)
    if path is None:
        return truth
    file = Path(path)
    if not file.is_file():
        raise TransferkitError(f"--unlabelled-labels file '{path}' does not exist", "pass a CSV with columns item,label")
    with open(file, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"item", "label"} <= set(rows[0]):
        raise TransferkitError(f"'{path}' has no columns item,label", "write a header line 'item,label'")
    index = {name: i for i, name in enumerate(class_names)}
    by_item = {row["item"]: index.get(row["label"], -1) for row in rows}
    for i, item_id in enumerate(data.ids):
        truth[i] = by_item.get(item_id, -1)
    return truth


class _Chain(Sequence):
    """Two item sequences one after the other (labelled items, then pseudo-labelled ones), loaded lazily."""

    def __init__(self, first: Sequence, second: Sequence) -> None:
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i):  # type: ignore[override]
        return self.first[i] if i < len(self.first) else self.second[i - len(self.first)]


def with_pseudo_labels(labelled: LabeledData, unlabelled: LabeledData, accepted: np.ndarray,
                       pseudo: np.ndarray) -> LabeledData:
    """The labelled items plus the ``accepted`` unlabelled ones labelled ``pseudo`` (ids prefixed 'unlabelled:')."""
    from transferkit.data.base import LabeledData

    chosen = unlabelled.subset(np.flatnonzero(accepted))
    return LabeledData(_Chain(labelled.items, chosen.items), np.concatenate([labelled.labels, pseudo[accepted]]),
                       list(labelled.class_names), labelled.modality,
                       list(labelled.ids) + [f"unlabelled:{i}" for i in chosen.ids],
                       name=f"{labelled.name}+pseudo{int(accepted.sum())}")


def student_epochs(passes: float, n_unlabelled: int, n_train: int, n_accepted: int, labelled_epochs: int) -> int:
    """A student's epochs: ``passes`` over the unlabelled pool's size, counted in epochs of its training set (labels
    plus accepted pseudo-labels); with nothing accepted, the teacher's own ``labelled_epochs`` (no longer run)."""
    if n_accepted == 0:
        return labelled_epochs
    return max(1, int(np.ceil(passes * n_unlabelled / max(1, n_train))))


# --- thresholds ----------------------------------------------------------------------------------------------


def confidence_level(probabilities: np.ndarray, labels: np.ndarray, precision: float) -> tuple[float, float]:
    """(the lowest confidence, the share of items) down to which the most confident held-out items are still
    correct at least ``precision`` of the time; (1.0, 0.0) when not even the most confident item is."""
    confidence = probabilities.max(1)
    order = np.argsort(-confidence, kind="stable")
    correct = (probabilities.argmax(1) == labels)[order]
    running = np.cumsum(correct) / np.arange(1, len(order) + 1)
    reached = np.flatnonzero(running >= precision)
    if not len(reached):
        return 1.0, 0.0
    last = int(reached[-1])
    return float(confidence[order][last]), (last + 1) / len(order)


def accept_per_class(probabilities: np.ndarray, share: float) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """(accepted mask, pseudo-labels, per-class confidence threshold): the most confident ``share`` of the items
    predicted as each class (a per-class quantile, so every class keeps its predicted proportion)."""
    pseudo = probabilities.argmax(1)
    confidence = probabilities.max(1)
    accepted = np.zeros(len(pseudo), dtype=bool)
    thresholds: dict[int, float] = {}
    for c in np.unique(pseudo):
        members = np.flatnonzero(pseudo == c)
        take = int(np.ceil(share * len(members)))
        if take == 0:
            continue
        best = members[np.argsort(-confidence[members], kind="stable")[:take]]
        accepted[best] = True
        thresholds[int(c)] = float(confidence[best].min())
    return accepted, pseudo, thresholds


# --- the extension -------------------------------------------------------------------------------------------


@register_extension
class SemiExtension(FitExtension):
    name = "semi"
    config_class = SemiConfig
    config: SemiConfig

    def __init__(self, config: SemiConfig) -> None:
        super().__init__(config)
        self.unlabelled: LabeledData | None = None
        self.truth: np.ndarray | None = None
        self.summary: dict[str, Any] = {}

    def active(self) -> bool:
        return self.config.unlabelled is not None or self.config.semi is not None

    def describe(self) -> str:
        return "--unlabelled" + (f" --semi {self.config.semi}" if self.config.semi else "")

    @classmethod
    def modes(cls) -> dict[str, dict[str, Any]]:
        from transferkit.extensions import NEEDS_PATH

        return {f"semi {method}": {"unlabelled": NEEDS_PATH, "semi": method} for method in METHODS if method != "auto"}

    def method(self, strategy: Strategy) -> str:
        """The method that runs: ``--semi``, or for auto the measured best (self-training on a frozen backbone)."""
        chosen = self.config.semi or "auto"
        if chosen == "auto":
            return "self-training" if strategy.frozen_backbone or not strategy.trains_with_engine() else AUTO_METHOD
        return chosen

    def supports(self, strategy: Strategy, task_kind: str) -> bool | str:
        base = super().supports(strategy, task_kind)
        if base is not True:
            return base
        if task_kind != "label":
            return "pseudo-labels are classes of the dataset's label (no --task heads)"
        if self.method(strategy) == "consistency" and (strategy.frozen_backbone or not strategy.trains_with_engine()):
            return ("consistency training needs the engine on raw inputs (two augmented views), and this strategy "
                    "fits on cached features or in closed form; use --semi self-training")
        return True

    def check(self, fit: FitConfig, strategy: Strategy) -> None:
        if self.config.unlabelled is None:
            raise TransferkitError("--semi is given without --unlabelled", "pass --unlabelled FOLDER_OR_TEXT_FILE")
        if self.config.semi_threshold is not None and self.method(strategy) != "consistency":
            raise TransferkitError("--semi-threshold applies to --semi consistency only",
                                   "drop it (self-training chooses per-class thresholds every round)")

    # --- before training ---------------------------------------------------------------------------------
    def configure(self, context: RunContext, model: TransferModel, fit: FitConfig) -> RunContext:
        from transferkit.data import load_unlabelled
        from transferkit.engine.lower_maps import LowerMapPool, trained_top_groups

        c = self.config
        splits = context.splits
        data = load_unlabelled(c.unlabelled, text_column=fit.text_column)
        if data.modality != splits.modality:
            raise TransferkitError(f"--unlabelled '{c.unlabelled}' holds {data.modality} data but --data is "
                                   f"{splits.modality} data", "give unlabelled data of the same kind as --data")
        given = len(data)
        data, dropped = drop_known_items(data, [splits.train, splits.val, splits.test])
        if c.unlabelled_limit is not None and len(data) > c.unlabelled_limit:
            rng = np.random.default_rng(context.train.seed)
            data = data.subset(np.sort(rng.choice(len(data), c.unlabelled_limit, replace=False)))
        if not len(data):
            raise TransferkitError(f"every item of --unlabelled '{c.unlabelled}' is also a labelled, validation or "
                                   "test item", "pass unlabelled items that are not in --data")
        self.unlabelled = data
        self.truth = known_labels(c.unlabelled_labels, data, list(splits.class_names))
        below = trained_top_groups(model.backbone) if data.modality == "image" else None
        if below is not None and c.semi != "self-training":
            # consistency with only the top groups training: the supervised folds and the final run train the
            # labelled items on map views too (the settings they choose are the final run's), each item's lower
            # layers computed once for all of them
            context = dataclasses.replace(context, below_groups=below, map_pool=LowerMapPool(
                model.backbone, splits.train, below, context.progress))
        self.summary = {"unlabelled": str(c.unlabelled), "unlabelled_items_given": given,
                        "dropped_as_labelled_val_or_test": dropped, "unlabelled_items_used": len(data)}
        context.notes.append(f"unlabelled: {len(data)} items from '{c.unlabelled}'"
                             + (f" ({dropped} dropped: also labelled, validation or test items)" if dropped else ""))
        return context

    # --- training ----------------------------------------------------------------------------------------
    def train(self, context: RunContext, model: TransferModel, strategy: Strategy) -> TrainResult | None:
        method = self.method(strategy)
        self.summary["method"] = method
        self.summary["strategy"] = strategy.name
        if strategy.frozen_backbone:
            message = (f"--strategy {strategy.name}: the backbone is frozen, so only the head learns from "
                       "pseudo-labels")
            logger.info(message)
            context.notes.append(message)
            self.summary["learns_from_pseudo_labels"] = "head only (frozen backbone)"
        else:
            self.summary["learns_from_pseudo_labels"] = "backbone and head"
        started = time.perf_counter()
        result = (self._consistency(context, model, strategy) if method == "consistency"
                  else self._self_training(context, model, strategy))
        self.summary["semi_seconds"] = round(time.perf_counter() - started, 1)
        return result

    def _held_out(self, context: RunContext, model: TransferModel, strategy: Strategy
                  ) -> tuple[np.ndarray, np.ndarray, str] | None:
        """Held-out (probabilities, labels, where): cv out-of-fold predictions, else the model's validation ones."""
        from transferkit.evaluation.crossfit import fold_probabilities

        if context.cv is not None:
            return context.cv.oof_probabilities, context.splits.train.labels, "cv out-of-fold predictions"
        if len(context.splits.val):
            return (fold_probabilities(model, strategy, context, context.splits.val), context.splits.val.labels,
                    "validation predictions")
        return None

    def _choose_level(self, held_out: tuple[np.ndarray, np.ndarray, str] | None) -> tuple[float, float, str]:
        if held_out is None:
            return DEFAULT_TAU, DEFAULT_ACCEPT, "defaults (no held-out predictions)"
        probabilities, labels, where = held_out
        tau, share = confidence_level(probabilities, labels, self.config.semi_precision)
        if share == 0.0:
            logger.warning("no held-out prediction is correct at precision %.2f, not even the most confident one: "
                           "self-training accepts no pseudo-label and consistency only the most confident (tau "
                           "0.99); lower --semi-precision or add labels", self.config.semi_precision)
        return min(max(tau, 0.5), 0.99), share, where

    def _self_training(self, context: RunContext, model: TransferModel, strategy: Strategy) -> TrainResult:
        from transferkit.evaluation.crossfit import fold_probabilities
        from transferkit.rundir import write_text

        c = self.config
        assert self.unlabelled is not None and self.truth is not None
        # every student starts where the teacher did (prepared, untrained): teachers and students are copies of
        # ``model``, which itself is trained only as the last student (a strategy may size its state by the data)
        base_dir = context.checkpoint_dir
        teacher = copy.deepcopy(model)
        result = strategy.train(teacher, self._round_context(context, base_dir, 0, context.splits,
                                                             context.train.epochs))
        self._score_teacher(context, teacher, strategy)
        level = self._choose_level(self._held_out(context, teacher, strategy))
        _, accept, where = level
        self.summary.update(accept_share=round(accept, 4), accept_chosen_by=where, rounds=[])
        logger.info("self-training: up to %.0f%% of each predicted class accepted (chosen by %s at precision %.2f)",
                    100 * accept, where, c.semi_precision)
        lines = ["round,id,pseudo_label,confidence,accepted"]
        names = list(context.splits.class_names)
        for r in range(1, c.semi_rounds + 1):
            probabilities = fold_probabilities(teacher, strategy, context, self.unlabelled)
            accepted, pseudo, thresholds = accept_per_class(probabilities, accept * r / c.semi_rounds)
            row = self._round_row(r, accepted, pseudo, thresholds, names)
            self.summary["rounds"].append(row)
            logger.info("self-training round %d/%d: %d of %d unlabelled items accepted (%.1f%%)%s", r, c.semi_rounds,
                        row["accepted"], len(accepted), 100 * row["acceptance_rate"],
                        f", pseudo-label accuracy {row['pseudo_label_accuracy']:.3f}"
                        if row.get("pseudo_label_accuracy") is not None else "")
            confidence = probabilities.max(1)
            lines += [f"{r},{self.unlabelled.ids[i]},{names[pseudo[i]]},{confidence[i]:.4f},{int(accepted[i])}"
                      for i in range(len(pseudo))]
            train = with_pseudo_labels(context.splits.train, self.unlabelled, accepted, pseudo)
            passes = SELF_TRAINING_PASSES if c.semi_epochs is None else c.semi_epochs
            epochs = student_epochs(passes, len(self.unlabelled), len(train), int(accepted.sum()),
                                    context.train.epochs)
            student = model if r == c.semi_rounds else copy.deepcopy(model)
            result = strategy.train(student, self._round_context(
                context, base_dir, r, dataclasses.replace(context.splits, train=train), epochs))
            teacher = student
        if context.run_dir is not None:
            write_text(Path(context.run_dir) / PSEUDO_LABELS_FILE, "\n".join(lines) + "\n")
            self.summary["pseudo_labels_file"] = PSEUDO_LABELS_FILE
        return result

    def _score_teacher(self, context: RunContext, teacher: TransferModel, strategy: Strategy) -> None:
        """The teacher is the same strategy trained on the labels alone (same settings and seed): its test accuracy
        is the supervised-only baseline of this run, recorded as ``teacher_test_accuracy`` (when there is a test
        split; never used for any choice)."""
        from transferkit.evaluation.crossfit import fold_probabilities

        test = context.splits.test
        if test is None or not len(test) or not (test.labels >= 0).any():
            return
        keep = test.labels >= 0
        probabilities = fold_probabilities(teacher, strategy, context, test)
        self.summary["teacher_test_accuracy"] = round(float((probabilities[keep].argmax(1) ==
                                                             test.labels[keep]).mean()), 4)
        logger.info("self-training: the teacher (labels only) scores %.4f on the test split",
                    self.summary["teacher_test_accuracy"])

    @staticmethod
    def _round_context(context: RunContext, base_dir: Path | None, r: int, splits: Any, epochs: int) -> RunContext:
        return dataclasses.replace(context, splits=splits, train=dataclasses.replace(context.train, epochs=epochs),
                                   checkpoint_dir=None if base_dir is None else Path(base_dir) / f"round{r}")

    def _round_row(self, r: int, accepted: np.ndarray, pseudo: np.ndarray, thresholds: dict[int, float],
                   names: list[str]) -> dict[str, Any]:
        assert self.truth is not None
        row: dict[str, Any] = {"round": r, "accepted": int(accepted.sum()),
                               "acceptance_rate": round(float(accepted.mean()), 4),
                               "thresholds": {names[k]: round(v, 4) for k, v in sorted(thresholds.items())}}
        known = accepted & (self.truth >= 0)
        if known.any():
            row["pseudo_label_accuracy"] = round(float((pseudo[known] == self.truth[known]).mean()), 4)
            row["pseudo_label_accuracy_all"] = round(float((pseudo[self.truth >= 0] ==
                                                            self.truth[self.truth >= 0]).mean()), 4)
        return row

    def _consistency(self, context: RunContext, model: TransferModel, strategy: Strategy) -> TrainResult:
        from transferkit.engine.lower_maps import lower_maps, map_view_loader
        from transferkit.rundir import scratch_files
        from transferkit.selftaught.consistency import (
            BATCH_KEY,
            ConsistencyObjective,
            consistency_epochs,
            view_description,
            view_loader,
        )

        c = self.config
        data, truth = self.unlabelled, self.truth
        assert data is not None and truth is not None
        if c.semi_threshold is not None:
            tau, where = c.semi_threshold, "--semi-threshold"
        else:
            tau, _, where = self._choose_level(self._held_out(context, model, strategy) if context.cv is not None
                                               else None)
        train = context.train
        # only the top groups train (``configure`` decided): the layers below run once per item and the views are
        # made on their maps, memory-mapped from a scratch file in the run's stage folder (a pool larger than the
        # memory), deleted after
        below = context.below_groups
        scratch = (None if context.run_dir is None or below is None
                   else Path(context.run_dir) / UNLABELLED_MAPS.replace("*", str(os.getpid())))
        passes = c.semi_epochs if c.semi_epochs is not None else (CACHED_PASSES if below is not None else None)
        epochs = max(train.epochs, consistency_epochs(len(context.splits.train), len(data), train.batch_size,
                                                      c.semi_ratio, passes))
        steps = int(np.ceil(len(context.splits.train) / train.batch_size))
        objective = ConsistencyObjective(tau, c.semi_weight, steps)
        unlabelled_batch = train.batch_size * c.semi_ratio
        if below is None:
            views = view_description(data.modality)

            def unlabelled_loader(backbone: Any) -> Any:
                return view_loader(data, backbone, unlabelled_batch, train.seed, truth)
        else:
            views = (f"views of cached maps below the top {below} layer groups (weak: flip + shift; strong: also "
                     "cutout + channel dropout)")

            def unlabelled_loader(backbone: Any) -> Any:
                maps = lower_maps(backbone, data, below, context.progress, out=scratch)
                return map_view_loader(maps, below, unlabelled_batch, train.seed, truth)
        run = dataclasses.replace(
            context, train=dataclasses.replace(train, epochs=epochs), objectives=[*context.objectives, objective],
            aux_loaders={**context.aux_loaders, BATCH_KEY: unlabelled_loader})
        logger.info("consistency: tau %.3f (%s), %d epochs, %d unlabelled items per step, %s", tau, where, epochs,
                    unlabelled_batch, views)
        with scratch_files(Path(context.run_dir), UNLABELLED_MAPS) if scratch is not None else nullcontext():
            result = strategy.train(model, run)
        epochs_rows = objective.summary()
        self.summary.update(tau=round(tau, 4), tau_chosen_by=where, epochs=epochs, views=views, rounds=epochs_rows)
        return result

    # --- after training ----------------------------------------------------------------------------------
    def metrics(self, context: RunContext, model: TransferModel) -> dict[str, Any]:
        metrics: dict[str, Any] = {"semi": dict(self.summary)}
        if context.scored_out_of_fold():
            metrics["caveats"] = [CV_CAVEAT]
        return metrics
