"""Evaluation data sets in their usual layouts: captions (Flickr CSV + split lists, Karpathy JSON),
VQA (questions + annotations JSON), classification (image folders).

Each loader returns a :class:`EvalDataset`: a list of samples (plain dataclasses with an image path)
and an identity (layout, split, root, and a fingerprint of the sample list) that names the data in
results and keys cached features. Images are opened lazily. A ``.tar`` / ``.tar.gz`` given as the
data path is extracted once into the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLM_EVAL_CACHE", Path.home() / ".cache" / "vlm_eval"))


@dataclass
class CaptionSample:
    id: str
    image: str  # path
    captions: list[str]


@dataclass
class VQASample:
    id: int  # question_id
    image: str
    image_id: int
    question: str
    answers: list[str]  # the human answers (empty when the split has no annotations)
    answer: str  # the consensus answer (multiple_choice_answer), used in demonstrations


@dataclass
class ClassificationSample:
    id: str
    image: str
    label: int


Sample = Union[CaptionSample, VQASample, ClassificationSample]


@dataclass
class EvalDataset:
    """Samples of one split plus what identifies them."""

    layout: str  # "flickr" | "karpathy" | "vqa" | "imagefolder"
    split: str
    root: str
    samples: list
    class_names: Optional[list[str]] = None  # classification only
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.samples[i]

    def fingerprint(self) -> str:
        """sha256 of the sample list (ids, image paths relative to the root, texts, labels)."""
        h = hashlib.sha256()
        for s in self.samples:
            d = asdict(s)
            d["image"] = os.path.relpath(d["image"], self.root)
            h.update(json.dumps(d, sort_keys=True).encode())
        if self.class_names is not None:
            h.update(json.dumps(self.class_names).encode())
        return h.hexdigest()

    def identity(self) -> dict:
        return {
            "layout": self.layout,
            "split": self.split,
            "root": self.root,
            "num_samples": len(self.samples),
            "fingerprint": self.fingerprint(),
            **self.extra,
        }

    def image_paths(self) -> list[str]:
        return [s.image for s in self.samples]


def open_image(path: str):
    """Upright RGB pixels of an image file (:func:`data_pipelines.images.load_image`); errors name the file."""
    from data_pipelines.images import load_image

    return load_image(path)


# ----------------------------------------------------------------------------- archives


def resolve_data_path(path: PathLike, cache_dir: Optional[PathLike] = None) -> Path:
    """A directory as is; a ``.tar`` / ``.tar.gz`` / ``.tgz`` extracted once under ``cache_dir/extracted``."""
    path = Path(path)
    if path.is_dir():
        return path
    if not path.is_file():
        raise FileNotFoundError(f"data path {path} does not exist")
    if not tarfile.is_tarfile(path):
        raise ValueError(f"{path} is neither a directory nor a tar archive")
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    name = path.name.split(".")[0]
    target = Path(cache_dir or default_cache_dir()) / "extracted" / f"{name}-{key}"
    done = target / ".extracted"
    if not done.exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path) as tar:
            tar.extractall(tmp, filter="data")
        (tmp / ".extracted").write_text(str(path.resolve()))
        if target.exists():  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(target)
    return target


def _find_root(base: Path, marker: str) -> Path:
    """``base`` or the unique directory below it (up to two levels) that contains ``marker``."""
    if (base / marker).exists():
        return base
    hits = sorted({p.parent for p in base.glob(f"*/{marker}")} | {p.parent for p in base.glob(f"*/*/{marker}")})
    if len(hits) != 1:
        raise FileNotFoundError(f"expected one directory with {marker} under {base}, found {[str(h) for h in hits]}")
    return hits[0]


# ----------------------------------------------------------------------------- captioning


FLICKR_SPLIT_FILES = {"train": "trainImages", "dev": "devImages", "val": "devImages", "test": "testImages"}


def load_flickr(path: PathLike, split: str = "test", cache_dir: Optional[PathLike] = None) -> EvalDataset:
    """Flickr8k/30k in the CSV layout: ``captions.txt`` (header ``image,caption``), ``Images/``, and
    split lists ``Flickr_8k.{train,dev,test}Images.txt`` (any ``*.{train,dev,test}Images.txt`` name)."""
    if split not in FLICKR_SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(FLICKR_SPLIT_FILES)}, got {split!r}")
    root = _find_root(resolve_data_path(path, cache_dir), "captions.txt")
    lists = sorted(root.glob(f"*.{FLICKR_SPLIT_FILES[split]}.txt"))
    if len(lists) != 1:
        raise FileNotFoundError(f"expected one *.{FLICKR_SPLIT_FILES[split]}.txt split list in {root}, found {lists}")
    names = [line.strip() for line in lists[0].read_text().splitlines() if line.strip()]
    from data_pipelines.from_captions import read_caption_csv

    captions: dict[str, list[str]] = {}
    empty = 0
    for image, caption in read_caption_csv(root / "captions.txt"):  # strict: a malformed row names its line
        if caption:
            captions.setdefault(image, []).append(caption)
        else:
            empty += 1
    image_dir = root / "Images" if (root / "Images").is_dir() else root
    missing = [n for n in names if n not in captions]
    if missing:
        raise ValueError(f"{len(missing)} images of the {split} list have no caption, e.g. {missing[:3]}")
    samples = [CaptionSample(Path(n).stem, str(image_dir / n), captions[n]) for n in names]
    extra = {"empty_captions_skipped": empty} if empty else {}
    if empty:
        log.warning("%s: skipped %d rows with an empty caption", root / "captions.txt", empty)
    return EvalDataset("flickr", split, str(root), samples, extra=extra)


def load_karpathy(json_path: PathLike, image_root: PathLike, split: str = "test") -> EvalDataset:
    """A Karpathy-split JSON (``dataset_coco.json`` / ``dataset_flickr30k.json``): ``images`` with ``split``,
    ``filename``, optional ``filepath`` (below ``image_root``), ``sentences[].raw``. ``restval`` counts as train."""
    data = json.loads(Path(json_path).read_text())
    if "images" not in data:
        raise ValueError(f"{json_path}: expected a Karpathy JSON with an 'images' list")
    wanted = {"train", "restval"} if split == "train" else {split}
    samples = []
    for im in data["images"]:
        if im.get("split") not in wanted:
            continue
        sid = str(im.get("cocoid", im.get("imgid", Path(im["filename"]).stem)))
        image = Path(image_root) / im.get("filepath", "") / im["filename"]
        samples.append(CaptionSample(sid, str(image), [s["raw"].strip() for s in im["sentences"]]))
    if not samples:
        splits = sorted({im.get("split") for im in data["images"]} - {None})
        raise ValueError(f"{json_path} has no images of split {split!r}; splits present: {splits}")
    return EvalDataset("karpathy", split, str(Path(image_root)), samples, extra={"annotations": str(json_path)})


# ----------------------------------------------------------------------------- VQA

VQA_IMAGE_PATTERN = "COCO_{data_subtype}_{image_id:012d}.jpg"


def load_vqa(
    questions_json: PathLike,
    annotations_json: Optional[PathLike],
    image_dir: PathLike,
    image_pattern: str = VQA_IMAGE_PATTERN,
    split: Optional[str] = None,
) -> EvalDataset:
    """VQAv2 / OK-VQA layout. ``image_pattern`` is a ``str.format`` pattern with ``image_id`` and
    ``data_subtype`` (from the questions file, e.g. ``train2014``)."""
    q = json.loads(Path(questions_json).read_text())
    subtype = q.get("data_subtype", "")
    anns = {}
    if annotations_json is not None:
        a = json.loads(Path(annotations_json).read_text())
        anns = {ann["question_id"]: ann for ann in a["annotations"]}
    samples = []
    for item in q["questions"]:
        qid, image_id = item["question_id"], item["image_id"]
        ann = anns.get(qid)
        if annotations_json is not None and ann is None:
            raise ValueError(f"question {qid} has no annotation in {annotations_json}")
        answers = [x["answer"] for x in ann["answers"]] if ann else []
        consensus = ann.get("multiple_choice_answer") if ann else None
        if consensus is None and answers:
            consensus = Counter(answers).most_common(1)[0][0]
        try:
            name = image_pattern.format(image_id=image_id, data_subtype=subtype)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"image pattern {image_pattern!r} cannot be filled for image {image_id}: {e}") from e
        samples.append(
            VQASample(qid, str(Path(image_dir) / name), image_id, item["question"], answers, consensus or "")
        )
    return EvalDataset(
        "vqa",
        split or subtype or Path(questions_json).stem,
        str(Path(image_dir)),
        samples,
        extra={
            "questions": str(questions_json),
            "annotations": None if annotations_json is None else str(annotations_json),
        },
    )


# ----------------------------------------------------------------------------- classification


def load_image_folder(
    path: PathLike,
    split: str = "test",
    class_names: Optional[dict[str, str]] = None,
    cache_dir: Optional[PathLike] = None,
) -> EvalDataset:
    """``<root>/<split>/<class>/<image>`` (e.g. CIFAR-10, ImageNet). Class names are the folder names with
    underscores as spaces, or ``class_names[folder]`` (e.g. ImageNet synset ids -> readable names)."""
    base = resolve_data_path(path, cache_dir)
    root = base if (base / split).is_dir() else _find_root(base, split)
    dataset = _class_folders(root / split, split, str(root), class_names)
    for other in sorted(SPLIT_FOLDERS - {split}):  # labels index the sorted folders: every split needs the same
        if (root / other).is_dir():
            theirs = _folder_names(root / other)
            if theirs != dataset.extra["class_folders"]:
                mine = dataset.extra["class_folders"]
                raise ValueError(
                    f"the splits of {root} have different class folders: only in {root / split}: "
                    f"{sorted(set(mine) - set(theirs))}, only in {root / other}: {sorted(set(theirs) - set(mine))}"
                )
    return dataset


#: Split folder names of a class tree whose class folders must agree.
SPLIT_FOLDERS = {"train", "val", "dev", "test"}


def _folder_names(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_folders(split_dir: Path, split: str, root: str, class_names: Optional[dict[str, str]]) -> EvalDataset:
    folders = _folder_names(split_dir)
    if not folders:
        raise ValueError(f"{split_dir} has no class folders")
    names = [(class_names or {}).get(f, f.replace("_", " ")) for f in folders]
    samples, empty = [], []
    for label, folder in enumerate(folders):
        before = len(samples)
        for img in sorted((split_dir / folder).iterdir()):
            if img.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(ClassificationSample(f"{folder}/{img.name}", str(img), label))
        if len(samples) == before:
            empty.append(str(split_dir / folder))
    if empty:  # an empty folder would still be a class: more ways, a wrong chance level, meaningless top-k
        raise ValueError(f"{len(empty)} class folder(s) hold no image: {empty[:5]}; remove them or add images")
    return EvalDataset("imagefolder", split, root, samples, class_names=names, extra={"class_folders": folders})


def load_class_tree(
    path: PathLike,
    split: Optional[str] = None,
    class_names: Optional[dict[str, str]] = None,
    cache_dir: Optional[PathLike] = None,
) -> EvalDataset:
    """A class tree ``root/<class>/<image>``, or ``root/<split>/<class>/<image>`` (directory or tar). ``split``
    None: ``test`` when the tree has one, else the classes directly under the root."""
    base = resolve_data_path(path, cache_dir)
    if split is not None or (base / "test").is_dir() or any(base.glob("*/test")):
        return load_image_folder(base, split or "test", class_names, cache_dir)
    return _class_folders(base, "all", str(base), class_names)
