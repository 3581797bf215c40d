"""Progress bar, ``metrics.jsonl``, TensorBoard and the loss-curve PNG (all on rank 0).

``metrics.jsonl`` holds one JSON record per optimizer step (``{"kind": "train", "step": ..., "loss": ...,
"step_seconds": ...}``) and one per evaluation (``"kind": "eval"``). On resume it is cut back to the checkpoint's
step, so after an interruption the file still holds exactly one trajectory; TensorBoard events past that step are
purged likewise.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

from .config import LoggingConfig


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash
                continue
    return records


def train_losses(path: Path) -> dict[int, Optional[float]]:
    """step -> loss (None for skipped steps) from a metrics file."""
    return {r["step"]: r["loss"] for r in read_records(path) if r.get("kind") == "train"}


class Throughput:
    """Samples/s and tokens/s over a window of recent steps."""

    def __init__(self, window: int = 20) -> None:
        self.events: deque = deque(maxlen=window)

    def add(self, seconds: float, samples: float, tokens: float) -> None:
        self.events.append((seconds, samples, tokens))

    def rates(self) -> tuple[float, float]:
        seconds = sum(e[0] for e in self.events)
        if seconds <= 0:
            return 0.0, 0.0
        return sum(e[1] for e in self.events) / seconds, sum(e[2] for e in self.events) / seconds


class MetricsLogger:
    """Rank-0 sink for step and evaluation records; every method is a no-op on the other ranks."""

    def __init__(self, output_dir: Path, cfg: LoggingConfig, enabled: bool, start_step: int, max_steps: int) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.curve_path = Path(output_dir) / "loss_curve.png"
        self.start_step = start_step
        self.throughput = Throughput()
        self.window: deque = deque(maxlen=cfg.log_every)
        self.bar = None
        self.tb = None
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= start_step] if start_step else []
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True, unit="step")
        self._last_print = time.perf_counter()

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def log_step(self, record: dict[str, Any], seconds: float) -> None:
        if not self.enabled:
            return
        self.throughput.add(seconds, record["samples"], record["tokens"])
        samples_per_s, tokens_per_s = self.throughput.rates()
        record = {
            **record,
            "step_seconds": round(seconds, 4),
            "samples_per_s": round(samples_per_s, 3),
            "tokens_per_s": round(tokens_per_s, 1),
        }
        self._file.write(json.dumps({"kind": "train", **record}) + "\n")
        step = record["step"]
        if record["loss"] is not None:
            self.window.append(record["loss"])
        if self.tb is not None:
            streams = [k for k in record if k.startswith("loss_")]
            for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", *streams):
                value = record.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, step)
            self.tb.add_scalar("train/nonfinite_steps", record["nonfinite_total"], step)
        mean = sum(self.window) / len(self.window) if self.window else float("nan")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if step % self.cfg.log_every == 0 or step == self.start_step + 1:
                self.bar.set_postfix(
                    loss=f"{mean:.4f}",
                    lr=f"{record['lr']:.2e}",
                    samples_s=f"{samples_per_s:.1f}",
                    tokens_s=f"{tokens_per_s:.0f}",
                    refresh=True,
                )
        elif step % self.cfg.log_every == 0:
            print(
                f"step {step} loss {mean:.4f} lr {record['lr']:.2e} samples/s {samples_per_s:.1f} "
                f"tokens/s {tokens_per_s:.0f}",
                flush=True,
            )

    def log_data_stats(self, step: int, stats: dict[str, dict[str, int]]) -> None:
        """Loader counters of this rank (samples, batches, skipped/<reason>, index/<problem>) per stream."""
        if not self.enabled:
            return
        self._file.write(json.dumps({"kind": "data", "step": step, **stats}) + "\n")
        if self.tb is None:
            return
        for stream, counters in stats.items():
            for key, value in counters.items():
                self.tb.add_scalar(f"data/{stream}/{key}", value, step)

    def log_eval(self, step: int, result: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"kind": "eval", "step": step, **result}) + "\n")
        if self.tb is not None:
            if result.get("loss") is not None:
                self.tb.add_scalar("eval/loss", result["loss"], step)
            if result.get("ablated_loss") is not None:
                self.tb.add_scalar("eval/ablated_loss", result["ablated_loss"], step)
                self.tb.add_scalar("eval/image_gain", result["ablated_loss"] - result["loss"], step)
            if result.get("shuffled_loss") is not None:
                self.tb.add_scalar("eval/shuffled_loss", result["shuffled_loss"], step)
                self.tb.add_scalar("eval/image_gain_shuffled", result["shuffled_loss"] - result["loss"], step)
            if result.get("episodes_loss") is not None:
                self.tb.add_scalar("eval/episodes_loss", result["episodes_loss"], step)
            if result.get("episodes_ablated_loss") is not None:
                self.tb.add_scalar(
                    "eval/episodes_image_gain", result["episodes_ablated_loss"] - result["episodes_loss"], step
                )
            if result.get("generations"):
                text = "\n\n".join(
                    f"**true:** {g['true']}  \n**generated:** {g['generated']}" for g in result["generations"]
                )
                self.tb.add_text("eval/generations", text, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _running_mean(values: list[float], k: int) -> list[float]:
    return [sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def plot_loss_curve(metrics_path: Path, out_path: Path, final: Optional[dict] = None) -> Optional[Path]:
    """Training loss per step (total and per stream, running means) and held-out loss, as a PNG. ``final``: the
    final evaluation's report (``few_shot.json``): its binding table is drawn in a second panel (accuracy against
    shots, with the image-ablated control, the prototype reference and chance) and its caption scores in the
    title."""
    records = read_records(metrics_path)
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["loss"]) for r in records if r.get("kind") == "eval" and r.get("loss") is not None]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in train]
    k = max(1, len(train) // 30)
    binding = (final or {}).get("binding", {}).get("table")
    if binding:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
        _plot_binding(bx, binding)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    captions = (final or {}).get("images")
    if captions:
        title = f"captions of held-out scenes: {captions['attribute_accuracy']:.1%} of the attributes right"
        if (final or {}).get("ablated"):
            title += f" ({final['ablated']['attribute_accuracy']:.1%} with constant images)"
        ax.set_title(title, fontsize=9)
    losses = [r["loss"] for r in train]
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
    streams = sorted(key for key in train[0] if key.startswith("loss_"))
    total = "train loss" + (f" (sum of {len(streams)} streams)" if len(streams) > 1 else "")
    ax.plot(steps, _running_mean(losses, k), color="tab:blue", linewidth=1.8, label=f"{total}, mean of {k}")
    if len(streams) > 1:
        for key, colour in zip(streams, ("tab:green", "tab:purple", "tab:brown")):
            values = [r[key] for r in train]
            ax.plot(steps, _running_mean(values, k), color=colour, linewidth=1.0, label=f"train {key[5:]}")
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", label="held-out pairs")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def _plot_binding(ax, rows: list[dict]) -> None:
    """Binding accuracy against shots, one colour per number of ways."""
    colours = ("tab:blue", "tab:red", "tab:green", "tab:purple")
    for colour, ways in zip(colours, sorted({r["ways"] for r in rows})):
        mine = sorted((r for r in rows if r["ways"] == ways), key=lambda r: r["shots"])
        shots = [r["shots"] for r in mine]
        ax.plot(shots, [r["accuracy"] for r in mine], "o-", color=colour, label=f"{ways}-way model")
        if all(r["ablated"] is not None for r in mine):
            ax.plot(shots, [r["ablated"] for r in mine], "s--", color=colour, alpha=0.6, label="constant images")
        proto = [(r["shots"], r["prototype"]) for r in mine if r["prototype"] is not None]
        if proto:
            ax.plot(*zip(*proto), ":", color=colour, alpha=0.8, label="prototype (no LM)")
        ax.axhline(100.0 / ways, color="grey", linewidth=0.6)
    ax.set_xlabel("shots (demonstrations per word)")
    ax.set_ylabel("accuracy % (held-out scenes, new words)")
    ax.set_ylim(-2, 102)
    ax.set_title("naming new words in context (binding)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
