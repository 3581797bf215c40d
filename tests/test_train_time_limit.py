"""``run.max_seconds``: a time-limited run ends like a finished one (held-out loss, checkpoint, export) at the step
it reached, and starting it again continues it; ``caption_prefix`` reaches the pairs and held-out loaders."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import TINY_RANDOM, run_training, small_config

from training.config import ConfigError, load_config
from training.metrics import read_records


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["0", "-5", ".nan", "fast"])
def test_max_seconds_must_be_positive(value):
    with pytest.raises(ConfigError, match="max_seconds"):
        load_config(TINY_RANDOM, [f"run.max_seconds={value}"])
    assert load_config(TINY_RANDOM, ["run.max_seconds=90"]).run.max_seconds == 90.0
    assert load_config(TINY_RANDOM).run.max_seconds is None


def test_caption_prefix_is_for_pairs_only():
    with pytest.raises(ConfigError, match="documents.caption_prefix"):
        load_config(TINY_RANDOM, ["data.documents.caption_prefix='Output:'"])


def test_time_limit_stops_early_and_still_exports(tmp_path_factory):
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("run")
    extra = [
        "run.max_steps=500",
        "run.max_seconds=0.001",  # reached after the first step
        "eval.every_steps=100",  # the final held-out loss
        "eval.num_generations=1",
        "checkpoint.export=true",
        "checkpoint.every_steps=0",
        "data.pairs.caption_prefix='Output:'",
        "data.val.caption_prefix='Output:'",
    ]
    result, trainer = run_training(small_config(cache, out, *extra))
    assert result.time_limit_reached and not result.stopped_early
    assert result.step == 1 and math.isfinite(result.eval_loss)
    assert (out / "export" / "flamingo_config.json").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    records = read_records(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1]
    assert records[0]["step_seconds"] > 0
    assert [r["step"] for r in records if r["kind"] == "eval"] == [1]
    # the prefix is in the pairs the model trained on and in the held-out pairs
    pairs = trainer.streams["pairs"].loader.config
    assert pairs.caption_prefix == trainer.val_loader.config.caption_prefix == "Output:"
    first = next(iter(trainer.val_loader))
    assert trainer.tokenizer.decode(first["input_ids"][0]).startswith("<image>Output:")

    again, _ = run_training(small_config(cache, out, *extra))  # the same command continues the run
    assert (again.start_step, again.step, again.time_limit_reached) == (1, 2, True)
    assert json.loads((out / "export" / "flamingo_config.json").read_text())
