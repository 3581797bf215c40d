"""Flamingo-style vision-language model: a frozen open_clip vision tower whose patch features a
Perceiver Resampler turns into latent tokens, read by gated cross-attention layers inserted into a
frozen Hugging Face causal language model, prompted with interleaved images and text."""

from . import bases
from .config import FlamingoConfig
from .cross_attention import GatedCrossAttentionBlock, media_attention_mask
from .embeddings import DecoupledEmbedding, DecoupledLMHead
from .factory import END_OF_CHUNK_TOKEN, MEDIA_TOKEN, create_model_and_transforms
from .few_shot import build_few_shot_prompt, few_shot
from .lm_wrapping import FlamingoLayer, find_decoder_layers
from .media_context import MediaConditioning
from .model import Flamingo
from .openflamingo import load_openflamingo_checkpoint
from .processor import FlamingoInputs, FlamingoProcessor
from .vision import ClipVisionEncoder, create_vision_encoder

__all__ = [
    "END_OF_CHUNK_TOKEN",
    "MEDIA_TOKEN",
    "ClipVisionEncoder",
    "DecoupledEmbedding",
    "DecoupledLMHead",
    "Flamingo",
    "FlamingoConfig",
    "FlamingoInputs",
    "FlamingoProcessor",
    "FlamingoLayer",
    "GatedCrossAttentionBlock",
    "MediaConditioning",
    "build_few_shot_prompt",
    "create_model_and_transforms",
    "create_vision_encoder",
    "few_shot",
    "find_decoder_layers",
    "load_openflamingo_checkpoint",
    "media_attention_mask",
    "bases",
]
