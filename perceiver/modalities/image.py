"""Images (and image-like video input): pixels, space-to-depth patches, the Perceiver IO conv stem.

Input layout is PyTorch's: images ``(B, C, H, W)``, videos ``(B, T, C, H, W)``. ``ImageInputAdapter``
follows the official ``ImagePreprocessor`` (``prep_type`` "pixels" | "patches" | "conv" | "conv1x1",
Fourier or trainable positions, concatenated or added) and returns ``(B, M, C_in)``.

The conv stem (``ConvDownsample``) is a 7x7/2 convolution without bias, batch norm, ReLU and a
3x3/2 max-pool per layer. The official code pads both the convolution and the max-pool TF-"SAME"
(the default here). transformers deviates: its convolution is padded by a fixed 3 pixels on every
side (for even input sizes the sampling grid is shifted by one pixel against TF-SAME, which pads
2 before and 3 after) and its max-pool is unpadded ("VALID": 224 -> 112 -> 55 instead of 56). Both
are available (``conv_padding="symmetric"``, ``pool_padding="valid"``) and are what the transformers
import uses. transformers also builds a single conv layer whatever ``spatial_downsample`` asks for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import InputAdapter, OutputAdapter
from .common import (
    GridPositionFeatures,
    PositionKind,
    Resolution,
    check_choice,
    check_positive,
    combine_positions,
    combined_channels,
)

ImagePrep = Literal["pixels", "patches", "conv", "conv1x1"]


def space_to_depth(x: Tensor, spatial_block: int = 1, temporal_block: int = 1) -> Tensor:
    """Channels-first blocks to channels-last depth, block-major then channel (as the official code).

    (B, C, H, W) -> (B, H/s, W/s, s*s*C);  (B, T, C, H, W) -> (B, T/t, H/s, W/s, t*s*s*C).
    """
    s, t = spatial_block, temporal_block
    if x.dim() == 4:
        b, c, h, w = x.shape
        if h % s or w % s:
            raise ValueError(f"image size {(h, w)} is not divisible by the patch size {s}")
        x = x.reshape(b, c, h // s, s, w // s, s).permute(0, 2, 4, 3, 5, 1)  # (B, H/s, W/s, s, s, C)
        return x.reshape(b, h // s, w // s, s * s * c)
    if x.dim() == 5:
        b, n, c, h, w = x.shape
        if n % t or h % s or w % s:
            raise ValueError(f"video size {(n, h, w)} is not divisible by the patch size {(t, s, s)}")
        x = x.reshape(b, n // t, t, c, h // s, s, w // s, s).permute(0, 1, 4, 6, 2, 5, 7, 3)
        return x.reshape(b, n // t, h // s, w // s, t * s * s * c)
    raise ValueError(f"expected (B, C, H, W) or (B, T, C, H, W), got shape {tuple(x.shape)}")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) of one axis: output size ceil(size / stride)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad2d(x: Tensor, kernel: int, stride: int, mode: str, value: float = 0.0) -> Tensor:
    if mode == "valid":
        return x
    if mode == "same":
        ph, pw = same_padding(x.shape[-2], kernel, stride), same_padding(x.shape[-1], kernel, stride)
    else:  # "symmetric": the fixed padding of transformers' Conv2dSamePadding
        p = (kernel // 2 + (kernel - 2 * (kernel // 2)) - 1, kernel // 2)
        ph = pw = p
    return F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=value)


class ConvDownsampleLayer(nn.Module):
    """Conv 7x7 stride 2 (no bias) -> BatchNorm -> ReLU -> max-pool 3x3 stride 2: 4x downsampling."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        use_batchnorm: bool = True,
        conv_padding: Literal["same", "symmetric"] = "same",
        pool_padding: Literal["same", "valid"] = "same",
    ):
        super().__init__()
        check_choice(type(self).__name__, "conv_padding", conv_padding, ("same", "symmetric"))
        check_choice(type(self).__name__, "pool_padding", pool_padding, ("same", "valid"))
        self.conv_padding = conv_padding
        self.pool_padding = pool_padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=7, stride=2, bias=False)
        # Haiku BatchNorm(decay_rate=0.9, eps=1e-5) == torch momentum 0.1, eps 1e-5
        self.norm = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1) if use_batchnorm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.norm(self.conv(_pad2d(x, 7, 2, self.conv_padding))))
        return F.max_pool2d(_pad2d(x, 3, 2, self.pool_padding, value=-math.inf), kernel_size=3, stride=2)

    def output_size(self, size: int) -> int:
        size = math.ceil(size / 2)  # both conv paddings keep ceil(n / 2) outputs
        return math.ceil(size / 2) if self.pool_padding == "same" else (size - 3) // 2 + 1


class ConvDownsample(nn.Sequential):
    """The Perceiver IO ImageNet conv stem: ``num_layers`` conv+pool layers, 4**num_layers downsampling."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 64,
        num_layers: int = 1,
        use_batchnorm: bool = True,
        conv_padding: Literal["same", "symmetric"] = "same",
        pool_padding: Literal["same", "valid"] = "same",
    ):
        check_positive(type(self).__name__, num_layers=num_layers)
        super().__init__(
            *[
                ConvDownsampleLayer(
                    in_channels if i == 0 else out_channels, out_channels, use_batchnorm, conv_padding, pool_padding
                )
                for i in range(num_layers)
            ]
        )

    def output_size(self, size: int) -> int:
        for layer in self:
            size = layer.output_size(size)
        return size


class ImageInputAdapter(InputAdapter):
    """Image ``(B, C, H, W)`` or video ``(B, T, C, H, W)`` -> ``(B, M, C_in)``.

    ``image_shape``: ``(H, W)`` for images, ``(T, H, W)`` for videos. ``prep_type``:

    - ``"pixels"``: every pixel (strided by ``spatial_downsample`` / ``temporal_downsample`` over
      height/width/time; transformers strides the batch and channel axes of 4-d input instead, see
      ``perceiver.hf``);
    - ``"patches"``: space-to-depth blocks of ``temporal_downsample x spatial_downsample^2`` pixels,
      optionally linearly projected to ``out_channels`` (``conv_after_patching``); a video whose
      patched time axis has length 1 (two stacked flow frames) becomes a 2-d grid;
    - ``"conv"``: the conv stem (``spatial_downsample`` a power of 4), per frame for videos;
    - ``"conv1x1"``: a 1x1 convolution with stride ``spatial_downsample`` to ``out_channels``.

    Positions (``position_encoding``): Fourier features of the output grid (``num_bands``,
    ``max_resolution`` - default the grid - ``concat_pos``, ``sine_only``) or trainable
    (``num_position_channels``), optionally projected to ``project_pos_dim`` channels, then
    concatenated to or added to the features (``concat_or_add_pos``). Fourier positions also work
    for other input sizes of the same rank (computed on the fly); trainable ones need the
    configured grid.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_channels: int = 3,
        prep_type: ImagePrep = "pixels",
        spatial_downsample: int = 1,
        temporal_downsample: int = 1,
        out_channels: int = 64,
        conv_after_patching: bool = False,
        position_encoding: PositionKind = "fourier",
        num_bands: int = 64,
        max_resolution: Resolution = None,
        concat_pos: bool = True,
        sine_only: bool = False,
        num_position_channels: int = 256,
        project_pos_dim: Optional[int] = None,
        concat_or_add_pos: Literal["concat", "add"] = "concat",
        conv_padding: Literal["same", "symmetric"] = "same",
        pool_padding: Literal["same", "valid"] = "same",
        use_batchnorm: bool = True,
    ):
        super().__init__()
        name = type(self).__name__
        self.image_shape = tuple(int(d) for d in image_shape)
        if len(self.image_shape) not in (2, 3) or min(self.image_shape) < 1:
            raise ValueError(f"{name}: image_shape must be (H, W) or (T, H, W) of positive sizes, got {image_shape}")
        check_choice(name, "prep_type", prep_type, ("pixels", "patches", "conv", "conv1x1"))
        check_choice(name, "concat_or_add_pos", concat_or_add_pos, ("concat", "add"))
        check_positive(
            name,
            num_channels=num_channels,
            spatial_downsample=spatial_downsample,
            temporal_downsample=temporal_downsample,
            out_channels=out_channels,
        )
        self.is_video = len(self.image_shape) == 3
        self.num_channels = num_channels
        self.prep_type = prep_type
        self.spatial_downsample = spatial_downsample
        self.temporal_downsample = temporal_downsample
        self.concat_or_add_pos = concat_or_add_pos

        self.convnet: Optional[nn.Module] = None
        self.patch_projection: Optional[nn.Module] = None
        if prep_type == "conv":
            num_layers = round(math.log(spatial_downsample, 4)) if spatial_downsample > 1 else 0
            if 4**num_layers != spatial_downsample or num_layers < 1 or temporal_downsample != 1:
                raise ValueError(
                    f"{name}: prep_type='conv' needs spatial_downsample a power of 4 (>= 4) and "
                    f"temporal_downsample=1, got {spatial_downsample} and {temporal_downsample}"
                )
            self.convnet = ConvDownsample(
                num_channels, out_channels, num_layers, use_batchnorm, conv_padding, pool_padding
            )
            feature_channels = out_channels
        elif prep_type == "conv1x1":
            if temporal_downsample != 1:
                raise ValueError(
                    f"{name}: conv1x1 does not downsample in time, got temporal_downsample={temporal_downsample}"
                )
            self.convnet = nn.Conv2d(num_channels, out_channels, kernel_size=1, stride=spatial_downsample)
            feature_channels = out_channels
        elif prep_type == "patches":
            feature_channels = num_channels * spatial_downsample**2 * (temporal_downsample if self.is_video else 1)
            if conv_after_patching:
                self.patch_projection = nn.Linear(feature_channels, out_channels)
                feature_channels = out_channels
        else:
            feature_channels = num_channels

        self.positions = GridPositionFeatures(
            self.grid_dims(self.image_shape),
            position_encoding,
            num_bands,
            max_resolution,
            concat_pos,
            sine_only,
            num_position_channels,
            project_dim=project_pos_dim,
        )
        self.num_feature_channels = feature_channels
        self.num_input_channels = combined_channels(
            name, feature_channels, self.positions.num_channels, concat_or_add_pos
        )

    def grid_dims(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Index dims of the output array for an input of ``image_shape`` ((H, W) or (T, H, W))."""
        *time, h, w = image_shape
        s, t = self.spatial_downsample, self.temporal_downsample
        if self.prep_type in ("pixels", "conv1x1"):
            spatial = [math.ceil(h / s), math.ceil(w / s)]
            time = [math.ceil(n / t) for n in time]
        elif self.prep_type == "patches":
            if h % s or w % s or any(n % t for n in time):
                raise ValueError(
                    f"{type(self).__name__}: input {tuple(image_shape)} is not divisible by the patch size "
                    f"{(t, s, s) if time else (s, s)}"
                )
            spatial = [h // s, w // s]
            time = [n // t for n in time if n // t != 1]  # (B, 1, H, W, C) is squeezed, as the official code
        else:
            spatial = [self.convnet.output_size(h), self.convnet.output_size(w)]
        return tuple(time + spatial)

    def _per_frame(self, module: nn.Module, x: Tensor) -> Tensor:
        # (B, C, H, W) -> (B, H', W', C');  (B, T, C, H, W) -> (B, T, H', W', C')
        if x.dim() == 4:
            return module(x).permute(0, 2, 3, 1)
        b, n = x.shape[:2]
        y = module(x.flatten(0, 1))
        return y.unflatten(0, (b, n)).permute(0, 1, 3, 4, 2)

    def features(self, x: Tensor) -> Tensor:
        """Channels-last features before positions: (B, *grid, C_feat)."""
        rank = 5 if self.is_video else 4
        if x.dim() != rank or x.shape[-3] != self.num_channels:
            layout = "(B, T, C, H, W)" if self.is_video else "(B, C, H, W)"
            raise ValueError(
                f"{type(self).__name__} expects {layout} with C={self.num_channels}, got shape {tuple(x.shape)}"
            )
        s, t = self.spatial_downsample, self.temporal_downsample
        if self.prep_type == "pixels":
            if x.dim() == 4:
                return x[:, :, ::s, ::s].permute(0, 2, 3, 1)
            return x[:, ::t, :, ::s, ::s].permute(0, 1, 3, 4, 2)
        if self.prep_type == "patches":
            x = space_to_depth(x, s, t)
            if x.dim() == 5 and x.shape[1] == 1:
                x = x.squeeze(1)
            return self.patch_projection(x) if self.patch_projection is not None else x
        return self._per_frame(self.convnet, x)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.features(x)  # (B, *grid, C_feat)
        grid = feats.shape[1:-1]
        feats = feats.reshape(feats.shape[0], -1, feats.shape[-1])  # (B, M, C_feat)
        pos = self.positions(feats.shape[0], grid, dtype=feats.dtype, device=feats.device)  # (B, M, C_pos)
        return combine_positions(feats, pos, self.concat_or_add_pos)


class DenseOutputAdapter(OutputAdapter):
    """Per-position decoder output (B, N, C) -> optional linear projection, ``/ rescale_factor``,
    and a reshape to the output grid ``(B, *index_dims, C_out)`` when all ``prod(index_dims)``
    positions were decoded (a subsampled decode stays ``(B, N_sub, C_out)``)."""

    def __init__(
        self,
        index_dims: Sequence[int],
        num_input_channels: Optional[int] = None,
        num_output_channels: Optional[int] = None,
        rescale_factor: float = 1.0,
    ):
        super().__init__()
        self.index_dims = tuple(int(d) for d in index_dims)
        if (num_input_channels is None) != (num_output_channels is None):
            raise ValueError("give both num_input_channels and num_output_channels for a projection, or neither")
        self.projection = (
            nn.Linear(num_input_channels, num_output_channels) if num_output_channels is not None else None
        )
        if rescale_factor == 0:
            raise ValueError("rescale_factor must be non-zero")
        self.rescale_factor = rescale_factor

    def forward(self, x: Tensor) -> Tensor:
        if self.projection is not None:
            x = self.projection(x)
        if self.rescale_factor != 1.0:
            x = x / self.rescale_factor
        if x.shape[1] == math.prod(self.index_dims):
            return x.reshape(x.shape[0], *self.index_dims, x.shape[-1])
        return x
