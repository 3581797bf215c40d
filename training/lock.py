"""An exclusive lock on a run's output directory, so two runs cannot write the same checkpoints, export and metrics.

``fcntl.flock`` on ``<output_dir>/.lock``, taken by rank 0 when the trainer starts and held for its lifetime; the
file records the holder (pid, host, start time). The kernel releases the lock when the holding process exits, even
when it is killed, so a crashed run never leaves a stale lock (the file stays; its content only describes the last
holder). Only rank 0 takes it: every rank of a run writes under the same ``output_dir`` through rank 0's decisions
(checkpoint publishing, export, metrics), so one holder per run suffices; on several machines the output directory
must be on a shared file system anyway, and ``flock`` works across machines on NFSv4 and Lustre. A second run stops
on all its ranks (rank 0 broadcasts the failure) with an error naming the directory and the holder.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from .config import ConfigError
from .distributed import DistContext, broadcast_object

LOCK_NAME = ".lock"


class OutputDirBusy(ConfigError):
    """Another run holds the output directory's lock."""


class OutputDirLock:
    """Holds ``<directory>/.lock`` exclusively until :meth:`release` (or process exit)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputDirLock:
        """Take the lock without waiting; :class:`OutputDirBusy` names the holder when another process has it."""
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise OutputDirBusy(
                f"run.output_dir: {str(self.directory)!r} is in use by another run ({holder}; lock {self.path}). "
                "Wait for it to finish, stop it, or use another run.output_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode("utf-8", "replace") or "{}")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown: the lock file does not say"


def lock_output_dir(directory: Path, ctx: DistContext) -> Optional[OutputDirLock]:
    """Collective: rank 0 takes the lock; a failure is raised on every rank. Returns the lock (None on other ranks)."""
    lock, error = None, None
    if ctx.is_main:
        try:
            lock = OutputDirLock(directory).acquire()
        except (OutputDirBusy, OSError) as e:
            error = str(e) if isinstance(e, OutputDirBusy) else f"run.output_dir: cannot lock {directory}: {e}"
    error = broadcast_object(error)
    if error is not None:
        raise OutputDirBusy(error)
    return lock
