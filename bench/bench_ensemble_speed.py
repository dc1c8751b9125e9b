"""Prediction cost of auto's committee: shared backbone passes against one pass per member.

auto's final model for images is the committee of the flip-TTA final-layer and multi-stage probes of
EfficientNet-Lite0/1/2 at their own resolutions (six members). The two probes of one backbone read the same
backbone: the final embedding is the last columns of the multi-stage features, so ``EnsembleModel`` runs each backbone
once per view (6 passes per image) instead of once per member and view (12). Here the committee is built as auto
builds it (heads fitted on 20 labelled Fashion-MNIST training images per class and their mirror images), saved and
loaded as an ensemble folder, and both ways of predicting the same Fashion-MNIST test images are timed in the same
run, alternating, after one warm-up; the probabilities must agree.

    python -m bench.bench_ensemble_speed [--images 300] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import bench_command, write_section

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "ensemble_speed.md"
CACHE = ROOT / "cache" / "ensemble_speed"
NATIVE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def images(indices: np.ndarray, arrays: np.ndarray, labels: np.ndarray, class_names: list[str]):
    from PIL import Image

    from transferkit.data.base import LabeledData

    return LabeledData([Image.fromarray(arrays[i]) for i in indices], labels[indices].astype(np.int64),
                       list(class_names), "image", [str(i) for i in indices], name="fashion-mnist")


def committee_folder(folder: Path, labelled) -> Path:
    """The six probes, fitted as auto fits them, saved as an ensemble folder with equal weights."""
    from transferkit.autofit.ensemble import save_ensemble
    from transferkit.autofit.training import fit_probe_head, mirrored
    from transferkit.backbones import create_backbone
    from transferkit.engine.features import extract_features
    from transferkit.model import TaskSpec, TransferModel
    from transferkit.strategies.linear_probe import set_linear_head

    if (folder / "config.json").is_file():
        return folder
    members = []
    for name, size in NATIVE.items():
        stages = create_backbone(name, image_size=size, pool_stages=[3, 4])
        x = np.concatenate([extract_features(stages, view, progress=False) for view in (labelled, mirrored(labelled))])
        y = np.tile(labelled.labels, 2)
        for pool_stages in ([3, 4], None):
            backbone = create_backbone(name, image_size=size, **({"pool_stages": pool_stages} if pool_stages else {}))
            width = backbone.feature_dim
            weight, bias = fit_probe_head(x[:, -width:], y, labelled.num_classes, 1.0)
            model = TransferModel(backbone, [TaskSpec("label", "classify", list(labelled.class_names))])
            for p in model.backbone.parameters():
                p.requires_grad_(False)
            set_linear_head(model, weight.float(), bias.float())
            members.append((model.eval(), {"name": "linear-probe", "options": {"probe_c": 1.0}}, {"tta": "hflip"}))
    save_ensemble(folder, members, [1.0 / len(members)] * len(members))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300, help="Fashion-MNIST test images to predict.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="30 images, 1 repeat.")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 30, 1
    started = time.perf_counter()
    import torch

    from transferkit.api import load
    from transferkit.data.builtin import builtin_arrays

    torch.set_num_threads(2)
    arrays, labels, class_names, test_index = builtin_arrays("fashion-mnist")
    train = np.setdiff1d(np.arange(len(labels)), test_index)
    rng = np.random.default_rng(0)
    chosen = np.concatenate([rng.choice(train[labels[train] == c], 20, replace=False) for c in range(10)])
    folder = committee_folder(CACHE / "committee", images(chosen, arrays, labels, class_names))
    test = images(np.sort(rng.choice(test_index, args.images, replace=False)), arrays, labels, class_names)
    ensemble = load(folder, device="cpu")
    ensemble.predict_proba_data(test.subset(np.arange(8)))  # warm-up (and the groups)
    shared_groups = ensemble.groups_
    separate_groups = [[i] for i in range(len(ensemble.members))]
    times: dict[str, list[float]] = {"shared": [], "separate": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, groups in (("separate", separate_groups), ("shared", shared_groups)):
            ensemble.groups_ = groups
            t = time.perf_counter()
            outputs[name] = ensemble.predict_proba_data(test)
            times[name].append(time.perf_counter() - t)
    difference = float(np.abs(outputs["shared"] - outputs["separate"]).max())
    accuracy = float((outputs["shared"].argmax(1) == test.labels).mean())
    ratios = [s / p for s, p in zip(times["separate"], times["shared"])]
    body = "\n".join([
        "| prediction | backbone passes per image | seconds per image (mean over repeats) |",
        "|---|---|---|",
        f"| one pass per member and view (before) | 12 | {statistics.mean(times['separate']) / len(test):.3f} |",
        f"| members of one backbone share its pass (now) | 6 | {statistics.mean(times['shared']) / len(test):.3f} |",
    ]) + (f"\n\nThe committee of six probes (EfficientNet-Lite0/1/2 at 224 / 240 / 260 px, final-layer and multi-stage, "
          f"flip TTA), {len(test)} Fashion-MNIST test images, batch 64, 2 CPU threads, {args.repeats} repeat(s) "
          f"alternating. Speed-up, same run: {statistics.mean(ratios):.2f}x (per repeat "
          f"{', '.join(f'{r:.2f}' for r in ratios)}). Largest probability difference between the two ways: "
          f"{difference:.1e}; the committee's accuracy on these images: {accuracy:.3f} (20 labels per class, seed 0).\n")
    write_section(RESULTS, "Prediction cost of auto's committee (shared backbone passes)",
                  bench_command("bench.bench_ensemble_speed", argv), started, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
