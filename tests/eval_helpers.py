"""Tiny evaluation data sets written in each supported layout (Flickr CSV, Karpathy JSON, VQA JSON,
image folders), with small distinct JPEG images, for the ``vlm.eval`` tests."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np

CAPTIONS = [
    "a photo of a cat sitting on a mat",
    "a photo of a dog running in the park",
    "two birds on a branch",
    "the quick brown fox jumps over the lazy dog",
    "a red car in the park",
    "a dog sitting on a mat",
]


def write_image(path: Path, seed: int, size: int = 32) -> Path:
    """A JPEG of smooth random colour blobs, distinct per seed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize((size, size), Image.BILINEAR).save(path, quality=95)
    return path


def write_flickr(root: Path, num_train: int = 12, num_test: int = 4, num_dev: int = 2) -> Path:
    """``root/flickr8k`` in the Flickr8k CSV layout; image i's captions are CAPTIONS rotated by i, with a
    comma and quotes in one of them (the CSV quotes it)."""
    base = root / "flickr8k"
    (base / "Images").mkdir(parents=True)
    names = {"train": [], "dev": [], "test": []}
    rows = []
    counts = [("train", num_train), ("dev", num_dev), ("test", num_test)]
    seed = 0
    for split, n in counts:
        for _ in range(n):
            name = f"{1000 + seed}_img.jpg"
            write_image(base / "Images" / name, seed)
            names[split].append(name)
            caps = CAPTIONS[seed % len(CAPTIONS) :] + CAPTIONS[: seed % len(CAPTIONS)]
            caps = caps[:5]
            caps[4] = f'a "quoted" scene, with a comma {seed}'
            rows += [(name, c) for c in caps]
            seed += 1
    with open(base / "captions.txt", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    for split, key in (("train", "train"), ("dev", "dev"), ("test", "test")):
        (base / f"Flickr_8k.{key}Images.txt").write_text("\n".join(names[split]) + "\n")
    return base


def tar_directory(directory: Path, tar_path: Path) -> Path:
    with tarfile.open(tar_path, "w") as tar:
        tar.add(directory, arcname=directory.name)
    return tar_path


def write_karpathy(root: Path, num_train: int = 6, num_restval: int = 2, num_test: int = 3) -> tuple[Path, Path]:
    """``dataset_coco.json`` + ``images/{train2014,val2014}/`` in the Karpathy layout; returns (json, image root)."""
    images = []
    seed = 100
    for split, n, folder in (
        ("train", num_train, "train2014"),
        ("restval", num_restval, "val2014"),
        ("test", num_test, "val2014"),
    ):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            name = f"COCO_{folder}_{seed:012d}.jpg"
            write_image(root / "images" / folder / name, seed)
            sents = [{"raw": CAPTIONS[(seed + j) % len(CAPTIONS)] + "."} for j in range(5)]
            images.append({"filepath": folder, "filename": name, "split": split, "cocoid": seed, "sentences": sents})
            seed += 1
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path, root / "images"


def write_vqa(root: Path, subtype: str, num_images: int, questions_per_image: int = 2, seed0: int = 200) -> dict:
    """VQAv2-layout questions + annotations JSON and COCO-named images; returns the three paths."""
    img_dir = root / subtype
    img_dir.mkdir(parents=True)
    questions, annotations = [], []
    qid = seed0 * 10
    for i in range(num_images):
        image_id = seed0 + i
        write_image(img_dir / f"COCO_{subtype}_{image_id:012d}.jpg", image_id)
        for j in range(questions_per_image):
            qid += 1
            answer = ["two", "yes", "a cat", "red"][(i + j) % 4]
            questions.append({"image_id": image_id, "question": f"what is in the image {j}?", "question_id": qid})
            answers = [{"answer": answer, "answer_id": k + 1} for k in range(7)]
            answers += [{"answer": "no", "answer_id": k + 8} for k in range(3)]
            annotations.append(
                {"question_id": qid, "image_id": image_id, "answers": answers, "multiple_choice_answer": answer}
            )
    q = root / f"questions_{subtype}.json"
    a = root / f"annotations_{subtype}.json"
    q.write_text(json.dumps({"data_subtype": subtype, "questions": questions}))
    a.write_text(json.dumps({"annotations": annotations}))
    return {"questions": q, "annotations": a, "images": img_dir}


CLASSES = ["airplane", "cat", "dog"]


def write_image_folder(root: Path, per_class: dict[str, int] = None) -> Path:
    """``root/<split>/<class>/<n>.jpg`` for CLASSES; per_class: split -> images per class."""
    per_class = per_class or {"train": 4, "test": 2}
    seed = 300
    for split, n in per_class.items():
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                write_image(root / split / c / f"{i:04d}.jpg", seed)
                seed += 1
    return root
