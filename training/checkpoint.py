"""Crash-safe, verified DeepSpeed checkpoints with everything needed for an exact resume.

Layout of ``checkpoint.dir``::

    latest                          text file: the tag of the newest published checkpoint (e.g. "step_00000200")
    step_00000200/                  DeepSpeed's files (model, optimizer, ZeRO partitions) plus, per rank,
        trainer_state_rank0.json    step counters, LR-schedule state, loader positions, RNG states (plain JSON)
        manifest.json               size and SHA-256 of every other file, written last
    .staging/                       checkpoints being written

Writing: every rank writes into ``.staging/<tag>``; after a barrier rank 0 checks that the checkpoint is complete
(every rank's trainer state, DeepSpeed's files readable), fsyncs the files, writes ``manifest.json``, renames the
directory to ``<tag>`` and only then replaces ``latest`` (``latest.tmp``, fsync, ``os.replace``). A crash at any
point leaves ``latest`` naming the previous complete checkpoint; leftovers in ``.staging`` are removed at the next
start. Older checkpoints beyond ``keep_last`` are deleted after ``latest`` moved on.

Reading: a checkpoint is used only if every file in its manifest is there with the recorded size and checksum.
``latest`` first, then older checkpoints, newest first; a damaged one is skipped with a warning naming it and its
bad file. (Cost: rank 0 reads every file once after writing and once before resuming, for the SHA-256 -- roughly a
second per GB and core, files hashed in parallel.) Nothing read on resume can run code: the trainer state is JSON, and DeepSpeed's own files are read with
``torch.load(weights_only=True)`` (tensors and plain containers, plus the three DeepSpeed bookkeeping classes of
:data:`DEEPSPEED_SAFE_GLOBALS`, which are rebuilt field by field and run no code of the file's choosing). The model
weights are loaded strictly: the checkpoint must hold exactly the tensors the model trains (see
:func:`strict_module_loader`).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .distributed import DistContext, barrier, broadcast_object
from .preemption import pid_alive

logger = logging.getLogger(__name__)

LATEST = "latest"
STAGING = ".staging"
#: Free space below which a failed checkpoint write is reported as a full disk.
LOW_DISK_BYTES = 64 * 2**20
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
STATE_VERSION = 2  # 1: pickled trainer_state_rank<r>.pt (no longer read: loading a pickle can run code)
TAG_RE = re.compile(r"^step_(\d{8,})$")
LEGACY_STATE_GLOB = "trainer_state_rank*.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is damaged, incomplete or does not fit this run; the message names the file."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def state_file(rank: int) -> str:
    return f"trainer_state_rank{rank}.json"


# ---------------------------------------------------------------------------------------------- RNG states


def _encode_bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _decode_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as plain JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _encode_bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_encode_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_decode_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode_bytes(s) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------- files


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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync'd, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _checksums(root: Path, files: list[Path]) -> dict[str, dict[str, Any]]:
    """relative path -> {"size", "sha256"}; hashed in a few threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        digests = list(pool.map(sha256_of, files))
    return {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": d} for p, d in zip(files, digests, strict=True)
    }


def _check_torch_file(path: Path) -> Optional[str]:
    """Why a ``torch.save`` zip file is unreadable (truncated: no central directory), or None."""
    if path.stat().st_size == 0:
        return "is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # the start of a zip whose end (central directory) is missing
                return "is truncated (its zip central directory is missing)"
        return None  # legacy (non-zip) torch serialization: nothing cheap to check
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        return f"is not a readable torch file ({e})"
    return None


def verify_checkpoint(path: Path) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be used (naming the file), or None when every file in its manifest is
    present with the recorded size and SHA-256."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if any(path.glob(LEGACY_STATE_GLOB)):
            return f"{path} was written by an older version of this trainer (pickled trainer state, no {MANIFEST})"
        return f"{manifest_path} is missing (the checkpoint was not completely written)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{manifest_path} is unreadable ({type(e).__name__}: {e})"
    for rel, expected in sorted(files.items()):
        file = path / rel
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{file} has {size} bytes, the manifest records {expected['size']} (truncated or overwritten)"
    for rel, expected in sorted(files.items()):
        digest = sha256_of(path / rel)
        if digest != expected["sha256"]:
            return f"{path / rel} does not match its SHA-256 in {manifest_path} (the file is corrupt)"
    return None


# ---------------------------------------------------------------------------------------------- safe loading


DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


def _deepspeed_safe_globals() -> list[Any]:
    """The classes of :data:`DEEPSPEED_SAFE_GLOBALS` (DeepSpeed's bookkeeping in its optimizer-state files: plain
    fields, rebuilt by the weights-only unpickler without running code); those this DeepSpeed lacks are left out."""
    import importlib

    found: list[Any] = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # pragma: no cover - other DeepSpeed versions
            continue
    return found


class _WeightsOnlyLoads:
    """Stands in for a DeepSpeed checkpoint engine while loading: ``load`` is ``torch.load(weights_only=True)``
    (allowing only :data:`DEEPSPEED_SAFE_GLOBALS`) and names the file when it fails; everything else delegates."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._allowed = _deepspeed_safe_globals()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(self._allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise CheckpointError(f"cannot load {path}: {type(e).__name__}: {e}") from e


@contextmanager
def weights_only_loading(engine: Any) -> Iterator[None]:
    """Within the block, DeepSpeed reads checkpoint files through :class:`_WeightsOnlyLoads`."""
    original = getattr(engine, "checkpoint_engine", None)
    if original is None:
        yield
        return
    engine.checkpoint_engine = _WeightsOnlyLoads(original)
    try:
        yield
    finally:
        engine.checkpoint_engine = original


def expected_module_keys(module: torch.nn.Module) -> set[str]:
    """What ``save_checkpoint(exclude_frozen_parameters=True)`` stores: the state dict minus frozen parameters."""
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    return set(module.state_dict()) - frozen


def describe_key_mismatch(missing: set[str], unexpected: set[str], limit: int = 5) -> str:
    """ "missing 3 (a, b, c); unexpected 1 (d)" with the first ``limit`` names of each."""
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            shown = sorted(names)[:limit]
            more = f", ... {len(names) - limit} more" if len(names) > limit else ""
            parts.append(f"{label} {len(names)} ({', '.join(shown)}{more})")
    return "; ".join(parts)


def strict_module_loader(path: Path) -> Callable[..., None]:
    """DeepSpeed ``custom_load_fn``: the checkpoint's module state must hold exactly the tensors this model trains
    (frozen backbone weights come from the bases and are not in it); an error names what is missing/unexpected."""

    def load(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
        expected = expected_module_keys(dst)
        missing, unexpected = expected - set(src), set(src) - expected
        if missing or unexpected:
            raise CheckpointError(
                f"the model weights in checkpoint {path} do not fit this model: "
                f"{describe_key_mismatch(missing, unexpected)}. Was it written with other model.freeze_* settings "
                "or another model configuration?"
            )
        try:
            dst.load_state_dict(src, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise CheckpointError(f"the model weights in checkpoint {path} do not fit this model: {e}") from None

    return load


# ---------------------------------------------------------------------------------------------- manager


class CheckpointManager:
    """Saves and finds checkpoints of a DeepSpeed engine plus per-rank trainer state."""

    def __init__(self, directory: Path, ctx: DistContext, keep_last: int = 2) -> None:
        self.dir = Path(directory)
        self.ctx = ctx
        self.keep_last = keep_last
        self.warnings: list[str] = []  # damaged checkpoints skipped by the last find_resumable()

    # -- finding ------------------------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """The checkpoint ``latest`` names (not verified), or None."""
        pointer = self.dir / LATEST
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        path = self.dir / tag
        if not TAG_RE.match(tag) or not path.is_dir():
            raise CheckpointError(f"{pointer} names {tag!r}, which is not a checkpoint directory in {self.dir}")
        return path

    def completed(self) -> list[Path]:
        """Published checkpoint directories, oldest first (not verified)."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
        return sorted(found, key=lambda p: int(TAG_RE.match(p.name).group(1)))

    def find_resumable(self) -> Optional[Path]:
        """The newest checkpoint that verifies: ``latest`` first, then older ones, newest first. Each damaged one
        is skipped with a warning (also kept in :attr:`warnings`). None when there is no checkpoint at all;
        :class:`CheckpointError` when there are checkpoints but none is usable."""
        self.warnings = []
        try:
            latest = self.latest()
        except CheckpointError as e:
            self._warn(str(e))
            latest = None
        candidates = self.completed()[::-1]
        if latest is not None:
            candidates = [latest] + [p for p in candidates if p != latest]
        if not candidates:
            return None
        for path in candidates:
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            self._warn(f"skipping checkpoint {path}: {problem}")
        raise CheckpointError(
            f"no usable checkpoint in {self.dir}: " + "; ".join(self.warnings) + ". Move the damaged checkpoints "
            "away (or set checkpoint.resume=never with another run.output_dir) to start afresh."
        )

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        logger.warning(message)
        if self.ctx.is_main:
            print(f"warning: {message}", flush=True)

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
        try:
            text = json.dumps({"version": STATE_VERSION, **trainer_state})
        except TypeError as e:
            raise CheckpointError(f"trainer state of rank {self.ctx.rank} is not plain JSON data: {e}") from None
        try:
            engine.save_checkpoint(str(staging_root), tag=tag, save_latest=False, exclude_frozen_parameters=True)
            state_path = staging_root / tag / state_file(self.ctx.rank)
            state_path.parent.mkdir(parents=True, exist_ok=True)
            _write_durably(state_path, text)
        except Exception as e:  # noqa: BLE001 - torch reports a full disk as "basic_ios::clear" / "unexpected pos"
            message = self._describe_write_failure(e, staging_root / tag)  # free space before the cleanup
            shutil.rmtree(staging_root / tag, ignore_errors=True)
            raise CheckpointError(message) from e
        barrier()
        error = None
        if self.ctx.is_main:
            try:
                self._seal(staging_root / tag)
                self._publish(staging_root / tag, tag)
                try:
                    staging_root.rmdir()  # only when empty: nothing is left half-written
                except OSError:
                    pass
            except (OSError, CheckpointError) as e:
                error = f"{type(e).__name__}: {e}"
        error = broadcast_object(error)
        if error is not None:
            raise CheckpointError(f"could not publish checkpoint {tag} in {self.dir}: {error}")
        return self.dir / tag

    def _describe_write_failure(self, error: Exception, staged: Path) -> str:
        """What went wrong writing ``staged``, saying "No space left on device" and the free space when that is it."""
        try:
            free = shutil.disk_usage(self.dir).free
        except OSError:
            free = None
        latest = self.latest()
        kept = f"the previous checkpoint {latest} is intact" if latest else "no earlier checkpoint exists"
        full = isinstance(error, OSError) and error.errno == errno.ENOSPC
        if full or (free is not None and free < LOW_DISK_BYTES):
            return (
                f"No space left on device writing checkpoint {staged.name} to {staged.parent} "
                f"({'unknown' if free is None else f'{free / 2**20:.1f} MiB'} free on its file system; "
                f"{type(error).__name__}: {error}); its partial files are removed and {kept}. Free space or point "
                "checkpoint.dir elsewhere, then run again to resume"
            )
        return f"writing checkpoint {staged.name} to {staged.parent} failed ({type(error).__name__}: {error}); {kept}"

    def _seal(self, staged: Path) -> None:
        """Check the staged checkpoint is complete, fsync it and write its manifest (rank 0)."""
        states = {state_file(r) for r in range(self.ctx.world_size)}
        missing = sorted(s for s in states if not (staged / s).is_file())
        if missing:
            raise CheckpointError(f"{staged} lacks the trainer state of some ranks: {missing}")
        for name in sorted(states):
            try:
                json.loads((staged / name).read_text())
            except ValueError as e:
                raise CheckpointError(f"{staged / name} is not valid JSON after writing: {e}") from None
        files = _files_under(staged)
        if not any(p.suffix == ".pt" for p in files):
            raise CheckpointError(f"{staged} holds no DeepSpeed model/optimizer file after saving")
        for p in files:
            problem = _check_torch_file(p) if p.suffix == ".pt" else None
            if problem is not None:
                raise CheckpointError(f"{p} {problem} right after saving")
            _fsync_file(p)
        manifest = {"version": MANIFEST_VERSION, "world_size": self.ctx.world_size, "files": _checksums(staged, files)}
        _write_durably(staged / MANIFEST, json.dumps(manifest, indent=1))
        _fsync_dir(staged)

    def _publish(self, staged: Path, tag: str) -> None:
        final = self.dir / tag
        trash = None
        if final.exists():  # the same step saved again (e.g. a stop and resume at the same step)
            trash = self.dir / STAGING / f"{tag}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(staged, final)
        _fsync_dir(self.dir)
        _write_durably(self.dir / LATEST, tag + "\n")
        _fsync_dir(self.dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        for old in self.completed()[: -self.keep_last]:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)

    # -- reading ------------------------------------------------------------------------------------------------
    def read_trainer_state(self, path: Path) -> dict[str, Any]:
        """This rank's trainer state in checkpoint ``path`` (JSON; errors name the file)."""
        path = Path(path)
        state_path = path / state_file(self.ctx.rank)
        if not state_path.is_file():
            if any(path.glob(LEGACY_STATE_GLOB)):
                raise CheckpointError(
                    f"checkpoint {path} holds a pickled trainer state ({LEGACY_STATE_GLOB}) written by an older "
                    f"version; it is not loaded, since unpickling a file can run code. Start a new run (another "
                    "run.output_dir) or resume from a checkpoint written by this version"
                )
            saved = sorted(p.name for p in path.glob("trainer_state_rank*.json"))
            raise CheckpointError(
                f"checkpoint {path} has no state for rank {self.ctx.rank} (it holds {saved}); resuming needs the "
                f"same number of processes as the run that wrote it"
            )
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {state_path}: {type(e).__name__}: {e}") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise CheckpointError(f"{state_path}: trainer state version {version!r}, expected {STATE_VERSION}")
        if state.get("world_size") != self.ctx.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {state.get('world_size')} processes, this run has "
                f"{self.ctx.world_size}; resume with the same world size"
            )
        return state

    def load(self, engine: Any, path: Path, verify: bool = True) -> dict[str, Any]:
        """Load model/optimizer states into the engine (strictly, without unpickling code) and return this rank's
        trainer state. ``verify`` checks the manifest first (skip it only when the caller just verified)."""
        path = Path(path)
        if verify:
            problem = verify_checkpoint(path)
            if problem is not None:
                raise CheckpointError(f"cannot resume from {path}: {problem}")
        trainer_state = self.read_trainer_state(path)
        with weights_only_loading(engine):
            try:
                load_path, _ = engine.load_checkpoint(
                    str(path.parent),
                    tag=path.name,
                    load_module_strict=True,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                    custom_load_fn=strict_module_loader(path),
                )
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - DeepSpeed raises many types; name the checkpoint
                raise CheckpointError(f"DeepSpeed could not load checkpoint {path}: {type(e).__name__}: {e}") from e
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path} (no model states file found)")
        return trainer_state


# ---------------------------------------------------------------------------------------------- hyperparameters


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Per parameter group, every setting except the parameters themselves (lr, betas, weight_decay, ...)."""
    return [{k: v for k, v in group.items() if k not in ("params", "initial_lr")} for group in optimizer.param_groups]


def apply_configured_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    configured: list[dict[str, Any]],
    configured_base_lrs: list[float],
    saved_next_lrs: Optional[list[float]],
) -> list[str]:
    """After a resume, run on with the *current* config's optimizer settings and LR schedule.

    Loading a checkpoint restores the saved run's optimizer settings (DeepSpeed loads the param groups) and its base
    learning rate (the scheduler state); this puts back what the config now says -- ``configured`` /
    ``configured_base_lrs`` were taken from the freshly built optimizer and scheduler before loading -- at the
    checkpoint's position in the schedule. Returns one line per setting that differs from the checkpoint's run.
    """
    changes: list[str] = []
    for i, (group, wanted) in enumerate(zip(optimizer.param_groups, configured, strict=True)):
        name = wanted.get("name", i)
        for key, value in wanted.items():
            if key == "lr":
                continue
            if key in group and group[key] != value:
                changes.append(f"param group {name!r}: {key} {group[key]!r} in the checkpoint -> {value!r} now")
            group[key] = value
    scheduler.base_lrs = list(configured_base_lrs)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["initial_lr"] = base
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
    if saved_next_lrs is not None and any(
        not np.isclose(a, b, rtol=1e-9, atol=0) for a, b in zip(lrs, saved_next_lrs, strict=True)
    ):
        changes.append(
            f"learning rate of the next step: {saved_next_lrs[0]:.6g} in the checkpoint's schedule -> {lrs[0]:.6g} "
            "with the current optim.* / run.max_steps settings"
        )
    return changes


# ---------------------------------------------------------------------------------------------- export leftovers


def clean_export_leftovers(export_dir: Path, exclusive: bool) -> list[str]:
    """Remove what a run killed during export leaves next to ``export_dir``: ``.<name>-old-<pid>`` (the previous
    export, moved aside) and ``.<name>-XXXX`` staging directories. Nothing is put back: if the kill left no export,
    the next run exports again from its final checkpoint (an older export would be stale).

    ``exclusive``: the caller holds the lock of the directory containing ``export_dir`` (no other run can be
    exporting there); otherwise only ``-old-<pid>`` leftovers of processes that no longer exist are removed.
    Returns one line per removed directory."""
    export_dir = Path(export_dir).resolve()
    parent = export_dir.parent
    if not parent.is_dir():
        return []
    old_re = re.compile(rf"^\.{re.escape(export_dir.name)}-old-(\d+)$")
    done: list[str] = []
    for p in sorted(parent.iterdir()):
        if not p.is_dir() or not p.name.startswith(f".{export_dir.name}-"):
            continue
        m = old_re.match(p.name)
        if exclusive or (m is not None and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p} (left by an interrupted export)")
    return done
