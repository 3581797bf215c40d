"""Broken data stops with an error naming the source, before training or within a bounded number of samples:
sources that only skip, missing shards in a brace range, empty / non-tar shards, NaN pixels; skip counters resume."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from data_helpers import SmallTransform, make_tokenizer, write_pair_shards

from data_pipelines.loader import DataSourceError, LoaderConfig, ShardLoader, pairs_loader
from data_pipelines.reader import check_shard_files, expand_shards, find_shards


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _all_corrupt(directory: Path, count: int = 10, prefix: str = "bad") -> Path:
    write_pair_shards(directory, count=count, per_shard=5, prefix=prefix, corrupt=tuple(range(count)))
    return directory


@pytest.mark.timeout(120)
def test_source_whose_every_image_is_corrupt_stops_with_its_name_and_reasons(tmp_path, tokenizer) -> None:
    """An infinite loader over a source of corrupt images used to spin forever; now it stops at the limit."""
    shards = _all_corrupt(tmp_path / "bad")
    loader = pairs_loader(str(shards), tokenizer, SmallTransform(), batch_size=4, infinite=True)
    with pytest.raises(DataSourceError) as err:
        next(iter(loader))
    message = str(err.value)
    assert "source 'source0'" in message and "1000 samples in a row" in message
    assert "corrupt_image x1000" in message and str(shards) in message
    assert loader.stats["skipped/corrupt_image"] == 1000  # exactly the limit: it stopped there


@pytest.mark.timeout(120)
def test_a_dead_source_among_healthy_ones_is_named(tmp_path, tokenizer) -> None:
    good = tmp_path / "good"
    write_pair_shards(good, count=20, per_shard=10, prefix="good")
    bad = _all_corrupt(tmp_path / "bad")
    config = LoaderConfig(
        sources=[{"shards": str(good), "name": "laion"}, {"shards": str(bad), "name": "broken"}],
        batch_size=4,
        infinite=True,
        max_consecutive_skips=30,
    )
    loader = ShardLoader(config, tokenizer, SmallTransform())
    batches = iter(loader)
    with pytest.raises(
        DataSourceError, match=r"source 'broken': the last (3[0-3]) samples in a row .*corrupt_image x\1"
    ) as err:
        for _ in range(1000):
            next(batches)
    assert "laion" not in str(err.value).split("Shards:")[0]
    assert loader.stats["samples"] > 0  # the healthy source kept delivering until then


def test_finite_epoch_of_only_skipped_samples_is_an_error(tmp_path, tokenizer) -> None:
    shards = _all_corrupt(tmp_path / "bad", count=6)
    loader = pairs_loader(str(shards), tokenizer, SmallTransform(), batch_size=4)
    with pytest.raises(DataSourceError, match=r"every one of the 6 samples .*\(corrupt_image x6\)"):
        list(loader)


def test_limit_is_validated(tmp_path, tokenizer) -> None:
    with pytest.raises(ValueError, match=r"LoaderConfig.max_consecutive_skips must be an int >= 1, got 0"):
        LoaderConfig(sources="x.tar", max_consecutive_skips=0)


def test_missing_shard_in_a_brace_range_is_a_warning_with_the_count(tmp_path, tokenizer, caplog) -> None:
    write_pair_shards(tmp_path, count=20, per_shard=5)  # pairs-000000..000003.tar
    (tmp_path / "pairs-000002.tar").unlink()
    spec = str(tmp_path / "pairs-{000000..000004}.tar")
    paths, missing = find_shards(spec)
    assert [p.name for p in paths] == ["pairs-000000.tar", "pairs-000001.tar", "pairs-000003.tar"]
    assert [Path(m).name for m in missing] == ["pairs-000002.tar", "pairs-000004.tar"]
    with caplog.at_level(logging.WARNING, logger="data_pipelines.reader"):
        assert expand_shards(spec) == paths
    assert (
        "2 of 5 shards of" in caplog.text and "pairs-000002.tar" in caplog.text and "using the other 3" in caplog.text
    )
    loader = pairs_loader(spec, tokenizer, SmallTransform(), batch_size=5)
    assert loader.num_samples == {"source0": 15}


@pytest.mark.parametrize("content", [b"", b"this is not a tar archive " * 40], ids=["zero-bytes", "not-tar"])
def test_empty_or_non_tar_shard_is_named(tmp_path, content) -> None:
    write_pair_shards(tmp_path, count=10, per_shard=5)
    bad = tmp_path / "pairs-000009.tar"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="1 of 3 shard") as err:
        check_shard_files(expand_shards(str(tmp_path)))
    assert str(bad) in str(err.value)
    assert ("empty (0 bytes)" if not content else "not a tar archive") in str(err.value)
    check_shard_files(expand_shards(str(tmp_path / "pairs-00000[01].tar")))  # the intact ones pass


def test_nonfinite_pixels_are_skipped_and_counted(tmp_path, tokenizer) -> None:
    write_pair_shards(tmp_path, count=8, per_shard=8)

    class Poisoned(SmallTransform):
        def __call__(self, image):
            tensor = super().__call__(image)
            if tensor[0, 0, 0] > 0.5:  # some of the colours
                tensor[0, 0, 0] = float("nan")
            return tensor

    loader = pairs_loader(str(tmp_path), tokenizer, Poisoned(), batch_size=8, shuffle="none")
    batches = list(loader)
    poisoned = loader.stats["skipped/nonfinite_pixels"]
    assert 0 < poisoned < 8 and sum(b["input_ids"].shape[0] for b in batches) == 8 - poisoned
    assert all(torch.isfinite(b["vision_x"]).all() for b in batches)


def test_skip_counters_are_restored_on_resume(tmp_path, tokenizer) -> None:
    """Counters after 3 batches + resume + 3 batches == counters of 6 batches in one go."""
    write_pair_shards(tmp_path, count=30, per_shard=10, corrupt=(1, 5, 9, 14, 20, 27))

    def make():
        return pairs_loader(str(tmp_path), tokenizer, SmallTransform(), batch_size=4, infinite=True, seed=3)

    reference = make()
    it = iter(reference)
    for _ in range(6):
        next(it)
    first = make()
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert state["counters"]["skipped"] > 0
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.stats == first.stats  # restored, not reset to zero
    it = iter(resumed)
    for _ in range(3):
        next(it)
    assert resumed.stats == reference.stats and resumed.position == reference.position
