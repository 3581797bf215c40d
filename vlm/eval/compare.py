"""Paired comparisons between the settings of one evaluation: is 4-shot better than 0-shot, or only different?

Every setting (mode, ablation, shots) of a trial scores the same test samples (the trial's seed draws them), so two
settings can be compared sample by sample. :func:`paired_difference` takes the per-sample scores of two settings
(for captioning each image's CIDEr-D, whose mean is the corpus CIDEr; VQA: each question's accuracy;
classification: top-1 correctness), all in percent, and returns their mean difference with a 95% percentile
bootstrap interval over the samples (the pairs resampled with replacement). The interval answers what one
evaluation of a few hundred images can resolve: a difference whose interval holds 0 is not one the data shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

__all__ = ["format_differences", "paired_difference", "paired_differences"]

BOOTSTRAP_SAMPLES = 2000


def paired_difference(
    a: Sequence[float], b: Sequence[float], num_bootstrap: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> dict[str, Any]:
    """Mean of ``a - b`` (paired samples), its 95% percentile bootstrap interval (``ci95``), the number of pairs,
    and whether the interval excludes 0 (``resolved``)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need two 1-D sequences of one length, got shapes {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired scores need at least one sample")
    if num_bootstrap < 1:
        raise ValueError(f"num_bootstrap must be >= 1, got {num_bootstrap}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(num_bootstrap)
    for start in range(0, num_bootstrap, 256):  # chunks bound the memory at 256 x n indices
        stop = min(start + 256, num_bootstrap)
        means[start:stop] = diff[rng.integers(0, diff.size, size=(stop - start, diff.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {
        "difference": float(diff.mean()),
        "ci95": [float(lo), float(hi)],
        "pairs": int(diff.size),
        "resolved": bool(lo > 0 or hi < 0),  # the interval excludes 0
    }


def _label(run: Mapping) -> str:
    return run["mode"] + ("-ablated" if run["ablate_images"] else "")


def _sample_scores(run: Mapping, score) -> dict[tuple[int, Any], float]:
    """(trial seed, sample id) -> the sample's score, over the run's trials."""
    out = {}
    for trial in run["trials"]:
        for rec in trial["predictions"]:
            out[(trial["seed"], rec["id"])] = float(score(rec))
    return out


def paired_differences(runs: Sequence[Mapping], score, metric: str, **kwargs) -> list[dict[str, Any]]:
    """Every pair of shot counts within a mode (the larger minus the smaller) and every setting against its
    image-ablated control (real minus ablated), compared on the samples both scored (paired by trial seed and
    sample id). ``score(record)`` is a prediction record's score in percent; ``runs`` as :func:`vlm.eval.evaluate`
    returns them, scored (each trial's ``predictions`` a list of records)."""
    scores = {(r["mode"], r["ablate_images"], r["shots"]): _sample_scores(r, score) for r in runs}
    pairs = []
    for mode, ablated in dict.fromkeys((r["mode"], r["ablate_images"]) for r in runs):
        shots = sorted(k for (m, a, k) in scores if (m, a) == (mode, ablated))
        pairs += [((mode, ablated, hi), (mode, ablated, lo)) for lo, hi in combinations(shots, 2)]
    pairs += [(key, (key[0], True, key[2])) for key in scores if not key[1] and (key[0], True, key[2]) in scores]
    out = []
    for key_a, key_b in pairs:
        common = sorted(set(scores[key_a]) & set(scores[key_b]), key=repr)
        if not common:
            continue
        a, b = ([scores[k][s] for s in common] for k in (key_a, key_b))
        names = [f"{m}{'-ablated' if ab else ''} {k}-shot" for m, ab, k in (key_a, key_b)]
        out.append({"a": names[0], "b": names[1], "metric": metric, **paired_difference(a, b, **kwargs)})
    return out


def format_differences(differences: Sequence[Mapping]) -> str:
    """A Markdown table of :func:`paired_differences`."""
    if not differences:
        return "(no paired comparisons)"
    lines = ["| a - b | metric | difference | 95% interval | pairs | resolved |", "|---|---|---|---|---|---|"]
    for d in differences:
        lo, hi = d["ci95"]
        lines.append(
            f"| {d['a']} - {d['b']} | {d['metric']} | {d['difference']:+.2f} | [{lo:+.2f}, {hi:+.2f}] "
            f"| {d['pairs']} | {'yes' if d['resolved'] else 'no'} |"
        )
    return "\n".join(lines)
