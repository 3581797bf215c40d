"""Scoped media conditioning of the wrapped language model.

The cross-attention layers live inside the Hugging Face model, which is called with text only. The
images' latents reach them through a :class:`MediaConditioning` object shared by the model and its
:class:`~vlm.lm_wrapping.FlamingoLayer` s: ``with conditioning.activate(lm, latents, media_mask):``
installs the media for the duration of the block (one forward pass or one whole ``generate`` call)
and always clears it afterwards, so no state outlives the call that needed it.

Inside the block a forward pre-hook on the language model reads each call's ``input_ids`` and keeps
the media bookkeeping right across incremental decoding: for every token, the number of ``<image>``
tokens up to and including it (its "text time"), continued across calls that extend the KV cache
and restarted by calls without a cache. It also holds each cross-attention layer's projected media
keys/values, computed on the first call and reused by every later one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from .cross_attention import media_attention_mask


@dataclass
class MediaState:
    """Media of one forward/generate call; rows are expanded on the first LM call if the LM batch is
    a multiple of the media batch (beam search / several return sequences per prompt)."""

    latents: Tensor  # (B, T_img, n, D)
    media_mask: Tensor  # (B, T_img) bool, True = image present
    text_time: Optional[Tensor] = None  # (R, L) of the current LM call
    attn_mask: Optional[Tensor] = None  # (R, 1, L, T_img * n), built once per LM call
    count: Optional[Tensor] = None  # (R,) <image> tokens seen so far
    seen: int = 0  # tokens consumed so far (= LM cache length)
    kv: dict = field(default_factory=dict)  # layer index -> (k, v) of the media

    @property
    def flat_latents(self) -> Tensor:
        b, t, n, d = self.latents.shape
        return self.latents.reshape(b, t * n, d)  # (B, T_img * n, D)


def _past_length(kwargs: dict, input_len: int) -> int:
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is not None:
            if hasattr(cache, "get_seq_length"):
                return int(cache.get_seq_length())
            if isinstance(cache, (tuple, list)) and len(cache) and cache[0] is not None:
                return int(cache[0][0].shape[-2])  # legacy tuple cache: (k, v) per layer
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return mask.shape[1] - input_len
    return 0


class MediaConditioning:
    """Holds the active :class:`MediaState` (or None) and serves the cross-attention layers."""

    def __init__(self, media_token_id: int, only_attend_immediate_media: bool = True):
        self.media_token_id = media_token_id
        self.only_attend_immediate_media = only_attend_immediate_media
        self.state: Optional[MediaState] = None

    @contextmanager
    def activate(self, lm: nn.Module, latents: Tensor, media_mask: Tensor) -> Iterator[MediaState]:
        if self.state is not None:
            raise RuntimeError("media conditioning is already active (nested Flamingo calls are not supported)")
        self.state = MediaState(latents=latents, media_mask=media_mask)
        handle = lm.register_forward_pre_hook(self._observe_input_ids, with_kwargs=True)
        try:
            yield self.state
        finally:
            handle.remove()
            self.state = None

    def _observe_input_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        st = self.state
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError(
                "the Flamingo language model needs input_ids (the <image> positions are read from them); "
                "inputs_embeds alone are not supported"
            )
        rows, length = ids.shape
        if st.latents.shape[0] != rows:
            b = st.latents.shape[0]
            if st.count is not None or rows % b != 0:
                raise ValueError(f"language batch of {rows} rows does not match {b} examples of media")
            st.latents = st.latents.repeat_interleave(rows // b, dim=0)
            st.media_mask = st.media_mask.repeat_interleave(rows // b, dim=0)
            st.kv.clear()
        past = _past_length(kwargs, length)
        if past == 0:
            count = torch.zeros(rows, dtype=torch.long, device=ids.device)
        elif past == st.seen and st.count is not None:
            count = st.count
        else:
            raise RuntimeError(
                f"the language model's cache holds {past} tokens but this media context has seen {st.seen}; "
                "incremental decoding must run inside one context (use Flamingo.generate)"
            )
        st.text_time = count[:, None] + (ids == self.media_token_id).long().cumsum(dim=1)  # (R, L)
        st.count = st.text_time[:, -1] if length else count
        st.seen = past + length
        st.attn_mask = None

    def cross_attend(self, layer_index: int, block: nn.Module, x: Tensor) -> Tensor:
        """Run ``block`` (a GatedCrossAttentionBlock) on hidden states x (R, L, C) with the active media."""
        st = self.state
        if st is None or st.text_time is None:
            raise RuntimeError(
                "Flamingo cross-attention layer called without media; call the Flamingo model "
                "(forward/generate), not its language model directly"
            )
        if x.shape[:2] != st.text_time.shape:
            raise RuntimeError(
                f"hidden states {tuple(x.shape[:2])} do not match the observed input_ids {tuple(st.text_time.shape)}"
            )
        if st.attn_mask is None:
            st.attn_mask = media_attention_mask(
                st.text_time, st.media_mask, st.latents.shape[2], self.only_attend_immediate_media
            )
        x, st.kv[layer_index] = block(x, st.flat_latents, st.attn_mask, st.kv.get(layer_index))
        return x
