"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cached(cache_dir: Path, name: str, compute: Callable[[], Any]) -> Any:
    """Return the JSON-cached result of ``compute`` under ``cache_dir/name.json``, computing it once, so an
    interrupted benchmark resumes with the cells it already finished."""
    path = cache_dir / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value
