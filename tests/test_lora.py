"""LoRA adapters (framepack.models.lora) on a stand-in with the transformer's module names: what gets
wrapped, that a fresh adapter changes nothing, that `weight` and `forward` agree, and that merging gives
plain Linears in the original key layout computing the same thing. The trainer's own LoRA run on the
real transformer is in tests/test_train.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from framepack.models.lora import LORA_TARGETS, LoRALinear, apply_lora, lora_state_dict, merge_lora


class _Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.to_q, self.to_k, self.norm_q = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.LayerNorm(d)
        self.to_out = nn.ModuleList([nn.Linear(d, d), nn.Dropout(0.0)])


class _GELU(nn.Module):  # diffusers' GELU: a projection, then the activation
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.proj(x))


class _FF(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GELU(d, 2 * d), nn.Dropout(0.0), nn.Linear(2 * d, d)])


class _Double(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn, self.ff, self.norm1 = _Attn(d), _FF(d), nn.Linear(d, 6 * d)  # norm1: a modulation, no target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        h = a.to_out[0](a.to_q(x) * torch.sigmoid(a.to_k(x)))
        return x + h + self.ff.net[2](self.ff.net[1](self.ff.net[0](x))) + 0.01 * self.norm1(x)[..., : x.shape[-1]]


class _Single(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj_mlp, self.proj_out = nn.Linear(d, 2 * d), nn.Linear(3 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj_out.weight  # read directly, as the packed single blocks do
        h = torch.cat([x, self.proj_mlp(x)], -1)
        return x + h[..., : x.shape[-1]] @ w[:, : x.shape[-1]].T + h[..., x.shape[-1] :] @ w[:, x.shape[-1] :].T


class _Stand(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_Double(d), _Double(d)])
        self.single_transformer_blocks = nn.ModuleList([_Single(d)])
        self.proj_out = nn.Linear(d, d)  # outside the blocks: never wrapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in [*self.transformer_blocks, *self.single_transformer_blocks]:
            x = b(x)
        return self.proj_out(x)


def _stand() -> _Stand:
    torch.manual_seed(0)
    return _Stand()


def test_apply_wraps_the_block_targets_and_changes_nothing_at_first():
    model, x = _stand(), torch.randn(3, 5, 8)
    keys = set(model.state_dict())
    with torch.no_grad():
        before = model(x)
    names = apply_lora(model, rank=2, alpha=4.0, seed=1)
    double = ("attn.to_q", "attn.to_k", "attn.to_out.0", "ff.net.0.proj", "ff.net.2")
    single = ("proj_mlp", "proj_out")
    assert names == [f"transformer_blocks.{i}.{t}" for i in (0, 1) for t in double] + [
        f"single_transformer_blocks.0.{t}" for t in single
    ]
    assert isinstance(model.transformer_blocks[1].attn.to_out[0], LoRALinear)  # inside a ModuleList
    assert isinstance(model.transformer_blocks[0].ff.net[2], LoRALinear)
    assert type(model.proj_out) is nn.Linear and type(model.transformer_blocks[0].norm1) is nn.Linear
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state_dict(model))
    assert all(".lora_" in k for k in lora_state_dict(model)) and len(lora_state_dict(model)) == 2 * len(names)
    assert {k.replace(".base.", ".") for k in model.state_dict() if ".lora_" not in k} == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)  # up = 0: exactly the same
    with pytest.raises(ValueError, match="no Linear matched"):
        apply_lora(_stand(), rank=2, targets=("to_nothing",))
    assert "proj_out" in LORA_TARGETS and "to_q" in LORA_TARGETS


def test_weight_forward_and_merge_agree():
    model, x = _stand(), torch.randn(3, 5, 8)
    keys = set(model.state_dict())
    apply_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_up"):
                p.normal_(0.0, 0.5)
    lora = model.transformer_blocks[0].attn.to_q
    assert lora.scale == 2.0 and (lora.in_features, lora.out_features) == (8, 8)
    expected = lora.base.weight + 2.0 * lora.lora_up @ lora.lora_down
    torch.testing.assert_close(lora.weight, expected)
    with torch.no_grad():
        torch.testing.assert_close(lora(x), x @ expected.T + lora.bias, atol=1e-5, rtol=1e-5)
        adapted = model(x)
        merged = merge_lora(model)
        assert merged is model and not any(isinstance(m, LoRALinear) for m in model.modules())
        assert set(model.state_dict()) == keys  # the original key layout again
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    assert model.transformer_blocks[0].attn.to_k.bias is None  # a bias-free Linear stays bias-free
