"""Flamingo-style vision-language model: frozen CLIP tower -> Perceiver Resampler -> gated
cross-attention inside a frozen Hugging Face causal LM.

``vision_x`` is (B, T_img, F, C, H, W): ``T_img`` images per example (in the order of their
``<image>`` tokens), ``F`` frames each. ``lang_x`` holds the token ids with one ``<image>`` token per
image. Each text token attends to the latents of the most recent preceding image (or of all
previous images with ``only_attend_immediate_media=False``); tokens before the first image get no
visual input. ``media_mask`` (B, T_img) marks images that are present (False = padding slot).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perceiver.resampler import PerceiverResampler

from .config import FlamingoConfig
from .cross_attention import GatedCrossAttentionBlock
from .embeddings import DecoupledEmbedding, DecoupledLMHead
from .lm_wrapping import FlamingoLayer, find_decoder_layers, replace_submodule
from .media_context import MediaConditioning
from .vision import ClipVisionEncoder

CONFIG_NAME = "flamingo_config.json"
WEIGHTS_NAME = "flamingo_weights.safetensors"


class Flamingo(nn.Module):
    """The model. Build it with :func:`vlm.create_model_and_transforms` (or :meth:`from_pretrained`).

    Trainable: the resampler, the gated cross-attention blocks and the rows of the added tokens.
    Frozen: the vision tower and every original weight of the language model.
    """

    def __init__(
        self,
        vision_encoder: ClipVisionEncoder,
        lang_encoder: nn.Module,
        config: FlamingoConfig,
        media_token_id: int,
        eoc_token_id: int,
        pad_token_id: int,
        num_base_tokens: int,
        num_new_tokens: int,
    ):
        super().__init__()
        self.config = config
        self.media_token_id = media_token_id
        self.eoc_token_id = eoc_token_id
        self.pad_token_id = pad_token_id
        self.num_base_tokens = num_base_tokens
        self.num_new_tokens = num_new_tokens
        self.tokenizer: Any = None  # set by the factory
        self.image_processor: Optional[Callable] = None  # set by the factory
        # Names of frozen base parameters whose values were replaced (e.g. by an OpenFlamingo
        # checkpoint); save_pretrained stores them since the named base no longer reproduces them.
        self.overridden_base_parameters: set[str] = set()

        self.vision_encoder = vision_encoder
        vision_channels = vision_encoder.num_channels
        media_channels = config.resampler_channels or vision_channels
        self.perceiver = PerceiverResampler(
            media_channels,
            input_channels=vision_channels if media_channels != vision_channels else None,
            depth=config.resampler_depth,
            num_latents=config.resampler_num_latents,
            num_heads=config.resampler_num_heads,
            head_channels=config.resampler_head_channels,
            widening_factor=config.resampler_widening_factor,
            max_num_media=config.max_num_media,
            max_num_frames=config.max_num_frames,
            max_num_media_tokens=config.max_num_media_tokens,
        )

        lang_encoder.requires_grad_(False)
        base_ids = {id(p) for p in lang_encoder.parameters()} | {id(p) for p in vision_encoder.parameters()}
        self.lang_encoder = lang_encoder
        self.conditioning = MediaConditioning(media_token_id, config.only_attend_immediate_media)

        base_embedding = lang_encoder.get_input_embeddings()
        lang_channels = base_embedding.weight.shape[1]
        self.decoder_layers_path, layers = find_decoder_layers(lang_encoder, config.decoder_layers_attr_name)
        for i in range(len(layers)):
            block = None
            if (i + 1) % config.cross_attn_every_n_layers == 0:
                block = GatedCrossAttentionBlock(
                    lang_channels,
                    media_channels,
                    num_heads=config.cross_attn_num_heads,
                    head_channels=config.cross_attn_head_channels,
                    widening_factor=config.cross_attn_widening_factor,
                )
            layers[i] = FlamingoLayer(layers[i], block, self.conditioning, i)
        if not any(layer.gated_cross_attn_layer is not None for layer in layers):
            raise ValueError(
                f"cross_attn_every_n_layers={config.cross_attn_every_n_layers} exceeds the LM's "
                f"{len(layers)} decoder layers: no cross-attention would be inserted"
            )

        base_head = lang_encoder.get_output_embeddings()
        if not isinstance(base_head, nn.Linear):
            raise ValueError(f"expected the LM's output embeddings to be nn.Linear, got {type(base_head).__name__}")
        embedding = DecoupledEmbedding(base_embedding, num_base_tokens, num_new_tokens)
        tied = base_head.weight is base_embedding.weight
        head = DecoupledLMHead(base_head, num_base_tokens, num_new_tokens, tied_embedding=embedding if tied else None)
        replace_submodule(lang_encoder, base_embedding, embedding)
        replace_submodule(lang_encoder, base_head, head)
        self.lang_embedding, self.lang_head = embedding, head  # plain references (see __setattr__ note)
        if config.freeze_lm_embeddings:
            embedding.extra.requires_grad_(False)
            head.extra.requires_grad_(False)
            if head.extra_bias is not None:
                head.extra_bias.requires_grad_(False)
        self._lm_takes_position_ids = "position_ids" in inspect.signature(lang_encoder.forward).parameters
        self._base_parameter_names = frozenset(n for n, p in self.named_parameters() if id(p) in base_ids)

    def __setattr__(self, name: str, value: Any) -> None:
        # lang_embedding / lang_head are shortcuts to modules registered inside lang_encoder; keep them
        # out of _modules so the state dict has one name per tensor.
        if name in ("lang_embedding", "lang_head"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ parameters

    def added_parameter_names(self) -> list[str]:
        """Names of the parameters Flamingo adds to the frozen bases (saved by :meth:`save_pretrained`)."""
        return [name for name, _ in self.named_parameters() if name not in self._base_parameter_names]

    @property
    def gated_cross_attn_layers(self) -> list[GatedCrossAttentionBlock]:
        layers = self.lang_encoder.get_submodule(self.decoder_layers_path)
        return [layer.gated_cross_attn_layer for layer in layers if layer.gated_cross_attn_layer is not None]

    # ------------------------------------------------------------------ forward

    def _check_inputs(
        self,
        vision_x: Optional[Tensor],
        lang_x: Tensor,
        media_mask: Optional[Tensor],
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> None:
        if lang_x.dim() != 2:
            raise ValueError(f"lang_x must be (B, T_txt) token ids, got shape {tuple(lang_x.shape)}")
        if lang_x.shape[0] == 0 or lang_x.shape[1] == 0:
            raise ValueError(f"lang_x is empty (shape {tuple(lang_x.shape)}); expected at least one token per row")
        if lang_x.is_floating_point():
            raise ValueError(f"lang_x must hold integer token ids, got dtype {lang_x.dtype}")
        max_positions = self.max_positions
        if max_positions is not None and lang_x.shape[1] > max_positions:
            raise ValueError(
                f"lang_x has {lang_x.shape[1]} tokens per row, more than the language model's "
                f"{max_positions} positions; shorten the prompt (e.g. the processor's max_length)"
            )
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and t.shape != lang_x.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} != lang_x shape {tuple(lang_x.shape)}")
        num_media_tokens = int((lang_x == self.media_token_id).sum(dim=1).max()) if lang_x.numel() else 0
        if vision_x is None:
            if media_mask is not None:
                raise ValueError("media_mask given without vision_x")
            if num_media_tokens:
                raise ValueError(f"lang_x has {num_media_tokens} <image> tokens in a row but vision_x is None")
            return
        if vision_x.dim() != 6:
            raise ValueError(f"vision_x must be (B, T_img, F, C, H, W), got shape {tuple(vision_x.shape)}")
        self._check_pixels(vision_x)
        if vision_x.shape[0] != lang_x.shape[0]:
            raise ValueError(f"vision_x has batch {vision_x.shape[0]} but lang_x has batch {lang_x.shape[0]}")
        if num_media_tokens > vision_x.shape[1]:
            raise ValueError(
                f"a row of lang_x has {num_media_tokens} <image> tokens but vision_x holds only "
                f"T_img={vision_x.shape[1]} images per example"
            )
        if media_mask is not None and (media_mask.dtype != torch.bool or media_mask.shape != vision_x.shape[:2]):
            raise ValueError(
                f"media_mask must be bool of shape (B, T_img)={tuple(vision_x.shape[:2])}, "
                f"got {media_mask.dtype} {tuple(media_mask.shape)}"
            )

    @property
    def max_positions(self) -> Optional[int]:
        """The language model's number of positions (``max_position_embeddings`` / ``n_positions``), if it has one."""
        config = getattr(self.lang_encoder, "config", None)
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def image_shape(self) -> Optional[tuple[int, int, int]]:
        """(C, H, W) the vision tower takes (what its image_processor produces), when the tower declares its size."""
        size = getattr(getattr(self.vision_encoder, "visual", None), "image_size", None)
        if isinstance(size, int):
            size = (size, size)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
            return (3, int(size[0]), int(size[1]))
        return None

    def _check_pixels(self, vision_x: Tensor) -> None:
        """Preprocessed images of the tower's (C, H, W) in the tower's floating dtype (the processor's output)."""
        if not vision_x.is_floating_point():
            raise ValueError(
                f"vision_x has dtype {vision_x.dtype}; expected preprocessed floating-point pixels (run the images "
                "through the model's image_processor, or vlm.FlamingoProcessor), not raw uint8/integer values"
            )
        # the tower's floating dtypes (a set: frozen batch norm may stay float32 in a bf16 tower)
        dtypes = {p.dtype for p in self.vision_encoder.parameters() if p.is_floating_point()}
        if dtypes and vision_x.dtype not in dtypes:
            want = sorted(str(d) for d in dtypes)
            raise ValueError(
                f"vision_x has dtype {vision_x.dtype}, but the vision tower's weights are {' / '.join(want)}; "
                f"convert it first (vision_x.to({want[0]}))"
            )
        expected = self.image_shape
        if expected is not None and tuple(vision_x.shape[3:]) != expected:
            c, h, w = expected
            raise ValueError(
                f"vision_x images are (C, H, W)={tuple(vision_x.shape[3:])}, but the vision tower takes "
                f"({c}, {h}, {w}) (RGB at its image_size, as its image_processor produces)"
            )

    def encode_media(
        self, vision_x: Optional[Tensor], media_mask: Optional[Tensor] = None, batch_size: int = 0
    ) -> tuple[Tensor, Tensor]:
        """vision_x (B, T_img, F, C, H, W) -> resampled latents (B, T_img, n, D) and the media mask (B, T_img).

        ``vision_x=None`` (text only) gives empty media for ``batch_size`` examples.
        """
        latents = self.perceiver.latents
        if vision_x is None:
            b, t = batch_size, 0
            media_mask = torch.zeros(b, 0, dtype=torch.bool, device=latents.device)
        else:
            b, t, f = vision_x.shape[:3]
            if media_mask is None:
                media_mask = torch.ones(b, t, dtype=torch.bool, device=vision_x.device)
        if t == 0:
            return latents.new_zeros(b, 0, *latents.shape), media_mask
        pixels = vision_x.flatten(0, 2)  # (B*T_img*F, C, H, W)
        real = media_mask[:, :, None].expand(b, t, f).reshape(-1)
        if bool(real.all()) or not bool(real.any()):
            tokens = self.vision_encoder(pixels)  # (B*T_img*F, v, D)
        else:  # padding slots (a batch of documents with fewer images than T_img) skip the tower
            seen = self.vision_encoder(pixels[real])
            tokens = seen.new_zeros(pixels.shape[0], *seen.shape[1:]).index_copy(0, real.nonzero().squeeze(1), seen)
        tokens = tokens.reshape(b, t, f, *tokens.shape[1:])  # (B, T_img, F, v, D); absent media are masked below
        return self.perceiver(tokens, media_mask), media_mask  # (B, T_img, n, D)

    def forward(
        self,
        vision_x: Optional[Tensor],
        lang_x: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        media_mask: Optional[Tensor] = None,
        use_cache: bool = False,
        loss_only: bool = False,
        **lm_kwargs,
    ):
        """Logits (B, T_txt, V) for ``lang_x`` conditioned on ``vision_x`` (None = no images).

        ``labels`` (B, T_txt), -100 = ignored, gives the next-token cross-entropy ``loss`` (labels
        are shifted inside, as in Hugging Face). Returns the language model's output object.
        ``loss_only`` (with ``labels``): the head computes logits only at the positions that predict a label,
        the same loss for less work; the returned ``logits`` are then (1, N, V), those N positions in row-major
        order.
        """
        self._check_inputs(vision_x, lang_x, media_mask, attention_mask, labels)
        latents, media_mask = self.encode_media(vision_x, media_mask, batch_size=lang_x.shape[0])
        if attention_mask is not None and self._lm_takes_position_ids and "position_ids" not in lm_kwargs:
            # Positions count only real tokens, so left padding does not shift them (the convention
            # of Hugging Face generation, which makes full and cached decoding agree).
            position_ids = attention_mask.long().cumsum(-1) - 1
            lm_kwargs["position_ids"] = position_ids.masked_fill(attention_mask == 0, 1)
        selected = None
        if loss_only and labels is not None:
            selected = torch.zeros_like(labels, dtype=torch.bool)
            selected[:, :-1] = labels[:, 1:] != -100  # position t predicts label t + 1
        select = self.lang_head.only_positions(selected) if selected is not None else nullcontext()
        with self.conditioning.activate(self.lang_encoder, latents, media_mask), select:
            out = self.lang_encoder(input_ids=lang_x, attention_mask=attention_mask, use_cache=use_cache, **lm_kwargs)
        if selected is not None:
            logits = out.logits.float().reshape(-1, out.logits.shape[-1])
            targets = labels[:, 1:][selected[:, :-1]]
            if logits.shape[0] != targets.shape[0]:
                raise RuntimeError(
                    f"loss_only: the LM's head returned {logits.shape[0]} positions for {targets.shape[0]} labels "
                    "(the LM does not call its head once on all hidden states); use loss_only=False"
                )
            loss = F.cross_entropy(logits, targets)  # NaN without labels, as the full path
            fields = dict(out.items())
            fields["loss"] = loss
            out = type(out)(**fields)
        elif labels is not None:
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
            fields = dict(out.items())
            fields["loss"] = loss
            out = type(out)(**fields)
        return out

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        vision_x: Optional[Tensor],
        lang_x: Tensor,
        attention_mask: Optional[Tensor] = None,
        media_mask: Optional[Tensor] = None,
        **generate_kwargs,
    ) -> Tensor:
        """Hugging Face ``generate`` (greedy, sampling, beam search, ...) conditioned on the images.

        The images are encoded and resampled once; each cross-attention layer projects their keys
        and values once (on the prompt) and reuses them at every step, next to the LM's own KV cache.
        ``eos_token_id`` defaults to ``<|endofchunk|>``. ``<image>`` is never generated (there would
        be no image for it). Returns the prompt followed by the new tokens, (B * num_return_sequences, L).
        """
        self._check_inputs(vision_x, lang_x, media_mask, attention_mask)
        new_tokens = generate_kwargs.get("max_new_tokens")
        if isinstance(new_tokens, int) and self.max_positions is not None:
            if lang_x.shape[1] + new_tokens > self.max_positions:
                raise ValueError(
                    f"a prompt of {lang_x.shape[1]} tokens plus max_new_tokens={new_tokens} exceeds the language "
                    f"model's {self.max_positions} positions; shorten the prompt or lower max_new_tokens"
                )
        latents, media_mask = self.encode_media(vision_x, media_mask, batch_size=lang_x.shape[0])
        if attention_mask is None:
            attention_mask = torch.ones_like(lang_x)
        generate_kwargs.setdefault("eos_token_id", self.eoc_token_id)
        generate_kwargs.setdefault("pad_token_id", self.pad_token_id)
        suppress = list(generate_kwargs.pop("suppress_tokens", None) or [])
        generate_kwargs["suppress_tokens"] = sorted(set(suppress) | {self.media_token_id})
        with self.conditioning.activate(self.lang_encoder, latents, media_mask):
            return self.lang_encoder.generate(input_ids=lang_x, attention_mask=attention_mask, **generate_kwargs)

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """Write ``flamingo_config.json`` (base encoder/LM names + sizes + token ids) and the added
        weights as ``flamingo_weights.safetensors``. Base weights are not copied: they are reloaded from
        the named bases, except a randomly initialised vision tower (``pretrained=None``) and base
        parameters replaced after loading (:attr:`overridden_base_parameters`), which are saved too."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        params = dict(self.named_parameters())
        names = set(self.added_parameter_names()) | set(self.overridden_base_parameters)
        if self.config.clip_vision_encoder_pretrained is None:
            names |= {f"vision_encoder.{n}" for n, _ in self.vision_encoder.named_parameters()}
        tensors = {n: params[n].detach().contiguous().cpu() for n in sorted(names)}
        save_file(tensors, str(directory / WEIGHTS_NAME))
        meta = {
            "config": self.config.to_dict(),
            "overridden_base_parameters": sorted(self.overridden_base_parameters),
            "media_token_id": self.media_token_id,
            "eoc_token_id": self.eoc_token_id,
            "pad_token_id": self.pad_token_id,
            "num_base_tokens": self.num_base_tokens,
            "num_new_tokens": self.num_new_tokens,
        }
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], **config_overrides) -> Flamingo:
        """Rebuild the bases named in the config and load the saved weights.

        The weight file must hold exactly the tensors this configuration saves -- the added parameters, the base
        parameters listed as overridden, and the vision tower when it is random (``pretrained=None``) -- with the
        model's shapes; anything missing or unexpected is an error naming the file and the tensors.
        """
        from safetensors.torch import load_file

        from .factory import create_model_and_transforms

        directory = Path(directory)
        meta_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (meta_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found; expected a directory written by Flamingo.save_pretrained")
        meta = json.loads(meta_path.read_text())
        try:  # the weights are checked before any base is built
            tensors = load_file(str(weights_path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"cannot read {weights_path}: {type(e).__name__}: {e}") from None
        _check_weight_values(tensors, weights_path)
        config = {**meta["config"], **_bundled_base_paths(meta["config"], directory), **config_overrides}
        cfg = FlamingoConfig.from_dict(config)
        bundled_clip = directory / BUNDLED_BASES / "open_clip"
        if bundled_clip.is_dir():  # the export's own vision config (tiny or custom towers)
            import open_clip

            open_clip.add_model_config(bundled_clip)
        try:
            model, _, _ = create_model_and_transforms(**cfg.to_dict())
        except OSError as e:  # an unreachable hub id or a missing local directory: say which file named it
            named = {k: config.get(k) for k in ("lang_encoder_path", "tokenizer_path") if config.get(k)}
            raise OSError(f"cannot build the bases that {meta_path} names ({named}): {e}") from None
        for key in ("media_token_id", "eoc_token_id", "pad_token_id", "num_base_tokens", "num_new_tokens"):
            if getattr(model, key) != meta[key]:
                raise ValueError(
                    f"rebuilt tokenizer gives {key}={getattr(model, key)} but the saved model has {meta[key]}"
                )
        params = dict(model.named_parameters())
        added = set(model.added_parameter_names())
        overridden = meta.get("overridden_base_parameters")
        if overridden is None:  # written before the list was recorded: the file's extra tensors are the overrides
            overridden = set(tensors) - added
            if cfg.clip_vision_encoder_pretrained is None:
                overridden -= {n for n in params if n.startswith("vision_encoder.")}
        expected = added | set(overridden)
        if cfg.clip_vision_encoder_pretrained is None:  # a random tower cannot be rebuilt from its name
            expected |= {n for n in params if n.startswith("vision_encoder.")}
        missing, unknown = expected - set(tensors), set(tensors) - set(params)
        unexpected = (set(tensors) & set(params)) - expected
        if missing or unknown or unexpected:
            raise ValueError(
                f"weights in {weights_path} do not fit the model built from {meta_path}: "
                + _describe_mismatch(missing=missing, unknown=unknown, unexpected=unexpected)
            )
        mismatched = [
            f"{n}: saved {tuple(v.shape)}, model {tuple(params[n].shape)}"
            for n, v in sorted(tensors.items())
            if params[n].shape != v.shape
        ]
        if mismatched:
            raise ValueError(
                f"weights in {weights_path} do not fit the model: {len(mismatched)} shape mismatch(es): "
                + "; ".join(mismatched[:5])
            )
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        model.overridden_base_parameters = set(overridden)
        return model


#: The folder of an export that holds bases it carries with it (``./bases/lm`` in the config: relative to the export).
BUNDLED_BASES = "bases"


def _bundled_base_paths(config: dict, directory: Path) -> dict:
    """Config paths to the export's own bases, resolved against the export's directory: ``./bases/...`` as written
    today, and the absolute ``.../bases/<name>`` of older exports when this export has its own copy (a copied export
    must not load the original's files)."""
    resolved = {}
    for key in ("lang_encoder_path", "tokenizer_path"):
        value = config.get(key)
        if not isinstance(value, str):
            continue
        path = Path(value)
        if value.startswith("./") and path.parts[:1] == (BUNDLED_BASES,):
            resolved[key] = str((directory / path).resolve())
        elif (
            path.is_absolute()
            and path.parent.name == BUNDLED_BASES
            and (directory / BUNDLED_BASES / path.name).is_dir()
        ):
            resolved[key] = str((directory / BUNDLED_BASES / path.name).resolve())
    return resolved


def _check_weight_values(tensors: dict, weights_path: Path, limit: int = 5) -> None:
    """Refuse weights that are not floating point or hold NaN/Inf, naming the tensors."""
    not_float = [f"{n} ({v.dtype})" for n, v in sorted(tensors.items()) if not v.is_floating_point()]
    if not_float:
        more = f" and {len(not_float) - limit} more" if len(not_float) > limit else ""
        raise ValueError(
            f"weights in {weights_path} must be floating point; {len(not_float)} tensor(s) are not: "
            f"{', '.join(not_float[:limit])}{more}"
        )
    bad = []
    for name, value in sorted(tensors.items()):
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad.append(f"{name} ({int((~finite).sum())} of {value.numel()} values NaN/Inf)")
    if bad:
        more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
        raise ValueError(
            f"weights in {weights_path} hold non-finite values in {len(bad)} tensor(s): {', '.join(bad[:limit])}{more}"
        )


def _describe_mismatch(limit: int = 5, **groups: set[str]) -> str:
    """ "missing ['a', 'b'] (2 tensors), unknown ['c'] (1 tensor)": the first ``limit`` names of each non-empty group."""
    parts = []
    for label, names in groups.items():
        if names:
            shown = sorted(names)[:limit]
            more = f" and {len(names) - limit} more" if len(names) > limit else ""
            parts.append(f"{label} {shown}{more} ({len(names)} tensor{'s' if len(names) != 1 else ''})")
    return ", ".join(parts)
