"""Paired comparisons of evaluation settings: per-image CIDEr adds up to the corpus CIDEr, the bootstrap interval is
a paired one (narrow when two settings share their per-sample variation), and settings pair by sample id."""

import numpy as np
import pytest
from test_eval_metrics import CANDIDATES, REFERENCES

from vlm.eval import format_differences, paired_difference, paired_differences
from vlm.eval.metrics import caption_scores_many
from vlm.eval.tasks import CaptioningTask, ClassificationTask, VQATask


def test_per_image_cider_averages_to_the_corpus_cider():
    scores = caption_scores_many([(CANDIDATES, REFERENCES)])[0]
    per_image = scores["cider_per_image"]
    assert set(per_image) == set(CANDIDATES)
    assert np.mean(list(per_image.values())) == pytest.approx(scores["cider"], abs=1e-12)
    assert len(set(per_image.values())) == len(per_image)  # real per-image scores, not one number repeated
    # the captioning task's records carry them in percent; their mean is the trial's metric
    task = CaptioningTask()

    class S:
        def __init__(self, i):
            self.id, self.captions = i, REFERENCES[i]

    metrics, records = task.score([S(i) for i in CANDIDATES], list(CANDIDATES.values()))
    assert np.mean([task.sample_score(r) for r in records]) == pytest.approx(metrics["cider"], abs=1e-9)
    assert VQATask().sample_score({"accuracy": 0.6}) == pytest.approx(60.0)
    assert ClassificationTask().sample_score({"correct": True}) == 100.0


def test_paired_difference_of_identical_and_shifted_scores():
    rng = np.random.default_rng(1)
    x = rng.normal(20, 10, 300)
    same = paired_difference(x, x)
    assert same["difference"] == 0 and same["ci95"] == [0, 0] and not same["resolved"] and same["pairs"] == 300
    shifted = paired_difference(x + 1.5, x)
    assert shifted["difference"] == pytest.approx(1.5) and shifted["ci95"] == pytest.approx([1.5, 1.5])
    assert shifted["resolved"]
    assert paired_difference(x, x + 1.5)["ci95"] == pytest.approx([-1.5, -1.5])


def test_the_interval_is_paired_and_has_the_normal_width():
    # Two settings that share a large per-image variation (some images are easy, some hard) and differ by a small
    # noisy amount: the paired interval follows the spread of the differences, not of the scores.
    rng = np.random.default_rng(0)
    n = 500
    base = rng.normal(25, 20, n)
    delta = rng.normal(0.8, 3.0, n)
    d = paired_difference(base + delta, base, seed=3)
    lo, hi = d["ci95"]
    assert lo < d["difference"] < hi
    assert d["difference"] == pytest.approx(delta.mean())
    normal_half_width = 1.96 * delta.std() / np.sqrt(n)
    assert (hi - lo) / 2 == pytest.approx(normal_half_width, rel=0.15)
    assert d["resolved"]  # 0.8 +- ~0.26; resampled unpaired, the interval would be about 9x as wide
    # deterministic for a seed
    assert paired_difference(base + delta, base, seed=3) == d


def test_paired_difference_errors():
    with pytest.raises(ValueError, match="one length"):
        paired_difference([1, 2], [1])
    with pytest.raises(ValueError, match="at least one"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="num_bootstrap"):
        paired_difference([1], [1], num_bootstrap=0)


def _run(mode, ablated, shots, scores_by_seed):
    return {
        "mode": mode,
        "ablate_images": ablated,
        "shots": shots,
        "trials": [
            {"seed": seed, "predictions": [{"id": i, "cider": v} for i, v in scores.items()]}
            for seed, scores in scores_by_seed.items()
        ],
    }


def test_settings_pair_by_trial_and_sample_id():
    ids = ["a", "b", "c", "d"]
    zero = {42: dict(zip(ids, [10.0, 20.0, 30.0, 40.0])), 43: dict(zip(ids, [0.0, 0.0, 0.0, 0.0]))}
    # the 4-shot records come in another order; each image is 2 better in trial 42 and 1 better in trial 43
    four = {42: {i: zero[42][i] + 2 for i in reversed(ids)}, 43: {i: 1.0 for i in ids}}
    ablated = {42: dict.fromkeys(ids, 5.0), 43: dict.fromkeys(ids, 0.0)}
    runs = [_run("rices", False, 0, zero), _run("rices", False, 4, four), _run("rices", True, 0, ablated)]
    out = paired_differences(runs, CaptioningTask().sample_score, "cider", num_bootstrap=200)
    by_name = {(d["a"], d["b"]): d for d in out}
    assert set(by_name) == {("rices 4-shot", "rices 0-shot"), ("rices 0-shot", "rices-ablated 0-shot")}
    four_zero = by_name[("rices 4-shot", "rices 0-shot")]
    assert four_zero["difference"] == pytest.approx(1.5) and four_zero["pairs"] == 8
    assert four_zero["ci95"][0] >= 1 and four_zero["ci95"][1] <= 2 and four_zero["resolved"]
    real_ablated = by_name[("rices 0-shot", "rices-ablated 0-shot")]
    assert real_ablated["difference"] == pytest.approx((100 - 20) / 8)
    table = format_differences(out)
    assert "| rices 4-shot - rices 0-shot | cider | +1.50 |" in table and table.count("\n") == 3
    assert format_differences([]) == "(no paired comparisons)"
