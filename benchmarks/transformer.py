"""Ours vs diffusers' HunyuanVideoFramepackTransformer3DModel: one full section (25 steps), same weights.

Each measurement runs one model for one section in a fresh worker process (so allocator state and
peak memory are that model's own); ours and diffusers alternate, and the medians are compared.
Inputs are what the FramePack pipeline passes: the full packed context (1x/2x/4x), 729 SigLIP tokens,
LLaMA states zero-padded to 512 tokens with a realistic prompt length, distilled guidance.

    python benchmarks/transformer.py                 # CPU, small-but-not-tiny config (default)
    python benchmarks/transformer.py --full          # CUDA: the 13B config in bf16 at the 640x608 bucket

Prints seconds per section and per step, peak memory, the ratios, and the max difference of the
final latents (equal outputs are part of the claim).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framepack.config import FRAMEPACK_HY

SMALL = dataclasses.replace(
    FRAMEPACK_HY, num_attention_heads=4, attention_head_dim=128, num_layers=2, num_single_layers=4
)  # hidden 512, real head dim / RoPE split / text, pooled and SigLIP widths


def _sigmas(steps: int) -> torch.Tensor:
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return (7 * t / (1 + 6 * t)).float()  # the official schedule at 640-bucket sizes (shift 7)


def _inputs(cfg, h: int, w: int, device, dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = cfg.in_channels

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    mask = torch.zeros(1, 512, dtype=torch.bool)
    mask[:, :61] = True  # a typical prompt: 60 tokens + eot after the template crop
    text = rnd(1, 512, cfg.text_embed_dim) * mask[..., None].to(device, dtype)
    return dict(
        encoder_hidden_states=text,
        encoder_attention_mask=mask.to(device),
        pooled_projections=rnd(1, cfg.pooled_projection_dim),
        guidance=torch.tensor([10000.0], device=device, dtype=dtype),
        image_embeddings=rnd(1, 729, cfg.image_proj_dim),
        latent_indices=torch.arange(1, 10, device=device)[None],
        clean_latents=rnd(1, c, 2, h, w),
        clean_latent_indices=torch.tensor([[0, 10]], device=device),
        clean_latents_2x=rnd(1, c, 2, h, w),
        clean_latent_2x_indices=torch.tensor([[11, 12]], device=device),
        clean_latents_4x=rnd(1, c, 16, h, w),
        clean_latent_4x_indices=torch.arange(13, 29, device=device)[None],
    )


_DIFFUSERS = {
    "image_embeddings": "image_embeds",
    "latent_indices": "indices_latents",
    "clean_latents": "latents_clean",
    "clean_latent_indices": "indices_latents_clean",
    "clean_latents_2x": "latents_history_2x",
    "clean_latent_2x_indices": "indices_latents_history_2x",
    "clean_latents_4x": "latents_history_4x",
    "clean_latent_4x_indices": "indices_latents_history_4x",
}


def _build(which: str, cfg, device, dtype, seed: int):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from framepack.models.transformer import FramePackTransformer

    torch.manual_seed(seed)
    with torch.device("meta"):
        ours = FramePackTransformer(cfg)
    # Same random weights for both: generated on the CPU from the seed, small so activations stay sane.
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in ours.state_dict().items():
        t = torch.randn(v.shape, generator=g) * (0.02 if v.ndim > 1 else 0.01)
        if "norm" in k and k.endswith("weight") and v.ndim == 1:
            t += 1
        state[k] = t.to(device, dtype)
    if which == "ours":
        ours.load_state_dict(state, assign=True)
        return ours.eval(), lambda kw: ours(**kw).sample
    with torch.device("meta"):
        ref = HunyuanVideoFramepackTransformer3DModel(**dataclasses.asdict(cfg))
    ref.load_state_dict(state, assign=True)
    ref.eval()

    def call(kw):
        d = {_DIFFUSERS.get(k, k): (v[0] if k.endswith("indices") else v) for k, v in kw.items()}
        return ref(**d).sample

    return ref, call


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter of this process
    except OSError:
        pass


def worker(which: str, full: bool, steps: int, out: str) -> None:
    device = torch.device("cuda" if full else "cpu")
    dtype = torch.bfloat16 if full else torch.float32
    cfg, (h, w) = (FRAMEPACK_HY, (80, 76)) if full else (SMALL, (32, 32))
    _model, call = _build(which, cfg, device, dtype, seed=0)
    kw = _inputs(cfg, h, w, device, dtype)
    x = torch.randn(1, cfg.in_channels, 9, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    sig = _sigmas(steps).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    _reset_hwm()
    base = _hwm()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(steps):  # Euler on the flow ODE: the transformer is all that differs
            v = call({**kw, "hidden_states": x.to(dtype), "timestep": (sig[i : i + 1] * 1000).to(dtype)})
            x = x + (sig[i + 1] - sig[i]) * v.float()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _hwm() - base
    torch.save({"x": x.cpu(), "seconds": seconds, "peak": peak}, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full 13B config in bf16 on CUDA at 640x608")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--runs", type=int, default=3, help="sections per model (alternating)")
    ap.add_argument("--worker", nargs=2, metavar=("WHICH", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker[0], a.full, a.steps, a.worker[1])
    if a.full and not torch.cuda.is_available():
        sys.exit("--full needs a CUDA device")
    results = {"ours": [], "diffusers": []}
    tmp = Path("/tmp") / f"fp_bench_{time.time_ns()}"
    tmp.mkdir()
    for run in range(a.runs):
        for which in ("ours", "diffusers") if run % 2 == 0 else ("diffusers", "ours"):
            out = tmp / f"{which}{run}.pt"
            cmd = [sys.executable, __file__, "--worker", which, str(out), "--steps", str(a.steps)]
            subprocess.run(cmd + (["--full"] if a.full else []), check=True)
            results[which].append(torch.load(out))
            print(f"  run {run + 1}/{a.runs} {which:9s} {results[which][-1]['seconds']:.2f} s", flush=True)
    t = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
    m = {k: statistics.median(r["peak"] for r in v) for k, v in results.items()}
    diff = (results["ours"][0]["x"] - results["diffusers"][0]["x"]).abs().max().item()
    scale = results["diffusers"][0]["x"].abs().max().item()
    where = f"CUDA {torch.cuda.get_device_name()}" if a.full else f"CPU ({torch.get_num_threads()} threads)"
    cfg = FRAMEPACK_HY if a.full else SMALL
    print(
        f"\ntransformer section benchmark on {where}: hidden {cfg.inner_dim}, {cfg.num_layers}+{cfg.num_single_layers}"
        f" blocks, {'bf16 640x608' if a.full else 'fp32 256x256 (latent 32x32)'}, {a.steps} steps, median of {a.runs}"
    )
    mem = "peak VRAM" if a.full else "peak RSS growth during the section"
    print(f"{'':10s} {'s/section':>10s} {'s/step':>8s} {mem:>36s}")
    for k in ("ours", "diffusers"):
        print(f"{k:10s} {t[k]:10.2f} {t[k] / a.steps:8.3f} {m[k] / 2**20:33.0f} MiB")
    speed, mem_ratio = t["diffusers"] / t["ours"], m["ours"] / max(m["diffusers"], 1)
    print(f"speed-up diffusers/ours: {speed:.3f}x   memory ratio ours/diffusers: {mem_ratio:.3f}")
    print(f"final latents max|diff|: {diff:.2e} (of max {scale:.2f})")
    print(json.dumps({"seconds": t, "peak_bytes": m, "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
