"""Shards of image-text pairs from an image folder plus a captions file (CSV, JSONL or COCO captions JSON).

    python -m data_pipelines.from_captions --images flickr8k/Images --captions flickr8k/captions.txt \\
        --split-file flickr8k/Flickr_8k.trainImages.txt --out shards/flickr8k_train --prefix flickr8k-train

Caption file formats (``--format auto`` picks by extension: .jsonl -> jsonl, .json -> coco, anything else -> csv):

- csv: a header row naming at least the image and caption columns (``image,caption`` by default, the Flickr8k
  layout); quoted captions may contain commas. Several rows per image are allowed.
- jsonl: one object per line with the image column (default "image") and either "caption" (a string) or
  "captions" (a list of strings).
- coco: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.

By default every image becomes ONE sample holding all its captions: ``key.txt`` is the first caption and
``key.json["captions"]`` the full list (the loader draws one per epoch, evaluation gets all references).
``--one-sample-per-caption`` instead writes one sample per (image, caption) row, as img2dataset does.
An optional split list (one image name per line, the ``Flickr_8k.trainImages.txt`` style) restricts the images.
Samples are shuffled with ``--shuffle-seed`` before writing (``--no-shuffle`` keeps file order).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from .shards import (
    PairItem,
    ShardWriterConfig,
    add_writer_arguments,
    format_summary,
    setup_cli_logging,
    write_pairs,
    writer_config_from_args,
)

CaptionFormat = Literal["auto", "csv", "jsonl", "coco"]


def detect_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "coco"
    return "csv"


def read_caption_rows(
    path: str | Path,
    fmt: CaptionFormat = "auto",
    image_column: str = "image",
    caption_column: str = "caption",
) -> list[tuple[str, str]]:
    """(image name, caption) rows from a caption file, in file order. Raises ValueError on a malformed file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "csv":
        return _read_csv(path, image_column, caption_column)
    if fmt == "jsonl":
        return _read_jsonl(path, image_column, caption_column)
    if fmt == "coco":
        return _read_coco(path)
    raise ValueError(f"caption format must be one of auto, csv, jsonl, coco; got {fmt!r}")


def _read_csv(path: Path, image_column: str, caption_column: str) -> list[tuple[str, str]]:
    return read_caption_csv(path, image_column, caption_column)


def read_caption_csv(
    path: str | Path, image_column: str = "image", caption_column: str = "caption"
) -> list[tuple[str, str]]:
    """(image, caption) rows of a CSV caption file with a header, read strictly: every row must have exactly the
    header's fields (a caption with commas must be quoted), no quoted field may run over several lines (an
    unterminated quote), and the file must be UTF-8. Any other row is a ValueError naming the file and the line,
    before anything is written or scored. Captions and image names are stripped; a row whose caption is empty is
    returned with an empty caption, for the caller to skip and count."""
    path = Path(path)
    rows: list[tuple[str, str]] = []
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.reader(file, strict=True)
        line = 1
        try:
            header = next(reader, None)
            columns = [c.strip() for c in header] if header else []
            for wanted in (image_column, caption_column):
                if wanted not in columns:
                    raise ValueError(
                        f"{path}: CSV header {columns!r} has no column {wanted!r} (expected a header with "
                        f"{image_column!r} and {caption_column!r}; see --image-column/--caption-column)"
                    )
            image_index, caption_index = columns.index(image_column), columns.index(caption_column)
            for fields in reader:
                first, line = line + 1, reader.line_num
                where = f"{path}:{first}" if first == line else f"{path}:{first}-{line}"
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # a blank line
                if len(fields) != len(columns):
                    raise ValueError(
                        f"{where}: expected {len(columns)} fields ({', '.join(columns)}), got {len(fields)}: "
                        f"{_preview(fields)} (a caption that contains commas must be quoted)"
                    )
                if line != first and any("\n" in f or "\r" in f for f in fields):
                    raise ValueError(
                        f"{where}: a quoted field runs over {line - first + 1} lines (an unterminated quote?): "
                        f"{_preview(fields)}"
                    )
                image = fields[image_index].strip()
                if not image:
                    raise ValueError(f"{where}: empty image name in column {image_column!r}: {_preview(fields)}")
                rows.append((image, fields[caption_index].strip()))
        except csv.Error as err:
            hint = " (an unterminated quote?)" if "end of data" in str(err) else ""
            raise ValueError(f"{path}:{line + 1}: malformed CSV ({err}){hint}") from None
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path}: not UTF-8 after line {reader.line_num} (byte {err.start} of a read block: "
                f"{err.object[err.start : err.start + 4]!r}); re-save the file as UTF-8"
            ) from None
    return rows


def _preview(fields: list[str], limit: int = 120) -> str:
    text = repr(fields)
    return text if len(text) <= limit else text[:limit] + "...]"


def _read_jsonl(path: Path, image_column: str, caption_column: str) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({err})") from None
            if not isinstance(record, dict) or image_column not in record:
                raise ValueError(
                    f"{path}:{line_number}: expected an object with key {image_column!r}, got {line[:80]!r}"
                )
            captions: Any = record.get(caption_column, record.get(caption_column + "s"))
            if isinstance(captions, str):
                captions = [captions]
            if not isinstance(captions, list):
                raise ValueError(
                    f"{path}:{line_number}: expected {caption_column!r} (string) or {caption_column + 's'!r} (list), "
                    f"got {line[:80]!r}"
                )
            rows.extend((str(record[image_column]), str(c)) for c in captions)
    return rows


def _read_coco(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: expected a COCO captions JSON with 'images' and 'annotations'")
    names = {image["id"]: image["file_name"] for image in data["images"]}
    rows = []
    for annotation in data["annotations"]:
        # an annotation with an unknown image id yields an empty name, skipped and counted as "unknown_image_id"
        name = names.get(annotation["image_id"], f"<unknown image_id {annotation['image_id']}>")
        rows.append((name, annotation.get("caption", "")))
    return rows


def read_split_file(path: str | Path) -> list[str]:
    """Image names from a split list (one per line, blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_pair_items(
    images_dir: str | Path,
    rows: Sequence[tuple[str, str]],
    *,
    split: Sequence[str] | None = None,
    one_sample_per_caption: bool = False,
    shuffle_seed: int | None = 0,
) -> tuple[list[PairItem], list[tuple[str, str, str]], dict[str, int]]:
    """Group caption rows into PairItems.

    Returns (items, pre_skips, info): pre_skips are (reason, item, detail) for split entries without captions and
    rows with an unknown COCO image id; info counts rows/images seen and rows outside the split.
    """
    images_dir = Path(images_dir)
    grouped: dict[str, list[str]] = {}
    pre_skips: list[tuple[str, str, str]] = []
    for name, caption in rows:
        name = name.strip()
        if name.startswith("<unknown image_id"):
            pre_skips.append(("unknown_image_id", name, f"caption {caption[:60]!r}"))
            continue
        grouped.setdefault(name, []).append(caption)
    info = {"caption_rows": len(rows), "images_in_captions": len(grouped), "rows_outside_split": 0}
    if split is not None:
        wanted = list(dict.fromkeys(split))
        wanted_set = set(wanted)
        info["rows_outside_split"] = sum(len(c) for n, c in grouped.items() if n not in wanted_set)
        for name in wanted:
            if name not in grouped:
                pre_skips.append(("no_caption", name, "listed in the split file but has no caption row"))
        grouped = {name: grouped[name] for name in wanted if name in grouped}
    items: list[PairItem] = []
    for name, captions in grouped.items():
        groups = [[c] for c in captions] if one_sample_per_caption else [captions]
        for index, group in enumerate(groups):
            meta: dict[str, Any] = {"image_name": name}
            if one_sample_per_caption:
                meta["caption_index"] = index
            items.append(PairItem(images_dir / name, group, source=name, meta=meta))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    return items, pre_skips, info


def write_caption_shards(
    images_dir: str | Path,
    captions_path: str | Path,
    config: ShardWriterConfig,
    *,
    fmt: CaptionFormat = "auto",
    image_column: str = "image",
    caption_column: str = "caption",
    split_file: str | Path | None = None,
    one_sample_per_caption: bool = False,
    shuffle_seed: int | None = 0,
    num_workers: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write shards of pairs from an image folder and a captions file; returns the stats (also saved as JSON)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {images_dir}")
    rows = read_caption_rows(captions_path, fmt, image_column, caption_column)
    split = read_split_file(split_file) if split_file is not None else None
    items, pre_skips, info = build_pair_items(
        images_dir, rows, split=split, one_sample_per_caption=one_sample_per_caption, shuffle_seed=shuffle_seed
    )
    extra = {
        "source": {
            "images_dir": str(images_dir),
            "captions": str(captions_path),
            "format": detect_format(captions_path) if fmt == "auto" else fmt,
            "split_file": str(split_file) if split_file is not None else None,
            "one_sample_per_caption": one_sample_per_caption,
            "shuffle_seed": shuffle_seed,
            **info,
        }
    }
    return write_pairs(
        items,
        config,
        total=len(items),
        num_workers=num_workers,
        show_progress=show_progress,
        extra_stats=extra,
        pre_skips=pre_skips,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.from_captions",
        description="Write WebDataset shards of image-text pairs from an image folder and a captions file "
        "(CSV image,caption / JSONL / COCO captions JSON).",
    )
    parser.add_argument("--images", required=True, help="folder holding the images named in the captions file")
    parser.add_argument("--captions", required=True, help="captions file (CSV, JSONL or COCO JSON)")
    parser.add_argument(
        "--format", choices=("auto", "csv", "jsonl", "coco"), default="auto", help="default: %(default)s"
    )
    parser.add_argument("--image-column", default="image", help="CSV/JSONL image column (default: %(default)s)")
    parser.add_argument("--caption-column", default="caption", help="CSV/JSONL caption column (default: %(default)s)")
    parser.add_argument("--split-file", default=None, help="optional list of image names to keep, one per line")
    parser.add_argument(
        "--one-sample-per-caption",
        action="store_true",
        help="one sample per caption row instead of one per image with all its captions",
    )
    parser.add_argument(
        "--shuffle-seed", type=int, default=0, help="seed of the write-order shuffle (default: %(default)s)"
    )
    parser.add_argument("--no-shuffle", action="store_true", help="keep the caption-file order")
    add_writer_arguments(parser, default_prefix="pairs")
    args = parser.parse_args(argv)
    setup_cli_logging()
    stats = write_caption_shards(
        args.images,
        args.captions,
        writer_config_from_args(args),
        fmt=args.format,
        image_column=args.image_column,
        caption_column=args.caption_column,
        split_file=args.split_file,
        one_sample_per_caption=args.one_sample_per_caption,
        shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
        num_workers=args.num_workers,
        show_progress=not args.no_progress,
    )
    print(format_summary(stats))
    return stats


if __name__ == "__main__":
    main()
