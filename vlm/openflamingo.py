"""Load checkpoints saved by OpenFlamingo training into a :class:`~vlm.model.Flamingo`.

Key mapping (OpenFlamingo name -> this model; ``P`` = the LM's decoder-layer path, e.g.
``model.layers``; ``E`` / ``H`` = the paths of the LM's input embedding / output head):

==========================================================  ===============================================
``vision_encoder.X``                                        ``vision_encoder.visual.X``
``perceiver.latents`` / ``perceiver.norm.*``                same name
``perceiver.frame_embs`` (F, D)                             ``perceiver.frame_embeddings``
``perceiver.media_time_embs`` (T, 1, D)                     ``perceiver.media_time_embeddings`` (T, D)
``perceiver.layers.i.0.norm_media`` / ``.norm_latents``     ``perceiver.layers.i.media_norm`` / ``.latent_norm``
``perceiver.layers.i.0.to_q`` / ``.to_out``                 ``perceiver.layers.i.attention.q_proj`` / ``.o_proj``
``perceiver.layers.i.0.to_kv`` (2*inner, D)                 rows [:inner] -> ``.attention.k_proj``, [inner:] -> ``.v_proj``
``perceiver.layers.i.1.0`` / ``.1.1`` / ``.1.3``            ``perceiver.layers.i.mlp_norm`` / ``.mlp.0`` / ``.mlp.2``
``lang_encoder.P.i.gated_cross_attn_layer.attn.norm``       ``lang_encoder.P.i.gated_cross_attn_layer.norm``
``...attn.to_q`` / ``.attn.to_kv`` / ``.attn.to_out``       ``...attention.q_proj`` / k_proj+v_proj split / ``.o_proj``
``...attn_gate`` / ``...ff_gate``                           ``...attn_gate`` / ``...mlp_gate``
``...ff.0`` / ``...ff.1`` / ``...ff.3``                     ``...mlp_norm`` / ``...mlp.0`` / ``...mlp.2``
``lang_encoder.gated_cross_attn_layers.i.*``                duplicate view of the row above (values must agree)
``lang_encoder.old_decoder_blocks.i.X``                     ``lang_encoder.P.i.decoder_layer.X`` (duplicate view)
``lang_encoder.E.weight`` (V + k, D), trained in full       rows [:V] -> frozen ``lang_encoder.E.base.weight[:V]``,
                                                            rows [V:] -> trainable ``lang_encoder.E.extra``
``lang_encoder.H.weight`` / ``.bias`` (untied head)         rows [:V] -> ``lang_encoder.H.base.*``, rows [V:] -> ``.extra*``
any other ``lang_encoder.X``                                same name (frozen LM weights and buffers)
==========================================================  ===============================================

``V`` is the base tokenizer's size and ``k`` the added tokens (``<|endofchunk|>``, ``<image>``, and
``<PAD>`` if the tokenizer had no pad token), added in OpenFlamingo's order so the ids agree. Rows
of a padded base vocabulary beyond ``V`` are unused here and kept (OpenFlamingo drops them when it
resizes the matrix to the tokenizer).
OpenFlamingo trains the whole input embedding matrix, so its base rows may differ from the base LM:
they are copied into the frozen base rows and listed in ``model.overridden_base_parameters`` (saved
by ``save_pretrained``). OpenFlamingo does not save an untied output head (it is frozen and its name
has no "embed"), so its added-token output rows are random and lost; loading such a checkpoint is an
error unless ``allow_missing_output_rows=True`` keeps this model's own rows for them.

Every checkpoint key must map to a tensor of this model with the right shape, and every parameter
Flamingo adds (resampler, cross-attention, added-token rows) must be provided; otherwise the error
lists the offending keys. Nothing is loaded in that case.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from .model import Flamingo

_RESAMPLER = {
    "0.norm_media": "media_norm",
    "0.norm_latents": "latent_norm",
    "0.to_q": "attention.q_proj",
    "0.to_out": "attention.o_proj",
    "1.0": "mlp_norm",
    "1.1": "mlp.0",
    "1.3": "mlp.2",
}
_XATTN = {
    "attn.norm": "norm",
    "attn.to_q": "attention.q_proj",
    "attn.to_out": "attention.o_proj",
    "ff.0": "mlp_norm",
    "ff.1": "mlp.0",
    "ff.3": "mlp.2",
}
_XATTN_GATES = {"attn_gate": "attn_gate", "ff_gate": "mlp_gate"}


def _read_state_dict(path_or_state_dict: Union[str, Path, dict]) -> dict[str, Tensor]:
    if isinstance(path_or_state_dict, dict):
        sd = path_or_state_dict
    else:
        path = Path(path_or_state_dict)
        if not path.is_file():
            raise FileNotFoundError(f"OpenFlamingo checkpoint {path} not found")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if "model_state_dict" in sd and isinstance(sd["model_state_dict"], dict):  # a training checkpoint
        sd = sd["model_state_dict"]
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"not a state dict of tensors: entries {bad[:10]} are not tensors")
    # DDP prefixes names with "module." (OpenFlamingo's resume code strips it the same way).
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}


def _module_path(root: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def _convert(model: Flamingo, key: str, value: Tensor, paths: dict, targets: dict) -> list[tuple[str, Tensor]]:
    """Our (name, tensor) pairs for one OpenFlamingo entry; [] if the key is unknown."""
    nb = model.num_base_tokens
    layers = paths["layers"]
    if key.startswith("vision_encoder."):
        return [("vision_encoder.visual." + key[len("vision_encoder.") :], value)]
    if key.startswith("perceiver."):
        rest = key[len("perceiver.") :]
        if rest == "latents" or rest.startswith("norm."):
            return [(key, value)]
        if rest == "frame_embs":
            return [("perceiver.frame_embeddings", value)]
        if rest == "media_time_embs":
            return [("perceiver.media_time_embeddings", value.reshape(value.shape[0], -1))]
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", rest)
        if m:
            i, sub, kind = m.groups()
            if sub == "0.to_kv":
                k, v = value.chunk(2, dim=0)
                return [
                    (f"perceiver.layers.{i}.attention.k_proj.{kind}", k),
                    (f"perceiver.layers.{i}.attention.v_proj.{kind}", v),
                ]
            if sub in _RESAMPLER:
                return [(f"perceiver.layers.{i}.{_RESAMPLER[sub]}.{kind}", value)]
        return []
    if not key.startswith("lang_encoder."):
        return []
    rest = key[len("lang_encoder.") :]
    m = re.fullmatch(r"gated_cross_attn_layers\.(\d+)\.(.+)", rest) or re.fullmatch(
        re.escape(layers) + r"\.(\d+)\.gated_cross_attn_layer\.(.+)", rest
    )
    if m:
        i, sub = m.groups()
        prefix = f"lang_encoder.{layers}.{i}.gated_cross_attn_layer."
        if sub in _XATTN_GATES:
            return [(prefix + _XATTN_GATES[sub], value)]
        name, _, kind = sub.rpartition(".")
        if name == "attn.to_kv":
            k, v = value.chunk(2, dim=0)
            return [(prefix + f"attention.k_proj.{kind}", k), (prefix + f"attention.v_proj.{kind}", v)]
        if name in _XATTN:
            return [(prefix + f"{_XATTN[name]}.{kind}", value)]
        return []
    m = re.fullmatch(r"old_decoder_blocks\.(\d+)\.(.+)", rest)
    if m:
        return [(f"lang_encoder.{layers}.{m.group(1)}.decoder_layer.{m.group(2)}", value)]
    for role in ("embed", "head"):
        path = paths[role]
        for kind in ("weight", "bias"):
            if rest != f"{path}.{kind}":
                continue
            if value.shape[0] != nb + model.num_new_tokens:
                raise ValueError(
                    f"{key} has {value.shape[0]} rows, expected {nb + model.num_new_tokens} "
                    f"({nb} base tokens + {model.num_new_tokens} added); was the checkpoint made with this tokenizer?"
                )
            extra = "extra" if kind == "weight" else "extra_bias"
            base_name = f"lang_encoder.{path}.base.{kind}"
            base = value[:nb]
            current = targets.get(base_name)
            if current is not None and current.shape[0] > nb:  # padded base vocabulary: keep unused rows
                base = torch.cat([base, current.detach()[nb:].to(base)], dim=0)
            return [(base_name, base), (f"lang_encoder.{path}.{extra}", value[nb:])]
    return [(key, value)]


def load_openflamingo_checkpoint(
    model: Flamingo,
    path_or_state_dict: Union[str, Path, dict],
    allow_missing_output_rows: bool = False,
) -> dict[str, list[str]]:
    """Load an OpenFlamingo checkpoint (``.pt`` file, training checkpoint, or state dict) into ``model``.

    Returns ``{"loaded": [...our names...], "overridden_base": [...frozen base names whose values changed...]}``.
    See the module docstring for the key mapping and the rules.
    """
    sd = _read_state_dict(path_or_state_dict)
    paths = {
        "layers": model.decoder_layers_path,
        "embed": _module_path(model.lang_encoder, model.lang_embedding),
        "head": _module_path(model.lang_encoder, model.lang_head),
    }
    targets = model.state_dict(keep_vars=True)
    converted: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    unknown, mismatched, conflicting = [], [], []
    for key in sorted(sd):
        pairs = _convert(model, key, sd[key], paths, targets)
        if not pairs or any(name not in targets for name, _ in pairs):
            unknown.append(key)
            continue
        for name, value in pairs:
            if targets[name].shape != value.shape:
                mismatched.append(f"{key} -> {name}: {tuple(value.shape)} vs {tuple(targets[name].shape)}")
            elif name in converted and not torch.equal(converted[name], value):
                conflicting.append(f"{sources[name]} != {key} (both -> {name})")
            else:
                converted[name] = value
                sources.setdefault(name, key)
    # A tied head shares its tensors with the input embedding: both views must agree.
    if model.lang_head.tied:
        for mine, other in (("base.weight", "base.weight"), ("extra", "extra")):
            a = f"lang_encoder.{paths['embed']}.{mine}"
            b = f"lang_encoder.{paths['head']}.{other}"
            if a in converted and b in converted and not torch.equal(converted[a], converted[b]):
                conflicting.append(f"tied {a} / {b}")
            elif a in converted or b in converted:
                converted.setdefault(a, converted.get(b))
                converted.setdefault(b, converted.get(a))
    missing = sorted(set(model.added_parameter_names()) - set(converted))
    if allow_missing_output_rows and not model.lang_head.tied:
        head_extra = {f"lang_encoder.{paths['head']}.extra", f"lang_encoder.{paths['head']}.extra_bias"}
        missing = [m for m in missing if m not in head_extra]
    if unknown or missing or mismatched or conflicting:
        hint = ""
        if any(m.startswith(f"lang_encoder.{paths['head']}.extra") for m in missing):
            hint = (
                " (OpenFlamingo does not save an untied output head; pass allow_missing_output_rows=True "
                "to keep this model's rows for the added tokens)"
            )
        raise ValueError(
            "OpenFlamingo checkpoint does not fit this model: "
            f"unknown keys {unknown}, missing {missing}{hint}, shape mismatches {mismatched}, "
            f"conflicting duplicates {conflicting}"
        )
    # Canonical (deduplicated) parameter names; find changed frozen base tensors before copying anything.
    canonical = {id(p): n for n, p in model.named_parameters()}
    added = set(model.added_parameter_names())
    overridden = sorted(
        {
            canonical[id(targets[name])]
            for name, value in converted.items()
            if id(targets[name]) in canonical
            and canonical[id(targets[name])] not in added
            and not torch.equal(targets[name], value.to(targets[name]))
        }
    )
    with torch.no_grad():
        for name, value in converted.items():
            targets[name].copy_(value)
    model.overridden_base_parameters |= set(overridden)
    return {"loaded": sorted(converted), "overridden_base": sorted(overridden)}
