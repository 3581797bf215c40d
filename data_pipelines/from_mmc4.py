"""Shards of interleaved image-text documents from the MMC4 format.

    python -m data_pipelines.from_mmc4 --docs docs_shard_0.jsonl --images mmc4_images/ --out shards/mmc4

Input: JSONL files (plain, ``.gz``, or ``.zip`` archives of JSONL files), one document per line::

    {"url": ..., "text_list": ["sentence 0", "sentence 1", ...],
     "image_info": [{"image_name": "abc.jpg", "matched_text_index": 1, "matched_sim": 0.31,
                     "image_base64": "..."   # optional: embedded image, used instead of --images/<image_name>
                    }, ...]}

Output sample (one per document)::

    <key>.json    {"text_list": [...], "image_info": [{"matched_text_index", "member": "0.jpg", "image_name",
                   "matched_sim", "width", "height", ...}], "url", "source"}
    <key>.0.jpg   the images, in order of matched_text_index (stable for ties)
    <key>.1.jpg   ...

Images are validated like pair images. A missing/broken image, one with a bad ``matched_text_index``, or one below
``--min-similarity`` is dropped from its document and counted under ``images_dropped`` in the stats; a document
left with fewer than ``--min-images`` images (or malformed) is skipped and counted under ``skipped``.
The loader (``data_pipelines.loader``) also reads documents whose ``image_info`` entries embed ``image_base64``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import gzip
import io
import json
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .images import ImageOptions, ImageSkip, prepare_image
from .shards import (
    ShardWriter,
    ShardWriterConfig,
    SkipCounter,
    add_writer_arguments,
    format_summary,
    parallel_map,
    progress,
    setup_cli_logging,
    writer_config_from_args,
)


def iter_jsonl_documents(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(source "file:line", parsed object or the raw line on a JSON error) for every non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"documents file not found: {path}")
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            for name in sorted(archive.namelist()):
                if name.endswith(".jsonl"):
                    with archive.open(name) as member:
                        yield from _iter_lines(io.TextIOWrapper(member, encoding="utf-8"), f"{path.name}/{name}")
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as file:
        yield from _iter_lines(file, path.name)


def _iter_lines(file: Any, label: str) -> Iterator[tuple[str, Any]]:
    for line_number, line in enumerate(file, 1):
        if not line.strip():
            continue
        source = f"{label}:{line_number}"
        try:
            yield source, json.loads(line)
        except json.JSONDecodeError:
            yield source, line


@dataclass
class _DocInput:
    source: str
    document: Any


@dataclass
class _DocResult:
    source: str
    members: dict[str, Any] = field(default_factory=dict)
    image_drops: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail)
    skip_reason: str = ""
    skip_detail: str = ""


@dataclass(frozen=True)
class DocumentOptions:
    """Which images of a document are kept.

    images_dir: folder for ``image_name`` lookups (None: only embedded ``image_base64`` images can be used).
    min_images: documents with fewer valid images are skipped. max_images: keep at most this many (by text order).
    min_similarity: drop images whose ``matched_sim`` is below this (None: keep all).
    """

    images_dir: str | None = None
    min_images: int = 1
    max_images: int | None = None
    min_similarity: float | None = None
    image: ImageOptions = field(default_factory=ImageOptions)

    def __post_init__(self) -> None:
        if not isinstance(self.min_images, int) or self.min_images < 0:
            raise ValueError(f"DocumentOptions.min_images must be an int >= 0, got {self.min_images!r}")
        if self.max_images is not None and (not isinstance(self.max_images, int) or self.max_images < 1):
            raise ValueError(f"DocumentOptions.max_images must be an int >= 1 or None, got {self.max_images!r}")


def prepare_document(item: _DocInput, options: DocumentOptions) -> _DocResult:
    """Validate one MMC4 document and its images; returns members to write or a skip reason."""
    result = _DocResult(item.source)
    doc = item.document
    if not isinstance(doc, dict):
        result.skip_reason, result.skip_detail = "malformed_document", "line is not a JSON object"
        return result
    text_list = doc.get("text_list")
    if not isinstance(text_list, list) or not text_list or not all(isinstance(t, str) for t in text_list):
        result.skip_reason, result.skip_detail = "malformed_document", "'text_list' must be a non-empty list of strings"
        return result
    image_info = doc.get("image_info", [])
    if not isinstance(image_info, list):
        result.skip_reason, result.skip_detail = "malformed_document", "'image_info' must be a list"
        return result
    candidates: list[dict] = []
    for info in image_info:
        name = str(info.get("image_name", "?")) if isinstance(info, dict) else "?"
        index = info.get("matched_text_index") if isinstance(info, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(text_list):
            result.image_drops.append(("bad_matched_text_index", f"{name}: {index!r} for {len(text_list)} sentences"))
            continue
        sim = info.get("matched_sim")
        if options.min_similarity is not None and isinstance(sim, (int, float)) and sim < options.min_similarity:
            result.image_drops.append(("below_similarity", f"{name}: {sim} < {options.min_similarity}"))
            continue
        candidates.append(info)
    candidates.sort(key=lambda info: info["matched_text_index"])  # stable: ties keep input order
    kept_info: list[dict] = []
    members: dict[str, Any] = {}
    for info in candidates:
        if options.max_images is not None and len(kept_info) >= options.max_images:
            result.image_drops.append(("over_max_images", str(info.get("image_name", "?"))))
            continue
        name = str(info.get("image_name", ""))
        try:
            if info.get("image_base64"):
                try:
                    source: bytes | Path = base64.b64decode(info["image_base64"], validate=True)
                except (binascii.Error, ValueError, TypeError) as err:
                    raise ImageSkip("broken_image", f"invalid base64: {err}") from None
            elif name and options.images_dir is not None:
                source = Path(options.images_dir) / name
            else:
                raise ImageSkip(
                    "missing_file", "no image_base64 and no images folder given" if name else "no image_name"
                )
            prepared = prepare_image(source, options.image)
        except ImageSkip as skip:
            result.image_drops.append((skip.reason, f"{name}: {skip.detail}"))
            continue
        member = f"{len(kept_info)}.jpg"
        members[member] = prepared.data
        entry = {k: v for k, v in info.items() if k not in ("image_base64",) and _jsonable(v)}
        entry.update(
            member=member,
            width=prepared.width,
            height=prepared.height,
            original_width=prepared.original_width,
            original_height=prepared.original_height,
        )
        kept_info.append(entry)
    if len(kept_info) < options.min_images:
        dropped = Counter(reason for reason, _ in result.image_drops)
        result.skip_reason = "too_few_images"
        result.skip_detail = (
            f"{len(kept_info)} valid image(s) < min_images {options.min_images} (dropped: {dict(dropped)})"
        )
        return result
    meta = {k: v for k, v in doc.items() if k not in ("text_list", "image_info", "similarity_matrix") and _jsonable(v)}
    members["json"] = {**meta, "text_list": text_list, "image_info": kept_info, "source": item.source}
    result.members = members
    return result


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, dict))


class _DocPreparer:
    def __init__(self, options: DocumentOptions) -> None:
        self.options = options

    def __call__(self, item: _DocInput) -> _DocResult:
        return prepare_document(item, self.options)


def write_document_shards(
    docs_paths: Sequence[str | Path],
    config: ShardWriterConfig,
    *,
    images_dir: str | Path | None = None,
    min_images: int = 1,
    max_images: int | None = None,
    min_similarity: float | None = None,
    num_workers: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write shards of interleaved documents from MMC4 JSONL files; returns the stats (also saved as JSON)."""
    if images_dir is not None and not Path(images_dir).is_dir():
        raise FileNotFoundError(f"image folder not found: {images_dir}")
    options = DocumentOptions(
        images_dir=str(images_dir) if images_dir is not None else None,
        min_images=min_images,
        max_images=max_images,
        min_similarity=min_similarity,
        image=config.image,
    )
    for path in docs_paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"documents file not found: {path}")
    inputs = (_DocInput(source, doc) for path in docs_paths for source, doc in iter_jsonl_documents(path))
    image_drops: Counter[str] = Counter()
    images_written = 0
    extra = {
        "source": {
            "docs": [str(p) for p in docs_paths],
            "images_dir": options.images_dir,
            "min_images": min_images,
            "max_images": max_images,
            "min_similarity": min_similarity,
        }
    }
    with ShardWriter(config, kind="documents", extra_stats=extra) as writer:
        image_skips = SkipCounter(config.max_logged_skips, what="image")
        results = parallel_map(_DocPreparer(options), inputs, num_workers, chunksize=4)
        for result in progress(results, None, desc=f"writing {config.prefix}", enabled=show_progress):
            for reason, detail in result.image_drops:
                image_drops[reason] += 1
                image_skips.add(reason, result.source, detail)
            if result.skip_reason:
                writer.skip(result.skip_reason, result.source, result.skip_detail)
                continue
            writer.write(result.members)
            images_written += len(result.members) - 1
        writer.extra_stats.update(
            images_written=images_written,
            images_dropped=dict(sorted(image_drops.items())),
            images_dropped_examples=image_skips.examples,
        )
    return writer.stats


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.from_mmc4",
        description="Write WebDataset shards of interleaved image-text documents from MMC4-format JSONL "
        "(text_list + image_info with matched_text_index; images from a folder or embedded base64).",
    )
    parser.add_argument("--docs", nargs="+", required=True, help="MMC4 JSONL file(s) (.jsonl, .jsonl.gz or .zip)")
    parser.add_argument("--images", default=None, help="folder holding the images named by image_info[].image_name")
    parser.add_argument(
        "--min-images", type=int, default=1, help="skip documents with fewer valid images (default: %(default)s)"
    )
    parser.add_argument("--max-images", type=int, default=None, help="keep at most this many images per document")
    parser.add_argument(
        "--min-similarity",
        type=float,
        default=None,
        help="drop images whose matched_sim is below this (OpenFlamingo used 0.24 for MMC4)",
    )
    add_writer_arguments(parser, default_prefix="docs")
    args = parser.parse_args(argv)
    setup_cli_logging()
    stats = write_document_shards(
        args.docs,
        writer_config_from_args(args),
        images_dir=args.images,
        min_images=args.min_images,
        max_images=args.max_images,
        min_similarity=args.min_similarity,
        num_workers=args.num_workers,
        show_progress=not args.no_progress,
    )
    print(format_summary(stats))
    return stats


if __name__ == "__main__":
    main()
