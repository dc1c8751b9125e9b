"""The model card (README.md) that fit writes into every run folder states the numbers of metrics.json."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import transferkit
from transferkit.evaluation.model_card import fit_command, model_card, wilson_interval, write_model_card

pytestmark = pytest.mark.usefixtures("isolated_cache")  # tests/conftest.py


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_fit_writes_a_card_with_the_run_numbers_and_a_command_that_reproduces_it(tmp_path):
    for cls in ("horizontal", "vertical"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(10):
            image = np.random.default_rng(i).integers(0, 60, (28, 28)).astype(np.uint8)
            image[::4, :] = 255
            Image.fromarray(image if cls == "horizontal" else image.T).save(tmp_path / "data" / cls / f"{i}.png")
    run = transferkit.fit(str(tmp_path / "data"), backbone="small_cnn", strategy="finetune", epochs=2, batch_size=8,
                          lr=0.01, out=str(tmp_path / "stripes"), progress=False, seed=3, head_dropout=0.1,
                          protocol="holdout")
    card = (run.path / "README.md").read_text()
    metrics = json.loads((run.path / "metrics.json").read_text())

    meta = front_matter(card)
    assert meta["library_name"] == "transferkit" and meta["pipeline_tag"] == "image-classification"
    scores = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert scores == {"accuracy": metrics["accuracy"], "f1": metrics["macro_f1"]}
    assert meta["model-index"][0]["results"][0]["dataset"]["split"] == "test"
    n = metrics["n_eval"]
    low, high = wilson_interval(metrics["accuracy"], n)
    assert f"(n = {n}): {metrics['accuracy']:.4f}, 95% Wilson interval [{low:.4f}, {high:.4f}]" in card
    assert f"**Macro-F1:** {metrics['macro_f1']:.4f}" in card
    sizes = metrics["dataset_sizes"]
    assert f"train {sizes['train']}, val {sizes['val']}, test {sizes['test']}" in card
    assert "`horizontal`, `vertical`" in card and "no pretrained weights" in card
    assert "Few labels:" in card and "Domain shift: not measured" in card
    for name, row in metrics["evaluation"]["per_class"].items():
        assert f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} |" in card

    # the command in the card is the run's: the CLI parses it back to the same options and trains the same model
    command = card.split("```bash\n")[1].split("\n```")[0]
    args = shlex.split(command)
    assert args[:2] == ["transferkit", "fit"] and "--seed" in args and "--head-dropout" in args
    args[args.index("--out") + 1] = str(tmp_path / "again")
    from transferkit.cli.main import main

    assert main(args[1:]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["accuracy"] == metrics["accuracy"] and again["config"]["train"] == metrics["config"]["train"]
    assert again["config"]["strategy"] == metrics["config"]["strategy"]


def test_card_reports_cross_validation_calibration_and_shift():
    metrics = {
        "accuracy": 0.8125, "macro_f1": 0.8, "n_eval": 160, "accuracy_split": "test",
        "cv": {"k": 5, "repeats": 2, "seed": 0, "fold_accuracies": [0.8, 0.9, 0.85, 0.75, 0.8, 0.9, 0.85, 0.8, 0.85,
                                                                     0.8], "mean": 0.83, "sd": 0.0483,
               "oof_accuracy": 0.8275, "chosen": {"C": 1.0}},
        "temperature": 1.7321, "val_ece_before_temperature": 0.1234, "val_ece_after_temperature": 0.0456,
        "dataset_sizes": {"train": 400, "val": 80, "test": 160}, "num_classes": 4,
        "class_names": ["a", "b", "c", "d"], "backbone": "minilm", "strategy": "linear-probe",
        "adaptation": {"method": "coral", "frame": "auto"},
        "config": {"fit": {"data": "reviews.csv", "pretrained": True}, "strategy": {"name": "linear-probe"}},
    }
    card = model_card(metrics, command="transferkit fit --data reviews.csv", name="reviews")
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["pipeline_tag"] == "text-classification"
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"]["split"] == "cross-validation"
    assert result["metrics"][0] == {"type": "accuracy", "value": 0.83, "name": "Accuracy (5-fold CV mean)"}
    assert "0.8300 +- 0.0483 (mean +- standard deviation over 10 folds: 5-fold stratified, 2 repeat(s)" in card
    assert "**Accuracy on the test split** (n = 160): 0.8125" in card and "C = 1.0" in card
    assert "**Out-of-fold accuracy** (every training item predicted by a model that did not see it): 0.8275" in card
    assert "T = 1.7321" in card and "0.1234 before, 0.0456 after" in card
    assert "adapted to target data with coral" in card and "Domain shift: not measured" not in card
    assert "Few labels" not in card  # 100 per class
    assert "transferkit fit --data reviews.csv" in card


def test_card_of_a_cross_validated_run_reports_out_of_fold_numbers_not_a_held_out_split():
    metrics = {"accuracy": 0.9, "macro_f1": 0.899, "accuracy_split": "cv", "protocol": "cv", "n_eval": 20,
               "dataset_sizes": {"train": 20, "val": 0, "test": 0}, "num_classes": 2, "backbone": "small_cnn",
               "cv": {"k": 5, "repeats": 1, "seed": 3, "fold_accuracies": [1.0, 1.0, 1.0, 1.0, 0.5], "mean": 0.9,
                      "sd": 0.2236, "oof_accuracy": 0.9, "chosen": {"epochs": 2}},
               "evaluation": {"per_class": {"h": {"precision": 0.8333, "recall": 1.0, "f1": 0.9091, "support": 10}}}}
    card = model_card(metrics, name="cv-run")
    low, high = wilson_interval(0.9, 20)
    assert f"**Out-of-fold accuracy** (every labelled item predicted by a model that did not see it) (n = 20): " \
           f"0.9000, 95% Wilson interval [{low:.4f}, {high:.4f}]" in card
    assert "held-out" not in card and "Per class on the out-of-fold predictions:" in card
    assert "0.9000 +- 0.2236" in card and "epochs = 2" in card


def test_card_shows_the_value_the_folds_chose_not_the_configured_default():
    metrics = {"accuracy": 0.85, "accuracy_split": "cv", "n_eval": 40, "backbone": "minilm",
               "cv": {"k": 4, "repeats": 3, "seed": 0, "fold_accuracies": [0.8, 0.9], "mean": 0.85, "sd": 0.05,
                      "chosen": {"probe_c": 0.01}},
               "config": {"strategy": {"name": "linear-probe", "options": {"probe_c": 1.0, "solver": "lbfgs"}}}}
    card = model_card(metrics, name="probe")
    assert "with probe_c=0.01 (chosen in the folds), solver=lbfgs" in card and "probe_c=1.0" not in card


def test_write_model_card_names_the_published_run_and_replaces_atomically(tmp_path):
    stage = tmp_path / ".my-run.partial"
    stage.mkdir()
    metrics = {"accuracy": 0.5, "n_eval": 10, "backbone": "small_cnn", "strategy": "finetune"}
    path = write_model_card(stage, metrics)
    assert path == stage / "README.md" and "# my-run" in path.read_text()
    write_model_card(stage, {**metrics, "accuracy": 0.75})
    assert "0.7500" in path.read_text() and [p.name for p in stage.iterdir()] == ["README.md"]


def test_fit_command_writes_only_options_that_differ_from_their_defaults():
    options = {"fit": {"data": "d", "backbone": None, "strategy": "linear-probe", "augment": False,
                       "progress": False, "overwrite": True, "val_fraction": 0.15},
               "train": {"seed": 0, "epochs": 7, "device": "cpu"}, "strategy": {"name": "linear-probe",
                                                                                 "options": {}}}
    args = shlex.split(fit_command(options, backbone="minilm"))
    assert args[:2] == ["transferkit", "fit"]
    assert "--no-augment" in args and args[args.index("--backbone") + 1] == "minilm"
    assert args[args.index("--epochs") + 1] == "7" and args[args.index("--seed") + 1] == "0"
    for absent in ("--progress", "--no-progress", "--overwrite", "--device", "--val-fraction"):
        assert absent not in args
    assert Path(args[args.index("--data") + 1]).name == "d"
