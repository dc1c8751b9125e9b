"""The device-placement layer (engine/placement.py), checked without a GPU.

* An AST rule over src/: ``.numpy()`` on a tensor only as ``.cpu().numpy()``, and no
  ``next(model.parameters()).device`` outside the placement module.
* A device-placement spy: a ``TorchFunctionMode`` that pretends a placed model lives on ``cuda:0``. Tensors moved
  there (``.to(device)``, ``device=`` factories, parameters of a placed module, results of ops on such tensors) are
  tagged and report ``device == cuda:0``; an op that mixes a tagged and an untagged tensor, ``.numpy()`` on a tagged
  tensor, or a CPU random generator used on a tagged tensor fails, as each would on a real GPU. Every inference path
  runs under it, and a deliberately wrong path shows that it catches a batch that was not moved.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from transferkit.backbones import BackboneInfo, BackboneSpec, register_backbone
from transferkit.backbones.base import Backbone
from transferkit.data.base import DataSplits, LabeledData
from transferkit.engine.placement import (
    accelerator_kwargs,
    inference,
    module_device,
    predict_batches,
    resolve_device,
    rng_states,
    set_rng_states,
    to_device,
)
from transferkit.errors import TransferkitError
from transferkit.model import TaskSpec, TransferModel

SRC = Path(__file__).resolve().parents[1] / "src" / "transferkit"

# --- the AST rule ---------------------------------------------------------------------------------------------

#: (file relative to src/transferkit, the exact source of the receiver of ``.numpy()``) that are known to be CPU
#: tensors although they do not say ``.cpu()``. Keep it empty if you can: write ``.cpu().numpy()`` instead.
NUMPY_ALLOWED: set[tuple[str, str]] = set()


def numpy_violations(source: str, path: str = "<test>") -> list[str]:
    """``.numpy()`` calls whose receiver is not ``<expr>.cpu()``; numpy arrays have no ``.numpy()`` method (pandas'
    is ``.to_numpy()``), so every ``.numpy()`` call is on a tensor."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy"
                and not node.args):
            continue
        receiver = node.func.value
        through_cpu = (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Attribute)
                       and receiver.func.attr == "cpu" and not receiver.args)
        if not through_cpu and (path, ast.unparse(receiver)) not in NUMPY_ALLOWED:
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def parameter_device_lookups(source: str, path: str = "<test>") -> list[str]:
    """``next(<x>.parameters()).device`` / ``next(iter(<x>.parameters())).device``: use ``module_device``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "device" and isinstance(node.value, ast.Call) \
                and isinstance(node.value.func, ast.Name) and node.value.func.id == "next" and node.value.args:
            inner = node.value.args[0]
            if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id == "iter":
                inner = inner.args[0]
            if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) and \
                    inner.func.attr in ("parameters", "buffers"):
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_ast_rules_flag_what_they_should_and_nothing_else():
    bad = "a = t.numpy()\nb = t.detach().numpy()\nc = t.float().numpy()\nd = torch.as_tensor(x).softmax(-1).numpy()\n"
    good = "a = t.cpu().numpy()\nb = t.detach().cpu().numpy()\nc = t.float().cpu().numpy()\nd = df.to_numpy()\n" \
           "e = np.asarray(x)\nf = torch.from_numpy(x)\n"
    assert len(numpy_violations(bad)) == 4
    assert numpy_violations(good) == []
    lookups = "d = next(model.parameters()).device\ne = next(iter(m.buffers())).device\nf = x.device\n"
    assert len(parameter_device_lookups(lookups)) == 2


def test_src_moves_tensors_to_numpy_only_through_the_cpu_and_asks_placement_for_devices():
    numpy_found, device_found = [], []
    for path in sorted(SRC.rglob("*.py")):
        relative = str(path.relative_to(SRC))
        source = path.read_text()
        numpy_found += numpy_violations(source, relative)
        if relative != "engine/placement.py":
            device_found += parameter_device_lookups(source, relative)
    assert numpy_found == [], "write .cpu().numpy() (or placement.to_numpy):\n" + "\n".join(numpy_found)
    assert device_found == [], "use transferkit.engine.placement.module_device:\n" + "\n".join(device_found)


# --- the spy --------------------------------------------------------------------------------------------------

FAKE = torch.device("cuda", 0)
_TAG = "_placement_spy_on_device"


class WrongDevice(AssertionError):
    pass


def _tagged(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _TAG, False)


def _tag(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        setattr(t, _TAG, True)
    return t


def _is_fake(device: Any) -> bool:
    return device is not None and not isinstance(device, torch.Tensor) and torch.device(device).type == "cuda"


_DEVICE_GET = torch.Tensor.device.__get__
_IS_CUDA_GET = torch.Tensor.is_cuda.__get__
_DATA_SET = torch.Tensor.data.__set__
#: ops that real PyTorch allows across devices (indexing with CPU indices, copies)
_CROSS_DEVICE_OK = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_,
                    torch._has_compatible_shallow_copy_type}  # (Module._apply moving a module)
#: packed-sequence ops: their integer lengths / batch sizes live on the CPU whatever the device of the data
_PACKED = {"_pack_padded_sequence", "_pad_packed_sequence", "lstm", "gru", "rnn_tanh", "rnn_relu"}


class PlacementSpy(TorchFunctionMode):
    """Pretend that tensors placed on ``cuda:0`` live there (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    @staticmethod
    def place(module: nn.Module) -> nn.Module:
        for t in [*module.parameters(), *module.buffers()]:
            _tag(t)
        return module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        self.ops += 1
        if func == _DEVICE_GET:
            return FAKE if _tagged(args[0]) else func(*args)
        if func == _IS_CUDA_GET:
            return _tagged(args[0])
        if func == _DATA_SET:  # Module._apply: ``param.data = moved``; the parameter is now where ``moved`` is
            func(*args)
            setattr(args[0], _TAG, _tagged(args[1]))
            return None
        if func is torch.Tensor.numpy and _tagged(args[0]):
            raise WrongDevice("can't convert a cuda:0 tensor to numpy: call .cpu() first")
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda):
            return self._move(func, args, kwargs)
        device = kwargs.get("device")
        fake_device = _is_fake(device)
        if fake_device:
            kwargs["device"] = "cpu"
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        placed = [t for t in tensors if _tagged(t)]
        packed = getattr(func, "__name__", "") in _PACKED
        if placed and func not in _CROSS_DEVICE_OK:
            stray = [t for t in tensors if not _tagged(t) and t.dim() > 0
                     and not (packed and not t.is_floating_point())]
            if stray:
                raise WrongDevice(f"{getattr(func, '__name__', func)} mixes cuda:0 tensors with a cpu tensor of "
                                  f"shape {tuple(stray[0].shape)}")
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type == "cpu":
                raise WrongDevice(f"{getattr(func, '__name__', func)} draws from a cpu generator on cuda:0")
        if func is torch.Tensor.__getitem__ and not _tagged(args[0]) and placed:
            raise WrongDevice("a cpu tensor indexed with cuda:0 indices")
        out = func(*args, **kwargs)
        if fake_device or (placed and device is None):
            tree_map(lambda t: _tag(t) if not packed or (isinstance(t, torch.Tensor) and t.is_floating_point())
                     else t, out)
        return out

    def _move(self, func, args, kwargs):
        source = args[0]
        if func is torch.Tensor.cuda:
            target: Any = FAKE
        elif func is torch.Tensor.cpu:
            target = torch.device("cpu")
        else:  # every device (or tensor) argument becomes the real "cpu"; the target is remembered
            target = kwargs.get("device")
            if target is not None:
                kwargs["device"] = "cpu"
            rest: list[Any] = []
            for a in args[1:]:
                if isinstance(a, (str, torch.device)):
                    target = a
                    rest.append("cpu")
                elif isinstance(a, torch.Tensor):
                    target = FAKE if _tagged(a) else a.device
                    rest += ["cpu", a.dtype]
                else:
                    rest.append(a)
            args = (source, *rest)
        if target is None:  # a dtype change: stays where it is
            out = func(*args, **kwargs)
            return _tag(out) if _tagged(source) else out
        fake = _is_fake(target)
        out = source.to(*args[1:], **kwargs) if func is torch.Tensor.to else source
        if out is source:  # a real no-op move: give the moved tensor its own identity (and tag)
            out = source.clone() if _tagged(source) != fake else source
        if fake:
            _tag(out)
        elif _tagged(out):
            setattr(out, _TAG, False)
        return out


@pytest.fixture
def spy():
    with PlacementSpy() as mode:
        yield mode


class TinyBackbone(Backbone):
    """Items are 4-d vectors; features ``tanh(W x)`` (3-d)."""

    modality = "sequence"

    def __init__(self) -> None:
        super().__init__()
        self.spec = BackboneSpec("test-tiny-4d", {})
        self.feature_dim = 3
        self.linear = nn.Linear(4, 3)

    def preprocess(self, item, train: bool = False):
        return torch.as_tensor(item, dtype=torch.float32)

    def forward_features(self, inputs):
        return torch.tanh(self.linear(inputs))

    def layer_groups(self):
        return [self.linear]


register_backbone("test-tiny-4d", lambda: BackboneInfo("test-tiny-4d", "sequence", 1, 3, "none", True))(
    lambda pretrained=True, **options: TinyBackbone()
)


def _data(n: int, name: str, seed: int = 0) -> LabeledData:
    rng = np.random.default_rng(seed)
    items = [rng.normal(size=4).astype(np.float32) for _ in range(n)]
    labels = np.array([int(x[0] > 0) for x in items])
    return LabeledData(items=items, labels=labels, class_names=["neg", "pos"], modality="sequence",
                       ids=[f"{name}[{i}]" for i in range(n)], name=name)


def _model(seed: int = 0) -> TransferModel:
    torch.manual_seed(seed)
    return TransferModel(TinyBackbone(), [TaskSpec("label", "classify", ["neg", "pos"])])


def forgetful_predict(model: TransferModel, data: LabeledData) -> np.ndarray:
    """A wrong inference path: the batch never reaches the model's device."""
    from transferkit.data.loader import make_loader

    with inference(model):
        return np.concatenate([model(batch["inputs"]).logits.softmax(-1).cpu().numpy()
                               for batch in make_loader(data, model.backbone, batch_size=4, train=False)])


def numpy_without_cpu(model: TransferModel, features: np.ndarray) -> np.ndarray:
    """The old ``evaluate_features``: right device for the input, ``.numpy()`` straight from the device."""
    with inference(model) as device:
        logits = model.forward_head(torch.as_tensor(features, dtype=torch.float32, device=device)).logits
        return torch.softmax(logits, -1).numpy()


def test_the_spy_catches_a_batch_left_on_the_cpu_and_numpy_from_the_device(spy):
    model, data = PlacementSpy.place(_model()), _data(6, "val")
    assert module_device(model) == FAKE
    with pytest.raises(WrongDevice, match="mixes cuda:0"):
        forgetful_predict(model, data)
    with pytest.raises(WrongDevice, match="numpy"):
        numpy_without_cpu(model, np.zeros((2, 3), np.float32))
    with pytest.raises(WrongDevice, match="cpu generator"):
        torch.multinomial(torch.ones(3, device=FAKE), 1, generator=torch.Generator().manual_seed(0))


def test_the_spy_is_silent_on_cpu_code():
    """Without a placed module nothing is tagged: plain CPU code runs unchanged under the spy."""
    data = _data(6, "val")
    expected = forgetful_predict(_model(), data)
    with PlacementSpy() as mode:
        got = forgetful_predict(_model(), data)
    assert mode.ops > 0
    np.testing.assert_allclose(got, expected)


def test_prediction_evaluation_and_features_run_on_the_models_device(spy):
    from transferkit.api import evaluate_features, evaluate_model, predict_proba_model
    from transferkit.engine.features import extract_features
    from transferkit.evaluation.calibration import model_logits
    from transferkit.evaluation.report import _predict_with_features
    from transferkit.tasks.extension import predict_task_rows

    data = _data(10, "val")
    expected = _cpu(lambda: predict_proba_model(_model(), data, batch_size=4))
    model = PlacementSpy.place(_model())
    probabilities = predict_proba_model(model, data, batch_size=4)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6)
    assert evaluate_model(model, data, batch_size=4)["n"] == 10
    features = extract_features(model.backbone, data, batch_size=4, progress=False)
    assert features.shape == (10, 3) and module_device(model.backbone) == FAKE  # not moved to the CPU
    assert evaluate_features(model, features, data)["accuracy"] == pytest.approx(
        float(np.mean(expected.argmax(1) == data.labels)))
    assert model_logits(model, data, batch_size=4).shape == (10, 2)
    probs, feats = _predict_with_features(model, data)
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    assert feats.shape == (10, 3)
    assert [r["label"] for r in predict_task_rows(model, data, batch_size=4)] == \
        [["neg", "pos"][i] for i in expected.argmax(1)]
    assert all(_tagged(p) for p in model.parameters())


def test_embed_items_into_a_memory_mapped_file_runs_on_the_models_device_and_equals_the_in_memory_result(
        spy, tmp_path):
    from transferkit.engine.features import embed_items

    data = _data(10, "val")
    expected = _cpu(lambda: embed_items(_model().backbone, data, _model().backbone.forward_features, progress=False,
                                        batch_size=4))
    model = PlacementSpy.place(_model())
    mapped = embed_items(model.backbone, data, model.backbone.forward_features, progress=False, batch_size=4,
                         dtype=torch.float16, out=tmp_path / "maps.npy")
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float16 and Path(mapped.filename).is_file()
    np.testing.assert_allclose(mapped, expected, rtol=1e-3, atol=1e-3)  # every batch, in order (float16)
    assert module_device(model.backbone) == FAKE


def _cpu(fn):
    """Run ``fn`` outside the spy (the reference answer)."""
    from torch.overrides import _pop_mode_temporarily

    with _pop_mode_temporarily():
        return fn()


def test_memory_embedding_runs_on_the_encoders_device(spy):
    from transferkit.memory.index import embed

    items = [np.full(4, i, np.float32) for i in range(5)]
    expected = _cpu(lambda: embed(_model().backbone, items, batch_size=2))
    backbone = PlacementSpy.place(_model().backbone)
    np.testing.assert_allclose(embed(backbone, items, batch_size=2), expected, rtol=1e-6)


def test_seq2seq_metrics_and_decoding_run_on_the_models_device(spy):
    from transferkit.sequence.seq2seq import Seq2Seq, Vocabulary, pair_loader, seq2seq_metrics, translate

    pairs = [("101", "5"), ("11", "3"), ("110", "6")]
    source, target = Vocabulary.from_texts([s for s, _ in pairs]), Vocabulary.from_texts([t for _, t in pairs])
    torch.manual_seed(0)
    model = Seq2Seq(len(source), len(target), 8, 16, "bahdanau")
    loader = pair_loader(pairs, source, target, 2, False)
    expected = _cpu(lambda: (seq2seq_metrics(model, loader, 4), translate(model, source, target, ["101"], 4),
                             translate(model, source, target, ["101"], 4, beam_size=2)))
    PlacementSpy.place(model)
    assert seq2seq_metrics(model, loader, 4) == pytest.approx(expected[0])
    assert translate(model, source, target, ["101"], 4) == expected[1]
    assert translate(model, source, target, ["101"], 4, beam_size=2) == expected[2]


def test_charlm_metrics_and_sampling_run_on_the_models_device(spy):
    from transferkit.sequence.charlm import CharLanguageModel, language_model_metrics, sample, window_loader
    from transferkit.sequence.seq2seq import Vocabulary

    text = "abcabcabcabd" * 4
    vocab = Vocabulary.from_texts([text])
    torch.manual_seed(0)
    model = CharLanguageModel(len(vocab), 8, 16, 1, 0.0, "lstm")
    loader = window_loader(torch.as_tensor(vocab.encode(text)), 2, 5)
    expected = _cpu(lambda: (language_model_metrics(model, loader), sample(model, vocab, 12, "ab", seed=3),
                             sample(model, vocab, 12, "ab", top_k=2, seed=3)))
    PlacementSpy.place(model)
    assert language_model_metrics(model, loader) == pytest.approx(expected[0])
    assert sample(model, vocab, 12, "ab", seed=3) == expected[1]
    assert sample(model, vocab, 12, "ab", top_k=2, seed=3) == expected[2]


class _NoTraining:
    """Stands in for the engine's Trainer: the tensors it would have moved are already on the (fake) device."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def fit(self, *args: Any, **kwargs: Any):
        from transferkit.engine.trainer import TrainResult

        return TrainResult([], 0, None, False, 0.0)


def _context(tmp_path: Path):
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainConfig

    splits = DataSplits(_data(12, "train", seed=1), _data(6, "val", seed=2), None)
    return RunContext(splits=splits, train=TrainConfig(epochs=1, device="cpu"), cache_dir=None, progress=False)


@pytest.mark.parametrize("strategy_name, options", [("contrastive", {"max_pairs": 8}), ("prototypes", {}),
                                                    ("knn", {"knn_k": 3}), ("linear-probe", {"solver": "sgd"}),
                                                    ("linear-probe", {})])
def test_frozen_feature_strategies_finish_on_the_models_device(strategy_name, options, tmp_path, monkeypatch, spy):
    """After (stubbed) training, the head solvers, validation and the features evaluation of ``fit`` stay on the
    device: the contrastive head solver and ``--solver sgd`` once called ``.numpy()`` on device tensors."""
    import transferkit.engine.context as context_module
    import transferkit.strategies.fewshot as fewshot
    from transferkit.api import evaluate_features
    from transferkit.strategies import create_strategy

    monkeypatch.setattr(fewshot, "Trainer", _NoTraining)
    monkeypatch.setattr(context_module, "Trainer", _NoTraining)
    context = _context(tmp_path)
    model = _model()
    strategy = create_strategy(strategy_name, options)
    strategy.prepare(model)
    PlacementSpy.place(model)
    strategy.train(model, context)
    report = evaluate_features(model, context.features(model.backbone, context.splits.val), context.splits.val)
    assert report["n"] == 6
    assert all(_tagged(p) for p in model.parameters())


def test_fisher_pass_runs_on_the_models_device(spy):
    from transferkit.data.loader import make_loader
    from transferkit.strategies.fish import fisher_diagonal

    model = PlacementSpy.place(_model())
    loader = make_loader(_data(6, "train"), model.backbone, batch_size=3, train=False)
    fisher = fisher_diagonal(model, loader, batches=2)
    assert set(fisher) == {n for n, _ in model.backbone.named_parameters()}
    assert all(float(v.sum()) > 0 for v in fisher.values())


def test_task_heads_are_built_on_the_models_device(tmp_path, spy):
    """``--task`` replaces the heads after ``fit`` placed the model: the new heads must join it on the device
    (FISH's Fisher pass runs the model before the engine would move anything)."""
    from transferkit.data.loader import make_loader
    from transferkit.strategies.fish import fisher_diagonal
    from transferkit.tasks.extension import TasksConfig, TasksExtension

    context = _context(tmp_path)
    for part in (context.splits.train, context.splits.val):
        part.columns["size"] = np.arange(len(part), dtype=np.float64)
    model = PlacementSpy.place(_model())
    context = TasksExtension(TasksConfig(task=["classify", "size:regress"])).configure(context, model, None)
    assert set(model.heads) == {"label", "size"}
    assert all(_tagged(p) for p in model.parameters())
    loader = make_loader(context.splits.train, model.backbone, batch_size=3, train=False)
    assert all(float(v.sum()) > 0 for v in fisher_diagonal(model, loader, batches=2).values())


def test_auto_extracts_fits_and_times_its_candidates_on_its_device(monkeypatch, spy):
    """``auto --device``: a probe candidate's features and head, and the speed measurement of a trained candidate,
    on the device the candidates train on (not the CPU, which would also mis-time them)."""
    import transferkit.engine.placement as placement
    from transferkit.autofit.space import Candidate
    from transferkit.autofit.training import FeatureTable, probe_model, seconds_per_item, split_options

    real = placement.resolve_device
    monkeypatch.setattr(placement, "resolve_device", lambda spec="auto": FAKE if spec == "cuda" else real(spec))
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    data = _data(12, "train")
    probe = Candidate("test-tiny-4d", "linear-probe", None, {"probe_c": 1.0}, "features", "probe C=1")
    table = FeatureTable(probe, data, None, 0, device="cuda")
    assert module_device(table.backbone) == FAKE and table.x.shape == (12, 3)
    model, _ = probe_model(probe, table, data, tta=False)
    assert all(_tagged(p) for p in model.parameters())
    trained = Candidate("test-tiny-4d", "finetune", None, {"epochs": 1}, "train", "fine-tune")
    train_item, infer = seconds_per_item(trained, data, 0, "cuda")
    assert train_item > 0 and infer > 0 and waited == [FAKE] * 3  # two timed training steps, one inference
    assert split_options(trained, 0, "cpu")[0].device == "cpu"


def test_an_adapted_runs_source_only_baseline_is_scored_on_the_models_device(tmp_path, monkeypatch):
    """``evaluate`` of an ``--adapt`` run also scores the saved source-only baseline: beside the adapted model on
    its device, not on the CPU where it was loaded."""
    import transferkit
    import transferkit.inference as inference
    from tests.test_adaptation import FAST, _write_domain
    from transferkit.cli.main import main

    source, target = _write_domain(tmp_path / "source", 16, 0, False), _write_domain(tmp_path / "target", 12, 1, True)
    test = _write_domain(tmp_path / "target_test", 10, 2, True)
    out = tmp_path / "dann"
    assert main(["fit", "--data", str(source), *FAST, str(tmp_path / "cache"), "--strategy", "finetune",
                 "--head-init", "random", "--adapt", "dann", "--target-data", str(target), "--out", str(out)]) == 0
    expected = transferkit.evaluate(str(out), str(test), progress=False)["source_only_accuracy"]
    scored_on, evaluate_model = [], inference.evaluate_model
    monkeypatch.setattr(inference, "evaluate_model",
                        lambda module, *a, **k: scored_on.append(module_device(module)) or evaluate_model(module, *a, **k))
    loaded = transferkit.load(str(out), device="cpu")
    PlacementSpy.place(loaded.module)
    with PlacementSpy():
        report = transferkit.evaluate(loaded, str(test), progress=False)
    assert report["source_only_accuracy"] == pytest.approx(expected)
    assert scored_on == [FAKE]  # the baseline, loaded from its folder, was placed beside the model


def test_in_context_scoring_runs_on_the_lms_device(tiny_llama_dir, spy):
    from transferkit.zeroshot.incontext import label_log_likelihoods, load_causal_lm

    lm = _cpu(lambda: load_causal_lm("hf:" + tiny_llama_dir))
    expected = _cpu(lambda: label_log_likelihoods(lm, "classify the movie :", ["good", "bad movie"]))
    PlacementSpy.place(lm)
    np.testing.assert_allclose(label_log_likelihoods(lm, "classify the movie :", ["good", "bad movie"]), expected,
                               rtol=1e-5)


# --- device specs, Accelerate and RNG states --------------------------------------------------------------------


def test_device_specs_resolve_or_fail_with_one_line(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")  # this machine has no GPU
    assert accelerator_kwargs("auto") == {"cpu": True}
    for bad in ("gpu", "cuda:x", "cuda:1", "cuda"):
        with pytest.raises(TransferkitError):
            resolve_device(bad)
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)  # torchrun: this process's GPU
    monkeypatch.delenv("LOCAL_RANK")
    assert accelerator_kwargs("cuda:1") == {"cpu": False} and current == [torch.device("cuda", 1)]
    with pytest.raises(TransferkitError, match="cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TransferkitError, match="multi-process"):
        accelerator_kwargs("cuda:1")


def test_train_config_and_cli_refuse_a_device_this_machine_lacks(tmp_path, capsys):
    from transferkit.cli.main import main
    from transferkit.engine.trainer import TrainConfig

    with pytest.raises(TransferkitError, match="no CUDA device"):
        TrainConfig(device="cuda:0").validate()
    assert main(["predict", "--model", str(tmp_path / "missing"), "--device", "cuda:1", "x"]) == 2
    assert "cuda:1" in capsys.readouterr().err


def test_to_device_moves_nested_batches_and_predict_batches_restores_the_mode():
    batch = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(1), "text")], "c": 3}
    moved = to_device(batch, "cpu")
    assert moved["b"][1][1] == "text" and moved["c"] == 3 and isinstance(moved["b"][1], tuple)
    model = _model().train()
    out = predict_batches(model, [torch.ones(2, 4), torch.zeros(1, 4)], lambda x: (model(x).logits, model(x).features))
    assert out[0].shape == (3, 2) and out[1].shape == (3, 3) and model.training
    assert predict_batches(model, [], lambda x: x) is None


def test_rng_states_are_json_and_restore_every_generator():
    import random

    states = json.loads(json.dumps(rng_states()))
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_states(states)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_rng_states_carry_the_apple_gpus_generator(monkeypatch):
    """On an MPS machine dropout masks come from the MPS generator: a resumed run must restore it too."""
    import transferkit.engine.placement as placement

    generator = {"state": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(placement, "_mps_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: generator["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: generator.update(state=state))
    states = json.loads(json.dumps(rng_states()))
    assert states["mps"] == list(range(16))
    generator["state"] = torch.zeros(16, dtype=torch.uint8)  # the run went on drawing
    set_rng_states(states)
    assert generator["state"].tolist() == list(range(16))
    monkeypatch.setattr(placement, "_mps_available", lambda: False)
    set_rng_states({**states, "mps": [0] * 16})  # a checkpoint from a Mac resumed elsewhere: MPS state ignored
    assert generator["state"].tolist() == list(range(16))


def test_peak_memory_measures_the_device_the_run_used(monkeypatch):
    """``--device cpu`` on a CUDA machine reports the process's memory, not the (unused) CUDA allocator's."""
    from transferkit.fitting import peak_memory_mb

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0.0)
    assert peak_memory_mb("cpu") > 10  # this process's resident peak (MB), not the CUDA allocator's 0
    assert peak_memory_mb(torch.device("cpu")) > 10


def test_loaded_models_are_placed_where_asked(tmp_path):
    from transferkit.api import load
    from transferkit.model import save_model

    model = _model()
    save_model(model, tmp_path / "model", {"name": "finetune"}, extra={"data": "x"})
    loaded = load(tmp_path, device="cpu")
    assert module_device(loaded.module) == torch.device("cpu")
    with pytest.raises(TransferkitError, match="no CUDA device"):
        load(tmp_path, device="cuda")
