"""Point clouds: Fourier features of continuous xyz coordinates plus per-point features.

Clouds in a batch may have different point counts: pad them to a common ``N`` and pass a
``(B, N)`` mask (True = real point). Padded points are zeroed and masked out of the encoder's
cross-attention, so the result does not depend on the padding. For per-point outputs
(segmentation) decode with ``InputQueryProvider`` (one query per input point) and the same mask
as ``query_mask``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from ..adapters import InputAdapter
from ..position import fourier_features, num_fourier_channels
from .common import check_positive


class PointCloudInputAdapter(InputAdapter):
    """``points`` (B, N, D) coordinates (expected roughly in [-1, 1]), optional ``features``
    (B, N, F), optional ``mask`` (B, N) -> ``(B, N, F + C_pos)`` and the mask.

    Position channels: ``D * num_bands * (1 if sine_only else 2) (+ D if concat_pos)`` with
    frequencies from 1 to ``max_resolution / 2`` per axis (the official Fourier features,
    evaluated at the continuous coordinates instead of a grid).
    ``forward`` also accepts a mapping with keys ``points``, ``features``, ``mask``.
    """

    def __init__(
        self,
        num_feature_channels: int = 0,
        num_dims: int = 3,
        num_bands: int = 64,
        max_resolution: Union[float, Sequence[float]] = 64.0,
        concat_pos: bool = True,
        sine_only: bool = False,
    ):
        super().__init__()
        check_positive(type(self).__name__, num_dims=num_dims, num_bands=num_bands)
        if num_feature_channels < 0:
            raise ValueError(f"num_feature_channels must be >= 0, got {num_feature_channels}")
        res = (float(max_resolution),) * num_dims if isinstance(max_resolution, (int, float)) else tuple(max_resolution)
        if len(res) != num_dims or min(res) <= 0:
            raise ValueError(
                f"max_resolution={max_resolution!r} must be positive, one value or one per dim ({num_dims})"
            )
        self.num_dims = num_dims
        self.num_feature_channels = num_feature_channels
        self.num_bands = num_bands
        self.max_resolution = res
        self.concat_pos = concat_pos
        self.sine_only = sine_only
        self.num_input_channels = num_feature_channels + num_fourier_channels(
            num_dims, num_bands, concat_pos, sine_only
        )

    def forward(
        self,
        points: Union[Tensor, Mapping[str, Tensor]],
        features: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if isinstance(points, Mapping):
            features, mask, points = points.get("features"), points.get("mask"), points["points"]
        if points.dim() != 3 or points.shape[-1] != self.num_dims:
            raise ValueError(f"points must be (batch, num_points, {self.num_dims}), got {tuple(points.shape)}")
        b, n = points.shape[:2]
        if self.num_feature_channels:
            if features is None or tuple(features.shape) != (b, n, self.num_feature_channels):
                got = None if features is None else tuple(features.shape)
                raise ValueError(f"features must be ({b}, {n}, {self.num_feature_channels}), got {got}")
        elif features is not None:
            raise ValueError("features given but the adapter was built with num_feature_channels=0")
        if mask is not None and tuple(mask.shape) != (b, n):
            raise ValueError(f"mask must be ({b}, {n}) (True = real point), got {tuple(mask.shape)}")
        pos = fourier_features(points, self.num_bands, self.max_resolution, self.concat_pos, self.sine_only)
        x = pos if features is None else torch.cat([features.to(pos.dtype), pos], dim=-1)  # (B, N, C_in)
        if mask is not None:
            mask = mask.bool()
            x = x.masked_fill(~mask[..., None], 0.0)  # padding (even NaN padding) cannot leak
        return x, mask
