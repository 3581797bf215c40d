"""Binding episodes as training data: the word pools, episode construction, the exact text, and the loader stream
(determinism, exact resume, ranks, masking, errors)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from data_helpers import SmallTransform, make_tokenizer

from data_pipelines import LoaderConfig, ShardLoader
from data_pipelines.binding import (
    ClassIndex,
    EpisodeConfig,
    build_word_pool,
    candidate_words,
    draw_episode,
    english_words,
    episode_rng,
    is_english,
    pool_of,
    sample_class,
    word_token_counts,
)
from data_pipelines.synthetic import SyntheticConfig, generate_synthetic_dataset
from data_pipelines.tokenization import IGNORE_INDEX


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    return generate_synthetic_dataset(root, SyntheticConfig(num_pairs=240, num_docs=0, num_val_pairs=0, seed=3),
                                      show_progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    # a word-level tokenizer: every unknown made-up word is one token ([UNK]); enough for the stream's mechanics
    return make_tokenizer()


def _metas(synthetic):
    from data_pipelines.reader import ShardIndex, ShardReader
    from data_pipelines.samples import pair_is_complete, parse_json

    index = ShardIndex.build(synthetic.pairs, pair_is_complete)
    reader = ShardReader(index.paths)
    return [parse_json(reader.read(ref)) for ref in index.samples]


# ------------------------------------------------------------------------------------------------ word pools


def test_word_pools_are_made_up_disjoint_and_fixed():
    pool = build_word_pool(None, size=3000)
    assert len(pool.train) + len(pool.eval) == 3000 and len(pool.eval) > 400
    assert not set(pool.train) & set(pool.eval)
    assert all(pool_of(w) == "train" for w in pool.train) and all(pool_of(w) == "eval" for w in pool.eval)
    english = english_words()
    assert len(english) > 200_000 and {"cat", "table", "run"} <= english
    assert not any(w in english for w in pool.train + pool.eval)
    assert not any(is_english(w) for w in pool.train + pool.eval)
    assert is_english("lubed") and is_english("tubs") and not is_english("dax")
    assert all(re.fullmatch(r"[a-z]{3,8}", w) and w[0] not in "aeiou" for w in pool.train + pool.eval)
    # a pure function: the same pools every time; a larger pool extends a smaller one (same order, same split)
    assert build_word_pool(None, size=3000) == pool
    bigger = build_word_pool(None, size=4000)
    assert bigger.train[: len(pool.train)] == pool.train and bigger.eval[: len(pool.eval)] == pool.eval
    assert len(candidate_words()) > 50_000


def test_word_pool_respects_the_token_limit():
    tok = make_tokenizer()  # word-level: a made-up word is one token ([UNK])
    pool = build_word_pool(tok, size=200, max_tokens=1)
    assert word_token_counts(tok, pool.train + pool.eval) == [1] * 200
    chars = _CharTokenizer()  # one token per character: " dax" is 4
    pool = build_word_pool(chars, size=200, max_tokens=5)
    assert all(len(w) <= 4 for w in pool.train + pool.eval)
    with pytest.raises(ValueError, match="raise max_tokens"):
        build_word_pool(chars, size=100, max_tokens=2)


def test_word_pool_with_the_pretrained_tokenizer_is_one_to_three_tokens():
    from transformers import AutoTokenizer

    from vlm import bases

    tok = AutoTokenizer.from_pretrained(bases.prepare_language_base("smollm2-135m"))
    pool = build_word_pool(tok)
    counts = word_token_counts(tok, pool.train + pool.eval)
    assert set(counts) <= {1, 2, 3} and len(pool.eval) > 600 and len(pool.train) > 2500


class _CharTokenizer:
    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [list(t) for t in texts]}


def test_bad_pool_arguments_name_the_value():
    with pytest.raises(ValueError, match="size must be an int >= 10, got 3"):
        build_word_pool(None, size=3)
    with pytest.raises(ValueError, match="max_tokens must be None or an int >= 1, got 0"):
        build_word_pool(None, size=100, max_tokens=0)


# ------------------------------------------------------------------------------------------------ episodes


def test_sample_class_reads_class_names_and_one_group_scenes():
    assert sample_class({"class_name": "dog", "label": 3}) == "dog"
    assert (
        sample_class({"scene": [{"colour": "red", "shape": "circle", "count": 2, "position": "top"}]}) == "red circle"
    )
    two = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}]
    assert sample_class({"scene": two}) is None and sample_class(None) is None and sample_class({}) is None


def test_episode_construction(synthetic):
    metas = _metas(synthetic)
    config = EpisodeConfig(ways=(2, 4), shots=(1, 3), queries=(1, 2))
    classes = ClassIndex.build(metas, config)
    assert len(classes.names) == 15  # every (colour, shape) of one-group scenes
    words = build_word_pool(None, size=500).train
    sizes = Counter()
    for position in range(300):
        ep = draw_episode(episode_rng(0, 0, 0, position), classes, words, config, max_images=10)
        ways = len(ep.words)
        sizes[ways] += 1
        assert 2 <= ways <= 4 and len(set(ep.words)) == ways and len(set(ep.classes)) == ways  # one word per class
        assert set(ep.words) <= set(words)
        assert len(ep.sample_ids) == len(ep.labels) <= 10
        demos = ep.labels[: len(ep.labels) - ep.num_queries]
        shots = Counter(demos)
        assert set(shots) == set(range(ways)) and len(set(shots.values())) == 1  # K of every class
        for label in ep.labels[-ep.num_queries :]:
            assert 0 <= label < ways  # every query's class is among the N
        for sample_id, label in zip(ep.sample_ids, ep.labels):
            assert sample_class(metas[sample_id]) == ep.classes[label]  # the image is of the word's class
        assert len(set(ep.sample_ids)) == len(ep.sample_ids)  # no image twice
        chunks = re.findall(r"<image>This is a (\w+)\.<\|endofchunk\|>", ep.text)
        assert ep.text == "".join(f"<image>This is a {w}.<|endofchunk|>" for w in chunks)
        assert chunks == [ep.words[j] for j in ep.labels]
    assert set(sizes) == {2, 3, 4}
    # deterministic per (seed, source, rank, position); other seeds or ranks give other episodes
    a = draw_episode(episode_rng(0, 0, 0, 7), classes, words, config, 10)
    assert a == draw_episode(episode_rng(0, 0, 0, 7), classes, words, config, 10)
    assert a != draw_episode(episode_rng(1, 0, 0, 7), classes, words, config, 10)
    assert a != draw_episode(episode_rng(0, 0, 1, 7), classes, words, config, 10)


def test_words_are_drawn_anew_for_every_episode(synthetic):
    classes = ClassIndex.build(_metas(synthetic), EpisodeConfig(ways=(2, 2)))
    words = build_word_pool(None, size=2000).train
    by_class: dict[str, set] = {}
    for position in range(200):
        ep = draw_episode(episode_rng(0, 0, 0, position), classes, words, EpisodeConfig(ways=(2, 2)), 8)
        for c, w in zip(ep.classes, ep.words):
            by_class.setdefault(c, set()).add(w)
    # no word is tied to a class: each class met many different words
    assert all(len(ws) >= 10 for ws in by_class.values())


def test_episode_options_real_names_task_induction_and_fitting(synthetic):
    metas = _metas(synthetic)
    words = ("dax", "blicket", "wug", "zorp")
    real = EpisodeConfig(ways=(2, 2), real_names=1.0, task_induction=1.0, template="Look: {word}!")
    classes = ClassIndex.build(metas, real)
    ep = draw_episode(episode_rng(0, 0, 0, 0), classes, words, real, 8)
    assert ep.words == ep.classes
    assert ep.text.startswith(f"Answer with {ep.words[0]} or {ep.words[1]}.<image>Look: ")
    assert ep.text.endswith("!<|endofchunk|>")
    # shots, then ways, are lowered so an episode fits max_images
    big = EpisodeConfig(ways=(5, 5), shots=(3, 3), queries=(1, 1))
    ep = draw_episode(episode_rng(0, 0, 0, 1), ClassIndex.build(metas, big), build_word_pool(None, 100).train, big, 6)
    assert len(ep.sample_ids) <= 6 and len(ep.words) == 5 and ep.num_queries == 1
    # a class subset
    subset = EpisodeConfig(ways=(2, 2), classes=("red circle", "blue square"))
    assert ClassIndex.build(metas, subset).names == ["blue square", "red circle"]
    with pytest.raises(ValueError, match=r"episode classes \['pink hexagon'\] are not in the data"):
        ClassIndex.build(metas, EpisodeConfig(classes=("red circle", "pink hexagon")))
    with pytest.raises(ValueError, match="need at least max"):
        ClassIndex.build([{"class_name": "a"}] * 5, EpisodeConfig())


def test_a_class_with_fewer_images_than_an_episode_needs_repeats_them():
    metas = [{"class_name": "a"}] * 5 + [{"class_name": "b"}] * 5  # an episode may need 4 shots + 2 queries of one
    config = EpisodeConfig(ways=(2, 2), shots=(4, 4), queries=(2, 2))
    classes = ClassIndex.build(metas, config)
    for position in range(20):
        ep = draw_episode(episode_rng(0, 0, 0, position), classes, ("dax", "wug"), config, 10)
        assert len(ep.sample_ids) == len(ep.labels) == 10
        assert all(metas[i]["class_name"] == ep.classes[j] for i, j in zip(ep.sample_ids, ep.labels))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ways": (3, 2)}, r"ways must be a range \[min, max\]"),
        ({"shots": (0, 2)}, r"shots must be a range"),
        ({"real_names": 1.5}, r"real_names must be a fraction in \[0, 1\], got 1.5"),
        ({"template": "This is a thing."}, r"must contain '\{word\}' exactly once"),
        ({"template": "{word} is it."}, r"needs text before"),
        ({"induction": "Answer."}, r"induction must contain"),
        ({"classes": ("a", "a")}, r"repeated names"),
        ({"word_pool_size": 5}, r"word_pool_size must be an int >= 10, got 5"),
    ],
)
def test_episode_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EpisodeConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ the stream


def _loader(synthetic, tokenizer, **options):
    options = {"sources": synthetic.pairs, "batch_size": 3, "max_images": 8, "max_length": 256, "infinite": True,
               "return_metadata": True, "episodes": EpisodeConfig(ways=(2, 3), shots=(1, 2), task_induction=0.5),
               **options}  # fmt: skip
    return ShardLoader(LoaderConfig(kind="episodes", **options), tokenizer, SmallTransform(8))


def test_episode_batches(synthetic, tokenizer):
    loader = _loader(synthetic, tokenizer)
    it = iter(loader)
    media_id = tokenizer.convert_tokens_to_ids("<image>")
    for _ in range(4):
        batch = next(it)
        b, t = batch["media_mask"].shape
        assert b == 3 and t == 8 and batch["vision_x"].shape == (3, 8, 1, 3, 8, 8)
        for row, meta in enumerate(batch["metadata"]):
            n = len(meta["sample_ids"])
            assert int((batch["input_ids"][row] == media_id).sum()) == n == int(batch["media_mask"][row].sum())
            assert not batch["vision_x"][row, n:].any()  # padding slots are zeros
            ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            first = ids.index(media_id)
            assert (batch["labels"][row, : first + 1] == IGNORE_INDEX).all()  # the induction sentence has no loss
            # each answer word is a target; with a word-level tokenizer, the word after "a" is [UNK] and labelled
            targets = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
            assert len(targets) > 0
    assert loader.stats["samples"] == 12 and loader.stats["skipped"] == 0


def test_episode_stream_resumes_exactly_and_differs_by_rank(synthetic, tokenizer):
    a = _loader(synthetic, tokenizer)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(a.state_dict()))  # through JSON, as a checkpoint keeps it
    expected = next(it)
    b = _loader(synthetic, tokenizer)
    b.load_state_dict(state)
    got = next(iter(b))
    for key in ("input_ids", "labels", "vision_x", "media_mask"):
        assert torch.equal(got[key], expected[key])
    assert got["metadata"] == expected["metadata"]
    # other episode settings refuse the state
    c = _loader(synthetic, tokenizer, episodes=EpisodeConfig(ways=(2, 2)))
    with pytest.raises(ValueError, match="episodes is"):
        c.load_state_dict(state)
    # two ranks draw different episodes
    r0 = next(iter(_loader(synthetic, tokenizer, rank=0, world_size=2)))["metadata"]
    r1 = next(iter(_loader(synthetic, tokenizer, rank=1, world_size=2)))["metadata"]
    assert [m["sample_ids"] for m in r0] != [m["sample_ids"] for m in r1]


def test_episode_with_a_corrupt_image_is_skipped_and_counted(synthetic, tokenizer, tmp_path):
    import io
    import tarfile

    from data_helpers import read_tar

    # a copy of the shards in which every red circle's image is corrupt
    out = tmp_path / "shards"
    out.mkdir()
    for src in sorted(synthetic.root.glob("pairs/*.tar")):
        samples = read_tar(src)
        with tarfile.open(out / src.name, "w") as tar:
            for key, members in samples.items():
                meta = json.loads(members["json"])
                if sample_class(meta) == "red circle":
                    members = {**members, "jpg": b"not a jpeg"}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    loader = _loader(synthetic, tokenizer, sources=str(out / "*.tar"))
    it = iter(loader)
    seen = 0
    for _ in range(12):
        batch = next(it)
        for meta in batch["metadata"]:
            assert "red circle" not in meta["classes"]
            seen += 1
    assert loader.stats["skipped/corrupt_image"] > 0 and loader.stats["skipped"] + seen == 36


def test_loader_config_errors_for_episodes(synthetic):
    with pytest.raises(ValueError, match="episodes applies to kind 'episodes' only"):
        LoaderConfig(synthetic.pairs, kind="pairs", episodes=EpisodeConfig())
    with pytest.raises(ValueError, match=r"max_images must hold the smallest episode \(.* = 4 images\), got 3"):
        LoaderConfig(synthetic.pairs, kind="episodes", max_images=3, episodes=EpisodeConfig(ways=(3, 3)))
    assert LoaderConfig(synthetic.pairs, kind="episodes").episodes == EpisodeConfig()


def test_loss_on_answers_keeps_only_the_words_said_before(synthetic, tokenizer):
    config = EpisodeConfig(ways=(2, 3), shots=(1, 3), queries=(1, 2), loss_on="answers")
    loader = _loader(synthetic, tokenizer, episodes=config)
    batch = next(iter(loader))
    for row, meta in enumerate(batch["metadata"]):
        labels = batch["labels"][row]
        kept = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        # one token per word with this word-level tokenizer: one label per repeated word, nothing else
        repeats = len(meta["labels"]) - len(set(meta["labels"]))
        assert len(meta["answer_spans"]) == repeats == len(kept) > 0
        assert all(labels[t] == batch["input_ids"][row, t] for t in kept)
        # the kept tokens are words: each follows "a" and precedes "."
        ids = batch["input_ids"][row].tolist()
        a, period = tokenizer.convert_tokens_to_ids(["a", "."])
        assert all(ids[t - 1] == a and ids[t + 1] == period for t in kept)
    with pytest.raises(ValueError, match="loss_on must be 'all' or 'answers'"):
        EpisodeConfig(loss_on="queries")
