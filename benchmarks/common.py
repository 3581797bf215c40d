"""What every benchmark reports the same way: precision, the machine's measured GEMM peak, FLOPs of a step.

* ``precision_context(precision)``: ``fp32`` runs as built; ``bf16`` runs under ``torch.autocast`` (bf16 matrix
  multiplies, fp32 weights as the master copy and fp32 reductions), the same for every implementation.
* ``gemm_peak_gflops(precision)``: the rate of a large square matrix multiply of that precision, measured in the
  run itself, so "fraction of peak" refers to this machine under its current load.
* ``count_flops(fn)``: the FLOPs of one call, counted by ``torch.utils.flop_counter`` (matmuls, convolutions and
  attention; elementwise work is not counted, as is usual).
* ``maybe_compile(model, enabled)``: ``torch.compile`` in place (``nn.Module.compile``), so parameter names stay.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable

import torch

PRECISIONS = ("fp32", "bf16")


def precision_context(precision: str, device: str = "cpu"):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def gemm_peak_gflops(precision: str, size: int = 4096, repeats: int = 5, device: str = "cpu") -> float:
    """Best rate (GFLOP/s) of ``size x size @ size x size`` in ``precision`` (bf16 inputs, as autocast runs them)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def _flop_counter(fn: Callable[[], object], frozen: Iterable[torch.nn.Module]):
    """The ``FlopCounterMode`` that watched one call of ``fn``. The parameters of ``frozen`` stop requiring grad
    while it counts (under ``no_grad`` the counter's module hooks cannot attach to a leaf that requires grad)."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for m in frozen for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for p in params:
            p.requires_grad_(True)
    return counter


def count_flops(fn: Callable[[], object], frozen: Iterable[torch.nn.Module] = ()) -> int:
    """FLOPs of ``fn()``. Under ``no_grad``, pass the models as ``frozen``."""
    return int(_flop_counter(fn, frozen).get_total_flops())


def matmul_flops(fn: Callable[[], object], frozen: Iterable[torch.nn.Module] = ()) -> int:
    """FLOPs of ``fn()`` in matrix multiplies alone (mm/addmm/bmm; attention kernels and convolutions excluded)."""
    aten = torch.ops.aten
    gemm = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}
    counts = _flop_counter(fn, frozen).get_flop_counts()["Global"]
    return int(sum(n for op, n in counts.items() if op in gemm))


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    if enabled:
        model.compile()
    return model


def rate_rows(seconds: dict[str, float], flops: int, peak_gflops: float, ours: str = "ours") -> dict[str, dict]:
    """Per implementation: seconds, GFLOP/s, fraction of the measured peak, and speed relative to the fastest peer
    (for ``ours``) or to ``ours`` (for a peer)."""
    peers = {k: v for k, v in seconds.items() if k != ours}
    fastest_peer = min(peers.values()) if peers else None
    rows = {}
    for name, s in seconds.items():
        gflops = flops / s / 1e9
        row = {"seconds": s, "gflops": gflops, "fraction_of_peak": gflops / peak_gflops}
        if name == ours and fastest_peer is not None:
            row["speedup_vs_fastest_peer"] = fastest_peer / s
        elif name != ours and ours in seconds:
            row["ours_speedup"] = s / seconds[ours]
        rows[name] = row
    return rows


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def gemm_share(fn: Callable[[], object], flops: int) -> dict[str, float]:
    """Profile one call of ``fn``: the seconds its matrix multiplies take (``GEMM_OPS``, self time), the whole
    call's seconds, and the rate the GEMMs reach (``flops`` / GEMM seconds: attention kernels are not GEMMs here,
    so pass the FLOPs of the matmuls alone for a rate, or read ``gemm_seconds`` as the bound it is).

    ``gemm_seconds`` is what no implementation of the same model can avoid at that rate: the step cannot take less."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    total = time.perf_counter() - t
    gemm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / 1e6
    return {
        "step_seconds": total,
        "gemm_seconds": gemm,
        "gemm_fraction": gemm / total,
        "gemm_gflops": flops / gemm / 1e9,
    }
