"""``transferkit`` command line. Each subcommand lives in its own module with ``register(subparsers)``; the
module sets ``func`` on its parser.

The error boundary of every command is :func:`main`. Exit codes: 0 done; 2 bad input (a TransferkitError, an
``OSError`` such as a missing path, a read-only folder or a full disk, ``MemoryError``, a damaged file, a bad
flag): one line ``error: <problem>. <fix>.`` on stderr, no traceback, and with ``--json`` also one JSON document
``{"error": ..., "fix": ...}`` on stdout; 130 interrupted (Ctrl-C); 1 an unexpected exception, i.e. a bug in
transferkit: one line, and its traceback with ``-v``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
import traceback

from transferkit import __version__
from transferkit.console import setup_logging
from transferkit.errors import TransferkitError, from_memory_error, from_os_error, os_error_in

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
    "transferkit.cli.serve",
    "transferkit.cli.auto",
    "transferkit.cli.selftaught",
]


class UsageError(Exception):
    """A command-line syntax error (unknown flag, invalid int, missing argument), raised instead of argparse's
    usage block + exit, so that :func:`main` prints one short usage line and the error."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.usage = short_usage(parser)
        self.prog = parser.prog


class Parser(argparse.ArgumentParser):
    """argparse with :class:`UsageError` instead of printing the whole usage (subcommand parsers inherit it)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self, message)


def _metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, str):
        return action.metavar
    if action.choices and not action.option_strings:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _format_action(action: argparse.Action) -> str:
    name = _metavar(action)
    if action.option_strings:
        return action.option_strings[0] + ("" if action.nargs == 0 else f" {name}")
    return {"+": f"{name} [{name} ...]", "*": f"[{name} ...]", "?": f"[{name}]"}.get(action.nargs, name)


def short_usage(parser: argparse.ArgumentParser) -> str:
    """One line: the command, its required arguments, ``[options]``."""
    grouped = {id(a) for g in parser._mutually_exclusive_groups for a in g._group_actions}
    parts = [_format_action(a) for a in parser._actions
             if id(a) not in grouped and a.help is not argparse.SUPPRESS and (a.required or not a.option_strings)]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            parts.insert(0, "(" + " | ".join(_format_action(a) for a in group._group_actions) + ")")
    return " ".join(["usage:", parser.prog, *parts, "[options]"])


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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


def report_error(error: TransferkitError, as_json: bool = False) -> int:
    """Print ``error`` as one line on stderr (and, ``as_json``, one JSON document on stdout); returns exit code 2."""
    print(f"error: {error}", file=sys.stderr)
    if as_json:
        from transferkit.cli.options import print_json

        with contextlib.suppress(OSError):  # stdout closed: the line on stderr is all we can do
            print_json(error.to_json())
    return 2


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch reports a failed allocation as a RuntimeError (``torch.OutOfMemoryError`` on accelerators)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "cannot allocate memory" in text)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command inside the error boundary (see the module docstring)."""
    as_json = bool(getattr(args, "json", False))
    try:
        result = args.func(args)
    except TransferkitError as exc:
        return report_error(exc, as_json)
    except KeyboardInterrupt as exc:
        from transferkit.rundir import discarded_before_a_checkpoint, kept_for_resume

        hint = ": a checkpoint is kept; run the same command with --resume to continue" if kept_for_resume(exc) else ""
        if discarded_before_a_checkpoint(exc):
            hint = (" before the first checkpoint (one is written after every epoch, in cross-validation folds "
                    "too): nothing was kept; run the command again")
        if getattr(exc, "transferkit_hint", None):  # a command that continues in its own way (compare)
            hint = f": {exc.transferkit_hint}"
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    except MemoryError as exc:
        return report_error(from_memory_error(exc), as_json)
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # the reader of our output went away (e.g. `| head`): nothing to report
            _silence_stdout()
            return 141
        return report_error(from_os_error(exc), as_json)
    except Exception as exc:
        if _is_out_of_memory(exc):
            return report_error(from_memory_error(), as_json)
        hidden = os_error_in(exc)  # e.g. safetensors' "No space left on device (os error 28)"
        if hidden is not None:
            return report_error(from_os_error(hidden), as_json)
        if args.verbose:
            traceback.print_exc()
        detail = " ".join(str(exc).split())[:300]
        print(f"error: internal error ({type(exc).__name__}: {detail}); this is a bug in transferkit: run again "
              "with -v for the traceback and report it", file=sys.stderr)
        if as_json:
            from transferkit.cli.options import print_json

            print_json({"error": f"internal error ({type(exc).__name__}: {detail})",
                        "fix": "run again with -v for the traceback and report it"})
        return 1
    return int(result or 0)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc.usage, file=sys.stderr)
        return report_error(TransferkitError(exc.message, f"see `{exc.prog} --help`"), "--json" in argv)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    setup_logging(args.verbose, args.quiet)
    return run_command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
