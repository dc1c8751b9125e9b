"""Calibration (ECE, reliability diagram, temperature scaling fitted at fit time) and FGSM on a tiny model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from transferkit.evaluation.attacks import evaluate_hook as attack_hook
from transferkit.evaluation.attacks import fgsm, input_normalisation
from transferkit.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    model_logits,
    reliability_diagram,
    softmax,
)


def test_reliability_diagram_hand_computed():
    # confidences 0.95 (right), 0.95 (wrong), 0.55 (right), 0.55 (right)
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])
    diagram = reliability_diagram(probabilities, labels)
    assert diagram["bins"] == 15 and sum(diagram["count"]) == 4
    # bin of 0.95: accuracy 0.5, confidence 0.95; bin of 0.55: accuracy 1, confidence 0.55
    expected = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.55)
    assert diagram["ece"] == pytest.approx(expected)
    top = int(0.95 * 15)
    assert diagram["accuracy"][top] == pytest.approx(0.5) and diagram["confidence"][top] == pytest.approx(0.95)
    assert diagram["accuracy"][0] is None
    # a perfectly calibrated, fully confident classifier has ECE 0
    assert expected_calibration_error(np.eye(3), np.arange(3)) == pytest.approx(0.0)


def test_temperature_scaling_recovers_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(3000, 4)) * 1.5
    labels = np.array([rng.choice(4, p=p) for p in softmax(true_logits)])
    overconfident = 3.0 * true_logits
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(softmax(overconfident), labels)
    after = expected_calibration_error(softmax(overconfident, temperature), labels)
    assert after < before / 2


class _TinyModel(torch.nn.Module):
    """A linear classifier on 1x2x2 images with ModelOutput-like output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
            self.linear.bias.zero_()

    def forward(self, x):
        return SimpleNamespace(logits=self.linear(x.flatten(1)))


def test_fgsm_step_is_the_signed_gradient_within_the_valid_range():
    model = _TinyModel()
    # normalised with mean 0.5, std 0.5: pixel p -> 2p - 1; valid range [-1, 1]
    normalisation = (torch.tensor([0.5]), torch.tensor([0.5]))
    x = torch.tensor([[[[0.2, 0.2], [0.0, 0.0]]]])  # class 0 slightly ahead
    y = torch.tensor([0])
    adversarial = fgsm(model, x, y, epsilon=0.25, normalisation=normalisation)
    # the loss gradient raises class 1's pixels and lowers class 0's: step 0.25 / 0.5 = 0.5 in normalised units
    assert torch.allclose(adversarial, torch.tensor([[[[-0.3, -0.3], [0.5, 0.5]]]]))
    assert model(adversarial).logits.argmax().item() == 1  # the prediction flips
    clipped = fgsm(model, torch.tensor([[[[0.9, 0.9], [-0.9, -0.9]]]]), torch.tensor([1]), 0.25, normalisation)
    assert clipped.max() <= 1.0 and clipped.min() >= -1.0


def test_fgsm_does_not_apply_to_text_models():
    model = SimpleNamespace(modality="text")
    result = attack_hook(model, None, {}, {"attack": "fgsm", "epsilon": 0.03})
    assert "does not apply" in result["attack_note"] and "adversarial_accuracy" not in result
    assert attack_hook(model, None, {}, {}) == {}


def _tiny_image_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, base in (("dark", 60), ("light", 190)):
        (root / label).mkdir(parents=True)
        for i in range(14):
            pixels = np.clip(base + rng.normal(0, 20, (10, 10)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_fit_with_temperature_then_evaluate_with_fgsm(tmp_path, monkeypatch):
    from PIL import Image

    import transferkit

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    data = _tiny_image_folder(tmp_path / "data")
    run = transferkit.fit(str(data), backbone="small_cnn", strategy="linear-probe", image_size=8,
                          batch_size=8, lr=0.01, out=str(tmp_path / "run"), progress=False, temperature_scale=True,
                          check_data=True, protocol="holdout")  # T on the validation split, data check of the test
                                                                # split (under cv: test_crossfit.py)
    saved = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert saved["fitted_on"] == "validation split" and saved["temperature"] > 0
    assert run.metrics["temperature"] == pytest.approx(saved["temperature"])
    assert run.metrics["data_check"]["duplicates"]["test_items"] > 0
    assert set(run.metrics["data_check"]["balance"]) == {"train", "val", "test"}

    model = transferkit.load(tmp_path / "run")
    assert input_normalisation(model.module.backbone) is not None
    assert model.temperature == pytest.approx(saved["temperature"]) and model.temperature != 1.0
    images = sorted(str(f) for f in data.rglob("*.png"))[:4]
    calibrated = model.predict_proba(images)
    logits = model_logits(model.module, model._as_data(images))
    np.testing.assert_allclose(calibrated, softmax(logits, saved["temperature"]), atol=1e-5)
    assert model.predict(images) == [model.classes_[i] for i in logits.argmax(1)]  # argmax unchanged by T
    report = transferkit.evaluate(model, str(data), progress=False, attack="fgsm", epsilon=0.5,
                                  temperature_scale=True, attack_image=str(tmp_path / "flip.png"))
    assert 0 <= report["ece"] <= 1 and sum(report["reliability"]["count"]) == report["n"]
    assert report["temperature"] == pytest.approx(saved["temperature"])
    assert "ece_temperature_scaled" in report
    assert report["clean_accuracy"] == pytest.approx(report["accuracy"])
    assert report["adversarial_accuracy"] < report["clean_accuracy"]  # a large epsilon must hurt
    image = np.asarray(Image.open(report["attack_example_image"]).convert("L"))
    assert image.std() > 5  # a real picture, not a blank canvas


def test_flip_figure_replaces_the_png_atomically(tmp_path, monkeypatch):
    """The figure lands in an already published run folder: written to a temporary file and moved into place, so a
    failed write leaves the previous figure whole and no temporary file behind."""
    import os

    from transferkit.evaluation.attacks import save_flip_figure

    example = {"clean": torch.full((1, 6, 6), 0.2), "adversarial": torch.full((1, 6, 6), 0.3), "label": 0,
               "clean_prediction": 0, "clean_p": 0.9, "adv_prediction": 1, "adv_p": 0.6}
    result = {"example": example, "normalisation": None}
    path = tmp_path / "run" / "fgsm_example.png"
    assert save_flip_figure(result, ["a", "b"], 0.1, path) == path
    assert path.read_bytes().startswith(b"\x89PNG") and sorted(os.listdir(path.parent)) == ["fgsm_example.png"]
    previous = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_flip_figure(result, ["b", "a"], 0.2, path)
    assert path.read_bytes() == previous and sorted(os.listdir(path.parent)) == ["fgsm_example.png"]
