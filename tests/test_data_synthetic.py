"""The embedded default dataset: exact captions, uniform contents, determinism, speed, loader compatibility."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from data_helpers import SmallTransform, make_tokenizer, read_tar

from data_pipelines.loader import documents_loader, pairs_loader
from data_pipelines.synthetic import (
    CELLS,
    COLOURS,
    POSITIONS,
    SHAPES,
    Group,
    SyntheticConfig,
    caption_of,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    make_scene,
    parse_caption,
    sample_scene,
)

SMALL = SyntheticConfig(num_pairs=60, num_docs=12, num_val_pairs=8, seed=7, samples_per_shard=25)


def test_caption_is_exact_and_parseable() -> None:
    groups = [Group("square", "blue", 3, "right"), Group("circle", "red", 1, "top")]
    assert caption_of(groups) == "a red circle at the top and three blue squares on the right."
    assert parse_caption(caption_of(groups)) == sorted(groups, key=lambda g: POSITIONS.index(g.position))
    assert parse_caption("two green triangles in the center.") == [Group("triangle", "green", 2, "center")]
    assert parse_caption("a red circle on the moon.") is None
    assert parse_caption("two red circle at the top.") is None


def test_pictures_show_what_captions_say() -> None:
    """Colour, count and position of every group can be read off the pixels; empty cells are empty."""
    size, cell = 64, 64 / 3
    fill = {shape: [] for shape in SHAPES}
    for index in range(60):
        image, groups = make_scene(3, "pairs", index, size=size)
        pixels = np.asarray(image).astype(int)
        saturation = pixels.max(axis=2) - pixels.min(axis=2)
        by_position = {g.position: g for g in groups}
        for position, (row, col) in CELLS.items():
            occupied = 0
            for qy in range(2):
                for qx in range(2):
                    ys = slice(round(row * cell + qy * cell / 2), round(row * cell + (qy + 1) * cell / 2))
                    xs = slice(round(col * cell + qx * cell / 2), round(col * cell + (qx + 1) * cell / 2))
                    mask = saturation[ys, xs] > 60
                    if mask.sum() >= 6:
                        occupied += 1
                        yy, xx = np.nonzero(mask)
                        fill[by_position[position].shape].append(mask.sum() / ((np.ptp(yy) + 1) * (np.ptp(xx) + 1)))
                    else:
                        assert mask.sum() == 0, (index, position)  # nothing stray outside the shapes
            group = by_position.get(position)
            assert occupied == (group.count if group else 0), (index, position, caption_of(groups))
            if group:
                ys = slice(round(row * cell), round((row + 1) * cell))
                xs = slice(round(col * cell), round((col + 1) * cell))
                strong = pixels[ys, xs][saturation[ys, xs] > 100]
                median = np.median(strong, axis=0)
                nearest = min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - median).sum())
                assert nearest == group.colour, (index, position, median)
    assert min(fill["square"]) > 0.9 > max(fill["circle"] + fill["triangle"])
    assert np.mean(fill["circle"]) > np.mean(fill["triangle"]) + 0.08


def test_contents_are_uniform_and_independent() -> None:
    """Text priors cannot guess a caption: every attribute is (close to) uniform, whatever the others are."""
    groups = [g for i in range(3000) for g in sample_scene(np.random.default_rng([0, i]))]
    for attribute, values in (
        ("shape", SHAPES),
        ("colour", list(COLOURS)),
        ("position", POSITIONS),
        ("count", [1, 2, 3]),
    ):
        counts = Counter(getattr(g, attribute) for g in groups)
        expected = len(groups) / len(values)
        assert set(counts) == set(values) and all(abs(counts[v] / expected - 1) < 0.12 for v in values), counts
    reds = [g.shape for g in groups if g.colour == "red"]
    assert all(abs(Counter(reds)[s] / (len(reds) / 3) - 1) < 0.2 for s in SHAPES)
    sizes = Counter(len(sample_scene(np.random.default_rng([1, i]))) for i in range(2000))
    assert abs(sizes[1] / 1000 - 1) < 0.1 and abs(sizes[2] / 1000 - 1) < 0.1


def test_generation_is_deterministic_and_quick(tmp_path: Path) -> None:
    start = time.perf_counter()
    first = generate_synthetic_dataset(tmp_path / "a", SMALL, show_progress=False)
    seconds = time.perf_counter() - start
    assert seconds < 10, f"generating {SMALL.num_pairs + SMALL.num_docs} samples took {seconds:.1f}s"
    generate_synthetic_dataset(tmp_path / "b", SMALL, show_progress=False)
    generate_synthetic_dataset(tmp_path / "c", replace(SMALL, seed=8), show_progress=False)
    shards = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    assert len(shards) == 3 + 1 + 1  # 60 pairs at 25 per shard, 12 docs, 8 val pairs
    for shard in shards:
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    assert (tmp_path / "a" / shards[0]).read_bytes() != (tmp_path / "c" / shards[0]).read_bytes()
    assert first.manifest["stats"]["pairs"]["samples_written"] == 60
    samples = read_tar(tmp_path / "a" / "val_pairs" / "val_pairs-000000.tar")
    val_captions = {s["txt"] for s in samples.values()}
    train_captions = {s["txt"] for p in sorted((tmp_path / "a" / "pairs").glob("*.tar")) for s in read_tar(p).values()}
    assert len(val_captions - train_captions) > 0  # another seed stream than the training pairs


def test_ensure_reuses_existing_dataset(tmp_path: Path) -> None:
    dataset = ensure_synthetic_dataset(tmp_path, SMALL, show_progress=False)
    shard = next((tmp_path / "pairs").glob("*.tar"))
    stamp = shard.stat().st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path, SMALL, show_progress=False) == dataset
    assert shard.stat().st_mtime_ns == stamp  # not regenerated
    again = ensure_synthetic_dataset(tmp_path, replace(SMALL, num_pairs=30), show_progress=False)
    assert again.manifest["stats"]["pairs"]["samples_written"] == 30
    assert len(list((tmp_path / "pairs").glob("*.tar"))) == 2


def test_loaders_read_the_synthetic_shards(tmp_path: Path) -> None:
    dataset = generate_synthetic_dataset(tmp_path, SMALL, show_progress=False)
    tokenizer = make_tokenizer()
    pairs = pairs_loader(dataset.pairs, tokenizer, SmallTransform(16), batch_size=16, return_metadata=True)
    batches = list(pairs)
    assert sum(b["input_ids"].shape[0] for b in batches) == 60 and pairs.stats["skipped"] == 0
    for batch in batches:
        for row, meta in enumerate(batch["metadata"]):
            groups = [Group(**g) for g in meta["json"]["scene"]]
            assert meta["json"]["caption"] == caption_of(groups)
            decoded = tokenizer.decode(batch["input_ids"][row], skip_special_tokens=True)
            assert " ".join(decoded.split()) == caption_of(groups).replace(".", " .")
    docs = documents_loader(
        dataset.documents, tokenizer, SmallTransform(16), batch_size=4, max_images=4, return_metadata=True
    )
    for batch in docs:
        assert batch["vision_x"].shape[1:] == (4, 1, 3, 16, 16)
        for row, meta in enumerate(batch["metadata"]):
            images = len(meta["json"]["image_info"])
            assert 2 <= images <= 4 and batch["media_mask"][row].sum() == images
            assert [caption_of([Group(**g) for g in scene]) for scene in meta["json"]["scenes"]] == (
                meta["json"]["text_list"]
            )


@pytest.mark.slow  # a fresh interpreter importing torch: a few seconds
def test_command_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipelines.synthetic",
            "--out",
            str(tmp_path),
            "--num-pairs",
            "20",
            "--num-docs",
            "4",
            "--num-val-pairs",
            "0",
            "--seed",
            "2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert "pairs: 20 samples" in result.stdout and "docs: 4 samples" in result.stdout
    assert (tmp_path / "synthetic.json").is_file() and not (tmp_path / "val_pairs").exists()


@pytest.mark.parametrize("field,value", [("num_pairs", -1), ("image_size", 8), ("max_count", 5)])
def test_config_validation(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"{field} must be"):
        SyntheticConfig(**{field: value})
