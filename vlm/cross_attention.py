"""Gated cross-attention dense block (Flamingo) and the text-to-media attention mask."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from perceiver.attention import MLP, MultiHeadAttention


def media_attention_mask(
    text_time: Tensor, media_mask: Tensor, num_latents: int, only_attend_immediate_media: bool = True
) -> Tensor:
    """Which media latents each text token may attend to.

    ``text_time`` (B, L): for each token, how many ``<image>`` tokens occur up to and including it
    (0 = before the first image). Image ``j`` (1-based) is visible to a token with time ``t`` when
    ``t == j`` (Flamingo's rule: only the most recent image) or ``t >= j`` (all previous images),
    and only if it is present in ``media_mask`` (B, T_img). Tokens with time 0 see nothing.
    Returns a bool mask (B, 1, L, T_img * num_latents), True = may attend.
    """
    media_time = torch.arange(1, media_mask.shape[1] + 1, device=text_time.device)  # (T_img,)
    t = text_time[:, :, None]  # (B, L, 1)
    visible = (t == media_time) if only_attend_immediate_media else (t >= media_time)  # (B, L, T_img)
    visible = visible & media_mask[:, None, :]
    return visible.repeat_interleave(num_latents, dim=-1)[:, None]  # (B, 1, L, T_img * n)


class GatedCrossAttentionBlock(nn.Module):
    """``x += tanh(a) * attn(LN(x), media)``;  ``x += tanh(f) * MLP(LN(x))``, gates ``a = f = 0`` at init.

    With both gates at zero the block is the identity, so a language model with these blocks inserted
    computes exactly what it computed before. Projections have no biases (as in Flamingo), which makes
    a masked-out token's attention output exactly zero.
    """

    def __init__(
        self,
        num_channels: int,
        num_media_channels: int,
        num_heads: int = 8,
        head_channels: int = 64,
        widening_factor: int = 4,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        inner = num_heads * head_channels
        self.norm = nn.LayerNorm(num_channels, eps=layer_norm_eps)
        self.attention = MultiHeadAttention(
            num_heads,
            num_channels,
            num_media_channels,
            qk_channels=inner,
            v_channels=inner,
            output_channels=num_channels,
            qkv_bias=False,
            out_bias=False,
        )
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_norm = nn.LayerNorm(num_channels, eps=layer_norm_eps)
        self.mlp = MLP(num_channels, widening_factor, bias=False)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        x: Tensor,
        media: Tensor,
        attn_mask: Tensor,
        kv_cache: Optional[tuple[Tensor, Tensor]] = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: (B, L, C) text, media: (B, T_img * n, D) latents, attn_mask: (B, 1, L, T_img * n) bool.

        ``kv_cache`` holds this block's keys/values of ``media`` from an earlier call with the same
        media; they are then reused instead of recomputed. Returns the new ``x`` and the keys/values.
        """
        h = self.norm(x)
        if kv_cache is None and media.shape[1] == 0:  # no images at all: nothing to attend to
            empty = media.new_zeros(media.shape[0], self.attention.num_heads, 0, 1)
            out, kv_cache = torch.zeros_like(x), (empty, empty)
        elif kv_cache is not None and kv_cache[0].shape[2] == 0:
            out = torch.zeros_like(x)
        elif kv_cache is None:
            out, (k, v) = self.attention(h, media, attn_mask=attn_mask, return_kv=True)
            kv_cache = (k.contiguous(), v.contiguous())  # reused at every decoding step: lay out once
        else:
            out = self.attention(h, media[:, :0], attn_mask=attn_mask, kv_cache=kv_cache)
        x = x + out * self.attn_gate.tanh()
        x = x + self.mlp(self.mlp_norm(x)) * self.mlp_gate.tanh()
        return x, kv_cache
