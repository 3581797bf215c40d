"""Binding episodes: the fast-binding few-shot task of Frozen (Tsimpoukelli et al., NeurIPS 2021) as training data.

An episode draws ``N`` classes of a labelled image source, gives each a word that exists only inside this episode
("dax", "blicket"), shows ``K`` images of each class in a shuffled order, each as ``<image>This is a {word}.
<|endofchunk|>``, and continues with query images of those classes followed by their words::

    [Answer with dax or blicket.]<image>This is a dax.<|endofchunk|><image>This is a blicket.<|endofchunk|>
    <image>This is a blicket.<|endofchunk|><image>This is a dax.<|endofchunk|>...

A word's meaning can only come from earlier in the same episode, so the loss on the queries' words is what
in-context learning is: reading the demonstrations' images and words. Words come from :func:`build_word_pool`: a
large, generated pool of pronounceable made-up words (not English words, 1 to ``max_tokens`` tokens of the LM),
split by a hash of the word into a training pool and a disjoint evaluation pool that training never uses.

Labelled sources: pair shards whose ``json`` names the class -- ``class_name`` (written by
``data_pipelines.from_classes`` from a class tree ``root/<class>/*.jpg``) -- or the synthetic scenes, where a scene
of a single group is of the class "<colour> <shape>" (:func:`sample_class`). Samples without a class are not used.

Episodes are composed on the fly by the loader (``LoaderConfig(kind="episodes", episodes=EpisodeConfig(...))``):
episode ``q`` of a source on a rank is a pure function of (seed, source, rank, q), so words are drawn anew for
every episode (no word is tied to a class anywhere in the data) and a resumed stream continues exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .tokenization import END_OF_CHUNK_TOKEN, MEDIA_TOKEN

DEFAULT_TEMPLATE = "This is a {word}."
DEFAULT_INDUCTION = "Answer with {words}."
EPISODE_STREAM = 0x65706973
WORD_ORDER_SEED = 0x776F7264
EVAL_FRACTION = 0.2  # of the generated words, those whose hash falls here form the evaluation pool

# Syllables of the generated words: consonant onsets (no vowel start, so "a {word}" reads right), five vowels,
# consonant codas. One- and two-syllable words: "dax", "blick", "wugor", "tufa", ...
ONSETS = (
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
    "bl", "br", "dr", "fl", "fr", "gl", "gr", "kl", "kr", "pl", "pr", "sk", "sl", "sn", "sp", "st", "tr", "sw",
)  # fmt: skip
INNER_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("b", "d", "g", "k", "m", "n", "p", "t", "x", "sk", "nd", "nt", "rp", "ck")


def candidate_words() -> list[str]:
    """Every generated word (sorted): CVC syllables and two-syllable CV-CV(C) words."""
    one = ("".join(p) for p in itertools.product(ONSETS, VOWELS, CODAS))
    two = ("".join(p) for p in itertools.product(ONSETS, VOWELS, INNER_ONSETS, VOWELS, ("",) + CODAS))
    return sorted(set(one) | set(two))


@lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """Lower-case English words (web2 and GCIDE word lists of the ``english-words`` package, about 260,000)."""
    from english_words import get_english_words_set

    return frozenset(get_english_words_set(["web2", "gcide"], lower=True, alpha=True))


def is_english(word: str) -> bool:
    """An English word, or one by a regular ending ("lubed", "tubs", "tinted")."""
    english = english_words()
    stems = [word]
    if word.endswith("ed"):
        stems += [word[:-1], word[:-2]]
    if word.endswith(("s", "d", "y")):
        stems.append(word[:-1])
    return any(stem in english for stem in stems)


def pool_of(word: str) -> str:
    """ "eval" or "train": a fixed function of the word (its sha256), so the pools never overlap and a word's pool
    does not depend on the tokenizer or the pool size."""
    return "eval" if hashlib.sha256(word.encode()).digest()[0] < round(256 * EVAL_FRACTION) else "train"


@dataclass(frozen=True)
class WordPool:
    """Made-up words for binding episodes: ``train`` for training, ``eval`` (disjoint) for evaluation."""

    train: tuple[str, ...]
    eval: tuple[str, ...]
    max_tokens: int | None

    def words(self, pool: str) -> tuple[str, ...]:
        if pool not in ("train", "eval"):
            raise ValueError(f"word pool must be 'train' or 'eval', got {pool!r}")
        return self.train if pool == "train" else self.eval


def word_token_counts(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """Tokens of each word as it appears in the template, after a space (``" dax"``)."""
    return [len(ids) for ids in tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]]


def build_word_pool(tokenizer: Any = None, size: int = 4000, max_tokens: int | None = 3) -> WordPool:
    """The first ``size`` usable generated words in a fixed pseudo-random order, split into the two pools.

    Usable: not an English word and, with a tokenizer, 1 to ``max_tokens`` tokens after a space (None: any count).
    A pure function of (the tokenizer's vocabulary, size, max_tokens)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 10:
        raise ValueError(f"word pool size must be an int >= 10, got {size!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be None or an int >= 1, got {max_tokens!r}")
    words = [w for w in candidate_words() if not is_english(w)]
    order = np.random.default_rng(WORD_ORDER_SEED).permutation(len(words))
    chosen: list[str] = []
    for start in range(0, len(order), 4096):
        batch = [words[i] for i in order[start : start + 4096]]
        if tokenizer is not None and max_tokens is not None:
            counts = word_token_counts(tokenizer, batch)
            batch = [w for w, n in zip(batch, counts) if 1 <= n <= max_tokens]
        chosen.extend(batch[: size - len(chosen)])
        if len(chosen) >= size:
            break
    train = tuple(w for w in chosen if pool_of(w) == "train")
    evaluation = tuple(w for w in chosen if pool_of(w) == "eval")
    if len(evaluation) < 10 or len(train) < 10:
        raise ValueError(
            f"only {len(train)} training and {len(evaluation)} evaluation words of at most {max_tokens} tokens; "
            "raise max_tokens (a small tokenizer splits made-up words into many tokens)"
        )
    return WordPool(train, evaluation, max_tokens)


# ---------------------------------------------------------------------------------------------- prompt text


def check_template(template: str) -> str:
    """A demonstration template holds ``{word}`` once, and it is not the first thing (the query cuts before it)."""
    if not isinstance(template, str) or template.count("{word}") != 1:
        raise ValueError(f"binding template must contain '{{word}}' exactly once, got {template!r}")
    if not template[: template.index("{word}")].strip():
        raise ValueError(f"binding template needs text before '{{word}}' (the query prompt), got {template!r}")
    if MEDIA_TOKEN in template or END_OF_CHUNK_TOKEN in template:
        raise ValueError(f"binding template must not contain {MEDIA_TOKEN} or {END_OF_CHUNK_TOKEN}: {template!r}")
    return template


def fill(template: str, word: str) -> str:
    return template.replace("{word}", word)


def query_prefix(template: str) -> str:
    """The query's text: the template cut before the word ("This is a")."""
    return template[: template.index("{word}")].rstrip()


def join_words(words: Sequence[str]) -> str:
    """ "dax", "dax or blicket", "dax, blicket or wug"."""
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def induction_text(words: Sequence[str], induction: str = DEFAULT_INDUCTION) -> str:
    """The task-induction sentence: "Answer with dax or blicket."."""
    return induction.replace("{words}", join_words(words))


def chunk(template: str, word: str) -> str:
    """One demonstration: ``<image>This is a dax.<|endofchunk|>``."""
    return f"{MEDIA_TOKEN}{fill(template, word)}{END_OF_CHUNK_TOKEN}"


# ---------------------------------------------------------------------------------------------- classes


def sample_class(meta: dict | None) -> str | None:
    """The class of a labelled pair sample from its json: ``class_name`` (from_classes), or "<colour> <shape>" of a
    synthetic scene with exactly one group; None when the sample has no class."""
    if not isinstance(meta, dict):
        return None
    name = meta.get("class_name")
    if isinstance(name, str) and name.strip():
        return name.strip()
    scene = meta.get("scene")
    if isinstance(scene, list) and len(scene) == 1 and isinstance(scene[0], dict):
        colour, shape = scene[0].get("colour"), scene[0].get("shape")
        if isinstance(colour, str) and isinstance(shape, str):
            return f"{colour} {shape}"
    return None


@dataclass(frozen=True)
class EpisodeConfig:
    """How training episodes are drawn; ranges are inclusive ``(min, max)``, drawn uniformly per episode.

    ways: classes per episode. shots: images per class before the queries. queries: query images after them
    (each of one of the episode's classes, not shown before). An episode never exceeds the loader's ``max_images``:
    shots, then ways, are lowered to fit. real_names: fraction of episodes that use the classes' real names
    instead of made-up words. task_induction: fraction of episodes that start with the sentence ``induction``
    ("Answer with dax or blicket."). template: each image's text, with ``{word}``. classes: the class subset
    (None: all classes of the source). word_pool_size / word_max_tokens: :func:`build_word_pool`'s size and
    max_tokens; training draws from its training pool only. loss_on: "all" (every text token, as interleaved
    documents) or "answers" (only the words that appeared earlier in the episode: the tokens that can only be
    predicted by binding; a word's first mention is unpredictable noise).
    """

    ways: tuple[int, int] = (2, 5)
    shots: tuple[int, int] = (1, 3)
    queries: tuple[int, int] = (1, 2)
    real_names: float = 0.0
    task_induction: float = 0.0
    template: str = DEFAULT_TEMPLATE
    induction: str = DEFAULT_INDUCTION
    classes: tuple[str, ...] | None = None
    word_pool_size: int = 4000
    word_max_tokens: int | None = 3
    loss_on: str = "all"

    def __post_init__(self) -> None:
        for name, low in (("ways", 1), ("shots", 1), ("queries", 1)):
            value = getattr(self, name)
            if (
                not isinstance(value, (tuple, list))
                or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
                or not low <= value[0] <= value[1]
            ):
                raise ValueError(
                    f"EpisodeConfig.{name} must be a range [min, max] of ints with {low} <= min <= max, got {value!r}"
                )
            object.__setattr__(self, name, tuple(value))
        for name in ("real_names", "task_induction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"EpisodeConfig.{name} must be a fraction in [0, 1], got {value!r}")
        check_template(self.template)
        if not isinstance(self.induction, str) or "{words}" not in self.induction:
            raise ValueError(f"EpisodeConfig.induction must contain '{{words}}', got {self.induction!r}")
        if self.classes is not None:
            if isinstance(self.classes, str) or not all(isinstance(c, str) and c for c in self.classes):
                raise ValueError(f"EpisodeConfig.classes must be None or a list of class names, got {self.classes!r}")
            if len(set(self.classes)) != len(self.classes):
                raise ValueError(f"EpisodeConfig.classes has repeated names: {list(self.classes)}")
            object.__setattr__(self, "classes", tuple(self.classes))
        if (
            isinstance(self.word_pool_size, bool)
            or not isinstance(self.word_pool_size, int)
            or self.word_pool_size < 10
        ):
            raise ValueError(f"EpisodeConfig.word_pool_size must be an int >= 10, got {self.word_pool_size!r}")
        if self.loss_on not in ("all", "answers"):
            raise ValueError(f"EpisodeConfig.loss_on must be 'all' or 'answers', got {self.loss_on!r}")
        m = self.word_max_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"EpisodeConfig.word_max_tokens must be None or an int >= 1, got {m!r}")

    def min_images(self) -> int:
        """Images of the smallest episode (ways min x 1 shot + 1 query)."""
        return self.ways[0] + self.queries[0]


@dataclass
class ClassIndex:
    """Sample ids of each class of one source (only classes with enough samples for an episode)."""

    names: list[str]
    samples: list[np.ndarray]

    @classmethod
    def build(cls, metas: Sequence[dict | None], config: EpisodeConfig, source: str = "") -> ClassIndex:
        by_class: dict[str, list[int]] = {}
        for sample_id, meta in enumerate(metas):
            name = sample_class(meta)
            if name is not None:
                by_class.setdefault(name, []).append(sample_id)
        where = f"source {source!r}: " if source else ""
        if config.classes is not None:
            missing = [c for c in config.classes if c not in by_class]
            if missing:
                raise ValueError(
                    f"{where}episode classes {missing} are not in the data; its classes are {sorted(by_class)}"
                )
            by_class = {c: by_class[c] for c in config.classes}
        need = config.shots[0] + 1  # one shot and a query image of the same class
        small = sorted(c for c, ids in by_class.items() if len(ids) < need)
        names = sorted(c for c in by_class if c not in small)
        if len(names) < max(2, config.ways[0]):
            raise ValueError(
                f"{where}binding episodes need at least max(2, ways min={config.ways[0]}) classes with >= {need} "
                f"images each; found {len(names)} ({names}; too small: {small}). Is it a labelled source "
                "(json class_name, or synthetic scenes of one group)?"
            )
        return cls(names, [np.asarray(by_class[c], dtype=np.int64) for c in names])


@dataclass
class Episode:
    """One episode: its images (sample ids, in prompt order, demonstrations then queries) and its text."""

    sample_ids: list[int]
    classes: list[str]  # the episode's classes, in word order
    words: list[str]
    labels: list[int]  # per image: index into classes / words
    num_queries: int
    text: str  # without the tokenizer's eos
    answer_spans: list[tuple[int, int]]  # character spans of the words said before in the episode


def draw_episode(
    rng: np.random.Generator, classes: ClassIndex, words: Sequence[str], config: EpisodeConfig, max_images: int
) -> Episode:
    """A random episode of ``classes`` with made-up ``words`` (or real names), at most ``max_images`` images."""
    low, high = config.ways
    ways = (
        int(rng.integers(low, min(high, len(classes.names)) + 1)) if low <= len(classes.names) else len(classes.names)
    )
    ways = max(2, min(ways, len(classes.names)))
    shots = int(rng.integers(config.shots[0], config.shots[1] + 1))
    queries = int(rng.integers(config.queries[0], config.queries[1] + 1))
    queries = max(1, min(queries, max_images - 2))
    while ways * shots + queries > max_images and shots > 1:
        shots -= 1
    while ways * shots + queries > max_images and ways > 2:
        ways -= 1
    if ways * shots + queries > max_images:
        raise ValueError(f"a binding episode needs at least {ways * shots + queries} images; max_images={max_images}")
    chosen = rng.choice(len(classes.names), size=ways, replace=False)
    if rng.random() < config.real_names:
        names = [classes.names[c] for c in chosen]
    else:
        names = [words[i] for i in rng.choice(len(words), size=ways, replace=False)]
    query_labels = rng.integers(0, ways, size=queries)
    demo_labels = [j for j in range(ways) for _ in range(shots)]
    picks: list[list[int]] = []
    for j, c in enumerate(chosen):
        pool = classes.samples[c]
        need = shots + int((query_labels == j).sum())
        # a class with fewer images than the episode needs repeats some (drawn with replacement)
        picks.append(rng.choice(pool, size=need, replace=need > len(pool)).tolist())
    order = rng.permutation(len(demo_labels))
    labels = [demo_labels[i] for i in order] + [int(j) for j in query_labels]
    used = [0] * ways
    sample_ids = []
    for j in labels:
        sample_ids.append(int(picks[j][used[j]]))
        used[j] += 1
    induction = rng.random() < config.task_induction
    text = induction_text(names, config.induction) if induction else ""
    before = config.template[: config.template.index("{word}")]
    spans, said = [], set()
    for j in labels:
        start = len(text) + len(MEDIA_TOKEN) + len(before)
        if j in said:
            spans.append((start, start + len(names[j])))
        said.add(j)
        text += chunk(config.template, names[j])
    return Episode(sample_ids, [classes.names[c] for c in chosen], names, labels, queries, text, spans)


def episode_rng(seed: int, source: int, rank: int, position: int) -> np.random.Generator:
    """The generator of episode ``position`` of ``source`` on ``rank``: episodes are pure functions of these."""
    return np.random.default_rng([seed, EPISODE_STREAM, source, rank, position])


def chance(ways: int) -> float:
    return 1.0 / ways if ways > 0 else math.nan
