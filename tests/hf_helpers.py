"""Tiny randomly initialised transformers Perceiver models and matching inputs for the import tests."""

from __future__ import annotations

import torch
import transformers
from transformers import PerceiverConfig


def tiny_config(**overrides) -> PerceiverConfig:
    kw = dict(
        num_latents=6,
        d_latents=16,
        d_model=24,
        num_blocks=1,
        num_self_attends_per_block=2,
        num_self_attention_heads=2,
        num_cross_attention_heads=1,
        vocab_size=262,
        max_position_embeddings=12,
        image_size=8,
        train_size=[8, 8],
        num_labels=5,
        num_frames=2,
        audio_samples_per_frame=8,
        samples_per_patch=4,
        output_shape=[1, 2, 8, 8],
        output_num_channels=12,
        _label_trainable_num_channels=10,
        attention_probs_dropout_prob=0.1,
    )
    kw.update(overrides)
    return PerceiverConfig(**kw)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere (layer norms, biases, batch-norm statistics included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() > 1 and "position" not in name and "latents" not in name and "padding" not in name:
                p.copy_(noise / p[0].numel() ** 0.5)  # fan-in scaled weights (linear, conv, embeddings)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.5 * noise)  # biases, latents, positions, padding, mask tokens
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def build(cls_name: str, config: PerceiverConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(getattr(transformers, cls_name)(config), seed)


def make_inputs(cls_name: str, config: PerceiverConfig, batch: int = 2, seed: int = 1) -> dict:
    """Forward kwargs for ``cls_name`` (a partially masked attention_mask where the model takes text)."""
    g = torch.Generator().manual_seed(seed)
    if cls_name in ("PerceiverForMaskedLM", "PerceiverForSequenceClassification"):
        length = config.max_position_embeddings - 2
        ids = torch.randint(0, config.vocab_size, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, -3:] = 0
        return {"inputs": ids, "attention_mask": mask}
    if cls_name.startswith("PerceiverForImageClassification"):
        h = w = config.image_size
        return {"inputs": torch.randn(batch, 3, h, w, generator=g)}
    if cls_name == "PerceiverForOpticalFlow":
        h, w = config.train_size
        return {"inputs": torch.randn(batch, 2, 27, h, w, generator=g)}
    if cls_name == "PerceiverForMultimodalAutoencoding":
        n_audio = config.num_frames * config.audio_samples_per_frame
        side = config.image_size
        inputs = {
            "image": torch.randn(batch, config.num_frames, 3, side, side, generator=g),
            "audio": torch.randn(batch, n_audio, 1, generator=g),
            "label": torch.zeros(batch, config.num_labels),
        }
        n_pixels = config.num_frames * side * side
        points = {
            "image": torch.randperm(n_pixels, generator=g)[: n_pixels // 3],
            "audio": torch.randperm(n_audio // config.samples_per_patch, generator=g)[:3],
            "label": None,
        }
        return {"inputs": inputs, "subsampled_output_points": points}
    raise ValueError(cls_name)
