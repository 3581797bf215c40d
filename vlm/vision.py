"""Frozen open_clip vision tower that returns patch tokens (not only the pooled embedding)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor, nn


class ClipVisionEncoder(nn.Module):
    """Wraps an open_clip ``VisionTransformer`` (``model.visual``): images (N, C, H, W) -> (N, v, D).

    ``D`` is the transformer width (the patch tokens are taken before CLIP's output projection), the
    same features OpenFlamingo feeds its resampler. When ``frozen`` the tower has no trainable
    parameters, stays in eval mode and runs without autograd.
    """

    def __init__(self, visual: nn.Module, num_channels: int, frozen: bool = True):
        super().__init__()
        if not hasattr(visual, "output_tokens"):
            raise ValueError(
                f"{type(visual).__name__} cannot return patch tokens; use an open_clip ViT tower "
                "(a model whose `visual` is a VisionTransformer)"
            )
        visual.output_tokens = True  # open_clip's switch: forward returns (pooled, patch tokens)
        self.visual = visual
        self.num_channels = num_channels
        self.frozen = frozen
        if frozen:
            self.visual.requires_grad_(False)
            self.visual.eval()

    def train(self, mode: bool = True) -> ClipVisionEncoder:
        super().train(mode)
        if self.frozen:
            self.visual.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """images: (N, C, H, W) -> patch tokens (N, v, D)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            _, tokens = self.visual(images)
        return tokens


def create_vision_encoder(
    name: str, pretrained: Optional[str] = None, frozen: bool = True
) -> tuple[ClipVisionEncoder, Callable]:
    """Any open_clip model by name; ``pretrained`` is a tag, a local checkpoint file, or None (random).

    Returns the vision encoder and the model's evaluation preprocessing transform (PIL -> tensor).
    """
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    visual = model.visual
    width = getattr(getattr(visual, "transformer", None), "width", None)  # ViT towers only
    if width is None or not hasattr(visual, "output_tokens"):
        raise ValueError(
            f"open_clip model {name!r} has a {type(visual).__name__} vision tower; patch tokens need a "
            "VisionTransformer tower"
        )
    return ClipVisionEncoder(visual, int(width), frozen=frozen), preprocess
