"""Perceiver encoder benchmark: this project vs Hugging Face `PerceiverModel` vs `perceiver-pytorch`.

Part 1 (--part peers): forward+backward throughput on one configuration, peers timed interleaved in
one process (so a busy machine slows all alike), and peak memory of one training step, each measured
in a fresh subprocess as the growth of peak RSS over the RSS after the model was built.

Part 2 (--part scaling): time and peak memory of a training step versus input length M (1k..64k) with
fixed latents, next to a standard transformer encoder (torch.nn.TransformerEncoder) on the same
inputs; log-log slopes are fitted and a PNG plot + JSON + CSV are written.

    python benchmarks/bench_encoder.py                 # both parts, results in benchmarks/results/
    python benchmarks/bench_encoder.py --part peers --configs long-input --repeats 5
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PRECISIONS,
    count_flops,
    gemm_peak_gflops,
    gemm_share,
    matmul_flops,
    maybe_compile,
    precision_context,
    rate_rows,
)

RESULTS = Path(__file__).resolve().parent / "results"

# Named configurations; every implementation gets the same one. (batch, input length M, model sizes)
_BASE = dict(num_latents=256, latent_channels=512, cross_heads=1, self_heads=8)
PEER_CONFIGS = {
    # latent transformer dominates: matmul-bound, all implementations do the same GEMMs
    "latent-heavy": dict(_BASE, batch=4, length=4096, input_channels=64, self_attends=6, widening=4),
    # long input: the cross-attention over M dominates, where fused attention pays off
    "long-input": dict(_BASE, batch=2, length=32768, input_channels=64, self_attends=2, widening=1),
    # 128x128 image with 64-band Fourier features (261 channels) as raw-pixel Perceiver input
    "image-128-fourier": dict(_BASE, batch=2, length=16384, input_channels=261, self_attends=2, widening=1),
}
DEFAULT_CONFIGS = list(PEER_CONFIGS)
# a smoke-test size (tests/test_benchmarks.py), not part of the default run
PEER_CONFIGS["tiny"] = dict(num_latents=8, latent_channels=32, cross_heads=1, self_heads=2, batch=2, length=64,
                            input_channels=16, self_attends=1, widening=1)  # fmt: skip


def build(impl: str, cfg: dict) -> nn.Module:
    """A Perceiver encoder that maps (B, M, C) -> (B, N, D) latents, for each implementation."""
    if impl == "ours":
        from perceiver import EncoderConfig, PerceiverEncoder

        return PerceiverEncoder(
            EncoderConfig(
                num_input_channels=cfg["input_channels"],
                num_latents=cfg["num_latents"],
                num_latent_channels=cfg["latent_channels"],
                num_cross_attention_heads=cfg["cross_heads"],
                num_self_attention_heads=cfg["self_heads"],
                num_self_attends_per_block=cfg["self_attends"],
                cross_attention_widening_factor=cfg["widening"],
                self_attention_widening_factor=cfg["widening"],
            )
        )
    if impl == "hf":
        from transformers import PerceiverConfig, PerceiverModel

        hf = PerceiverModel(
            PerceiverConfig(
                d_model=cfg["input_channels"],
                num_latents=cfg["num_latents"],
                d_latents=cfg["latent_channels"],
                num_cross_attention_heads=cfg["cross_heads"],
                num_self_attention_heads=cfg["self_heads"],
                num_self_attends_per_block=cfg["self_attends"],
                cross_attention_widening_factor=cfg["widening"],
                self_attention_widening_factor=cfg["widening"],
                attention_probs_dropout_prob=0.0,
            )
        )

        class HF(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = hf

            def forward(self, x):
                return self.model(inputs=x).last_hidden_state

        return HF()
    if impl == "perceiver-pytorch":
        from perceiver_pytorch import Perceiver

        return Perceiver(
            num_freq_bands=1,
            max_freq=1.0,
            depth=1,
            input_channels=cfg["input_channels"],
            input_axis=1,
            num_latents=cfg["num_latents"],
            latent_dim=cfg["latent_channels"],
            cross_heads=cfg["cross_heads"],
            cross_dim_head=cfg["input_channels"] // cfg["cross_heads"],  # qk width = input width, as ours/HF
            latent_heads=cfg["self_heads"],
            latent_dim_head=cfg["latent_channels"] // cfg["self_heads"],
            self_per_cross_attn=cfg["self_attends"],
            fourier_encode_data=False,
            final_classifier_head=False,
        )
    if impl == "transformer":
        layer = nn.TransformerEncoderLayer(
            cfg["input_channels"],
            cfg["transformer_heads"],
            cfg["widening"] * cfg["input_channels"],
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        return nn.TransformerEncoder(layer, cfg["transformer_layers"], enable_nested_tensor=False)
    raise ValueError(f"unknown implementation {impl!r}")


def train_step(model: nn.Module, x: torch.Tensor, precision: str = "fp32") -> None:
    with precision_context(precision):
        out = model(x)
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def peak_rss_mib() -> float:
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from the parent's RSS at fork time.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure_memory(impl: str, cfg: dict, batch: int, length: int, precision: str = "fp32") -> float:
    """Peak RSS growth (MiB) of one training step, in a fresh interpreter."""
    here = str(Path(__file__).resolve().parent)
    code = (
        f"import json,sys,torch; sys.path.insert(0, {here!r}); import bench_encoder as b;"
        "torch.manual_seed(0); cfg=json.loads(sys.argv[1]); m=b.build(sys.argv[2], cfg);"
        f"x=torch.randn({batch}, {length}, cfg['input_channels']); base=b.current_rss_mib();"
        f"b.train_step(m, x, {precision!r}); print(b.peak_rss_mib()-base)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cfg), impl], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def time_steps(
    models: dict[str, nn.Module], x: torch.Tensor, repeats: int, precision: str = "fp32"
) -> dict[str, float]:
    """Median seconds per training step; implementations interleaved round by round."""
    for m in models.values():  # warm-up (twice: a compiled model compiles its backward on the first call)
        train_step(m, x, precision)
        train_step(m, x, precision)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in tqdm(range(repeats), desc="rounds", leave=False):
        for name, m in models.items():
            t = time.perf_counter()
            train_step(m, x, precision)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


IMPLS = ["ours", "hf", "perceiver-pytorch"]
REFERENCE = "hf"  # FLOPs of a step are counted on it


def run_peers(args) -> dict:
    impls = IMPLS
    peak = gemm_peak_gflops(args.precision, size=args.peak_size)
    print(
        f"measured {args.precision} GEMM peak ({args.peak_size}^3 matrix multiply): {peak:.0f} GFLOP/s, {torch.get_num_threads()} threads"
    )
    results = {}
    for name in args.configs:
        cfg = PEER_CONFIGS[name]
        torch.manual_seed(0)
        models = {k: build(k, cfg).train() for k in impls}
        params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        x = torch.randn(cfg["batch"], cfg["length"], cfg["input_channels"])
        flops = count_flops(functools.partial(train_step, models[REFERENCE], x, args.precision))
        for m in models.values():
            maybe_compile(m, args.compile)
        secs = time_steps(models, x, args.repeats, args.precision)
        gemm = {}
        if args.profile:  # where the time goes: the matrix multiplies every implementation shares, and the rest
            for k, m in models.items():
                step = functools.partial(train_step, m, x, args.precision)
                gemm[k] = gemm_share(step, matmul_flops(step))
        del models
        mem = {}
        if not args.no_memory:
            mem = {
                k: measure_memory(k, cfg, cfg["batch"], cfg["length"], args.precision)
                for k in tqdm(impls, desc="memory", leave=False)
            }
        rows = rate_rows(secs, flops, peak)
        fastest_peer = min(secs[k] for k in impls if k != "ours")
        results[name] = {
            "config": cfg,
            "precision": args.precision,
            "compile": args.compile,
            "threads": torch.get_num_threads(),
            "params": params,
            "flops_per_step": flops,
            "gemm_peak_gflops": peak,
            "seconds_per_step": secs,
            "gflops": {k: r["gflops"] for k, r in rows.items()},
            "fraction_of_peak": {k: r["fraction_of_peak"] for k, r in rows.items()},
            "peak_memory_mib": mem,
            "gemm_profile": gemm,
            "samples_per_second": {k: cfg["batch"] / s for k, s in secs.items()},
            "speedup_vs_fastest_peer": fastest_peer / secs["ours"],
        }
        if mem:
            results[name]["memory_ratio_vs_lowest_peer"] = mem["ours"] / min(mem[k] for k in impls if k != "ours")
        print(
            f"\n[{name}] forward+backward, {args.precision}{' compiled' if args.compile else ''}, batch {cfg['batch']}, "
            f"{cfg['length']} inputs x {cfg['input_channels']} channels, {cfg['num_latents']} x "
            f"{cfg['latent_channels']} latents, {cfg['self_attends']} self-attends, {torch.get_num_threads()} threads, "
            f"{flops / 1e9:.1f} GFLOP a step"
        )
        print(
            f"{'implementation':<20}{'params':>12}{'s/step':>10}{'GFLOP/s':>10}{'of peak':>9}{'peak MiB':>10}"
            f"{'ours faster by':>16}"
        )
        for k in impls:
            m_str = f"{mem[k]:>10.0f}" if mem else f"{'-':>10}"
            print(
                f"{k:<20}{params[k]:>12,}{secs[k]:>10.3f}{rows[k]['gflops']:>10.0f}{rows[k]['fraction_of_peak']:>8.0%}"
                f"{m_str}{secs[k] / secs['ours']:>15.2f}x"
            )
        for k, g in gemm.items():
            print(
                f"  {k}: matrix multiplies {g['gemm_seconds']:.3f} s of a {g['step_seconds']:.3f} s profiled step "
                f"({g['gemm_fraction']:.0%}) at {g['gemm_gflops']:.0f} GFLOP/s; the rest {g['step_seconds'] - g['gemm_seconds']:.3f} s"
            )
        line = f"ours vs fastest peer: {results[name]['speedup_vs_fastest_peer']:.2f}x the speed"
        if mem:
            line += f", {results[name]['memory_ratio_vs_lowest_peer']:.2f}x the peak memory of the leanest peer"
        print(line)
    return results


def plot_peers(results: dict, path: Path) -> None:
    """Bars: achieved GFLOP/s per configuration and implementation, the measured GEMM peak as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(IMPLS)
    for i, impl in enumerate(IMPLS):
        xs = [j + (i - (len(IMPLS) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [results[n]["gflops"][impl] for n in names], width=width, label=impl)
    peak = results[names[0]]["gemm_peak_gflops"]
    ax.axhline(peak, color="k", linestyle="--", linewidth=1, label=f"GEMM peak {peak:.0f}")
    for j, n in enumerate(names):
        ax.annotate(
            f"{results[n]['speedup_vs_fastest_peer']:.2f}x", (j, results[n]["gflops"]["ours"]), ha="center", va="bottom"
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("GFLOP/s (forward + backward)")
    r0 = results[names[0]]
    ax.set_title(f"Perceiver encoder, {r0['precision']}{' compiled' if r0['compile'] else ''}, {r0['threads']} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def slope(xs, ys) -> float:
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


SCALING_BATCH = 2


def run_scaling(args) -> dict:
    # a small latent array, so that the input-dependent cost dominates from short inputs on
    cfg = dict(
        input_channels=64,
        num_latents=64,
        latent_channels=128,
        cross_heads=1,
        self_heads=4,
        self_attends=1,
        widening=4,
        transformer_heads=4,
        transformer_layers=2,
    )
    lengths = [1024 * 2**i for i in range(7)]  # 1k .. 64k
    rows = []
    skip_transformer = False
    for m_len in tqdm(lengths, desc="input length"):
        for impl in ("ours", "transformer"):
            if impl == "transformer" and skip_transformer:
                continue
            torch.manual_seed(0)
            model = build(impl, cfg).train()
            x = torch.randn(SCALING_BATCH, m_len, cfg["input_channels"])
            # the Perceiver's steps are short and noisier: more repeats for a stable median
            repeats = args.scaling_repeats * (3 if impl == "ours" else 1)
            secs = time_steps({impl: model}, x, repeats, args.precision)[impl]
            mem = measure_memory(impl, cfg, SCALING_BATCH, m_len, args.precision)
            rows.append({"impl": impl, "length": m_len, "seconds": secs, "peak_memory_mib": mem})
            if impl == "transformer" and secs > args.transformer_cap_seconds:
                skip_transformer = True  # the next doubling would take ~4x longer
    fits = {}
    for impl in ("ours", "transformer"):
        r = [row for row in rows if row["impl"] == impl]
        # fit on lengths >= 8k, where the fixed per-step cost (the latent transformer) no longer dominates
        big = [row for row in r if row["length"] >= 8192] or r
        fits[impl] = {
            "time_slope": slope([row["length"] for row in big], [row["seconds"] for row in big]),
            "memory_slope": slope([row["length"] for row in big], [max(row["peak_memory_mib"], 1e-3) for row in big]),
            "lengths_fitted": [row["length"] for row in big],
        }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "scaling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot_scaling(rows, fits, args.out_dir / "scaling.png")
    print(f"\n{'impl':<13}{'M':>8}{'s/step':>10}{'peak MiB':>10}")
    for row in rows:
        print(f"{row['impl']:<13}{row['length']:>8}{row['seconds']:>10.3f}{row['peak_memory_mib']:>10.0f}")
    for impl, fit in fits.items():
        print(
            f"{impl}: log-log slope time {fit['time_slope']:.2f}, memory {fit['memory_slope']:.2f} "
            f"(fitted on M in {fit['lengths_fitted']})"
        )
    return {"config": cfg, "batch": SCALING_BATCH, "rows": rows, "fits": fits, "threads": torch.get_num_threads()}


def plot_scaling(rows, fits, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "seconds", "seconds per training step"),
        (axes[1], "peak_memory_mib", "peak memory (MiB)"),
    ):
        for impl, name in (("ours", "Perceiver encoder (64 latents)"), ("transformer", "Transformer encoder")):
            r = [row for row in rows if row["impl"] == impl]
            s = fits[impl]["time_slope" if key == "seconds" else "memory_slope"]
            ax.loglog(
                [row["length"] for row in r], [max(row[key], 1e-3) for row in r], "o-", label=f"{name}, slope {s:.2f}"
            )
        ax.set_xlabel("input length M")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Cost of one forward+backward step versus input length (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["peers", "scaling", "all"], default="all")
    p.add_argument("--configs", nargs="+", choices=list(PEER_CONFIGS), default=DEFAULT_CONFIGS)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scaling-repeats", type=int, default=3)
    p.add_argument(
        "--transformer-cap-seconds",
        type=float,
        default=20.0,
        help="stop growing the transformer's input once one step takes longer than this",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16: autocast, for every implementation")
    p.add_argument(
        "--peak-size",
        type=int,
        default=4096,
        help="side of the square matrix multiply that measures the GEMM peak (smaller: a quicker, lower peak)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every implementation (in place)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--profile", action="store_true", help="profile a step: time in matrix multiplies vs the rest")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    suffix = (
        ""
        if args.precision == "fp32" and not args.compile
        else f"_{args.precision}{'_compiled' if args.compile else ''}"
    )
    if args.part in ("peers", "all"):
        out["peers"] = run_peers(args)
        plot_peers(out["peers"], args.out_dir / f"encoder_peers{suffix}.png")
    if args.part in ("scaling", "all"):
        out["scaling"] = run_scaling(args)
    name = f"encoder{suffix}.json" if args.part == "all" else f"encoder_{args.part}{suffix}.json"
    (args.out_dir / name).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out_dir / name}")


if __name__ == "__main__":
    main()
