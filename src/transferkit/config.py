"""Run configuration: dataclasses whose ``field(metadata={"help": ...})`` is the documentation.

The options of one ``fit`` come from several dataclasses: :class:`FitConfig` (data, backbone, output),
:class:`~transferkit.engine.TrainConfig` (optimisation), the chosen strategy's config and every registered
extension's config (regularisers, domain adaptation, tasks). The CLI builds its flags from these same classes,
and ``--config run.yaml`` holds the same names; flags win over the file, the file over defaults.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferkit.errors import TransferkitError, check_count

#: the largest input resolution accepted (in pixels): larger ones would exhaust memory before the first batch
MAX_IMAGE_SIZE = 4096

PROTOCOLS = ("auto", "cv", "holdout")


@dataclass
class FitConfig:
    """What to train on, with which backbone and strategy, and where to write the run."""

    data: str = field(default="", metadata={"help": "A folder of images, a .csv/.jsonl text file, or a built-in "
                                           "dataset name (fashion-mnist, digits, mnist-5k, tweets[:topic])."})
    backbone: str | None = field(default=None, metadata={"help": "Registry name (see `transferkit backbones`); "
                                                          "default efficientnet_lite0 for images, minilm for text."})
    strategy: str = field(default="linear-probe", metadata={"help": "How parameters adapt (see `--help`)."})
    out: str | None = field(default=None, metadata={"help": "Run folder to write (default runs/<data>-<strategy>)."})
    text_column: str | None = field(default=None, metadata={"help": "Text column of a .csv/.jsonl dataset."})
    label_column: str | None = field(default=None, metadata={"help": "Label column of a .csv/.jsonl dataset."})
    limit_per_class: int | None = field(default=None, metadata={"help": "Use a seeded subset of K labelled "
                                                                 "examples per class (few-shot)."})
    test_limit: int | None = field(default=None, metadata={"help": "Evaluate on a fixed, seeded, stratified "
                                                            "subset of this many test items."})
    val_fraction: float = field(default=0.15, metadata={"help": "Validation share when splitting automatically."})
    test_fraction: float = field(default=0.2, metadata={"help": "Test share when the data has no test split."})
    protocol: str = field(default="auto", metadata={"help": "How labels are spent. cv: stratified k-fold "
                          "cross-validation (k = min(5, smallest class)) chooses the settings and estimates accuracy "
                          "out of fold, then the final model is refit on every labelled item; holdout: train / "
                          "validation / test splits (--val-fraction, --test-fraction); auto: cv when the data has "
                          "no test or validation split of its own and its smallest class has fewer than 100 items "
                          "(frozen-backbone strategies such as the linear probe) or 50 items (trained strategies), "
                          "holdout otherwise."})
    pretrained: bool = field(default=True, metadata={"help": "Start from pretrained weights (--no-pretrained: "
                                                    "the same architecture from random initialisation)."})
    image_size: int | None = field(default=None, metadata={"help": "Input resolution in pixels (default: the "
                                                            "backbone's own)."})
    feature_stage: int | None = field(default=None, metadata={"help": "Image backbones: embed with the pooled output "
                                      "of this earlier feature stage (e.g. 0-4 for EfficientNet) instead of the last "
                                      "layer; `transferkit rank-backbones` scores depths as NAME#STAGE."})
    pool_stages: list[int] | None = field(default=None, metadata={"help": "Image backbones (repeatable): also embed "
                                          "the pooled outputs of these earlier feature stages, concatenated before "
                                          "the last layer's features (Head2Toe-style multi-stage probe; e.g. "
                                          "--pool-stages 3 --pool-stages 4 on EfficientNet)."})
    pool_grid: list[int] | None = field(default=None, metadata={"help": "Image backbones (repeatable): average the "
                                        "last layer's map, and each --pool-stages map, over a grid of N x N cells "
                                        "instead of globally, so the probe sees where in the image a feature is. One "
                                        "value for every map, or one per map: the pooled stages in order, then the "
                                        "last layer (e.g. --pool-stages 3 --pool-stages 4 --pool-grid 7 --pool-grid "
                                        "3 --pool-grid 3, auto's multi-stage probe). Default 1: global averages."})
    max_length: int | None = field(default=None, metadata={"help": "Token limit of text backbones (default: the "
                                   "backbone's own; 128 for --task causal-lm)."})
    augment: bool = field(default=True, metadata={"help": "Training-time augmentation (flips, crops, jitter)."})
    head_dropout: float = field(default=0.0, metadata={"help": "Dropout before the new head."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the cross-entropy."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished run in --out."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run from its last checkpoint."})
    cache_dir: str | None = field(default=None, metadata={"help": "Feature cache (default ~/.cache/transferkit)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def validate(self) -> None:
        if not self.data:
            raise TransferkitError("no data given", "pass --data PATH or a built-in dataset name")
        for name in ("limit_per_class", "test_limit", "image_size", "max_length"):
            value = getattr(self, name)
            if value is not None:
                check_count(f"--{name.replace('_', '-')}", value, 1, MAX_IMAGE_SIZE if name == "image_size" else None)
        if not 0 < self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise TransferkitError("--val-fraction must lie in (0, 1) and --test-fraction in [0, 1)",
                                   "pass fractions such as 0.15 and 0.2")
        if self.protocol not in PROTOCOLS:
            raise TransferkitError(f"invalid --protocol '{self.protocol}'", f"choose one of {', '.join(PROTOCOLS)}")
        if not 0 <= self.head_dropout < 1 or not 0 <= self.label_smoothing < 1:
            raise TransferkitError("--head-dropout and --label-smoothing must lie in [0, 1)", "pass e.g. 0.1")


# --- generic handling of option dataclasses -------------------------------------------------------------------


def option_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def field_base_type(f: dataclasses.Field) -> type:
    """The non-None type of a field (``int | None`` -> int), resolving string annotations."""
    hints = typing.get_type_hints(_owner_of(f))
    tp = hints[f.name]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


_FIELD_OWNERS: dict[int, type] = {}


def _owner_of(f: dataclasses.Field) -> type:
    return _FIELD_OWNERS[id(f)]


def register_option_class(cls: type) -> type:
    for f in dataclasses.fields(cls):
        _FIELD_OWNERS[id(f)] = cls
    return cls


def coerce(value: Any, tp: type, name: str) -> Any:
    """Convert a YAML / string value to a field's type with a clear error."""
    if value is None:
        return None
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            result = float(value)
            if not math.isfinite(result):
                raise ValueError(value)
            return result
        if tp is str:
            return str(value)
        if typing.get_origin(tp) is list or tp is list:  # each element to the list's element type (default str)
            element = (typing.get_args(tp) or (str,))[0]
            return [coerce(v, element, name) for v in (value if isinstance(value, (list, tuple)) else [value])]
    except (TypeError, ValueError):
        raise TransferkitError(f"option '{name}' expects {getattr(tp, '__name__', tp)}, got {value!r}",
                               "fix the value on the command line or in the --config file") from None
    return value


def build(cls: type, options: dict[str, Any]) -> Any:
    """Instantiate option dataclass ``cls`` from the subset of ``options`` it owns (consumed from the dict); a value
    of the wrong type is a TransferkitError naming its flag (``--batch-size``)."""
    register_option_class(cls)
    kwargs = {}
    for f in option_fields(cls):
        if f.name in options:
            kwargs[f.name] = coerce(options.pop(f.name), field_base_type(f), "--" + f.name.replace("_", "-"))
    return cls(**kwargs)


def split_list(values: Any) -> list[str] | None:
    """A list option given as comma-separated text (``"a,b"``, as ``--backbones a,b``), one value, or a list of
    either (a repeated flag), as one list of stripped texts; None when empty."""
    if values is None:
        return None
    if not isinstance(values, (list, tuple)):
        values = [values]
    parts = [p.strip() for v in values for p in str(v).split(",") if p.strip()]
    return parts or None


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TransferkitError(f"config file '{path}' does not exist", "check the path given to --config")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TransferkitError(f"config file '{path}' is not valid YAML ({str(exc).splitlines()[0]})",
                               "fix the file's syntax") from None
    if not isinstance(content, dict):
        raise TransferkitError(f"config file '{path}' must hold a mapping of option: value",
                               "write it as lines like `strategy: finetune`")
    return {str(k).replace("-", "_"): v for k, v in content.items()}


# --- durations --------------------------------------------------------------------------------------------------

_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int, option: str = "--time-budget") -> float:
    """Seconds from ``600``, ``600s``, ``10m``, ``1.5h`` (a bare number is seconds); must be above 0."""
    import math
    import re

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", str(text).lower())
        if match is None:
            raise TransferkitError(f"invalid {option} '{text}'", "write seconds or a duration such as 600, 600s, "
                                   "10m or 1h")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or ""]
    if not math.isfinite(seconds) or seconds <= 0:
        raise TransferkitError(f"invalid {option} '{text}': it must be above 0", "pass e.g. 10m")
    return seconds
