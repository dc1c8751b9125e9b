"""Where a model runs and how batches get there: the one device-placement layer.

Every path that runs a model (training through Accelerate, feature extraction, evaluation, prediction, memory
embedding, zero-shot scoring, decoding) asks this module, never ``next(model.parameters()).device`` or a
hard-coded ``"cpu"``:

    device = resolve_device("auto")            # cuda (this process's GPU), mps or cpu; "cuda:1" is honoured
    place(model, device)                        # the model lives there from now on
    with inference(model) as device:            # eval mode + no_grad; the model's own device
        logits = model(to_device(batch, device))
    probabilities = to_numpy(logits.softmax(-1))   # always through .cpu()

``predict_batches`` wraps that loop for the common case (one output tensor per batch, concatenated as numpy).
This module imports only torch and numpy, so every layer (backbones included) may use it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def _error(problem: str, fix: str) -> Exception:
    from transferkit.errors import TransferkitError

    return TransferkitError(problem, fix)


def check_device_spec(spec: str) -> None:
    """Refuse a device spec that is malformed or names hardware this machine does not have."""
    if spec not in ("auto", "cpu", "cuda", "mps") and not (
            spec.startswith("cuda:") and spec[5:].isdigit()):
        raise _error(f"invalid --device {spec!r}", f"choose {DEVICE_CHOICES}")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise _error(f"invalid --device {spec!r}", "this machine has no CUDA device; use --device cpu or auto")
        if ":" in spec and int(spec[5:]) >= torch.cuda.device_count():
            raise _error(f"invalid --device {spec!r}", f"this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if spec == "mps" and not _mps_available():
        raise _error("invalid --device 'mps'", "this machine has no Apple GPU; use --device cpu or auto")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` of a spec: ``auto`` = this process's GPU (``LOCAL_RANK`` under torchrun), else the
    Apple GPU, else the CPU; ``cuda`` = this process's GPU; ``cuda:N``, ``mps``, ``cpu`` as written."""
    if isinstance(spec, torch.device):
        return spec
    spec = str(spec or "auto")
    check_device_spec(spec)
    if spec in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", _local_rank() % torch.cuda.device_count())
        return torch.device("mps" if spec == "auto" and _mps_available() else "cpu")
    return torch.device(spec)


def accelerator_kwargs(spec: str = "auto") -> dict[str, Any]:
    """Keyword arguments for ``Accelerator`` / ``PartialState`` that honour ``spec`` (call before creating them).

    Accelerate has no device argument: it runs on the CPU when asked (``cpu=True``) and otherwise on the current
    CUDA device of the process, so ``cuda:N`` is honoured by making N current. Under torchrun each process takes
    the GPU of its local rank, and a fixed ``cuda:N`` would put every process on one GPU: that is refused.
    """
    device = resolve_device(spec)
    if device.type == "cuda" and str(spec).startswith("cuda:"):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise _error(f"--device {spec} under a multi-process launch",
                         "use --device cuda or auto: each process takes the GPU of its local rank")
        torch.cuda.set_device(device)
    return {"cpu": device.type == "cpu"}


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module runs on: that of its first parameter (else buffer); CPU for a module with neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def place(module: torch.nn.Module, device: str | torch.device | None = None) -> torch.device:
    """Move ``module`` to ``device`` (a spec; None = leave it where it is); returns where it now runs."""
    if device is None:
        return module_device(module)
    target = resolve_device(device)
    module.to(target)
    return target


def to_device(batch: Any, device: str | torch.device) -> Any:
    """Move a tensor, or a (nested) dict / list / tuple of tensors, or an object with its own ``.to(device)`` (e.g.
    ``lower_maps.BelowInputs``), to ``device``; anything else as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if callable(getattr(batch, "to", None)) and not isinstance(batch, torch.nn.Module):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def synchronize(device: str | torch.device) -> None:
    """Wait until ``device`` has finished its queued work (GPUs run asynchronously), e.g. before reading a clock."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array, from any device (detached, through the CPU)."""
    return tensor.detach().cpu().numpy()


@contextmanager
def inference(module: torch.nn.Module, device: str | torch.device | None = None) -> Iterator[torch.device]:
    """Eval mode and no gradients for the block, on ``device`` (None: where the module is); yields that device.
    The module's train / eval mode is restored afterwards."""
    was_training = module.training
    target = place(module, device)
    module.eval()
    try:
        with torch.no_grad():
            yield target
    finally:
        module.train(was_training)


def predict_batches(module: torch.nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any],
                    device: str | torch.device | None = None) -> Any:
    """``forward(batch on the module's device)`` for every batch, in inference mode, concatenated as CPU numpy:
    one array, or a tuple of arrays when ``forward`` returns a tuple of tensors (None without batches). Each
    batch's outputs leave the device as soon as they are computed."""
    chunks = list(iter_predictions(module, batches, forward, device))
    if not chunks:
        return None
    if isinstance(chunks[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*chunks))
    return np.concatenate(chunks)


def iter_predictions(module: torch.nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any],
                     device: str | torch.device | None = None) -> Iterator[Any]:
    """:func:`predict_batches` one batch at a time: yields each batch's outputs as CPU numpy (for callers that
    write them out instead of holding them all)."""
    with inference(module, device) as target:
        for batch in batches:
            yield _outputs_to_numpy(forward(to_device(batch, target)))


def _outputs_to_numpy(outputs: Any) -> Any:
    return tuple(to_numpy(o) for o in outputs) if isinstance(outputs, (tuple, list)) else to_numpy(outputs)


# --- random number generators --------------------------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    """Every RNG a run draws from, as plain data (lists of ints), for a pickle-free checkpoint: Python's, numpy's,
    torch's CPU generator and, on a GPU machine, the generator of every CUDA device or of the Apple GPU (MPS)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [state.tolist() for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "mps": torch.mps.get_rng_state().tolist() if _mps_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what ``rng_states`` returned; CUDA states are restored when this machine has as many devices, the
    MPS state when it has an Apple GPU."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])
    mps = states.get("mps") or []
    if mps and _mps_available():
        torch.mps.set_rng_state(torch.tensor(mps, dtype=torch.uint8))


__all__ = ["DEVICE_CHOICES", "accelerator_kwargs", "check_device_spec", "inference", "module_device", "place",
           "predict_batches", "resolve_device", "rng_states", "set_rng_states", "synchronize", "to_device",
           "to_numpy"]
