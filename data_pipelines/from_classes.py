"""Shards of image-text pairs from an ImageFolder-style class tree (``root/<class>/*.jpg``, e.g. CIFAR-10).

    python -m data_pipelines.from_classes --root cifar10/train --out shards/cifar10_train \\
        --template "a photo of a {}." --template "a blurry photo of a {}."

Each image becomes one sample: ``key.txt`` is the first template filled with the class name and
``key.json["captions"]`` holds every template filled in (the loader draws one per epoch); ``key.json`` also has
``label`` (index of the class in sorted folder order) and ``class_name``. Class names are the folder names with
``_`` turned into spaces, or come from ``--class-names a,b,c`` (in sorted folder order). A template's "a {}" becomes
"an {}" before a vowel ("an airplane"). Samples are shuffled before writing (``--shuffle-seed``), so shards are not
sorted by class.
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .images import IMAGE_EXTENSIONS
from .shards import (
    PairItem,
    ShardWriterConfig,
    add_writer_arguments,
    format_summary,
    setup_cli_logging,
    write_pairs,
    writer_config_from_args,
)

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def fill_template(template: str, name: str) -> str:
    """``template.format(name)``, with the article "a {}" turned into "an {}" when name starts with a vowel."""
    if "{}" not in template:
        raise ValueError(f"caption template must contain '{{}}' for the class name, got {template!r}")
    if name[:1].lower() in "aeiou":
        template = re.sub(r"\b([Aa]) \{\}", lambda m: m.group(1) + "n {}", template)
    return template.replace("{}", name)


def list_class_tree(root: str | Path, only: Sequence[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class folder names sorted, [(image path, label)] sorted) for ``root/<class>/<image>``; ``only``: a subset
    of the class folders (an error names any that is missing)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"class tree root not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected root/<class>/*.jpg)")
    if only is not None:
        missing = sorted(set(only) - set(classes))
        if missing:
            raise ValueError(f"classes {missing} are not class folders of {root}; it has {classes}")
        classes = sorted(set(only))
    files: list[tuple[Path, int]] = []
    empty = []
    for label, name in enumerate(classes):
        before = len(files)
        for path in sorted((root / name).iterdir()):
            if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                files.append((path, label))
        if len(files) == before:
            empty.append(str(root / name))
    if empty:  # an empty folder would still count as a class (labels, ways, top-k)
        raise ValueError(
            f"{len(empty)} class folder(s) hold no image (.{', .'.join(IMAGE_EXTENSIONS)}): {empty[:5]}; "
            "remove them or add images"
        )
    return classes, files


def write_class_shards(
    root: str | Path,
    config: ShardWriterConfig,
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    class_names: Sequence[str] | None = None,
    shuffle_seed: int | None = 0,
    num_workers: int = 0,
    show_progress: bool = True,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write shards of (image, templated class caption) pairs; returns the stats (also saved as JSON).
    ``classes``: only these class folders (labels index them in sorted order)."""
    if not templates:
        raise ValueError("templates must hold at least one caption template such as 'a photo of a {}.'")
    for template in templates:
        fill_template(template, "x")  # validates
    folders, files = list_class_tree(root, classes)
    if class_names is None:
        names = [folder.replace("_", " ") for folder in folders]
    else:
        names = list(class_names)
        if len(names) != len(folders):
            raise ValueError(
                f"class_names has {len(names)} names but {root} has {len(folders)} class folders: {folders}"
            )
    items = [
        PairItem(
            path,
            [fill_template(t, names[label]) for t in templates],
            source=f"{folders[label]}/{path.name}",
            meta={"label": label, "class_name": names[label], "class_folder": folders[label]},
        )
        for path, label in files
    ]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    extra = {
        "source": {
            "root": str(root),
            "classes": names,
            "class_folders": folders,
            "templates": list(templates),
            "images_found": len(files),
            "shuffle_seed": shuffle_seed,
        },
    }
    return write_pairs(
        items, config, total=len(items), num_workers=num_workers, show_progress=show_progress, extra_stats=extra
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.from_classes",
        description="Write WebDataset shards of image-text pairs from a class tree root/<class>/*.jpg "
        "with caption templates.",
    )
    parser.add_argument("--root", required=True, help="folder with one sub-folder of images per class")
    parser.add_argument(
        "--template",
        action="append",
        default=None,
        help="caption template with {} for the class name; repeatable (default: 'a photo of a {}.')",
    )
    parser.add_argument(
        "--class-names", default=None, help="comma-separated class names in sorted folder order (default: folder names)"
    )
    parser.add_argument(
        "--shuffle-seed", type=int, default=0, help="seed of the write-order shuffle (default: %(default)s)"
    )
    parser.add_argument("--no-shuffle", action="store_true", help="keep class-sorted order")
    parser.add_argument("--classes", nargs="+", default=None, help="only these class folders (default: all)")
    add_writer_arguments(parser, default_prefix="classes")
    args = parser.parse_args(argv)
    setup_cli_logging()
    stats = write_class_shards(
        args.root,
        writer_config_from_args(args),
        templates=args.template or list(DEFAULT_TEMPLATES),
        class_names=[n.strip() for n in args.class_names.split(",")] if args.class_names else None,
        shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
        num_workers=args.num_workers,
        show_progress=not args.no_progress,
        classes=args.classes,
    )
    print(format_summary(stats))
    return stats


if __name__ == "__main__":
    main()
