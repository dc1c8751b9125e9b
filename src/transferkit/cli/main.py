"""``transferkit`` command line. Each subcommand lives in its own module with ``register(subparsers)``; the
module sets ``func`` on its parser. Bad input exits 2 with one line on stderr and no traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from transferkit import __version__
from transferkit.errors import TransferkitError

_COMMAND_MODULES = [
    "transferkit.cli.fit",
    "transferkit.cli.evaluate",
    "transferkit.cli.predict",
    "transferkit.cli.catalog",
    "transferkit.cli.demo",
    "transferkit.cli.peft_commands",
    "transferkit.cli.memory",
    "transferkit.cli.zeroshot",
    "transferkit.cli.sequence",
    "transferkit.cli.compare",
    "transferkit.cli.auto",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transferkit",
        description="Adapt pretrained models to small datasets and measure how well it worked.",
    )
    parser.add_argument("--version", action="version", version=f"transferkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    parser.add_argument("-q", "--quiet", action="store_true", help="Only warnings and errors on stderr.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced after set-up)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("transferkit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transferkit.progress import progress_enabled

    if not progress_enabled():  # no terminal: also silence the Hugging Face libraries' own bars (read at import)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("transformers", "accelerate", "sentence_transformers", "timm", "peft", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    setup_logging(args.verbose, args.quiet)
    try:
        result = args.func(args)
    except TransferkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: a checkpoint is kept; run the same command with --resume to continue", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
