"""Tiny base models for the embedded default run, built offline with random weights.

No pretrained weights can be downloaded here, so the default run builds its own small bases and trains them
(``freeze_vision_encoder`` / ``freeze_lm`` false): an open_clip ViT defined by a model config registered with open_clip,
a Llama-style causal LM saved with ``save_pretrained``, and a byte-level BPE tokenizer trained on captions of the
synthetic dataset. They are loaded through the same code paths as real bases (open_clip by name,
``AutoModelForCausalLM`` / ``AutoTokenizer`` from a directory). Everything is a pure function of the config, written
once into ``<cache_dir>/tiny_bases/<fingerprint>`` (atomically: built in a temporary directory, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import TinyBasesConfig

CAPTIONS_FOR_TOKENIZER = 3000
MARKER = "bases.json"


@dataclass(frozen=True)
class TinyBases:
    """Names/paths to pass to ``vlm.create_model_and_transforms``."""

    clip_name: str
    clip_config_dir: str  # register with open_clip.add_model_config before building (or loading) the model
    lang_encoder_path: str
    tokenizer_path: str

    def names(self) -> dict[str, Optional[str]]:
        """The FlamingoConfig fields naming these bases (the vision tower has random weights: no pretrained tag)."""
        return {
            "clip_vision_encoder_path": self.clip_name,
            "clip_vision_encoder_pretrained": None,
            "lang_encoder_path": self.lang_encoder_path,
            "tokenizer_path": self.tokenizer_path,
        }


def fingerprint(config: TinyBasesConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def clip_name(config: TinyBasesConfig) -> str:
    return f"tiny-flamingo-vit-{fingerprint(config)}"


def open_clip_config(config: TinyBasesConfig) -> dict:
    width = config.vision_width
    return {
        "embed_dim": width,
        "vision_cfg": {
            "image_size": config.image_size,
            "layers": config.vision_layers,
            "width": width,
            "patch_size": config.patch_size,
            "head_width": config.vision_head_width,
        },
        # open_clip models always have a text tower; a minimal one (unused by Flamingo)
        "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 16, "heads": 1, "layers": 1},
    }


def tokenizer_corpus(num_captions: int = CAPTIONS_FOR_TOKENIZER, seed: int = 0) -> list[str]:
    """Captions of synthetic scenes (drawn without rendering) and a few prompt words."""
    from data_pipelines.synthetic import caption_of, sample_scene

    rng = np.random.default_rng([seed, 0x746F6B])
    captions = [caption_of(sample_scene(rng, max_count=4)) for _ in range(num_captions)]
    return captions + ["Output: a photo of", "Question: what is in the image? Answer:"] * 20


def _build_tokenizer(config: TinyBasesConfig, directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(seed=config.seed), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="</s>")
    fast.save_pretrained(directory)


def _build_lm(config: TinyBasesConfig, vocab_size: int, directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    lm_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.lm_hidden_size,
        intermediate_size=config.lm_intermediate_size,
        num_hidden_layers=config.lm_layers,
        num_attention_heads=config.lm_heads,
        num_key_value_heads=config.lm_heads,
        max_position_embeddings=config.lm_max_positions,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(lm_config)
    model.save_pretrained(directory)


def ensure_tiny_bases(config: TinyBasesConfig, cache_dir: str | os.PathLike) -> TinyBases:
    """Build the bases into ``cache_dir`` unless already there; registers the vision config with open_clip.

    Call on one process per machine first (the trainer builds on rank 0, then the others load after a barrier).
    """
    import open_clip
    from transformers import AutoTokenizer

    root = Path(cache_dir) / "tiny_bases" / fingerprint(config)
    if not (root / MARKER).is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            (staging / "open_clip").mkdir()
            (staging / "open_clip" / f"{clip_name(config)}.json").write_text(
                json.dumps(open_clip_config(config), indent=2)
            )
            _build_tokenizer(config, staging / "tokenizer")
            vocab = len(AutoTokenizer.from_pretrained(staging / "tokenizer"))
            _build_lm(config, vocab, staging / "lm")
            (staging / MARKER).write_text(json.dumps(config.to_dict(), indent=2))
            if root.exists():  # an incomplete earlier attempt
                shutil.rmtree(root)
            staging.chmod(0o755)  # mkdtemp creates it private
            os.replace(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    bases = TinyBases(
        clip_name=clip_name(config),
        clip_config_dir=str(root / "open_clip"),
        lang_encoder_path=str(root / "lm"),
        tokenizer_path=str(root / "tokenizer"),
    )
    open_clip.add_model_config(bases.clip_config_dir)
    return bases
