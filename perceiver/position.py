"""Position encodings: Fourier features (as the official Perceiver code) and trainable embeddings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn


def build_linear_positions(
    index_dims: Sequence[int], output_range: tuple[float, float] = (-1.0, 1.0), device=None
) -> Tensor:
    """Positions on a regular grid: (*index_dims, D), each axis ``linspace(lo, hi, n)``, 'ij' order."""
    axes = [torch.linspace(output_range[0], output_range[1], n, device=device) for n in index_dims]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def fourier_features(
    pos: Tensor,
    num_bands: int,
    max_resolution: Sequence[int],
    concat_pos: bool = True,
    sine_only: bool = False,
) -> Tensor:
    """Fourier features of positions ``pos`` (..., D) in [-1, 1].

    Frequencies: per dimension d, ``num_bands`` values linearly spaced from 1 to
    ``max_resolution[d] / 2``. Features: ``[pos] + sin(pi f x) [+ cos(pi f x)]`` with the
    frequency axis innermost within each dimension, exactly as ``generate_fourier_features``
    of the official code. Output channels: ``D * (num_bands * (1 if sine_only else 2)) (+ D)``.
    """
    d = pos.shape[-1]
    if len(max_resolution) != d:
        raise ValueError(f"max_resolution has {len(max_resolution)} entries, positions have {d} dims")
    freqs = torch.stack(
        [torch.linspace(1.0, res / 2.0, num_bands, device=pos.device, dtype=torch.float32) for res in max_resolution]
    )  # (D, K)
    per_pos = (pos.float()[..., :, None] * freqs).flatten(-2)  # (..., D*K)
    feats = (
        [torch.sin(math.pi * per_pos)] if sine_only else [torch.sin(math.pi * per_pos), torch.cos(math.pi * per_pos)]
    )
    if concat_pos:
        feats.insert(0, pos.float())
    return torch.cat(feats, dim=-1).to(pos.dtype if pos.is_floating_point() else torch.float32)


def num_fourier_channels(num_dims: int, num_bands: int, concat_pos: bool = True, sine_only: bool = False) -> int:
    return num_dims * num_bands * (1 if sine_only else 2) + (num_dims if concat_pos else 0)


class FourierPositionEncoding(nn.Module):
    """Fourier position encoding of a fixed grid ``index_dims``, cached as a (non-persistent) buffer.

    ``forward(batch_size)`` -> (B, prod(index_dims), C). ``encode(pos)`` encodes arbitrary continuous
    coordinates (e.g. point clouds) ``(B, N, D)`` with the same frequencies.
    """

    def __init__(
        self,
        index_dims: Sequence[int],
        num_bands: int,
        max_resolution: Optional[Union[int, Sequence[int]]] = None,
        concat_pos: bool = True,
        sine_only: bool = False,
    ):
        super().__init__()
        self.index_dims = tuple(int(i) for i in index_dims)
        if max_resolution is None:
            max_resolution = self.index_dims
        elif isinstance(max_resolution, int):
            max_resolution = (max_resolution,) * len(self.index_dims)
        if len(max_resolution) != len(self.index_dims):
            raise ValueError(
                f"max_resolution={tuple(max_resolution)} must have one entry per index dim {self.index_dims}"
            )
        if num_bands < 1:
            raise ValueError(f"num_bands must be >= 1, got {num_bands}")
        self.num_bands = num_bands
        self.max_resolution = tuple(max_resolution)
        self.concat_pos = concat_pos
        self.sine_only = sine_only
        pos = build_linear_positions(self.index_dims).flatten(0, -2)  # (N, D)
        self.register_buffer("features", self.encode(pos), persistent=False)  # (N, C)

    @property
    def num_channels(self) -> int:
        return num_fourier_channels(len(self.index_dims), self.num_bands, self.concat_pos, self.sine_only)

    def encode(self, pos: Tensor) -> Tensor:
        return fourier_features(pos, self.num_bands, self.max_resolution, self.concat_pos, self.sine_only)

    def forward(self, batch_size: int, subsampled_points: Optional[Tensor] = None) -> Tensor:
        feats = self.features if subsampled_points is None else self.features[subsampled_points]
        return feats.unsqueeze(0).expand(batch_size, -1, -1)


class TrainablePositionEncoding(nn.Module):
    """Learned embedding per position: (index_dim, C), truncated-normal init (std ``init_scale``)."""

    def __init__(self, index_dim: int, num_channels: int, init_scale: float = 0.02):
        super().__init__()
        self.embeddings = nn.Parameter(torch.empty(index_dim, num_channels))
        nn.init.trunc_normal_(self.embeddings, std=init_scale, a=-2 * init_scale, b=2 * init_scale)

    @property
    def num_channels(self) -> int:
        return self.embeddings.shape[1]

    def forward(self, batch_size: int, subsampled_points: Optional[Tensor] = None) -> Tensor:
        emb = self.embeddings if subsampled_points is None else self.embeddings[subsampled_points]
        return emb.unsqueeze(0).expand(batch_size, -1, -1)
