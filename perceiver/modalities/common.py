"""Position features shared by the modality adapters and the grid-query decoders.

``GridPositionFeatures`` makes the position part of an input array on a grid (Fourier or trainable,
optionally projected); ``GridQueryProvider`` makes decoder queries from the same encodings, with
query subsampling (decode only some output points).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from ..decoder import QueryProvider
from ..position import FourierPositionEncoding, TrainablePositionEncoding, build_linear_positions, fourier_features

PositionKind = Literal["fourier", "trainable"]
SubsampleMode = Literal["slice", "official"]
Resolution = Optional[Union[float, Sequence[float]]]


def prod(dims: Sequence[int]) -> int:
    return int(math.prod(int(d) for d in dims))


def check_choice(owner: str, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {value!r}")


def check_positive(owner: str, **values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _resolution(max_resolution: Resolution, num_dims: int) -> Optional[tuple]:
    if max_resolution is None:
        return None
    if isinstance(max_resolution, (int, float)):
        return (max_resolution,) * num_dims
    res = tuple(max_resolution)
    if len(res) != num_dims:
        raise ValueError(f"max_resolution={res} needs one entry per grid dimension ({num_dims})")
    return res


class GridPositionFeatures(nn.Module):
    """Position features (B, prod(index_dims), C_pos) of a grid.

    ``kind="fourier"``: the official Fourier features. The configured ``index_dims`` are cached;
    other grids of the same rank are encoded on the fly (``max_resolution`` defaults to the grid
    being encoded, as in the official code). ``kind="trainable"``: one learned vector per position
    (``num_channels`` wide); the grid must then have ``prod(index_dims)`` points.
    ``project_dim`` adds a linear projection of the features (``project_pos_dim`` of the official code).
    """

    def __init__(
        self,
        index_dims: Sequence[int],
        kind: PositionKind = "fourier",
        num_bands: int = 64,
        max_resolution: Resolution = None,
        concat_pos: bool = True,
        sine_only: bool = False,
        num_channels: int = 256,
        init_scale: float = 0.02,
        project_dim: Optional[int] = None,
    ):
        super().__init__()
        check_choice(type(self).__name__, "kind", kind, ("fourier", "trainable"))
        self.index_dims = tuple(int(d) for d in index_dims)
        self.kind = kind
        self.max_resolution = _resolution(max_resolution, len(self.index_dims))
        if kind == "fourier":
            self.encoding: nn.Module = FourierPositionEncoding(
                self.index_dims, num_bands, self.max_resolution, concat_pos, sine_only
            )
        else:
            check_positive(type(self).__name__, num_channels=num_channels)
            self.encoding = TrainablePositionEncoding(prod(self.index_dims), num_channels, init_scale)
        width = self.encoding.num_channels
        if project_dim is not None:
            check_positive(type(self).__name__, project_dim=project_dim)
        self.projection = nn.Linear(width, project_dim) if project_dim is not None else None
        self.num_channels = project_dim if project_dim is not None else width

    def encode_positions(self, pos: Tensor) -> Tensor:
        """Fourier features of continuous coordinates ``pos`` (..., D) with this encoding's frequencies."""
        enc = self.encoding
        if not isinstance(enc, FourierPositionEncoding):
            raise ValueError("continuous coordinates can only be encoded with kind='fourier'")
        res = self.max_resolution if self.max_resolution is not None else enc.max_resolution
        return fourier_features(pos, enc.num_bands, res, enc.concat_pos, enc.sine_only)

    def raw(self, batch_size: int, index_dims: Optional[Sequence[int]] = None, device=None) -> Tensor:
        """Unprojected features of the grid ``index_dims`` (default: the configured one)."""
        dims = self.index_dims if index_dims is None else tuple(int(d) for d in index_dims)
        enc = self.encoding
        if isinstance(enc, TrainablePositionEncoding):
            if prod(dims) != enc.embeddings.shape[0]:
                raise ValueError(
                    f"trainable positions cover {enc.embeddings.shape[0]} points, the input grid {dims} has {prod(dims)}"
                )
            return enc(batch_size)
        if dims == self.index_dims:
            return enc(batch_size)
        if len(dims) != len(self.index_dims):
            raise ValueError(f"grid {dims} has a different rank than the configured grid {self.index_dims}")
        res = self.max_resolution if self.max_resolution is not None else dims
        pos = build_linear_positions(dims, device=device if device is not None else device_of(self))
        feats = fourier_features(pos.flatten(0, -2), enc.num_bands, res, enc.concat_pos, enc.sine_only)
        return feats.unsqueeze(0).expand(batch_size, -1, -1)

    def forward(self, batch_size: int, index_dims: Optional[Sequence[int]] = None, dtype=None, device=None) -> Tensor:
        pos = self.raw(batch_size, index_dims, device)  # (B, N, C_raw)
        if dtype is not None:
            pos = pos.to(dtype)
        if self.projection is not None:
            pos = self.projection(pos)
        return pos


def combined_channels(
    owner: str, feature_channels: int, position_channels: int, mode: str, what: str = "feature channels"
) -> int:
    """Width of :func:`combine_positions`'s output; ``add`` needs equal widths (checked at construction)."""
    if mode == "concat":
        return feature_channels + position_channels
    if position_channels != feature_channels:
        raise ValueError(
            f"{owner}: concat_or_add_pos='add' needs position channels ({position_channels}) == "
            f"{what} ({feature_channels})"
        )
    return feature_channels


def combine_positions(x: Tensor, pos: Tensor, mode: str) -> Tensor:
    """``concat``: [x, pos] on the channel axis; ``add``: x + pos (same width)."""
    if mode == "concat":
        return torch.cat([x, pos], dim=-1)
    if x.shape[-1] != pos.shape[-1]:
        raise ValueError(
            f"concat_or_add_pos='add' needs equal widths, input has {x.shape[-1]}, positions {pos.shape[-1]}"
        )
    return x + pos


class GridQueryProvider(QueryProvider):
    """Decoder queries from position features of an output grid ``index_dims``.

    ``subsampled_points`` (N_sub,) are flat indices into the grid: only those outputs are decoded.
    ``subsample_mode="slice"`` (default) gives exactly the rows of the full query array, so a
    subsampled decode equals slicing the full decode. ``"official"`` reproduces the official code
    (and transformers): subsampled Fourier coordinates are ``-1 + 2 * i / n`` per axis (not the
    ``linspace(-1, 1, n)`` grid of the full decode), and trainable queries ignore the subsampling.
    """

    def __init__(
        self,
        index_dims: Sequence[int],
        kind: PositionKind = "fourier",
        num_bands: int = 64,
        max_resolution: Resolution = None,
        concat_pos: bool = True,
        sine_only: bool = False,
        num_channels: int = 256,
        init_scale: float = 0.02,
        project_dim: Optional[int] = None,
        subsample_mode: SubsampleMode = "slice",
    ):
        super().__init__()
        check_choice(type(self).__name__, "subsample_mode", subsample_mode, ("slice", "official"))
        self.positions = GridPositionFeatures(
            index_dims, kind, num_bands, max_resolution, concat_pos, sine_only, num_channels, init_scale, project_dim
        )
        self.subsample_mode = subsample_mode
        self.num_query_channels = self.positions.num_channels
        self.num_queries = prod(self.positions.index_dims)

    def forward(self, inputs, subsampled_points: Optional[Tensor] = None) -> Tensor:
        batch_size = batch_size_of(inputs)
        pos = self.positions
        if subsampled_points is None or (self.subsample_mode == "official" and pos.kind == "trainable"):
            return pos(batch_size)
        idx = subsampled_points.to(device_of(pos))
        if self.subsample_mode == "slice":
            feats = pos.raw(batch_size)[:, idx]
        else:
            dims = pos.index_dims
            coords = torch.stack(torch.unravel_index(idx, dims), dim=1)  # (N_sub, D) integer grid coordinates
            coords = -1 + 2 * coords / torch.tensor(dims, device=coords.device)[None, :]
            feats = pos.encode_positions(coords).unsqueeze(0).expand(batch_size, -1, -1)
        return pos.projection(feats) if pos.projection is not None else feats


def device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def batch_size_of(inputs) -> int:
    """Batch size of a tensor or of the first tensor in a mapping of per-modality tensors."""
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    if isinstance(inputs, dict) or hasattr(inputs, "values"):
        for value in inputs.values():
            return batch_size_of(value)
    raise TypeError(f"cannot infer the batch size from {type(inputs).__name__}")
