"""Multi-head attention and the Perceiver attention layers.

Mask convention (the only one in this project): a boolean tensor where ``True`` means
"this query may attend to this key". Masks broadcast to ``(B, heads, N_q, N_kv)``; the usual
shapes are a key padding mask ``(B, N_kv)`` (see :func:`key_padding_to_attn_mask`) or a full
``(B, N_q, N_kv)`` mask. A query row whose keys are all masked out returns zeros, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GeluApproximate = Literal["none", "tanh"]
# (q (B, H, N_q, D), k (B, H, N_kv, D)) -> (q, k), e.g. rotary position embedding; see MultiHeadAttention.forward
QKTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def key_padding_to_attn_mask(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """(B, N_kv) bool, True = valid key  ->  (B, 1, 1, N_kv) attention mask."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dim() != 2:
        raise ValueError(f"key padding mask must be (batch, num_keys), got shape {tuple(key_padding_mask.shape)}")
    return key_padding_mask.bool()[:, None, None, :]


def _as_4d_mask(mask: Tensor) -> Tensor:
    # (N_q, N_kv) | (B, N_q, N_kv) | (B, H, N_q, N_kv) -> 4-d boolean mask
    if mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be boolean (True = may attend), got dtype {mask.dtype}")
    if mask.dim() == 2:
        return mask[None, None]
    if mask.dim() == 3:
        return mask[:, None]
    if mask.dim() == 4:
        return mask
    raise ValueError(f"attention mask must have 2, 3 or 4 dims, got shape {tuple(mask.shape)}")


class MultiHeadAttention(nn.Module):
    """Multi-head attention on ``scaled_dot_product_attention``.

    ``qk_channels`` is the total query/key width and ``v_channels`` the total value width, each
    split over ``num_heads``; the output projection maps ``v_channels`` to ``output_channels``.
    Scores are scaled by ``1/sqrt(qk_channels / num_heads)`` as in the official Perceiver code.
    """

    def __init__(
        self,
        num_heads: int,
        num_q_input_channels: int,
        num_kv_input_channels: int,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        output_channels: Optional[int] = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        attention_dropout: float = 0.0,
        qk_layernorm: bool = False,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        qk_channels = num_q_input_channels if qk_channels is None else qk_channels
        v_channels = qk_channels if v_channels is None else v_channels
        output_channels = num_q_input_channels if output_channels is None else output_channels
        for name, value in (("qk_channels", qk_channels), ("v_channels", v_channels)):
            if value % num_heads != 0:
                raise ValueError(f"{name}={value} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qk_channels = qk_channels
        self.v_channels = v_channels
        self.dropout_p = attention_dropout
        self.q_proj = nn.Linear(num_q_input_channels, qk_channels, bias=qkv_bias)
        self.k_proj = nn.Linear(num_kv_input_channels, qk_channels, bias=qkv_bias)
        self.v_proj = nn.Linear(num_kv_input_channels, v_channels, bias=qkv_bias)
        self.o_proj = nn.Linear(v_channels, output_channels, bias=out_bias)
        if qk_layernorm:
            head_dim = qk_channels // num_heads
            self.q_norm: nn.Module = nn.LayerNorm(head_dim, eps=layer_norm_eps)
            self.k_norm: nn.Module = nn.LayerNorm(head_dim, eps=layer_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def _heads(self, x: Tensor) -> Tensor:
        # (B, N, H*D) -> (B, H, N, D)
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, x.shape[-1] // self.num_heads).transpose(1, 2)  # explicit: N may be 0

    def forward(
        self,
        x_q: Tensor,
        x_kv: Tensor,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        kv_cache: Optional[tuple[Tensor, Tensor]] = None,
        return_kv: bool = False,
        qk_transform: Optional[QKTransform] = None,
    ):
        """x_q: (B, N_q, C_q), x_kv: (B, N_kv, C_kv), attn_mask: bool, broadcastable to (B, H, N_q, N_kv).

        ``kv_cache`` holds earlier keys/values ``(B, H, N_past, D)`` that are prepended to the ones
        computed from ``x_kv``; with ``return_kv`` the full keys/values are returned too.
        ``is_causal`` aligns the causal diagonal to the *end* of the keys (query i sees key
        j <= i + N_kv_total - N_q), which is what cached decoding needs.
        ``qk_transform(q, k)`` (e.g. rotary embedding) is applied to the queries and the *new* keys
        before the cache is prepended, so cached keys are stored already transformed.
        """
        q = self.q_norm(self._heads(self.q_proj(x_q)))  # (B, H, N_q, Dqk)
        k = self.k_norm(self._heads(self.k_proj(x_kv)))  # (B, H, N_kv, Dqk)
        v = self._heads(self.v_proj(x_kv))  # (B, H, N_kv, Dv)
        if qk_transform is not None:
            q, k = qk_transform(q, k)
        if kv_cache is not None:
            if k.shape[2] == 0:  # nothing new (e.g. an image's cached keys/values): no copy of the cache
                k, v = kv_cache
            else:
                k = torch.cat([kv_cache[0], k], dim=2)
                v = torch.cat([kv_cache[1], v], dim=2)
        out = attend(q, k, v, attn_mask, is_causal, self.dropout_p if self.training else 0.0)
        out = self.o_proj(out.transpose(1, 2).flatten(2))  # (B, N_q, C_out)
        if return_kv:
            return out, (k, v)
        return out


def causal_mask(num_q: int, num_kv: int, device=None) -> Tensor:
    """(N_q, N_kv) bool mask, the diagonal aligned to the last key (query i sees keys <= i + N_kv - N_q)."""
    offset = num_kv - num_q
    q_idx = torch.arange(num_q, device=device)[:, None]
    kv_idx = torch.arange(num_kv, device=device)[None, :]
    return kv_idx <= q_idx + offset


# In bf16/fp16 on CPU, attention whose score matrix has at most this many elements (B * H * N_q * N_kv) runs as two
# matrix multiplies and a softmax: PyTorch's CPU flash-attention kernel takes about twice as long there (fwd+bwd,
# torch 2.14: 256 latents x 256, 8 heads: 20.9 vs 9.5 ms; 256 latents x 16,384 inputs: 178 vs 108 ms), while in fp32
# it is the faster one. A Perceiver's scores are N_latents x M, small next to its inputs; long causal
# self-attention (Perceiver AR, a language model) stays on SDPA, which never materialises them.
EXPLICIT_ATTENTION_MAX_SCORES = 2**25


def _use_explicit(q: Tensor, k: Tensor, v: Tensor) -> bool:
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16) or not q.dtype == k.dtype == v.dtype:
        return False
    batch_heads = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]).numel()
    return batch_heads * q.shape[-2] * k.shape[-2] <= EXPLICIT_ATTENTION_MAX_SCORES


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float) -> Tensor:
    # SDPA's math in q's dtype (no autocast: the softmax stays in bf16 storage, computed in fp32 by the kernel)
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        return torch.matmul(probs, v)


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool, dropout_p: float) -> Tensor:
    """SDPA with the project's mask convention; rows with no visible key give zeros."""
    explicit = _use_explicit(q, k, v)
    if is_causal and attn_mask is None and q.shape[-2] == k.shape[-2] and not explicit:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if is_causal:
        c = causal_mask(q.shape[-2], k.shape[-2], q.device)
        attn_mask = c if attn_mask is None else _as_4d_mask(attn_mask) & c
    if attn_mask is None:
        if explicit:
            return _explicit_attention(q, k, v, None, dropout_p)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    mask = _as_4d_mask(attn_mask)
    has_key = mask.any(dim=-1, keepdim=True)  # (B|1, H|1, N_q, 1)
    # Fully-masked rows would give NaN: let them see every key, then zero them.
    safe = mask | ~has_key
    if explicit:
        out = _explicit_attention(q, k, v, safe, dropout_p)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, dropout_p=dropout_p)
    return out * has_key.to(out.dtype)


class MLP(nn.Sequential):
    """Linear(C -> widening*C) -> GELU -> Linear(-> C_out)."""

    def __init__(
        self,
        num_channels: int,
        widening_factor: int = 4,
        output_channels: Optional[int] = None,
        bias: bool = True,
        gelu_approximate: GeluApproximate = "none",
        dropout: float = 0.0,
    ):
        hidden = widening_factor * num_channels
        super().__init__(
            nn.Linear(num_channels, hidden, bias=bias),
            nn.GELU(approximate=gelu_approximate),
            nn.Linear(hidden, num_channels if output_channels is None else output_channels, bias=bias),
            nn.Dropout(dropout),
        )


class CrossAttentionLayer(nn.Module):
    """Pre-LN cross-attention block of Perceiver / Perceiver IO.

    ``x = attn(LN(q), LN(kv)) [+ q if use_query_residual]``;  ``x = x + MLP(LN(x))``.
    """

    def __init__(
        self,
        num_q_input_channels: int,
        num_kv_input_channels: int,
        num_heads: int = 1,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        shape_for_attention: Literal["kv", "q"] = "kv",
        widening_factor: int = 1,
        use_query_residual: bool = True,
        output_channels: Optional[int] = None,
        bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        qk_layernorm: bool = False,
        gelu_approximate: GeluApproximate = "none",
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        if shape_for_attention not in ("kv", "q"):
            raise ValueError(f"shape_for_attention must be 'kv' or 'q', got {shape_for_attention!r}")
        if qk_channels is None:
            qk_channels = num_kv_input_channels if shape_for_attention == "kv" else num_q_input_channels
        output_channels = num_q_input_channels if output_channels is None else output_channels
        if use_query_residual and output_channels != num_q_input_channels:
            raise ValueError(
                f"use_query_residual needs output_channels ({output_channels}) == "
                f"query channels ({num_q_input_channels})"
            )
        self.use_query_residual = use_query_residual
        self.q_norm = nn.LayerNorm(num_q_input_channels, eps=layer_norm_eps)
        self.kv_norm = nn.LayerNorm(num_kv_input_channels, eps=layer_norm_eps)
        self.attention = MultiHeadAttention(
            num_heads,
            num_q_input_channels,
            num_kv_input_channels,
            qk_channels=qk_channels,
            v_channels=v_channels,
            output_channels=output_channels,
            qkv_bias=bias,
            out_bias=bias,
            attention_dropout=attention_dropout,
            qk_layernorm=qk_layernorm,
            layer_norm_eps=layer_norm_eps,
        )
        self.dropout = nn.Dropout(dropout)
        self.mlp_norm = nn.LayerNorm(output_channels, eps=layer_norm_eps)
        self.mlp = MLP(output_channels, widening_factor, bias=bias, gelu_approximate=gelu_approximate, dropout=dropout)

    def forward(
        self,
        x_q: Tensor,
        x_kv: Tensor,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        kv_cache: Optional[tuple[Tensor, Tensor]] = None,
        return_kv: bool = False,
        qk_transform: Optional[QKTransform] = None,
    ):
        """x_q: (B, N_q, C_q), x_kv: (B, N_kv, C_kv) -> (B, N_q, C_out) [, (keys, values) if return_kv].

        ``is_causal``, ``kv_cache``, ``return_kv`` and ``qk_transform`` are passed to the attention
        (see :meth:`MultiHeadAttention.forward`); they serve causal models such as Perceiver AR.
        """
        a = self.attention(
            self.q_norm(x_q), self.kv_norm(x_kv), attn_mask, is_causal, kv_cache, return_kv, qk_transform
        )
        a, kv = a if return_kv else (a, None)
        x = self.dropout(a)
        if self.use_query_residual:
            x = x + x_q
        x = x + self.mlp(self.mlp_norm(x))
        return (x, kv) if return_kv else x


class SelfAttentionLayer(nn.Module):
    """Pre-LN transformer block: ``x = x + attn(LN(x))``; ``x = x + MLP(LN(x))``."""

    def __init__(
        self,
        num_channels: int,
        num_heads: int = 8,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        widening_factor: int = 4,
        bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        qk_layernorm: bool = False,
        gelu_approximate: GeluApproximate = "none",
        layer_norm_eps: float = 1e-5,
        causal: bool = False,
    ):
        super().__init__()
        self.causal = causal
        self.norm = nn.LayerNorm(num_channels, eps=layer_norm_eps)
        self.attention = MultiHeadAttention(
            num_heads,
            num_channels,
            num_channels,
            qk_channels=qk_channels,
            v_channels=v_channels,
            output_channels=num_channels,
            qkv_bias=bias,
            out_bias=bias,
            attention_dropout=attention_dropout,
            qk_layernorm=qk_layernorm,
            layer_norm_eps=layer_norm_eps,
        )
        self.dropout = nn.Dropout(dropout)
        self.mlp_norm = nn.LayerNorm(num_channels, eps=layer_norm_eps)
        self.mlp = MLP(num_channels, widening_factor, bias=bias, gelu_approximate=gelu_approximate, dropout=dropout)

    def forward(
        self,
        x: Tensor,
        attn_mask: Optional[Tensor] = None,
        kv_cache: Optional[tuple[Tensor, Tensor]] = None,
        return_kv: bool = False,
        qk_transform: Optional[QKTransform] = None,
    ):
        """x: (B, N, C) -> (B, N, C) [, (keys, values) if return_kv].

        With ``kv_cache`` (keys/values of earlier positions) ``x`` holds only the new positions, as in
        cached decoding; ``qk_transform`` is passed to the attention (e.g. rotary embedding).
        """
        h = self.norm(x)
        a = self.attention(h, h, attn_mask, self.causal, kv_cache, return_kv, qk_transform)
        a, kv = a if return_kv else (a, None)
        x = x + self.dropout(a)
        x = x + self.mlp(self.mlp_norm(x))
        return (x, kv) if return_kv else x
