"""Demonstration selection: random (deterministic per seed, never the query) and RICES (nearest image last)."""

import shutil

import pytest
import torch
from eval_helpers import write_image
from vlm_helpers import build_model

import vlm.eval.demos as demos
from vlm.eval import RICES, CaptionSample, EvalDataset, RandomDemos, cached_image_features, eval_indices


def _dataset(root, n, split="train", start=0):
    (root / split).mkdir(parents=True, exist_ok=True)
    samples = [
        CaptionSample(f"{split}{i}", str(write_image(root / split / f"{i}.jpg", start + i)), [f"caption {split} {i}"])
        for i in range(n)
    ]
    return EvalDataset("flickr", split, str(root), samples)


def test_eval_indices_are_a_seeded_subset():
    assert eval_indices(10, None, 0) == list(range(10)) == eval_indices(10, 50, 0)
    a, b = eval_indices(100, 10, 1), eval_indices(100, 10, 2)
    assert a == eval_indices(100, 10, 1) and a != b
    assert len(set(a)) == 10 and a == sorted(a)


def test_random_demos_deterministic_per_seed_and_query(tmp_path):
    train = _dataset(tmp_path, 40)
    s = RandomDemos(train, query_set_size=16, seed=3)
    assert len(s.pool) == 16 and len(set(s.pool)) == 16
    forward = {q: s.select(q, f"/elsewhere/{q}.jpg", 4) for q in range(10)}
    again = RandomDemos(train, query_set_size=16, seed=3)
    backward = {q: again.select(q, f"/elsewhere/{q}.jpg", 4) for q in reversed(range(10))}
    assert forward == backward  # independent of the order (and so of the batching) of the queries
    assert all(len(set(d)) == 4 and set(d) <= set(s.pool) for d in forward.values())
    assert len({tuple(d) for d in forward.values()}) > 1  # each query draws its own
    other = RandomDemos(train, query_set_size=16, seed=4)
    assert other.pool != s.pool
    assert RandomDemos(train, query_set_size=4096, seed=0).pool.__len__() == 40


def test_random_demos_never_show_the_query_image(tmp_path):
    train = _dataset(tmp_path, 6)
    for seed in range(5):
        s = RandomDemos(train, query_set_size=6, seed=seed)
        for j in range(6):
            picked = s.select(j, train[j].image, 5)  # all but the query's own image
            assert sorted(picked) == [i for i in range(6) if i != j]
    with pytest.raises(ValueError, match="only 5 candidates"):
        RandomDemos(train, query_set_size=6, seed=0).select(0, train[0].image, 6)


@pytest.fixture(scope="module")
def tiny_model():
    model, _, _ = build_model("llama")
    return model


def test_rices_puts_the_nearest_image_last(tmp_path, tiny_model):
    train = _dataset(tmp_path, 10)
    test = _dataset(tmp_path, 3, split="test", start=50)
    # Query 1 is a pixel-identical copy of training image 7 under another name; query 2 *is* training image 4's file.
    shutil.copy(train[7].image, test[1].image)
    test.samples[2].image = train[4].image
    finder = RICES(train, cached_image_features(tiny_model, train, None))
    q = cached_image_features(tiny_model, test, None)
    assert torch.allclose(q.norm(dim=1), torch.ones(3))
    picked = finder.select_batch(q, test.image_paths(), 4)
    assert picked[1][-1] == 7  # the most similar is placed last, next to the query
    assert train[picked[1][-1]].captions == ["caption train 7"]
    assert 4 not in picked[2]  # never the query's own file
    for row, p in zip(q, picked):
        sims = (finder.features[p] @ row).tolist()
        assert sims == sorted(sims)  # least similar first
        assert len(set(p)) == 4
    full = (finder.features @ q[0]).argsort(descending=True)[:4].tolist()
    assert picked[0] == full[::-1]


def test_rices_features_are_cached_per_model_and_data(tmp_path, tiny_model, monkeypatch):
    train = _dataset(tmp_path, 5)
    cache = tmp_path / "cache"
    first = cached_image_features(tiny_model, train, cache)
    assert len(list((cache / "rices").glob("*.pt"))) == 1

    def fail(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(demos, "image_features", fail)
    assert torch.equal(cached_image_features(tiny_model, train, cache), first)  # from disk
    other = _dataset(tmp_path / "b", 5, start=20)
    with pytest.raises(AssertionError, match="recomputed"):  # other data: another key
        cached_image_features(tiny_model, other, cache)
    weight = next(tiny_model.vision_encoder.parameters())
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.1)
    try:
        with pytest.raises(AssertionError, match="recomputed"):  # other vision weights: another key
            cached_image_features(tiny_model, train, cache)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_rices_features_are_the_towers_pooled_embedding(tmp_path, tiny_model):
    """OpenFlamingo's RICES: CLIP's encode_image (the tower's own pooled, projected embedding), L2-normalised."""
    train = _dataset(tmp_path, 5)
    feats = cached_image_features(tiny_model, train, None)
    images = torch.stack([tiny_model.image_processor(demos.open_image(p)) for p in train.image_paths()])
    want = torch.nn.functional.normalize(tiny_model.vision_encoder.pooled(images).float(), dim=-1)
    assert feats.shape == want.shape
    assert torch.allclose(feats, want, atol=1e-5)
    mean_tokens = torch.nn.functional.normalize(tiny_model.vision_encoder(images).float().mean(1), dim=-1)
    assert mean_tokens.shape != want.shape or not torch.allclose(feats, mean_tokens, atol=1e-3)
