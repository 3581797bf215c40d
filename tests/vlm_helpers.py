"""Tiny, offline building blocks for the vision-language tests.

Everything is built from configs with random weights and saved to temporary directories, so the
tests go through the real loading code paths (open_clip by name, ``AutoModelForCausalLM`` and
``AutoTokenizer`` from local directories) without a model hub.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch

TINY_CLIP = "tiny-vit-vlm-test"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
IMAGE_SIZE = TINY_CLIP_CFG["vision_cfg"]["image_size"]
VISION_WIDTH = TINY_CLIP_CFG["vision_cfg"]["width"]

CORPUS = [
    "a photo of a cat sitting on a mat",
    "a photo of a dog running in the park",
    "Output: two birds on a branch",
    "the quick brown fox jumps over the lazy dog",
    "Question: what is in the image? Answer: a red car",
]

# Small cross-attention/resampler widths for the model's own tests (the OpenFlamingo parity test uses
# OpenFlamingo's fixed defaults instead).
SMALL_KWARGS = dict(
    resampler_depth=2,
    resampler_num_latents=4,
    resampler_num_heads=2,
    resampler_head_channels=8,
    cross_attn_num_heads=2,
    cross_attn_head_channels=8,
)


def register_tiny_clip(directory: str | os.PathLike) -> str:
    """Register the tiny open_clip ViT config under ``TINY_CLIP`` and return its name."""
    import open_clip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(directory)
    return TINY_CLIP


def save_tiny_clip_checkpoint(path: str | os.PathLike, seed: int = 0) -> str:
    """Random tiny CLIP weights saved as a local open_clip checkpoint file (usable as ``pretrained``)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    torch.save(model.state_dict(), path)
    return str(path)


def save_tiny_tokenizer(directory: str | os.PathLike, vocab_size: int = 300) -> str:
    """Byte-level BPE tokenizer trained on a few sentences, saved as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="</s>")
    fast.save_pretrained(directory)
    return str(directory)


def tiny_lm_config(family: str, vocab_size: int):
    """Tiny configs (2 layers, width 32) of four causal LM families."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    if family == "opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise ValueError(f"unknown family {family!r}")


def save_tiny_lm(directory: str | os.PathLike, family: str, vocab_size: int = 300, seed: int = 0) -> str:
    """A randomly initialised tiny causal LM saved with ``save_pretrained``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_lm_config(family, vocab_size))
    model.save_pretrained(directory)
    return str(directory)


def random_images(*shape: int, seed: int = 0) -> torch.Tensor:
    """Preprocessed-image-like tensors (..., 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def import_open_flamingo():
    """Import the ``open-flamingo`` reference package.

    It is installed with ``--no-deps``; its only import-time helper missing from this environment is
    ``einops_exts.rearrange_many`` (einops ``rearrange`` applied to each tensor of a sequence), which
    is provided here when the ``einops-exts`` package itself is not installed.
    """
    try:
        import einops_exts  # noqa: F401
    except ImportError:
        from einops import rearrange

        shim = types.ModuleType("einops_exts")
        shim.rearrange_many = lambda tensors, pattern, **kw: tuple(rearrange(t, pattern, **kw) for t in tensors)
        sys.modules["einops_exts"] = shim
    import open_flamingo

    return open_flamingo


def openflamingo_greedy(ref, vision_x, input_ids, attention_mask, new_tokens: int):
    """Greedy decoding with an ``open-flamingo`` model, as its ``generate`` runs it.

    Its ``generate`` does not run on transformers 5.x (``FlamingoLMMixin.forward`` requires ``attention_mask``
    positionally, which the generation prefill does not pass), so this is the loop it delegates to: images
    encoded once, then the LM called token by token with its KV cache; ``<image>`` is never chosen.
    """
    ref.lang_encoder._use_cached_vision_x = True
    ref._encode_vision_x(vision_x=vision_x)
    try:
        # transformers 5.x names the KV cache argument/output `cache` (older versions `past_key_values`)
        cache_arg = next(
            (
                "cache"
                for cls in type(ref.lang_encoder).__mro__
                if "forward" in vars(cls) and "cache" in inspect.signature(cls.forward).parameters
            ),
            None,
        )
        ids, mask, past, step_ids = input_ids, attention_mask, None, input_ids
        for _ in range(new_tokens):
            kw = {cache_arg or "past_key_values": past}
            out = ref.lang_encoder(input_ids=step_ids, attention_mask=mask, use_cache=True, **kw)
            logits = out.logits[:, -1]
            logits[:, ref.media_token_id] = -float("inf")
            step_ids = logits.argmax(-1, keepdim=True)
            past = out["cache"] if "cache" in out else out.past_key_values
            ids = torch.cat([ids, step_ids], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return ids
    finally:
        ref.lang_encoder.clear_conditioned_layers()
        ref.lang_encoder._use_cached_vision_x = False


def filter_state_dict_like_openflamingo(of_model, state_dict: dict) -> dict:
    """What OpenFlamingo's training loop saves (``train_utils.filter_state_dict_to_trainable``).

    Frozen parameters are dropped except those whose name contains "embed"; the duplicate views
    ``lang_encoder.old_decoder_blocks`` / ``lang_encoder.gated_cross_attn_layers`` and the vision
    encoder are dropped. (Re-stated here because importing ``open_flamingo.train`` needs wandb.)
    """
    state_dict = dict(state_dict)
    for name, p in of_model.named_parameters():
        if "embed" in name:
            continue
        if not p.requires_grad:
            state_dict.pop(name, None)
    for name in list(state_dict):
        if (
            "lang_encoder.old_decoder_blocks" in name
            or "lang_encoder.gated_cross_attn_layers" in name
            or "vision_encoder" in name
        ):
            del state_dict[name]
    return state_dict


FAMILIES = ("llama", "gpt2", "gpt_neox", "opt")
# gpt_neox gets a padded vocabulary (more embedding rows than tokenizer entries), as many real LMs have.
LM_VOCAB = {"llama": 300, "gpt2": 300, "gpt_neox": 320, "opt": 300}


@functools.cache
def tiny_assets() -> dict:
    """Build (once per test process) the tiny CLIP config + checkpoint, tokenizer and four LMs."""
    root = Path(tempfile.mkdtemp(prefix="vlm-test-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    register_tiny_clip(root / "clip")
    assets = {
        "root": str(root),
        "clip": TINY_CLIP,
        "clip_dir": str(root / "clip"),
        "clip_ckpt": save_tiny_clip_checkpoint(root / "clip" / "tiny_clip.pt"),
        "tokenizer": save_tiny_tokenizer(root / "tokenizer"),
    }
    for family in FAMILIES:
        assets[family] = save_tiny_lm(root / family, family, vocab_size=LM_VOCAB[family])
    return assets


def build_model(family: str = "llama", pretrained: str | None = "ckpt", seed: int = 0, **kwargs):
    """A small Flamingo on the tiny assets (eval mode). ``pretrained="ckpt"`` uses the saved CLIP file."""
    import vlm

    a = tiny_assets()
    torch.manual_seed(seed)
    cfg = {**SMALL_KWARGS, **kwargs}
    model, image_processor, tokenizer = vlm.create_model_and_transforms(
        a["clip"], a["clip_ckpt"] if pretrained == "ckpt" else pretrained, a[family], a["tokenizer"], **cfg
    )
    return model.eval(), image_processor, tokenizer


def set_gates(model, value: float = 1.0) -> None:
    """Open all tanh gates (they start at 0, where the cross-attention blocks are the identity)."""
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(value)
            block.mlp_gate.fill_(value)


def export_with_clip_config(model, directory: Path) -> Path:
    """``model.save_pretrained(directory)`` plus the tiny open_clip config in ``bases/open_clip``, where a command
    such as ``python -m vlm.eval`` finds it (the tiny tower is registered in this process only)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    bundled = directory / "bases" / "open_clip"
    bundled.mkdir(parents=True)
    shutil.copy(f"{tiny_assets()['clip_dir']}/{TINY_CLIP}.json", bundled)
    return directory
