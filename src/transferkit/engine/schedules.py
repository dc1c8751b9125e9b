"""Learning-rate schedules as multipliers of each parameter group's base learning rate."""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("cosine", "constant", "plateau", "noam", "annealing")


def warmup_cosine(total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``final_fraction`` at ``total_steps``."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def warmup_constant(warmup_steps: int = 0) -> Callable[[int], float]:
    """Linear warm-up, then the base learning rate (also used before a halve-on-plateau schedule)."""

    def factor(step: int) -> float:
        return (step + 1) / warmup_steps if warmup_steps > 0 and step < warmup_steps else 1.0

    return factor


def noam(d_model: int, warmup_steps: int = 4000) -> Callable[[int], float]:
    """The Transformer schedule (Vaswani et al. 2017): ``d^-0.5 * min(step^-0.5, step * warmup^-1.5)``.

    Steps count from 1; use it with a base learning rate of 1.0 (the formula sets the scale).
    """
    warmup_steps = max(1, warmup_steps)

    def factor(step: int) -> float:
        s = step + 1
        return d_model**-0.5 * min(s**-0.5, s * warmup_steps**-1.5)

    return factor


def inverse_annealing(total_steps: int, warmup_steps: int = 0, alpha: float = 10.0,
                      beta: float = 0.75) -> Callable[[int], float]:
    """The DANN paper's schedule (Ganin & Lempitsky 2015): ``mu_p = mu_0 / (1 + alpha p)^beta`` with the training
    progress ``p`` going from 0 to 1 (alpha 10, beta 0.75), after an optional linear warm-up."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, step / total_steps)
        return (1 + alpha * progress) ** -beta

    return factor
