"""Multi-GPU (framepack.parallel): seconds per step vs degree, and what the communication costs at real size.

1. Timing: the transformer's forward (one sampling step's call) on 1, 2, 4 (and 8) ranks. With CUDA
   devices (NCCL) it runs the real config's block shapes with random weights at the 640 bucket; on a
   CPU machine it runs a small config with gloo to check the plumbing end to end -- CPU timings say
   nothing about GPU scaling (2 cores shared by every rank here: more ranks can only be slower).
   Degree 1 is the sequence-parallel code path on one rank (the hook on, no peers): it must cost the
   same as the plain forward.

2. The communication of one step at the real size, computed from the shapes (no GPU needed): the 640
   bucket's 18,400 image tokens (9 noisy frames of 40 x 40 tokens + 1x 2 frames + 2x + 4x), 24 heads x
   128, 20 double + 40 single blocks (60 attentions), bf16. Per rank and attention: the all-to-all of
   its q, k, v shards and of the output back, 4 x (n / N) x D x (N - 1) / N values; the joint part's
   output all-gather, (N - 1) x n_cond x D / N values. Per call: rank 0's broadcast of the blocks'
   inputs (the image tokens, ~113 MB) and the final all-gather of the noisy rows. Compared with link
   bandwidths (NVLink 4 ~450 GB/s per direction per GPU, PCIe 4.0 x16 ~25 GB/s, PCIe 5.0 x16 ~50
   GB/s, effective) and a step's compute time on one GPU (`--step-s`, default 2.5 s: the official
   demo's RTX 4090 figure without TeaCache), the expected ceiling per degree: T / N + bytes / bandwidth,
   no overlap of compute and communication assumed.

    python benchmarks/multi_gpu.py [--degrees 1 2 4] [--steps 3] [--step-s 2.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from framepack import parallel
from framepack.config import FRAMEPACK_HY, TINY

# CPU timing config: small enough for 2 cores, with 8 heads so 1, 2, 4 and 8 ranks divide them.
CPU_CFG = dataclasses.replace(TINY, num_attention_heads=8, attention_head_dim=16, num_layers=2, num_single_layers=4)


def _inputs(cfg, latent: int, device, dtype, gen) -> dict:
    c, h = cfg.in_channels, latent
    r = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)  # noqa: E731
    return dict(
        hidden_states=r(1, c, 9, h, h), timestep=torch.tensor([700.0], device=device, dtype=dtype),
        encoder_hidden_states=r(1, 256, cfg.text_embed_dim),
        encoder_attention_mask=(torch.arange(256) < 180)[None].to(device),
        pooled_projections=r(1, cfg.pooled_projection_dim),
        guidance=torch.tensor([10000.0], device=device, dtype=dtype),
        latent_indices=torch.arange(20, 29)[None].to(device), clean_latents=r(1, c, 2, h, h),
        clean_latent_indices=torch.tensor([[0, 19]], device=device), clean_latents_2x=r(1, c, 2, h, h),
        clean_latent_2x_indices=torch.tensor([[17, 18]], device=device), clean_latents_4x=r(1, c, 16, h, h),
        clean_latent_4x_indices=torch.arange(1, 17)[None].to(device), image_embeddings=r(1, 729, cfg.image_proj_dim),
    )  # fmt: skip


def _rank(rank: int, world: int, port: int, kind: str, steps: int, results) -> None:
    from framepack.models.transformer import FramePackTransformer

    device = parallel.rank_device(kind, rank)
    cfg, latent, dtype = (FRAMEPACK_HY, 80, torch.bfloat16) if kind == "cuda" else (CPU_CFG, 32, torch.float32)
    torch.manual_seed(0)
    with torch.device(device):
        model = FramePackTransformer(cfg).to(dtype).eval()
    collective = parallel.init(rank, world, device, "127.0.0.1", port)
    if rank:
        parallel.follow(model, collective)
        torch.distributed.destroy_process_group()
        return
    kw = _inputs(cfg, latent, device, dtype, torch.Generator().manual_seed(1))
    blocks = parallel.ParallelBlocks(collective)
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    times = {}
    with torch.inference_mode():
        for name, hook in (("plain", None), ("parallel", blocks)):
            if name == "plain" and world > 1:
                continue
            model.parallel = hook
            model(**kw)  # warm-up (and the section's preparation, cached for the timed steps)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                model(**kw)
            sync()
            times[name] = (time.perf_counter() - t0) / steps
    blocks.stop()
    torch.distributed.destroy_process_group()
    results.put(times)


def time_degree(world: int, kind: str, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = parallel.free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, kind, steps, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = results.get(timeout=1800)
    for p in procs:
        p.join(60)
    return out


def comm_table(step_s: float, degrees: list[int]) -> None:
    d, layers, act = FRAMEPACK_HY.inner_dim, FRAMEPACK_HY.num_layers + FRAMEPACK_HY.num_single_layers, 2
    frame = 40 * 40
    n_img = 9 * frame + 2 * frame + 2 // 2 * frame // 4 + 16 // 4 * frame // 16  # noisy, 1x, 2x, 4x: 18,400
    n_cond = 729 + 200  # SigLIP + a typical prompt's ~200 LLaMA tokens after trimming
    links = {"NVLink 4 (450 GB/s)": 450e9, "PCIe 5.0 x16 (50 GB/s)": 50e9, "PCIe 4.0 x16 (25 GB/s)": 25e9}
    print(f"\nreal size, one step (one pass): {n_img} image + {n_cond} joint tokens, D = {d}, {layers} attentions, "
          f"bf16; one-GPU step {step_s:.2f} s (--step-s)")  # fmt: skip
    head = f"{'degree':>6} {'all-to-all/rank':>16} {'joint+io/rank':>14} " + " ".join(f"{k:>24}" for k in links)
    print(head)
    for n in degrees:
        if n == 1:
            a2a = joint = io = 0.0
        else:
            a2a = layers * 4 * (n_img / n) * d * (n - 1) / n * act
            joint = layers * (n - 1) * n_cond * d / n * act
            io = (n_img + n_cond) * d * act + n_img * d * act * (n - 1) / n  # rank 0's broadcast + final all-gather
        total = a2a + joint + io
        cells = []
        for bw in links.values():
            t = step_s / n + total / bw
            cells.append(f"{t:>8.3f} s = {step_s / t:>5.2f}x")
        print(f"{n:>6} {a2a / 1e9:>13.2f} GB {(joint + io) / 1e9:>11.2f} GB " + " ".join(f"{c:>24}" for c in cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--degrees", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--step-s", type=float, default=2.5)
    args = ap.parse_args()
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    have = torch.cuda.device_count() if kind == "cuda" else 4
    degrees = args.degrees or [d for d in (1, 2, 4, 8) if d <= have]
    os.environ.setdefault("OMP_NUM_THREADS", "1" if kind == "cpu" else os.environ.get("OMP_NUM_THREADS", "8"))
    print(f"timing on {kind}: " + ("real block shapes, random weights, 640 bucket, bf16" if kind == "cuda" else
          f"a small config ({CPU_CFG.num_attention_heads} heads, 32 x 32 latents), fp32, gloo, "
          f"{os.cpu_count()} cores shared by all ranks: CPU timings say nothing about GPU scaling"))  # fmt: skip
    base = None
    print(f"{'degree':>6} {'s/step':>8} {'vs degree 1':>12}")
    for n in degrees:
        t = time_degree(n, kind, args.steps)
        if n == 1:
            base = t["parallel"]
            print(f"{'1 plain':>6} {t['plain']:>8.3f}")
            ratio = t["parallel"] / t["plain"]
            print(f"{'1 SP':>6} {t['parallel']:>8.3f} {ratio:>11.3f}x  (the SP path at degree 1 vs plain)")
        else:
            print(f"{n:>6} {t['parallel']:>8.3f} {base / t['parallel'] if base else float('nan'):>11.2f}x")
    comm_table(args.step_s, [1, 2, 4, 8])
    return 0


if __name__ == "__main__":
    sys.exit(main())
