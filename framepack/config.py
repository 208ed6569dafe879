"""Typed, frozen hyperparameters.

`TransformerConfig` mirrors the fields of the official `config.json` (class
`HunyuanVideoTransformer3DModelPacked`), so a checkpoint directory's config maps onto it
one to one. Variants (tiny test models, the benchmark size) are derived from `FRAMEPACK_HY`
with `dataclasses.replace`, never re-typed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Class names whose config.json we accept: the official one and diffusers' port (same keys).
TRANSFORMER_CLASS_NAMES = ("HunyuanVideoTransformer3DModelPacked", "HunyuanVideoFramepackTransformer3DModel")


@dataclass(frozen=True)
class TransformerConfig:
    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20  # double-stream blocks
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    has_image_proj: bool = True
    image_proj_dim: int = 1152
    has_clean_x_embedder: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_axes_dim", tuple(int(a) for a in self.rope_axes_dim))
        problems = []
        if sum(self.rope_axes_dim) != self.attention_head_dim:
            problems.append(
                f"rope_axes_dim {self.rope_axes_dim} must sum to attention_head_dim {self.attention_head_dim}"
            )
        if any(a % 2 for a in self.rope_axes_dim):
            problems.append(f"every rope axis dim must be even, got {self.rope_axes_dim}")
        if self.qk_norm != "rms_norm":
            problems.append(f"qk_norm must be 'rms_norm' (the only one FramePack uses), got {self.qk_norm!r}")
        if self.patch_size_t != 1:
            problems.append(f"patch_size_t must be 1 for FramePack, got {self.patch_size_t}")
        if not (self.has_image_proj and self.has_clean_x_embedder):
            problems.append("FramePack needs has_image_proj and has_clean_x_embedder set")
        if problems:
            raise ValueError("invalid transformer config: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_axes_dim"] = list(self.rope_axes_dim)
        return {"_class_name": TRANSFORMER_CLASS_NAMES[0], **d}

    @classmethod
    def from_json_dict(cls, d: dict[str, Any], source: str = "config.json") -> TransformerConfig:
        """Build from a diffusers-style config dict; names the offending fields on mismatch."""
        class_name = d.get("_class_name")
        if class_name is not None and class_name not in TRANSFORMER_CLASS_NAMES:
            raise ValueError(
                f"{source} describes a {class_name!r}, not a FramePack transformer "
                f"(expected _class_name {' or '.join(TRANSFORMER_CLASS_NAMES)})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in d.items() if k in known}
        # diffusers' port has this switch; FramePack checkpoints always leave it off.
        if d.get("image_condition_type") not in (None,):
            raise ValueError(
                f"{source}: image_condition_type={d['image_condition_type']!r} is a HunyuanVideo-I2V option; "
                "FramePack checkpoints have none"
            )
        ignored = {k for k in d if k not in known and not k.startswith("_")} - {"image_condition_type"}
        if ignored:
            raise ValueError(f"{source}: unknown transformer config fields {sorted(ignored)}")
        return cls(**fields)


# The official FramePack checkpoints (original and F1 share this config).
FRAMEPACK_HY = TransformerConfig()

# Tiny random model used by tests and the offline smoke run (shapes follow diffusers' own test config).
TINY = dataclasses.replace(
    FRAMEPACK_HY,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=1,
    num_single_layers=2,
    num_refiner_layers=1,
    text_embed_dim=32,
    pooled_projection_dim=16,
    rope_axes_dim=(4, 6, 6),
    image_proj_dim=24,
)
