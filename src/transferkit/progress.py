"""Progress bars on stderr, only where a person watches (a terminal), never in logs or pipes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled(enabled: bool = True) -> bool:
    if os.environ.get("TRANSFERKIT_PROGRESS", "").lower() in ("0", "false", "no", "off"):
        return False
    return enabled and sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, enabled: bool = True, **kwargs: Any) -> Iterable[T]:
    """``tqdm`` on stderr, disabled when stderr is not a terminal or TRANSFERKIT_PROGRESS=0."""
    return tqdm(iterable, desc=desc, leave=False, file=sys.stderr, disable=not progress_enabled(enabled),
                mininterval=0.5, dynamic_ncols=True, **kwargs)
