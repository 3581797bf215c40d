"""Shared pieces of the recipes: CPU-time budget, training loop, learning-rate schedule, result output.

The budget is process CPU time (``time.process_time()``, all threads of the process) spent in training
steps, data preparation included and evaluation excluded, so two models compared on a busy shared machine
get the same amount of computation regardless of what else runs there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm


def base_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="path to the data file (see /work/shared/data/README.md)")
    p.add_argument(
        "--budget-cpu-seconds",
        type=float,
        required=True,
        help="process CPU seconds of training per model (time.process_time(), all threads; evaluation excluded)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both models")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and of each model's initialisation")
    p.add_argument("--out", type=Path, default=Path(default_out), help="output folder (results.json, curves.png)")
    p.add_argument("--num-evals", type=int, default=8, help="learning-curve evaluations during training")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bars")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Fail fast, before any expensive work, on values the recipes cannot use."""
    if not args.data.is_file():
        raise SystemExit(f"--data {args.data} is not a file")
    if args.budget_cpu_seconds <= 0:
        raise SystemExit(f"--budget-cpu-seconds must be > 0, got {args.budget_cpu_seconds}")
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if args.num_evals < 1:
        raise SystemExit(f"--num-evals must be >= 1, got {args.num_evals}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class CpuBudget:
    """Accumulates process CPU time spent inside :meth:`measure` blocks."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.used = 0.0

    @contextmanager
    def measure(self):
        t0 = time.process_time()
        try:
            yield
        finally:
            self.used += time.process_time() - t0

    @property
    def fraction(self) -> float:
        return min(1.0, self.used / self.seconds)

    @property
    def exhausted(self) -> bool:
        return self.used >= self.seconds


def lr_factor(fraction: float, warmup: float = 0.05, final: float = 0.1) -> float:
    """Linear warm-up over the first ``warmup`` of the budget, then cosine decay to ``final``."""
    if fraction < warmup:
        return max(fraction / warmup, 0.01)
    progress = min(1.0, (fraction - warmup) / max(1e-8, 1.0 - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    steps: int = 0
    examples: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)


def train_under_budget(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Iterator[Any],
    budget_seconds: float,
    lr: float,
    weight_decay: float,
    evaluate: Callable[[nn.Module], dict[str, float]],
    num_evals: int,
    desc: str,
    progress: bool = True,
) -> TrainResult:
    """AdamW on ``loss_fn(model, batch)`` until ``budget_seconds`` of process CPU time are spent.

    The learning rate follows :func:`lr_factor` of the budget fraction used. ``evaluate(model)`` runs (outside
    the budget, in eval mode) before training and after every ``1/num_evals`` of the budget; its values and a
    running mean of the training loss form the learning curve.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    budget = CpuBudget(budget_seconds)
    result = TrainResult()
    wall0 = time.perf_counter()
    running, running_n = 0.0, 0

    def record() -> None:
        nonlocal running, running_n
        model.eval()
        with torch.no_grad():
            point = {"cpu_seconds": round(budget.used, 2), "steps": result.steps, **evaluate(model)}
        model.train()
        if running_n:
            point["train_loss"] = running / running_n
        running, running_n = 0.0, 0
        result.curve.append(point)

    record()
    next_eval = 1
    model.train()
    bar = tqdm(total=round(budget_seconds), desc=desc, unit="cpu-s", disable=not progress, file=sys.stderr)
    while not budget.exhausted:
        used_before = budget.used
        with budget.measure():
            batch = next(batches)
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(budget.fraction)
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{desc}: training loss became {loss.item()} at step {result.steps}")
        result.steps += 1
        result.examples += len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
        running += loss.item()
        running_n += 1
        bar.update(round(budget.used) - round(used_before))
        bar.set_postfix(loss=f"{loss.item():.3f}", steps=result.steps)
        if budget.used >= next_eval * budget_seconds / num_evals and next_eval < num_evals:
            record()
            next_eval += 1
    bar.close()
    result.cpu_seconds = budget.used
    result.wall_seconds = time.perf_counter() - wall0
    record()
    model.eval()
    return result


def print_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    text = "\n".join(
        [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]]
    )
    print(text)
    return text


def save_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def plot_curves(path: Path, panels: list[tuple[str, dict[str, list[dict[str, float]]], str]], title: str) -> None:
    """One subplot per ``(metric key, {model name: curve}, y label)``; x = training CPU seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (key, curves, ylabel) in zip(axes, panels):
        for name, curve in curves.items():
            pts = [(p["cpu_seconds"], p[key]) for p in curve if key in p]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xlabel("training CPU seconds")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_header(recipe: str, command: str, args: argparse.Namespace, **facts: Any) -> dict:
    """The top of a recipe's results.json: what ran, on what data, with which budget and settings."""
    return {
        "recipe": recipe,
        "command": command,
        "data": str(args.data),
        "budget_cpu_seconds": args.budget_cpu_seconds,
        "threads": args.threads,
        **facts,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {},
    }


def training_record(model: nn.Module, trained: TrainResult, examples_name: str, **scores: Any) -> dict:
    """One model's entry in results.json: its scores, then what its training budget bought."""
    return {
        "parameters": count_parameters(model),
        **scores,
        "train_steps": trained.steps,
        examples_name: trained.examples,
        "train_cpu_seconds": round(trained.cpu_seconds, 1),
        "train_wall_seconds": round(trained.wall_seconds, 1),
    }


def write_results(out: Path, results: dict, panels: list, title: str) -> None:
    """results.json and the learning-curve plot (``panels`` as in :func:`plot_curves`) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "results.json", results)
    plot_curves(out / "curves.png", panels, title)
    print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")


def command_line(argv: Optional[list[str]]) -> str:
    args = sys.argv[1:] if argv is None else argv
    script = os.path.relpath(sys.modules["__main__"].__file__ or "", os.getcwd()) if argv is None else "<main(argv)>"
    return " ".join(["python", script, *args])


@contextmanager
def torch_threads(n: int):
    """Set torch's intra-op threads for the block, restoring the previous value after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
