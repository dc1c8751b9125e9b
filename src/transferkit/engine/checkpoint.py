"""The trainer's checkpoint without pickle: one safetensors file, tensors in its body, the rest as JSON in its header.

``trainer.safetensors`` holds, under prefixed names, the model + objectives (``loss_module/``), the optimizer's
state tensors (``optimizer/<param id>/<name>``) and the best epoch's weights (``best_state/``); its metadata entry
``transferkit`` is a JSON document with everything else: epoch, step, history, early-stopping counters, the
optimizer's parameter groups and every RNG state (Python, NumPy, torch CPU and each CUDA device:
``placement.rng_states``). One file, so writing it (temporary name + ``os.replace``) is atomic.

Reading it never executes code: safetensors holds only tensors and strings. A file that is not a transferkit
checkpoint (a pickle renamed, a truncated file, other keys) is refused with one line, and so is a
``checkpoint.pt`` written by an earlier version (a pickle: never loaded).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from transferkit.errors import TransferkitError
from transferkit.rundir import write_safetensors

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "trainer.safetensors"
LEGACY_CHECKPOINT_NAME = "checkpoint.pt"  # pickled by transferkit <= 0.1 (torch.save): refused, never loaded
FORMAT = "transferkit-trainer-checkpoint"
FORMAT_VERSION = 1
_METADATA_KEY = "transferkit"
_RESTART = "the run must be restarted: pass --overwrite (or delete the staging folder)"


def checkpoint_file(folder: str | Path) -> Path:
    return Path(folder) / CHECKPOINT_NAME


def has_checkpoint(folder: str | Path | None) -> bool:
    """True if ``folder`` holds a trainer checkpoint (of this version or an earlier, refused one)."""
    return folder is not None and any((Path(folder) / name).exists()
                                      for name in (CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME))


def refuse_legacy(folder: str | Path) -> None:
    legacy = Path(folder) / LEGACY_CHECKPOINT_NAME
    if legacy.exists():
        raise TransferkitError(f"'{legacy}' was written by an earlier transferkit version in a format that is not "
                               "read any more (pickle)", _RESTART)


# --- optimizer state ---------------------------------------------------------------------------------------------


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``optimizer.state_dict()`` as (JSON-able dict, tensors named ``<param id>/<name>``)."""
    plain: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for pid, values in state["state"].items():
        plain[str(pid)] = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{name}"] = value
            else:
                plain[str(pid)][name] = value
    return {"state": plain, "param_groups": state["param_groups"]}, tensors


def join_optimizer_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor],
                         current: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_optimizer_state`; tuples (e.g. Adam's betas) come back as in ``current``."""
    state: dict[int, dict[str, Any]] = {int(pid): dict(values) for pid, values in plain["state"].items()}
    for key, tensor in tensors.items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = tensor
    groups = []
    for saved, now in zip(plain["param_groups"], current["param_groups"]):
        groups.append({k: tuple(v) if isinstance(now.get(k), tuple) and isinstance(v, list) else v
                       for k, v in saved.items()})
    if len(groups) != len(current["param_groups"]):
        raise ValueError(f"{len(plain['param_groups'])} parameter groups saved, {len(current['param_groups'])} now")
    return {"state": state, "param_groups": groups}


# --- the file ----------------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    from transferkit.rundir import json_default

    return json_default(value)


def save_checkpoint(path: str | Path, sections: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
    """Write tensors (``sections``: prefix -> {name: tensor}) and the JSON ``state`` atomically to ``path``."""
    path = Path(path)
    tensors = {f"{prefix}/{name}": value.detach().cpu().clone().contiguous()  # clone: no shared storage
               for prefix, group in sections.items() for name, value in group.items()}
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "sections": sorted(sections), **state}
    metadata = {_METADATA_KEY: json.dumps(document, default=_json_default)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensors, metadata)  # atomic: an interruption leaves the previous checkpoint intact


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(sections of tensors, JSON state) of a checkpoint written by :func:`save_checkpoint`; anything else is
    refused with one line (nothing in the file is executed)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    refuse_legacy(path.parent)

    def bad(why: str) -> TransferkitError:
        return TransferkitError(f"'{path}' is not a usable transferkit checkpoint ({why})", _RESTART)

    try:
        with safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise bad(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}") from None
    try:
        state = json.loads(metadata[_METADATA_KEY])
    except (KeyError, ValueError):
        raise bad("no transferkit state in its header") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise bad("another format")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise TransferkitError(f"'{path}' was written by a newer transferkit", "upgrade transferkit to resume it")
    sections: dict[str, dict[str, torch.Tensor]] = {name: {} for name in state.get("sections", [])}
    for key, value in tensors.items():
        prefix, _, name = key.partition("/")
        if prefix not in sections:
            raise bad(f"unexpected tensor '{key}'")
        sections[prefix][name] = value
    return sections, state


def read_section(folder: str | Path, section: str) -> dict[str, torch.Tensor]:
    """One section of tensors of the checkpoint in ``folder`` (e.g. for a strategy that must restore a buffer
    before the engine builds its optimiser)."""
    sections, _ = load_checkpoint(checkpoint_file(folder))
    return sections.get(section, {})


def corrupt(path: Path, why: str) -> TransferkitError:
    """The error for a checkpoint that reads but does not fit the run (other keys, shapes, groups)."""
    return TransferkitError(f"the checkpoint '{path}' does not fit this run ({why})", _RESTART)
