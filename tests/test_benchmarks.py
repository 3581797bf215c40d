"""The benchmark scripts' shared measurements (FLOPs, rates, precision) are right, and both scripts run end to end
on smoke-test sizes in fp32 and bf16, writing their JSON and PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import count_flops, gemm_peak_gflops, precision_context, rate_rows  # noqa: E402


def test_flops_of_a_linear_training_step_are_counted():
    layer = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32, requires_grad=True)
    flops = count_flops(lambda: layer(x).sum().backward())
    assert flops == 3 * 2 * 8 * 32 * 16  # forward, grad of the input, grad of the weight


def test_bf16_precision_runs_matrix_multiplies_in_bf16():
    a = torch.randn(4, 4)
    with precision_context("bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with precision_context("fp32"):
        assert (a @ a).dtype == torch.float32
    with pytest.raises(ValueError, match="fp16"):
        precision_context("fp16")


def test_rates_and_ratios():
    rows = rate_rows({"ours": 1.0, "a": 2.0, "b": 4.0}, flops=10e9, peak_gflops=20.0)
    assert rows["ours"]["gflops"] == 10.0 and rows["ours"]["fraction_of_peak"] == 0.5
    assert rows["ours"]["speedup_vs_fastest_peer"] == 2.0 and rows["b"]["ours_speedup"] == 4.0
    assert 0 < gemm_peak_gflops("fp32", size=256, repeats=2) < 1e6


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encoder_benchmark_runs(tmp_path, precision):
    cmd = [sys.executable, "benchmarks/bench_encoder.py", "--part", "peers", "--configs", "tiny", "--repeats", "1",
           "--precision", precision, "--no-memory", "--profile", "--peak-size", "256", "--out-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    suffix = "" if precision == "fp32" else "_bf16"
    result = json.loads((tmp_path / f"encoder_peers{suffix}.json").read_text())["peers"]["tiny"]
    assert result["precision"] == precision and result["flops_per_step"] > 0 and result["gemm_peak_gflops"] > 0
    assert set(result["fraction_of_peak"]) == set(result["gemm_profile"]) == {"ours", "hf", "perceiver-pytorch"}
    for g in result["gemm_profile"].values():
        assert 0 < g["gemm_seconds"] < g["step_seconds"] and g["gemm_gflops"] > 0
    assert (tmp_path / f"encoder_peers{suffix}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_vlm_benchmark_runs_in_bf16(tmp_path):
    out = tmp_path / "vlm.json"
    cmd = [sys.executable, "benchmarks/bench_vlm.py", "--configs", "tiny", "--repeats", "1", "--new-tokens", "4",
           "--precision", "bf16", "--image-size", "32", "--peak-size", "256", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["precision"] == "bf16" and result["gemm_peak_gflops"] > 0
    tiny = result["configs"]["tiny"]
    assert tiny["identical_greedy_tokens"] and tiny["train_flops"] > 0 and tiny["generate_flops"] > 0
    assert set(tiny["train_fraction_of_peak"]) == {"ours", "openflamingo"}
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_episodes_benchmark_reads_the_same_episodes_both_ways(tmp_path):
    """On-the-fly episodes and the same episodes written as document shards: token-for-token equal, both timed."""
    from bench_episodes import main
    from vlm_helpers import register_tiny_clip, save_tiny_lm, save_tiny_tokenizer

    from data_pipelines.from_classes import write_class_shards
    from data_pipelines.shards import ShardWriterConfig
    from data_pipelines.synthetic import write_scene_classes

    clip = register_tiny_clip(tmp_path / "clip")
    save_tiny_tokenizer(tmp_path / "lm")
    save_tiny_lm(tmp_path / "lm", "llama")
    write_scene_classes(tmp_path / "scenes", per_class=4, image_size=32)
    write_class_shards(tmp_path / "scenes" / "test", ShardWriterConfig(tmp_path / "shards", prefix="scenes"),
                       show_progress=False)  # fmt: skip
    out = tmp_path / "episodes.json"
    result = main(["--shards", str(tmp_path / "shards" / "*.tar"), "--lm", str(tmp_path / "lm"), "--tower", clip,
                   "--tower-pretrained", "none", "--word-max-tokens", "0", "--batch-size", "2", "--batches", "2",
                   "--repeats", "1", "--out", str(out)])  # fmt: skip
    assert result["same_tokens"] is True
    saved = json.loads(out.read_text())
    for name in ("on_the_fly", "document_shards"):
        assert saved["median"][name]["episodes_per_s"] > 0 and saved["median"][name]["images_per_s"] > 0


def test_default_spread_summary_takes_mean_and_range_over_seeds():
    from bench_default_spread import format_summary, summarise

    def run(seed, captions, ablated, one_shot):
        table = [
            {"ways": 2, "shots": 0, "accuracy": 0.0, "ablated": 0.0, "prototype": None, "chance": 50.0,
             "trained": 0.0, "held_out": 0.0},
            {"ways": 2, "shots": 1, "accuracy": one_shot, "ablated": 50.0, "prototype": 90.0, "chance": 50.0,
             "trained": one_shot, "held_out": None},
        ]  # fmt: skip
        report = {"images": {"attribute_accuracy": captions}, "ablated": {"attribute_accuracy": ablated},
                  "binding": {"table": table}}  # fmt: skip
        return {"seed": seed, "wall_seconds": 600.0 + seed, "report": report}

    summary = summarise([run(0, 0.70, 0.10, 90.0), run(1, 0.80, 0.20, 100.0)])
    assert summary["caption_attributes"]["mean"] == pytest.approx(75.0)
    assert (summary["caption_attributes"]["min"], summary["caption_attributes"]["max"]) == pytest.approx((70.0, 80.0))
    assert summary["wall_seconds"]["values"] == [600.0, 601.0]
    one = summary["binding"][1]
    assert (one["ways"], one["shots"], one["accuracy"]["mean"], one["held_out"]) == (2, 1, 95.0, None)
    assert summary["binding"][0]["prototype"] is None
    assert "| 2 | 1 | 95.0 [90.0, 100.0] |" in format_summary(summary)


def test_training_step_profile_covers_every_part(tmp_path):
    """profile_train_step on the tiny random bases: every LM layer and cross-attention block has a forward and a
    backward time, and the parts add up to the step."""
    from profile_train_step import format_profile, profile
    from train_helpers import small_overrides

    overrides = [o for o in small_overrides(tmp_path / "cache", tmp_path / "unused") if not o.startswith("run.output")]
    result = profile(str(ROOT / "configs" / "tiny-random.yaml"), overrides, steps=2, warmup=1)
    parts = {r["part"]: r for r in result["parts"]}
    layers = [name for name in parts if name.startswith("layer ")]
    assert len(layers) == 2 and {"vision tower", "resampler", "lm head", "loss", "optimizer", "data"} <= set(parts)
    assert any(name.startswith("xattn ") for name in parts)
    assert all(parts[name]["forward_s"] > 0 and parts[name]["backward_s"] > 0 for name in layers)
    assert sum(r["total_s"] for r in result["parts"]) == pytest.approx(result["step_s"], rel=0.25)
    assert "layers (all)" in format_profile(result, by_layer=False)
