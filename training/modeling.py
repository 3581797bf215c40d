"""Building the Flamingo model for training: bases, freezing, activation checkpointing, export.

The model code (``vlm``) knows nothing about DeepSpeed or this trainer; everything training-specific -- which
backbone weights train, recomputation in the backward pass, writing the trained weights in the
``Flamingo.from_pretrained`` format -- is applied here from outside.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm.config import FlamingoConfig
from vlm.model import BUNDLED_BASES

from .config import ModelConfig
from .optim import LR_SCALE_ATTR
from .tiny_bases import TinyBases, ensure_tiny_bases


def resolve_bases(cfg: ModelConfig, cache_dir: str) -> tuple[FlamingoConfig, Optional[TinyBases]]:
    """The model's FlamingoConfig, its bases named: the tiny ones built (once) if configured, named offline bases
    prepared."""
    if cfg.tiny is not None:
        tiny = ensure_tiny_bases(cfg.tiny, cache_dir)
        return cfg.flamingo_config(tiny.names()), tiny
    flamingo = cfg.flamingo_config()
    prepare_named_bases(flamingo.to_dict())
    return flamingo, None


def prepare_named_bases(names: dict[str, Any]) -> None:
    """Prepare the offline pretrained bases named (vlm.bases) into their cache now, reporting the one-time cost
    apart from the run's own time."""
    import time

    from vlm import bases

    for key, prepare in (
        ("clip_vision_encoder_path", bases.prepare_vision_base),
        ("lang_encoder_path", bases.prepare_language_base),
        ("tokenizer_path", bases.prepare_language_base),
    ):
        name = names[key]
        if bases.is_named_base(name) and not bases.is_prepared(name):
            start = time.perf_counter()
            prepare(name)
            seconds = time.perf_counter() - start
            print(f"prepared base {name!r} in {seconds:.0f} s (once; cached in {bases.cache_dir()})", flush=True)


def build_model(cfg: ModelConfig, flamingo: FlamingoConfig, seed: int):
    """(model, image_processor, tokenizer) of ``flamingo`` (:func:`resolve_bases`) with the parts ``cfg`` trains
    trainable. Same weights on every rank."""
    import vlm

    torch.manual_seed(seed)
    model, image_processor, tokenizer = vlm.create_model_and_transforms(
        **flamingo.to_dict(), use_local_files=cfg.use_local_files
    )
    if not cfg.freeze_lm:
        added = set(model.added_parameter_names())
        for name, p in model.named_parameters():
            if name.startswith("lang_encoder.") and name not in added:
                p.requires_grad_(True)
    if cfg.gate_init is not None:
        with torch.no_grad():
            for block in model.gated_cross_attn_layers:
                block.attn_gate.fill_(cfg.gate_init)
                block.mlp_gate.fill_(cfg.gate_init)
    if cfg.latents_init_std is not None:
        with torch.no_grad():
            model.perceiver.latents.normal_(0.0, cfg.latents_init_std)
    if cfg.match_lm_scale:
        match_lm_scale(model, tokenizer)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model, image_processor, tokenizer


# A few ordinary sentences: the hidden-state size of a language model on ordinary text.
CALIBRATION_TEXT = (
    "A man in a red shirt is riding a bicycle down a busy city street. Two dogs are playing in the snow near "
    "a wooden fence. The children laughed as they ran along the beach at sunset."
)


def output_projections(block: nn.Module) -> list[nn.Parameter]:
    """The weights that write a gated cross-attention block's outputs into the LM's residual stream: the
    attention's output projection and the MLP's last layer (both without bias)."""
    return [block.attention.o_proj.weight, block.mlp[2].weight]


@torch.no_grad()
def lm_hidden_scales(model: nn.Module, tokenizer: Any, text: str = CALIBRATION_TEXT) -> list[float]:
    """For each gated cross-attention block, the median over tokens of the RMS of the LM hidden states entering
    it, on ``text`` (without images). The first token is left out: language models park outlier activations
    there (SmolLM2-135M: about 190 there, 4 to 28 elsewhere)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.perceiver.latents.device)
    if ids.shape[1] < 2:
        raise ValueError(f"the calibration text gives {ids.shape[1]} token(s); at least 2 are needed")
    scales: dict[int, float] = {}
    hooks = []
    for i, block in enumerate(model.gated_cross_attn_layers):

        def record(module, args, output, i=i):
            rms = args[0][0, 1:].float().pow(2).mean(-1).sqrt()
            scales[i] = float(rms.median())

        hooks.append(block.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        model(vision_x=None, lang_x=ids)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [scales[i] for i in range(len(hooks))]


def match_lm_scale(model: nn.Module, tokenizer: Any) -> list[float]:
    """Size each cross-attention block's writes to the LM's residual stream at that depth.

    A frozen LM's hidden states grow with depth (SmolLM2-135M: median token RMS 4 at its first cross-attention
    layer, 28 at its last), while a freshly initialised block writes about 0.1: its image signal is lost in the
    residual stream, and Adam at a learning rate of 1e-3 needs thousands of steps to grow it. Multiplying the
    block's outputs by ``s`` (the hidden-state RMS there, :func:`lm_hidden_scales`) fixes that; with Adam it is
    the same as multiplying the initial output-projection weights by ``s`` and their learning rate by ``s`` (and
    dividing their weight decay by ``s``), which is what is done here, so the model itself is unchanged (its
    export, parity and loading are those of a plain Flamingo). Returns the scales.
    """
    scales = lm_hidden_scales(model, tokenizer)
    with torch.no_grad():
        for block, s in zip(model.gated_cross_attn_layers, scales):
            for p in output_projections(block):
                p.mul_(s)
                setattr(p, LR_SCALE_ATTR, s)
    return scales


def _checkpointed(module: nn.Module, forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing: the recomputation runs inside autograd's backward with the module's
            # parameters as DeepSpeed ZeRO-3 gathered them for that backward, so it composes with ZeRO-3.
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute, in the backward pass, every LM decoder layer, gated cross-attention block and resampler layer
    instead of keeping their activations. Returns the number of wrapped modules. Parameter names are unchanged."""
    targets: list[nn.Module] = []
    layers = model.lang_encoder.get_submodule(model.decoder_layers_path)
    for layer in layers:
        targets.append(layer.decoder_layer)
        if layer.gated_cross_attn_layer is not None:
            targets.append(layer.gated_cross_attn_layer)
    targets.extend(model.perceiver.layers)
    for module in targets:
        if not getattr(module, "_activation_checkpointing", False):
            module.forward = _checkpointed(module, module.forward)
            module._activation_checkpointing = True
    return len(targets)


def compile_own_modules(model: nn.Module) -> int:
    """``torch.compile`` (in place: parameter names, checkpoints and exports are unchanged) the modules this project
    adds -- the resampler and every gated cross-attention block -- whose attention path compiles without graph
    breaks (tested). The frozen Hugging Face LM and the open_clip tower run as they are. Returns the number of
    compiled modules."""
    targets = [model.perceiver, *model.gated_cross_attn_layers]
    for module in targets:
        module.compile()
    return len(targets)


def trained_base_parameter_names(model: nn.Module) -> set[str]:
    """Backbone parameters that train (an unfrozen vision tower or LM): export must save their new values."""
    added = set(model.added_parameter_names())
    return {n for n, p in model.named_parameters() if p.requires_grad and n not in added}


def exported_parameter_names(model: nn.Module) -> set[str]:
    """What ``save_pretrained`` writes after :func:`export_pretrained` marks the trained backbone weights: the added
    parameters, trained backbone parameters, and a randomly initialised vision tower."""
    names = set(model.added_parameter_names()) | trained_base_parameter_names(model)
    names |= set(model.overridden_base_parameters)
    if model.config.clip_vision_encoder_pretrained is None:
        names |= {n for n, _ in model.named_parameters() if n.startswith("vision_encoder.")}
    return names


def export_pretrained(model: nn.Module, directory: Path, tiny: Optional[TinyBases]) -> Path:
    """Write the model in the ``Flamingo.from_pretrained`` format (call with full, gathered parameters).

    Trained backbone weights are saved with the added ones. Tiny bases are copied into ``directory/bases`` and
    the saved config points there, so the export does not depend on the training cache. Written into a temporary
    directory first and renamed, so an existing export is replaced only by a complete one.
    """
    directory = Path(directory).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    saved_config = model.config
    try:
        if tiny is not None:  # the config names them relative to the export: a copy loads its own
            bases = Path(".") / BUNDLED_BASES
            shutil.copytree(tiny.clip_config_dir, staging / BUNDLED_BASES / "open_clip")
            shutil.copytree(tiny.lang_encoder_path, staging / BUNDLED_BASES / "lm")
            shutil.copytree(tiny.tokenizer_path, staging / BUNDLED_BASES / "tokenizer")
            model.config = type(saved_config)(
                **{
                    **saved_config.to_dict(),
                    "lang_encoder_path": f"./{bases / 'lm'}",
                    "tokenizer_path": f"./{bases / 'tokenizer'}",
                }
            )
        model.overridden_base_parameters = set(model.overridden_base_parameters) | trained_base_parameter_names(model)
        model.save_pretrained(staging)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}-old-{os.getpid()}")
            os.replace(directory, old)
        staging.chmod(0o755)  # mkdtemp creates it private
        os.replace(staging, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        model.config = saved_config
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_exported(directory: str | os.PathLike):
    """``Flamingo.from_pretrained`` of an export (which registers its bundled open_clip config, tiny bases, first).

    Equivalent command line: ``python -m vlm.generate --model-dir DIR ...``.
    """
    from vlm import Flamingo

    return Flamingo.from_pretrained(directory)
