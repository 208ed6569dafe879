"""Memory policy at full size: plans for real model sizes, and (on a CUDA GPU) streamed vs alternatives.

    python benchmarks/memory.py                # CPU: memory plans for 6..80 GB devices at real sizes
    python benchmarks/memory.py --gpu          # CUDA: the transformer section benchmark below

GPU part (random bf16 weights, 640x608 bucket, one section of `--steps` steps, distilled guidance):
  resident         the whole transformer on the GPU
  streamed-6GB     ours: plan_memory with a 6 GB budget, blocks streamed one ahead on a side stream
  diffusers-group  diffusers' apply_group_offloading(block_level, 1 block per group, use_stream=True)
  copy-on-access   a re-creation of the official DynamicSwap (every parameter access copies to the GPU)
prints s/step and peak VRAM for each, the pure host->device transfer time of all blocks, and the
overlap efficiency = streamed / max(resident compute, transfer) (target <= 1.15).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framepack.config import FRAMEPACK_HY
from framepack.memory import Footprint, GiB, MemoryBudgetError, footprint, plan_memory
from framepack.models.transformer import FramePackTransformer


def real_footprints(h: int = 80, w: int = 76, window: int = 9) -> list[Footprint]:
    """The five FramePack models at their real sizes and dtypes (built on the meta device), with the
    working sets the engine's planner uses (`framepack.memory.footprint`), as a job plans them."""
    import diffusers
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    diffusers.logging.set_verbosity_error()  # casting the meta VAE with to(): nothing in it needs fp32 here
    bf16, fp16 = torch.bfloat16, torch.float16
    with torch.device("meta"):
        t = FramePackTransformer(FRAMEPACK_HY).to(bf16)
        llama = LlamaModel(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8,
                                       vocab_size=128320)).to(fp16)  # fmt: skip
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, projection_dim=768)).to(fp16)  # fmt: skip
        siglip_cfg = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                        num_attention_heads=16, image_size=384, patch_size=14)  # fmt: skip
        siglip = SiglipVisionModel(siglip_cfg).to(fp16)
        vae = AutoencoderKLHunyuanVideo().to(fp16)
    size = {"height": h, "width": w, "window": window}
    return [
        footprint("text_encoder", nn.ModuleDict({"llama": llama, "clip": clip}), list(llama.layers), **size),
        footprint("image_encoder", siglip, [], **size),
        footprint("vae", vae, [], **size),
        footprint("transformer", t, [*t.transformer_blocks, *t.single_transformer_blocks], **size),
    ]


def plans_table() -> None:
    fps = real_footprints()
    print("real sizes: " + ", ".join(f"{f.name} {f.weight_bytes / GiB:.2f} GiB (+{f.working_bytes / GiB:.2f} working)"
                                     for f in fps))  # fmt: skip
    print(f"\n{'free GB':>7s} {'preserved':>9s}  {'transformer':>22s} {'text encoder':>20s} {'vae':>9s} "
          f"{'image enc':>9s} {'peak GiB':>8s}")  # fmt: skip
    for free in (6, 8, 12, 16, 24, 48, 80):
        for preserved in (0, 2, 6, 10, 16):
            if preserved >= free:
                continue
            try:
                plan = plan_memory(fps, free_bytes=free * GiB, preserved_bytes=preserved * GiB)
            except MemoryBudgetError as err:
                print(f"{free:7d} {preserved:9d}  cannot run: {str(err).split(':')[0]}")
                continue

            cells = {}
            for name, p in plan.placements.items():
                cells[name] = p.mode.value + (f" k={p.resident_blocks}" if p.mode.value == "stream" else "")
            print(f"{free:7d} {preserved:9d}  {cells['transformer']:>22s} {cells['text_encoder']:>20s} "
                  f"{cells['vae']:>9s} {cells['image_encoder']:>9s} {plan.peak_bytes / GiB:8.2f}")  # fmt: skip


# ------------------------------------------------------------------------------------------- GPU part
class CopyOnAccess:
    """The official DynamicSwap, re-created: parameters stay on the host and every attribute access
    returns a fresh device copy (freed after use). `remove` restores the classes. Also the GPU suite's
    baseline (benchmarks/gpu_suite.py)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.originals = []
        for m in model.modules():
            cls = m.__class__

            def getattr_(self, name, _cls=cls, _dev=device):
                params = self.__dict__["_parameters"]
                if name in params:
                    p = params[name]
                    return None if p is None else nn.Parameter(p.to(_dev, non_blocking=True), requires_grad=False)
                buffers = self.__dict__["_buffers"]
                if name in buffers:
                    b = buffers[name]
                    return None if b is None else b.to(_dev, non_blocking=True)
                return _cls.__getattr__(self, name)

            m.__class__ = type(f"CopyOnAccess_{cls.__name__}", (cls,), {"__getattr__": getattr_})
            self.originals.append((m, cls))

    def remove(self) -> None:
        for m, cls in self.originals:
            m.__class__ = cls


def _inputs(device, dtype, h=80, w=76):
    g = torch.Generator().manual_seed(0)
    c = FRAMEPACK_HY.in_channels

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    mask = torch.zeros(1, 512, dtype=torch.bool)
    mask[:, :61] = True
    return dict(
        encoder_hidden_states=rnd(1, 512, 4096), encoder_attention_mask=mask.to(device), pooled_projections=rnd(1, 768),
        guidance=torch.tensor([10000.0], device=device, dtype=dtype), image_embeddings=rnd(1, 729, 1152),
        latent_indices=torch.arange(1, 10, device=device)[None], clean_latents=rnd(1, c, 2, h, w),
        clean_latent_indices=torch.tensor([[0, 10]], device=device), clean_latents_2x=rnd(1, c, 2, h, w),
        clean_latent_2x_indices=torch.tensor([[11, 12]], device=device), clean_latents_4x=rnd(1, c, 16, h, w),
        clean_latent_4x_indices=torch.arange(13, 29, device=device)[None],
    )  # fmt: skip


def _random_model(dtype) -> FramePackTransformer:
    with torch.device("meta"):
        m = FramePackTransformer(FRAMEPACK_HY)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) * 0.02).to(dtype) for k, v in m.state_dict().items()}
    m.load_state_dict(state, assign=True)
    return m.eval().requires_grad_(False)


def _section(call, x, kw, steps, device) -> float:
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(steps):
            call({**kw, "hidden_states": x, "timestep": torch.tensor([1000.0 - 30 * i], device=device, dtype=x.dtype)})
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def gpu_benchmark(steps: int, budget_gb: float) -> None:
    from framepack.memory import MemoryManager

    device, dtype = torch.device("cuda"), torch.bfloat16
    kw = _inputs(device, dtype)
    x = torch.randn(1, 16, 9, 80, 76, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    model = _random_model(dtype)  # on the CPU
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    results = {}

    # 1. resident
    model.to(device)
    torch.cuda.reset_peak_memory_stats()
    _section(lambda k: model(**k), x, kw, 2, device)  # warm-up
    results["resident"] = (_section(lambda k: model(**k), x, kw, steps, device), torch.cuda.max_memory_allocated())
    model.to("cpu")
    torch.cuda.empty_cache()

    # 2. ours, streamed under the budget
    fp = [Footprint("transformer", sum(p.numel() * 2 for p in model.parameters()), real_footprints()[-1].working_bytes,
                    tuple(sum(p.numel() * 2 for p in b.parameters()) for b in blocks))]  # fmt: skip
    plan = plan_memory(fp, free_bytes=int(budget_gb * GiB), preserved_bytes=0)
    manager = MemoryManager(device, plan, {"transformer": model}, {"transformer": blocks})
    torch.cuda.reset_peak_memory_stats()
    with manager.use("transformer"):
        _section(lambda k: model(**k), x, kw, 1, device)
        s = _section(lambda k: model(**k), x, kw, steps, device)
    results[f"streamed-{budget_gb:g}GB (k={plan.placements['transformer'].resident_blocks})"] = (
        s,
        torch.cuda.max_memory_allocated(),
    )
    streamed_s = s

    # pure transfer of every block once (pinned host -> device)
    flats = [b._framepack_flat for b in blocks]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for f in flats:
        for buf in f.host.values():
            buf.to(device, non_blocking=True)
    torch.cuda.synchronize()
    transfer = time.perf_counter() - t0

    # 3. diffusers' group offloading (block level, with streams) on diffusers' class, same weights
    from diffusers import HunyuanVideoFramepackTransformer3DModel
    from diffusers.hooks import apply_group_offloading

    with torch.device("meta"):
        ref = HunyuanVideoFramepackTransformer3DModel(**dataclasses.asdict(FRAMEPACK_HY))
    ref.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}, assign=True)
    ref.eval().requires_grad_(False)
    apply_group_offloading(ref, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=True)  # fmt: skip
    names = {"image_embeddings": "image_embeds", "latent_indices": "indices_latents", "clean_latents": "latents_clean",
             "clean_latent_indices": "indices_latents_clean", "clean_latents_2x": "latents_history_2x",
             "clean_latent_2x_indices": "indices_latents_history_2x", "clean_latents_4x": "latents_history_4x",
             "clean_latent_4x_indices": "indices_latents_history_4x"}  # fmt: skip

    def ref_call(k, ref=ref):
        return ref(**{names.get(a, a): (v[0] if a.endswith("indices") else v) for a, v in k.items()}).sample

    torch.cuda.reset_peak_memory_stats()
    _section(ref_call, x, kw, 1, device)
    results["diffusers-group"] = (_section(ref_call, x, kw, steps, device), torch.cuda.max_memory_allocated())
    ref = ref_call = None
    torch.cuda.empty_cache()

    # 4. the official copy-on-access scheme (slow: 2 steps are enough)
    baseline = _random_model(dtype)
    CopyOnAccess(baseline, device)
    torch.cuda.reset_peak_memory_stats()
    results["copy-on-access"] = (_section(lambda k: baseline(**k), x, kw, 2, device), torch.cuda.max_memory_allocated())

    print(f"\nfull-size transformer, {torch.cuda.get_device_name()}, bf16, 640x608, {steps} steps")
    print(f"{'mode':34s} {'s/step':>8s} {'peak VRAM GiB':>14s}")
    for name, (sec, peak) in results.items():
        print(f"{name:34s} {sec:8.3f} {peak / GiB:14.2f}")
    resident_s = results["resident"][0]
    print(f"pure host->device transfer of all blocks: {transfer:.3f} s")
    print(f"overlap efficiency streamed / max(resident, transfer) = {streamed_s / max(resident_s, transfer):.3f} "
          "(target <= 1.15)")  # fmt: skip
    print(f"streamed vs copy-on-access: {results['copy-on-access'][0] / streamed_s:.2f}x faster (target >= 1.5); "
          f"vs diffusers group offloading: {results['diffusers-group'][0] / streamed_s:.2f}x")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--budget-gb", type=float, default=6.0)
    a = ap.parse_args()
    plans_table()
    if a.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device")
        gpu_benchmark(a.steps, a.budget_gb)
    else:
        print("\n(no --gpu: the streamed/offloading timings need a CUDA device)")


if __name__ == "__main__":
    main()
