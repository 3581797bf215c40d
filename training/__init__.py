"""The main training job: Flamingo-style models with DeepSpeed (ZeRO 0-3) on CPU or CUDA.

    deepspeed training/train.py [--config configs/<name>.yaml] [key=value ...]

:class:`~training.config.TrainConfig` (``load_config``) describes a run; :class:`~training.trainer.Trainer` runs it.
Importing this package does not import DeepSpeed (its accelerator is chosen when the trainer starts).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "config",
    "TrainConfig": "config",
    "load_config": "config",
    "Trainer": "trainer",
    "TrainResult": "trainer",
    "NonFiniteLossError": "trainer",
    "load_exported": "modeling",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = sorted(_EXPORTS)  # noqa: F822 - resolved lazily by __getattr__
