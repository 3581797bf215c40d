"""DeepSpeed configuration and engine creation.

The ZeRO JSON files (``configs/deepspeed/zero{0,1,2,3}.json``) hold only DeepSpeed's own settings (ZeRO stage,
buckets, communication); the values the training config owns -- batch sizes, gradient accumulation, clipping,
precision, optimizer and schedule -- are filled in here, and setting them in the JSON is an error (one source of
truth). The optimizer is a torch AdamW built by :mod:`training.optim` and handed to DeepSpeed, so no DeepSpeed op
has to be compiled on CPU. The learning-rate schedule is stepped by the trainer (not by DeepSpeed), only on steps
that were applied.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, TrainConfig

OWNED_KEYS = {
    "train_batch_size": "data.*.batch_size",
    "train_micro_batch_size_per_gpu": "data.*.batch_size",
    "gradient_accumulation_steps": "optim.grad_accum_steps",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim",
    "scheduler": "optim.schedule",
    "bf16": "run.precision",
    "bfloat16": "run.precision",
    "fp16": "run.precision",
    "amp": "run.precision",
}

# Every top-level key DeepSpeed 0.19's config reads (``DeepSpeedConfig``; tests/test_train_config.py records what
# the installed DeepSpeed reads and checks that it is here). DeepSpeed ignores any other key, so a typo such as
# "zero_optimisation" would silently run ZeRO stage 0: here it is an error.
DEEPSPEED_KEYS = frozenset(
    {
        *OWNED_KEYS,
        *("activation_checkpointing", "aio", "autotuning", "checkpoint", "comet", "comms_logger"),
        *("communication_data_type", "compile", "compression_training", "csv_monitor", "curriculum_learning"),
        *("data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt", "disable_allgather"),
        *("disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel", "flops_profiler"),
        *("gradient_allreduce_op", "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level"),
        *("managed_gradient_accumulation", "memory_breakdown", "nebula", "pipeline", "prescale_gradients"),
        *("progressive_layer_drop", "quantize_training", "seq_parallel_communication_data_type"),
        *("sequence_parallel_size", "sparse_attention", "sparse_gradients", "steps_per_print", "tensor_parallel"),
        *("tensorboard", "timers", "torch_autocast", "use_data_before_expert_parallelism", "vocabulary_size"),
        *("wall_clock_breakdown", "wandb", "weight_quantization", "zero_allow_untested_optimizer"),
        *("zero_force_ds_cpu_optimizer", "zero_optimization"),
    }
)


def load_deepspeed_json(path: Path) -> dict[str, Any]:
    """Read and check a DeepSpeed JSON (errors name the file and the key)."""
    if not path.is_file():
        raise ConfigError(f"run.deepspeed: DeepSpeed config {str(path)!r} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"run.deepspeed: {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"run.deepspeed: {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    for key in data:
        if key not in DEEPSPEED_KEYS:
            close = difflib.get_close_matches(key, sorted(DEEPSPEED_KEYS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of {sorted(DEEPSPEED_KEYS)}"
            raise ConfigError(
                f"run.deepspeed: {str(path)!r} sets {key!r}, which is no DeepSpeed setting (DeepSpeed would ignore "
                f"it); {hint}"
            )
    for key, owner in OWNED_KEYS.items():
        if key in data:
            raise ConfigError(
                f"run.deepspeed: {str(path)!r} sets {key!r}, which the training config owns ({owner}); remove it"
            )
    zero = data.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"run.deepspeed: {str(path)!r}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return data


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_deepspeed_config(config: TrainConfig, base: dict[str, Any]) -> dict[str, Any]:
    """The full DeepSpeed config: the JSON's settings plus what the training config owns."""
    streams = [s for s in (config.data.pairs, config.data.documents, config.data.episodes) if s is not None]
    out = dict(base)
    out.update(
        {
            # DeepSpeed only uses the micro-batch size for bookkeeping here: batches come from our loaders.
            "train_micro_batch_size_per_gpu": streams[0].batch_size,
            "gradient_accumulation_steps": config.optim.grad_accum_steps,
            "gradient_clipping": config.optim.grad_clip,
            "bf16": {"enabled": config.run.precision == "bf16"},
            # The optimizer is torch AdamW (see training.optim), which ZeRO supports; DeepSpeed's allow-list
            # checks the exact class, and ours is a subclass that can skip a step.
            "zero_allow_untested_optimizer": True,
        }
    )
    out.setdefault("steps_per_print", 2**31 - 1)  # progress is reported by the trainer
    out.setdefault("wall_clock_breakdown", False)
    return out


def initialize_engine(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]):
    """``deepspeed.initialize`` with our optimizer; returns the engine (it also wraps/holds the optimizer)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if ds_config.get("bf16", {}).get("enabled"):
        keep_frozen_batch_norm_fp32(engine.module)
    return engine


def keep_frozen_batch_norm_fp32(model: nn.Module) -> int:
    """Frozen BatchNorm layers (a convolutional vision tower) back to fp32 after DeepSpeed's bf16 cast.

    DeepSpeed casts parameters to bf16 but keeps buffers in fp32, and batch norm cannot mix a bf16 weight with
    fp32 running statistics; with all of them in fp32 it takes bf16 inputs and returns bf16. Trainable BatchNorm
    layers are left to DeepSpeed (its optimizer holds their bf16 parameters). Returns the number of layers kept.
    """
    kept = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.float()
            kept += 1
    return kept
