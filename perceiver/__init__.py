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

from .ar import (  # noqa: E402
    PerceiverAR,
    PerceiverARCache,
    PerceiverARConfig,
    RotaryPositionEmbedding,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)

__all__ += [
    "PerceiverAR",
    "PerceiverARCache",
    "PerceiverARConfig",
    "RotaryPositionEmbedding",
    "sample_next_token",
    "top_k_filter",
    "top_p_filter",
]

from .hf import ConvertedPerceiver, from_pretrained, from_transformers  # noqa: E402
from .modalities import (  # noqa: E402
    AudioInputAdapter,
    AudioOutputAdapter,
    BytesTokenizer,
    ConvDownsample,
    DenseOutputAdapter,
    GridPositionFeatures,
    GridQueryProvider,
    ImageInputAdapter,
    LabelInputAdapter,
    MaskedLMOutputAdapter,
    MultimodalInputAdapter,
    MultimodalOutputAdapter,
    MultimodalPerceiverIO,
    MultimodalQueryProvider,
    OpticalFlowInputAdapter,
    OpticalFlowOutputAdapter,
    OpticalFlowQueryProvider,
    PointCloudInputAdapter,
    TextInputAdapter,
    VideoInputAdapter,
    VideoOutputAdapter,
    VideoQueryProvider,
    extract_flow_patches,
    space_to_depth,
)

__all__ += [
    "AudioInputAdapter",
    "AudioOutputAdapter",
    "BytesTokenizer",
    "ConvDownsample",
    "ConvertedPerceiver",
    "DenseOutputAdapter",
    "GridPositionFeatures",
    "GridQueryProvider",
    "ImageInputAdapter",
    "LabelInputAdapter",
    "MaskedLMOutputAdapter",
    "MultimodalInputAdapter",
    "MultimodalOutputAdapter",
    "MultimodalPerceiverIO",
    "MultimodalQueryProvider",
    "OpticalFlowInputAdapter",
    "OpticalFlowOutputAdapter",
    "OpticalFlowQueryProvider",
    "PointCloudInputAdapter",
    "TextInputAdapter",
    "VideoInputAdapter",
    "VideoOutputAdapter",
    "VideoQueryProvider",
    "extract_flow_patches",
    "from_pretrained",
    "from_transformers",
    "space_to_depth",
]
