"""Raw audio: patches of consecutive samples with 1-d positions, and the matching output head."""

from __future__ import annotations

from typing import Literal, Optional, Union

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


class AudioInputAdapter(InputAdapter):
    """Waveform ``(B, S)`` (or ``(B, S, 1)``) -> ``(B, S / samples_per_patch, samples_per_patch + C_pos)``.

    Each patch of ``samples_per_patch`` consecutive samples is one input element, with Fourier
    (default ``max_resolution``: the number of patches, as the official code; the Kinetics
    autoencoder uses the number of samples) or trainable positions of the patch index.

    ``forward(waveform, sample_mask=None)``: with a ``(B, S)`` boolean ``sample_mask`` (True =
    valid sample) it also returns a patch mask; a patch is valid when any of its samples is.
    """

    def __init__(
        self,
        num_samples: int,
        samples_per_patch: int = 96,
        position_encoding: PositionKind = "fourier",
        num_bands: int = 192,
        max_resolution: Resolution = None,
        concat_pos: bool = True,
        sine_only: bool = False,
        num_position_channels: int = 256,
        project_pos_dim: Optional[int] = None,
        concat_or_add_pos: Literal["concat", "add"] = "concat",
    ):
        super().__init__()
        name = type(self).__name__
        check_positive(name, num_samples=num_samples, samples_per_patch=samples_per_patch)
        check_choice(name, "concat_or_add_pos", concat_or_add_pos, ("concat", "add"))
        if num_samples % samples_per_patch:
            raise ValueError(
                f"{name}: num_samples={num_samples} is not divisible by samples_per_patch={samples_per_patch}"
            )
        self.num_samples = num_samples
        self.samples_per_patch = samples_per_patch
        self.num_patches = num_samples // samples_per_patch
        self.concat_or_add_pos = concat_or_add_pos
        self.positions = GridPositionFeatures(
            (self.num_patches,),
            position_encoding,
            num_bands,
            max_resolution,
            concat_pos,
            sine_only,
            num_position_channels,
            project_dim=project_pos_dim,
        )
        self.num_input_channels = combined_channels(
            name, samples_per_patch, self.positions.num_channels, concat_or_add_pos, what="samples_per_patch"
        )

    def forward(self, waveform: Tensor, sample_mask: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
        b = waveform.shape[0]
        if waveform.dim() == 3 and waveform.shape[-1] == 1:
            waveform = waveform[..., 0]
        if waveform.dim() != 2 or waveform.shape[1] % self.samples_per_patch:
            raise ValueError(
                f"waveform must be (batch, samples) with samples divisible by {self.samples_per_patch}, "
                f"got shape {tuple(waveform.shape)}"
            )
        x = waveform.reshape(b, -1, self.samples_per_patch)  # (B, P, spp)
        pos = self.positions(b, (x.shape[1],), dtype=x.dtype, device=x.device)  # (B, P, C_pos)
        x = combine_positions(x, pos, self.concat_or_add_pos)
        if sample_mask is None:
            return x
        if tuple(sample_mask.shape) != tuple(waveform.shape):
            raise ValueError(f"sample_mask must be {tuple(waveform.shape)}, got {tuple(sample_mask.shape)}")
        return x, sample_mask.bool().reshape(b, -1, self.samples_per_patch).any(dim=-1)


class AudioOutputAdapter(OutputAdapter):
    """Decoder output per patch (B, P, C) -> linear to ``samples_per_patch`` -> waveform (B, P * spp)."""

    def __init__(self, num_input_channels: int, samples_per_patch: int):
        super().__init__()
        check_positive(type(self).__name__, num_input_channels=num_input_channels, samples_per_patch=samples_per_patch)
        self.projection = nn.Linear(num_input_channels, samples_per_patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(x).reshape(x.shape[0], -1)
