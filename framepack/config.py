"""Typed, frozen hyperparameters.

`TransformerConfig` mirrors the fields of the official `config.json` (class
`HunyuanVideoTransformer3DModelPacked`), so a checkpoint directory's config maps onto it
one to one. Variants (tiny test models, the benchmark size) are derived from `FRAMEPACK_HY`
with `dataclasses.replace`, never re-typed.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framepack.sampling import SAMPLERS

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


class RequestError(ValueError):
    """A generation request with out-of-range or missing values; lists every problem at once."""


# Bucket bases (framepack.images.buckets): the official 640 and the others users ask for.
RESOLUTION_MIN, RESOLUTION_MAX, RESOLUTION_STEP = 64, 1280, 32


def resolution_problem(base: object) -> str | None:
    """Why `base` is not an accepted bucket base, or None."""
    accepted = (f"a multiple of {RESOLUTION_STEP} from {RESOLUTION_MIN} to {RESOLUTION_MAX} "
                "(64, 96, 128, ..., 640, ..., 1280)")  # fmt: skip
    if isinstance(base, bool) or not isinstance(base, numbers.Integral):
        return f"bucket base must be an integer, {accepted}; got {base!r}"
    if base % RESOLUTION_STEP or not RESOLUTION_MIN <= base <= RESOLUTION_MAX:
        return f"bucket base must be {accepted}; got {base}"
    return None


@dataclass(frozen=True)
class FieldInfo:
    """How one GenerationRequest field is offered and checked. The one source of the CLI flags and
    help, the UI controls' ranges and choices, the API schema and `validate()`'s range checks."""

    help: str
    range: tuple[float, float] | None = None  # inclusive; checked by `validate()` (whole numbers for int fields)
    choices: tuple[str, ...] | None = None
    flag: str | None = None  # the CLI flag, where it is not --field-name (the official short names)
    slider: tuple[float, float, float] | None = None  # UI (min, max, step) where the page offers less than `range`
    group: str | None = None  # CLI help section
    cli: bool = True  # offered as a plain flag (image, keyframes and prompt get their own handling)


CONTROLS = "section controls"
CACHE_NAMES = ("teacache", "magcache", "none")
LORAS = "LoRA"
REQUEST_FIELDS: dict[str, FieldInfo] = {
    "image": FieldInfo("start image (PNG, JPEG, WebP, ...)"),
    "prompt": FieldInfo("what happens in the video; timestamped: '[0s: a man waves] [2.4s: he jumps]'"),
    "negative_prompt": FieldInfo("used only with --cfg > 1"),
    "seconds": FieldInfo("video length in seconds", (0.1, 3600), slider=(1, 120, 0.1)),
    "seed": FieldInfo("random seed", (0, 2**63 - 1)),
    "steps": FieldInfo("sampling steps per section", (1, 100), slider=(1, 100, 1)),
    "distilled_guidance": FieldInfo("distilled CFG scale", (1, 32), flag="--gs", slider=(1, 32, 0.01)),
    "cfg": FieldInfo("real CFG scale; 1 = off (one model call per step)", (1, 32), slider=(1, 32, 0.01)),
    "cfg_rescale": FieldInfo("CFG re-scale", (0, 1), flag="--rs", slider=(0, 1, 0.01)),
    "window": FieldInfo("latent window size", (1, 33), slider=(1, 33, 1)),
    "teacache": FieldInfo("step cache on/off (the official 'Use TeaCache' switch; off: --cache none)"),
    "teacache_threshold": FieldInfo("TeaCache threshold (0.1: about 1.6x, 0.15: about 2.1x faster)", (0, 1),
                                    slider=(0, 1, 0.01)),
    "cache": FieldInfo("step cache: skip transformer steps that would barely change (faster, slightly different)",
                       choices=CACHE_NAMES),
    "cache_threshold": FieldInfo("step cache threshold (default: TeaCache --teacache-threshold, MagCache 0.1)",
                                 (0, 1), slider=(0, 1, 0.01)),
    "magcache_k": FieldInfo("MagCache: most consecutive steps skipped", (1, 25), slider=(1, 10, 1)),
    "magcache_retention": FieldInfo("MagCache: the first share of the steps always computes", (0, 1),
                                    slider=(0, 1, 0.01)),
    "resolution": FieldInfo(f"bucket base in pixels, a multiple of {RESOLUTION_STEP} in {RESOLUTION_MIN}.."
                            f"{RESOLUTION_MAX} (default: the model's, 640 for the real models, 64 for tiny)"),
    "crf": FieldInfo("MP4 quality, lower is better", (0, 51), slider=(0, 51, 1)),
    "sampler": FieldInfo("sampler (framepack.sampling.SAMPLERS; unipc is the official bh1)", choices=tuple(SAMPLERS)),
    "shift": FieldInfo("explicit flow shift (default: from the resolution, capped at 7)", (0.01, 100)),
    "output": FieldInfo("output folder (default ./outputs) or a path ending in .mp4", flag="--out"),
    "overwrite": FieldInfo("replace an existing --out FILE.mp4 (and its .json), once the new video is complete"),
    "prompt_blend": FieldInfo("blend the prompts over the section where a timestamped prompt changes",
                              group=CONTROLS),
    "end_image": FieldInfo("original model: the video ends towards this image", group=CONTROLS),
    "end_strength": FieldInfo("how strongly the end frame is held", (0, 1), slider=(0, 1, 0.01), group=CONTROLS),
    "end_embedding_weight": FieldInfo("the end image's share of the image embedding (0.5: average)", (0, 1),
                                      flag="--end-weight", slider=(0, 1, 0.01), group=CONTROLS),
    "keyframes": FieldInfo("pin an image at a time, TIME=IMAGE (repeatable)", flag="--keyframe", group=CONTROLS,
                           cli=False),
    "video": FieldInfo("extend this video (MP4, WebM, GIF) instead of starting from an image", group=CONTROLS),
    "video_context_frames": FieldInfo("input video frames that feed the context", (1, 1000), group=CONTROLS),
    "t2v_start": FieldInfo("text-to-video start frame: color:#RRGGBB or generate", group=CONTROLS),
    "loras": FieldInfo("LoRA file and weight, FILE[:WEIGHT] (repeatable; weight default 1, negative allowed; a "
                       "bare name is looked up in the LoRA folder)", flag="--lora", group=LORAS, cli=False),
    "lora_include": FieldInfo("apply the LoRAs only to transformer modules whose name matches this regex "
                              "(e.g. 'single_transformer_blocks')", group=LORAS),
    "lora_exclude": FieldInfo("leave out the modules whose name matches this regex (e.g. 'norm')", group=LORAS),
}

LORA_WEIGHT_RANGE = (-20.0, 20.0)


@dataclass(frozen=True)
class LoraRef:
    """One LoRA of a request: a file (a path, or a name in the LoRA folder), its weight, and the file's
    sha256 once known (a re-run from a sidecar finds the file by hash when the path has moved)."""

    path: str
    weight: float = 1.0
    sha256: str | None = None

    def problem(self) -> str | None:
        if not isinstance(self.path, str) or not self.path.strip():
            return f"a LoRA needs a file path, got {self.path!r}"
        w, (lo, hi) = self.weight, LORA_WEIGHT_RANGE
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not lo <= w <= hi:
            return f"LoRA {self.path}: weight must be a number in {lo:g}..{hi:g}, got {w!r}"
        sha = self.sha256
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            return f"LoRA {self.path}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}"
        return None

    @classmethod
    def from_json(cls, value: Any) -> LoraRef:
        if isinstance(value, LoraRef):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) and set(value) <= {"path", "weight", "sha256"} and "path" in value:
            return cls(**value)
        raise RequestError(f"a LoRA is {{'path': FILE, 'weight': number}} (or a file path), got {value!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One image-to-video job. Defaults are the official demo's (spec §7). JSON-serialisable.
    What each field means, its range and choices: `REQUEST_FIELDS`."""

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
    cache: str = "teacache"  # framepack.models.caches.STEP_CACHES, or "none"; teacache=False also means none
    cache_threshold: float | None = None  # None: the cache's default (TeaCache: teacache_threshold; MagCache 0.1)
    magcache_k: int = 3
    magcache_retention: float = 0.2
    resolution: int | None = None  # bucket base; None = the model's default (640 for the real models)
    crf: int = 16
    sampler: str = "unipc"
    shift: float | None = None  # explicit flow shift; None = from the sequence length (capped at 7)
    output: str | None = None  # directory (files named by job id) or a path ending in .mp4
    overwrite: bool = False  # replace an existing output file (only when the new video is complete)
    # --- section controls (framepack.controls). `prompt` may be timestamped: "[0s: ...] [2.5s: ...]"
    prompt_blend: bool = False  # blend the embeddings over the section where a timestamped prompt changes
    end_image: str | None = None  # original model: the video ends towards this image
    end_strength: float = 1.0  # how strongly the end frame is held (scales its latent)
    end_embedding_weight: float = 0.5  # the end image's share of the SigLIP image embedding (0.5: average)
    keyframes: tuple[tuple[float, str], ...] = ()  # (seconds, image path): images pinned at times
    video: str | None = None  # extend this video (MP4 / WebM / GIF) instead of starting from an image
    video_context_frames: int = 73  # the input video's last frames encoded into the context (F1)
    t2v_start: str = "color:#808080"  # no image and no video: "color:#RRGGBB" start frame, or "generate"
    # --- LoRAs (framepack.lora): merged into the transformer for this job, taken out for the next
    loras: tuple[LoraRef, ...] = ()
    lora_include: str | None = None  # regex on module names: only these get the LoRAs' deltas
    lora_exclude: str | None = None  # regex on module names: these keep their weights

    kind = "video"  # the job kind (`request_from_json`); not a field
    what = "request"  # how `validate`'s error names it

    def input_files(self) -> list[tuple[str, str | None]]:
        """(the flag a user knows it by, path) of every input file the request reads."""
        named = [("--image", self.image), ("--end-image", self.end_image), ("--video", self.video)]
        return named + [(f"--keyframe {i + 1}", path) for i, (_, path) in enumerate(self.keyframes)]

    def validate(self) -> GenerationRequest:
        """Every problem at once, in one RequestError. Types are checked strictly (a JSON `"steps": "25"`
        or `"teacache": "yes"` is an error, not coerced), with the same wording for every front end."""
        p = self.problems()
        if p:
            raise RequestError(f"invalid {self.what}: " + "; ".join(p))
        return self

    def problems(self) -> list[str]:
        """What `validate` reports: every problem of the request, in words."""
        p = [problem for name in _FIELDS if (problem := _type_problem(name, getattr(self, name)))]
        if isinstance(self.prompt, str) and not self.prompt.strip():
            p.append("prompt is empty: describe the motion, e.g. 'The girl dances gracefully, with clear movements'")
        if self.image is not None and self.video is not None:
            p.append("give either an image to animate or a video to extend, not both")
        if not isinstance(self.t2v_start, str) or not (
            self.t2v_start == "generate" or re.fullmatch(r"color:#[0-9a-fA-F]{6}", self.t2v_start)
        ):
            p.append(f"t2v_start must be 'color:#RRGGBB' or 'generate', got {self.t2v_start!r}")
        if not isinstance(self.keyframes, (tuple, list)):
            p.append(f"keyframes must be a list of (seconds, image path) pairs, got {self.keyframes!r}")
        for kf in self.keyframes if isinstance(self.keyframes, (tuple, list)) else ():
            if not (isinstance(kf, (tuple, list)) and len(kf) == 2 and isinstance(kf[0], (int, float))
                    and not isinstance(kf[0], bool) and isinstance(kf[1], str)):  # fmt: skip
                p.append(f"keyframes are (seconds, image path) pairs, got {kf!r}")
        if not isinstance(self.loras, (tuple, list)) or not all(isinstance(r, LoraRef) for r in self.loras):
            p.append(f"loras must be a list of {{path, weight}} entries, got {self.loras!r}")
        else:
            p.extend(problem for r in self.loras if (problem := r.problem()))
            for name in ("lora_include", "lora_exclude"):
                pattern = getattr(self, name)
                if isinstance(pattern, str):
                    try:
                        re.compile(pattern)
                    except re.error as err:
                        p.append(f"{name} {pattern!r} is not a valid regular expression: {err}")
            if (self.lora_include or self.lora_exclude) and not self.loras:
                p.append("lora_include / lora_exclude need at least one LoRA")
        for name, info in REQUEST_FIELDS.items():
            v = getattr(self, name)
            if v is None and name in _OPTIONAL:
                continue  # left at "automatic"
            if info.range is not None:
                lo, hi = info.range
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
                    p.append(f"{name} must be a number in {lo}..{hi}, got {v!r}")
                elif name in _INTEGER and not isinstance(v, int):
                    p.append(f"{name} must be a whole number, got {v!r}")
            if info.choices is not None and v not in info.choices:
                p.append(f"{name} must be one of {', '.join(info.choices)}, got {v!r}")
        if self.resolution is not None and (problem := resolution_problem(self.resolution)) is not None:
            p.append(problem)
        return p

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> GenerationRequest:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RequestError(f"unknown request fields {unknown}; accepted: {sorted(known)}")
        if "keyframes" in d and isinstance(d["keyframes"], (list, tuple)):  # JSON lists -> tuples
            d = {**d, "keyframes": tuple(tuple(k) if isinstance(k, list) else k for k in d["keyframes"])}
        if "loras" in d and isinstance(d["loras"], (list, tuple)):
            d = {**d, "loras": tuple(LoraRef.from_json(r) for r in d["loras"])}
        return cls(**d)

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["keyframes"] = [list(k) for k in self.keyframes]
        d["loras"] = list(d["loras"]) if isinstance(d["loras"], (tuple, list)) else d["loras"]  # LoraRefs as dicts
        return d


_FIELDS = {f.name: f for f in dataclasses.fields(GenerationRequest)}


def _type_problem(name: str, value: Any) -> str | None:
    """A value of the wrong kind for a text or a true/false field (numbers: the range check says it)."""
    if value is None and name in _OPTIONAL:
        return None
    kind = _FIELDS[name].type.split(" | ")[0]
    if kind == "bool" and not isinstance(value, bool):
        return f"{name} must be true or false, got {value!r}"
    if kind == "str" and not isinstance(value, str):
        return f"{name} must be text, got {value!r}"
    return None



_OPTIONAL = {n for n, f in _FIELDS.items() if f.default is None}  # None means "automatic" / "not given"
_INTEGER = {n for n, f in _FIELDS.items() if f.type in ("int", "int | None")}
if set(REQUEST_FIELDS) != set(_FIELDS):  # a new request field needs its entry (help, range) first
    raise ImportError(f"REQUEST_FIELDS and GenerationRequest disagree on {sorted(set(REQUEST_FIELDS) ^ set(_FIELDS))}")


# ------------------------------------------------------------------------------------ frame edits
FRAME_EDIT = "frame edit"


@dataclass(frozen=True)
class EditPreset:
    """A recipe people use for one-frame edits (`FrameLayout` defaults a request can override)."""

    help: str
    target: int | None  # None: the latent window W (the official "last frame of the section")
    controls: tuple[int, ...]  # indices of the start image and the reference images, in order
    no_2x: bool = False
    no_4x: bool = False
    no_post: bool = False


EDIT_PRESETS: dict[str, EditPreset] = {
    "edit": EditPreset("the start image some time later, following the prompt (a larger --target-index means "
                       "more change)", None, (0,)),
    "kisekaeichi": EditPreset("outfit / reference transfer: the start image (masked to face and body) wearing what "
                              "the reference shows (masked to the clothes)", 1, (0, 10), True, True, True),
    "multi-control": EditPreset("several control images side by side in time", None, (0, 1), True, True),
}


@dataclass(frozen=True)
class EditControl:
    """A reference image of a frame edit: its file, its RoPE index (None: the preset's) and an optional
    mask (grayscale, 255 = keep, 0 = ignore; without one, the image's alpha channel if it has one)."""

    image: str
    index: int | None = None
    mask: str | None = None

    @classmethod
    def from_json(cls, value: Any) -> EditControl:
        if isinstance(value, EditControl):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) and "image" in value and set(value) <= {"image", "index", "mask"}:
            return cls(**value)
        raise RequestError(f"a control is {{'image': FILE, 'index': N, 'mask': FILE}} (index and mask optional), "
                           f"got {value!r}")  # fmt: skip

    def problem(self, n: int) -> str | None:
        if not isinstance(self.image, str) or not self.image:
            return f"control {n}: an image file is needed, got {self.image!r}"
        if self.index is not None and (isinstance(self.index, bool) or not isinstance(self.index, int)):
            return f"control {n}: index must be a whole number, got {self.index!r}"
        if self.mask is not None and (not isinstance(self.mask, str) or not self.mask):
            return f"control {n}: mask must be an image file, got {self.mask!r}"
        return None


EDIT_FIELDS: dict[str, FieldInfo] = {
    "preset": FieldInfo("recipe: " + "; ".join(f"{k}: {v.help}" for k, v in EDIT_PRESETS.items()),
                        choices=tuple(EDIT_PRESETS), group=FRAME_EDIT),
    "target_index": FieldInfo("RoPE index of the edited frame (default: the preset's, edit 9 = the window; larger "
                              "= more change, holds up to about 40)", (0, 100), slider=(0, 40, 1), group=FRAME_EDIT),
    "image_index": FieldInfo("RoPE index of the start image (default: the preset's, 0)", (0, 100), group=FRAME_EDIT),
    "image_mask": FieldInfo("mask for the start image (grayscale; white = keep)", group=FRAME_EDIT),
    "controls": FieldInfo("reference image IMG[@INDEX][:MASK] (repeatable)", flag="--control", group=FRAME_EDIT,
                          cli=False),
    "no_2x": FieldInfo("pass no 2x context (default: the preset's)", group=FRAME_EDIT),
    "no_4x": FieldInfo("pass no 4x context (default: the preset's)", group=FRAME_EDIT),
    "no_post": FieldInfo("no zero 'post' latent after the controls (default: the preset's)", group=FRAME_EDIT),
    "save_controls": FieldInfo("also write each control image as the model sees it (masked, VAE round trip)",
                               group=FRAME_EDIT),
}
# Video settings a frame edit has no use for: refused when given, left out of its JSON.
VIDEO_ONLY = ("seconds", "crf", "prompt_blend", "end_image", "end_strength", "end_embedding_weight", "keyframes",
              "video", "video_context_frames", "t2v_start")  # fmt: skip


@dataclass(frozen=True)
class EditRequest(GenerationRequest):
    """A one-frame edit (framepack.oneframe): the start image "some time later" following the prompt,
    optionally with reference images. The sampling, cache and LoRA fields are GenerationRequest's; the
    video-only ones (`VIDEO_ONLY`) do not apply. What each new field means: `EDIT_FIELDS`."""

    preset: str = "edit"
    target_index: int | None = None
    image_index: int | None = None
    image_mask: str | None = None
    controls: tuple[EditControl, ...] = ()
    no_2x: bool | None = None
    no_4x: bool | None = None
    no_post: bool | None = None
    save_controls: bool = False

    kind = "edit"
    what = "frame edit"

    def input_files(self) -> list[tuple[str, str | None]]:
        named = [("--image", self.image), ("--image-mask", self.image_mask)]
        for n, c in enumerate(self.controls, 2):
            named += [(f"control {n}", getattr(c, "image", None)), (f"control {n}'s mask", getattr(c, "mask", None))]
        return named

    def layout(self):
        """The `sections.FrameLayout` of this request: its own settings over the preset's."""
        from framepack.sections import FrameLayout

        preset = EDIT_PRESETS.get(self.preset, EDIT_PRESETS["edit"])
        indices, given = [], [self.image_index, *(c.index for c in self.controls)]
        for i, index in enumerate(given):
            if index is None:
                index = preset.controls[i] if i < len(preset.controls) else indices[-1] + 1
            indices.append(index)

        def pick(value: bool | None, default: bool) -> bool:
            return default if value is None else value

        target = self.target_index if self.target_index is not None else preset.target
        return FrameLayout(self.window if target is None else target, tuple(indices),
                           post=not pick(self.no_post, preset.no_post), x2=not pick(self.no_2x, preset.no_2x),
                           x4=not pick(self.no_4x, preset.no_4x))  # fmt: skip

    def problems(self) -> list[str]:
        p = super().problems()
        defaults = GenerationRequest()
        changed = [name for name in VIDEO_ONLY if getattr(self, name) != getattr(defaults, name)]
        if changed:
            p.append(f"{', '.join(changed)} {'does' if len(changed) == 1 else 'do'} not apply to a frame edit "
                     "(it makes one image)")  # fmt: skip
        if self.image is None:
            p.append("a frame edit needs a start image")
        if self.preset not in EDIT_PRESETS:
            p.append(f"preset must be one of {', '.join(EDIT_PRESETS)}, got {self.preset!r}")
        for name in ("no_2x", "no_4x", "no_post"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                p.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.save_controls, bool):
            p.append(f"save_controls must be true or false, got {self.save_controls!r}")
        if self.image_mask is not None and (not isinstance(self.image_mask, str) or not self.image_mask):
            p.append(f"image_mask must be an image file, got {self.image_mask!r}")
        controls_ok = isinstance(self.controls, (tuple, list)) and all(
            isinstance(c, EditControl) for c in self.controls)  # fmt: skip
        if not controls_ok:
            p.append(f"controls must be a list of {{image, index, mask}} entries, got {self.controls!r}")
        else:
            p.extend(problem for n, c in enumerate(self.controls, 2) if (problem := c.problem(n)))
        for name, info in EDIT_FIELDS.items():
            v = getattr(self, name)
            if info.range is not None and v is not None:
                lo, hi = info.range
                if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                    p.append(f"{name} must be a whole number in {lo:g}..{hi:g}, got {v!r}")
        if not p:
            p.extend(self.layout().problems(self.window)[0])
        return p

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> EditRequest:
        d = dict(d)
        kind = d.pop("kind", cls.kind)
        if kind != cls.kind:
            raise RequestError(f"not a frame edit (kind {kind!r})")
        video = sorted(set(d) & set(VIDEO_ONLY))
        if video:
            raise RequestError(f"{video} do not apply to a frame edit (it makes one image); leave them out")
        known = {f.name for f in dataclasses.fields(cls)} - set(VIDEO_ONLY)
        unknown = sorted(set(d) - known)
        if unknown:
            raise RequestError(f"unknown frame edit fields {unknown}; accepted: {sorted(known)}")
        if isinstance(d.get("controls"), (list, tuple)):
            d["controls"] = tuple(EditControl.from_json(c) for c in d["controls"])
        if isinstance(d.get("loras"), (list, tuple)):
            d["loras"] = tuple(LoraRef.from_json(r) for r in d["loras"])
        return cls(**d)

    def to_json_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in super().to_json_dict().items() if k not in VIDEO_ONLY}
        d["controls"] = [dataclasses.asdict(c) if isinstance(c, EditControl) else c for c in self.controls]
        return {"kind": self.kind, **d}


def request_from_json(d: dict[str, Any]) -> GenerationRequest:
    """A stored or submitted request of any kind: {"kind": "edit", ...} is an EditRequest; no kind (or
    "video") a GenerationRequest."""
    if not isinstance(d, dict):
        raise RequestError(f"a request is a JSON object, got {type(d).__name__}")
    kind = d.get("kind", "video")
    if kind == EditRequest.kind:
        return EditRequest.from_json_dict(d)
    if kind != "video":
        raise RequestError(f"unknown job kind {kind!r}; accepted: video, {EditRequest.kind}")
    return GenerationRequest.from_json_dict({k: v for k, v in d.items() if k != "kind"})


def framepack_home() -> Path:
    """The per-user folder (FRAMEPACK_HOME, default ~/.cache/framepack): the tiny family, the prompt
    cache, the LoRA folder, MagCache tables."""
    return Path(os.environ.get("FRAMEPACK_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "framepack"))


MEMORY_MODES = ("auto", "managed", "off")
FP8_MODES = ("storage", "compute")  # fp8 weights dequantised to bf16 for each matmul / fp8 matmuls (Hopper+)


@dataclass(frozen=True)
class RuntimeOptions:
    """How the engine uses the machine (not what it generates)."""

    preserved_memory_gb: float | None = None  # device memory to leave free; None = automatic
    fp8: str | None = None  # the blocks' weights in fp8 (halve their memory; lossy): FP8_MODES (True = "storage")
    keep_text_encoders: bool = False  # keep LLaMA + CLIP after encoding (more RAM, faster new prompts)
    memory: str = "auto"  # "auto": manage device memory on accelerators; "managed": also on the CPU; "off"
    device_free_bytes: int | None = None  # pretend this much device memory is free (tests, planning)
    lora_dir: str | None = None  # where bare LoRA names and hashes are looked up (default <FRAMEPACK_HOME>/loras)
    compile: bool = False  # torch.compile the transformer's block classes (regional: each class once)

    def __post_init__(self) -> None:
        if isinstance(self.fp8, bool):  # the earlier on/off switch
            object.__setattr__(self, "fp8", "storage" if self.fp8 else None)
        if self.fp8 is not None and self.fp8 not in FP8_MODES:
            raise RequestError(f"fp8 must be one of {', '.join(FP8_MODES)} (or off), got {self.fp8!r}")
        if self.memory not in MEMORY_MODES:
            raise RequestError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")
        if self.preserved_memory_gb is not None and not 0 <= self.preserved_memory_gb <= 1024:
            raise RequestError(f"preserved memory must be 0..1024 GB, got {self.preserved_memory_gb}")
