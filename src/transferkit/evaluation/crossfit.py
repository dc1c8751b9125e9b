"""``fit --protocol cv``: spend no label on a fixed split. Choose settings inside stratified folds, estimate the
accuracy out of fold, then refit the final model on every labelled item with the chosen settings.

* Which protocol (:func:`plan_protocol`): ``auto`` is ``cv`` when the data provides no test or validation split of
  its own and its smallest class has fewer than :func:`cv_max_class_size` items (then a carved 20% test split
  would be a handful of items per class and the carved validation split fewer still), else ``holdout`` (today's
  train / validation / test split). The threshold is 100 for frozen-backbone strategies, whose folds cost seconds
  on cached features (measured, bench/results/protocol_threshold.md: for the probe cv beats holdout by 1.6-2.0
  points at 10, 20 and 50 items per class and is level at 100), and 50 for trained ones, where each fold is a full
  training run. ``--protocol cv`` with a given test split cross-validates on the training
  (and validation) items, refits on them and is scored on the test split.
* What is chosen (:func:`cross_validate_fit`): for the closed-form linear probe, its inverse L2 strength C from
  :data:`PROBE_C_GRID` (repeated k-fold, :data:`FROZEN_REPEATS` repeats: each fold is a few L-BFGS solves on
  cached features); for strategies trained by the engine, the number of epochs: every fold trains for
  ``--epochs`` without early stopping, its validation predictions after each epoch are the candidates, and the
  epoch count whose pooled out-of-fold predictions are most accurate is used for the refit (one repeat: each
  fold is a full training run). The learning rate is not searched (a grid of full trainings per fold).
* The refit trains on all labelled items with no validation split (fixed epochs, last weights). Its cosine
  schedule spans the chosen epoch count, so it anneals over the same number of passes the folds were scored at.
* The out-of-fold probabilities stand in for the validation split: they give ``accuracy`` (``accuracy_split:
  "cv"``), the confusion matrix, the temperature of ``--temperature-scale`` (fitted on them and applied to the
  refit model, as scikit-learn's ``CalibratedClassifierCV(ensemble=False)`` does) and the run report. They are
  saved as ``cv_predictions.csv`` (id, label, prediction, one probability per class).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from transferkit.data.base import DataSplits, ItemPositions, LabeledData, SubsetSource
from transferkit.engine.callbacks import Callback
from transferkit.engine.context import RunContext
from transferkit.errors import TransferkitError
from transferkit.evaluation.protocol import CVResult, FoldOutput, check_cross_validatable, cross_validate
from transferkit.rundir import atomic_path

if TYPE_CHECKING:
    from transferkit.config import FitConfig
    from transferkit.extensions import FitExtension
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy

logger = logging.getLogger(__name__)

CV_MAX_CLASS_SIZE = 50  # auto: cross-validate when the smallest class has fewer items than this (trained strategies)
CV_MAX_CLASS_SIZE_FROZEN = 100  # the same for frozen-backbone strategies (folds on cached features)
PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # candidates for the probe's C (scikit-learn's objective)
FROZEN_REPEATS = 3  # repeats of k-fold for strategies whose folds are cheap (closed-form probe on cached features)
PREDICTIONS_FILE = "cv_predictions.csv"
#: extensions whose effect is per training run and so carries into every fold (objectives) or that the cv
#: protocol handles itself (calibration on the OOF predictions; the data check runs once, on all labels; semi-supervised
#: training: the folds are supervised and choose its settings, then one semi-supervised run uses every label;
#: tracking logs the published run: options, the cv estimate, final metrics, the refit's history, the run folder)
CV_EXTENSIONS = ("anchor", "calibration", "data check", "semi", "tracking")


def cv_max_class_size(strategy: str) -> int:
    """``--protocol auto`` cross-validates when the smallest class has fewer items than this (module docstring)."""
    from transferkit.strategies import strategy_class

    return CV_MAX_CLASS_SIZE_FROZEN if strategy_class(strategy).frozen_backbone else CV_MAX_CLASS_SIZE


def plan_protocol(fit: FitConfig, seed: int, *, extensions: list[FitExtension] = (), processes: int = 1
                  ) -> DataSplits:
    """Load ``fit.data`` for ``fit.protocol`` (see the module docstring for the ``auto`` rule). The splits'
    ``protocol`` says which one applies; under cv, ``train`` is every labelled item and ``val`` is empty."""
    from transferkit.data import load_data

    options = {"text_column": fit.text_column, "label_column": fit.label_column,
               "limit_per_class": fit.limit_per_class, "seed": seed, "val_fraction": fit.val_fraction,
               "test_limit": fit.test_limit}
    if fit.protocol == "holdout":
        return load_data(fit.data, test_fraction=fit.test_fraction, **options)
    splits = load_data(fit.data, test_fraction=0.0, **options)
    pool = labelled_pool(splits)
    counts = pool.class_counts()
    unsupported = [e.describe() for e in extensions if e.name not in CV_EXTENSIONS]
    if fit.protocol == "auto":
        reason = None
        if splits.given:
            reason = f"the data has its own {' and '.join(splits.given)} split"
        elif counts.min() >= (limit := cv_max_class_size(fit.strategy)):
            reason = f"the smallest class has {counts.min()} items (cv below {limit} for {fit.strategy})"
        elif counts.min() < 2:
            reason = "a class has a single labelled item, too few to cross-validate"
        elif unsupported:
            reason = f"{', '.join(unsupported)} runs on a train / validation split"
        elif processes > 1:
            reason = "data-parallel training runs on a train / validation split"
        if reason is not None:
            if splits.test is None:  # carve the test split that holdout scores on
                splits = load_data(fit.data, test_fraction=fit.test_fraction, **options)
            splits.notes.append(f"protocol holdout: {reason}")
            return splits
        reason = f"cv: no split of its own and the smallest class has {counts.min()} items"
    else:
        reason = "--protocol cv"
        if unsupported:
            raise TransferkitError(f"--protocol cv does not support {', '.join(unsupported)} (it trains on a train / "
                                   "validation split)",
                                   "use --protocol holdout for it")
        if processes > 1:
            raise TransferkitError("--protocol cv runs in one process", "use --protocol holdout with torchrun")
    check_cross_validatable(pool.labels, pool.class_names)
    cv_splits = DataSplits(train=pool, val=pool.subset(np.arange(0), name=f"{pool.name}/val"), test=splits.test,
                           notes=[n for n in splits.notes if "validation" not in n], source=splits.source,
                           given=splits.given, protocol="cv")
    cv_splits.notes.append(f"protocol {reason}: settings chosen by stratified k-fold on the {len(pool)} labelled "
                           "items, final model refit on all of them")
    return cv_splits


def labelled_pool(splits: DataSplits) -> LabeledData:
    """Train and validation items as one LabeledData in the source's order (so the folds depend only on the
    data and the seed, not on how the validation split was carved)."""
    from transferkit.evaluation.transferability import labelled_pool as union

    pool = union(splits)
    if isinstance(pool.items, SubsetSource):
        pool = pool.subset(np.argsort(pool.items.indices, kind="stable"), name=splits.train.name.rsplit("/", 1)[0])
    return pool


# --- the folds -------------------------------------------------------------------------------------------------


def cross_validate_fit(model: TransferModel, strategy: Strategy, context: RunContext,
                       extensions: list[FitExtension], fit: FitConfig) -> CVResult:
    """Cross-validate ``strategy`` on ``context.splits.train`` (every labelled item), then set the chosen
    settings on ``strategy.config`` / ``context.train`` for the refit. ``model`` is the prepared, untrained model
    (each fold trains a copy of it)."""
    from transferkit.strategies.linear_probe import LinearProbe

    pool = context.splits.train
    seed = context.train.seed
    features = _PoolFeatures(context, model, pool)
    progress = _fold_logger(strategy.name)
    if isinstance(strategy, LinearProbe) and strategy.config.solver == "lbfgs":
        result = cross_validate(_probe_folds(features, pool, strategy.config.probe_max_iter), pool,
                                repeats=FROZEN_REPEATS, seed=seed, settings=lambda i: {"probe_c": PROBE_C_GRID[i]},
                                on_fold=progress)
        strategy.config.probe_c = result.chosen["probe_c"]
    else:
        initial = copy.deepcopy(model)
        fold_train = dataclasses.replace(context.train, early_stopping=0)
        repeats = FROZEN_REPEATS if strategy.frozen_backbone and not _uses_engine(strategy) else 1

        store = FoldCheckpoints(Path(context.checkpoint_dir) / "cv") if context.checkpoint_dir else None

        def train_and_predict(train: LabeledData, val: LabeledData) -> FoldOutput:
            return _train_fold(copy.deepcopy(initial), strategy, context, extensions, fit, features,
                               fold_train, train, val, checkpoint_dir=store.active if store is not None else None)

        result = cross_validate(train_and_predict, pool, repeats=repeats, seed=seed,
                                settings=lambda i: {"epochs": i + 1}, on_fold=progress, store=store)
        if "epochs" in result.chosen:
            context.train.epochs = result.chosen["epochs"]
    logger.info("cv (%d folds x %d): out-of-fold accuracy %.4f, fold mean %.4f (sd %.4f); chosen %s", result.k,
                result.repeats, result.oof_accuracy, result.mean, result.sd, result.chosen or "nothing to choose")
    context.cv = result
    if context.run_dir is not None:
        write_predictions(Path(context.run_dir) / PREDICTIONS_FILE, pool, result.oof_probabilities)
    return result


def _uses_engine(strategy: Strategy) -> bool:
    return getattr(getattr(strategy, "config", None), "solver", None) == "sgd"


def _fold_logger(name: str):
    def report(index: int, total: int, accuracy: float) -> None:
        logger.info("cv %s: fold %d/%d, validation accuracy %.4f", name, index, total, accuracy)

    return report


class _PoolFeatures:
    """The frozen backbone's features of every labelled item, extracted once; folds take rows by item id."""

    def __init__(self, context: RunContext, model: TransferModel, pool: LabeledData) -> None:
        self.context, self.backbone, self.pool = context, model.backbone, pool
        self.positions = ItemPositions(pool)
        self._features: np.ndarray | None = None
        self._digest: str | None = None

    def rows(self, data: LabeledData) -> np.ndarray:
        positions = self.positions.of(data)
        if positions is None:
            raise KeyError("not a subset of the labelled pool")
        if self._features is None:
            self._features = self.context.features(self.backbone, self.pool)
        return self._features[positions]

    def features(self, backbone: Any, data: LabeledData) -> np.ndarray | None:
        """Rows of the pool's features when ``backbone`` still has the pool backbone's weights, else None."""
        from transferkit.engine.features import weights_digest

        if self._digest is None:
            self._digest = weights_digest(self.backbone)
        if backbone.preprocess_signature() != self.backbone.preprocess_signature() or \
                weights_digest(backbone) != self._digest:
            return None
        try:
            return self.rows(data)
        except KeyError:
            return None


def _probe_folds(features: _PoolFeatures, pool: LabeledData, max_iter: int):
    """Folds of the closed-form probe: one L-BFGS solve per C of the grid on the fold's cached features."""
    from transferkit.engine.solvers import fit_logistic_regression

    def train_and_predict(train: LabeledData, val: LabeledData) -> FoldOutput:
        x, xv = np.asarray(features.rows(train)), torch.as_tensor(features.rows(val))
        candidates, solution = [], None
        for c in PROBE_C_GRID:  # increasing C, each solve warm-started from the previous (a regularisation path)
            solution = fit_logistic_regression(x, train.labels, pool.num_classes, c=c, max_iter=max_iter,
                                               init=solution)  # on the CPU, like the features
            candidates.append(torch.softmax(xv @ solution[0].T + solution[1], -1).cpu().numpy())
        return FoldOutput(candidates=candidates)

    return train_and_predict


class _EpochCandidates(Callback):
    """A fold's validation probabilities after every epoch (the candidates of the epoch choice), kept in the
    fold's engine checkpoints so that a fold interrupted after epoch e resumes with epochs 1..e's candidates."""

    def __init__(self) -> None:
        self.per_epoch: list[np.ndarray] = []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"candidates": torch.as_tensor(np.stack(self.per_epoch))} if self.per_epoch else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        from transferkit.engine.placement import to_numpy

        self.per_epoch = list(to_numpy(tensors["candidates"])) if "candidates" in tensors else []


def _train_fold(model: TransferModel, strategy: Strategy, context: RunContext, extensions: list[FitExtension],
                fit: FitConfig, features: _PoolFeatures, train_cfg: Any, train: LabeledData,
                val: LabeledData, checkpoint_dir: Path | None = None) -> FoldOutput:
    """Train a copy of the untrained model on one fold; the validation probabilities after every epoch are
    the candidates (one array when the strategy does not train by epochs). ``checkpoint_dir``: where the fold's
    engine checkpoints go (an interrupted fold resumes from its last epoch)."""
    from transferkit.engine.trainer import classification_metrics, seed_everything

    recorder = _EpochCandidates()

    def recording_evaluate(module: Any, loader: Any, accelerator: Any, forward_fn: Any) -> dict[str, float]:
        from transferkit.engine.objectives import primary_logits

        probabilities = np.zeros((len(val), val.num_classes))

        def capture(m: Any, batch: dict[str, Any]) -> Any:
            output = forward_fn(m, batch)
            logits = primary_logits(output).detach().float()
            probabilities[batch["index"].cpu().numpy()] = torch.softmax(logits, -1).cpu().numpy()
            return output

        metrics = classification_metrics(module, loader, accelerator, capture)
        recorder.per_epoch.append(probabilities)
        return metrics

    fold_context = _FoldContext(
        splits=DataSplits(train=train, val=val, test=None), train=train_cfg, label_smoothing=context.label_smoothing,
        checkpoint_dir=checkpoint_dir, run_dir=None, cache_dir=context.cache_dir, progress=False,
        evaluate_fn=recording_evaluate, callbacks=[recorder], pool_features=features,
        below_groups=context.below_groups, map_pool=context.map_pool)
    for ext in extensions:
        if ext.name == "anchor":  # objectives anchored to this fold's copy of the initial weights
            fold_context = ext.configure(fold_context, model, fit)
    seed_everything(train_cfg.seed)
    strategy.train(model, fold_context)
    if recorder.per_epoch:
        return FoldOutput(candidates=recorder.per_epoch)
    return FoldOutput(fold_probabilities(model, strategy, fold_context, val))


def fold_probabilities(model: TransferModel, strategy: Strategy, context: RunContext, data: LabeledData) -> np.ndarray:
    """Class probabilities of ``data`` under a trained model (through cached features when the backbone is frozen)."""
    from transferkit.engine.placement import predict_batches
    from transferkit.inference import predict_proba_model

    if strategy.frozen_backbone:
        x = torch.as_tensor(context.features(model.backbone, data), dtype=torch.float32)
        return predict_batches(model, [x], lambda x: torch.softmax(model.forward_head(x).logits.float(), -1))
    return predict_proba_model(model, data, batch_size=max(32, context.train.batch_size))


@dataclasses.dataclass
class _FoldContext(RunContext):
    """A RunContext whose frozen-backbone features come from the pool's, extracted once for all folds."""

    pool_features: _PoolFeatures | None = None

    def features(self, backbone: Any, data: LabeledData, shard: bool = False) -> np.ndarray:
        rows = self.pool_features.features(backbone, data) if self.pool_features is not None else None
        return rows if rows is not None else super().features(backbone, data, shard)


class FoldCheckpoints:
    """Finished folds of a run's cross-validation in its checkpoint folder (``checkpoint/cv/fold-NN.safetensors``,
    the trainer checkpoint format: tensors plus a JSON header, never pickle), and the engine checkpoints of the
    fold in training (``fold-NN-KEY.partial/``, every epoch). They keep an interrupted run's stage folder for
    ``--resume``, which then trains only the folds that did not finish, the interrupted one from its last epoch;
    publishing the run removes them with the rest of the checkpoint."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.active: Path | None = None  # the engine checkpoints of the fold in training

    def path(self, index: int) -> Path:
        return self.folder / f"fold-{index:02d}.safetensors"

    def start(self, index: int, key: str) -> None:
        """Fold ``index`` (items ``key``) trains next: its epochs are checkpointed in ``fold-NN-KEY.partial``; the
        partial epochs of another split of the items at that index (ours) are removed."""
        self.active = self.folder / f"fold-{index:02d}-{key[:16]}.partial"
        for stale in self.folder.glob(f"fold-{index:02d}-*.partial") if self.folder.is_dir() else []:
            if stale != self.active:
                shutil.rmtree(stale, ignore_errors=True)

    def load(self, index: int, key: str) -> FoldOutput | None:
        from transferkit.engine.checkpoint import load_checkpoint
        from transferkit.engine.placement import to_numpy

        path = self.path(index)
        if not path.is_file():
            return None
        sections, state = load_checkpoint(path)
        if state.get("fold_key") != key:  # another split of the items: train the fold again
            logger.info("cv: %s belongs to another split; the fold is trained again", path.name)
            return None
        arrays = sections.get("fold", {})
        candidates = [to_numpy(arrays[f"candidate_{i}"]) for i in range(int(state.get("candidates", 0)))]
        probabilities = to_numpy(arrays["probabilities"]) if "probabilities" in arrays else None
        logger.info("cv: fold %d restored from %s (--resume)", index + 1, path.name)
        return FoldOutput(probabilities, candidates, dict(state.get("curves", {})))

    def save(self, index: int, key: str, output: FoldOutput) -> None:
        from transferkit.engine.checkpoint import save_checkpoint

        tensors = {f"candidate_{i}": torch.as_tensor(np.asarray(c)) for i, c in enumerate(output.candidates)}
        if output.probabilities is not None:
            tensors["probabilities"] = torch.as_tensor(np.asarray(output.probabilities))
        save_checkpoint(self.path(index), {"fold": tensors},
                        {"fold_key": key, "candidates": len(output.candidates), "curves": output.curves})
        if self.active is not None:  # the finished fold replaces its epochs' checkpoints
            shutil.rmtree(self.active, ignore_errors=True)
            self.active = None


# --- results -----------------------------------------------------------------------------------------------------


def cv_report(cv: CVResult, pool: LabeledData) -> dict[str, Any]:
    """The evaluation report (accuracy, macro-F1, confusion matrix, ...) of the out-of-fold predictions."""
    from transferkit.evaluation.metrics import classification_report

    return classification_report(pool.labels, cv.oof_probabilities, list(pool.class_names))


def write_predictions(path: Path, pool: LabeledData, probabilities: np.ndarray) -> None:
    """``cv_predictions.csv``: id, label, prediction and one probability column per class."""
    names = list(pool.class_names)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label", "prediction", *(f"p_{n}" for n in names)])
        for item_id, label, p in zip(pool.ids, pool.labels, probabilities):
            writer.writerow([item_id, names[label], names[int(p.argmax())], *(f"{v:.6g}" for v in p)])


def read_predictions(run_dir: Path, class_names: list[str]) -> dict[str, np.ndarray] | None:
    """The out-of-fold probabilities of a cv run by item id (None when the run has none)."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    columns = [header.index(f"p_{n}") for n in class_names]
    return {row[0]: np.array([float(row[c]) for c in columns]) for row in rows[1:]}


def fit_cv_temperature(cv: CVResult, labels: np.ndarray) -> dict[str, Any]:
    """Temperature scaling on the out-of-fold predictions: ``log p`` are logits up to a per-item constant, which
    the softmax ignores, so ``softmax(log p / T)`` is the temperature-scaled prediction."""
    from transferkit.evaluation.calibration import expected_calibration_error, fit_temperature, softmax

    logits = np.log(np.clip(cv.oof_probabilities, 1e-12, None))
    temperature = fit_temperature(logits, labels)
    return {"temperature": temperature, "fitted_on": f"out-of-fold predictions ({cv.k}-fold cv x {cv.repeats})",
            "n": int(len(labels)), "val_ece_before": expected_calibration_error(softmax(logits), labels),
            "val_ece_after": expected_calibration_error(softmax(logits, temperature), labels)}
