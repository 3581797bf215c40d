"""Perceiver encoder: latents cross-attend to the input, then a latent transformer."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import CrossAttentionLayer, SelfAttentionLayer, key_padding_to_attn_mask
from .config import EncoderConfig


def _shared_schedule(num_uses: int, sharing: str) -> list[int]:
    """Index of the weight set each of ``num_uses`` repeats uses."""
    if sharing == "all":
        return [0] * num_uses
    if sharing == "all_but_first":
        return [0] + [1] * (num_uses - 1)
    return list(range(num_uses))


def run_layer(layer: nn.Module, use_checkpoint: bool, *args):
    """Call ``layer(*args)``, through activation checkpointing when asked and gradients are on."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class LatentBlock(nn.Sequential):
    """``num_self_attends_per_block`` self-attention layers on the latents."""

    def __init__(self, config: EncoderConfig):
        super().__init__(
            *[
                SelfAttentionLayer(
                    config.num_latent_channels,
                    num_heads=config.num_self_attention_heads,
                    qk_channels=config.num_self_attention_qk_channels,
                    v_channels=config.num_self_attention_v_channels,
                    widening_factor=config.self_attention_widening_factor,
                    bias=config.bias,
                    attention_dropout=config.attention_dropout,
                    dropout=config.dropout,
                    qk_layernorm=config.qk_layernorm,
                    gelu_approximate=config.gelu_approximate,
                    layer_norm_eps=config.layer_norm_eps,
                )
                for _ in range(config.num_self_attends_per_block)
            ]
        )


class PerceiverEncoder(nn.Module):
    """(B, M, C_in) inputs [+ (B, M) padding mask, True = valid] -> (B, N, D) latents.

    Cost is O(M N + N^2) per layer: linear in the input length M.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.empty(config.num_latents, config.num_latent_channels))
        nn.init.trunc_normal_(self.latents, std=config.init_scale, a=-2 * config.init_scale, b=2 * config.init_scale)

        self.cross_attend_schedule = _shared_schedule(config.num_cross_attends, config.weight_sharing)
        self.block_schedule = _shared_schedule(config.num_blocks, config.weight_sharing)
        self.cross_attends = nn.ModuleList(
            [self._cross_attention(config) for _ in range(max(self.cross_attend_schedule) + 1)]
        )
        self.blocks = nn.ModuleList([LatentBlock(config) for _ in range(max(self.block_schedule) + 1)])
        self.gradient_checkpointing = config.gradient_checkpointing

    @staticmethod
    def _cross_attention(config: EncoderConfig) -> CrossAttentionLayer:
        return CrossAttentionLayer(
            config.num_latent_channels,
            config.num_input_channels,
            num_heads=config.num_cross_attention_heads,
            qk_channels=config.num_cross_attention_qk_channels,
            v_channels=config.num_cross_attention_v_channels,
            shape_for_attention=config.cross_attention_shape_for_attention,
            widening_factor=config.cross_attention_widening_factor,
            use_query_residual=config.use_query_residual,
            bias=config.bias,
            attention_dropout=config.attention_dropout,
            dropout=config.dropout,
            qk_layernorm=config.qk_layernorm,
            gelu_approximate=config.gelu_approximate,
            layer_norm_eps=config.layer_norm_eps,
        )

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def validate_inputs(self, x: Tensor, pad_mask: Optional[Tensor]) -> None:
        if x.dim() != 3 or x.shape[-1] != self.config.num_input_channels:
            raise ValueError(
                f"encoder input must be (batch, length, num_input_channels={self.config.num_input_channels}), "
                f"got shape {tuple(x.shape)}"
            )
        if pad_mask is not None and tuple(pad_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"pad_mask must be (batch, length) = {tuple(x.shape[:2])} (True = valid), got {tuple(pad_mask.shape)}"
            )

    def forward(self, x: Tensor, pad_mask: Optional[Tensor] = None) -> Tensor:
        self.validate_inputs(x, pad_mask)
        attn_mask = key_padding_to_attn_mask(pad_mask)  # (B, 1, 1, M)
        z = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, N, D)
        ckpt = self.gradient_checkpointing and self.training
        for i, b in enumerate(self.block_schedule):
            if i < len(self.cross_attend_schedule):
                z = run_layer(self.cross_attends[self.cross_attend_schedule[i]], ckpt, z, x, attn_mask)
            for layer in self.blocks[b]:
                z = run_layer(layer, ckpt, z)
        return z
