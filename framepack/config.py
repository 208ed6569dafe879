"""Typed, frozen hyperparameters.

`TransformerConfig` mirrors the fields of the official `config.json` (class
`HunyuanVideoTransformer3DModelPacked`), so a checkpoint directory's config maps onto it
one to one. Variants (tiny test models, the benchmark size) are derived from `FRAMEPACK_HY`
with `dataclasses.replace`, never re-typed.
"""

from __future__ import annotations

import dataclasses
import re
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


SAMPLERS = ("unipc", "unipc-bh2", "euler")


class RequestError(ValueError):
    """A generation request with out-of-range or missing values; lists every problem at once."""


@dataclass(frozen=True)
class GenerationRequest:
    """One image-to-video job. Defaults are the official demo's (spec §7). JSON-serialisable."""

    image: str | None = None  # path of the start image
    prompt: str = ""
    negative_prompt: str = ""  # used only when cfg > 1
    seconds: float = 5.0
    seed: int = 31337
    steps: int = 25
    distilled_guidance: float = 10.0  # "gs": goes through the guidance embedder
    cfg: float = 1.0  # real classifier-free guidance; 1 = off (one model call per step)
    cfg_rescale: float = 0.0  # "rs"
    window: int = 9  # latent window size
    teacache: bool = True
    teacache_threshold: float = 0.15
    resolution: int | None = None  # bucket base; None = the model's default (640 for the real models)
    crf: int = 16
    sampler: str = "unipc"
    shift: float | None = None  # explicit flow shift; None = from the sequence length (capped at 7)
    output: str | None = None  # directory (files named by job id) or a path ending in .mp4
    # --- section controls (framepack.controls). `prompt` may be timestamped: "[0s: ...] [2.5s: ...]"
    prompt_blend: bool = False  # blend the embeddings over the section where a timestamped prompt changes
    end_image: str | None = None  # original model: the video ends towards this image
    end_strength: float = 1.0  # how strongly the end frame is held (scales its latent)
    end_embedding_weight: float = 0.5  # the end image's share of the SigLIP image embedding (0.5: average)
    keyframes: tuple[tuple[float, str], ...] = ()  # (seconds, image path): images pinned at times
    video: str | None = None  # extend this video (MP4 / WebM / GIF) instead of starting from an image
    video_context_frames: int = 73  # the input video's last frames encoded into the context (F1)
    t2v_start: str = "color:#808080"  # no image and no video: "color:#RRGGBB" start frame, or "generate"

    def validate(self) -> GenerationRequest:
        p = []

        def rng(name: str, lo: float, hi: float) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
                p.append(f"{name} must be a number in {lo}..{hi}, got {v!r}")

        if not isinstance(self.prompt, str) or not self.prompt.strip():
            p.append("prompt is empty: describe the motion, e.g. 'The girl dances gracefully, with clear movements'")
        if self.image is not None and self.video is not None:
            p.append("give either an image to animate or a video to extend, not both")
        if not isinstance(self.t2v_start, str) or not (
            self.t2v_start == "generate" or re.fullmatch(r"color:#[0-9a-fA-F]{6}", self.t2v_start)
        ):
            p.append(f"t2v_start must be 'color:#RRGGBB' or 'generate', got {self.t2v_start!r}")
        rng("end_strength", 0, 1)
        rng("end_embedding_weight", 0, 1)
        if not isinstance(self.video_context_frames, int) or not 1 <= self.video_context_frames <= 1000:
            p.append(f"video_context_frames must be a whole number in 1..1000, got {self.video_context_frames!r}")
        for kf in self.keyframes:
            if not (isinstance(kf, (tuple, list)) and len(kf) == 2 and isinstance(kf[0], (int, float))
                    and not isinstance(kf[0], bool) and isinstance(kf[1], str)):  # fmt: skip
                p.append(f"keyframes are (seconds, image path) pairs, got {kf!r}")
        rng("seconds", 0.1, 3600)
        rng("steps", 1, 100)
        rng("distilled_guidance", 1, 32)
        rng("cfg", 1, 32)
        rng("cfg_rescale", 0, 1)
        rng("window", 1, 33)
        rng("crf", 0, 51)
        rng("teacache_threshold", 0, 1)
        for name in ("seed", "steps", "window", "crf"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                p.append(f"{name} must be a whole number, got {getattr(self, name)!r}")
        if isinstance(self.seed, int) and not 0 <= self.seed < 2**63:
            p.append(f"seed must be in 0..2^63-1, got {self.seed}")
        if self.sampler not in SAMPLERS:
            p.append(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.shift is not None:
            rng("shift", 0.01, 100)
        if self.resolution is not None:
            from framepack.images import ImageError, buckets

            try:
                buckets(self.resolution)
            except ImageError as err:
                p.append(str(err))
        if p:
            raise RequestError("invalid request: " + "; ".join(p))
        return self

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> GenerationRequest:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RequestError(f"unknown request fields {unknown}; accepted: {sorted(known)}")
        if "keyframes" in d and isinstance(d["keyframes"], (list, tuple)):  # JSON lists -> tuples
            d = {**d, "keyframes": tuple(tuple(k) if isinstance(k, list) else k for k in d["keyframes"])}
        return cls(**d)

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["keyframes"] = [list(k) for k in self.keyframes]
        return d


MEMORY_MODES = ("auto", "managed", "off")


@dataclass(frozen=True)
class RuntimeOptions:
    """How the engine uses the machine (not what it generates)."""

    preserved_memory_gb: float | None = None  # device memory to leave free; None = automatic
    fp8: bool = False  # store the transformer blocks' weights as fp8 (halves their memory; lossy)
    keep_text_encoders: bool = False  # keep LLaMA + CLIP after encoding (more RAM, faster new prompts)
    memory: str = "auto"  # "auto": manage device memory on accelerators; "managed": also on the CPU; "off"
    device_free_bytes: int | None = None  # pretend this much device memory is free (tests, planning)

    def __post_init__(self) -> None:
        if self.memory not in MEMORY_MODES:
            raise RequestError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")
        if self.preserved_memory_gb is not None and not 0 <= self.preserved_memory_gb <= 1024:
            raise RequestError(f"preserved memory must be 0..1024 GB, got {self.preserved_memory_gb}")
