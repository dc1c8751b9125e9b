"""ONNX export of a classifier run, and the onnxruntime model that loads it back.

``export_onnx(RUN, OUT)`` writes an export folder (kind ``export`` of the run-folder lifecycle):

* ``model.onnx``: the network from preprocessed input to the raw outputs of every head (one output per task,
  named after it), batch size dynamic (and sequence length for text). LoRA runs are merged first, so the graph
  holds plain layers.
* ``preprocess.json`` (+ ``README.md`` beside the graph): what runs before the graph, in Python. Images: decode,
  frame (``"frame"``: a run trained with ``fit --frame``; a PIL step, so outside the graph), convert to the mode
  (``L``/``RGB``), resize and centre-crop, scale to [0, 1], normalise with mean/std, layout NCHW float32. Texts:
  the tokenizer saved in ``tokenizer/`` (padding, truncation to ``max_length``).
* ``config.json``: classes, tasks, softmax temperature and the graph's input / output names.
* ``parity.json``: PyTorch against onnxruntime on sample inputs at export time (max absolute logit difference
  and agreement of the predicted class), at two batch sizes.

An ``auto`` ensemble (members with their own backbones, resolutions and flip test-time augmentation) becomes ONE
graph whose first output ``probabilities`` is the weighted mean of the members' softmax probabilities, exactly as
:class:`transferkit.api.EnsembleModel` computes them. Its members may need different inputs, so the graph has one
input per distinct *view* (``pixels_0``, ``pixels_1``, ... or ``input_ids_0`` / ``attention_mask_0``, ...): one
per member preprocessing (resolution, crop, normalisation, tokenizer), and one more for the mirror image of a
member with flip TTA. Members whose features are columns of another member's (auto's final-layer and multi-stage
probes of one backbone) read them from that member's backbone: the graph holds and runs it once per view.
``preprocess.json`` (``"kind": "ensemble"``) lists every view's preprocessing, which
``transferkit`` runs in Python before the graph; the resizing is done there (PIL, as in training), not in the
graph, so the export reproduces the PyTorch ensemble to rounding error. The members' raw logits follow as
outputs ``logits_<member>_<view>``. ``parity.json`` then also holds the end-to-end comparison with the PyTorch
ensemble (maximum probability difference, agreement).

``load(OUT)`` returns an :class:`OnnxModel` (``predict``, ``predict_proba``, ``evaluate``, ``classes_``):
``transferkit predict / evaluate / serve --model OUT`` then run onnxruntime, without PyTorch weights. A multi-task
run's export predicts and scores every task from its graph outputs (the heads' outputs: logits, values, quantiles),
through the same code as the run (:func:`transferkit.tasks.extension.task_rows`, ``task_report_of_outputs``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import TransferkitError, check_count, corrupt_file_error, reading

logger = logging.getLogger(__name__)

FORMAT = "transferkit-onnx"
FORMAT_VERSION = 3  # the newest version this reader reads
SINGLE_FORMAT_VERSION = 1  # a single model's export is still readable by version-1 readers
ENSEMBLE_FORMAT_VERSION = 2  # ensembles (``preprocess.json`` kind "ensemble", output_kind "probabilities")
FRAMED_FORMAT_VERSION = 3  # framed images (``preprocess.json`` "frame"): older readers refuse, never skip, it
GRAPH_FILE = "model.onnx"
PREPROCESS_FILE = "preprocess.json"
_EXPORT_AGAIN = "export the run again with `transferkit export --format onnx`"
PARITY_FILE = "parity.json"
TOKENIZER_DIR = "tokenizer"
OPSET = 18


def is_onnx_export(path: str | Path) -> bool:
    path = Path(path)
    config = path / "config.json"
    if not (path / GRAPH_FILE).is_file() or not config.is_file():
        return False
    try:
        config = json.loads(config.read_text())
    except (ValueError, OSError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ModuleNotFoundError as exc:
        raise TransferkitError(f"ONNX export and inference need the 'onnx' extra ({exc.name} is missing)",
                               "pip install 'transferkit[onnx]'") from None


# --- preprocessing ---------------------------------------------------------------------------------------------


def preprocess_spec(backbone: Any) -> dict[str, Any]:
    """What runs before the graph, as data (no pickled code): see the module docstring."""
    if backbone.modality == "text":
        return {"kind": "text", "max_length": int(backbone.max_length), "tokenizer": TOKENIZER_DIR,
                "inputs": ["input_ids", "attention_mask"]}
    if backbone.modality != "image":
        raise TransferkitError(f"ONNX export supports image and text models, not {backbone.modality} ones",
                               "export with --format safetensors")
    mode = getattr(backbone, "image_mode", "RGB")
    framing = {"frame": backbone.frame} if backbone.frame != "none" else {}  # backbones.base.input_image
    normalization = getattr(backbone, "normalization", None)
    if normalization is not None:  # timm-style: resize to size / crop_pct, centre crop (timm's eval transform)
        return {"kind": "image", **framing, "mode": mode, "size": int(backbone.image_size),
                "resize": "shorter-side+center-crop", "interpolation": normalization["interpolation"],
                "crop_pct": float(normalization["crop_pct"]), "mean": list(normalization["mean"]),
                "std": list(normalization["std"]), "layout": "NCHW"}
    if backbone.spec.name == "small_cnn":
        channels = 1 if mode == "L" else 3
        return {"kind": "image", **framing, "mode": mode, "size": int(backbone.image_size), "resize": "exact",
                "interpolation": "bilinear", "crop_pct": 1.0, "mean": [0.5] * channels, "std": [0.5] * channels,
                "layout": "NCHW"}
    raise TransferkitError(f"backbone '{backbone.spec.name}' has no documented preprocessing for ONNX",
                           "export it with --format safetensors")


class Preprocessor:
    """``preprocess.json`` applied in Python: images -> float32 NCHW arrays, texts -> token arrays (an ensemble's
    views: :class:`ViewsPreprocessor`)."""

    def __init__(self, spec: dict[str, Any], folder: Path) -> None:
        self.spec = spec
        if spec["kind"] == "text":
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(folder / spec["tokenizer"]))
        else:
            from torchvision import transforms

            from transferkit.backbones.timm_backbone import image_transform

            if spec["resize"] == "exact":
                self.transform = transforms.Compose([
                    transforms.Resize((spec["size"], spec["size"]), interpolation=transforms.InterpolationMode(
                        spec["interpolation"])),
                    transforms.ToTensor(), transforms.Normalize(spec["mean"], spec["std"])])
            else:
                self.transform = image_transform(spec["size"], train=False, mean=tuple(spec["mean"]),
                                                 std=tuple(spec["std"]), interpolation=spec["interpolation"],
                                                 crop_pct=spec["crop_pct"])

    def __call__(self, items: list[Any]) -> dict[str, np.ndarray]:
        if self.spec["kind"] == "text":
            encoded = self.tokenizer([str(t) for t in items], padding=True, truncation=True,
                                     max_length=self.spec["max_length"], return_tensors="np")
            return {name: np.asarray(encoded[name], dtype=np.int64) for name in self.spec["inputs"]}
        import torch

        from transferkit.backbones.base import input_image

        images = [input_image(item, self.spec["mode"], self.spec.get("frame", "none")) for item in items]
        if self.spec.get("mirror"):  # the flip-TTA view: the mirror image, preprocessed the same way
            from PIL import ImageOps

            images = [ImageOps.mirror(image) for image in images]
        return {"pixels": torch.stack([self.transform(image) for image in images]).cpu().numpy().astype(np.float32)}


class ViewsPreprocessor:
    """An ensemble export's views (``preprocess.json`` kind ``ensemble``): each view's arrays under its own graph
    input names (``graph_inputs``)."""

    def __init__(self, spec: dict[str, Any], folder: Path) -> None:
        self.spec = spec
        self.views = [(view, Preprocessor(view, folder)) for view in spec["views"]]

    def __call__(self, items: list[Any]) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for view, preprocess in self.views:
            own = preprocess(items)
            arrays.update(zip(view["graph_inputs"], (own[name] for name in _view_keys(view))))
        return arrays


def make_preprocessor(spec: dict[str, Any], folder: Path) -> Preprocessor | ViewsPreprocessor:
    """The preprocessing of an export folder's ``preprocess.json``."""
    return ViewsPreprocessor(spec, folder) if spec["kind"] == "ensemble" else Preprocessor(spec, folder)


def _view_keys(spec: dict[str, Any]) -> list[str]:
    """The names :class:`Preprocessor` gives a view's arrays, in graph-input order."""
    return list(spec["inputs"]) if spec["kind"] == "text" else ["pixels"]


# --- export ------------------------------------------------------------------------------------------------------


def _batch(input_names: list[str], inputs: tuple) -> Any:
    """What ``TransferModel.forward`` takes: the pixel tensor, or the tokenizer's tensors by name."""
    return inputs[0] if input_names == ["pixels"] else dict(zip(input_names, inputs))


class _Graph:
    """Torch modules from preprocessed inputs to the exported outputs (built lazily: torch imported late)."""

    @staticmethod
    def build(model: Any, input_names: list[str]):
        """A single model: every head's raw output."""
        import torch

        class Graph(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *inputs):
                outputs = self.model(_batch(input_names, inputs)).outputs
                return tuple(outputs[t.name] for t in self.model.tasks)

        return Graph().eval()

    @staticmethod
    def build_ensemble(members: list[dict[str, Any]], views: list[dict[str, Any]], input_names: list[str]):
        """An ensemble: the weighted mean of the members' probabilities (each member: softmax of its first head's
        logits / its temperature, averaged over its views, i.e. plain and mirror image under flip TTA), then
        every member's logits per view. A member whose features are the last ``width`` columns of its ``host``'s
        (:func:`transferkit.autofit.ensemble.shares_features`) reads them from the host's one backbone pass, so the
        graph holds and runs that backbone once."""
        import torch

        class EnsembleGraph(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.members = torch.nn.ModuleList(m["module"] for m in members)

            def forward(self, *inputs):
                named = dict(zip(input_names, inputs))
                total, logits = None, []
                features: dict[tuple[int, int], Any] = {}  # (host member, view): its backbone's features, once
                for module, member in zip(self.members, members):
                    probabilities = None
                    for v in member["views"]:
                        key = (member["host"], v)
                        if key not in features:
                            tensors = tuple(named[n] for n in views[v]["graph_inputs"])
                            host = self.members[member["host"]].backbone
                            features[key] = host.forward_features(_batch(_view_keys(views[v]), tensors))
                        out = module.forward_head(features[key][:, -member["width"]:]).outputs[module.tasks[0].name]
                        logits.append(out)
                        p = torch.softmax(out / member["temperature"], dim=-1)
                        probabilities = p if probabilities is None else probabilities + p
                    weighted = probabilities * (member["weight"] / len(member["views"]))
                    total = weighted if total is None else total + weighted
                return (total, *logits)

        return EnsembleGraph().eval()


def _sample_items(spec: dict[str, Any], class_names: list[str], n: int, seed: int = 0) -> list[Any]:
    """Inputs for the parity check: random-pattern images (square and wide), or texts made of the class names and
    common words."""
    rng = np.random.default_rng(seed)
    if spec["kind"] == "text":
        words = [*class_names, "the", "a", "good", "bad", "is", "was", "very", "not", "service", "great"]
        return [" ".join(rng.choice(words, size=int(rng.integers(2, 12)))) for _ in range(n)]
    from PIL import Image

    size = max(spec["size"], 8)
    return [Image.fromarray(rng.integers(0, 256, (size, size + (i % 2) * (size // 3 + 1), 3), dtype=np.uint8))
            for i in range(n)]


def _merge_lora_of(loaded: Any) -> None:
    """Fold a LoRA run's update into its base weights (the graph then holds plain layers)."""
    strategy = loaded.config.get("strategy", {})
    if strategy.get("name") == "lora" and not strategy.get("options", {}).get("_merged"):
        from transferkit.strategies.lora import merge_lora

        logger.info("merged %d LoRA layers into the base weights before export", merge_lora(loaded.module.backbone))


def _check_classifier(loaded: Any) -> None:
    loaded.refuse_language_model()
    if any(t.kind != "classify" for t in loaded.module.tasks[:1]):
        raise TransferkitError("ONNX export needs a classifier as the first task",
                               "export this run with --format safetensors")


def export_onnx(model_dir: str | Path, out: str | Path, overwrite: bool = False, samples: int = 16) -> Path:
    """Write ``model_dir``'s classifier (or ``auto`` ensemble) as an ONNX export folder (see the module docstring);
    returns ``out``."""
    _require_onnx()
    from transferkit.api import EnsembleModel, load
    from transferkit.rundir import OutputFolder, write_json, write_text

    folder = OutputFolder(out, "export", overwrite=overwrite)
    folder.check()
    loaded = load(model_dir, device="cpu")  # traced with CPU example inputs, compared on onnxruntime's CPU provider
    parts = loaded.members if isinstance(loaded, EnsembleModel) else [loaded]
    for part in parts:
        _check_classifier(part)
        _merge_lora_of(part)
        part.module.eval()
    folder.begin()
    with folder:
        if isinstance(loaded, EnsembleModel):
            spec, config, parity = _export_ensemble(loaded, loaded.members, loaded.weights, folder.stage, samples)
        elif loaded.config.get("tta"):  # one model with flip TTA (an auto run): a one-member ensemble graph
            spec, config, parity = _export_ensemble(loaded, [loaded], [1.0], folder.stage, samples)
        else:
            spec, config, parity = _export_single(loaded, folder.stage, samples)
        config["source"] = str(model_dir)
        write_json(folder.stage / PARITY_FILE, parity)
        write_json(folder.stage / PREPROCESS_FILE, spec)
        write_json(folder.stage / "config.json", config)
        write_text(folder.stage / "README.md", _readme(spec, config, parity))
        published = folder.publish()
    logger.info("ONNX export written to %s (max |logit difference| %.2e, agreement %.4f)", published,
                parity["max_abs_logit_diff"], parity["agreement"])
    return published


def _write_graph(graph: Any, stage: Path, arrays: dict[str, np.ndarray], output_names: list[str]) -> None:
    """``torch.onnx.export`` with a dynamic batch (and sequence length for token inputs)."""
    import torch

    input_names = list(arrays)
    dynamic = {name: ({0: "batch"} if name.startswith("pixels") else {0: "batch", 1: "sequence"})
               for name in input_names}
    dynamic.update({name: {0: "batch"} for name in output_names})
    example = tuple(torch.from_numpy(arrays[name]) for name in input_names)
    with torch.no_grad():
        torch.onnx.export(graph, example, str(stage / GRAPH_FILE), input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


def _export_single(loaded: Any, stage: Path, samples: int) -> tuple[dict, dict, dict]:
    model = loaded.module
    spec = preprocess_spec(model.backbone)
    if spec["kind"] == "text":
        model.backbone.tokenizer.save_pretrained(str(stage / TOKENIZER_DIR))
    preprocessor = Preprocessor(spec, stage)
    items = _sample_items(spec, loaded.classes_, samples)
    arrays = preprocessor(items[:2])
    input_names, output_names = list(arrays), [t.name for t in model.tasks]
    graph = _Graph.build(model, input_names)
    _write_graph(graph, stage, arrays, output_names)
    parity = check_parity(graph, stage / GRAPH_FILE, preprocessor, items, input_names)
    version = FRAMED_FORMAT_VERSION if spec.get("frame") else SINGLE_FORMAT_VERSION
    config = {"format": FORMAT, "format_version": version, "modality": model.backbone.modality,
              "tasks": [t.to_dict() for t in model.tasks], "temperature": loaded.temperature,
              "inputs": input_names, "outputs": output_names, "output_kind": "logits",
              "backbone": model.backbone.spec.to_dict(), "strategy": loaded.config.get("strategy", {}).get("name"),
              "opset": OPSET}
    return spec, config, parity


def _export_ensemble(ensemble: Any, parts: list[Any], weights: list[float], stage: Path,
                     samples: int) -> tuple[dict, dict, dict]:
    """One graph for an ``auto`` ensemble (module docstring) of the loaded models ``parts`` (``ensemble`` itself
    may be a single model with flip TTA): views deduplicated over members, probabilities averaged in the graph;
    parity against the graph in PyTorch and against ``ensemble.predict_proba`` itself."""
    from transferkit.autofit.ensemble import shared_feature_groups

    views: list[dict[str, Any]] = []
    host_of = {i: group[0] for group in shared_feature_groups(parts) for i in group}
    member_views: dict[int, list[int]] = {}
    for i, member in enumerate(parts):  # the views of each member that runs its own backbone, in member order
        if host_of[i] != i:
            continue
        backbone = member.module.backbone
        base = preprocess_spec(backbone)
        mirrors = [False, True] if member.config.get("tta") == "hflip" and base["kind"] == "image" else [False]
        indices = []
        for mirror in mirrors:
            key = {**base, "mirror": mirror, "backbone": backbone.spec.to_dict()}
            found = next((j for j, v in enumerate(views) if v["key"] == key), None)
            if found is None:
                found = len(views)
                view = {**base, "mirror": mirror, "name": f"view{found}", "key": key}
                if base["kind"] == "text":
                    view["tokenizer"] = f"{TOKENIZER_DIR}_{found}"
                    backbone.tokenizer.save_pretrained(str(stage / view["tokenizer"]))
                    view["graph_inputs"] = [f"{name}_{found}" for name in base["inputs"]]
                else:
                    view["graph_inputs"] = [f"pixels_{found}"]
                views.append(view)
            indices.append(found)
        member_views[i] = indices
    total = sum(weights)
    members = [{"module": member.module, "views": member_views[host_of[i]], "weight": weight / total,
                "temperature": float(member.temperature), "backbone": member.module.backbone.spec.name,
                "strategy": member.config.get("strategy", {}).get("name"), "tta": member.config.get("tta"),
                "path": str(member.path), "host": host_of[i], "width": member.module.backbone.feature_dim}
               for i, (member, weight) in enumerate(zip(parts, weights))]
    for view in views:
        del view["key"]
    spec = {"kind": "ensemble", "modality": ensemble.modality, "views": views}
    preprocessor = ViewsPreprocessor(spec, stage)
    largest = max((v for v in views if v["kind"] == "image"), key=lambda v: v["size"], default=views[0])
    items = _sample_items(largest, ensemble.classes_, samples)
    arrays = preprocessor(items[:2])
    input_names = list(arrays)
    output_names = ["probabilities"] + [f"logits_{m}_{v}" for m, member in enumerate(members) for v in member["views"]]
    graph = _Graph.build_ensemble(members, views, input_names)
    _write_graph(graph, stage, arrays, output_names)
    parity = check_parity(graph, stage / GRAPH_FILE, preprocessor, items, input_names, probabilities=True)
    parity["ensemble"] = _ensemble_parity(ensemble, stage / GRAPH_FILE, preprocessor, items)
    tasks = [parts[0].module.tasks[0].to_dict()]
    version = FRAMED_FORMAT_VERSION if any(v.get("frame") for v in views) else ENSEMBLE_FORMAT_VERSION
    config = {"format": FORMAT, "format_version": version, "modality": ensemble.modality, "tasks": tasks,
              "temperature": 1.0, "inputs": input_names, "outputs": output_names, "output_kind": "probabilities",
              "members": [{k: v for k, v in m.items() if k != "module"} for m in members],
              "strategy": "ensemble", "opset": OPSET}
    return spec, config, parity


def _ensemble_parity(ensemble: Any, onnx_path: Path, preprocessor: ViewsPreprocessor,
                     items: list[Any]) -> dict[str, Any]:
    """The PyTorch ensemble (each member with its own preprocessing and TTA) against the graph's probabilities."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = ensemble.predict_proba(items)
    got = session.run(["probabilities"], preprocessor(items))[0]
    return {"max_abs_probability_diff": float(np.abs(reference - got).max()),
            "agreement": float((reference.argmax(1) == got.argmax(1)).mean()), "samples": len(items),
            "reference": "transferkit.load(RUN).predict_proba (PyTorch, members' own preprocessing and TTA)"}


def check_parity(graph: Any, onnx_path: Path, preprocessor: Any, items: list[Any], input_names: list[str],
                 probabilities: bool = False) -> dict[str, Any]:
    """PyTorch vs onnxruntime on ``items`` at batch sizes 1 and len(items): max |difference| over every output
    (logits; the first output separately when it is ``probabilities``) and argmax agreement of the first output."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logit_diffs, probability_diffs, agree, total = [], [], 0, 0
    for batch in (1, len(items)):
        for start in range(0, len(items) if batch == len(items) else min(len(items), 4), batch):
            arrays = preprocessor(items[start:start + batch])
            with torch.no_grad():
                reference = [t.float().cpu().numpy() for t in graph(*(torch.from_numpy(arrays[n]) for n in input_names))]
            got = session.run(None, {n: arrays[n] for n in input_names})
            for i, (ref, out) in enumerate(zip(reference, got)):
                (probability_diffs if probabilities and i == 0 else logit_diffs).append(float(np.abs(ref - out).max()))
            agree += int((reference[0].argmax(1) == got[0].argmax(1)).sum())
            total += len(reference[0])
    result = {"samples": len(items), "batch_sizes": [1, len(items)], "max_abs_logit_diff": max(logit_diffs),
              "agreement": agree / total, "onnxruntime": ort.__version__, "torch": torch.__version__,
              "inputs": "synthetic (random-pattern images or texts of class names and common words)"}
    if probabilities:
        result["max_abs_probability_diff"] = max(probability_diffs)
    return result


def _image_steps(spec: dict[str, Any], name: str) -> str:
    framing = (f", frame it MNIST-style (`frame: {spec['frame']}`: grey, crop to the ink, scale the longer side to "
               "20 px, centre by mass in 28x28: `transferkit.data.framing.frame_image`)" if spec.get("frame") else "")
    return (f"1. decode the image file{framing} and convert it to mode `{spec['mode']}`"
            + (", then mirror it left-right\n" if spec.get("mirror") else "\n")
            + (f"2. resize to exactly {spec['size']}x{spec['size']} ({spec['interpolation']})\n"
               if spec["resize"] == "exact" else
               f"2. resize the shorter side to floor({spec['size']} / {spec['crop_pct']}) "
               f"({spec['interpolation']}), then centre-crop {spec['size']}x{spec['size']}\n")
            + f"3. scale to [0, 1], subtract mean {spec['mean']}, divide by std {spec['std']}\n"
            f"4. stack as float32 `{name}` of shape (batch, channels, height, width)\n")


def _text_steps(spec: dict[str, Any], names: list[str]) -> str:
    return (f"1. tokenise with the tokenizer in `{spec['tokenizer']}/` (padding to the longest, truncation to "
            f"{spec['max_length']} tokens)\n2. feed {' and '.join(f'`{n}`' for n in names)} as int64 "
            "(batch, tokens)\n")


def _output_line(task: dict[str, Any], temperature: float) -> str:
    """What a single model's graph output of ``task`` (``TaskSpec.to_dict()``) holds: its head's output."""
    options = task.get("options") or {}
    name = f"`{task['name']}` (task `{options.get('column') or 'label'}:{options.get('type', task['kind'])}`)"
    if task["kind"] == "classify":
        return (f"{name}: raw logits (batch, classes); probabilities = softmax(logits / {temperature}); classes in "
                f"order: {task['class_names']}")
    if task["kind"] == "quantile":
        offset = options.get("interval_offset") or 0.0
        calibrated = f", the outermost two moved outward by the conformal offset {offset:.4g}" if offset else ""
        return (f"{name}: the quantiles {options['quantiles']} (batch, {len(options['quantiles'])}) in the "
                f"target's units, never crossing{calibrated}: as `transferkit predict` gives them")
    return f"{name}: the predicted value (batch,) in the target's units"


def _readme(spec: dict[str, Any], config: dict[str, Any], parity: dict[str, Any]) -> str:
    classes = config["tasks"][0]["class_names"]
    if spec["kind"] == "ensemble":
        steps = "\n".join(f"### Input view {i}{' (mirror image: flip test-time augmentation)' if v['mirror'] else ''}"
                          f"\n\n" + (_image_steps(v, v["graph_inputs"][0]) if v["kind"] == "image" else
                                     _text_steps(v, v["graph_inputs"]))
                          for i, v in enumerate(spec["views"]))
        members = "\n".join(f"- member {m}: `{member['strategy']}` on `{member['backbone']}`, weight "
                            f"{member['weight']:.4f}, views {member['views']}, temperature {member['temperature']}"
                            for m, member in enumerate(config["members"]))
        outputs = (f"`probabilities` (batch, classes): the weighted mean over the members of softmax(logits / "
                   f"temperature), each member averaged over its views. Members:\n\n{members}\n\nThen each member's "
                   f"raw logits per view: {', '.join(f'`{o}`' for o in config['outputs'][1:])}. Classes in order: "
                   f"{classes}.")
        ensemble = parity["ensemble"]
        extra = (f" Against the PyTorch ensemble itself (each member with its own preprocessing and TTA): max "
                 f"|probability difference| {ensemble['max_abs_probability_diff']:.2e}, agreement "
                 f"{ensemble['agreement']:.4f}.")
        head = ("Every member of the ensemble may need another resolution or tokenizer, so the graph has one input "
                "per view; resizing runs in Python before the graph, as in training.\n\n")
    else:
        steps = _image_steps(spec, "pixels") if spec["kind"] == "image" else \
            _text_steps({**spec, "tokenizer": TOKENIZER_DIR}, ["input_ids", "attention_mask"])
        outputs = "One output per task, in order:\n\n" + "".join(
            f"- {_output_line(task, config['temperature'] if i == 0 else 1.0)}\n"
            for i, task in enumerate(config["tasks"])).rstrip("\n")
        extra, head = "", ""
    return (f"# ONNX export\n\nGraph `{GRAPH_FILE}` (opset {config['opset']}), exported from `{config['source']}`. "
            f"Batch size is dynamic.\n\n"
            f"## Preprocessing (in Python, before the graph; also in `{PREPROCESS_FILE}`)\n\n{head}{steps}\n"
            f"## Outputs\n\n{outputs}\n\n"
            f"## Parity with PyTorch (at export)\n\nmax |logit difference| {parity['max_abs_logit_diff']:.2e}, "
            f"predicted-class agreement {parity['agreement']:.4f} on {parity['samples']} synthetic inputs.{extra}\n\n"
            "## Use\n\n```bash\ntransferkit predict --model THIS_FOLDER INPUT...\n"
            "transferkit evaluate --model THIS_FOLDER --data DATA\ntransferkit serve --model THIS_FOLDER\n```\n")


# --- runtime -------------------------------------------------------------------------------------------------------


class OnnxModel:
    """An ONNX export run by onnxruntime, with ``LoadedModel``'s prediction interface."""

    is_language_model = False

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        """``threads``: onnxruntime's intra-op threads (0: its default, one per core)."""
        _require_onnx()
        import onnxruntime as ort

        from transferkit.model import TaskSpec

        self.path = Path(path)
        config_path, preprocess_path = self.path / "config.json", self.path / PREPROCESS_FILE
        with reading(config_path, "ONNX export config", _EXPORT_AGAIN):
            self.config = json.loads(config_path.read_text(encoding="utf-8"))
            missing = [key for key in ("tasks", "modality", "inputs", "outputs") if not self.config.get(key)]
            if missing:
                raise corrupt_file_error(config_path, "ONNX export config", f"no {', '.join(missing)}", _EXPORT_AGAIN)
            if self.config.get("format_version", 0) > FORMAT_VERSION:
                raise TransferkitError(f"the export in '{path}' was written by a newer transferkit",
                                       "upgrade transferkit")
            # a single model's graph outputs every head, named after its task; an ensemble's, the first task's
            self.tasks = [TaskSpec(**task) for task in self.config["tasks"]]
            if self.config.get("output_kind") == "probabilities":
                self.tasks = self.tasks[:1]
            self.temperature = float(self.config.get("temperature") or 1.0)
        with reading(preprocess_path, "ONNX preprocessing spec", _EXPORT_AGAIN):  # also a missing "tokenizer", ...
            self.preprocessor = make_preprocessor(json.loads(preprocess_path.read_text(encoding="utf-8")), self.path)
        try:
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(str(self.path / GRAPH_FILE), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for damaged graphs
            raise TransferkitError(f"cannot load '{self.path / GRAPH_FILE}' ({str(exc).splitlines()[0]})",
                                   "export the run again") from None

    @property
    def classes_(self) -> list[str]:
        return list(self.tasks[0].class_names)

    @property
    def modality(self) -> str:
        return self.config["modality"]

    def refuse_language_model(self) -> None:
        return None

    def first_output(self, items: Any, batch_size: int = 64) -> np.ndarray:
        """The graph's first output for ``items`` (``transferkit.api.as_inputs``: one input or a list of them):
        the first head's logits, or an ensemble's probabilities."""
        from transferkit.api import input_data

        return self._first_output(input_data(items, self.modality, self.classes_).items, batch_size)

    def _first_output(self, items: Sequence[Any], batch_size: int) -> np.ndarray:
        """The first output for a sequence of items read (images decoded) one batch at a time."""
        return self._outputs(items, batch_size, self.config["outputs"][:1])[0]

    def _outputs(self, items: Sequence[Any], batch_size: int, names: list[str]) -> list[np.ndarray]:
        """The graph outputs ``names`` for a sequence of items read (images decoded) one batch at a time."""
        check_count("batch_size", batch_size)
        chunks: list[list[np.ndarray]] = [[] for _ in names]
        for start in range(0, len(items), batch_size):
            arrays = self.preprocessor(items[start:start + batch_size])
            for chunk, out in zip(chunks, self.session.run(names, {n: arrays[n] for n in self.config["inputs"]})):
                chunk.append(out)
        if not len(items):
            return [np.zeros((0, len(self.classes_)), np.float32) for _ in names]
        return [np.concatenate(chunk) for chunk in chunks]

    def task_rows(self, items: Any, batch_size: int = 64) -> list[dict[str, Any]]:
        """Per item of ``items`` (as :meth:`first_output` takes them): every task's prediction (class name, value,
        or ``{quantile: value}``), as a run gives them."""
        from transferkit.api import input_data
        from transferkit.tasks.extension import task_rows

        read = input_data(items, self.modality, self.classes_).items
        return task_rows(self.tasks, self._outputs(read, batch_size, [t.name for t in self.tasks]))

    def task_report(self, data: Any, batch_size: int = 64) -> dict[str, Any]:
        """Every task's metrics on labelled ``data`` (``tasks`` and ``<task>_<metric>``, as ``evaluate`` of the
        run gives them); ``{}`` for a model with the label's head only."""
        from transferkit.tasks.extension import task_report_of_outputs

        names = [t.name for t in self.tasks]
        return task_report_of_outputs(self.tasks, dict(zip(names, self._outputs(data.items, batch_size, names))),
                                      data) if len(self.tasks) > 1 else {}

    def _probabilities(self, first_output: np.ndarray) -> np.ndarray:
        if self.config.get("output_kind") == "probabilities":  # an ensemble: averaged in the graph
            return first_output.astype(np.float64)
        logits = first_output.astype(np.float64) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict_proba(self, items: Any, batch_size: int = 64) -> np.ndarray:
        return self._probabilities(self.first_output(items, batch_size))

    def predict_proba_data(self, data: Any, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Class probabilities for every item of a LabeledData (its images read one batch at a time), like
        ``LoadedModel.predict_proba_data``; ``progress`` is accepted for the same signature."""
        return self._probabilities(self._first_output(data.items, batch_size))

    def predict(self, items: Any, batch_size: int = 64) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(items, batch_size).argmax(axis=1)]

    def evaluate(self, data: str, **options: Any) -> dict[str, Any]:
        """``transferkit.evaluate(self, data, **options)``: accuracy, macro-F1, ... on labelled ``data``."""
        from transferkit.api import evaluate

        return evaluate(self, data, **options)
