"""Perceiver AR (Hawthorne et al. 2022): autoregressive modelling of long sequences through a latent window.

The last ``N`` positions of a length-``L`` sequence are the latents. One causal cross-attention lets latent
``i`` (position ``L - N + i``) attend to every position up to and including its own: the whole prefix plus
latents ``0..i``. A stack of causal self-attention layers then runs on the ``N`` latents only, so the cost is
``O(L N + N^2)`` per step instead of ``O(L^2)``. Each latent predicts the token after it.

Positions are rotary (RoPE on queries and keys, relative by construction) or learned absolute embeddings.

Generation keeps a key/value cache: the cross-attention keys/values of every position in the window and each
self-attention layer's keys/values of the latent positions. A new token is appended as a new latent. This is
exact as long as the latent window only *grows*: the old latents and the prefix are unchanged. When the
latents would exceed ``num_latents``, or the window ``max_seq_len``, :meth:`PerceiverAR.generate` restarts the
window (see there) and recomputes it, so cached and uncached generation produce the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import CrossAttentionLayer, QKTransform, SelfAttentionLayer, key_padding_to_attn_mask
from .config import _check_choice, _check_positive, _check_prob, _Config

PositionEncoding = Literal["rotary", "learned"]


@dataclass
class PerceiverARConfig(_Config):
    """Perceiver AR: ``max_seq_len`` input positions of which the last ``num_latents`` are latents.

    ``num_self_attention_layers`` causal self-attention layers run on the latents after the causal
    cross-attention. ``position_encoding="rotary"`` rotates the first ``rotary_dim`` channels of every
    query/key head (``None`` = the whole head); ``"learned"`` adds an embedding per absolute position.
    ``cross_attention_dropout`` is the fraction of *prefix* positions dropped from the cross-attention in
    training (the paper's regulariser, which also saves compute); it is never applied in eval mode.
    """

    vocab_size: int
    max_seq_len: int
    num_latents: int
    num_channels: int = 512
    num_heads: int = 8
    num_self_attention_layers: int = 6
    cross_attention_widening_factor: int = 4
    self_attention_widening_factor: int = 4
    position_encoding: PositionEncoding = "rotary"
    rotary_dim: Optional[int] = None
    rotary_base: float = 10000.0
    cross_attention_dropout: float = 0.0
    attention_dropout: float = 0.0
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = False
    layer_norm_eps: float = 1e-5
    init_scale: float = 0.02

    def __post_init__(self) -> None:
        _check_positive(
            self,
            "vocab_size",
            "max_seq_len",
            "num_latents",
            "num_channels",
            "num_heads",
            "num_self_attention_layers",
            "cross_attention_widening_factor",
            "self_attention_widening_factor",
        )
        _check_choice(self, "position_encoding", ("rotary", "learned"))
        _check_prob(self, "cross_attention_dropout", "attention_dropout", "dropout")
        if self.num_latents > self.max_seq_len:
            raise ValueError(
                f"PerceiverARConfig.num_latents={self.num_latents} must be <= max_seq_len={self.max_seq_len}"
            )
        if self.num_channels % self.num_heads != 0:
            raise ValueError(
                f"PerceiverARConfig.num_channels={self.num_channels} is not divisible by num_heads={self.num_heads}"
            )
        if self.rotary_dim is not None:
            if self.position_encoding != "rotary":
                raise ValueError(
                    f"PerceiverARConfig.rotary_dim={self.rotary_dim} is set but position_encoding="
                    f"{self.position_encoding!r}; use position_encoding='rotary' or rotary_dim=None"
                )
            if not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
                raise ValueError(
                    f"PerceiverARConfig.rotary_dim={self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]"
                )
        if self.rotary_base <= 1.0:
            raise ValueError(f"PerceiverARConfig.rotary_base must be > 1, got {self.rotary_base!r}")
        if self.init_scale <= 0.0:
            raise ValueError(f"PerceiverARConfig.init_scale must be > 0, got {self.init_scale!r}")

    @property
    def head_dim(self) -> int:
        return self.num_channels // self.num_heads


class RotaryPositionEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) of the first ``rotary_dim`` channels of each head.

    Channel pairs ``(j, j + rotary_dim/2)`` are rotated by ``position * base^(-2j/rotary_dim)``, so a
    query-key dot product depends only on the positions' difference.
    """

    def __init__(self, rotary_dim: int, base: float = 10000.0):
        super().__init__()
        if rotary_dim < 2 or rotary_dim % 2 != 0:
            raise ValueError(f"rotary_dim must be an even number >= 2, got {rotary_dim}")
        self.rotary_dim = rotary_dim
        inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def angles(self, positions: Tensor) -> Tensor:
        """(B, N) integer positions -> (B, 1, N, rotary_dim) rotation angles (broadcast over heads)."""
        f = positions.to(torch.float32)[..., None] * self.inv_freq  # (B, N, rotary_dim / 2)
        return torch.cat([f, f], dim=-1)[:, None]

    def rotate(self, x: Tensor, angles: Tensor) -> Tensor:
        """x: (B, H, N, D) with D >= rotary_dim, angles from :meth:`angles` -> rotated x."""
        x_rot, x_pass = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated_half = torch.cat([-x2, x1], dim=-1)
        out = x_rot * angles.cos().to(x.dtype) + rotated_half * angles.sin().to(x.dtype)
        return torch.cat([out, x_pass], dim=-1)

    def qk_transform(self, q_positions: Tensor, k_positions: Tensor) -> QKTransform:
        """A ``qk_transform`` for :class:`~perceiver.attention.MultiHeadAttention` at the given positions."""
        q_angles, k_angles = self.angles(q_positions), self.angles(k_positions)
        return lambda q, k: (self.rotate(q, q_angles), self.rotate(k, k_angles))


@dataclass
class PerceiverARCache:
    """Keys/values of one generation window (all tensors have batch first).

    ``cross_kv``: cross-attention keys/values of every window position ``(B, H, L, D)``; ``self_kv``: per
    self-attention layer, keys/values of the latent positions ``(B, H, n, D)``; ``pad_mask``: ``(B, L)``,
    True = real token, or None; ``next_position``: ``(B,)`` position id the next token will get.
    """

    cross_kv: tuple[Tensor, Tensor]
    self_kv: list[tuple[Tensor, Tensor]]
    pad_mask: Optional[Tensor]
    next_position: Tensor

    @property
    def seq_len(self) -> int:
        return self.cross_kv[0].shape[2]

    @property
    def num_latents(self) -> int:
        return self.self_kv[0][0].shape[2]


class PerceiverAR(nn.Module):
    """Token ids ``(B, L)`` -> next-token logits ``(B, n, vocab)`` for the last ``n`` (latent) positions."""

    def __init__(self, config: PerceiverARConfig):
        super().__init__()
        self.config = config
        c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.num_channels)
        if c.position_encoding == "learned":
            self.position_embedding: Optional[nn.Embedding] = nn.Embedding(c.max_seq_len, c.num_channels)
            self.rotary: Optional[RotaryPositionEmbedding] = None
        else:
            self.position_embedding = None
            self.rotary = RotaryPositionEmbedding(c.rotary_dim or c.head_dim, c.rotary_base)
        self.cross_attention = CrossAttentionLayer(
            c.num_channels,
            c.num_channels,
            num_heads=c.num_heads,
            widening_factor=c.cross_attention_widening_factor,
            bias=c.bias,
            attention_dropout=c.attention_dropout,
            dropout=c.dropout,
            layer_norm_eps=c.layer_norm_eps,
        )
        self.self_attention = nn.ModuleList(
            [
                SelfAttentionLayer(
                    c.num_channels,
                    num_heads=c.num_heads,
                    widening_factor=c.self_attention_widening_factor,
                    bias=c.bias,
                    attention_dropout=c.attention_dropout,
                    dropout=c.dropout,
                    layer_norm_eps=c.layer_norm_eps,
                    causal=True,
                )
                for _ in range(c.num_self_attention_layers)
            ]
        )
        self.norm = nn.LayerNorm(c.num_channels, eps=c.layer_norm_eps)
        self.head = nn.Linear(c.num_channels, c.vocab_size, bias=not c.tie_embeddings)
        self.apply(self._init_weights)
        if c.tie_embeddings:
            self.head.weight = self.token_embedding.weight

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.init_scale)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------- helpers

    def _check_ids(self, input_ids: Tensor, name: str = "input_ids") -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{name} must be an integer tensor (batch, length), got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"{name} must lie in [0, vocab_size={self.config.vocab_size}), "
                f"got range [{int(input_ids.min())}, {int(input_ids.max())}]"
            )

    @staticmethod
    def _positions(pad_mask: Optional[Tensor], batch: int, length: int, device) -> Tensor:
        """(B, L) position ids; with left padding the first real token of every row gets position 0."""
        if pad_mask is None:
            return torch.arange(length, device=device).expand(batch, -1)
        return (pad_mask.long().cumsum(dim=1) - 1).clamp(min=0)

    def _embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.token_embedding(input_ids)  # (B, L, C)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        return x

    def _rope(self, q_positions: Tensor, k_positions: Tensor) -> Optional[QKTransform]:
        return None if self.rotary is None else self.rotary.qk_transform(q_positions, k_positions)

    def _drop_prefix(
        self, x: Tensor, positions: Tensor, pad_mask: Optional[Tensor], num_latents: int
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Keep a random subset (same size for every row) of the prefix positions, in order."""
        b, length, _ = x.shape
        prefix_len = length - num_latents
        keep = round(prefix_len * (1.0 - self.config.cross_attention_dropout))
        if prefix_len == 0 or keep == prefix_len:
            return x, positions, pad_mask
        idx = torch.rand(b, prefix_len, device=x.device).argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, keep)
        idx = torch.cat([idx, torch.arange(prefix_len, length, device=x.device).expand(b, -1)], dim=1)
        x = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        positions = positions.gather(1, idx)
        pad_mask = None if pad_mask is None else pad_mask.gather(1, idx)
        return x, positions, pad_mask

    # ----------------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: Tensor,
        pad_mask: Optional[Tensor] = None,
        num_latents: Optional[int] = None,
        return_cache: bool = False,
    ):
        """input_ids: (B, L) with L <= max_seq_len; pad_mask: (B, L), True = token (left padding only).

        ``num_latents`` (default ``config.num_latents``, at most that and ``L``) sets how many trailing
        positions are latents. Returns logits ``(B, n, vocab)`` where ``logits[:, i]`` predicts the token
        after position ``L - n + i``; with ``return_cache`` also a :class:`PerceiverARCache` for :meth:`extend`.
        """
        self._check_ids(input_ids)
        b, length = input_ids.shape
        c = self.config
        if length > c.max_seq_len:
            raise ValueError(f"input length {length} exceeds max_seq_len={c.max_seq_len}")
        n = c.num_latents if num_latents is None else num_latents
        if not 1 <= n <= min(length, c.num_latents):
            raise ValueError(
                f"num_latents={n} must be in [1, min(input length {length}, config.num_latents {c.num_latents})]"
            )
        if pad_mask is not None and tuple(pad_mask.shape) != (b, length):
            raise ValueError(f"pad_mask must be (batch, length) = {(b, length)}, got {tuple(pad_mask.shape)}")
        pad_mask = None if pad_mask is None else pad_mask.bool()

        positions = self._positions(pad_mask, b, length, input_ids.device)  # (B, L)
        x = self._embed(input_ids, positions)  # (B, L, C)
        x_latent, latent_pos = x[:, length - n :], positions[:, length - n :]  # (B, n, C), (B, n)
        latent_mask = None if pad_mask is None else pad_mask[:, length - n :]

        kv_x, kv_pos, kv_mask = x, positions, pad_mask
        if self.training and not return_cache and c.cross_attention_dropout > 0.0:
            kv_x, kv_pos, kv_mask = self._drop_prefix(x, positions, pad_mask, n)

        h = self.cross_attention(
            x_latent,
            kv_x,
            key_padding_to_attn_mask(kv_mask),
            is_causal=True,
            return_kv=return_cache,
            qk_transform=self._rope(latent_pos, kv_pos),
        )
        h, cross_kv = h if return_cache else (h, None)
        self_mask = key_padding_to_attn_mask(latent_mask)  # (B, 1, 1, n) or None
        rope = self._rope(latent_pos, latent_pos)
        self_kv = []
        for layer in self.self_attention:
            h = layer(h, self_mask, return_kv=return_cache, qk_transform=rope)
            if return_cache:
                h, kv = h
                self_kv.append(kv)
        logits = self.head(self.norm(h))  # (B, n, V)
        if not return_cache:
            return logits
        next_position = torch.full((b,), length, device=input_ids.device) if pad_mask is None else pad_mask.sum(1)
        return logits, PerceiverARCache(cross_kv, self_kv, pad_mask, next_position)

    def extend(self, input_ids: Tensor, cache: PerceiverARCache) -> tuple[Tensor, PerceiverARCache]:
        """Append tokens ``(B, T)`` to a cached window as ``T`` new latents -> (logits (B, T, vocab), new cache).

        Exactly what :meth:`forward` gives for the whole window with ``T`` more latents. Needs
        ``cache.seq_len + T <= max_seq_len`` and ``cache.num_latents + T <= num_latents``.
        """
        self._check_ids(input_ids)
        c = self.config
        b, t = input_ids.shape
        if b != cache.cross_kv[0].shape[0]:
            raise ValueError(f"input_ids batch {b} does not match the cache batch {cache.cross_kv[0].shape[0]}")
        if cache.seq_len + t > c.max_seq_len or cache.num_latents + t > c.num_latents:
            raise ValueError(
                f"cannot extend a window of {cache.seq_len} positions / {cache.num_latents} latents by {t}: "
                f"limits are max_seq_len={c.max_seq_len}, num_latents={c.num_latents}; recompute the window instead"
            )
        positions = cache.next_position[:, None] + torch.arange(t, device=input_ids.device)  # (B, T)
        x = self._embed(input_ids, positions)  # (B, T, C)
        pad_mask = cache.pad_mask
        if pad_mask is not None:
            pad_mask = torch.cat([pad_mask, pad_mask.new_ones(b, t)], dim=1)  # (B, L + T)
        rope = self._rope(positions, positions)
        h, cross_kv = self.cross_attention(
            x,
            x,
            key_padding_to_attn_mask(pad_mask),
            is_causal=True,
            kv_cache=cache.cross_kv,
            return_kv=True,
            qk_transform=rope,
        )
        n = cache.num_latents + t
        self_mask = None if pad_mask is None else key_padding_to_attn_mask(pad_mask[:, -n:])
        self_kv = []
        for layer, kv in zip(self.self_attention, cache.self_kv):
            h, kv = layer(h, self_mask, kv_cache=kv, return_kv=True, qk_transform=rope)
            self_kv.append(kv)
        logits = self.head(self.norm(h))  # (B, T, V)
        return logits, PerceiverARCache(cross_kv, self_kv, pad_mask, cache.next_position + t)

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats) of ``tokens`` (B, L + 1): inputs ``[:, :-1]``, latent targets."""
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be (batch, length + 1) with length >= 1, got {tuple(tokens.shape)}")
        inputs = tokens[:, :-1]
        n = min(self.config.num_latents, inputs.shape[1])
        logits = self(inputs, num_latents=n)  # (B, n, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, -n:].flatten())

    # -------------------------------------------------------------------------------------- generation

    def _window(self, length: int, num_latents: int) -> tuple[int, int]:
        """(start, n) of a restarted window over a sequence of ``length`` tokens.

        The window leaves room for the latents to grow from ``num_latents`` to ``config.num_latents``
        within ``max_seq_len``; so the first latent always sees ``max_seq_len - config.num_latents + 1``
        tokens (once the sequence is that long), as the first latent does in training.
        """
        room = self.config.num_latents - num_latents
        start = max(0, length - (self.config.max_seq_len - room))
        return start, min(num_latents, length - start)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        pad_mask: Optional[Tensor] = None,
        num_latents: int = 1,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Continue ``input_ids`` (B, P) [left-padded, ``pad_mask`` True = token] by ``max_new_tokens`` -> (B, P + new).

        ``temperature=0`` is greedy decoding; otherwise tokens are sampled from the softmax of
        ``logits / temperature`` restricted by ``top_k`` and/or ``top_p`` (nucleus), with ``generator``.

        Window schedule (identical with and without cache): the window starts with ``num_latents`` latents
        (fewer if the prompt is shorter); each new token becomes one more latent while the latent count stays
        <= ``config.num_latents`` and the window <= ``max_seq_len``. When either would be exceeded the window
        restarts over the most recent tokens with ``num_latents`` latents (see :meth:`_window`) and is
        recomputed from scratch. With the default ``num_latents=1`` one full recompute serves
        ``config.num_latents`` tokens; ``num_latents=config.num_latents`` is a sliding window that recomputes
        every step. With ``use_cache=False`` every step recomputes the same window in full.
        """
        self._check_ids(input_ids)
        c = self.config
        b, p = input_ids.shape
        if p < 1:
            raise ValueError("input_ids must hold at least one token to condition on")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 1 <= num_latents <= c.num_latents:
            raise ValueError(f"num_latents={num_latents} must be in [1, config.num_latents={c.num_latents}]")
        _check_sampling(temperature, top_k, top_p)
        if pad_mask is not None:
            if tuple(pad_mask.shape) != (b, p):
                raise ValueError(f"pad_mask must be (batch, length) = {(b, p)}, got {tuple(pad_mask.shape)}")
            pad_mask = pad_mask.bool()
            if not bool(pad_mask[:, -1].all()):
                raise ValueError(
                    "pad_mask must describe left padding: the last prompt position of every row must be a token"
                )

        was_training = self.training
        self.eval()
        try:
            seq, mask = input_ids, pad_mask

            def window(start: int) -> tuple[Tensor, Optional[Tensor]]:
                return seq[:, start:], None if mask is None else mask[:, start:]

            start, n = self._window(p, num_latents)
            out = self(*window(start), num_latents=n, return_cache=use_cache)
            logits, cache = out if use_cache else (out, None)
            for step in range(max_new_tokens):
                token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
                seq = torch.cat([seq, token[:, None]], dim=1)
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
                if step == max_new_tokens - 1:
                    break
                length = seq.shape[1]
                if n + 1 <= c.num_latents and length - start <= c.max_seq_len:
                    n += 1
                    if cache is not None:
                        logits, cache = self.extend(token[:, None], cache)
                    else:
                        logits = self(*window(start), num_latents=n)
                else:
                    start, n = self._window(length, num_latents)
                    out = self(*window(start), num_latents=n, return_cache=use_cache)
                    logits, cache = out if use_cache else (out, None)
            return seq
        finally:
            self.train(was_training)


def _check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept). (..., V)."""
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to >= p. (..., V)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of all more likely tokens
    remove_sorted = mass_before >= p  # the most likely token always has mass_before 0 < p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """logits (B, V) -> token ids (B,): argmax if ``temperature == 0``, else a filtered sample."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
