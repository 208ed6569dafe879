"""Fingerprint what the engine computes for a fixed set of jobs: run before and after a structural change.

    python benchmarks/engine_fingerprint.py > before.json      # on the old commit
    python benchmarks/engine_fingerprint.py > after.json       # on the new one
    python benchmarks/engine_fingerprint.py --compare before.json after.json

For every job it records a SHA-256 of each latent tensor handed to the VAE decoder (in call order),
of the decoder's output, and of the exact uint8 frame sequence the MP4 writer receives, assembled in
display order (final frames at their side, the pending edge, frames put in front); plus the sidecar
with its run-dependent entries (times, dates, paths, memory peaks) removed. Hashes of the frames
handed to the encoder, not of the MP4 bytes: x264 is not always bitwise reproducible.

Jobs: the README's main command (the shipped toy model), 3-section tiny / tiny-f1 jobs, each
sampler, real CFG with a negative prompt, timestamped prompts with blending, an end frame and
keyframes, text-to-video (colour and generated start), video extension on both schedules, and a
job cancelled after one section and then resumed from its saved state. Only public entry points are
used (load_pipeline, GenerationRequest, Pipeline.generate), so one script serves both commits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = {"created", "timings", "peak_vram_bytes", "peak_rss_bytes", "versions", "framepack_version", "video"}


def _digest(x) -> str:
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous()
        data = x.view(torch.uint8).numpy().tobytes() if x.dtype != torch.bool else x.numpy().tobytes()
        head = f"{tuple(x.shape)}{x.dtype}".encode()
    else:
        x = np.ascontiguousarray(x)
        data, head = x.tobytes(), f"{x.shape}{x.dtype}".encode()
    return hashlib.sha256(head + data).hexdigest()[:16]


class _Spy:
    """Records decoder inputs/outputs and rebuilds the writer's display-order frame sequence."""

    def __init__(self) -> None:
        self.decoded: list[str] = []
        self.pixels: list[str] = []
        self.writers: dict[int, dict] = {}
        self.finished: list[str] = []

    def install(self, mp) -> None:
        from framepack import vae
        from framepack.video import SectionVideoWriter

        real_decode = vae.decode
        spy = self

        def decode(model, latents, **kw):
            out = real_decode(model, latents, **kw)
            spy.decoded.append(_digest(latents))
            spy.pixels.append(_digest(out))
            return out

        mp.setattr(vae, "decode", decode)

        def shadow(writer) -> dict:
            return spy.writers.setdefault(id(writer), {"final": [], "pending": None, "at": "end"})

        real_add, real_pending = SectionVideoWriter.add_final, SectionVideoWriter.set_pending
        real_prepend, real_finish = SectionVideoWriter.prepend, SectionVideoWriter.finish

        def add_final(self, frames, at="end"):
            s = shadow(self)
            frames = np.asarray(frames)
            s["final"] = [*s["final"], frames] if at == "end" else [frames, *s["final"]]
            return real_add(self, frames, at)

        def set_pending(self, frames, at="end"):
            s = shadow(self)
            s["pending"], s["at"] = (None if frames is None else np.array(frames)), at
            return real_pending(self, frames, at)

        def prepend(self, chunks):
            chunks = [np.asarray(c) for c in chunks]
            s = shadow(self)
            s["final"] = [*chunks, *s["final"]]
            return real_prepend(self, iter(chunks))

        def finish(self):
            s = shadow(self)
            parts = list(s["final"])
            if s["pending"] is not None:
                parts = [s["pending"], *parts] if s["at"] == "start" else [*parts, s["pending"]]
            frames = np.concatenate([p for p in parts if len(p)]) if parts else np.zeros((0,), np.uint8)
            spy.finished.append(f"{len(frames)} frames {_digest(frames)}")
            return real_finish(self)

        mp.setattr(SectionVideoWriter, "add_final", add_final)
        mp.setattr(SectionVideoWriter, "set_pending", set_pending)
        mp.setattr(SectionVideoWriter, "prepend", prepend)
        mp.setattr(SectionVideoWriter, "finish", finish)

    def take(self) -> dict:
        out = {"decoded_latents": self.decoded, "decoded_pixels": self.pixels, "writer_frames": self.finished}
        self.decoded, self.pixels, self.writers, self.finished = [], [], {}, []
        return out


def _sidecar(result) -> dict:
    meta = json.loads(Path(result.metadata).read_text())
    meta = {k: v for k, v in meta.items() if k not in VOLATILE}
    req = dict(meta.get("request", {}))
    for k in ("image", "output", "end_image", "video"):
        if isinstance(req.get(k), str):
            req[k] = Path(req[k]).name
    req["keyframes"] = [[t, Path(p).name] for t, p in req.get("keyframes", [])]
    meta["request"] = req
    return meta


def _images(folder: Path) -> dict[str, str]:
    from PIL import Image

    paths = {}
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:128]
    base = np.stack([x * 2, y * 2, np.full_like(x, 90)], -1).astype(np.uint8)
    for name, colour in (("start", (200, 40, 40)), ("end", (40, 40, 200)), ("key", (40, 200, 40))):
        img = base.copy()
        img[20:60, 30:80] = colour
        img = (img.astype(np.int16) + rng.integers(-8, 9, img.shape)).clip(0, 255).astype(np.uint8)
        paths[name] = str(folder / f"{name}.png")
        Image.fromarray(img).save(paths[name])
    return paths


def _input_video(folder: Path) -> str:
    from framepack.video import SectionVideoWriter

    path = folder / "input.mp4"
    y, x = np.mgrid[0:64, 0:96]
    frames = []
    for t in range(75):
        f = np.stack([x * 2, y * 3, np.full_like(x, 90)], -1).astype(np.uint8)
        f[20:36, 4 + t // 2 : 20 + t // 2] = (230, 60, 40)
        frames.append(f)
    writer = SectionVideoWriter(path)
    writer.add_final(np.stack(frames))
    writer.finish()
    return str(path)


def _jobs(img: dict[str, str], video: str) -> list[tuple[str, str, dict]]:
    three = 3 * 1.2
    base = {"image": img["start"], "prompt": "a red box moves right", "steps": 3, "seconds": three}
    return [
        ("readme-main", "toy", {"image": str(ROOT / "examples" / "toy_start.png"), "cfg": 3.0, "seconds": 5.0,
                                "prompt": "the red circle moves right"}),
        ("tiny-3", "tiny", base),
        ("tiny-f1-3", "tiny-f1", base),
        ("tiny-no-teacache", "tiny", {**base, "teacache": False}),
        ("tiny-euler", "tiny", {**base, "sampler": "euler", "steps": 4}),
        ("tiny-f1-bh2", "tiny-f1", {**base, "sampler": "unipc-bh2", "steps": 4}),
        ("tiny-cfg", "tiny", {**base, "cfg": 3.0, "cfg_rescale": 0.5, "negative_prompt": "blurry", "seconds": 2.4}),
        ("tiny-controls", "tiny", {**base, "prompt": "[0s: a red box] [2.4s: a cat runs]", "prompt_blend": True,
                                   "end_image": img["end"], "end_strength": 0.8,
                                   "keyframes": ((1.0, img["key"]),), "seconds": 4.8}),
        ("tiny-f1-controls", "tiny-f1", {**base, "prompt": "[0s: a red box] [2.4s: a cat runs]",
                                         "keyframes": ((2.3, img["key"]),), "seconds": 4.8}),
        ("tiny-t2v-colour", "tiny", {"prompt": "a ball bounces", "steps": 2, "seconds": 2.4,
                                     "t2v_start": "color:#30a050"}),
        ("tiny-f1-t2v-generate", "tiny-f1", {"prompt": "a ball bounces", "steps": 2, "seconds": 2.4,
                                             "t2v_start": "generate"}),
        ("tiny-f1-extend", "tiny-f1", {"video": video, "prompt": "a red box", "steps": 2, "seconds": 2.4}),
        ("tiny-extend", "tiny", {"video": video, "prompt": "a red box", "steps": 2, "seconds": 2.4}),
    ]


def run() -> dict:
    import pytest
    import torch

    torch.set_num_threads(2)
    from framepack.config import GenerationRequest
    from framepack.events import CancelToken, StepProgress
    from framepack.pipeline import load_pipeline

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["FRAMEPACK_HOME"] = str(tmp / "home")  # a fresh tiny family and prompt cache
        mp = pytest.MonkeyPatch()
        img, video = _images(tmp), _input_video(tmp)
        spy = _Spy()
        spy.install(mp)
        pipes: dict = {}
        for name, model, fields in _jobs(img, video):
            pipe = pipes.setdefault(model, load_pipeline(model, device="cpu"))
            result = pipe.generate(GenerationRequest(**fields, output=str(tmp / name)))
            out[name] = {"status": result.status, "frames": result.frames, **spy.take(), "sidecar": _sidecar(result)}
            print(f"{name}: {result.status}, {result.frames} frames", file=sys.stderr)
        # cancelled after section 1, then resumed from the saved state: must equal an uninterrupted run
        req = GenerationRequest(**{**_jobs(img, video)[1][2], "seconds": 3.6}, output=str(tmp / "resume"))
        cancel = CancelToken()

        def stop(event) -> None:
            if isinstance(event, StepProgress) and event.section == 1:
                cancel.cancel()

        state = tmp / "state"
        first = pipes["tiny"].generate(req, stop, cancel, state_dir=state)
        second = pipes["tiny"].generate(req, state_dir=state)
        out["tiny-resumed"] = {"status": [first.status, second.status], "frames": second.frames, **spy.take(),
                               "sidecar": _sidecar(second)}  # fmt: skip
        mp.undo()
    return out


def compare(a_path: str, b_path: str) -> int:
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    bad = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name}: only in {'the first' if name in a else 'the second'}")
            bad += 1
            continue
        diffs = [k for k in sorted(set(a[name]) | set(b[name])) if a[name].get(k) != b[name].get(k)]
        side = []
        if "sidecar" in diffs:
            sa, sb = a[name]["sidecar"], b[name]["sidecar"]
            side = [k for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
        tensors = [k for k in diffs if k != "sidecar"]
        state = "same" if not tensors else "DIFFERENT " + ", ".join(tensors)
        extra = f"; sidecar entries that differ: {side}" if side else ""
        print(f"{name:22s} latents/pixels/frames: {state}{extra}")
        bad += bool(tensors)
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two fingerprint files")
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    print(json.dumps(run(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
