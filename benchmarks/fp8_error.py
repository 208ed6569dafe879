"""fp8 storage vs fp8 compute on the shipped toy model: how far each is from the unquantised model.

For held-out toy-world scenes (64x64, framepack.train.quality.held_out_scenes) the `toy` pipeline
generates a short video three ways (same first frame, caption and seed): the reference (the model's
own dtype, fp32), `RuntimeOptions(fp8="storage")` (fp8 weights, dequantised for every matmul) and
`fp8="compute"` (fp8 matmuls: activations quantised per token too; on a CPU the exact emulation of
the kernels, see framepack/models/quant.py). Two measurements:

  * velocity: the reference run's transformer calls of the first section are recorded (inputs and
    output) and, at a few sampler steps, replayed into the fp8 models with the same inputs: relative L2
    error of the velocity per step (teacher-forced: no drift, only the per-call error);
  * frames: pixel PSNR of the decoded video (MP4 at crf 0, all frames, and the last frame alone) and its
    max abs error against the reference video: what the error does after a whole generation.

With CUDA (or `--device cuda`) the same runs on the GPU, where "compute" uses torch._scaled_mm (the
kernel each run used is printed), plus the bf16 model without fp8 and the compute mode forced to the
emulation, in bf16: the rowwise fp8 kernel wants bf16 activations.

    python benchmarks/fp8_error.py [--scenes 1] [--sections 1] [--steps 25] [--probe-steps 5] [--cfg 1]
                                   [--device cpu|cuda|both] [--bf16]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framepack.config import GenerationRequest, RuntimeOptions
from framepack.models.quant import EMULATED, FP8Linear, fp8_backend_reason, fp8_compute_backend, fp8_report
from framepack.pipeline import load_pipeline
from framepack.train.quality import SECTION_FRAMES, held_out_scenes
from framepack.video import read_frames


@dataclass(frozen=True)
class Variant:
    label: str
    fp8: str | None = None
    dtype: torch.dtype | None = None  # None: the model's own (fp32 for the toy)
    force_emulated: bool = False


@dataclass
class Row:
    device: str
    variant: Variant
    kernel: str = ""
    velocity: dict[int, list[float]] = field(default_factory=dict)  # step -> per-scene relative L2
    psnr: list[float] = field(default_factory=list)
    psnr_last: list[float] = field(default_factory=list)
    max_err: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    d = a.astype(np.float64) - b.astype(np.float64)
    mse = float((d**2).mean())
    return (math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)), int(np.abs(d).max())


def kernel_of(model: torch.nn.Module) -> str:
    kernels = fp8_report(model)["kernels"]
    return " + ".join(f"{k} x{n}" if len(kernels) > 1 else k for k, n in kernels.items()) or "-"


class Recorder:
    """The inputs and the velocity of a transformer's first `keep` calls (on the host, detached)."""

    def __init__(self, model: torch.nn.Module, keep: int) -> None:
        self.calls: list[tuple[dict, torch.Tensor]] = []
        self.keep, self.pending = keep, None
        self.hooks = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                      model.register_forward_hook(self._post, with_kwargs=True)]  # fmt: skip

    def _pre(self, module, args, kwargs):
        if len(self.calls) < self.keep:
            self.pending = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                            for k, v in kwargs.items()}  # fmt: skip

    def _post(self, module, args, kwargs, out):
        if self.pending is not None:
            self.calls.append((self.pending, out.sample.detach().float().cpu()))
            self.pending = None

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def replay(model: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    dev, dt = model.device, model.dtype
    kw = {k: (v.to(dev, dt) if v.is_floating_point() else v.to(dev)) if isinstance(v, torch.Tensor) else v
          for k, v in kwargs.items()}  # fmt: skip
    with torch.no_grad():
        return model(**kw).sample.float().cpu()


def variants(device: str, bf16: bool) -> list[Variant]:
    if device == "cuda":
        return [Variant("fp32 (reference)"), Variant("bf16, no fp8", None, torch.bfloat16),
                Variant("fp8 storage, bf16", "storage", torch.bfloat16),
                Variant("fp8 compute, bf16", "compute", torch.bfloat16),
                Variant("fp8 compute, bf16, emulated", "compute", torch.bfloat16, force_emulated=True),
                Variant("fp8 compute, fp32", "compute")]  # fmt: skip
    out = [Variant("fp32 (reference)"), Variant("fp8 storage", "storage"), Variant("fp8 compute", "compute")]
    if bf16:
        out += [Variant("bf16, no fp8", None, torch.bfloat16), Variant("fp8 storage, bf16", "storage", torch.bfloat16),
                Variant("fp8 compute, bf16", "compute", torch.bfloat16)]  # fmt: skip
    return out


def run_device(device: str, args, scenes, tmp: Path) -> tuple[list[Row], list[int], list]:
    rows = []
    probe = sorted({round(i * (args.steps - 1) / max(1, args.probe_steps - 1)) for i in range(args.probe_steps)})
    passes = 1 if args.cfg == 1 else 2
    refs: list[tuple[np.ndarray, list]] = []  # per scene: reference frames, recorded calls
    for v in variants(device, args.bf16):
        pipe = load_pipeline("toy", device=device, dtype=v.dtype, prompt_cache_dir=tmp / "prompts",
                             options=RuntimeOptions(fp8=v.fp8))  # fmt: skip
        model = pipe.c.transformer
        if v.force_emulated:
            for m in model.modules():
                if isinstance(m, FP8Linear):
                    m.kernel = EMULATED
        row = Row(device, v)
        for i, clip in enumerate(scenes):
            reference = len(refs) <= i  # the first variant: record its first section's transformer calls
            rec = Recorder(model, args.steps * passes) if reference else None
            request = GenerationRequest(prompt=clip.caption, seconds=args.sections * SECTION_FRAMES / 30,
                                        steps=args.steps, seed=i, cfg=args.cfg, resolution=clip.frames[0].shape[0],
                                        output=str(tmp / f"{device}-{v.label}-{i}.mp4".replace(" ", "_")),
                                        teacache=False, crf=0)  # fmt: skip
            t0 = time.perf_counter()
            result = pipe.generate(request, image=clip.frames[0])
            row.seconds.append(time.perf_counter() - t0)
            frames = read_frames(result.video)
            if rec is not None:
                rec.remove()
                refs.append((frames, rec.calls))
                continue
            ref_frames, calls = refs[i]
            p, e = psnr(frames, ref_frames)
            row.psnr.append(p)
            row.max_err.append(e)
            row.psnr_last.append(psnr(frames[-1], ref_frames[-1])[0])
            for s in probe:
                for kw, want in calls[s * passes : (s + 1) * passes]:
                    got = replay(model, kw)
                    row.velocity.setdefault(s, []).append(((got - want).norm() / want.norm()).item())
        row.kernel = kernel_of(model) if v.fp8 else "-"
        rows.append(row)
        print(f"  {device} {v.label}: {kernel_of(model) if v.fp8 else 'no fp8'}, generation "
              f"{statistics.fmean(row.seconds):.1f} s", flush=True)  # fmt: skip
        del pipe, model
    return rows, probe, refs


def fmt_db(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.1f}"


def print_table(rows: list[Row], probe: list[int], timesteps: dict[int, float]) -> None:
    heads = [f"v err step {s + 1} (t={timesteps[s]:.0f})" for s in probe]
    print("| device | variant | kernel | " + " | ".join(heads) + " | v err mean | PSNR dB all frames (worst) | "
          "PSNR dB last frame | max abs err | s/generation |")  # fmt: skip
    print("| --- " * (len(heads) + 8) + "|")
    for r in rows:
        if not r.velocity:
            print(f"| {r.device} | {r.variant.label} | {r.kernel} | " + " | ".join("0" for _ in heads)
                  + f" | 0 | inf | inf | 0 | {statistics.fmean(r.seconds):.1f} |")  # fmt: skip
            continue
        v = [statistics.fmean(r.velocity[s]) for s in probe]
        frames = f"{fmt_db(statistics.fmean(r.psnr))} ({fmt_db(min(r.psnr))}) | {fmt_db(statistics.fmean(r.psnr_last))}"
        tail = f"{statistics.fmean(v):.4f} | {frames} | {max(r.max_err)} | {statistics.fmean(r.seconds):.1f}"
        print(f"| {r.device} | {r.variant.label} | {r.kernel} | " + " | ".join(f"{x:.4f}" for x in v) + f" | {tail} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=1, help="held-out scenes (each: one generation per variant)")
    ap.add_argument("--sections", type=int, default=1, help="sections per video")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--probe-steps", type=int, default=5, help="sampler steps whose velocity is replayed")
    ap.add_argument("--cfg", type=float, default=1.0, help="real CFG (1: one model call per step)")
    ap.add_argument("--device", choices=("cpu", "cuda", "both", "auto"), default="auto",
                    help="auto: the CPU, and CUDA too when there is one")  # fmt: skip
    ap.add_argument("--bf16", action="store_true", help="CPU: also the bf16 model and the fp8 modes in bf16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "both": ["cpu", "cuda"],
               "auto": ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]}[args.device]  # fmt: skip
    for d in devices:
        print(f"fp8 compute backend on {d}: {fp8_compute_backend(d)} ({fp8_backend_reason(d)})")
    if "cuda" in devices:
        print(f"GPU: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}, "
              f"torch {torch.__version__}")  # fmt: skip
    scenes = held_out_scenes(args.scenes, args.sections)
    tmp = Path(tempfile.mkdtemp(prefix="fp-fp8err-"))
    t0 = time.perf_counter()
    all_rows, probe, timesteps = [], [], {}
    for d in devices:
        rows, probe, refs = run_device(d, args, scenes, tmp)
        all_rows += rows
        passes = 1 if args.cfg == 1 else 2
        timesteps = {s: float(refs[0][1][s * passes][0]["timestep"].flatten()[0]) for s in probe}
    print(f"\n{args.scenes} scene(s), {args.sections} section(s), {args.steps} steps, cfg {args.cfg:g}, 64x64; "
          "velocity: relative L2 vs the fp32 run's, teacher-forced, mean over scenes; "
          f"{time.perf_counter() - t0:.0f} s\n")  # fmt: skip
    print_table(all_rows, probe, timesteps)


if __name__ == "__main__":
    main()
