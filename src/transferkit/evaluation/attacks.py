"""Adversarial robustness: ``evaluate --attack fgsm --epsilon E``.

Fast gradient sign method (Goodfellow, Shlens & Szegedy 2015, "Explaining and Harnessing Adversarial
Examples"): ``x_adv = clip(x + epsilon * sign(grad_x CE(f(x), y)), 0, 1)``, one step, untargeted.

Where the perturbation lives: ``epsilon`` is in *pixel* units of the preprocessed image (values 0..1 after
resizing and cropping, before the mean/std normalisation), so ``--epsilon 8/255 ~ 0.03`` means what it usually
does. The attack runs on the normalised tensor the network sees, with the step ``epsilon / std`` per channel
and clipping to the normalised image of [0, 1]; that is the same attack expressed after the (affine)
normalisation. Text models: FGSM perturbs continuous pixels and does not apply to token inputs; the report
says so instead of a number.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from transferkit.errors import TransferkitError, check_number
from transferkit.rundir import atomic_path, record_file

logger = logging.getLogger(__name__)

ATTACKS = ("fgsm",)
DEFAULT_EPSILON = 0.03


def input_normalisation(backbone: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel (mean, std) the backbone's eval preprocessing normalises with, or None if not found."""
    from torchvision import transforms

    norm = getattr(backbone, "normalization", None)
    if isinstance(norm, dict) and "mean" in norm and "std" in norm:
        return torch.tensor(norm["mean"], dtype=torch.float32), torch.tensor(norm["std"], dtype=torch.float32)
    pending = [getattr(backbone, "_eval_transform", None)]
    while pending:
        t = pending.pop()
        if isinstance(t, transforms.Normalize):
            return torch.tensor(t.mean, dtype=torch.float32), torch.tensor(t.std, dtype=torch.float32)
        pending.extend(getattr(t, "transforms", []) or [])
    return None


def fgsm(module: Any, inputs: torch.Tensor, labels: torch.Tensor, epsilon: float,
         normalisation: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """One FGSM step on normalised ``inputs`` (B, C, H, W); ``epsilon`` in pixel units (see module doc)."""
    mean, std = normalisation if normalisation is not None else (torch.zeros(1), torch.ones(1))
    shape = (1, -1, 1, 1)
    mean, std = mean.to(inputs).view(shape), std.to(inputs).view(shape)
    x = inputs.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(module(x).logits, labels)
    (grad,) = torch.autograd.grad(loss, x)
    adversarial = x.detach() + (epsilon / std) * grad.sign()
    if normalisation is not None:  # stay a valid image: pixels in [0, 1]
        adversarial = torch.maximum(torch.minimum(adversarial, (1 - mean) / std), (0 - mean) / std)
    return adversarial.detach()


def attack_accuracy(module: Any, data: Any, epsilon: float, batch_size: int = 64) -> dict[str, Any]:
    """Clean and FGSM accuracy on labelled image data, plus the first example whose prediction flips."""
    from transferkit.data.loader import make_loader
    from transferkit.engine.placement import module_device, to_device

    module.eval()
    device = module_device(module)
    normalisation = input_normalisation(module.backbone)
    clean_correct = adv_correct = total = 0
    example = None
    for batch in make_loader(data, module.backbone, batch_size=batch_size, train=False):
        inputs, labels = to_device((batch["inputs"], batch["labels"]), device)
        with torch.no_grad():
            clean_probs = torch.softmax(module(inputs).logits.float(), -1)
        adversarial = fgsm(module, inputs, labels, epsilon, normalisation)
        with torch.no_grad():
            adv_probs = torch.softmax(module(adversarial).logits.float(), -1)
        clean_ok, adv_ok = clean_probs.argmax(-1) == labels, adv_probs.argmax(-1) == labels
        clean_correct += int(clean_ok.sum())
        adv_correct += int(adv_ok.sum())
        total += len(labels)
        flipped = torch.nonzero(clean_ok & ~adv_ok).flatten()
        if example is None and len(flipped):
            i = int(flipped[0])
            example = {"index": int(batch["index"][i]), "clean": inputs[i].cpu(), "adversarial": adversarial[i].cpu(),
                       "label": int(labels[i]), "clean_prediction": int(clean_probs[i].argmax()),
                       "clean_p": float(clean_probs[i].max()), "adv_prediction": int(adv_probs[i].argmax()),
                       "adv_p": float(adv_probs[i].max())}
    return {"clean_accuracy": clean_correct / max(total, 1), "adversarial_accuracy": adv_correct / max(total, 1),
            "n": total, "example": example, "normalisation_found": normalisation is not None,
            "normalisation": normalisation}


def _to_display(tensor: torch.Tensor, normalisation: tuple[torch.Tensor, torch.Tensor] | None) -> np.ndarray:
    x = tensor.float()
    if normalisation is not None:
        mean, std = normalisation
        x = x * std.view(-1, 1, 1) + mean.view(-1, 1, 1)
    x = x.clamp(0, 1).cpu().numpy()
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)


def save_flip_figure(result: dict[str, Any], class_names: list[str], epsilon: float, path: Path) -> Path:
    """A PNG with the clean image, the (amplified) perturbation and the adversarial image."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ex, norm = result["example"], result["normalisation"]
    clean, adversarial = _to_display(ex["clean"], norm), _to_display(ex["adversarial"], norm)
    delta = adversarial - clean
    delta = 0.5 + delta / (2 * max(float(np.abs(delta).max()), 1e-12))
    grey = "grey" if clean.ndim == 2 else None
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    panels = [(clean, f"clean: {class_names[ex['clean_prediction']]} ({ex['clean_p']:.2f})"),
              (delta, f"perturbation (eps {epsilon:g}, amplified)"),
              (adversarial, f"FGSM: {class_names[ex['adv_prediction']]} ({ex['adv_p']:.2f})")]
    for ax, (image, title) in zip(axes, panels):
        ax.imshow(image, cmap=grey, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"true class: {class_names[ex['label']]}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # atomic: the run folder is already published
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight", facecolor="white")
    finally:
        plt.close(fig)
    return path


# --- evaluation hook ---------------------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    parser.add_argument("--attack", choices=ATTACKS, help="Also measure accuracy under this adversarial attack "
                                                          "(fgsm: Goodfellow et al. 2015; image models only).")
    parser.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON,
                        help="Attack strength in pixel units of [0, 1] (0.03 ~ 8/255).")
    parser.add_argument("--attack-image", help="PNG of an example whose prediction flips (default: "
                                               "<run folder>/fgsm_example.png).")


def evaluate_hook(model: Any, data: Any, report: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    attack = options.get("attack")
    if not attack:
        return {}
    value = options.get("epsilon")  # checked here, so the Python API (evaluate(..., epsilon=...)) is checked too
    epsilon = check_number("--epsilon", DEFAULT_EPSILON if value is None else value, 0, 1, low_open=True)
    if not 0 < epsilon <= 1:
        raise TransferkitError(f"invalid --epsilon {epsilon}", "use a pixel-scale value in (0, 1], e.g. 0.03")
    if model.modality != "image":
        return {"attack": attack, "attack_note": f"{attack} perturbs continuous pixel values; it does not apply to "
                                                 f"{model.modality} models (discrete tokens)"}
    keep = data.labels >= 0
    labelled = data.subset(np.flatnonzero(keep)) if not keep.all() else data
    result = attack_accuracy(model.module, labelled, epsilon)
    extra: dict[str, Any] = {"attack": attack, "epsilon": epsilon, "clean_accuracy": result["clean_accuracy"],
                             "adversarial_accuracy": result["adversarial_accuracy"]}
    if not result["normalisation_found"]:
        extra["attack_note"] = "the backbone's normalisation was not found: epsilon is in its input units, unclipped"
    if result["example"] is not None:
        from transferkit.evaluation.calibration import run_folder_of

        run_folder = run_folder_of(model.path)
        target = Path(options.get("attack_image") or run_folder / f"{attack}_example.png")
        extra["attack_example_image"] = str(save_flip_figure(result, list(model.classes_), epsilon, target))
        record_file(run_folder, target)  # ours when it lands in the run folder: --overwrite replaces it
    return extra
