"""Where a training step's time goes, by part and by language-model layer.

    python benchmarks/profile_train_step.py                          # configs/default.yaml, 2 warm-up + 4 steps
    python benchmarks/profile_train_step.py --steps 6 model.freeze_lm_embeddings=true
    python benchmarks/profile_train_step.py --out benchmarks/results/train_step_profile.json
    python benchmarks/profile_train_step.py --full-logits         # the LM head at every position, not only the loss's

It builds the trainer of ``training/train.py`` from the same ``--config`` and ``key=value`` overrides (in one
process, no launcher) and runs real optimizer steps. Module hooks time each part's forward; its backward is the
interval from the moment the gradient reaches the part's output to the moment it reaches the next part's output
(autograd runs the parts of one backward in the reverse order of their forward, one at a time on CPU). Parts: data
(next batch of every stream), the vision tower, the Perceiver Resampler, the LM's embedding, each gated
cross-attention block and each decoder layer, the final norm, the LM head, the loss, and the optimizer step.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    if hasattr(value, "logits"):
        return value.logits
    return None


class StepProfiler:
    """Forward time per part (hooks around the call) and backward time per part (gradient-arrival timeline)."""

    def __init__(self, parts: dict[str, torch.nn.Module]):
        self.forward = defaultdict(float)
        self.backward = defaultdict(float)
        self.calls = defaultdict(int)
        self._starts: dict[str, list[float]] = defaultdict(list)
        self._events: list[tuple[float, str]] = []
        self._handles = []
        for name, module in parts.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args):
            self._starts[name].append(time.perf_counter())

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.forward[name] += time.perf_counter() - self._starts[name].pop()
            self.calls[name] += 1
            out = _first_tensor(output)
            if out is not None and out.requires_grad:
                out.register_hook(lambda grad: self._events.append((time.perf_counter(), name)))

        return hook

    def backward_started(self) -> None:
        self._events = [(time.perf_counter(), "loss")]

    def backward_finished(self) -> None:
        end = time.perf_counter()
        events = sorted(self._events) + [(end, "")]
        for (t, name), (t_next, _) in zip(events, events[1:]):
            self.backward[name] += t_next - t
        self._events = []

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def model_parts(model) -> dict[str, torch.nn.Module]:
    from vlm.lm_wrapping import FlamingoLayer

    parts = {"vision tower": model.vision_encoder, "resampler": model.perceiver, "embedding": model.lang_embedding}
    layers = [m for m in model.lang_encoder.modules() if isinstance(m, FlamingoLayer)]
    for layer in layers:
        if layer.gated_cross_attn_layer is not None:
            parts[f"xattn {layer.layer_index:02d}"] = layer.gated_cross_attn_layer
        parts[f"layer {layer.layer_index:02d}"] = layer.decoder_layer
    norm = getattr(getattr(model.lang_encoder, "model", None), "norm", None)
    if norm is not None:
        parts["final norm"] = norm
    parts["lm head"] = model.lang_head
    return parts


def profile(config_path, overrides, steps: int, warmup: int, full_logits: bool = False) -> dict:
    """Runs ``warmup + steps`` optimizer steps of the trainer itself (``Trainer.train_step``), timing its parts
    through wrappers of the streams' ``next``, the engine's ``backward`` and ``step``, and module hooks."""
    from training.config import load_config
    from training.trainer import Trainer

    out_dir = tempfile.mkdtemp(prefix="profile_step_")
    config = load_config(
        config_path,
        [
            *overrides,
            f"run.output_dir={out_dir}",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
            "checkpoint.export=false",
        ],
    )
    trainer = Trainer(config)
    model, engine = trainer.model, trainer.engine
    clock = {"data": 0.0, "optimizer": 0.0}
    profiler: list[StepProfiler] = []  # set once the warm-up steps are done

    def timed(name, fn, around=None):
        def run(*args, **kwargs):
            start = time.perf_counter()
            if around:
                around[0]()
            try:
                return fn(*args, **kwargs)
            finally:
                if around:
                    around[1]()
                if name:
                    clock[name] += time.perf_counter() - start

        return run

    for stream in trainer.streams.values():
        stream.next = timed("data", stream.next)
    engine.step = timed("optimizer", engine.step)
    engine.backward = timed(
        None,
        engine.backward,
        around=(
            lambda: profiler and profiler[0].backward_started(),
            lambda: profiler and profiler[0].backward_finished(),
        ),
    )
    if full_logits:  # the trainer asks for loss_only=True; the head then runs at every position instead
        forward = model.forward
        model.forward = lambda *args, **kwargs: forward(*args, **{**kwargs, "loss_only": False})
    step_times, tokens, positions = [], [], []
    for step in range(warmup + steps):
        if step == warmup:
            profiler.append(StepProfiler(model_parts(model)))
            clock.update(data=0.0, optimizer=0.0)
        start = time.perf_counter()
        record = trainer.train_step()
        if step >= warmup:
            step_times.append(time.perf_counter() - start)
            tokens.append(record["tokens"])
            positions.append(record["positions"])
    profiler = profiler[0]
    profiler.close()
    trainer.close()
    total_time = sum(step_times)
    data_time, opt_time = clock["data"], clock["optimizer"]
    rows = [{"part": "data", "forward_s": data_time / steps, "backward_s": 0.0}]
    for name in profiler.calls:
        rows.append(
            {
                "part": name,
                "forward_s": profiler.forward[name] / steps,
                "backward_s": profiler.backward.get(name, 0.0) / steps,
            }
        )
    rows.append({"part": "loss", "forward_s": 0.0, "backward_s": profiler.backward.get("loss", 0.0) / steps})
    rows.append({"part": "optimizer", "forward_s": opt_time / steps, "backward_s": 0.0})
    for r in rows:
        r["total_s"] = r["forward_s"] + r["backward_s"]
        r["fraction"] = r["total_s"] / (total_time / steps)
    return {
        "config": config_path or "configs/default.yaml (embedded default)",
        "overrides": overrides,
        "full_logits": full_logits,
        "precision": config.run.precision,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "step_s": total_time / steps,
        "step_s_each": step_times,
        "tokens_per_step": sum(tokens) / steps,
        "positions_per_step": sum(positions) / steps,
        "parts": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_flags": _bf16_flags()},
        "torch": torch.__version__,
    }


def _bf16_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f" {f}" in text})


def format_profile(result: dict, by_layer: bool = True) -> str:
    lines = [
        f"step {result['step_s']:.3f} s ({result['precision']}, {result['threads']} threads), "
        f"{result['tokens_per_step']:.0f} tokens / {result['positions_per_step']:.0f} positions per step",
        f"{'part':<16}{'forward s':>11}{'backward s':>12}{'total s':>10}{'share':>8}",
    ]
    groups: dict[str, list[float]] = {}
    for r in result["parts"]:
        name = r["part"]
        if not by_layer and (name.startswith("layer ") or name.startswith("xattn ")):
            key = name.split()[0] + "s (all)"
            g = groups.setdefault(key, [0.0, 0.0, 0.0, 0.0])
            g[0] += r["forward_s"]
            g[1] += r["backward_s"]
            g[2] += r["total_s"]
            g[3] += r["fraction"]
            continue
        lines.append(
            f"{name:<16}{r['forward_s']:>11.3f}{r['backward_s']:>12.3f}{r['total_s']:>10.3f}{r['fraction']:>8.1%}"
        )
    for key, (f, b, t, s) in groups.items():
        lines.append(f"{key:<16}{f:>11.3f}{b:>12.3f}{t:>10.3f}{s:>8.1%}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="training config (default: the embedded default)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--summary", action="store_true", help="layers and cross-attention blocks summed")
    parser.add_argument("--full-logits", action="store_true", help="the LM head at every position (loss_only off)")
    parser.add_argument("--out", type=Path, default=None, help="write the profile as JSON here")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        parser.error(f"unexpected arguments {bad}: expected key=value overrides")
    result = profile(args.config, overrides, args.steps, args.warmup, args.full_logits)
    print(format_profile(result, by_layer=not args.summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
