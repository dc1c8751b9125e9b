"""User-facing errors: one line that names the problem and the fix; the CLI turns them into exit code 2."""

from __future__ import annotations


class TransferkitError(Exception):
    """Bad input or configuration. The message is a single line: what is wrong, then how to fix it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        message = problem.rstrip(".") + "." + (f" {fix.rstrip('.')}." if fix else "")
        super().__init__(message.replace("\n", " "))
