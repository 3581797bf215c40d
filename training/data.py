"""Training and held-out loaders from the config's sources (``data_pipelines`` loaders, exactly resumable).

Each training stream (``pairs``, ``documents``) is one infinite :class:`data_pipelines.ShardLoader` mixing its
weighted sources; each optimizer micro-step takes one batch from every stream (OpenFlamingo's LAION + MMC4 steps).
A source ``synthetic:<split>`` reads the generated dataset in ``data.cache_dir``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from .config import STREAMS, ConfigError, DataConfig, TrainConfig, synthetic_split


def synthetic_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) / "synthetic"


def ensure_synthetic(cfg: DataConfig, show_progress: bool = True):
    """Generate the synthetic dataset if a source uses it (once; reused afterwards). None if unused."""
    if cfg.synthetic is None or not cfg.uses_synthetic():
        return None
    from data_pipelines import ensure_synthetic_dataset

    return ensure_synthetic_dataset(synthetic_dir(cfg), cfg.synthetic, show_progress=show_progress)


def resolve_shards(shards: Any, synthetic) -> Any:
    """A shard spec, with ``synthetic:<split>`` replaced by the generated split's shards."""
    split = synthetic_split(shards)
    if split is None:
        return shards
    pattern = {"pairs": synthetic.pairs, "documents": synthetic.documents, "val_pairs": synthetic.val_pairs}[split]
    if pattern is None:
        raise ConfigError(f"the synthetic dataset has no {split!r} split (its size is 0 in data.synthetic)")
    return pattern


def check_shards_exist(config: TrainConfig) -> list[str]:
    """Every non-synthetic shard spec matches files that are tar archives (a clear error naming the config key,
    before any work). Names of a brace range that do not exist are a warning with their count (printed by rank 0)
    and returned."""
    from data_pipelines.reader import check_shard_files, describe_missing, find_shards

    keys = [(f"data.{key}", shards) for key, shards in config.data.shard_specs()]
    warnings = []
    for key, shards in keys:
        if synthetic_split(shards) is not None:
            continue
        try:
            paths, missing = find_shards(shards)
            check_shard_files(paths)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
        if missing:
            warnings.append(f"{key}: {describe_missing(shards, len(paths), missing)}")
    if os.environ.get("RANK", "0") == "0":
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr, flush=True)
    return warnings


def check_batch(stream: str, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch, if its images are usable: floating point and finite. Otherwise ValueError naming the stream, the
    rows and (with metadata) the samples -- NaN/Inf pixels would give NaN logits and a skipped step, silently."""
    vision_x = batch.get("vision_x")
    if vision_x is None:
        return batch
    if not vision_x.is_floating_point():
        raise ValueError(
            f"data.{stream}: batch vision_x has dtype {vision_x.dtype}; expected floating-point pixels from the "
            "image transform (the model's image_processor)"
        )
    finite = torch.isfinite(vision_x).flatten(1).all(dim=1)  # (B,)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        metadata = batch.get("metadata")
        where = ""
        if metadata:
            where = " (" + ", ".join(f"{metadata[r].get('source')}:{metadata[r].get('key')}" for r in rows[:5]) + ")"
        raise ValueError(
            f"data.{stream}: batch vision_x holds NaN or Inf values in row(s) {rows[:10]}{where}; expected finite "
            "pixels (check the image transform and the images)"
        )
    return batch


def stream_sources(name: str, stream, synthetic) -> list:
    """The ``data_pipelines.SourceConfig`` of each of a stream's sources (unnamed ones: ``<stream><i>``)."""
    from data_pipelines import SourceConfig

    return [
        SourceConfig(resolve_shards(s.shards, synthetic), s.weight, s.name or f"{name}{i}")
        for i, s in enumerate(stream.sources)
    ]


def build_train_loaders(
    config: TrainConfig, tokenizer: Any, image_processor: Callable, synthetic, rank: int, world_size: int
) -> dict[str, Any]:
    """name -> infinite ShardLoader for this rank, one per configured stream (seeded by run.seed)."""
    from data_pipelines import ShardLoader

    loaders = {}
    for name in STREAMS:
        stream = getattr(config.data, name)
        if stream is None:
            continue
        loader_config = stream.loader_config(
            stream_sources(name, stream, synthetic),
            kind=name,
            seed=config.run.seed,
            infinite=True,
            rank=rank,
            world_size=world_size,
        )
        loaders[name] = ShardLoader(loader_config, tokenizer, image_processor)
    return loaders


def build_val_loader(
    config: TrainConfig,
    tokenizer: Any,
    image_processor: Callable,
    synthetic,
    rank: int,
    world_size: int,
    batch_size: Optional[int] = None,
):
    """Held-out pairs in written order, first captions (also in ``batch["metadata"]``); None when ``data.val`` is
    null."""
    val = config.data.val
    if val is None:
        return None
    from data_pipelines import ShardLoader

    loader_config = val.loader_config(
        resolve_shards(val.shards, synthetic),
        kind="pairs",
        seed=config.run.seed,
        shuffle="none",
        caption_choice="first",
        return_metadata=True,
        infinite=True,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size or val.batch_size,
    )
    return ShardLoader(loader_config, tokenizer, image_processor)


# The probe's episodes are drawn from their own seed stream: the same classes, images and training-pool words as
# the episodes stream, composed into episodes that training never draws (episodes are pure functions of the seed).
EPISODE_PROBE_SEED = 0x50524F4245


def build_episode_probe_loader(
    config: TrainConfig, tokenizer: Any, image_processor: Callable, synthetic, rank: int, world_size: int
):
    """Binding episodes for the periodic evaluation (the episodes stream's sources and settings, its own seed), or
    None without ``data.episodes``. Their loss with real and with constant images says whether the model binds:
    the loss alone cannot (copying one of the prompt's words already lowers it)."""
    stream = config.data.episodes
    if stream is None:
        return None
    from data_pipelines import ShardLoader

    loader_config = stream.loader_config(
        stream_sources("episodes", stream, synthetic), kind="episodes", seed=config.run.seed + EPISODE_PROBE_SEED, infinite=True, rank=rank,
        world_size=world_size,
    )  # fmt: skip
    return ShardLoader(loader_config, tokenizer, image_processor)


class Batches:
    """Endless batches from one resumable loader; the iterator is (re)created lazily after a state load."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._it: Optional[Iterator[dict]] = None

    def next(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        return next(self._it)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None
