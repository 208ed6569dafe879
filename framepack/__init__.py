"""FramePack: next-frame-section video generation with packed frame context."""

from framepack.config import TransformerConfig
from framepack.models.transformer import FramePackTransformer
from framepack.weights import CheckpointError, load_transformer, save_transformer

__all__ = ["CheckpointError", "FramePackTransformer", "TransformerConfig", "load_transformer", "save_transformer"]
__version__ = "0.1.0"
