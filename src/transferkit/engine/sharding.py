"""Splitting a list of items across the processes of a ``torchrun`` / ``accelerate launch`` job (Accelerate).

Process ``r`` of ``W`` computes the ``r``-th of ``W`` contiguous, non-overlapping slices of the items; the slices
are gathered in process order, so every process gets each item's result exactly once, in item order (no padding,
unlike a distributed sampler's even batches: nothing to de-duplicate). One process: the plain computation.
Writing the merged result is the caller's job, on the main process only (:func:`is_main_process`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


def launched_processes() -> Any:
    """Accelerate's process state under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    state = launched_processes()
    return state is None or state.is_main_process


def shard_bounds(n_items: int, n_processes: int) -> np.ndarray:
    """``n_processes + 1`` boundaries of contiguous slices of ``range(n_items)`` whose sizes differ by at most 1."""
    return np.linspace(0, n_items, n_processes + 1).astype(int)


def sharded_slices(compute: Callable[[int, int], T], n_items: int, what: str = "items") -> list[T]:
    """``[compute(start, end)]`` of this process's slice, gathered from every process in order (one process:
    ``[compute(0, n_items)]``)."""
    state = launched_processes()
    if state is None or state.num_processes == 1:
        return [compute(0, n_items)]
    from accelerate.utils import gather_object

    bounds = shard_bounds(n_items, state.num_processes)
    start, end = int(bounds[state.process_index]), int(bounds[state.process_index + 1])
    mine = compute(start, end)
    logger.info("process %d of %d embedded %s %d-%d of %d", state.process_index, state.num_processes, what, start,
                end, n_items)
    return gather_object([mine])


def sharded(compute: Callable[[Sequence[Any]], np.ndarray], items: Sequence[Any]) -> np.ndarray:
    """``compute(items)`` (one row per item, an array) split across launched processes; every process gets all
    rows, in item order (equal to one process's result up to floating-point batching effects)."""
    parts = sharded_slices(lambda start, end: compute(items[start:end]), len(items))
    return parts[0] if len(parts) == 1 else np.concatenate(parts).astype(np.float32, copy=False)
