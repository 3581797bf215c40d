"""Data pipelines: WebDataset shard writers, the embedded synthetic dataset, and Flamingo-format loaders.

Writers (each also a command: ``python -m data_pipelines.<module> --help``):
    from_captions  image folder + captions file (CSV / JSONL / COCO), optional split list
    from_classes   class tree ``root/<class>/*.jpg`` + caption templates
    from_mmc4      interleaved MMC4 documents (images from a folder or embedded base64)
    synthetic      the default dataset of rendered shape scenes with exact captions

Loaders: :class:`ShardLoader` (configured by :class:`LoaderConfig`), or :func:`pairs_loader` /
:func:`documents_loader`. This package does not import the model or training code: it receives the tokenizer and
the image transform as arguments.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy exports: the writer commands do not pay for importing torch.
_EXPORTS = {
    "ImageOptions": "images",
    "DataSourceError": "loader",
    "LoaderConfig": "loader",
    "ShardLoader": "loader",
    "SourceConfig": "loader",
    "documents_loader": "loader",
    "pairs_loader": "loader",
    "MixSchedule": "mixing",
    "ShardIndex": "reader",
    "check_shard_files": "reader",
    "expand_shards": "reader",
    "find_shards": "reader",
    "ShardWriter": "shards",
    "ShardWriterConfig": "shards",
    "SyntheticConfig": "synthetic",
    "SyntheticDataset": "synthetic",
    "ensure_synthetic_dataset": "synthetic",
    "generate_synthetic_dataset": "synthetic",
    "END_OF_CHUNK_TOKEN": "tokenization",
    "IGNORE_INDEX": "tokenization",
    "MEDIA_TOKEN": "tokenization",
    "FlamingoTokens": "tokenization",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'data_pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = [  # noqa: F822 - resolved lazily by __getattr__
    "END_OF_CHUNK_TOKEN",
    "DataSourceError",
    "IGNORE_INDEX",
    "MEDIA_TOKEN",
    "FlamingoTokens",
    "ImageOptions",
    "LoaderConfig",
    "MixSchedule",
    "ShardIndex",
    "ShardLoader",
    "ShardWriter",
    "ShardWriterConfig",
    "SourceConfig",
    "SyntheticConfig",
    "SyntheticDataset",
    "documents_loader",
    "ensure_synthetic_dataset",
    "check_shard_files",
    "expand_shards",
    "find_shards",
    "generate_synthetic_dataset",
    "pairs_loader",
]
