"""Which transfer works for my data? Run every backbone x strategy x seed through ``transferkit.api.fit`` and
rank the configurations honestly.

* Cells run seed-major (every configuration once, then every configuration again with the next seed), so a
  time budget that cuts the run short still leaves each configuration measured at least once.
* Each cell is a normal run folder ``<out>/runs/<backbone>__<strategy>__seed<k>``; finished cells are skipped
  and interrupted ones resumed, so an interrupted compare continues where it stopped. The on-disk feature
  cache is shared by every cell (frozen-backbone strategies extract each split once).
* Statistics over seeds (each seed draws its own few-shot subset and, under ``--protocol cv``, its own folds; the
  test set is the same for every seed): mean accuracy, sample standard deviation over seeds, and a 95% interval
  that holds *both* sources of error: the spread over seeds and the sampling error of the n evaluated items
  (the test items, or under cv every labelled item scored out of fold), which no number of seeds removes:
  ``centre +- sqrt(h_items^2 + (z s / sqrt(m))^2)`` with ``(centre, h_items)`` the Wilson score interval of the
  mean accuracy on n items and s the SD over m seeds (clipped to [0, 1]).
* Paired comparison of the top two configurations. Cells under cv are paired fold by fold (the same seed gives
  the same folds to every configuration): the corrected resampled t-test of Nadeau & Bengio (2003),
  ``t = mean(d) / sqrt((1/J + n_val/n_train) s_d^2)`` over the J paired folds, J - 1 degrees of freedom, since
  the training parts of folds overlap. Other cells are paired by seed, with the items' sampling error of the
  difference added: ``var = s_d^2 / m + (p1 (1 - p1) + p2 (1 - p2)) / n`` (the bound for independent errors,
  conservative because both are scored on the same items), t with m - 1 degrees of freedom (normal with one seed).
* ``--track mlflow|tensorboard``: one parent run for the comparison and a child run per cell (``track_compare``).
* Recommendation: the most accurate configuration, unless another one's mean accuracy lies inside the best
  one's confidence interval at a fraction (``cost_ratio``, default one half) of its training time; then the
  cheapest such configuration, with the reason spelled out.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import (
    TransferkitError,
    check_count,
    check_number,
    corrupt_file_error,
    listed,
    read_json,
    reading,
)
from transferkit.rundir import output_kind, refuse_out_inside_data, write_json, writer_lock

logger = logging.getLogger(__name__)

LEADERBOARD_FILE = "leaderboard.json"
RUNS_FOLDER = "runs"
CONFIDENCE = 0.95
#: options compare sets itself for every cell; callers may not pass them through
CELL_OPTIONS = ("data", "backbone", "strategy", "seed", "out", "overwrite", "resume")


@dataclass
class Cell:
    backbone: str
    strategy: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.backbone} / {self.strategy}"

    @property
    def folder_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.@-]+", "-", f"{self.backbone}__{self.strategy}__seed{self.seed}")


@dataclass
class CellResult:
    backbone: str
    strategy: str
    seed: int
    status: str  # "done" | "failed" | "skipped"
    path: str
    accuracy: float | None = None
    macro_f1: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    train_seconds: float | None = None
    peak_memory_mb: float | None = None
    reused: bool = False
    message: str = ""
    n_eval: int | None = None  # items the accuracy was measured on
    accuracy_split: str | None = None  # "test", "cv", "val ..."
    cv: dict[str, Any] | None = None  # metrics.json's cv block (k, repeats, seed, fold_accuracies, ...)


# --- statistics --------------------------------------------------------------------------------------------


def t_interval(values: list[float] | np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Two-sided Student-t confidence interval of the mean; None with fewer than two values."""
    from scipy.stats import t

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    return mean - half, mean + half


def _z(confidence: float = CONFIDENCE) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def accuracy_interval(accuracies: list[float] | np.ndarray, n_items: int | None,
                      confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Interval of a configuration's accuracy over seeds *and* evaluated items (see the module docstring); None
    when neither the items' count nor two seeds are known."""
    values = np.asarray(accuracies, dtype=float)
    m, z = len(values), _z(confidence)
    seed_half = z * float(values.std(ddof=1)) / math.sqrt(m) if m > 1 else 0.0
    if not n_items:
        if m < 2:
            return None
        centre, item_half = float(values.mean()), 0.0
    else:
        p, n = float(values.mean()), int(n_items)
        denominator = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denominator
        item_half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denominator
    half = math.hypot(item_half, seed_half)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_t_test(first: dict[int, float], second: dict[int, float], n_items: int | None = None) -> dict[str, Any]:
    """Paired comparison of two configurations' accuracies over the seeds both have (first - second), with the
    evaluated items' sampling error of the difference when ``n_items`` is known (module docstring)."""
    from scipy.stats import norm, t

    seeds = sorted(set(first) & set(second))
    result: dict[str, Any] = {"method": "paired by seed" + (f", {n_items} evaluated items" if n_items else ""),
                              "seeds": seeds, "n": len(seeds)}
    if not seeds or (len(seeds) < 2 and not n_items):
        result.update(testable=False, reason=f"{len(seeds)} common seed(s): a paired test needs at least 2 "
                      "(run with --seeds 2 or more)")
        return result
    diffs = np.array([first[s] - second[s] for s in seeds])
    mean = float(diffs.mean())
    sd = float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0
    variance = sd**2 / len(diffs)
    if n_items:
        p1, p2 = np.mean([first[s] for s in seeds]), np.mean([second[s] for s in seeds])
        variance += float(p1 * (1 - p1) + p2 * (1 - p2)) / n_items
    result.update(mean_difference=mean, sd_difference=sd if len(diffs) > 1 else None, testable=True)
    if variance <= 1e-24 * max(1.0, mean**2):  # rounding noise of equal differences
        result.update(t=None, p_value=1.0 if mean == 0 else None,
                      reason="the difference is identical on every seed and no item-level error is known, so the "
                             "t statistic is undefined")
        return result
    se = math.sqrt(variance)
    statistic = mean / se
    if len(diffs) > 1:
        df = len(diffs) - 1
        p_value, quantile = float(2 * t.sf(abs(statistic), df)), float(t.ppf(0.5 + CONFIDENCE / 2, df))
    else:
        df = None
        p_value, quantile = float(2 * norm.sf(abs(statistic))), _z()
    result.update(t=statistic, df=df, p_value=p_value, ci=(mean - quantile * se, mean + quantile * se))
    return result


def paired_folds_test(first: list[CellResult], second: list[CellResult]) -> dict[str, Any] | None:
    """Corrected resampled t-test (Nadeau & Bengio 2003) over the folds two cv configurations share (same seed,
    same k: the same folds); None when they share none."""
    from scipy.stats import t

    by_seed = {c.seed: c.cv for c in second if c.cv}
    diffs, ratio = [], None
    for cell in first:
        other = by_seed.get(cell.seed)
        if not cell.cv or not other or cell.cv.get("k") != other.get("k"):
            continue
        k = int(cell.cv["k"])
        shared = k * min(int(cell.cv.get("repeats", 1)), int(other.get("repeats", 1)))
        diffs += [a - b for a, b in zip(cell.cv["fold_accuracies"][:shared], other["fold_accuracies"][:shared])]
        ratio = 1 / (k - 1)  # n_val / n_train of a k-fold split
    if len(diffs) < 2 or ratio is None:
        return None
    d = np.asarray(diffs)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    result: dict[str, Any] = {"method": "paired by fold (corrected resampled t-test, Nadeau & Bengio 2003)",
                              "folds": len(d), "n": len(d), "seeds": sorted({c.seed for c in first} & set(by_seed)),
                              "mean_difference": mean, "sd_difference": sd, "testable": True}
    se = math.sqrt((1 / len(d) + ratio) * sd**2)
    if se <= 1e-12:
        result.update(t=None, p_value=1.0 if mean == 0 else None,
                      reason="the difference is identical on every fold, so the t statistic is undefined")
        return result
    df = len(d) - 1
    quantile = float(t.ppf(0.5 + CONFIDENCE / 2, df))
    result.update(t=mean / se, df=df, p_value=float(2 * t.sf(abs(mean / se), df)),
                  ci=(mean - quantile * se, mean + quantile * se))
    return result


def leaderboard_rows(results: list[CellResult]) -> list[dict[str, Any]]:
    """One row per backbone/strategy over its finished seeds, most accurate first."""
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for r in results:
        if r.status == "done" and r.accuracy is not None:
            groups.setdefault((r.backbone, r.strategy), []).append(r)
    rows = []
    for (backbone, strategy), cells in groups.items():
        acc = np.array([c.accuracy for c in cells], dtype=float)
        n_items = min((c.n_eval for c in cells if c.n_eval), default=None)
        ci = accuracy_interval(acc, n_items)
        rows.append({
            "backbone": backbone,
            "strategy": strategy,
            "seeds": len(cells),
            "accuracy_by_seed": {c.seed: c.accuracy for c in sorted(cells, key=lambda c: c.seed)},
            "accuracy_mean": float(acc.mean()),
            "accuracy_sd": float(acc.std(ddof=1)) if len(acc) > 1 else None,
            "accuracy_ci": list(ci) if ci else None,  # over seeds and evaluated items, within [0, 1]
            "n_eval": n_items,
            "accuracy_split": cells[0].accuracy_split,
            "macro_f1_mean": float(np.mean([c.macro_f1 for c in cells])),
            "trainable_params": int(np.median([c.trainable_params for c in cells])),
            "total_params": int(np.median([c.total_params for c in cells])),
            "train_seconds": float(np.mean([c.train_seconds for c in cells])),
            "peak_memory_mb": float(np.max([c.peak_memory_mb for c in cells])),
        })
    rows.sort(key=lambda r: (-r["accuracy_mean"], r["train_seconds"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def recommend(rows: list[dict[str, Any]], cost_ratio: float = 0.5) -> dict[str, Any] | None:
    """The recommended configuration and why (see the module docstring for the rule)."""
    if not rows:
        return None
    best = rows[0]
    name = f"{best['strategy']} on {best['backbone']}"
    if best["accuracy_ci"] is None:
        return {"backbone": best["backbone"], "strategy": best["strategy"], "rule": "best accuracy",
                "reason": f"{name} has the highest accuracy ({best['accuracy_mean']:.4f}); with a single seed "
                          "there is no confidence interval, so no cheaper configuration can be called "
                          "'nearly as good' (run with --seeds 2 or more)"}
    low = best["accuracy_ci"][0]
    cheaper = [r for r in rows[1:] if r["accuracy_mean"] >= low
               and r["train_seconds"] <= cost_ratio * best["train_seconds"]]
    if not cheaper:
        fastest = min(rows, key=lambda r: r["train_seconds"])
        cost = (f"; it is also the fastest to train ({best['train_seconds']:.1f} s per run)" if fastest is best else
                f" and no configuration inside that interval trains in under {cost_ratio:g}x its time")
        return {"backbone": best["backbone"], "strategy": best["strategy"], "rule": "best accuracy",
                "reason": f"{name} has the highest mean accuracy ({best['accuracy_mean']:.4f}, 95% CI "
                          f"{best['accuracy_ci'][0]:.4f}-{best['accuracy_ci'][1]:.4f}){cost}"}
    pick = min(cheaper, key=lambda r: (r["train_seconds"], r["trainable_params"]))
    time_ratio = pick["train_seconds"] / max(best["train_seconds"], 1e-9)
    param_ratio = pick["trainable_params"] / max(best["trainable_params"], 1)
    return {"backbone": pick["backbone"], "strategy": pick["strategy"], "rule": "nearly as good, cheaper",
            "time_ratio": time_ratio, "param_ratio": param_ratio,
            "reason": f"{pick['strategy']} on {pick['backbone']} reaches {pick['accuracy_mean']:.4f}, inside the "
                      f"95% CI of the best ({name}: {best['accuracy_mean']:.4f}, CI "
                      f"{best['accuracy_ci'][0]:.4f}-{best['accuracy_ci'][1]:.4f}), at {time_ratio:.2g}x its "
                      f"training time and {param_ratio:.2g}x its trainable parameters"}


# --- running -----------------------------------------------------------------------------------------------


def plan_cells(backbones: list[str], strategies: list[str], seeds: int) -> list[Cell]:
    """Seed-major order: every configuration with seed 0, then with seed 1, ..."""
    return [Cell(b, s, seed) for seed in range(seeds) for b in backbones for s in strategies]


def options_for_strategy(strategy: str, options: dict[str, Any]) -> dict[str, Any]:
    """Drop pass-through options that belong only to *other* registered strategies (so ``--probe-c`` can be
    given once for a compare that also runs finetune) and the training options this strategy never reads (so
    ``--epochs`` for the finetune cells is no warning in every linear-probe cell)."""
    from transferkit.config import build, option_fields
    from transferkit.strategies import list_strategies, strategy_class

    cls = strategy_class(strategy)
    own = {f.name for f in option_fields(cls.config_class)}
    foreign = {f.name for c in list_strategies().values() for f in option_fields(c.config_class)} - own
    kept = {k: v for k, v in options.items() if k.replace("-", "_") not in foreign}
    unused, _ = cls(build(cls.config_class, {k.replace("-", "_"): v for k, v in kept.items()})).unused_train_options()
    return {k: v for k, v in kept.items() if k.replace("-", "_") not in unused}


def _result_from_metrics(cell: Cell, path: Path, metrics: dict[str, Any], reused: bool) -> CellResult:
    return CellResult(cell.backbone, cell.strategy, cell.seed, "done", str(path),
                      accuracy=float(metrics["accuracy"]), macro_f1=float(metrics.get("macro_f1", 0.0)),
                      trainable_params=int(metrics["trainable_params"]), total_params=int(metrics["total_params"]),
                      train_seconds=float(metrics["train_seconds"]),
                      peak_memory_mb=float(metrics.get("peak_memory_mb", float("nan"))), reused=reused,
                      n_eval=metrics.get("n_eval"), accuracy_split=metrics.get("accuracy_split"),
                      cv=metrics.get("cv"))


def _fit_cell(options: dict[str, Any], log_level: int | None = None) -> dict[str, Any]:
    """Run one cell (in this or a fresh process); returns its metrics or ``{"error": message}``."""
    from transferkit.api import fit

    if log_level is not None:  # a spawned process: log to stderr like the parent
        from transferkit.console import setup_logging

        setup_logging(verbose=log_level <= logging.DEBUG, quiet=log_level > logging.INFO)
    if options.get("threads"):  # for the whole cell (feature extraction and evaluation too), not only training
        import torch

        torch.set_num_threads(int(options["threads"]))
    try:
        return fit(**options).metrics
    except TransferkitError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # one broken cell (e.g. a strategy that cannot wrap a backbone) must not stop the rest
        logger.exception("cell %s / %s seed %s crashed", options.get("backbone"), options.get("strategy"),
                         options.get("seed"))
        return {"error": f"{type(exc).__name__}: {exc}"}


def _fit_isolated(options: dict[str, Any]) -> dict[str, Any]:
    """One cell in a fresh spawned process: its peak memory (ru_maxrss) is then the cell's own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_fit_cell, options, logging.getLogger("transferkit").getEffectiveLevel()).result()


@dataclass
class CompareConfig:
    data: str
    backbones: list[str]  # empty: the backbone `fit` chooses for the data's modality (resolve_backbones)
    strategies: list[str]
    seeds: int = 3
    out: str = "runs/compare"
    time_budget: float | str | None = None  # seconds, or a duration such as "600s", "10m", "1h"
    isolate: bool = True
    cost_ratio: float = 0.5
    fit_options: dict[str, Any] = field(default_factory=dict)
    refit_best: bool = False  # hand over the recommended configuration as a run folder <out>/best

    def resolve_backbones(self) -> None:
        """No backbone named: the one ``fit`` would choose for the data (``backbones.default_backbone``)."""
        if self.backbones:
            return
        from transferkit.backbones import default_backbone
        from transferkit.data import read_labelled_parts

        parts, _ = read_labelled_parts(self.data, self.fit_options.get("text_column"),
                                       self.fit_options.get("label_column"))
        self.backbones = [default_backbone(next(iter(parts.values())).modality)]

    def validate(self) -> None:
        """Checks the options, taking the CLI's values from Python too (``strategies="a,b"``, ``seeds="3"``)."""
        from transferkit.config import coerce, split_list
        from transferkit.strategies import list_strategies

        self.data, self.out = coerce(self.data, str, "--data"), coerce(self.out, str, "--out")
        self.backbones = split_list(self.backbones) or []
        self.strategies = split_list(self.strategies) or []
        self.seeds = check_count("--seeds", coerce(self.seeds, int, "--seeds"), 1)
        self.cost_ratio = check_number("--cost-ratio", self.cost_ratio, 0, 1)
        self.isolate = coerce(self.isolate, bool, "--isolate")
        self.refit_best = coerce(self.refit_best, bool, "--refit-best")
        if not self.strategies:
            raise TransferkitError("compare needs at least one strategy", "pass --strategies x,y")
        self.resolve_backbones()
        known = list_strategies()
        unknown = [s for s in self.strategies if s not in known]
        if unknown:
            raise TransferkitError(f"unknown strategy {', '.join(unknown)}", f"choose from: {', '.join(known)}")
        if self.time_budget is not None:
            from transferkit.config import parse_duration

            self.time_budget = parse_duration(self.time_budget)
        clash = sorted(k for k in self.fit_options if k in CELL_OPTIONS)
        if clash:
            raise TransferkitError(f"compare sets {', '.join(clash)} itself for every cell",
                                   "remove those options (use --backbones, --strategies, --seeds, --out)")
        self._check_fit_options()

    def _check_fit_options(self) -> None:
        """The options every cell shares (``--batch-size``, ``--epochs``, ``--image-size``, ...) are checked before
        the first cell runs, so that a bad value is one error instead of one failed cell per configuration."""
        from transferkit.backbones import check_backbone_name
        from transferkit.config import FitConfig, build
        from transferkit.engine.trainer import TrainConfig

        for backbone in self.backbones:
            check_backbone_name(backbone)
        shared = {k.replace("-", "_"): v for k, v in self.fit_options.items() if v is not None}
        build(FitConfig, {**shared, "data": self.data}).validate()
        build(TrainConfig, dict(shared)).validate()


def shared_protocol(config: CompareConfig) -> str:
    """One ``--protocol`` for every cell, so that all accuracies are the same kind of estimate: ``auto`` is
    resolved once, by the rule of the compared strategy that cross-validates least (crossfit.cv_max_class_size;
    e.g. the probe alone cross-validates up to 99 items per class, finetune up to 49). The cell's options are
    resolved as ``fit`` resolves them, so its extensions count too (one that trains on a validation split gives
    holdout)."""
    from transferkit.api import resolve_options
    from transferkit.evaluation.crossfit import cv_max_class_size, plan_protocol

    protocol = config.fit_options.get("protocol") or "auto"
    if protocol != "auto":
        return protocol
    strictest = min(config.strategies, key=cv_max_class_size)
    options = {**options_for_strategy(strictest, config.fit_options), "data": config.data,
               "backbone": config.backbones[0], "strategy": strictest}
    try:
        fit, train, _, extensions = resolve_options(options)
        return plan_protocol(fit, train.seed, extensions=extensions).protocol
    except TransferkitError:  # unreadable data: every cell reports its own error (and compare stops after the first)
        return "auto"


def check_compare_out(out: Path) -> None:
    """Refuse an existing, non-empty ``--out`` that is not a comparison (its ``leaderboard.json``, or the
    ``runs/`` of an interrupted one, which ``compare`` continues): nothing of another's is written into or over."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    found = output_kind(out)
    if found is not None and found != "compare":
        raise TransferkitError(f"'{out}' holds a transferkit {found} output, not a comparison",
                               "choose another --out folder")
    if found is None and not (out / LEADERBOARD_FILE).is_file() and not (out / RUNS_FOLDER).is_dir():
        raise TransferkitError(f"'{out}' exists and is not a compare output (no {LEADERBOARD_FILE}); nothing was "
                               "written", "choose an empty or new --out folder")


def run_compare(config: CompareConfig) -> dict[str, Any]:
    """Run (or resume) a comparison; writes ``leaderboard.json`` and ``report.html`` into ``config.out``."""
    from transferkit.tracking import tracking_options

    tracking = tracking_options(config.fit_options)  # --track: not the cells' own; logged nested at the end
    config.validate()
    out = Path(config.out)
    refuse_out_inside_data(out, config.data)
    with writer_lock(out):  # one compare (or fit) per folder: a second one is refused and changes nothing
        check_compare_out(out)
        try:
            document = _compare_cells(config, out)
        except KeyboardInterrupt as exc:  # compare has no --resume: running it again continues
            exc.transferkit_hint = RERUN_HINT  # type: ignore[attr-defined]
            raise
    if tracking is not None:
        track_compare(tracking, out, document)
    return document


#: what the CLI says after Ctrl-C in a comparison
RERUN_HINT = ("run the same compare command again to continue (finished cells are reused, an interrupted cell "
              "resumes from its last checkpoint)")


def same_data(a: Any, b: Any) -> bool:
    """True if two ``--data`` values name the same data: equal text, or the same existing file or folder."""
    if a == b:
        return True
    try:
        return a is not None and b is not None and Path(a).exists() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def refuse_other_cell_options(path: Path, options: dict[str, Any]) -> None:
    """Refuse to reuse the finished cell in ``path`` when its ``run_config.json`` differs from the run ``options``
    would make (the data's name aside when it names the same data), or when its data's fingerprint differs from the
    data's now: the leaderboard would report settings or data its cells were not trained with. A cell without ``run_config.json`` (older versions) is reused as before."""
    from transferkit.api import data_fingerprint, recorded_options
    from transferkit.rundir import DATA_SECTION, RUN_CONFIG, differing_options

    saved = path / RUN_CONFIG
    if not saved.is_file():
        return
    previous = read_json(saved, "finished cell's options", "delete that cell's folder to train it again")
    if not isinstance(previous, dict):
        return
    current = recorded_options(options)
    if same_data(previous.get("fit", {}).get("data"), options["data"]):
        current["fit"]["data"] = previous["fit"]["data"]
    differing = differing_options({k: v for k, v in previous.items() if k != DATA_SECTION}, current)
    if differing:
        raise TransferkitError(f"the finished cell '{path}' was trained with other options ({listed(differing)})",
                               "compare with the options it used, or choose another --out folder")
    recorded = previous.get(DATA_SECTION)
    if isinstance(recorded, dict) and recorded.get("fingerprint") != data_fingerprint(options):
        raise TransferkitError(f"the finished cell '{path}' was trained on other data (items added, removed or "
                               "relabelled since)", "choose another --out folder, or delete that cell's folder to "
                               "train it again")


def _compare_cells(config: CompareConfig, out: Path) -> dict[str, Any]:
    """Run the missing cells into ``out/runs``, then write the leaderboard and the report."""
    out.mkdir(parents=True, exist_ok=True)
    previous = out / LEADERBOARD_FILE
    if previous.is_file():
        fix = "move it away, or choose another --out folder"
        old = read_json(previous, "compare leaderboard", fix)
        if not isinstance(old, dict):
            raise corrupt_file_error(previous, "compare leaderboard", "not a JSON object", fix)
        if not same_data(old.get("data"), config.data):
            raise TransferkitError(f"'{out}' holds a comparison on other data ({old.get('data')})",
                                   "choose another --out folder")
    started = time.perf_counter()
    results: list[CellResult] = []
    cells = plan_cells(config.backbones, config.strategies, config.seeds)
    protocol = shared_protocol(config)
    for i, cell in enumerate(cells, 1):
        path = out / RUNS_FOLDER / cell.folder_name
        metrics_file = path / "metrics.json"
        options = {**options_for_strategy(cell.strategy, config.fit_options), "data": config.data,
                   "backbone": cell.backbone, "strategy": cell.strategy, "seed": cell.seed, "out": str(path),
                   "resume": True, "protocol": protocol}
        options.setdefault("progress", False)
        if metrics_file.is_file() and (path / "model").is_dir():
            refuse_other_cell_options(path, options)
            with reading(metrics_file, "finished cell's metrics", "delete that cell's folder to train it again"):
                results.append(_result_from_metrics(cell, path, read_json(metrics_file, "metrics file"), reused=True))
            logger.info("[%d/%d] %s seed %d: finished earlier, reused", i, len(cells), cell.key, cell.seed)
            continue
        elapsed = time.perf_counter() - started
        if config.time_budget is not None and elapsed >= config.time_budget:
            results.append(CellResult(cell.backbone, cell.strategy, cell.seed, "skipped", str(path),
                                      message=f"time budget of {config.time_budget:g} s used up"))
            continue
        logger.info("[%d/%d] %s seed %d ...", i, len(cells), cell.key, cell.seed)
        metrics = _fit_isolated(options) if config.isolate else _fit_cell(options)
        if "error" in metrics:
            logger.warning("%s seed %d failed: %s", cell.key, cell.seed, metrics["error"])
            results.append(CellResult(cell.backbone, cell.strategy, cell.seed, "failed", str(path),
                                      message=metrics["error"]))
            if i >= len(config.backbones) * len(config.strategies):  # every configuration has had its chance
                refuse_if_nothing_trained(results)
            continue
        result = _result_from_metrics(cell, path, metrics, reused=False)
        results.append(result)
        logger.info("[%d/%d] %s seed %d: accuracy %.4f in %.1f s", i, len(cells), cell.key, cell.seed,
                    result.accuracy, result.train_seconds)
    refuse_if_nothing_trained(results)
    document = summarise(results, config)
    if config.refit_best and document["recommendation"]:
        document["refit"] = refit_best(config, document["recommendation"])
    document["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(previous, document)  # atomic: a reader sees the old leaderboard or the new one
    from transferkit.evaluation.report import write_report

    write_report(out)
    return document


def track_compare(tracking: Any, out: Path, document: dict[str, Any]) -> None:
    """``compare --track``: a parent run (the comparison's settings, the best configuration's numbers, the
    recommendation, ``leaderboard.json`` and ``report.html`` as artefacts) and a child run per cell (a finished cell
    as ``fit --track`` logs its run folder; a failed or skipped one with its reason)."""
    from transferkit.tracking import TrackedRun, log_runs, run_record

    children = []
    for cell in document["cells"]:
        path = Path(cell["path"])
        if cell["status"] == "done" and (path / "metrics.json").is_file():
            children.append(run_record(path, read_json(path / "metrics.json", "metrics file")))
        else:
            children.append(TrackedRun(path.name, {k: cell[k] for k in ("backbone", "strategy", "seed")}, {},
                                       status="FAILED" if cell["status"] == "failed" else "KILLED",
                                       tags={"transferkit.status": cell["status"],
                                             "transferkit.message": str(cell["message"])[:5000]}))
    refit = document.get("refit")
    if refit and (Path(refit["path"]) / "metrics.json").is_file():  # --refit-best: the handed-over run folder
        children.append(run_record(Path(refit["path"]), read_json(Path(refit["path"]) / "metrics.json", "metrics file"),
                                   name=f"{out.resolve().name}/best"))
    rows, paired = document["leaderboard"], document.get("paired_test") or {}
    best = rows[0] if rows else {}
    metrics = {"best": {k: best.get(k) for k in ("accuracy_mean", "accuracy_sd", "macro_f1_mean", "train_seconds")},
               "cells": {s: sum(c["status"] == s for c in document["cells"]) for s in ("done", "failed", "skipped")},
               "wall_seconds": document.get("wall_seconds"),
               "paired_test": {k: paired.get(k) for k in ("mean_difference", "t", "p_value")}}
    if best.get("accuracy_ci"):
        metrics["best"].update(ci_low=best["accuracy_ci"][0], ci_high=best["accuracy_ci"][1])
    options = {"compare": {k: document.get(k) for k in ("data", "backbones", "strategies", "seeds")},
               "fit": document.get("fit_options") or {}, "recommendation": document.get("recommendation") or {}}
    parent = TrackedRun(out.resolve().name, options, metrics, files=[out / LEADERBOARD_FILE, out / "report.html"],
                        tags={"transferkit.compare_dir": str(out)})
    log_runs(tracking, parent, children, output=out)


BEST_FOLDER = "best"


def refit_best(config: CompareConfig, recommendation: dict[str, Any]) -> dict[str, Any]:
    """Fit the recommended configuration once more, on every labelled item, into ``<out>/best`` (an ordinary run
    folder) through the same ``fit``: ``--protocol cv`` chooses its settings in folds, then refits on all labels
    (scored on the data's own test split when it has one, else out of fold); seed 0."""
    path = Path(config.out) / BEST_FOLDER
    options = {**options_for_strategy(recommendation["strategy"], config.fit_options), "data": config.data,
               "backbone": recommendation["backbone"], "strategy": recommendation["strategy"], "seed": 0,
               "out": str(path), "resume": True, "protocol": "cv"}
    options.setdefault("progress", False)
    if (path / "metrics.json").is_file() and (path / "model").is_dir():
        metrics = json.loads((path / "metrics.json").read_text())
    else:
        logger.info("refitting the recommendation (%s on %s) on every labelled item into %s",
                    recommendation["strategy"], recommendation["backbone"], path)
        metrics = _fit_isolated(options) if config.isolate else _fit_cell(options)
    if "error" in metrics:
        raise TransferkitError(f"the refit of the recommended configuration failed: {metrics['error']}",
                               "run `transferkit fit` with that configuration yourself")
    return {"path": str(path), "backbone": recommendation["backbone"], "strategy": recommendation["strategy"],
            "accuracy": metrics["accuracy"], "accuracy_split": metrics["accuracy_split"],
            "n_train_final": metrics.get("n_train_final", metrics["dataset_sizes"]["train"])}


def refuse_if_nothing_trained(results: list[CellResult]) -> None:
    """A comparison in which no cell finished has no result: an error (exit 2), not a report of failures."""
    if any(r.status == "done" for r in results):
        return
    failed = [r for r in results if r.status == "failed"]
    if not failed:
        return
    first = failed[0]
    problem, fix = first.message.rsplit(". ", 1) if ". " in first.message else (first.message, "")
    raise TransferkitError(f"no cell of the comparison trained ({len(failed)} failed; {first.backbone} / "
                           f"{first.strategy} seed {first.seed}: {problem})",
                           fix or "fix that problem and run compare again (finished cells are reused)")


def summarise(results: list[CellResult], config: CompareConfig) -> dict[str, Any]:
    rows = leaderboard_rows(results)
    paired = None
    if len(rows) >= 2:
        def cells_of(row: dict[str, Any]) -> list[CellResult]:
            return [r for r in results if r.status == "done" and (r.backbone, r.strategy) ==
                    (row["backbone"], row["strategy"])]

        test = paired_folds_test(cells_of(rows[0]), cells_of(rows[1]))
        if test is None:
            n_items = min((r["n_eval"] for r in rows[:2] if r.get("n_eval")), default=None)
            test = paired_t_test(rows[0]["accuracy_by_seed"], rows[1]["accuracy_by_seed"], n_items)
        paired = {"first": f"{rows[0]['strategy']} on {rows[0]['backbone']}",
                  "second": f"{rows[1]['strategy']} on {rows[1]['backbone']}", **test}
    return {
        "data": config.data,
        "backbones": config.backbones,
        "strategies": config.strategies,
        "seeds": config.seeds,
        "fit_options": config.fit_options,
        "confidence": CONFIDENCE,
        "leaderboard": rows,
        "recommendation": recommend(rows, config.cost_ratio),
        "paired_test": paired,
        "cells": [asdict(r) for r in results],
        "peak_memory_note": "peak resident memory of the process that trained the cell" if config.isolate else
        "peak resident memory of the whole compare process so far (run isolated for per-cell numbers)",
    }


def format_leaderboard(document: dict[str, Any]) -> str:
    """The leaderboard, recommendation and paired test as text."""
    from transferkit.console import format_table

    table = []
    for r in document["leaderboard"]:
        ci = r["accuracy_ci"]
        table.append({
            "rank": r["rank"], "backbone": r["backbone"], "strategy": r["strategy"], "seeds": r["seeds"],
            "accuracy": f"{r['accuracy_mean']:.4f}",
            "sd": f"{r['accuracy_sd']:.4f}" if r["accuracy_sd"] is not None else "-",
            "95% CI": f"{ci[0]:.4f}-{ci[1]:.4f}" if ci else "-",
            "trainable": r["trainable_params"], "train s": f"{r['train_seconds']:.1f}",
            "peak MB": f"{r['peak_memory_mb']:.0f}",
        })
    lines = [format_table(table, list(table[0])) if table else "no finished cells"]
    rec = document.get("recommendation")
    if rec:
        lines += ["", f"recommendation: {rec['strategy']} on {rec['backbone']} ({rec['rule']})", f"  why: {rec['reason']}"]
    lines.append("")
    lines.append(describe_paired_test(document.get("paired_test")))
    problems = [c for c in document["cells"] if c["status"] != "done"]
    for c in problems:
        lines.append(f"{c['status']}: {c['backbone']} / {c['strategy']} seed {c['seed']}: {c['message']}")
    return "\n".join(lines)


def describe_paired_test(paired: dict[str, Any] | None) -> str:
    if not paired:
        return "paired test: needs at least two configurations"
    head = f"paired t-test, {paired['first']} vs {paired['second']}"
    if not paired["testable"] or paired.get("t") is None:
        return f"{head}: cannot be tested ({paired['reason']})"
    verdict = "significant" if paired["p_value"] < 0.05 else "not significant"
    over = f"{paired['folds']} folds" if "folds" in paired else f"{paired['n']} seed{'s' * (paired['n'] != 1)}"
    ci = paired.get("ci")
    interval = f", 95% CI {ci[0]:+.4f} to {ci[1]:+.4f}" if ci else ""
    return (f"{head} over {over} ({paired.get('method', 'paired by seed')}): mean difference "
            f"{paired['mean_difference']:+.4f}{interval}, t = {paired['t']:.2f}, p = {paired['p_value']:.3g} "
            f"({verdict} at 0.05)")
