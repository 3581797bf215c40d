"""Decoupled token rows: a frozen base vocabulary plus a few trainable rows for added tokens.

Flamingo adds ``<image>`` and ``<|endofchunk|>`` (and a pad token if the tokenizer has none) to a
frozen LM. Instead of unfreezing the whole embedding matrix and masking gradients, the base matrix
stays frozen and untouched, and the added ids ``num_base .. num_base + num_new - 1`` read their own
small trainable matrix. The output head gets the matching extra logit columns: the same trainable
rows when the LM ties input and output embeddings, its own trainable rows otherwise.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _init_like(rows: Tensor, num_new: int) -> Tensor:
    # New rows drawn around the existing rows' mean with their per-channel spread.
    rows = rows.detach().float()
    mean, std = rows.mean(dim=0), rows.std(dim=0)
    return (mean + std * torch.randn(num_new, rows.shape[1], device=rows.device)).to(rows.dtype)


class DecoupledEmbedding(nn.Module):
    """Embedding of ids ``< num_base`` by the frozen ``base`` and of ``num_base .. +num_new`` by ``extra``.

    ``base`` may have more rows than ``num_base`` (a padded vocabulary); those rows are unused.
    A base embedding with an ``embed_scale`` (scaled word embeddings) scales the new rows alike.
    """

    def __init__(self, base: nn.Embedding, num_base: int, num_new: int):
        super().__init__()
        if base.weight.shape[0] < num_base:
            raise ValueError(
                f"the LM's embedding has {base.weight.shape[0]} rows but the tokenizer has {num_base} tokens"
            )
        if num_new < 1:
            raise ValueError(f"num_new must be >= 1, got {num_new}")
        self.base = base
        self.num_base = num_base
        self.num_new = num_new
        self.extra = nn.Parameter(_init_like(base.weight[:num_base], num_new))  # (num_new, D)

    @property
    def num_embeddings(self) -> int:
        return self.num_base + self.num_new

    @property
    def embedding_dim(self) -> int:
        return self.extra.shape[1]

    def forward(self, ids: Tensor) -> Tensor:
        """ids: (...,) int -> (..., D)."""
        if ids.numel() and (int(ids.max()) >= self.num_embeddings or int(ids.min()) < 0):
            raise IndexError(
                f"token ids must be in [0, {self.num_embeddings}), got range [{int(ids.min())}, {int(ids.max())}]"
            )
        is_new = ids >= self.num_base
        if not bool(is_new.any()):
            return self.base(ids)
        out = self.base(torch.where(is_new, torch.zeros_like(ids), ids))
        new = F.embedding((ids - self.num_base).clamp(min=0), self.extra)
        scale = getattr(self.base, "embed_scale", None)
        if scale is not None:
            new = new * scale
        return torch.where(is_new[..., None], new.to(out.dtype), out)


class DecoupledLMHead(nn.Module):
    """Logits over ``num_base`` base tokens from the frozen ``base`` head plus the added tokens' columns.

    ``tied_embedding``: the LM ties its head to its input embedding, so the added columns use the
    same trainable rows as the input side (``tied_embedding.extra``); otherwise they get their own.
    """

    def __init__(
        self, base: nn.Linear, num_base: int, num_new: int, tied_embedding: Optional[DecoupledEmbedding] = None
    ):
        super().__init__()
        if base.weight.shape[0] < num_base:
            raise ValueError(
                f"the LM's output head has {base.weight.shape[0]} rows but the tokenizer has {num_base} tokens"
            )
        self.base = base
        self.num_base = num_base
        self.num_new = num_new
        self.tied = tied_embedding is not None
        if tied_embedding is not None:
            self.extra = tied_embedding.extra  # the same Parameter: shared, not copied
        else:
            self.extra = nn.Parameter(_init_like(base.weight[:num_base], num_new))  # (num_new, D)
        if base.bias is not None:
            self.extra_bias: Optional[nn.Parameter] = nn.Parameter(base.bias.detach()[:num_base].mean().repeat(num_new))
        else:
            self.extra_bias = None
        self._positions: Optional[Tensor] = None

    @contextmanager
    def only_positions(self, positions: Tensor):
        """Within the block, a call on hidden states (B, T, D) returns logits (1, N, V) of only the ``N`` positions
        where the bool mask ``positions`` (B, T) is True (row-major order): the loss needs no others, and the head
        over a large vocabulary is a large part of a training step. Calls on other shapes are unaffected."""
        previous, self._positions = self._positions, positions
        try:
            yield
        finally:
            self._positions = previous

    @property
    def out_features(self) -> int:
        return self.num_base + self.num_new

    @property
    def weight(self) -> Tensor:
        """The full (num_base + num_new, D) output matrix (a fresh tensor, for inspection/export)."""
        return torch.cat([self.base.weight[: self.num_base], self.extra], dim=0)

    def forward(self, h: Tensor) -> Tensor:
        """h: (..., D) -> logits (..., num_base + num_new)."""
        positions = self._positions
        if positions is not None and h.dim() == 3 and h.shape[:2] == positions.shape:
            h = h[positions].unsqueeze(0)
        logits = self.base(h)
        if logits.shape[-1] != self.num_base:
            logits = logits[..., : self.num_base]
        new = F.linear(h, self.extra.to(h.dtype), None if self.extra_bias is None else self.extra_bias.to(h.dtype))
        return torch.cat([logits, new.to(logits.dtype)], dim=-1)
