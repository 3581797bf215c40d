"""Modality adapters (raw input -> (B, M, C) [+ mask]) and their decoding side, one file per modality."""

from .audio import AudioInputAdapter, AudioOutputAdapter
from .common import GridPositionFeatures, GridQueryProvider
from .flow import (
    OpticalFlowInputAdapter,
    OpticalFlowOutputAdapter,
    OpticalFlowQueryProvider,
    extract_flow_patches,
)
from .image import (
    ConvDownsample,
    ConvDownsampleLayer,
    DenseOutputAdapter,
    ImageInputAdapter,
    same_padding,
    space_to_depth,
)
from .multimodal import (
    LabelInputAdapter,
    MultimodalInputAdapter,
    MultimodalOutputAdapter,
    MultimodalPerceiverIO,
    MultimodalQueryProvider,
    split_modalities,
)
from .point_cloud import PointCloudInputAdapter
from .text import BytesTokenizer, MaskedLMOutputAdapter, TextInputAdapter
from .video import VideoInputAdapter, VideoOutputAdapter, VideoQueryProvider

__all__ = [
    "AudioInputAdapter",
    "AudioOutputAdapter",
    "BytesTokenizer",
    "ConvDownsample",
    "ConvDownsampleLayer",
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
    "same_padding",
    "space_to_depth",
    "split_modalities",
]
