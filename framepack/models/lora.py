"""LoRA adapters on the transformer blocks' Linears, merged back into plain Linears for export.

Contract:
  * `apply_lora(model, rank, alpha)` freezes the model and wraps the `LORA_TARGETS` Linears inside the
    double- and single-stream blocks (attention and MLP projections) in `LoRALinear`:
    y = base(x) + (alpha / rank) * up(down(x)), `up` starting at zero, so the wrapped model computes
    exactly what it computed before. Only the adapters train.
  * `LoRALinear.weight` reads as the merged matrix, so code that uses a Linear's weight directly (the
    single blocks split `proj_out.weight` into column blocks) still sees the adaptation.
  * `lora_state_dict(model)` holds the adapters alone (what a LoRA run checkpoints).
  * `merge_lora(model)` replaces every `LoRALinear` with a plain Linear holding base + delta: the
    result has the official key layout and loads like any other checkpoint.

The adapters here are the trainer's own; loading LoRA files made elsewhere (community formats, one
delta per target module) belongs in this module too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
)  # fmt: skip


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * up(down(x)), the base frozen; `up` starts at zero (y unchanged).

    `weight` reads as the merged matrix, so code that uses a Linear's weight directly (the single
    blocks split `proj_out.weight` into column blocks) still sees, and trains, the adaptation.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        dev = base.weight.device
        self.lora_down = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_up = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        delta = (self.lora_up @ self.lora_down) * self.scale  # (out, in)
        return self.base.weight + delta.to(self.base.weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))  # (..., out) via rank r
        return self.base(x) + low * self.scale

    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)  # fmt: skip
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def _blocks_linears(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, full name) of the target Linears inside the double and single blocks."""
    found = []
    for name, module in model.named_modules():
        if not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        if isinstance(module, nn.Linear) and any(name.endswith("." + t) for t in targets):
            parent_name, _, attr = name.rpartition(".")
            found.append((model.get_submodule(parent_name), attr, name))
    return found


def _replace(parent: nn.Module, attr: str, module: nn.Module) -> None:
    if isinstance(parent, nn.ModuleList):
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: tuple[str, ...] = LORA_TARGETS,
               seed: int = 0) -> list[str]:  # fmt: skip
    """Freeze `model` and wrap the target Linears of its blocks in LoRALinear; returns their names."""
    model.requires_grad_(False)
    torch.manual_seed(seed)  # the `down` matrices' init
    names = []
    for parent, attr, name in _blocks_linears(model, targets):
        _replace(parent, attr, LoRALinear(getattr(parent, attr), rank, float(alpha if alpha is not None else rank)))
        names.append(name)
    if not names:
        raise ValueError(f"no Linear matched the LoRA targets {targets}")
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear with a plain Linear holding the merged weight (official key layout)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            _replace(model.get_submodule(parent_name) if parent_name else model, attr, module.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors alone (keys containing `.lora_`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}
