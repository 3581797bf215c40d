"""Results on disk and on screen: one JSON per run, per-sample predictions (JSONL), a table, a plot.

``results.json``: task, metric, model and data identity, protocol, and one entry per
(mode, ablated, shots) with the trial seeds, per-trial metrics, mean, std, number of samples,
images/s and the path of each trial's predictions file (``predictions/<run>_seed<S>.jsonl``); then
``paired_differences`` (:mod:`vlm.eval.compare`): each pair of shot counts within a mode and each setting against
its ablated control, the mean per-sample difference of the primary metric with a 95% bootstrap interval.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Union


def run_label(run: dict) -> str:
    return run["mode"] + ("-ablated" if run["ablate_images"] else "")


def write_results(results: dict[str, Any], out_dir: Union[str, Path], plot: bool = True) -> Path:
    """Write ``results.json`` (+ predictions, + ``<task>_shots.png`` when several shot counts ran); returns the JSON path."""
    out = Path(out_dir)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    results = copy.copy(results)
    runs = []
    for run in results["runs"]:
        run = dict(run)
        trials = []
        for trial in run["trials"]:
            trial = dict(trial)
            name = f"predictions/{results['task']}_{run_label(run)}_{run['shots']}shot_seed{trial['seed']}.jsonl"
            with open(out / name, "w") as f:
                for rec in trial["predictions"]:
                    f.write(json.dumps(rec) + "\n")
            trial["predictions"] = name
            trials.append(trial)
        run["trials"] = trials
        runs.append(run)
    results["runs"] = runs
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2))
    if plot and len({r["shots"] for r in runs}) > 1:
        plot_results(results, out / f"{results['task']}_shots.png")
    return path


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per (mode, shots), mean +- std of every metric, samples, images/s."""
    runs = results["runs"]
    if not runs:
        return "(no runs)"
    metrics = list(runs[0]["mean"])
    head = ["mode", "shots", *metrics, "samples", "trials", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        speed = sum(t["images_per_s"] for t in r["trials"]) / len(r["trials"])
        cells = [run_label(r), str(r["shots"])]
        cells += [f"{r['mean'][m]:.2f} ± {r['std'][m]:.2f}" for m in metrics]
        cells += [str(r["num_samples"]), str(len(r["trials"])), f"{speed:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(results: dict[str, Any], path: Union[str, Path]) -> None:
    """Primary metric versus shots, one line per mode (random / rices / ablated), std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = results["metric"]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = list(dict.fromkeys(run_label(r) for r in results["runs"]))
    for label in labels:
        rs = sorted((r for r in results["runs"] if run_label(r) == label), key=lambda r: r["shots"])
        ax.errorbar(
            [r["shots"] for r in rs],
            [r["mean"][metric] for r in rs],
            yerr=[r["std"][metric] for r in rs],
            marker="o",
            capsize=3,
            linestyle="--" if "ablated" in label else "-",
            label=label,
        )
    ax.set_xlabel("shots")
    ax.set_ylabel(metric)
    ax.set_title(f"{results['task']}: {metric} vs shots")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
