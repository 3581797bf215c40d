"""Interleaved images and text -> ``vision_x``, ``media_mask``, ``input_ids``, ``attention_mask``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

from .factory import MEDIA_TOKEN

Item = Union[str, Tensor, Any]  # text, a preprocessed image tensor, or a PIL image


@dataclass
class FlamingoInputs:
    """Model inputs of a batch; ``vision_x`` / ``media_mask`` are None when the batch has no image."""

    vision_x: Optional[Tensor]  # (B, T_img, F, C, H, W), zeros in padding slots
    media_mask: Optional[Tensor]  # (B, T_img) bool, True = image present
    input_ids: Tensor  # (B, L)
    attention_mask: Tensor  # (B, L)

    def to(self, device) -> FlamingoInputs:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return FlamingoInputs(
            move(self.vision_x), move(self.media_mask), move(self.input_ids), move(self.attention_mask)
        )


class FlamingoProcessor:
    """Turns a batch of interleaved examples into model inputs.

    Each example is a list whose items are strings (text), PIL images (run through
    ``image_processor``), image tensors (C, H, W) already preprocessed, or video tensors
    (F, C, H, W). Every image becomes an ``<image>`` token at its place in the text. Examples with
    fewer images are padded with zero images marked absent in ``media_mask``; text is padded on the
    left by default (what generation needs), or on the right for training.
    """

    def __init__(self, tokenizer: Any, image_processor: Optional[Callable] = None, media_token: str = MEDIA_TOKEN):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.media_token = media_token
        self.media_token_id = tokenizer.convert_tokens_to_ids(media_token)
        if self.media_token_id is None or self.media_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no {media_token!r} token; build it with vlm.create_model_and_transforms"
            )

    def _image(self, item: Any, where: str) -> Tensor:
        if isinstance(item, Tensor):
            if item.dim() not in (3, 4):
                raise ValueError(
                    f"{where}: image tensors must be (C, H, W) or (F, C, H, W), got shape {tuple(item.shape)}"
                )
            image = item[None] if item.dim() == 3 else item  # (F, C, H, W)
            source = "image tensor"
        else:
            if self.image_processor is None:
                raise ValueError(f"{where}: got a {type(item).__name__} image but the processor has no image_processor")
            image = self.image_processor(item)
            if not isinstance(image, Tensor) or image.dim() != 3:
                raise ValueError(
                    f"{where}: image_processor must return a (C, H, W) tensor, got {type(image).__name__} "
                    f"of shape {tuple(getattr(image, 'shape', ()))}"
                )
            image = image[None]
            source = "image_processor output"
        if not image.is_floating_point():
            raise ValueError(
                f"{where}: {source} has dtype {image.dtype}; expected preprocessed floating-point pixels (pass PIL "
                "images to be run through the image_processor, or tensors it produced)"
            )
        if not bool(torch.isfinite(image).all()):
            bad = int((~torch.isfinite(image)).sum())
            raise ValueError(f"{where}: {source} holds {bad} NaN/Inf value(s); expected finite pixels")
        return image

    def __call__(
        self,
        batch: Sequence[Sequence[Item]],
        padding_side: Literal["left", "right"] = "left",
        max_length: Optional[int] = None,
    ) -> FlamingoInputs:
        if isinstance(batch, (str, bytes)) or not all(isinstance(ex, (list, tuple)) for ex in batch):
            raise ValueError("batch must be a list of examples, each a list of strings and images")
        if len(batch) == 0:
            raise ValueError("batch is empty: expected at least one example (a list of strings and images)")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts, images = [], []
        for i, example in enumerate(batch):
            parts, imgs = [], []
            for item in example:
                if isinstance(item, str):
                    if self.media_token in item:
                        raise ValueError(f"example {i}: pass images as items, not {self.media_token!r} inside text")
                    parts.append(item)
                else:
                    imgs.append(self._image(item, f"example {i}, image {len(imgs)}"))
                    parts.append(self.media_token)
            texts.append("".join(parts))
            images.append(imgs)
        enc = self.tokenizer(
            texts,
            padding="longest",
            padding_side=padding_side,
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        )
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        lengths = attention_mask.sum(dim=1).tolist() if input_ids.numel() else [0] * len(batch)
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(
                f"example(s) {empty} give no tokens (empty text and no image); expected at least one text or image item"
            )
        counts = (input_ids == self.media_token_id).sum(dim=1).tolist()
        for i, (count, imgs) in enumerate(zip(counts, images)):
            if count != len(imgs):
                raise ValueError(
                    f"example {i}: {len(imgs)} images but {count} {self.media_token} tokens after tokenization"
                )
        t_max = max(len(imgs) for imgs in images)
        if t_max == 0:
            return FlamingoInputs(None, None, input_ids, attention_mask)
        first = next(img for imgs in images for img in imgs)
        shapes = {tuple(img.shape) for imgs in images for img in imgs}
        if len(shapes) != 1:
            raise ValueError(
                f"all images must have the same (F, C, H, W) shape after preprocessing, got {sorted(shapes)}"
            )
        vision_x = first.new_zeros(len(batch), t_max, *first.shape)  # (B, T_img, F, C, H, W)
        media_mask = torch.zeros(len(batch), t_max, dtype=torch.bool)
        for i, imgs in enumerate(images):
            for j, img in enumerate(imgs):
                vision_x[i, j] = img
                media_mask[i, j] = True
        return FlamingoInputs(vision_x, media_mask, input_ids, attention_mask)
