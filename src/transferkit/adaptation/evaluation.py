"""Evaluation hook: for a domain-adapted run, score its source-only baseline on the same labelled data.

``transferkit evaluate --model RUN --data TARGET`` then prints ``source_only_accuracy`` next to the adapted
model's accuracy and ``adaptation_gain`` (their difference). When the run framed its images (``--frame``),
both models are scored on identically framed data (``adapted_accuracy`` is the framed score of the adapted
model; ``accuracy`` above it stays the plain score of the data as given).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transferkit.adaptation.extension import BASELINE_DIR
from transferkit.adaptation.framing import framed


def add_arguments(parser: Any) -> None:
    parser.add_argument("--source-only", dest="source_only", action="store_true", default=True,
                        help="For a domain-adapted run: also score its source-only baseline (default on).")
    parser.add_argument("--no-source-only", dest="source_only", action="store_false",
                        help="Skip the source-only comparison.")


def run_folder(model_path: str | Path) -> Path:
    path = Path(model_path)
    return path.parent if (path / "config.json").is_file() and path.name == "model" else path


def run_frame(folder: Path) -> str:
    """The ``--frame`` the run was trained with (``none`` when unknown)."""
    metrics = folder / "metrics.json"
    if metrics.is_file():
        return json.loads(metrics.read_text()).get("adaptation", {}).get("frame", "none")
    return "none"


def evaluate_hook(model: Any, data: Any, report: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    if not options.get("source_only", True):
        return {}
    folder = run_folder(model.path)
    baseline_dir = folder / BASELINE_DIR / "model"
    frame = run_frame(folder)
    if not (baseline_dir / "config.json").is_file() and frame == "none":
        return {}
    from transferkit.engine.placement import module_device, place
    from transferkit.inference import evaluate_model
    from transferkit.model import load_model

    batch_size = int(options.get("batch_size", 64) or 64)
    scored = framed(data, frame)
    extra: dict[str, Any] = {}
    adapted = report["accuracy"] if frame == "none" else evaluate_model(model.module, scored, batch_size)["accuracy"]
    if frame != "none":
        extra.update({"frame": frame, "adapted_accuracy": adapted})
    if (baseline_dir / "config.json").is_file():
        baseline, _ = load_model(baseline_dir)
        place(baseline, module_device(model.module))  # scored where the adapted model is (``--device``)
        source_only = evaluate_model(baseline, scored, batch_size)["accuracy"]
        extra.update({"source_only_accuracy": source_only, "adaptation_gain": adapted - source_only})
    return extra
