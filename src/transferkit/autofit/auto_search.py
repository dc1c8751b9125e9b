"""``transferkit auto``: the best model for a small labelled dataset within a wall-clock budget.

1. Every labelled item is used: candidates are scored by stratified k-fold cross-validation
   (:func:`transferkit.evaluation.protocol.cross_validate`, the same folds for every candidate of a kind, so scores
   are paired; trained candidates use fewer folds, ``Candidate.folds``, each fold being a full training run); every
   candidate's out-of-fold predictions cover every item once. An explicit test split is never looked at.
2. Cheap candidates first (linear probes on cached features of EfficientNet-Lite0/1/2 or MiniLM at several
   resolutions, with and without flip test-time augmentation), then trained ones (LP-FT, LoRA, adapters,
   contrastive). Before a candidate starts, its cost is estimated from measurements (feature-extraction speed of the
   backbone under the current load; two timed training steps); what would not fit the remaining budget is skipped.
   Racing, a form of successive halving: after each fold a trained candidate whose accuracy on the items validated so
   far trails the leader's out-of-fold accuracy on the same items by more than one binomial standard error is
   stopped; so is one whose next epoch (as long as its last) or remaining folds would not fit the budget.
3. The final model is the committee (the probes of every backbone at its own resolution, averaged with equal
   weights: no selection) unless the best candidate beats it by more than the winner's curse explains (``sqrt(2 ln m)``
   paired standard errors for the best of ``m``); then the best candidate or a greedy ensemble of several
   (``autofit.ensemble``) when that lowers the out-of-fold cross-entropy without lowering out-of-fold accuracy. The
   final model is refit on all labelled items.

The output is an ordinary run folder (``model/``, ``metrics.json`` with ``accuracy_split: "cv"``) plus
``leaderboard.json`` / ``leaderboard.md``. Finished candidates are stored atomically in the staging folder, so an
interrupted ``auto`` continues with ``--resume`` without redoing them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.autofit.ensemble import (
    accuracy,
    combine,
    committee,
    log_loss,
    preferred_start,
    save_ensemble,
    select_ensemble,
)
from transferkit.autofit.space import Candidate, default_space
from transferkit.errors import TransferkitError, check_count

logger = logging.getLogger(__name__)

LEADERBOARD_JSON = "leaderboard.json"
LEADERBOARD_MD = "leaderboard.md"
RESULTS_FOLDER = "checkpoint/candidates"  # in the staging folder: kept by OutputFolder.abandon for --resume
#: fraction of the budget the search plans to use; refit, saving and the process's start-up take the rest
PLANNED_FRACTION = 0.85
#: racing stops a candidate only after this many validated items (a fold of 8 tweets is too noisy to judge)
RACING_MIN_ITEMS = 30
#: seconds kept for writing the output (model files, metrics, leaderboard)
WRITE_SECONDS = 20.0
#: static inference cost (seconds per item on one modern CPU core-pair) at the reference resolution, used until
#: this process has measured the real speed
STATIC_SECONDS_PER_ITEM = {"efficientnet_lite0": 0.05, "efficientnet_lite1": 0.07, "efficientnet_lite2": 0.1,
                           "minilm": 0.01}


@dataclass
class AutoConfig:
    """Options of ``transferkit auto`` (the CLI flags are generated from these fields)."""

    data: str = field(default="", metadata={"help": "A folder of images, a .csv/.jsonl text file or a built-in "
                                             "dataset name."})
    out: str = field(default="", metadata={"help": "The run folder to write (evaluate / predict / report work on it)."})
    time_budget: str = field(default="10m", metadata={"help": "Wall-clock budget of the whole command: 600, 600s, "
                                                       "10m or 1h."})
    seed: int = field(default=0, metadata={"help": "Seed of the folds, the training and the augmentation."})
    limit_per_class: int | None = field(default=None, metadata={"help": "Use at most this many labelled items per "
                                                                "class (drawn with --seed)."})
    text_column: str | None = field(default=None, metadata={"help": "Text column of a .csv/.jsonl file."})
    label_column: str | None = field(default=None, metadata={"help": "Label column of a .csv/.jsonl file."})
    backbones: list[str] | None = field(default=None, metadata={"help": "Backbones to search (default: "
                                                                 "efficientnet_lite0/1/2 for images, minilm for text)."})
    # list[str]: comma-separated values such as "112,224" arrive as text; validate() turns them into pixels
    image_sizes: list[str] | None = field(default=None, metadata={"help": "Input resolutions to search (default: "
                                                                   "each backbone's own and 3/4 of it)."})
    strategies: list[str] | None = field(default=None, metadata={"help": "Restrict the search to these strategies."})
    folds: int | None = field(default=None, metadata={"help": "k of the k-fold cross-validation (default: "
                                                       "min(5, size of the smallest class))."})
    max_ensemble: int = field(default=6, metadata={"help": "Most members of the final ensemble (1: no ensemble; 6 "
                                                     "holds the committee of EfficientNet-Lite0/1/2 probes)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Feature cache (default ~/.cache/transferkit)."})
    device: str = field(default="auto", metadata={"help": "Where features are extracted and candidates train: auto "
                                                 "(a GPU when there is one), cpu, cuda, cuda:N or mps."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished auto folder at --out."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted auto, keeping finished candidates."})
    progress: bool = field(default=True, metadata={"help": "Log what is being tried and the time left."})

    def validate(self) -> float:
        """Checks the options (list options may be comma-separated text); returns the budget in seconds."""
        from transferkit.config import parse_duration, split_list
        from transferkit.engine.placement import check_device_spec

        if not self.data:
            raise TransferkitError("no data given", "pass --data PATH or a built-in dataset name")
        if not self.out:
            raise TransferkitError("no output folder given", "pass --out RUN")
        budget = parse_duration(self.time_budget)
        self.backbones = split_list(self.backbones)
        self.strategies = split_list(self.strategies)
        sizes = split_list(self.image_sizes)
        try:
            self.image_sizes = [int(s) for s in sizes] if sizes else None
        except ValueError:
            raise TransferkitError(f"invalid --image-sizes {','.join(sizes or [])}", "pass whole numbers of pixels, "
                                   "e.g. --image-sizes 112,224") from None
        if self.image_sizes and min(self.image_sizes) < 16:
            raise TransferkitError(f"invalid --image-sizes {min(self.image_sizes)}", "use at least 16 pixels")
        self.seed = check_count("--seed", self.seed, 0, 2**32 - 1)  # NumPy's seed range
        if self.limit_per_class is not None:
            self.limit_per_class = check_count("--limit-per-class", self.limit_per_class, 1)
        if self.folds is not None:
            self.folds = check_count("--folds", self.folds, 2)
        self.max_ensemble = check_count("--max-ensemble", self.max_ensemble, 1)
        check_device_spec(self.device)
        return budget


def process_start_time() -> float:
    """``time.time()`` at which this process started (Linux ``/proc``), so the budget covers the start-up too."""
    try:
        import os

        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
        if started <= time.time():
            return started
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return _IMPORTED_AT


_IMPORTED_AT = time.time()


class Clock:
    """The budget: ``deadline`` in ``time.time()`` seconds; ``left()`` what remains of the planned part."""

    def __init__(self, budget: float, started: float) -> None:
        self.budget = budget
        self.started = started
        self.deadline = started + budget

    def elapsed(self) -> float:
        return time.time() - self.started

    def left(self) -> float:
        return self.started + PLANNED_FRACTION * self.budget - time.time()

    def stamp(self) -> str:
        return f"[{_mmss(self.elapsed())} of {_mmss(self.budget)}, {_mmss(max(0.0, self.budget - self.elapsed()))} left]"


def _mmss(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class _Stopped(Exception):
    """Raised from a fold callback to stop a candidate (behind the leader, or out of time)."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


# --- the search --------------------------------------------------------------------------------------------------


class AutoSearch:
    """One ``auto`` run: data, folds, budget and the finished candidates' results."""

    def __init__(self, config: AutoConfig, budget: float, started: float) -> None:
        from transferkit.data import load_data
        from transferkit.engine.features import default_cache_dir
        from transferkit.evaluation.protocol import check_cross_validatable, default_k
        from transferkit.evaluation.transferability import labelled_pool

        self.config = config
        self.clock = Clock(budget, started)
        splits = load_data(config.data, text_column=config.text_column, label_column=config.label_column,
                           limit_per_class=config.limit_per_class, seed=config.seed, test_fraction=0.0)
        self.splits = splits
        self.data = labelled_pool(splits)
        self.data.name = f"{Path(str(config.data)).name or config.data}/labelled"
        check_cross_validatable(self.data.labels, self.data.class_names)
        smallest = int(self.data.class_counts().min())
        self.k = default_k(self.data.labels) if config.folds is None else config.folds
        if self.k > smallest:
            raise TransferkitError(f"--folds {self.k} is more than the smallest class ({smallest} items)",
                                   f"use --folds {smallest} or fewer")
        from transferkit.backbones import check_backbone_modality, check_backbone_name, list_backbones

        for name in config.backbones or []:  # refused as fit refuses it, before the search starts
            check_backbone_modality(name, self.data.modality)
        self.space = default_space(self.data.modality, config.backbones, config.image_sizes, config.strategies,
                                   class_names=self.data.class_names)

        list_backbones()  # imports the backbone libraries now: start-up, not the first candidate's measured cost
        for name in {c.backbone for c in self.space}:
            check_backbone_name(name)
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.results: dict[str, dict[str, Any]] = {}  # candidate slug -> stored result
        self.tables: dict[tuple[str, int | None, tuple[int, ...]], Any] = {}
        self.speed: dict[tuple[str, int | None], float] = {}  # measured inference seconds per item
        self.slowdown = 1.0  # measured / static cost, learnt as candidates finish
        #: (backbone, image size, depth of back-propagation) -> seconds_per_item + build time: measured once, shared
        #: by the strategies that back-propagate as deep (their step costs are close)
        self.measured: dict[tuple[str, int | None, str], tuple[float, float, float]] = {}

    # --- bookkeeping -------------------------------------------------------------------------------------
    def log(self, message: str, *args: Any) -> None:
        if self.config.progress:
            logger.info("%s " + message, self.clock.stamp(), *args)

    def variants(self) -> dict[str, dict[str, Any]]:
        """Every scored variant (candidate, with or without TTA) by name: its CV summary and OOF probabilities."""
        out = {}
        for result in self.results.values():
            for variant in result.get("variants", []):
                out[variant["name"]] = variant
        return out

    def leader(self) -> dict[str, Any] | None:
        scored = [v for v in self.variants().values() if v.get("complete")]
        return max(scored, key=lambda v: (v["cv"]["mean"], -v["log_loss"]), default=None)

    # --- cost estimates -------------------------------------------------------------------------------------
    def inference_seconds(self, candidate: Candidate) -> float:
        key = (candidate.backbone, candidate.image_size)
        if key in self.speed:
            return self.speed[key]
        same = [(size, s) for (b, size), s in self.speed.items() if b == candidate.backbone and size]
        if same and candidate.image_size:
            size, s = same[0]
            return s * (candidate.image_size / size) ** 2
        static = STATIC_SECONDS_PER_ITEM.get(candidate.backbone, 0.05)
        if candidate.image_size:
            static *= (candidate.image_size / 224) ** 2
        return static * self.slowdown

    def estimate(self, candidate: Candidate) -> tuple[float, float]:
        """(seconds to score by CV, seconds to refit on every item) of ``candidate``."""
        n = len(self.data)
        if candidate.kind == "features":
            if self.table_key(candidate) in self.tables or self.host_table(candidate) is not None:
                return 1.0, 1.0
            copies = 2 if self.data.modality == "image" else 1
            return 3.0 + copies * n * self.inference_seconds(candidate), 1.0
        train_item, infer, build = self.measured.get(self.measure_key(candidate)) or self.measure(candidate)
        k = self.folds(candidate)
        extra = int(candidate.options.get("label_examples", 0)) * self.data.num_classes  # class-name sentences
        n_train = n * (k - 1) / k + extra
        if candidate.strategy == "contrastive":  # SetFit's sentence pairs, two encoder passes each
            from transferkit.strategies.fewshot import contrastive_pairs

            pairs = len(contrastive_pairs(np.concatenate([self.data.labels, np.arange(extra) % self.data.num_classes])))
            epochs = int(candidate.options.get("contrastive_epochs", 1))
            passes_all, passes_fold = 2 * pairs * epochs, 2 * pairs * epochs * ((k - 1) / k) ** 2
        else:
            epochs = int(candidate.options.get("epochs", 1))
            passes_all, passes_fold = epochs * (n + extra), epochs * n_train
        fold = build + passes_fold * train_item + n_train * infer + 2 * (n / k) * infer
        refit = build + passes_all * train_item + n * infer
        return k * fold, refit

    def folds(self, candidate: Candidate) -> int:
        """k of the cross-validation scoring ``candidate``: its own (fewer, for trained candidates) or the search's."""
        return min(self.k, candidate.folds) if candidate.folds else self.k

    def measure(self, candidate: Candidate) -> tuple[float, float, float]:
        """(training seconds per item and epoch, inference seconds per item, model build seconds), measured on a
        batch of 8 items when there is time for it, else the static estimate scaled by the measured slowdown."""
        from transferkit.autofit.training import seconds_per_item

        infer = self.inference_seconds(candidate)
        static = (3.5 * infer, infer, 3.0)
        n = len(self.data)
        rough = self.folds(candidate) * (3.0 + int(candidate.options.get("epochs", 1)) * n * static[0])
        if self.clock.left() < 30 or rough > 3 * self.clock.left():  # clearly out of reach: not worth measuring
            return static
        started = time.perf_counter()
        train_item, infer = seconds_per_item(candidate, self.data, self.config.seed, self.config.device)
        key = self.measure_key(candidate)
        self.measured[key] = (train_item, infer, time.perf_counter() - started)
        return self.measured[key]

    @staticmethod
    def measure_key(candidate: Candidate) -> tuple[str, int | None, str]:
        from transferkit.autofit.training import trained_depth

        return candidate.backbone, candidate.image_size, trained_depth(candidate)

    def refit_reserve(self, extra: float = 0.0) -> float:
        """Seconds to keep for the final refit: the costliest refit among the leader and a new candidate."""
        leader = self.leader()
        costs = [extra]
        if leader is not None:
            costs.append(self.results[leader["candidate"]]["refit_seconds"])
        return max(costs) + WRITE_SECONDS

    # --- scoring ------------------------------------------------------------------------------------------
    def run(self, results_dir: Path) -> None:
        from transferkit.rundir import write_json

        for path in sorted(results_dir.glob("*.json")):
            import json

            stored = json.loads(path.read_text())
            self.results[stored["candidate"]] = stored
        done = sum(1 for c in self.space if c.slug in self.results)
        if done:
            self.log("resuming: %d finished candidates kept", done)
        self.log("%d labelled items, %d classes, %d-fold cross-validation; %d candidates", len(self.data),
                 self.data.num_classes, self.k, len(self.space))
        for index, candidate in enumerate(self.space, 1):
            if candidate.slug in self.results:
                continue
            cost, refit = self.estimate(candidate)
            if cost + self.refit_reserve(refit) > self.clock.left():
                self.log("skip %d/%d %s: needs about %s, %s left", index, len(self.space), candidate.name,
                         _mmss(cost + refit), _mmss(max(0.0, self.clock.left())))
                self.results[candidate.slug] = {"candidate": candidate.slug, "spec": candidate.to_dict(),
                                                "status": "skipped: would not fit the budget",
                                                "estimated_seconds": round(cost, 1), "variants": [],
                                                "refit_seconds": refit, "stored": False}
                continue
            self.log("try %d/%d %s (about %s)", index, len(self.space), candidate.name, _mmss(cost))
            started = time.perf_counter()
            result = self.score(candidate, refit)
            result["seconds"] = round(time.perf_counter() - started, 1)
            result["estimated_seconds"] = round(cost, 1)
            if cost > 5:
                self.slowdown = float(np.clip(self.slowdown * (0.5 + 0.5 * result["seconds"] / cost), 0.2, 20))
            self.results[candidate.slug] = result
            if result["status"] == "done":  # finished candidates survive an interruption (--resume)
                write_json(results_dir / f"{candidate.slug}.json", {**result, "stored": True})
            best = max((v for v in result["variants"]), key=lambda v: v["cv"]["mean"], default=None)
            self.log("%s %s: %s", result["status"], candidate.name,
                     f"CV accuracy {best['cv']['mean']:.4f} ± {best['cv']['sd']:.4f} ({best['name']})" if best
                     else "no score")

    def score(self, candidate: Candidate, refit: float) -> dict[str, Any]:
        from transferkit.evaluation.protocol import cross_validate

        tta_oof = np.zeros((len(self.data), self.data.num_classes))
        tta_folds: list[float] = []
        rows = {item_id: i for i, item_id in enumerate(self.data.ids)}
        fold_started = [time.perf_counter()]
        leader = self.leader()

        def record_tta(val, probabilities: dict[str, np.ndarray]) -> np.ndarray:
            if "tta" in probabilities:
                positions = [rows[i] for i in val.ids]
                tta_oof[positions] += probabilities["tta"]
                tta_folds.append(accuracy(val.labels, probabilities["tta"]))
            return probabilities["plain"]

        if candidate.kind == "features":
            c = float(candidate.options.get("probe_c", 1.0))
            copies = int(candidate.options.get("label_examples", 0))

            def train_and_predict(train, val):
                from transferkit.autofit.training import probe_fold

                return record_tta(val, probe_fold(self.feature_table(candidate), train, val, c, copies))
        else:
            def train_and_predict(train, val):
                from transferkit.autofit.training import predict_plain_and_flipped, train_candidate

                epoch_started = [time.perf_counter()]
                epochs = int(candidate.options.get("epochs", 0))

                def on_epoch(row: dict[str, Any]) -> None:  # stop before an epoch that would overrun the budget
                    seconds = time.perf_counter() - epoch_started[0]
                    epoch_started[0] = time.perf_counter()
                    if row.get("epoch") != epochs:  # (after the last epoch the fold's training is done)
                        self.check_time(seconds)

                model, _ = train_candidate(candidate, train, seed=self.config.seed, cache_dir=self.cache_dir,
                                           epoch_callback=on_epoch, device=self.config.device)
                return record_tta(val, predict_plain_and_flipped(model, val))

        fold_scores: list[float] = []
        validated: list[int] = []  # positions of the items validated so far
        correct: list[bool] = []
        fold_seconds: list[float] = []
        k = self.folds(candidate)

        def tracked(train, val):
            probabilities = train_and_predict(train, val)
            fold_scores.append(accuracy(val.labels, probabilities))
            validated.extend(rows[i] for i in val.ids)
            correct.extend(np.asarray(probabilities).argmax(1) == val.labels)
            return probabilities

        def on_fold(index: int, total: int, fold_accuracy: float) -> None:
            seconds = time.perf_counter() - fold_started[0]
            fold_started[0] = time.perf_counter()
            fold_seconds.append(seconds)
            self.log("  %s fold %d/%d: accuracy %.4f (%.0f s)", candidate.name, index, total, fold_accuracy, seconds)
            if index == total:
                return
            self.check_time()
            if candidate.kind == "features":
                return
            if leader is not None and len(validated) >= RACING_MIN_ITEMS:  # racing: paired with the leader's
                # out-of-fold predictions on the same items
                mine = float(np.mean(correct))
                theirs = accuracy(self.data.labels[validated], np.asarray(leader["oof_probabilities"])[validated])
                margin = math.sqrt(max(theirs * (1 - theirs), 0.01) / len(validated))
                if mine < theirs - margin:
                    raise _Stopped(f"stopped after fold {index}/{total}: {mine:.3f} vs the leader's {theirs:.3f} "
                                   "on the same items")
            if (total - index) * seconds + self.refit_reserve(refit) > self.clock.left():
                raise _Stopped(f"stopped after fold {index}/{total}: the remaining folds would not fit the budget")

        base = {"candidate": candidate.slug, "spec": candidate.to_dict(), "refit_seconds": refit}
        try:
            cv = cross_validate(tracked, self.data, k=k, repeats=1, seed=self.config.seed, on_fold=on_fold)
        except _Stopped as stop:
            partial = fold_scores
            return {**base, "status": stop.status, "variants": [{
                "name": candidate.name, "candidate": candidate.slug, "tta": False, "complete": False,
                "cv": {"k": k, "fold_accuracies": partial, "mean": float(np.mean(partial)),
                       "sd": float(np.std(partial, ddof=1)) if len(partial) > 1 else 0.0},
                "log_loss": math.nan}] if partial else []}
        variants = [self._variant(candidate, False, cv.fold_accuracies, cv.oof_probabilities, k)]
        if tta_folds:
            variants.append(self._variant(candidate, True, tta_folds, tta_oof, k))
        if candidate.kind == "features":
            base["refit_seconds"] = 1.0
        elif fold_seconds:  # measured: a fold trains on (k-1)/k of the items, the refit on all of them
            base["refit_seconds"] = max(refit, float(np.mean(fold_seconds)) * k / (k - 1))
        return {**base, "status": "done", "variants": variants}

    def _variant(self, candidate: Candidate, tta: bool, folds: list[float], oof: np.ndarray,
                 k: int) -> dict[str, Any]:
        labels = self.data.labels
        return {"name": candidate.name + (" +flip TTA" if tta else ""), "candidate": candidate.slug, "tta": tta,
                "complete": True,
                "cv": {"k": k, "repeats": 1, "seed": self.config.seed, "fold_accuracies": list(folds),
                       "mean": float(np.mean(folds)), "sd": float(np.std(folds, ddof=1)) if len(folds) > 1 else 0.0},
                "oof_accuracy": accuracy(labels, oof), "log_loss": log_loss(labels, oof),
                "oof_probabilities": np.round(oof, 6).tolist()}

    @staticmethod
    def table_key(candidate: Candidate) -> tuple[str, int | None, tuple[int, ...], tuple[int, ...]]:
        """Candidates with the same key share one feature table (backbone, resolution, pooled stages, pooling
        grid)."""
        return (candidate.backbone, candidate.image_size, tuple(candidate.options.get("pool_stages") or ()),
                tuple(candidate.options.get("pool_grid") or ()))

    def host_table(self, candidate: Candidate):
        """A finished table whose last columns are ``candidate``'s features (a multi-stage table of the same backbone
        and resolution whose final map is pooled over the same grid, for a final-layer probe), or None."""
        backbone, size, stages, grid = self.table_key(candidate)
        if stages:
            return None
        return next((t for (b, s, pooled, g), t in self.tables.items()
                     if (b, s) == (backbone, size) and pooled and g[-1:] == grid[-1:]), None)

    def feature_table(self, candidate: Candidate):
        from transferkit.autofit.training import FeatureTable

        key = self.table_key(candidate)
        if key not in self.tables:
            table = FeatureTable(candidate, self.data, self.cache_dir, self.config.seed, self.check_time,
                                 host=self.host_table(candidate), device=self.config.device)
            if table.computed:  # not read from the cache: a real speed measurement
                self.speed[key[:2]] = table.seconds / table.computed
                static = STATIC_SECONDS_PER_ITEM.get(candidate.backbone, 0.05) * (
                    ((candidate.image_size or 224) / 224) ** 2 if candidate.image_size else 1.0)
                self.slowdown = float(np.clip(self.speed[key[:2]] / static, 0.2, 20))
            self.tables[key] = table
        return self.tables[key]

    def check_time(self, projected: float = 0.0) -> None:
        """Stop the candidate in progress when the search's part of the budget is used up, or will be before the
        ``projected`` seconds the candidate still needs (the final refit of the candidates already scored still fits
        in the rest)."""
        if self.clock.left() < projected:
            raise _Stopped("stopped: the time budget ran out" if self.clock.left() < 0 else
                           f"stopped: it needed about {projected:.0f} s more, {max(0.0, self.clock.left()):.0f} s left")

    # --- the final model ------------------------------------------------------------------------------------
    def choose(self) -> tuple[dict[str, float], np.ndarray]:
        """Ensemble weights by variant name (refits that fit the remaining time only) and their OOF probabilities."""
        variants = {n: v for n, v in self.variants().items() if v.get("complete")}
        if not variants:
            raise TransferkitError("no candidate finished within the time budget",
                                   "give a larger --time-budget (e.g. 10m) or fewer --backbones / --strategies")
        oof = {n: np.asarray(v["oof_probabilities"]) for n, v in variants.items()}
        priors = {c.slug: c.prior for c in self.space}
        start, best = preferred_start(oof, self.data.labels,
                                      {n: priors.get(v["candidate"], 0) for n, v in variants.items()})
        if start != best:
            self.log("%s (CV %.4f) is within one paired standard error of the best, %s (CV %.4f), and preferred on "
                     "benchmarks: the final model builds on it", start, variants[start]["oof_accuracy"], best,
                     variants[best]["oof_accuracy"])
        weights = committee(oof, self.data.labels, self.committee_members(variants), best, self.config.max_ensemble)
        if weights:
            self.log("the committee of %d probes (CV %.4f) is not beaten beyond the winner's curse by the best of %d "
                     "candidates, %s (CV %.4f): the final model averages them", len(weights),
                     accuracy(self.data.labels, combine(oof, weights)), len(oof), best, variants[best]["oof_accuracy"])
        else:
            weights = select_ensemble(oof, self.data.labels, self.config.max_ensemble, start=start)
        affordable = self.clock.budget * 1.02 - self.clock.elapsed() - WRITE_SECONDS
        refits = {}
        for name in sorted(weights, key=lambda n: -weights[n]):
            cost = self.results[variants[name]["candidate"]]["refit_seconds"]
            if sum(refits.values()) + cost <= affordable or not refits:
                refits[name] = cost
        if set(refits) != set(weights):
            kept = {n: weights[n] for n in refits}
            total = sum(kept.values())
            weights = {n: w / total for n, w in kept.items()}
            self.log("ensemble reduced to %d members to fit the budget", len(weights))
        return weights, combine(oof, weights)

    def committee_members(self, variants: dict[str, dict[str, Any]]) -> list[str]:
        """The finished variants of the committee candidates (``Candidate.committee``), each with flip TTA when it
        was scored with it (its training saw the mirror images too)."""
        members = {c.slug for c in self.space if c.committee}
        chosen: dict[str, str] = {}
        for name, variant in variants.items():
            if variant["candidate"] in members and (variant["tta"] or variant["candidate"] not in chosen):
                chosen[variant["candidate"]] = name
        return list(chosen.values())

    def refit(self, name: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """The final model of one variant, trained on every labelled item."""
        from transferkit.autofit.training import probe_model, train_candidate

        variant = self.variants()[name]
        candidate = next(c for c in self.space if c.slug == variant["candidate"])
        extra: dict[str, Any] = {"data": self.config.data, "auto_candidate": candidate.to_dict()}
        if variant["tta"]:
            extra["tta"] = "hflip"
        if candidate.kind == "features":
            model, strategy = probe_model(candidate, self.feature_table(candidate), self.data, variant["tta"])
        else:
            model, strategy = train_candidate(candidate, self.data, seed=self.config.seed, cache_dir=self.cache_dir,
                                              device=self.config.device)
        return model, strategy.to_dict(), extra


def run_auto(config: AutoConfig, started: float | None = None, tracking: Any = None):
    """Search, choose, refit and write the run folder (with its model card); returns a :class:`transferkit.api.Run`.
    The budget runs from ``started`` (``time.time()``; default: now). ``tracking``: a checked
    :class:`transferkit.tracking.TrackingConfig` to log the published run to (``--track``)."""
    from transferkit.api import Run
    from transferkit.evaluation.metrics import classification_report
    from transferkit.model import save_model
    from transferkit.rundir import OutputFolder, write_json, write_jsonl

    budget = config.validate()
    started = time.time() if started is None else started  # the CLI passes the process's start (start-up counts)
    import sklearn.metrics  # noqa: F401  (imported now, not during the final write: part of the measured start-up)

    search = AutoSearch(config, budget, started)  # reads and checks the data: bad input fails before any write
    options = {k: v for k, v in asdict(config).items() if k not in ("time_budget", "progress", "overwrite", "resume")}
    folder = OutputFolder(config.out, "auto", overwrite=config.overwrite, resume=config.resume, options=options,
                          data=config.data)
    folder.begin()
    try:
        results_dir = folder.stage / RESULTS_FOLDER
        results_dir.mkdir(parents=True, exist_ok=True)
        search.run(results_dir)
        weights, oof = search.choose()
        search.log("final model: %s", " + ".join(f"{w:.2f} x {n}" for n, w in weights.items()))
        members = []
        for name in weights:
            search.log("refit on all %d labelled items: %s", len(search.data), name)
            members.append(search.refit(name))
        if len(members) == 1:
            model, strategy, extra = members[0]
            save_model(model, folder.stage / "model", strategy, extra=extra)
        else:
            save_ensemble(folder.stage / "model", members, list(weights.values()), extra={"data": config.data})
        metrics = final_metrics(search, weights, oof, classification_report)
        write_json(folder.stage / "metrics.json", metrics)
        write_jsonl(folder.stage / "history.jsonl", [])
        write_leaderboard(folder.stage, search, weights)
        from transferkit.autofit.publish import track_auto, write_auto_card

        write_auto_card(folder.stage, metrics, name=Path(config.out).name)
        out = folder.publish()
    except BaseException as exc:
        folder.abandon(exc)
        raise
    search.log("done: cross-validated accuracy %.4f; run written to %s", metrics["accuracy"], out)
    if tracking is not None:
        track_auto(tracking, out, metrics)
    return Run(out, metrics, [])


def final_metrics(search: AutoSearch, weights: dict[str, float], oof: np.ndarray, classification_report) -> dict:
    labels = search.data.labels
    report = classification_report(labels, oof, list(search.data.class_names))
    variants = search.variants()
    folds = []
    first = variants[next(iter(weights))]
    from transferkit.evaluation.protocol import stratified_folds

    for _, val in stratified_folds(labels, search.k, 1, search.config.seed):
        folds.append(accuracy(labels[val], oof[val]))
    members = [variants[n] for n in weights]
    specs = [search.results[m["candidate"]]["spec"] for m in members]
    return {
        "accuracy": report["accuracy"], "macro_f1": report.get("macro_f1"),
        "accuracy_split": "cv",
        "cv": {"k": search.k, "repeats": 1, "seed": search.config.seed, "fold_accuracies": folds,
               "mean": float(np.mean(folds)), "sd": float(np.std(folds, ddof=1)) if len(folds) > 1 else 0.0,
               "oof_accuracy": report["accuracy"]},
        "n_eval": len(labels), "n_train_final": len(labels),
        "dataset_sizes": {"labelled": len(labels), "test (not used)": len(search.splits.test or [])},
        "num_classes": search.data.num_classes, "class_names": list(search.data.class_names),
        "backbone": ", ".join(sorted({s["backbone"] for s in specs})),
        "strategy": "auto: " + " + ".join(f"{w:.2f} x {n}" for n, w in weights.items()),
        "members": [{"name": n, "weight": w} for n, w in weights.items()],
        "tta": bool(first.get("tta")),
        "train_seconds": round(search.clock.elapsed(), 1), "time_budget_seconds": search.clock.budget,
        "notes": [f"scored by {search.k}-fold cross-validation on all {len(labels)} labelled items (seed "
                  f"{search.config.seed}); the final model was refit on every one of them",
                  "accuracy is the out-of-fold accuracy of the final choice; it is chosen on the same folds, so it "
                  "is slightly optimistic"],
        "evaluation": report,
        "config": {"fit": {"data": search.config.data, "text_column": search.config.text_column,
                           "label_column": search.config.label_column,
                           "limit_per_class": search.config.limit_per_class, "test_fraction": 0.0},
                   "train": {"seed": search.config.seed}, "auto": asdict(search.config)},
    }


def write_leaderboard(folder: Path, search: AutoSearch, weights: dict[str, float]) -> None:
    """``leaderboard.json`` (strict JSON: a candidate stopped early has ``"log_loss": null``) and ``leaderboard.md``
    into ``folder``."""
    from transferkit.rundir import write_json

    rows = leaderboard_rows(search, weights)
    write_json(folder / LEADERBOARD_JSON, {"data": search.config.data, "k": search.k, "seed": search.config.seed,
                                           "budget_seconds": search.clock.budget, "final": weights,
                                           "leaderboard": rows})
    (folder / LEADERBOARD_MD).write_text(leaderboard_markdown(rows, weights, search))


def leaderboard_rows(search: AutoSearch, weights: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for result in search.results.values():
        spec = result["spec"]
        base = {"backbone": spec["backbone"], "strategy": spec["strategy"], "image_size": spec["image_size"],
                "status": result["status"], "seconds": result.get("seconds"),
                "estimated_seconds": result.get("estimated_seconds")}
        if not result["variants"]:
            rows.append({"name": spec["name"], **base, "cv_mean": None, "cv_sd": None, "oof_accuracy": None})
        for v in result["variants"]:
            rows.append({"name": v["name"], **base, "tta": v["tta"], "cv_mean": v["cv"]["mean"], "cv_sd": v["cv"]["sd"],
                         "fold_accuracies": v["cv"]["fold_accuracies"], "oof_accuracy": v.get("oof_accuracy"),
                         "log_loss": v.get("log_loss"), "ensemble_weight": weights.get(v["name"], 0.0)})
    rows.sort(key=lambda r: (r["cv_mean"] is None, -(r["cv_mean"] or 0.0)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def leaderboard_markdown(rows: list[dict[str, Any]], weights: dict[str, float], search: AutoSearch) -> str:
    lines = [f"# transferkit auto: {search.config.data}", "",
             f"{len(search.data)} labelled items, {search.data.num_classes} classes, {search.k}-fold "
             f"cross-validation (seed {search.config.seed}), budget {_mmss(search.clock.budget)}.", "",
             "Final model: " + " + ".join(f"{w:.2f} x {n}" for n, w in weights.items()), "",
             "| rank | candidate | CV accuracy | sd | status | seconds (estimated) | weight |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['cv_mean']:.4f}" if r["cv_mean"] is not None else "-"
        sd = f"{r['cv_sd']:.4f}" if r["cv_sd"] is not None else "-"
        secs = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"
        est = f"{r['estimated_seconds']:.0f}" if r.get("estimated_seconds") is not None else "-"
        weight = f"{r.get('ensemble_weight', 0):.2f}" if r.get("ensemble_weight") else ""
        lines.append(f"| {r['rank']} | {r['name']} | {acc} | {sd} | {r['status']} | {secs} ({est}) | {weight} |")
    return "\n".join(lines) + "\n"
