"""Shard writers: captions (CSV / JSONL / COCO, split lists), class trees, MMC4 documents; skips are counted."""

from __future__ import annotations

import base64
import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from data_helpers import colour_of, image_bytes, json_of, mean_colour, read_tar
from PIL import Image

from data_pipelines import from_captions, from_classes, from_mmc4, synthetic
from data_pipelines.from_captions import write_caption_shards
from data_pipelines.from_classes import fill_template, write_class_shards
from data_pipelines.from_mmc4 import write_document_shards
from data_pipelines.images import ImageOptions
from data_pipelines.shards import ShardWriter, ShardWriterConfig


def make_image_folder(folder: Path, count: int, fmt: str = "JPEG") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"img_{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
        (folder / name).write_bytes(image_bytes(colour_of(i), fmt=fmt))
        names.append(name)
    return names


def all_samples(out_dir: Path, prefix: str) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out_dir.glob(f"{prefix}-*.tar")):
        samples.update(read_tar(shard))
    return samples


def test_csv_captions_round_trip_with_skips(tmp_path: Path) -> None:
    images = tmp_path / "images"
    names = make_image_folder(images, 5)
    (images / "broken.jpg").write_bytes(b"this is not an image")
    truncated = image_bytes((10, 200, 30), size=(64, 64))
    (images / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    rows = [("image", "caption")]
    for i, name in enumerate(names):
        rows += [(name, f"first caption, of image {i}"), (name, f"second caption of image {i}")]
    rows += [
        ("missing.jpg", "a caption"),
        ("broken.jpg", "a caption"),
        ("truncated.jpg", "a caption"),
        (names[0], "third caption of image 0"),
    ]
    with open(tmp_path / "captions.txt", "w", newline="") as file:
        csv.writer(file).writerows(rows)

    config = ShardWriterConfig(tmp_path / "out", prefix="flickr", max_samples_per_shard=2)
    stats = write_caption_shards(images, tmp_path / "captions.txt", config, shuffle_seed=None, show_progress=False)

    assert stats["samples_written"] == 5
    assert stats["skipped"] == {"broken_image": 2, "missing_file": 1}
    assert stats["shards_written"] == 3 and [s["samples"] for s in stats["shards"]] == [2, 2, 1]
    assert json.loads(config.stats_path.read_text())["samples_written"] == 5
    samples = all_samples(tmp_path / "out", "flickr")
    assert sorted(samples) == [f"{k:09d}" for k in range(5)]
    for key, sample in samples.items():
        i = int(key)
        meta = json_of(sample)
        assert set(sample) == {"jpg", "txt", "json"}
        assert meta["source"] == names[i] and meta["key"] == key
        expected = [f"first caption, of image {i}", f"second caption of image {i}"]
        if i == 0:
            expected.append("third caption of image 0")
        assert meta["captions"] == expected and sample["txt"].decode() == expected[0]
        assert sample["jpg"] == (images / names[i]).read_bytes()  # untouched JPEGs are copied byte for byte
        assert np.abs(mean_colour(sample["jpg"]) - colour_of(i)).max() < 4
    # the shards are plain WebDataset shards
    dataset = wds.WebDataset(str(tmp_path / "out" / "flickr-{000000..000002}.tar"), shardshuffle=False)
    assert [s["__key__"] for s in dataset] == sorted(samples)


def test_split_file_and_one_sample_per_caption(tmp_path: Path) -> None:
    images = tmp_path / "images"
    names = make_image_folder(images, 4, fmt="PNG")
    with open(tmp_path / "captions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "caption"])
        for name in names:
            writer.writerows([(name, f"{name} one"), (name, f"{name} two")])
    (tmp_path / "split.txt").write_text(f"{names[1]}\n{names[3]}\n\nnot_captioned.jpg\n")
    config = ShardWriterConfig(tmp_path / "out", prefix="train", image=ImageOptions(size=8, resize_mode="center_crop"))
    stats = write_caption_shards(
        images,
        tmp_path / "captions.csv",
        config,
        split_file=tmp_path / "split.txt",
        one_sample_per_caption=True,
        show_progress=False,
    )
    assert stats["samples_written"] == 4
    assert stats["skipped"] == {"no_caption": 1}
    assert stats["source"]["rows_outside_split"] == 4
    samples = all_samples(tmp_path / "out", "train")
    captions = sorted(json_of(s)["caption"] for s in samples.values())
    assert captions == sorted(f"{names[i]} {w}" for i in (1, 3) for w in ("one", "two"))
    for sample in samples.values():
        assert Image.open(io.BytesIO(sample["jpg"])).size == (8, 8)  # PNG re-encoded, cropped
        assert len(json_of(sample)["captions"]) == 1


def test_jsonl_and_coco_caption_files(tmp_path: Path) -> None:
    images = tmp_path / "images"
    names = make_image_folder(images, 3)
    lines = [
        {"image": names[0], "caption": "a cat"},
        {"image": names[1], "captions": ["a dog", "the dog"]},
        {"image": "gone.jpg", "caption": "lost"},
    ]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    stats = write_caption_shards(
        images, tmp_path / "caps.jsonl", ShardWriterConfig(tmp_path / "a", prefix="j"), show_progress=False
    )
    assert (stats["samples_written"], stats["skipped"]) == (2, {"missing_file": 1})
    got = {json_of(s)["source"]: json_of(s)["captions"] for s in all_samples(tmp_path / "a", "j").values()}
    assert got == {names[0]: ["a cat"], names[1]: ["a dog", "the dog"]}

    coco = {
        "images": [{"id": 7, "file_name": names[2]}, {"id": 8, "file_name": names[0]}],
        "annotations": [
            {"image_id": 7, "caption": "c one"},
            {"image_id": 8, "caption": "c two"},
            {"image_id": 7, "caption": "c three"},
            {"image_id": 99, "caption": "orphan"},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    stats = write_caption_shards(
        images, tmp_path / "coco.json", ShardWriterConfig(tmp_path / "b", prefix="c"), show_progress=False
    )
    assert (stats["samples_written"], stats["skipped"]) == (2, {"unknown_image_id": 1})
    got = {json_of(s)["source"]: json_of(s)["captions"] for s in all_samples(tmp_path / "b", "c").values()}
    assert got == {names[2]: ["c one", "c three"], names[0]: ["c two"]}

    (tmp_path / "bad.csv").write_text("file,text\nx.jpg,hello\n")
    with pytest.raises(ValueError, match="no column 'image'"):
        write_caption_shards(images, tmp_path / "bad.csv", ShardWriterConfig(tmp_path / "c"), show_progress=False)


def test_class_tree_with_templates(tmp_path: Path) -> None:
    root = tmp_path / "train"
    for name in ["airplane", "cat", "sea_lion"]:
        make_image_folder(root / name, 3)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    config = ShardWriterConfig(tmp_path / "out", prefix="cls", max_samples_per_shard=4)
    stats = write_class_shards(root, config, templates=["a photo of a {}.", "a {} in the wild."], show_progress=False)
    assert (stats["samples_written"], stats["skipped"]) == (9, {"broken_image": 1})
    samples = list(all_samples(tmp_path / "out", "cls").values())
    by_label = {}
    for sample in samples:
        meta = json_of(sample)
        by_label.setdefault(meta["label"], []).append(meta)
        assert sample["txt"].decode() == meta["captions"][0]
    assert {k: len(v) for k, v in by_label.items()} == {0: 3, 1: 3, 2: 3}
    assert by_label[0][0]["captions"] == ["a photo of an airplane.", "an airplane in the wild."]
    assert by_label[2][0]["captions"] == ["a photo of a sea lion.", "a sea lion in the wild."]
    labels_in_order = [json_of(s)["label"] for s in samples]
    assert labels_in_order != sorted(labels_in_order)  # shuffled before writing
    assert fill_template("A {}.", "owl") == "An owl." and fill_template("the {}", "owl") == "the owl"


def test_mmc4_documents_from_folder_and_base64(tmp_path: Path) -> None:
    images = tmp_path / "images"
    names = make_image_folder(images, 3)
    embedded = base64.b64encode(image_bytes((250, 10, 10))).decode()
    docs = [
        {
            "url": "u0",
            "text_list": ["intro", "about img 1", "about img 0"],
            "image_info": [
                {"image_name": names[0], "matched_text_index": 2, "matched_sim": 0.3},
                {"image_name": names[1], "matched_text_index": 1, "matched_sim": 0.3},
                {"image_name": "missing.jpg", "matched_text_index": 0, "matched_sim": 0.3},
            ],
        },
        {
            "url": "u1",
            "text_list": ["only text", "more"],
            "image_info": [{"image_name": "x.jpg", "matched_text_index": 1, "image_base64": embedded}],
        },
        {
            "url": "u2",
            "text_list": ["all images gone"],
            "image_info": [{"image_name": "missing2.jpg", "matched_text_index": 0}],
        },
        {"url": "u3", "text_list": ["bad index"], "image_info": [{"image_name": names[2], "matched_text_index": 5}]},
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n{not json\n")
    config = ShardWriterConfig(tmp_path / "out", prefix="docs")
    stats = write_document_shards([path], config, images_dir=images, show_progress=False)
    assert stats["samples_written"] == 2
    assert stats["skipped"] == {"malformed_document": 1, "too_few_images": 2}
    assert stats["images_written"] == 3
    assert stats["images_dropped"] == {"bad_matched_text_index": 1, "missing_file": 2}
    samples = all_samples(tmp_path / "out", "docs")
    first, second = (samples[k] for k in sorted(samples))
    meta = json_of(first)
    assert meta["url"] == "u0" and meta["text_list"] == docs[0]["text_list"]
    assert [(i["image_name"], i["matched_text_index"], i["member"]) for i in meta["image_info"]] == [
        (names[1], 1, "0.jpg"),
        (names[0], 2, "1.jpg"),
    ]  # ordered by matched_text_index
    assert first["0.jpg"] == (images / names[1]).read_bytes()
    meta = json_of(second)
    assert "image_base64" not in meta["image_info"][0]
    assert np.abs(mean_colour(second["0.jpg"]) - (250, 10, 10)).max() < 6


def test_shard_byte_limit_and_existing_output(tmp_path: Path) -> None:
    config = ShardWriterConfig(tmp_path, prefix="big", max_samples_per_shard=100, max_shard_bytes=20 * 1024)
    payload = bytes(range(256)) * 12  # ~3 KiB
    with ShardWriter(config) as writer:
        for i in range(20):
            writer.write({"bin": payload, "txt": f"sample {i}"})
    assert writer.stats["shards_written"] > 1
    for shard in tmp_path.glob("big-*.tar"):
        assert shard.stat().st_size <= 20 * 1024
        with tarfile.open(shard) as archive:
            assert all(m.mtime == 0 for m in archive.getmembers())
    assert sum(len(read_tar(s)) for s in tmp_path.glob("big-*.tar")) == 20
    with pytest.raises(FileExistsError, match="already holds"):
        ShardWriter(config)
    with pytest.raises(ValueError, match="max_samples_per_shard"):
        ShardWriterConfig(tmp_path, max_samples_per_shard=0)


@pytest.mark.parametrize("module", [from_captions, from_classes, from_mmc4, synthetic])
def test_commands_have_help(module, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_class_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "tree"
    make_image_folder(root / "dog", 2)
    make_image_folder(root / "cat", 2)
    stats = from_classes.main(
        ["--root", str(root), "--out", str(tmp_path / "o"), "--no-progress", "--template", "a {}.", "--image-size", "8"]
    )
    assert stats["samples_written"] == 4
    out = capsys.readouterr().out
    assert "wrote 4 pairs samples" in out and "skipped 0" in out


# ------------------------------------------------------------------------------------------------ unfinished writers


def test_a_writer_that_fails_leaves_a_marker_that_loaders_refuse(tmp_path):
    from data_pipelines.reader import find_shards

    config = ShardWriterConfig(out_dir=tmp_path, prefix="part", max_samples_per_shard=2)
    with pytest.raises(RuntimeError, match="disk gone"):
        with ShardWriter(config) as writer:
            for i in range(5):
                writer.write({"jpg": image_bytes((i, 0, 0)), "txt": f"caption {i}"})
            raise RuntimeError("disk gone")
    assert len(list(tmp_path.glob("part-*.tar"))) == 3  # complete tars, but not the whole data set
    assert not config.stats_path.exists()
    marker = json.loads(config.incomplete_path.read_text())
    assert marker["failed"] == "RuntimeError: disk gone" and marker["samples_written"] == 5
    with pytest.raises(ValueError, match=r"part-\*\.tar were left by a writer that did not finish \(.*part_INCOMPLETE"):
        find_shards(tmp_path)
    with pytest.raises(ValueError, match="did not finish"):
        find_shards(str(tmp_path / "part-{000000..000002}.tar"))
    config = ShardWriterConfig(out_dir=tmp_path, prefix="part", max_samples_per_shard=2, overwrite=True)
    with ShardWriter(config) as writer:
        assert config.incomplete_path.exists()  # present while writing
        writer.write({"jpg": image_bytes((1, 2, 3)), "txt": "again"})
    assert not config.incomplete_path.exists() and config.stats_path.exists()
    assert [p.name for p in find_shards(tmp_path)[0]] == ["part-000000.tar"]


def test_a_caption_that_is_not_utf8_encodable_is_skipped_and_counted(tmp_path):
    from data_pipelines.shards import PairItem, write_pairs

    items = [
        PairItem(image_bytes((10, 10, 10)), ["fine"], "a"),
        PairItem(image_bytes((20, 20, 20)), ["lone \ud800 surrogate"], "b"),
        PairItem(image_bytes((30, 30, 30)), ["also fine"], "c"),
    ]
    stats = write_pairs(items, ShardWriterConfig(out_dir=tmp_path, prefix="p"), show_progress=False)
    assert stats["samples_written"] == 2 and stats["skipped"] == {"invalid_caption": 1}
