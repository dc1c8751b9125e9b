"""The trainer checkpoint holds no pickle: safetensors + JSON, every RNG, crafted files refused in one line."""

from __future__ import annotations

import ast
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import interrupt_seq2seq_train
from tests.test_engine import loaders, make_model
from transferkit.engine import CrossEntropyObjective, TrainConfig, Trainer
from transferkit.engine.checkpoint import (
    CHECKPOINT_NAME,
    LEGACY_CHECKPOINT_NAME,
    load_checkpoint,
    save_checkpoint,
)
from transferkit.errors import TransferkitError

SRC = Path(__file__).resolve().parents[1] / "src"


class Payload:
    """Unpickling this runs ``touch <path>``: a checkpoint must never be unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def write_pickle(path: Path, witness: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"loss_module": Payload(witness)}))


def config(**changes) -> TrainConfig:
    return TrainConfig(**{"epochs": 4, "lr": 0.05, "optimizer": "sgd", "early_stopping": 0, "seed": 3,
                          "device": "cpu", **changes})


def train(folder: Path | None, cfg: TrainConfig, seed: int = 3, stop_after: int | None = None):
    model = make_model(seed)

    def stop(row):
        if row["epoch"] == stop_after:
            raise KeyboardInterrupt

    trainer = Trainer(model, [CrossEntropyObjective()], cfg, checkpoint_dir=folder, progress=False,
                      epoch_callback=stop if stop_after else None)
    return model, trainer.fit(*loaders(3))


def one_line(error: TransferkitError) -> str:
    text = str(error)
    assert "\n" not in text
    return text


# --- no pickle anywhere in src ----------------------------------------------------------------------------------


def test_source_never_unpickles():
    offences = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(SRC)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("pickle", "cPickle", "dill")
                                                    for a in node.names):
                offences.append(f"{where} imports pickle")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("pickle", "dill"):
                offences.append(f"{where} imports from pickle")
            if isinstance(node, ast.keyword) and node.arg in ("weights_only", "allow_pickle") and \
                    isinstance(node.value, ast.Constant) and node.value.value is (node.arg == "allow_pickle"):
                offences.append(f"{where} {node.arg}={node.value.value}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = [k for k in node.keywords if k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                        and k.value.value is True]
                if not safe:
                    offences.append(f"{where} torch.load without weights_only=True")
    text = "\n".join(path.read_text() for path in SRC.rglob("*.py"))
    for needle in ("weights_only=False", "import pickle", "allow_pickle=True", "save_state("):
        if needle in text:
            offences.append(f"'{needle}' in src")
    assert not offences, offences


# --- the file ---------------------------------------------------------------------------------------------------


def test_checkpoint_is_safetensors_with_json_state(tmp_path):
    _, result = train(tmp_path, config(epochs=2))
    sections, state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert set(sections) == {"best_state", "loss_module", "optimizer"} and set(state["rng"]) >= {"python", "numpy",
                                                                                              "torch", "cuda"}
    assert state["state"]["epoch"] == 2 and state["state"]["history"] == result.history
    assert sections["loss_module"].keys() == sections["best_state"].keys()
    assert all(key.split("/")[1] == "momentum_buffer" for key in sections["optimizer"])  # SGD momentum
    assert not (tmp_path / LEGACY_CHECKPOINT_NAME).exists()
    from safetensors import safe_open

    with safe_open(str(tmp_path / CHECKPOINT_NAME), framework="pt") as reader:  # an ordinary safetensors file
        assert "loss_module/model.0.weight" in reader.keys()  # noqa: SIM118


@pytest.mark.parametrize("changes", [{}, {"optimizer": "adamw", "schedule": "plateau", "lr": 0.5,
                                          "early_stopping": 3, "epochs": 6}], ids=["sgd", "adamw-plateau"])
def test_resume_is_bit_identical(changes, tmp_path):
    cfg = config(**changes)
    reference, expected = train(None, cfg)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, cfg, stop_after=2)
    resumed, result = train(tmp_path, cfg, seed=99)  # another init: everything comes from the checkpoint
    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in r.history] for r in (result, expected)]
    assert result.resumed_from_epoch == 2 and untimed[0] == untimed[1]
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_every_rng_goes_through_the_checkpoint_including_cuda(tmp_path, monkeypatch):
    """The CUDA path runs on CPU machines with a fake two-device torch.cuda."""
    from transferkit.engine.callbacks import Checkpointing

    fake_states = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in fake_states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))

    class Loop:  # what Checkpointing reads from the training loop
        def __init__(self) -> None:
            from accelerate import PartialState

            from transferkit.engine.callbacks import TrainState
            from transferkit.engine.trainer import LossModule

            self.inner = LossModule(make_model(0), [CrossEntropyObjective()], lambda m, b: m(b["inputs"]))
            self.optimizer = torch.optim.Adam(self.inner.parameters())
            self.state = TrainState(epoch=1, step=4)
            self.accelerator = PartialState(cpu=True)
            self.callbacks: list = []

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    Checkpointing(tmp_path).on_epoch_end(Loop(), {})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    _, saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert saved["rng"]["cuda"] == [s.tolist() for s in fake_states]
    random.seed(100)
    np.random.seed(100)
    torch.manual_seed(100)
    loop = Loop()
    assert Checkpointing(tmp_path).restore(loop) and loop.state.epoch == 1 and loop.state.resumed_from == 1
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert [torch.equal(a, b) for a, b in zip(restored, fake_states)] == [True, True]


# --- crafted and old checkpoints are refused --------------------------------------------------------------------


def test_a_pickle_posing_as_the_checkpoint_is_refused_without_running_it(tmp_path):
    witness = tmp_path / "code-ran"
    write_pickle(tmp_path / "ckpt" / CHECKPOINT_NAME, witness)
    with pytest.raises(TransferkitError) as error:
        train(tmp_path / "ckpt", config())
    assert "not a usable transferkit checkpoint" in one_line(error.value) and not witness.exists()


def test_an_old_pickled_checkpoint_is_refused_with_restart_advice(tmp_path):
    witness = tmp_path / "code-ran"
    write_pickle(tmp_path / "ckpt" / LEGACY_CHECKPOINT_NAME, witness)
    with pytest.raises(TransferkitError) as error:
        train(tmp_path / "ckpt", config())
    message = one_line(error.value)
    assert "earlier transferkit version" in message and "--overwrite" in message and not witness.exists()


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    train(tmp_path / "good", config(epochs=1))
    data = (tmp_path / "good" / CHECKPOINT_NAME).read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / CHECKPOINT_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(TransferkitError, match="not a usable transferkit checkpoint"):
        train(tmp_path / "cut", config())
    # a valid safetensors file with other keys (another model's weights)
    save_checkpoint(tmp_path / "other" / CHECKPOINT_NAME, {"loss_module": {"w": torch.zeros(2)}, "optimizer": {},
                                                            "best_state": {}}, {"state": {}})
    with pytest.raises(TransferkitError) as error:
        train(tmp_path / "other", config())
    assert "does not fit this run" in one_line(error.value)
    from safetensors.torch import save_file

    (tmp_path / "plain").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain" / CHECKPOINT_NAME))  # safetensors, not ours
    with pytest.raises(TransferkitError, match="no transferkit state"):
        train(tmp_path / "plain", config())


def test_cli_resume_of_a_run_with_an_old_checkpoint_exits_2_then_overwrite_works(tmp_path, monkeypatch, capsys):
    from transferkit.cli.main import main

    args = interrupt_seq2seq_train(tmp_path, monkeypatch, epochs=2)
    out = tmp_path / "b2d"
    checkpoint = tmp_path / ".b2d.partial" / "checkpoint"
    (checkpoint / CHECKPOINT_NAME).unlink()  # as an earlier version left it: a pickled checkpoint.pt
    witness = tmp_path / "code-ran"
    write_pickle(checkpoint / LEGACY_CHECKPOINT_NAME, witness)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--overwrite" in err and "earlier" in err
    assert not witness.exists() and (checkpoint / LEGACY_CHECKPOINT_NAME).exists()  # kept, not deleted
    assert main([*args, "--overwrite"]) == 0 and (out / "metrics.json").is_file()
