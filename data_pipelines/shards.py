"""Writer core: WebDataset tar shards in the img2dataset convention, with skip accounting and a stats JSON.

Layout of an output folder::

    out_dir/{prefix}-000000.tar   # members: <key>.jpg, <key>.txt, <key>.json (pairs)
    out_dir/{prefix}-000001.tar   #          <key>.json, <key>.0.jpg, <key>.1.jpg, ... (interleaved documents)
    out_dir/{prefix}_stats.json   # samples written, skipped by reason (with examples), shards, timing

Keys are the global sample number, zero padded to 9 digits (``000000042``), so they are unique across shards and
sort in write order. Shards are closed when either ``max_samples_per_shard`` or ``max_shard_bytes`` is reached
(the byte limit is on the tar file size -- headers, padding and end marker included -- and is checked before adding
a sample, so a shard never exceeds it unless a single sample is larger than the limit). Tar members carry a fixed mtime, so the same input
always gives byte-identical shards. Writing uses ``webdataset.TarWriter``.

Nothing is skipped silently: every skipped item is counted by reason in the stats, the first few of each reason are
logged as warnings and kept as examples in the stats JSON, and the summary printed at the end lists all reasons.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import webdataset as wds
from tqdm import tqdm

from .images import ImageOptions
from .reader import INCOMPLETE_SUFFIX

logger = logging.getLogger(__name__)

KEY_DIGITS = 9
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tar files are padded to a multiple of this
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass
class ShardWriterConfig:
    """Where and how shards are written.

    out_dir: output folder (created if needed).
    prefix: shard file name prefix; shards are ``{prefix}-{index:06d}.tar`` and stats ``{prefix}_stats.json``.
    max_samples_per_shard / max_shard_bytes: a new shard starts when either limit would be exceeded.
    image: how images are validated, resized and encoded.
    overwrite: allow replacing existing shards with the same prefix (otherwise an error).
    max_logged_skips: how many skipped items per reason are logged (and kept as examples in the stats).
    """

    out_dir: str | Path
    prefix: str = "shard"
    max_samples_per_shard: int = 1000
    max_shard_bytes: int = 512 * 1024 * 1024
    image: ImageOptions = field(default_factory=ImageOptions)
    overwrite: bool = False
    max_logged_skips: int = 5

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if not self.prefix or any(c in self.prefix for c in "/\\.{}*?"):
            raise ValueError(
                f"ShardWriterConfig.prefix must be a non-empty name without '/', '.', braces or wildcards, "
                f"got {self.prefix!r}"
            )
        if not isinstance(self.max_samples_per_shard, int) or self.max_samples_per_shard < 1:
            raise ValueError(
                f"ShardWriterConfig.max_samples_per_shard must be an int >= 1, got {self.max_samples_per_shard!r}"
            )
        if not isinstance(self.max_shard_bytes, int) or self.max_shard_bytes < TAR_RECORD:
            raise ValueError(
                f"ShardWriterConfig.max_shard_bytes must be an int >= {TAR_RECORD}, got {self.max_shard_bytes!r}"
            )
        if not isinstance(self.image, ImageOptions):
            raise TypeError(f"ShardWriterConfig.image must be an ImageOptions, got {type(self.image).__name__}")

    @property
    def stats_path(self) -> Path:
        return Path(self.out_dir) / f"{self.prefix}_stats.json"

    @property
    def incomplete_path(self) -> Path:
        """Present while the writer runs and after it fails; loaders refuse shards next to it."""
        return Path(self.out_dir) / f"{self.prefix}{INCOMPLETE_SUFFIX}"

    def shard_path(self, index: int) -> Path:
        return Path(self.out_dir) / f"{self.prefix}-{index:06d}.tar"

    @property
    def shard_pattern(self) -> str:
        """A glob matching every shard this writer produces."""
        return str(Path(self.out_dir) / f"{self.prefix}-*.tar")


class SkipCounter:
    """Counts skipped items by reason, logs the first few of each reason, keeps them as examples."""

    def __init__(self, max_logged: int = 5, what: str = "item") -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.max_logged = max_logged
        self.what = what

    def add(self, reason: str, item: str, detail: str = "") -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_logged:
            message = f"{item}: {detail}" if detail else item
            examples.append(message)
            logger.warning("skipped %s (%s): %s", self.what, reason, message)
            if len(examples) == self.max_logged:
                logger.warning("further skipped %ss with reason %r are counted but not logged", self.what, reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _tar_member_bytes(size: int) -> int:
    """Bytes a member of ``size`` bytes occupies in a tar: one header block plus the padded payload."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_file_size(member_bytes: int) -> int:
    """Size of a tar file whose members occupy ``member_bytes``: plus the end marker, padded to a record."""
    return -(-(member_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


class ShardWriter:
    """Writes samples (dicts of member extension -> bytes/str) into size-limited WebDataset tar shards.

    Use as a context manager; :meth:`close` writes the stats JSON and returns the stats dict::

        with ShardWriter(ShardWriterConfig(out_dir, prefix="pairs")) as writer:
            key = writer.write({"jpg": jpeg_bytes, "txt": caption, "json": {...}})
            writer.skip("missing_file", "img_001.jpg", "no such file")
        stats = writer.stats
    """

    def __init__(self, config: ShardWriterConfig, kind: str = "pairs", extra_stats: dict | None = None) -> None:
        self.config = config
        self.kind = kind
        self.extra_stats = dict(extra_stats or {})
        out_dir = Path(config.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(out_dir.glob(f"{config.prefix}-*.tar"))
        if existing:
            if not config.overwrite:
                raise FileExistsError(
                    f"{out_dir} already holds {len(existing)} shard(s) named {config.prefix}-*.tar "
                    f"(e.g. {existing[0].name}); choose another out_dir/prefix or pass overwrite=True (--overwrite)"
                )
            for path in existing:
                path.unlink()
        config.stats_path.unlink(missing_ok=True)  # stats describe finished shards only
        config.incomplete_path.write_text(
            json.dumps({"writer_pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
        )
        self.skips = SkipCounter(config.max_logged_skips, what="sample")
        self.samples_written = 0
        self.shards: list[dict[str, Any]] = []
        self.stats: dict[str, Any] = {}
        self._tar: wds.TarWriter | None = None
        self._stream = None
        self._shard_samples = 0
        self._shard_bytes = 0
        self._start = time.perf_counter()
        self._closed = False

    # -- writing -------------------------------------------------------------------------------------------------
    def write(self, sample: dict[str, bytes | str | dict | list]) -> str:
        """Write one sample; returns its key. Values: bytes, str (UTF-8) or dict/list (JSON-encoded).

        The key is added to a "json" member (if any) under "key".
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        key = f"{self.samples_written:0{KEY_DIGITS}d}"
        members: dict[str, bytes] = {}
        for ext, value in sample.items():
            if ext.startswith("_") or not ext:
                raise ValueError(f"sample member extension must be a non-empty name not starting with '_', got {ext!r}")
            if isinstance(value, dict) and ext == "json":
                value = {"key": key, **value}
            if isinstance(value, (dict, list)):
                value = json.dumps(value, ensure_ascii=False, sort_keys=False)
            if isinstance(value, str):
                value = value.encode("utf-8")
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"sample member {ext!r} must be bytes, str, dict or list, got {type(value).__name__}")
            members[ext] = bytes(value)
        size = sum(_tar_member_bytes(len(v)) for v in members.values())
        if self._tar is not None and (
            self._shard_samples >= self.config.max_samples_per_shard
            or tar_file_size(self._shard_bytes + size) > self.config.max_shard_bytes
        ):
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        self._tar.write({"__key__": key, **members})
        self._shard_samples += 1
        self._shard_bytes += size
        self.samples_written += 1
        return key

    def skip(self, reason: str, item: str, detail: str = "") -> None:
        """Record a skipped input item (counted by reason, first few logged)."""
        self.skips.add(reason, item, detail)

    def _open_shard(self) -> None:
        path = self.config.shard_path(len(self.shards))
        self._stream = open(path, "wb")  # noqa: SIM115 - closed in _close_shard
        self._tar = wds.TarWriter(self._stream, encoder=False, mtime=0, user="", group="")  # int mtime: no PAX headers
        self._shard_samples = 0
        self._shard_bytes = 0
        self.shards.append({"name": path.name, "samples": 0, "bytes": 0})

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._stream is not None
        self._stream.close()
        path = self.config.shard_path(len(self.shards) - 1)
        self.shards[-1].update(samples=self._shard_samples, bytes=path.stat().st_size)
        self._tar = None
        self._stream = None

    # -- finishing -----------------------------------------------------------------------------------------------
    def close(self) -> dict[str, Any]:
        """Close the last shard, write ``{prefix}_stats.json`` and return the stats."""
        if self._closed:
            return self.stats
        self._close_shard()
        self._closed = True
        seconds = time.perf_counter() - self._start
        self.stats = {
            "kind": self.kind,
            "samples_written": self.samples_written,
            "samples_skipped": self.skips.total,
            "skipped": dict(sorted(self.skips.counts.items())),
            "skipped_examples": self.skips.examples,
            "shards_written": len(self.shards),
            "shards": self.shards,
            "shard_pattern": self.config.shard_pattern,
            "bytes_written": sum(s["bytes"] for s in self.shards),
            "seconds": round(seconds, 3),
            "samples_per_second": round(self.samples_written / seconds, 1) if seconds > 0 else None,
            "image_options": self.config.image.to_dict(),
            "max_samples_per_shard": self.config.max_samples_per_shard,
            "max_shard_bytes": self.config.max_shard_bytes,
            **self.extra_stats,
        }
        _write_replacing(self.config.stats_path, json.dumps(self.stats, indent=2, ensure_ascii=False) + "\n")
        self.config.incomplete_path.unlink(missing_ok=True)
        return self.stats

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # close the last tar; no stats, and the _INCOMPLETE marker stays and says why
            try:
                self._close_shard()
            except OSError:
                pass
            self._closed = True
            try:
                self.config.incomplete_path.write_text(
                    json.dumps(
                        {
                            "writer_pid": os.getpid(),
                            "failed": f"{exc_type.__name__}: {exc}"[:500],
                            "samples_written": self.samples_written,
                        }
                    )
                    + "\n"
                )
            except OSError:
                pass


def _write_replacing(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees all of it or none."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def parallel_map(
    function: Callable[[_T], _R], items: Iterable[_T], num_workers: int, chunksize: int = 16
) -> Iterator[_R]:
    """``map`` in input order, in a process pool when num_workers > 0 (function and items must be picklable)."""
    if num_workers <= 0:
        yield from map(function, items)
        return
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with context.Pool(num_workers) as pool:
        yield from pool.imap(function, items, chunksize=chunksize)


def progress(iterable: Iterable[_T], total: int | None, desc: str, enabled: bool = True) -> Iterator[_T]:
    """A tqdm progress bar (on stderr), disabled when not wanted."""
    return iter(tqdm(iterable, total=total, desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True))


def format_summary(stats: dict[str, Any]) -> str:
    """Human-readable end-of-run summary of a writer's stats."""
    lines = [
        f"wrote {stats['samples_written']} {stats.get('kind', 'sample')} samples into {stats['shards_written']} "
        f"shard(s) ({stats['bytes_written'] / 2**20:.1f} MiB) in {stats['seconds']:.1f}s "
        f"({stats['samples_per_second'] or 0:.0f} samples/s)",
        f"shards: {stats['shard_pattern']}",
    ]
    if stats["samples_skipped"]:
        reasons = ", ".join(f"{reason}={count}" for reason, count in stats["skipped"].items())
        lines.append(f"skipped {stats['samples_skipped']}: {reasons}")
    else:
        lines.append("skipped 0")
    if "images_written" in stats:
        dropped = ", ".join(f"{reason}={count}" for reason, count in stats.get("images_dropped", {}).items())
        lines.append(f"images written {stats['images_written']}; images dropped: {dropped or 'none'}")
    return "\n".join(lines)


# -- image-text pairs ------------------------------------------------------------------------------------------------
@dataclass
class PairItem:
    """One input image with its caption(s), before validation.

    image: a path or the encoded bytes. captions: one or more captions (the first one goes into ``key.txt``, all of
    them into ``key.json["captions"]``). source: a short identifier used in logs and stored as ``json["source"]``.
    meta: extra JSON-serialisable fields stored in ``key.json``.
    """

    image: str | Path | bytes
    captions: list[str]
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _PreparedPair:
    item: PairItem
    image: Any = None  # PreparedImage
    skip_reason: str = ""
    skip_detail: str = ""


def _prepare_pair(item: PairItem, options: ImageOptions) -> _PreparedPair:
    from .images import ImageSkip, prepare_image

    captions = [c.strip() for c in item.captions if isinstance(c, str) and c.strip()]
    if not captions:
        return _PreparedPair(item, skip_reason="empty_caption", skip_detail="no non-empty caption")
    for caption in captions:
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate (e.g. from a JSON "\\ud800" escape)
            return _PreparedPair(item, skip_reason="invalid_caption", skip_detail=f"not encodable as UTF-8: {err}")
    item = PairItem(item.image, captions, item.source, item.meta)
    try:
        return _PreparedPair(item, image=prepare_image(item.image, options))
    except ImageSkip as skip:
        return _PreparedPair(item, skip_reason=skip.reason, skip_detail=skip.detail)


class _PairPreparer:
    """Picklable callable for the process pool."""

    def __init__(self, options: ImageOptions) -> None:
        self.options = options

    def __call__(self, item: PairItem) -> _PreparedPair:
        return _prepare_pair(item, self.options)


def write_pairs(
    items: Iterable[PairItem],
    config: ShardWriterConfig,
    *,
    total: int | None = None,
    num_workers: int = 0,
    show_progress: bool = True,
    extra_stats: dict | None = None,
    pre_skips: Iterable[tuple[str, str, str]] = (),
) -> dict[str, Any]:
    """Validate and write image-text pairs; returns (and saves) the stats.

    ``pre_skips`` are (reason, item, detail) triples for inputs rejected before image loading (e.g. caption rows
    whose image is not in the folder); they are counted in the same stats.
    """
    with ShardWriter(config, kind="pairs", extra_stats=extra_stats) as writer:
        for reason, item, detail in pre_skips:
            writer.skip(reason, item, detail)
        prepared = parallel_map(_PairPreparer(config.image), items, num_workers)
        for result in progress(prepared, total, desc=f"writing {config.prefix}", enabled=show_progress):
            if result.skip_reason:
                writer.skip(result.skip_reason, result.item.source, result.skip_detail)
                continue
            image = result.image
            caption = result.item.captions[0]
            writer.write(
                {
                    "jpg": image.data,
                    "txt": caption,
                    "json": {
                        "caption": caption,
                        "captions": result.item.captions,
                        "source": result.item.source,
                        "width": image.width,
                        "height": image.height,
                        "original_width": image.original_width,
                        "original_height": image.original_height,
                        **result.item.meta,
                    },
                }
            )
    return writer.stats


# -- command-line helpers shared by the writers ----------------------------------------------------------------------
def add_writer_arguments(parser: Any, default_prefix: str) -> None:
    """Add the output/shard/image options every writer CLI shares."""
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, help="output folder for the shards and the stats JSON")
    group.add_argument("--prefix", default=default_prefix, help="shard name prefix (default: %(default)s)")
    group.add_argument("--max-samples-per-shard", type=int, default=1000, help="default: %(default)s")
    group.add_argument(
        "--max-shard-mb", type=float, default=512.0, help="maximum shard size in MiB (default: %(default)s)"
    )
    group.add_argument("--overwrite", action="store_true", help="replace existing shards with the same prefix")
    group.add_argument(
        "--num-workers", type=int, default=0, help="processes for image validation (default: %(default)s)"
    )
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    images = parser.add_argument_group("images")
    images.add_argument("--image-size", type=int, default=None, help="resize images to this size (default: keep)")
    images.add_argument(
        "--resize-mode",
        choices=("longer", "shorter", "center_crop"),
        default="longer",
        help="longer: fit inside size x size; shorter: shorter side = size; center_crop: square crop (default: %(default)s)",
    )
    images.add_argument("--reencode", action="store_true", help="re-encode JPEGs even when they need no change")
    images.add_argument("--jpeg-quality", type=int, default=90, help="default: %(default)s")
    images.add_argument(
        "--min-image-size", type=int, default=1, help="skip images with a smaller side (default: %(default)s)"
    )


def writer_config_from_args(args: Any) -> ShardWriterConfig:
    return ShardWriterConfig(
        out_dir=args.out,
        prefix=args.prefix,
        max_samples_per_shard=args.max_samples_per_shard,
        max_shard_bytes=int(args.max_shard_mb * 1024 * 1024),
        overwrite=args.overwrite,
        image=ImageOptions(
            size=args.image_size,
            resize_mode=args.resize_mode,
            reencode=args.reencode,
            quality=args.jpeg_quality,
            min_size=args.min_image_size,
        ),
    )


def setup_cli_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
