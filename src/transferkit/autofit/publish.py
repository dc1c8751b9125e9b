"""What ``transferkit auto`` writes beside its model: the model card (``README.md``) and, with ``--track``, the
runs it logs to MLflow or TensorBoard. Both are built from the files of the run folder (``metrics.json``,
``leaderboard.json``), so they state exactly the numbers the folder holds.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from transferkit.autofit.auto_search import LEADERBOARD_JSON, AutoConfig

#: leaderboard rows shown in the card (the full table is leaderboard.md)
CARD_ROWS = 10


def auto_command(options: dict[str, Any]) -> str:
    """The ``transferkit auto`` command line of a run, from ``metrics.json``'s ``config.auto`` (options that differ
    from their defaults, plus data, output, budget and seed)."""
    from transferkit.evaluation.model_card import option_flags

    args = ["transferkit", "auto", *option_flags(options, AutoConfig, always=("data", "out", "time_budget", "seed"),
                                                 skip=("overwrite", "resume", "progress", "cache_dir"))]
    return shlex.join(args)


def _final_members(board: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {r["name"]: r for r in board["leaderboard"]}
    return [{**rows.get(name, {"name": name}), "weight": weight} for name, weight in board["final"].items()]


def _search_lines(board: dict[str, Any]) -> list[str]:
    rows = board["leaderboard"]
    statuses = [str(r["status"]) for r in rows]
    done = sum(s == "done" for s in statuses)
    stopped = sum(s.startswith("stopped") for s in statuses)
    skipped = sum(s.startswith("skipped") for s in statuses)
    lines = [f"{len(rows)} candidates (backbone x resolution x strategy, with and without flip test-time "
             f"augmentation) within a budget of {board['budget_seconds']:.0f} s: {done} scored on every fold, "
             f"{stopped} stopped early (behind the leader on the same folds, or out of time), {skipped} skipped "
             f"(estimated not to fit the budget). Each was scored by the same {board['k']}-fold cross-validation "
             f"(seed {board['seed']}). Best {min(CARD_ROWS, len(rows))} (all in `leaderboard.md`):", "",
             "| rank | candidate | CV accuracy (mean +- sd over folds) | seconds | status | weight in the final model |",
             "|---|---|---|---|---|---|"]
    for r in rows[:CARD_ROWS]:
        score = f"{r['cv_mean']:.4f} +- {r['cv_sd']:.4f}" if r.get("cv_mean") is not None else "-"
        seconds = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"
        weight = f"{r['ensemble_weight']:.2f}" if r.get("ensemble_weight") else ""
        lines.append(f"| {r['rank']} | {r['name']} | {score} | {seconds} | {r['status']} | {weight} |")
    return lines


def _final_lines(board: dict[str, Any]) -> list[str]:
    members = _final_members(board)
    head = (f"An ensemble of {len(members)} members: the weighted mean of their class probabilities (Caruana et al. "
            "2004 ensemble selection on the out-of-fold predictions), each member refit on every labelled item."
            if len(members) > 1 else "A single model, refit on every labelled item.")
    lines = [head, "", "| member | backbone | resolution | strategy | flip TTA | weight |", "|---|---|---|---|---|---|"]
    for m in members:
        lines.append(f"| {m['name']} | `{m.get('backbone')}` | {m.get('image_size') or '-'} | {m.get('strategy')} | "
                     f"{'yes' if m.get('tta') else 'no'} | {m['weight']:.4f} |")
    return lines


def write_auto_card(stage: Path, metrics: dict[str, Any], name: str | None = None) -> Path:
    """The model card of an ``auto`` run folder (in staging: ``stage``), from its metrics and leaderboard."""
    from transferkit.evaluation.model_card import write_model_card

    board = json.loads((stage / LEADERBOARD_JSON).read_text())
    options = (metrics.get("config") or {}).get("auto") or {}
    members = _final_members(board)
    backbones = list(dict.fromkeys(m["backbone"] for m in members if m.get("backbone")))
    per_class = metrics["n_train_final"] / max(1, metrics["num_classes"])
    limits = [f"- **Chosen within a time budget** ({metrics['time_budget_seconds']:.0f} s): which candidates were "
              "tried depends on this machine's speed and load; the command below reproduces the search, and the "
              "same result where the same candidates fit the budget."]
    if per_class < 50:  # the card's few-labels threshold (evaluation.model_card.FEW_LABELS_PER_CLASS)
        limits.insert(0, f"- **Few labels:** {metrics['n_train_final']} labelled items for {metrics['num_classes']} "
                         f"classes (about {per_class:.0f} per class); the cross-validated estimate has the spread "
                         "shown above, and accuracy on other data can differ by more.")
    summary = (f"The model `transferkit auto` chose for `{options.get('data', 'unknown')}` by cross-validation: "
               f"{str(metrics['strategy']).removeprefix('auto: ')}.")
    return write_model_card(stage, metrics, command=auto_command(options), name=name, backbones=backbones,
                            summary=summary, limits=limits,
                            sections=[("What was searched", _search_lines(board)), ("Final model", _final_lines(board))])


def track_auto(tracking: Any, run_dir: Path, metrics: dict[str, Any]) -> None:
    """``auto --track``: the run folder as the parent run (options, final metrics, the folder as artefact) and one
    child run per leaderboard candidate (settings, per-fold and mean CV accuracy, seconds, status)."""
    from transferkit.tracking import TrackedRun, log_runs, run_record

    board = json.loads((run_dir / LEADERBOARD_JSON).read_text())
    children = []
    for row in board["leaderboard"]:
        options = {"backbone": row["backbone"], "strategy": row["strategy"], "image_size": row["image_size"],
                   "tta": row.get("tta", False)}
        values = {k: row[k] for k in ("rank", "cv_mean", "cv_sd", "oof_accuracy", "log_loss", "seconds",
                                      "estimated_seconds", "ensemble_weight") if row.get(k) is not None}
        history = [{"fold_accuracy": a} for a in row.get("fold_accuracies") or []]
        status = "FINISHED" if row["status"] == "done" else "KILLED"
        children.append(TrackedRun(row["name"], options, values, history, status=status,
                                   tags={"transferkit.candidate": row["name"], "transferkit.status": row["status"]}))
    log_runs(tracking, run_record(run_dir, metrics), children)
