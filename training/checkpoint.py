"""Crash-safe DeepSpeed checkpoints with everything needed for an exact resume.

Layout of ``checkpoint.dir``::

    latest                      text file: the tag of the newest *complete* checkpoint (e.g. "step_00000200")
    step_00000200/              DeepSpeed's files (model, optimizer, ZeRO partitions) and, per rank,
        trainer_state_rank0.pt  step counters, LR-schedule state, loader positions, RNG states
    .staging/                   checkpoints being written

Writing: every rank writes into ``.staging/<tag>``; after a barrier rank 0 renames it to ``<tag>`` and only then
replaces ``latest`` (write ``latest.tmp``, fsync, ``os.replace``). A crash at any point leaves ``latest`` naming
the previous complete checkpoint; leftovers in ``.staging`` are removed at the next start. Older checkpoints
beyond ``keep_last`` are deleted after ``latest`` moved on.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .distributed import DistContext, barrier, broadcast_object

LATEST = "latest"
STAGING = ".staging"
TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointManager:
    """Saves and finds checkpoints of a DeepSpeed engine plus per-rank trainer state."""

    def __init__(self, directory: Path, ctx: DistContext, keep_last: int = 2) -> None:
        self.dir = Path(directory)
        self.ctx = ctx
        self.keep_last = keep_last

    # -- finding ------------------------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or None."""
        pointer = self.dir / LATEST
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        path = self.dir / tag
        if not TAG_RE.match(tag) or not path.is_dir():
            raise RuntimeError(f"{pointer} names {tag!r}, which is not a checkpoint directory in {self.dir}")
        return path

    def completed(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
        return sorted(found, key=lambda p: int(TAG_RE.match(p.name).group(1)))

    def clean_staging(self) -> None:
        """Remove checkpoints left half-written by a crash (rank 0, at start-up)."""
        if self.ctx.is_main and (self.dir / STAGING).exists():
            shutil.rmtree(self.dir / STAGING, ignore_errors=True)
        barrier()

    # -- writing ------------------------------------------------------------------------------------------------
    def save(self, engine: Any, step: int, trainer_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint path."""
        tag = tag_for(step)
        staging_root = self.dir / STAGING
        if self.ctx.is_main:
            staging_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging_root / tag, ignore_errors=True)
        barrier()
        engine.save_checkpoint(str(staging_root), tag=tag, save_latest=False, exclude_frozen_parameters=True)
        state_path = staging_root / tag / f"trainer_state_rank{self.ctx.rank}.pt"
        state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(trainer_state, state_path)
        with open(state_path, "rb") as f:
            os.fsync(f.fileno())
        barrier()
        error = None
        if self.ctx.is_main:
            try:
                self._publish(staging_root / tag, tag)
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        error = broadcast_object(error)
        if error is not None:
            raise RuntimeError(f"could not publish checkpoint {tag} in {self.dir}: {error}")
        return self.dir / tag

    def _publish(self, staged: Path, tag: str) -> None:
        final = self.dir / tag
        trash = None
        if final.exists():  # the same step saved again (e.g. a stop and resume at the same step)
            trash = self.dir / STAGING / f"{tag}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(staged, final)
        _fsync_dir(self.dir)
        pointer_tmp = self.dir / f"{LATEST}.tmp"
        with open(pointer_tmp, "w") as f:
            f.write(tag + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, self.dir / LATEST)
        _fsync_dir(self.dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        for old in self.completed()[: -self.keep_last]:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)

    # -- reading ------------------------------------------------------------------------------------------------
    def load(self, engine: Any, path: Path) -> dict[str, Any]:
        """Load model/optimizer states into the engine and return this rank's trainer state."""
        path = Path(path)
        state_path = path / f"trainer_state_rank{self.ctx.rank}.pt"
        if not state_path.is_file():
            saved = sorted(p.name for p in path.glob("trainer_state_rank*.pt"))
            raise RuntimeError(
                f"checkpoint {path} has no state for rank {self.ctx.rank} (it holds {saved}); resuming needs the "
                f"same number of processes as the run that wrote it"
            )
        trainer_state = torch.load(state_path, map_location="cpu", weights_only=False)
        if trainer_state.get("world_size") != self.ctx.world_size:
            raise RuntimeError(
                f"checkpoint {path} was written by {trainer_state.get('world_size')} processes, this run has "
                f"{self.ctx.world_size}; resume with the same world size"
            )
        load_path, _ = engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_module_strict=False,  # frozen backbone weights are not in the checkpoint: they come from the bases
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        return trainer_state
