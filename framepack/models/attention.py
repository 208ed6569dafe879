"""The one attention function of the package, with its backends.

Contract: `attention(q, k, v, padding)` with q (B, Lq, H, D) and k, v (B, Lk, H, D), Lq <= Lk, returns
(B, Lq, H, D). Query row i of a sample attends to that sample's valid keys: the first
`padding.lengths[b]` keys (or all keys when `padding` is None). Lq < Lk means the caller only wants
some rows of the output (e.g. the last block, whose context rows are discarded); with no causal mask
the rows' positions do not matter, so backends only need the key padding.

Backends, chosen once (`select_backend`, default "auto" = PyTorch SDPA):
  sdpa      torch.nn.functional.scaled_dot_product_attention restricted to fused kernels
            (flash / memory-efficient / cuDNN on CUDA, the tiled flash kernel on CPU). When no fused
            kernel accepts the inputs (old GPUs, ZLUDA, unusual dtypes) it processes the queries in
            chunks, so the score matrix is bounded by `chunk_bytes` instead of Lq x Lk: the full
            matrix at 19k tokens is 16-32 GB, the most common out-of-memory report of the official demo.
  flash     flash-attn 2 (`flash_attn_func` / `flash_attn_varlen_func`), CUDA fp16/bf16 only.
  sage      sageattention (`sageattn` / `sageattn_varlen`), CUDA fp16/bf16 only; lossy (int8 QK).
  xformers  xformers `memory_efficient_attention` with a block-diagonal mask for padding.
None of the backends materialises the full score matrix.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash", "sage", "xformers")
DEFAULT_CHUNK_BYTES = int(float(os.environ.get("FRAMEPACK_ATTN_CHUNK_MB", "512")) * 2**20)


class AttentionBackendError(RuntimeError):
    """A backend was requested that cannot run here (not installed, wrong device or dtype)."""


@dataclass
class KeyPadding:
    """Valid key prefix length per sample. Built once per section, reused by every attention call."""

    lengths: list[int]
    total: int
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if any(not 0 < n <= self.total for n in self.lengths):
            raise ValueError(f"key lengths {self.lengths} must lie in 1..{self.total}")

    @property
    def all_valid(self) -> bool:
        return all(n == self.total for n in self.lengths)

    def _get(self, name: str, device: torch.device, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = make().to(device)
        return self._cache[key]

    def sdpa_mask(self, device: torch.device) -> torch.Tensor:
        """(B, 1, 1, Lk) bool, True where a key may be attended."""

        def make() -> torch.Tensor:
            pos = torch.arange(self.total)
            return (pos[None, :] < torch.tensor(self.lengths)[:, None])[:, None, None, :]

        return self._get("mask", device, make)

    def kv_index(self, device: torch.device) -> torch.Tensor:
        """Flat indices of the valid keys in a (B*Lk) layout, for varlen kernels."""

        def make() -> torch.Tensor:
            return torch.cat([b * self.total + torch.arange(n) for b, n in enumerate(self.lengths)])

        return self._get("kv_index", device, make)

    def cu_seqlens_k(self, device: torch.device) -> torch.Tensor:
        return self._get("cu_k", device, lambda: F.pad(torch.tensor(self.lengths).cumsum(0), (1, 0)).to(torch.int32))


def _cu_seqlens_q(batch: int, lq: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * lq, lq, dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------- sdpa
_FUSED = None  # filled lazily: the fused SDPA kernels of this torch build
_fused_ok: dict[tuple, bool] = {}


def _fused_backends() -> list:
    global _FUSED
    if _FUSED is None:
        from torch.nn.attention import SDPBackend

        _FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        if hasattr(SDPBackend, "CUDNN_ATTENTION"):
            _FUSED.append(SDPBackend.CUDNN_ATTENTION)
    return _FUSED


def sdpa_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, chunk_bytes: int
) -> torch.Tensor:
    """SDPA over query chunks: at most `chunk_bytes` of scores (fp32) exist at any time."""
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    rows = max(1, chunk_bytes // (b * h * lk * 4 * 2))  # scores + softmax temp, in fp32
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
    out = torch.empty_like(q)
    for start in range(0, lq, rows):
        part = F.scaled_dot_product_attention(qt[:, :, start : start + rows], kt, vt, attn_mask=mask)
        out[:, start : start + rows] = part.transpose(1, 2)
    return out


def _sdpa(q, k, v, padding: KeyPadding | None, chunk_bytes: int) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    mask = None if padding is None or padding.all_valid else padding.sdpa_mask(q.device)
    key = (q.device.type, q.dtype, q.shape[-1], mask is not None, q.requires_grad)
    if _fused_ok.get(key, True):
        try:
            with sdpa_kernel(_fused_backends()):
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
                )
            _fused_ok[key] = True
            return out.transpose(1, 2)  # the fused kernels already lay this out as (B, L, H, D)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            if _fused_ok.get(key) is True:  # worked before for this kind of input: a real error
                raise
            log.warning("no fused SDPA kernel for %s (%s); using query-chunked attention", key, err)
            _fused_ok[key] = False
    return sdpa_chunked(q, k, v, mask, chunk_bytes)


# ----------------------------------------------------------------------------- optional CUDA kernels
def _require_half_cuda(name: str, q: torch.Tensor) -> None:
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise AttentionBackendError(
            f"attention backend {name!r} needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}; "
            "use the 'sdpa' backend for this device or dtype"
        )


def _varlen_inputs(q, k, v, padding: KeyPadding):
    b, lq, h, d = q.shape
    idx = padding.kv_index(q.device)
    kf = k.reshape(-1, h, d).index_select(0, idx)  # valid keys only, sample after sample
    vf = v.reshape(-1, h, d).index_select(0, idx)
    return q.reshape(b * lq, h, d), kf, vf, _cu_seqlens_q(b, lq, q.device), padding.cu_seqlens_k(q.device)


def _flash(q, k, v, padding: KeyPadding | None, chunk_bytes: int) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    _require_half_cuda("flash", q)
    if padding is None or padding.all_valid:
        return flash_attn_func(q, k, v)
    qf, kf, vf, cu_q, cu_k = _varlen_inputs(q, k, v, padding)
    out = flash_attn_varlen_func(qf, kf, vf, cu_q, cu_k, q.shape[1], max(padding.lengths))
    return out.view(q.shape)


def _sage(q, k, v, padding: KeyPadding | None, chunk_bytes: int) -> torch.Tensor:
    from sageattention import sageattn, sageattn_varlen

    _require_half_cuda("sage", q)
    if padding is None or padding.all_valid:
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    qf, kf, vf, cu_q, cu_k = _varlen_inputs(q, k, v, padding)
    out = sageattn_varlen(qf, kf, vf, cu_q, cu_k, q.shape[1], max(padding.lengths))
    return out.view(q.shape)


def _xformers(q, k, v, padding: KeyPadding | None, chunk_bytes: int) -> torch.Tensor:
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    if padding is None or padding.all_valid:
        return xops.memory_efficient_attention(q, k, v)
    b, lq, h, d = q.shape
    idx = padding.kv_index(q.device)
    kf = k.reshape(-1, h, d).index_select(0, idx)[None]
    vf = v.reshape(-1, h, d).index_select(0, idx)[None]
    bias = BlockDiagonalMask.from_seqlens([lq] * b, list(padding.lengths))
    return xops.memory_efficient_attention(q.reshape(1, b * lq, h, d), kf, vf, attn_bias=bias).view(q.shape)


_IMPLS = {"sdpa": _sdpa, "flash": _flash, "sage": _sage, "xformers": _xformers}
_MODULES = {"flash": "flash_attn", "sage": "sageattention", "xformers": "xformers"}


def unavailable_reason(name: str) -> str | None:
    """None when backend `name` can be used here, else why not."""
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
    module = _MODULES.get(name)
    if module and importlib.util.find_spec(module) is None:
        return f"{name!r} needs the {module} package, which is not installed"
    if name in ("flash", "sage") and not torch.cuda.is_available():
        return f"{name!r} needs a CUDA device"
    return None


@dataclass(frozen=True)
class AttentionBackend:
    """A chosen backend: call it like `attention(q, k, v, padding)`."""

    name: str = "sdpa"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: KeyPadding | None = None
    ) -> torch.Tensor:
        return _IMPLS[self.name](q, k, v, padding, self.chunk_bytes)


def select_backend(name: str = "auto", chunk_mb: float | None = None) -> AttentionBackend:
    """Choose once. 'auto' is SDPA: with today's torch its fused kernels match flash-attn 2."""
    chunk = DEFAULT_CHUNK_BYTES if chunk_mb is None else int(chunk_mb * 2**20)
    if name == "auto":
        name = "sdpa"
    reason = unavailable_reason(name)
    if reason:
        raise AttentionBackendError(reason)
    return AttentionBackend(name, chunk)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: KeyPadding | None = None
) -> torch.Tensor:
    """Plain float64 softmax attention, the yardstick every backend is tested against."""
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
    scores = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if padding is not None:
        scores = scores.masked_fill(~padding.sdpa_mask(q.device), float("-inf"))
    return (scores.softmax(-1) @ vd).transpose(1, 2)
