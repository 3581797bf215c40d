"""Video: frames x patches with 3-d (time, height, width) positions, and per-pixel video decoding.

Input ``(B, T, C, H, W)``. The Kinetics autoencoder of Perceiver IO uses 1x4x4 space-to-depth
patches with 32 Fourier bands over the (T, H, W) grid; decoding queries are Fourier features of
every output pixel (``VideoQueryProvider``), subsampled during training (decode only the
requested points), and ``VideoOutputAdapter`` projects them to pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional

from .common import GridQueryProvider, PositionKind, Resolution, SubsampleMode, check_choice
from .image import DenseOutputAdapter, ImageInputAdapter


class VideoInputAdapter(ImageInputAdapter):
    """Video ``(B, T, C, H, W)`` -> ``(B, T/t * H/s * W/s, C_in)``: space-to-depth ``t x s x s``
    patches (``prep_type="patches"``, default) or strided pixels, with 3-d positions."""

    def __init__(
        self,
        video_shape: Sequence[int],
        num_channels: int = 3,
        prep_type: Literal["patches", "pixels"] = "patches",
        spatial_patch_size: int = 4,
        temporal_patch_size: int = 1,
        position_encoding: PositionKind = "fourier",
        num_bands: int = 32,
        max_resolution: Resolution = None,
        concat_pos: bool = True,
        sine_only: bool = False,
        num_position_channels: int = 256,
        project_pos_dim: Optional[int] = None,
        concat_or_add_pos: Literal["concat", "add"] = "concat",
        conv_after_patching: bool = False,
        out_channels: int = 64,
    ):
        if len(tuple(video_shape)) != 3:
            raise ValueError(f"video_shape must be (T, H, W), got {tuple(video_shape)}")
        check_choice(type(self).__name__, "prep_type", prep_type, ("patches", "pixels"))
        super().__init__(
            video_shape,
            num_channels=num_channels,
            prep_type=prep_type,
            spatial_downsample=spatial_patch_size,
            temporal_downsample=temporal_patch_size,
            out_channels=out_channels,
            conv_after_patching=conv_after_patching,
            position_encoding=position_encoding,
            num_bands=num_bands,
            max_resolution=max_resolution,
            concat_pos=concat_pos,
            sine_only=sine_only,
            num_position_channels=num_position_channels,
            project_pos_dim=project_pos_dim,
            concat_or_add_pos=concat_or_add_pos,
        )


class VideoQueryProvider(GridQueryProvider):
    """Fourier queries of every output pixel of a ``(T, H, W)`` video; ``subsampled_points`` are
    flat indices in ``T * H * W`` (decode only those pixels)."""

    def __init__(
        self,
        video_shape: Sequence[int],
        num_bands: int = 32,
        max_resolution: Resolution = None,
        concat_pos: bool = True,
        sine_only: bool = False,
        project_dim: Optional[int] = None,
        subsample_mode: SubsampleMode = "slice",
    ):
        if len(tuple(video_shape)) != 3:
            raise ValueError(f"video_shape must be (T, H, W), got {tuple(video_shape)}")
        super().__init__(
            video_shape,
            "fourier",
            num_bands,
            max_resolution,
            concat_pos,
            sine_only,
            project_dim=project_dim,
            subsample_mode=subsample_mode,
        )


class VideoOutputAdapter(DenseOutputAdapter):
    """Decoder output per pixel (B, N, C) -> linear to ``num_output_channels`` (3 = RGB) ->
    ``(B, T, H, W, C_out)`` for a full decode, ``(B, N_sub, C_out)`` for a subsampled one."""

    def __init__(self, video_shape: Sequence[int], num_input_channels: int, num_output_channels: int = 3):
        if len(tuple(video_shape)) != 3:
            raise ValueError(f"video_shape must be (T, H, W), got {tuple(video_shape)}")
        super().__init__(video_shape, num_input_channels, num_output_channels)
