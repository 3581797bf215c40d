"""Helpers for the training tests: small configs on a shared cache, and a multi-process worker.

The worker is run by the DeepSpeed launcher with two CPU processes (gloo)::

    deepspeed --num_gpus 2 tests/train_helpers.py <cache_dir> <out_root> <result.json>

and trains several short scenarios in one process group (ZeRO-0, ZeRO-2, ZeRO-3, ZeRO-3 with activation
checkpointing, a non-finite loss on one rank), writing each rank's per-step losses to ``result.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Small and fast: a few hundred generated samples, small batches, no periodic eval, no progress bar.
SMALL = [
    "data.synthetic.num_pairs=192",
    "data.synthetic.num_docs=48",
    "data.synthetic.num_val_pairs=16",
    "data.pairs.batch_size=4",
    "data.documents.batch_size=2",
    "data.val.batch_size=4",
    "eval.every_steps=0",
    "eval.final_few_shot=false",
    "eval.num_generations=2",
    "eval.max_new_tokens=8",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.loss_curve=false",
    "logging.log_every=1000",
    "checkpoint.export=false",
    "optim.warmup_steps=0",  # runs of one or two steps (a warmup must end before run.max_steps)
]


TINY_RANDOM = ROOT / "configs" / "tiny-random.yaml"


def small_overrides(cache_dir: str | os.PathLike, output_dir: str | os.PathLike, *extra: str) -> list[str]:
    """Arguments after ``--config configs/tiny-random.yaml`` (see :func:`small_args`)."""
    return [f"data.cache_dir={cache_dir}", f"run.output_dir={output_dir}", *SMALL, *extra]


def small_args(cache_dir: str | os.PathLike, output_dir: str | os.PathLike, *extra: str) -> list[str]:
    """Command-line arguments of ``training/train.py`` for a small run on the tiny random bases."""
    return ["--config", str(TINY_RANDOM), *small_overrides(cache_dir, output_dir, *extra)]


def small_config(cache_dir, output_dir, *extra: str):
    from training.config import load_config

    return load_config(TINY_RANDOM, small_overrides(cache_dir, output_dir, *extra))


def run_training(config, nan_at_steps: tuple[int, ...] = (), nan_rank: int = 0, before_close=None):
    """Train to the end (or stop step) in this process; returns (result, trainer).

    ``nan_at_steps``: make the loss non-finite on rank ``nan_rank`` at these (1-based) steps.
    ``before_close(trainer)``: called after training, while the engine is still alive.
    """
    from training.trainer import Trainer

    trainer = Trainer(config)
    if nan_at_steps:
        inner = trainer._micro_step

        def poisoned():
            loss, *counts = inner()  # per-stream losses, samples, tokens, positions
            if trainer.step + 1 in nan_at_steps and trainer.ctx.rank == nan_rank:
                loss = loss * float("nan")
            return (loss, *counts)

        trainer._micro_step = poisoned
    try:
        result = trainer.fit()
        if before_close is not None:
            before_close(trainer)
    finally:
        trainer.close()
    return result, trainer


ZERO = {i: f"run.deepspeed=configs/deepspeed/zero{i}.json" for i in range(4)}
SCENARIOS = {
    "zero0": [ZERO[0]],
    "zero2": [ZERO[2]],
    # also: held-out evaluation with few-shot generation, checkpoint and export, all under ZeRO-3
    "zero3": [ZERO[3], "eval.every_steps=4", "checkpoint.export=true"],
    "zero3_ckpt": [ZERO[3], "model.activation_checkpointing=true"],
    "zero3_resumed": [ZERO[3]],  # stopped at step 2, then resumed by a new trainer
    "zero2_nan_rank1": [ZERO[2]],  # non-finite loss at step 2 on rank 1 only
}
WORKER_STEPS = 4


def param_checksum(model) -> float:
    """Sum of all parameters (gathered first under ZeRO-3: collective then)."""
    from contextlib import nullcontext

    import torch

    params = list(model.parameters())
    gather = nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather, torch.no_grad():
        return float(sum(p.double().sum() for p in params))


def worker(cache_dir: str, out_root: str, result_path: str) -> None:
    import torch.distributed as dist

    results = {}
    for name, extra in SCENARIOS.items():
        out = Path(out_root) / name
        base = (f"run.max_steps={WORKER_STEPS}", "checkpoint.every_steps=0", *extra)
        checksum: dict[str, float] = {}

        def before_close(trainer, checksum=checksum):
            checksum["value"] = param_checksum(trainer.model)

        losses = {}
        if name == "zero3_resumed":
            first, _ = run_training(small_config(cache_dir, out, *base, "checkpoint.stop_at_step=2"))
            losses.update(first.losses)
        nan_steps = (2,) if name.endswith("nan_rank1") else ()
        result, trainer = run_training(
            small_config(cache_dir, out, *base), nan_at_steps=nan_steps, nan_rank=1, before_close=before_close
        )
        losses.update(result.losses)
        results[name] = {
            "losses": {str(k): v for k, v in losses.items()},
            "start_step": result.start_step,
            "nonfinite_total": trainer.nonfinite_total,
            "world_size": trainer.ctx.world_size,
            "zero_stage": trainer.zero_stage,
            "param_checksum": checksum["value"],
            "export_dir": str(result.export_dir) if result.export_dir else None,
            "eval_loss": result.eval_loss,
        }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps(gathered))
    # Every rank waits for the file, then the process group ends before the interpreter does: a gloo group left
    # alive at exit aborts some processes ("terminate called without an active exception"), and the launcher
    # then kills the others, sometimes before rank 0 has written its file.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    worker(*args)
