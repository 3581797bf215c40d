"""End-to-end runs through the real launchers: two CPU ranks (gloo) with ZeRO-0/2/3 and activation checkpointing,
a non-finite loss on one rank, and a training process killed with SIGKILL then resumed."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import ROOT, WORKER_STEPS, run_training, small_args, small_config

from training.metrics import read_records, train_losses

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # set by in-process runs
        env.pop(key, None)
    return env


def _deepspeed(num_procs: int, *args: str) -> list[str]:
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*launcher, "--num_gpus", str(num_procs), "--master_port", str(_free_port()), *args]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-ranks")
    result = root / "result.json"
    cmd = _deepspeed(2, "tests/train_helpers.py", str(root / "cache"), str(root / "runs"), str(result))
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and result.is_file(), proc.stdout[-4000:] + proc.stderr[-4000:]
    ranks = json.loads(result.read_text())
    assert len(ranks) == 2
    return ranks


def _losses(entry: dict) -> list:
    return [entry["losses"][str(s)] for s in range(1, WORKER_STEPS + 1)]


def test_two_ranks_every_rank_logs_the_same_losses(two_rank_results):
    rank0, rank1 = two_rank_results
    for name in rank0:
        assert rank0[name]["world_size"] == 2
        assert _losses(rank0[name]) == _losses(rank1[name])


def test_zero2_and_zero3_match_zero0(two_rank_results):
    runs = two_rank_results[0]
    reference = torch.tensor(_losses(runs["zero0"]))
    assert [runs[n]["zero_stage"] for n in ("zero0", "zero2", "zero3")] == [0, 2, 3]
    for name in ("zero2", "zero3"):
        torch.testing.assert_close(torch.tensor(_losses(runs[name])), reference, rtol=1e-4, atol=1e-5)
    assert runs["zero2"]["param_checksum"] == pytest.approx(runs["zero0"]["param_checksum"], rel=1e-5)
    assert reference[-1] < reference[0]  # it trains


def test_zero3_resume_evaluation_and_export(two_rank_results):
    """Under ZeRO-3 with two ranks: stop at step 2 and resume gives the uninterrupted losses; the held-out
    evaluation (with few-shot generation) ran; the export holds exactly the trained parameters."""
    from training.modeling import load_exported

    runs = two_rank_results[0]
    assert runs["zero3_resumed"]["start_step"] == 2
    torch.testing.assert_close(
        torch.tensor(_losses(runs["zero3_resumed"])), torch.tensor(_losses(runs["zero3"])), rtol=0, atol=1e-6
    )
    assert math.isfinite(runs["zero3"]["eval_loss"])
    records = read_records(Path(runs["zero3"]["export_dir"]).parent / "metrics.jsonl")
    generations = [r for r in records if r["kind"] == "eval"][0]["generations"]
    assert len(generations) == 2 and all(g["true"] for g in generations)
    exported = load_exported(runs["zero3"]["export_dir"])  # no DeepSpeed
    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in exported.parameters()))
    assert checksum == pytest.approx(runs["zero3"]["param_checksum"], rel=1e-9)


def test_activation_checkpointing_with_zero3(two_rank_results):
    runs = two_rank_results[0]
    torch.testing.assert_close(
        torch.tensor(_losses(runs["zero3_ckpt"])), torch.tensor(_losses(runs["zero3"])), rtol=1e-5, atol=1e-6
    )


def test_nonfinite_loss_on_one_rank_is_skipped_on_both(two_rank_results):
    for runs in two_rank_results:  # rank 0's loss was finite; it skips the step too
        nan_run, clean = runs["zero2_nan_rank1"], runs["zero2"]
        assert nan_run["losses"]["2"] is None and nan_run["nonfinite_total"] == 1
        # the same step 1; equal up to summation order (on some CPUs the kernels' sums depend on memory alignment)
        assert nan_run["losses"]["1"] == pytest.approx(clean["losses"]["1"], rel=1e-6)
        assert all(math.isfinite(nan_run["losses"][s]) for s in ("3", "4"))
    assert two_rank_results[0]["zero2_nan_rank1"]["param_checksum"] == pytest.approx(
        two_rank_results[1]["zero2_nan_rank1"]["param_checksum"], rel=1e-6
    )


def test_killed_run_resumes_with_the_same_losses(tmp_path):
    """SIGKILL a `deepspeed training/train.py` run after step 5, restart it with `python training/train.py`:
    the loss trajectory equals that of an uninterrupted run."""
    cache = tmp_path / "cache"
    steps = ["run.max_steps=16", "checkpoint.every_steps=2"]
    reference, _ = run_training(small_config(cache, tmp_path / "reference", *steps))

    out = tmp_path / "killed"
    args = small_args(cache, out, *steps)
    proc = subprocess.Popen(
        _deepspeed(1, "training/train.py", *args),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if max(train_losses(out / "metrics.jsonl"), default=0) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert 4 <= int(latest.removeprefix("step_")) < 16, latest

    resumed = subprocess.run(
        [sys.executable, "training/train.py", *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / latest}" in resumed.stdout + resumed.stderr
    records = [r for r in read_records(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 17))
    got = torch.tensor([r["loss"] for r in records])
    expected = torch.tensor([reference.losses[s] for s in range(1, 17)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
