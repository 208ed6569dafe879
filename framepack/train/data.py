"""Training data: (video, caption) pairs with cached VAE latents and conditioning embeddings.

A dataset folder holds everything the section trainer reads, so training never runs an encoder:

    info.json                  window, frame size, encoder identity, VAE scaling factor, clip count, source
    manifest.jsonl             one line per clip: name, caption, sections, latent frames, origin (seed / file)
    clips/<name>.safetensors   latents (C, T, h, w) fp16, already scaled by the VAE's scaling factor
                               (exactly what the transformer sees); start (C, 1, h, w), the first frame
                               encoded alone as inference encodes the start image (the VAE's GroupNorms
                               pool over time, so it differs from latents[:, :1]); llama (L, D_text) and clip_pooled
                               (D_pooled,) of the caption; siglip (N, D_image) of the first frame
    uncond.safetensors         the empty prompt's embeddings: the engine's negative prompt, used for
                               caption dropout so that real CFG (--cfg > 1) means something

Embeddings come from the engine's own encoders (`framepack.encoders.TextEncoder` / `ImageEncoder`,
`framepack.vae.encode_frames` with a seeded posterior sample), loaded from component folders laid
out like the real repos (`load_encoders`), so cached inputs equal what inference computes.

A clip of N sections at latent window w has 4(wN + 1) - 3 frames and wN + 1 latents; its first
latent is the start frame's (the causal VAE encodes frame 0 alone), as at inference. Builders:
`build_toy_dataset` (seeded toy-world clips) and `build_video_dataset` (video files + captions,
resampled to 30 fps, cropped to the nearest bucket, cut into clips of up to N sections). Both skip
clips already written, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from framepack.encoders import ImageEncoder, PromptEmbedding, TextEncoder, encoder_identity
from framepack.train import toyworld

INFO, MANIFEST, CLIPS, UNCOND = "info.json", "manifest.jsonl", "clips", "uncond.safetensors"


# ------------------------------------------------------------------------------------ encoders
@dataclass
class Encoders:
    text: TextEncoder
    image: ImageEncoder
    vae: torch.nn.Module
    identity: str  # hash of every component's config: datasets remember which encoders made them

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


def load_encoders(paths: dict[str, Path], *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, prompt_crop: int | None = None) -> Encoders:  # fmt: skip
    """LLaMA + CLIP, SigLIP and the VAE from component folders (names as in `ModelSpec.sources`):
    a toy family (`toyfamily.family_paths`) or a resolved registry model (`registry.resolve_spec`),
    loaded by the engine's own loaders (framepack.components) and named by its identity."""
    from framepack.components import load_image_encoder, load_text_encoder, load_vae

    dev = torch.device(device)
    identity = encoder_identity(paths, prompt_crop)
    text = load_text_encoder(paths, dtype=dtype, device=dev, crop=prompt_crop, identity=identity)
    image = load_image_encoder(paths, dtype=dtype, device=dev)
    return Encoders(text, image, load_vae(paths, dtype=dtype, device=dev), identity)


@contextlib.contextmanager
def _temporal_tiles(vae, enabled: bool) -> Iterator[None]:
    """diffusers encodes clips longer than 16 frames in overlapping temporal tiles by default; at toy
    sizes one causal pass is cheaper and exact, for large frames the tiles bound memory."""
    before = vae.use_framewise_encoding
    vae.use_framewise_encoding = enabled
    try:
        yield
    finally:
        vae.use_framewise_encoding = before


def encode_clip(enc: Encoders, frames: np.ndarray, caption: str, seed: int, *, temporal_tiles: bool = True,
                prompt: PromptEmbedding | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The cached tensors of one clip: frames (T, H, W, 3) uint8 with T = 4K - 3."""
    from framepack import vae as engine_vae

    if (len(frames) - 1) % 4:
        raise ValueError(f"a clip needs 4K - 3 frames (the causal VAE's layout), got {len(frames)}")
    with _temporal_tiles(enc.vae, temporal_tiles):
        latents = engine_vae.encode_frames(enc.vae, frames, torch.Generator().manual_seed(seed))  # (1, C, K, h, w)
    # Inference encodes the start image alone, and the VAE's GroupNorms pool over time, so that latent
    # differs from the clip's first one: keep it as inference computes it, for the context's start slot.
    start = engine_vae.encode(enc.vae, frames[0], torch.Generator().manual_seed(seed))  # (1, C, 1, h, w)
    prompt = prompt or enc.text.encode(caption)
    siglip = enc.image.encode(frames[0])  # (1, N, D)
    return {
        "latents": latents[0].to(torch.float16).contiguous(),  # (C, K, h, w)
        "start": start[0].to(torch.float16).contiguous(),  # (C, 1, h, w)
        "llama": prompt.llama[0].float().contiguous(),  # (L, D)
        "clip_pooled": prompt.clip_pooled[0].float().contiguous(),  # (D,)
        "siglip": siglip[0].float().contiguous(),  # (N, D)
    }


# ------------------------------------------------------------------------------------ writing
class DatasetWriter:
    """Adds clips to a dataset folder; a clip whose file exists is skipped (resumable builds)."""

    def __init__(self, root: str | os.PathLike, info: dict, enc: Encoders) -> None:
        self.root = Path(root)
        (self.root / CLIPS).mkdir(parents=True, exist_ok=True)
        old = json.loads((self.root / INFO).read_text()) if (self.root / INFO).exists() else None
        if old is not None and old.get("encoders") != enc.identity:
            raise ValueError(f"{self.root} was built with other encoders ({old.get('encoders')}); use a new folder")
        self.info = {**info, "encoders": enc.identity, "scaling_factor": enc.scaling_factor}
        self.done = {json.loads(line)["name"] for line in self._manifest_lines()}
        if not (self.root / UNCOND).exists():
            empty = enc.text.encode("")
            _save(self.root / UNCOND, {"llama": empty.llama[0].float(), "clip_pooled": empty.clip_pooled[0].float()})

    def _manifest_lines(self) -> list[str]:
        p = self.root / MANIFEST
        return [line for line in p.read_text().splitlines() if line.strip()] if p.exists() else []

    def has(self, name: str) -> bool:
        return name in self.done

    def add(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        _save(self.root / CLIPS / f"{name}.safetensors", tensors)
        record = {"name": name, "latent_frames": int(tensors["latents"].shape[1]), **meta}
        with (self.root / MANIFEST).open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.done.add(name)

    def finish(self) -> Path:
        self.info["clips"] = len(self.done)
        tmp = self.root / (INFO + ".partial")
        tmp.write_text(json.dumps(self.info, indent=2) + "\n")
        os.replace(tmp, self.root / INFO)
        return self.root


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def build_toy_dataset(root: str | os.PathLike, enc: Encoders, *, clips: int, sections: tuple[int, int] = (1, 6),
                      seed: int = 0, window: int = 9, size: int = toyworld.DEFAULT_SIZE,
                      progress: bool = True) -> Path:  # fmt: skip
    """`clips` toy clips; clip i has a section count uniform in `sections` (inclusive) and is fully
    determined by (seed, i). Held-out evaluation scenes use other seeds (framepack.train.quality)."""
    from tqdm import tqdm

    lo, hi = sections
    if not 1 <= lo <= hi:
        raise ValueError(f"sections must be 1 <= lo <= hi, got {sections}")
    info = {"source": "toy", "window": window, "height": size, "width": size, "seed": seed, "sections": [lo, hi]}
    writer = DatasetWriter(root, info, enc)
    prompts: dict[str, PromptEmbedding] = {}
    for i in tqdm(range(clips), disable=not progress, unit="clip", desc="toy clips", dynamic_ncols=True):
        name = f"toy_{seed}_{i:06d}"
        if writer.has(name):
            continue
        n = int(np.random.default_rng([seed, i, 1]).integers(lo, hi + 1))
        clip = toyworld.make_clip((seed, i), n, window=window, size=size)
        if clip.caption not in prompts:
            prompts[clip.caption] = enc.text.encode(clip.caption)
        tensors = encode_clip(enc, clip.frames, clip.caption, seed=seed * 1_000_003 + i,
                              temporal_tiles=False, prompt=prompts[clip.caption])  # fmt: skip
        writer.add(name, tensors, {"caption": clip.caption, "sections": n, "seed": [seed, i]})
    return writer.finish()


# ------------------------------------------------------------------------------------ video files
def read_video_list(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(video path, caption) pairs from a .jsonl file ({"video": ..., "caption": ...} per line) or a
    .csv/.tsv file with columns video, caption. Relative paths are taken from the list's folder."""
    import csv

    path = Path(path)
    pairs = []
    if path.suffix == ".jsonl":
        for line in path.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                pairs.append((d["video"], d["caption"]))
    else:
        with path.open(newline="") as f:
            rows = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            pairs = [(r["video"], r["caption"]) for r in rows]
    return [(str(p if Path(p).is_absolute() else path.parent / p), c) for p, c in pairs]


def read_video(path: str | os.PathLike, base: int) -> np.ndarray:
    """(T, H, W, 3) uint8 at 30 fps, cropped to the nearest bucket of `base`: read exactly as the
    engine reads an input video (`framepack.inputs.read_video_frames`, one resampling rule)."""
    from framepack.images import nearest_bucket, resize_and_center_crop
    from framepack.inputs import read_video_frames

    frames, size = [], None
    for frame in read_video_frames(path, max_seconds=float("inf")):
        size = size or nearest_bucket(frame.shape[0], frame.shape[1], base)
        frames.append(resize_and_center_crop(frame, *size))
    if not frames:
        raise ValueError(f"{path} contains no frames")
    return np.stack(frames)


def split_clips(frames: int, window: int, max_sections: int) -> list[tuple[int, int]]:
    """(first frame, sections) of consecutive clips cut from a video of `frames` frames, each as long
    as allowed (up to max_sections); a tail shorter than one section is dropped."""
    per = 4 * window  # pixel frames per section
    out, start = [], 0
    while frames - start >= per + 1:
        n = min(max_sections, (frames - start - 1) // per)
        out.append((start, n))
        start += per * n + 1
    return out


def build_video_dataset(root: str | os.PathLike, enc: Encoders, items: list[tuple[str, str]], *, resolution: int,
                        window: int = 9, max_sections: int = 4, seed: int = 0, temporal_tiles: bool = True,
                        progress: bool = True) -> Path:  # fmt: skip
    """Clips of up to `max_sections` sections from video files with captions (for real data)."""
    from tqdm import tqdm

    info = {"source": "videos", "window": window, "resolution": resolution, "seed": seed}
    writer = DatasetWriter(root, info, enc)
    written: dict[str, int] = {}  # video prefix -> clips already in the manifest
    for name in writer.done:
        written[name[: len("video_000000")]] = written.get(name[: len("video_000000")], 0) + 1
    total = {json.loads(line)["name"][: len("video_000000")]: json.loads(line).get("clips_in_video", -1)
             for line in writer._manifest_lines()}  # fmt: skip
    size = None
    for k, (video, caption) in enumerate(tqdm(items, disable=not progress, unit="video", dynamic_ncols=True)):
        prefix = f"video_{k:06d}"
        if prefix in total and written.get(prefix) == total[prefix]:
            continue  # every clip of this video is in already
        frames = read_video(video, resolution)
        size = size or frames.shape[1:3]
        if frames.shape[1:3] != size:
            raise ValueError(f"{video}: bucket {frames.shape[1:3]} differs from the dataset's {size}; "
                             "keep one aspect ratio per dataset")  # fmt: skip
        cuts = split_clips(len(frames), window, max_sections)
        for j, (start, n) in enumerate(cuts):
            name = f"{prefix}_{j:03d}"
            if writer.has(name):
                continue
            clip = frames[start : start + 4 * window * n + 1]
            tensors = encode_clip(
                enc, clip, caption, seed=seed * 1_000_003 + k * 1000 + j, temporal_tiles=temporal_tiles
            )
            meta = {"caption": caption, "sections": n, "video": str(video), "first_frame": start,
                    "clips_in_video": len(cuts)}  # fmt: skip
            writer.add(name, tensors, meta)
    if size is not None:
        writer.info.update(height=int(size[0]), width=int(size[1]))
    return writer.finish()


# ------------------------------------------------------------------------------------ reading
@dataclass
class ClipLatents:
    latents: torch.Tensor  # (1, C, T, h, w) fp32, scaled
    start: torch.Tensor  # (1, C, 1, h, w): the first frame encoded alone, as inference does
    llama: torch.Tensor  # (1, L, D_text)
    clip_pooled: torch.Tensor  # (1, D_pooled)
    siglip: torch.Tensor  # (1, N, D_image)
    caption: str
    sections: int


class LatentDataset:
    """A dataset folder, read back; clips are loaded on first use and kept in memory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not (self.root / INFO).exists():
            raise FileNotFoundError(f"{self.root} is not a FramePack training dataset (no {INFO}; build one with "
                                    "`framepack train data`)")  # fmt: skip
        self.info = json.loads((self.root / INFO).read_text())
        lines = (self.root / MANIFEST).read_text().splitlines()
        self.records = [json.loads(line) for line in lines if line.strip()]
        if not self.records:
            raise ValueError(f"{self.root} holds no clips")
        u = load_file(self.root / UNCOND)
        self.uncond = PromptEmbedding(u["llama"][None], u["clip_pooled"][None])
        self._cache: dict[int, ClipLatents] = {}

    @property
    def window(self) -> int:
        return int(self.info["window"])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ClipLatents:
        if i not in self._cache:
            r = self.records[i]
            t = load_file(self.root / CLIPS / f"{r['name']}.safetensors")
            self._cache[i] = ClipLatents(
                latents=t["latents"].float()[None],
                start=t["start"].float()[None],
                llama=t["llama"][None],
                clip_pooled=t["clip_pooled"][None],
                siglip=t["siglip"][None],
                caption=r["caption"],
                sections=(t["latents"].shape[1] - 1) // self.window,
            )
        return self._cache[i]
