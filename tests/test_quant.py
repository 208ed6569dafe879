"""fp8 weight storage: the e4m3 rounding bound, memory halved, output error vs bf16, streaming."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_inputs, randomize_

from framepack.config import TINY
from framepack.memory import MemoryManager, Mode, Placement, Plan, module_bytes
from framepack.models.quant import E4M3_MAX, FP8Linear, quantize_fp8_
from framepack.models.transformer import FramePackTransformer


def test_fp8_linear_rounding_bound():
    """e4m3 keeps 3 mantissa bits: every weight in the normal range is within 2^-4 relative error."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    lin.weight.data = torch.randn(16, 64) * torch.logspace(-2, 1, 16)[:, None]  # rows of varied scale
    q = FP8Linear(lin, torch.float32)
    w, deq = lin.weight.detach(), q.weight
    scale = w.abs().amax(1, keepdim=True) / E4M3_MAX
    assert torch.allclose(deq.abs().amax(1), w.abs().amax(1))  # each row's absmax maps to 448 exactly
    normal = w.abs() >= scale * 2**-6  # e4m3's smallest normal is 2^-6
    rel = ((deq - w).abs() / w.abs())[normal]
    assert rel.max() <= 2**-4 + 1e-6
    x = torch.randn(3, 64)
    assert torch.allclose(q(x), torch.nn.functional.linear(x, deq, lin.bias))


@pytest.fixture(scope="module")
def models():
    cfg = dataclasses.replace(TINY, attention_head_dim=64, num_attention_heads=2, rope_axes_dim=(16, 24, 24))
    ref = randomize_(FramePackTransformer(cfg), seed=1).eval().to(torch.bfloat16)
    q = FramePackTransformer(cfg).eval().to(torch.bfloat16)
    q.load_state_dict(ref.state_dict())
    saved = quantize_fp8_(q)
    return cfg, ref, q, saved


def test_blocks_take_half_the_bytes(models):
    _, ref, q, saved = models
    blocks = lambda m: sum(module_bytes(b) for b in [*m.transformer_blocks, *m.single_transformer_blocks])  # noqa: E731
    before, after = blocks(ref), blocks(q)
    assert before - after == saved
    assert 0.5 < after / before < 0.56  # weights 1 byte instead of 2; biases, norms and scales stay


def test_fp8_output_error_against_bf16(models):
    cfg, ref, q, _ = models
    kw = make_inputs(cfg, "f1", seed=3, dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = ref(**kw).sample, q(**kw).sample
    rel = ((a - b).norm() / a.norm()).item()
    print(f"fp8 vs bf16 relative L2 error of the velocity: {rel:.4f}")
    assert 0 < rel < 0.1


def test_quantized_model_streams_identically(models):
    cfg, _, q, _ = models
    kw = make_inputs(cfg, "original_p0", seed=4, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = q(**kw).sample
    blocks = [*q.transformer_blocks, *q.single_transformer_blocks]
    plan = Plan(1, {"t": Placement(Mode.STREAM, 1, 1, 2)})
    manager = MemoryManager("cpu", plan, {"t": q}, {"t": blocks})
    with manager.use("t"), torch.no_grad():
        got = q(**kw).sample
    assert torch.equal(expected, got)
    # every Linear of every block was replaced (none left in bf16), and nothing outside the blocks was
    plain = [m for b in blocks for m in b.modules() if type(m) is torch.nn.Linear]
    fp8 = [m for b in blocks for m in b.modules() if isinstance(m, FP8Linear)]
    # per double block: 2 modulations, q/k/v and their context twins, 2 outputs, 2 x 2 MLP; per single: 6
    assert plain == [] and len(fp8) == 14 * len(q.transformer_blocks) + 6 * len(q.single_transformer_blocks)
    assert not any(isinstance(m, FP8Linear) for m in q.context_embedder.modules())
    assert all(m.weight_fp8.dtype == torch.float8_e4m3fn for m in fp8)
