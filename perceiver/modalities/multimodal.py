"""Several modalities in one Perceiver IO, as the paper's Kinetics audio-video-label autoencoder.

Encoding: each modality's adapter output is padded to a common width (max width +
``min_padding_size``) with a trainable per-modality vector, which doubles as the modality
embedding, and the modalities are concatenated along the input axis in sorted-name order.
Decoding: per-modality queries are padded the same way (their own trainable vectors) and
concatenated; one shared cross-attention decodes all of them and the output is split back into
the modalities (``MultimodalOutputAdapter``) for per-modality heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor, nn

from ..adapters import InputAdapter, OutputAdapter
from ..config import DecoderConfig, EncoderConfig
from ..decoder import InputQueryProvider, PositionQueryProvider, QueryProvider
from ..model import PerceiverIO
from .common import check_positive


def _trainable(shape: tuple, init_scale: float) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape))
    if p.numel():
        nn.init.trunc_normal_(p, std=init_scale, a=-2 * init_scale, b=2 * init_scale)
    return p


def _pad_to(x: Tensor, padding: Tensor, width: int) -> Tensor:
    # (B, N, C_m) + trainable (1, width - C_m) -> (B, N, width)
    pad = padding.to(x.dtype).expand(x.shape[0], x.shape[1], width - x.shape[2])
    return torch.cat([x, pad], dim=2)


def split_modalities(x: Tensor, sizes: Mapping[str, int]) -> dict[str, Tensor]:
    """(B, sum N_m, C) -> {m: (B, N_m, C)}, modalities in sorted-name order."""
    out, start = {}, 0
    for m in sorted(sizes):
        out[m] = x[:, start : start + sizes[m]]
        start += sizes[m]
    if start != x.shape[1]:
        raise ValueError(f"modality sizes {dict(sizes)} add up to {start}, the array has {x.shape[1]} elements")
    return out


class LabelInputAdapter(InputAdapter):
    """A class label as one input element: one-hot / soft labels (B, K) or class ids (B,) -> (B, 1, K)."""

    def __init__(self, num_classes: int):
        super().__init__()
        check_positive(type(self).__name__, num_classes=num_classes)
        self.num_input_channels = num_classes

    def forward(self, labels: Tensor) -> Tensor:
        if labels.dim() == 1 and not labels.is_floating_point():
            labels = torch.nn.functional.one_hot(labels, self.num_input_channels).float()
        if labels.dim() != 2 or labels.shape[1] != self.num_input_channels:
            raise ValueError(
                f"labels must be (batch, {self.num_input_channels}) or (batch,) ids, got {tuple(labels.shape)}"
            )
        return labels[:, None, :]


class MultimodalInputAdapter(InputAdapter):
    """``{modality: raw input}`` -> ``(B, sum_m M_m, C)`` and a padding mask (or None).

    A modality's input may be a tuple of its adapter's arguments (e.g. ``(waveform, sample_mask)``);
    the padding mask combines the masks the adapters return (other modalities count as valid).

    ``mask_probs``: per modality, the probability that each of its elements is replaced by a
    trainable mask token (the Kinetics autoencoder masks the label with probability 1 so the
    model predicts it). As in the official code this is applied in training and evaluation alike;
    probabilities 0 and 1 are deterministic.
    """

    def __init__(
        self,
        adapters: Mapping[str, InputAdapter],
        min_padding_size: int = 2,
        mask_probs: Optional[Mapping[str, float]] = None,
        init_scale: float = 0.02,
    ):
        super().__init__()
        if not adapters:
            raise ValueError("MultimodalInputAdapter needs at least one modality")
        if min_padding_size < 0:
            raise ValueError(f"min_padding_size must be >= 0, got {min_padding_size}")
        mask_probs = dict(mask_probs or {})
        unknown = sorted(set(mask_probs) - set(adapters))
        if unknown:
            raise ValueError(f"mask_probs names unknown modalities {unknown}; modalities are {sorted(adapters)}")
        for m, p in mask_probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"mask_probs[{m!r}] must be in [0, 1], got {p}")
        self.adapters = nn.ModuleDict(dict(adapters))
        self.num_input_channels = max(a.num_input_channels for a in adapters.values()) + min_padding_size
        self.padding = nn.ParameterDict(
            {
                m: _trainable((1, self.num_input_channels - a.num_input_channels), init_scale)
                for m, a in adapters.items()
            }
        )
        self.mask_probs = mask_probs
        self.mask_tokens = nn.ParameterDict(
            {m: _trainable((1, self.num_input_channels), init_scale) for m in mask_probs}
        )

    def encode(self, inputs: Mapping[str, object]) -> tuple[Tensor, Optional[Tensor], dict[str, int]]:
        """-> (array (B, M, C), mask (B, M) or None, {modality: M_m})."""
        missing = sorted(set(self.adapters) - set(inputs))
        if missing:
            raise ValueError(f"inputs lack modalities {missing}; expected {sorted(self.adapters)}")
        arrays, masks = {}, {}
        for m, adapter in self.adapters.items():
            raw = inputs[m]
            out = adapter(*raw) if isinstance(raw, tuple) else adapter(raw)  # a tuple: the adapter's arguments
            x, mask = out if isinstance(out, tuple) else (out, None)
            x = _pad_to(x, self.padding[m], self.num_input_channels)  # (B, M_m, C)
            if m in self.mask_probs:
                p = torch.full(x.shape[:2], self.mask_probs[m], device=x.device)
                drop = torch.bernoulli(p).unsqueeze(-1).to(x.dtype)  # (B, M_m, 1)
                x = (1 - drop) * x + drop * self.mask_tokens[m].to(x.dtype)
            arrays[m], masks[m] = x, mask
        order = sorted(arrays)
        x = torch.cat([arrays[m] for m in order], dim=1)
        if all(masks[m] is None for m in order):
            mask = None
        else:
            mask = torch.cat(
                [
                    masks[m] if masks[m] is not None else arrays[m].new_ones(arrays[m].shape[:2], dtype=torch.bool)
                    for m in order
                ],
                dim=1,
            )
        return x, mask, {m: arrays[m].shape[1] for m in order}

    def forward(self, inputs: Mapping[str, object]) -> tuple[Tensor, Optional[Tensor]]:
        x, mask, _ = self.encode(inputs)
        return x, mask


def num_queries(provider: QueryProvider, inputs: Optional[Tensor] = None) -> int:
    """Number of queries a provider makes for a full (not subsampled) decode."""
    if hasattr(provider, "num_queries"):
        return int(provider.num_queries)
    if isinstance(provider, InputQueryProvider):
        if inputs is None:
            raise ValueError("InputQueryProvider makes one query per input element: its modality's inputs are needed")
        return inputs.shape[1]
    if isinstance(provider, PositionQueryProvider):
        enc = provider.encoding
        return (enc.features if hasattr(enc, "features") else enc.embeddings).shape[0]
    raise TypeError(f"cannot tell how many queries {type(provider).__name__} makes")


class MultimodalQueryProvider(QueryProvider):
    """Per-modality queries padded to a common width with trainable per-modality vectors and
    concatenated in sorted-name order.

    ``forward(inputs, subsampled_points)``: ``inputs`` is a ``{modality: (B, M_m, C)}`` mapping
    (needed by input-derived sub-queries) or any tensor with the batch size;
    ``subsampled_points`` maps modalities to the flat output indices to decode (missing / None:
    all of that modality's outputs).
    """

    def __init__(self, providers: Mapping[str, QueryProvider], min_padding_size: int = 2, init_scale: float = 0.02):
        super().__init__()
        if not providers:
            raise ValueError("MultimodalQueryProvider needs at least one modality")
        if min_padding_size < 0:
            raise ValueError(f"min_padding_size must be >= 0, got {min_padding_size}")
        self.providers = nn.ModuleDict(dict(providers))
        self.num_query_channels = max(p.num_query_channels for p in providers.values()) + min_padding_size
        self.padding = nn.ParameterDict(
            {
                m: _trainable((1, self.num_query_channels - p.num_query_channels), init_scale)
                for m, p in providers.items()
            }
        )

    def _modality_inputs(self, inputs, m: str):
        return inputs[m] if isinstance(inputs, Mapping) else inputs

    def output_sizes(
        self, inputs, subsampled_points: Optional[Mapping[str, Optional[Tensor]]] = None
    ) -> dict[str, int]:
        sub = subsampled_points or {}
        return {
            m: (sub[m].shape[0] if sub.get(m) is not None else num_queries(p, self._modality_inputs(inputs, m)))
            for m, p in sorted(self.providers.items())
        }

    def forward(self, inputs, subsampled_points: Optional[Mapping[str, Optional[Tensor]]] = None) -> Tensor:
        sub = subsampled_points or {}
        unknown = sorted(set(sub) - set(self.providers))
        if unknown:
            raise ValueError(
                f"subsampled_points names unknown modalities {unknown}; modalities are {sorted(self.providers)}"
            )
        queries = []
        for m in sorted(self.providers):
            q = self.providers[m](self._modality_inputs(inputs, m), sub.get(m))
            q = q.reshape(q.shape[0], -1, q.shape[-1])  # (B, N_m, C_m)
            queries.append(_pad_to(q, self.padding[m], self.num_query_channels))
        return torch.cat(queries, dim=1)


class MultimodalOutputAdapter(OutputAdapter):
    """Decoder output (B, sum N_m, C) -> ``{modality: head(output_m)}`` (identity for modalities without a head)."""

    def __init__(self, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, x: Tensor, sizes: Mapping[str, int]) -> dict[str, Tensor]:
        parts = split_modalities(x, sizes)
        return {m: (self.heads[m](v) if m in self.heads else v) for m, v in parts.items()}


class MultimodalPerceiverIO(PerceiverIO):
    """Multimodal Perceiver IO: ``{modality: input}`` -> ``{modality: output}``.

    ``forward(inputs, subsampled_points=None)``; ``subsampled_points`` maps modalities to the flat
    output indices to decode (e.g. a random subset of video pixels during training).
    """

    def __init__(
        self,
        input_adapter: MultimodalInputAdapter,
        encoder_config: EncoderConfig,
        decoder_config: DecoderConfig,
        query_provider: MultimodalQueryProvider,
        output_adapter: Optional[MultimodalOutputAdapter] = None,
    ):
        output_adapter = output_adapter if output_adapter is not None else MultimodalOutputAdapter({})
        super().__init__(input_adapter, encoder_config, decoder_config, query_provider, output_adapter)

    def forward(
        self, inputs: Mapping[str, object], subsampled_points: Optional[Mapping[str, Optional[Tensor]]] = None
    ) -> dict[str, Tensor]:
        x, pad_mask, sizes = self.input_adapter.encode(inputs)  # (B, M, C)
        z = self.encoder(x, pad_mask)  # (B, N, D)
        per_modality = split_modalities(x, sizes)
        out = self.decoder(z, per_modality, subsampled_points=subsampled_points)  # (B, sum N_out, C_out)
        out_sizes = self.decoder.query_provider.output_sizes(per_modality, subsampled_points)
        return self.output_adapter(out, out_sizes)
