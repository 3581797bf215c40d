"""``create_model_and_transforms`` with OpenFlamingo's argument names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from .config import FlamingoConfig
from .model import Flamingo
from .vision import create_vision_encoder

MEDIA_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"


def create_model_and_transforms(
    clip_vision_encoder_path: str,
    clip_vision_encoder_pretrained: Optional[str],
    lang_encoder_path: str,
    tokenizer_path: str,
    cross_attn_every_n_layers: int = 1,
    use_local_files: bool = False,
    decoder_layers_attr_name: Optional[str] = None,
    freeze_lm_embeddings: bool = False,
    **config_kwargs,
) -> tuple[Flamingo, Callable, object]:
    """Build a Flamingo model from an open_clip vision tower and a Hugging Face causal LM.

    ``clip_vision_encoder_path`` is an open_clip model name, ``clip_vision_encoder_pretrained`` an
    open_clip pretrained tag, a local checkpoint file, or None (random weights).
    ``lang_encoder_path`` / ``tokenizer_path`` are hub ids, local directories, or named offline bases
    (:mod:`vlm.bases`: ``"efficientnet-lite0"``, ``"efficientnet-lite2"`` for the vision tower, ``"smollm2-135m"``
    for the LM and tokenizer; prepared once into a cache directory, then read from there). ``<|endofchunk|>``
    and ``<image>`` (and ``<PAD>`` if the tokenizer has no pad token) are added to the tokenizer in
    OpenFlamingo's order, so token ids agree with OpenFlamingo's. Further keyword arguments are
    :class:`~vlm.config.FlamingoConfig` fields (resampler/cross-attention sizes, ...).

    Returns ``(model, image_processor, tokenizer)``; the latter two are also ``model.image_processor``
    and ``model.tokenizer``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .bases import hub_reachable, needs_hub, resolve_language_path

    config = FlamingoConfig(
        clip_vision_encoder_path=clip_vision_encoder_path,
        clip_vision_encoder_pretrained=clip_vision_encoder_pretrained,
        lang_encoder_path=lang_encoder_path,
        tokenizer_path=tokenizer_path,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        decoder_layers_attr_name=decoder_layers_attr_name,
        freeze_lm_embeddings=freeze_lm_embeddings,
        **config_kwargs,
    )
    if not use_local_files and (needs_hub(tokenizer_path) or needs_hub(lang_encoder_path)) and not hub_reachable():
        use_local_files = True  # offline: the local cache or a quick error, not a minute of retries
    tokenizer = AutoTokenizer.from_pretrained(resolve_language_path(tokenizer_path), local_files_only=use_local_files)
    num_base = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK_TOKEN, MEDIA_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    num_new = len(tokenizer) - num_base
    media_token_id = tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
    eoc_token_id = tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN)
    if num_new < 1:
        raise ValueError(f"the tokenizer at {tokenizer_path!r} already has {MEDIA_TOKEN} and {END_OF_CHUNK_TOKEN}")

    lang_encoder = AutoModelForCausalLM.from_pretrained(
        resolve_language_path(lang_encoder_path), local_files_only=use_local_files
    )
    vision_encoder, image_processor = create_vision_encoder(
        clip_vision_encoder_path,
        clip_vision_encoder_pretrained,
        frozen=config.freeze_vision_encoder,
        image_size=config.vision_image_size,
    )
    model = Flamingo(
        vision_encoder,
        lang_encoder,
        config,
        media_token_id=media_token_id,
        eoc_token_id=eoc_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_base_tokens=num_base,
        num_new_tokens=num_new,
    )
    model.tokenizer = tokenizer
    model.image_processor = image_processor
    return model, image_processor, tokenizer
