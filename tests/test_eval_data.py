"""Evaluation data loaders on tiny data sets written in each layout."""

import json

import pytest
from eval_helpers import CLASSES, tar_directory, write_flickr, write_image_folder, write_karpathy, write_vqa

from vlm.eval import load_flickr, load_image_folder, load_karpathy, load_vqa


def test_flickr_directory_layout(tmp_path):
    write_flickr(tmp_path, num_train=5, num_test=3, num_dev=2)
    test = load_flickr(tmp_path, "test")  # the flickr8k/ folder is found below the given directory
    train, dev = load_flickr(tmp_path / "flickr8k", "train"), load_flickr(tmp_path, "dev")
    assert (len(train), len(dev), len(test)) == (5, 2, 3)
    s = test[0]
    assert s.id == "1007_img" and s.image.endswith("flickr8k/Images/1007_img.jpg")
    assert len(s.captions) == 5
    assert s.captions[4] == 'a "quoted" scene, with a comma 7'  # quoted CSV field with a comma and quotes
    assert not {x.id for x in train} & {x.id for x in test}
    with pytest.raises(ValueError, match="split must be"):
        load_flickr(tmp_path, "validation")


def test_flickr_tar_is_extracted_once(tmp_path):
    base = write_flickr(tmp_path / "src", num_train=3, num_test=2, num_dev=1)
    tar = tar_directory(base, tmp_path / "flickr8k.tar")
    cache = tmp_path / "cache"
    a = load_flickr(tar, "test", cache_dir=cache)
    marker = next((cache / "extracted").iterdir()) / ".extracted"
    stamp = marker.stat().st_mtime_ns
    b = load_flickr(tar, "train", cache_dir=cache)
    assert marker.stat().st_mtime_ns == stamp  # reused, not extracted again
    assert len(list((cache / "extracted").iterdir())) == 1
    assert [s.captions for s in a] == [s.captions for s in load_flickr(base, "test")]
    assert len(b) == 3 and str(cache) in a.root


def test_karpathy_json_restval_counts_as_train(tmp_path):
    path, images = write_karpathy(tmp_path, num_train=4, num_restval=2, num_test=3)
    train, test = load_karpathy(path, images, "train"), load_karpathy(path, images, "test")
    assert (len(train), len(test)) == (6, 3)
    assert test[0].image == str(images / "val2014" / "COCO_val2014_000000000106.jpg")
    assert test[0].id == "106" and len(test[0].captions) == 5
    with pytest.raises(ValueError, match="splits present"):
        load_karpathy(path, images, "val")


def test_vqa_layout_and_image_pattern(tmp_path):
    paths = write_vqa(tmp_path, "val2014", num_images=2, questions_per_image=2)
    ds = load_vqa(paths["questions"], paths["annotations"], paths["images"])
    assert len(ds) == 4 and ds.split == "val2014"
    s = ds[0]
    assert s.image == str(paths["images"] / "COCO_val2014_000000000200.jpg")
    assert len(s.answers) == 10 and s.answer == "two"  # the consensus answer is the demonstration answer
    custom = load_vqa(paths["questions"], None, paths["images"], image_pattern="{image_id}.png")
    assert custom[0].image.endswith("/200.png") and custom[0].answers == []
    with pytest.raises(ValueError, match="cannot be filled"):
        load_vqa(paths["questions"], None, paths["images"], image_pattern="{imageid}.jpg")


def test_image_folder_and_fingerprint(tmp_path):
    write_image_folder(tmp_path, {"train": 2, "test": 1})
    train, test = load_image_folder(tmp_path, "train"), load_image_folder(tmp_path, "test")
    assert train.class_names == CLASSES == test.class_names
    assert len(train) == 6 and [s.label for s in test] == [0, 1, 2]
    named = load_image_folder(tmp_path, "test", class_names={"airplane": "an airplane"})
    assert named.class_names[0] == "an airplane"
    assert named.fingerprint() != test.fingerprint() != train.fingerprint()
    assert test.identity()["fingerprint"] == load_image_folder(tmp_path, "test").fingerprint()


def test_fingerprint_follows_the_content(tmp_path):
    base = write_flickr(tmp_path, num_train=2, num_test=2, num_dev=1)
    before = load_flickr(tmp_path, "test").fingerprint()
    text = (base / "captions.txt").read_text().replace("a photo of", "one photo of")
    (base / "captions.txt").write_text(text)
    assert load_flickr(tmp_path, "test").fingerprint() != before
    json.dumps(load_flickr(tmp_path, "test").identity())  # identities are JSON
