"""LoRA switching vs a full load, at the official width (CPU; random weights).

    python benchmarks/lora_switch.py                      # 2 double + 4 single blocks (1/10 of the blocks)
    python benchmarks/lora_switch.py --double 1 --single 2

A transformer at FRAMEPACK_HY's width (hidden 3072, MLP 12288) with fewer blocks is built with random
weights and saved once in bf16; two musubi-style LoRA files (kohya keys, rank 32, alpha 1) cover the
usual 12 Linears of every double block and 5 of every single block, A and B with different factors.
Measured in one run, side by side:

  full load     load_transformer(path, bf16) with the page cache warm (loaded once before);
                for fp8 the same followed by quantize_fp8_
  switch        none -> A, A -> B, B -> none with LoraMerger(model, CheckpointTensors(path, bf16)):
                "parse" = LoraLibrary.load (read file + sha256 + parse_lora), "merge" = merger.apply
                (restore each touched module from the memory-mapped checkpoint, merge the new delta);
                "read s" = the part of merge spent in CheckpointTensors.get (a view of the lazy map: the
                pages are read during the merge itself, so this is ~0), "sys s" = the kernel CPU time
                of the merge (getrusage: mostly page faults on fresh fp32 temporaries)

Peak RSS growth = the kernel's VmHWM (reset through /proc/self/clear_refs just before each operation)
minus the RSS right before it; where clear_refs cannot be written, RSS sampled every 2 ms by a thread.
It is compared with the largest LoRA-touched module weight in fp32, one double block's 12 targets in
fp32 (its whole delta), one double block in bf16 and the whole model. Times are the best of --repeats
(default 2) loads and switch cycles; glibc's allocator is configured as the pipeline does.

Checks: after none -> A (and A -> B) spot-checked modules equal original + delta (computed here from
the file's factors) bitwise; after B -> none every parameter and buffer equals a freshly loaded model
(fp8: freshly loaded and quantised) bitwise.

Full-size estimates (20 + 40 blocks) scale the load with the checkpoint's bytes and parse/merge with
the number of weight elements of the modules a LoRA touches (the same shapes per block at this width);
RSS growth per switch does not scale (it is per module). They are estimates, not measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framepack.config import FRAMEPACK_HY, LoraRef
from framepack.lora import LoraLibrary, LoraMerger
from framepack.memory import configure_host_allocator, current_rss
from framepack.models.lora import TargetTable
from framepack.models.quant import FP8Linear, quantize_fp8_, quantize_rows
from framepack.models.transformer import FramePackTransformer
from framepack.weights import CheckpointTensors, load_transformer, save_transformer

MiB = 2**20
BF16 = torch.bfloat16
DOUBLE_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                  "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2")  # fmt: skip
SINGLE_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
SPOT = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.0.proj", "single_transformer_blocks.0.proj_out")


# ------------------------------------------------------------------------------------ peak RSS
def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


HWM = _can_reset_hwm()
PEAK_METHOD = ("kernel VmHWM, reset via /proc/self/clear_refs before each operation" if HWM
               else "RSS sampled every 2 ms in a background thread")  # fmt: skip


class PeakRSS:
    """`with PeakRSS() as p: ...` -> p.growth: peak RSS during the block minus the RSS before it."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.before = current_rss()
        if HWM:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self.peak, self._stop = self.before, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if HWM:
            self.growth = _hwm() - self.before
        else:
            self._stop.set()
            self._thread.join()
            self.growth = max(self.peak, current_rss()) - self.before


# ------------------------------------------------------------------------------------ fixtures
def build_checkpoint(cfg, path: Path) -> None:
    with torch.device("meta"):
        model = FramePackTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, v in model.state_dict().items():
        t = torch.randn(v.shape, generator=g).mul_(0.02 if v.ndim > 1 else 0.01)
        if "norm" in k and k.endswith("weight") and v.ndim == 1:
            t += 1
        state[k] = t.to(BF16)
        del t
    model.load_state_dict(state, assign=True)
    del state
    save_transformer(model, path)


def target_names(n_double: int, n_single: int) -> list[str]:
    return ([f"transformer_blocks.{i}.{t}" for i in range(n_double) for t in DOUBLE_TARGETS]
            + [f"single_transformer_blocks.{i}.{t}" for i in range(n_single) for t in SINGLE_TARGETS])  # fmt: skip


def write_lora(path: Path, model: nn.Module, names: list[str], rank: int, seed: int) -> None:
    """A musubi-tuner-style file: lora_unet_<path with _>.lora_down.weight [r, in], .lora_up.weight [out, r],
    .alpha (1), bf16 factors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        lin = model.get_submodule(name)
        key = "lora_unet_" + name.replace(".", "_")
        tensors[key + ".lora_down.weight"] = torch.randn(rank, lin.in_features, generator=g).to(BF16)
        tensors[key + ".lora_up.weight"] = (torch.randn(lin.out_features, rank, generator=g) * 0.05).to(BF16)
        tensors[key + ".alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_framepack",
                                            "ss_network_dim": str(rank), "ss_network_alpha": "1"})  # fmt: skip


def expected_weight(original: torch.Tensor, lora: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """original + up @ down * alpha / rank in fp32 (the reference the merged module must equal)."""
    key = "lora_unet_" + name.replace(".", "_")
    up, down = lora[key + ".lora_up.weight"].float(), lora[key + ".lora_down.weight"].float()
    alpha = float(lora[key + ".alpha"])
    return original.float() + (up @ down) * (alpha / down.shape[0]) * 1.0


class CountingOriginals:
    """CheckpointTensors with the bytes and seconds spent re-reading originals counted."""

    def __init__(self, inner: CheckpointTensors) -> None:
        self.inner, self.bytes, self.seconds = inner, 0, 0.0

    def get(self, name: str) -> torch.Tensor:
        t0 = time.perf_counter()
        t = self.inner.get(name)
        self.seconds += time.perf_counter() - t0
        self.bytes += t.numel() * t.element_size()
        return t

    def release(self, name: str) -> None:
        self.inner.release(name)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def same_state(a: nn.Module, b: nn.Module) -> tuple[int, list[str]]:
    sa, sb = a.state_dict(), b.state_dict()
    bad = [k for k in sb if k not in sa or sa[k].dtype != sb[k].dtype or not torch.equal(_bits(sa[k]), _bits(sb[k]))]
    return len(sb), bad + [k for k in sa if k not in sb]


def spot_check(model: nn.Module, ref: nn.Module, lora: dict[str, torch.Tensor], fp8: bool) -> tuple[bool, float]:
    ok, worst = True, 0.0
    for name in SPOT:
        want = expected_weight(ref.get_submodule(name).weight, lora, name)
        mod = model.get_submodule(name)
        if fp8:
            w8, scale = quantize_rows(want)
            ok &= torch.equal(_bits(mod.weight_fp8), _bits(w8)) and torch.equal(mod.weight_scale, scale)
            diff = mod.weight_fp8.float() * mod.weight_scale - w8.float() * scale
            worst = max(worst, diff.abs().max().item())
        else:
            got = mod.weight
            ok &= torch.equal(got, want.to(BF16))
            worst = max(worst, (got.float() - want.to(BF16).float()).abs().max().item())
    return ok, worst


# ------------------------------------------------------------------------------------ measuring
def timed_load(path: Path, fp8: bool) -> tuple[nn.Module, float, int]:
    with PeakRSS() as p:
        t0 = time.perf_counter()
        model = load_transformer(path, dtype=BF16)
        if fp8:
            quantize_fp8_(model)
        seconds = time.perf_counter() - t0
    return model, seconds, p.growth


def switches(merger, folder, files, ref_bf16, loras, fp8) -> list[dict]:
    """One cycle none -> A -> B -> none (a fresh LoraLibrary, so each file is read and parsed again)."""
    library, table, originals = LoraLibrary(folder), TargetTable.of(merger.model), merger.originals
    rows = []
    for label, which in (("none -> A", "A"), ("A -> B", "B"), ("B -> none", None)):
        refs = (LoraRef(str(files[which]), 1.0),) if which else ()
        t0 = time.perf_counter()
        loaded = library.load(refs, table)
        parse = time.perf_counter() - t0
        originals.bytes, originals.seconds = 0, 0.0
        with PeakRSS() as p:
            sys0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
            info = merger.apply(loaded)
            merge, kernel = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0
        row = {"op": f"switch {label}", "parse": parse, "merge": merge, "read": originals.seconds, "rss": p.growth,
               "changed": info["modules_changed"], "reread": originals.bytes, "sys": kernel}  # fmt: skip
        if which:
            row["check"], row["diff"] = spot_check(merger.model, ref_bf16, loras[which], fp8)
        rows.append(row)
    return rows


def best(rows: list[list[dict]]) -> list[dict]:
    """Per operation over the repeats: the fastest times, the largest RSS growth, every check."""
    out = []
    for same in zip(*rows):
        r = dict(same[0])
        for k in ("load", "parse", "merge", "read", "sys"):
            if k in r:
                r[k] = min(x[k] for x in same)
        r["rss"] = max(x["rss"] for x in same)
        if "check" in r:
            r["check"] = all(x["check"] for x in same)
            r["diff"] = max(x.get("diff", 0.0) for x in same)
        out.append(r)
    return out


def measure(path, folder, files, ref, loras, fp8: bool, repeats: int) -> list[dict]:
    load_transformer(path, dtype=BF16)  # warm the page cache (and the allocator) alike for both halves
    gc.collect()
    model, loads = None, []
    for _ in range(repeats):
        model = None
        gc.collect()
        model, seconds, rss = timed_load(path, fp8)
        loads.append([{"op": "full load + quantize_fp8_" if fp8 else "full load (bf16)", "load": seconds, "rss": rss}])
    merger = LoraMerger(model, CountingOriginals(CheckpointTensors(path, BF16)))
    cycles = [switches(merger, folder, files, ref, loras, fp8) for _ in range(repeats)]
    fresh = load_transformer(path, dtype=BF16)
    if fp8:
        quantize_fp8_(fresh)
        assert any(isinstance(m, FP8Linear) for m in model.modules())
    n, bad = same_state(model, fresh)
    rows = best(loads) + best(cycles)
    rows[-1]["check"] = rows[-1].get("check", True) and not bad
    rows[-1]["detail"] = (f"{n - len(bad)}/{n} tensors equal a fresh load{' + quantise' if fp8 else ''} bitwise"
                          + (f" (differ: {', '.join(bad[:5])})" if bad else ""))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=2, help="double-stream blocks (official: 20)")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks (official: 40)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="loads and switch cycles per dtype (best time is shown)")
    ap.add_argument("--no-fp8", action="store_true", help="skip the fp8 half")
    a = ap.parse_args()
    configure_host_allocator()  # as the pipeline runs
    cfg = dataclasses.replace(FRAMEPACK_HY, num_layers=a.double, num_single_layers=a.single)
    tmp = Path(tempfile.mkdtemp(prefix="fp_lora_switch_"))
    try:
        run(a, cfg, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(a, cfg, tmp: Path) -> None:
    path, folder = tmp / "transformer", tmp / "loras"
    folder.mkdir()
    load_avg = [os.getloadavg()[0]]
    t_start = time.perf_counter()
    build_checkpoint(cfg, path)
    gc.collect()
    print(f"built and saved a {a.double}+{a.single}-block transformer at hidden {cfg.inner_dim} in "
          f"{time.perf_counter() - t_start:.1f} s ({path})", flush=True)  # fmt: skip

    # Sizes (the measured model and the official one, both counted on the meta device).
    with torch.device("meta"):
        full = FramePackTransformer(FRAMEPACK_HY)
        small = FramePackTransformer(cfg)
    model_bytes = sum(p.numel() * 2 for p in small.state_dict().values())
    full_bytes = sum(p.numel() * 2 for p in full.state_dict().values())
    names = target_names(a.double, a.single)
    target_elems = sum(small.get_submodule(n).weight.numel() for n in names)
    full_elems = sum(full.get_submodule(n).weight.numel() for n in target_names(20, 40))
    sizes = {n: small.get_submodule(n).weight.numel() * 4 for n in names}  # fp32 bytes
    largest_name = max(sizes, key=sizes.__getitem__)
    largest = sizes[largest_name]
    block_bytes = sum(p.numel() * 2 for p in small.transformer_blocks[0].parameters())
    block_delta = sum(small.get_submodule(n).weight.numel() * 4 for n in names if n.startswith("transformer_blocks.0."))
    del full, small

    ref = load_transformer(path, dtype=BF16)  # the originals the checks compare with
    files = {"A": folder / "style_a.safetensors", "B": folder / "style_b.safetensors"}
    write_lora(files["A"], ref, names, a.rank, seed=1)
    write_lora(files["B"], ref, names, a.rank, seed=2)
    loras = {k: load_file(str(v)) for k, v in files.items()}
    lora_mib = files["A"].stat().st_size / MiB
    results = {}
    for dtype in ("bf16",) if a.no_fp8 else ("bf16", "fp8"):
        results[dtype] = measure(path, folder, files, ref, loras, dtype == "fp8", a.repeats)
        load_avg.append(os.getloadavg()[0])
        print(f"{dtype} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    del ref
    gc.collect()

    # ---- report
    f_load, f_merge = full_bytes / model_bytes, full_elems / target_elems
    print(f"\nLoRA switch vs full load, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}: "
          f"hidden {cfg.inner_dim}, {a.double} double + {a.single} single blocks, checkpoint "
          f"{model_bytes / MiB:.0f} MiB bf16 (page cache warm); LoRA rank {a.rank}, alpha 1, {len(names)} modules, "
          f"{lora_mib:.1f} MiB per file; best of {a.repeats} (RSS: the largest of {a.repeats}); 1-min load average "
          f"{' / '.join(f'{x:.1f}' for x in load_avg)} (start / after each half)")  # fmt: skip
    print(f"peak RSS: {PEAK_METHOD}")
    print(f"reference sizes: largest LoRA-touched module weight in fp32 ({largest_name.split('.', 2)[-1]}) "
          f"{largest / MiB:.0f} MiB, one double block's 12 targets in fp32 {block_delta / MiB:.0f} MiB, one double "
          f"block (bf16) {block_bytes / MiB:.0f} MiB, whole model (bf16) {model_bytes / MiB:.0f} MiB\n")  # fmt: skip
    head = (f"| {'dtype':5s} | {'operation':25s} | {'parse s':>7s} | {'merge s':>7s} | {'read s':>6s} | "
            f"{'sys s':>5s} | {'total s':>7s} | {'/ full load':>11s} | {'RSS growth MiB':>14s} | {'modules':>7s} | "
            f"{'est. s at 20+40':>15s} | check |")  # fmt: skip
    cols = head.split("|")[1:-1]
    print(head)
    print("|" + "|".join("-" * len(c) if i in (0, 1, len(cols) - 1) else "-" * (len(c) - 1) + ":"
                         for i, c in enumerate(cols)) + "|")  # fmt: skip
    for dtype, rows in results.items():
        base = rows[0]["load"]
        for r in rows:
            if "load" in r:
                total, est = r["load"], r["load"] * f_load
                cells = ("", "", "", "")
            else:
                total, est = r["parse"] + r["merge"], (r["parse"] + r["merge"]) * f_merge
                cells = (f"{r['parse']:.3f}", f"{r['merge']:.3f}", f"{r['read']:.2f}", f"{r['sys']:.2f}")
            check = {True: "OK", False: "FAIL"}.get(r.get("check"), "")
            print(f"| {dtype:5s} | {r['op']:25s} | {cells[0]:>7s} | {cells[1]:>7s} | {cells[2]:>6s} | {cells[3]:>5s} | "
                  f"{total:7.3f} | "
                  f"{total / base:11.3f} | {r['rss'] / MiB:14.0f} | {r.get('changed', ''):>7} | {est:15.1f} | "
                  f"{check:5s} |")  # fmt: skip
    print()
    for dtype, rows in results.items():
        for r in rows:
            if "diff" in r and "detail" not in r:
                print(f"{dtype} {r['op']}: spot check ({', '.join(SPOT)}) = original + delta bitwise: "
                      f"{'OK' if r['check'] else 'FAIL'} (max |diff| {r['diff']:.2e})")  # fmt: skip
            if "detail" in r:
                print(f"{dtype} {r['op']}: {'OK' if r['check'] else 'FAIL'}, {r['detail']}")
        switch = [r for r in rows if "merge" in r]
        peak = max(r["rss"] for r in switch)
        reread = switch[0]["reread"]
        print(f"{dtype}: largest switch RSS growth {peak / MiB:.0f} MiB = {peak / largest:.2f}x the largest touched "
              f"module in fp32, {peak / block_delta:.2f}x one double block's targets in fp32, "
              f"{peak / block_bytes:.2f}x one double block (bf16), {peak / model_bytes:.3f}x the model; originals "
              f"re-read per switch {reread / MiB:.0f} MiB ({reread / model_bytes:.0%} of the checkpoint)")  # fmt: skip
    print(f"\nestimates at 20+40 blocks: load x{f_load:.2f} (checkpoint {full_bytes / 2**30:.1f} GiB), parse and "
          f"merge x{f_merge:.2f} (weight elements of the LoRA-touched modules); the RSS growth of a switch is per "
          "module and does not scale. The full-size load estimate assumes the 24 GiB checkpoint in the page cache "
          "(it does not fit on a 24 GB machine: a real reload reads it from disk).")  # fmt: skip
    print(f"total run time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
