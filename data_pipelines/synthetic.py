"""The embedded default dataset: procedurally rendered scenes of coloured shapes, with exact captions.

    python -m data_pipelines.synthetic --out data/synthetic --num-pairs 2000 --num-docs 500 --seed 0

A scene has one or two groups of identical shapes. Each group has a shape (circle, square, triangle), a colour
(red, green, blue, yellow, purple), a count (1 to ``max_count``) and a position (top, left, center, right, bottom:
the cells of a plus-shaped layout on a 3 x 3 grid, so positions never overlap). Every attribute is drawn uniformly
and independently, so text alone cannot predict a caption; it is learnable only by looking at the image.
The caption states the whole content, groups in reading order (top, left, center, right, bottom)::

    "a red circle at the top and three blue squares on the right."

It is a deterministic function of the scene (:func:`caption_of`), and :func:`parse_caption` inverts it, so
generated captions can be scored attribute by attribute.

Everything is a pure function of the seed: scene ``i`` of a split uses ``numpy.random.default_rng([seed, split, i])``,
and shards are byte-identical for the same arguments. Output layout::

    out/pairs/pairs-000000.tar ...      image-text pairs (key.jpg, key.txt, key.json with the scene)
    out/docs/docs-000000.tar ...        few-shot interleaved documents of 2..max_images scenes (key.json, key.N.jpg)
    out/val_pairs/val_pairs-000000.tar  held-out pairs (another seed stream), when num_val_pairs > 0
    out/synthetic.json                  the generation parameters, shard patterns and counts
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .shards import ShardWriter, ShardWriterConfig, progress

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 185, 70),
    "blue": (55, 105, 240),
    "yellow": (240, 215, 45),
    "purple": (165, 75, 215),
}
POSITIONS: tuple[str, ...] = ("top", "left", "center", "right", "bottom")  # also the caption order
CELLS: dict[str, tuple[int, int]] = {"top": (0, 1), "left": (1, 0), "center": (1, 1), "right": (1, 2), "bottom": (2, 1)}
PREPOSITIONS: dict[str, str] = {
    "top": "at the top",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom": "at the bottom",
}
NUMBER_WORDS: tuple[str, ...] = ("", "a", "two", "three", "four")
SHAPE_PADDING = 0.1  # fraction of a cell quarter kept free on each side of a shape
SPLITS: dict[str, int] = {"pairs": 1, "docs": 2, "val_pairs": 3, "classes": 4}
MANIFEST = "synthetic.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Group:
    """``count`` identical shapes of one colour in one cell of the layout."""

    shape: str
    colour: str
    count: int
    position: str


def caption_of(groups: Sequence[Group]) -> str:
    """The exact caption of a scene, e.g. "a red circle at the top and two blue squares on the right."."""
    ordered = sorted(groups, key=lambda g: POSITIONS.index(g.position))
    phrases = [
        f"{NUMBER_WORDS[g.count]} {g.colour} {g.shape}{'s' if g.count > 1 else ''} {PREPOSITIONS[g.position]}"
        for g in ordered
    ]
    return " and ".join(phrases) + "."


def parse_caption(caption: str) -> list[Group] | None:
    """Inverse of :func:`caption_of` (None when the text is not a well-formed scene caption)."""
    text = caption.strip()
    if not text.endswith("."):
        return None
    groups = []
    for phrase in text[:-1].split(" and "):
        words = phrase.split()
        if len(words) != 6 or words[0] not in NUMBER_WORDS[1:]:  # count colour shape + 3-word place
            return None
        count = NUMBER_WORDS.index(words[0])
        colour, shape = words[1], words[2]
        if count > 1:
            if not shape.endswith("s"):
                return None
            shape = shape[:-1]
        position = next((p for p, prep in PREPOSITIONS.items() if prep == " ".join(words[3:])), None)
        if colour not in COLOURS or shape not in SHAPES or position is None:
            return None
        groups.append(Group(shape, colour, count, position))
    return groups


def sample_scene(rng: np.random.Generator, max_count: int = 3, max_groups: int = 2) -> list[Group]:
    """Uniform, independent draws: number of groups, distinct positions, and shape/colour/count per group."""
    num_groups = int(rng.integers(1, max_groups + 1))
    positions = rng.choice(len(POSITIONS), size=num_groups, replace=False)
    return [
        Group(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
            count=int(rng.integers(1, max_count + 1)),
            position=POSITIONS[int(p)],
        )
        for p in positions
    ]


def render_scene(
    groups: Sequence[Group], rng: np.random.Generator, size: int = 64, supersample: int = 2
) -> Image.Image:
    """Draw the scene: dark background, each group's shapes in distinct quarters of its cell (2x supersampled)."""
    canvas = size * supersample
    background = int(rng.integers(20, 70))
    image = Image.new("RGB", (canvas, canvas), (background, background, background))
    draw = ImageDraw.Draw(image)
    cell = canvas / 3
    sub = cell / 2
    for group in groups:
        row, col = CELLS[group.position]
        slots = rng.choice(4, size=group.count, replace=False)
        colour = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[group.colour])
        for slot in slots:
            # each shape stays inside its quarter of the cell with a gap, so shapes never touch or cross cells
            extent = sub * rng.uniform(0.62, 0.76)
            margin = sub * (1 - 2 * SHAPE_PADDING) - extent
            x0 = col * cell + (slot % 2 + SHAPE_PADDING) * sub + rng.uniform(0, margin)
            y0 = row * cell + (slot // 2 + SHAPE_PADDING) * sub + rng.uniform(0, margin)
            box = (x0, y0, x0 + extent, y0 + extent)
            if group.shape == "circle":
                draw.ellipse(box, fill=colour)
            elif group.shape == "square":
                inset = extent * 0.06
                draw.rectangle((x0 + inset, y0 + inset, x0 + extent - inset, y0 + extent - inset), fill=colour)
            else:
                draw.polygon([(x0 + extent / 2, y0), (x0 + extent, y0 + extent), (x0, y0 + extent)], fill=colour)
    if supersample > 1:
        image = image.resize((size, size), Image.Resampling.BOX)
    return image


def make_scene(
    seed: int, split: str, index: int, size: int = 64, max_count: int = 3
) -> tuple[Image.Image, list[Group]]:
    """Scene ``index`` of a split: (image, groups); a pure function of the arguments."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    groups = sample_scene(rng, max_count)
    return render_scene(groups, rng, size), groups


def _jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True)
class SyntheticConfig:
    """Generation parameters (all stored in ``synthetic.json``)."""

    num_pairs: int = 2000
    num_docs: int = 500
    num_val_pairs: int = 200
    seed: int = 0
    image_size: int = 64
    max_count: int = 3
    min_doc_images: int = 2
    max_doc_images: int = 4
    samples_per_shard: int = 1000

    def __post_init__(self) -> None:
        for name in ("num_pairs", "num_docs", "num_val_pairs", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SyntheticConfig.{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.image_size, int) or self.image_size < 24:
            raise ValueError(f"SyntheticConfig.image_size must be an int >= 24, got {self.image_size!r}")
        if not isinstance(self.max_count, int) or not 1 <= self.max_count <= 4:
            raise ValueError(f"SyntheticConfig.max_count must be an int in [1, 4], got {self.max_count!r}")
        if not 1 <= self.min_doc_images <= self.max_doc_images:
            raise ValueError(
                f"SyntheticConfig needs 1 <= min_doc_images <= max_doc_images, got {self.min_doc_images!r}, "
                f"{self.max_doc_images!r}"
            )
        if not isinstance(self.samples_per_shard, int) or self.samples_per_shard < 1:
            raise ValueError(f"SyntheticConfig.samples_per_shard must be an int >= 1, got {self.samples_per_shard!r}")


@dataclass(frozen=True)
class SyntheticDataset:
    """Where a generated dataset lives: shard globs per split (None when that split is empty) and the manifest."""

    root: Path
    pairs: str | None
    documents: str | None
    val_pairs: str | None
    manifest: dict[str, Any]


def _pair_sample(config: SyntheticConfig, split: str, index: int) -> dict[str, Any]:
    image, groups = make_scene(config.seed, split, index, config.image_size, config.max_count)
    caption = caption_of(groups)
    return {
        "jpg": _jpeg(image),
        "txt": caption,
        "json": {
            "caption": caption,
            "captions": [caption],
            "scene": [asdict(g) for g in groups],
            "source": f"synthetic:{split}:{config.seed}:{index}",
            "width": image.width,
            "height": image.height,
        },
    }


def _doc_sample(config: SyntheticConfig, index: int) -> dict[str, Any]:
    rng = np.random.default_rng([config.seed, SPLITS["docs"], index])
    num_images = int(rng.integers(config.min_doc_images, config.max_doc_images + 1))
    sample: dict[str, Any] = {}
    text_list, image_info, scenes = [], [], []
    for j in range(num_images):
        # scene j of document index: its own seed stream, independent of the pair splits
        scene_rng = np.random.default_rng([config.seed, SPLITS["docs"], index, j])
        groups = sample_scene(scene_rng, config.max_count)
        image = render_scene(groups, scene_rng, config.image_size)
        sample[f"{j}.jpg"] = _jpeg(image)
        text_list.append(caption_of(groups))
        image_info.append(
            {
                "matched_text_index": j,
                "member": f"{j}.jpg",
                "image_name": f"scene_{j}.jpg",
                "width": image.width,
                "height": image.height,
            }
        )
        scenes.append([asdict(g) for g in groups])
    sample["json"] = {
        "text_list": text_list,
        "image_info": image_info,
        "scenes": scenes,
        "source": f"synthetic:docs:{config.seed}:{index}",
    }
    return sample


def generate_synthetic_dataset(
    out_dir: str | Path,
    config: SyntheticConfig = SyntheticConfig(),
    *,
    show_progress: bool = True,
    overwrite: bool = True,
) -> SyntheticDataset:
    """Generate all splits into ``out_dir`` and write ``synthetic.json``; returns where they are."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # an interrupted generation leaves no manifest
    start = time.perf_counter()
    stats: dict[str, Any] = {}
    patterns: dict[str, str | None] = {}
    for split, count in (("pairs", config.num_pairs), ("docs", config.num_docs), ("val_pairs", config.num_val_pairs)):
        writer_config = ShardWriterConfig(
            root / split, prefix=split, max_samples_per_shard=config.samples_per_shard, overwrite=overwrite
        )
        patterns[split] = writer_config.shard_pattern if count else None
        if not count:
            continue
        with ShardWriter(
            writer_config,
            kind="documents" if split == "docs" else "pairs",
            extra_stats={"source": {"synthetic": asdict(config), "split": split}},
        ) as writer:
            for index in progress(range(count), count, desc=f"synthetic {split}", enabled=show_progress):
                writer.write(_doc_sample(config, index) if split == "docs" else _pair_sample(config, split, index))
        stats[split] = {k: writer.stats[k] for k in ("samples_written", "shards_written", "bytes_written", "seconds")}
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "shards": {"pairs": patterns["pairs"], "documents": patterns["docs"], "val_pairs": patterns["val_pairs"]},
        "stats": stats,
        "seconds": round(time.perf_counter() - start, 3),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return SyntheticDataset(root, patterns["pairs"], patterns["docs"], patterns["val_pairs"], manifest)


def ensure_synthetic_dataset(
    out_dir: str | Path, config: SyntheticConfig = SyntheticConfig(), *, show_progress: bool = True
) -> SyntheticDataset:
    """The dataset in ``out_dir``, generated only if it is missing or was made with other parameters.

    This is what a training job calls when it is given no data."""
    root = Path(out_dir)
    manifest_path = root / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        if manifest.get("format_version") == FORMAT_VERSION and manifest.get("config") == asdict(config):
            shards = manifest["shards"]
            return SyntheticDataset(root, shards["pairs"], shards["documents"], shards["val_pairs"], manifest)
    return generate_synthetic_dataset(root, config, show_progress=show_progress, overwrite=True)


def scene_classes() -> list[tuple[str, str]]:
    """The classes of one-group scenes: every (colour, shape)."""
    return [(colour, shape) for colour in COLOURS for shape in SHAPES]


def write_scene_classes(
    out_dir: str | Path, per_class: int = 60, seed: int = 0, image_size: int = 64, max_count: int = 3
) -> Path:
    """A class tree of one-group scenes, ``out_dir/test/<colour>_<shape>/NNNN.png`` (class "red circle": any count
    and position), from its own seed stream (never a scene of the training splits). Written once; returns
    ``out_dir``. This is the ``synthetic`` data of ``python -m vlm.eval binding``."""
    root = Path(out_dir)
    params = {"format_version": FORMAT_VERSION, "per_class": per_class, "seed": seed, "image_size": image_size,
              "max_count": max_count}  # fmt: skip
    manifest = root / "scene_classes.json"
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == params:
                return root
        except json.JSONDecodeError:
            pass
    manifest.unlink(missing_ok=True)
    for c, (colour, shape) in enumerate(scene_classes()):
        folder = root / "test" / f"{colour}_{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, SPLITS["classes"], c, i])
            group = Group(
                shape, colour, int(rng.integers(1, max_count + 1)), POSITIONS[int(rng.integers(len(POSITIONS)))]
            )
            render_scene([group], rng, image_size).save(folder / f"{i:04d}.png")
    manifest.write_text(json.dumps(params))
    return root


def main(argv: Sequence[str] | None = None) -> SyntheticDataset:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.synthetic",
        description="Generate the embedded default dataset: scenes of coloured shapes with exact captions, "
        "as WebDataset shards of pairs and of few-shot interleaved documents.",
    )
    defaults = SyntheticConfig()
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-pairs", type=int, default=defaults.num_pairs, help="default: %(default)s")
    parser.add_argument("--num-docs", type=int, default=defaults.num_docs, help="default: %(default)s")
    parser.add_argument("--num-val-pairs", type=int, default=defaults.num_val_pairs, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="default: %(default)s")
    parser.add_argument(
        "--max-count", type=int, default=defaults.max_count, help="shapes per group, at most (default: %(default)s)"
    )
    parser.add_argument("--max-doc-images", type=int, default=defaults.max_doc_images, help="default: %(default)s")
    parser.add_argument(
        "--samples-per-shard", type=int, default=defaults.samples_per_shard, help="default: %(default)s"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    config = SyntheticConfig(
        num_pairs=args.num_pairs,
        num_docs=args.num_docs,
        num_val_pairs=args.num_val_pairs,
        seed=args.seed,
        image_size=args.image_size,
        max_count=args.max_count,
        max_doc_images=args.max_doc_images,
        samples_per_shard=args.samples_per_shard,
    )
    dataset = generate_synthetic_dataset(args.out, config, show_progress=not args.no_progress)
    for split, info in dataset.manifest["stats"].items():
        print(
            f"{split}: {info['samples_written']} samples in {info['shards_written']} shard(s), "
            f"{info['bytes_written'] / 2**20:.1f} MiB, {info['seconds']:.1f}s"
        )
    print(f"shards: pairs={dataset.pairs} documents={dataset.documents} val_pairs={dataset.val_pairs}")
    print(f"total {dataset.manifest['seconds']:.1f}s; manifest {dataset.root / MANIFEST}")
    return dataset


if __name__ == "__main__":
    main()
