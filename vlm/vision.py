"""Frozen open_clip vision tower that returns its final feature grid as tokens (not only the pooled embedding).

Any tower open_clip builds works: ``VisionTransformer`` (patch tokens after ``ln_post``, as OpenFlamingo reads
them), ``ModifiedResNet`` (the CLIP RN50/RN101 family: the ``layer4`` grid before attention pooling) and
``TimmModel`` (any timm trunk: the trunk's final features before its pooling and classifier, e.g. 1280 x 7 x 7
for EfficientNet-Lite0 at 224 px). All are read through the ``forward_intermediates`` API (open_clip's for its own
towers, timm's for a timm trunk, whose final features open_clip's wrapper only returns pooled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor, nn


def _timm_trunk(visual: nn.Module) -> Optional[nn.Module]:
    trunk = getattr(visual, "trunk", None)  # open_clip's TimmModel wraps a timm model as `trunk`
    return trunk if trunk is not None and hasattr(trunk, "forward_intermediates") else None


def feature_grid_tokens(visual: nn.Module, images: Tensor) -> Tensor:
    """images (N, C, H, W) -> the tower's final feature grid as tokens (N, v, D), v = h * w."""
    trunk = _timm_trunk(visual)
    if trunk is not None:
        final, _ = trunk.forward_intermediates(images, indices=1, intermediates_only=False)
        if final.dim() == 4:  # (N, D, h, w)
            return final.flatten(2).transpose(1, 2)
        return final[:, getattr(trunk, "num_prefix_tokens", 0) :]  # a timm ViT: (N, prefix + v, D)
    if not hasattr(visual, "forward_intermediates"):
        raise ValueError(f"{type(visual).__name__} has no forward_intermediates; use a tower built by open_clip")
    out = visual.forward_intermediates(
        images, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NCHW"
    )
    grid = out["image_intermediates"][-1]  # (N, D, h, w), prefix (class) tokens removed
    return grid.flatten(2).transpose(1, 2)


def _image_size(visual: nn.Module) -> tuple[int, int]:
    size = getattr(visual, "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def feature_width(visual: nn.Module) -> int:
    """D of :func:`feature_grid_tokens`, from the tower's sizes (a one-image probe for towers that do not say)."""
    trunk = _timm_trunk(visual)
    if trunk is not None and isinstance(getattr(trunk, "num_features", None), int):
        return trunk.num_features
    width = getattr(getattr(visual, "transformer", None), "width", None)  # VisionTransformer
    if isinstance(width, int):
        return width
    attnpool = getattr(visual, "attnpool", None)  # ModifiedResNet: layer4's channels feed the attention pool
    if attnpool is not None and hasattr(attnpool, "k_proj"):
        return attnpool.k_proj.in_features
    param = next(visual.parameters())
    with torch.no_grad():
        probe = torch.zeros(1, 3, *_image_size(visual), dtype=param.dtype, device=param.device)
        return int(feature_grid_tokens(visual, probe).shape[-1])


class ClipVisionEncoder(nn.Module):
    """Wraps an open_clip vision tower (``model.visual``): images (N, C, H, W) -> tokens (N, v, D).

    ``D`` is the width of the final feature grid (for a ViT the transformer width: the patch tokens are taken
    before CLIP's output projection, the same features OpenFlamingo feeds its resampler). When ``frozen`` the tower
    has no trainable parameters, stays in eval mode (BatchNorm statistics included) and runs without autograd.
    """

    def __init__(self, visual: nn.Module, num_channels: Optional[int] = None, frozen: bool = True):
        super().__init__()
        if _timm_trunk(visual) is None and not hasattr(visual, "forward_intermediates"):
            raise ValueError(
                f"{type(visual).__name__} cannot return a feature grid; use a tower built by open_clip "
                "(VisionTransformer, ModifiedResNet or TimmModel)"
            )
        self.visual = visual
        self.num_channels = int(num_channels) if num_channels is not None else feature_width(visual)
        # a convolutional tower reads its images channels-last: the same features, and the oneDNN convolutions of
        # EfficientNet-Lite0 in bf16 take 0.29 s instead of 0.44 s for 26 images on 2 CPU cores
        self.channels_last = not hasattr(visual, "transformer") and any(
            isinstance(m, nn.Conv2d) for m in visual.modules()
        )
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
        """images: (N, C, H, W) -> tokens (N, v, D)."""
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return feature_grid_tokens(self.visual, images)

    @torch.no_grad()
    def pooled(self, images: Tensor) -> Tensor:
        """The tower's own pooled (and projected) image embedding, (N, embed_dim): CLIP's ``encode_image``."""
        out = self.visual(images)
        return out[0] if isinstance(out, tuple) else out


def create_vision_encoder(
    name: str, pretrained: Optional[str] = None, frozen: bool = True, image_size: Optional[int] = None
) -> tuple[ClipVisionEncoder, Callable]:
    """Any open_clip model by name, or a named offline base (:mod:`vlm.bases`, e.g. ``"efficientnet-lite0"``).

    ``pretrained`` is an open_clip tag (for a named base: its tag, ``"imagenet"``), a local checkpoint file, or None
    (random weights). ``image_size``: the images' side instead of the model's own (open_clip's ``force_image_size``).
    Returns the vision encoder and the model's evaluation preprocessing transform (PIL -> tensor).
    """
    import open_clip

    from . import bases

    kwargs = {}
    if name in bases.VISION_BASES:
        base = bases.VISION_BASES[name]
        prepared = bases.prepare_vision_base(name)
        open_clip.add_model_config(prepared.config_dir)
        if pretrained == base.pretrained_tag:
            pretrained = str(prepared.checkpoint)
        elif pretrained is not None and not _is_file(pretrained):
            raise ValueError(
                f"clip_vision_encoder_pretrained={pretrained!r} for the base {name!r}: expected "
                f"{base.pretrained_tag!r}, a checkpoint file, or None (random weights)"
            )
        kwargs = {"image_mean": prepared.mean, "image_std": prepared.std}
    if image_size is not None:
        kwargs["force_image_size"] = image_size
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, **kwargs)
    return ClipVisionEncoder(model.visual, frozen=frozen), preprocess


def _is_file(path: str) -> bool:
    import os

    return os.path.isfile(path)
