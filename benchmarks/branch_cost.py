"""What a branch costs: run time vs the sections it makes, and checkpoint bytes vs the MP4's growth.

1. Time (the toy model on this CPU, its 64 px bucket, 25 steps, CFG 1, TeaCache off): one parent of N
   sections per schedule, then branches at K = 0, 1, ..., N-1 with a new seed, side by side in one run.
   A branch should cost (N - K) sections plus a constant (conditioning, copying the shared segments out
   of the parent, one VAE decode of section K for the cross-fade edge). Printed per K: wall seconds,
   the sections made, and the fit `constant + (N - K) x per-section` (least squares over the K's),
   with the parent's own per-section time next to it.

2. Bytes at the real size (the 640 bucket's latents, 16 channels at 1/8 size; 640 x 640 and
   544 x 704): the checkpoint files `framepack.checkpoints.SectionStore` writes for one section
   (the section's latents in fp32 + the RNG state + the writer's segment list), measured by writing
   them, next to the MP4 bytes one section (36 frames) adds at crf 16 at the same size, measured by
   encoding synthetic clips with our writer (`video.SectionVideoWriter`): a slowly panning smooth
   texture and a panning fine-grained one. Real footage lies in between or beyond; the point is the
   order of magnitude.

    python benchmarks/branch_cost.py [--sections 6] [--steps 25] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framepack.branching import find_parent, plan_branch, prepare
from framepack.checkpoints import KeepPolicy, SectionStore
from framepack.config import GenerationRequest
from framepack.sections import History
from framepack.video import SectionVideoWriter

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "toy_start.png"


def timing(model: str, sections: int, steps: int, folder: Path) -> list[tuple]:
    from framepack.pipeline import load_pipeline

    pipe = load_pipeline(model, device="cpu")
    request = GenerationRequest(image=str(EXAMPLE), prompt="the red circle moves right", steps=steps,
                                cache="none", teacache=False, seconds=sections * 1.2,
                                output=str(folder / f"{model}.mp4"))  # fmt: skip
    pipe.generate(dataclasses.replace(request, output=str(folder / f"warm-{model}.mp4"), seconds=1.2))
    t = time.perf_counter()
    parent = pipe.generate(request)
    parent_s = time.perf_counter() - t
    rows = []
    for at in range(sections):
        out = folder / f"{model}-b{at}.mp4"
        t = time.perf_counter()
        plan = plan_branch(find_parent(parent.video), at, {"seed": 1000 + at, "output": str(out)}, pipe.spec)
        prepare(plan, folder / f"state-{model}-{at}", out)
        pipe.generate(plan.request, state_dir=folder / f"state-{model}-{at}")
        rows.append((at, sections - at, time.perf_counter() - t))
    return rows, parent_s


def fit(rows) -> tuple[float, float]:
    a = np.array([[1.0, made] for _, made, _ in rows])
    b = np.array([s for *_, s in rows])
    (const, per), *_ = np.linalg.lstsq(a, b, rcond=None)
    return float(const), float(per)


def checkpoint_bytes(h: int, w: int, folder: Path) -> tuple[int, int]:
    """(bytes of one section's checkpoint file, bytes of the base before section 1) at latent h x w."""
    start = torch.randn(1, 16, 1, h, w)
    history = History(start, torch.cat([torch.zeros(1, 16, 18, h, w), start], dim=2), total=1)
    rng = torch.Generator().manual_seed(0)
    writer = {"segments": [[f"{i:06d}.mp4", 36, 2] for i in range(1, 51)], "size": [h * 8, w * 8], "serial": 60,
              "fps": 30, "crf": 16}  # fmt: skip
    header = {"request": {}, "model": "f1", "schedule": "forward", "window": 9, "sections": 50, "encode_seed": 0}
    store = SectionStore.create(folder, header, KeepPolicy(), history=history, rng=rng, writer=writer)
    base = (folder / "base.safetensors").stat().st_size
    store.add(1, torch.randn(1, 16, 9, h, w), rng, writer)
    return (folder / "section-0001.safetensors").stat().st_size, base


def mp4_bytes_per_section(h: int, w: int, fine: bool, folder: Path) -> float:
    """MP4 bytes one 36-frame section adds at crf 16: a panning texture, 4 sections, (last - first) / 3."""
    rng = np.random.default_rng(0)
    scale = 4 if fine else 48  # feature size in px
    small = rng.random(((h + 150) // scale + 3, (w + 300) // scale + 3, 3)).astype(np.float32)
    import torch.nn.functional as F

    big = F.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None], scale_factor=scale, mode="bicubic")
    texture = (big[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
    writer = SectionVideoWriter(folder / f"clip-{fine}.mp4", crf=16)
    sizes = []
    for section in range(4):
        frames = np.stack([texture[f : f + h, 2 * f : 2 * f + w] for f in range(36 * section, 36 * section + 36)])
        writer.add_final(frames)
        writer.write_snapshot()
        sizes.append((folder / f"clip-{fine}.mp4").stat().st_size)
    writer.abort()
    return (sizes[-1] - sizes[0]) / 3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", type=int, default=6)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ.setdefault("FRAMEPACK_HOME", str(folder / "home"))
        print(f"## Branch cost: toy models, 64 px, {args.steps} steps, parent of {args.sections} sections, "
              f"{args.threads} threads\n")  # fmt: skip
        for model in ("toy-f1", "toy"):
            rows, parent_s = timing(model, args.sections, args.steps, folder)
            const, per = fit(rows)
            print(f"{model}: parent {parent_s:.2f} s = {parent_s / args.sections:.2f} s per section (incl. its "
                  f"share of the set-up); branch fit: {const:.2f} s + {per:.2f} s per section made\n")  # fmt: skip
            print("| K (kept) | sections made | branch s | fit s | branch / parent |")
            print("| --- | --- | --- | --- | --- |")
            for at, made, s in rows:
                print(f"| {at} | {made} | {s:.2f} | {const + per * made:.2f} | {s / parent_s:.2f} |")
            print()
        print("## Checkpoint bytes per section vs MP4 growth per section (crf 16, 36 frames)\n")
        print("| size | checkpoint per section | base (once) | MP4, smooth pan | MP4, fine pan | ckpt / MP4 |")
        print("| --- | --- | --- | --- | --- | --- |")
        for hh, ww in ((640, 640), (544, 704)):
            ck, base = checkpoint_bytes(hh // 8, ww // 8, folder / f"ck-{hh}")
            smooth = mp4_bytes_per_section(hh, ww, False, folder)
            fine = mp4_bytes_per_section(hh, ww, True, folder)
            print(f"| {ww}x{hh} | {ck / 2**20:.2f} MiB | {base / 2**20:.2f} MiB | {smooth / 2**20:.2f} MiB | "
                  f"{fine / 2**20:.2f} MiB | {ck / fine:.1f}x - {ck / smooth:.1f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
