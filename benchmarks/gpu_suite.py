"""The whole GPU check in one command: the engine at its real size with random weights, on one CUDA card.

    bash benchmarks/gpu_suite.sh                      # on the GPU machine: carried wheels, versions, this script
    python benchmarks/gpu_suite.py --out DIR          # CUDA: every section below, within --budget seconds
    python benchmarks/gpu_suite.py --cpu-smoke        # CPU: every section end to end at a tiny size (tests)

No checkpoint is downloaded: every model is built on the meta device from its config and given random
values on the device (fan-in scaled normals; norm weights near 1). Real size: the 13B transformer in
bf16 at the 640x608 bucket (latent 80x76), window 9, the full packed context (1x 2 frames, 2x 2, 4x 16),
729 SigLIP tokens, LLaMA states padded to 512 with 61 valid tokens, distilled guidance.

Sections, in order of value (each has its own time cap; when the budget runs out the rest are recorded
as "skipped: time budget"):
  peak               bf16 8192^3 matmul TFLOP/s (the MFU denominator), fp8 matmul, copy bandwidths
  ours_vs_diffusers  s/step of ours vs diffusers' HunyuanVideoFramepackTransformer3DModel on the same
                     weights, alternating runs, median; max |diff| of the velocities; MFU
  attention          SDPA's flash / efficient / cuDNN kernels and sage at the model's real shape, each
                     against an fp32 reference and the default SDPA output; sage in the whole model
  fp8                s/step and velocity error of fp8 weight storage (dequantised to bf16) and of fp8
                     matmuls (torch._scaled_mm), vs bf16
  memory             resident vs streamed under a simulated 6 GB budget (overlap efficiency =
                     streamed / max(compute, PCIe transfer)) vs a copy-on-access baseline (own process:
                     its 24 GB of pinned host copies go with it)
  compile            regional torch.compile: compile time and s/step (own process, killed at its cap)
  job                a whole 2-section job through Pipeline with all five models at their real size
                     (own process): s/frame against the compute floor, peak VRAM, peak host RSS

FLOPs are counted from the actual token count (`forward_flops`); the floor of a step is those FLOPs
over the bf16 peak measured in the same run. The table is printed as each row arrives and again at
the end; `<out>/gpu_suite.json` is rewritten after every row, so a killed run still returns results.
Without a CUDA device (and without --cpu-smoke) the script says so in one line and exits 0. The smoke
runs the same code at TINY's widths (2 double + 6 single blocks), an 8x8 latent, window 3, fp32, on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # benchmarks/memory.py's copy-on-access baseline
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here is downloaded; fail fast if something tries

GiB = 2**30
FRAMES_PER_SECTION = 4  # pixel frames per latent frame (the VAE's time factor)
CTX_FRAMES = (2, 2, 16)  # 1x, 2x, 4x context latent frames (the official packing)
SIGLIP_TOKENS = 729
TEXT_TOKENS, TEXT_PAD = 61, 512  # a typical prompt after the template crop, zero-padded to 512


class SectionTimeout(BaseException):
    """A section ran past its time cap (a BaseException: per-variant `except Exception` must not catch it)."""


# ------------------------------------------------------------------------------------- FLOPs, tokens
def token_counts(h: int, w: int, window: int = 9, ctx: tuple[int, int, int] = CTX_FRAMES, patch: int = 2,
                 siglip: int = SIGLIP_TOKENS, text: int = TEXT_TOKENS) -> dict[str, int]:  # fmt: skip
    """Tokens of one forward at latent size h x w: the packed context (each scale patchified with
    replicate padding to whole patches), the noisy window, the SigLIP and the valid text tokens."""

    def up(a: int, b: int) -> int:
        return -(-a // b)

    c1 = ctx[0] * up(h, patch) * up(w, patch)
    c2 = up(ctx[1], 2) * up(h, 2 * patch) * up(w, 2 * patch)
    c4 = up(ctx[2], 4) * up(h, 4 * patch) * up(w, 4 * patch)
    noisy = window * (h // patch) * (w // patch)
    n_img = c1 + c2 + c4 + noisy
    return {"ctx_1x": c1, "ctx_2x": c2, "ctx_4x": c4, "noisy": noisy, "n_img": n_img, "siglip": siglip,
            "text": text, "total": n_img + siglip + text}  # fmt: skip


def forward_flops(cfg, tokens: dict[str, int]) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of one transformer forward as this engine computes it per step.

    Per double block over N tokens: q, k, v, out projections 8 N D^2, the two GELU MLPs 4 N D M, and
    attention 4 N^2 D (QK^T and PV). Per single block: k, v over N tokens, q, the MLP and proj_out over
    the R rows it keeps (R = N except the last block, which computes only the noisy rows), attention
    4 R N D. Refiner blocks over the valid text tokens, the patch embedding, the head and the
    modulations. Work cached per section (context embedding, SigLIP/LLaMA projections) is not counted.
    """
    d, m = cfg.inner_dim, cfg.mlp_dim
    n, r_last, t = tokens["total"], tokens["noisy"], tokens["text"]
    lin = attn = 0.0
    # double-stream blocks
    lin += cfg.num_layers * (8 * n * d * d + 4 * n * d * m + 2 * 2 * d * 6 * d)
    attn += cfg.num_layers * 4 * n * n * d
    # single-stream blocks
    for i in range(cfg.num_single_layers):
        r = r_last if i == cfg.num_single_layers - 1 else n
        lin += 4 * n * d * d + 2 * r * d * d + 2 * r * d * m + 2 * r * (d + m) * d + 2 * d * 3 * d
        attn += 4 * r * n * d
    # token refiner over the valid text tokens
    lin += cfg.num_refiner_layers * (8 * t * d * d + 4 * t * d * m + 2 * d * 2 * d)
    attn += cfg.num_refiner_layers * 4 * t * t * d
    p = cfg.patch_size
    lin += 2 * r_last * cfg.in_channels * p * p * d + 2 * r_last * d * p * p * cfg.out_channels + 2 * d * 2 * d
    return {"total": lin + attn, "linear": lin, "attention": attn, "attention_share": attn / (lin + attn)}


# ------------------------------------------------------------------------------------ random models
@torch.no_grad()
def materialize_(model: torch.nn.Module, device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Give every meta parameter random values on `device` in `dtype`, in place: weights of 2+ dims
    N(0, 1/fan_in) (activations keep their scale through deep stacks), 1-d weights (norms) N(1, 0.01^2),
    biases N(0, 0.01^2). Buffers (RoPE tables, position ids) must be real; they move to `device`."""
    device = torch.device(device)
    g = torch.Generator(device).manual_seed(seed)
    for mod_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            t = torch.empty(p.shape, device=device, dtype=dtype if p.is_floating_point() else p.dtype)
            if p.ndim >= 2:
                t.normal_(0.0, 1.0 / math.sqrt(max(1, p.numel() // p.shape[0])), generator=g)
            elif name == "weight":
                t.normal_(1.0, 0.01, generator=g)
            else:
                t.normal_(0.0, 0.01, generator=g)
            module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is not None:
                if b.is_meta:
                    raise RuntimeError(f"buffer {mod_name}.{name} was built on the meta device: it has no values")
                module._buffers[name] = b.to(device)
    return model.eval().requires_grad_(False)


def random_transformer(cfg, device, dtype: torch.dtype, seed: int = 0):
    from framepack.weights import build_empty

    return materialize_(build_empty(cfg), device, dtype, seed)


def diffusers_twin(model):
    """diffusers' HunyuanVideoFramepackTransformer3DModel on the same weight tensors (official keys = diffusers')."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    with torch.device("meta"):
        ref = HunyuanVideoFramepackTransformer3DModel(**dataclasses.asdict(model.config))
    ref.load_state_dict(model.state_dict(), strict=True, assign=True)
    return ref.eval().requires_grad_(False)


_DIFFUSERS_NAMES = {
    "image_embeddings": "image_embeds", "latent_indices": "indices_latents", "clean_latents": "latents_clean",
    "clean_latent_indices": "indices_latents_clean", "clean_latents_2x": "latents_history_2x",
    "clean_latent_2x_indices": "indices_latents_history_2x", "clean_latents_4x": "latents_history_4x",
    "clean_latent_4x_indices": "indices_latents_history_4x",
}  # fmt: skip


def diffusers_call(ref) -> Callable[[dict], torch.Tensor]:
    def call(kw: dict) -> torch.Tensor:
        args = {_DIFFUSERS_NAMES.get(k, k): (v[0] if k.endswith("indices") else v) for k, v in kw.items()}
        return ref(**args).sample

    return call


def ours_call(model) -> Callable[[dict], torch.Tensor]:
    return lambda kw: model(**kw).sample


# ------------------------------------------------------------------------------------ measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def op_seconds(fn: Callable[[], object], device: torch.device, warmup: int = 2, reps: int = 5) -> float:
    """Median seconds of `fn` (CUDA events on a GPU, perf_counter after the call on the CPU), after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sigmas(steps: int) -> torch.Tensor:
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return (7 * t / (1 + 6 * t)).float()  # the official flow shift at 640-bucket sizes (7)


@torch.no_grad()
def run_steps(call, kw: dict, x0: torch.Tensor, n: int, dtype: torch.dtype) -> float:
    """Seconds per step of `n` Euler steps from x0 (synchronised before and after: host overhead counts)."""
    sig = sigmas(n).to(x0.device)
    ts = [(sig[i : i + 1] * 1000).to(dtype) for i in range(n)]
    x = x0
    sync(x0.device)
    t0 = time.perf_counter()
    for i in range(n):
        v = call({**kw, "hidden_states": x.to(dtype), "timestep": ts[i]})
        x = x + (sig[i + 1] - sig[i]) * v.float()
    sync(x0.device)
    if not torch.isfinite(x).all():
        raise FloatingPointError("non-finite latents after the timed steps")
    return (time.perf_counter() - t0) / n


@torch.no_grad()
def velocity(call, kw: dict, x0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = torch.full((1,), 900.0, device=x0.device).to(dtype)
    return call({**kw, "hidden_states": x0.to(dtype), "timestep": t}).float()


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """max |out - ref|, ||out - ref|| / ||ref|| (fp32), and max |ref| for scale."""
    out, ref = out.float(), ref.float()
    diff = out - ref
    return {"max_diff": diff.abs().max().item(), "rel_err": (diff.norm() / ref.norm().clamp_min(1e-30)).item(),
            "ref_max": ref.abs().max().item(), "finite": bool(torch.isfinite(out).all())}  # fmt: skip


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(device: torch.device | None = None) -> None:
    """Collect, return cached device blocks and cached pinned host blocks; never raises (a broken CUDA
    context must not stop the runner from carrying on in fresh processes)."""
    if torch.cuda.is_available():  # (on the CPU smoke nothing large is left to collect: skip the slow gc)
        gc.collect()
        fns = [torch.cuda.empty_cache, getattr(torch.cuda.memory, "empty_host_cache", None),
               getattr(torch._C, "_host_emptyCache", None), getattr(torch._C, "_accelerator_emptyHostCache", None)]
        for fn in fns:
            if fn is not None:
                with contextlib.suppress(Exception):
                    fn()
    with contextlib.suppress(Exception):
        from framepack.memory import release_host_memory

        release_host_memory()


def rss_gib() -> tuple[float | None, float | None]:
    """(current, peak) resident set of this process in GiB (Linux /proc)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024 / GiB, int(fields["VmHWM"].split()[0]) * 1024 / GiB
    except (OSError, KeyError, ValueError):
        return None, None


def row(name: str, **fields) -> dict:
    """One table row: status "ok" with numbers, or "unsupported" / "skipped" / "error" with a reason."""
    out = {"name": name, "status": fields.pop("status", "ok")}
    for k, v in fields.items():
        if isinstance(v, float):
            v = round(v, 6) if abs(v) >= 1e-3 or v == 0 else float(f"{v:.4g}")
        out[k] = v
    return out


def failure(name: str, err: BaseException, status: str = "error") -> dict:
    return row(name, status=status, reason=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
               if str(err).strip() else type(err).__name__)  # fmt: skip


# --------------------------------------------------------------------------------------- the suite
class Suite:
    """What the sections share: device, sizes, the budget clock, the lazily built model and inputs."""

    def __init__(self, a: argparse.Namespace) -> None:
        from framepack.config import FRAMEPACK_HY, TINY

        self.a, self.smoke = a, a.cpu_smoke
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        # the smoke's model: TINY's widths with enough blocks to stream some of them
        self.cfg = dataclasses.replace(TINY, num_layers=2, num_single_layers=6) if self.smoke else FRAMEPACK_HY
        self.h, self.w = (8, 8) if self.smoke else (80, 76)  # latent; x8 pixels: 640 high, 608 wide
        self.window = 3 if self.smoke else 9  # the smoke's job decodes 25 frames instead of 73
        self.siglip = 64 if self.smoke else SIGLIP_TOKENS
        self.tokens = token_counts(self.h, self.w, self.window, patch=self.cfg.patch_size, siglip=self.siglip)
        self.flops = forward_flops(self.cfg, self.tokens)
        self.peak_tflops: float | None = a.peak_tflops
        self.ours_step: float | None = a.ours_step
        self.steps_per_run = a.steps_per_run or (1 if self.smoke else 4)
        self.runs = a.runs
        self._model = None
        self._inputs = None
        self.ref_velocity: torch.Tensor | None = None

    # --- shared state
    def model(self):
        if self._model is None:
            t0 = time.perf_counter()
            self._model = random_transformer(self.cfg, self.device, self.dtype, seed=0)
            sync(self.device)
            log(f"built the random transformer ({sum(p.numel() for p in self._model.parameters()) / 1e9:.2f} B "
                f"parameters, {self.dtype}) on {self.device} in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        return self._model

    def drop_model(self) -> None:
        self._model = None
        self.ref_velocity = None
        free_memory(self.device)

    def inputs(self) -> tuple[dict, torch.Tensor]:
        """What the pipeline passes for one section (random, never zeros), and the noisy latents x0."""
        if self._inputs is None:
            cfg, dev, dt, h, w = self.cfg, self.device, self.dtype, self.h, self.w
            g = torch.Generator(dev).manual_seed(1234)

            def rnd(*shape):
                return torch.randn(*shape, generator=g, device=dev).to(dt)

            mask = torch.zeros(1, TEXT_PAD, dtype=torch.bool, device=dev)
            mask[:, :TEXT_TOKENS] = True
            c, (f1, f2, f4) = cfg.in_channels, CTX_FRAMES
            w0 = self.window
            kw = dict(
                encoder_hidden_states=rnd(1, TEXT_PAD, cfg.text_embed_dim) * mask[..., None].to(dt),
                encoder_attention_mask=mask, pooled_projections=rnd(1, cfg.pooled_projection_dim),
                guidance=torch.tensor([10000.0], device=dev, dtype=dt), image_embeddings=rnd(1, self.siglip,
                cfg.image_proj_dim), latent_indices=torch.arange(1, 1 + w0, device=dev)[None],
                clean_latents=rnd(1, c, f1, h, w), clean_latent_indices=torch.tensor([[0, w0 + 1]], device=dev),
                clean_latents_2x=rnd(1, c, f2, h, w),
                clean_latent_2x_indices=torch.arange(w0 + 2, w0 + 2 + f2, device=dev)[None],
                clean_latents_4x=rnd(1, c, f4, h, w),
                clean_latent_4x_indices=torch.arange(w0 + 2 + f2, w0 + 2 + f2 + f4, device=dev)[None],
            )  # fmt: skip
            x0 = torch.randn(1, c, w0, h, w, generator=g, device=dev)
            self._inputs = (kw, x0)
        return self._inputs

    def reference(self) -> torch.Tensor:
        """The velocity of the plain (bf16, SDPA, eager) model at x0: what variants are compared with."""
        if self.ref_velocity is None:
            kw, x0 = self.inputs()
            self.ref_velocity = velocity(ours_call(self.model()), kw, x0, self.dtype)
        return self.ref_velocity

    def mfu(self, s_step: float) -> dict:
        tflops = self.flops["total"] / s_step / 1e12
        out = {"tflops": tflops}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        return out

    def floor_step(self) -> float | None:
        return self.flops["total"] / (self.peak_tflops * 1e12) if self.peak_tflops else None


def log(msg: str) -> None:
    print(f"  . {msg}", flush=True)


# ------------------------------------------------------------------------------------ the sections
def _matmul_tflops(dev: torch.device, n: int, dt: torch.dtype, g: torch.Generator) -> tuple[float, float]:
    pairs = [(torch.randn(n, n, generator=g, device=dev).to(dt), torch.randn(n, n, generator=g, device=dev).to(dt))
             for _ in range(3)]  # fmt: skip
    k = [0]

    def mm():
        a, b = pairs[k[0] % 3]  # rotate: three operand pairs (more than the L2 holds)
        k[0] += 1
        return a @ b

    cuda = dev.type == "cuda"
    sec = op_seconds(mm, dev, warmup=10 if cuda else 1, reps=20 if cuda else 3)  # warm-up lets the clocks rise
    return 2 * n**3 / sec / 1e12, sec


def _fp8_tflops(dev: torch.device, n: int, g: torch.Generator) -> float:
    if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 9):
        raise RuntimeError("fp8 matmuls need a CUDA device of compute capability >= 8.9")
    a8 = torch.randn(n, n, generator=g, device=dev).to(torch.float8_e4m3fn)
    b8 = torch.randn(n, n, generator=g, device=dev).to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    sec = op_seconds(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                     dev, warmup=3, reps=10)  # fmt: skip
    return 2 * n**3 / sec / 1e12


def _copy_gbps(dev: torch.device, size: int, g: torch.Generator) -> float:
    src = torch.empty(size, dtype=torch.uint8, device=dev).random_(generator=g)
    dst = torch.empty_like(src)
    return 2 * size / op_seconds(lambda: dst.copy_(src), dev, warmup=2, reps=5) / 1e9


def _h2d_gbps(dev: torch.device) -> float:
    if dev.type != "cuda":
        raise RuntimeError("host -> device transfers need a CUDA device")
    host = torch.full((GiB,), 0x5A, dtype=torch.uint8, pin_memory=True)  # DMA does not care what the bytes are
    buf = torch.empty(GiB, dtype=torch.uint8, device=dev)
    return GiB / op_seconds(lambda: buf.copy_(host, non_blocking=True), dev, warmup=1, reps=5) / 1e9


def sec_peak(s: Suite, rows: list) -> None:
    """bf16 matmul peak (8192^3, random operands), fp8 matmul, device copy and PCIe bandwidth."""
    dev = s.device
    n = 8192 if dev.type == "cuda" else 256
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(dev).manual_seed(7)
    tflops, sec = _matmul_tflops(dev, n, dt, g)
    if s.peak_tflops is None:
        s.peak_tflops = tflops
    rows.append(row(f"{str(dt).split('.')[-1]} matmul {n}^3", metric="TFLOP/s", value=tflops, seconds=sec,
                    note="the MFU denominator"))  # fmt: skip
    free_memory(dev)
    try:  # e4m3 through torch._scaled_mm, tensorwise scales: the ceiling of fp8 compute
        t8 = _fp8_tflops(dev, n, g)
        rows.append(row(f"fp8 e4m3 _scaled_mm {n}^3", metric="TFLOP/s", value=t8, ratio=t8 / tflops,
                        note="ratio: vs the bf16 peak"))  # fmt: skip
    except Exception as err:
        rows.append(failure("fp8 e4m3 _scaled_mm", err, "unsupported"))
    free_memory(dev)
    size = (2 * GiB) if dev.type == "cuda" else 64 * 2**20
    rows.append(row("device copy", metric="GB/s", value=_copy_gbps(dev, size, g), note="bytes read + written"))
    free_memory(dev)
    try:
        rows.append(row("pinned host -> device", metric="GB/s", value=_h2d_gbps(dev)))
    except Exception as err:
        rows.append(failure("pinned host -> device", err, "unsupported"))
    free_memory(dev)


def sec_compare(s: Suite, rows: list) -> None:
    """Ours vs diffusers on the same weights: alternating runs of `steps_per_run` steps, medians."""
    dev, dt = s.device, s.dtype
    model = s.model()
    kw, x0 = s.inputs()
    calls: dict[str, Callable] = {"ours": ours_call(model)}
    try:
        ref = diffusers_twin(model)
        calls["diffusers"] = diffusers_call(ref)
    except Exception as err:
        rows.append(failure("diffusers", err))
    for name in list(calls):  # warm-up: kernels, cuDNN/cuBLAS handles, the section cache
        try:
            run_steps(calls[name], kw, x0, 1, dt)
        except Exception as err:
            if name == "ours":
                raise
            rows.append(failure(name, err))
            del calls[name]
    times: dict[str, list[float]] = {k: [] for k in calls}
    peaks: dict[str, float] = {}
    for r in range(s.runs):
        for name in list(calls) if r % 2 == 0 else list(reversed(calls)):
            reset_peak(dev)
            times[name].append(run_steps(calls[name], kw, x0, s.steps_per_run, dt))
            p = peak_gib(dev)
            if p is not None:
                peaks[name] = max(peaks.get(name, 0.0), p)
            log(f"run {r + 1}/{s.runs} {name:9s} {times[name][-1]:.3f} s/step")
    med = {k: statistics.median(v) for k, v in times.items()}
    s.ours_step = med["ours"]
    v = {k: velocity(c, kw, x0, dt) for k, c in calls.items()}
    s.ref_velocity = v["ours"]
    steps = 25
    for name in calls:
        extra = {"speedup_vs_diffusers": med["diffusers"] / med[name]} if "diffusers" in med else {}
        rows.append(row(name, metric="s/step", value=med[name], runs=times[name], **s.mfu(med[name]),
                        peak_gib=peaks.get(name), s_section=med[name] * steps, **extra,
                        note=f"median of {s.runs} x {s.steps_per_run} steps; s_section = {steps} x s/step"))
    if "diffusers" in med:
        c = compare(v["ours"], v["diffusers"])
        rows.append(row("ours vs diffusers: velocity", metric="max|diff|", value=c["max_diff"], ratio=med["diffusers"] /
                        med["ours"], **c, note="ratio: diffusers s/step / ours"))  # fmt: skip
    floor = s.floor_step()
    if floor:
        rows.append(row("compute floor", metric="s/step", value=floor, ratio=med["ours"] / floor,
                        note=f"{s.flops['total'] / 1e12:.1f} TFLOP/step ({s.tokens['total']} tokens, "
                             f"{100 * s.flops['attention_share']:.0f}% attention) / measured peak; "
                             "ratio: ours / floor"))
    calls.clear()


def _attention_variants(q, k, v) -> list[tuple[str, Callable | None, str | None]]:
    """(label, fn or None, why not) for our backend, each fused SDPA kernel alone, and the optional packages."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from framepack.models.attention import AttentionBackend, unavailable_reason

    def sdpa_with(backend):
        def fn():
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)

        return fn

    ours = AttentionBackend("sdpa")
    out: list[tuple[str, Callable | None, str | None]] = [("sdpa (auto, ours)", lambda: ours(q, k, v), None)]
    for label, attr in (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                        ("cudnn", "CUDNN_ATTENTION")):  # fmt: skip
        backend = getattr(SDPBackend, attr, None)
        why = None if backend is not None else f"this torch has no SDPBackend.{attr}"
        out.append((f"sdpa {label}", sdpa_with(backend) if backend is not None else None, why))
    for name in ("sage", "flash", "xformers"):
        why = unavailable_reason(name)
        backend = AttentionBackend(name)
        out.append((f"{name} backend", (lambda b=backend: b(q, k, v)) if why is None else None, why))
    return out


def _attention_kernels(s: Suite, rows: list) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from framepack.models.attention import AttentionBackend

    dev, dt, cfg = s.device, s.dtype, s.cfg
    n, heads, hd = s.tokens["total"], cfg.num_attention_heads, cfg.attention_head_dim
    g = torch.Generator(dev).manual_seed(11)
    q, k, v = (torch.randn(1, n, heads, hd, generator=g, device=dev).to(dt) for _ in range(3))
    flops = 4 * n * n * heads * hd
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):  # fp32 reference (efficient on CUDA)
        ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    default = AttentionBackend("sdpa")(q, k, v)
    shape = f"{n} tokens x {heads} heads x {hd}"
    for label, fn, reason in _attention_variants(q, k, v):
        if fn is None:
            rows.append(row(label, status="unsupported", reason=reason))
            continue
        try:
            out = fn()
            c, c_default = compare(out, ref), compare(out, default)
            sec = op_seconds(fn, dev, warmup=2, reps=5)
            rows.append(row(label, metric="ms", value=sec * 1e3, tflops=flops / sec / 1e12, rel_err=c["rel_err"],
                            max_diff=c_default["max_diff"], finite=c["finite"],
                            note=f"{shape}; rel_err vs fp32, max_diff vs sdpa auto"))  # fmt: skip
        except Exception as err:
            rows.append(failure(label, err, "unsupported" if dev.type == "cpu" else "error"))


def sec_attention(s: Suite, rows: list) -> None:
    """Attention kernels at the model's real shape (batch 1, every token, no mask), then sage in the model."""
    from framepack.models.attention import AttentionBackend, unavailable_reason

    _attention_kernels(s, rows)
    free_memory(s.device)
    reason = unavailable_reason("sage")  # sage in the whole model (attention is about half of the FLOPs)
    if reason is not None:
        rows.append(row("model with sage", status="unsupported", reason=reason))
        return
    model = s.model()
    kw, x0 = s.inputs()
    base = s.reference()
    before = model.attention
    try:
        model.attention = AttentionBackend("sage")
        run_steps(ours_call(model), kw, x0, 1, s.dtype)
        sec = run_steps(ours_call(model), kw, x0, max(2, s.steps_per_run // 2), s.dtype)
        c = compare(velocity(ours_call(model), kw, x0, s.dtype), base)
        extra = {"ratio": s.ours_step / sec} if s.ours_step else {}
        rows.append(row("model with sage", metric="s/step", value=sec, **extra, **s.mfu(sec), rel_err=c["rel_err"],
                        max_diff=c["max_diff"], note="ratio: sdpa s/step / sage; error vs the sdpa model"))  # fmt: skip
    finally:
        model.attention = before
        model.clear_section_cache()


def _weights_checksum(model) -> float:
    params = list(model.parameters())
    return float(sum(p.float().sum().item() for p in params[:: max(1, len(params) // 40)]))


def sec_fp8(s: Suite, rows: list) -> None:
    """fp8 weights: storage (dequantised to bf16 per matmul, today's --fp8) and compute (fp8 matmuls)."""
    from framepack.memory import module_bytes
    from framepack.models import quant
    from framepack.weights import build_empty

    dev, dt = s.device, s.dtype
    model = s.model()
    kw, x0 = s.inputs()
    base = s.reference()
    checksum = _weights_checksum(model)
    bf16_bytes = module_bytes(model)
    backend, why = getattr(quant, "fp8_compute_backend", None), getattr(quant, "fp8_backend_reason", None)
    try:
        compute_backend = backend(dev) if backend is not None else None
        backend_reason = why(dev) if why is not None else None
    except Exception as err:
        compute_backend, backend_reason = f"error: {type(err).__name__}: {err}", None
    report = getattr(quant, "fp8_report", None)
    for mode in ("storage", "compute"):
        label = f"fp8 {mode}"
        twin = None
        try:
            twin = build_empty(model.config, model.attention)
            twin.load_state_dict(model.state_dict(), strict=True, assign=True)  # shares the bf16 tensors
            twin.eval().requires_grad_(False)
            t0 = time.perf_counter()
            try:
                quant.quantize_fp8_(twin, compute_dtype=dt, mode=mode)
            except TypeError as err:
                if mode != "storage" or "mode" not in str(err):
                    raise
                quant.quantize_fp8_(twin, compute_dtype=dt)  # before the mode= interface: storage only
            sync(dev)
            q_s = time.perf_counter() - t0
            reset_peak(dev)
            run_steps(ours_call(twin), kw, x0, 1, dt)
            sec = run_steps(ours_call(twin), kw, x0, max(2, s.steps_per_run - 1), dt)
            c = compare(velocity(ours_call(twin), kw, x0, dt), base)
            extra = {"ratio": s.ours_step / sec} if s.ours_step else {}
            note = "ratio: bf16 s/step / fp8; error vs bf16"
            kernels = {}
            if mode == "compute":
                note += f"; fp8_compute_backend: {compute_backend}"
                with contextlib.suppress(Exception):
                    r = report(twin) if report is not None else {}
                    fallbacks = r.get("fallbacks", {})
                    kernels = {"kernels": r.get("kernels"), "fallbacks": len(fallbacks),
                               "fallback_examples": dict(list(fallbacks.items())[:3]),
                               "backend_reason": backend_reason}  # fmt: skip
            rows.append(row(label, metric="s/step", value=sec, **extra, **s.mfu(sec), rel_err=c["rel_err"],
                            max_diff=c["max_diff"], finite=c["finite"], peak_gib=peak_gib(dev), quantize_s=q_s,
                            weight_gib=module_bytes(twin) / GiB, bf16_weight_gib=bf16_bytes / GiB, note=note,
                            backend=compute_backend if mode == "compute" else "dequantise", **kernels))  # fmt: skip
        except Exception as err:
            said = str(err).lower()
            unsupported = isinstance(err, NotImplementedError) or any(
                w in said for w in ("not supported", "unsupported", "capabilit", "requires", "needs"))  # fmt: skip
            status = "unsupported" if mode == "compute" and unsupported else "error"
            r = failure(label, err, status)
            r["backend"] = compute_backend
            rows.append(r)
        finally:
            del twin
            free_memory(dev)
    if abs(_weights_checksum(model) - checksum) > 1e-3 * max(1.0, abs(checksum)):
        rows.append(row("bf16 weights after fp8", status="error", reason="quantize_fp8_ changed the shared bf16 "
                        "weights; the model is rebuilt for the next sections"))  # fmt: skip
        s.drop_model()


def _transfer_seconds(flats: list, dev: torch.device) -> float:
    """Seconds to copy these blocks' host buffers to the device once (into one reused scratch buffer)."""
    sizes: dict[torch.dtype, int] = {}
    for f in flats:
        for d, buf in f.host.items():
            sizes[d] = max(sizes.get(d, 0), buf.numel())
    scratch = {d: torch.empty(m, dtype=d, device=dev) for d, m in sizes.items()}

    def transfer():
        for f in flats:
            for d, buf in f.host.items():
                scratch[d][: buf.numel()].copy_(buf, non_blocking=True)

    return op_seconds(transfer, dev, warmup=1, reps=3)


def sec_memory(s: Suite, rows: list) -> None:
    """Resident vs streamed (engine's plan under a simulated budget) vs copy-on-access, same weights."""
    from framepack.memory import MemoryManager, footprint, plan_memory

    dev, dt = s.device, s.dtype
    model = s.model()
    kw, x0 = s.inputs()
    call = ours_call(model)
    n = max(2, s.steps_per_run - 1)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    reset_peak(dev)
    run_steps(call, kw, x0, 1, dt)
    resident = run_steps(call, kw, x0, n, dt)
    rows.append(row("resident", metric="s/step", value=resident, peak_gib=peak_gib(dev), **s.mfu(resident)))
    model.to("cpu")
    model.clear_section_cache()
    free_memory(dev)
    fp = footprint("transformer", model, blocks, height=s.h, width=s.w, window=s.window)
    if s.smoke:  # a budget that streams most blocks of the tiny model: 1 resident, 2 prefetch slots
        budget = fp.core_bytes + fp.working_bytes + 2 * max(fp.block_bytes) + fp.block_bytes[0]
    else:
        budget = int(s.a.budget_gb * GiB)
    plan = plan_memory([fp], free_bytes=budget, preserved_bytes=0)
    place = plan.placements["transformer"]
    if place.mode.value != "stream":
        raise RuntimeError(f"the plan for a {budget / GiB:.3g} GiB budget is {place.mode.value}, not stream: "
                           "nothing to compare")  # fmt: skip
    label = f"streamed {budget / GiB:.3g} GiB (k={place.resident_blocks}/{len(blocks)})"
    t0 = time.perf_counter()
    manager = MemoryManager(dev, plan, {"transformer": model}, {"transformer": blocks})
    setup_s = time.perf_counter() - t0  # flat pinned host copies of the blocks
    streamed = None
    try:
        reset_peak(dev)
        with manager.use("transformer"):
            run_steps(call, kw, x0, 1, dt)
            streamed = run_steps(call, kw, x0, n, dt)
        peak = peak_gib(dev)
    finally:
        manager.close()
        model.clear_section_cache()
    # pure host -> device transfer of the streamed blocks (what each step must move)
    flats = [b._framepack_flat for b in blocks[place.resident_blocks :]]
    moved = sum(buf.numel() * buf.element_size() for f in flats for buf in f.host.values())
    transfer_s = _transfer_seconds(flats, dev)
    efficiency = streamed / max(resident, transfer_s)
    rows.append(row(label, metric="s/step", value=streamed, ratio=efficiency, peak_gib=peak, setup_s=setup_s,
                    budget_gib=budget / GiB, declared_peak_gib=place.peak_bytes / GiB, **s.mfu(streamed),
                    note="ratio: overlap efficiency = streamed / max(resident, transfer) (target <= 1.15)"))
    rows.append(row("host -> device transfer of the streamed blocks", metric="s", value=transfer_s,
                    gb_per_s=moved / transfer_s / 1e9, gib=moved / GiB))  # fmt: skip
    free_memory(dev)
    # copy-on-access baseline: every parameter read copies it (the weights are the pinned flats now)
    from memory import CopyOnAccess  # benchmarks/memory.py: the same baseline

    hook = CopyOnAccess(model, dev)
    try:
        reset_peak(dev)
        coa = run_steps(call, kw, x0, 1 if s.smoke else 2, dt)
        rows.append(row("copy-on-access", metric="s/step", value=coa, ratio=coa / streamed, peak_gib=peak_gib(dev),
                        note="ratio: copy-on-access / streamed (target >= 1.5); weights in pinned host memory "
                             "(the official's were pageable: slower still)"))  # fmt: skip
    finally:
        hook.remove()
        model.clear_section_cache()
    s.drop_model()


def sec_compile(s: Suite, rows: list) -> None:
    """Regional torch.compile of the blocks: first-step (compile) time, then s/step, vs eager here."""
    dt = s.dtype
    model = s.model()
    kw, x0 = s.inputs()
    call = ours_call(model)
    n = max(2, s.steps_per_run - 1)
    run_steps(call, kw, x0, 1, dt)
    eager = run_steps(call, kw, x0, n, dt)
    base = velocity(call, kw, x0, dt)
    rows.append(row("eager (this process)", metric="s/step", value=eager, **s.mfu(eager)))
    from framepack.models import compile as fc

    backend = "eager" if s.smoke else s.a.compile_backend  # the CPU smoke traces with dynamo only (fast)
    counts = getattr(fc, "compile_counts", lambda: {})
    try:
        info = fc.compile_blocks(model, backend=backend) if backend != "inductor" else fc.compile_blocks(model)
    except TypeError:
        info = fc.compile_blocks(model)
    before = counts()
    t0 = time.perf_counter()
    run_steps(call, kw, x0, 1, dt)  # compiles every block class (and the last block's row subset)
    first = time.perf_counter() - t0
    second = run_steps(call, kw, x0, 1, dt)
    mid = counts()
    compiled = run_steps(call, kw, x0, n, dt)
    after = counts()
    c = compare(velocity(call, kw, x0, dt), base)
    recompiles = (after.get("graphs", 0) - mid.get("graphs", 0)) if after else None
    rows.append(row(f"compiled ({backend})", metric="s/step", value=compiled, ratio=eager / compiled,
                    compile_s=first - compiled, first_step_s=first, second_step_s=second, **s.mfu(compiled),
                    rel_err=c["rel_err"], max_diff=c["max_diff"], graphs=mid.get("graphs", 0) - before.get("graphs", 0)
                    if mid else None, recompiles_in_timed_steps=recompiles, blocks=info,
                    note="ratio: eager / compiled; compile_s = first step - compiled s/step"))  # fmt: skip
    s.drop_model()


# ------------------------------------------------------------------------------------ the whole job
REAL_ENCODERS = dict(
    llama=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128320, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=500000.0),
    clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"),
    siglip=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=384, patch_size=14),
    vae={},  # diffusers' defaults are the HunyuanVideo VAE's
)  # fmt: skip


def tiny_encoders(cfg) -> dict:
    """The built-in tiny family's encoder sizes (framepack/tiny.py), widths matching `cfg`."""
    return dict(
        llama=dict(hidden_size=cfg.text_embed_dim, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=2048),
        clip=dict(hidden_size=cfg.pooled_projection_dim, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=77),
        siglip=dict(hidden_size=cfg.image_proj_dim, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=8),
        vae=dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4),
    )  # fmt: skip


def build_job_components(s: Suite, folder: Path):
    """The five models at the suite's size with random weights (built on the GPU, then moved to host
    memory like loaded checkpoints), the tiny family's word tokenizers, and `Components` over them."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from framepack import tiny
    from framepack.components import Components, quiet_transformers
    from framepack.config import RuntimeOptions
    from framepack.encoders import ImageEncoder, PromptCache, TextEncoder, siglip_processor_class
    from framepack.registry import ORIGINAL

    quiet_transformers()
    sizes = tiny_encoders(s.cfg) if s.smoke else REAL_ENCODERS
    llama_tok, clip_tok = tiny.write_prompt_tokenizers(sorted(set(tiny.WORDS)), folder / "tokenizer",
                                                       folder / "tokenizer_2")  # fmt: skip

    def ids(tok) -> dict:
        return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}

    gpu, host = s.device, torch.device("cpu")
    enc_dt = torch.float32 if s.smoke else torch.float16
    built = {}
    t0 = time.perf_counter()
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (RoPE, positions) real
        llama = LlamaModel(LlamaConfig(**{"vocab_size": len(llama_tok), **sizes["llama"], **ids(llama_tok)}))
        clip = CLIPTextModel(CLIPTextConfig(**{"vocab_size": len(clip_tok), **sizes["clip"], **ids(clip_tok)}))
        siglip = SiglipVisionModel(SiglipVisionConfig(**sizes["siglip"]))
        vae = AutoencoderKLHunyuanVideo(**sizes["vae"])
    for i, (name, m) in enumerate((("llama", llama), ("clip", clip), ("siglip", siglip), ("vae", vae))):
        built[name] = materialize_(m, gpu, enc_dt, seed=100 + i).to(host)
        free_memory(gpu)
    transformer = random_transformer(s.cfg, gpu, s.dtype, seed=0).to(host)
    free_memory(gpu)
    build_s = time.perf_counter() - t0
    size = siglip.config.image_size
    processor = siglip_processor_class()(size={"height": size, "width": size}, resample=3, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3)  # fmt: skip
    spec = dataclasses.replace(ORIGINAL, name="random-weights", prompt_crop=None,
                               default_resolution=64 if s.smoke else 640)  # fmt: skip
    text = TextEncoder(built["llama"], llama_tok, built["clip"], clip_tok, crop=None, identity="random-weights")
    components = Components(
        spec=spec, paths={"tokenizer": folder / "tokenizer", "tokenizer_2": folder / "tokenizer_2"}, device=gpu,
        host=host, encoder_dtype=enc_dt, transformer=transformer, vae=built["vae"],
        image_encoder=ImageEncoder(built["siglip"], processor), prompt_cache=PromptCache(None),
        options=RuntimeOptions(memory="managed" if s.smoke else "auto"), _text=text,
    )  # fmt: skip
    billions = {k: sum(p.numel() for p in m.parameters()) / 1e9 for k, m in (*built.items(), ("transformer",
                transformer))}  # fmt: skip
    return components, build_s, billions


def sec_job(s: Suite, rows: list) -> None:
    """One 2-section job (640 bucket, window 9, no step cache) through Pipeline.generate, five random models."""
    import numpy as np

    from framepack.config import GenerationRequest
    from framepack.memory import configure_host_allocator
    from framepack.pipeline import Pipeline

    configure_host_allocator()  # as load_pipeline does
    folder = Path(tempfile.mkdtemp(prefix="gpu_suite_job_"))
    components, build_s, billions = build_job_components(s, folder)
    steps = s.a.job_steps
    seconds = 2 * s.window * FRAMES_PER_SECTION / 30  # 2 sections (the official count: seconds * 30 / (4 window))
    request = GenerationRequest(prompt="a man dances gracefully in the city street at night", seconds=seconds,
                                steps=steps, cache="none", teacache=False, window=s.window, seed=42,
                                output=str(folder / "job.mp4"), overwrite=True)  # fmt: skip
    image = np.random.default_rng(0).integers(0, 256, (640, 640, 3) if not s.smoke else (64, 64, 3), dtype=np.uint8)
    log(f"job models built in {build_s:.1f} s ({', '.join(f'{k} {v:.2f} B' for k, v in billions.items())}); "
        f"running 2 sections x {steps} steps")  # fmt: skip
    events = []
    result = Pipeline(components, device=s.device).generate(request, events.append, image=image)
    emb = next(iter(components.prompt_cache.memory.values()), None)
    n_text = emb.llama.shape[1] if emb is not None else TEXT_TOKENS
    tokens = token_counts(result.height // 8, result.width // 8, s.window, patch=s.cfg.patch_size, text=n_text)
    flops = forward_flops(s.cfg, tokens)["total"]
    t = result.timings
    sample_s = sum(x["sample_s"] for x in t["sections"])
    decode_s = sum(x["decode_write_s"] for x in t["sections"])
    frames = result.frames
    model_steps = steps * result.sections_done
    extra = {}
    if s.peak_tflops:
        floor_frame = model_steps * flops / (s.peak_tflops * 1e12) / frames
        extra = {"floor_s_frame": floor_frame, "ratio": t["total_s"] / frames / floor_frame,
                 "sampling_ratio": sample_s / frames / floor_frame,
                 "floor_s_frame_25_steps": 25 * flops / (s.peak_tflops * 1e12) / (FRAMES_PER_SECTION * s.window)}
    _, rss_peak = rss_gib()
    try:
        sidecar = json.loads(Path(result.metadata).read_text())
    except (OSError, ValueError):
        sidecar = {}
    note = (f"{result.width}x{result.height}, {frames} frames, {steps} steps/section (cache off), random weights; "
            "ratio: s/frame (whole job: loading, pinning, encoders, VAE, MP4 included) over the compute floor")
    if steps < 25:
        note += "; smoke size" if s.smoke else f"; steps cut from 25 to {steps} by the time budget"
    rows.append(row("2-section job", metric="s/frame", value=t["total_s"] / frames, **extra, status_job=result.status,
                    sampling_s_frame=sample_s / frames, sampling_s_step=sample_s / model_steps,
                    total_s=t["total_s"], conditioning_s=t.get("conditioning_s"), sample_s=sample_s,
                    decode_write_s=decode_s, sections=[dict(x) for x in t["sections"]], frames=frames, steps=steps,
                    tokens=tokens["total"], tflop_step=flops / 1e12,
                    peak_gib=result.peak_vram_bytes / GiB if result.peak_vram_bytes else None,
                    rss_gib=result.peak_rss_bytes / GiB if result.peak_rss_bytes else None,
                    process_peak_rss_gib=rss_peak, build_s=build_s, billions=billions,
                    memory_plan=sidecar.get("memory_plan") or sidecar.get("run", {}).get("memory_plan"),
                    note=note))  # fmt: skip
    with contextlib.suppress(OSError):
        for p in sorted(folder.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        folder.rmdir()


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Suite, list], None]
    cap_s: float  # at most this long
    need_s: float  # not started with less than this left
    isolated: bool = False  # in its own process (killable; its own allocator state and peaks)


SECTIONS = (
    Section("peak", sec_peak, 30, 5),
    Section("ours_vs_diffusers", sec_compare, 100, 25),
    Section("attention", sec_attention, 45, 8),
    Section("fp8", sec_fp8, 60, 15),
    Section("memory", sec_memory, 100, 30, isolated=True),  # its pinned host copies go with the process
    Section("compile", sec_compile, 130, 40, isolated=True),
    Section("job", sec_job, 180, 70, isolated=True),
)
NAMES = tuple(x.name for x in SECTIONS)


# ------------------------------------------------------------------------------------- the runner
class Rows(list):
    """A section's rows; every append is reported (printed, saved) at once."""

    def __init__(self, on_add: Callable[[dict], None]) -> None:
        super().__init__()
        self.on_add = on_add

    def append(self, item: dict) -> None:
        super().append(item)
        self.on_add(item)


def _fmt(v, spec: str) -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-"
    return format(v, spec)


HEADER = (f"{'section':17s} {'variant':40s} {'value':>10s} {'unit':9s} {'ratio':>6s} {'TFLOP/s':>7s} {'MFU':>5s} "
          f"{'rel err':>8s} {'max|diff|':>9s} {'VRAM GiB':>8s}  note")  # fmt: skip


def format_row(section: str, r: dict) -> str:
    if r["status"] != "ok":
        return f"{section:17s} {r['name'][:40]:40s} {r['status'].upper() + ': ' + r.get('reason', '')}"
    mfu = _fmt(100 * r["mfu"], ".0f") + "%" if isinstance(r.get("mfu"), float) else "-"
    value = r.get("value")
    spec = ".3g" if isinstance(value, float) and abs(value) < 1e-2 else ".4g" if isinstance(value, float) else "d"
    return (f"{section:17s} {r['name'][:40]:40s} {_fmt(value, spec):>10s} {r.get('metric', ''):9s} "
            f"{_fmt(r.get('ratio'), '.3f'):>6s} {_fmt(r.get('tflops'), '.0f'):>7s} {mfu:>5s} "
            f"{_fmt(r.get('rel_err'), '.2e'):>8s} {_fmt(r.get('max_diff'), '.2e'):>9s} "
            f"{_fmt(r.get('peak_gib'), '.2f'):>8s}  {r.get('note', '')}")


def environment(device: torch.device) -> dict:
    from importlib import metadata

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "host": platform.node(), "cpus": os.cpu_count()}  # fmt: skip
    for pkg in ("diffusers", "transformers", "triton", "sageattention", "av", "accelerate", "numpy"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   gpu_memory_gib=round(p.total_memory / GiB, 1), cudnn=torch.backends.cudnn.version())  # fmt: skip
    return env


class Runner:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.t0 = time.monotonic()
        self.deadline = self.t0 + a.budget
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "gpu_suite.json"
        self.suite = Suite(a)
        s = self.suite
        self.results = {
            "suite": "framepack benchmarks/gpu_suite.py", "mode": "cpu-smoke" if a.cpu_smoke else "gpu",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": a.budget, "argv": sys.argv[1:],
            "env": environment(s.device),
            "config": {"transformer": dataclasses.asdict(s.cfg), "latent_hw": [s.h, s.w],
                       "pixels_hw": [8 * s.h, 8 * s.w], "window": s.window, "dtype": str(s.dtype), "tokens": s.tokens,
                       "tflop_per_step": s.flops["total"] / 1e12, "attention_share": s.flops["attention_share"],
                       "steps_per_run": s.steps_per_run, "runs": s.runs},
            "sections": {x.name: {"status": "pending", "rows": []} for x in SECTIONS},  # in this order
        }  # fmt: skip
        self.cuda_broken = False

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        s = self.suite
        self.results["summary"] = {"peak_tflops": s.peak_tflops, "ours_s_step": s.ours_step,
                                   "floor_s_step": s.floor_step(),
                                   "mfu": s.flops["total"] / s.ours_step / 1e12 / s.peak_tflops
                                   if s.ours_step and s.peak_tflops else None}  # fmt: skip
        tmp = self.path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)

    def record(self, name: str, **fields) -> dict:
        entry = self.results["sections"].setdefault(name, {"status": "pending", "rows": []})
        entry.update(fields)
        self.save()
        return entry

    def run(self) -> int:
        env = self.results["env"]
        print(f"gpu_suite ({self.results['mode']}): {env.get('gpu', 'CPU')}, torch {torch.__version__}, "
              f"budget {self.a.budget:.0f} s, {self.suite.tokens['total']} tokens, "
              f"{self.suite.flops['total'] / 1e12:.1f} TFLOP/step", flush=True)  # fmt: skip
        print(HEADER, flush=True)
        chosen = [x for x in SECTIONS if (not self.a.only or x.name in self.a.only) and x.name not in self.a.skip]
        for x in SECTIONS:
            if x not in chosen:
                self.record(x.name, status="skipped", reason="not selected (--only/--skip)")
        for x in chosen:
            left = self.remaining()
            if left < x.need_s:
                self.record(x.name, status="skipped", reason=f"time budget ({left:.0f} s left, needs {x.need_s:.0f})",
                            rows=[row(x.name, status="skipped", reason="time budget")])  # fmt: skip
                print(format_row(x.name, row(x.name, status="skipped", reason=f"time budget ({left:.0f} s left)")),
                      flush=True)  # fmt: skip
                continue
            cap = min(x.cap_s, left)
            if x.isolated or self.cuda_broken:
                self.run_isolated(x, cap)
            else:
                self.run_here(x, cap)
        self.finish()
        return 0

    def _add(self, name: str):
        def on_add(r: dict) -> None:
            self.results["sections"][name]["rows"] = list(rows)
            self.save()
            print(format_row(name, r), flush=True)

        rows = Rows(on_add)
        return rows

    def run_here(self, x: Section, cap: float) -> None:
        self.record(x.name, status="running", rows=[])
        rows = self._add(x.name)
        t0 = time.monotonic()
        status, reason = "ok", None

        def alarm(signum, frame):
            raise SectionTimeout(f"{x.name} ran past its cap of {cap:.0f} s")

        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, cap)
        try:
            x.run(self.suite, rows)
        except SectionTimeout as err:
            status, reason = "timeout", str(err)
        except Exception as err:
            status, reason = "error", f"{type(err).__name__}: {err}"
            traceback.print_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        if status != "ok":
            rows.append(row(f"{x.name} ({status})", status=status, reason=reason[:500]))
            self.check_cuda()
            if self.suite._model is not None and not self.cuda_broken:
                self.suite._model.clear_section_cache()
        free_memory(self.suite.device)
        self.record(x.name, status=status, reason=reason, seconds=round(time.monotonic() - t0, 1))

    def check_cuda(self) -> None:
        if self.suite.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize()
            torch.ones(1, device="cuda").add_(1).item()
        except Exception as err:  # an illegal access poisons the context: the rest runs in fresh processes
            print(f"  ! CUDA context unusable after the error ({err}); later sections run in their own processes",
                  flush=True)  # fmt: skip
            self.cuda_broken = True

    def run_isolated(self, x: Section, cap: float) -> None:
        """The section in a fresh process, killed (its whole process group) at the cap."""
        self.record(x.name, status="running", rows=[])
        s = self.suite
        if s._model is not None:
            s.drop_model()
        else:
            free_memory(s.device)
        rows_file = Path(tempfile.gettempdir()) / f"gpu_suite_{os.getpid()}_{x.name}.json"
        rows_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", x.name, "--worker-out", str(rows_file),
               "--budget", f"{max(1.0, cap - 8):.0f}", "--out", str(self.out), "--runs", str(self.a.runs),
               "--budget-gb", str(self.a.budget_gb), "--compile-backend", self.a.compile_backend,
               "--steps-per-run", str(s.steps_per_run)]  # fmt: skip
        if self.a.cpu_smoke:
            cmd.append("--cpu-smoke")
        if s.peak_tflops:
            cmd += ["--peak-tflops", str(s.peak_tflops)]
        if s.ours_step:
            cmd += ["--ours-step", str(s.ours_step)]
        if x.name == "job":
            cmd += ["--job-steps", str(self.job_steps(cap))]
        t0 = time.monotonic()
        status, reason = "ok", None
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
            if rc != 0:
                status, reason = "error", f"worker exited with {rc}"
        except subprocess.TimeoutExpired:
            status, reason = "timeout", f"{x.name} ran past its cap of {cap:.0f} s: worker killed"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        try:
            got = json.loads(rows_file.read_text())
        except (OSError, ValueError):
            got = {"rows": [], "status": None}
        rows_file.unlink(missing_ok=True)
        if status == "ok" and got.get("status") not in (None, "ok"):
            status, reason = got["status"], got.get("reason")
        rows = list(got.get("rows", []))  # the worker printed these already
        if status != "ok" and not any(r["status"] in ("error", "timeout") for r in rows):
            rows.append(row(f"{x.name} ({status})", status=status, reason=(reason or "")[:500]))
            print(format_row(x.name, rows[-1]), flush=True)
        self.record(x.name, status=status, reason=reason, rows=rows, seconds=round(time.monotonic() - t0, 1))

    def job_steps(self, cap: float) -> int:
        """25 steps per section unless the time left says fewer (2 sections; ~90 s of fixed costs at full size:
        start, building, moving and pinning 43 GB of weights, encoders, VAE decodes, MP4)."""
        if self.a.job_steps is not None:
            return self.a.job_steps
        if self.a.cpu_smoke:
            return 2
        per_step = self.suite.ours_step or 0.9
        return int(max(2, min(25, (cap - 90) / (2 * per_step))))

    def finish(self) -> None:
        self.save()
        s, r = self.suite, self.results
        print(f"\n==== gpu_suite {r['mode']}: {r['env'].get('gpu', 'CPU')}, torch {torch.__version__}, "
              f"{r['elapsed_s']:.0f} s of {self.a.budget:.0f} ====", flush=True)  # fmt: skip
        print(HEADER)
        for name, entry in r["sections"].items():
            for x in entry.get("rows", []):
                print(format_row(name, x))
            if not entry.get("rows"):
                print(format_row(name, row(name, status=entry.get("status", "?"), reason=entry.get("reason") or "")))
        sm = r["summary"]
        if sm.get("ours_s_step") and sm.get("peak_tflops"):
            per_frame = 25 * sm["floor_s_step"] / (FRAMES_PER_SECTION * s.window)
            print(f"floor: {s.flops['total'] / 1e12:.1f} TFLOP/step / {sm['peak_tflops']:.0f} TFLOP/s = "
                  f"{sm['floor_s_step']:.3f} s/step = {per_frame:.3f} s/frame at 25 steps; "
                  f"ours {sm['ours_s_step']:.3f} s/step = MFU {100 * sm['mfu']:.0f}%")  # fmt: skip
        job = next((x for x in r["sections"].get("job", {}).get("rows", []) if x.get("metric") == "s/frame"), None)
        if job and job.get("status") == "ok":
            floor = f", floor {job['floor_s_frame']:.3f} (x{job['ratio']:.2f})" if job.get("floor_s_frame") else ""
            vram = f"{job['peak_gib']:.1f} GiB" if job.get("peak_gib") else "-"
            print(f"job: {job['value']:.3f} s/frame{floor}, sampling {job['sampling_s_frame']:.3f} s/frame, "
                  f"{job['steps']} steps/section, peak VRAM {vram}, peak host RSS {job.get('rss_gib') or 0:.1f} GiB")
        print(f"results: {self.path}", flush=True)


def worker(a: argparse.Namespace) -> int:
    """One section in this process (started by Runner.run_isolated): rows to --worker-out as they come."""
    x = next(x for x in SECTIONS if x.name == a.worker)
    path = Path(a.worker_out)
    state = {"status": "running", "rows": []}

    def save(r: dict | None = None) -> None:
        if r is not None:
            state["rows"].append(r)
            print(format_row(f"[{x.name}]", r), flush=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(state, default=str))
        os.replace(tmp, path)

    rows = Rows(save)
    save()
    suite = Suite(a)

    def alarm(signum, frame):
        raise SectionTimeout(f"{x.name} ran past its cap of {a.budget:.0f} s")

    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, a.budget)
    try:
        x.run(suite, rows)
        state["status"] = "ok"
    except SectionTimeout as err:
        state.update(status="timeout", reason=str(err))
        rows.append(row(f"{x.name} (timeout)", status="timeout", reason=str(err)))
    except Exception as err:
        traceback.print_exc()
        state.update(status="error", reason=f"{type(err).__name__}: {err}"[:500])
        rows.append(failure(f"{x.name} (error)", err))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    save()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "gpu_suite_out"),
                    help="folder of gpu_suite.json (default: $OUT, else a folder in the temp dir)")  # fmt: skip
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 450; smoke 300)")
    ap.add_argument("--cpu-smoke", action="store_true", help="every section on the CPU at a tiny size")
    ap.add_argument("--only", type=lambda v: v.split(","), default=[], help=f"comma list of {','.join(NAMES)}")
    ap.add_argument("--skip", type=lambda v: v.split(","), default=[], help="comma list of sections to leave out")
    ap.add_argument("--runs", type=int, default=3, help="alternating timed runs per model (median)")
    ap.add_argument("--steps-per-run", type=int, default=None, help="steps per timed run (default 4; smoke 1)")
    ap.add_argument("--job-steps", type=int, default=None, help="steps per section of the job (default: 25 if the "
                    "budget allows)")  # fmt: skip
    ap.add_argument("--budget-gb", type=float, default=6.0, help="simulated device budget of the streamed run")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--peak-tflops", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ours-step", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=NAMES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    unknown = sorted(set(a.only + a.skip) - set(NAMES))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(NAMES)}")
    if a.budget is None:
        a.budget = 300.0 if a.cpu_smoke else 450.0
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not a.cpu_smoke and not torch.cuda.is_available():
        print(f"gpu_suite: no CUDA device here (torch {torch.__version__}): nothing measured; "
              "--cpu-smoke runs every section on the CPU at a tiny size")  # fmt: skip
        return 0
    if a.cpu_smoke:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if a.worker:
        return worker(a)
    return Runner(a).run()


if __name__ == "__main__":
    sys.exit(main())
