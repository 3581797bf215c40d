"""Deterministic, randomly accessible mixing of several sources with given weights.

The mixed stream of one rank is a sequence of slots 0, 1, 2, ...; slot ``p`` is given to source ``source_of(p)``
drawn with probability proportional to the weights. Draws come in blocks of ``BLOCK`` slots, block ``b`` drawn from
``numpy.random.default_rng([seed, rank, b, MIX_STREAM])``, so the choice at any slot is a pure function of
(seed, rank, slot): no state is carried, and a resumed stream makes exactly the same choices. The position of a slot
inside its source's own stream is the number of earlier slots given to that source (:meth:`MixSchedule.counts_before`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BLOCK = 4096
MIX_STREAM = 0x6D6978  # distinguishes mixing draws from the other seeded streams


class MixSchedule:
    """Source choice per slot for one rank. With a single source every slot goes to source 0."""

    def __init__(self, weights: Sequence[float], seed: int, rank: int = 0) -> None:
        weights = [float(w) for w in weights]
        if not weights:
            raise ValueError("MixSchedule needs at least one source weight")
        if any(not np.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"source weights must be finite and > 0, got {weights}")
        total = sum(weights)
        self.probabilities = np.array([w / total for w in weights])
        self.num_sources = len(weights)
        self.seed = int(seed)
        self.rank = int(rank)
        self._blocks: dict[int, np.ndarray] = {}
        self._prefix: list[np.ndarray] = [np.zeros(self.num_sources, dtype=np.int64)]  # counts before block b

    def block(self, b: int) -> np.ndarray:
        """Source indices (int8/int64) for slots [b*BLOCK, (b+1)*BLOCK)."""
        choices = self._blocks.get(b)
        if choices is None:
            if self.num_sources == 1:
                choices = np.zeros(BLOCK, dtype=np.int64)
            else:
                rng = np.random.default_rng([self.seed, self.rank, b, MIX_STREAM])
                choices = rng.choice(self.num_sources, size=BLOCK, p=self.probabilities)
            if len(self._blocks) > 64:
                self._blocks.clear()
            self._blocks[b] = choices
        return choices

    def sources(self, start: int, stop: int) -> np.ndarray:
        """Source index of every slot in [start, stop)."""
        if stop <= start:
            return np.zeros(0, dtype=np.int64)
        parts = []
        for b in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            lo, hi = max(start, b * BLOCK), min(stop, (b + 1) * BLOCK)
            parts.append(self.block(b)[lo - b * BLOCK : hi - b * BLOCK])
        return np.concatenate(parts)

    def counts_before(self, position: int) -> np.ndarray:
        """How many slots in [0, position) went to each source: shape (num_sources,)."""
        if self.num_sources == 1:
            return np.array([position], dtype=np.int64)
        b = position // BLOCK
        while len(self._prefix) <= b:
            k = len(self._prefix) - 1
            self._prefix.append(self._prefix[k] + np.bincount(self.block(k), minlength=self.num_sources))
        partial = self.block(b)[: position - b * BLOCK]
        return self._prefix[b] + np.bincount(partial, minlength=self.num_sources)

    def assign(self, start: int, stop: int) -> list[tuple[int, int]]:
        """(source, position in that source's stream) for every slot in [start, stop)."""
        counts = self.counts_before(start).copy()
        out = []
        for source in self.sources(start, stop).tolist():
            out.append((source, int(counts[source])))
            counts[source] += 1
        return out
