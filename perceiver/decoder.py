"""Perceiver IO decoder and its output-query providers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from .attention import CrossAttentionLayer
from .config import DecoderConfig
from .encoder import run_layer
from .position import FourierPositionEncoding, TrainablePositionEncoding


class QueryProvider(nn.Module):
    """Makes the decoder's output queries (B, N_out, C_q).

    ``forward(inputs, subsampled_points)``: ``inputs`` is the encoder's input array (B, M, C_in)
    (used for its batch size, or as the source of input-derived queries); ``subsampled_points``
    (N_sub,) long selects a subset of output positions (decode only those).
    """

    num_query_channels: int

    def forward(self, inputs: Tensor, subsampled_points: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError


class PositionQueryProvider(QueryProvider):
    """Queries are a position encoding of the output grid (Fourier or trainable)."""

    def __init__(self, encoding: nn.Module):
        super().__init__()
        self.encoding = encoding
        self.num_query_channels = encoding.num_channels

    def forward(self, inputs: Tensor, subsampled_points: Optional[Tensor] = None) -> Tensor:
        return self.encoding(inputs.shape[0], subsampled_points)


class TrainableQueryProvider(PositionQueryProvider):
    """``num_queries`` learned queries (1 for classification)."""

    def __init__(self, num_queries: int, num_query_channels: int, init_scale: float = 0.02):
        super().__init__(TrainablePositionEncoding(num_queries, num_query_channels, init_scale))


class FourierQueryProvider(PositionQueryProvider):
    """Fourier features of the output grid ``index_dims`` as queries (e.g. dense per-pixel decoding)."""

    def __init__(
        self, index_dims: Sequence[int], num_bands: int, max_resolution=None, concat_pos=True, sine_only=False
    ):
        super().__init__(FourierPositionEncoding(index_dims, num_bands, max_resolution, concat_pos, sine_only))


class InputQueryProvider(QueryProvider):
    """Queries derived from the input array: the inputs themselves, optionally with a position
    encoding concatenated and/or a trainable linear projection to ``num_query_channels``."""

    def __init__(
        self,
        num_input_channels: int,
        position_encoding: Optional[nn.Module] = None,
        num_query_channels: Optional[int] = None,
    ):
        super().__init__()
        self.position_encoding = position_encoding
        width = num_input_channels + (position_encoding.num_channels if position_encoding is not None else 0)
        self.proj = nn.Linear(width, num_query_channels) if num_query_channels is not None else nn.Identity()
        self.num_query_channels = width if num_query_channels is None else num_query_channels

    def forward(self, inputs: Tensor, subsampled_points: Optional[Tensor] = None) -> Tensor:
        q = inputs if subsampled_points is None else inputs[:, subsampled_points]
        if self.position_encoding is not None:
            pos = self.position_encoding(inputs.shape[0], subsampled_points).to(q.dtype)
            q = torch.cat([q, pos], dim=-1)
        return self.proj(q)


class PerceiverDecoder(nn.Module):
    """Output queries cross-attend to the latents; optional final projection.

    latents (B, N, D) -> (B, N_out, C_out). Queries masked out by ``query_mask`` (B, N_out),
    True = valid, give all-zero outputs.
    """

    def __init__(self, config: DecoderConfig, query_provider: QueryProvider):
        super().__init__()
        if query_provider.num_query_channels != config.num_query_channels:
            raise ValueError(
                f"DecoderConfig.num_query_channels={config.num_query_channels} does not match the query "
                f"provider's {type(query_provider).__name__}.num_query_channels={query_provider.num_query_channels}"
            )
        self.config = config
        self.query_provider = query_provider
        self.cross_attention = CrossAttentionLayer(
            config.num_query_channels,
            config.num_latent_channels,
            num_heads=config.num_heads,
            qk_channels=config.num_qk_channels,
            v_channels=config.num_v_channels,
            shape_for_attention=config.shape_for_attention,
            widening_factor=config.widening_factor,
            use_query_residual=config.use_query_residual,
            bias=config.bias,
            attention_dropout=config.attention_dropout,
            dropout=config.dropout,
            qk_layernorm=config.qk_layernorm,
            gelu_approximate=config.gelu_approximate,
            layer_norm_eps=config.layer_norm_eps,
        )
        if config.num_output_channels is None:
            self.output_projection: nn.Module = nn.Identity()
        else:
            self.output_projection = nn.Linear(config.num_query_channels, config.num_output_channels)
        self.gradient_checkpointing = config.gradient_checkpointing

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def forward(
        self,
        latents: Tensor,
        inputs: Tensor,
        query_mask: Optional[Tensor] = None,
        subsampled_points: Optional[Tensor] = None,
    ) -> Tensor:
        """latents: (B, N, D); inputs: the encoder input (B, M, C_in), used by the query provider."""
        if latents.dim() != 3 or latents.shape[-1] != self.config.num_latent_channels:
            raise ValueError(
                f"latents must be (batch, num_latents, {self.config.num_latent_channels}), got {tuple(latents.shape)}"
            )
        queries = self.query_provider(inputs, subsampled_points).to(latents.dtype)  # (B, N_out, C_q)
        if query_mask is not None and tuple(query_mask.shape) != tuple(queries.shape[:2]):
            raise ValueError(
                f"query_mask must be (batch, num_queries) = {tuple(queries.shape[:2])}, got {tuple(query_mask.shape)}"
            )
        ckpt = self.gradient_checkpointing and self.training
        out = self.output_projection(run_layer(self.cross_attention, ckpt, queries, latents))
        if query_mask is not None:
            out = out * query_mask[..., None].to(out.dtype)
        return out
