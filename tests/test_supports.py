"""No option is silently ignored: every strategy x fit-extension mode x task kind, generated from the registries,
either trains on tiny data or is refused up front (by ``resolve_options``: one line naming both sides, exit 2).

The modes come from each extension's ``modes()`` (e.g. one per registered adaptation method), the task kinds from
``transferkit.tasks.RUN_TASK_KINDS`` (each run with the first ``--task`` type of that kind). Registries refuse a
second entry under a taken name.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import transferkit
from transferkit.api import resolve_options
from transferkit.errors import TransferkitError
from transferkit.extensions import NEEDS_PATH, list_extensions
from transferkit.strategies import list_strategies
from transferkit.tasks import RUN_TASK_KINDS, TASK_TYPES

#: tiny settings per strategy (its own options only: every combination keeps them)
STRATEGY_OPTIONS = {"lora": {"lora_targets": ["stages.2.0"], "lora_r": 2}, "fish": {"fish_batches": 1},
                    "contrastive": {"max_pairs": 8, "pair_batch_size": 8}, "adapter": {}}
TINY = {"backbone": "small_cnn", "image_size": 16, "limit_per_class": 3, "test_limit": 6, "epochs": 1,
        "batch_size": 16, "progress": False, "device": "cpu", "threads": 1, "head_init": None,
        "protocol": "holdout"}  # one training per combination; every strategy under cv: the test below


def _modes() -> dict[str, tuple[str, dict]]:
    """``{label: (extension describing flag, options)}`` of every extension but ``tasks`` (the task-kind axis)."""
    modes: dict[str, tuple[str, dict]] = {"none": ("", {})}
    for name, cls in list_extensions().items():
        if name != "tasks":
            modes.update({label: (name, options) for label, options in cls.modes().items()})
    return modes


def _task_kinds() -> dict[str, dict]:
    """Per run task kind, the options of the first ``--task`` type of that kind (from the tasks extension)."""
    tasks_modes = list_extensions()["tasks"].modes()
    kinds: dict[str, dict] = {"label": {}}
    for kind in RUN_TASK_KINDS[1:]:
        task_type = next(t for t, (k, _) in TASK_TYPES.items() if k == kind)
        kinds[kind] = tasks_modes[f"task {task_type}"]
    return kinds


MODES = _modes()
KINDS = _task_kinds()
COMBINATIONS = [(s, m, k) for s in sorted(list_strategies()) for m in MODES for k in KINDS]


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama_dir) -> dict[str, str]:
    """Files the modes need: unlabelled target images, a few labelled target images (classes 3..8 as stars),
    a pairs CSV, a finished run to --init-from, a text file and a tiny causal LM."""
    from transferkit.data.stars import make_stars

    root = tmp_path_factory.mktemp("supports")
    stars = make_stars()
    rng = np.random.default_rng(0)
    pairs = [("source", "target")]
    two_per_class = [i for c in range(len(stars.class_names)) for i in np.flatnonzero(stars.labels == c)[:2]]
    for i in two_per_class:
        item, label = stars.items[i], stars.labels[i]
        image = np.asarray(item.convert("L") if hasattr(item, "convert") else item)
        shifted = np.clip(image * 0.6 + rng.integers(0, 40, image.shape), 0, 255)
        _png(root / "target" / "all" / f"{i}.png", shifted)
        _png(root / "labelled" / stars.class_names[label] / f"{i}.png", shifted)
        _png(root / "pairs" / f"s{i}.png", image)
        _png(root / "pairs" / f"t{i}.png", shifted)
        pairs.append((f"s{i}.png", f"t{i}.png"))
    with open(root / "pairs" / "pairs.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(pairs)
    run = transferkit.fit("stars", strategy="finetune", out=str(root / "init"), cache_dir=str(root / "cache"),
                          **{**TINY, "head_init": "random"})
    passages = ["the cat sat on the mat . " * 3 + str(rng.choice(["good", "bad"])) for _ in range(10)]
    (root / "notes.txt").write_text("\n\n".join(passages))
    return {"target_data": str(root / "target"), "unlabelled": str(root / "target"),
            "target_labelled": str(root / "labelled"),
            "pairs": str(root / "pairs" / "pairs.csv"), "init_from": str(run.path), "text": str(root / "notes.txt"),
            "lm": f"hf-causal:{tiny_llama_dir}", "cache": str(root / "cache"), "track_uri": str(root / "tracking")}


def _options(strategy: str, mode: str, kind: str, inputs: dict[str, str]) -> dict:
    extension_options = {k: inputs[k] if v == NEEDS_PATH else v for k, v in MODES[mode][1].items()}
    options = {**TINY, "cache_dir": inputs["cache"], **STRATEGY_OPTIONS.get(strategy, {}), **extension_options,
               **KINDS[kind], "strategy": strategy, "data": "stars"}
    if MODES[mode][0] == "adaptation" and "adapt" in options:
        options["adapt_baseline"] = False  # the source-only baseline is the same training again
    if kind == "causal_lm":
        options.update(data=inputs["text"], backbone=inputs["lm"], max_length=24, image_size=None, test_limit=None,
                       limit_per_class=None, val_fraction=0.2, lora_targets=None)
    if strategy == "finetune" and options["head_init"] is None:
        options["head_init"] = "random"
    return {k: v for k, v in options.items() if v is not None}


def test_the_matrix_is_generated_from_the_registries():
    assert all(cls.modes() for cls in list_extensions().values())  # every extension is in the matrix
    assert {"linear-probe", "finetune", "knn", "prototypes", "contrastive"} <= set(list_strategies())
    assert {"adapt dann", "adapt coral", "adapt feature-matching", "anchor kl", "temperature-scale",
            "check-data"} <= set(MODES)
    assert set(KINDS) == set(RUN_TASK_KINDS) and {"label", "regress", "causal_lm"} <= set(KINDS)


@pytest.mark.parametrize("strategy,mode,kind", COMBINATIONS, ids=["|".join(c) for c in COMBINATIONS])
def test_every_combination_trains_or_is_refused_up_front(strategy, mode, kind, inputs, tmp_path):
    options = _options(strategy, mode, kind, inputs)
    try:
        resolve_options(dict(options))
    except TransferkitError as refused:
        message = str(refused)
        assert f"--strategy {strategy}" in message, message  # names both sides
        extension = MODES[mode][0]
        assert (extension and _flag_of(mode) in message) or (kind != "label" and "--task" in message), message
        assert "\n" not in message
        return
    run = transferkit.fit(out=str(tmp_path / "run"), **options)
    assert (tmp_path / "run" / "metrics.json").is_file() and run.metrics["strategy"] == strategy
    recorded = run.metrics["config"]["extensions"]
    assert MODES[mode][0] in recorded or mode == "none"


@pytest.mark.parametrize("strategy", sorted(list_strategies()))
def test_every_strategy_trains_under_the_cv_protocol(strategy, inputs, tmp_path):
    """The few-shot default (``--protocol auto`` picks cv for tiny data): k folds, then the refit on every item
    (3 per class: contrastive needs two of a class in every fold's training part)."""
    run = transferkit.fit(out=str(tmp_path / "run"), **{**_options(strategy, "none", "label", inputs), "protocol": "cv"})
    assert run.metrics["protocol"] == "cv" and run.metrics["accuracy_split"] == "cv"
    assert run.metrics["strategy"] == strategy


def _flag_of(mode: str) -> str:
    """The flag a mode's label starts with, as the refusal names it (``adapt dann`` -> ``--adapt dann``)."""
    return "--" + mode.split(" ")[0] if mode != "init-from" else "--init-from"


@pytest.mark.parametrize("options,refused", [
    ({"strategy": "contrastive", "anchor": "l2sp"}, "--anchor l2sp does not work with --strategy contrastive"),
    ({"strategy": "contrastive", "adapt": "dann", "target_data": "x"},
     "--adapt dann does not work with --strategy contrastive"),
    ({"strategy": "prototypes", "adapt": "importance-weighting", "target_data": "x"},
     "--adapt importance-weighting does not work with --strategy prototypes"),
    ({"strategy": "lora", "task": ["causal-lm"], "anchor": "l2sp"}, "--anchor l2sp does not work with --strategy "
                                                                    "lora and --task causal-lm"),
    ({"strategy": "lora", "task": ["causal-lm"], "temperature_scale": True}, "--temperature-scale does not work"),
    ({"strategy": "knn", "task": ["size:regress"]}, "--strategy knn cannot train --task size:regress"),
    ({"strategy": "contrastive", "task": ["classify", "size:regress"]}, "--strategy contrastive cannot train"),
    ({"strategy": "fish", "task": ["size:quantile"]}, "--strategy fish cannot train --task size:quantile"),
    ({"strategy": "linear-probe", "solver": "sgd", "adapt": "feature-augmentation", "target_labelled": "x"},
     "--adapt feature-augmentation does not work with --strategy linear-probe"),
    ({"strategy": "knn", "label_smoothing": 0.1}, "--label-smoothing does not work with --strategy knn"),
    ({"strategy": "linear-probe", "head_dropout": 0.2}, "--head-dropout does not work with --strategy linear-probe"),
])
def test_silent_cases_from_the_review_are_refused_in_one_line(options, refused, capsys):
    from transferkit.cli.main import main

    with pytest.raises(TransferkitError, match=refused):
        resolve_options({"data": "stars", **options})
    argv = ["fit"]
    for key, value in {"data": "stars", **options}.items():
        flag = "--" + key.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            argv += [flag] if item is True else [flag, str(item)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert refused in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_registries_refuse_a_duplicate_name():
    from transferkit.adaptation.base import AdaptationMethod, list_adaptations, register_adaptation
    from transferkit.backbones import check_backbone_name, register_backbone
    from transferkit.evaluation.hooks import HOOK_MODULES, hook_modules
    from transferkit.extensions import FitExtension, register_extension
    from transferkit.strategies import Strategy, register_strategy

    class Finetune(Strategy):
        name = "finetune"

    class Tasks(FitExtension):
        name = "tasks"

    class Dann(AdaptationMethod):
        name = "dann"

    list_adaptations()
    check_backbone_name("small_cnn")  # loads the backbone modules
    with pytest.raises(ValueError, match="strategy 'finetune' is registered twice"):
        register_strategy(Finetune)
    with pytest.raises(ValueError, match="fit extension 'tasks' is registered twice"):
        register_extension(Tasks)
    with pytest.raises(ValueError, match="adaptation method 'dann' is registered twice"):
        register_adaptation(Dann)
    with pytest.raises(ValueError, match="backbone 'small_cnn' is registered twice"):
        register_backbone("small_cnn", lambda: None)(lambda pretrained=False: None)
    with pytest.raises(ValueError, match="registered twice"):
        hook_modules([*HOOK_MODULES, HOOK_MODULES[0]])
    # the same class registered again (a module imported twice) is not a duplicate
    assert register_strategy(list_strategies()["finetune"]) is list_strategies()["finetune"]



@pytest.mark.parametrize("options, named", [
    ({"strategy": "linear-probe", "epochs": 30, "lr": 0.01}, "--epochs and --lr are not used by --strategy "
                                                            "linear-probe: its lbfgs solver"),
    ({"strategy": "prototypes", "schedule": "constant"}, "--schedule is not used by --strategy prototypes"),
    ({"strategy": "knn", "epochs": 3, "lr": 0.1, "early_stopping": 2}, "--epochs, --lr and --early-stopping are "
                                                                       "not used by --strategy knn"),
    ({"strategy": "contrastive", "epochs": 5, "lr": 1e-4}, "--epochs and --lr are not used by --strategy "
                                                           "contrastive: its pair stage trains with "
                                                           "--contrastive-epochs and --contrastive-lr"),
])
def test_training_options_a_strategy_never_reads_are_named_in_a_warning(options, named, caplog):
    from transferkit.fitting import warn_unused_train_options

    _, train, strategy, _ = resolve_options({"data": "stars", "batch_size": 8, **options})
    with caplog.at_level("WARNING", logger="transferkit"):
        warn_unused_train_options(strategy, train)
    assert named in caplog.text and "--batch-size" not in caplog.text


@pytest.mark.parametrize("options", [
    {"strategy": "linear-probe", "solver": "sgd", "epochs": 30, "lr": 0.01},
    {"strategy": "finetune", "epochs": 3, "lr": 0.1, "schedule": "constant"},
    {"strategy": "linear-probe"},  # the defaults are no user's choice
    {"strategy": "contrastive", "optimizer": "sgd", "contrastive_epochs": 2},
])
def test_training_options_a_strategy_reads_raise_no_warning(options, caplog):
    from transferkit.fitting import warn_unused_train_options

    _, train, strategy, _ = resolve_options({"data": "stars", **options})
    with caplog.at_level("WARNING", logger="transferkit"):
        warn_unused_train_options(strategy, train)
    assert "not used by" not in caplog.text


def test_a_fit_names_the_unused_option_after_checking_its_inputs(tmp_path, capsys):
    """End to end: a prototypes fit with --epochs trains and warns once; a refused one stays one line."""
    from transferkit.cli.main import main

    argv = ["fit", "--data", "stars", "--strategy", "prototypes", "--epochs", "3", "--backbone", "small_cnn",
            "--image-size", "16", "--limit-per-class", "3", "--test-limit", "6", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().err.count("--epochs is not used by --strategy prototypes") == 1
    (tmp_path / "file").write_text("mine")
    assert main([*argv, "--out", str(tmp_path / "file")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("options", [{"dataset": "stars"}, {"Data": "stars"}, {"data": "stars", "epoch": 3}])
def test_a_misspelled_option_is_named_before_any_other_check(options, tmp_path, capsys):
    """`dataset: photos` in a config file said "no data given" (FitConfig.validate ran first): the unknown key is
    what is wrong, and the one line names it."""
    from transferkit.cli.main import main

    misspelled = next(k for k in options if k != "data")
    with pytest.raises(TransferkitError, match=f"unknown option\\(s\\): {misspelled}"):
        resolve_options(dict(options))
    config = tmp_path / "run.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in options.items()))
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"unknown option(s): {misspelled}" in err and len(err.strip().splitlines()) == 1
