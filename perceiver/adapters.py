"""Input and output adapters: the modality-specific ends of a Perceiver.

An input adapter maps raw input to an array ``(B, M, C)`` and exposes ``num_input_channels``;
it may return ``(array, pad_mask)`` with ``pad_mask`` (B, M), True = valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from .position import FourierPositionEncoding, TrainablePositionEncoding

AdapterOutput = Union[Tensor, tuple[Tensor, Optional[Tensor]]]


class InputAdapter(nn.Module):
    num_input_channels: int

    def forward(self, x, *args, **kwargs) -> AdapterOutput:  # pragma: no cover - interface
        raise NotImplementedError


class IdentityInputAdapter(InputAdapter):
    """Inputs that are already (B, M, C)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_input_channels = num_channels

    def forward(self, x: Tensor) -> Tensor:
        return x


class ArrayInputAdapter(InputAdapter):
    """An array on a regular grid ``(B, *index_dims, C)`` -> ``(B, prod(index_dims), C + C_pos)``.

    ``position_encoding``: ``"fourier"`` (``num_bands``, ``max_resolution``, ``concat_pos``,
    ``sine_only`` as the official code), ``"trainable"`` (``num_position_channels`` learned
    channels) or ``None`` (no positions: the encoder is then permutation-invariant).
    """

    def __init__(
        self,
        index_dims: Sequence[int],
        num_channels: int,
        position_encoding: Optional[Literal["fourier", "trainable"]] = "fourier",
        num_bands: int = 64,
        max_resolution: Optional[Union[int, Sequence[int]]] = None,
        concat_pos: bool = True,
        sine_only: bool = False,
        num_position_channels: int = 256,
    ):
        super().__init__()
        self.index_dims = tuple(index_dims)
        self.num_channels = num_channels
        if position_encoding == "fourier":
            self.position_encoding: Optional[nn.Module] = FourierPositionEncoding(
                self.index_dims, num_bands, max_resolution, concat_pos, sine_only
            )
        elif position_encoding == "trainable":
            num_positions = 1
            for d in self.index_dims:
                num_positions *= d
            self.position_encoding = TrainablePositionEncoding(num_positions, num_position_channels)
        elif position_encoding is None:
            self.position_encoding = None
        else:
            raise ValueError(f"position_encoding must be 'fourier', 'trainable' or None, got {position_encoding!r}")
        pos_channels = 0 if self.position_encoding is None else self.position_encoding.num_channels
        self.num_input_channels = num_channels + pos_channels

    def forward(self, x: Tensor) -> Tensor:
        expected = (*self.index_dims, self.num_channels)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"input must be (batch, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        x = x.flatten(1, -2)  # (B, M, C)
        if self.position_encoding is None:
            return x
        pos = self.position_encoding(x.shape[0]).to(x.dtype)  # (B, M, C_pos)
        return torch.cat([x, pos], dim=-1)


class OutputAdapter(nn.Module):
    """Maps decoder output (B, N_out, C_out) to the task's output."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class ClassificationOutputAdapter(OutputAdapter):
    """(B, 1, num_classes) -> (B, num_classes)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != 1:
            raise ValueError(f"classification expects a single output query, got {x.shape[1]}")
        return x[:, 0]
