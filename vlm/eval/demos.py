"""Choosing the evaluated samples and each query's demonstrations: random or RICES.

Random (OpenFlamingo's default): a query set of ``query_set_size`` training samples is drawn once per
trial seed, and each query draws its demonstrations from it. Each query has its own generator seeded by
``(seed, query index)``, so the demonstrations do not depend on the batch size or the order of the
queries (OpenFlamingo draws them from one global stream).

RICES (retrieval-based in-context example selection, Yang et al. 2022): the training samples whose
images are closest to the query image by cosine similarity of the model's own vision features (the
tower's tokens (N, v, D) mean-pooled over v, L2-normalised), the most similar placed last, next to
the query. Features are computed once per (vision tower, preprocessing, data) and cached on disk.

In both modes a demonstration never shows the query's own image (same file).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .datasets import EvalDataset, open_image


def eval_indices(num_items: int, num_samples: Optional[int], seed: int) -> list[int]:
    """The evaluated subset: all items, or ``num_samples`` of them drawn without replacement by ``seed``."""
    if num_samples is None or num_samples <= 0 or num_samples >= num_items:
        return list(range(num_items))
    rng = np.random.default_rng([seed, 0])
    return sorted(rng.choice(num_items, num_samples, replace=False).tolist())


class RandomDemos:
    """Demonstrations drawn uniformly, per query, from a fixed query set of the training split."""

    def __init__(self, train: EvalDataset, query_set_size: int, seed: int):
        if query_set_size < 1:
            raise ValueError(f"query_set_size must be >= 1, got {query_set_size}")
        rng = np.random.default_rng([seed, 1])
        size = min(query_set_size, len(train))
        self.pool = rng.choice(len(train), size, replace=False).tolist()
        self.pool_images = {train[i].image for i in self.pool}
        self.train = train
        self.seed = seed

    def select(self, query_index: int, query_image: str, k: int) -> list[int]:
        """``k`` distinct training indices for the query at ``query_index`` of the evaluated split."""
        pool = self.pool
        if query_image in self.pool_images:
            pool = [i for i in pool if self.train[i].image != query_image]
        if k > len(pool):
            raise ValueError(f"{k} demonstrations requested but the query set has only {len(pool)} candidates")
        rng = np.random.default_rng([self.seed, 2, query_index])
        return [pool[j] for j in rng.choice(len(pool), k, replace=False).tolist()]


# ----------------------------------------------------------------------------- RICES


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()


def vision_fingerprint(model) -> str:
    """sha256 of the vision tower's weights and buffers (what RICES features depend on, with the preprocessing)."""
    h = hashlib.sha256()
    for name, t in model.vision_encoder.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(_tensor_bytes(t))
    h.update(repr(model.image_processor).encode())
    return h.hexdigest()


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return self.transform(open_image(self.paths[i]))


FEATURES_VERSION = "pooled-v2"  # part of the cache key: features cached by an older definition are not reused


@torch.no_grad()
def pooled_features(model, images: Tensor) -> Tensor:
    """(N, D) pooled image features of a batch: the tower's own pooled embedding where it has one (CLIP's
    ``encode_image``, as OpenFlamingo's RICES uses; a timm trunk's pooled head), else its tokens (N, v, D)
    averaged over v."""
    encoder = model.vision_encoder
    if callable(getattr(encoder, "pooled", None)):
        return encoder.pooled(images).float()
    return encoder(images).float().mean(dim=1)


@torch.no_grad()
def image_features(
    model,
    paths: Sequence[str],
    batch_size: int = 32,
    num_workers: int = 0,
    desc: str = "RICES features",
    progress: bool = True,
) -> Tensor:
    """Pooled, L2-normalised vision features (N, D) of image files (:func:`pooled_features`), float32 on the CPU."""
    param = next(model.vision_encoder.parameters())
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, model.image_processor), batch_size=batch_size, num_workers=num_workers
    )
    feats = []
    for images in tqdm(loader, desc=desc, leave=False, disable=not progress):
        pooled = pooled_features(model, images.to(param.device, param.dtype))
        feats.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 0)


def cached_image_features(
    model,
    dataset: EvalDataset,
    cache_dir: Optional[Union[str, Path]],
    batch_size: int = 32,
    num_workers: int = 0,
    fingerprint: Optional[str] = None,
    progress: bool = True,
) -> Tensor:
    """Features (len(dataset), D) of each sample's image, computed once per unique image file and cached
    at ``cache_dir/rices/<key>.pt``, key = vision fingerprint + data fingerprint (None: no cache)."""
    paths = list(dict.fromkeys(dataset.image_paths()))  # unique, first-seen order
    path = None
    if cache_dir is not None:
        fingerprint = fingerprint or vision_fingerprint(model)
        text = f"{FEATURES_VERSION}|{fingerprint}|{dataset.fingerprint()}|{dataset.root}"
        key = hashlib.sha256(text.encode()).hexdigest()[:32]
        path = Path(cache_dir) / "rices" / f"{dataset.layout}-{dataset.split}-{key}.pt"
        if path.is_file():
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached["num_images"] == len(paths):
                return cached["features"][cached["index"]]
    feats = image_features(model, paths, batch_size, num_workers, f"RICES features ({dataset.split})", progress)
    position = {p: i for i, p in enumerate(paths)}
    index = torch.tensor([position[p] for p in dataset.image_paths()], dtype=torch.long)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"features": feats, "index": index, "num_images": len(paths)}, tmp)
        tmp.replace(path)
    return feats[index]


class RICES:
    """Retrieval of the most similar training samples by cosine similarity of image features."""

    def __init__(self, train: EvalDataset, train_features: Tensor, chunk_size: int = 1024):
        if train_features.shape[0] != len(train):
            raise ValueError(f"{train_features.shape[0]} features for {len(train)} training samples")
        self.train = train
        self.features = train_features  # (N, D), L2-normalised
        self.by_image: dict[str, list[int]] = {}
        for i, image in enumerate(train.image_paths()):
            self.by_image.setdefault(image, []).append(i)
        self.chunk_size = chunk_size

    def select_batch(self, query_features: Tensor, query_images: Sequence[str], k: int) -> list[list[int]]:
        """For each query (features (B, D), image paths): ``k`` training indices, least similar first."""
        if k > len(self.train):
            raise ValueError(f"{k} demonstrations requested but the training split has {len(self.train)} samples")
        out = []
        for start in range(0, len(query_images), self.chunk_size):
            q = query_features[start : start + self.chunk_size].float()
            sim = q @ self.features.T  # (b, N)
            for row, image in enumerate(query_images[start : start + self.chunk_size]):
                same = self.by_image.get(image, [])
                if k > len(self.train) - len(same):
                    raise ValueError(
                        f"{k} demonstrations requested but only {len(self.train) - len(same)} "
                        f"training samples do not show the query image {image}"
                    )
                sim[row, same] = -float("inf")
            top = torch.topk(sim, k, dim=1).indices  # (b, k), most similar first
            out += [list(reversed(r)) for r in top.tolist()]
        return out
