"""The Perceiver family as standalone PyTorch modules.

Mask convention everywhere: boolean, ``True`` = may attend / is valid (see ``perceiver.attention``).
"""

from . import modalities
from .adapters import (
    ArrayInputAdapter,
    ClassificationOutputAdapter,
    IdentityInputAdapter,
    InputAdapter,
    OutputAdapter,
)
from .ar import (
    PerceiverAR,
    PerceiverARCache,
    PerceiverARConfig,
    RotaryPositionEmbedding,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from .attention import (
    MLP,
    CrossAttentionLayer,
    MultiHeadAttention,
    SelfAttentionLayer,
    causal_mask,
    key_padding_to_attn_mask,
)
from .config import DecoderConfig, EncoderConfig
from .decoder import (
    FourierQueryProvider,
    InputQueryProvider,
    PerceiverDecoder,
    PositionQueryProvider,
    QueryProvider,
    TrainableQueryProvider,
)
from .encoder import PerceiverEncoder
from .hf import ConvertedPerceiver, from_pretrained, from_transformers
from .modalities import *  # noqa: F403  (re-exports every modality adapter; the list is modalities.__all__)
from .model import Perceiver, PerceiverIO
from .position import (
    FourierPositionEncoding,
    TrainablePositionEncoding,
    build_linear_positions,
    fourier_features,
)
from .resampler import PerceiverResampler

__all__ = [
    "ArrayInputAdapter",
    "ClassificationOutputAdapter",
    "ConvertedPerceiver",
    "CrossAttentionLayer",
    "DecoderConfig",
    "EncoderConfig",
    "FourierPositionEncoding",
    "FourierQueryProvider",
    "IdentityInputAdapter",
    "InputAdapter",
    "InputQueryProvider",
    "MLP",
    "MultiHeadAttention",
    "OutputAdapter",
    "Perceiver",
    "PerceiverAR",
    "PerceiverARCache",
    "PerceiverARConfig",
    "PerceiverDecoder",
    "PerceiverEncoder",
    "PerceiverIO",
    "PerceiverResampler",
    "PositionQueryProvider",
    "QueryProvider",
    "RotaryPositionEmbedding",
    "SelfAttentionLayer",
    "TrainablePositionEncoding",
    "TrainableQueryProvider",
    "build_linear_positions",
    "causal_mask",
    "fourier_features",
    "from_pretrained",
    "from_transformers",
    "key_padding_to_attn_mask",
    "sample_next_token",
    "top_k_filter",
    "top_p_filter",
] + modalities.__all__
