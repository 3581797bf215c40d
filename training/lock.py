"""Exclusive locks on the directories a run writes, so two runs cannot write the same checkpoints, export and metrics.

``fcntl.flock`` on ``<output_dir>/.lock``, taken by rank 0 when the trainer starts and held for its lifetime; the
file records the holder (pid, host, start time). The kernel releases the lock when the holding process exits, even
when it is killed, so a crashed run never leaves a stale lock (the file stays; its content only describes the last
holder). Only rank 0 takes it: every rank of a run writes under the same ``output_dir`` through rank 0's decisions
(checkpoint publishing, export, metrics), so one holder per run suffices; on several machines the output directory
must be on a shared file system anyway, and ``flock`` works across machines on NFSv4 and Lustre. A second run stops
on all its ranks (rank 0 broadcasts the failure) with an error naming the directory and the holder.

``checkpoint.dir`` and ``checkpoint.export_dir`` may point anywhere, so the output directory's lock alone would let
two runs with different output directories share them. Each run therefore also locks both, always (not only when
they lie outside its own output directory: a run pointing ``checkpoint.dir`` at another run's default
``<output_dir>/checkpoints`` must meet a lock that the other run took, though for that run the directory is inside
its output directory). The lock of such a directory ``D`` is the sibling file ``D.parent / ".<D.name>.lock"``:

- not ``D/.lock``: the export directory is replaced on every export (the new one is renamed into place, the old one
  moved aside and deleted), so a lock file inside it would leave with the old directory, and the next run would lock
  another inode; an export's staging and moved-aside directories (``.<name>-XXXX``, ``.<name>-old-<pid>``) are
  siblings of ``D`` too, so the lock belongs where they are. The checkpoint directory is never replaced, but a sibling
  lock needs no directory created before anything is written (a failed start leaves no empty ``checkpoints/``).
- not the parent directory as a whole (``D.parent / ".lock"``): runs exporting to ``/models/a`` and ``/models/b``
  share ``/models`` and write nothing in common; only runs writing the same ``D`` are refused.

Paths are resolved first, so two spellings of one directory (``..``, symbolic links) meet the same lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from .config import ConfigError, TrainConfig
from .distributed import DistContext, broadcast_object

LOCK_NAME = ".lock"


class OutputDirBusy(ConfigError):
    """Another run holds the output directory's lock."""


class OutputDirLock:
    """Holds ``lock_path`` (default ``<directory>/.lock``) exclusively until :meth:`release` (or process exit).

    ``key``: the config key that named ``directory``, for the error message."""

    def __init__(self, directory: Path, key: str = "run.output_dir", lock_path: Optional[Path] = None) -> None:
        self.directory = Path(directory)
        self.key = key
        self.path = Path(lock_path) if lock_path is not None else self.directory / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputDirLock:
        """Take the lock without waiting; :class:`OutputDirBusy` names the holder when another process has it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            resolved = self.directory.resolve()
            named = repr(str(self.directory)) + ("" if resolved == self.directory else f" (that is {resolved})")
            raise OutputDirBusy(
                f"{self.key}: {named} is in use by another run ({holder}; lock {self.path}). "
                f"Wait for it to finish, stop it, or use another {self.key}"
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


def sibling_lock_path(directory: Path) -> Path:
    """``D.parent / ".<D.name>.lock"`` for the resolved ``D`` (see the module's docstring for why a sibling)."""
    resolved = Path(directory).resolve()
    if resolved.parent == resolved:  # the file system's root: no sibling
        return resolved / LOCK_NAME
    return resolved.parent / f".{resolved.name}{LOCK_NAME}"


class RunLocks:
    """The locks of one run (output directory, checkpoint directory, export directory), released together."""

    def __init__(self, locks: list[OutputDirLock]) -> None:
        self.locks = locks

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()


def run_lock_specs(config: TrainConfig) -> list[tuple[str, Path, Path]]:
    """(config key, directory, lock file) for every directory the run writes; one entry per lock file."""
    specs = [
        ("run.output_dir", Path(config.run.output_dir), Path(config.run.output_dir) / LOCK_NAME),
        ("checkpoint.dir", config.checkpoint_dir, sibling_lock_path(config.checkpoint_dir)),
        ("checkpoint.export_dir", config.export_dir, sibling_lock_path(config.export_dir)),
    ]
    unique: dict[Path, tuple[str, Path, Path]] = {}
    for key, directory, path in specs:
        unique.setdefault(path.resolve(), (key, directory, path))  # checkpoint.dir == export_dir: one lock
    return list(unique.values())


def lock_run_dirs(config: TrainConfig, ctx: DistContext) -> Optional[RunLocks]:
    """Collective: rank 0 locks the output, checkpoint and export directories (all or none); a failure is raised
    on every rank. Returns the locks (None on other ranks)."""
    locks, error = None, None
    if ctx.is_main:
        taken: list[OutputDirLock] = []
        try:
            for key, directory, path in run_lock_specs(config):
                try:
                    taken.append(OutputDirLock(directory, key, path).acquire())
                except OSError as e:
                    raise OutputDirBusy(f"{key}: cannot lock {directory} ({path}): {e}") from e
            locks = RunLocks(taken)
        except OutputDirBusy as e:
            RunLocks(taken).release()
            error = str(e)
    error = broadcast_object(error)
    if error is not None:
        raise OutputDirBusy(error)
    return locks
