"""Perceiver Resampler (Flamingo): a fixed number of latent tokens per image from its patch features.

A learned latent array attends, per image, to that image's patch tokens (all frames of a video at
once). As in Flamingo, the latents are also part of the keys and values:
``latents += attn(q=LN(latents), kv=[LN(media); LN(latents)])``; ``latents += MLP(LN(latents))``;
a final LayerNorm. Optional learned frame embeddings (added per frame) and media-time embeddings
(added per image position) tell the latents which frame / which image slot a feature comes from.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .attention import MLP, GeluApproximate, MultiHeadAttention


class ResamplerBlock(nn.Module):
    """One resampler layer: latents attend to ``[media; latents]``, then a feed-forward, both residual."""

    def __init__(
        self,
        num_channels: int,
        num_heads: int,
        head_channels: int,
        widening_factor: int,
        gelu_approximate: GeluApproximate = "none",
        layer_norm_eps: float = 1e-5,
        input_channels: Optional[int] = None,
    ):
        super().__init__()
        self.media_norm = nn.LayerNorm(num_channels, eps=layer_norm_eps)
        self.latent_norm = nn.LayerNorm(num_channels, eps=layer_norm_eps)
        inner = num_heads * head_channels
        self.attention = MultiHeadAttention(
            num_heads,
            num_channels,
            num_channels,
            qk_channels=inner,
            v_channels=inner,
            output_channels=num_channels,
            qkv_bias=False,
            out_bias=False,
        )
        self.mlp_norm = nn.LayerNorm(num_channels, eps=layer_norm_eps)
        self.mlp = MLP(num_channels, widening_factor, bias=False, gelu_approximate=gelu_approximate)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        """media: (N, M, D) features of one image each, latents: (N, n, D) -> (N, n, D)."""
        q = self.latent_norm(latents)
        kv = torch.cat([self.media_norm(media), q], dim=1)  # (N, M + n, D)
        latents = latents + self.attention(q, kv)
        return latents + self.mlp(self.mlp_norm(latents))


class PerceiverResampler(nn.Module):
    """(B, T_img, F, v, D) patch features -> (B, T_img, num_latents, D) latent tokens per image.

    ``T_img`` images per example, ``F`` frames per image (1 for still images), ``v`` patch tokens per
    frame. ``max_num_frames`` / ``max_num_media`` enable learned frame / media-time embeddings for up
    to that many frames / image slots (``None`` disables them, as in OpenFlamingo's default).
    ``max_num_media_tokens`` enables learned position embeddings of the ``v`` tokens of a frame (up to that
    many): without them the resampler is invariant to the order of the tokens, so it cannot tell where in the
    image a feature was unless the features say so themselves (a ViT's do; a CNN's grid mostly does not).
    ``media_mask`` (B, T_img), True = image present: the latents of absent (padding) images are zero.
    ``input_channels``: the features' width when it differs from ``num_channels``: a learned linear projection
    maps them to ``num_channels`` first (a resampler narrower than a wide tower costs a fraction of the compute).
    """

    def __init__(
        self,
        num_channels: int,
        depth: int = 6,
        num_latents: int = 64,
        num_heads: int = 8,
        head_channels: int = 64,
        widening_factor: int = 4,
        max_num_media: Optional[int] = None,
        max_num_frames: Optional[int] = None,
        max_num_media_tokens: Optional[int] = None,
        gelu_approximate: GeluApproximate = "none",
        layer_norm_eps: float = 1e-5,
        input_channels: Optional[int] = None,
    ):
        super().__init__()
        for name, value in (
            ("num_channels", num_channels),
            ("depth", depth),
            ("num_latents", num_latents),
            ("num_heads", num_heads),
            ("head_channels", head_channels),
            ("widening_factor", widening_factor),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PerceiverResampler.{name} must be a positive int, got {value!r}")
        for name, value in (
            ("max_num_media", max_num_media),
            ("max_num_frames", max_num_frames),
            ("max_num_media_tokens", max_num_media_tokens),
            ("input_channels", input_channels),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"PerceiverResampler.{name} must be None or a positive int, got {value!r}")
        self.num_channels = num_channels
        self.input_channels = input_channels or num_channels
        self.input_projection = nn.Linear(input_channels, num_channels) if input_channels else None
        self.num_latents = num_latents
        self.max_num_media = max_num_media
        self.max_num_frames = max_num_frames
        self.max_num_media_tokens = max_num_media_tokens
        # Unit-variance init as in Flamingo reference implementations (each use is LayerNorm-ed first).
        self.latents = nn.Parameter(torch.randn(num_latents, num_channels))
        self.frame_embeddings = nn.Parameter(torch.randn(max_num_frames, num_channels)) if max_num_frames else None
        self.media_time_embeddings = nn.Parameter(torch.randn(max_num_media, num_channels)) if max_num_media else None
        # Small init: added to frozen features of any scale, they must not drown them at the start.
        self.token_embeddings = (
            nn.Parameter(0.1 * torch.randn(max_num_media_tokens, num_channels)) if max_num_media_tokens else None
        )
        self.layers = nn.ModuleList(
            ResamplerBlock(num_channels, num_heads, head_channels, widening_factor, gelu_approximate, layer_norm_eps)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(num_channels, eps=layer_norm_eps)

    def forward(self, x: Tensor, media_mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, T_img, F, v, D), media_mask: (B, T_img) bool -> (B, T_img, num_latents, D)."""
        if x.dim() != 5:
            raise ValueError(f"expected media features (B, T_img, F, v, D), got shape {tuple(x.shape)}")
        b, t, f, v, d = x.shape
        if d != self.input_channels:
            raise ValueError(f"media features have {d} channels, the resampler expects {self.input_channels}")
        if media_mask is not None and (media_mask.shape != (b, t) or media_mask.dtype != torch.bool):
            raise ValueError(
                f"media_mask must be a bool tensor of shape (B, T_img)={(b, t)}, "
                f"got {media_mask.dtype} {tuple(media_mask.shape)}"
            )
        if self.input_projection is not None:
            x = self.input_projection(x)
            d = self.num_channels
        if self.token_embeddings is not None:
            if v > self.max_num_media_tokens:
                raise ValueError(f"{v} tokens per frame, but max_num_media_tokens={self.max_num_media_tokens}")
            x = x + self.token_embeddings[:v]  # (v, D) broadcast over images and frames
        if self.frame_embeddings is not None:
            if f > self.max_num_frames:
                raise ValueError(f"{f} frames per image, but max_num_frames={self.max_num_frames}")
            x = x + self.frame_embeddings[:f, None, :]  # (F, 1, D) broadcast over patches
        x = x.reshape(b, t, f * v, d)  # frames and patches of one image form one set
        if self.media_time_embeddings is not None:
            if t > self.max_num_media:
                raise ValueError(f"{t} images per example, but max_num_media={self.max_num_media}")
            x = x + self.media_time_embeddings[:t, None, :]  # (T_img, 1, D)
        media = x.reshape(b * t, f * v, d)
        latents = self.latents.unsqueeze(0).expand(b * t, -1, -1)  # (B*T_img, n, D)
        for layer in self.layers:
            latents = layer(media, latents)
        latents = self.norm(latents).reshape(b, t, self.num_latents, d)
        if media_mask is not None:
            latents = latents * media_mask[:, :, None, None].to(latents.dtype)
        return latents
