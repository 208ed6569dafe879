"""fp8 for the transformer blocks, attached from outside (`quantize_fp8_(model, mode=...)`).

Every Linear inside the 20 double and 40 single blocks (12.46 B of the 12.87 B parameters) keeps its
weight as float8_e4m3fn with one fp32 scale per output row (absmax / 448). That halves the blocks'
host RAM, device memory and host->device traffic when streaming. Two ways to compute with it:

  * "storage": each matmul dequantises the weight to the compute dtype (bf16) on the fly and runs an
    ordinary matmul. Any device. The only error is the weight's rounding.
  * "compute": each matmul runs in fp8. The activations are quantised too, per token (row), to e4m3
    with an absmax / 448 scale computed on the fly; the weights are used as stored (per output row).
    The kernel (`FP8Linear.kernel`, `fp8_compute_backend(device)`, `fp8_report(model)`) is one of
      - "scaled_mm rowwise": torch._scaled_mm with the row scales fused into it (scale_a (M, 1), scale_b
        (1, N), fp32; bf16 output; the bias is added afterwards). CUDA capability >= 9.0 (Hopper and
        later), torch >= 2.5, bf16 activations.
      - "scaled_mm tensorwise": torch._scaled_mm with unit per-tensor scales and fp32 output; the same
        row scales (and the bias) are applied afterwards, in fp32. Capability 8.9 (Ada), or where the
        rowwise form is not accepted. Same quantisation, so the same rounding as rowwise.
      - "emulated": everywhere else (CPU, GPUs below 8.9, shapes or layouts the kernel does not take):
        the same e4m3 rounding of activations and weights, dequantised, matmul in fp32, cast to the
        output dtype. It equals the kernels up to fp32 summation order (rowwise: and its bf16 bias
        add), so on a CPU the "compute" output shows fp8 compute's error.
    Which kernel a device gets is probed once per device (a small _scaled_mm checked against the
    emulation), not per call. A module the kernel cannot take (in or out features not a multiple of 16,
    a misaligned weight) or whose kernel call raises runs emulated from then on, silently in forward;
    its `kernel` then says "emulated" and `fallback_reason` why (logged once).

Both modes change results (e4m3 keeps 3 mantissa bits); the error against bf16 / fp32 is measured in
tests/test_quant.py, benchmarks/memory.py and benchmarks/fp8_error.py. Off by default.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

E4M3_MAX = 448.0
MODES = ("storage", "compute")
ROWWISE, TENSORWISE, EMULATED = "scaled_mm rowwise", "scaled_mm tensorwise", "emulated"
KERNELS = (ROWWISE, TENSORWISE, EMULATED)
DEQUANTISED = "dequantised"  # the kernel of a storage-mode module: an ordinary matmul with the dequantised weight
USE_FAST_ACCUM = False  # Hopper's fast fp8 accumulation is faster but less exact; the emulation models the exact one

log = logging.getLogger(__name__)
_BACKENDS: dict[str, tuple[str, str]] = {}  # str(device) -> (kernel, why), probed once per device
_LOGGED: set[str] = set()


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 matrix, fp32 per-row scale) of a (rows, cols) matrix, computed from its fp32 values: a
    weight (rows = output features) or activations (rows = tokens)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).to(torch.float8_e4m3fn), scale


def fp8_matmul_emulated(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                        out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """fp8 compute's result without an fp8 kernel: x (M, K) quantised per row like the weight (N, K) was,
    both dequantised, matmul (and bias) in fp32, cast to `out_dtype`."""
    x8, x_scale = quantize_rows(x)
    y = (x8.float() * x_scale) @ (w8.float() * w_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=USE_FAST_ACCUM)
    return out[0] if isinstance(out, tuple) else out  # torch < 2.4 also returned the amax


def fp8_matmul_scaled_mm(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                         out_dtype: torch.dtype, kernel: str) -> torch.Tensor:  # fmt: skip
    """The same product with torch._scaled_mm. x (M, K) any float dtype, w8 (N, K) e4m3 row-major (so
    that w8.t() is the column-major second operand), w_scale (N, 1) fp32; K and N multiples of 16."""
    x8, x_scale = quantize_rows(x)  # (M, 1) fp32
    x8 = x8.contiguous()  # row-major (elementwise ops keep an odd input layout)
    if kernel == ROWWISE and out_dtype == torch.bfloat16:
        y = _scaled_mm(x8, w8.t(), x_scale, w_scale.reshape(1, -1), torch.bfloat16)
        return y if bias is None else y + bias.to(y.dtype)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    y = _scaled_mm(x8, w8.t(), one, one, torch.float32) * x_scale * w_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _torch_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _device(device: torch.device | str) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _probe_kernel(device: torch.device, kernel: str) -> float:
    """Relative L2 difference between the kernel and the emulation on a small random problem."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 64, generator=g).to(device, torch.bfloat16)
    w8, w_scale = quantize_rows(torch.randn(32, 64, generator=g) * torch.logspace(-1, 1, 32)[:, None])
    w8, w_scale, bias = w8.to(device), w_scale.to(device), torch.randn(32, generator=g).to(device, torch.bfloat16)
    out_dtype = torch.bfloat16 if kernel == ROWWISE else torch.float32
    got = fp8_matmul_scaled_mm(x, w8, w_scale, bias, out_dtype, kernel).float()
    want = fp8_matmul_emulated(x, w8, w_scale, bias, out_dtype).float()
    err = ((got - want).norm() / want.norm()).item()
    return err if got.isfinite().all() else float("inf")


def _probe(device: torch.device) -> tuple[str, str]:
    if device.type != "cuda":
        return EMULATED, f"{device.type}: fp8 kernels are used on CUDA devices only"
    if not hasattr(torch, "_scaled_mm"):
        return EMULATED, f"torch {torch.__version__} has no _scaled_mm"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return EMULATED, f"compute capability {cap[0]}.{cap[1]} < 8.9 (no fp8 tensor cores)"
    candidates = ([ROWWISE] if cap >= (9, 0) and _torch_version() >= (2, 5) else []) + [TENSORWISE]
    failures, where = [], f"capability {cap[0]}.{cap[1]}, torch {torch.__version__}"
    for kernel in candidates:
        try:
            err = _probe_kernel(device, kernel)
        except Exception as e:  # any failure of the kernel means: do not use it
            failures.append(f"{kernel}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}")
            continue
        if err <= (2e-2 if kernel == ROWWISE else 1e-4):
            return kernel, f"{where}: probe within {err:.1e} of the emulation"
        failures.append(f"{kernel}: probe off the emulation by {err:.2e}")
    return EMULATED, f"{where}: " + "; ".join(failures)


@torch.compiler.disable
def _backend(device: torch.device | str) -> tuple[str, str]:
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        return EMULATED, "no CUDA device"
    key = str(_device(d))
    if key not in _BACKENDS:
        _BACKENDS[key] = kernel, why = _probe(_device(d))
        # a GPU asked for fp8 compute that emulates it is slower than with fp8 storage: say so
        level = logging.WARNING if d.type == "cuda" and kernel == EMULATED else logging.INFO
        log.log(level, "fp8 compute on %s: %s (%s)", key, kernel, why)
    return _BACKENDS[key]


def fp8_compute_backend(device: torch.device | str) -> str:
    """The fp8 compute kernel of `device`: "scaled_mm rowwise", "scaled_mm tensorwise" or "emulated"
    (probed at the first question per device, then remembered)."""
    return _backend(device)[0]


def fp8_backend_reason(device: torch.device | str) -> str:
    """Why `device` got its kernel (capability, torch version, probe result or failure)."""
    return _backend(device)[1]


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.warning("%s", message)


class FP8Linear(nn.Module):
    """Drop-in for nn.Linear: `weight` (a read-only property) returns the dequantised weight."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype, mode: str = "storage") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"fp8 mode must be one of {', '.join(MODES)}, not {mode!r}")
        w8, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_fp8", w8)  # (out, in)
        self.register_buffer("weight_scale", scale)  # (out, 1) fp32
        self.bias = linear.bias
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode = mode
        # compute mode: None until the first forward (or quantize_fp8_(..., device=)) picks it for the device
        self.kernel: str | None = DEQUANTISED if mode == "storage" else None
        self.fallback_reason: str | None = None  # why a compute-mode module runs emulated on a device with a kernel

    @property
    def weight(self) -> torch.Tensor:
        dt = self.compute_dtype
        return self.weight_fp8.to(dt) * self.weight_scale.to(dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "storage":
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        kernel = self.kernel or self.resolve_kernel_(x.device)
        x2 = x.reshape(-1, self.in_features)
        if kernel != EMULATED and x2.shape[0] > 0:
            y = self._kernel_matmul(x2, kernel)
        else:
            y = fp8_matmul_emulated(x2, self.weight_fp8, self.weight_scale, self.bias, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _kernel_matmul(self, x2: torch.Tensor, kernel: str) -> torch.Tensor:
        if not torch.compiler.is_compiling() and self.weight_fp8.data_ptr() % 16:  # e.g. in a block's flat copy
            self._fall_back("the fp8 weight is not 16-byte aligned")
            return fp8_matmul_emulated(x2, self.weight_fp8, self.weight_scale, self.bias, x2.dtype)
        try:
            return fp8_matmul_scaled_mm(x2, self.weight_fp8, self.weight_scale, self.bias, x2.dtype, kernel)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # a kernel problem must not end the job: emulate from now on
            self._fall_back(f"{kernel} raised {type(e).__name__}: {str(e).strip()[:300]}")
        return fp8_matmul_emulated(x2, self.weight_fp8, self.weight_scale, self.bias, x2.dtype)

    def _fall_back(self, reason: str) -> None:
        self.kernel, self.fallback_reason = EMULATED, reason
        _log_once(f"fp8 compute: a {self.in_features}->{self.out_features} Linear runs emulated: {reason}")

    def kernel_problem(self) -> str | None:
        """Why torch._scaled_mm cannot take this module's matmul, or None."""
        k, n = self.in_features, self.out_features
        if k % 16 or n % 16:
            return f"in/out features {k}/{n} are not multiples of 16"
        if not self.weight_fp8.is_contiguous() or self.weight_fp8.storage_offset() % 16:
            return "the fp8 weight is not a contiguous, 16-byte aligned (out, in) matrix"
        return None

    @torch.compiler.disable
    def resolve_kernel_(self, device: torch.device | str) -> str:
        """Pick (and keep) the compute kernel for `device`: its backend, unless this module's shape rules it out."""
        kernel, _ = _backend(device)
        if kernel != EMULATED:
            problem = self.kernel_problem()
            if problem is not None:
                self._fall_back(problem)
                return EMULATED
            if kernel == ROWWISE and self.compute_dtype != torch.bfloat16:
                kernel = TENSORWISE  # rowwise _scaled_mm writes bf16 only; the fp32-output form keeps the rounding
        self.kernel = kernel
        return kernel

    @torch.no_grad()
    def set_weight_(self, weight: torch.Tensor) -> None:
        """Quantise a new high-precision weight (a merged LoRA, a restored original) into the existing
        buffers, in place (a streamed block's buffers are views of its flat host copy)."""
        w8, scale = quantize_rows(weight)
        self.weight_fp8.copy_(w8)
        self.weight_scale.copy_(scale)

    def extra_repr(self) -> str:
        extra = "" if self.mode == "storage" else f", compute, kernel={self.kernel}"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3{extra}"


def quantize_fp8_(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, mode: str = "storage",
                  device: torch.device | str | None = None) -> int:  # fmt: skip
    """Replace the Linears of `model.transformer_blocks` and `model.single_transformer_blocks` in place.

    `mode`: "storage" (fp8 weights, bf16 matmuls) or "compute" (fp8 matmuls). With "compute" and a
    `device`, every module's kernel is picked now (before any torch.compile), otherwise at its first
    forward. Returns the number of bytes saved. The model must not be streamed while this runs.
    """
    if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"fp8 weights dequantise to bf16, fp16 or fp32, not {compute_dtype}")
    if mode not in MODES:
        raise ValueError(f"fp8 mode must be one of {', '.join(MODES)}, not {mode!r}")
    saved = 0
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for block in blocks:
            for parent in list(block.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        before = child.weight.numel() * child.weight.element_size()
                        q = FP8Linear(child, compute_dtype, mode)
                        setattr(parent, name, q)
                        saved += before - child.weight.numel() - 4 * child.out_features  # fp8 + scales
                        if mode == "compute" and device is not None:
                            q.resolve_kernel_(device)
    if hasattr(model, "clear_section_cache"):
        model.clear_section_cache()
    return saved


def fp8_report(model: nn.Module) -> dict:
    """What the model's FP8Linears run: {"modules": n, "kernels": {kernel: count}, "fallbacks": {name:
    reason}} ("kernel" None: a compute-mode module that has not run yet)."""
    mods = [(name, m) for name, m in model.named_modules() if isinstance(m, FP8Linear)]
    return {
        "modules": len(mods),
        "kernels": dict(Counter(str(m.kernel) for _, m in mods)),
        "fallbacks": {name: m.fallback_reason for name, m in mods if m.fallback_reason},
    }
