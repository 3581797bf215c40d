"""Insert gated cross-attention into any Hugging Face causal LM by module composition.

The decoder-layer list is found generically (the ``nn.ModuleList`` with one entry per hidden layer,
the one holding most parameters if several qualify), and each chosen entry is replaced by a
:class:`FlamingoLayer` that holds the new cross-attention block *and* the original layer. The model's
class is never changed and no per-family attribute paths are needed.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .media_context import MediaConditioning


def _num_hidden_layers(lm: nn.Module) -> Optional[int]:
    config = getattr(lm, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "num_hidden_layers", None)


def find_decoder_layers(lm: nn.Module, attr_name: Optional[str] = None) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted path, ModuleList)`` of the LM's decoder layers.

    ``attr_name`` (e.g. ``"model.layers"``) selects the list explicitly; otherwise it is the
    ``ModuleList`` whose length equals ``config.num_hidden_layers`` (any non-empty list of identical
    block types if the config has no such field), choosing the one with the most parameters.
    """
    if attr_name is not None:
        try:
            layers = lm.get_submodule(attr_name)
        except AttributeError as e:
            raise ValueError(f"decoder_layers_attr_name={attr_name!r} is not a submodule of {type(lm).__name__}") from e
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"decoder_layers_attr_name={attr_name!r} is a {type(layers).__name__}, not an nn.ModuleList"
            )
        return attr_name, layers
    n = _num_hidden_layers(lm)
    candidates = []
    for name, module in lm.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if n is not None and len(module) != n:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        candidates.append((sum(p.numel() for p in module.parameters()), name, module))
    if not candidates:
        raise ValueError(
            f"found no nn.ModuleList of {n} decoder layers in {type(lm).__name__}; "
            "pass decoder_layers_attr_name (e.g. 'model.layers')"
        )
    candidates.sort(key=lambda c: c[0], reverse=True)
    if len(candidates) > 1 and candidates[0][0] == candidates[1][0]:
        names = [c[1] for c in candidates]
        raise ValueError(f"ambiguous decoder layer lists {names} in {type(lm).__name__}; pass decoder_layers_attr_name")
    return candidates[0][1], candidates[0][2]


class FlamingoLayer(nn.Module):
    """An LM decoder layer preceded by an (optional) gated cross-attention block.

    Called exactly like the wrapped layer (same positional/keyword arguments, same return value);
    only the hidden states are first passed through the cross-attention block with the media of the
    active :class:`MediaConditioning`. Attributes the LM's own code reads from its layers (e.g.
    ``attention_type``) are delegated to the wrapped layer.
    """

    def __init__(
        self,
        decoder_layer: nn.Module,
        gated_cross_attn_layer: Optional[nn.Module],
        conditioning: MediaConditioning,
        layer_index: int,
    ):
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self.conditioning = conditioning
        self.layer_index = layer_index

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("decoder_layer", "gated_cross_attn_layer") or "decoder_layer" not in self._modules:
                raise
            return getattr(self._modules["decoder_layer"], name)

    def forward(self, *args, **kwargs):
        if self.gated_cross_attn_layer is not None:
            if args:
                hidden = self.conditioning.cross_attend(self.layer_index, self.gated_cross_attn_layer, args[0])
                args = (hidden, *args[1:])
            elif "hidden_states" in kwargs:
                kwargs["hidden_states"] = self.conditioning.cross_attend(
                    self.layer_index, self.gated_cross_attn_layer, kwargs["hidden_states"]
                )
            else:
                raise TypeError(
                    f"{type(self.decoder_layer).__name__} was called without positional or `hidden_states` input; "
                    f"got keyword arguments {sorted(kwargs)}"
                )
        return self.decoder_layer(*args, **kwargs)


def replace_submodule(root: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Replace every occurrence of module ``old`` below ``root`` by ``new``; returns the dotted paths."""
    paths = [name for name, m in root.named_modules(remove_duplicate=False) if m is old and name]
    if not paths:
        raise ValueError(f"{type(old).__name__} is not a submodule of {type(root).__name__}")
    for path in paths:
        parent_name, _, attr = path.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        if isinstance(parent, (nn.ModuleList, nn.Sequential)):
            parent[int(attr)] = new
        else:
            setattr(parent, attr, new)
    return paths
