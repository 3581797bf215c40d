"""Stopping a run without losing work: SIGTERM (what cluster schedulers send before preemption), SIGINT (Ctrl-C),
and a launcher that is gone.

The trainer installs :class:`StopRequests` for the training loop. A signal only sets a flag; after the step in
progress, every rank agrees on it (any rank's request stops all of them at the same step), the trainer writes a
checkpoint through the same atomic path as a periodic one, prints where, and ``training/train.py`` exits with
``128 + signal`` (143 for SIGTERM, 130 for SIGINT), the shell's convention for "stopped by this signal". Running
the same command again resumes from that step. A second signal while the first is handled stops at once (the
previous complete checkpoint stays intact).

The ``deepspeed`` command does not pass a SIGTERM on to the ranks of a local run (its ``launch`` child does, with
a 30-second grace before SIGKILL); so each rank also watches the DeepSpeed launcher processes above it and stops,
with a checkpoint, when one of them is gone: no rank keeps training as an orphan.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

#: Exit status of a run stopped by a signal (the shell's 128 + signal number).
EXIT_SIGTERM = 128 + signal.SIGTERM
EXIT_SIGINT = 128 + signal.SIGINT


class TrainingInterrupted(Exception):
    """The run stopped early on a request; a checkpoint of ``step`` was written at ``checkpoint``."""

    def __init__(self, reason: str, signum: int, step: int, checkpoint: Optional[Path]) -> None:
        super().__init__(f"{reason}: stopped at step {step}, checkpoint {checkpoint}")
        self.reason = reason
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent_of(pid: int) -> Optional[int]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def launcher_ancestors(max_depth: int = 6) -> list[tuple[int, str]]:
    """(pid, command line) of the DeepSpeed launcher processes above this one (Linux ``/proc``; [] elsewhere)."""
    found, pid = [], os.getppid()
    for _ in range(max_depth):
        if pid is None or pid <= 1:
            break
        command = _command_line(pid)
        if "deepspeed" in command:
            found.append((pid, command))
        pid = _parent_of(pid)
    return found


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = ""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        pass
    return state != "Z"  # a zombie is gone too


class StopRequests:
    """Signal handlers (SIGTERM, SIGINT) and launcher watching for the training loop; a context manager."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, watch_launcher: bool = True) -> None:
        self.signum: Optional[int] = None
        self.reason: Optional[str] = None
        self._previous: dict[int, object] = {}
        self._launchers = launcher_ancestors() if watch_launcher else []

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # a second signal: stop now
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        self.reason = f"received {signal.Signals(signum).name}"
        print(
            f"\n{self.reason}: finishing the current step, then writing a checkpoint "
            "(send it again to stop at once; the last complete checkpoint stays)",
            file=sys.stderr,
            flush=True,
        )

    def pending(self) -> bool:
        """This process's request: a signal received, or a DeepSpeed launcher above it gone."""
        if self.signum is not None:
            return True
        for pid, command in self._launchers:
            if not pid_alive(pid):
                self.signum = signal.SIGTERM
                self.reason = f"the launcher (pid {pid}: {command.strip()[:80]}) is gone"
                print(f"\n{self.reason}: writing a checkpoint and stopping", file=sys.stderr, flush=True)
                return True
        return False
