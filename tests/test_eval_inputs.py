"""vlm.eval checks its inputs before any model loads: one evaluation per --out, class folders that are non-empty
and the same in every split."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from data_pipelines.from_classes import list_class_tree
from training.lock import OutputDirLock
from vlm.eval.__main__ import main as eval_main
from vlm.eval.datasets import load_class_tree, load_image_folder


def _tree(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    for split, classes in splits.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")
    return root


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = _tree(tmp_path / "tree", {"train": {"cat": 2, "dog": 2, "fox": 0}, "test": {"cat": 1, "dog": 1, "fox": 0}})
    with pytest.raises(ValueError, match=r"1 class folder\(s\) hold no image: \[.*test/fox'\]"):
        load_image_folder(root, "test")
    with pytest.raises(ValueError, match=r"hold no image.*train/fox"):
        list_class_tree(root / "train")


def test_splits_with_different_class_folders_are_refused(tmp_path):
    root = _tree(tmp_path / "tree", {"train": {"cat": 2, "dog": 2, "owl": 1}, "test": {"cat": 1, "dog": 1}})
    with pytest.raises(ValueError, match=r"different class folders: only in .*test: \[\], only in .*train: \['owl'\]"):
        load_class_tree(root, "test")
    good = _tree(tmp_path / "good", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    assert load_class_tree(good, "test").class_names == ["cat", "dog"]


def test_a_second_evaluation_on_the_same_out_is_refused_before_loading(tmp_path):
    root = _tree(tmp_path / "tree", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 2, "dog": 2}})
    out = tmp_path / "out"
    first = OutputDirLock(out, key="--out").acquire()
    try:
        with pytest.raises(SystemExit, match=r"--out: '.*out' is in use by another run \(pid \d+"):
            eval_main(
                [
                    "binding",
                    "--data",
                    str(root),
                    "--model-dir",
                    str(tmp_path / "no-model"),
                    "--ways",
                    "2",
                    "--shots",
                    "1",
                    "--episodes",
                    "2",
                    "--out",
                    str(out),
                ]
            )
    finally:
        first.release()
    with pytest.raises(FileNotFoundError, match="no-model"):  # free again: it goes on to load the (absent) model
        eval_main(
            [
                "binding",
                "--data",
                str(root),
                "--model-dir",
                str(tmp_path / "no-model"),
                "--ways",
                "2",
                "--shots",
                "1",
                "--episodes",
                "2",
                "--out",
                str(out),
            ]
        )
