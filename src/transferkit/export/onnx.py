"""ONNX export of a classifier run, and the onnxruntime model that loads it back.

``export_onnx(RUN, OUT)`` writes an export folder (kind ``export`` of the run-folder lifecycle):

* ``model.onnx``: the network from preprocessed input to the raw outputs of every head (one output per task,
  named after it), batch size dynamic (and sequence length for text). LoRA runs are merged first, so the graph
  holds plain layers.
* ``preprocess.json`` (+ ``README.md`` beside the graph): what runs before the graph, in Python. Images: decode,
  convert to the mode (``L``/``RGB``), resize and centre-crop, scale to [0, 1], normalise with mean/std,
  layout NCHW float32. Texts: the tokenizer saved in ``tokenizer/`` (padding, truncation to ``max_length``).
* ``config.json``: classes, tasks, softmax temperature and the graph's input / output names.
* ``parity.json``: PyTorch against onnxruntime on sample inputs at export time (max absolute logit difference
  and agreement of the predicted class), at two batch sizes.

``load(OUT)`` returns an :class:`OnnxModel` (``predict``, ``predict_proba``, ``classes_``): ``transferkit
predict / evaluate / serve --model OUT`` then run onnxruntime, without PyTorch weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)

FORMAT = "transferkit-onnx"
FORMAT_VERSION = 1
GRAPH_FILE = "model.onnx"
PREPROCESS_FILE = "preprocess.json"
PARITY_FILE = "parity.json"
TOKENIZER_DIR = "tokenizer"
OPSET = 18


def is_onnx_export(path: str | Path) -> bool:
    path = Path(path)
    config = path / "config.json"
    if not (path / GRAPH_FILE).is_file() or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, OSError):
        return False


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
    normalization = getattr(backbone, "normalization", None)
    if normalization is not None:  # timm-style: resize to size / crop_pct, centre crop (timm's eval transform)
        return {"kind": "image", "mode": mode, "size": int(backbone.image_size), "resize": "shorter-side+center-crop",
                "interpolation": normalization["interpolation"], "crop_pct": float(normalization["crop_pct"]),
                "mean": list(normalization["mean"]), "std": list(normalization["std"]), "layout": "NCHW"}
    if backbone.spec.name == "small_cnn":
        channels = 1 if mode == "L" else 3
        return {"kind": "image", "mode": mode, "size": int(backbone.image_size), "resize": "exact",
                "interpolation": "bilinear", "crop_pct": 1.0, "mean": [0.5] * channels, "std": [0.5] * channels,
                "layout": "NCHW"}
    raise TransferkitError(f"backbone '{backbone.spec.name}' has no documented preprocessing for ONNX",
                           "export it with --format safetensors")


class Preprocessor:
    """``preprocess.json`` applied in Python: images -> float32 NCHW arrays, texts -> token arrays."""

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

        from transferkit.backbones.base import as_pil_image

        tensors = [self.transform(as_pil_image(item, self.spec["mode"])) for item in items]
        return {"pixels": torch.stack(tensors).cpu().numpy().astype(np.float32)}


# --- export ------------------------------------------------------------------------------------------------------


class _Graph:
    """A torch module from preprocessed inputs to every head's raw output (built lazily: torch imported late)."""

    @staticmethod
    def build(model: Any, input_names: list[str]):
        import torch

        class Graph(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *inputs):
                if len(input_names) == 1 and input_names[0] == "pixels":
                    batch = inputs[0]
                else:
                    batch = dict(zip(input_names, inputs))
                outputs = self.model(batch).outputs
                return tuple(outputs[t.name] for t in self.model.tasks)

        return Graph().eval()


def _sample_items(spec: dict[str, Any], class_names: list[str], n: int, seed: int = 0) -> list[Any]:
    """Inputs for the parity check: random-pattern images, or texts made of the class names and common words."""
    rng = np.random.default_rng(seed)
    if spec["kind"] == "text":
        words = [*class_names, "the", "a", "good", "bad", "is", "was", "very", "not", "service", "great"]
        return [" ".join(rng.choice(words, size=int(rng.integers(2, 12)))) for _ in range(n)]
    from PIL import Image

    size = max(spec["size"], 8)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def export_onnx(model_dir: str | Path, out: str | Path, overwrite: bool = False, samples: int = 16) -> Path:
    """Write ``model_dir``'s classifier as an ONNX export folder (see the module docstring); returns ``out``."""
    _require_onnx()
    import torch

    from transferkit.api import load
    from transferkit.rundir import OutputFolder, write_json, write_text

    folder = OutputFolder(out, "export", overwrite=overwrite)
    folder.check()
    loaded = load(model_dir, device="cpu")  # traced with CPU example inputs, compared on onnxruntime's CPU provider
    loaded.refuse_language_model()
    model = loaded.module
    if any(t.kind != "classify" for t in model.tasks[:1]):
        raise TransferkitError("ONNX export needs a classifier as the first task",
                               "export this run with --format safetensors")
    strategy = loaded.config.get("strategy", {})
    if strategy.get("name") == "lora" and not strategy.get("options", {}).get("_merged"):
        from transferkit.strategies.lora import merge_lora

        logger.info("merged %d LoRA layers into the base weights before export", merge_lora(model.backbone))
    model.eval()
    spec = preprocess_spec(model.backbone)
    folder.begin()
    with folder:
        stage = folder.stage
        if spec["kind"] == "text":
            model.backbone.tokenizer.save_pretrained(str(stage / TOKENIZER_DIR))
        preprocessor = Preprocessor(spec, stage)
        items = _sample_items(spec, loaded.classes_, samples)
        arrays = preprocessor(items[:2])
        input_names = list(arrays)
        output_names = [t.name for t in model.tasks]
        graph = _Graph.build(model, input_names)
        dynamic = {name: ({0: "batch"} if name == "pixels" else {0: "batch", 1: "sequence"}) for name in input_names}
        dynamic.update({name: {0: "batch"} for name in output_names})
        example = tuple(torch.from_numpy(arrays[name]) for name in input_names)
        with torch.no_grad():
            torch.onnx.export(graph, example, str(stage / GRAPH_FILE), input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
        parity = check_parity(graph, stage / GRAPH_FILE, preprocessor, items, input_names)
        write_json(stage / PARITY_FILE, parity)
        write_json(stage / PREPROCESS_FILE, spec)
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "modality": model.backbone.modality,
                  "tasks": [t.to_dict() for t in model.tasks], "temperature": loaded.temperature,
                  "inputs": input_names, "outputs": output_names, "backbone": model.backbone.spec.to_dict(),
                  "strategy": strategy.get("name"), "source": str(model_dir), "opset": OPSET}
        write_json(stage / "config.json", config)
        write_text(stage / "README.md", _readme(spec, config, parity))
        published = folder.publish()
    logger.info("ONNX export written to %s (max |logit difference| %.2e, agreement %.4f)", published,
                parity["max_abs_logit_diff"], parity["agreement"])
    return published


def check_parity(graph: Any, onnx_path: Path, preprocessor: Preprocessor, items: list[Any],
                 input_names: list[str]) -> dict[str, Any]:
    """PyTorch vs onnxruntime on ``items`` at batch sizes 1 and len(items): max |logit diff| and argmax agreement."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    diffs, agree, total = [], 0, 0
    for batch in (1, len(items)):
        for start in range(0, len(items) if batch == len(items) else min(len(items), 4), batch):
            arrays = preprocessor(items[start:start + batch])
            with torch.no_grad():
                reference = graph(*(torch.from_numpy(arrays[n]) for n in input_names))[0].float().cpu().numpy()
            got = session.run(None, {n: arrays[n] for n in input_names})[0]
            diffs.append(float(np.abs(reference - got).max()))
            agree += int((reference.argmax(1) == got.argmax(1)).sum())
            total += len(reference)
    return {"samples": len(items), "batch_sizes": [1, len(items)], "max_abs_logit_diff": max(diffs),
            "agreement": agree / total, "onnxruntime": ort.__version__, "torch": torch.__version__,
            "inputs": "synthetic (random-pattern images or texts of class names and common words)"}


def _readme(spec: dict[str, Any], config: dict[str, Any], parity: dict[str, Any]) -> str:
    if spec["kind"] == "image":
        steps = (f"1. decode the image file and convert it to mode `{spec['mode']}`\n"
                 + (f"2. resize to exactly {spec['size']}x{spec['size']} ({spec['interpolation']})\n"
                    if spec["resize"] == "exact" else
                    f"2. resize the shorter side to floor({spec['size']} / {spec['crop_pct']}) "
                    f"({spec['interpolation']}), then centre-crop {spec['size']}x{spec['size']}\n")
                 + f"3. scale to [0, 1], subtract mean {spec['mean']}, divide by std {spec['std']}\n"
                 "4. stack as float32 `pixels` of shape (batch, channels, height, width)\n")
    else:
        steps = (f"1. tokenise with the tokenizer in `{TOKENIZER_DIR}/` (padding to the longest, truncation to "
                 f"{spec['max_length']} tokens)\n2. feed `input_ids` and `attention_mask` as int64 (batch, tokens)\n")
    classes = config["tasks"][0]["class_names"]
    return (f"# ONNX export\n\nGraph `{GRAPH_FILE}` (opset {config['opset']}), exported from `{config['source']}`.\n\n"
            f"## Preprocessing (in Python, before the graph; also in `{PREPROCESS_FILE}`)\n\n{steps}\n"
            f"## Outputs\n\n{', '.join(f'`{o}`' for o in config['outputs'])}: raw logits (batch, classes); "
            f"probabilities = softmax(logits / {config['temperature']}). Classes in order: {classes}.\n\n"
            f"## Parity with PyTorch (at export)\n\nmax |logit difference| {parity['max_abs_logit_diff']:.2e}, "
            f"predicted-class agreement {parity['agreement']:.4f} on {parity['samples']} synthetic inputs.\n\n"
            "## Use\n\n```bash\ntransferkit predict --model THIS_FOLDER INPUT...\n"
            "transferkit serve --model THIS_FOLDER\n```\n")


# --- runtime -------------------------------------------------------------------------------------------------------


class OnnxModel:
    """An ONNX export run by onnxruntime, with ``LoadedModel``'s prediction interface."""

    is_language_model = False

    def __init__(self, path: str | Path) -> None:
        _require_onnx()
        import onnxruntime as ort

        from transferkit.model import TaskSpec

        self.path = Path(path)
        self.config = json.loads((self.path / "config.json").read_text())
        if self.config.get("format_version", 0) > FORMAT_VERSION:
            raise TransferkitError(f"the export in '{path}' was written by a newer transferkit", "upgrade transferkit")
        # the graph outputs every head; the runtime predicts the first task (a classifier)
        self.tasks = [TaskSpec(**self.config["tasks"][0])]
        self.temperature = float(self.config.get("temperature") or 1.0)
        self.preprocessor = Preprocessor(json.loads((self.path / PREPROCESS_FILE).read_text()), self.path)
        try:
            self.session = ort.InferenceSession(str(self.path / GRAPH_FILE), providers=["CPUExecutionProvider"])
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

    def _items(self, items: Any) -> list[Any]:
        from transferkit.api import _open_image

        if isinstance(items, (str, Path)) or not isinstance(items, (list, tuple)):
            items = [items]
        return [_open_image(item) if self.modality == "image" else str(item) for item in items]

    def logits(self, items: Any, batch_size: int = 64) -> np.ndarray:
        items = self._items(items)
        chunks = []
        for start in range(0, len(items), batch_size):
            arrays = self.preprocessor(items[start:start + batch_size])
            chunks.append(self.session.run([self.config["outputs"][0]],
                                           {n: arrays[n] for n in self.config["inputs"]})[0])
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes_)), np.float32)

    def predict_proba(self, items: Any, batch_size: int = 64) -> np.ndarray:
        logits = self.logits(items, batch_size).astype(np.float64) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, items: Any, batch_size: int = 64) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(items, batch_size).argmax(axis=1)]
