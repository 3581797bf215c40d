"""SIGTERM, Ctrl-C and a vanished launcher stop training with a checkpoint of the step just finished, a message and
a documented exit status; the same command resumes from that step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import ROOT, small_args

from training.checkpoint import tag_for
from training.preemption import EXIT_SIGINT, EXIT_SIGTERM, StopRequests, launcher_ancestors

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("preemption-cache")


def _start(cache, out: Path, *extra: str) -> subprocess.Popen:
    args = small_args(
        cache, out, "run.max_steps=100000", "checkpoint.every_steps=10", "checkpoint.keep_last=100", *extra
    )
    return subprocess.Popen(
        [sys.executable, "training/train.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    target = out / "checkpoints" / tag_for(step)
    deadline = time.monotonic() + timeout
    while not target.is_dir():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no checkpoint {target} after {timeout} s")
        time.sleep(0.2)


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, EXIT_SIGTERM), (signal.SIGINT, EXIT_SIGINT)])
def test_a_signal_checkpoints_the_current_step_and_the_rerun_resumes_there(cache, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = _start(cache, out)
    _wait_for_checkpoint(out, 10, proc)
    time.sleep(1.0)  # a few steps past the periodic checkpoint
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    last = _steps(out)[-1]
    assert last > 10, _steps(out)  # the step it stopped at
    assert f"received {signal.Signals(sig).name}" in stderr
    assert f"checkpoint of step {last} at" in stderr and "run again to resume" in stderr
    assert not (out / "checkpoints" / ".staging").exists()
    rerun = subprocess.run(
        [sys.executable, "training/train.py", *small_args(cache, out, f"run.max_steps={last + 1}")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / tag_for(last)} at step {last}" in rerun.stdout + rerun.stderr


def test_stop_requests_flag_signals_and_restore_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests(watch_launcher=False) as requests:
        assert not requests.pending()
        os.kill(os.getpid(), signal.SIGTERM)
        assert requests.pending() and requests.signum == signal.SIGTERM
        assert requests.reason == "received SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_rank_whose_launcher_is_gone_stops(tmp_path):
    """A stand-in launcher ('deepspeed' in its command line) starts a child that watches it; killing the launcher
    makes the child report the request instead of running on as an orphan."""
    child = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
        "from training.preemption import StopRequests, launcher_ancestors\n"
        "print(len(launcher_ancestors()), flush=True)\n"
        "with StopRequests() as r:\n"
        "    for _ in range(600):\n"
        "        if r.pending():\n"
        "            print('stopped:', r.reason, flush=True); break\n"
        "        time.sleep(0.05)\n"
    )
    script = tmp_path / "child.py"
    script.write_text(child)
    launcher = tmp_path / "fake-deepspeed-launcher.py"
    out = tmp_path / "child.out"
    launcher.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(script)!r}], stdout=open({str(out)!r}, 'w'))\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, str(launcher)])
    deadline = time.monotonic() + 30
    while not (out.exists() and out.read_text().strip()):
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.1)
    assert out.read_text().split()[0] == "1"  # it found its launcher
    proc.send_signal(signal.SIGTERM)  # the launcher dies; the child is reparented
    proc.wait()
    deadline = time.monotonic() + 20
    while "stopped:" not in out.read_text():
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.1)
    assert "the launcher (pid" in out.read_text() and "is gone" in out.read_text()
    assert launcher_ancestors() == [] or all("deepspeed" in c for _, c in launcher_ancestors())
