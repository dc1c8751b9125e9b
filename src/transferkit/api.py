"""The Python API, mirroring the CLI: ``fit``, ``load``, ``evaluate``, ``predict``.

    run = transferkit.fit("fashion-mnist", strategy="finetune", limit_per_class=20, out="runs/fm")
    model = transferkit.load("runs/fm")
    model.predict(["shoe.png"])
"""

from __future__ import annotations

import logging
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.config import FitConfig, build, load_yaml_config
from transferkit.data.base import LabeledData
from transferkit.data.images import IMAGE_EXTENSIONS, images_under, is_image_array, is_one_input
from transferkit.data.text import UNLABELLED_TEXT_EXTENSIONS, read_text_file
from transferkit.errors import TransferkitError, check_count, from_os_error, spoken
from transferkit.fitting import Run, fit_run
from transferkit.inference import evaluate_features, evaluate_model, predict_proba_model  # noqa: F401 (public here too)

logger = logging.getLogger(__name__)

# --- runs ------------------------------------------------------------------------------------------------------


def resolve_options(options: dict[str, Any], config_file: str | Path | None = None):
    """Split a flat option dict (YAML file < explicit options) into the run's config objects."""
    from transferkit.config import option_fields
    from transferkit.engine.trainer import TrainConfig
    from transferkit.extensions import check_supported, list_extensions
    from transferkit.strategies import list_strategies, strategy_class
    from transferkit.tasks import run_task_kind

    merged: dict[str, Any] = load_yaml_config(config_file) if config_file else {}
    merged.update({k.replace("-", "_"): v for k, v in options.items() if v is not None})
    if merged.get("unlabelled") is not None and "strategy" not in merged:  # the measured best semi-supervised pair
        from transferkit.selftaught.semi import DEFAULT_STRATEGY

        merged["strategy"] = DEFAULT_STRATEGY
    known = {f.name for c in (FitConfig, TrainConfig, *(e.config_class for e in list_extensions().values()),
                              *(s.config_class for s in list_strategies().values())) for f in option_fields(c)}
    unknown = sorted(set(merged) - known)
    if unknown:  # first: a misspelled `data` must not be reported as "no data given"
        raise TransferkitError(f"unknown option(s): {', '.join(unknown)}", "see `transferkit fit --help`")
    fit = build(FitConfig, merged)
    fit.validate()
    train = build(TrainConfig, merged)
    train.validate()
    extensions = []
    for ext_cls in list_extensions().values():
        ext = ext_cls(build(ext_cls.config_class, merged))
        ext.config.validate()
        extensions.append(ext)
    cls = strategy_class(fit.strategy)
    strategy = cls(build(cls.config_class, merged))
    if merged:  # every key is known (above): what is left belongs to other strategies
        raise TransferkitError(
            f"option(s) {', '.join('--' + k.replace('_', '-') for k in sorted(merged))} do not apply to strategy "
            f"'{fit.strategy}'", "remove them or choose the strategy they belong to")
    active = [e for e in extensions if e.active()]
    tasks = next((e.config.task for e in extensions if e.name == "tasks"), None)  # type: ignore[attr-defined]
    check_supported(strategy, active, run_task_kind(tasks), " ".join(f"--task {t}" for t in tasks or []), fit)
    for ext in active:
        ext.check(fit, strategy)
    return fit, train, strategy, active


def recorded_options(options: dict[str, Any]) -> dict[str, Any]:
    """The settings a fit with ``options`` records in its ``run_config.json`` (the data's fingerprint aside)."""
    from transferkit.fitting import run_options

    return run_options(*resolve_options(dict(options)))


def data_fingerprint(options: dict[str, Any]) -> str:
    """The fingerprint of the data a fit with ``options`` would train on (which item is in which split with which
    label), as its ``run_config.json`` records it for ``--resume`` and compare's reuse of a finished cell."""
    from transferkit.fitting import split_data

    fit, train, _, extensions = resolve_options(dict(options))
    return split_data(fit, train, extensions).fingerprint()


def fit(data: str | None = None, *, config: str | Path | None = None, **options: Any) -> Run:
    """Train a model on ``data`` and write a run folder; see ``transferkit fit --help`` for every option.

    The steps of a run (data, backbone, model, training, scoring, the run folder) are in ``transferkit.fitting``.
    """
    if data is not None:
        options["data"] = data
    return fit_run(*resolve_options(options, config))


# --- loaded models (prediction and evaluation themselves live in transferkit.inference) ------------------------


class LoadedModel:
    """A trained model restored from a run folder, with a scikit-learn-like interface."""

    def __init__(self, module, config: dict[str, Any], path: Path) -> None:
        from transferkit.evaluation.calibration import read_temperature

        self.module = module
        self.config = config
        self.path = path
        #: softmax temperature fitted by ``fit --temperature-scale`` (1.0 without): applied by predict_proba
        self.temperature = read_temperature(path) or 1.0

    @property
    def classes_(self) -> list[str]:
        return list(self.module.class_names)

    @property
    def modality(self) -> str:
        return self.module.backbone.modality

    @property
    def tasks(self) -> list:
        return list(self.module.tasks)

    @property
    def is_language_model(self) -> bool:
        """A ``--task causal-lm`` run: it scores perplexity and generates text instead of predicting classes."""
        return self.config.get("task") == "causal-lm"

    def _as_data(self, items: Any) -> LabeledData:
        """``items`` (see :func:`as_inputs`) as a LabeledData whose images are decoded only when read."""
        return input_data(items, self.modality, self.classes_)

    def refuse_language_model(self) -> None:
        if self.is_language_model:
            raise TransferkitError(f"'{self.path}' is a language model: it has no classes to predict",
                                   "use `transferkit generate --model RUN \"prompt\"` or evaluate its perplexity")

    def predict_proba(self, items: Any, batch_size: int = 64) -> np.ndarray:
        """Class probabilities of ``items``: one image file, PIL image, numpy image or text, or a list of them
        (:func:`as_inputs`; a folder is refused: :func:`predict` expands folders). At most ``batch_size`` images
        are decoded at a time, each once however many test-time views or ensemble members read it."""
        self.refuse_language_model()
        check_count("batch_size", batch_size)
        data = self._as_data(items)
        parts = [self.predict_proba_data(decoded_slice(data, start, batch_size), batch_size)
                 for start in range(0, len(data), batch_size)]
        return np.concatenate(parts) if parts else self.predict_proba_data(data, batch_size)

    def test_views(self, data) -> list:
        """``data`` as the model sees it at prediction: with flip test-time augmentation (``tta`` in its config:
        ``hflip``) the images and their mirror images, whose probabilities are averaged."""
        if self.config.get("tta") == "hflip" and data.modality == "image":
            from transferkit.autofit.training import mirrored

            return [data, mirrored(data)]
        return [data]

    def predict_proba_data(self, data, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Class probabilities for every item of a LabeledData, with the model's test-time augmentation
        (:meth:`test_views`) and temperature."""
        views = self.test_views(data)
        return sum(predict_proba_model(self.module, view, batch_size, progress and i == 0,
                                       temperature=self.temperature) for i, view in enumerate(views)) / len(views)

    def task_rows(self, items: Any, batch_size: int = 64) -> list[dict[str, Any]]:
        """Per item: every task's prediction (class name, value, or ``{quantile: value}``)."""
        from transferkit.tasks.extension import predict_task_rows

        return predict_task_rows(self.module, self._as_data(items), batch_size)

    def predict(self, items: Any, batch_size: int = 64) -> list[str]:
        probabilities = self.predict_proba(items, batch_size)
        return [self.classes_[i] for i in probabilities.argmax(axis=1)]

    def evaluate(self, data: str, **options: Any) -> dict[str, Any]:
        return evaluate(self, data, **options)


# --- prediction inputs ------------------------------------------------------------------------------------------

_ACCEPTED = {"image": "an image model takes image file paths, PIL images or numpy images (H x W or H x W x C)",
             "text": "a text model takes texts (str)"}


def _described(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return "None" if value is None else f"{type(value).__name__} {reprlib.repr(value)}"


def as_inputs(items: Any, modality: str, text_files: bool = False) -> list[Any]:
    """``items`` as a list of single inputs, nothing read yet. One str, Path or PIL image, or one numpy image, is
    one input (a text is never split into characters); a list, tuple or other iterable holds one input per
    element, a numpy array of images (N x H x W or N x H x W x C) one per row. An image model takes file paths,
    PIL images and numpy images, a text model str (and, with ``text_files``, the Path of a file of texts:
    :func:`stands_for_many`); anything else is a TransferkitError naming it."""
    from PIL import Image

    kind = "image" if modality == "image" else "text"
    single = (str, Path, Image.Image)
    if is_one_input(items, modality):
        items = [items]
    elif items is None or isinstance(items, (bytes, bytearray, Mapping)) or not isinstance(items, Iterable):
        raise TransferkitError(f"cannot predict {_described(items)}: {_ACCEPTED[kind]}",
                               "pass one input or a list of them")
    inputs = list(items)
    for i, item in enumerate(inputs):
        if not ((isinstance(item, single) or is_image_array(item)) if kind == "image" else
                isinstance(item, str) or (text_files and stands_for_many(item, "text"))):
            raise TransferkitError(f"cannot predict input {i} ({_described(item)}): {_ACCEPTED[kind]}",
                                   "pass only such inputs" if kind == "image" else
                                   "pass only texts (str(value) if the values are texts)")
    return inputs


def input_name(item: Any, position: int) -> str:
    """How a prediction names an input: its path or text, else its position (``item[3]``: an image object)."""
    return str(item) if isinstance(item, (str, Path)) else f"item[{position}]"


def image_file(item: str | Path) -> Path:
    """The image file ``item`` names; a folder or a missing file is a TransferkitError."""
    path = Path(item)
    try:
        if path.is_dir():
            raise TransferkitError(f"'{path}' is a folder, not an image file",
                                   "pass its image files, or give the folder to transferkit.predict(model, [folder]) "
                                   "or `transferkit predict`, which predict every image below it")
        if not path.is_file():
            raise TransferkitError(f"image '{path}' does not exist", "check the path")
    except OSError as exc:  # e.g. a name too long for the file system
        raise from_os_error(exc) from None
    return path


def decode_image(item: Any):
    """One image input as a PIL image, as training and ``evaluate`` see it: a file decoded (and closed) by
    ``data.images.open_image`` (upright per its EXIF orientation, 16-bit grey rescaled), a PIL image in the same
    standard mode, a numpy image converted."""
    from PIL import Image

    from transferkit.backbones.base import array_image
    from transferkit.data.images import open_image, to_standard_mode

    if isinstance(item, Image.Image):
        return to_standard_mode(item)
    if isinstance(item, np.ndarray):
        return array_image(item)
    return open_image(Path(item))  # input_data checked every path up front (image_file)


class DecodedImages(Sequence):
    """Image inputs decoded one at a time, when read (:func:`decode_image`): a folder of photos is never all in
    memory."""

    def __init__(self, inputs: list[Any]) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [decode_image(item) for item in self.inputs[i]]
        return decode_image(self.inputs[i])


def input_data(items: Any, modality: str, class_names: list[str]) -> LabeledData:
    """``items`` (:func:`as_inputs`) as an unlabelled LabeledData; every image path is checked first, but images
    are decoded only when read (e.g. batch by batch by a DataLoader)."""
    inputs = as_inputs(items, modality)
    if modality == "image":
        for item in inputs:
            if isinstance(item, (str, Path)):
                image_file(item)
    raw = DecodedImages(inputs) if modality == "image" else inputs
    return LabeledData(raw, np.full(len(inputs), -1), list(class_names), modality,
                       [input_name(item, i) for i, item in enumerate(inputs)], name="inputs")


def decoded_slice(data: LabeledData, start: int, size: int) -> LabeledData:
    """Items ``start:start + size`` of ``data`` read into memory (decoded once, for every view that reads them)."""
    end = min(start + size, len(data))
    return LabeledData(list(data.items[start:end]), data.labels[start:end], list(data.class_names), data.modality,
                       data.ids[start:end], name=data.name)


def load(path: str | Path, device: str = "auto", threads: int = 0) -> LoadedModel:
    """Restore a model from a run folder (or its ``model/`` subfolder), placed on ``device`` (auto, cpu, cuda,
    cuda:N or mps; see ``transferkit.engine.placement``). ``threads`` sets onnxruntime's intra-op threads when
    ``path`` is an ONNX export (0: its default; torch's threads are the caller's ``torch.set_num_threads``)."""
    from transferkit.engine.placement import place, resolve_device
    from transferkit.model import load_model

    path = Path(path)
    target = resolve_device(device)  # a bad --device is refused before anything is read
    if not path.exists():
        raise TransferkitError(f"model folder '{path}' does not exist", "pass the --out folder of a finished fit")
    from transferkit.autofit.ensemble import ENSEMBLE_KEY
    from transferkit.export.onnx import OnnxModel, is_onnx_export
    from transferkit.model import read_model_config

    if is_onnx_export(path):  # `export --format onnx`: runs on onnxruntime
        return OnnxModel(path, threads)  # type: ignore[return-value]
    config = read_model_config(path)
    if ENSEMBLE_KEY in config:
        return EnsembleModel(config, path, device)
    module, config = load_model(path)
    place(module, target)
    return LoadedModel(module, config, path)


class EnsembleModel(LoadedModel):
    """An ensemble folder (``transferkit auto``): the weighted mean of its members' probabilities, each member with
    its own preprocessing and test-time augmentation. ``module`` is the first member's network (classes, modality)."""

    def __init__(self, config: dict[str, Any], path: Path, device: str = "auto") -> None:
        folder = Path(config["_folder"])
        spec = config["ensemble"]
        self.members = [load(folder / member, device) for member in spec["members"]]
        self.weights = [float(w) for w in spec["weights"]]
        if not self.members or len(self.weights) != len(self.members):
            raise TransferkitError(f"the ensemble in '{folder}' lists no members or mismatched weights",
                                   "re-run `transferkit auto`")
        if any(m.classes_ != self.members[0].classes_ for m in self.members):
            raise TransferkitError(f"the members of the ensemble in '{folder}' have different classes",
                                   "re-run `transferkit auto`")
        super().__init__(self.members[0].module, config, path)
        self.groups_: list[list[int]] | None = None  # members sharing a forward pass, found on first prediction

    def predict_proba_data(self, data, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """The weighted mean of the members' probabilities; members whose features are columns of another's
        (auto's final-layer and multi-stage probes of one backbone) share that member's forward pass."""
        from transferkit.autofit.ensemble import group_probabilities, shared_feature_groups

        if self.groups_ is None:
            self.groups_ = shared_feature_groups(self.members)
        total, mean = sum(self.weights), 0.0
        for group in self.groups_:
            if len(group) == 1:
                parts = [self.members[group[0]].predict_proba_data(data, batch_size, progress)]
            else:
                parts = group_probabilities([self.members[i] for i in group], data, batch_size, progress)
            mean = mean + sum(self.weights[i] / total * p for i, p in zip(group, parts))
        return mean  # type: ignore[return-value]


def evaluate(model: str | Path | LoadedModel, data: str, *, text_column: str | None = None,
             label_column: str | None = None, batch_size: int = 64, progress: bool = True, device: str = "auto",
             **options: Any) -> dict[str, Any]:
    """Accuracy, macro-F1, top-5, confusion matrix and per-class scores of ``model`` on labelled ``data``.

    ``options`` go to the evaluation hooks (see ``transferkit.evaluation.hooks``), e.g. ``attack="fgsm"``.
    """
    from transferkit.data.evaluation import load_for_evaluation
    from transferkit.evaluation.hooks import run_evaluation_hooks, set_hook_flags

    check_count("--batch-size", batch_size)
    loaded = load(model, device) if isinstance(model, (str, Path)) else model  # a LoadedModel or an OnnxModel
    flags = [] if isinstance(loaded, LoadedModel) else set_hook_flags(options)  # an ONNX export: the plain report
    if flags:
        raise TransferkitError(f"{spoken(flags)} cannot be used with an ONNX export: the evaluation hooks need the "
                               "PyTorch model (an attack its gradients)",
                               f"evaluate the run folder the export was made from, or drop {spoken(flags)}")
    if loaded.is_language_model:
        from transferkit.tasks.causal_lm import evaluate_perplexity

        return evaluate_perplexity(loaded.module, data, text_column, batch_size)
    trained_text, trained_label = training_columns(loaded)  # unless given: the columns the model learned from
    eval_data = load_for_evaluation(data, loaded.classes_, text_column=text_column or trained_text,
                                    label_column=label_column or trained_label)
    if eval_data.modality != loaded.modality:
        raise TransferkitError(f"the model takes {loaded.modality} input but '{data}' is {eval_data.modality} data",
                               "evaluate on data of the kind the model was trained on")
    if not isinstance(loaded, LoadedModel):  # an ONNX export: onnxruntime probabilities, the plain report
        from transferkit.evaluation.metrics import classification_report

        keep = eval_data.labels >= 0
        probabilities = loaded.predict_proba_data(eval_data.subset(np.flatnonzero(keep)), batch_size)
        report = classification_report(eval_data.labels[keep], probabilities, loaded.classes_)
        report.update(loaded.task_report(eval_data, batch_size))  # a multi-task run's other heads
        return report
    if loaded.module.tasks[0].kind != "classify":  # regression first: the task metrics are the report
        from transferkit.tasks.extension import first_task_report

        return first_task_report(loaded.module, eval_data, batch_size)  # the hooks measure classifiers
    from transferkit.evaluation.metrics import classification_report

    keep = eval_data.labels >= 0
    probabilities = loaded.predict_proba_data(eval_data, batch_size, progress)
    report = classification_report(eval_data.labels[keep], probabilities[keep], loaded.classes_)
    report.update(run_evaluation_hooks(loaded, eval_data, report, options))
    return report


def training_columns(loaded: Any) -> tuple[str | None, str | None]:
    """(``--text-column``, ``--label-column``) the run of ``loaded`` was trained with (its ``run_config.json``);
    (None, None) when not given there or not known (an ONNX export, a model without its run folder)."""
    from transferkit.evaluation.calibration import run_folder_of
    from transferkit.rundir import read_options

    path = getattr(loaded, "path", None)
    options = read_options(run_folder_of(path)) if path is not None else None
    fit = options.get("fit") if isinstance(options, dict) else None
    columns = (fit.get("text_column"), fit.get("label_column")) if isinstance(fit, dict) else (None, None)
    return tuple(c if isinstance(c, str) else None for c in columns)  # type: ignore[return-value]


def _path_kind(item: Any) -> str | None:
    """``"a folder"``, ``"a file"`` or ``"an image file name"`` when the text ``item`` names one, else None."""
    if not isinstance(item, (str, Path)):
        return None
    path = Path(item)
    try:
        if path.is_dir():
            return "a folder"
        if path.is_file():
            return "a file"
    except OSError:  # a long text is no path
        return None
    return "an image file name" if "\n" not in str(item) and path.suffix.lower() in IMAGE_EXTENSIONS else None


def stands_for_many(item: Any, modality: str) -> bool:
    """Whether the input ``item`` stands for several: a folder (of images) for an image model, a .csv / .tsv /
    .jsonl / .txt file (of texts) for a text model."""
    what = _path_kind(item)
    if modality == "image":
        return what == "a folder"
    return what == "a file" and Path(item).suffix.lower() in UNLABELLED_TEXT_EXTENSIONS


def expand_inputs(inputs: list[Any], modality: str, text_column: str | None = None) -> list[Any]:
    """Image inputs, with folders expanded to the images below them (sorted); for a text model the texts, with
    each .csv / .tsv / .jsonl file expanded to the texts of its ``text_column`` (default: the documented
    candidates) and each .txt file to its non-empty lines, in file order (the readers of ``fit --unlabelled``).
    No other path may be given to a text model (an image, another file or a folder is a mistake, not a sentence)."""
    if modality != "image":
        texts: list[Any] = []
        for item in inputs:
            if stands_for_many(item, modality):
                texts.extend(read_text_file(Path(item), text_column=text_column, labelled=False).items)
                continue
            what = _path_kind(item)
            if what is not None:
                raise TransferkitError(f"'{item}' is {what}, but this is a text model: it classifies the texts "
                                       "given", "pass the texts themselves (quote each one), a .csv / .tsv / .jsonl "
                                       "/ .txt file of them, or use an image model")
            texts.append(item)
        return texts
    if text_column is not None:
        raise TransferkitError(f"--text-column '{text_column}' was given, but this is an image model",
                               "drop --text-column: it names the text column of a file of texts for a text model")
    expanded: list[Any] = []
    for item in inputs:
        path = Path(item) if isinstance(item, (str, Path)) else None
        if path is not None and path.is_dir():
            files = images_under(path)  # training's rule: hidden files and folders are no images
            if not files:
                raise TransferkitError(f"folder '{path}' holds no images", "pass image files or a folder of images")
            expanded.extend(str(p) for p in files)
        else:
            expanded.append(item)
    return expanded


def predict(model: str | Path | LoadedModel, inputs: Any, batch_size: int = 64,
            device: str = "auto", text_column: str | None = None) -> list[dict[str, Any]]:
    """One row per input: ``{"input", "prediction", "probabilities": {class: p}}``; ``device`` places a model
    loaded from a folder. ``inputs``: one input or a list of them (:func:`as_inputs`: image files, PIL or numpy
    images, or texts); a folder stands for the images below it (sorted), a .csv / .tsv / .jsonl / .txt file for its
    texts (:func:`expand_inputs`; ``text_column`` default: the run's own). ``"input"`` is a file's path or the text,
    else ``item[i]`` (i: the position among the expanded inputs). At most ``batch_size`` images are decoded at a
    time. Under ``torchrun`` every process predicts one contiguous slice of the (expanded) inputs and every process
    returns all rows, in input order (:mod:`transferkit.engine.sharding`)."""
    from transferkit.engine.sharding import sharded_slices

    check_count("--batch-size", batch_size)
    loaded = load(model, device) if isinstance(model, (str, Path)) else model  # a LoadedModel or an OnnxModel
    loaded.refuse_language_model()
    text_column = text_column or (training_columns(loaded)[0] if loaded.modality != "image" else None)
    items = expand_inputs(as_inputs(inputs, loaded.modality, text_files=True), loaded.modality, text_column)
    names = [input_name(item, i) for i, item in enumerate(items)]
    parts = sharded_slices(lambda start, end: prediction_rows(loaded, items[start:end], names[start:end], batch_size),
                           len(items), "inputs")
    return [row for part in parts for row in part]


def prediction_rows(loaded: LoadedModel, items: list[Any], names: list[Any],
                    batch_size: int = 64) -> list[dict[str, Any]]:
    """``predict``'s rows for ``items`` (image files, PIL or numpy images, or texts), each row's ``"input"`` taken
    from ``names``; images are decoded ``batch_size`` at a time."""
    if loaded.tasks[0].kind != "classify" or len(loaded.tasks) > 1:  # every task's prediction
        rows = loaded.task_rows(items, batch_size)
        first = loaded.tasks[0]
        if first.kind != "classify":
            return [{"input": name, "prediction": row[first.name], "tasks": row} for name, row in zip(names, rows)]
        extra = rows
    else:
        extra = [{} for _ in items]
    probabilities = loaded.predict_proba(items, batch_size)
    return [
        {"input": name, "prediction": loaded.classes_[int(p.argmax())],
         "probabilities": {c: float(v) for c, v in zip(loaded.classes_, p)}, **({"tasks": e} if e else {})}
        for name, p, e in zip(names, probabilities, extra)
    ]
