"""argparse flags generated from option dataclasses, so the CLI and the Python API share one definition."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from transferkit.config import field_base_type, option_fields, register_option_class
from transferkit.console import format_table  # noqa: F401 (the CLI modules import it from here)
from transferkit.errors import TransferkitError, check_count, check_number


def _argument_type(name: str, check: Any) -> Any:
    """An argparse ``type=`` that runs ``check(text)``; its TransferkitError becomes argparse's one-line error."""

    def parse(text: str) -> Any:
        try:
            return check(text)
        except TransferkitError as exc:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {exc.fix}") from None

    parse.__name__ = name
    return parse


def count(minimum: int = 1, maximum: int | None = None) -> Any:
    """argparse ``type=``: a whole number in [minimum, maximum] (``--batch-size``, ``-k``, ``--epochs``, ...)."""

    def check(text: str) -> int:
        digits = text.strip().lstrip("+-")
        return check_count("value", int(text) if digits.isdigit() else text, minimum, maximum)

    return _argument_type("count", check)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Any:
    """argparse ``type=``: a finite number within the bounds (NaN and infinity refused)."""
    return _argument_type("number", lambda text: check_number("value", text, low, high, low_open=low_open,
                                                               high_open=high_open))


def duration() -> Any:
    """argparse ``type=``: a positive duration in seconds from ``600``, ``600s``, ``10m`` or ``1h``
    (:func:`transferkit.config.parse_duration`)."""
    from transferkit.config import parse_duration

    return _argument_type("duration", lambda text: parse_duration(text, "duration"))


def add_dataclass_options(parser: argparse.ArgumentParser | Any, cls: type, seen: set[str],
                          title: str | None = None, defaults: dict[str, Any] | None = None) -> None:
    """Add ``--<field>`` for every field of ``cls`` not already in ``seen`` (defaults suppressed, so only the
    flags a user typed reach the merged options and a ``--config`` file can fill the rest; ``defaults``: the
    command's own defaults, shown in the help instead of the dataclass's)."""
    register_option_class(cls)
    group = parser.add_argument_group(title) if title else parser
    for f in option_fields(cls):
        if f.name in seen:
            continue
        seen.add(f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not f.default_factory else None  # type: ignore[comparison-overlap]
        default = (defaults or {}).get(f.name, default)
        if default is not None and default != "":
            help_text += f" (default: {default})"
        tp = field_base_type(f)
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        elif tp in (int, float, str):
            group.add_argument(flag, dest=f.name, type=tp, default=argparse.SUPPRESS, help=help_text,
                               metavar=f.name.upper())
        else:  # lists: repeatable flag
            group.add_argument(flag, dest=f.name, action="append", default=argparse.SUPPRESS, help=help_text,
                               metavar=f.name.upper())


def add_fit_options(parser: argparse.ArgumentParser, seen: set[str], fit_title: str) -> None:
    """Every option of ``fit``: data/backbone/output, the training engine, each strategy and each fit extension
    (``seen``: names already taken, e.g. by the command's own arguments)."""
    from transferkit.config import FitConfig
    from transferkit.engine.trainer import TrainConfig
    from transferkit.extensions import list_extensions
    from transferkit.strategies import list_strategies

    add_dataclass_options(parser, FitConfig, seen, fit_title)
    add_dataclass_options(parser, TrainConfig, seen, "training engine")
    for name, cls in list_strategies().items():
        add_dataclass_options(parser, cls.config_class, seen, f"strategy {name}")
    for name, ext in list_extensions().items():
        add_dataclass_options(parser, ext.config_class, seen, name)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` for commands that run a loaded model (resolved by ``transferkit.engine.placement``)."""
    parser.add_argument("--device", default="auto", help="Where the model runs: auto (this process's GPU if any, "
                                                         "else the CPU), cpu, cuda, cuda:N or mps (default: auto).")


def print_json(document: Any) -> None:
    """Exactly one strict JSON document on stdout (NaN as null, as in the files: ``rundir.json_text``)."""
    from transferkit.rundir import json_text

    sys.stdout.write(json_text(document, indent=2) + "\n")
    sys.stdout.flush()
