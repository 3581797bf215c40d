"""Process-group setup for CPU (gloo) and CUDA (nccl) with the same code, and small collective helpers.

Launched by ``deepspeed training/train.py`` (or torchrun), the rank and world size come from the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); run as a plain ``python training/train.py`` they
default to a single process. DeepSpeed picks its accelerator when it is first imported, so ``DS_ACCELERATOR``
is set here (``cpu`` or ``cuda``) before that import.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from .config import ConfigError, RunConfig

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(run: RunConfig) -> str:
    """ "cpu" or "cuda"; asking for CUDA on a machine without it is an error (raised before any work)."""
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "run.device: 'cuda' was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); use run.device=cpu or run.device=auto"
        )
    if run.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return run.device


def cpu_bf16_features() -> list[str]:
    """The CPU's native bf16 features (``amx_bf16``, ``avx512_bf16``) as Linux lists them; [] where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [name for name in ("amx_bf16", "avx512_bf16") if name in flags]
    except OSError:
        pass
    return []


def resolve_precision(run: RunConfig, device: str) -> tuple[str, str]:
    """("fp32" | "bf16", why). ``auto`` takes bf16 where the device computes it natively, fp32 elsewhere."""
    if run.precision != "auto":
        return run.precision, "set by run.precision"
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU computes bf16 natively"
        return "fp32", "auto: the GPU has no native bf16"
    features = cpu_bf16_features()
    if features:
        return "bf16", f"auto: the CPU has {' and '.join(features)}"
    return "fp32", "auto: the CPU has no native bf16 (no amx_bf16 / avx512_bf16)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def setup_distributed(run: RunConfig) -> DistContext:
    """Initialise (once per process) the default process group through DeepSpeed and return this process's place."""
    device_type = resolve_device(run)
    expected = "cuda" if device_type == "cuda" else "cpu"
    current = os.environ.setdefault("DS_ACCELERATOR", expected)
    if current != expected:
        raise ConfigError(f"DS_ACCELERATOR={current!r} in the environment contradicts run.device={run.device!r}")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # plain `python training/train.py`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if run.num_threads is not None and device_type == "cpu":
        torch.set_num_threads(run.num_threads)

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != expected:
        raise ConfigError(
            f"DeepSpeed was imported with the {name!r} accelerator but run.device needs {expected!r}; "
            "set DS_ACCELERATOR before anything imports deepspeed"
        )
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo", auto_mpi_discovery=False)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(
            f"process group has rank {dist.get_rank()} of {dist.get_world_size()}, environment says {rank} of {world_size}"
        )
    return DistContext(rank, world_size, local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small float64 tensor over ranks (on CPU for gloo, on the current device for nccl)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
    out = values.to(device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def broadcast_object(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 first (e.g. to write a cache), then on the other ranks (to read it).

    A failure on rank 0 is raised on every rank instead of leaving the others waiting."""
    if ctx.world_size == 1:
        return fn()
    if ctx.is_main:
        try:
            result = fn()
        except Exception as e:
            broadcast_object(f"{type(e).__name__}: {e}")
            raise
        broadcast_object(None)
        return result
    error = broadcast_object(None)
    if error is not None:
        raise RuntimeError(f"rank 0 failed while preparing shared files: {error}")
    return fn()
