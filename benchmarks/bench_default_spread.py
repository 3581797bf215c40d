"""The default job's scores over several seeds: mean and range of the caption and binding accuracies, and wall time.

    python benchmarks/bench_default_spread.py --seeds 0 1 2 --out benchmarks/results/default_spread.json
    python benchmarks/bench_default_spread.py --seeds 0 1 2 --emulate-avx2 ...   # a bf16 CPU standing in for AVX2

Each seed runs ``training/train.py`` (the embedded default config, or ``--config``) as its own process into
``<work-dir>/seed<N>`` with ``run.seed=N`` (which draws the initialisation, the data order and the episodes), timing
the command from start to its last printed line; the bases and the generated data are prepared once before the
first timed run, and that preparation is reported apart. ``--emulate-avx2`` runs the jobs with fp32 and the
libraries capped at AVX2 (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``), as a CPU
without native bf16 would. A seed whose ``few_shot.json`` is already complete is read back, not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREPARE = """
import sys
from pathlib import Path
from data_pipelines.synthetic import write_scene_classes
from training.config import load_config
from training.data import ensure_synthetic
from training.modeling import resolve_bases
config = load_config(sys.argv[1] or None, sys.argv[2:])
resolve_bases(config.model, config.data.cache_dir)
ensure_synthetic(config.data, show_progress=False)
write_scene_classes(Path(config.data.cache_dir) / "scene_classes-60", per_class=60)
"""
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_description() -> dict:
    name = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and name in ("", "x86_64"):
                name = line.split(":", 1)[1].strip()
        flags = sorted({f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f" {f}" in text})
    except OSError:
        pass
    return {"cpu": name, "flags": flags, "cores": os.cpu_count()}


def run_seed(seed: int, args, env: dict, extra: list[str]) -> dict:
    out = args.work_dir / f"seed{seed}"
    report_path = out / "few_shot.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if "binding" in report and (out / "wall_seconds.json").is_file():
            return {"seed": seed, **json.loads((out / "wall_seconds.json").read_text()), "report": report}
    command = [sys.executable, str(ROOT / "training" / "train.py")]
    if args.config:
        command += ["--config", str(args.config)]
    command += [f"run.seed={seed}", f"run.output_dir={out}", "logging.progress_bar=false", *extra]
    log = args.work_dir / f"seed{seed}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed}: training/train.py exited {proc.returncode}; see {log}")
    timing = {"wall_seconds": round(seconds, 1), "command": " ".join(command[1:])}
    (out / "wall_seconds.json").write_text(json.dumps(timing))
    return {"seed": seed, **timing, "report": json.loads(report_path.read_text())}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}


def summarise(runs: list[dict]) -> dict:
    captions = [100 * r["report"]["images"]["attribute_accuracy"] for r in runs]
    ablated = [100 * r["report"]["ablated"]["attribute_accuracy"] for r in runs if "ablated" in r["report"]]
    summary = {"wall_seconds": spread([r["wall_seconds"] for r in runs]), "caption_attributes": spread(captions)}
    if ablated:
        summary["caption_attributes_ablated"] = spread(ablated)
    rows: dict[tuple[int, int], dict] = {}
    for r in runs:
        for row in r["report"]["binding"]["table"]:
            rows.setdefault((row["ways"], row["shots"]), []).append(row)
    binding = []
    for (ways, shots), group in sorted(rows.items()):
        entry = {"ways": ways, "shots": shots, "chance": group[0]["chance"]}
        for key in ("accuracy", "ablated", "prototype", "trained", "held_out"):
            values = [g[key] for g in group if g.get(key) is not None]
            entry[key] = spread(values) if values else None
        binding.append(entry)
    summary["binding"] = binding
    return summary


def format_summary(summary: dict) -> str:
    def cell(s):
        return "-" if s is None else f"{s['mean']:.1f} [{s['min']:.1f}, {s['max']:.1f}]"

    lines = [
        f"wall time s: {cell(summary['wall_seconds'])}",
        f"caption attributes right %: {cell(summary['caption_attributes'])}"
        + (
            f"; constant images {cell(summary['caption_attributes_ablated'])}"
            if "caption_attributes_ablated" in summary
            else ""
        ),  # fmt: skip
        "| ways | shots | model | trained classes | held-out classes | images ablated | prototype | chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["binding"]:
        lines.append(
            f"| {r['ways']} | {r['shots']} | {cell(r['accuracy'])} | {cell(r['trained'])} | {cell(r['held_out'])} | "
            f"{cell(r['ablated'])} | {cell(r['prototype'])} | {r['chance']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=None, help="training config (default: the embedded default)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "default_spread")
    parser.add_argument("--emulate-avx2", action="store_true", help="fp32 and AVX2-capped libraries (see above)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary and every run here (JSON)")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad:
        parser.error(f"unexpected arguments {bad}: expected key=value overrides of the training config")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.emulate_avx2:
        env.update(AVX2_ENV)
        extra = [*extra, "run.precision=fp32"]
    # one-time preparation (bases, generated data): a zero-step run, timed apart from the jobs
    start = time.perf_counter()
    prep = [sys.executable, "-c", PREPARE, str(args.config or ""), *extra]
    subprocess.run(prep, cwd=ROOT, env=env, check=True, capture_output=True)
    preparation = time.perf_counter() - start
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args, env, extra))
        print(f"seed {seed}: {runs[-1]['wall_seconds']:.0f} s", flush=True)
    summary = summarise(runs)
    print(format_summary(summary))
    result = {
        "machine": cpu_description(),
        "emulate_avx2": args.emulate_avx2,
        "overrides": extra,
        "config": str(args.config) if args.config else "embedded default (configs/default.yaml)",
        "preparation_seconds": round(preparation, 1),
        "summary": summary,
        "runs": [{k: v for k, v in r.items()} for r in runs],
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
