"""Perceiver (classification by latent average) and Perceiver IO (adapter -> encoder -> decoder -> adapter)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .adapters import InputAdapter, OutputAdapter
from .config import DecoderConfig, EncoderConfig
from .decoder import PerceiverDecoder, QueryProvider
from .encoder import PerceiverEncoder


def _adapt(adapter: InputAdapter, x, pad_mask: Optional[Tensor]):
    out = adapter(x)
    if isinstance(out, tuple):
        out, adapter_mask = out
        if adapter_mask is not None:
            pad_mask = adapter_mask if pad_mask is None else pad_mask & adapter_mask
    return out, pad_mask


def _check_channels(adapter: InputAdapter, config: EncoderConfig) -> None:
    if adapter.num_input_channels != config.num_input_channels:
        raise ValueError(
            f"EncoderConfig.num_input_channels={config.num_input_channels} does not match "
            f"{type(adapter).__name__}.num_input_channels={adapter.num_input_channels}"
        )


class Perceiver(nn.Module):
    """The original Perceiver: encoder, then the latents averaged, normalised and classified."""

    def __init__(self, input_adapter: InputAdapter, encoder_config: EncoderConfig, num_classes: int):
        super().__init__()
        _check_channels(input_adapter, encoder_config)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.input_adapter = input_adapter
        self.encoder = PerceiverEncoder(encoder_config)
        self.norm = nn.LayerNorm(encoder_config.num_latent_channels, eps=encoder_config.layer_norm_eps)
        self.classifier = nn.Linear(encoder_config.num_latent_channels, num_classes)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.set_gradient_checkpointing(enabled)

    def forward(self, x, pad_mask: Optional[Tensor] = None) -> Tensor:
        """-> logits (B, num_classes)."""
        x, pad_mask = _adapt(self.input_adapter, x, pad_mask)
        z = self.encoder(x, pad_mask)  # (B, N, D)
        return self.classifier(self.norm(z.mean(dim=1)))


class PerceiverIO(nn.Module):
    """input adapter -> encoder -> decoder (queries from ``query_provider``) -> output adapter."""

    def __init__(
        self,
        input_adapter: InputAdapter,
        encoder_config: EncoderConfig,
        decoder_config: DecoderConfig,
        query_provider: QueryProvider,
        output_adapter: Optional[OutputAdapter] = None,
    ):
        super().__init__()
        _check_channels(input_adapter, encoder_config)
        if decoder_config.num_latent_channels != encoder_config.num_latent_channels:
            raise ValueError(
                f"DecoderConfig.num_latent_channels={decoder_config.num_latent_channels} does not match "
                f"EncoderConfig.num_latent_channels={encoder_config.num_latent_channels}"
            )
        self.input_adapter = input_adapter
        self.encoder = PerceiverEncoder(encoder_config)
        self.decoder = PerceiverDecoder(decoder_config, query_provider)
        self.output_adapter = output_adapter if output_adapter is not None else OutputAdapter()

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.set_gradient_checkpointing(enabled)
        self.decoder.set_gradient_checkpointing(enabled)

    def forward(
        self,
        x,
        pad_mask: Optional[Tensor] = None,
        query_mask: Optional[Tensor] = None,
        subsampled_points: Optional[Tensor] = None,
    ) -> Tensor:
        x, pad_mask = _adapt(self.input_adapter, x, pad_mask)
        z = self.encoder(x, pad_mask)  # (B, N, D)
        out = self.decoder(z, x, query_mask=query_mask, subsampled_points=subsampled_points)
        return self.output_adapter(out)
