"""Import of Hugging Face ``transformers`` Perceiver models (and so of the published DeepMind
weights) into this project's modules.

``from_transformers(hf_model)`` rebuilds a transformers Perceiver - ``PerceiverModel`` with the
pre/post-processors and decoders transformers provides, ``PerceiverForMaskedLM``,
``PerceiverForSequenceClassification``, ``PerceiverForImageClassification{Learned,Fourier,
ConvProcessing}``, ``PerceiverForOpticalFlow``, ``PerceiverForMultimodalAutoencoding`` - from
``PerceiverEncoder``, ``PerceiverDecoder`` and the adapters of ``perceiver.modalities``, and copies
the weights. The result (``ConvertedPerceiver``) is called like the transformers model
(``inputs``, ``attention_mask``, ``subsampled_output_points``) and returns what transformers
returns as ``logits`` (a dict per modality for multimodal autoencoding). ``from_pretrained(name)``
loads a checkpoint with transformers and converts it.

Where transformers deviates from the official DeepMind code, the converted model reproduces
transformers; the project's own defaults follow the official code:

1. Conv stem (``prep_type="conv"``): transformers pads the 7x7/2 convolution by a fixed 3 pixels
   per side (TF-SAME pads 2 before / 3 after for even sizes: a one-pixel shift) and does not pad
   the 3x3/2 max-pool (224 -> 55 instead of 56). It also builds one conv layer whatever
   ``spatial_downsample`` is. Converted: ``conv_padding="symmetric"``, ``pool_padding="valid"``,
   one layer. Default here: TF-SAME for both (``ImageInputAdapter``).
2. ``prep_type="pixels"`` on 4-d images with ``spatial_downsample > 1``: transformers slices the
   batch and channel axes (``inputs[::s, ::s]`` on ``(B, C, H, W)``) instead of height and width,
   and declares ``ceil(C / s)`` channels accordingly. Converted: the same slice before the adapter.
3. MLP activation: transformers uses ``config.hidden_act`` (exact GELU for the published
   configs); the official code uses ``jax.nn.gelu``, i.e. the tanh approximation. Converted: the
   configured activation.
4. Encoder attention mask: transformers adds ``finfo.min`` to masked scores, so an input whose
   elements are *all* masked gets a uniform average of all of them; the official code (and this
   project) returns zeros for such a row. Partially masked inputs agree exactly.
5. Decoder query masks: the official decoder masks queries (``query_mask``); transformers passes
   the input mask as ``query_mask`` but never applies it. Converted: no query mask.
6. Decoder cross-attention ``qk_channels`` default: transformers sizes it by
   ``config.cross_attention_shape_for_attention`` also in decoders; the official decoders always
   use the latent width ("kv"). Converted: transformers' resolved widths.
7. Fourier decoder queries without ``subsampled_output_points``: transformers takes the grid from
   ``inputs.shape[2:]`` of the preprocessed ``(B, M, C)`` array, i.e. a 1-d grid of ``C`` points
   along the channel axis (the official code uses ``output_index_dims``). Converted: the same grid.
   With subsampling both codes use ``-1 + 2 * i / n`` coordinates (see ``GridQueryProvider``).
8. ``PerceiverModel`` with ``subsampled_output_points`` sizes the output modalities as
   ``{"audio": len(points["audio"]), "image": len(points["image"]), "label": 1}`` and, without
   subsampling, by the *input* modality sizes. Converted: the same.
9. ``config.layer_norm_eps`` is unused by transformers' Perceiver (all layer norms use 1e-5,
   as the official code).

Not supported (transformers itself fails on them, or they are outside the published models):
``PerceiverProjectionDecoder`` (abstract, cannot be built) and a standalone
``PerceiverBasicVideoAutoencodingDecoder`` (crashes in ``PerceiverModel.forward``), decoders with ``concat_preprocessed_input=True``, an optical
flow decoder inside a multimodal decoder, ``input_is_dict`` multimodal postprocessors, callable
``hidden_act`` values, ``interpolate_pos_encoding``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .adapters import ClassificationOutputAdapter
from .attention import MLP
from .config import DecoderConfig, EncoderConfig
from .decoder import InputQueryProvider, PerceiverDecoder, QueryProvider
from .encoder import PerceiverEncoder
from .modalities.audio import AudioInputAdapter, AudioOutputAdapter
from .modalities.common import GridPositionFeatures, GridQueryProvider, batch_size_of
from .modalities.flow import OpticalFlowOutputAdapter
from .modalities.image import ImageInputAdapter
from .modalities.multimodal import (
    LabelInputAdapter,
    MultimodalInputAdapter,
    MultimodalOutputAdapter,
    MultimodalQueryProvider,
    split_modalities,
)
from .modalities.text import MaskedLMOutputAdapter, TextInputAdapter
from .position import build_linear_positions, fourier_features

SUPPORTED_CLASSES = (
    "PerceiverModel",
    "PerceiverForMaskedLM",
    "PerceiverForSequenceClassification",
    "PerceiverForImageClassificationLearned",
    "PerceiverForImageClassificationFourier",
    "PerceiverForImageClassificationConvProcessing",
    "PerceiverForOpticalFlow",
    "PerceiverForMultimodalAutoencoding",
)

_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
_OTHER_ACTIVATIONS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "mish": nn.Mish,
}


# ----------------------------------------------------------------------------- converted model


class TransformersFourierQueries(QueryProvider):
    """transformers' Fourier decoder queries (differences 7 and the subsampled coordinates above).

    Subsampled: Fourier features of ``-1 + 2 * i / n`` coordinates of ``output_index_dims``.
    Full decode: features of ``linspace(-1, 1, C)`` with ``C`` the channel width of the decoder's
    inputs. Optional linear projection (``project_pos_dim``).
    """

    def __init__(
        self,
        output_index_dims: Optional[tuple[int, ...]],
        num_bands: int,
        max_resolution: tuple,
        concat_pos: bool,
        sine_only: bool,
        project_dim: Optional[int] = None,
    ):
        super().__init__()
        self.output_index_dims = output_index_dims
        self.num_bands = num_bands
        self.max_resolution = tuple(max_resolution)
        self.concat_pos = concat_pos
        self.sine_only = sine_only
        d = len(self.max_resolution)
        width = d * num_bands * (1 if sine_only else 2) + (d if concat_pos else 0)
        self.projection = nn.Linear(width, project_dim) if project_dim is not None else None
        self.num_query_channels = project_dim if project_dim is not None else width

    def _features(self, pos: Tensor) -> Tensor:
        return fourier_features(pos, self.num_bands, self.max_resolution, self.concat_pos, self.sine_only)

    def forward(self, inputs, subsampled_points: Optional[Tensor] = None) -> Tensor:
        b = batch_size_of(inputs)
        if subsampled_points is not None:
            if self.output_index_dims is None:
                raise ValueError("this decoder has no output_index_dims, it cannot subsample")
            idx = subsampled_points.to(inputs.device) if isinstance(inputs, Tensor) else subsampled_points
            coords = torch.stack(torch.unravel_index(idx, self.output_index_dims), dim=1)
            coords = -1 + 2 * coords / torch.tensor(self.output_index_dims, device=coords.device)[None, :]
        else:
            if len(self.max_resolution) != 1:
                raise ValueError(
                    "transformers builds full-decode Fourier queries on a 1-d grid (the input channel axis); "
                    f"with a {len(self.max_resolution)}-d max_resolution its own decoder fails, pass subsampled_output_points"
                )
            coords = build_linear_positions((inputs.shape[2],), device=inputs.device).reshape(-1, 1)
        feats = self._features(coords).unsqueeze(0).expand(b, -1, -1)
        if isinstance(inputs, Tensor):
            feats = feats.to(inputs.dtype)
        return self.projection(feats) if self.projection is not None else feats


class ConvertedPerceiver(nn.Module):
    """A transformers Perceiver rebuilt from this project's modules.

    ``forward(inputs, attention_mask=None, subsampled_output_points=None)`` -> transformers'
    ``logits`` (the latents when the transformers model has no decoder).
    """

    def __init__(
        self,
        encoder: PerceiverEncoder,
        input_adapter: Optional[nn.Module] = None,
        decoder: Optional[PerceiverDecoder] = None,
        decoder_head: Optional[nn.Module] = None,
        postprocessor: Optional[nn.Module] = None,
        lm_head: Optional[MaskedLMOutputAdapter] = None,
        pixel_stride: int = 1,
        source_class: str = "PerceiverModel",
    ):
        super().__init__()
        self.input_adapter = input_adapter
        self.encoder = encoder
        self.decoder = decoder
        self.decoder_head = decoder_head
        self.postprocessor = postprocessor
        self.lm_head = lm_head
        self.pixel_stride = pixel_stride
        self.source_class = source_class

    @property
    def multimodal(self) -> bool:
        return isinstance(self.input_adapter, MultimodalInputAdapter)

    def forward(
        self,
        inputs: Union[Tensor, Mapping[str, Tensor], None] = None,
        attention_mask: Optional[Tensor] = None,
        subsampled_output_points: Optional[Mapping[str, Optional[Tensor]]] = None,
        *,
        input_ids: Optional[Tensor] = None,
        pixel_values: Optional[Tensor] = None,
    ):
        alias = input_ids if input_ids is not None else pixel_values
        if inputs is not None and alias is not None:
            raise ValueError("pass the input once: `inputs` or its alias (`input_ids` / `pixel_values`)")
        x = inputs if inputs is not None else alias
        if x is None:
            raise ValueError("no input given")
        if self.pixel_stride > 1 and isinstance(x, Tensor) and x.dim() == 4:
            x = x[:: self.pixel_stride, :: self.pixel_stride]  # transformers' pixel slice (difference 2)
        sizes = None
        if self.input_adapter is None:
            width = self.encoder.config.num_input_channels
            if x.dim() != 3 or x.shape[-1] != width:
                raise ValueError(
                    f"without a preprocessor the input must be (batch, length, d_model={width}), got {tuple(x.shape)}"
                )
        elif self.multimodal:
            x, _, sizes = self.input_adapter.encode(x)
        else:
            x = self.input_adapter(x)
            x = x[0] if isinstance(x, tuple) else x
        pad_mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"attention_mask must be (batch, length) = {tuple(x.shape[:2])}, got {tuple(attention_mask.shape)}"
                )
            pad_mask = attention_mask.bool()
        z = self.encoder(x, pad_mask)  # (B, N, D)
        if self.decoder is None:
            return z
        query_inputs: Any = x
        out_sizes = sizes
        if isinstance(self.decoder.query_provider, MultimodalQueryProvider):
            if sizes is None:
                raise ValueError("a multimodal decoder needs a multimodal preprocessor")
            query_inputs = split_modalities(x, sizes)
            if subsampled_output_points is not None:
                missing = [m for m in ("audio", "image") if subsampled_output_points.get(m) is None]
                if missing:
                    raise ValueError(f"transformers' PerceiverModel needs subsampled_output_points for {missing}")
                out_sizes = {
                    "audio": subsampled_output_points["audio"].shape[0],
                    "image": subsampled_output_points["image"].shape[0],
                    "label": 1,
                }
                # transformers ignores entries for modalities its decoder does not have
                known = self.decoder.query_provider.providers
                subsampled_output_points = {m: v for m, v in subsampled_output_points.items() if m in known}
        elif subsampled_output_points is not None:
            raise ValueError("subsampled_output_points needs a multimodal decoder (as in transformers)")
        out = self.decoder(z, query_inputs, subsampled_points=subsampled_output_points)
        if self.decoder_head is not None:
            out = self.decoder_head(out)
        if self.lm_head is not None:
            out = self.lm_head(out)
        if isinstance(self.postprocessor, MultimodalOutputAdapter):
            if out_sizes is None:
                raise ValueError("a multimodal postprocessor needs modality sizes (a multimodal preprocessor)")
            parts = _restructure(out, out_sizes)
            return {m: head(parts[m]) for m, head in self.postprocessor.heads.items()}
        if self.postprocessor is not None:
            out = self.postprocessor(out)
        return out


def _restructure(x: Tensor, sizes: Mapping[str, int]) -> dict[str, Tensor]:
    """transformers' ``restructure``: consecutive slices in sorted order, sizes not checked."""
    out, start = {}, 0
    for m in sorted(sizes):
        out[m] = x[:, start : start + sizes[m]]
        start += sizes[m]
    return out


# ----------------------------------------------------------------------------- weight copying


class _Copier:
    """Copies tensors with exact shape checks and records which parameters were written."""

    def __init__(self):
        self.written: set[int] = set()

    def tensor(self, dst: Tensor, src: Tensor, what: str) -> None:
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"{what}: source shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(src.detach().to(device=dst.device, dtype=dst.dtype))
        self.written.add(id(dst))

    def linear(self, dst: nn.Module, src: nn.Module, what: str) -> None:
        self.tensor(dst.weight, src.weight, f"{what}.weight")
        if (dst.bias is None) != (src.bias is None):
            raise ValueError(f"{what}: bias presence differs")
        if dst.bias is not None:
            self.tensor(dst.bias, src.bias, f"{what}.bias")

    def cross_layer(self, dst: nn.Module, src: nn.Module, what: str) -> None:
        """transformers ``PerceiverLayer`` (cross-attention) -> ``CrossAttentionLayer``."""
        att = src.attention.self
        self.linear(dst.q_norm, att.layernorm1, f"{what}.q_norm")
        self.linear(dst.kv_norm, att.layernorm2, f"{what}.kv_norm")
        self._attention_and_mlp(dst, src, what)

    def self_layer(self, dst: nn.Module, src: nn.Module, what: str) -> None:
        """transformers ``PerceiverLayer`` (self-attention) -> ``SelfAttentionLayer``."""
        self.linear(dst.norm, src.attention.self.layernorm1, f"{what}.norm")
        self._attention_and_mlp(dst, src, what)

    def _attention_and_mlp(self, dst: nn.Module, src: nn.Module, what: str) -> None:
        att = src.attention.self
        self.linear(dst.attention.q_proj, att.query, f"{what}.q_proj")
        self.linear(dst.attention.k_proj, att.key, f"{what}.k_proj")
        self.linear(dst.attention.v_proj, att.value, f"{what}.v_proj")
        self.linear(dst.attention.o_proj, src.attention.output.dense, f"{what}.o_proj")
        self.linear(dst.mlp_norm, src.layernorm, f"{what}.mlp_norm")
        self.linear(dst.mlp[0], src.mlp.dense1, f"{what}.mlp.0")
        self.linear(dst.mlp[2], src.mlp.dense2, f"{what}.mlp.2")

    def check_complete(self, model: nn.Module) -> None:
        missing = [n for n, p in model.named_parameters() if id(p) not in self.written]
        if missing:
            raise RuntimeError(f"conversion left parameters unset: {missing}")


# ----------------------------------------------------------------------------- encoder


def _activation(config) -> tuple[str, Optional[type]]:
    act = config.hidden_act
    if not isinstance(act, str):
        raise NotImplementedError(f"hidden_act must be a string to convert, got {act!r}")
    if act in _GELU:
        return _GELU[act], None
    if act in _OTHER_ACTIVATIONS:
        return "none", _OTHER_ACTIVATIONS[act]
    raise NotImplementedError(
        f"hidden_act={act!r} is not supported; known: {sorted(_GELU) + sorted(_OTHER_ACTIVATIONS)}"
    )


def _convert_encoder(hf, config, gelu: str, cp: _Copier) -> PerceiverEncoder:
    ca = hf.encoder.cross_attention
    sa = hf.encoder.self_attends
    ca_att = ca.attention.self
    sa_att = sa[0].attention.self if len(sa) else None
    enc_cfg = EncoderConfig(
        num_input_channels=ca_att.layernorm2.normalized_shape[0],
        num_latents=config.num_latents,
        num_latent_channels=config.d_latents,
        num_cross_attention_heads=ca_att.num_heads,
        num_cross_attention_qk_channels=ca_att.qk_channels,
        num_cross_attention_v_channels=ca_att.v_channels,
        cross_attention_widening_factor=config.cross_attention_widening_factor,
        num_self_attention_heads=sa_att.num_heads if sa_att is not None else config.num_self_attention_heads,
        num_self_attention_qk_channels=sa_att.qk_channels if sa_att is not None else None,
        num_self_attention_v_channels=sa_att.v_channels if sa_att is not None else None,
        self_attention_widening_factor=config.self_attention_widening_factor,
        num_self_attends_per_block=len(sa),
        num_blocks=config.num_blocks,
        num_cross_attends=1,
        weight_sharing="all",
        use_query_residual=ca.attention.use_query_residual,
        gelu_approximate=gelu,
        attention_dropout=float(config.attention_probs_dropout_prob),
        layer_norm_eps=1e-5,
    )
    enc = PerceiverEncoder(enc_cfg)
    cp.tensor(enc.latents, hf.embeddings.latents, "latents")
    cp.cross_layer(enc.cross_attends[0], ca, "encoder.cross_attention")
    for i, layer in enumerate(sa):
        cp.self_layer(enc.blocks[0][i], layer, f"encoder.self_attends.{i}")
    return enc


# ----------------------------------------------------------------------------- input side


def _hw(size) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        return (int(size[0]), int(size[-1]))
    return (int(size), int(size))


def _position_kwargs(pp) -> dict:
    """Position-encoding arguments of an image/audio preprocessor for our adapters."""
    pe = pp.position_embeddings
    proj = pp.positions_projection
    kw: dict = {"project_pos_dim": proj.out_features if isinstance(proj, nn.Linear) else None}
    if pp.position_encoding_type == "fourier":
        kw.update(
            position_encoding="fourier",
            num_bands=pe.num_bands,
            max_resolution=tuple(pe.max_resolution),
            concat_pos=pe.concat_pos,
            sine_only=pe.sine_only,
        )
    else:
        kw.update(position_encoding="trainable", num_position_channels=pe._num_channels)
    return kw


def _copy_positions(adapter_positions: GridPositionFeatures, pp, cp: _Copier, what: str) -> None:
    if pp.position_encoding_type == "trainable":
        cp.tensor(
            adapter_positions.encoding.embeddings, pp.position_embeddings.position_embeddings, f"{what}.positions"
        )
    if adapter_positions.projection is not None:
        cp.linear(adapter_positions.projection, pp.positions_projection, f"{what}.positions_projection")


def _trainable_grid(adapter, pp, kw: dict) -> None:
    """Trainable positions: size the table by transformers' ``index_dims`` (only its length matters)."""
    if pp.position_encoding_type == "trainable":
        n = int(
            math.prod(
                [pp.position_embeddings._index_dims]
                if isinstance(pp.position_embeddings._index_dims, int)
                else pp.position_embeddings._index_dims
            )
        )
        adapter.positions = GridPositionFeatures(
            (n,), "trainable", num_channels=kw["num_position_channels"], project_dim=kw["project_pos_dim"]
        )


def _convert_image_preprocessor(pp, config, cp: _Copier, what: str) -> tuple[ImageInputAdapter, int]:
    kw = _position_kwargs(pp)
    is_temporal = pp.position_embeddings.num_dimensions > 2
    h, w = _hw(config.image_size)
    s, t = pp.spatial_downsample, pp.temporal_downsample
    in_channels, stride = pp.in_channels, 1
    if is_temporal:
        image_shape: tuple = (max(config.num_frames, t), h, w)
    elif pp.prep_type == "patches" and t > 1:  # two stacked frames merged into one grid (optical flow)
        h, w = _hw(config.train_size)
        image_shape = (t, h, w)
    else:
        image_shape = (h, w)
    if pp.prep_type == "pixels" and not is_temporal and s > 1:
        in_channels, stride, s = math.ceil(in_channels / s), s, 1  # difference 2
    if pp.prep_type == "patches":
        blocks = ((t,) if len(image_shape) == 3 else ()) + (s, s)
        # a configured grid the patches divide (only the Fourier cache uses it; other sizes are encoded on the fly)
        image_shape = tuple(max(d - d % b, b) for d, b in zip(image_shape, blocks))
        if pp.conv_after_patching:  # the input width is only recorded by the projection
            in_channels = pp.conv_after_patches.in_features // math.prod(blocks)
    use_bn = isinstance(getattr(getattr(pp, "convnet", None), "batchnorm", None), nn.BatchNorm2d)
    adapter = ImageInputAdapter(
        image_shape,
        num_channels=in_channels,
        prep_type=pp.prep_type,
        spatial_downsample=4 if pp.prep_type == "conv" else s,  # difference 1: always one conv layer
        temporal_downsample=t,
        out_channels=pp.out_channels,
        conv_after_patching=pp.conv_after_patching,
        concat_or_add_pos=pp.concat_or_add_pos,
        conv_padding="symmetric",
        pool_padding="valid",
        use_batchnorm=use_bn,
        **kw,
    )
    _trainable_grid(adapter, pp, kw)
    if adapter.num_input_channels != pp.num_channels:
        raise ValueError(f"{what}: converted width {adapter.num_input_channels} != transformers' {pp.num_channels}")
    if pp.prep_type == "conv":
        layer = adapter.convnet[0]
        cp.tensor(layer.conv.weight, pp.convnet.conv.weight, f"{what}.conv")
        if use_bn:
            cp.linear(layer.norm, pp.convnet.batchnorm, f"{what}.batchnorm")
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(layer.norm, name).copy_(getattr(pp.convnet.batchnorm, name))
    elif pp.prep_type == "conv1x1":
        cp.linear(adapter.convnet, pp.convnet_1x1, f"{what}.conv1x1")
    if pp.conv_after_patching:
        cp.linear(adapter.patch_projection, pp.conv_after_patches, f"{what}.conv_after_patches")
    _copy_positions(adapter.positions, pp, cp, what)
    return adapter, stride


def _convert_audio_preprocessor(pp, config, cp: _Copier, what: str) -> AudioInputAdapter:
    kw = _position_kwargs(pp)
    spp = pp.samples_per_patch
    if pp.position_encoding_type == "trainable":
        idx = pp.position_embeddings._index_dims
        num_samples = spp * int(math.prod([idx] if isinstance(idx, int) else idx))
    else:
        num_samples = max(spp, (config.num_frames * config.audio_samples_per_frame) // spp * spp)
    adapter = AudioInputAdapter(num_samples, spp, concat_or_add_pos=pp.concat_or_add_pos, **kw)
    if adapter.num_input_channels != pp.num_channels:
        raise ValueError(f"{what}: converted width {adapter.num_input_channels} != transformers' {pp.num_channels}")
    _copy_positions(adapter.positions, pp, cp, what)
    return adapter


def _convert_preprocessor(pp, config, cp: _Copier, what: str = "input_preprocessor") -> tuple[Optional[nn.Module], int]:
    kind = type(pp).__name__
    if pp is None:
        return None, 1
    if kind == "PerceiverTextPreprocessor":
        adapter = TextInputAdapter(config.vocab_size, config.max_position_embeddings, config.d_model)
        cp.tensor(adapter.embedding.weight, pp.embeddings.weight, f"{what}.embeddings")
        cp.tensor(adapter.positions.embeddings, pp.position_embeddings.weight, f"{what}.position_embeddings")
        return adapter, 1
    if kind == "PerceiverImagePreprocessor":
        return _convert_image_preprocessor(pp, config, cp, what)
    if kind == "PerceiverAudioPreprocessor":
        return _convert_audio_preprocessor(pp, config, cp, what), 1
    if kind == "PerceiverOneHotPreprocessor":
        return LabelInputAdapter(pp.num_channels), 1
    if kind == "PerceiverMultimodalPreprocessor":
        adapters = {}
        for m, sub in pp.modalities.items():
            adapter, stride = _convert_preprocessor(sub, config, cp, f"{what}.{m}")
            if adapter is None or isinstance(adapter, MultimodalInputAdapter) or stride != 1:
                raise NotImplementedError(
                    f"{what}.{m}: {type(sub).__name__} is not supported inside a multimodal preprocessor"
                )
            adapters[m] = adapter
        mask_probs = {m: float(p) for m, p in pp.mask_probs.items() if m in adapters}
        mm = MultimodalInputAdapter(adapters, pp.min_padding_size, mask_probs)
        for m in adapters:
            cp.tensor(mm.padding[m], pp.padding[m], f"{what}.padding.{m}")
        for m in mask_probs:
            cp.tensor(mm.mask_tokens[m], pp.mask[m], f"{what}.mask.{m}")
        return mm, 1
    raise NotImplementedError(f"preprocessor {kind} is not supported")


# ----------------------------------------------------------------------------- decoder side


def _decoder_config(layer, final_layer, gelu: str, config) -> DecoderConfig:
    att = layer.attention.self
    q_dim = att.layernorm1.normalized_shape[0]
    return DecoderConfig(
        num_latent_channels=att.layernorm2.normalized_shape[0],
        num_query_channels=q_dim,
        num_output_channels=final_layer.out_features if isinstance(final_layer, nn.Linear) else None,
        num_heads=att.num_heads,
        num_qk_channels=att.qk_channels,
        num_v_channels=att.v_channels,
        widening_factor=layer.mlp.dense1.out_features // q_dim,
        use_query_residual=layer.attention.use_query_residual,
        gelu_approximate=gelu,
        attention_dropout=float(config.attention_probs_dropout_prob),
        layer_norm_eps=1e-5,
    )


def _position_queries(basic, cp: _Copier, what: str) -> QueryProvider:
    """Queries of a transformers ``PerceiverBasicDecoder`` made from its own position encoding."""
    if basic.position_encoding_type == "none":
        raise NotImplementedError(f"{what}: position_encoding_type='none' makes no queries")
    if basic.concat_preprocessed_input:
        raise NotImplementedError(f"{what}: concat_preprocessed_input=True is not supported")
    pe, proj = basic.output_position_encodings, basic.positions_projection
    project_dim = proj.out_features if isinstance(proj, nn.Linear) else None
    if basic.position_encoding_type == "trainable":
        n = int(math.prod([pe._index_dims] if isinstance(pe._index_dims, int) else pe._index_dims))
        provider: QueryProvider = GridQueryProvider(
            (n,), "trainable", num_channels=pe._num_channels, project_dim=project_dim, subsample_mode="official"
        )
        cp.tensor(provider.positions.encoding.embeddings, pe.position_embeddings, f"{what}.position_embeddings")
        if project_dim is not None:
            cp.linear(provider.positions.projection, proj, f"{what}.positions_projection")
        return provider
    dims = basic.output_index_dims
    dims = None if dims is None else ((int(dims),) if isinstance(dims, int) else tuple(int(d) for d in dims))
    provider = TransformersFourierQueries(
        dims, pe.num_bands, tuple(pe.max_resolution), pe.concat_pos, pe.sine_only, project_dim
    )
    if project_dim is not None:
        cp.linear(provider.projection, proj, f"{what}.positions_projection")
    return provider


def _sub_decoder_queries(dec, cp: _Copier, what: str) -> QueryProvider:
    kind = type(dec).__name__
    if kind == "PerceiverBasicDecoder":
        return _position_queries(dec, cp, what)
    if kind in ("PerceiverClassificationDecoder", "PerceiverBasicVideoAutoencodingDecoder"):
        return _position_queries(dec.decoder, cp, f"{what}.decoder")
    raise NotImplementedError(f"{what}: {kind} is not supported inside a multimodal decoder")


def _convert_decoder(dec, config, gelu: str, cp: _Copier, what: str = "decoder"):
    """-> (PerceiverDecoder, head applied to its output or None)."""
    kind = type(dec).__name__
    head: Optional[nn.Module] = None
    if kind == "PerceiverBasicDecoder":
        basic, provider = dec, _position_queries(dec, cp, what)
    elif kind == "PerceiverClassificationDecoder":
        basic, provider = dec.decoder, _position_queries(dec.decoder, cp, f"{what}.decoder")
        head = ClassificationOutputAdapter()
    elif kind == "PerceiverOpticalFlowDecoder":
        basic = dec.decoder
        provider = InputQueryProvider(basic.decoding_cross_attention.attention.self.layernorm1.normalized_shape[0])
        head = OpticalFlowOutputAdapter(_hw(dec.output_image_shape), dec.rescale_factor)
    elif kind == "PerceiverMultimodalDecoder":
        basic = dec.decoder
        providers = {m: _sub_decoder_queries(sub, cp, f"{what}.modalities.{m}") for m, sub in dec.modalities.items()}
        provider = MultimodalQueryProvider(providers, dec.min_padding_size)
        for m in providers:
            cp.tensor(provider.padding[m], dec.padding[m], f"{what}.padding.{m}")
    else:
        raise NotImplementedError(
            f"decoder {kind} is not supported (transformers' PerceiverModel cannot run it either)"
        )
    if basic.position_encoding_only:
        raise NotImplementedError(f"{what}: a position_encoding_only decoder has no cross-attention to convert")
    cfg = _decoder_config(basic.decoding_cross_attention, basic.final_layer, gelu, config)
    decoder = PerceiverDecoder(cfg, provider)
    cp.cross_layer(decoder.cross_attention, basic.decoding_cross_attention, f"{what}.decoding_cross_attention")
    if cfg.num_output_channels is not None:
        cp.linear(decoder.output_projection, basic.final_layer, f"{what}.final_layer")
    return decoder, head


def _convert_postprocessor(pp, config, cp: _Copier, what: str = "output_postprocessor") -> Optional[nn.Module]:
    if pp is None:
        return None
    kind = type(pp).__name__
    if kind == "PerceiverClassificationPostprocessor":
        head = nn.Sequential(
            nn.Linear(pp.classifier.in_features, pp.classifier.out_features), ClassificationOutputAdapter()
        )
        cp.linear(head[0], pp.classifier, f"{what}.classifier")
        return head
    if kind == "PerceiverAudioPostprocessor":
        audio = AudioOutputAdapter(pp.classifier.in_features, pp.classifier.out_features)
        cp.linear(audio.projection, pp.classifier, f"{what}.classifier")
        return audio
    if kind == "PerceiverProjectionPostprocessor":
        proj = nn.Linear(pp.classifier.in_features, pp.classifier.out_features)
        cp.linear(proj, pp.classifier, f"{what}.classifier")
        return proj
    if kind == "PerceiverMultimodalPostprocessor":
        if pp.input_is_dict:
            raise NotImplementedError(f"{what}: input_is_dict=True is not supported")
        heads = {m: _convert_postprocessor(sub, config, cp, f"{what}.{m}") for m, sub in pp.modalities.items()}
        return MultimodalOutputAdapter(heads)
    raise NotImplementedError(f"postprocessor {kind} is not supported")


# ----------------------------------------------------------------------------- public API


def from_transformers(hf_model: nn.Module) -> ConvertedPerceiver:
    """Rebuild a transformers Perceiver model from this project's modules (weights copied).

    The result is in the same train/eval mode, dtype and device as ``hf_model``.
    """
    name = type(hf_model).__name__
    if name not in SUPPORTED_CLASSES:
        raise TypeError(f"cannot convert {name}; supported transformers classes: {', '.join(SUPPORTED_CLASSES)}")
    hf = hf_model if name == "PerceiverModel" else hf_model.perceiver
    config = hf.config
    gelu, other_act = _activation(config)
    cp = _Copier()
    encoder = _convert_encoder(hf, config, gelu, cp)
    adapter, stride = _convert_preprocessor(hf.input_preprocessor, config, cp)
    if encoder.config.num_input_channels != (adapter.num_input_channels if adapter is not None else config.d_model):
        raise ValueError("encoder input width does not match the preprocessor's output width")
    decoder, head = (None, None) if hf.decoder is None else _convert_decoder(hf.decoder, config, gelu, cp)
    postprocessor = _convert_postprocessor(hf.output_postprocessor, config, cp)
    lm_head = None
    if name == "PerceiverForMaskedLM":
        if not isinstance(adapter, TextInputAdapter):
            raise ValueError("PerceiverForMaskedLM needs a text preprocessor")
        lm_head = MaskedLMOutputAdapter(adapter.embedding)
        cp.tensor(lm_head.bias, hf_model.embedding_decoder.bias, "embedding_decoder.bias")
    model = ConvertedPerceiver(encoder, adapter, decoder, head, postprocessor, lm_head, stride, name)
    cp.check_complete(model)
    if other_act is not None:
        for module in model.modules():
            if isinstance(module, MLP):
                module[1] = other_act()
    ref = next(hf_model.parameters())
    return model.to(device=ref.device, dtype=ref.dtype).train(hf_model.training)


def from_pretrained(name_or_path: str, **kwargs) -> ConvertedPerceiver:
    """Load a published Perceiver checkpoint (e.g. ``"deepmind/language-perceiver"``, or a local
    directory written by ``save_pretrained``) with transformers and convert it.

    The transformers class is the one named in the checkpoint's ``config.architectures``
    (``PerceiverModel`` when absent). ``kwargs`` go to transformers' ``from_pretrained``.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(name_or_path, **kwargs)
    if getattr(config, "model_type", None) != "perceiver":
        raise ValueError(f"{name_or_path!r} is a {getattr(config, 'model_type', None)!r} checkpoint, not a Perceiver")
    archs = list(getattr(config, "architectures", None) or ["PerceiverModel"])
    cls_name = next((a for a in archs if a in SUPPORTED_CLASSES), None)
    if cls_name is None:
        raise ValueError(f"{name_or_path!r} declares architectures {archs}; supported: {', '.join(SUPPORTED_CLASSES)}")
    hf_model = getattr(transformers, cls_name).from_pretrained(name_or_path, config=config, **kwargs)
    return from_transformers(hf_model.eval())
