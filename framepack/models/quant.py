"""fp8 weight storage for the transformer blocks, attached from outside (`quantize_fp8_(model)`).

Every Linear inside the 20 double and 40 single blocks (12.46 B of the 12.87 B parameters) keeps its
weight as float8_e4m3fn with one fp32 scale per output row (absmax / 448); matmuls dequantise it to
the compute dtype (bf16) on the fly. That halves the blocks' host RAM, device memory and
host->device traffic when streaming. It changes results (e4m3 keeps 3 mantissa bits); the error
against bf16 is measured in tests/test_quant.py and benchmarks/memory.py. Off by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3_MAX = 448.0


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 per-row scale) of a (out, in) matrix, computed from its fp32 values."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).to(torch.float8_e4m3fn), scale


class FP8Linear(nn.Module):
    """Drop-in for nn.Linear: `weight` (a read-only property) returns the dequantised weight."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__()
        w8, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_fp8", w8)  # (out, in)
        self.register_buffer("weight_scale", scale)  # (out, 1) fp32
        self.bias = linear.bias
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        dt = self.compute_dtype
        return self.weight_fp8.to(dt) * self.weight_scale.to(dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    @torch.no_grad()
    def set_weight_(self, weight: torch.Tensor) -> None:
        """Quantise a new high-precision weight (a merged LoRA, a restored original) into the existing
        buffers, in place (a streamed block's buffers are views of its flat host copy)."""
        w8, scale = quantize_rows(weight)
        self.weight_fp8.copy_(w8)
        self.weight_scale.copy_(scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3"


def quantize_fp8_(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace the Linears of `model.transformer_blocks` and `model.single_transformer_blocks` in place.

    Returns the number of bytes saved. The model must not be streamed while this runs.
    """
    if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"fp8 weights dequantise to bf16, fp16 or fp32, not {compute_dtype}")
    saved = 0
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for block in blocks:
            for parent in list(block.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        before = child.weight.numel() * child.weight.element_size()
                        setattr(parent, name, FP8Linear(child, compute_dtype))
                        saved += before - child.weight.numel() - 4 * child.out_features  # fp8 + scales
    if hasattr(model, "clear_section_cache"):
        model.clear_section_cache()
    return saved
