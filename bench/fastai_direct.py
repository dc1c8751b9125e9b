"""fastai's standard recipe on the same EfficientNet-Lite0 ImageNet weights as transferkit (called by
bench/bench_auto.py; needs the ``bench`` extra, which installs fastai):

    python bench/fastai_direct.py --train DIR --test DIR --epochs 24 --seed 0   # prints one JSON line

``DIR`` holds one sub-folder per class. The recipe is what fastai's documentation teaches: ``ImageDataLoaders
.from_folder`` with ``valid_pct=0.15`` (fastai needs a validation set), ``Resize(224)`` + ``aug_transforms()``,
``vision_learner(dls, 'tf_efficientnet_lite0')`` and ``learn.fine_tune(epochs)``. Offline, the learner is built with
``pretrained=False`` and the converted Lite0 weights are loaded into its timm body (classifier dropped); inputs are
normalised with mean = std = 0.5 (timm's config for the TF Lite models). The epoch count sets the wall time;
batch size 16 instead of fastai's 64 (memory). ``cpu_seconds`` (training) shows how much of the machine it got.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="fastai's default 64 needs about 6 GB at 224 px "
                        "(killed for lack of memory on the shared benchmark machine)")
    args = parser.parse_args()
    started = time.perf_counter()
    import timm
    import torch
    from fastai.vision.all import (
        ImageDataLoaders,
        Normalize,
        Resize,
        accuracy,
        aug_transforms,
        get_image_files,
        set_seed,
        vision_learner,
    )

    from transferkit.backbones.efficientnet import lukemelas_to_timm, weights_path

    set_seed(args.seed, reproducible=True)
    dls = ImageDataLoaders.from_folder(args.train, valid_pct=0.15, seed=args.seed, item_tfms=Resize(args.size),
                                       batch_tfms=[*aug_transforms(), Normalize.from_stats([0.5] * 3, [0.5] * 3)],
                                       bs=args.batch_size, num_workers=0)
    learn = vision_learner(dls, "tf_efficientnet_lite0", pretrained=False, metrics=accuracy)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = lukemelas_to_timm(torch.load(weights_path(0), map_location="cpu", weights_only=True), reference)
    missing, unexpected = learn.model[0].model.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("classifier.")}, strict=False)
    if missing:
        raise SystemExit(f"weights missing from fastai's body: {missing[:5]}")
    learn.fine_tune(args.epochs)
    train_seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = usage.ru_utime + usage.ru_stime
    files = sorted(get_image_files(args.test))
    test_dl = learn.dls.test_dl(files, num_workers=0)
    probabilities, _ = learn.get_preds(dl=test_dl)
    vocab = list(learn.dls.vocab)
    labels = [vocab.index(Path(f).parent.name) for f in files]
    correct = (probabilities.argmax(1).numpy() == labels).mean()
    print(json.dumps({"accuracy": float(correct), "seconds": round(train_seconds, 1),
                      "cpu_seconds": round(cpu_seconds, 1), "epochs": args.epochs, "batch_size": args.batch_size,
                      "n_train": len(dls.train_ds), "n_valid": len(dls.valid_ds), "n_test": len(files)}))


if __name__ == "__main__":
    main()
