"""Typed, self-validating configurations of the Perceiver encoder and decoder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Optional

WeightSharing = Literal["all", "all_but_first", "none"]


def _check_positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


def _check_heads(cfg: Any, heads: str, channels: str, default: int) -> None:
    num_heads = getattr(cfg, heads)
    value = getattr(cfg, channels)
    width = default if value is None else value
    if width % num_heads != 0:
        raise ValueError(
            f"{type(cfg).__name__}.{channels}={width}"
            f"{' (defaulted)' if value is None else ''} is not divisible by {heads}={num_heads}"
        )


def _check_choice(cfg: Any, name: str, choices: tuple) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"{type(cfg).__name__}.{name} must be one of {choices}, got {value!r}")


def _check_prob(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be in [0, 1), got {value!r}")


class _Config:
    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


@dataclass
class EncoderConfig(_Config):
    """Perceiver encoder: a learned latent array cross-attends to the input, then latent self-attention.

    ``num_blocks`` latent blocks of ``num_self_attends_per_block`` self-attention layers each run in
    sequence; the first ``num_cross_attends`` blocks are each preceded by a cross-attention from the
    input (1 = Perceiver IO; ``num_blocks`` = the original Perceiver's iterative attention).

    ``weight_sharing`` applies to latent blocks and cross-attends alike: ``"all"`` - all latent blocks
    share one set of weights and all cross-attends another (Perceiver IO's repeated latent block);
    ``"all_but_first"`` - the first block and the first cross-attend have their own weights, every
    repeat after them shares one set (the Perceiver paper); ``"none"`` - nothing is shared.
    """

    num_input_channels: int
    num_latents: int = 256
    num_latent_channels: int = 512
    num_cross_attention_heads: int = 1
    num_cross_attention_qk_channels: Optional[int] = None
    num_cross_attention_v_channels: Optional[int] = None
    cross_attention_shape_for_attention: Literal["kv", "q"] = "kv"
    cross_attention_widening_factor: int = 1
    num_self_attention_heads: int = 8
    num_self_attention_qk_channels: Optional[int] = None
    num_self_attention_v_channels: Optional[int] = None
    self_attention_widening_factor: int = 1
    num_self_attends_per_block: int = 6
    num_blocks: int = 1
    num_cross_attends: int = 1
    weight_sharing: WeightSharing = "all"
    use_query_residual: bool = True
    bias: bool = True
    qk_layernorm: bool = False
    gelu_approximate: Literal["none", "tanh"] = "none"
    attention_dropout: float = 0.0
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    init_scale: float = 0.02
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_positive(
            self,
            "num_input_channels",
            "num_latents",
            "num_latent_channels",
            "num_cross_attention_heads",
            "num_self_attention_heads",
            "cross_attention_widening_factor",
            "self_attention_widening_factor",
            "num_self_attends_per_block",
            "num_blocks",
            "num_cross_attends",
        )
        _check_choice(self, "weight_sharing", ("all", "all_but_first", "none"))
        _check_choice(self, "cross_attention_shape_for_attention", ("kv", "q"))
        _check_choice(self, "gelu_approximate", ("none", "tanh"))
        _check_prob(self, "attention_dropout", "dropout")
        if self.num_cross_attends > self.num_blocks:
            raise ValueError(
                f"EncoderConfig.num_cross_attends={self.num_cross_attends} cannot exceed "
                f"num_blocks={self.num_blocks} (each cross-attend precedes one latent block)"
            )
        ca_default = (
            self.num_input_channels if self.cross_attention_shape_for_attention == "kv" else self.num_latent_channels
        )
        _check_heads(self, "num_cross_attention_heads", "num_cross_attention_qk_channels", ca_default)
        ca_qk = self.num_cross_attention_qk_channels or ca_default
        _check_heads(self, "num_cross_attention_heads", "num_cross_attention_v_channels", ca_qk)
        _check_heads(self, "num_self_attention_heads", "num_self_attention_qk_channels", self.num_latent_channels)
        sa_qk = self.num_self_attention_qk_channels or self.num_latent_channels
        _check_heads(self, "num_self_attention_heads", "num_self_attention_v_channels", sa_qk)


@dataclass
class DecoderConfig(_Config):
    """Perceiver IO decoder: output queries cross-attend to the latents, then an optional projection.

    ``num_output_channels=None`` skips the final projection (``final_project=False`` in the official code).
    """

    num_latent_channels: int
    num_query_channels: int
    num_output_channels: Optional[int] = None
    num_heads: int = 1
    num_qk_channels: Optional[int] = None
    num_v_channels: Optional[int] = None
    shape_for_attention: Literal["kv", "q"] = "kv"
    widening_factor: int = 1
    use_query_residual: bool = False
    bias: bool = True
    qk_layernorm: bool = False
    gelu_approximate: Literal["none", "tanh"] = "none"
    attention_dropout: float = 0.0
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_positive(self, "num_latent_channels", "num_query_channels", "num_heads", "widening_factor")
        if self.num_output_channels is not None:
            _check_positive(self, "num_output_channels")
        _check_choice(self, "shape_for_attention", ("kv", "q"))
        _check_choice(self, "gelu_approximate", ("none", "tanh"))
        _check_prob(self, "attention_dropout", "dropout")
        default = self.num_latent_channels if self.shape_for_attention == "kv" else self.num_query_channels
        _check_heads(self, "num_heads", "num_qk_channels", default)
        _check_heads(self, "num_heads", "num_v_channels", self.num_qk_channels or default)
