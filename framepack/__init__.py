"""FramePack: next-frame-section video generation with packed frame context.

Public API: `load_pipeline`, `Pipeline`, `GenerationRequest` (+ `LoraRef`), `framepack.events`, and for the
transformer alone `load_transformer` / `save_transformer`.
"""

from framepack.config import GenerationRequest, LoraRef, TransformerConfig
from framepack.models.transformer import FramePackTransformer
from framepack.weights import CheckpointError, load_transformer, save_transformer

__all__ = [
    "CheckpointError",
    "FramePackTransformer",
    "GenerationRequest",
    "LoraRef",
    "Pipeline",
    "TransformerConfig",
    "load_pipeline",
    "load_transformer",
    "save_transformer",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The pipeline pulls in PyAV, PIL and the encoders; load it only when asked for.
    if name in ("load_pipeline", "Pipeline"):
        from framepack import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'framepack' has no attribute {name!r}")
