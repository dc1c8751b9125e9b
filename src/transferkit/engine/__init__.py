"""The one training engine (Accelerate-based) and the objectives it minimises."""

from transferkit.engine.callbacks import Callback, TrainState
from transferkit.engine.objectives import CrossEntropyObjective, Objective, primary_logits
from transferkit.engine.sampling import EpochShuffleSampler
from transferkit.engine.trainer import (
    LossModule,
    TrainConfig,
    Trainer,
    TrainResult,
    classification_metrics,
    clone_module,
    default_forward,
    make_accelerator,
    seed_everything,
)

__all__ = [
    "Callback",
    "TrainState",
    "CrossEntropyObjective",
    "EpochShuffleSampler",
    "LossModule",
    "Objective",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "classification_metrics",
    "clone_module",
    "default_forward",
    "make_accelerator",
    "primary_logits",
    "seed_everything",
]
