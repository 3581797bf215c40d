"""The :class:`Trainer`: owns the model engine, the data streams, the training state, checkpoints and metrics.

    trainer = Trainer(load_config("configs/tiny-random.yaml", ["run.max_steps=50"]))
    result = trainer.fit()          # trains (resuming from the latest checkpoint), checkpoints, exports
    samples = trainer.few_shot_demo()
    trainer.close()

One *step* is one optimizer step: ``optim.grad_accum_steps`` micro-steps, each taking one batch from every
training stream (pairs, documents) and back-propagating ``sum(loss_weight * stream loss)``. Losses are averaged
over ranks, so every rank logs (and checks) the same numbers. A step whose loss is not finite on any rank is
skipped on every rank (parameters, optimizer moments and the LR schedule untouched) and counted; after
``optim.max_consecutive_nonfinite`` such steps in a row the run saves a checkpoint and stops with
:class:`NonFiniteLossError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .checkpoint import (
    CheckpointError,
    CheckpointManager,
    apply_configured_schedule,
    capture_rng,
    clean_export_leftovers,
    optimizer_hyperparameters,
    restore_rng,
)
from .config import ConfigError, TrainConfig
from .data import (
    Batches,
    build_episode_probe_loader,
    build_train_loaders,
    build_val_loader,
    check_batch,
    check_shards_exist,
    ensure_synthetic,
)
from .distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    broadcast_object,
    main_first,
    resolve_device,
    resolve_precision,
    setup_distributed,
)
from .engine import build_deepspeed_config, initialize_engine, load_deepspeed_json, zero_stage
from .evaluation import (
    FewShotSample,
    binding_table,
    check_few_shot_prompts,
    constant_images,
    demo_examples,
    few_shot_captions,
    format_binding_rows,
    format_scene_scores,
    held_out_loss,
    move_batch,
    score_scene_captions,
)
from .lock import lock_run_dirs
from .metrics import MetricsLogger, plot_loss_curve
from .modeling import (
    build_model,
    compile_own_modules,
    export_pretrained,
    exported_parameter_names,
    load_exported,
    resolve_bases,
)
from .optim import build_optimizer, build_scheduler
from .preemption import StopRequests, TrainingInterrupted

MATH_ATTENTION_MAX_TOKENS = 256


def training_attention(device: torch.device, sequence_length: Optional[int]):
    """The scaled-dot-product-attention kernel of the training steps, entered around their forward and backward
    (activation checkpointing recomputes the forward in the backward: it must pick the same kernel).

    ``sequence_length``: the longest a training sequence can be (the streams' ``max_length``; None: unbounded).
    On CPU, for sequences of up to ``MATH_ATTENTION_MAX_TOKENS`` tokens, the math kernel: its forward + backward
    is faster than the flash kernel's there (SmolLM2's 9 heads, bf16, 2 cores: 3.3 against 8.2 ms at 16 x 32
    tokens, 3.8 against 6.4 ms at 4 x 96, 9.0 against 11.2 ms at 4 x 160), while the flash kernel stays for
    inference (its forward alone is 3x faster) and for long sequences (math holds the full attention matrix).
    Elsewhere PyTorch's own choice."""
    if device.type == "cpu" and sequence_length is not None and sequence_length <= MATH_ATTENTION_MAX_TOKENS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return nullcontext()


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss; a checkpoint of the last good state was written."""


@dataclass
class TrainResult:
    start_step: int
    step: int
    losses: dict[int, Optional[float]] = field(default_factory=dict)  # steps run by this process
    stopped_early: bool = False
    checkpoint: Optional[Path] = None
    export_dir: Optional[Path] = None
    seconds: float = 0.0
    eval_loss: Optional[float] = None
    time_limit_reached: bool = False  # run.max_seconds ended the loop before max_steps (a finished run otherwise)


def preflight(config: TrainConfig) -> dict[str, Any]:
    """Every check that needs no model or data loading; raises ConfigError before any work."""
    resolve_device(config.run)
    ds_json = load_deepspeed_json(config.run.deepspeed_path())
    check_shards_exist(config)
    resume = config.checkpoint.resume
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"checkpoint.resume: {resume!r} is not a checkpoint directory")
    elif resume == "never" and (config.checkpoint_dir / "latest").is_file():
        raise ConfigError(
            f"checkpoint.resume: 'never', but {config.checkpoint_dir} already holds checkpoints; "
            "use another run.output_dir or checkpoint.resume=auto"
        )
    for key, directory in (("run.output_dir", config.run.output_dir), ("data.cache_dir", config.data.cache_dir)):
        existing = Path(directory).resolve()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ConfigError(f"{key}: cannot write {directory!r} ({existing} is not a writable directory)")
    return ds_json


def _quiet_libraries() -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


class Trainer:
    """Builds everything from a :class:`TrainConfig` (after :func:`preflight`), resuming if a checkpoint exists."""

    def __init__(self, config: TrainConfig) -> None:
        ds_json = preflight(config)
        # "auto" becomes what this machine runs, and config.yaml records that
        precision, self.precision_reason = resolve_precision(config.run, resolve_device(config.run))
        config.run.precision = precision
        self.config = config
        self._threads_before = torch.get_num_threads()
        self.ctx: DistContext = setup_distributed(config.run)
        _quiet_libraries()  # after DeepSpeed's import, which sets its logger's level
        # One run per output, checkpoint and export directory (training.lock), taken before anything is written
        # there; released by close(), by a failure while building, or when the process ends.
        self._output_lock = lock_run_dirs(config, self.ctx)
        try:
            self._build(config, ds_json)
        except BaseException:
            if self._output_lock is not None:
                self._output_lock.release()
            raise

    def _build(self, config: TrainConfig, ds_json: dict[str, Any]) -> None:
        ctx = self.ctx
        self.device = ctx.device
        self.dtype = torch.bfloat16 if config.run.precision == "bf16" else torch.float32
        self.output_dir = Path(config.run.output_dir)

        # Shared files (tiny bases, generated data) are written by rank 0, then read by everyone.
        self.flamingo_config, self.tiny = main_first(ctx, lambda: resolve_bases(config.model, config.data.cache_dir))
        self.synthetic = main_first(ctx, lambda: ensure_synthetic(config.data, show_progress=ctx.is_main))

        model, self.image_processor, self.tokenizer = build_model(config.model, self.flamingo_config, config.run.seed)
        loaders = build_train_loaders(
            config, self.tokenizer, self.image_processor, self.synthetic, ctx.rank, ctx.world_size
        )
        self.streams = {name: Batches(loader) for name, loader in loaders.items()}
        self.val_loader = build_val_loader(
            config, self.tokenizer, self.image_processor, self.synthetic, ctx.rank, ctx.world_size
        )
        self.episode_probe = build_episode_probe_loader(
            config, self.tokenizer, self.image_processor, self.synthetic, ctx.rank, ctx.world_size
        )
        # the same demonstration/query images on every rank (generation must take the same steps everywhere)
        self.demo_loader = build_val_loader(config, self.tokenizer, self.image_processor, self.synthetic, 0, 1)
        # before any step: the demonstrations fit the held-out set and the prompts the LM's positions
        check_few_shot_prompts(config, model, self.demo_loader)

        self.optimizer = build_optimizer(model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.run.max_steps)
        self.ds_config = build_deepspeed_config(config, ds_json)
        self.zero_stage = zero_stage(self.ds_config)
        self.engine = initialize_engine(model, self.optimizer, self.ds_config)
        self.model = self.engine.module
        if config.run.compile:  # after DeepSpeed has cast the weights (bf16): compiled for the dtypes it runs in
            compiled = compile_own_modules(self.model)
            if ctx.is_main:
                print(f"torch.compile: {compiled} modules (resampler, gated cross-attention)", flush=True)

        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.nonfinite_total = 0
        self.nonfinite_consecutive = 0
        self.resumed_from: Optional[Path] = None
        self.checkpoints = CheckpointManager(config.checkpoint_dir, ctx, config.checkpoint.keep_last)
        self.checkpoints.clean_staging()
        self._last_saved_step: Optional[int] = None
        self._resume_notes: list[str] = []  # damaged checkpoints skipped, settings changed since the checkpoint
        self._resume_verified = False
        if ctx.is_main:
            inside = Path(config.run.output_dir).resolve() in config.export_dir.resolve().parents
            for line in clean_export_leftovers(config.export_dir, exclusive=inside):
                print(line, flush=True)

        random.seed(config.run.seed + ctx.rank)
        np.random.seed(config.run.seed + ctx.rank)
        torch.manual_seed(config.run.seed + ctx.rank)
        resume = self._resume_path()
        if resume is not None:
            self._load(resume)
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(config.to_yaml())
        self.metrics = MetricsLogger(self.output_dir, config.logging, ctx.is_main, self.step, config.run.max_steps)
        self.metrics.write(f"precision: {config.run.precision} ({self.precision_reason})")
        if self.resumed_from is not None:
            self.metrics.write(
                "\n".join([f"resumed from {self.resumed_from} at step {self.step}", *self._resume_notes])
            )

    # ------------------------------------------------------------------------------------------------ state
    def _resume_path(self) -> Optional[Path]:
        resume = self.config.checkpoint.resume
        if resume == "never":
            return None
        path = Path(resume)
        if resume != "auto" and not (path / "latest").is_file():
            return path  # one checkpoint, named explicitly: verified when loaded, no fallback
        # the newest checkpoint that verifies (damaged ones are skipped with a warning); rank 0 checks, once
        manager = self.checkpoints if resume == "auto" else CheckpointManager(path, self.ctx)
        found, error = None, None
        if self.ctx.is_main:
            try:
                found = manager.find_resumable()
            except CheckpointError as e:
                error = str(e)
            self._resume_notes += manager.warnings
        found, error = broadcast_object((None if found is None else str(found), error))
        if error is not None:
            raise CheckpointError(error)
        self._resume_verified = found is not None
        return None if found is None else Path(found)

    def state_dict(self) -> dict[str, Any]:
        """This rank's trainer state (what DeepSpeed's checkpoint does not hold)."""
        return {
            "step": self.step,
            "rank": self.ctx.rank,
            "world_size": self.ctx.world_size,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_consecutive": self.nonfinite_consecutive,
            "scheduler": self.scheduler.state_dict(),
            "next_lrs": [group["lr"] for group in self.optimizer.param_groups],
            "loaders": {name: stream.state_dict() for name, stream in self.streams.items()},
            "rng": capture_rng(),
        }

    def _load(self, path: Path) -> None:
        configured = optimizer_hyperparameters(self.optimizer)  # what the config says, before loading replaces it
        configured_base_lrs = list(self.scheduler.base_lrs)
        state = self.checkpoints.load(self.engine, path, verify=not self._resume_verified)
        missing = sorted(set(self.streams) - set(state["loaders"]))
        if missing:
            raise RuntimeError(f"checkpoint {path} has no data position for the stream(s) {missing}")
        for name, stream in self.streams.items():
            stream.load_state_dict(state["loaders"][name])
        self.scheduler.load_state_dict(state["scheduler"])
        # the current config's settings and schedule apply from here on (what config.yaml records), reported
        changes = apply_configured_schedule(
            self.optimizer, self.scheduler, configured, configured_base_lrs, state.get("next_lrs")
        )
        self._resume_notes += [f"config differs from the checkpoint's run: {c}" for c in changes]
        for key in ("step", "samples_seen", "tokens_seen", "nonfinite_total", "nonfinite_consecutive"):
            setattr(self, key, state[key])
        restore_rng(state["rng"])
        self.resumed_from = Path(path)
        self._last_saved_step = self.step

    def save_checkpoint(self) -> Path:
        """Collective. Writes a checkpoint of the current step (crash-safe, see training.checkpoint)."""
        path = self.checkpoints.save(self.engine, self.step, self.state_dict())
        self._last_saved_step = self.step
        return path

    # ------------------------------------------------------------------------------------------------ steps
    def _micro_step(self) -> tuple[torch.Tensor, dict[str, float], int, int, int]:
        """Forward every stream's batch; returns (weighted loss, per-stream losses, samples, tokens, positions):
        tokens are the real ones, positions what the LM computed (padding included)."""
        total: Optional[torch.Tensor] = None
        parts: dict[str, float] = {}
        samples = tokens = positions = 0
        for name, stream in self.streams.items():
            batch = move_batch(check_batch(name, stream.next()), self.device, self.dtype)
            out = self.engine(
                batch["vision_x"],
                batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                loss_only=True,
                media_mask=batch["media_mask"],
            )
            weight = getattr(self.config.data, name).loss_weight
            total = out.loss * weight if total is None else total + out.loss * weight
            parts[name] = float(out.loss.detach())
            samples += int(batch["input_ids"].shape[0])
            tokens += int(batch["attention_mask"].sum())
            positions += int(batch["attention_mask"].numel())
        return total, parts, samples, tokens, positions

    def _grad_norm_before_step(self) -> Optional[float]:
        # DeepSpeed reports the norm itself with ZeRO / bf16; without them it is computed here (after the
        # gradient all-reduce, before clipping).
        if self.zero_stage > 0 or self.config.run.precision == "bf16":
            return None
        norms = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its record (the same on every rank)."""
        gas = self.config.optim.grad_accum_steps
        names = list(self.streams)
        sums = torch.zeros(5 + len(names), dtype=torch.float64)  # loss, non-finite, samples, tokens, positions, parts
        window_bad = False
        grad_norm = None
        lr = self.optimizer.param_groups[0]["lr"]
        # one attention kernel for the forward, the backward and any recomputation (activation checkpointing)
        longest = [getattr(self.config.data, name).max_length for name in names]
        longest = None if None in longest else max(longest)
        for micro in range(gas):
            with training_attention(self.device, longest):
                loss, parts, samples, tokens, positions = self._micro_step()
            finite = bool(torch.isfinite(loss.detach()))
            local = torch.tensor(
                [float(loss.detach()) if finite else 0.0, 0.0 if finite else 1.0, samples, tokens, positions]
                + [parts[n] if finite else 0.0 for n in names],
                dtype=torch.float64,
            )
            reduced = all_reduce_sum(local)
            window_bad = window_bad or bool(reduced[1] > 0)  # identical on every rank
            sums += reduced
            with training_attention(self.device, longest):
                self.engine.backward(loss)
            if micro == gas - 1:
                grad_norm = self._grad_norm_before_step() if not window_bad else None
            self.optimizer.skip_next_step = window_bad  # only read at the accumulation boundary
            self.engine.step()
        self.optimizer.skip_next_step = False
        self.step += 1
        if window_bad:
            self.nonfinite_total += 1
            self.nonfinite_consecutive += 1
        else:
            self.nonfinite_consecutive = 0
            self.scheduler.step()
            if grad_norm is None:
                norm = self.engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else None
        denom = self.ctx.world_size * gas
        self.samples_seen += int(sums[2])
        self.tokens_seen += int(sums[3])
        record = {
            "step": self.step,
            "loss": None if window_bad else float(sums[0] / denom),
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": window_bad,
            "nonfinite_total": self.nonfinite_total,
            "samples": int(sums[2]),
            "tokens": int(sums[3]),
            "positions": int(sums[4]),  # tokens + padding: what the LM computed
        }
        for i, name in enumerate(names):
            record[f"loss_{name}"] = None if window_bad else float(sums[5 + i] / denom)
        return record

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        """Train to ``run.max_steps`` (or ``checkpoint.stop_at_step``), checkpointing, evaluating, exporting."""
        cfg = self.config
        max_steps = cfg.run.max_steps
        stop = cfg.checkpoint.stop_at_step or max_steps
        result = TrainResult(start_step=self.step, step=self.step)
        start = time.perf_counter()
        if self.step >= stop:
            self.metrics.write(f"checkpoint is at step {self.step}; nothing to train (target step {stop})")
        self.engine.train()
        with StopRequests(watch_launcher=self.ctx.world_size > 1 or bool(os.environ.get("LOCAL_RANK"))) as requests:
            self._train_loop(result, requests, start, stop, max_steps)
        result.step = self.step
        result.seconds = time.perf_counter() - start
        return self._finish(result, max_steps)

    def _train_loop(self, result: TrainResult, requests: StopRequests, start: float, stop: int, max_steps: int) -> None:
        cfg = self.config
        while self.step < stop:
            t0 = time.perf_counter()
            record = self.train_step()
            self.metrics.log_step(record, time.perf_counter() - t0)
            result.losses[self.step] = record["loss"]
            if self.nonfinite_consecutive >= cfg.optim.max_consecutive_nonfinite:
                self._abort_nonfinite()
            if self.step % cfg.logging.log_every == 0:
                self.metrics.log_data_stats(self.step, {n: s.loader.stats for n, s in self.streams.items()})
            every = cfg.checkpoint.every_steps
            if every and self.step % every == 0 and self.step < stop:
                result.checkpoint = self.save_checkpoint()
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < max_steps:
                self.evaluate()
            signum = self._stop_requested(requests)
            if signum:
                self._stop_on_request(requests, signum, max_steps)
            if self.step < stop and self._time_is_up(start):
                result.time_limit_reached = True
                self.metrics.write(
                    f"run.max_seconds={cfg.run.max_seconds:g} reached at step {self.step} of {max_steps}: "
                    "finishing as a completed run (held-out loss, checkpoint, export)"
                )
                break

    def _stop_requested(self, requests: StopRequests) -> int:
        """Collective: the signal number if any rank was asked to stop (SIGTERM, SIGINT, its launcher gone), else 0."""
        local = float(requests.signum or 0) if requests.pending() else 0.0
        if self.ctx.world_size == 1:
            return int(local)
        values = torch.zeros(self.ctx.world_size, dtype=torch.float64)
        values[self.ctx.rank] = local
        return int(all_reduce_sum(values).max().item())

    def _stop_on_request(self, requests: StopRequests, signum: int, max_steps: int) -> None:
        """Checkpoint the step just finished (every rank, the periodic path) and raise TrainingInterrupted."""
        if self._last_saved_step != self.step:
            checkpoint = self.save_checkpoint()
        else:
            checkpoint = self.checkpoints.latest()
        reason = requests.reason or f"rank stopped by {signal.Signals(signum).name} on another rank"
        self.metrics.write(
            f"{reason}: stopped at step {self.step} of {max_steps}, checkpoint {checkpoint}; "
            "run the same command again to resume from it"
        )
        raise TrainingInterrupted(reason, signum, self.step, checkpoint)

    def _finish(self, result: TrainResult, max_steps: int) -> TrainResult:
        cfg = self.config
        if self.step < max_steps and not result.time_limit_reached:  # a planned stop: save and leave
            if self._last_saved_step != self.step:
                result.checkpoint = self.save_checkpoint()
            result.checkpoint = result.checkpoint or self.checkpoints.latest()
            result.stopped_early = True
            self.metrics.write(f"stopped at step {self.step} of {max_steps}; run again with the same config to resume")
            return result
        trained_here = self.step > result.start_step  # else: a finished run started again; its outputs exist
        if cfg.eval.every_steps and trained_here:
            result.eval_loss = self.evaluate().get("loss")
        if self._last_saved_step != self.step:
            result.checkpoint = self.save_checkpoint()
        else:
            result.checkpoint = self.checkpoints.latest()
        if cfg.checkpoint.export and (trained_here or not (cfg.export_dir / "flamingo_config.json").is_file()):
            result.export_dir = self.export()
        elif cfg.checkpoint.export:
            result.export_dir = cfg.export_dir
        if self.ctx.is_main and cfg.logging.loss_curve:
            self.metrics.close()
            curve = plot_loss_curve(self.metrics.path, self.metrics.curve_path)
            if curve is not None:
                print(f"loss curve: {curve}", flush=True)
        return result

    def _time_is_up(self, start: float) -> bool:
        """run.max_seconds passed since ``start`` -- by rank 0's clock, so every rank stops at the same step."""
        if self.config.run.max_seconds is None:
            return False
        return bool(broadcast_object(time.perf_counter() - start >= self.config.run.max_seconds))

    def _abort_nonfinite(self) -> None:
        n = self.nonfinite_consecutive
        path = self.save_checkpoint()
        message = (
            f"{n} optimizer steps in a row (steps {self.step - n + 1}..{self.step}) had a non-finite loss on at least "
            f"one rank (limit optim.max_consecutive_nonfinite={self.config.optim.max_consecutive_nonfinite}); "
            f"training stopped. The weights and optimizer state are those of step {self.step - n} (skipped steps "
            f"change nothing) and were saved to {path}; resuming continues after the bad batches. "
            "Check the data and consider a lower optim.lr."
        )
        self.metrics.write(message)
        self.metrics.close()
        raise NonFiniteLossError(message)

    # ------------------------------------------------------------------------------------------------ eval/export
    def evaluate(self) -> dict[str, Any]:
        """Held-out loss and a few greedy few-shot captions; collective; leaves the RNG state untouched."""
        cfg = self.config.eval
        rng = capture_rng()
        self.engine.eval()
        try:
            loss = held_out_loss(self.model, self.val_loader, cfg.batches, self.device, self.dtype)
            ablated = None
            if cfg.ablated_loss and loss is not None:
                ablated = held_out_loss(
                    self.model, self.val_loader, cfg.batches, self.device, self.dtype, ablate_images=True
                )
            shuffled = None
            if cfg.shuffled_loss and loss is not None:
                shuffled = held_out_loss(
                    self.model, self.val_loader, cfg.batches, self.device, self.dtype, shuffle_images=True
                )
            episodes = episodes_ablated = None
            if self.episode_probe is not None:
                episodes = held_out_loss(self.model, self.episode_probe, cfg.batches, self.device, self.dtype)
                if cfg.ablated_loss and episodes is not None:
                    episodes_ablated = held_out_loss(
                        self.model, self.episode_probe, cfg.batches, self.device, self.dtype, ablate_images=True
                    )
            generations: list[FewShotSample] = []
            if cfg.num_generations and self.demo_loader is not None:
                demos, queries = demo_examples(self.demo_loader, self.tokenizer, cfg.num_shots, cfg.num_generations)
                generations = few_shot_captions(
                    self.model,
                    demos,
                    queries,
                    cfg.max_new_tokens,
                    self.dtype,
                    synced=self._synced_generation,
                    prompt_prefix=self.config.data.val.caption_prefix,
                )
        finally:
            self.engine.train()
            restore_rng(rng)
        result = {
            "loss": loss,
            "ablated_loss": ablated,
            "shuffled_loss": shuffled,
            "episodes_loss": episodes,
            "episodes_ablated_loss": episodes_ablated,
            "generations": [{"true": g.true, "generated": g.generated} for g in generations],
        }
        self.metrics.log_eval(self.step, result)
        head = f"eval @ step {self.step}"
        if loss is not None:
            head += f": held-out loss {loss:.4f}"
        if ablated is not None:
            head += f", with constant images {ablated:.4f} (the images are worth {ablated - loss:+.4f} nats/token)"
        if shuffled is not None:
            head += f", with another sample's images {shuffled:.4f} ({shuffled - loss:+.4f})"
        lines = [head]
        if episodes is not None:
            line = f"  binding episodes (draws training never makes): loss {episodes:.4f}"
            if episodes_ablated is not None:
                line += (
                    f", with constant images {episodes_ablated:.4f} (the images are worth "
                    f"{episodes_ablated - episodes:+.4f} nats/token; about 0 means it does not bind)"
                )
            lines.append(line)
        lines += [f"  true: {g.true}\n  gen:  {g.generated}" for g in generations]
        self.metrics.write("\n".join(lines))
        return result

    @property
    def _synced_generation(self) -> bool:
        return self.zero_stage == 3 and self.ctx.world_size > 1

    def export(self) -> Path:
        """Collective. Trained weights in the ``Flamingo.from_pretrained`` format (see training.modeling)."""
        directory = self.config.export_dir
        gather = nullcontext()
        if self.zero_stage == 3:
            import deepspeed

            names = exported_parameter_names(self.model)  # frozen backbone weights are not exported
            params = [p for n, p in self.model.named_parameters() if n in names]
            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gather:
            if self.ctx.is_main:
                export_pretrained(self.model, directory, self.tiny)
        barrier()
        if self.ctx.is_main:
            print(f"exported model: {directory}", flush=True)
        return directory

    def few_shot_demo(self, num_queries: Optional[int] = None, from_export: bool = True) -> list[FewShotSample]:
        """Caption held-out images after ``eval.num_shots`` demonstrations; print them next to the true captions.

        With ``eval.final_ablation`` the same prompts are run again with every image replaced by a constant one and
        scored too: the gap between the two is what the model reads from the pictures. With ``from_export`` (and an
        export present) rank 0 loads the exported model with ``Flamingo.from_pretrained`` -- no DeepSpeed -- and the
        other ranks return nothing. The scores are also written to ``<output_dir>/few_shot.json``.
        """
        cfg = self.config.eval
        n = cfg.final_queries if num_queries is None else num_queries
        if self.demo_loader is None or n == 0:
            return []
        demos, queries = demo_examples(self.demo_loader, self.tokenizer, cfg.num_shots, n)
        final = self._final_model(from_export)
        if final is None:
            return []
        model, dtype, synced, source = final
        if model is self.model:
            self.engine.eval()

        def caption(demonstrations, query_images):
            return few_shot_captions(model, demonstrations, query_images, cfg.max_new_tokens, dtype, synced=synced)

        samples = caption(demos, queries)
        ablated = caption(*constant_images(demos, queries)) if cfg.final_ablation else None
        if model is self.model:
            self.engine.train()
        if not self.ctx.is_main:
            return samples
        scores = score_scene_captions(samples)
        print(f"\nfew-shot captions of held-out images ({cfg.num_shots} demonstrations, {source}):", flush=True)
        for i, s in enumerate(samples[:8]):
            mark = "=" if s.exact else "x"
            print(f"  [{i}] {mark} true:      {s.true}\n        generated: {s.generated}", flush=True)
        if len(samples) > 8:
            print(f"  ... ({len(samples) - 8} more)", flush=True)
        report = {"num_queries": len(samples), "num_shots": cfg.num_shots, "images": scores}
        lines = [f"{len(samples)} held-out images:", "  images:          " + format_scene_scores(scores)]
        if ablated is not None:
            report["ablated"] = score_scene_captions(ablated)
            lines.append("  images ablated:  " + format_scene_scores(report["ablated"]) + "   (constant image)")
            ablated_lines = [f"  ablated: {s.generated}" for s in ablated[:2]]
            lines += ablated_lines
        print("\n".join(lines), flush=True)
        report["samples"] = [{"true": s.true, "generated": s.generated} for s in samples]
        if ablated is not None:
            report["ablated_samples"] = [{"true": s.true, "generated": s.generated} for s in ablated]
        self._write_few_shot(report, fresh=True)
        return samples

    def _final_model(self, from_export: bool = True):
        """(model, dtype, synced, source) of the final evaluations: the exported model loaded as a user loads it
        (rank 0; None on the other ranks), or the trained model itself."""
        export = self.config.export_dir
        if from_export and (export / "flamingo_config.json").is_file():
            if not self.ctx.is_main:
                return None
            if getattr(self, "_exported_model", None) is None:
                self._exported_model = load_exported(export).to(self.device).eval()  # fp32, as a user loads it
            return self._exported_model, torch.float32, False, f"exported model {export}"
        return self.model, self.dtype, self._synced_generation, "trained model"

    def _write_few_shot(self, parts: dict[str, Any], fresh: bool = False) -> None:
        """Merge ``parts`` into ``<output_dir>/few_shot.json`` (``fresh``: replace it) and redraw the loss curve with
        the final scores."""
        path = self.output_dir / "few_shot.json"
        report: dict[str, Any] = {}
        if path.is_file() and not fresh:
            try:
                report = json.loads(path.read_text())
            except json.JSONDecodeError:
                report = {}
        report.update(parts)
        path.write_text(json.dumps(report, indent=2))
        if self.config.logging.loss_curve:
            plot_loss_curve(self.metrics.path, self.metrics.curve_path, final=report)

    def binding_demo(self, from_export: bool = True) -> Optional[dict[str, Any]]:
        """Frozen's fast-binding test on held-out one-group scenes (``eval.final_binding``): made-up words of the
        evaluation pool, ``eval.binding_ways`` x ``eval.binding_shots``, with the image-ablated control and the
        prototype reference; accuracy also split by whether the query's class was one of the training episodes'
        classes. Printed as a table and written to ``few_shot.json`` (``binding``) and ``binding.json``."""
        from data_pipelines.synthetic import write_scene_classes
        from vlm.eval.binding import BindingTask, evaluate_binding
        from vlm.eval.datasets import load_class_tree

        cfg = self.config.eval
        final = self._final_model(from_export)
        if final is None or (final[0] is self.model and self.ctx.world_size > 1):
            return None  # rank 0 evaluates the export; a multi-rank run without an export does not evaluate
        model, _, _, source = final
        was_training = model.training
        root = write_scene_classes(Path(self.config.data.cache_dir) / "scene_classes-60", per_class=60)
        dataset = load_class_tree(root, "test")
        episodes = self.config.data.episodes
        trained = None if episodes is None else episodes.episodes.classes
        trained = set(trained) if trained is not None else (set(dataset.class_names) if episodes else set())
        start = time.perf_counter()
        results = evaluate_binding(
            model,
            dataset,
            ways=cfg.binding_ways,
            shots=cfg.binding_shots,
            episodes=cfg.binding_episodes,
            task=BindingTask(closed_form=False, max_new_tokens=4),  # a word of at most 3 tokens, then "."
            batch_size=16,
            progress=self.config.logging.progress_bar,
        )
        if was_training:
            model.train()
        seconds = time.perf_counter() - start
        table = binding_table(results, trained)
        report = {
            "source": source,
            "seconds": round(seconds, 1),
            "episodes": cfg.binding_episodes,
            "trained_classes": sorted(trained),
            "held_out_classes": sorted(set(dataset.class_names) - trained),
            "table": table,
        }
        print(
            f"\nbinding: held-out scenes named with made-up words of the evaluation pool ({source}, "
            f"{cfg.binding_episodes} episodes per setting, {seconds:.0f} s):\n" + format_binding_rows(table),
            flush=True,
        )
        self._write_few_shot({"binding": report})
        (self.output_dir / "binding.json").write_text(json.dumps(results, indent=2))
        return report

    def close(self) -> None:
        self.metrics.close()
        destroy = getattr(self.engine, "destroy", None)
        if callable(destroy):
            destroy()
        torch.set_num_threads(self._threads_before)
        if self._output_lock is not None:
            self._output_lock.release()

    def summary(self, result: TrainResult) -> str:
        losses = [v for _, v in sorted(result.losses.items()) if v is not None and math.isfinite(v)]
        if not losses:
            return f"step {result.step}: no steps run in this process"
        k = max(1, min(10, len(losses) // 5))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        return (
            f"trained steps {result.start_step + 1}..{result.step} in {result.seconds:.1f}s: loss {first:.4f} "
            f"(mean of first {k}) -> {last:.4f} (mean of last {k}); skipped non-finite steps: {self.nonfinite_total}"
        )
