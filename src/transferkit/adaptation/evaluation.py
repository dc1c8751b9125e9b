"""Evaluation hook: for a domain-adapted run, score its source-only baseline on the same labelled data.

``transferkit evaluate --model RUN --data TARGET`` then prints ``source_only_accuracy`` next to the adapted
model's accuracy and ``adaptation_gain`` (their difference). The frame of a run (``--frame``) is part of both
models' preprocessing (saved with them; ``transferkit.model.load_model`` reads it from an older run's
metrics.json), so ``accuracy`` itself is the framed score and the baseline is scored on identically framed
data; for such runs ``frame`` and ``adapted_accuracy`` (= ``accuracy``) are reported too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferkit.adaptation.extension import BASELINE_DIR


def add_arguments(parser: Any) -> None:
    parser.add_argument("--source-only", dest="source_only", action="store_true", default=True,
                        help="For a domain-adapted run: also score its source-only baseline (default on).")
    parser.add_argument("--no-source-only", dest="source_only", action="store_false",
                        help="Skip the source-only comparison.")


def run_folder(model_path: str | Path) -> Path:
    path = Path(model_path)
    return path.parent if (path / "config.json").is_file() and path.name == "model" else path


def evaluate_hook(model: Any, data: Any, report: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    if not options.get("source_only", True):
        return {}
    frame = model.module.backbone.frame
    extra: dict[str, Any] = {"frame": frame, "adapted_accuracy": report["accuracy"]} if frame != "none" else {}
    baseline_dir = run_folder(model.path) / BASELINE_DIR / "model"
    if not (baseline_dir / "config.json").is_file():
        return extra
    from transferkit.engine.placement import module_device, place
    from transferkit.inference import evaluate_model
    from transferkit.model import load_model

    baseline, _ = load_model(baseline_dir)  # framed as the adapted model is (its saved spec)
    place(baseline, module_device(model.module))  # scored where the adapted model is (``--device``)
    source_only = evaluate_model(baseline, data, int(options.get("batch_size", 64) or 64))["accuracy"]
    return {**extra, "source_only_accuracy": source_only, "adaptation_gain": report["accuracy"] - source_only}
