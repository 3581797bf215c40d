"""Optical flow as in Perceiver IO: two frames -> flow per pixel.

Input: each pixel of both frames is described by its 3x3 neighbourhood (zero padded at the
border; channels ordered patch-row, patch-column, colour, as the official ``patches_for_flow``),
the two frames' patches are concatenated (54 values), linearly projected (``out_channels``) and
given 2-d Fourier positions (64 bands, ``max_resolution`` = the training size). The decoder's
queries are these same per-pixel input features (``InputQueryProvider``); the decoded 2 channels
are divided by ``rescale_factor`` (100) and reshaped to ``(B, H, W, 2)``.

transformers' ``PerceiverForOpticalFlow`` expects the patches already extracted, ``(B, 2, 27, H, W)``
(``extract_patches=False`` here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ..decoder import InputQueryProvider
from .common import Resolution, check_positive
from .image import DenseOutputAdapter, ImageInputAdapter


def extract_flow_patches(frames: Tensor, patch_size: int = 3) -> Tensor:
    """(B, T, C, H, W) -> (B, T, p*p*C, H, W): each pixel's zero-padded p x p neighbourhood,
    channels ordered (patch row, patch column, colour)."""
    if frames.dim() != 5:
        raise ValueError(f"frames must be (B, T, C, H, W), got shape {tuple(frames.shape)}")
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be a positive odd int, got {patch_size}")
    b, t, c, h, w = frames.shape
    cols = F.unfold(frames.flatten(0, 1), patch_size, padding=patch_size // 2)  # (B*T, C*p*p, H*W), (c, ph, pw)
    cols = cols.view(b * t, c, patch_size * patch_size, h * w).transpose(1, 2)  # (B*T, p*p, C, H*W)
    return cols.reshape(b, t, patch_size * patch_size * c, h, w)


class OpticalFlowInputAdapter(ImageInputAdapter):
    """Two frames ``(B, 2, C, H, W)`` -> ``(B, H*W, out_channels + C_pos)``.

    ``extract_patches=False``: the input is already ``(B, 2, p*p*C, H, W)`` patches.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_channels: int = 3,
        patch_size: int = 3,
        out_channels: int = 64,
        num_bands: int = 64,
        max_resolution: Resolution = None,
        concat_pos: bool = True,
        sine_only: bool = False,
        extract_patches: bool = True,
    ):
        if len(tuple(image_shape)) != 2:
            raise ValueError(f"image_shape must be (H, W), got {tuple(image_shape)}")
        check_positive(type(self).__name__, num_channels=num_channels, patch_size=patch_size)
        super().__init__(
            (2, *image_shape),
            num_channels=num_channels * patch_size**2,
            prep_type="patches",
            spatial_downsample=1,
            temporal_downsample=2,
            out_channels=out_channels,
            conv_after_patching=True,
            position_encoding="fourier",
            num_bands=num_bands,
            max_resolution=tuple(image_shape) if max_resolution is None else max_resolution,
            concat_pos=concat_pos,
            sine_only=sine_only,
        )
        self.patch_size = patch_size
        self.extract_patches = extract_patches

    def forward(self, frames: Tensor) -> Tensor:
        if self.extract_patches:
            frames = extract_flow_patches(frames, self.patch_size)
        return super().forward(frames)


class OpticalFlowQueryProvider(InputQueryProvider):
    """One query per pixel: the flow input features themselves."""

    def __init__(self, num_input_channels: int):
        super().__init__(num_input_channels)


class OpticalFlowOutputAdapter(DenseOutputAdapter):
    """Decoded flow (B, H*W, 2) -> ``/ rescale_factor`` -> (B, H, W, 2)."""

    def __init__(
        self, image_shape: Sequence[int], rescale_factor: float = 100.0, num_input_channels: Optional[int] = None
    ):
        if len(tuple(image_shape)) != 2:
            raise ValueError(f"image_shape must be (H, W), got {tuple(image_shape)}")
        out = None if num_input_channels is None else 2
        super().__init__(image_shape, num_input_channels, out, rescale_factor)
