"""Typed, self-validating configuration of the Flamingo-style model.

It names the frozen bases (an open_clip vision tower and a Hugging Face causal LM with its
tokenizer) and holds the sizes of the parts trained on top of them. Defaults equal OpenFlamingo's
(resampler: depth 6, 64 latents, 8 heads of 64; cross-attention: 8 heads of 64, MLP x4), so its
checkpoints load into a default-configured model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional


def _positive_int(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


@dataclass
class FlamingoConfig:
    """Everything needed to rebuild a model: base components by name/path plus the added parts' sizes.

    ``clip_vision_encoder_pretrained``: an open_clip pretrained tag, a local checkpoint file, or
    ``None`` for random weights. ``decoder_layers_attr_name`` (e.g. ``"model.layers"``) overrides the
    automatic search for the LM's decoder-layer list. ``freeze_lm_embeddings`` also freezes the rows
    of the added tokens (``<image>``, ``<|endofchunk|>``). ``resampler_channels``: the width of the resampler's
    latents and so of the media the cross-attention reads (None: the vision tower's width, as Flamingo); a
    smaller width projects the tower's features down first. ``vision_image_size``: the side of the square images
    the tower reads (its transform resizes to it; None: the tower's own size). A convolutional tower reads any size;
    a smaller one costs less and gives a coarser feature grid (open_clip's ``force_image_size``).
    """

    clip_vision_encoder_path: str
    clip_vision_encoder_pretrained: Optional[str]
    lang_encoder_path: str
    tokenizer_path: str
    vision_image_size: Optional[int] = None
    cross_attn_every_n_layers: int = 1
    decoder_layers_attr_name: Optional[str] = None
    only_attend_immediate_media: bool = True
    resampler_depth: int = 6
    resampler_num_latents: int = 64
    resampler_num_heads: int = 8
    resampler_head_channels: int = 64
    resampler_widening_factor: int = 4
    resampler_channels: Optional[int] = None
    max_num_media: Optional[int] = None
    max_num_frames: Optional[int] = None
    max_num_media_tokens: Optional[int] = None
    cross_attn_num_heads: int = 8
    cross_attn_head_channels: int = 64
    cross_attn_widening_factor: int = 4
    freeze_vision_encoder: bool = True
    freeze_lm_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("clip_vision_encoder_path", "lang_encoder_path", "tokenizer_path"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"FlamingoConfig.{name} must be a non-empty string, got {value!r}")
        if self.clip_vision_encoder_pretrained is not None and not isinstance(self.clip_vision_encoder_pretrained, str):
            raise ValueError(
                "FlamingoConfig.clip_vision_encoder_pretrained must be a tag, a file path or None, "
                f"got {self.clip_vision_encoder_pretrained!r}"
            )
        _positive_int(
            self,
            "cross_attn_every_n_layers",
            "resampler_depth",
            "resampler_num_latents",
            "resampler_num_heads",
            "resampler_head_channels",
            "resampler_widening_factor",
            "cross_attn_num_heads",
            "cross_attn_head_channels",
            "cross_attn_widening_factor",
        )
        for name in (
            "max_num_media",
            "max_num_frames",
            "max_num_media_tokens",
            "resampler_channels",
            "vision_image_size",
        ):
            if getattr(self, name) is not None:
                _positive_int(self, name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FlamingoConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown FlamingoConfig keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)
