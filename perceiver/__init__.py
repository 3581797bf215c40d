"""The Perceiver family as standalone PyTorch modules.

Mask convention everywhere: boolean, ``True`` = may attend / is valid (see ``perceiver.attention``).
"""

from .adapters import (
    ArrayInputAdapter,
    ClassificationOutputAdapter,
    IdentityInputAdapter,
    InputAdapter,
    OutputAdapter,
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
    "PerceiverDecoder",
    "PerceiverEncoder",
    "PerceiverIO",
    "PerceiverResampler",
    "PositionQueryProvider",
    "QueryProvider",
    "SelfAttentionLayer",
    "TrainablePositionEncoding",
    "TrainableQueryProvider",
    "build_linear_positions",
    "causal_mask",
    "fourier_features",
    "key_padding_to_attn_mask",
]
