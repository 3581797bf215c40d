"""Flickr8k end to end: real photos and human captions through shards, DeepSpeed training on the pretrained frozen
bases, and few-shot evaluation -- each step the project's own command, run as a subprocess. Example::

    python recipes/flickr8k_flamingo.py --data ../shared/data/flickr8k.tar --out outputs/flickr8k
    python recipes/flickr8k_flamingo.py --data ../shared/data/flickr8k.tar --out outputs/flickr8k-short \\
        --budget-cpu-seconds 600 --num-samples 50 --trials 1

1. Shards (``python -m data_pipelines.from_captions``): the training split's pairs (one sample per image with its 5
   captions; the loader draws one per epoch) and the dev split's pairs (held-out loss). Few-shot documents
   (``python -m data_pipelines.from_mmc4``) built here from training pairs in the MMC4 layout: each holds
   ``--doc-images`` training images, each with one of its captions, in the captioning prompt of ``vlm.eval``, so a
   document reads ``<image>Output:{caption}<|endofchunk|><image>Output:{caption}<|endofchunk|>...`` token for token as
   a few-shot prompt does. The pairs are trained in the same form (``data.pairs.caption_prefix``).
2. Training: ``deepspeed training/train.py --config configs/flickr8k.yaml`` (``python training/train.py`` when the
   launcher is not on PATH) with the shard paths, the output directory and ``--set`` overrides. ``--budget-cpu-seconds
   N`` sets ``run.max_seconds`` = N / (threads x processes): the training loop stops there and the run ends like a
   finished one (held-out loss, checkpoint, export); the LR schedule is the one of ``run.max_steps``, cut short.
3. Evaluation: ``python -m vlm.eval captioning --dataset flickr`` of the exported model on the test split: shots
   ``--shots``, random and RICES demonstrations, and the image-ablated control of each; ``--num-samples`` test
   images per trial (drawn by the trial's seed, the same images for every setting of that trial).
4. With ``--binding-data`` (CIFAR-10, ``../shared/data/cifar10.tar.gz``): the model also trains on binding episodes
   (``data.episodes``, :mod:`data_pipelines.binding`) of the *training* photos of ``--binding-train-classes``
   (shards by ``python -m data_pipelines.from_classes``), and ``python -m vlm.eval binding`` evaluates it on the
   *test* photos of the classes it never saw (``--binding-test-classes``) and of those it saw, with evaluation-pool
   words, open-ended and closed, with the 0-shot, image-ablated and prototype controls.
5. ``OUT/results.json`` (every setting's CIDEr and BLEU-4, mean / std / trials, the training summary, the targets,
   the commands and their durations), ``OUT/samples.png`` (test photos with the generated caption and a reference),
   ``OUT/loss_curve.png`` (the training run's loss curve).

Running it again with the same arguments reuses the shards and the finished training and evaluates again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.common import command_line, print_table, save_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/flickr8k.yaml"


# --------------------------------------------------------------------------------------------- commands


def run_command(cmd: list[str], log: Path, label: str) -> dict[str, Any]:
    """Run ``cmd`` in the project root, its output shown and written to ``log``; returns what it took.

    cpu_seconds: user + system time of the command and every process it waited for (the DeepSpeed launcher's
    training process included). A failure stops the recipe with the command and the end of its output."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n[{label}] $ {' '.join(cmd)}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):  # type: ignore[union-attr]
            sink.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        code = proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = time.perf_counter() - start
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if code != 0:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        raise SystemExit(f"[{label}] failed with exit code {code}: {' '.join(cmd)}\n(log: {log})\n{tail}")
    return {"command": cmd, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "log": str(log)}


def yaml_value(value: Any) -> str:
    """A ``key=value`` override's value: JSON, which is YAML too (paths with ':' or braces stay strings)."""
    return json.dumps(value)


def caption_prompt_prefix() -> str:
    """The text between ``<image>`` and the caption in vlm.eval's captioning demonstrations ("Output:")."""
    from vlm.eval import CaptioningTask
    from vlm.factory import MEDIA_TOKEN

    template = CaptioningTask().template
    return template[template.index(MEDIA_TOKEN) + len(MEDIA_TOKEN) : template.index("{caption}")]


# ------------------------------------------------------------------------------------------------ shards


def build_documents(train, num_docs: int, images_per_doc: tuple[int, int], seed: int, prefix: str) -> list[dict]:
    """MMC4-layout few-shot documents from training pairs: ``k`` distinct training images per document (k uniform in
    ``images_per_doc``), each the sentence-matched image of one of its captions (drawn per document) after ``prefix``.
    """
    lo, hi = images_per_doc
    rng = random.Random(seed)
    docs = []
    for d in range(num_docs):
        picks = rng.sample(range(len(train)), min(rng.randint(lo, hi), len(train)))
        docs.append(
            {
                "url": f"flickr8k-train-doc-{d:06d}",
                "text_list": [prefix + rng.choice(train[i].captions).strip() for i in picks],
                "image_info": [
                    {"image_name": Path(train[i].image).name, "matched_text_index": j} for j, i in enumerate(picks)
                ],
            }
        )
    return docs


def write_shards(args, flickr: dict, shard_dir: Path, prefix: str) -> dict[str, Any]:
    """Train/dev pair shards and the few-shot document shards, each written by a data_pipelines command."""
    root = Path(flickr["train"].root)
    images = root / "Images" if (root / "Images").is_dir() else root
    lists = {split: next(root.glob(f"*.{name}Images.txt")) for split, name in (("train", "train"), ("dev", "dev"))}
    quiet = ["--no-progress"] if args.no_progress else []
    steps = []
    for split in ("train", "dev"):
        steps.append(
            run_command(
                [sys.executable, "-m", "data_pipelines.from_captions", "--images", str(images),
                 "--captions", str(root / "captions.txt"), "--split-file", str(lists[split]),
                 "--out", str(shard_dir / f"{split}_pairs"), "--prefix", f"flickr8k-{split}", "--overwrite", *quiet],
                args.out / "logs" / f"shards_{split}_pairs.log",
                f"shards: {split} pairs",
            )
        )  # fmt: skip
    docs = build_documents(flickr["train"], args.num_docs, tuple(args.doc_images), args.seed, prefix)
    source = shard_dir / "train_docs.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs))
    steps.append(
        run_command(
            [sys.executable, "-m", "data_pipelines.from_mmc4", "--docs", str(source), "--images", str(images),
             "--out", str(shard_dir / "train_docs"), "--prefix", "flickr8k-train-docs", "--overwrite", *quiet],
            args.out / "logs" / "shards_train_docs.log",
            "shards: few-shot documents",
        )
    )  # fmt: skip
    stats = {}
    for name, stats_prefix in (("train_pairs", "train"), ("dev_pairs", "dev"), ("train_docs", "train-docs")):
        s = json.loads((shard_dir / name / f"flickr8k-{stats_prefix}_stats.json").read_text())
        stats[name] = {"samples": s["samples_written"], "skipped": s["samples_skipped"], "shards": s["shards_written"]}
        if "images_written" in s:
            stats[name]["images"] = s["images_written"]
    if args.binding_data is not None:
        train_root = binding_root(args, "train")
        steps.append(
            run_command(
                [sys.executable, "-m", "data_pipelines.from_classes", "--root", str(train_root),
                 "--classes", *args.binding_train_classes, "--out", str(shard_dir / "binding_train"),
                 "--prefix", "binding-train", "--overwrite", *quiet],
                args.out / "logs" / "shards_binding_train.log",
                "shards: binding classes",
            )
        )  # fmt: skip
        s = json.loads((shard_dir / "binding_train" / "binding-train_stats.json").read_text())
        stats["binding_train"] = {"samples": s["samples_written"], "skipped": s["samples_skipped"],
                                  "shards": s["shards_written"], "classes": list(args.binding_train_classes)}  # fmt: skip
    return {"steps": steps, "stats": stats, "seconds": round(sum(s["seconds"] for s in steps), 1)}


def binding_root(args, split: str) -> Path:
    """The ``split`` folder (train / test) of the binding class tree (a tar is extracted once into the cache)."""
    from vlm.eval.datasets import resolve_data_path

    base = resolve_data_path(args.binding_data, args.cache_dir)
    hits = [base / split] if (base / split).is_dir() else sorted(p for p in base.glob(f"*/{split}") if p.is_dir())
    if len(hits) != 1:
        raise SystemExit(f"--binding-data {args.binding_data}: expected one {split}/ folder of classes, found {hits}")
    return hits[0]


# ---------------------------------------------------------------------------------------------- training


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_training(a: list[str], b: list[str]) -> bool:
    """Whether two training commands train the same run (the rendezvous port aside)."""

    def strip(cmd: list[str]) -> list[str]:
        cmd = list(cmd[1:])
        if "--master_port" in cmd:
            i = cmd.index("--master_port")
            del cmd[i : i + 2]
        return cmd

    return strip(a) == strip(b)


def training_command(args, shard_dir: Path, prefix: str, threads: int) -> tuple[list[str], str]:
    launcher = args.launcher
    if launcher == "auto":
        launcher = "deepspeed" if shutil.which("deepspeed") else "python"
    if launcher == "deepspeed":
        # a free rendezvous port: the launcher's default (29500) is taken by any other job on the machine
        head = ["deepspeed", "--master_port", str(free_port())]
        head += ["--num_gpus", str(args.num_processes)] if args.num_processes else []
    else:
        if args.num_processes not in (None, 1):
            raise SystemExit("--num-processes > 1 needs the deepspeed launcher")
        head = [sys.executable]
    overrides = [
        f"run.output_dir={yaml_value(str(args.out / 'train'))}",
        f"data.pairs.sources={yaml_value([{'shards': str(shard_dir / 'train_pairs'), 'name': 'flickr8k_pairs'}])}",
        f"data.documents.sources={yaml_value([{'shards': str(shard_dir / 'train_docs'), 'name': 'flickr8k_docs'}])}",
        f"data.val.shards={yaml_value(str(shard_dir / 'dev_pairs'))}",
        (
            f"data.episodes.sources={yaml_value([{'shards': str(shard_dir / 'binding_train'), 'name': 'binding_episodes'}])}"
            if args.binding_data is not None
            else "data.episodes=null"
        ),
        f"data.pairs.caption_prefix={yaml_value(prefix)}",
        f"data.val.caption_prefix={yaml_value(prefix)}",
        "eval.final_few_shot=false",  # the evaluation is vlm.eval's
    ]
    if args.budget_cpu_seconds is not None:
        overrides.append(f"run.max_seconds={args.budget_cpu_seconds / (threads * (args.num_processes or 1)):.1f}")
    if args.no_progress:
        overrides.append("logging.progress_bar=false")
    return [*head, "training/train.py", "--config", str(args.config), *overrides, *args.set], launcher


def training_summary(train_dir: Path) -> dict[str, Any]:
    """Steps, samples, time, first/final losses and precision of the run, from its metrics.jsonl and config.yaml."""
    import yaml

    from training.metrics import read_records

    config = yaml.safe_load((train_dir / "config.yaml").read_text())
    records = read_records(train_dir / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["loss"], r.get("ablated_loss"), r.get("shuffled_loss")) for r in records
             if r.get("kind") == "eval" and r.get("loss") is not None]  # fmt: skip
    data = [r for r in records if r.get("kind") == "data"]
    if not train:
        raise SystemExit(f"{train_dir / 'metrics.jsonl'} holds no training step")

    def mean_of(key: str, rows: list[dict]) -> Optional[float]:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return sum(values) / len(values) if values else None

    k = max(1, min(20, len(train) // 5))
    streams = sorted(key[5:] for key in train[0] if key.startswith("loss_"))
    return {
        "steps": train[-1]["step"],
        "max_steps": config["run"]["max_steps"],
        "max_seconds": config["run"].get("max_seconds"),
        "stopped_by_time_limit": train[-1]["step"] < config["run"]["max_steps"],
        "samples_seen": sum(r["samples"] for r in train),
        "tokens_seen": sum(r["tokens"] for r in train),
        # padding among the positions the LM computed (data.*.group_by_length keeps it low)
        "padding_fraction": (
            round(1 - sum(r["tokens"] for r in train) / sum(r["positions"] for r in train), 4)
            if all(r.get("positions") for r in train)
            else None
        ),
        "group_by_length": {s: (config["data"].get(s) or {}).get("group_by_length") for s in streams},
        "loader_samples": {s: data[-1][s].get("samples") for s in streams if data and s in data[-1]},
        "train_loop_seconds": round(sum(r.get("step_seconds", 0.0) for r in train), 1),
        "seconds_per_step": round(sum(r.get("step_seconds", 0.0) for r in train) / len(train), 3),
        "first_train_loss": mean_of("loss", train[:k]),
        "final_train_loss": mean_of("loss", train[-k:]),
        "final_train_loss_per_stream": {s: mean_of(f"loss_{s}", train[-k:]) for s in streams},
        "loss_mean_over_steps": k,
        "val_losses": [{"step": s, "loss": v, "ablated_loss": a, "shuffled_loss": h} for s, v, a, h in evals],
        "final_val_loss": evals[-1][1] if evals else None,
        "final_lr": train[-1]["lr"],
        "precision": config["run"]["precision"],
        "batch_sizes": {s: (config["data"].get(s) or {}).get("batch_size") for s in streams},
        "nonfinite_steps": train[-1].get("nonfinite_total", 0),
    }


# -------------------------------------------------------------------------------------------- evaluation


def eval_dtype(choice: str, device: str) -> str:
    if choice != "auto":
        return choice
    import torch

    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    from training.distributed import cpu_bf16_features

    return "bfloat16" if cpu_bf16_features() else "float32"


def evaluation_command(args, num_test: int) -> list[str]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cmd = [sys.executable, "-m", "vlm.eval", "captioning", "--dataset", "flickr", "--data", str(args.data),
           "--model-dir", str(args.out / "train" / "export"), "--shots", *map(str, args.shots),
           "--trials", str(args.trials), "--modes", *args.modes, "--batch-size", str(args.eval_batch_size),
           "--device", device, "--dtype", eval_dtype(args.eval_dtype, device), "--out", str(args.out / "eval")]  # fmt: skip
    if args.num_beams is not None:
        cmd += ["--num-beams", str(args.num_beams)]
    if not args.no_ablation:
        cmd.append("--ablate-images")
    if args.num_samples and args.num_samples < num_test:
        cmd += ["--num-samples", str(args.num_samples)]
    if args.cache_dir is not None:
        cmd += ["--cache-dir", str(args.cache_dir)]
    if args.no_progress:
        cmd.append("--quiet")
    return cmd


def label(run: dict) -> str:
    return run["mode"] + ("-ablated" if run["ablate_images"] else "")


def summarize_eval(results: dict, num_test: int) -> dict[str, Any]:
    """Every (mode, ablated, shots) run's CIDEr / BLEU-4 (mean, std, trials) and the issue's targets."""
    settings = []
    for run in results["runs"]:
        settings.append(
            {
                "mode": run["mode"],
                "ablate_images": run["ablate_images"],
                "shots": run["shots"],
                "num_samples": run["num_samples"],
                **{m: {"mean": run["mean"][m], "std": run["std"][m]} for m in ("cider", "bleu4")},
                "trials": [
                    {"seed": t["seed"], **t["metrics"], "seconds": round(t["seconds"], 1), "predictions": t["predictions"]}
                    for t in run["trials"]
                ],
            }
        )  # fmt: skip
    by_key = {(s["mode"], s["ablate_images"], s["shots"]): s for s in settings}
    real = [s for s in settings if not s["ablate_images"]]
    best = max(real, key=lambda s: s["cider"]["mean"]) if real else None
    ratios: dict[str, Optional[float]] = {}  # real-image CIDEr / ablated CIDEr (None: both 0)
    for s in real:
        control = by_key.get((s["mode"], True, s["shots"]))
        if control is not None:
            value, base = s["cider"]["mean"], control["cider"]["mean"]
            ratios[f"{s['mode']} {s['shots']}-shot"] = value / base if base > 0 else (math.inf if value > 0 else None)
    four_vs_zero = {
        mode: by_key[(mode, False, 4)]["cider"]["mean"] >= by_key[(mode, False, 0)]["cider"]["mean"]
        for mode in results["protocol"]["modes"]
        if (mode, False, 4) in by_key and (mode, False, 0) in by_key
    }
    # The same comparison with what one evaluation resolves: per-image CIDEr, paired, 95% bootstrap interval.
    four_vs_zero_paired = {
        d["a"].split()[0]: {k: d[k] for k in ("difference", "ci95", "pairs", "resolved")}
        for d in results.get("paired_differences", [])
        if d["a"].endswith(" 4-shot") and d["b"].endswith(" 0-shot") and "ablated" not in d["a"]
    }
    num_samples = settings[0]["num_samples"] if settings else 0
    return {
        "metric_units": "percent (CIDEr x 100, as OpenFlamingo reports it; BLEU-4 x 100)",
        "test_images": num_test,
        "images_per_trial": num_samples,
        "subset": num_samples < num_test,
        "subset_note": (
            f"{num_samples} of the {num_test} test images per trial, drawn by the trial's seed; the same images for "
            "every setting (mode, shots, ablation) of a trial"
            if num_samples < num_test
            else f"all {num_test} test images"
        ),
        "trial_seeds": results["protocol"]["trial_seeds"],
        "protocol": results["protocol"],
        "settings": settings,
        "targets": {
            "best": None if best is None else {"mode": best["mode"], "shots": best["shots"], **best["cider"]},
            "cider_at_least_40": None if best is None else best["cider"]["mean"] >= 40,
            "cider_over_ablated": {k: (v if v is None or math.isinf(v) else round(v, 2)) for k, v in ratios.items()},
            "every_setting_at_least_3x_ablated": all(v is not None and v >= 3 for v in ratios.values())
            if ratios
            else None,
            "four_shot_not_worse_than_zero_shot": four_vs_zero,
            "four_minus_zero_shot_cider": four_vs_zero_paired,
        },
        "paired_differences": results.get("paired_differences", []),
    }


def binding_command(args, split_name: str, classes: list[str]) -> list[str]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cmd = [sys.executable, "-m", "vlm.eval", "binding", "--data", str(args.binding_data), "--split", "test",
           "--classes", *classes, "--model-dir", str(args.out / "train" / "export"),
           "--ways", *map(str, args.binding_ways), "--shots", *map(str, args.binding_shots),
           "--episodes", str(args.binding_episodes if split_name == "unseen" else args.binding_seen_episodes),
           "--trials", str(args.binding_trials),
           "--batch-size", str(args.eval_batch_size), "--device", device,
           "--dtype", eval_dtype(args.eval_dtype, device), "--out", str(args.out / f"eval_binding_{split_name}")]  # fmt: skip
    if args.binding_no_closed_form:
        cmd.append("--no-closed-form")
    if args.cache_dir is not None:
        cmd += ["--cache-dir", str(args.cache_dir)]
    if args.no_progress:
        cmd.append("--quiet")
    return cmd


# Frozen (Tsimpoukelli et al. 2021, Table 2, open-ended miniImageNet, no task induction, 1 repeat): 2-way 1-shot
# 29.0%, 3-shot 28.7% ... and 5-way about chance; with task induction 53.4 / 58.9%. For the README's table.
FROZEN_REFERENCE = {"2-way 1-shot": 29.0, "2-way 1-shot, task induction": 53.4}


def summarize_binding(results: dict) -> dict[str, Any]:
    """Per (ways, shots): open-ended and closed accuracy (mean, std), the ablated control, prototype, chance."""
    rows = []
    ablated = {(r["ways"], r["shots"]): r for r in results["runs"] if r["ablate_images"]}
    for r in results["runs"]:
        if r["ablate_images"]:
            continue
        a = ablated.get((r["ways"], r["shots"]))
        proto = results.get("prototype", {}).get(f"{r['ways']}-way", {}).get(str(r["shots"]))
        rows.append({
            "ways": r["ways"], "shots": r["shots"], "episodes": r["num_samples"], "trials": len(r["trials"]),
            "open_ended": r["mean"]["accuracy"], "open_ended_std": r["std"]["accuracy"],
            "closed": r["mean"].get("closed_accuracy"),
            "ablated_open_ended": None if a is None else a["mean"]["accuracy"],
            "ablated_closed": None if a is None else a["mean"].get("closed_accuracy"),
            "prototype": None if proto is None else proto["mean"],
            "chance": 100.0 / r["ways"],
        })  # fmt: skip
    return {"classes": results["data"]["classes"], "settings": rows,
            "paired_differences": results.get("paired_differences", [])}  # fmt: skip


def binding_targets(unseen: dict, seen: Optional[dict]) -> dict[str, Any]:
    """The reference run's binding targets, each True/False with the numbers it compares."""
    by = {(s["ways"], s["shots"]): s for s in unseen["settings"]}
    out: dict[str, Any] = {}
    out["at_least_prototype_every_setting"] = {
        f"{w}-way {k}-shot": {"open_ended": s["open_ended"], "prototype": s["prototype"], "met": s["open_ended"] >= s["prototype"]}
        for (w, k), s in sorted(by.items()) if s["prototype"] is not None
    }  # fmt: skip
    for (w, k), goal in (((2, 1), 85.0), ((4, 1), 65.0)):
        if (w, k) in by:
            out[f"{w}-way {k}-shot >= {goal:g}"] = {
                "value": by[(w, k)]["open_ended"],
                "met": by[(w, k)]["open_ended"] >= goal,
            }
    for w in sorted({w for w, _ in by}):
        if (w, 1) in by and (w, 3) in by:
            out[f"{w}-way 3-shot > 1-shot"] = {"values": [by[(w, 3)]["open_ended"], by[(w, 1)]["open_ended"]],
                                               "met": by[(w, 3)]["open_ended"] > by[(w, 1)]["open_ended"]}  # fmt: skip
    out["ablated_within_5_of_chance"] = {
        f"{w}-way {k}-shot": {"ablated": s["ablated_open_ended"], "chance": s["chance"],
                              "met": s["ablated_open_ended"] is not None and abs(s["ablated_open_ended"] - s["chance"]) <= 5}
        for (w, k), s in sorted(by.items()) if k > 0
    }  # fmt: skip
    out["zero_shot_open_ended"] = {f"{w}-way": s["open_ended"] for (w, k), s in sorted(by.items()) if k == 0}
    if seen is not None:
        seen_by = {(s["ways"], s["shots"]): s for s in seen["settings"]}
        out["seen_at_least_unseen"] = {
            f"{w}-way {k}-shot": {"seen": seen_by[(w, k)]["open_ended"], "unseen": s["open_ended"],
                                  "met": seen_by[(w, k)]["open_ended"] >= s["open_ended"]}
            for (w, k), s in sorted(by.items()) if (w, k) in seen_by and k > 0
        }  # fmt: skip
    return out


def plot_samples(path: Path, eval_dir: Path, setting: dict, title: str, rows: int = 3, cols: int = 4) -> None:
    """A grid of test photos, each with the generated caption and its first reference caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    lines = (eval_dir / setting["trials"][0]["predictions"]).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()][: rows * cols]
    rows = max(1, math.ceil(len(records) / cols))
    # constrained layout makes room for each photo's caption lines (tight_layout let them run into the row above)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 5.2 * rows), squeeze=False, layout="constrained")
    for ax, rec in zip(axes.flat, [*records, *[None] * (rows * cols - len(records))]):
        ax.axis("off")
        if rec is None:
            continue
        with Image.open(rec["image"]) as im:
            ax.imshow(im.convert("RGB"))
        gen = textwrap.fill(f"generated: {rec['prediction']}", 44)
        ref = textwrap.fill(f"reference: {rec['references'][0]}", 44)
        ax.set_title(f"{gen}\n{ref}", fontsize=8.5, loc="left")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", required=True, type=Path, help="Flickr8k: the tar or its extracted directory")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument(
        "--budget-cpu-seconds",
        type=float,
        default=None,
        help="bound on the training loop: run.max_seconds = N / (threads x processes); default: the config's "
        "run.max_steps and run.max_seconds",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help="training config (its data paths are replaced)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training config override, after the recipe's own; repeatable",
    )
    p.add_argument(
        "--launcher",
        choices=["auto", "deepspeed", "python"],
        default="auto",
        help="auto: deepspeed if on PATH, else python",
    )
    p.add_argument("--num-processes", type=int, default=None, help="training processes (deepspeed --num_gpus)")
    p.add_argument("--num-docs", type=int, default=6000, help="few-shot documents written from training pairs")
    p.add_argument(
        "--doc-images", type=int, nargs=2, default=[2, 5], metavar=("MIN", "MAX"), help="training images per document"
    )
    p.add_argument("--shots", type=int, nargs="+", default=[0, 4, 8])
    p.add_argument("--modes", nargs="+", choices=["random", "rices"], default=["random", "rices"])
    p.add_argument("--no-ablation", action="store_true", help="skip the image-ablated control")
    p.add_argument("--trials", type=int, default=1, help="evaluation trials (seeds 42, 43, ...)")
    p.add_argument("--num-samples", type=int, default=500, help="test images per trial (0 or >= the split: all 1,000)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=None,
                   help="beam width of the evaluation (default: vlm.eval's, OpenFlamingo's 3); 1 is greedy, ~2-3x faster")  # fmt: skip
    p.add_argument(
        "--eval-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bfloat16 where the device computes it natively",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="vlm.eval cache (extracted tar, RICES features)")
    p.add_argument("--seed", type=int, default=0, help="seed of the documents")
    p.add_argument("--binding-data", type=Path, default=None,
                   help="class tree with train/ and test/ (CIFAR-10's tar): train on binding episodes, evaluate binding")  # fmt: skip
    p.add_argument(
        "--binding-train-classes", nargs="+", default=["airplane", "automobile", "bird", "dog", "frog", "horse"]
    )
    p.add_argument("--binding-test-classes", nargs="+", default=["cat", "deer", "ship", "truck"],
                   help="classes never trained on (their test photos)")  # fmt: skip
    p.add_argument("--binding-ways", type=int, nargs="+", default=[2, 4])
    p.add_argument("--binding-shots", type=int, nargs="+", default=[0, 1, 3, 5])
    p.add_argument("--binding-episodes", type=int, default=500, help="episodes per number of ways and trial")
    p.add_argument("--binding-seen-episodes", type=int, default=None,
                   help="episodes for the trained classes (default: --binding-episodes)")  # fmt: skip
    p.add_argument("--binding-trials", type=int, default=1)
    p.add_argument("--binding-no-closed-form", action="store_true",
                   help="open-ended scoring only (the closed form scores every word with a full forward: ~3x slower)")  # fmt: skip
    p.add_argument("--skip-captioning-eval", action="store_true", help="evaluate binding only (with --binding-data)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.data, args.out = args.data.resolve(), args.out.resolve()
    if args.binding_data is not None:
        args.binding_data = args.binding_data.resolve()
        if not args.binding_data.exists():
            raise SystemExit(f"--binding-data {args.binding_data} does not exist")
        if args.binding_seen_episodes is None:
            args.binding_seen_episodes = args.binding_episodes
        overlap = set(args.binding_train_classes) & set(args.binding_test_classes)
        if overlap:
            raise SystemExit(f"--binding-test-classes must be classes never trained on; {sorted(overlap)} are in both")
    elif args.skip_captioning_eval:
        raise SystemExit("--skip-captioning-eval leaves nothing to evaluate without --binding-data")
    if not args.data.exists():
        raise SystemExit(f"--data {args.data} does not exist")
    if args.budget_cpu_seconds is not None and args.budget_cpu_seconds <= 0:
        raise SystemExit(f"--budget-cpu-seconds must be > 0, got {args.budget_cpu_seconds}")
    lo, hi = args.doc_images
    if not 1 <= lo <= hi:
        raise SystemExit(f"--doc-images needs 1 <= MIN <= MAX, got {lo} {hi}")
    if args.num_beams is not None and args.num_beams < 1:
        raise SystemExit(f"--num-beams must be >= 1, got {args.num_beams}")
    for name in ("num_docs", "trials", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_processes is not None and args.num_processes < 1:
        raise SystemExit(f"--num-processes must be >= 1, got {args.num_processes}")
    if any(k < 0 for k in args.shots):
        raise SystemExit(f"--shots must be >= 0, got {args.shots}")
    args.config = str(Path(args.config).resolve()) if Path(args.config).exists() else str(ROOT / args.config)
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    return run(args, command_line(argv))


def run(args: argparse.Namespace, command: str) -> dict:
    import torch

    from training.config import ConfigError, load_config
    from vlm.eval import load_flickr

    prefix = caption_prompt_prefix()
    shard_dir = args.out / "shards"
    # the config and overrides are checked before any work (placeholder data paths are replaced later)
    try:
        config = load_config(args.config, args.set)
    except ConfigError as e:
        raise SystemExit(f"error in --config/--set: {e}") from None
    threads = config.run.num_threads or torch.get_num_threads()
    cache = None if args.cache_dir is None else str(args.cache_dir)
    flickr = {split: load_flickr(args.data, split, cache) for split in ("train", "dev", "test")}
    num_test = len(flickr["test"])
    print(
        f"Flickr8k at {flickr['train'].root}: {len(flickr['train'])} train / {len(flickr['dev'])} dev / "
        f"{num_test} test images; output {args.out}"
    )
    args.out.mkdir(parents=True, exist_ok=True)

    shard_params = {
        "data": str(args.data),
        "num_docs": args.num_docs,
        "doc_images": list(args.doc_images),
        "seed": args.seed,
        "prefix": prefix,
        **(
            {}
            if args.binding_data is None
            else {"binding_data": str(args.binding_data), "binding_train_classes": list(args.binding_train_classes)}
        ),
    }
    shards_record = args.out / "shards" / "recipe_shards.json"
    shards = json.loads(shards_record.read_text()) if shards_record.is_file() else None
    if shards is None or shards["params"] != shard_params:
        shards = {"params": shard_params, **write_shards(args, flickr, shard_dir, prefix)}
        save_json(shards_record, shards)
    else:
        print(f"\n[shards] reusing {shard_dir} (written by an earlier run with the same settings)")

    train_cmd, launcher = training_command(args, shard_dir, prefix, threads)
    train_record = args.out / "train" / "recipe_train.json"
    training = json.loads(train_record.read_text()) if train_record.is_file() else None
    if training is not None and not same_training(training["command"], train_cmd):
        raise SystemExit(
            f"{args.out / 'train'} was trained by another command:\n  {' '.join(training['command'])}\n"
            "use another --out, or delete that directory to train again"
        )
    if training is None or not (args.out / "train" / "export" / "flamingo_config.json").is_file():
        training = {
            **run_command(train_cmd, args.out / "logs" / "train.log", f"training ({launcher})"),
            "launcher": launcher,
        }
        save_json(train_record, training)
    else:
        print(f"\n[training] reusing the finished run in {args.out / 'train'}")
    summary = training_summary(args.out / "train")
    curve = args.out / "train" / "loss_curve.png"
    if curve.is_file():
        shutil.copyfile(curve, args.out / "loss_curve.png")

    binding: Optional[dict[str, Any]] = None
    if args.binding_data is not None:
        binding = {"commands": {}, "seconds": {}}
        for name, classes in (("unseen", args.binding_test_classes), ("seen", args.binding_train_classes)):
            step = run_command(binding_command(args, name, list(classes)), args.out / "logs" / f"binding_{name}.log",
                               f"binding evaluation: {name} classes")  # fmt: skip
            binding[name] = summarize_binding(
                json.loads((args.out / f"eval_binding_{name}" / "results.json").read_text())
            )
            binding["commands"][name], binding["seconds"][name] = step["command"], step["seconds"]
            plot = args.out / f"eval_binding_{name}" / "binding_shots.png"
            if plot.is_file():
                shutil.copyfile(plot, args.out / f"binding_{name}.png")
        binding["targets"] = binding_targets(binding["unseen"], binding["seen"])
        binding["frozen_reference"] = FROZEN_REFERENCE
        print("\nbinding (CIFAR-10 test photos, evaluation-pool words, open-ended %):")
        for name in ("unseen", "seen"):
            print_table(["classes", "ways", "shots", "open-ended", "closed", "ablated", "prototype", "chance"],
                        [[name, s["ways"], s["shots"], f"{s['open_ended']:.1f}",
                          "-" if s["closed"] is None else f"{s['closed']:.1f}",
                          "-" if s["ablated_open_ended"] is None else f"{s['ablated_open_ended']:.1f}",
                          "-" if s["prototype"] is None else f"{s['prototype']:.1f}", f"{s['chance']:.1f}"]
                         for s in binding[name]["settings"]])  # fmt: skip
        save_json(args.out / "binding_results.json", binding)
    if args.skip_captioning_eval:
        print(f"wrote {args.out / 'binding_results.json'}")
        return {"binding": binding}
    evaluation = run_command(evaluation_command(args, num_test), args.out / "logs" / "eval.log", "evaluation")
    eval_results = json.loads((args.out / "eval" / "results.json").read_text())
    scores = summarize_eval(eval_results, num_test)

    results = {
        "recipe": "flickr8k_flamingo",
        "command": command,
        "data": str(args.data),
        "splits": {split: len(ds) for split, ds in flickr.items()},
        "prompt": f"<image>{prefix}{{caption}}<|endofchunk|> (documents and pairs in training; vlm.eval's prompt)",
        "budget_cpu_seconds": args.budget_cpu_seconds,
        "threads": threads,
        "shards": shards["stats"],
        "training": {
            **summary,
            "launcher": training["launcher"],
            "config": args.config,
            "wall_seconds": training["seconds"],
            "cpu_seconds": training["cpu_seconds"],
        },
        "evaluation": {**scores, "wall_seconds": evaluation["seconds"], "cpu_seconds": evaluation["cpu_seconds"]},
        "binding": binding,
        "commands": {
            "shards": [s["command"] for s in shards["steps"]],
            "train": training["command"],
            "eval": evaluation["command"],
        },
        "durations_seconds": {
            "shards": shards["seconds"],
            "training": training["seconds"],
            "evaluation": evaluation["seconds"],
        },
        "files": {"eval_results": "eval/results.json", "loss_curve": "loss_curve.png", "samples": "samples.png"},
    }
    rows = []
    for s in scores["settings"]:
        rows.append(
            [label(s), s["shots"], f"{s['cider']['mean']:.1f} ± {s['cider']['std']:.1f}",
             f"{s['bleu4']['mean']:.1f} ± {s['bleu4']['std']:.1f}", len(s["trials"]), s["num_samples"]]
        )  # fmt: skip
    print(f"\nFlickr8k test ({scores['subset_note']}):")
    results["table"] = print_table(["demonstrations", "shots", "CIDEr", "BLEU-4", "trials", "images"], rows)
    for mode, d in scores["targets"]["four_minus_zero_shot_cider"].items():
        lo, hi = d["ci95"]
        print(f"4-shot minus 0-shot CIDEr, {mode}: {d['difference']:+.2f}, 95% paired interval [{lo:+.2f}, {hi:+.2f}]")
    best = scores["targets"]["best"]
    if best is not None:
        setting = next(
            s
            for s in scores["settings"]
            if (s["mode"], s["shots"], s["ablate_images"]) == (best["mode"], best["shots"], False)
        )
        plot_samples(
            args.out / "samples.png",
            args.out / "eval",
            setting,
            f"Flickr8k test, {best['mode']} {best['shots']}-shot (CIDEr {best['mean']:.1f}), seed {setting['trials'][0]['seed']}",
        )
    save_json(args.out / "results.json", results)
    t = summary
    print(
        f"training: {t['steps']} steps ({'time limit' if t['stopped_by_time_limit'] else 'max_steps'}), "
        f"{t['samples_seen']} samples, {training['seconds']:.0f} s, loss {t['first_train_loss']:.3f} -> "
        f"{t['final_train_loss']:.3f}, held-out {t['final_val_loss']}, {t['precision']}, {training['launcher']}"
    )
    print(f"wrote {args.out / 'results.json'}, {args.out / 'samples.png'}, {args.out / 'loss_curve.png'}")
    return results


if __name__ == "__main__":
    main()
